"""``--workers``: connections are spread over processes that share one export, so what
one connection writes and flushes, another reads (NBD_FLAG_CAN_MULTI_CONN), and the stats
lines count the requests of every process."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from nbdserver.cli import main
from nbdserver.config import ServerConfig, build_config
from nbdserver.protocol import Cmd, TransmissionFlag
from nbdserver.stats import ExportStats
from nbdserver.workers import default_workers, merge_stats

from .nbdtest import NBD_SERVE, STARTUP_GUARD_S, RawClient, ServerProcess, running_server


def connection_ids(server: ServerProcess, count: int) -> list[int]:
    """Ids of the connections in transmission, once ``count`` of them are logged."""
    deadline = time.monotonic() + STARTUP_GUARD_S
    while True:
        ids = [int(m) for m in re.findall(r"#(\d+)\] export", server.log())]
        if len(ids) >= count:
            return ids
        assert time.monotonic() < deadline, f"{count} connections never logged: {server.log()}"
        time.sleep(0.01)


@pytest.mark.parametrize("source", [["--memory", "64M"], ["FILE"]])
def test_two_connections_two_processes_one_export(tmp_path: Path, source: list[str]) -> None:
    if source == ["FILE"]:
        image = tmp_path / "disk.img"
        image.write_bytes(bytes(64 << 20))
        source = [str(image)]
    stats = tmp_path / "stats.jsonl"
    args = [*source, "--workers", "2", "--stats", str(stats), "--stats-interval", "0.2"]
    with running_server(tmp_path, *args) as server:
        assert len(psutil.Process(server.proc.pid).children()) == 1
        with RawClient(server.port) as a, RawClient(server.port) as b:
            a.go(structured=False)
            b.go(structured=False)
            # Connection ids are i+1, i+1+N, ... in process i: odd ids in the first
            # process, even ones in the worker. Both must have a connection.
            ids = connection_ids(server, 2)
            assert sorted(i % 2 for i in ids) == [0, 1], server.log()
            for i in range(16):
                payload = bytes([i + 1]) * 65536
                a.request(Cmd.WRITE, i * 65536, 65536, cookie=i, payload=payload)
                assert a.simple_reply()[0].error == 0
                a.request(Cmd.FLUSH, cookie=100 + i)
                assert a.simple_reply()[0].error == 0
                b.request(Cmd.READ, i * 65536, 65536, cookie=200 + i)
                reply, data = b.simple_reply(65536)
                assert (reply.cookie, reply.error) == (200 + i, 0)
                assert data == payload, f"block {i}: the other process did not see the write"
            a.request(Cmd.DISC)
            b.request(Cmd.DISC)
            assert a.at_eof() and b.at_eof()
    lines = [json.loads(line) for line in stats.read_text().splitlines()]
    last = lines[-1]["exports"][""]
    assert last["requests"]["write"] == 16
    assert last["requests"]["flush"] == 16
    assert last["requests"]["read"] == 16
    assert last["bytes"] == {"read": 16 * 65536, "write": 16 * 65536}
    assert sum(last["latency_us"]["read"]["counts"]) == 16
    # 64 KiB requests from both processes, merged: all in the [64 KiB, 128 KiB) bucket.
    assert (
        last["size_bytes"]["write"]["counts"][17]
        == 16
        == sum(last["size_bytes"]["write"]["counts"])
    )
    assert last["size_bytes"]["write"]["ge"][17] == 65536
    assert lines[-1]["connections"] == {"open": 0, "total": 2}


def test_workers_advertise_multi_conn(tmp_path: Path) -> None:
    with running_server(tmp_path, "--memory", "16M", "--workers", "3") as server:
        assert len(psutil.Process(server.proc.pid).children()) == 2
        clients = [RawClient(server.port) for _ in range(3)]
        try:
            for c in clients:
                size, flags = c.export_name(b"")
                assert size == 16 << 20
                assert flags & TransmissionFlag.CAN_MULTI_CONN
            ids = connection_ids(server, 3)
            assert sorted(i % 3 for i in ids) == [0, 1, 2], server.log()
        finally:
            for c in clients:
                c.close()


def test_unix_socket_with_workers(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "nbd.sock"
    with running_server(tmp_path, "--memory", "1M", "--unix", str(path), "--workers", "2"):
        for _ in range(3):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(path))
            with RawClient(sock=sock) as c:
                assert c.export_name(b"")[0] == 1 << 20


def test_merge_stats_adds_every_counter() -> None:
    own = ExportStats()
    own.record(Cmd.READ, 4096, 3_000, False)
    other = ExportStats()
    other.record(Cmd.READ, 512, 3_000, False)
    other.record(Cmd.WRITE, 100, 70_000_000_000, True)
    merged = merge_stats({"x": own}, [{"x": other.snapshot()}, {"y": other.snapshot()}])
    snap = merged["x"].snapshot()
    assert snap["requests"]["read"] == 2
    assert snap["requests"]["write"] == 1
    assert snap["errors"]["write"] == 1
    assert snap["bytes"] == {"read": 4608, "write": 0}
    assert sum(snap["latency_us"]["read"]["counts"]) == 2
    assert snap["latency_us"]["write"]["counts"][-1] == 1


def test_worker_settings() -> None:
    assert 1 <= default_workers() <= 4
    assert ServerConfig().workers is None
    assert ServerConfig().max_inflight == 8 << 20


def test_help_documents_the_performance_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for text in ("--workers", "--max-inflight", "workers = 2", 'max_inflight = "8M"'):
        assert text in out, text


def test_config_file_and_flags_set_workers_and_bound(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('workers = 3\nmax_inflight = "16M"\n[[exports]]\nsize = "1M"\n')
    config = build_config({"config": str(conf)})
    assert (config.workers, config.max_inflight) == (3, 16 << 20)
    config = build_config({"config": str(conf), "workers": 1, "max_inflight": "1M"})
    assert (config.workers, config.max_inflight) == (1, 1 << 20)


BAD = [
    (["--memory", "1M", "--workers", "0"], "workers 0 must be a whole number from 1 to 64"),
    (["--memory", "1M", "--workers", "65"], "workers 65 must be a whole number from 1 to 64"),
    (["--memory", "1M", "--max-inflight", "4K"], "max inflight 4096 bytes is too small"),
    (["--memory", "1M", "--max-inflight", "lots"], "size 'lots' is not understood"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a[2:]) for a, _ in BAD])
def test_bad_performance_settings_exit_2(argv: list[str], message: str) -> None:
    done = subprocess.run(
        [NBD_SERVE, *argv], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
