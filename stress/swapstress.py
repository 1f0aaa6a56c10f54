"""swapstress: drive a machine into swap and prove every page comes back intact.

Usage (in the guest: ``PYTHONPATH=/opt/swapnbd python3 -m stress.swapstress ...``)::

    swapstress --dry-run --json -                       # print the plan, touch nothing
    swapstress --workers 4 --total 64M --loops 2 --json out.json --force
    swapstress --ratio 4 --duration 3600 --json /dev/virtio-ports/swapnbd.events \\
               --heartbeat /dev/virtio-ports/swapnbd.events

Theory of operation
-------------------
This reproduces the 2012 swap-over-NBD workload (mmtests ``vmscan-anon-mmap-write``, i.e.
``usemem``): ``8 * cpu_count`` processes share 4x MemTotal of anonymous memory.  The parent
forks the workers with ``os.fork``; each worker maps ``per_worker_bytes`` of anonymous
private memory (``MAP_PRIVATE|MAP_ANONYMOUS``, allocated after the fork so that the parent
stays small) and then:

1. **pass 0** writes generation 0 of the pattern (:mod:`stress.pattern`) into every 4 KiB
   page: a header and trailer naming (worker, page, generation) around a non-zero fill;
2. **pass k >= 1** walks the mapping linearly, 1 MiB at a time.  It compares each chunk
   with the expected bytes (one ``memcmp``).  In the default ``rewrite`` mode it then writes
   generation k into that chunk, as usemem's write+verify loop does: every page is dirtied
   again, so reclaim must write it to swap again rather than drop a clean swap-cache copy.
   ``--mode verify`` only reads after pass 0.

Verification is C speed (memcpy/memcmp on 1 MiB slices; Python runs once per chunk), so the
time spent is the kernel's: faults, reclaim and swap I/O.

Workers send JSON lines to the parent over a pipe each: progress (pass, pages written and
verified, bad pages so far) every 0.25 s, a description of each of their first
:data:`MAX_EXAMPLES_PER_WORKER` bad pages, and a final "done".  Progress lines are dropped,
not waited for, when the pipe is full (the next one supersedes them), so a parent blocked on
a slow heartbeat port never stalls the workload; bad-page and "done" lines are never
dropped.  A worker whose parent died gets EPIPE on its next progress line and exits.  The
parent multiplexes the pipes with ``selectors``, writes heartbeats, reaps the workers and
takes user/system time from ``RUSAGE_CHILDREN`` once all are reaped.

Memory: the parent stays small and forks before any worker maps memory; ``gc.freeze()``
before the forks keeps Python's collector from copying inherited pages.  Each worker adds
about 3 MiB of its own (two pattern templates and one compare buffer) to
``per_worker_bytes``.  ``--mlock`` locks the parent (heartbeats keep flowing while the guest
thrashes; locks are not inherited, so workers stay swappable).  ``--nohugepage`` makes the
workers ``madvise(MADV_NOHUGEPAGE)``, so they use 4 KiB pages whatever the THP setting.

SIGINT and SIGTERM reach the parent (workers ignore SIGINT so a terminal ^C is handled in one
place); the parent forwards SIGTERM, workers stop at the next chunk boundary and exit 130,
and the result JSON is still written.  Workers still alive after ``--stop-grace`` seconds
(or at a second signal) are SIGKILLed.  A worker that dies on its own (a signal, a crash)
stops the run: the others are asked to stop, and the outcome is ``worker-died``.  A SIGKILL
while /proc/vmstat ``oom_kill`` rose is reported as ``oom-kill`` (an inference: the kernel
does not say whom it killed, but nothing else SIGKILLs workers in the guest).

Outcomes and exit codes (precedence top to bottom):

==============  ====  =====================================================
``corruption``   1    at least one page read back differently than written
``worker-died``  3    a worker was killed (signal, OOM kill) or crashed
``interrupted``  130  SIGINT/SIGTERM stopped the run
``completed``    0    every page verified on every pass
==============  ====  =====================================================

Usage errors (bad flags, a plan that does not fit without ``--force``) exit 2.

Heartbeat line keys (``--heartbeat PATH``, every ``--heartbeat-interval`` seconds, and once at
start and at the end):

- ``type``: always ``"heartbeat"``.
- ``t_mono``: ``time.monotonic()`` of the guest when the line was made (seconds).
- ``t_wall``: ``time.time()`` at the same moment (seconds since the epoch).
- ``pass``: the lowest pass any running worker is in: 0 = initial write, k = verify loop k.
- ``pages_done``: pages written or verified since start, summed over workers; only ever
  grows, so "not growing" means "stuck".
- ``pages_total``: pages in all workers' mappings together (the size of one pass).
- ``rate_pages_s``: growth of ``pages_done`` per second since the previous heartbeat.
- ``elapsed_s``: seconds since the workers were started.
- ``workers_alive``: workers not yet reaped.
- ``corrupt_pages``: bad pages found so far (as of the workers' last progress reports).

Result object keys (``--json PATH``; ``-`` is stdout):

- ``type``: always ``"result"`` (the result may share a stream with heartbeats).
- ``outcome``: ``completed``, ``corruption``, ``worker-died`` or ``interrupted``.
- ``exit_code``: the process exit code matching the outcome.
- ``elapsed_s``: wall time from the first fork to the last reap (monotonic clock).
- ``user_s``: user CPU seconds of all workers (``RUSAGE_CHILDREN``).
- ``sys_s``: system CPU seconds of all workers (``RUSAGE_CHILDREN``).
- ``user_sys_s``: ``user_s + sys_s``, the 2012 cover letters' "User+Sys".
- ``pages_verified``: pages compared against their expected content, all passes, all workers
  (a worker killed before its final report counts up to its last progress report).
- ``pages_written``: pages written (pass 0 plus rewrites), counted the same way.
- ``corrupt_pages``: pages that compared unequal (each bad page counted once per pass).
- ``corrupt_examples``: the first few bad pages, each ``{"worker", "page", "generation",
  "pass", "offset", "bad_bytes", "expected", "found"}``; ``expected``/``found`` are the hex
  of the first differing 32-byte block (``offset`` is its first bad byte in the page).
- ``workers``: per worker ``{"worker", "pid", "status", "exit_code", "signal",
  "pages_verified", "pages_written", "corrupt_pages", "passes_completed"}``; ``status`` is
  ``ok``, ``corruption``, ``interrupted``, ``killed`` (by a signal, named in ``signal``),
  ``oom-kill``, ``killed-after-grace`` or ``error`` (exit code 4: the worker raised).
- ``plan``: the plan (as printed by ``--dry-run``).
- ``oom_kill_delta``: rise of /proc/vmstat ``oom_kill`` over the run (``null`` if unknown).
- ``stop_reason``: why the run stopped early (``"SIGTERM"``, ``"worker 3 died (SIGKILL)"``)
  or ``null``.
- ``heartbeat_errors``: heartbeat lines that could not be written (each also on stderr).
- ``t_wall_start``/``t_wall_end``: wall-clock start and end (seconds since the epoch).

Plan keys (``--dry-run``, which adds ``"type": "plan"``): ``workers``, ``total_bytes`` (what
the workers will touch: ``per_worker_bytes * workers``), ``requested_total_bytes`` (before
rounding to pages), ``mem_total_bytes``, ``per_worker_bytes``, ``pages_per_worker``,
``page_size``, ``loops`` (``null`` with ``--duration``), ``duration_s``, ``mode``,
``nohugepage``, ``mem_available_bytes``, ``swap_free_bytes``, ``fits`` (``total_bytes <=
MemAvailable + SwapFree``).  Each is documented on :class:`Plan`.

Test-only hook: the environment variable ``SWAPSTRESS_TEST_CORRUPT="WORKER:PAGE"`` (or
``WORKER:FIRST-LAST``) makes that worker flip two bytes of each of those pages right after
pass 0, to prove detection end to end.  It is for the test suite only; never set it in an
experiment.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import mmap
import os
import resource
import select
import selectors
import signal
import stat
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from stress import procfs
from stress.lineout import LineOutError, LineWriter
from stress.memlock import mlockall
from stress.pattern import CHUNK_PAGES, PAGE_SIZE, ChunkPattern, diff_page
from stress.sizes import SizeError, format_size, parse_size

__all__ = [
    "EXIT_CORRUPTION",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "EXIT_WORKER_DIED",
    "Plan",
    "UsageError",
    "main",
    "make_plan",
]

EXIT_OK = 0
EXIT_CORRUPTION = 1
EXIT_USAGE = 2
EXIT_WORKER_DIED = 3
EXIT_INTERRUPTED = 130
_EXIT_WORKER_ERROR = 4  # a worker raised; reported as status "error", outcome worker-died

Outcome = Literal["completed", "corruption", "worker-died", "interrupted"]
Mode = Literal["rewrite", "verify"]

DEFAULT_RATIO = 4.0
DEFAULT_LOOPS = 4
MAX_EXAMPLES = 8
MAX_EXAMPLES_PER_WORKER = 8
PROGRESS_INTERVAL_S = 0.25
TEST_CORRUPT_ENV = "SWAPSTRESS_TEST_CORRUPT"

_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}

_OUTCOME_EXIT: dict[Outcome, int] = {
    "completed": EXIT_OK,
    "corruption": EXIT_CORRUPTION,
    "worker-died": EXIT_WORKER_DIED,
    "interrupted": EXIT_INTERRUPTED,
}


class UsageError(Exception):
    """Bad flags or an impossible plan; the message says what to change.  Exit code 2."""


@dataclass(frozen=True, slots=True)
class Plan:
    """What a run will do; printed by ``--dry-run`` and embedded in the result."""

    workers: int
    """Number of worker processes."""
    total_bytes: int
    """Bytes the workers touch together (``per_worker_bytes * workers``)."""
    requested_total_bytes: int
    """``--total``, or ``--ratio`` x MemTotal, before rounding down to whole pages."""
    mem_total_bytes: int
    """MemTotal from /proc/meminfo."""
    per_worker_bytes: int
    """Bytes each worker maps, a multiple of ``page_size``."""
    pages_per_worker: int
    """``per_worker_bytes / page_size``."""
    page_size: int
    """Pattern page size (4096)."""
    loops: int | None
    """Verify passes after the initial write, or ``None`` when ``duration_s`` is set."""
    duration_s: float | None
    """Run passes until this many seconds have elapsed, or ``None``."""
    mode: Mode
    """``rewrite`` (verify then write the next generation, usemem style) or ``verify``."""
    nohugepage: bool
    """Workers ``madvise(MADV_NOHUGEPAGE)`` their mapping (4 KiB pages whatever THP says)."""
    mem_available_bytes: int
    """MemAvailable from /proc/meminfo when planned."""
    swap_free_bytes: int
    """SwapFree from /proc/meminfo when planned."""

    @property
    def fits(self) -> bool:
        """Whether the plan fits in MemAvailable plus free swap."""
        return self.total_bytes <= self.mem_available_bytes + self.swap_free_bytes

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, ``fits`` included."""
        out = asdict(self)
        out["fits"] = self.fits
        return out


