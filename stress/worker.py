"""One swapstress worker process: map its share, write the pattern, verify it pass by pass.

The parent (:mod:`stress.runner`) forks it and calls :func:`child`, which never returns:
the worker reports to the parent in JSON lines over its pipe (:class:`_Channel`) and exits
with its own code (0, 1 corruption, 130 stopped, 4 it raised).  See the theory of operation
in :mod:`stress.swapstress`.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import select
import signal
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from stress.exitcodes import EXIT_CORRUPTION, EXIT_INTERRUPTED, EXIT_OK, EXIT_WORKER_ERROR
from stress.pattern import CHUNK_PAGES, PAGE_SIZE, ChunkPattern, diff_page
from stress.plan import Plan

MAX_EXAMPLES_PER_WORKER = 8
PROGRESS_INTERVAL_S = 0.25

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


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
class WorkerSpec:
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

    def __init__(self, spec: WorkerSpec, channel: _Channel, stop: _StopFlag) -> None:
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


def _worker_main(spec: WorkerSpec, channel: _Channel, stop: _StopFlag) -> int:
    """Body of one worker.  Returns its exit code (0, 1 corruption, 130 stopped)."""
    return _WorkerBody(spec, channel, stop).run()


def child(spec: WorkerSpec, inherited: list[int]) -> None:
    """Runs in the forked child; never returns."""
    code = EXIT_WORKER_ERROR
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop = _StopFlag()
        signal.signal(signal.SIGTERM, stop.handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        for fd in inherited:
            with contextlib.suppress(OSError):
                os.close(fd)
        code = _worker_main(spec, _Channel(spec.write_fd), stop)
    except BrokenPipeError:
        code = EXIT_WORKER_ERROR  # the parent is gone; nobody to report to
    except BaseException:  # the worker must never unwind into the parent's code
        traceback.print_exc()
        code = EXIT_WORKER_ERROR
    finally:
        os._exit(code)
