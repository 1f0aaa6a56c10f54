"""vm.run.experiment and vm.cli: run configuration, run.json, and the real guest end to end.

The ``vm``-marked tests boot the stock Debian 6.1 cloud kernel under TCG and swap
through a loopback NBD server; they take a few minutes each.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from nbdserver.backends.fault import FLIP_AT
from peers import servers
from vm import cli
from vm.campaign import report
from vm.run import experiment, qmp, record, watchdog
from vm.run.config import RunConfig, guest_config
from vm.run.cost import Cost, host_steal_ticks, task_runqueue_wait, task_wakeups, tree_usage
from vm.run.watchdog import JsonlTail

MIB = 1024 * 1024


# --- configuration --------------------------------------------------------------------


def test_defaults_pin_min_free_kbytes_by_the_kernel_formula(tmp_path: Path) -> None:
    cfg = RunConfig(out=tmp_path)
    assert cfg.pinned_min_free_kbytes == 1448  # isqrt(131072 kB * 16)
    assert RunConfig(out=tmp_path, memory_mib=2048).pinned_min_free_kbytes == 5792
    assert RunConfig(out=tmp_path, min_free_kbytes=9000).pinned_min_free_kbytes == 9000


@pytest.mark.parametrize(
    ("kw", "export_mib"),
    [
        ({}, 640),  # 5 x 128M
        ({"total_bytes": 1024 * MIB}, 1152),  # workload + RAM
        ({"total_bytes": None, "ratio": 8.0}, 1152),  # (8 + 1) x 128M
    ],
)
def test_export_is_at_least_five_times_ram(kw: dict[str, Any], export_mib: int) -> None:
    cfg = RunConfig(out=Path("x"), **kw)
    cfg.validate()
    assert cfg.export_bytes == export_mib * MIB
    assert cfg.export_bytes >= 5 * cfg.memory_mib * MIB


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"memory_mib": 32}, "at least 64M"),
        ({"total_bytes": None}, "exactly one of --total and --ratio"),
        ({"ratio": 2.0}, "exactly one of --total and --ratio"),
        ({"workers": 0}, "--workers"),
        ({"loops": 0}, "--loops"),
        ({"swap": "zram"}, "--swap"),
        ({"server": "qemu-nbd"}, "--server"),
        ({"lockup_after_s": 0.0}, "--lockup-after"),
        ({"min_free_kbytes": 5}, "--min-free-kbytes"),
        ({"export_factor": 4}, "at least 5x"),
        ({"arm": "mainline"}, "--arm must be one of patched, vanilla"),
        ({"allocator": "slob"}, "--allocator must be one of slub, slab"),
        ({"swap_bytes": 4096}, "--swap-size must be at least 160K"),
        ({"server": "nbdkit", "server_fault": "corrupt-read-after=1"}, "needs nbd-serve"),
    ],
)
def test_invalid_config_is_refused(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RunConfig(out=Path("x"), **kw).validate()


def test_ratio_goes_to_swapstress(tmp_path: Path) -> None:
    cfg = RunConfig(out=tmp_path, total_bytes=None, ratio=4.0, loops=2, workers=3)
    assert cfg.swapstress_args() == [
        "--workers",
        "3",
        "--ratio",
        "4.0",
        "--loops",
        "2",
        "--mlock",
        "--force",
    ]


def parse(*argv: str) -> RunConfig:
    args = cli.build_parser().parse_args(["run", *argv])
    return cli.config_from_args(args)


def test_cli_flags_override_the_preset(tmp_path: Path) -> None:
    cfg = parse(
        "--memory",
        "256M",
        "--cpus",
        "1",
        "--workers",
        "4",
        "--total",
        "1G",
        "--loops",
        "3",
        "--kernel",
        "6.12",
        "--swap",
        "file",
        "--server",
        "nbd-server",
        "--out",
        str(tmp_path),
        "--accel",
        "tcg",
        "--lockup-after",
        "45",
        "--timeout",
        "600",
        "--nbd-timeout",
        "30",
        "--nbd-connections",
        "2",
        "--resident-client",
        "--min-free-kbytes",
        "4096",
    )
    assert (cfg.memory_mib, cfg.cpus, cfg.workers, cfg.total_bytes, cfg.loops) == (
        256,
        1,
        4,
        1024 * MIB,
        3,
    )
    assert (cfg.kernel, cfg.swap, cfg.server, cfg.out, cfg.accel) == (
        "6.12",
        "file",
        "nbd-server",
        tmp_path,
        "tcg",
    )
    assert (cfg.lockup_after_s, cfg.timeout_s, cfg.nbd_timeout, cfg.nbd_connections) == (
        45.0,
        600.0,
        30,
        2,
    )
    assert cfg.resident_client and cfg.min_free_kbytes == 4096


def test_arm_allocator_and_a_built_kernel_reach_the_config(tmp_path: Path) -> None:
    cfg = parse(
        "--kernel", "6.1-build", "--arm", "vanilla", "--allocator", "slab",
        "--swap-size", "64M", "--server", "nbdkit", "--out", str(tmp_path),
    )  # fmt: skip
    assert (cfg.kernel, cfg.arm, cfg.allocator, cfg.swap_bytes) == (
        "6.1-build",
        "vanilla",
        "slab",
        64 * MIB,
    )
    assert parse("--server", "nbdkit").arm == "patched"
    assert parse("--server", "nbdkit").allocator is None
    assert parse("--kernel", "/boot/bzImage", "--server", "nbdkit").kernel == "/boot/bzImage"
    gcfg = guest_config(cfg, servers.RunningServer(
        kind="nbdkit", port=1, export_name="x", size_bytes=4096, pid=0, argv=[],
        backing="memory", workdir=tmp_path,
    ))  # fmt: skip
    assert gcfg["swap"] == {"mode": "device", "size_bytes": 64 * MIB}
    assert gcfg["fault"] == {"panic_after_s": None}


def test_run_json_skeleton_records_arm_cost_and_files(tmp_path: Path) -> None:
    cfg = RunConfig(out=tmp_path, arm="vanilla", allocator="slub")
    run = experiment.new_run(cfg).to_json()
    assert run["kernel"] == {"name": "6.1", "flavour": "cloud", "arm": "vanilla",
                             "allocator": "slub"}  # fmt: skip
    assert run["cost"] == {"server": None, "qemu": None, "host_steal_s": None}
    assert run["files"] == experiment.OUTPUT_FILES
    assert run["schema"] == 1 and run["outcome"] is None


def test_tree_usage_counts_reaped_children(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    # A shell that runs a CPU-bound child to completion, then waits: the child's time must
    # still count once it has been reaped (it moves to the parent's children_* times).
    script = "import time\nt=time.process_time()\nwhile time.process_time()-t<0.3: pass"
    proc = subprocess.Popen(
        ["/bin/sh", "-c", f"{sys.executable} -c '{script}'; sleep 30"], start_new_session=True
    )
    try:
        import time

        deadline = time.monotonic() + 30
        usage = tree_usage(proc.pid)
        while usage is not None and usage[0] + usage[1] < 0.3 and time.monotonic() < deadline:
            time.sleep(0.1)
            usage = tree_usage(proc.pid)
        assert usage is not None
        assert usage[0] + usage[1] >= 0.3
        assert usage[2] > 0
        assert usage[3] >= 1  # the shell slept in wait() for its child at least once
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
    assert tree_usage(proc.pid) is None


def test_task_wakeups_counts_every_thread() -> None:
    import os
    import threading
    import time

    def nap() -> None:
        for _ in range(200):
            time.sleep(0.0005)

    done = threading.Event()
    # The main thread barely sleeps; the other thread sleeps 200 times and stays alive
    # while it is counted (a thread that exited would not be).
    t = threading.Thread(target=lambda: (nap(), done.wait(30)))
    before = task_wakeups(os.getpid())
    t.start()
    try:
        deadline = time.monotonic() + 30
        while task_wakeups(os.getpid()) - before < 200:
            assert time.monotonic() < deadline, "the napping thread's sleeps were not counted"
            time.sleep(0.05)
    finally:
        done.set()
        t.join()
    assert task_wakeups(2**22 + 12345) == 0  # no such process: nothing


def test_task_runqueue_wait_sees_two_spinners_share_one_cpu() -> None:
    """Two processes spinning on the same CPU each wait on the run queue about half the
    time; 0.1 s of the 1 s is a floor a loaded machine only raises."""
    cpu = min(os.sched_getaffinity(0))
    spin = "import time\nend = time.monotonic() + 1.0\nwhile time.monotonic() < end: pass\n"
    procs = [
        subprocess.Popen(["taskset", "-c", str(cpu), sys.executable, "-c", spin]) for _ in range(2)
    ]
    try:
        time.sleep(0.8)
        waited = [task_runqueue_wait(p.pid) for p in procs]
    finally:
        for p in procs:
            p.wait(timeout=30)
    assert all(w >= 100_000_000 for w in waited), waited
    assert task_runqueue_wait(2**22 + 12345) == 0  # no such process: nothing


def test_host_steal_is_read_from_proc_stat() -> None:
    ticks = host_steal_ticks()
    assert ticks is not None and ticks >= 0
    cost = Cost(steal_start=0, steal_end=os_clk_tck())
    assert cost.as_dict()["host_steal_s"] == 1.0


def os_clk_tck() -> int:
    import os

    return os.sysconf("SC_CLK_TCK")


def test_presets() -> None:
    quick = parse("--server", "nbdkit")
    # The mission's shape: 8 x vCPUs workers at 4x guest RAM (issue 9 §2).
    assert (quick.memory_mib, quick.cpus, quick.workers, quick.total_bytes, quick.ratio) == (
        128,
        2,
        8 * 2,
        None,
        4.0,
    )
    assert quick.workload_bytes == 512 * MIB
    assert str(quick.out).startswith("results/run-")
    seed = parse("--preset", "seed", "--server", "nbdkit")
    assert (seed.memory_mib, seed.ratio, seed.total_bytes) == (2048, 4.0, None)
    assert seed.workers == 8 * seed.cpus
    ratio = parse("--preset", "quick", "--ratio", "2", "--server", "nbdkit")
    assert (ratio.total_bytes, ratio.ratio) == (None, 2.0)


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--memory", "12Q"],
        ["run", "--total", "1G", "--ratio", "4"],
        ["run", "--workers", "0"],
        ["run", "--memory", "1000000"],  # not whole MiB
        ["run", "--swap", "zram"],
        ["frobnicate"],
        [],
    ],
)
def test_cli_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("outcome", "plain", "bisect"),
    [
        ("completed", 0, 0),
        ("lockup", 1, 1),
        ("corruption", 1, 1),
        ("oom", 1, 1),
        ("guest-crash", 1, 1),
        ("error", 1, 125),  # git bisect run: this commit cannot be tested, skip it
    ],
)
def test_exit_codes_plain_and_for_git_bisect(outcome: str, plain: int, bisect: int) -> None:
    run = {"outcome": outcome}
    assert (cli.exit_code(run), cli.exit_code(run, bisect=True)) == (plain, bisect)
    stopped = {"outcome": "error", "interrupted": True, "interrupted_by": "SIGTERM"}
    assert cli.exit_code(stopped, bisect=True) == 143  # > 127: git bisect run aborts


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--bisect", "--memory", "12Q"],  # argparse's own error
        ["run", "--bisect", "--total", "1G", "--ratio", "4"],  # the config's
    ],
)
def test_a_usage_error_aborts_a_bisect(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # 2 would mark the commit bad; a wrong command line is no commit's fault.
    assert cli.main(argv) == cli.BISECT_ABORT == 255
    assert "error" in capsys.readouterr().err


def test_summary_lines_show_the_seed_figures() -> None:
    run = {
        "outcome": "completed",
        "outcome_reason": "ok",
        "kernel": {"release": "6.1.0-47-cloud-amd64"},
        "accel": {"used": "tcg"},
        "swapstress": {
            "sys_s": 116.5,
            "user_sys_s": 120.25,
            "elapsed_s": 189.0,
            "corrupt_pages": 0,
        },
        "vmstat_delta": {"pswpin": 529, "pswpout": 379, "pgscan_direct_throttle": 8},
        "config": {"out": "results/x"},
    }
    text = "\n".join(cli.summary_lines(run))
    for expected in (
        "completed",
        "Sys:",
        "116.50 s",
        "User+Sys:",
        "120.25 s",
        "Elapsed:",
        "189.00 s",
        "529 / 379",
        "pgscan_direct_throttle: 8",
        "results/x",
        "tcg",
    ):
        assert expected in text


def test_vmstat_summary_keeps_pgscan_direct_throttle() -> None:
    def sample(seq: int, out: int, throttle: int) -> dict[str, Any]:
        vm = {"pswpin": seq, "pswpout": out, "pgscan_direct_throttle": throttle}
        return {
            "type": "sample",
            "seq": seq,
            "t_mono": float(seq),
            "t_wall": 1e9 + seq,
            "vmstat": vm,
            "meminfo": {},
            "psi": None,
            "swaps": [],
            "netstat": None,
        }

    summary = record.vmstat_summary([sample(0, 0, 0), sample(1, 50, 0), sample(2, 90, 0)])
    assert summary["vmstat_delta"]["pswpout"] == 90
    assert summary["vmstat_delta"]["pswpin"] == 2
    assert summary["vmstat_delta"]["pgscan_direct_throttle"] == 0


def test_failure_before_boot_is_recorded_in_run_json(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = RunConfig(
        out=out, kernel="0.0-no-such-kernel", server="nbdkit", cache_dir=tmp_path / "cache"
    )
    run = experiment.run_experiment(cfg)
    assert run["outcome"] == "error"
    assert "0.0-no-such-kernel" in run["outcome_reason"]
    on_disk = json.loads((out / "run.json").read_text())
    assert on_disk["outcome"] == "error"
    assert on_disk["config"]["kernel"] == "0.0-no-such-kernel"
    for name in ("vmstat.jsonl", "console.log", "events.jsonl", "server-stats.jsonl"):
        assert (out / name).exists()


# --- the real guest (minutes each) ------------------------------------------------------


@pytest.fixture(scope="session")
def guest_cache() -> Path:
    """Build (or find cached) the 6.1 cloud guest image once per session."""
    from vm.image import image

    cache = image.default_cache_dir()
    image.build_guest("6.1", "cloud", cache, lambda line: print(line, flush=True))
    return cache


def e2e_config(out: Path, cache: Path, **kw: Any) -> RunConfig:
    base: dict[str, Any] = {
        "out": out,
        "memory_mib": 128,
        "cpus": 2,
        "workers": 8,
        "total_bytes": 128 * MIB,
        "loops": 1,
        "kernel": "6.1",
        "server": "nbd-serve",
        "accel": "tcg",
        "lockup_after_s": 120.0,
        "timeout_s": 600.0,
        "cache_dir": cache,
    }
    base.update(kw)
    return RunConfig(**base)


def samples_in(path: Path) -> list[dict[str, Any]]:
    return [r for r in JsonlTail(path).read_new() if r.get("type") == "sample"]


def require_nbd_serve() -> None:
    if not servers.nbd_serve_available():
        pytest.fail("nbd-serve is not importable (nbdserver/cli.py missing): pip install -e .")


@pytest.mark.vm
def test_guest_swaps_through_nbd_serve_and_completes(
    tmp_path: Path, guest_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_nbd_serve()
    out = tmp_path / "run"
    # Through the CLI, as the README's main command runs it. --timeout is a safety net
    # (hangs are caught by --lockup-after): a loaded machine needs more than 10 minutes.
    rc = cli.main([
        "run", "--memory", "128M", "--cpus", "2", "--workers", "8", "--total", "128M",
        "--loops", "1", "--server", "nbd-serve", "--accel", "tcg", "--lockup-after", "120",
        "--timeout", "1800", "--cache", str(guest_cache), "--out", str(out),
    ])  # fmt: skip
    summary = capsys.readouterr().out
    on_disk = json.loads((out / "run.json").read_text())
    assert on_disk["outcome"] == "completed", on_disk.get("outcome_reason")
    assert rc == cli.EXIT_OK
    assert "outcome:                completed" in summary
    assert f"results:                {out}" in summary
    delta = on_disk["vmstat_delta"]
    assert delta["pswpout"] > 0
    assert delta["pswpin"] > 0
    assert "pgscan_direct_throttle" in delta
    assert on_disk["swapstress"]["corrupt_pages"] == 0
    assert on_disk["swapstress"]["pages_verified"] > 0
    assert len(samples_in(out / "vmstat.jsonl")) >= 3
    assert on_disk["kernel"]["guest_release"].startswith("6.1.")
    assert on_disk["guest"]["settings"]["vm.min_free_kbytes"] == "1448"
    assert "[never]" in on_disk["guest"]["settings"]["transparent_hugepage.enabled"]
    stats = on_disk["server"]["stats"]
    assert stats is not None
    # The swap path's server flags (issue 13): no busy-poll, SCHED_IDLE (in effect, says
    # the server's log), one process per connection.
    argv = " ".join(on_disk["server"]["argv"])
    assert " --poll-us 0 --sched-policy idle --workers 1 " in argv
    server_log = Path(on_disk["server"]["log"]).read_text()
    assert (
        "scheduling policy idle: runs when a CPU would otherwise idle, or on a minimal share"
        in server_log
    )
    assert on_disk["cost"]["server"]["runqueue_wait_s"] > 0
    assert stats["totals"]["requests_write"] > 0
    assert stats["totals"]["bytes_write"] > 0
    assert stats["totals"]["internal_errors"] == 0  # a bug in the server is never quiet
    # The guest's own count of the swap device (/proc/diskstats of nbd0): every page
    # swapped in or out is 8 sectors read or written (vmstat counts a page when it is
    # submitted, diskstats when it completes: within 1%), and every request it counted
    # reached the server.
    dev = on_disk["swap_device"]
    assert dev["name"] == "nbd0"
    for sectors, pages in (
        (dev["write_sectors"], delta["pswpout"]),
        (dev["read_sectors"], delta["pswpin"]),
    ):
        assert abs(sectors - 8 * pages) <= 8 * pages // 100, (sectors, pages)
    assert 0 < dev["writes"] <= stats["totals"]["requests_write"]
    assert 0 < dev["reads"] <= stats["totals"]["requests_read"]
    figures = report.swap_device_metrics(dev)
    assert figures["swap_write_await_ms"] > 0
    assert figures["swap_queue_depth"] > 0
    assert (out / "console.log").stat().st_size > 0
    # The arm, as recorded and as read back inside the guest (stock kernel: patched).
    kernel = on_disk["kernel"]
    assert (kernel["arm"], kernel["allocator"]) == ("patched", None)
    proof = kernel["in_guest"]
    assert set(proof) == {"switches", "cmdline", "dmesg", "allocator"}
    assert proof["allocator"] == "slub"  # the stock kernel's, read from /sys/kernel/slab
    assert kernel["arm_check"] == {"ok": True, "reason": "patched in effect: nbd memalloc Y"}
    assert set(proof["switches"]) == {
        "nbd.memalloc",
        "pfmemalloc_throttle",
        "livepatch.swapnbd_nothrottle",
    }
    assert proof["cmdline"] == [
        w
        for w in kernel["cmdline_extra"]
        if w.startswith(("nbd.memalloc=", "pfmemalloc_throttle="))
    ]
    # The cost of the run (issue 13): plausible, not exact.
    cost = on_disk["cost"]
    stress_s = on_disk["timings"]["stress_s"]
    qemu_s = on_disk["timings"]["qemu_s"]
    server_cpu = cost["server"]["user_s"] + cost["server"]["system_s"]
    assert 0.05 < server_cpu < qemu_s * 4  # it served >100 MiB, on at most a few cores
    assert cost["server"]["samples"] >= 3
    assert 20 * MIB < cost["server"]["peak_rss_bytes"] < 2048 * MIB
    # >100 MiB is at least 800 requests of 128 KiB, and the server sleeps between most.
    assert cost["server"]["wakeups"] > 100
    qemu_cpu = cost["qemu"]["user_s"] + cost["qemu"]["system_s"]
    assert stress_s / 4 < qemu_cpu < qemu_s * 4  # TCG burns CPU for every guest cycle
    assert cost["host_steal_s"] is None or cost["host_steal_s"] >= 0
    assert f"{cost['server']['wakeups']:,} wake-ups" in summary


@pytest.mark.vm
def test_a_server_that_stops_answering_mid_run_is_a_lockup_with_its_evidence(
    tmp_path: Path, guest_cache: Path
) -> None:
    """The 2012 lockup seen from outside: the NBD server sits idle, nothing comes back.

    The server is frozen (SIGSTOP), not killed: a killed server closes the socket, the
    kernel then fails swap-ins with EIO and whoever faults dies (seen here: PID 1 took a
    SIGSEGV, so the run was a guest-crash); a server that stops answering leaves every
    request pending with nbd timeout 0, exactly as a reclaim deadlock does.
    """
    require_nbd_serve()
    out = tmp_path / "run"
    seen: dict[str, Any] = {}

    def kill_when_swapping(rec: dict[str, Any], ctx: experiment.RunContext) -> None:
        if "killed_at_samples" in seen or rec.get("type") != "sample":
            return
        if int(rec.get("vmstat", {}).get("pswpout", 0)) > 2000:
            ctx.server.freeze()
            ctx.marks["server_killed"] = time.monotonic()
            seen["killed_at_samples"] = ctx.state.samples
            seen["pswpout"] = rec["vmstat"]["pswpout"]

    lockup_after, timeout = 40.0, 600.0
    cfg = e2e_config(
        out, guest_cache, total_bytes=192 * MIB, lockup_after_s=lockup_after, timeout_s=timeout
    )
    run = experiment.run_experiment(cfg, print, hook=kill_when_swapping)
    assert "killed_at_samples" in seen, "the guest never swapped, so the server was not frozen"
    assert run["outcome"] == "lockup", (run["outcome_reason"], run.get("guest_error"))
    # The host saw the server stopped at both looks: the verdict names it, at once.
    evidence = run["evidence"]
    assert run["ending"] == "confirmed"
    assert evidence["signature"] == "server-unresponsive", evidence.get("why")
    assert evidence["signatures"] == ["server-unresponsive", "server-unresponsive"]
    assert re.fullmatch(
        r"the NBD server is stopped \(pid \d+, state T\): it reads nothing", evidence["why"]
    ), evidence["why"]
    assert run["outcome_reason"].endswith("; server-unresponsive: " + evidence["why"])
    stalled = max(evidence["silent_s"], evidence["stalled_s"])
    assert cfg.effective_stall_after_s <= stalled < lockup_after
    assert f"for {stalled:.0f}s" in run["outcome_reason"]
    assert run["swapstress"] is None  # no result ever came back
    # Ended by the watchdog, well before the overall timeout.
    killed_at = run["timings"]["mark_server_killed_s"]
    assert killed_at > 0
    assert run["timings"]["qemu_s"] < killed_at + lockup_after + 60 < timeout / 2
    assert evidence["pressure"]["met"] is True
    assert cli.exit_code(run) == cli.EXIT_NOT_COMPLETED
    assert run["server"]["frozen"] is True
    assert run["server"]["exit_status"] == 0  # resumed by stop(), then a clean shutdown
    kept = samples_in(out / "vmstat.jsonl")
    assert len(kept) >= seen["killed_at_samples"] >= 1
    assert max(s["vmstat"]["pswpout"] for s in kept) >= seen["pswpout"]
    on_disk = json.loads((out / "run.json").read_text())
    assert on_disk["outcome"] == "lockup"


def freeze_qemu_on(attempts: set[int]) -> experiment.Hook:
    """A hook that SIGSTOPs QEMU as soon as it has opened its console file, at the given
    starts: seen from the host, a guest kernel hung while booting (no event, ever)."""

    def hook(rec: dict[str, Any], ctx: experiment.RunContext) -> None:
        if rec.get("type") == "qemu-started" and rec["attempt"] in attempts:
            console = ctx.cfg.out / experiment.OUTPUT_FILES["console"]
            deadline = time.monotonic() + 60
            while not console.exists():
                assert time.monotonic() < deadline, "QEMU never opened its console file"
                time.sleep(0.005)
            os.kill(ctx.qemu_pid, signal.SIGSTOP)

    return hook


@pytest.mark.vm
def test_a_guest_hung_while_booting_is_booted_once_more_and_the_run_goes_on(
    tmp_path: Path, guest_cache: Path
) -> None:
    require_nbd_serve()
    out = tmp_path / "run"
    lockup_after = 30.0
    cfg = e2e_config(out, guest_cache, total_bytes=64 * MIB, lockup_after_s=lockup_after)
    run = experiment.run_experiment(cfg, print, hook=freeze_qemu_on({1}))
    assert run["outcome"] == "completed", (run["outcome_reason"], run.get("guest_error"))
    assert run["ending"] == "qemu-exited"
    (retry,) = run["boot_retries"]
    assert retry["attempt"] == 1
    assert retry["how"] == "hung"
    assert retry["panic"] is None
    assert lockup_after <= retry["silent_s"] < lockup_after + 30
    assert retry["console"] == "console-boot1.log"
    first = (out / "console-boot1.log").read_text(errors="replace")
    assert retry["console_last_line"] == watchdog.console_last_line(first)
    assert "Linux version" in (out / "console.log").read_text()  # the second boot's
    assert run["swapstress"]["corrupt_pages"] == 0
    assert run["swapstress"]["pages_verified"] > 0
    assert run["vmstat_delta"]["pswpout"] > 0


def crash_kernel_on(attempts: set[int]) -> experiment.Hook:
    """A hook that crashes the guest kernel (Alt-SysRq-C through QMP) at the given starts,
    as soon as its keyboard is up and seconds before the guest reports its first phase:
    a real kernel panic while booting, as sid's 7.2 has under TCG."""

    def hook(rec: dict[str, Any], ctx: experiment.RunContext) -> None:
        if rec.get("type") != "qemu-started" or rec["attempt"] not in attempts:
            return
        argv = psutil.Process(ctx.qemu_pid).cmdline()
        qmp_path = Path(argv[argv.index("-qmp") + 1].removeprefix("unix:").split(",")[0])
        console = ctx.cfg.out / experiment.OUTPUT_FILES["console"]
        deadline = time.monotonic() + 120
        while "input: AT Translated Set 2 keyboard" not in (
            console.read_text(errors="replace") if console.exists() else ""
        ):
            assert time.monotonic() < deadline, "the guest's keyboard never came up"
            time.sleep(0.005)
        qmp.send_keys(qmp_path, [("alt", "sysrq", "c")])

    return hook


