"""vm.run.watchdog: tailing the files QEMU writes, and classifying outcomes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vm.run import watchdog
from vm.run.watchdog import JsonlTail, Outcome, Verdict, Watchdog, classify, console_evidence

HUNG = (
    "[  246.120000] INFO: task kswapd0:35 blocked for more than 122 seconds.\n"
    "[  246.130000]       Not tainted 6.1.0-47-cloud-amd64 #1 Debian\n"
)
PANIC = "[   12.000000] Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b\n"
OOM = "[   80.000000] Out of memory: Killed process 321 (python3) total-vm:70000kB\n"


def result(outcome: str, corrupt: int = 0, **extra: Any) -> dict[str, Any]:
    sw = {"outcome": outcome, "corrupt_pages": corrupt, "workers": extra.pop("workers", [])}
    return {"type": "result", "exit_code": extra.pop("exit_code", 0), "swapstress": sw, **extra}


def verdict(**kw: Any) -> Outcome:
    args: dict[str, Any] = {
        "result_event": None,
        "error_event": None,
        "lockup": False,
        "silent_s": 1.0,
        "timed_out": False,
        "qemu_exit": 0,
        "console_text": "",
    }
    args.update(kw)
    return classify(**args).outcome


def test_tail_returns_only_complete_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    tail = JsonlTail(path)
    assert tail.read_new() == []  # the file does not exist yet
    path.write_bytes(b'{"type": "phase", "phase": "boot"}\n{"type": "heart')
    assert tail.read_new() == [{"type": "phase", "phase": "boot"}]
    with open(path, "ab") as f:
        f.write(b'beat", "pass": 1}\nnot json\n[1, 2]\n')
    assert tail.read_new() == [{"type": "heartbeat", "pass": 1}]
    assert tail.bad_lines == 2
    assert tail.read_new() == []


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"result_event": result("completed")}, Outcome.COMPLETED),
        ({"result_event": result("corruption", corrupt=3, exit_code=1)}, Outcome.CORRUPTION),
        ({"result_event": result("completed", corrupt=1)}, Outcome.CORRUPTION),
        (
            {"result_event": result("worker-died", exit_code=3, oom_kill_delta=2)},
            Outcome.OOM,
        ),
        (
            {
                "result_event": result(
                    "worker-died", exit_code=3, workers=[{"signal": "SIGKILL", "oom": True}]
                )
            },
            Outcome.OOM,
        ),
        ({"result_event": result("worker-died", exit_code=3)}, Outcome.ERROR),
        ({"result_event": result("interrupted", exit_code=130)}, Outcome.ERROR),
        ({"lockup": True, "silent_s": 45.0, "qemu_exit": None}, Outcome.LOCKUP),
        (
            {"lockup": True, "console_text": HUNG, "qemu_exit": None},
            Outcome.LOCKUP,
        ),
        ({"error_event": {"phase": "nbd-connect", "message": "refused"}}, Outcome.ERROR),
        (
            {"error_event": {"phase": "stress", "message": "killed"}, "console_text": OOM},
            Outcome.OOM,
        ),
        ({"console_text": PANIC}, Outcome.GUEST_CRASH),
        ({"console_text": "boot\n"}, Outcome.GUEST_CRASH),
        ({"console_text": OOM}, Outcome.OOM),
        ({"timed_out": True, "qemu_exit": None}, Outcome.ERROR),
        ({"console_text": "SWAPNBD-INITRAMFS-ERROR: insmod nbd.ko\n"}, Outcome.ERROR),
    ],
)
def test_classify(kw: dict[str, Any], expected: Outcome) -> None:
    assert verdict(**kw) is expected


def test_result_wins_over_a_later_lockup() -> None:
    assert verdict(result_event=result("completed"), lockup=True) is Outcome.COMPLETED


def test_lockup_wins_over_a_panic_line_and_counts_hung_tasks() -> None:
    v = classify(
        result_event=None,
        error_event=None,
        lockup=True,
        silent_s=61.4,
        timed_out=False,
        qemu_exit=None,
        console_text=HUNG + HUNG,
    )
    assert v.outcome is Outcome.LOCKUP
    assert v.reason == (
        "no heartbeat ever arrived, no page progress for 61s, and no sample either; "
        "2 hung-task reports on the console"
    )
    assert len(v.evidence["console"]["hung_task"]) == 2
    assert v.evidence["silent_s"] == 61.4


def test_console_evidence_groups_lines() -> None:
    text = "ok\n" + HUNG + PANIC + OOM + "nbd0: Possible stuck request 00000000: Runtime 30s\n"
    ev = console_evidence(text)
    assert set(ev) == {"hung_task", "panic", "oom", "nbd_stuck"}
    assert ev["panic"] == [PANIC.strip()]


def write_lines(path: Path, *records: dict[str, Any]) -> None:
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def test_watchdog_tracks_phases_heartbeats_samples_and_silence(tmp_path: Path) -> None:
    ev, vs = tmp_path / "events.jsonl", tmp_path / "vmstat.jsonl"
    wd = Watchdog(ev, vs, now=100.0)
    assert list(wd.poll(101.0)) == []
    assert wd.state.silent_for(130.0) == 30.0
    write_lines(ev, {"type": "phase", "phase": "boot"}, {"type": "phase", "phase": "stress"})
    write_lines(ev, {"type": "heartbeat", "pass": 1, "pages_done": 10, "pages_total": 100})
    write_lines(vs, {"type": "sample", "seq": 0, "vmstat": {"pswpout": 0}})
    write_lines(vs, {"type": "sample", "seq": 1, "vmstat": {"pswpout": 7}})
    records = list(wd.poll(140.0))
    assert [r["type"] for r in records] == ["phase", "phase", "heartbeat", "sample", "sample"]
    st = wd.state
    assert (st.phase, st.heartbeats, st.samples, st.events) == ("stress", 1, 2, 3)
    assert st.phases == {"boot": 40.0, "stress": 40.0}
    assert st.first_sample is not None and st.first_sample["seq"] == 0
    assert st.last_sample is not None and st.last_sample["vmstat"]["pswpout"] == 7
    assert st.silent_for(150.0) == 10.0
    write_lines(ev, {"type": "result", "exit_code": 0, "swapstress": {"outcome": "completed"}})
    write_lines(ev, {"type": "phase", "phase": "done"})
    list(wd.poll(160.0))
    assert st.result is not None and st.done


def test_heartbeats_without_page_progress_count_as_stalled(tmp_path: Path) -> None:
    ev, vs = tmp_path / "events.jsonl", tmp_path / "vmstat.jsonl"
    wd = Watchdog(ev, vs, now=0.0)
    write_lines(ev, {"type": "phase", "phase": "swapon"})
    list(wd.poll(5.0))
    assert wd.state.stalled_for(100.0) == 0.0  # not in the stress phase yet
    write_lines(ev, {"type": "phase", "phase": "stress"})
    list(wd.poll(10.0))
    assert wd.state.stalled_for(15.0) == 5.0
    write_lines(ev, {"type": "heartbeat", "pass": 0, "pages_done": 1280, "pages_total": 9})
    list(wd.poll(20.0))
    for t in (30.0, 40.0, 50.0):  # the mlocked parent keeps beating; the workers are stuck
        write_lines(ev, {"type": "heartbeat", "pass": 0, "pages_done": 1280, "pages_total": 9})
        list(wd.poll(t))
    assert wd.state.silent_for(50.0) == 0.0
    assert wd.state.stalled_for(65.0) == 45.0
    write_lines(ev, {"type": "heartbeat", "pass": 0, "pages_done": 1281, "pages_total": 9})
    list(wd.poll(70.0))
    assert wd.state.stalled_for(70.0) == 0.0


def test_lockup_by_stalled_progress_says_so() -> None:
    v = classify(
        result_event=None,
        error_event=None,
        lockup=True,
        silent_s=0.5,
        stalled_s=40.2,
        timed_out=False,
        qemu_exit=None,
        console_text="",
        heartbeats=30,
        heartbeat_silent_s=0.5,
    )
    assert v.outcome is Outcome.LOCKUP
    assert v.reason == (
        "heartbeats still arrive but no page progress for 40s (samples still arrive, "
        "the last 0s ago)"
    )
    assert v.evidence["stalled_s"] == 40.2


BOOT_CONSOLE = (
    "[    0.709337] NET: Registered PF_INET protocol family\n"
    "[    0.710186] IP idents hash table entries: 2048 (order: 2, 16384 bytes, linear)\n"
)


def stall(phase: str, silent_s: float, console_text: str) -> Verdict:
    """The verdict on a guest that went silent in ``phase``."""
    return classify(
        result_event=None,
        error_event=None,
        lockup=True,
        silent_s=silent_s,
        timed_out=False,
        qemu_exit=None,
        console_text=console_text,
        phase=phase,
    )


def test_a_guest_that_hangs_while_booting_is_an_error_not_a_lockup() -> None:
    """Seen in a swap-path matrix (2026-11-30): a patched guest's kernel stopped 0.71 s into
    boot under TCG, and the run was counted as a lockup of the patched arm."""
    v = stall("boot", 90.2, BOOT_CONSOLE)
    assert v.outcome is Outcome.ERROR
    assert v.reason == (
        "the guest hung while booting, before it reported anything (no heartbeat and no"
        " sample for 90s); its console ends: '[    0.710186] IP idents hash table entries:"
        " 2048 (order: 2, 16384 bytes, linear)'"
    )
    assert v.evidence["phase"] == "boot"
    assert v.evidence["silent_s"] == 90.2


def test_a_stall_before_the_stress_phase_is_an_error_naming_the_phase() -> None:
    v = stall("swapon", 61.0, HUNG)
    assert v.outcome is Outcome.ERROR
    assert v.reason == (
        "the guest stalled in phase 'swapon', before the stress phase (no heartbeat and no"
        " sample for 61s)"
    )
    assert v.evidence["phase"] == "swapon"


def test_a_stall_in_the_stress_phase_is_the_lockup() -> None:
    v = stall("stress", 75.3, HUNG)
    assert v.outcome is Outcome.LOCKUP
    assert v.reason == (
        "no heartbeat ever arrived, no page progress for 75s, and no sample either; "
        "1 hung-task reports on the console"
    )
    assert "phase" not in v.evidence


# ----------------------------------------------------------- verdict honesty (issue 22)


def confirmed_stall(**kw: Any) -> Verdict:
    """The verdict on a lockup the watch loop confirmed; ``kw`` overrides what it saw."""
    args: dict[str, Any] = {
        "result_event": None,
        "error_event": None,
        "lockup": True,
        "silent_s": 50.0,
        "stalled_s": 50.0,
        "timed_out": False,
        "qemu_exit": None,
        "console_text": "",
    }
    args.update(kw)
    return classify(**args)


def test_corruption_a_heartbeat_reported_survives_a_hang() -> None:
    v = confirmed_stall(corrupt_seen=3, heartbeats=12, heartbeat_silent_s=50.0)
    assert v.outcome is Outcome.CORRUPTION
    assert v.reason == (
        "swapstress reported 3 corrupt pages in a heartbeat, then the guest hung without a result"
    )
    assert v.evidence["corrupt_seen"] == 3


def test_a_stall_without_memory_pressure_is_an_error() -> None:
    v = confirmed_stall(
        silent_s=88.0,
        stalled_s=90.0,
        pressure=watchdog.Pressure(pswpout=0),
        kernel={"signature": "unknown", "why": "the kernel printed no task stacks"},
    )
    assert v.outcome is Outcome.ERROR
    assert v.reason == (
        "the guest stalled before memory pressure (pswpout 0, zone watermarks not seen (no "
        "SysRq-m report)): no heartbeat ever arrived, no page progress for 90s, and no sample "
        "either; not the experiment's lockup"
    )
    assert v.evidence["pressure"]["met"] is False and v.evidence["signature"] == "unknown"


def test_a_lockup_under_pressure_names_its_signature() -> None:
    why = "the nbd sender kworker/0:2H waits for memory in __alloc_pages_slowpath while ..."
    v = confirmed_stall(
        silent_s=1.0,
        stalled_s=41.0,
        console_text=HUNG,
        heartbeats=40,
        heartbeat_silent_s=1.0,
        pressure=watchdog.Pressure(pswpout=621, swap_used_kb=2816, below_high=("DMA32 x",)),
        kernel={"signature": "memalloc-deadlock", "why": why},
    )
    assert v.outcome is Outcome.LOCKUP
    assert v.reason == (
        "heartbeats still arrive but no page progress for 41s (samples still arrive, the last "
        "1s ago); 1 hung-task reports on the console; memalloc-deadlock: " + why
    )


@pytest.mark.parametrize(
    ("heartbeats", "heartbeat_silent_s", "silent_s", "text"),
    [
        (
            0,
            None,
            60.0,
            "no heartbeat ever arrived, no page progress for 60s, and no sample either",
        ),
        (9, 58.0, 60.0, "no page progress and no heartbeat for 60s, and no sample either"),
        (
            9,
            58.0,
            1.0,
            "no page progress and no heartbeat for 60s (samples still arrive, the last 1s ago)",
        ),
        (
            9,
            0.5,
            0.5,
            "heartbeats still arrive but no page progress for 60s (samples still arrive, the "
            "last 0s ago)",
        ),
        (
            0,
            None,
            53.0,
            "no heartbeat ever arrived, no page progress for 60s (samples went on for 7s, "
            "then stopped too)",
        ),
    ],
)
def test_the_reason_tells_silence_from_no_progress(
    heartbeats: int, heartbeat_silent_s: float | None, silent_s: float, text: str
) -> None:
    assert (
        watchdog.stall_text(
            silent_s=silent_s,
            stalled_s=60.0,
            heartbeats=heartbeats,
            heartbeat_silent_s=heartbeat_silent_s,
        )
        == text
    )


def test_the_arm_check_turns_a_wrong_arm_into_an_error() -> None:
    """Without a guest: the guest's read-back of its switches decides, never the request."""
    from stress.runrecord import Outcome, RunRecord
    from vm.run import record

    def run(memalloc: str) -> RunRecord:
        switches = {"nbd.memalloc": memalloc, "livepatch.swapnbd_nothrottle": "1"}
        rec = RunRecord(config={}, kernel={"in_guest": {"switches": switches}})
        rec.judge(Outcome.LOCKUP, "no progress")
        return rec

    wrong = run("Y")
    record.check_arm(wrong, "vanilla")
    assert wrong.outcome == "error" and wrong.outcome_unchecked == "lockup"
    assert wrong.outcome_reason is not None
    assert wrong.outcome_reason.startswith("the vanilla arm was not in effect in the guest: ")
    assert wrong.kernel["arm_check"]["ok"] is False
    right = run("N")
    record.check_arm(right, "vanilla")
    assert right.outcome == "lockup" and right.outcome_unchecked is None
    assert right.outcome_reason == "no progress"
    assert right.kernel["arm_check"]["ok"] is True


