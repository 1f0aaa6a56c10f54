"""The kernel's own evidence, parsed from a real deadlocked guest's console.

The fixture is the console of ``swapnbd run --arm vanilla`` on Debian's 6.1.192 cloud
kernel (2026-12-06): the watch loop pressed SysRq w and m at 44 s, then w, l and t at 54 s.
"""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

import pytest

from vm.run import evidence

DATA = Path(__file__).parent / "data" / "sysrq"
VANILLA_61 = gzip.decompress((DATA / "6.1.192-vanilla.console.gz").read_bytes()).decode()


@pytest.fixture(scope="module")
def looks() -> list[evidence.Snapshot]:
    return evidence.snapshots(VANILLA_61)


def test_one_snapshot_per_sysrq_w_with_the_dumps_that_follow(
    looks: list[evidence.Snapshot],
) -> None:
    assert [s.dumps for s in looks] == [
        ["Show Blocked State", "Show Memory"],
        ["Show Blocked State", "Show backtrace of all active CPUs", "Show State"],
    ]


def test_sysrq_m_gives_zones_against_their_watermarks(looks: list[evidence.Snapshot]) -> None:
    memory = looks[0].memory
    assert memory is not None
    assert memory.zones == [
        evidence.Zone(node=0, zone="DMA", free_kb=2276, min_kb=2280, low_kb=2336, high_kb=2392),
        evidence.Zone(node=0, zone="DMA32", free_kb=3228, min_kb=3260, low_kb=3560, high_kb=3860),
    ]
    assert memory.below("min") == [
        "DMA free 2276 kB < min 2280 kB",
        "DMA32 free 3228 kB < min 3260 kB",
    ]
    assert (memory.writeback_pages, memory.unevictable_pages) == (447, 7032)
    assert (memory.swap_used_kb, memory.total_swap_kb, memory.reserved_pages) == (
        655356 - 637436,
        655356,
        8999,
    )
    assert looks[1].memory is None


def test_stacks_keep_reliable_frames_innermost_first(looks: list[evidence.Snapshot]) -> None:
    kswapd = next(t for t in looks[0].tasks if t.comm == "kswapd0")
    assert (kswapd.pid, kswapd.state, kswapd.source) == (42, "D", "w")
    assert kswapd.frames[:4] == ("__schedule", "schedule", "io_schedule", "rq_qos_wait")
    assert "rwb_trace_step" not in kswapd.frames  # a "? " frame: unreliable, left out
    assert kswapd.frames[kswapd.frames.index("__swap_writepage") + 1] == "pageout"
    assert kswapd.frames[-1] == "ret_from_fork"


def test_the_nbd_sender_waits_for_memory_in_both_looks(looks: list[evidence.Snapshot]) -> None:
    first = evidence.senders_waiting_for_memory(looks[0].tasks)
    assert [(t.comm, t.pid, t.state, t.workqueue) for t in first] == [
        ("kworker/0:2H", 152, "D", "kblockd blk_mq_run_work_fn")
    ]
    frames = first[0].frames
    assert frames.index("__alloc_pages_slowpath.constprop.0") < frames.index("tcp_sendmsg")
    assert frames.index("tcp_sendmsg") < frames.index("nbd_send_cmd")
    # In the second look the sender is running, reclaiming inside its own allocation:
    # SysRq-l shows it on CPU 0, and SysRq-t with unreliable ("?") frames only.
    second = evidence.senders_waiting_for_memory(looks[1].tasks)
    assert [(t.comm, t.pid, t.source, t.reliable) for t in second] == [
        ("kworker/0:2H", 152, "l", True),
        ("kworker/0:2H", 152, "t", False),
    ]
    assert "shrink_folio_list" in second[0].frames


def test_the_signature_is_the_2012_deadlock_in_both_looks(
    looks: list[evidence.Snapshot],
) -> None:
    sigs = [evidence.signature(s) for s in looks]
    assert [sig for sig, _ in sigs] == ["memalloc-deadlock", "memalloc-deadlock"]
    assert sigs[0][1] == (
        "the nbd sender kworker/0:2H waits for memory in __alloc_pages_slowpath while "
        "12 task(s) (jbd2/vda-8, kswapd0, python3) wait on swap writeback"
    )


def test_a_server_the_host_saw_stopped_outranks_the_stacks(
    looks: list[evidence.Snapshot],
) -> None:
    why = "is stopped (pid 4242, state T): it reads nothing"
    assert evidence.signature(looks[0], {"unresponsive": why, "definitive": True}) == (
        "server-unresponsive",
        f"the NBD server {why}",
    )
    assert evidence.signature(looks[0], None)[0] == "memalloc-deadlock"