@pytest.mark.vm
def test_a_guest_kernel_that_crashes_while_booting_is_booted_again_and_the_run_goes_on(
    tmp_path: Path, guest_cache: Path
) -> None:
    require_nbd_serve()
    out = tmp_path / "run"
    cfg = e2e_config(out, guest_cache, total_bytes=64 * MIB, lockup_after_s=30.0)
    run = experiment.run_experiment(cfg, print, hook=crash_kernel_on({1, 2}))
    assert run["outcome"] == "completed", (run["outcome_reason"], run.get("guest_error"))
    first, second = run["boot_retries"]
    assert [first["attempt"], second["attempt"]] == [1, 2]
    for retry in (first, second):
        assert retry["how"] == "crashed"
        assert "Kernel panic - not syncing: sysrq triggered crash" in retry["panic"]
        n = retry["attempt"]
        assert retry["console"] == f"console-boot{n}.log"
        assert "sysrq: Trigger a crash" in (out / f"console-boot{n}.log").read_text()
    assert "sysrq: Trigger a crash" not in (out / "console.log").read_text()  # the third boot's
    assert run["swapstress"]["corrupt_pages"] == 0
    assert run["vmstat_delta"]["pswpout"] > 0


@pytest.mark.vm
def test_a_guest_kernel_that_crashes_on_every_boot_is_a_guest_crash_with_its_boots(
    tmp_path: Path, guest_cache: Path
) -> None:
    require_nbd_serve()
    out = tmp_path / "run"
    cfg = e2e_config(out, guest_cache, lockup_after_s=30.0)
    run = experiment.run_experiment(cfg, print, hook=crash_kernel_on({1, 2, 3}))
    assert run["outcome"] == "guest-crash"
    assert run["outcome_reason"].startswith("kernel panic: "), run["outcome_reason"]
    assert "sysrq triggered crash" in run["outcome_reason"]
    assert [(r["attempt"], r["how"]) for r in run["boot_retries"]] == [
        (1, "crashed"),
        (2, "crashed"),
    ]
    assert run["swapstress"] is None
    assert cli.exit_code(run) == cli.EXIT_NOT_COMPLETED


