"""``mlockall()`` for the guest tools, through ctypes (the standard library has no wrapper).

The collector and the swapstress parent must keep reporting while the guest thrashes; if
their own pages were swapped out, a slow swap device would look like a hang.  Locks are not
inherited across ``fork()``, so locking the swapstress parent leaves its workers swappable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["mlockall"]

_MCL_CURRENT = 1  # <sys/mman.h> on Linux x86, arm and riscv
_MCL_FUTURE = 2


def mlockall() -> str | None:
    """Lock current and future pages in RAM; returns an error text, or ``None`` on success."""
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        return f"cannot load libc ({name}): {exc}"
    if libc.mlockall(_MCL_CURRENT | _MCL_FUTURE) != 0:
        err = ctypes.get_errno()
        return (
            f"mlockall failed: {os.strerror(err)} (needs CAP_IPC_LOCK or a larger RLIMIT_MEMLOCK)"
        )
    return None