def test_unread_bytes_do_not_outrank_the_deadlock_stacks(
    looks: list[evidence.Snapshot],
) -> None:
    """Seen under a loaded host: the SCHED_IDLE server held 2,920 unread bytes while the
    guest's sender waited for memory. The stacks decide; without them, the server does."""
    slow = {"unresponsive": "is not reading its socket (2920 bytes unread for 1s)"}
    assert evidence.signature(looks[0], {**slow, "definitive": False})[0] == "memalloc-deadlock"
    assert evidence.signature(evidence.Snapshot(), {**slow, "definitive": False}) == (
        "server-unresponsive",
        "the NBD server is not reading its socket (2920 bytes unread for 1s)",
    )


# A throttled reclaimer, in the kernel's format (kernel-notes.md §9: what the patched arm
# shows instead). Written by hand from mm/vmscan.c's call chain, not captured.
THROTTLED = """\
[   83.100000] sysrq: Show Blocked State
[   83.100100] task:python3         state:D stack:0     pid:201   ppid:142    flags:0x00004002
[   83.100200] Call Trace:
[   83.100300]  <TASK>
[   83.100400]  __schedule+0x34d/0xa00
[   83.100500]  schedule+0x5a/0xd0
[   83.100600]  throttle_direct_reclaim+0x1f5/0x2a0
[   83.100700]  try_to_free_pages+0xbe/0x210
[   83.100800]  __alloc_pages_slowpath.constprop.0+0x338/0xe70
[   83.100900]  </TASK>
"""


def test_throttled_reclaimers_without_a_deadlock_stack() -> None:
    (snap,) = evidence.snapshots(THROTTLED)
    assert evidence.signature(snap) == (
        "throttled",
        "1 reclaimer(s) (python3) asleep in throttle_direct_reclaim",
    )


def test_nothing_printed_is_unknown_and_says_so() -> None:
    assert evidence.snapshots("") == []
    assert evidence.signature(evidence.Snapshot()) == (
        "unknown",
        "the kernel printed no task stacks",
    )


def test_hung_task_reports_are_stacks_too() -> None:
    text = (
        "[  246.120000] INFO: task kswapd0:35 blocked for more than 30 seconds.\n"
        "[  246.120100]       Not tainted 6.1.0-57-cloud-amd64 #1 Debian 6.1.192-3\n"
        '[  246.120200] "echo 0 > /proc/sys/kernel/hung_task_timeout_secs" disables this.\n'
        "[  246.120300] task:kswapd0         state:D stack:0     pid:35    ppid:2\n"
        "[  246.120400] Call Trace:\n"
        "[  246.120500]  <TASK>\n"
        "[  246.120600]  mempool_alloc+0x100/0x180\n"
        "[  246.120700]  </TASK>\n"
    )
    (snap,) = evidence.snapshots(text)
    assert [(t.comm, t.pid, t.frames) for t in snap.tasks] == [("kswapd0", 35, ("mempool_alloc",))]


def test_blocked_tasks_put_the_sender_first_and_drop_idle_ones(
    looks: list[evidence.Snapshot],
) -> None:
    tasks = evidence.blocked_tasks(looks)
    assert (tasks[0]["comm"], tasks[0]["state"], tasks[0]["source"]) == ("kworker/0:2H", "D", "w")
    comms = {t["comm"] for t in tasks}
    assert {"kswapd0", "jbd2/vda-8", "kworker/u5:0"} <= comms
    assert "swapper/1" not in comms  # the idle CPU's backtrace says nothing
    assert all(t["state"] == "D" or t["source"] == "l" for t in tasks[1:])


# The same run on a loaded host (the CI suite's guest beside it): the sender was running,
# in reclaim inside its own allocation, when each look came; only SysRq-l caught it, with
# the keyboard interrupt's frames on top of its own.
LOADED = gzip.decompress((DATA / "6.1.192-vanilla-loaded.console.gz").read_bytes()).decode()


def test_a_running_sender_is_found_by_sysrq_l_without_the_interrupts_frames() -> None:
    looks = evidence.snapshots(LOADED)
    # The first look pressed w and m only: w lists blocked tasks, not the running sender
    # (why the watch loop's first look now presses l too).
    assert [evidence.signature(s)[0] for s in looks] == ["unknown", "memalloc-deadlock"]
    senders = evidence.senders_waiting_for_memory(looks[1].tasks)
    assert [(t.comm, t.pid, t.source) for t in senders] == [
        ("kworker/1:0H", 23, "l"),
        ("kworker/1:0H", 23, "t"),
    ]
    sender = senders[0]
    assert sender.frames[:3] == ("asm_common_interrupt", "shrink_folio_list", "shrink_lruvec")
    assert "sysrq_filter" not in sender.frames  # inside <IRQ>: the keyboard's, not the task's
    tasks = evidence.blocked_tasks(looks)
    assert tasks[0]["comm"] == "kworker/1:0H" and "nbd_send_cmd" in tasks[0]["frames"]


# 6.12.118, the vanilla arm from a fresh clone (2026-12-06): the task lines carry tgid, and
# the kernel printed every frame of a sleeping task as unreliable ("? ").
VANILLA_612 = gzip.decompress((DATA / "6.12.118-vanilla.console.gz").read_bytes()).decode()