@pytest.mark.vm
def test_a_guest_that_hangs_on_every_boot_is_an_error_naming_the_boot(
    tmp_path: Path, guest_cache: Path
) -> None:
    require_nbd_serve()
    out = tmp_path / "run"
    cfg = e2e_config(out, guest_cache, lockup_after_s=20.0)
    run = experiment.run_experiment(cfg, print, hook=freeze_qemu_on({1, 2, 3}))
    assert run["outcome"] == "error"
    assert run["outcome_reason"].startswith(
        "the guest hung while booting, before it reported anything (no heartbeat and no"
    ), run["outcome_reason"]
    last = watchdog.console_last_line((out / "console.log").read_text(errors="replace"))
    assert run["outcome_reason"].endswith(f"its console ends: {last!r}")
    assert run["evidence"]["phase"] == "boot"
    assert [(r["attempt"], r["how"]) for r in run["boot_retries"]] == [(1, "hung"), (2, "hung")]
    assert run["swapstress"] is None
    assert cli.exit_code(run) == cli.EXIT_NOT_COMPLETED


@pytest.mark.vm
def test_a_guest_that_stops_before_memory_pressure_is_an_error_not_a_lockup(
    tmp_path: Path, guest_cache: Path
) -> None:
    """The cross-check's false lockups (2026-11-29): stalled in the stress phase with
    pswpout 0. QEMU is frozen as soon as the stress phase has begun and the host holds a
    sample, before any swap-out. (Freezing at the phase record alone raced the collector:
    a guest frozen before its first sample reached the host has pswpout unknown, not 0.)"""
    require_nbd_serve()
    out = tmp_path / "run"
    frozen = False

    def freeze_at_stress(rec: dict[str, Any], ctx: experiment.RunContext) -> None:
        nonlocal frozen
        if not frozen and ctx.state.phase == "stress" and ctx.state.last_sample is not None:
            frozen = True
            os.kill(ctx.qemu_pid, signal.SIGSTOP)

    cfg = e2e_config(out, guest_cache, total_bytes=192 * MIB, lockup_after_s=30.0)
    run = experiment.run_experiment(cfg, print, hook=freeze_at_stress)
    assert run["outcome"] == "error", run["outcome_reason"]
    evidence = run["evidence"]
    assert evidence["pressure"] == {
        "pswpout": 0,
        "swap_used_kb": None,
        "below_high": None,
        "met": False,
    }
    assert run["outcome_reason"].startswith(
        "the guest stalled before memory pressure (pswpout 0, zone watermarks not seen "
        "(no SysRq-m report)): no "
    ), run["outcome_reason"]
    assert run["outcome_reason"].endswith("; not the experiment's lockup")
    # A frozen QEMU answers no key: each look says so, and nothing was parsed.
    assert [look["keys"] for look in evidence["looks"]] == ["wml", "wlt"]
    assert all(look["error"] for look in evidence["looks"]), evidence["looks"]
    assert evidence["signature"] == "unknown"
    assert cli.exit_code(run) == cli.EXIT_NOT_COMPLETED