def test_the_arm_check_takes_the_users_word_for_an_own_kernel_without_switches() -> None:
    """A bzImage path that knows neither switch keeps its lockup, labelled as built; the
    same proof from a project kernel (route stock) is not vanilla."""
    from stress.runrecord import Outcome, RunRecord
    from vm.run import record

    def run(route: str) -> RunRecord:
        proof = {"switches": {}, "cmdline": [], "dmesg": []}
        rec = RunRecord(config={}, kernel={"route": route, "in_guest": proof})
        rec.judge(Outcome.LOCKUP, "no progress")
        record.check_arm(rec, "vanilla")
        return rec

    own = run("bzimage")
    assert own.outcome == "lockup" and own.outcome_unchecked is None
    assert own.kernel["arm_check"] == {
        "ok": True,
        "reason": "vanilla as built: this kernel has neither switch, so the arm is the "
        "user's word (--arm vanilla), not read back",
    }
    stock = run("stock")
    assert stock.outcome == "error" and stock.outcome_unchecked == "lockup"


def test_the_watch_state_keeps_the_most_corrupt_pages_a_heartbeat_reported() -> None:
    st = watchdog.WatchState(started=0.0, last_activity=0.0)
    for t, corrupt in ((1.0, 0), (2.0, 2), (3.0, 1)):
        st.observe(
            {"type": "heartbeat", "pages_done": int(t), "corrupt_pages": corrupt},
            t,
            stream="events",
        )
    assert st.max_corrupt == 2 and st.last_heartbeat_at == 3.0


def test_the_footprint_is_the_tools_locked_memory_in_the_stress_phase() -> None:
    st = watchdog.WatchState(started=0.0, last_activity=0.0)
    mib = 1 << 20

    def sample(t: float, locked: int) -> None:
        meminfo = {"Mlocked": locked * mib, "Unevictable": locked * mib, "MemTotal": 92 * mib}
        st.observe({"type": "sample", "meminfo": meminfo}, t, stream="samples")

    sample(1.0, 9)  # the collector alone, before the stress phase: not counted
    assert st.footprint() is None
    st.observe({"type": "phase", "phase": "stress"}, 2.0, stream="events")
    sample(3.0, 13)  # swapstress has not locked itself yet
    sample(4.0, 22)
    sample(5.0, 21)
    assert st.footprint() == {
        "mlocked_bytes": 22 * mib,
        "mlocked_bytes_at_start": 13 * mib,
        "unevictable_bytes_at_start": 13 * mib,
        "mem_total_bytes": 92 * mib,
        "mem_free_bytes": None,
    }
