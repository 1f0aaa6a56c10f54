"""Watch a running guest from outside and classify how the run ended.

Theory of operation
-------------------
QEMU writes three files while the guest runs (see vm/run/qemu.py): ``events.jsonl``
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
from pathlib import Path
from typing import Any, Final

from stress.runrecord import Outcome, swapstress_verdict


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
    max_corrupt: int = 0
    """The most corrupt pages a heartbeat reported (a hang after corruption keeps it)."""
    last_heartbeat_at: float | None = None
    """Host time the last heartbeat arrived."""
    stress_sample: dict[str, Any] | None = None
    """The first sample of the stress phase (the harness's own footprint is read from it)."""
    stress_locked_peak: int | None = None
    """The most Mlocked bytes a stress-phase sample saw (the tools lock themselves a moment
    after the phase starts, so the first sample can miss swapstress's share)."""
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

    def observe(self, rec: dict[str, Any], now: float, *, stream: str) -> None:
        """Take one record of the guest's ``events`` or ``samples`` stream, seen at ``now``."""
        self.last_activity = now
        if stream == "samples":
            if rec.get("type", "sample") == "sample":
                if self.phase == "stress":
                    if self.stress_sample is None:
                        self.stress_sample = rec
                    locked = (rec.get("meminfo") or {}).get("Mlocked")
                    if isinstance(locked, int) and locked > (self.stress_locked_peak or -1):
                        self.stress_locked_peak = locked
                self.samples += 1
                if self.first_sample is None:
                    self.first_sample = rec
                self.last_sample = rec
            return
        self.events += 1
        kind = rec.get("type")
        if kind == "heartbeat":
            self.heartbeats += 1
            self.last_heartbeat_at = now
            if self.first_heartbeat is None:
                self.first_heartbeat = rec
            self.last_heartbeat = rec
            done = rec.get("pages_done")
            if isinstance(done, int) and done > self.max_pages_done:
                self.max_pages_done = done
                self.last_progress = now
            corrupt = rec.get("corrupt_pages")
            if isinstance(corrupt, int) and corrupt > self.max_corrupt:
                self.max_corrupt = corrupt
        elif kind == "phase":
            self.phase = str(rec.get("phase", self.phase))
            self.phases.setdefault(self.phase, now - self.started)
            if self.phase == "stress":
                self.last_progress = now
            if self.phase == "done":
                self.done = True
        elif kind == "info":
            self.info = rec
        elif kind == "result":
            self.result = rec
        elif kind == "error":
            self.error = rec

    def footprint(self) -> dict[str, Any] | None:
        """Memory the harness holds in the stress phase: what the 2012 workload never shared.

        ``mlocked_bytes`` is the peak over the stress phase's samples (the guest tools'
        mlocked Python: swapstress's parent and the collector; the workers lock nothing), and
        the ``_at_start`` figures are the first stress sample's (bytes, /proc/meminfo).
        """
        meminfo = (self.stress_sample or {}).get("meminfo") or {}
        if not meminfo:
            return None
        return {
            "mlocked_bytes": self.stress_locked_peak,
            "mlocked_bytes_at_start": meminfo.get("Mlocked"),
            "unevictable_bytes_at_start": meminfo.get("Unevictable"),
            "mem_total_bytes": meminfo.get("MemTotal"),
            "mem_free_bytes": meminfo.get("MemFree"),
        }

    def pswpout(self) -> int | None:
        """Pages swapped out between the first and the last sample (None: no samples)."""
        first = (self.first_sample or {}).get("vmstat") or {}
        last = (self.last_sample or {}).get("vmstat") or {}
        if "pswpout" not in first or "pswpout" not in last:
            return None
        return int(last["pswpout"]) - int(first["pswpout"])


class Watchdog:
    """Tails events.jsonl and vmstat.jsonl and keeps a :class:`WatchState`."""

    def __init__(self, events_path: Path, samples_path: Path, now: float) -> None:
        self.events = JsonlTail(events_path)
        self.samples = JsonlTail(samples_path)
        self.state = WatchState(started=now, last_activity=now)

    def poll(self, now: float) -> Iterator[dict[str, Any]]:
        """Consume new lines; yield each new record (events first, then samples)."""
        for rec in self.events.read_new():
            self.state.observe(rec, now, stream="events")
            yield rec
        for rec in self.samples.read_new():
            self.state.observe(rec, now, stream="samples")
            yield rec


# ------------------------------------------------------------------------- stall or lockup


@dataclass(frozen=True, slots=True)
class Look:
    """Press these SysRq keys now (look ``number`` at this stall)."""

    keys: str
    number: int


@dataclass(frozen=True, slots=True)
class Evaluate:
    """Every look of this stall has had time to print: read the console and judge it."""


@dataclass(frozen=True, slots=True)
class StallEnded:
    """Progress resumed: the stall was a stall, not a lockup."""

    stall: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Confirmed:
    """No progress for the whole lockup window: the lockup is confirmed by time."""

    idle_s: float


Action = Look | Evaluate | StallEnded | Confirmed


class StallWatch:
    """When to look at a stalled guest, and whether a stall ended or became a lockup (pure).

    In the stress phase, no page progress for ``stall_after`` seconds is a *stall*: the
    host looks (``LOOKS``: SysRq w, m and l, then every ``look_gap`` seconds w, l and t, up
    to ``max_looks`` looks; l catches a sender that is running, not blocked, in reclaim),
    and ``read_delay`` seconds after each look from the second on asks the caller to
    :class:`Evaluate` what the kernel printed (a sender can be missed by one look, so the
    two latest looks are compared, not the first two). Progress resuming at any point ends
    the stall (:class:`StallEnded`, recorded in :attr:`stalls`); no progress for
    ``lockup_after`` seconds confirms the lockup (:class:`Confirmed`). The caller may
    confirm earlier on evidence (the same :mod:`vm.run.evidence` signature in the two latest
    looks). At most ``max_looked`` stalls are looked at, so a run with many short stalls
    is not flooded with dumps.
    """

    LOOKS: Final = ("wml", "wlt")

    def __init__(
        self,
        stall_after: float,
        lockup_after: float,
        *,
        look_gap: float = 10.0,
        read_delay: float = 5.0,
        max_looked: int = 3,
        max_looks: int = 4,
    ) -> None:
        if not 0 < stall_after < lockup_after:
            raise ValueError(
                f"a stall ({stall_after}s) must be seen before the lockup ({lockup_after}s)"
            )
        self.stall_after = stall_after
        self.lockup_after = lockup_after
        self.look_gap = look_gap
        self.read_delay = read_delay
        self.max_looked = max_looked
        self.max_looks = max_looks
        self.stalls: list[dict[str, Any]] = []
        """Stalls that ended (progress resumed), in order."""
        self.current: dict[str, Any] | None = None
        """The stall under way: ``since`` (host time of the last progress), ``seen``,
        ``pages_done``, ``looks`` pressed so far, ``evaluated``."""
        self.looked = 0

    def _stress_s(self, st: WatchState, host: float) -> float:
        """Seconds into the stress phase of host time ``host``."""
        return round(host - st.started - st.phases.get("stress", 0.0), 1)

    def step(self, now: float, st: WatchState) -> list[Action]:
        """What to do at ``now`` given what the guest has said (call after every poll)."""
        if st.phase != "stress" or st.last_progress is None or st.result is not None:
            return []
        cur = self.current
        if cur is not None and st.last_progress > cur["since"]:
            ended = {
                "at_s": self._stress_s(st, cur["since"]),
                "length_s": round(st.last_progress - cur["since"], 1),
                "pages_done": cur["pages_done"],
                "looked": cur["looks"] > 0,
            }
            if cur.get("signature"):
                ended["signature"] = cur["signature"]
            self.stalls.append(ended)
            self.current = None
            return [StallEnded(ended)]
        idle = now - st.last_progress
        if cur is None:
            if idle < self.stall_after:
                return []
            cur = self.current = {
                "since": st.last_progress,
                "seen": now,
                "pages_done": st.max_pages_done,
                "looks": 0,
                "evaluated": False,
                "look": self.looked < self.max_looked,
            }
            if cur["look"]:
                self.looked += 1
        actions: list[Action] = []
        due = cur["seen"] + cur["looks"] * self.look_gap
        confirming = idle >= self.lockup_after  # no new look once time has decided
        if cur["look"] and cur["looks"] < self.max_looks and now >= due and not confirming:
            keys = self.LOOKS[min(cur["looks"], len(self.LOOKS) - 1)]
            actions.append(Look(keys, cur["looks"] + 1))
            cur["looks"] += 1
            cur["last_look"] = now
            cur["evaluated"] = False
        elif (
            cur["look"]
            and cur["looks"] >= 2
            and not cur["evaluated"]
            and now >= cur["last_look"] + self.read_delay
        ):
            cur["evaluated"] = True
            actions.append(Evaluate())
        if confirming:
            actions.append(Confirmed(round(idle, 1)))
        return actions

    def at_stall(self, st: WatchState) -> dict[str, Any] | None:
        """Time-to-stall and progress at the stall under way (None when there is none).

        ``at_s`` is when progress stopped, in seconds of the stress phase (0 when no
        heartbeat ever showed progress); ``last_word_s`` when the guest last said anything.
        """
        cur = self.current
        if cur is None:
            return None
        return {
            "at_s": self._stress_s(st, cur["since"]),
            "seen_after_s": round(cur["seen"] - cur["since"], 1),
            "pages_done": cur["pages_done"],
            "heartbeats": st.heartbeats,
            "last_word_s": self._stress_s(st, st.last_activity),
        }


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


@dataclass(frozen=True, slots=True)
class Pressure:
    """Was the guest under memory pressure when it stalled? (The experiment's lockup needs it.)"""

    pswpout: int | None
    """Pages swapped out between the first and the last sample (None: no samples)."""
    swap_used_kb: int | None = None
    """Swap in use as SysRq-m printed it (None: no SysRq-m report)."""
    below_high: tuple[str, ...] | None = None
    """Zones below their high watermark, from SysRq-m (None: no SysRq-m report)."""

    @property
    def swapping(self) -> bool:
        return (self.pswpout or 0) > 0 or (self.swap_used_kb or 0) > 0

    @property
    def met(self) -> bool:
        """Swap-out had begun, so free memory had fallen below the watermarks.

        Reclaim writes anonymous pages to swap only once free memory has fallen below the
        low watermark (kswapd's wake-up) or an allocation failed its watermark check (direct
        reclaim), so a swap-out is the proof that pressure began. The zones SysRq-m shows
        later are kept as evidence, not as a condition: by the time the host looks, reclaim
        may have brought free memory back above the high watermark (seen with a frozen
        server: pages swapped out, the workers waiting for swap-ins that never come).
        """
        return self.swapping

    def text(self) -> str:
        out = f"pswpout {self.pswpout if self.pswpout is not None else 'unknown (no samples)'}"
        if self.swap_used_kb is not None:
            out += f", swap used {self.swap_used_kb} kB"
        if self.below_high is None:
            seen = "no SysRq-m report" if self.swap_used_kb is None else "no zone lines in it"
            out += f", zone watermarks not seen ({seen})"
        elif self.below_high:
            out += ", " + "; ".join(self.below_high)
        else:
            out += ", every zone's free memory back above its high watermark at the look"
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "pswpout": self.pswpout,
            "swap_used_kb": self.swap_used_kb,
            "below_high": list(self.below_high) if self.below_high is not None else None,
            "met": self.met,
        }