FAULT_LINE = re.compile(
    r"fault: corrupted READ #\d+: .* export offset (\d+) .*page header ([0-9a-f]{64})"
)


@pytest.mark.vm
def test_a_corrupted_swap_in_is_corruption_naming_the_worker_and_page(
    tmp_path: Path, guest_cache: Path
) -> None:
    from stress.pattern import HEADER, MAGIC

    require_nbd_serve()
    out = tmp_path / "run"
    # The fault hits the first READ after 10 that returns a swapstress page (the magic
    # starts every page of the pattern): necessarily a swap-in of a page written earlier.
    cfg = e2e_config(
        out,
        guest_cache,
        total_bytes=128 * MIB,
        server_fault="corrupt-read-after=10,match=SWAPNBD1",
        timeout_s=2400.0,  # the run goes on after the fault: slow on a loaded machine
    )
    run = experiment.run_experiment(cfg, print)
    log = Path(run["server"]["log"]).read_text()
    found = FAULT_LINE.search(log)
    assert found, f"the server never corrupted a read; log: {log[-2000:]}"
    magic, page, worker, generation, _tag = HEADER.unpack(bytes.fromhex(found.group(2)))
    assert magic == MAGIC
    assert run["outcome"] == "corruption", run["outcome_reason"]
    assert run["outcome_reason"] == "swapstress found 1 corrupt pages"
    sw = run["swapstress"]
    assert sw["corrupt_pages"] == 1
    [example] = sw["corrupt_examples"]
    assert (example["worker"], example["page"], example["generation"]) == (worker, page, generation)
    assert example["offset"] == FLIP_AT
    assert example["bad_bytes"] == 1
    [bad] = [w for w in sw["workers"] if w["corrupt_pages"]]
    assert (bad["worker"], bad["status"]) == (worker, "corruption")
    assert cli.exit_code(run) == 1


