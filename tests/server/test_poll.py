"""Adaptive busy-polling (``--poll-us``): it serves a client that keeps one request in
flight, stays out of the way of slow clients and of shared processes, follows the
client when it goes away, and never changes a byte.

The server is a real ``nbd-serve`` process: a client thread in the same process would
share the GIL with the polling loop and distort exactly the timing under test. Counts
come from the ``poll`` object of the final ``--stats`` line (docs/architecture.md).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from nbdserver.protocol import Cmd

from .nbdtest import STARTUP_GUARD_S, RawClient, running_server

BLOCK = 4096


def stats_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def poll_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = stats_lines(path)[-1]["exports"][""]["poll"]
    return counts


def serve(tmp_path: Path, poll_us: int, stats: Path) -> Any:
    return running_server(
        tmp_path,
        "--memory",
        "16M",
        "--workers",
        "1",
        "--poll-us",
        str(poll_us),
        "--stats",
        str(stats),
        "--stats-interval",
        "0.05",
    )


def connect(port: int) -> RawClient:
    client = RawClient(port)
    client.go(b"", structured=False)
    return client


def write_then_read(client: RawClient, blocks: range, gap_s: float = 0.0) -> int:
    """QD1: write a distinct block at each index, then read each back and compare."""
    for i in blocks:
        client.request(Cmd.WRITE, i * BLOCK, BLOCK, cookie=i, payload=pattern(i))
        reply, _ = client.simple_reply()
        assert (reply.error, reply.cookie) == (0, i)
        if gap_s:
            time.sleep(gap_s)
    for i in blocks:
        client.request(Cmd.READ, i * BLOCK, BLOCK, cookie=i)
        reply, data = client.simple_reply(BLOCK)
        assert (reply.error, reply.cookie) == (0, i)
        assert data == pattern(i), f"block {i} came back changed"
        if gap_s:
            time.sleep(gap_s)
    return 2 * len(blocks)


def pattern(i: int) -> bytes:
    return i.to_bytes(4, "big") * (BLOCK // 4)


def test_lone_qd1_client_is_answered_by_polling(tmp_path: Path) -> None:
    stats = tmp_path / "stats.jsonl"
    # A generous 2 ms window: the client's next request comes within it even on a
    # loaded machine, so nearly every request should be caught by polling.
    with serve(tmp_path, 2000, stats) as srv:
        client = connect(srv.port)
        requests = write_then_read(client, range(1000))
        client.close()
    poll = poll_counts(stats)
    assert poll["hits"] >= requests // 4, poll
    assert poll["hits"] + poll["misses"] <= requests, poll
    assert poll["spin_us"] > 0


@pytest.mark.parametrize(
    ("poll_us", "connections", "blocks", "gap_s"),
    [
        # Polling switched off.
        (0, 1, 300, 0.0),
        # Every wait (20 ms) is longer than the bound (50 µs): the window never opens. The
        # gap is long so that a server descheduled between sending a reply and timing the
        # wait (a loaded 2-core machine; it was 5 ms and failed there) still sees it.
        (50, 1, 40, 0.02),
        # One process serving two connections: polling one would delay the other.
        (2000, 2, 200, 0.0),
    ],
    ids=["poll-us-0", "slow-client", "two-connections"],
)
def test_never_polled(
    tmp_path: Path, poll_us: int, connections: int, blocks: int, gap_s: float
) -> None:
    stats = tmp_path / "stats.jsonl"
    with serve(tmp_path, poll_us, stats) as srv:
        clients = [connect(srv.port) for _ in range(connections)]
        for client in clients:
            write_then_read(client, range(blocks), gap_s=gap_s)
        for client in clients:
            client.close()
    assert poll_counts(stats) == {"hits": 0, "misses": 0, "spin_us": 0}


def test_window_closes_when_the_client_slows_down(tmp_path: Path) -> None:
    stats = tmp_path / "stats.jsonl"
    with serve(tmp_path, 2000, stats) as srv:
        client = connect(srv.port)
        write_then_read(client, range(300))
        # Let a stats line record the fast phase before the slow one starts.
        time.sleep(0.5)
        before = poll_counts(stats)
        assert before["hits"] > 0, before
        write_then_read(client, range(300, 330), gap_s=0.005)
        client.close()
    after = poll_counts(stats)
    # Each 5 ms wait halves the window: 2000 -> 1000 -> ... -> below 10 µs -> 0, at most
    # eight expired windows (plus the one the pause above may have cost).
    assert after["misses"] - before["misses"] <= 10, (before, after)


def test_client_leaving_mid_poll_closes_its_connection(tmp_path: Path) -> None:
    stats = tmp_path / "stats.jsonl"
    with serve(tmp_path, 2000, stats) as srv:
        client = connect(srv.port)
        write_then_read(client, range(200))
        # Closing right after a reply lands in the server's poll window: it must see
        # the end of the stream and drop the connection, not spin or hang.
        client.close()
        deadline = time.monotonic() + STARTUP_GUARD_S
        while not (lines := stats_lines(stats)) or lines[-1]["connections"]["open"] != 0:
            assert time.monotonic() < deadline, "the closed connection was never dropped"
            time.sleep(0.05)
        # The server still serves a new client.
        again = connect(srv.port)
        write_then_read(again, range(8))
        again.close()
        assert srv.alive()
    assert os.path.getsize(stats) > 0
