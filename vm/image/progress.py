"""Progress lines for long host-side work: step i/N, elapsed, percent and ETA.

Theory of operation: a :class:`Progress` knows how many steps a job has. Each
step is a context manager that prints a line when it starts (with an estimate
of how long it takes), rate-limited lines while it runs (``update``), and a
closing line with its duration. The ETA comes from the fraction done when the
step knows it (e.g. packages configured out of packages retrieved), otherwise
from the estimate (a duration remembered from an earlier run, or a fixed
guess). Lines go to a callback, stderr by default, so callers and tests can
collect them.

:func:`run_with_progress` runs a subprocess, keeps its output in a log file,
hands each line to a parser that can turn it into a progress update, and keeps
printing heartbeat lines while the command is silent.
"""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

__all__ = [
    "CommandError",
    "Progress",
    "Step",
    "format_duration",
    "run_with_progress",
    "stderr_emit",
]

Emit = Callable[[str], None]


def stderr_emit(line: str) -> None:
    """Write one progress line to stderr and flush it."""
    print(line, file=sys.stderr, flush=True)


def format_duration(seconds: float) -> str:
    """``75.2`` -> ``"1m15s"``; ``3.4`` -> ``"3.4s"``; ``3700`` -> ``"1h01m40s"``."""
    if seconds < 0:
        seconds = 0.0
    if seconds < 10:
        return f"{seconds:.1f}s"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Progress:
    """A job of ``total`` steps whose progress lines go to ``emit``.

    Args:
        total: number of steps the job has (shown as ``step i/N``).
        emit: where lines go; stderr when ``None``.
        prefix: first word of every line.
        interval: minimum seconds between two ``update`` lines of one step.
        clock: monotonic clock, replaceable in tests.
    """

    def __init__(
        self,
        total: int,
        emit: Emit | None = None,
        *,
        prefix: str = "[swapnbd]",
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if total < 1:
            raise ValueError(f"a job has at least one step, got total={total}")
        self.total = total
        self.emit: Emit = emit if emit is not None else stderr_emit
        self.prefix = prefix
        self.interval = interval
        self.clock = clock
        self.started = clock()
        self._index = 0

    def step(self, title: str, estimate_s: float | None = None) -> Step:
        """Start the next step; use it as a context manager."""
        self._index += 1
        return Step(self, self._index, title, estimate_s)

    def skip(self, title: str, reason: str) -> None:
        """Count a step that needs no work (e.g. found in the cache)."""
        self._index += 1
        self.emit(f"{self.prefix} step {self._index}/{self.total} {title}: {reason}")

    def note(self, text: str) -> None:
        """Print a line that belongs to no step."""
        self.emit(f"{self.prefix} {text}")

    def elapsed(self) -> float:
        """Seconds since the job started."""
        return self.clock() - self.started


class Step:
    """One running step of a :class:`Progress`; see :meth:`Progress.step`."""

    def __init__(self, job: Progress, index: int, title: str, estimate_s: float | None) -> None:
        self.job = job
        self.index = index
        self.title = title
        self.estimate_s = estimate_s
        self.started = job.clock()
        self.duration: float | None = None
        self._last_line = float("-inf")

    def _head(self) -> str:
        return f"{self.job.prefix} step {self.index}/{self.job.total} {self.title}"

    def elapsed(self) -> float:
        """Seconds since this step started."""
        return self.job.clock() - self.started

    def eta(self, fraction: float | None) -> float | None:
        """Seconds left, from the fraction done if known, else from the estimate."""
        elapsed = self.elapsed()
        if fraction is not None and 0.02 <= fraction <= 1.0:
            return elapsed / fraction - elapsed
        if self.estimate_s is not None:
            return max(self.estimate_s - elapsed, 0.0)
        return None

    def __enter__(self) -> Step:
        self.started = self.job.clock()
        estimate = (
            f" (estimate {format_duration(self.estimate_s)})" if self.estimate_s is not None else ""
        )
        self.job.emit(f"{self._head()}: started{estimate}")
        self._last_line = self.started
        return self

    def update(self, detail: str, fraction: float | None = None, *, force: bool = False) -> None:
        """Print ``detail`` with elapsed time, percent and ETA (at most every ``interval``)."""
        now = self.job.clock()
        if not force and now - self._last_line < self.job.interval:
            return
        self._last_line = now
        parts = [f"{self._head()}: {detail}"]
        if fraction is not None:
            parts.append(f"{min(max(fraction, 0.0), 1.0) * 100:.0f}%")
        parts.append(f"elapsed {format_duration(now - self.started)}")
        eta = self.eta(fraction)
        if eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        self.job.emit(", ".join(parts))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.duration = self.elapsed()
        if exc is None:
            self.job.emit(
                f"{self._head()}: done in {format_duration(self.duration)}"
                f" (total {format_duration(self.job.elapsed())})"
            )
        else:
            self.job.emit(f"{self._head()}: FAILED after {format_duration(self.duration)}")


class CommandError(RuntimeError):
    """A command run by :func:`run_with_progress` exited non-zero."""

    def __init__(self, argv: Sequence[str], returncode: int, log: Path, tail: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.log = log
        self.tail = tail
        super().__init__(
            f"{argv[0]} exited with status {returncode}; full log: {log}\nlast lines:\n{tail}"
        )


def die_with_parent(argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped so the command gets SIGTERM if this process dies (util-linux setpriv).

    Without it, a builder killed with SIGKILL would leave e.g. debootstrap
    running and writing into a cache directory that the next builder deletes.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return list(argv)
    return [setpriv, "--pdeathsig", "TERM", "--", *argv]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(log unreadable)"
    return "\n".join(text.splitlines()[-lines:])


def run_with_progress(
    argv: Sequence[str],
    step: Step,
    *,
    log: Path,
    on_line: Callable[[str], tuple[str, float | None] | None] | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    heartbeat: str = "running",
) -> None:
    """Run ``argv``, append its stdout+stderr to ``log``, report progress on ``step``.

    ``on_line`` turns an output line into ``(detail, fraction)`` for a progress
    update, or ``None`` to ignore it. While the command prints nothing useful, a
    heartbeat line still appears every ``interval`` seconds.

    Raises:
        CommandError: the command exited non-zero (the message has the log's tail).
        FileNotFoundError: the program is not installed.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as sink:
        sink.write(f"$ {' '.join(argv)}\n".encode())
        sink.flush()
        with subprocess.Popen(
            die_with_parent(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=env,
        ) as proc:
            assert proc.stdout is not None
            try:
                _pump(proc.stdout.fileno(), sink, step, on_line, heartbeat)
            except BaseException:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
            returncode = proc.wait()
    if returncode != 0:
        raise CommandError(argv, returncode, log, _tail(log))


def _pump(
    fd: int,
    sink: BinaryIO,
    step: Step,
    on_line: Callable[[str], tuple[str, float | None] | None] | None,
    heartbeat: str,
) -> None:
    """Copy ``fd`` to ``sink`` until EOF, turning lines into progress updates."""
    detail, fraction = heartbeat, None
    os.set_blocking(fd, False)
    pending = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            chunk = b""
            if sel.select(timeout=1.0):
                chunk = os.read(fd, 65536)
                if not chunk:
                    return
                sink.write(chunk)
                sink.flush()
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                parsed = on_line(raw.decode(errors="replace")) if on_line else None
                if parsed is not None:
                    detail, fraction = parsed
            step.update(detail, fraction)