def make_plan(
    *,
    meminfo: dict[str, int],
    workers: int | None = None,
    total_bytes: int | None = None,
    ratio: float | None = None,
    loops: int | None = None,
    duration_s: float | None = None,
    mode: Mode = "rewrite",
    nohugepage: bool = False,
    cpu_count: int | None = None,
) -> Plan:
    """Resolve defaults (8 x CPUs workers, 4 x MemTotal) into a :class:`Plan`.

    Args:
        meminfo: parsed /proc/meminfo in bytes (:func:`stress.procfs.parse_meminfo`).

    Raises:
        UsageError: conflicting or out-of-range values, or a total too small to give each
            worker one page.
    """
    for name in ("MemTotal", "MemAvailable", "SwapFree"):
        if name not in meminfo:
            raise UsageError(f"/proc/meminfo has no {name} field; cannot plan the run")
    if total_bytes is not None and ratio is not None:
        raise UsageError("--total and --ratio are mutually exclusive; pass one of them")
    if loops is not None and duration_s is not None:
        raise UsageError("--loops and --duration are mutually exclusive; pass one of them")
    if workers is None:
        workers = 8 * (cpu_count or os.cpu_count() or 1)
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    if ratio is not None and not (ratio > 0 and math.isfinite(ratio)):
        raise UsageError(f"--ratio must be a positive number, got {ratio}")
    if loops is not None and loops < 0:
        raise UsageError(f"--loops must be 0 or more, got {loops}")
    if duration_s is not None and not (duration_s > 0 and math.isfinite(duration_s)):
        raise UsageError(f"--duration must be a positive number of seconds, got {duration_s}")
    if loops is None and duration_s is None:
        loops = DEFAULT_LOOPS
    mem_total = meminfo["MemTotal"]
    if total_bytes is None:
        total_bytes = int(mem_total * (DEFAULT_RATIO if ratio is None else ratio))
    per_worker = (total_bytes // workers) // PAGE_SIZE * PAGE_SIZE
    if per_worker < PAGE_SIZE:
        raise UsageError(
            f"total {total_bytes} bytes split over {workers} workers leaves less than one "
            f"{PAGE_SIZE}-byte page per worker; raise --total or lower --workers"
        )
    return Plan(
        workers=workers,
        total_bytes=per_worker * workers,
        requested_total_bytes=total_bytes,
        mem_total_bytes=mem_total,
        per_worker_bytes=per_worker,
        pages_per_worker=per_worker // PAGE_SIZE,
        page_size=PAGE_SIZE,
        loops=loops,
        duration_s=duration_s,
        mode=mode,
        nohugepage=nohugepage,
        mem_available_bytes=meminfo["MemAvailable"],
        swap_free_bytes=meminfo["SwapFree"],
    )


# --------------------------------------------------------------------------- worker side


class _WorkerStop(Exception):
    """Raised inside a worker when the parent asked it to stop."""


class _Channel:
    """JSON lines to the parent over a non-blocking pipe.

    Each line is far below PIPE_BUF, so a write is atomic: all of it or EAGAIN.  Progress
    lines are *droppable*: if the parent is not draining the pipe (say, it is blocked writing
    a heartbeat to a port the host is not reading), the worker drops the line and carries on,
    and the next progress line supersedes it.  Corruption and "done" lines are never dropped:
    on EAGAIN the worker waits for the pipe to drain.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self.dropped = 0

    def send(self, obj: dict[str, Any], *, droppable: bool = False) -> None:
        data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        if len(data) > select.PIPE_BUF:
            raise ValueError(f"message of {len(data)} bytes exceeds PIPE_BUF")
        while True:
            try:
                os.write(self.fd, data)
                return
            except BlockingIOError:
                if droppable:
                    self.dropped += 1
                    return
                select.select([], [self.fd], [])


class _StopFlag:
    """Set by the worker's SIGTERM handler; polled once per chunk."""

    __slots__ = ("is_set",)

    def __init__(self) -> None:
        self.is_set = False

    def handler(self, _signum: int, _frame: object) -> None:
        self.is_set = True


@dataclass(frozen=True, slots=True)
class _WorkerSpec:
    """What one forked worker needs to know."""

    index: int
    plan: Plan
    write_fd: int
    deadline: float | None
    corrupt_pages: range


class _WorkerBody:
    """One worker: map its share, write it, then verify (and rewrite) it ``loops`` times.

    The counters live on the object so each step is a short method: :meth:`write_pass`,
    :meth:`verify_pass`, :meth:`progress` (which also raises :class:`_WorkerStop`) and
    :meth:`report_bad` (the rare path that decodes a bad chunk page by page).
    """

    def __init__(self, spec: _WorkerSpec, channel: _Channel, stop: _StopFlag) -> None:
        self.spec = spec
        self.channel = channel
        self.stop = stop
        self.npages = spec.plan.pages_per_worker
        self.mm = mmap.mmap(
            -1, spec.plan.per_worker_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        )
        if spec.plan.nohugepage:
            self.mm.madvise(mmap.MADV_NOHUGEPAGE)
        self.pages_written = 0
        self.pages_verified = 0
        self.corrupt = 0
        self.examples = 0
        self.current_pass = 0
        self.last_progress = time.monotonic()

    def progress(self, force: bool = False) -> None:
        """Stop if asked or past the deadline; report progress now and then (droppable)."""
        now = time.monotonic()
        if self.stop.is_set:
            raise _WorkerStop
        if self.spec.deadline is not None and now >= self.spec.deadline:
            raise _WorkerStop
        if force or now - self.last_progress >= PROGRESS_INTERVAL_S:
            self.last_progress = now
            self.channel.send(
                {
                    "t": "progress",
                    "pass": self.current_pass,
                    "written": self.pages_written,
                    "verified": self.pages_verified,
                    "corrupt": self.corrupt,
                },
                droppable=True,
            )

    def report_bad(self, first: int, found: bytes, expected: bytearray, generation: int) -> None:
        """Find the bad pages of a chunk that compared unequal (rare path).

        Every bad page is counted; only the first few are described in a message, so a
        device that returns garbage for everything cannot flood the parent.
        """
        for i in range(len(expected) // PAGE_SIZE):
            lo, hi = i * PAGE_SIZE, (i + 1) * PAGE_SIZE
            if found[lo:hi] == expected[lo:hi]:
                continue
            self.corrupt += 1
            if self.examples >= MAX_EXAMPLES_PER_WORKER:
                continue
            self.examples += 1
            diff = diff_page(found[lo:hi], bytes(expected[lo:hi]))
            if diff is None:  # cannot happen: the slices compared unequal just above
                continue
            self.channel.send(
                {
                    "t": "corrupt",
                    "worker": self.spec.index,
                    "page": first + i,
                    "generation": generation,
                    "pass": self.current_pass,
                    "offset": diff.offset,
                    "bad_bytes": diff.bad_bytes,
                    "expected": diff.expected,
                    "found": diff.found,
                    "corrupt": self.corrupt,
                }
            )

    def chunks(self) -> Iterator[tuple[int, int, int, int]]:
        """(first page, pages, first byte, end byte) of each chunk of the mapping."""
        for first in range(0, self.npages, CHUNK_PAGES):
            n = min(CHUNK_PAGES, self.npages - first)
            yield first, n, first * PAGE_SIZE, (first + n) * PAGE_SIZE

    def write_pass(self, pattern: ChunkPattern) -> None:
        for first, n, lo, hi in self.chunks():
            self.mm[lo:hi] = pattern.chunk(first, n)
            self.pages_written += n
            self.progress()

    def damage(self) -> None:
        """Test-only hook (``spec.corrupt_pages`` is empty in real runs)."""
        for page in self.spec.corrupt_pages:
            base = page * PAGE_SIZE
            self.mm[base + 8] ^= 0x01  # the header's page number
            self.mm[base + 2000] ^= 0xFF  # and a byte in the middle of the fill

    def verify_pass(
        self, pattern: ChunkPattern, following: ChunkPattern | None, generation: int
    ) -> None:
        """Compare every chunk with ``pattern``; rewrite it with ``following`` if given."""
        for first, n, lo, hi in self.chunks():
            expected = pattern.chunk(first, n)
            found = self.mm[lo:hi]
            if found != expected:
                self.report_bad(first, found, expected, generation)
            self.pages_verified += n
            if following is not None:
                self.mm[lo:hi] = following.chunk(first, n)
                self.pages_written += n
            self.progress()

    def passes(self) -> None:
        plan = self.spec.plan
        generation = 0
        pattern = ChunkPattern(self.spec.index, generation)
        self.write_pass(pattern)
        self.damage()
        self.current_pass = 1
        self.progress(force=True)
        while self.spec.deadline is not None or self.current_pass <= (plan.loops or 0):
            following = None
            if plan.mode == "rewrite":
                following = ChunkPattern(self.spec.index, generation + 1)
            self.verify_pass(pattern, following, generation)
            if following is not None:
                pattern = following
                generation += 1
            self.current_pass += 1
            self.progress(force=True)

    def run(self) -> int:
        """Returns the worker's exit code (0, 1 corruption, 130 stopped)."""
        stopped = False
        try:
            self.passes()
        except _WorkerStop:
            stopped = self.stop.is_set
        done = self.current_pass - 1 if self.current_pass > 0 else 0
        self.channel.send(
            {
                "t": "done",
                "pages_verified": self.pages_verified,
                "pages_written": self.pages_written,
                "corrupt_pages": self.corrupt,
                "passes_completed": done,
                "stopped": stopped,
            }
        )
        if stopped:
            return EXIT_INTERRUPTED
        return EXIT_CORRUPTION if self.corrupt else EXIT_OK


def _worker_main(spec: _WorkerSpec, channel: _Channel, stop: _StopFlag) -> int:
    """Body of one worker.  Returns its exit code (0, 1 corruption, 130 stopped)."""
    return _WorkerBody(spec, channel, stop).run()


def _child(spec: _WorkerSpec, inherited: list[int]) -> None:
    """Runs in the forked child; never returns."""
    code = _EXIT_WORKER_ERROR
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop = _StopFlag()
        signal.signal(signal.SIGTERM, stop.handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        for fd in inherited:
            with contextlib.suppress(OSError):
                os.close(fd)
        code = _worker_main(spec, _Channel(spec.write_fd), stop)
    except BrokenPipeError:
        code = _EXIT_WORKER_ERROR  # the parent is gone; nobody to report to
    except BaseException:  # the worker must never unwind into the parent's code
        traceback.print_exc()
        code = _EXIT_WORKER_ERROR
    finally:
        os._exit(code)


# --------------------------------------------------------------------------- parent side


@dataclass(slots=True)
class _Worker:
    index: int
    pid: int
    fd: int
    buffer: bytes = b""
    pass_: int = 0
    done: int = 0
    written: int = 0
    verified: int = 0
    final: dict[str, Any] | None = None
    corrupt_seen: int = 0
    status: str | None = None
    exit_code: int | None = None
    signal_name: str | None = None
    reaped: bool = False
    sigkilled_by_us: bool = False


@dataclass(slots=True)
class _RunState:
    corrupt_examples: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str | None = None
    stop_sent_at: float | None = None
    killed: bool = False
    heartbeat_errors: int = 0


def _read_oom_kill(proc_root: str) -> int | None:
    text = procfs.read_text("vmstat", proc_root)
    if text is None:
        return None
    return procfs.parse_vmstat(text).get("oom_kill")


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class _Runner:
    def __init__(
        self,
        plan: Plan,
        *,
        heartbeat: LineWriter | None,
        heartbeat_interval: float,
        stop_grace: float,
        corrupt: tuple[int, range] | None,
        proc_root: str,
    ) -> None:
        self.plan = plan
        self.heartbeat = heartbeat
        self.heartbeat_interval = heartbeat_interval
        self.stop_grace = stop_grace
        self.corrupt = corrupt
        self.proc_root = proc_root
        self.workers: list[_Worker] = []
        self.state = _RunState()
        self.signals: list[int] = []
        self._last_hb: tuple[float, int] | None = None
        self.start = 0.0

    # signals -------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)

    # heartbeat -----------------------------------------------------------
    def _pages_done(self) -> int:
        return sum(w.done for w in self.workers)

    def _write_heartbeat(self) -> None:
        if self.heartbeat is None:
            return
        now = time.monotonic()
        done = self._pages_done()
        rate = 0.0
        if self._last_hb is not None and now > self._last_hb[0]:
            rate = (done - self._last_hb[1]) / (now - self._last_hb[0])
        self._last_hb = (now, done)
        running = [w.pass_ for w in self.workers if not w.reaped] or [w.pass_ for w in self.workers]
        line = {
            "type": "heartbeat",
            "t_mono": now,
            "t_wall": time.time(),
            "pass": min(running) if running else 0,
            "pages_done": done,
            "pages_total": self.plan.pages_per_worker * self.plan.workers,
            "rate_pages_s": round(rate, 1),
            "elapsed_s": round(now - self.start, 3),
            "workers_alive": sum(1 for w in self.workers if not w.reaped),
            "corrupt_pages": self._corrupt_pages(),
        }
        try:
            self.heartbeat.write_json(line)
        except LineOutError as exc:
            self.state.heartbeat_errors += 1
            print(f"swapstress: heartbeat lost: {exc}", file=sys.stderr, flush=True)

    # messages ------------------------------------------------------------
    def _handle(self, worker: _Worker, message: dict[str, Any]) -> None:
        kind = message.get("t")
        if kind == "progress":
            worker.pass_ = int(message["pass"])
            worker.written = int(message["written"])
            worker.verified = int(message["verified"])
            worker.done = worker.written + worker.verified
            worker.corrupt_seen = max(worker.corrupt_seen, int(message["corrupt"]))
        elif kind == "corrupt":
            worker.corrupt_seen = max(worker.corrupt_seen, int(message["corrupt"]))
            if len(self.state.corrupt_examples) < MAX_EXAMPLES:
                example = {k: v for k, v in message.items() if k not in ("t", "corrupt")}
                self.state.corrupt_examples.append(example)
        elif kind == "done":
            worker.final = message
            worker.pass_ = int(message["passes_completed"])
            worker.written = int(message["pages_written"])
            worker.verified = int(message["pages_verified"])
            worker.done = worker.written + worker.verified
            worker.corrupt_seen = int(message["corrupt_pages"])

    def _corrupt_pages(self) -> int:
        return sum(w.corrupt_seen for w in self.workers)

    def _read(self, worker: _Worker) -> bool:
        """Drain one worker pipe; False at EOF."""
        data = os.read(worker.fd, 65536)
        if not data:
            return False
        worker.buffer += data
        *lines, worker.buffer = worker.buffer.split(b"\n")
        for line in lines:
            if line:
                self._handle(worker, json.loads(line))
        return True

    # lifecycle -----------------------------------------------------------
    def _spawn(self, deadline: float | None, parent_fds: list[int]) -> None:
        """Fork the workers.  ``parent_fds`` are closed in each child.

        SIGINT/SIGTERM are blocked across each fork so that a stop request cannot reach a
        child before it has installed its own handler; the child unblocks them (and the
        pending signal is then delivered to the right handler).
        """
        sys.stdout.flush()
        sys.stderr.flush()
        gc.freeze()  # keep the collector from touching (and so copying) inherited objects
        keep: list[int] = list(parent_fds)
        for index in range(self.plan.workers):
            read_fd, write_fd = os.pipe()
            corrupt_pages = range(0)
            if self.corrupt is not None and self.corrupt[0] == index:
                corrupt_pages = self.corrupt[1]
            signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            try:
                pid = os.fork()
                if pid == 0:
                    spec = _WorkerSpec(index, self.plan, write_fd, deadline, corrupt_pages)
                    _child(spec, [*keep, read_fd])
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            os.close(write_fd)
            keep.append(read_fd)
            self.workers.append(_Worker(index=index, pid=pid, fd=read_fd))

    def _reap(self, worker: _Worker, oom_before: int | None) -> None:
        _pid, status = os.waitpid(worker.pid, 0)
        worker.reaped = True
        if os.WIFSIGNALED(status):
            signum = os.WTERMSIG(status)
            worker.signal_name = _signal_name(signum)
            if worker.sigkilled_by_us:
                worker.status = "killed-after-grace"
            elif signum == signal.SIGKILL and self._oom_rose(oom_before):
                worker.status = "oom-kill"
            else:
                worker.status = "killed"
            return
        code = os.waitstatus_to_exitcode(status)
        worker.exit_code = code
        worker.status = {
            EXIT_OK: "ok",
            EXIT_CORRUPTION: "corruption",
            EXIT_INTERRUPTED: "interrupted",
        }.get(code, "error")

    def _oom_rose(self, before: int | None) -> bool:
        after = _read_oom_kill(self.proc_root)
        return before is not None and after is not None and after > before

    def _request_stop(self, reason: str) -> None:
        if self.state.stop_reason is None:
            self.state.stop_reason = reason
        if self.state.stop_sent_at is not None:
            return
        self.state.stop_sent_at = time.monotonic()
        for worker in self.workers:
            if not worker.reaped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)

    def _kill_remaining(self) -> None:
        self.state.killed = True
        for worker in self.workers:
            if not worker.reaped:
                worker.sigkilled_by_us = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)

    def run(self) -> dict[str, Any]:
        plan = self.plan
        oom_before = _read_oom_kill(self.proc_root)
        rusage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        old_handlers = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        t_wall_start = time.time()
        self.start = time.monotonic()
        deadline = None if plan.duration_s is None else self.start + plan.duration_s
        selector = selectors.DefaultSelector()
        try:
            parent_fds = [wake_r, wake_w]
            if self.heartbeat is not None and self.heartbeat.path != "-":
                parent_fds.append(self.heartbeat.fileno())
            self._spawn(deadline, parent_fds)
            for worker in self.workers:
                selector.register(worker.fd, selectors.EVENT_READ, worker)
            selector.register(wake_r, selectors.EVENT_READ, None)
            self._write_heartbeat()
            next_hb = self.start + self.heartbeat_interval
            open_pipes = len(self.workers)
            handled_signals = 0
            while open_pipes:
                now = time.monotonic()
                timeout = max(0.0, next_hb - now)
                if self.state.stop_sent_at is not None and not self.state.killed:
                    timeout = min(
                        timeout, max(0.0, self.state.stop_sent_at + self.stop_grace - now)
                    )
                for key, _mask in selector.select(timeout):
                    if key.data is None:
                        with contextlib.suppress(BlockingIOError):
                            while os.read(wake_r, 512):
                                pass
                        continue
                    worker = key.data
                    if not self._read(worker):
                        selector.unregister(worker.fd)
                        os.close(worker.fd)
                        open_pipes -= 1
                        self._reap(worker, oom_before)
                        if worker.status in ("killed", "oom-kill", "error"):
                            what = worker.signal_name or f"exit code {worker.exit_code}"
                            self._request_stop(f"worker {worker.index} died ({what})")
                while handled_signals < len(self.signals):
                    signum = self.signals[handled_signals]
                    handled_signals += 1
                    if self.state.stop_sent_at is None:
                        self._request_stop(_signal_name(signum))
                    else:
                        self._kill_remaining()  # a second signal: do not wait any longer
                now = time.monotonic()
                if (
                    self.state.stop_sent_at is not None
                    and not self.state.killed
                    and now >= self.state.stop_sent_at + self.stop_grace
                ):
                    self._kill_remaining()
                if now >= next_hb:
                    self._write_heartbeat()
                    next_hb = max(next_hb + self.heartbeat_interval, now)
            elapsed = time.monotonic() - self.start
            self._write_heartbeat()
        finally:
            selector.close()
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            os.close(wake_r)
            os.close(wake_w)
            for worker in self.workers:
                if not worker.reaped:  # only after an exception in this loop
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker.pid, signal.SIGKILL)
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(worker.pid, 0)
        rusage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        oom_after = _read_oom_kill(self.proc_root)
        return self._result(
            elapsed=elapsed,
            user_s=rusage_after.ru_utime - rusage_before.ru_utime,
            sys_s=rusage_after.ru_stime - rusage_before.ru_stime,
            oom_delta=None if oom_before is None or oom_after is None else oom_after - oom_before,
            t_wall_start=t_wall_start,
        )

    def _result(
        self,
        *,
        elapsed: float,
        user_s: float,
        sys_s: float,
        oom_delta: int | None,
        t_wall_start: float,
    ) -> dict[str, Any]:
        workers_out = []
        pages_verified = pages_written = 0
        for w in self.workers:
            final = w.final or {}
            # a worker killed before its "done" message counts up to its last progress report
            pages_verified += w.verified
            pages_written += w.written
            workers_out.append(
                {
                    "worker": w.index,
                    "pid": w.pid,
                    "status": w.status,
                    "exit_code": w.exit_code,
                    "signal": w.signal_name,
                    "pages_verified": w.verified,
                    "pages_written": w.written,
                    "corrupt_pages": w.corrupt_seen,
                    "passes_completed": final.get("passes_completed", max(w.pass_ - 1, 0)),
                }
            )
        outcome: Outcome
        if self._corrupt_pages():
            outcome = "corruption"
        elif any(w.status in ("killed", "oom-kill", "error") for w in self.workers):
            outcome = "worker-died"
        elif self.signals or any(
            w.status in ("interrupted", "killed-after-grace") for w in self.workers
        ):
            outcome = "interrupted"
        else:
            outcome = "completed"
        return {
            "type": "result",
            "outcome": outcome,
            "exit_code": _OUTCOME_EXIT[outcome],
            "elapsed_s": round(elapsed, 6),
            "user_s": round(user_s, 6),
            "sys_s": round(sys_s, 6),
            "user_sys_s": round(user_s + sys_s, 6),
            "pages_verified": pages_verified,
            "pages_written": pages_written,
            "corrupt_pages": self._corrupt_pages(),
            "corrupt_examples": self.state.corrupt_examples,
            "workers": workers_out,
            "plan": self.plan.as_dict(),
            "oom_kill_delta": oom_delta,
            "stop_reason": self.state.stop_reason,
            "heartbeat_errors": self.state.heartbeat_errors,
            "t_wall_start": t_wall_start,
            "t_wall_end": time.time(),
        }


