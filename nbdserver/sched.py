"""How the server asks the kernel to schedule it: a policy (``--sched-policy``) and a
slice (``--sched-slice-us``).

Theory of operation
-------------------
A server answering one request at a time sleeps between requests, and each request
wakes it. On a host whose cores are busy (in the swap experiment, QEMU's vCPU threads
under TCG), where the woken server runs decides what it costs its client.

**Policy.** Under SCHED_OTHER a woken server may preempt a vCPU thread. In the swap
experiment that cost the guest more than the server's own CPU time: the guest's Sys
time and QEMU's CPU time were the larger for it. Under SCHED_IDLE the server runs when a
CPU would otherwise idle, which in the swap experiment is when the guest waits for its
swap I/O, that is, for the server; a busy host still gives it a minimal share, so it
never starves. SCHED_BATCH keeps the normal share but does not preempt on wake-up.
Measured (docs/performance.md, "Scheduling policy"): under ``--sched-policy idle`` the
swap-path shape's median stress Elapsed fell from 46.1 s to 38.2 s (8 rotated runs
each). No privilege is needed for any of the three.

**Slice.** Since Linux 6.12, EEVDF lets a SCHED_OTHER task ask for a shorter slice with
``sched_setattr(sched_runtime=...)``: its virtual deadline comes sooner, so a wake-up can
preempt the running task instead of queueing behind it. The task's share of the CPU does
not change (that is its nice value), and no privilege is needed. Measured in the swap
experiment (docs/performance.md, "Scheduler slice"), the server's run-queue wait fell
from about 2.3-3.0 s to about 0.9 s per run, and the guest's run did not get shorter.

Both are per thread and inherited by threads and processes created later, so the server
sets them once, before it forks workers or starts threads: the policy first (a policy
change resets the slice), then the slice. Both are read back from the kernel: a kernel
without per-task slices (before 6.12) reports none, and the log says the setting is not
in effect.

This module is an adapter (ctypes, system calls); the protocol core never imports it.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from typing import Final

from nbdserver.swapsafe import Outcome, errno_failure, load_libc

__all__ = ["current_slice_ns", "set_policy", "set_slice"]

#: (sched_setattr, sched_getattr) system call numbers.
_SYSCALLS: Final = {"x86_64": (314, 315), "aarch64": (274, 275)}
#: struct sched_attr up to sched_period (SCHED_ATTR_SIZE_VER0): size, policy, flags,
#: nice, priority, runtime, deadline, period.
_ATTR: Final = struct.Struct("=IIQiIQQQ")
#: SCHED_OTHER and SCHED_BATCH: the policies a slice applies to (SCHED_IDLE tasks keep
#: the kernel's, as the read-back shows; real-time ones have none).
_SLICE_POLICIES: Final = (0, 3)


def _calls() -> tuple[int, int] | None:
    return _SYSCALLS.get(platform.machine())


def _getattr(libc: ctypes.CDLL, getattr_nr: int, tid: int = 0) -> tuple[int, ...] | None:
    buf = ctypes.create_string_buffer(_ATTR.size)
    if libc.syscall(getattr_nr, tid, buf, _ATTR.size, 0) != 0:
        return None
    return _ATTR.unpack(buf.raw)


def current_slice_ns(tid: int = 0) -> int | None:
    """Thread ``tid``'s slice (0: the calling thread's) as the kernel reports it, or
    None if it cannot say."""
    calls = _calls()
    if calls is None:
        return None
    attr = _getattr(load_libc(), calls[1], tid)
    return None if attr is None else attr[5]


def set_slice(slice_us: int) -> Outcome:
    """Ask for a ``slice_us`` µs slice for the calling thread (and all it creates later)."""
    calls = _calls()
    if calls is None:
        return Outcome(False, f"sched_setattr is not wired for {platform.machine()!r}")
    setattr_nr, getattr_nr = calls
    libc = load_libc()
    attr = _getattr(libc, getattr_nr)
    if attr is None:
        return Outcome(False, errno_failure("sched_getattr"))
    policy, nice = attr[1], attr[3]
    if policy not in _SLICE_POLICIES:
        return Outcome(
            False, f"the server runs under scheduling policy {policy}, which takes no slice"
        )
    want = slice_us * 1000
    # Keep the policy and nice value; only the slice (sched_runtime) changes.
    buf = ctypes.create_string_buffer(_ATTR.pack(_ATTR.size, policy, 0, nice, 0, want, 0, 0))
    if libc.syscall(setattr_nr, 0, buf, 0) != 0:
        return Outcome(False, errno_failure("sched_setattr"))
    after = _getattr(libc, getattr_nr)
    got = None if after is None else after[5]
    if got != want:
        return Outcome(
            False,
            f"the kernel reports a {got} ns slice after asking for {want} ns:"
            f" per-task slices need Linux >= 6.12 (this is {platform.release()})",
        )
    return Outcome(True, f"scheduler slice {slice_us} µs: wake-ups preempt CPU-bound tasks")


#: --sched-policy's names (config.SCHED_POLICIES, which must stay free of this adapter)
#: -> the kernel's policy (sched(7)) and what it does, for the log.
_POLICIES: Final = {
    "normal": (os.SCHED_OTHER, "wake-ups may preempt running tasks"),
    "batch": (os.SCHED_BATCH, "wake-ups do not preempt running tasks"),
    "idle": (os.SCHED_IDLE, "runs when a CPU would otherwise idle, or on a minimal share"),
}


def set_policy(name: str) -> Outcome:
    """Put the calling thread (and all it creates later) under policy ``name``.

    The slice is reset by the kernel when the policy changes, so call this before
    :func:`set_slice`.
    """
    want, effect = _POLICIES[name]
    try:
        os.sched_setscheduler(0, want, os.sched_param(0))
        got = os.sched_getscheduler(0)
    except OSError as exc:
        return Outcome(False, errno_failure("sched_setscheduler", exc.errno))
    if got != want:
        return Outcome(False, f"the kernel reports policy {got} after asking for {want}")
    return Outcome(True, f"scheduling policy {name}: {effect}")
