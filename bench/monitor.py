"""Resource accounting of a server's process tree: CPU seconds and sampled peak RSS.

CPU time is read before and after a fio run: the tree's own user+system time, plus the
time of children it already reaped (nbd-server forks one child per client), plus the
time of children still alive. Peak RSS has no such counter for a live process, so a
background thread samples the tree's summed RSS every ``interval`` seconds while a run is
watched; children's RSS is added (shared pages counted twice, an upper bound).

Steal is the machine's: the share of all CPUs' time the hypervisor gave to other guests
during a run (/proc/stat, as psutil reads it). On a shared host it is the one measured
sign that a run timed the neighbours rather than the servers.
"""

from __future__ import annotations

import contextlib
import threading

import psutil


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu_seconds(proc: psutil.Process) -> float:
    """User+system CPU seconds of *proc*, its reaped children and its live descendants."""
    total = 0.0
    for i, p in enumerate(_tree(proc)):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            t = p.cpu_times()
            total += t.user + t.system
            if i == 0:
                total += t.children_user + t.children_system
    return total


def cpu_clock() -> tuple[float, float]:
    """(stolen, total) CPU seconds of the whole machine since boot (every CPU summed)."""
    t = psutil.cpu_times()
    stolen = float(getattr(t, "steal", 0.0))
    # guest and guest_nice are already inside user and nice.
    total = sum(float(getattr(t, f, 0.0)) for f in t._fields if f not in ("guest", "guest_nice"))
    return stolen, total


def steal_share(before: tuple[float, float], after: tuple[float, float]) -> float:
    """The share of the machine's CPU time stolen between two :func:`cpu_clock` readings."""
    stolen, total = after[0] - before[0], after[1] - before[1]
    return stolen / total if total > 0 else 0.0


def tree_rss(proc: psutil.Process) -> int:
    """Summed resident set size in bytes of *proc* and its descendants."""
    total = 0
    for p in _tree(proc):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            total += int(p.memory_info().rss)
    return total


class RssSampler:
    """Samples the RSS of one watched process tree at a time, from a daemon thread.

    ``watch(proc)`` starts a new peak for *proc*; ``stop()`` returns it. ``overall`` keeps
    the highest peak seen per label for the whole run.
    """

    def __init__(self, interval: float = 0.05) -> None:
        if interval <= 0:
            raise ValueError(f"sample interval must be > 0 s, got {interval}")
        self.interval = interval
        self.overall: dict[str, int] = {}
        self._lock = threading.Lock()
        self._proc: psutil.Process | None = None
        self._label = ""
        self._peak = 0
        self._quit = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()

    def watch(self, proc: psutil.Process, label: str) -> None:
        first = tree_rss(proc)
        with self._lock:
            self._proc = proc
            self._label = label
            self._peak = first

    def stop(self) -> int:
        """Stop watching; take one last sample and return the peak in bytes."""
        with self._lock:
            proc, label = self._proc, self._label
            self._proc = None
        last = tree_rss(proc) if proc is not None else 0
        with self._lock:
            peak = max(self._peak, last)
            self.overall[label] = max(self.overall.get(label, 0), peak)
            return peak

    def close(self) -> None:
        self._quit.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._quit.wait(self.interval):
            with self._lock:
                proc = self._proc
            if proc is None:
                continue
            rss = tree_rss(proc)
            with self._lock:
                if self._proc is proc:
                    self._peak = max(self._peak, rss)
