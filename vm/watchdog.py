"""Watch a running guest from outside and classify how the run ended.

Theory of operation
-------------------
QEMU writes three files while the guest runs (see vm/qemu.py): ``events.jsonl``
(phases, swapstress heartbeats, the result or an error), ``vmstat.jsonl`` (the
collector's samples) and ``console.log``.  The host only tails those files, so it
never slows the guest down and nothing is lost if the host side is busy.

*Liveness.*  Any new complete line in the events or samples file is a sign of life.
The 2012 lockup looks like this from outside (kernel-notes.md §7): QEMU spins a vCPU,
the NBD server sits idle, and neither heartbeats nor samples arrive.  When nothing has
arrived for ``lockup_after`` seconds the watchdog declares a ``lockup``.  The console
is searched for hung-task reports ("blocked for more than") as extra evidence.

*Progress.*  swapstress and the collector mlock themselves, so they can keep talking
while every worker is stuck in swap I/O (seen when the NBD server dies: the heartbeats
go on, ``pages_done`` stops).  ``pages_done`` only ever grows, so during the stress phase
a heartbeat stream without growth for ``lockup_after`` seconds is a lockup too
(:meth:`WatchState.stalled_for`).

*Classification* is a pure function of what was observed (:func:`classify`):
result object, error event, lockup, overall timeout, QEMU's exit status and the
console text.  The order of the checks is the order of trust: a result the guest sent
beats everything; then a lockup, if the guest had reached the stress phase (a stall
before it, while booting say, is an ``error``: no memory pressure yet); then an error the
guest reported; then signs in the console; and a QEMU that exited without a result is a
``guest-crash``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final


class Outcome(StrEnum):
    """How a run ended (the ``outcome`` field of run.json)."""

    COMPLETED = "completed"
    LOCKUP = "lockup"
    GUEST_CRASH = "guest-crash"
    CORRUPTION = "corruption"
    OOM = "oom"
    ERROR = "error"


class JsonlTail:
    """Read the complete JSON lines appended to a file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self.bad_lines = 0

    def read_new(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        records: list[dict[str, Any]] = []
        for raw in lines:
            text = raw.strip(b"\x00\r ")
            if not text:
                continue
            try:
                obj = json.loads(text)
            except ValueError:
                self.bad_lines += 1
                continue
            if isinstance(obj, dict):
                records.append(obj)
            else:
                self.bad_lines += 1
        return records


CONSOLE_PATTERNS: dict[str, re.Pattern[str]] = {
    "hung_task": re.compile(r"blocked for more than \d+ seconds"),
    "panic": re.compile(r"Kernel panic|kernel BUG at|Oops:|general protection fault"),
    "oom": re.compile(r"Out of memory: Killed process|invoked oom-killer"),
    "nbd_stuck": re.compile(r"Possible stuck request|nbd\d+: .*(timed out|Receive control failed)"),
    "initramfs_error": re.compile(r"SWAPNBD-INITRAMFS-ERROR"),
    "soft_lockup": re.compile(r"soft lockup|rcu_sched self-detected stall|rcu: INFO"),
}


def console_evidence(text: str, limit: int = 10) -> dict[str, list[str]]:
    """The console lines that matter for classification, grouped by kind (first ``limit``)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        for kind, pattern in CONSOLE_PATTERNS.items():
            if pattern.search(line):
                bucket = found.setdefault(kind, [])
                if len(bucket) < limit:
                    bucket.append(line.strip()[:300])
    return found


@dataclass(slots=True)
class WatchState:
    """Everything seen so far in the guest's output files (host monotonic times)."""

    started: float
    last_activity: float
    events: int = 0
    samples: int = 0
    heartbeats: int = 0
    phase: str = "boot"
    phases: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] | None = None
    first_heartbeat: dict[str, Any] | None = None
    last_heartbeat: dict[str, Any] | None = None
    first_sample: dict[str, Any] | None = None
    last_sample: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    done: bool = False
    max_pages_done: int = -1
    last_progress: float | None = None
    """Host time the stress phase started or ``pages_done`` last grew (None before)."""

    def silent_for(self, now: float) -> float:
        """Seconds since any line arrived."""
        return now - self.last_activity

    def stalled_for(self, now: float) -> float:
        """Seconds the workload has made no page progress (0 outside the stress phase)."""
        if self.phase != "stress" or self.last_progress is None:
            return 0.0
        return now - self.last_progress


class Watchdog:
    """Tails events.jsonl and vmstat.jsonl and keeps a :class:`WatchState`."""

    def __init__(self, events_path: Path, samples_path: Path, now: float) -> None:
        self.events = JsonlTail(events_path)
        self.samples = JsonlTail(samples_path)
        self.state = WatchState(started=now, last_activity=now)

    def poll(self, now: float) -> Iterator[dict[str, Any]]:
        """Consume new lines; yield each new record (events first, then samples)."""
        st = self.state
        for rec in self.events.read_new():
            st.last_activity = now
            st.events += 1
            kind = rec.get("type")
            if kind == "heartbeat":
                st.heartbeats += 1
                if st.first_heartbeat is None:
                    st.first_heartbeat = rec
                st.last_heartbeat = rec
                done = rec.get("pages_done")
                if isinstance(done, int) and done > st.max_pages_done:
                    st.max_pages_done = done
                    st.last_progress = now
            elif kind == "phase":
                st.phase = str(rec.get("phase", st.phase))
                st.phases.setdefault(st.phase, now - st.started)
                if st.phase == "stress":
                    st.last_progress = now
                if st.phase == "done":
                    st.done = True
            elif kind == "info":
                st.info = rec
            elif kind == "result":
                st.result = rec
            elif kind == "error":
                st.error = rec
            yield rec
        for rec in self.samples.read_new():
            st.last_activity = now
            if rec.get("type", "sample") == "sample":
                st.samples += 1
                if st.first_sample is None:
                    st.first_sample = rec
                st.last_sample = rec
            yield rec


