"""Stall or lockup, decided from a scripted stream of the guest's records, without a guest.

Each test feeds heartbeats and samples into the WatchState at chosen host times and steps
the decision: the StallWatch alone, then the experiment's step with the kernel's evidence
(a real deadlocked console) and a server the host sees stopped.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from vm.run import experiment, forensics, record, watchdog
from vm.run.config import RunConfig
from vm.run.watchdog import Confirmed, Evaluate, Look, StallEnded, StallWatch, WatchState

DATA = Path(__file__).parent / "data" / "sysrq"
VANILLA_61 = gzip.decompress((DATA / "6.1.192-vanilla.console.gz").read_bytes()).decode()
_FIRST = VANILLA_61.index("sysrq: Show Blocked State")
#: The fixture's second look (SysRq w, l, t): the sender caught in D state and by SysRq-l.
SECOND_LOOK = VANILLA_61[VANILLA_61.index("sysrq: Show Blocked State", _FIRST + 1) - 16 :]


def stream(
    progress_until: float, resume_at: float | None = None, end: float = 200.0
) -> Iterable[tuple[float, dict[str, Any]]]:
    """Stress starts at t=0; pages grow every second until ``progress_until``, the mlocked
    parent keeps beating without growth, and growth resumes at ``resume_at``."""
    yield 0.0, {"type": "phase", "phase": "stress"}
    pages = 0
    t = 1.0
    while t <= end:
        if t <= progress_until or (resume_at is not None and t >= resume_at):
            pages += 100
        yield t, {"type": "heartbeat", "pass": 0, "pages_done": pages, "pages_total": 10**6}
        yield t, {"type": "sample", "vmstat": {"pswpout": 50 * int(t), "pswpin": 0}}
        t += 1.0


def drive(
    records: Iterable[tuple[float, dict[str, Any]]],
    step: Callable[[float, WatchState], list[Any]],
    until: float,
) -> list[tuple[float, Any]]:
    st = WatchState(started=0.0, last_activity=0.0)
    pending = list(records)
    seen: list[tuple[float, Any]] = []
    t = 0.0
    while t <= until:
        while pending and pending[0][0] <= t:
            _, rec = pending.pop(0)
            st.observe(rec, t, stream="samples" if rec["type"] == "sample" else "events")
        actions = step(t, st)
        seen.extend((t, a) for a in actions)
        if any(isinstance(a, Confirmed | record.Ending) for a in actions):
            break  # the watch loop returns here
        t = round(t + 0.5, 1)
    return seen


def test_a_stall_is_looked_at_twice_then_confirmed_by_time() -> None:
    watch = StallWatch(15.0, 60.0)
    seen = drive(stream(progress_until=10.0), watch.step, until=80.0)
    assert seen == [
        (25.0, Look("wml", 1)),
        (35.0, Look("wlt", 2)),
        (40.0, Evaluate()),
        (45.0, Look("wlt", 3)),  # the latest two looks are compared: a third, a fourth
        (50.0, Evaluate()),
        (55.0, Look("wlt", 4)),
        (60.0, Evaluate()),
        (70.0, Confirmed(60.0)),
    ]
    assert watch.stalls == []


def test_progress_that_resumes_makes_a_stall_not_a_lockup() -> None:
    watch = StallWatch(15.0, 60.0)
    seen = drive(stream(progress_until=10.0, resume_at=45.0), watch.step, until=120.0)
    assert seen == [
        (25.0, Look("wml", 1)),
        (35.0, Look("wlt", 2)),
        (40.0, Evaluate()),
        (
            45.0,
            StallEnded({"at_s": 10.0, "length_s": 35.0, "pages_done": 1000, "looked": True}),
        ),
    ]
    assert watch.stalls == [{"at_s": 10.0, "length_s": 35.0, "pages_done": 1000, "looked": True}]


def test_no_stall_is_seen_before_the_stress_phase_or_after_the_result() -> None:
    watch = StallWatch(15.0, 60.0)
    records = [(0.0, {"type": "phase", "phase": "swapon"})]
    assert drive(records, watch.step, until=100.0) == []
    done = [
        *list(stream(progress_until=5.0, end=5.0)),
        (5.0, {"type": "result", "exit_code": 0, "swapstress": {"outcome": "completed"}}),
    ]
    assert drive(done, StallWatch(15.0, 60.0).step, until=100.0) == []


def test_only_the_first_stalls_are_looked_at() -> None:
    watch = StallWatch(5.0, 60.0, max_looked=1, max_looks=2)
    records: list[tuple[float, dict[str, Any]]] = [(0.0, {"type": "phase", "phase": "stress"})]
    pages = 0
    for t in range(1, 60):
        if t % 20 == 0:  # progress only every 20 s: two stalls of 20 s
            pages += 100
        records.append((float(t), {"type": "heartbeat", "pages_done": pages}))
    seen = drive(records, watch.step, until=59.0)
    looks = [a for _, a in seen if isinstance(a, Look)]
    assert looks == [Look("wml", 1), Look("wlt", 2)]  # the first stall only
    assert [s["looked"] for s in watch.stalls] == [True, False]


def test_no_look_starts_in_the_step_that_confirms_by_time() -> None:
    """Seen in a fresh clone's suite: with the window at 30 s and looks every 10 s from
    10 s, a third look was pressed at 30 s, just as time confirmed the lockup."""
    watch = StallWatch(10.0, 30.0)
    seen = drive(stream(progress_until=0.0), watch.step, until=60.0)  # last growth at 1 s
    assert seen == [
        (11.0, Look("wml", 1)),
        (21.0, Look("wlt", 2)),
        (26.0, Evaluate()),
        (31.0, Confirmed(30.0)),  # not a third look
    ]


def test_a_stall_must_come_before_the_lockup() -> None:
    with pytest.raises(ValueError, match=r"a stall \(60.0s\) must be seen before the lockup"):
        StallWatch(60.0, 60.0)


# --------------------------------------------------------------- the experiment's step


def experiment_step(
    tmp_path: Path, printed: list[str], server: dict[str, Any] | None = None
) -> tuple[Callable[[float, WatchState], list[Any]], forensics.Forensics, list[str]]:
    """The experiment's stall step with a console that prints ``printed[i]`` at look i."""
    console = tmp_path / "console.log"
    console.write_text("[    0.000000] Linux version 6.1.0-57-cloud-amd64\n")
    looks = forensics.Forensics(console, None, lambda: server, started=0.0)
    cfg = RunConfig(out=tmp_path, lockup_after_s=60.0, stall_after_s=15.0)
    watch = StallWatch(cfg.effective_stall_after_s, cfg.lockup_after_s)
    said: list[str] = []

    def step(now: float, st: WatchState) -> list[Any]:
        before = sum(len(s.looks) for s in looks.stalls)
        ending = experiment._stall_step(cfg, st, now, stalls=watch, looks=looks, say=said.append)
        after = sum(len(s.looks) for s in looks.stalls)
        if after > before:  # the kernel answers the keys on the console
            with console.open("a") as f:
                f.write(printed[min(after - 1, len(printed) - 1)])
        return [ending] if ending is not None else []

    return step, looks, said