@pytest.mark.vm
def test_a_plan_larger_than_ram_plus_swap_is_oom_naming_the_killed_worker(
    tmp_path: Path, guest_cache: Path
) -> None:
    require_nbd_serve()
    out = tmp_path / "run"
    # 128 MiB of RAM plus 32 MiB of swap cannot hold 256 MiB of worker memory.
    cfg = e2e_config(out, guest_cache, workers=4, total_bytes=256 * MIB, swap_bytes=32 * MIB)
    run = experiment.run_experiment(cfg, print)
    assert run["outcome"] == "oom", run["outcome_reason"]
    assert run["outcome_reason"] == "a swapstress worker was OOM-killed"
    killed = [w for w in run["swapstress"]["workers"] if w["status"] == "oom-kill"]
    assert killed and all(w["signal"] == "SIGKILL" for w in killed)
    oom_lines = " ".join(run["evidence"]["console"]["oom"])
    assert any(f"Killed process {w['pid']} " in oom_lines for w in killed), oom_lines
    assert run["swapstress"]["oom_kill_delta"] >= len(killed)
    swaps = [e for e in JsonlTail(out / "events.jsonl").read_new() if e.get("phase") == "swapon"]
    assert swaps and swaps[0]["swaps"][0].split()[2] == str(32 * 1024 - 4)  # KiB, less header
    assert cli.exit_code(run) == 1


