"""How the server asks the kernel to schedule it: a policy (``--sched-policy``).

Theory of operation
-------------------
A server answering one request at a time sleeps between requests, and each request
wakes it. On a host whose cores are busy (in the swap experiment, QEMU's vCPU threads
under TCG), where the woken server runs decides what it costs its client.

Under SCHED_OTHER a woken server may preempt a vCPU thread. In the swap experiment that
cost the guest more than the server's own CPU time: the guest's Sys time and QEMU's CPU
time were the larger for it. Under SCHED_IDLE the server runs when a CPU would otherwise
idle, which in the swap experiment is when the guest waits for its swap I/O, that is,
for the server; a busy host still gives it a minimal share, so it never starves.
SCHED_BATCH keeps the normal share but does not preempt on wake-up. Measured
(docs/performance.md, "Scheduling policy"): under ``--sched-policy idle`` the swap-path
shape's median stress Elapsed fell from 46.1 s to 38.2 s (8 rotated runs each). No
privilege is needed for any of the three.

The policy is per thread and inherited by threads and processes created later, so the
server sets it once, before it forks workers or starts threads, and reads it back from
the kernel: the log says whether it is in effect.

This module is an adapter (system calls); the protocol core never imports it.
"""

from __future__ import annotations

import os
from typing import Final

from nbdserver.swapsafe import Outcome, errno_failure

__all__ = ["set_policy"]

#: --sched-policy's names (config.SCHED_POLICIES, which must stay free of this adapter)
#: -> the kernel's policy (sched(7)) and what it does, for the log.
_POLICIES: Final = {
    "normal": (os.SCHED_OTHER, "wake-ups may preempt running tasks"),
    "batch": (os.SCHED_BATCH, "wake-ups do not preempt running tasks"),
    "idle": (os.SCHED_IDLE, "runs when a CPU would otherwise idle, or on a minimal share"),
}


def set_policy(name: str) -> Outcome:
    """Put the calling thread (and all it creates later) under policy ``name``."""
    want, effect = _POLICIES[name]
    try:
        os.sched_setscheduler(0, want, os.sched_param(0))
        got = os.sched_getscheduler(0)
    except OSError as exc:
        return Outcome(False, errno_failure("sched_setscheduler", exc.errno))
    if got != want:
        return Outcome(False, f"the kernel reports policy {got} after asking for {want}")
    return Outcome(True, f"scheduling policy {name}: {effect}")
