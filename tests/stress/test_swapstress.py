"""swapstress end to end on the host: small sizes, real processes, real signals."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    REPO,
    RUN_TIMEOUT_S,
    LineStream,
    children_of,
    kernel_root,
    read_json_lines,
    run_tool,
    tool_argv,
    tool_env,
)

from stress import exitcodes, swapstress
from stress.pattern import HEADER, expected_page
from stress.plan import DEFAULT_LOOPS, make_plan
from stress.worker import MAX_EXAMPLES_PER_WORKER

PLAN_KEYS = {"workers", "total_bytes", "mem_total_bytes", "per_worker_bytes"}
RESULT_KEYS = {
    "outcome",
    "elapsed_s",
    "user_s",
    "sys_s",
    "user_sys_s",
    "pages_verified",
    "corrupt_pages",
    "corrupt_examples",
    "workers",
    "plan",
}
HEARTBEAT_KEYS = {"type", "t_mono", "t_wall", "pass", "pages_done", "pages_total", "rate_pages_s"}


def live_meminfo_bytes(name: str) -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"/proc/meminfo has no {name}")


# --------------------------------------------------------------------------- plan


def test_done_when_dry_run_prints_the_plan(tmp_path: Path) -> None:
    proc = run_tool("swapstress", "--dry-run", "--json", "-", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan.keys() >= PLAN_KEYS
    cpus = os.cpu_count() or 1
    assert plan["workers"] == 8 * cpus
    assert plan["mem_total_bytes"] == live_meminfo_bytes("MemTotal")
    assert plan["requested_total_bytes"] == 4 * plan["mem_total_bytes"]
    assert plan["per_worker_bytes"] % 4096 == 0
    assert plan["total_bytes"] == plan["per_worker_bytes"] * plan["workers"]
    assert 0 <= plan["requested_total_bytes"] - plan["total_bytes"] < 4096 * plan["workers"]
    assert plan["loops"] == DEFAULT_LOOPS
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_dry_run_from_a_recorded_guest() -> None:
    plan = make_plan(
        meminfo={"MemTotal": 2014980 * 1024, "MemAvailable": 1 << 30, "SwapFree": 8 << 30},
        cpu_count=2,
    )
    assert plan.workers == 16
    assert plan.requested_total_bytes == 4 * 2014980 * 1024
    assert plan.per_worker_bytes == (4 * 2014980 * 1024 // 16) // 4096 * 4096
    assert plan.pages_per_worker == plan.per_worker_bytes // 4096
    assert plan.fits is True
    assert plan.as_dict()["fits"] is True


def test_dry_run_json_to_file_and_ratio(tmp_path: Path) -> None:
    root = kernel_root("linux-6.1", "t0")
    out = tmp_path / "plan.json"
    argv = ["--dry-run", "--ratio", "0.5", "--workers", "3", "--duration", "10"]
    proc = run_tool("swapstress", *argv, "--json", str(out), "--proc-root", str(root), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(out.read_text())
    assert plan["mem_total_bytes"] == 94776 * 1024  # the captured 6.1 guest
    assert plan["requested_total_bytes"] == 94776 * 1024 // 2
    assert plan["workers"] == 3
    assert plan["loops"] is None
    assert plan["duration_s"] == 10.0
    assert plan["fits"] is True


# --------------------------------------------------------------------------- safety and usage


def test_safety_refusal_says_what_to_pass(tmp_path: Path) -> None:
    # The captured 6.1 guest: MemAvailable 67800 kB + SwapFree 256892 kB < 4 x 94776 kB.
    root = kernel_root("linux-6.1", "t1")
    proc = run_tool("swapstress", "--json", "out.json", "--proc-root", str(root), cwd=tmp_path)
    assert proc.returncode == exitcodes.EXIT_USAGE
    assert "refusing to run" in proc.stderr
    assert "--force" in proc.stderr
    assert str((67800 + 256892) * 1024) in proc.stderr
    assert not (tmp_path / "out.json").exists()
    dry = run_tool("swapstress", "--dry-run", "--proc-root", str(root), cwd=tmp_path)
    assert json.loads(dry.stdout)["fits"] is False


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--total", "12X"], "invalid size '12X'"),
        (["--total", "64M", "--ratio", "2"], "not allowed with argument"),
        (["--loops", "2", "--duration", "5"], "not allowed with argument"),
        (["--workers", "0", "--total", "64M"], "--workers must be at least 1"),
        (["--workers", "4", "--total", "8K"], "less than one 4096-byte page per worker"),
        (["--loops", "-1", "--total", "64M"], "--loops must be 0 or more"),
        (["--ratio", "-2"], "must be a positive number"),
        (["--heartbeat-interval", "0"], "must be a positive number"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, argv: list[str], message: str) -> None:
    proc = run_tool("swapstress", *argv, "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert proc.stdout == ""


def test_bad_corruption_hook_is_a_usage_error(tmp_path: Path) -> None:
    env = tool_env({swapstress.TEST_CORRUPT_ENV: "9:0"})
    argv = ["--workers", "2", "--total", "1M", "--loops", "1", "--force"]
    proc = run_tool("swapstress", *argv, cwd=tmp_path, env=env)
    assert proc.returncode == 2
    assert "worker must be < 2 and pages < 128" in proc.stderr  # 1M / 2 workers


# --------------------------------------------------------------------------- real runs


def run_json(tmp_path: Path, *argv: str, env: dict[str, str] | None = None) -> tuple[int, Any]:
    out = tmp_path / "out.json"
    proc = run_tool("swapstress", *argv, "--json", str(out), cwd=tmp_path, env=env)
    assert out.exists(), proc.stderr
    return proc.returncode, json.loads(out.read_text())


def test_done_when_real_run(tmp_path: Path) -> None:
    argv = ["--workers", "4", "--total", "64M", "--loops", "2", "--force"]
    code, result = run_json(tmp_path, *argv)
    assert code == 0
    assert result.keys() >= RESULT_KEYS
    assert result["type"] == "result"
    assert result["outcome"] == "completed"
    assert result["exit_code"] == 0
    pages_per_worker = 64 * 1024 * 1024 // 4 // 4096
    assert result["plan"]["pages_per_worker"] == pages_per_worker
    assert result["pages_verified"] == 4 * pages_per_worker * 2
    assert result["pages_written"] == 4 * pages_per_worker * 3  # pass 0 + two rewrites
    assert result["corrupt_pages"] == 0
    assert result["corrupt_examples"] == []
    assert result["elapsed_s"] > 0
    assert result["user_s"] >= 0
    assert result["sys_s"] >= 0
    assert result["user_s"] + result["sys_s"] > 0
    assert result["user_sys_s"] == pytest.approx(result["user_s"] + result["sys_s"], abs=2e-6)
    assert [w["worker"] for w in result["workers"]] == [0, 1, 2, 3]
    for worker in result["workers"]:
        assert worker["status"] == "ok"
        assert worker["exit_code"] == 0
        assert worker["signal"] is None
        assert worker["pages_verified"] == pages_per_worker * 2
        assert worker["passes_completed"] == 2
    assert len({w["pid"] for w in result["workers"]}) == 4
    assert result["stop_reason"] is None


def test_verify_mode_writes_once(tmp_path: Path) -> None:
    argv = ["--workers", "2", "--total", "8M", "--loops", "3", "--mode", "verify", "--force"]
    code, result = run_json(tmp_path, *argv)
    assert code == 0
    assert result["pages_verified"] == 2048 * 3
    assert result["pages_written"] == 2048
    assert result["plan"]["mode"] == "verify"


def test_loops_zero_only_writes(tmp_path: Path) -> None:
    code, result = run_json(tmp_path, "--workers", "1", "--total", "1M", "--loops", "0", "--force")
    assert code == 0
    assert (result["pages_written"], result["pages_verified"]) == (256, 0)


def test_result_to_stdout(tmp_path: Path) -> None:
    argv = ["--workers", "2", "--total", "2M", "--loops", "1", "--force", "--json", "-"]
    proc = run_tool("swapstress", *argv, cwd=tmp_path)
    assert proc.returncode == 0
    result = json.loads(proc.stdout)
    assert result["pages_verified"] == 512
    assert "swapstress: completed: 512 pages verified" in proc.stderr


@pytest.mark.parametrize(("mode", "expected_bad"), [("rewrite", 1), ("verify", 2)])
def test_injected_corruption_reports_exactly_that_page(
    tmp_path: Path, mode: str, expected_bad: int
) -> None:
    env = tool_env({swapstress.TEST_CORRUPT_ENV: "2:300"})
    argv = ["--workers", "4", "--total", "16M", "--loops", "2", "--mode", mode, "--force"]
    code, result = run_json(tmp_path, *argv, env=env)
    assert code == exitcodes.EXIT_CORRUPTION == 1
    assert result["outcome"] == "corruption"
    # rewrite mode repairs the page in pass 1 (generation 1 is written over it); verify mode
    # finds the same bad page on both passes.
    assert result["corrupt_pages"] == expected_bad
    assert [(e["worker"], e["page"], e["pass"]) for e in result["corrupt_examples"]] == [
        (2, 300, p) for p in range(1, expected_bad + 1)
    ]
    example = result["corrupt_examples"][0]
    good = expected_page(2, 300, 0)
    bad = bytearray(good)
    bad[8] ^= 0x01
    assert example["generation"] == 0
    assert example["offset"] == 8
    assert example["bad_bytes"] == 2
    assert example["expected"] == good[: HEADER.size].hex()
    assert example["found"] == bytes(bad[: HEADER.size]).hex()
    statuses = [(w["status"], w["corrupt_pages"]) for w in result["workers"]]
    assert statuses == [("ok", 0), ("ok", 0), ("corruption", expected_bad), ("ok", 0)]
    assert result["workers"][2]["exit_code"] == 1


# --------------------------------------------------------------------------- heartbeats


def test_heartbeat_lines(tmp_path: Path) -> None:
    hb = tmp_path / "hb.jsonl"
    argv = ["--workers", "2", "--total", "8M", "--loops", "2", "--force"]
    code, result = run_json(tmp_path, *argv, "--heartbeat", str(hb), "--heartbeat-interval", "0.05")
    assert code == 0
    lines = read_json_lines(hb)
    assert len(lines) >= 2  # one at start, one at the end
    for line in lines:
        assert line.keys() >= HEARTBEAT_KEYS
        assert line["type"] == "heartbeat"
        assert line["pages_total"] == 2048
    assert lines[0]["pages_done"] == 0
    assert lines[0]["pass"] == 0
    done = [line["pages_done"] for line in lines]
    assert done == sorted(done)
    monos = [line["t_mono"] for line in lines]
    assert monos == sorted(monos)
    assert lines[-1]["pages_done"] == result["pages_written"] + result["pages_verified"]
    assert lines[-1]["pass"] == 2
    assert lines[-1]["workers_alive"] == 0


# --------------------------------------------------------------------------- signals


LONG_RUN_WORKER_KIB = 4108  # an odd size, so a worker's mapping is easy to find in smaps


def start_long_run(
    tmp_path: Path, fifo: Path, started: list[subprocess.Popen[str]], *extra: str
) -> tuple[subprocess.Popen[str], LineStream]:
    """Start a run that would last 60 s and wait until every worker has made progress."""
    argv = tool_argv(
        "swapstress",
        *extra,
        "--workers",
        "3",
        "--total",
        f"{3 * LONG_RUN_WORKER_KIB}K",
        "--duration",
        "60",
        "--force",
        "--json",
        str(tmp_path / "out.json"),
        "--heartbeat",
        str(fifo),
        "--heartbeat-interval",
        "0.05",
    )
    proc = subprocess.Popen(argv, cwd=tmp_path, env=tool_env(), stderr=subprocess.PIPE, text=True)
    started.append(proc)
    stream = LineStream(os.open(fifo, os.O_RDONLY))
    try:
        while True:
            beat = stream.next()
            assert beat is not None, "swapstress closed its heartbeat before making progress"
            if beat["pass"] >= 1:  # every worker has written all its pages
                return proc, stream
    except BaseException:
        stream.close()
        raise


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_interrupts_cleanly_and_still_writes_json(
    tmp_path: Path,
    fifo: Path,
    proc_children: list[subprocess.Popen[str]],
    signum: signal.Signals,
) -> None:
    proc, stream = start_long_run(tmp_path, fifo, proc_children)
    proc.send_signal(signum)
    beats = stream.rest()
    stream.close()
    _, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == exitcodes.EXIT_INTERRUPTED == 130, stderr
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["outcome"] == "interrupted"
    assert result["exit_code"] == 130
    assert result["stop_reason"] == signum.name
    assert [w["status"] for w in result["workers"]] == ["interrupted"] * 3
    assert [w["exit_code"] for w in result["workers"]] == [130] * 3
    assert result["corrupt_pages"] == 0
    assert result["pages_verified"] > 0
    assert beats[-1]["workers_alive"] == 0


def test_sigkilled_worker_is_worker_died(
    tmp_path: Path, fifo: Path, proc_children: list[subprocess.Popen[str]]
) -> None:
    proc, stream = start_long_run(tmp_path, fifo, proc_children)
    workers = sorted(children_of(proc.pid))
    assert len(workers) == 3
    os.kill(workers[1], signal.SIGKILL)
    stream.rest()
    stream.close()
    _, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == exitcodes.EXIT_WORKER_DIED == 3, stderr
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["outcome"] == "worker-died"
    by_pid = {w["pid"]: w for w in result["workers"]}
    victim = by_pid[workers[1]]
    assert victim["status"] == "killed"  # oom_kill did not rise: not an OOM kill
    assert victim["signal"] == "SIGKILL"
    assert victim["exit_code"] is None
    assert result["stop_reason"] == f"worker {victim['worker']} died (SIGKILL)"
    others = [w for w in result["workers"] if w["pid"] != workers[1]]
    assert [w["status"] for w in others] == ["interrupted", "interrupted"]
    assert result["oom_kill_delta"] == 0


# --------------------------------------------------------------------------- shipping


def test_runs_from_a_plain_copy_on_the_system_python(tmp_path: Path) -> None:
    """The guest copies stress/ to /opt/swapnbd and runs Debian's python3, stdlib only."""
    python = shutil.which("python3", path="/usr/bin")
    assert python is not None, "install python3 (Debian package python3) to run this test"
    opt = tmp_path / "opt" / "swapnbd"
    shutil.copytree(REPO / "stress", opt / "stress", ignore=shutil.ignore_patterns("__pycache__"))
    env = {"PYTHONPATH": str(opt), "PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"}
    out = tmp_path / "out.json"
    argv = ["--workers", "2", "--total", "2M", "--loops", "1", "--force", "--json", str(out)]
    proc = subprocess.run(
        [python, "-S", "-m", "stress.swapstress", *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["pages_verified"] == 512
    proc = subprocess.run(
        [python, "-S", "-m", "stress.vmstat", "--count", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["type"] == "sample"
    # python -S: no site-packages at all, so nothing outside the standard library was used
    assert sys.version_info >= (3, 11)


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no {field}")


def test_sigkill_while_oom_kill_rises_is_named_oom_kill(
    tmp_path: Path, fifo: Path, proc_children: list[subprocess.Popen[str]]
) -> None:
    """The OOM rule, driven through a /proc tree the test controls (no real OOM on the host)."""
    root = tmp_path / "proc"
    shutil.copytree(kernel_root("linux-6.12", "t0"), root)
    proc, stream = start_long_run(tmp_path, fifo, proc_children, "--proc-root", str(root))
    vmstat_path = root / "vmstat"
    text = vmstat_path.read_text()
    assert "\noom_kill 0\n" in text
    vmstat_path.write_text(text.replace("\noom_kill 0\n", "\noom_kill 1\n"))
    victim = sorted(children_of(proc.pid))[0]
    os.kill(victim, signal.SIGKILL)
    stream.rest()
    stream.close()
    _, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 3, stderr
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["outcome"] == "worker-died"
    assert result["oom_kill_delta"] == 1
    killed = [w for w in result["workers"] if w["pid"] == victim]
    assert [(w["status"], w["signal"]) for w in killed] == [("oom-kill", "SIGKILL")]
    assert result["stop_reason"] == f"worker {killed[0]['worker']} died (SIGKILL)"


def test_mlock_locks_the_parent_not_the_workers(
    tmp_path: Path, fifo: Path, proc_children: list[subprocess.Popen[str]]
) -> None:
    if os.geteuid() != 0:
        # mlockall of a whole process needs CAP_IPC_LOCK (or a huge RLIMIT_MEMLOCK).
        pytest.fail("the --mlock test needs root; run tests/stress as root", pytrace=False)
    proc, stream = start_long_run(tmp_path, fifo, proc_children, "--mlock")
    workers = children_of(proc.pid)
    parent_locked = status_kib(proc.pid, "VmLck")
    workers_locked = [status_kib(pid, "VmLck") for pid in workers]
    proc.send_signal(signal.SIGTERM)
    stream.rest()
    stream.close()
    _, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 130, stderr
    assert "warning" not in stderr, stderr
    assert parent_locked > 0
    assert workers_locked == [0, 0, 0]


def test_result_to_a_fifo(
    tmp_path: Path, fifo: Path, proc_children: list[subprocess.Popen[str]]
) -> None:
    argv = tool_argv(
        "swapstress",
        "--workers",
        "2",
        "--total",
        "2M",
        "--loops",
        "1",
        "--force",
        "--json",
        str(fifo),
    )
    proc = subprocess.Popen(argv, cwd=tmp_path, env=tool_env(), stderr=subprocess.PIPE, text=True)
    proc_children.append(proc)
    stream = LineStream(os.open(fifo, os.O_RDONLY))
    lines = stream.rest()
    stream.close()
    _, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, stderr
    assert len(lines) == 1
    assert (lines[0]["type"], lines[0]["outcome"], lines[0]["pages_verified"]) == (
        "result",
        "completed",
        512,
    )


def test_worker_that_cannot_map_memory_is_worker_died(tmp_path: Path) -> None:
    """An mmap failure in a worker (here: RLIMIT_AS) is reported, not hidden."""
    limit = 1 << 30

    def cap_address_space() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    out = tmp_path / "out.json"
    argv = ["--workers", "2", "--total", "4G", "--loops", "1", "--force", "--json", str(out)]
    proc = subprocess.run(
        tool_argv("swapstress", *argv),
        cwd=tmp_path,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
        preexec_fn=cap_address_space,
    )
    assert proc.returncode == 3, proc.stderr
    assert "mmap" in proc.stderr  # the worker's traceback names the failing call
    result = json.loads(out.read_text())
    assert result["outcome"] == "worker-died"
    assert {(w["status"], w["exit_code"]) for w in result["workers"]} <= {
        ("error", 4),
        ("interrupted", 130),
    }
    assert any(w["status"] == "error" for w in result["workers"])
    assert result["pages_verified"] == 0


def test_mass_corruption_is_counted_but_examples_stay_few(tmp_path: Path) -> None:
    env = tool_env({swapstress.TEST_CORRUPT_ENV: "1:10-1009"})
    argv = ["--workers", "2", "--total", "16M", "--loops", "1", "--force"]
    code, result = run_json(tmp_path, *argv, env=env)
    assert code == 1
    assert result["corrupt_pages"] == 1000
    assert [e["page"] for e in result["corrupt_examples"]] == list(
        range(10, 10 + MAX_EXAMPLES_PER_WORKER)
    )
    assert [w["corrupt_pages"] for w in result["workers"]] == [0, 1000]


def test_shared_stream_heartbeats_then_result(
    tmp_path: Path, fifo: Path, proc_children: list[subprocess.Popen[str]]
) -> None:
    """One virtio port for both (it can only be open once): result is the last line."""
    argv = tool_argv(
        "swapstress",
        *("--workers", "2", "--total", "4M", "--loops", "2", "--force"),
        *("--json", str(fifo), "--heartbeat", str(fifo), "--heartbeat-interval", "0.05"),
    )
    proc = subprocess.Popen(argv, cwd=tmp_path, env=tool_env(), stderr=subprocess.PIPE, text=True)
    proc_children.append(proc)
    stream = LineStream(os.open(fifo, os.O_RDONLY))
    lines = stream.rest()
    stream.close()
    _, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, stderr
    assert [line["type"] for line in lines[:-1]] == ["heartbeat"] * (len(lines) - 1)
    assert len(lines) >= 3
    assert lines[-1]["type"] == "result"
    assert lines[-1]["pages_verified"] == 1024 * 2


def test_duration_run_completes(tmp_path: Path) -> None:
    argv = ["--workers", "2", "--total", "2M", "--duration", "0.5", "--force"]
    code, result = run_json(tmp_path, *argv)
    assert code == 0
    assert result["outcome"] == "completed"
    assert result["plan"]["loops"] is None
    assert result["plan"]["duration_s"] == 0.5
    assert result["elapsed_s"] >= 0.5
    assert result["pages_verified"] > 0
    assert result["stop_reason"] is None


def test_json_into_a_missing_directory_is_refused_before_running(tmp_path: Path) -> None:
    argv = ["--workers", "1", "--total", "1M", "--loops", "1", "--force"]
    proc = run_tool("swapstress", *argv, "--json", str(tmp_path / "nope" / "r.json"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr
    assert "completed" not in proc.stderr


@pytest.mark.parametrize("hook", ["x", "1", "1:", "a:b", "0:5-2", "0:-1", "0:999999"])
def test_malformed_corruption_hooks(tmp_path: Path, hook: str) -> None:
    env = tool_env({swapstress.TEST_CORRUPT_ENV: hook})
    argv = ["--workers", "2", "--total", "1M", "--loops", "1", "--force"]
    proc = run_tool("swapstress", *argv, cwd=tmp_path, env=env)
    assert proc.returncode == 2
    assert f"{swapstress.TEST_CORRUPT_ENV}={hook!r}" in proc.stderr


def test_nohugepage_marks_worker_mappings(
    tmp_path: Path, fifo: Path, proc_children: list[subprocess.Popen[str]]
) -> None:
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    assert thp.exists(), "this test needs a host kernel with CONFIG_TRANSPARENT_HUGEPAGE"
    proc, stream = start_long_run(tmp_path, fifo, proc_children, "--nohugepage")
    flags = [mapping_flags(pid, LONG_RUN_WORKER_KIB * 1024) for pid in children_of(proc.pid)]
    proc.send_signal(signal.SIGTERM)
    stream.rest()
    stream.close()
    _, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 130, stderr
    assert json.loads((tmp_path / "out.json").read_text())["plan"]["nohugepage"] is True
    assert [("nh" in f, "hg" in f) for f in flags] == [(True, False)] * 3


def mapping_flags(pid: int, size: int) -> list[str]:
    """VmFlags of the one mapping of exactly ``size`` bytes in ``pid`` (the worker's)."""
    found: list[list[str]] = []
    current = False
    with open(f"/proc/{pid}/smaps") as handle:
        for line in handle:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                current = hi - lo == size
            elif current and line.startswith("VmFlags:"):
                found.append(line.split()[1:])
    assert len(found) == 1, f"expected one {size}-byte mapping in {pid}, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("how", ["grace-expires", "second-signal"])
def test_unresponsive_worker_is_killed_after_grace(
    tmp_path: Path, fifo: Path, proc_children: list[subprocess.Popen[str]], how: str
) -> None:
    grace = "0.2" if how == "grace-expires" else "600"
    proc, stream = start_long_run(tmp_path, fifo, proc_children, "--stop-grace", grace)
    frozen = sorted(children_of(proc.pid))[0]
    os.kill(frozen, signal.SIGSTOP)  # cannot see SIGTERM until continued
    try:
        proc.send_signal(signal.SIGTERM)
        if how == "second-signal":
            proc.send_signal(signal.SIGINT)
        stream.rest()
        stream.close()
        _, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:  # never leave a stopped orphan behind if swapstress failed to kill it
        kill_if_stopped_worker(frozen)
    assert proc.returncode == 130, stderr
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["outcome"] == "interrupted"
    # both signals may be pending together; Python then runs the SIGINT handler first
    assert result["stop_reason"] in (
        {"SIGTERM"} if how == "grace-expires" else {"SIGTERM", "SIGINT"}
    )
    by_pid = {w["pid"]: w for w in result["workers"]}
    assert (by_pid[frozen]["status"], by_pid[frozen]["signal"]) == ("killed-after-grace", "SIGKILL")
    others = [w["status"] for pid, w in by_pid.items() if pid != frozen]
    if how == "grace-expires":
        assert others == ["interrupted", "interrupted"]
    else:  # the second signal kills whoever has not exited yet
        assert set(others) <= {"interrupted", "killed-after-grace"}
        assert len(others) == 2


def kill_if_stopped_worker(pid: int) -> None:
    """SIGKILL ``pid`` only if it is still a stopped swapstress process (not a reused pid)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read()
    except FileNotFoundError:
        return
    if state == "T" and b"stress.swapstress" in cmdline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
