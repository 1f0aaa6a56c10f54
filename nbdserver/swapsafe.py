"""Swap-safe mode (``--swap-safe``): the server must not need swap to serve swap.

Theory of operation
-------------------
When a machine swaps onto an NBD export, the server is on the path that frees memory.
If the server itself is paged out, or allocates memory in a way that waits for page
reclaim, reclaim waits for the server and the server waits for reclaim: a deadlock. The
kernel's nbd-client documents the same trap (and runs its user-space side under
mlockall). Three measures, each reported in the log and the ``--stats`` lines as taking
effect or not, and why:

1. ``mlockall(MCL_CURRENT | MCL_FUTURE)``: every page of the process, now and later,
   stays in RAM. Needs CAP_IPC_LOCK or an RLIMIT_MEMLOCK large enough for the process.
   Memory locks are not inherited across fork(), so every worker process asks again.
   Thread stacks are resident in full once locked, so swap-safe mode shrinks the stacks
   of Python threads started afterwards (:data:`THREAD_STACK`) and asks libuv for one
   thread-pool thread instead of four (``UV_THREADPOOL_SIZE``, read at its first use; it
   only resolves names for ``create_server``): each libuv thread has an 8 MiB stack, so
   four of them were 32 of the 68 MiB an idle single process locked.
2. ``prctl(PR_SET_IO_FLUSHER, 1)`` (Linux >= 5.6, needs CAP_SYS_RESOURCE): the kernel
   marks the thread PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE, so its allocations never
   start I/O to reclaim memory and it is not throttled for other devices' dirty pages,
   as for a loop device's thread. The flag is per thread and inherited by threads created
   later; it is set before the I/O thread pool starts. ``PR_GET_IO_FLUSHER`` confirms it.
3. No unbounded allocation on the hot path: every connection's unanswered bytes are
   bounded by ``--max-inflight`` (nbdserver.policy.FlowControl pauses reading past it)
   and its receive buffer by the largest request the export accepts. The report states
   the bound in force.

This module is an adapter (ctypes, prctl); the protocol core never imports it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from dataclasses import asdict, dataclass
from typing import Any, Final

__all__ = [
    "MCL_CURRENT",
    "MCL_FUTURE",
    "PR_GET_IO_FLUSHER",
    "PR_SET_IO_FLUSHER",
    "Outcome",
    "SwapSafeReport",
    "enter_swap_safe_mode",
    "errno_failure",
    "load_libc",
    "lock_memory",
    "set_io_flusher",
]

logger = logging.getLogger(__name__)

MCL_CURRENT: Final = 1
MCL_FUTURE: Final = 2
PR_SET_IO_FLUSHER: Final = 57
PR_GET_IO_FLUSHER: Final = 58
#: Stack size of threads started in swap-safe mode: locked stacks are resident in full,
#: and the I/O threads only run short backend calls.
THREAD_STACK: Final = 256 * 1024


@dataclass(frozen=True, slots=True)
class Outcome:
    """Whether one measure took effect, and why not if it did not."""

    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class SwapSafeReport:
    """What swap-safe mode achieved in one process (its ``--stats`` entry)."""

    pid: int
    mlockall: Outcome
    io_flusher: Outcome
    bounded_inflight: Outcome

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def log(self) -> None:
        for name in ("mlockall", "io_flusher", "bounded_inflight"):
            outcome: Outcome = getattr(self, name)
            level = logging.INFO if outcome.ok else logging.WARNING
            logger.log(
                level,
                "swap-safe (pid %d): %s %s: %s",
                self.pid,
                name,
                "in effect" if outcome.ok else "NOT in effect",
                outcome.detail,
            )


def load_libc() -> ctypes.CDLL:
    """The C library, with errno kept for :func:`errno_failure` (also nbdserver.sched)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def errno_failure(call: str, err: int | None = None) -> str:
    """``call failed: <strerror> (errno N)`` for ``err``, by default the errno the last
    ctypes call left."""
    if err is None:
        err = ctypes.get_errno()
    return f"{call} failed: {os.strerror(err)} (errno {err})"


def lock_memory() -> Outcome:
    """``mlockall(MCL_CURRENT | MCL_FUTURE)`` for this process."""
    libc = load_libc()
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        return Outcome(
            False,
            errno_failure("mlockall(MCL_CURRENT|MCL_FUTURE)")
            + "; needs CAP_IPC_LOCK or a larger RLIMIT_MEMLOCK (ulimit -l)",
        )
    return Outcome(True, "mlockall(MCL_CURRENT|MCL_FUTURE): every page stays in RAM")


def set_io_flusher() -> Outcome:
    """``prctl(PR_SET_IO_FLUSHER, 1)`` for this thread, checked with PR_GET_IO_FLUSHER."""
    libc = load_libc()
    zero = ctypes.c_ulong(0)
    if libc.prctl(PR_SET_IO_FLUSHER, ctypes.c_ulong(1), zero, zero, zero) != 0:
        why = errno_failure("prctl(PR_SET_IO_FLUSHER, 1)")
        return Outcome(False, why + "; needs Linux >= 5.6 and CAP_SYS_RESOURCE")
    got = libc.prctl(PR_GET_IO_FLUSHER, zero, zero, zero, zero)
    if got != 1:
        return Outcome(False, f"PR_GET_IO_FLUSHER returned {got} after setting it")
    return Outcome(True, "PR_SET_IO_FLUSHER: allocations never recurse into I/O (NOIO)")


def check_bounds(max_inflight: int, max_block: int) -> Outcome:
    """The per-connection bound on unanswered bytes and the largest request buffer."""
    if max_inflight <= 0:
        return Outcome(False, "no in-flight byte bound")
    return Outcome(
        True,
        f"per connection at most {max_inflight} bytes of unanswered replies and held"
        f" WRITE payloads (--max-inflight), requests at most {max_block} bytes",
    )


def enter_swap_safe_mode(max_inflight: int, max_block: int) -> SwapSafeReport:
    """Apply all three measures in the calling process; log and return the outcome.

    Call it in every process (memory locks do not survive fork) before the I/O thread
    pool starts (threads inherit the IO_FLUSHER flag and the smaller stack).
    """
    threading.stack_size(THREAD_STACK)
    os.environ.setdefault("UV_THREADPOOL_SIZE", "1")
    report = SwapSafeReport(
        pid=os.getpid(),
        mlockall=lock_memory(),
        io_flusher=set_io_flusher(),
        bounded_inflight=check_bounds(max_inflight, max_block),
    )
    report.log()
    return report