@pytest.mark.vm
def test_a_kernel_panic_in_the_guest_is_a_guest_crash(tmp_path: Path, guest_cache: Path) -> None:
    require_nbd_serve()
    out = tmp_path / "run"
    cfg = e2e_config(out, guest_cache, guest_panic_after_s=5.0, lockup_after_s=120.0)
    run = experiment.run_experiment(cfg, print)
    assert run["outcome"] == "guest-crash", run["outcome_reason"]
    assert run["ending"] == "qemu-exited"
    panic = run["evidence"]["console"]["panic"]
    assert any("Kernel panic - not syncing: sysrq triggered crash" in line for line in panic)
    assert run["outcome_reason"].startswith("kernel panic: ")
    assert run["swapstress"] is None
    assert run["boot_retries"] is None  # a crash once the experiment runs is its verdict
    assert cli.exit_code(run) == 1


# --- no orphans, whatever kills the runner (real guest) -----------------------------------


def start_cli_run(out: Path, cache: Path) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable, "-m", "vm.cli", "run", "--memory", "128M", "--cpus", "2",
        "--workers", "4", "--total", "256M", "--loops", "2", "--server", "nbd-serve",
        "--accel", "tcg", "--timeout", "900", "--cache", str(cache), "--out", str(out),
    ]  # fmt: skip
    with (out.parent / "cli.log").open("wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


def wait_for_stress(proc: subprocess.Popen[bytes], out: Path) -> list[psutil.Process]:
    """Wait until the guest runs swapstress; return the runner's descendants then."""
    tail = JsonlTail(out / "events.jsonl")
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None, f"swapnbd run exited {proc.returncode} before stress"
        assert time.monotonic() < deadline, "the guest never reached the stress phase"
        if any(r.get("phase") == "stress" for r in tail.read_new()):
            break
        time.sleep(0.5)
    time.sleep(2)
    children: list[psutil.Process] = psutil.Process(proc.pid).children(recursive=True)
    names = " ".join(" ".join(p.cmdline()) for p in children)
    assert "qemu-system-x86_64" in names and "nbdserver.cli" in names, names
    return children


def still_running(procs: list[psutil.Process], within_s: float) -> list[str]:
    """The processes of ``procs`` still alive (zombies count as gone) after ``within_s``."""
    deadline = time.monotonic() + within_s
    while True:
        left = []
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.2)


