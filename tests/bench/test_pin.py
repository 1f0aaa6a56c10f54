"""``--pin``: fio on one CPU, every server process and thread on the others.

Checked on real servers through /proc: every task of the tree, including the threads a
server starts for a connection after it was pinned, may run only on the servers' CPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from bench import servers
from bench.runner import Pinning, pin_tree, pinning
from bench.servers import BenchError, ServerKind, Transport

REPO = Path(__file__).resolve().parents[2]


def allowed_cpus(tid: int) -> frozenset[int]:
    return frozenset(os.sched_getaffinity(tid))


def tasks(proc: psutil.Process) -> list[int]:
    return [t.id for p in (proc, *proc.children(recursive=True)) for t in p.threads()]


def test_pinning_gives_fio_the_first_cpu_and_the_servers_the_rest() -> None:
    assert pinning({0, 1}) == Pinning(frozenset({0}), frozenset({1}))
    assert pinning({7, 3, 5}) == Pinning(frozenset({3}), frozenset({5, 7}))
    assert pinning({2, 9}).describe() == {"fio": [2], "servers": [9]}


def test_pinning_needs_two_cpus() -> None:
    with pytest.raises(
        BenchError, match=r"--pin needs at least two CPUs; this process may use \[4\]"
    ):
        pinning({4})


def test_pin_on_one_cpu_is_a_usage_error() -> None:
    proc = subprocess.run(
        ["taskset", "--cpu-list", "0", sys.executable, "-m", "bench", "--smoke", "--pin"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "--pin needs at least two CPUs; this process may use [0]" in proc.stderr


@pytest.mark.interop
@pytest.mark.parametrize("kind", [ServerKind.NBD_SERVE, ServerKind.NBDKIT])
def test_pin_tree_holds_for_threads_started_later(kind: ServerKind, tmp_path: Path) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.fail("this test needs two CPUs to tell a pinned task from an unpinned one")
    target = frozenset({max(os.sched_getaffinity(0))})
    image = tmp_path / "disk.img"
    image.write_bytes(b"\x5a" * (4 * 1024 * 1024))
    spec = servers.ExportSpec(path=image, size=4 * 1024 * 1024, workdir=tmp_path)
    server = servers.start_server(kind, Transport.TCP, spec)
    try:
        proc = server.process()
        before = tasks(proc)
        assert {allowed_cpus(t) for t in before} != {target}  # not pinned yet
        assert pin_tree(proc, target) == len(before)
        assert {allowed_cpus(t) for t in tasks(proc)} == {target}
        # Connections make new threads (nbdkit) and hand work to forked workers (nbd-serve).
        for _ in range(3):
            done = subprocess.run(
                ["nbdinfo", "--json", server.uri], capture_output=True, text=True, timeout=30,
                check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["exports"][0]["export-size"] == 4 * 1024 * 1024
        assert {allowed_cpus(t) for t in tasks(proc)} == {target}
    finally:
        servers.stop_server(server)