# --------------------------------------------------------------------------- CLI


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except SizeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``swapstress`` argument parser (``--help`` lists every flag with examples)."""
    parser = argparse.ArgumentParser(
        prog="swapstress",
        description=(
            "Fill anonymous memory with a verifiable per-page pattern across many processes\n"
            "(default 8 x CPUs sharing 4 x MemTotal), then re-read and verify every page on\n"
            "every pass.\n\n"
            "exit codes: 0 ok, 1 corruption, 2 usage (or plan refused), 3 worker died,\n"
            "130 interrupted (SIGINT/SIGTERM; the result JSON is still written).\n\n"
            "PATH arguments may be regular files, FIFOs (opening one waits for a reader) or\n"
            "character devices such as /dev/virtio-ports/NAME.  When --json and --heartbeat\n"
            "name the same path, the result goes down the heartbeat stream as its last line\n"
            "(a virtio port can only be open once at a time)."
        ),
        epilog=(
            "examples:\n"
            "  swapstress --dry-run --json -\n"
            "  swapstress --workers 4 --total 64M --loops 2 --json out.json --force\n"
            "  swapstress --ratio 4 --duration 3600 --json /dev/virtio-ports/swapnbd.events \\\n"
            "             --heartbeat /dev/virtio-ports/swapnbd.events\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workers", type=int, help="worker processes (default 8 x CPUs)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--total", type=_size_arg, help="total memory, e.g. 64M, 8G (K/M/G/T)")
    size.add_argument(
        "--ratio", type=_positive_float, help="total as a multiple of MemTotal (default 4)"
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument(
        "--loops", type=int, help=f"verify passes after the write (default {DEFAULT_LOOPS})"
    )
    length.add_argument(
        "--duration", type=_positive_float, help="run passes for this many seconds instead"
    )
    parser.add_argument(
        "--mode",
        choices=("rewrite", "verify"),
        default="rewrite",
        help="rewrite: verify then write the next generation (usemem); verify: read only",
    )
    parser.add_argument("--json", metavar="PATH", help="write the result here ('-' = stdout)")
    parser.add_argument(
        "--heartbeat",
        metavar="PATH",
        help="heartbeat lines: file, FIFO or char device; '-' = stderr",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=_positive_float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between heartbeats (default 1)",
    )
    parser.add_argument(
        "--stop-grace",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="after SIGINT/SIGTERM, SIGKILL workers still running after this long (default 30)",
    )
    parser.add_argument(
        "--nohugepage",
        action="store_true",
        help="madvise(MADV_NOHUGEPAGE) each worker's mapping: 4 KiB pages even with THP=always",
    )
    parser.add_argument(
        "--mlock",
        action="store_true",
        help="mlockall() the parent so heartbeats keep flowing under thrashing "
        "(workers stay swappable: locks are not inherited across fork)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan, touch nothing")
    parser.add_argument(
        "--force", action="store_true", help="run even if the plan exceeds MemAvailable + SwapFree"
    )
    parser.add_argument(
        "--proc-root", default=procfs.PROC, help=argparse.SUPPRESS
    )  # tests: read meminfo/vmstat from a fixture tree
    return parser


def _test_corrupt_from_env(plan: Plan) -> tuple[int, range] | None:
    """Parse the test-only hook: ``WORKER:PAGE`` or ``WORKER:FIRST-LAST`` (inclusive)."""
    raw = os.environ.get(TEST_CORRUPT_ENV)
    if not raw:
        return None
    worker_text, sep, pages_text = raw.partition(":")
    first_text, dash, last_text = pages_text.partition("-")
    try:
        if not sep:
            raise ValueError
        worker, first = int(worker_text), int(first_text)
        last = int(last_text) if dash else first
    except ValueError:
        raise UsageError(
            f"{TEST_CORRUPT_ENV}={raw!r}: expected WORKER:PAGE or WORKER:FIRST-LAST, e.g. 1:5"
        ) from None
    if not (0 <= worker < plan.workers and 0 <= first <= last < plan.pages_per_worker):
        raise UsageError(
            f"{TEST_CORRUPT_ENV}={raw!r}: worker must be < {plan.workers} and pages "
            f"< {plan.pages_per_worker}, first <= last"
        )
    return worker, range(first, last + 1)


def _emit_json(path: str, obj: dict[str, Any]) -> None:
    """Write ``obj`` to stdout, a regular file (atomically) or a FIFO/character device."""
    if path == "-":
        sys.stdout.write(json.dumps(obj, indent=None) + "\n")
        sys.stdout.flush()
        return
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        with LineWriter(path) as writer:
            writer.write_json(obj)
        return
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".swapstress-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(obj, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    """Entry point (``swapstress``); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        text = procfs.read_text("meminfo", args.proc_root)
        if text is None:
            raise UsageError(f"{args.proc_root}/meminfo does not exist; cannot plan the run")
        plan = make_plan(
            meminfo=procfs.parse_meminfo(text),
            workers=args.workers,
            total_bytes=args.total,
            ratio=args.ratio,
            loops=args.loops,
            duration_s=args.duration,
            mode=args.mode,
            nohugepage=args.nohugepage,
        )
        corrupt = _test_corrupt_from_env(plan)
    except (UsageError, procfs.ProcFormatError) as exc:
        print(f"swapstress: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    if args.dry_run:
        _emit_json(args.json or "-", {"type": "plan", **plan.as_dict()})
        return EXIT_OK

    if not plan.fits and not args.force:
        budget = plan.mem_available_bytes + plan.swap_free_bytes
        print(
            f"swapstress: refusing to run: the plan touches {format_size(plan.total_bytes)} "
            f"({plan.total_bytes} bytes) but MemAvailable + SwapFree is only {budget} bytes "
            f"({plan.mem_available_bytes} + {plan.swap_free_bytes}); the OOM killer would "
            "end the run.  Pass --force to run anyway, or lower --total/--ratio, or add swap.",
            file=sys.stderr,
        )
        return EXIT_USAGE

    if args.mlock:
        problem = mlockall()
        if problem is not None:
            print(f"swapstress: warning: {problem}; parent not locked", file=sys.stderr)
    if args.json not in (None, "-"):
        directory = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(directory):
            print(
                f"swapstress: error: --json {args.json!r}: directory {directory!r} does not exist",
                file=sys.stderr,
            )
            return EXIT_USAGE
    heartbeat: LineWriter | None = None
    shared = args.json is not None and args.json == args.heartbeat and args.json != "-"
    if args.heartbeat is not None:
        try:
            heartbeat = LineWriter(args.heartbeat, std="stderr")
        except LineOutError as exc:
            print(f"swapstress: error: --heartbeat: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        runner = _Runner(
            plan,
            heartbeat=heartbeat,
            heartbeat_interval=args.heartbeat_interval,
            stop_grace=args.stop_grace,
            corrupt=corrupt,
            proc_root=args.proc_root,
        )
        result = runner.run()
        try:
            if shared and heartbeat is not None:
                heartbeat.write_json(result)
            elif args.json is not None:
                _emit_json(args.json, result)
        except OSError as exc:  # LineOutError included: never lose the result silently
            print(f"swapstress: error: cannot write the result: {exc}", file=sys.stderr)
            print(json.dumps(result), file=sys.stderr)
    finally:
        if heartbeat is not None:
            heartbeat.close()
    print(
        f"swapstress: {result['outcome']}: {result['pages_verified']} pages verified, "
        f"{result['corrupt_pages']} corrupt, elapsed {result['elapsed_s']:.2f} s, "
        f"user {result['user_s']:.2f} s, sys {result['sys_s']:.2f} s",
        file=sys.stderr,
    )
    return int(result["exit_code"])


if __name__ == "__main__":
    sys.exit(main())
