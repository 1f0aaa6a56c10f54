"""The swapstress parent: fork the workers, read their pipes, write heartbeats, reap them.

:class:`Runner` multiplexes the workers' pipes with ``selectors``, writes the heartbeat
lines, forwards a stop request, reaps the workers and builds the result object (the keys
are documented in :mod:`stress.swapstress`).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
import selectors
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from stress import procfs
from stress.exitcodes import (
    EXIT_CORRUPTION,
    EXIT_INTERRUPTED,
    EXIT_OK,
    OUTCOME_EXIT,
    Outcome,
)
from stress.lineout import LineOutError, LineWriter
from stress.plan import Plan
from stress.worker import STOP_SIGNALS, WorkerSpec, child

MAX_EXAMPLES = 8


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


class Runner:
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
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                pid = os.fork()
                if pid == 0:
                    spec = WorkerSpec(index, self.plan, write_fd, deadline, corrupt_pages)
                    child(spec, [*keep, read_fd])
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
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
            "exit_code": OUTCOME_EXIT[outcome],
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