def test_a_deadlock_missed_by_one_look_is_confirmed_by_the_next_two(tmp_path: Path) -> None:
    """Seen on 6.12.118 (2026-12-06): the first look caught no sender, the second did."""
    step, looks, _ = experiment_step(tmp_path, ["", SECOND_LOOK, SECOND_LOOK])
    seen = drive(stream(progress_until=10.0), step, until=80.0)
    assert seen == [(50.0, record.Ending.CONFIRMED)]
    kernel = looks.kernel_evidence()
    assert kernel is not None
    assert kernel["signatures"] == ["unknown", "memalloc-deadlock", "memalloc-deadlock"]
    assert kernel["signature"] == "memalloc-deadlock"


def test_the_same_deadlock_in_both_looks_confirms_the_lockup_early(tmp_path: Path) -> None:
    step, looks, said = experiment_step(tmp_path, [SECOND_LOOK, SECOND_LOOK])
    seen = drive(stream(progress_until=10.0), step, until=80.0)
    assert seen == [(40.0, record.Ending.CONFIRMED)]  # not 70 s: the evidence decided
    assert said[-1] == "watchdog: memalloc-deadlock in both looks with no progress: lockup"
    kernel = looks.kernel_evidence()
    assert kernel is not None
    assert kernel["signature"] == "memalloc-deadlock"
    assert kernel["signatures"] == ["memalloc-deadlock", "memalloc-deadlock"]
    assert [look["error"] for look in kernel["looks"]] == ["no QMP socket"] * 2
    assert kernel["blocked_tasks"][0]["comm"] == "kworker/0:2H"


