"""The scheduling policy (``--sched-policy``, nbdserver.sched): set once before the
server forks or starts threads, it is in force on every thread of every process, as the
kernel reports it (sched_getscheduler on each thread id, not the server's own word).

Whether it pays is measured by the swap-path matrix, not here (docs/performance.md,
"Scheduling policy").
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import psutil
import pytest

from nbdserver.protocol import Cmd, SimpleReply
from nbdserver.sched import set_policy

from .nbdtest import RawClient, ServerProcess, running_server

POLICY_IN_EFFECT = {
    "idle": "scheduling policy idle: runs when a CPU would otherwise idle, or on a minimal share",
    "batch": "scheduling policy batch: wake-ups do not preempt running tasks",
}


def thread_policies(server: ServerProcess) -> dict[tuple[int, int], int]:
    """(pid, tid) -> scheduling policy, for every thread of the server and its workers."""
    procs = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children()]
    return {(p.pid, t.id): os.sched_getscheduler(t.id) for p in procs for t in p.threads()}


def wait_for_workers(server: ServerProcess, count: int) -> None:
    deadline = time.monotonic() + 30
    while len(psutil.Process(server.proc.pid).children()) < count:
        assert time.monotonic() < deadline, "the worker processes never started"
        time.sleep(0.02)


def serve_a_write(server: ServerProcess) -> None:
    """One WRITE on each of two connections: both processes have served (and started
    whatever threads serving starts)."""
    clients = [RawClient(server.port), RawClient(server.port)]
    try:
        for i, c in enumerate(clients):
            c.go(structured=False)
            c.request(Cmd.WRITE, i * 4096, 4096, cookie=i, payload=b"s" * 4096)
            assert c.simple_reply() == (SimpleReply(0, i), b"")
    finally:
        for c in clients:
            c.close()


@pytest.mark.parametrize(("name", "policy"), [("idle", os.SCHED_IDLE), ("batch", os.SCHED_BATCH)])
def test_every_thread_of_every_process_runs_under_the_policy(
    tmp_path: Path, name: str, policy: int
) -> None:
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # so the server's differs by its own doing
    with running_server(
        tmp_path, "--memory", "16M", "--workers", "2", "--sched-policy", name
    ) as server:
        wait_for_workers(server, 1)
        serve_a_write(server)
        policies = thread_policies(server)
        assert len({pid for pid, _ in policies}) == 2, policies
        assert set(policies.values()) == {policy}, policies
        assert server.alive()
        server.assert_no_crash(strict=True)
    assert POLICY_IN_EFFECT[name] in server.log()


def test_by_default_the_policy_is_left_alone(tmp_path: Path) -> None:
    with running_server(tmp_path, "--memory", "16M", "--workers", "2") as server:
        wait_for_workers(server, 1)
        serve_a_write(server)
        assert set(thread_policies(server).values()) == {os.SCHED_OTHER}
    assert "scheduling policy" not in server.log()


def test_the_policy_config_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("sched_policy = 'idle'\nworkers = 1\n[[exports]]\nsize = '4M'\n")
    with running_server(tmp_path, "--config", str(config), "--port", "0") as server:
        assert set(thread_policies(server).values()) == {os.SCHED_IDLE}


def test_set_policy_reports_what_the_kernel_refused() -> None:
    """Leaving SCHED_IDLE needs CAP_SYS_NICE unless RLIMIT_NICE allows it (sched(7)):
    as an unprivileged child with RLIMIT_NICE 0, asking for batch from idle is refused
    and said so. Checked in a child so this process keeps its policy and privileges."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            resource.setrlimit(resource.RLIMIT_NICE, (0, 0))
            os.setgid(65534)
            os.setuid(65534)
            outcome = set_policy("batch")
            expected = "sched_setscheduler failed: Operation not permitted (errno 1)"
            if not outcome.ok and outcome.detail == expected:
                code = 0 if os.sched_getscheduler(0) == os.SCHED_IDLE else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
