"""One swap-over-NBD experiment: image, server, QEMU, watchdog, run.json.

Theory of operation
-------------------
:func:`run_experiment` does, in order, one function each:

1. :func:`_image` builds (or finds in the cache) the guest image for the kernel, arm and
   allocator through :mod:`vm.image.image`;
2. :func:`_accelerator` resolves the accelerator (``auto`` boot-probes KVM, :mod:`vm.run.qemu`);
3. :func:`_serving` (a context manager) starts the NBD server on 127.0.0.1 at a confirmed
   free port, exporting a fresh random name sized at least 5x guest RAM
   (:mod:`peers.servers`), and stops it, with its final stats line and its cost, however the
   block is left;
4. :func:`_boot` encodes the guest's parameters as one base64url JSON blob on the kernel
   command line (``swapnbd.cfg=``, read by :mod:`vm.image.guest_init`, PID 1 in the guest), after
   the arm's own words (``nbd.memalloc=0`` ...), and starts QEMU;
5. :func:`_watch` polls the files QEMU writes through a :class:`vm.run.watchdog.Watchdog`,
   printing progress and sampling the server's cost, and returns an :class:`Ending`:
   the guest powered off, fell silent or stalled (a ``lockup``), the overall timeout hit, or
   the guest sent its result and never powered off;
6. :func:`_record` classifies the run, summarizes the samples with
   ``stress.vmstat.summarize`` and fills run.json, which :func:`run_experiment` writes.

A guest that hangs before it reports anything is booted once more (steps 4-5 again,
:data:`BOOT_ATTEMPTS`); ``boot_retries`` in run.json keeps each failed boot's silence,
last console line and console file (``console-boot1.log``).

Every path out writes ``OUT/run.json``: the harness records every outcome, not just the
happy one.  Any exception is recorded as outcome ``error``; SIGINT and SIGTERM stop QEMU
and the server and are recorded as ``interrupted`` (``interrupted_by`` names the signal).

No orphans: QEMU is launched with ``PR_SET_PDEATHSIG`` and the servers die with their
parent too (:mod:`peers.lifeline`), so even a SIGKILLed harness leaves nothing running.

Cost: run.json ``cost`` holds the server process tree's CPU seconds, peak RSS, wake-ups
and run-queue wait (sampled with psutil and /proc while it runs, so forked workers that
exit still count for CPU), QEMU's own
CPU seconds (its rusage, from ``wait4``) and the host's steal time over the run.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import psutil

from peers import lifeline, servers
from stress.runrecord import FILES, Outcome, RunRecord
from stress.vmstat import summarize
from vm.image import arms, guest_init
from vm.image.progress import format_duration
from vm.run import forensics, qemu, watchdog

if TYPE_CHECKING:
    from vm.image.image import GuestImage

log = logging.getLogger(__name__)

SwapMode = Literal["device", "file"]
Emit = Callable[[str], None]
MIB = 1024 * 1024

#: Seconds the guest gets to power off after it sent its result.
POWEROFF_GRACE_S = 60.0
POLL_INTERVAL_S = 0.5
STATUS_INTERVAL_S = 10.0
#: Seconds between two samples of the server's CPU time and RSS.
COST_INTERVAL_S = 2.0

ARMS = arms.ARMS
ALLOCATORS = ("slub", "slab")
SCHED_POLICIES = ("normal", "batch", "idle")

#: Every file a run leaves in OUT besides run.json (created empty when a run fails early).
OUTPUT_FILES = FILES


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Everything one run is configured with (recorded verbatim as ``config`` in run.json)."""

    out: Path
    """Results directory."""
    memory_mib: int = 128
    """Guest RAM in MiB."""
    cpus: int = 2
    """Guest vCPUs."""
    workers: int = 8
    """swapstress worker processes."""
    total_bytes: int | None = 256 * MIB
    """Total anonymous memory the workers touch (exclusive with ``ratio``)."""
    ratio: float | None = None
    """Total as a multiple of the guest's MemTotal (exclusive with ``total_bytes``)."""
    loops: int = 1
    """Verification passes over the whole mapping."""
    kernel: str = "6.1"
    """Kernel understood by vm.image.image: a stock package (``6.1``, ``6.12``), a built variant
    (``6.1-build``) or a bzImage path; vm.image.image validates it."""
    arm: str = "patched"
    """``patched`` (nbd memalloc + pfmemalloc throttle, as shipped) or ``vanilla``."""
    allocator: str | None = None
    """None (the kernel's own), ``slub`` or ``slab`` (a built 6.1 kernel)."""
    flavour: str = "cloud"
    """Debian kernel flavour."""
    swap: SwapMode = "device"
    """Swap on /dev/nbd0 directly, or on a swapfile in ext4 on /dev/nbd0."""
    swap_bytes: int | None = None
    """Size of the swap area (mkswap SIZE or the swapfile); None: the whole device (or 90%
    of it for a swapfile).  Smaller than the plan minus RAM makes the guest OOM."""
    server: servers.ServerKind = "nbd-serve"
    """NBD server that backs the swap."""
    backing: servers.Backing | None = None
    """Server storage: memory or a sparse file (None: the server's default)."""
    accel: qemu.AccelRequest = "auto"
    """auto (boot-probe KVM, else TCG), tcg or kvm."""
    lockup_after_s: float = 180.0
    """No heartbeat and no sample (or, in the stress phase, no page progress) for this long
    => lockup, unless the kernel's evidence confirmed it earlier (see ``stall_after_s``)."""
    stall_after_s: float | None = None
    """No page progress for this long in the stress phase is a *stall*: the host presses
    SysRq w/m, then w/l/t, and keeps watching; progress resuming makes it a recorded stall,
    the same deadlock signature in both looks confirms the lockup at once. None: a third
    of ``lockup_after_s``, at most 30 s."""
    early_confirm: bool = True
    """Confirm a lockup as soon as both looks give the same deadlock signature; False holds
    every stall for the whole ``lockup_after_s`` (a held run: does it ever recover?)."""
    server_sched_policy: str = "idle"
    """nbd-serve's ``--sched-policy`` in the experiment (docs/performance.md, "Scheduling
    policy"); ``normal`` shows that a verdict does not depend on it."""
    timeout_s: float | None = None
    """Overall limit for the guest, QEMU is killed after it; None: sized from the workload
    (a safety net only: hangs are caught by ``lockup_after_s``)."""
    nbd_timeout: int = 0
    """nbd-client -t; 0 (requests never fail) keeps the deadlock observable."""
    nbd_connections: int = 1
    """nbd-client -C."""
    nbd_swap_flag: bool = True
    """nbd-client -swap."""
    resident_client: bool = False
    """Use the 2012-style resident client (nbd-client -L -swap, ioctl mode, mlockall)."""
    min_free_kbytes: int | None = None
    """vm.min_free_kbytes to pin; None = the kernel's formula for this RAM size, pinned."""
    vmstat_interval_s: float = 1.0
    """Collector sampling interval."""
    cache_dir: Path | None = None
    """Image and probe cache (None: vm.image.image.default_cache_dir())."""
    export_factor: int = 5
    """Export size as a multiple of guest RAM (issue 5: at least 5x)."""
    payload_dir: Path | None = None
    """Source tree of the guest payload (stress/, vm/image/guest_init.py); None = this checkout."""
    server_fault: str | None = None
    """TEST ONLY: nbd-serve ``--fault`` spec (corrupts one READ; see
    nbdserver/backends/fault.py)."""
    guest_panic_after_s: float | None = None
    """TEST ONLY: the guest crashes its kernel (sysrq ``c``) this long after the stress
    phase starts."""

    def validate(self) -> None:
        """Raise ValueError with a clear message for settings that cannot work."""
        if self.memory_mib < 64:
            raise ValueError(f"--memory must be at least 64M, got {self.memory_mib}M")
        if self.cpus < 1:
            raise ValueError(f"--cpus must be >= 1, got {self.cpus}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if (self.total_bytes is None) == (self.ratio is None):
            raise ValueError("give exactly one of --total and --ratio")
        if self.total_bytes is not None and self.total_bytes < self.workers * 4096:
            raise ValueError(f"--total {self.total_bytes} is less than one page per worker")
        if self.ratio is not None and not 0 < self.ratio <= 64:
            raise ValueError(f"--ratio must be in (0, 64], got {self.ratio}")
        if self.loops < 1:
            raise ValueError(f"--loops must be >= 1, got {self.loops}")
        if self.swap not in ("device", "file"):
            raise ValueError(f"--swap must be device or file, not {self.swap!r}")
        if self.server not in servers.SERVER_KINDS:
            raise ValueError(f"--server must be one of {', '.join(servers.SERVER_KINDS)}")
        if self.lockup_after_s <= 0 or (self.timeout_s is not None and self.timeout_s <= 0):
            raise ValueError("--lockup-after and --timeout must be positive")
        if self.stall_after_s is not None and not 0 < self.stall_after_s < self.lockup_after_s:
            raise ValueError(
                f"--stall-after must be positive and below --lockup-after "
                f"({self.lockup_after_s:g}s), got {self.stall_after_s:g}s"
            )
        if self.server_sched_policy not in SCHED_POLICIES:
            raise ValueError(
                f"--server-sched-policy must be one of {', '.join(SCHED_POLICIES)}, "
                f"not {self.server_sched_policy!r}"
            )
        if self.nbd_timeout < 0 or self.nbd_connections < 1:
            raise ValueError("--nbd-timeout must be >= 0 and --nbd-connections >= 1")
        if self.min_free_kbytes is not None and self.min_free_kbytes < 128:
            raise ValueError(f"--min-free-kbytes must be >= 128, got {self.min_free_kbytes}")
        if self.export_factor < 5:
            raise ValueError("the export must be at least 5x guest RAM")
        if self.arm not in ARMS:
            raise ValueError(f"--arm must be one of {', '.join(ARMS)}, not {self.arm!r}")
        if self.allocator is not None and self.allocator not in ALLOCATORS:
            raise ValueError(
                f"--allocator must be one of {', '.join(ALLOCATORS)}, not {self.allocator!r}"
            )
        if self.swap_bytes is not None and self.swap_bytes < 40 * 4096:
            raise ValueError(f"--swap-size must be at least 160K, got {self.swap_bytes} bytes")
        if self.server_fault is not None and self.server != "nbd-serve":
            raise ValueError(f"a server fault needs nbd-serve, not {self.server}")

    @property
    def effective_stall_after_s(self) -> float:
        """``stall_after_s``, or a third of the lockup window, at most 30 s."""
        if self.stall_after_s is not None:
            return self.stall_after_s
        return min(30.0, self.lockup_after_s / 3)

    @property
    def hung_task_timeout_s(self) -> int:
        """The guest's hung-task timeout: it reports D-state tasks well before the cutoff."""
        return max(5, int(self.effective_stall_after_s))

    @property
    def pinned_min_free_kbytes(self) -> int:
        """The value pinned in the guest: given, or the kernel's sqrt(lowmem_kB * 16) formula."""
        if self.min_free_kbytes is not None:
            return self.min_free_kbytes
        return max(128, min(262144, math.isqrt(self.memory_mib * 1024 * 16)))

    @property
    def passes(self) -> int:
        """Page operations per page: the initial write, then per loop a verify and a rewrite
        (swapstress's default ``rewrite`` mode counts both in ``pages_done``)."""
        return 1 + 2 * self.loops

    @property
    def workload_bytes(self) -> int:
        """The memory the workers touch (the ratio is taken of the configured RAM)."""
        if self.total_bytes is not None:
            return self.total_bytes
        return int((self.ratio or 0) * self.memory_mib * MIB)

    @property
    def effective_timeout_s(self) -> float:
        """``timeout_s``, or 15 min plus 2 s per MiB per pass (TCG moves >= 1 MiB/s here)."""
        if self.timeout_s is not None:
            return self.timeout_s
        return 900.0 + 2.0 * self.passes * self.workload_bytes / MIB

    @property
    def export_bytes(self) -> int:
        """Export size: >= 5x RAM, and room for the whole workload plus RAM."""
        memory = self.memory_mib * MIB
        need = max(self.export_factor * memory, (self.total_bytes or 0) + memory)
        if self.ratio is not None:
            need = max(need, int((self.ratio + 1) * memory))
        return -(-need // MIB) * MIB

    def swapstress_args(self) -> list[str]:
        args = ["--workers", str(self.workers)]
        if self.total_bytes is not None:
            args += ["--total", str(self.total_bytes)]
        else:
            args += ["--ratio", repr(self.ratio)]
        # The export is sized for the plan; the safety check is for hosts, not this guest.
        # --mlock: the parent (heartbeats) stays resident; the workers stay swappable.
        args += ["--loops", str(self.loops), "--mlock", "--force"]
        return args

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        d["cache_dir"] = str(self.cache_dir) if self.cache_dir else None
        d["payload_dir"] = str(self.payload_dir) if self.payload_dir else None
        d["pinned_min_free_kbytes"] = self.pinned_min_free_kbytes
        d["export_bytes"] = self.export_bytes
        d["effective_timeout_s"] = self.effective_timeout_s
        d["effective_stall_after_s"] = self.effective_stall_after_s
        d["hung_task_timeout_s"] = self.hung_task_timeout_s
        if self.server != "nbd-serve":
            d["server_sched_policy"] = None  # only nbd-serve takes the flag
        return d


def guest_config(cfg: RunConfig, server: servers.RunningServer) -> dict[str, Any]:
    """The object vm.image.guest_init reads from ``swapnbd.cfg=``."""
    return {
        "v": 1,
        "server": {"host": "10.0.2.2", "port": server.port, "name": server.export_name},
        "net": {"address": "10.0.2.15/24", "gateway": "10.0.2.2"},
        "nbd": {
            "block_size": 4096,
            "timeout": cfg.nbd_timeout,
            "connections": cfg.nbd_connections,
            "swap_flag": cfg.nbd_swap_flag or cfg.resident_client,
            "resident": cfg.resident_client,
        },
        "swap": {"mode": cfg.swap, "size_bytes": cfg.swap_bytes},
        "sysctl": {"vm.min_free_kbytes": cfg.pinned_min_free_kbytes},
        "stress": {"args": cfg.swapstress_args()},
        "vmstat": {"interval": cfg.vmstat_interval_s},
        "fault": {"panic_after_s": cfg.guest_panic_after_s},
    }


def encode_guest_config(obj: dict[str, Any]) -> str:
    raw = json.dumps(obj, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    tail = watchdog.JsonlTail(path)
    return tail.read_new()


def vmstat_summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """``stress.vmstat.summarize`` plus the guarantee that pgscan_direct_throttle is there."""
    samples = [s for s in samples if s.get("type", "sample") == "sample"]
    summary: dict[str, Any] = (
        dict(summarize(samples)) if samples else {"vmstat_delta": {}, "rates": {}, "absent": []}
    )
    delta = summary.setdefault("vmstat_delta", {})
    if samples and "pgscan_direct_throttle" not in delta:
        first = samples[0].get("vmstat", {})
        last = samples[-1].get("vmstat", {})
        if "pgscan_direct_throttle" in first and "pgscan_direct_throttle" in last:
            delta["pgscan_direct_throttle"] = (
                last["pgscan_direct_throttle"] - first["pgscan_direct_throttle"]
            )
    return summary


def swap_device(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The NBD device's /proc/diskstats over the run, as the guest counted it.

    ``{"name": "nbd0", "interval_s", "reads", "read_ms", "writes", "write_ms", ...}``
    (:data:`stress.procfs.DISKSTATS_FIELDS` but ``in_flight``); the report turns them into
    await and queue depth.  Swap sits on /dev/nbd0 in both swap modes (``vm.image.guest_init``).
    None when the guest's samples had no diskstats or the device did no I/O.
    """
    name = os.path.basename(guest_init.NBD_DEVICE)
    delta = (summary.get("diskstats_delta") or {}).get(name)
    if delta is None:
        return None
    return {"name": name, "interval_s": summary.get("interval_s"), **delta}


def server_stats_summary(path: Path) -> dict[str, Any] | None:
    """Totals from nbd-serve's last stats line (None when there is none)."""
    lines = [r for r in read_jsonl(path) if "exports" in r]
    if not lines:
        return None
    last = lines[-1]
    exports = last.get("exports", {})
    totals: dict[str, int] = {}
    for exp in exports.values():
        for kind, n in (exp.get("requests") or {}).items():
            totals[f"requests_{kind}"] = totals.get(f"requests_{kind}", 0) + int(n)
        for kind, n in (exp.get("bytes") or {}).items():
            totals[f"bytes_{kind}"] = totals.get(f"bytes_{kind}", 0) + int(n)
        for kind, n in (exp.get("errors") or {}).items():
            totals[f"errors_{kind}"] = totals.get(f"errors_{kind}", 0) + int(n)
        # A bug in the server answered a swap request with EIO: never a quiet figure.
        totals["internal_errors"] = totals.get("internal_errors", 0) + int(
            exp.get("internal_errors", 0)
        )
    return {"lines": len(lines), "totals": totals, "connections": last.get("connections")}


@dataclass(slots=True)
class RunContext:
    """Handed to hooks while the guest runs (e.g. the test that kills the server)."""

    cfg: RunConfig
    server: servers.RunningServer
    state: watchdog.WatchState
    qemu_pid: int
    marks: dict[str, float] = field(default_factory=dict)
    """Free-form host-monotonic marks a hook can set (recorded in timings)."""


Hook = Callable[[dict[str, Any], RunContext], None]
"""Called with every record the guest sends, and with ``{"type": "qemu-started",
"attempt": N}`` right after each QEMU start (before the guest can report anything)."""


class Ending(StrEnum):
    """Why the watch loop stopped (the input of the classification, not the verdict)."""

    QEMU_EXITED = "qemu-exited"
    """QEMU exited by itself: the guest powered off or its kernel panicked."""
    SILENT = "silent"
    """No heartbeat and no sample for ``lockup_after_s``: a lockup."""
    STALLED = "stalled"
    """Heartbeats arrive but ``pages_done`` has not grown for ``lockup_after_s``: a lockup."""
    CONFIRMED = "confirmed"
    """A stall whose two looks gave the same deadlock signature: a lockup, on evidence."""
    TIMEOUT = "timeout"
    """The overall limit was reached."""
    NO_POWEROFF = "no-poweroff"
    """The guest sent its result but did not power off within the grace period."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived during a run (raised by the handler of
    :func:`stop_signals_interrupt`; a BaseException so that no ``except Exception``
    swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Turn the first SIGINT or SIGTERM into :class:`Interrupted`; ignore later ones, so the
    cleanup they trigger (stop QEMU and the server, write run.json) cannot be cut short.

    Signal handlers exist only in the main thread; elsewhere this does nothing (and
    Ctrl-C still arrives as KeyboardInterrupt in the main thread).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        if fired:
            return
        fired.append(signum)
        raise Interrupted(signum)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


# --- cost --------------------------------------------------------------------------------


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


def status_line(state: watchdog.WatchState, now: float, passes: int | None = None) -> str:
    """One progress line: phase, elapsed, pages done from the heartbeats, ETA.

    ``passes`` is the number of passes over the mapping (the write plus ``loops``
    verify passes); the ETA uses the average rate since the first heartbeat.
    """
    parts = [f"[{format_duration(now - state.started):>6}] phase {state.phase}"]
    hb, hb0 = state.last_heartbeat, state.first_heartbeat
    if hb is not None and hb0 is not None and state.phase == "stress":
        done = int(hb.get("pages_done") or 0)
        per_pass = int(hb.get("pages_total") or 0)
        total = per_pass * passes if passes else 0
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        work = f"/{total}" if total else ""
        parts.append(f"pass {hb.get('pass')}, pages {done}{work}{pct}")
        span = float(hb.get("t_mono", 0.0)) - float(hb0.get("t_mono", 0.0))
        rate = (done - int(hb0.get("pages_done") or 0)) / span if span > 0 else 0.0
        if rate > 0:
            parts.append(f"{rate:.0f} pages/s")
            if total > done:
                parts.append(f"ETA {format_duration((total - done) / rate)}")
    sample = state.last_sample
    if sample is not None:
        vm = sample.get("vmstat", {})
        parts.append(f"pswpout {vm.get('pswpout', '?')} pswpin {vm.get('pswpin', '?')}")
    parts.append(f"samples {state.samples}")
    return ", ".join(parts)


# --- the run -----------------------------------------------------------------------------


def _since(t0: float) -> float:
    return round(time.monotonic() - t0, 2)


def new_run(cfg: RunConfig) -> RunRecord:
    """The run's record, filled in as the run goes."""
    kernel = {
        "name": cfg.kernel,
        "flavour": cfg.flavour,
        "arm": cfg.arm,
        "allocator": cfg.allocator,
    }
    return RunRecord(config=cfg.to_json(), kernel=kernel, cost=Cost().as_dict())


def run_experiment(
    cfg: RunConfig, emit: Emit | None = None, hook: Hook | None = None
) -> dict[str, Any]:
    """Run one experiment and return the run.json object (also written to ``cfg.out``).

    SIGINT and SIGTERM (in the main thread) stop the run: QEMU and the server are
    stopped and run.json records ``interrupted: true`` and ``interrupted_by``.

    Raises:
        ValueError: invalid configuration (nothing is started).
    """
    cfg.validate()
    say = emit or (lambda _m: None)
    cfg.out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    run = new_run(cfg)
    cost = Cost()
    with stop_signals_interrupt():
        try:
            _run_guest(cfg, run, cost, say, hook)
        except (Interrupted, KeyboardInterrupt) as exc:
            name = exc.args[0] if isinstance(exc, Interrupted) else "SIGINT"
            run.judge(Outcome.ERROR, f"interrupted by {name}; QEMU and the server were stopped")
            run.interrupted = True
            run.interrupted_by = name
            say(f"interrupted by {name}: QEMU and the server were stopped, writing run.json")
        except Exception as exc:  # recorded, never lost: the harness records every outcome
            log.debug("run failed", exc_info=True)
            run.judge(Outcome.ERROR, f"{type(exc).__name__}: {exc}")
            run.traceback = traceback.format_exc(limit=8)
            say(f"error: {run.outcome_reason}")
        finally:
            run.cost = cost.as_dict()
            run.timings["total_s"] = _since(t_start)
            run.write(cfg.out)
    return run.to_json()


def _run_guest(cfg: RunConfig, run: RunRecord, cost: Cost, say: Emit, hook: Hook | None) -> None:
    """Steps 1-6 of the module docstring."""
    from vm.image import image as vm_image  # noqa: PLC0415 - heavy, and built by another part

    cache_dir = cfg.cache_dir or vm_image.default_cache_dir()
    img = _image(cfg, cache_dir, run, say)
    choice = _accelerator(cfg, img, cache_dir, run, say)
    # A unix socket path must fit in 108 bytes: a short directory of its own, not OUT.
    qmp_dir = Path(tempfile.mkdtemp(prefix="swapnbd-qmp-"))
    try:
        with _serving(cfg, run, cost, say) as server:
            for attempt in range(1, BOOT_ATTEMPTS + 1):
                qmp_path = qmp_dir / f"qmp{attempt}.sock"
                proc, wd, t_qemu = _boot(
                    cfg, img, choice, server, run=run, cost=cost, say=say, qmp_path=qmp_path
                )
                ctx = RunContext(cfg=cfg, server=server, state=wd.state, qemu_pid=proc.pid)
                stalls = watchdog.StallWatch(cfg.effective_stall_after_s, cfg.lockup_after_s)
                looks = forensics.Forensics(
                    cfg.out / OUTPUT_FILES["console"],
                    qmp_path,
                    forensics.server_probe(server.pid, server.port),
                    t_qemu,
                    port=server.port,
                )
                if hook is not None:
                    hook({"type": "qemu-started", "attempt": attempt}, ctx)
                try:
                    ending = _watch(
                        cfg,
                        proc,
                        wd,
                        ctx,
                        say=say,
                        hook=hook,
                        cost=cost,
                        stalls=stalls,
                        looks=looks,
                    )
                finally:
                    killed = _stop_qemu(proc, cost)
                    cost.steal_end = host_steal_ticks()
                    assert run.qemu is not None  # _boot recorded it with the process
                    run.qemu.update(exit_status=proc.returncode, killed_by_host=killed)
                if attempt < BOOT_ATTEMPTS and _hung_booting(ending, wd.state):
                    _keep_failed_boot(cfg, run, wd, attempt, say)
                    continue
                break
            exit_status = None if killed else proc.returncode
            _record(
                cfg,
                run,
                wd,
                ending,
                qemu_exit=exit_status,
                ctx=ctx,
                t_qemu=t_qemu,
                stalls=stalls,
                looks=looks,
            )
    finally:
        shutil.rmtree(qmp_dir, ignore_errors=True)


#: A guest kernel that hangs before it reports anything is booted once more (it happened
#: in 2 of about 80 boots of the 6.1 cloud kernel under TCG, each time at the same early
#: line, "IP idents hash table entries"); run.json keeps the failed boot's evidence.
BOOT_ATTEMPTS: Final = 2


def _hung_booting(ending: Ending, state: watchdog.WatchState) -> bool:
    """The watchdog stopped a guest that never reported a phase: nothing of the
    experiment ran yet (no swap device, no worker), so a second boot is the same run."""
    return ending in (Ending.SILENT, Ending.STALLED) and state.phase == "boot"


def _keep_failed_boot(
    cfg: RunConfig, run: RunRecord, wd: watchdog.Watchdog, attempt: int, say: Emit
) -> None:
    """Move the hung boot's console aside and record it in ``boot_retries``."""
    console = cfg.out / OUTPUT_FILES["console"]
    kept: Path | None = None
    text = ""
    with contextlib.suppress(FileNotFoundError):  # else QEMU never got to open it
        text = console.read_text(errors="replace")
        kept = console.replace(cfg.out / f"console-boot{attempt}.log")
    silent = round(wd.state.silent_for(time.monotonic()), 1)
    last = watchdog.console_last_line(text)
    if run.boot_retries is None:
        run.boot_retries = []
    run.boot_retries.append(
        {
            "attempt": attempt,
            "silent_s": silent,
            "console_last_line": last,
            "console": kept.name if kept is not None else None,
        }
    )
    say(
        f"the guest hung while booting (attempt {attempt}, silent {silent:.0f}s, console ends:"
        f" {last!r}); booting it once more"
    )


def _image(cfg: RunConfig, cache_dir: Path, run: RunRecord, say: Emit) -> GuestImage:
    """Step 1: the guest image for the kernel, arm and allocator."""
    from vm.image import image as vm_image  # noqa: PLC0415

    t0 = time.monotonic()
    what = f"kernel {cfg.kernel} ({cfg.flavour}), arm {cfg.arm}"
    if cfg.allocator:
        what += f", allocator {cfg.allocator}"
    say(f"guest image: {what}, cache {cache_dir}")
    img = vm_image.build_guest(
        cfg.kernel,
        cfg.flavour,
        cache_dir,
        say,
        payload_dir=cfg.payload_dir,
        arm=cfg.arm,
        allocator=cfg.allocator,
    )
    run.timings["image_s"] = _since(t0)
    kernel = run.kernel
    kernel.update(img.identity)
    kernel.update(
        arm=cfg.arm,
        allocator=cfg.allocator,
        cmdline_extra=list(img.cmdline_extra),
        release=img.kernel_release,
        package=img.kernel_package,
        image_key=img.key,
        vmlinuz=str(img.kernel),
        initrd=str(img.initrd),
        rootfs=str(img.rootfs),
    )
    return img


def _accelerator(
    cfg: RunConfig, img: GuestImage, cache_dir: Path, run: RunRecord, say: Emit
) -> qemu.AccelChoice:
    """Step 2: TCG or KVM (``auto`` boot-probes KVM once per kernel and caches it)."""
    t0 = time.monotonic()
    choice = qemu.resolve_accel(cfg.accel, img.kernel, cache_dir, progress=say)
    run.timings["accel_s"] = _since(t0)
    run.accel = {
        "requested": cfg.accel,
        "used": choice.accel,
        "reason": choice.reason,
        "cached": choice.cached,
        "cpu": choice.cpu,
    }
    say(f"accelerator: {choice.accel} ({choice.reason})")
    return choice


#: nbd-serve flags for the experiment only (docs/performance.md, "The swap path" and
#: "Scheduling policy"): under TCG the guest's vCPU threads keep every host core busy, so
#: a busy-polling server spins on CPU the guest needs (a profile of a real run put 7% of
#: the server's CPU in the poll loop, for 240 hits in 1,540 windows). For the same
#: reason the server runs under SCHED_IDLE: it then answers in the moments a vCPU would
#: idle, which is when the guest waits for its swap I/O, instead of preempting a vCPU.
#: Interleaved on the swap-path shape, stress Elapsed fell from a median 46.1 s to 38.2 s
#: (8 runs each); on the quick preset two runs each were level (202 and 225 s against
#: 220 and 204 s). A 100 µs slice (the earlier setting, "Scheduler slice") cut the server's
#: run-queue wait but not Elapsed. The worker count is set to the client's connections
#: beside it: a worker with no connection only holds memory.
SWAP_PATH_ARGS: tuple[str, ...] = ("--poll-us", "0")


@contextlib.contextmanager
def _serving(
    cfg: RunConfig, run: RunRecord, cost: Cost, say: Emit
) -> Iterator[servers.RunningServer]:
    """Step 3: the NBD server, stopped (final stats line, cost) however the block ends."""
    t0 = time.monotonic()
    stats_path = cfg.out / OUTPUT_FILES["server_stats"]
    extra: tuple[str, ...] = ("--fault", cfg.server_fault) if cfg.server_fault else ()
    if cfg.server == "nbd-serve":
        policy = ("--sched-policy", cfg.server_sched_policy)
        extra = (*extra, *SWAP_PATH_ARGS, *policy, "--workers", str(cfg.nbd_connections))
    server = servers.launch_server(
        cfg.server,
        cfg.export_bytes,
        cfg.out / "server",
        stats_path=stats_path,
        backing=cfg.backing,
        extra_args=extra,
    )
    run.timings["server_start_s"] = _since(t0)
    cost.server = ServerCost(server.pid)
    cost.server.sample(time.monotonic(), force=True)
    try:
        if server.kind != "nbd-serve":
            note = f"{server.kind} has no --stats; only nbd-serve records them"
            stats_path.write_text(
                json.dumps({"server": server.kind, "stats": None, "note": note}) + "\n"
            )
        say(
            f"server: {server.kind} on {server.host}:{server.port}, "
            f"export {server.export_name[:8]}… ({server.size_bytes // MIB} MiB, {server.backing})"
        )
        yield server
    finally:
        if not server.killed:
            cost.server.sample(time.monotonic(), force=True)
        server.stop()
        run.server = server.describe()
        if server.kind == "nbd-serve" and server.stats_path is not None:
            run.server["stats"] = server_stats_summary(server.stats_path)


def _boot(
    cfg: RunConfig,
    img: GuestImage,
    choice: qemu.AccelChoice,
    server: servers.RunningServer,
    *,
    run: RunRecord,
    cost: Cost,
    say: Emit,
    qmp_path: Path | None = None,
) -> tuple[subprocess.Popen[bytes], watchdog.Watchdog, float]:
    """Step 4: the kernel command line and QEMU (which dies with us: PDEATHSIG)."""
    out = cfg.out
    gcfg = guest_config(cfg, server)
    words = (*img.cmdline_extra, *evidence_cmdline(cfg))
    cmdline = qemu.kernel_cmdline({"cfg": encode_guest_config(gcfg)}, words)
    qcfg = qemu.QemuConfig(
        kernel=img.kernel,
        initrd=img.initrd,
        rootfs=img.rootfs,
        memory_mib=cfg.memory_mib,
        cpus=cfg.cpus,
        accel=choice.accel,
        cpu=choice.cpu,
        cmdline=cmdline,
        console_path=out / OUTPUT_FILES["console"],
        events_path=out / OUTPUT_FILES["events"],
        samples_path=out / OUTPUT_FILES["vmstat"],
        qmp_path=qmp_path,
    )
    argv = qemu.build_argv(qcfg)
    run.qemu = {"argv": argv, "guest_config": gcfg}
    for name in ("console", "events", "vmstat"):
        (out / OUTPUT_FILES[name]).unlink(missing_ok=True)
    cost.steal_start = host_steal_ticks()
    t_qemu = time.monotonic()
    with open(out / "qemu.log", "wb") as qlog:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=qlog,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lifeline.parent_death_signal(signal.SIGKILL),  # noqa: PLW1509 - prctl
        )
    run.qemu["pid"] = proc.pid
    say(f"QEMU started (pid {proc.pid}, {cfg.memory_mib} MiB, {cfg.cpus} vCPUs, {choice.accel})")
    wd = watchdog.Watchdog(out / OUTPUT_FILES["events"], out / OUTPUT_FILES["vmstat"], t_qemu)
    return proc, wd, t_qemu


def evidence_cmdline(cfg: RunConfig) -> tuple[str, ...]:
    """Kernel words that make a stalled guest say why (kernel-notes.md §9).

    Debian's cloud kernels mask SysRq's dump keys (0x01b6): ``sysrq_always_enabled`` lets
    the host's alt-sysrq-w/m/l/t through. The hung-task detector reports D-state tasks
    after ``hung_task_timeout_s`` (below the stall threshold's cutoff), every time
    (``hung_task_warnings=-1``; the default goes quiet after 10).
    """
    return (
        "sysrq_always_enabled",
        f"sysctl.kernel.hung_task_timeout_secs={cfg.hung_task_timeout_s}",
        "sysctl.kernel.hung_task_warnings=-1",
    )


def _reap_qemu(proc: subprocess.Popen[bytes], cost: Cost, *, block: bool) -> bool:
    """wait4() QEMU ourselves, for its rusage; True once it has exited."""
    if proc.returncode is not None:
        return True
    try:
        pid, status, usage = os.wait4(proc.pid, 0 if block else os.WNOHANG)
    except ChildProcessError:  # reaped elsewhere; its rusage is lost
        proc.returncode = proc.returncode if proc.returncode is not None else -1
        return True
    if pid == 0:
        return False
    proc.returncode = os.waitstatus_to_exitcode(status)
    cost.qemu = usage
    return True


def _stop_qemu(proc: subprocess.Popen[bytes], cost: Cost) -> bool:
    """Kill QEMU if it still runs; True when the host had to kill it."""
    if _reap_qemu(proc, cost, block=False):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    _reap_qemu(proc, cost, block=True)
    return True


def _watch(
    cfg: RunConfig,
    proc: subprocess.Popen[bytes],
    wd: watchdog.Watchdog,
    ctx: RunContext,
    *,
    say: Emit,
    hook: Hook | None,
    cost: Cost,
    stalls: watchdog.StallWatch,
    looks: forensics.Forensics,
) -> Ending:
    """Step 5: follow the guest until it ends; say why."""
    t_qemu = wd.state.started
    result_at: float | None = None
    last_status = t_qemu
    last_phase = ""
    while True:
        now = time.monotonic()
        for rec in wd.poll(now):
            kind = rec.get("type")
            if kind == "phase" and wd.state.phase != last_phase:
                last_phase = wd.state.phase
                say(f"[{format_duration(now - t_qemu):>6}] guest phase: {last_phase}")
            elif kind == "error":
                say(f"guest error in phase {rec.get('phase')}: {rec.get('message')}")
            elif kind == "result":
                result_at = now
            if hook is not None:
                hook(rec, ctx)
        if cost.server is not None and not ctx.server.killed:
            cost.server.sample(now)
        if _reap_qemu(proc, cost, block=False):
            return Ending.QEMU_EXITED
        if now - last_status >= STATUS_INTERVAL_S:
            last_status = now
            say(status_line(wd.state, now, cfg.passes))
        ending = _stall_step(cfg, wd.state, now, stalls=stalls, looks=looks, say=say)
        if ending is not None and result_at is None:
            return ending
        if (
            result_at is None
            and wd.state.phase not in watchdog.LOCKUP_PHASES
            and wd.state.silent_for(now) >= cfg.lockup_after_s
        ):
            say(f"watchdog: no heartbeat and no sample for {cfg.lockup_after_s:.0f}s")
            return Ending.SILENT
        if now - t_qemu >= cfg.effective_timeout_s:
            say(f"overall timeout of {cfg.effective_timeout_s:.0f}s reached")
            return Ending.TIMEOUT
        if result_at is not None and now - result_at >= POWEROFF_GRACE_S:
            say("guest sent its result but did not power off; stopping QEMU")
            return Ending.NO_POWEROFF
        time.sleep(POLL_INTERVAL_S)


def _stall_step(
    cfg: RunConfig,
    st: watchdog.WatchState,
    now: float,
    *,
    stalls: watchdog.StallWatch,
    looks: forensics.Forensics,
    say: Emit,
) -> Ending | None:
    """Carry out what the StallWatch asks at ``now``; an Ending when the lockup is confirmed."""
    for action in stalls.step(now, st):
        if isinstance(action, watchdog.Look):
            rec = looks.look(action, now)
            server = f"; server {rec['server']['unresponsive']}" if rec.get("server") else ""
            failed = f" (not sent: {rec['error']})" if rec.get("error") else ""
            say(
                f"watchdog: no page progress for {now - (st.last_progress or now):.0f}s: "
                f"look {action.number}, SysRq {'/'.join(action.keys)}{failed}{server}"
            )
        elif isinstance(action, watchdog.Evaluate):
            judged = looks.judge()
            if stalls.current is not None and judged:
                stalls.current["signature"] = judged[-1][0]
            say("watchdog: the kernel says: " + "; ".join(f"{s} ({w})" for s, w in judged))
            if cfg.early_confirm and looks.confirms():
                say(f"watchdog: {judged[-1][0]} in both looks with no progress: lockup")
                return Ending.CONFIRMED
        elif isinstance(action, watchdog.StallEnded):
            say(
                f"watchdog: progress resumed after a {action.stall['length_s']:.0f}s stall: "
                "a stall, not a lockup"
            )
        elif isinstance(action, watchdog.Confirmed):
            say(f"watchdog: no page progress for {action.idle_s:.0f}s: lockup")
            if st.silent_for(now) >= cfg.lockup_after_s:
                return Ending.SILENT
            return Ending.STALLED
    return None


def _check_arm(run: RunRecord, arm: str) -> None:
    """Hold the run to the arm it asked for, as the guest itself reported it.

    A measurement of the wrong arm is worse than none: when the guest says its
    switches did not take, the outcome becomes ``error`` (the measured one is
    kept as ``outcome_unchecked``).
    """
    proof = run.kernel.get("in_guest")
    reverted = run.kernel.get("fixed_arm") == "vanilla"
    ok, why = arms.arm_in_effect(arm, proof, reverted=reverted)
    run.kernel["arm_check"] = {"ok": ok, "reason": why}
    if not ok and proof is not None and run.outcome is not Outcome.ERROR:
        run.outcome_unchecked = run.outcome
        run.judge(Outcome.ERROR, f"the {arm} arm was not in effect in the guest: {why}")


def _record(
    cfg: RunConfig,
    run: RunRecord,
    wd: watchdog.Watchdog,
    ending: Ending,
    *,
    qemu_exit: int | None,
    ctx: RunContext,
    t_qemu: float,
    stalls: watchdog.StallWatch | None = None,
    looks: forensics.Forensics | None = None,
) -> None:
    """Step 6: the verdict and everything run.json keeps of the guest."""
    out = cfg.out
    timings = run.timings
    end = time.monotonic()
    list(wd.poll(end))  # whatever arrived in the last moments
    timings["qemu_s"] = round(end - t_qemu, 2)
    timings["phases_s"] = {k: round(v, 2) for k, v in wd.state.phases.items()}
    timings.update({f"mark_{k}_s": round(v - t_qemu, 2) for k, v in ctx.marks.items()})
    run.ending = ending.value
    console_path = out / OUTPUT_FILES["console"]
    console = console_path.read_text(errors="replace") if console_path.exists() else ""
    st = wd.state
    lockup = ending in (Ending.SILENT, Ending.STALLED, Ending.CONFIRMED)
    kernel_evidence: dict[str, Any] | None = None
    pressure: watchdog.Pressure | None = None
    if lockup and st.phase in watchdog.LOCKUP_PHASES:
        pressure = watchdog.Pressure(pswpout=st.pswpout())
        if looks is not None:
            kernel_evidence = looks.kernel_evidence()
            pressure = forensics.pressure(st, (kernel_evidence or {}).get("memory"))
        stall = stalls.at_stall(st) if stalls is not None else None
        if stall is not None:
            last = st.last_sample or {}
            vm = last.get("vmstat") or {}
            stall.update(pswpout=vm.get("pswpout"), pswpin=vm.get("pswpin"))
            kernel_evidence = {**(kernel_evidence or {}), "stall": stall}
    verdict = watchdog.classify(
        result_event=st.result,
        error_event=st.error,
        lockup=lockup,
        silent_s=st.silent_for(end),
        stalled_s=st.stalled_for(end),
        timed_out=ending is Ending.TIMEOUT,
        qemu_exit=qemu_exit,
        console_text=console,
        phase=st.phase,
        corrupt_seen=st.max_corrupt,
        heartbeats=st.heartbeats,
        heartbeat_silent_s=(
            end - st.last_heartbeat_at if st.last_heartbeat_at is not None else None
        ),
        pressure=pressure,
        kernel=kernel_evidence,
    )
    run.footprint = st.footprint()
    if stalls is not None:
        run.stalls = list(stalls.stalls)
        run.stall_count = len(stalls.stalls)
        run.stall_s_total = round(sum(x["length_s"] for x in stalls.stalls), 1)
    run.judge(verdict.outcome, verdict.reason)
    run.evidence = verdict.evidence
    if st.result is not None:
        run.swapstress = st.result.get("swapstress")
        run.swapstress_exit_code = st.result.get("exit_code")
        timings["stress_s"] = st.result.get("seconds")
    if st.error is not None:
        run.guest_error = {"phase": st.error.get("phase"), "message": st.error.get("message")}
    if st.info is not None:
        run.kernel["guest_release"] = st.info.get("kernel_release")
        run.kernel["cmdline"] = st.info.get("cmdline")
        run.kernel["in_guest"] = st.info.get("arm")
        _check_arm(run, cfg.arm)
        run.guest = {k: st.info.get(k) for k in ("settings", "mem_total_bytes", "cpus", "python")}
    samples = read_jsonl(out / OUTPUT_FILES["vmstat"])
    summary = vmstat_summary(samples)
    run.vmstat_delta = summary.get("vmstat_delta", {})
    run.vmstat_rates = summary.get("rates", {})
    run.vmstat_absent = summary.get("absent", [])
    run.swap_device = swap_device(summary)
    run.counts = {
        "samples": len(samples),
        "heartbeats": st.heartbeats,
        "events": st.events,
        "bad_lines": wd.events.bad_lines + wd.samples.bad_lines,
    }
    run.last_heartbeat = st.last_heartbeat
    run.last_sample_vmstat = (st.last_sample or {}).get("vmstat")
