"""matrix.yml over two hosts (network namespaces with their own sshd), driven by vm.campaign.lab.

A 4-run matrix of tiny runs (128 MiB guest, 1 vCPU, 4 workers, 128 MiB, 1 loop) is split
2/2 over runner1 and runner2. runner1's share is stopped (SIGTERM, as an operator or a
failing host would) once its first run has finished; the drive ends with 3 of 4 runs.
Running it again resumes only runner1's unfinished run: the finished ones are not
repeated (their run.json files keep their bytes and mtimes). The merged store then holds
all four runs, its index says so, and report.md is written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from vm.image import image

from .guests import make_key
from .netns import netns_lab
from .support import BIN, REPO, ansible_env, run, tool

pytestmark = pytest.mark.vm

LAB_EXTRA = "pip install 'swapnbd[lab]' (./dev setup does)"
INVENTORY = REPO / "ansible" / "inventories" / "local" / "hosts.yml"
TINY = """\
[matrix]
name = "tiny"
description = "four tiny runs for the scale-out test"
repeats = 4

[defaults]
kernel = "6.1"
memory = "128M"
cpus = 1
workers = 4
total = "128M"
loops = 1
lockup_after = 180
"""


def index_runs(store: Path) -> dict[str, dict[str, Any]]:
    index = json.loads((store / "index.json").read_text())
    return {entry["id"]: entry for entry in index["runs"]}


def finished_ids(store: Path) -> set[str]:
    if not (store / "index.json").exists():
        return set()
    return {rid for rid, e in index_runs(store).items() if e["status"] == "finished"}


def drive(
    lab_argv: list[str], env: dict[str, str], log: Path, timeout: float, hook: Any = None
) -> int:
    with open(log, "w") as out:
        proc = subprocess.Popen(lab_argv, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                pytest.fail(
                    f"vm.campaign.lab run did not end within {timeout:.0f} s:\n"
                    f"{log.read_text()[-4000:]}"
                )
            if hook is not None:
                hook()
            time.sleep(2)
    print(log.read_text())
    return proc.returncode


def test_matrix_over_two_hosts_resumes_a_killed_share(tmp_path: Path) -> None:
    try:
        check_scaleout(tmp_path)
    finally:
        # The shares run detached on the hosts: stop any left running (SIGTERM: their runs
        # end as "interrupted" and their QEMU guests are stopped).
        for pidfile in (tmp_path / "state").glob("runner*/*/share.pid"):
            subprocess.run(
                ["start-stop-daemon", "--stop", "--oknodo", "--pidfile", str(pidfile),
                 "--retry", "TERM/60/KILL/5"],
                capture_output=True, check=False,
            )  # fmt: skip


def check_scaleout(tmp_path: Path) -> None:
    tool("ansible-playbook", LAB_EXTRA)
    tool("ss", "apt-get install iproute2")
    image.build_guest(
        "6.1", "cloud", image.default_cache_dir(), lambda line: print(line, flush=True)
    )
    key = make_key(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    matrix = tmp_path / "tiny.toml"
    matrix.write_text(TINY)
    store = tmp_path / "merged"
    (tmp_path / "lab").mkdir()
    with netns_lab(
        tmp_path / "lab", ["runner1", "runner2"], key.with_suffix(".pub").read_text()
    ) as lab:
        env = ansible_env(
            SWAPNBD_LAB_STATE=str(state),
            SWAPNBD_LAB_SSH_KEY=str(key),
            SWAPNBD_LAB_KNOWN_HOSTS=str(tmp_path / "known_hosts"),
            SWAPNBD_LAB_RUNNER1=lab.hosts["runner1"],
            SWAPNBD_LAB_RUNNER2=lab.hosts["runner2"],
            SWAPNBD_LAB_RUNNER_PYTHON=sys.executable,
            SWAPNBD_LAB_SWAPNBD=str(BIN / "swapnbd"),
        )
        # The runner role over SSH (install off: the hosts share this checkout's swapnbd).
        done = run(
            lab.exec_argv(
                [
                    tool("ansible-playbook", LAB_EXTRA),
                    "-i",
                    str(INVENTORY),
                    "site.yml",
                    "--limit",
                    "runners",
                ]
            ),
            env=env,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "runner1" in done.stdout and "runner2" in done.stdout

        lab_argv = lab.exec_argv(
            [sys.executable, "-m", "vm.campaign.lab", "run", str(matrix),
             "--inventory", str(INVENTORY), "--out", str(store), "--poll", "10"]
        )  # fmt: skip
        share1 = state / "runner1" / store.name
        killed: dict[str, float] = {}

        def kill_runner1_after_its_first_run() -> None:
            if killed or not finished_ids(share1 / "store"):
                return
            pid = int((share1 / "share.pid").read_text())
            os.kill(pid, signal.SIGTERM)
            killed["at"] = time.monotonic()

        t0 = time.monotonic()
        rc = drive(lab_argv, env, tmp_path / "first.log", 3600, kill_runner1_after_its_first_run)
        first_s = time.monotonic() - t0
        first_log = (tmp_path / "first.log").read_text()
        assert killed, "runner1's first run never finished"
        assert rc == 1, first_log[-3000:]
        assert "[runner1 1/2]" in first_log and "[runner2 2/2]" in first_log
        assert "overall: " in first_log
        runs = index_runs(store)
        assert len(runs) == 4
        done_first = finished_ids(store)
        assert len(done_first) == 3, runs
        (unfinished,) = set(runs) - done_first
        assert runs[unfinished]["index"] % 2 == 0  # runner1's (shard 1/2: indexes 0 and 2)
        kept = {rid: (store / rid / "run.json").read_bytes() for rid in done_first}
        share_mtimes = {
            p: p.stat().st_mtime_ns for p in state.glob(f"runner*/{store.name}/store/*/run.json")
        }

        t0 = time.monotonic()
        rc = drive(lab_argv, env, tmp_path / "second.log", 3600)
        second_s = time.monotonic() - t0
        assert rc == 0, (tmp_path / "second.log").read_text()[-3000:]
        assert finished_ids(store) == set(runs)
        for rid, data in kept.items():
            assert (store / rid / "run.json").read_bytes() == data, f"{rid} was run again"
        for path, mtime in share_mtimes.items():
            if path.parent.name in done_first:
                assert path.stat().st_mtime_ns == mtime, f"{path} was rewritten"
        for rid in runs:
            rj = json.loads((store / rid / "run.json").read_text())
            assert rj["outcome"] == "completed", (rid, rj["outcome_reason"])
            assert rj["vmstat_delta"]["pswpout"] > 0
        report = (store / "report.md").read_text()
        assert report.strip()
        print(f"4-run matrix on two hosts: first drive {first_s:.0f} s (one share stopped), "
              f"resume {second_s:.0f} s")  # fmt: skip
