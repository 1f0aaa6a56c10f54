"""``mlockall()`` for the guest tools, through ctypes (the standard library has no wrapper).

The collector and the swapstress parent must keep reporting while the guest thrashes; if
their own pages were swapped out, a slow swap device would look like a hang.  Locks are not
inherited across ``fork()``, so locking the swapstress parent leaves its workers swappable.

``MCL_ONFAULT`` (Linux 4.4+) locks a page when it is first touched instead of populating
every mapping at once: plain ``mlockall`` pulled all of libpython and every arena into RAM,
28 MiB of unevictable memory in a 128 MiB guest for two Python processes, which the 2012
workload never had to share. Pages the tool never touches stay out; those it touches stay
in, which is what keeps it talking under thrashing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["mlockall"]

_MCL_CURRENT = 1  # <sys/mman.h> on Linux x86, arm and riscv
_MCL_FUTURE = 2
_MCL_ONFAULT = 4


def mlockall(*, on_fault: bool = True) -> str | None:
    """Lock current and future pages in RAM; returns an error text, or ``None`` on success.

    ``on_fault``: lock pages as they are touched (``MCL_ONFAULT``); a kernel without it
    (EINVAL) gets the plain lock.
    """
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        return f"cannot load libc ({name}): {exc}"
    flags = _MCL_CURRENT | _MCL_FUTURE
    if on_fault and libc.mlockall(flags | _MCL_ONFAULT) == 0:
        return None
    if libc.mlockall(flags) != 0:
        err = ctypes.get_errno()
        return (
            f"mlockall failed: {os.strerror(err)} (needs CAP_IPC_LOCK or a larger RLIMIT_MEMLOCK)"
        )
    return None