#: Samples this recent "still arrive"; older ones stopped (a held run's came 7 s past the
#: stall and then none for 893 s).
SAMPLES_STILL_S: Final = 10.0


def stall_text(
    *, silent_s: float, stalled_s: float, heartbeats: int, heartbeat_silent_s: float | None
) -> str:
    """What the host saw of a stalled guest, in words that tell silence from no progress.

    A guest that never sent a heartbeat, one whose heartbeats stopped with its progress,
    and one whose heartbeats go on without progress are three different stories; so are
    samples that stopped and samples that still arrive.
    """
    idle = max(stalled_s, silent_s)
    if heartbeats == 0 or heartbeat_silent_s is None:
        what = f"no heartbeat ever arrived, no page progress for {idle:.0f}s"
    elif heartbeat_silent_s + 5.0 < idle:
        what = f"heartbeats still arrive but no page progress for {idle:.0f}s"
    else:
        what = f"no page progress and no heartbeat for {idle:.0f}s"
    if silent_s + 5.0 >= idle:
        return what + ", and no sample either"
    if silent_s <= SAMPLES_STILL_S:
        return what + f" (samples still arrive, the last {silent_s:.0f}s ago)"
    return what + f" (samples went on for {idle - silent_s:.0f}s, then stopped too)"


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
    corrupt_seen: int = 0,
    heartbeats: int = 0,
    heartbeat_silent_s: float | None = None,
    pressure: Pressure | None = None,
    kernel: dict[str, Any] | None = None,
) -> Verdict:
    """Decide the outcome of a run from what was observed (pure; see module docstring).

    Args:
        result_event: the guest's ``result`` event, if one arrived.
        error_event: the guest's ``error`` event, if one arrived.
        lockup: the watch loop confirmed a lockup (or, before the stress phase, saw the
            guest silent for the lockup window).
        silent_s: seconds since the last heartbeat/sample/event when the run ended.
        timed_out: the overall timeout ended the run.
        qemu_exit: QEMU's exit status (None if the host killed it).
        console_text: the guest console.
        stalled_s: seconds without page progress in the stress phase.
        phase: the last phase the guest reported (``boot`` if none). A stall before the
            stress phase is an ``error``, not a lockup: nothing was under memory pressure
            yet (a guest kernel that hung while booting under TCG was once counted as a
            lockup of the patched arm).
        corrupt_seen: the most corrupt pages any heartbeat reported: corruption followed
            by a hang is ``corruption``, never a lockup.
        heartbeats: heartbeats received in all.
        heartbeat_silent_s: seconds since the last heartbeat (None: none arrived).
        pressure: the memory pressure at the stall; a stress-phase stall without it is an
            ``error`` (None: not judged, as for runs without samples).
        kernel: the kernel's own evidence (vm/run/evidence.py): ``signature``, ``why``,
            ``blocked_tasks`` ... merged into the verdict's evidence.
    """
    console = console_evidence(console_text)
    evidence: dict[str, Any] = {
        "console": console,
        "silent_s": round(silent_s, 1),
        "stalled_s": round(stalled_s, 1),
    }
    if qemu_exit is not None:
        evidence["qemu_exit"] = qemu_exit
    if corrupt_seen:
        evidence["corrupt_seen"] = corrupt_seen
    if result_event is not None:  # it finished: judged as a lab run is (stress.runrecord)
        outcome, reason = swapstress_verdict(
            result_event.get("swapstress") or {},
            result_event.get("exit_code"),
            oom_killed=_oom_signs(result_event, console),
        )
        return Verdict(outcome, reason, evidence)
    if corrupt_seen > 0:
        how = "hung" if lockup else "ended"
        return Verdict(
            Outcome.CORRUPTION,
            f"swapstress reported {corrupt_seen} corrupt pages in a heartbeat, then the guest "
            f"{how} without a result",
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
        if kernel:
            evidence.update(kernel)
        what = stall_text(
            silent_s=silent_s,
            stalled_s=stalled_s,
            heartbeats=heartbeats,
            heartbeat_silent_s=heartbeat_silent_s,
        )
        if pressure is not None:
            evidence["pressure"] = pressure.as_dict()
            if not pressure.met:
                return Verdict(
                    Outcome.ERROR,
                    f"the guest stalled before memory pressure ({pressure.text()}): {what}; "
                    "not the experiment's lockup",
                    evidence,
                )
        hung = len(console.get("hung_task", []))
        extra = f"; {hung} hung-task reports on the console" if hung else ""
        if kernel and kernel.get("signature"):
            extra += f"; {kernel['signature']}: {kernel.get('why', '')}"
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
