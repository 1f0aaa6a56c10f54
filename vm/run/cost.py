"""What a run costs the host: the server's CPU, memory, wake-ups and run-queue wait, QEMU's
CPU, and the host's steal time (run.json ``cost``).

The server process tree is sampled with psutil and /proc while it runs
(:class:`ServerCost`), so forked workers that exit still count for CPU; QEMU's own CPU
seconds come from its rusage (``wait4``, by the caller that reaps it); steal time is read
from /proc/stat at boot and at the end (:func:`host_steal_ticks`).
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

#: Seconds between two samples of the server's CPU time and RSS.
COST_INTERVAL_S = 2.0


def _sum_over_threads(pid: int, name: str, parse: Callable[[str], int]) -> int:
    """``parse`` of /proc/PID/task/TID/NAME, summed over the live threads of ``pid``
    (0 if it is gone). Threads that already exited are not counted: /proc keeps no
    total for them. A thread that exits while being read is skipped."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/{name}") as f:
                total += parse(f.read())
        except (OSError, ValueError, IndexError):
            continue
    return total


def _voluntary_switches(status: str) -> int:
    for line in status.splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0


def task_wakeups(pid: int) -> int:
    """Voluntary context switches of every live thread of ``pid``: how often it went to
    sleep (in epoll, a futex or a read) and had to be woken."""
    return _sum_over_threads(pid, "status", _voluntary_switches)


def task_runqueue_wait(pid: int) -> int:
    """Nanoseconds the live threads of ``pid`` spent runnable but waiting for a CPU
    (schedstat's second field): how long its wake-ups queued behind other tasks."""
    return _sum_over_threads(pid, "schedstat", lambda text: int(text.split()[1]))


def tree_usage(pid: int) -> tuple[float, float, int, int, int] | None:
    """(user s, system s, RSS bytes, wake-ups, run-queue wait ns) of ``pid`` and all its
    descendants, or None if gone.

    Each process counts its own CPU time plus that of the children it has reaped, so a
    forked worker that exited still counts once it is reaped.  RSS is summed, so pages
    shared between processes count once per process (an upper bound). Wake-ups are
    :func:`task_wakeups` summed over the tree, and so is :func:`task_runqueue_wait`.
    """
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    user = system = 0.0
    rss = wakeups = waited = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            user += t.user + t.children_user
            system += t.system + t.children_system
        with contextlib.suppress(psutil.Error):
            rss += proc.memory_info().rss
        wakeups += task_wakeups(proc.pid)
        waited += task_runqueue_wait(proc.pid)
    return user, system, rss, wakeups, waited


@dataclass(slots=True)
class ServerCost:
    """The server process tree's CPU time and peak RSS, sampled while it runs."""

    pid: int
    user_s: float = 0.0
    system_s: float = 0.0
    peak_rss_bytes: int = 0
    #: Voluntary context switches of the tree's threads (the largest sum seen).
    wakeups: int = 0
    #: Seconds the tree's threads were runnable but waiting for a CPU (largest sum seen).
    runqueue_wait_s: float = 0.0
    samples: int = 0
    last: float = -math.inf

    def sample(self, now: float, *, force: bool = False) -> None:
        if not force and now - self.last < COST_INTERVAL_S:
            return
        self.last = now
        usage = tree_usage(self.pid)
        if usage is None:
            return
        self.samples += 1
        # CPU time only grows; the maximum survives the tree shrinking between samples.
        self.user_s = max(self.user_s, usage[0])
        self.system_s = max(self.system_s, usage[1])
        self.peak_rss_bytes = max(self.peak_rss_bytes, usage[2])
        self.wakeups = max(self.wakeups, usage[3])
        self.runqueue_wait_s = max(self.runqueue_wait_s, usage[4] / 1e9)

    def as_dict(self) -> dict[str, Any]:
        return {
            "user_s": round(self.user_s, 3),
            "system_s": round(self.system_s, 3),
            "peak_rss_bytes": self.peak_rss_bytes,
            "wakeups": self.wakeups,
            "runqueue_wait_s": round(self.runqueue_wait_s, 3),
            "samples": self.samples,
        }


def host_steal_ticks() -> int | None:
    """The host's cumulative steal time in clock ticks (/proc/stat), None if not there."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    return int(fields[8])


@dataclass(slots=True)
class Cost:
    """What run.json records as ``cost``."""

    server: ServerCost | None = None
    qemu: resource.struct_rusage | None = None
    steal_start: int | None = None
    steal_end: int | None = None

    def as_dict(self) -> dict[str, Any]:
        steal: float | None = None
        if self.steal_start is not None and self.steal_end is not None:
            steal = round((self.steal_end - self.steal_start) / os.sysconf("SC_CLK_TCK"), 2)
        qemu_cost = None
        if self.qemu is not None:
            qemu_cost = {
                "user_s": round(self.qemu.ru_utime, 3),
                "system_s": round(self.qemu.ru_stime, 3),
                "max_rss_bytes": self.qemu.ru_maxrss * 1024,
            }
        return {
            "server": self.server.as_dict() if self.server is not None else None,
            "qemu": qemu_cost,
            "host_steal_s": steal,
        }
