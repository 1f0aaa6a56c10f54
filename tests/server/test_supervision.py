"""Worker processes are watched: one killed with SIGKILL is detected, reported in the log
and the stats, and replaced; its clients see their connection end, every other client
keeps working, and nbd-serve does not exit 0 afterwards (nbdserver.workers)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil

from nbdserver.protocol import Cmd
from nbdserver.workers import EXIT_WORKER_DIED

from .nbdtest import (
    STARTUP_GUARD_S,
    RawClient,
    ServerProcess,
    require_tool,
    run_tool,
    running_server,
)


def wait_for(what: str, check: object, server: ServerProcess) -> None:
    deadline = time.monotonic() + STARTUP_GUARD_S
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"never happened: {what}; log:\n{server.log()}"
        time.sleep(0.02)


def holder_of(server: ServerProcess, client: RawClient) -> int:
    """The pid (parent or worker) that serves ``client``'s connection."""
    port = client.sock.getsockname()[1]
    parent = psutil.Process(server.proc.pid)
    for proc in [parent, *parent.children()]:
        for conn in proc.net_connections(kind="tcp"):
            if conn.raddr and conn.raddr.port == port:
                return proc.pid
    raise AssertionError(f"no process holds the connection from port {port}")


def round_trip(client: RawClient, block: int) -> None:
    payload = bytes([block % 251 + 1]) * 4096
    client.request(Cmd.WRITE, block * 4096, 4096, cookie=block, payload=payload)
    assert client.simple_reply()[0].error == 0
    client.request(Cmd.READ, block * 4096, 4096, cookie=block + 1)
    reply, data = client.simple_reply(4096)
    assert (reply.error, data) == (0, payload)


def assert_clean_log(log: str) -> None:
    assert "Traceback" not in log, log
    assert "Fatal error" not in log, log


def test_killed_worker_is_detected_reported_and_respawned(tmp_path: Path) -> None:
    nbdinfo = require_tool("nbdinfo")
    stats = tmp_path / "stats.jsonl"
    args = ["--memory", "16M", "--workers", "3", "--stats", str(stats), "--stats-interval", "0.1"]
    with running_server(tmp_path, *args, expect_exit=EXIT_WORKER_DIED) as server:
        parent = psutil.Process(server.proc.pid)
        clients = [RawClient(server.port) for _ in range(3)]
        try:
            for i, c in enumerate(clients):
                c.go(structured=False)
                round_trip(c, i * 10)
            holders = {holder_of(server, c): c for c in clients}
            workers = set(holders) - {server.proc.pid}
            assert workers, f"no connection went to a worker: {holders}"
            victim_pid = min(workers)
            victim = holders[victim_pid]
            os.kill(victim_pid, signal.SIGKILL)
            # The victim's client sees the end of its connection, not a hang.
            assert victim.at_eof()
            wait_for("the death is logged", lambda: "killed by signal 9" in server.log(), server)
            wait_for("a replacement", lambda: "respawn: worker" in server.log(), server)
            # Every other client carries on, on the same connection.
            for i, c in enumerate(clients):
                if c is not victim:
                    round_trip(c, 100 + i)
        finally:
            for c in clients:
                c.close()
        children = parent.children()
        assert len(children) == 2, children
        assert victim_pid not in {p.pid for p in children}
        assert all(p.status() != psutil.STATUS_ZOMBIE for p in children)
        # New connections are served, by every process including the new worker.
        for _ in range(6):
            done = run_tool(nbdinfo, "--size", server.uri())
            assert (done.returncode, done.stdout.strip()) == (0, str(16 << 20)), done.stderr

        def reported() -> bool:
            lines = stats.read_text().splitlines()
            return bool(lines) and json.loads(lines[-1])["workers"]["respawned"] == 1

        wait_for("the stats report the respawn", reported, server)
        last = json.loads(stats.read_text().splitlines()[-1])
        assert last["workers"]["died"] == 1
        assert last["workers"]["alive"] == 2
        assert victim_pid not in last["workers"]["pids"]
        assert sorted(last["workers"]["pids"]) == sorted(p.pid for p in children)
        log = server.log()
        assert "worker 1 (pid" in log or "worker 2 (pid" in log
        assert_clean_log(log)
    assert "1 worker process(es) died during the run" in server.log()