@dataclass(frozen=True, slots=True)
class Verdict:
    """The classified outcome and why."""

    outcome: Outcome
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


#: Phases in which a stall is the experiment's lockup: the workload is under pressure.
LOCKUP_PHASES: Final = frozenset({"stress"})


def console_last_line(text: str) -> str:
    """The last non-blank line of a console log (at most 300 characters)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _oom_signs(result_event: dict[str, Any] | None, console: dict[str, list[str]]) -> bool:
    if console.get("oom"):
        return True
    if result_event is None:
        return False
    delta = result_event.get("oom_kill_delta")
    if isinstance(delta, int) and delta > 0:
        return True
    sw = result_event.get("swapstress") or {}
    return "oom" in json.dumps(sw.get("workers", "")).lower()


def classify(
    *,
    result_event: dict[str, Any] | None,
    error_event: dict[str, Any] | None,
    lockup: bool,
    silent_s: float,
    timed_out: bool,
    qemu_exit: int | None,
    console_text: str,
    stalled_s: float = 0.0,
    phase: str = "stress",
) -> Verdict:
    """Decide the outcome of a run from what was observed (pure; see module docstring).

    Args:
        result_event: the guest's ``result`` event, if one arrived.
        error_event: the guest's ``error`` event, if one arrived.
        lockup: the watchdog saw no heartbeat and no sample (or no page progress) for the
            lockup window.
        silent_s: seconds since the last heartbeat/sample/event when the run ended.
        timed_out: the overall timeout ended the run.
        qemu_exit: QEMU's exit status (None if the host killed it).
        console_text: the guest console.
        stalled_s: seconds without page progress in the stress phase.
        phase: the last phase the guest reported (``boot`` if none). A stall before the
            stress phase is an ``error``, not a lockup: nothing was under memory pressure
            yet (a guest kernel that hung while booting under TCG was once counted as a
            lockup of the patched arm).
    """
    console = console_evidence(console_text)
    evidence: dict[str, Any] = {
        "console": console,
        "silent_s": round(silent_s, 1),
        "stalled_s": round(stalled_s, 1),
    }
    if qemu_exit is not None:
        evidence["qemu_exit"] = qemu_exit
    if result_event is not None:
        sw = result_event.get("swapstress") or {}
        corrupt = int(sw.get("corrupt_pages") or 0)
        sw_outcome = sw.get("outcome")
        if corrupt > 0 or sw_outcome == "corruption":
            return Verdict(
                Outcome.CORRUPTION, f"swapstress found {corrupt} corrupt pages", evidence
            )
        if sw_outcome == "completed":
            return Verdict(
                Outcome.COMPLETED, "swapstress completed and verified every page", evidence
            )
        if sw_outcome == "worker-died" and _oom_signs(result_event, console):
            return Verdict(Outcome.OOM, "a swapstress worker was OOM-killed", evidence)
        return Verdict(
            Outcome.ERROR,
            f"swapstress ended with outcome {sw_outcome!r} (exit {result_event.get('exit_code')})",
            evidence,
        )
    silent = f"no heartbeat and no sample for {silent_s:.0f}s"
    if lockup and phase not in LOCKUP_PHASES:  # stalled_s counts only in the stress phase
        evidence["phase"] = phase
        if phase == "boot":
            last = console_last_line(console_text)
            return Verdict(
                Outcome.ERROR,
                f"the guest hung while booting, before it reported anything ({silent});"
                f" its console ends: {last!r}",
                evidence,
            )
        return Verdict(
            Outcome.ERROR,
            f"the guest stalled in phase {phase!r}, before the stress phase ({silent})",
            evidence,
        )
    if lockup:
        hung = len(console.get("hung_task", []))
        extra = f"; {hung} hung-task reports on the console" if hung else ""
        if silent_s >= stalled_s:
            what = silent
        else:
            what = f"heartbeats still arrive but no page progress for {stalled_s:.0f}s"
        return Verdict(Outcome.LOCKUP, what + extra, evidence)
    if error_event is not None:
        if _oom_signs(None, console):
            return Verdict(
                Outcome.OOM,
                f"guest error after an OOM kill: {error_event.get('message')}",
                evidence,
            )
        return Verdict(
            Outcome.ERROR,
            f"guest reported an error in phase {error_event.get('phase')!r}: "
            f"{error_event.get('message')}",
            evidence,
        )
    if console.get("initramfs_error"):
        return Verdict(Outcome.ERROR, console["initramfs_error"][0], evidence)
    if timed_out:
        return Verdict(
            Outcome.ERROR, "overall timeout reached while the guest was still active", evidence
        )
    if console.get("panic"):
        return Verdict(Outcome.GUEST_CRASH, f"kernel panic: {console['panic'][0]}", evidence)
    if _oom_signs(None, console):
        return Verdict(
            Outcome.OOM, "the guest OOM-killed the workload and sent no result", evidence
        )
    return Verdict(
        Outcome.GUEST_CRASH,
        f"QEMU exited (status {qemu_exit}) without a result from the guest",
        evidence,
    )