def test_612_stacks_printed_all_unreliable_are_kept_and_marked() -> None:
    looks = evidence.snapshots(VANILLA_612)
    assert len(looks) == 2
    sender = next(t for t in looks[0].tasks if t.comm == "kworker/0:1H")
    assert (sender.pid, sender.state, sender.source, sender.reliable) == (134, "D", "w", False)
    assert sender.frames[:3] == ("__schedule", "psi_group_change", "schedule")
    assert "__alloc_pages_noprof" in sender.frames and "nbd_send_cmd" in sender.frames
    assert [evidence.signature(s)[0] for s in looks] == ["memalloc-deadlock"] * 2
    # A later look printed the same stack reliably: blocked_tasks keeps that one.
    (record,) = [t for t in evidence.blocked_tasks(looks) if t["comm"] == "kworker/0:1H"]
    assert (record["source"], "reliable" in record) == ("t", False)
    assert record["frames"][:4] == [
        "__schedule",
        "schedule",
        "schedule_timeout",
        "__alloc_pages_slowpath.constprop.0",
    ]


# 7.2.13 (sid), the vanilla arm in the seed matrix (2026-12-07), its first two looks: blk-mq
# issues from the faulting worker itself, so there is no kblockd sender. A python3 worker
# sends its own swap-in and reclaims inside tcp_sendmsg; kswapd0 (swap_writeout, new in
# 7.x) and 15 other workers sleep on a mutex in nbd_queue_rq behind it. The classifier
# first read it as "unknown": kswapd0 has nbd_queue_rq, which counted as sending.
VANILLA_72 = gzip.decompress((DATA / "7.2.13-vanilla.console.gz").read_bytes()).decode()


def test_72_the_worker_that_sends_reclaims_while_the_rest_queue_behind_it() -> None:
    looks = evidence.snapshots(VANILLA_72)
    assert len(looks) == 2
    for look in looks:
        (sender, *_) = evidence.senders_waiting_for_memory(look.tasks)
        assert sender.comm == "python3" and sender.has({"swap_read_folio", "tcp_sendmsg"})
        assert {t.comm for t in evidence.writeback_waiters(look.tasks)} == {
            "jbd2/vda-8",
            "kswapd0",
            "python3",
        }
        kswapd = next(t for t in look.tasks if t.comm == "kswapd0")
        assert kswapd.has({"swap_writeout", "nbd_queue_rq", "__mutex_lock"})
        assert evidence.signature(look) == (
            "memalloc-deadlock",
            "the nbd sender python3 waits for memory in __alloc_pages_slowpath while 4 "
            "task(s) (jbd2/vda-8, kswapd0, python3) wait on swap writeback and 15 task(s) "
            "(python3) wait behind it on a mutex in nbd_queue_rq",
        )
    assert looks[0].memory is not None
    assert looks[0].memory.below("min")[:2] == [
        "DMA free 1200 kB < min 2308 kB",
        "DMA32 free 2648 kB < min 3848 kB",
    ]


def test_a_sender_alone_or_a_waiter_alone_is_no_deadlock() -> None:
    """Either half of the 7.2 picture without the other says nothing: the sender may get
    its memory, and a queue on the socket mutex drains once the send completes."""
    (look, _) = evidence.snapshots(VANILLA_72)
    senders = evidence.senders_waiting_for_memory(look.tasks)
    rest = [t for t in look.tasks if t not in senders]
    alone = dataclasses.replace(look, tasks=list(senders))
    assert evidence.signature(alone)[0] == "unknown"
    queued = dataclasses.replace(look, tasks=rest)
    assert evidence.signature(queued)[0] == "unknown"


def test_sysrq_m_of_a_kernel_without_numa_gives_its_zones() -> None:
    """The project's built 6.1 kernels have no CONFIG_NUMA: SysRq-m prints ``DMA32
    free:...`` without ``Node 0``. The console is the cross-check's compile-time revert
    (6.1-slab-revert, 2026-12-06), which froze before its collector sent a sample with
    swap-out in it; before this parse the run read as a stall before pressure."""
    console = gzip.decompress((DATA / "6.1.192-slab-revert.console.gz").read_bytes()).decode()
    memory = evidence.snapshots(console)[0].memory
    assert memory is not None
    assert memory.zones == [
        evidence.Zone(node=0, zone="DMA", free_kb=640, min_kb=2260, low_kb=2312, high_kb=2364),
        evidence.Zone(node=0, zone="DMA32", free_kb=3736, min_kb=4004, low_kb=4312, high_kb=4620),
    ]
    assert memory.swap_used_kb == 655356 - 648188
    assert memory.writeback_pages == 1649
    assert memory.below("min") == [
        "DMA free 640 kB < min 2260 kB",
        "DMA32 free 3736 kB < min 4004 kB",
    ]
