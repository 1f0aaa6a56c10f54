"""One run record and one verdict for both runners: a VM run and a lab run write the
same run.json keys through :class:`stress.runrecord.RunRecord`, and judge a finished
swapstress with :func:`stress.runrecord.swapstress_verdict`.

The lab runner is run for real here, deployed as Ansible deploys it (the runner beside a
copy of ``stress/``, under ``/usr/bin/python3 -I``) on a workload too small to swap.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from stress import runrecord
from stress.runrecord import FILES, Outcome, RunRecord, swapstress_verdict
from vm.run import experiment, watchdog
from vm.run.config import RunConfig

REPO = Path(__file__).resolve().parents[2]
LABRUN = REPO / "ansible/roles/swapstress/files/swapnbd_labrun.py"


@pytest.mark.parametrize(
    ("result", "exit_code", "oom", "outcome", "reason"),
    [
        (None, 3, False, Outcome.ERROR, "swapstress exited 3 without writing its result"),
        ({"outcome": "completed", "corrupt_pages": 0}, 0, False, Outcome.COMPLETED,
         "swapstress completed and verified every page"),
        ({"outcome": "corruption", "corrupt_pages": 2}, 1, True, Outcome.CORRUPTION,
         "swapstress found 2 corrupt pages"),
        # Corruption wins even over an outcome that says otherwise.
        ({"outcome": "worker-died", "corrupt_pages": 1}, 3, True, Outcome.CORRUPTION,
         "swapstress found 1 corrupt pages"),
        ({"outcome": "worker-died", "corrupt_pages": 0}, 3, True, Outcome.OOM,
         "a swapstress worker was OOM-killed"),
        ({"outcome": "worker-died", "corrupt_pages": 0}, 3, False, Outcome.ERROR,
         "swapstress ended with outcome 'worker-died' (exit 3)"),
        ({}, 130, False, Outcome.ERROR, "swapstress ended with outcome None (exit 130)"),
    ],
)  # fmt: skip
def test_the_verdict_of_a_finished_run(
    result: dict[str, Any] | None, exit_code: int, oom: bool, outcome: Outcome, reason: str
) -> None:
    assert swapstress_verdict(result, exit_code, oom_killed=oom) == (outcome, reason)


def test_the_guest_watchdog_judges_a_finished_run_with_the_same_verdict() -> None:
    """vm/run/watchdog.classify hands a result to swapstress_verdict: the OOM sign it passes
    is the console's or the result's counter."""
    event = {"swapstress": {"outcome": "worker-died", "corrupt_pages": 0}, "exit_code": 3}

    def judged(console: str, **extra: Any) -> tuple[str, str]:
        v = watchdog.classify(
            result_event={**event, **extra}, error_event=None, lockup=False, silent_s=0.0,
            timed_out=False, qemu_exit=0, console_text=console,
        )  # fmt: skip
        return v.outcome, v.reason

    oom_line = "[   12.0] Out of memory: Killed process 321 (python3) total-vm:1kB\n"
    assert judged(oom_line) == (Outcome.OOM, "a swapstress worker was OOM-killed")
    assert judged("", oom_kill_delta=1) == (Outcome.OOM, "a swapstress worker was OOM-killed")
    assert judged("") == (Outcome.ERROR, "swapstress ended with outcome 'worker-died' (exit 3)")


def test_the_record_is_written_whole_with_its_files(tmp_path: Path) -> None:
    record = RunRecord(config={"workers": 1})
    record.judge(Outcome.COMPLETED, "fine")
    obj = record.write(tmp_path)
    on_disk = json.loads((tmp_path / "run.json").read_text())
    assert on_disk == obj
    assert list(on_disk)[:4] == ["schema", "config", "host", "kernel"]
    assert on_disk["outcome"] == "completed" and on_disk["interrupted"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run.json", *FILES.values()])
    assert not (tmp_path / "run.json.tmp").exists()


def test_a_vm_run_and_a_lab_run_write_the_same_keys(tmp_path: Path) -> None:
    tools = tmp_path / "tools"
    shutil.copytree(REPO / "stress", tools / "stress", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(LABRUN, tools)
    out = tmp_path / "lab"
    done = subprocess.run(
        ["/usr/bin/python3", "-I", str(tools / LABRUN.name), "--out", str(out),
         "--tools", str(tools), "--workers", "1", "--total", "8M", "--interval", "0.2",
         "--label", "here"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lab = json.loads((out / "run.json").read_text())
    assert lab["outcome"] == "completed", lab["outcome_reason"]
    assert lab["outcome_reason"] == "swapstress completed and verified every page"
    assert lab["swapstress"]["corrupt_pages"] == 0
    assert lab["lab"]["label"] == "here" and lab["accel"] == {"used": "bare-metal"}
    assert lab["files"] == dict(FILES)
    vm_run = experiment.new_run(RunConfig(out=tmp_path / "vm")).to_json()
    assert list(lab) == list(vm_run)
    for name in FILES.values():
        assert (out / name).exists(), name


def test_host_facts_name_the_machine_for_the_report_header(tmp_path: Path) -> None:
    """What ``swapnbd report`` prints in its header: the CPU, cores, load, start time,
    and for a VM run the swapnbd commit it ran."""
    run = experiment.new_run(RunConfig(out=tmp_path / "vm"))
    host = run.host
    assert host["cpus"] >= 1
    assert len(host["loadavg"]) == 3
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", host["started_utc"])
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", host["swapnbd_commit"])
    assert experiment.swapnbd_commit(tmp_path) is None  # not a checkout


def test_cpu_model_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu\n")
    assert runrecord._cpu_model(cpuinfo) == "AMD EPYC 7B13"
    cpuinfo.write_text("processor\t: 0\nCPU part\t: 0xd0c\n")  # arm64 has no model name
    assert runrecord._cpu_model(cpuinfo) is None
    assert runrecord._cpu_model(tmp_path / "absent") is None