def test_a_stopped_server_confirms_server_unresponsive(tmp_path: Path) -> None:
    stopped = "is stopped (pid 4242, state T): it reads nothing"
    step, looks, _ = experiment_step(
        tmp_path, ["", ""], server={"unresponsive": stopped, "definitive": True}
    )
    seen = drive(stream(progress_until=10.0), step, until=80.0)
    assert seen == [(40.0, record.Ending.CONFIRMED)]
    kernel = looks.kernel_evidence()
    assert kernel is not None
    assert (kernel["signature"], kernel["why"]) == (
        "server-unresponsive",
        f"the NBD server {stopped}",
    )


def test_stacks_of_no_known_deadlock_wait_for_the_whole_window(tmp_path: Path) -> None:
    step, looks, said = experiment_step(tmp_path, ["", ""])
    seen = drive(stream(progress_until=10.0), step, until=80.0)
    # Heartbeats and samples still arrive: a stall of progress, not of the guest's voice.
    assert seen == [(70.0, record.Ending.STALLED)]
    assert said[-2] == "watchdog: the kernel says: " + "; ".join(
        ["unknown (the kernel printed no task stacks)"] * 4
    )
    assert said[-1] == "watchdog: no page progress for 60s: lockup"
    kernel = looks.kernel_evidence()
    assert kernel is not None and kernel["signatures"] == ["unknown"] * 4


def test_a_stall_that_recovers_is_counted_and_the_run_goes_on(tmp_path: Path) -> None:
    step, _, said = experiment_step(tmp_path, ["", ""])
    seen = drive(stream(progress_until=10.0, resume_at=50.0), step, until=120.0)
    assert seen == []
    assert said[-1] == "watchdog: progress resumed after a 40s stall: a stall, not a lockup"


def test_pressure_decides_between_lockup_and_error() -> None:
    st = WatchState(started=0.0, last_activity=0.0)
    st.observe({"type": "sample", "vmstat": {"pswpout": 0}}, 1.0, stream="samples")
    st.observe({"type": "sample", "vmstat": {"pswpout": 0}}, 2.0, stream="samples")
    none = watchdog.Pressure(pswpout=st.pswpout())
    assert not none.met and none.text().startswith("pswpout 0")
    below = watchdog.Pressure(pswpout=621, swap_used_kb=2816, below_high=("DMA32 free 1 kB",))
    assert below.met
    # A swap-out proves free memory fell below the watermarks before; at the look it may
    # be back above them (a frozen server, 2026-12-06): still the experiment's pressure.
    above = watchdog.Pressure(pswpout=3395, swap_used_kb=13824, below_high=())
    assert above.met
    assert above.text() == (
        "pswpout 3395, swap used 13824 kB, every zone's free memory back above its high "
        "watermark at the look"
    )
    # No sample saw a swap-out, but SysRq-m shows swap in use: pressure too.
    assert watchdog.Pressure(pswpout=0, swap_used_kb=4, below_high=()).met