def signal_mid_stress(
    tmp_path: Path, guest_cache: Path, sig: signal.Signals, wait_s: float
) -> tuple[Path, int, list[psutil.Process]]:
    """Start `swapnbd run`, send ``sig`` once the stress phase began; return the output
    directory, the exit status and the runner's children as they were before the signal."""
    require_nbd_serve()
    out = tmp_path / "run"
    out.mkdir()
    proc = start_cli_run(out, guest_cache)
    try:
        children = wait_for_stress(proc, out)
        proc.send_signal(sig)
        code = proc.wait(timeout=wait_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out, code, children


@pytest.mark.vm
def test_sigterm_stops_qemu_and_the_server_and_writes_run_json(
    tmp_path: Path, guest_cache: Path
) -> None:
    out, code, children = signal_mid_stress(tmp_path, guest_cache, signal.SIGTERM, 60)
    assert code == cli.EXIT_TERMINATED == 143
    assert still_running(children, 5.0) == []
    run = json.loads((out / "run.json").read_text())
    assert (run["outcome"], run["interrupted"], run["interrupted_by"]) == (
        "error",
        True,
        "SIGTERM",
    )
    assert run["outcome_reason"] == "interrupted by SIGTERM; QEMU and the server were stopped"
    assert run["qemu"]["pid"] in [p.pid for p in children]
    assert run["server"]["pid"] in [p.pid for p in children]
    assert run["server"]["exit_status"] == 0  # a clean stop, with its final stats line
    assert run["cost"]["server"]["user_s"] > 0


@pytest.mark.vm
def test_sigkill_of_the_runner_leaves_no_qemu_and_no_server(
    tmp_path: Path, guest_cache: Path
) -> None:
    _, code, children = signal_mid_stress(tmp_path, guest_cache, signal.SIGKILL, 30)
    assert code == -signal.SIGKILL
    assert still_running(children, 10.0) == []


def test_default_timeout_grows_with_the_workload(tmp_path: Path) -> None:
    small = RunConfig(out=tmp_path, total_bytes=256 * MIB, loops=1)
    big = RunConfig(out=tmp_path, total_bytes=1024 * MIB, loops=3)
    assert (small.passes, big.passes) == (3, 7)
    assert small.effective_timeout_s == 900.0 + 2.0 * 3 * 256
    assert big.effective_timeout_s == 900.0 + 2.0 * 7 * 1024
    fixed = RunConfig(out=tmp_path, timeout_s=60.0)
    assert fixed.effective_timeout_s == 60.0
    seed = RunConfig(out=tmp_path, memory_mib=2048, total_bytes=None, ratio=4.0)
    assert seed.workload_bytes == 8192 * MIB


def test_status_line_shows_progress_and_eta() -> None:
    from vm.run.watchdog import WatchState

    st = WatchState(started=0.0, last_activity=0.0, phase="stress")
    st.first_heartbeat = {"t_mono": 100.0, "pages_done": 0, "pages_total": 1000, "pass": 0}
    st.last_heartbeat = {"t_mono": 110.0, "pages_done": 500, "pages_total": 1000, "pass": 0}
    st.last_sample = {"vmstat": {"pswpout": 42, "pswpin": 7}}
    st.samples = 3
    line = experiment.status_line(st, 75.0, passes=2)
    assert line == (
        "[ 1m15s] phase stress, pass 0, pages 500/2000 (25%), 50 pages/s, ETA 30s, "
        "pswpout 42 pswpin 7, samples 3"
    )
