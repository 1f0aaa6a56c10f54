"""Connection churn and idle connections against one nbd-serve: nothing may leak.

10,000 connect + handshake (NBD_OPT_GO) + NBD_CMD_DISC cycles, then 500 idle connections
that finished the handshake and 100 that stopped in the middle of it. Afterwards the
server's descriptors (all processes) are exactly what they were and its RSS is within
:data:`RSS_SLACK` of it. The RSS cost of one idle connection is printed (run pytest
with ``-s`` to see it; REPORT-faults.md has the figures).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from server.nbdtest import RawClient, ServerProcess, running_server

from faults.support import assert_healthy, fd_count, fresh_roundtrip, rss
from nbdserver.protocol import Cmd, Opt, OptionRequest, Rep, Request, pack_info_go

CYCLES = int(os.environ.get("SWAPNBD_CHURN_CYCLES", "10000"))
IDLE = 500
MID_HANDSHAKE = 100
RSS_SLACK = 8 << 20
#: Guard against a server that never closes (the wait polls; it is not a timed assert).
SETTLE_GUARD_S = 60.0

DISC = Request(0, Cmd.DISC, 0, 0, 0).pack()
GO = pack_info_go(b"", [])


def handshake(port: int) -> RawClient:
    """A client in transmission after NBD_OPT_GO (simple replies, no options else)."""
    c = RawClient(port)
    c.handshake()
    assert c.option(Opt.GO, GO)[-1].reply == Rep.ACK
    return c


def settle(srv: ServerProcess, want_fds: int) -> int:
    """Wait until the server has closed its side of every connection; return its fds."""
    deadline = time.monotonic() + SETTLE_GUARD_S
    while (now := fd_count(srv)) != want_fds and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


def steady_fds(srv: ServerProcess) -> int:
    """The descriptor count once it has not changed for half a second (the warm-up
    connections are closed on the server's side too)."""
    deadline = time.monotonic() + SETTLE_GUARD_S
    last, same = fd_count(srv), 0
    while same < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
        now = fd_count(srv)
        same = same + 1 if now == last else 0
        last = now
    return last


def wait_for(srv: ServerProcess, at_least: int) -> None:
    """Wait until the server holds ``at_least`` descriptors (it accepted everyone)."""
    deadline = time.monotonic() + SETTLE_GUARD_S
    while fd_count(srv) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fd_count(srv) >= at_least, f"server holds {fd_count(srv)} descriptors, want {at_least}"


def churn(port: int, cycles: int) -> None:
    for _ in range(cycles):
        c = handshake(port)
        c.send(DISC)
        assert c.at_eof()  # the server closes after NBD_CMD_DISC
        c.close()


@pytest.fixture(params=[1, 2], ids=["one-process", "two-workers"])
def churn_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerProcess]:
    workers = request.param
    with running_server(tmp_path, "--memory", "64M", "--workers", str(workers)) as srv:
        srv.extra["workers"] = workers
        yield srv
        assert_healthy(srv, workers=workers)


def test_churn_and_idle_connections_leave_nothing_behind(churn_server: ServerProcess) -> None:
    srv = churn_server
    workers = int(srv.extra["workers"])  # type: ignore[call-overload]
    # Warm-up: the first connections of each process grow arenas and caches, and open
    # one descriptor once (/dev/null, on a process's first connection); concurrent
    # connections make the acceptor hand some to the worker.
    churn(srv.port, 200)
    warm = [handshake(srv.port) for _ in range(8)]
    for c in warm:
        c.close()
    base_fds = steady_fds(srv)
    base_rss = rss(srv)

    # Every connection goes through the hand-off when there are workers (5 ms each), so
    # the two-worker run does a fifth of the cycles.
    cycles = CYCLES if workers == 1 else CYCLES // 5
    t0 = time.monotonic()
    churn(srv.port, cycles)
    churn_s = time.monotonic() - t0
    assert settle(srv, base_fds) == base_fds, "descriptors leaked by connect/disconnect churn"
    after_churn_rss = rss(srv)

    idle = [handshake(srv.port) for _ in range(IDLE)]
    wait_for(srv, base_fds + IDLE)
    idle_rss = rss(srv)
    mid: list[socket.socket] = []
    for i in range(MID_HANDSHAKE):
        c = RawClient(srv.port)
        if i % 2:  # flags sent, then half of an option header
            c.handshake()
            c.send(OptionRequest(Opt.GO, GO).pack()[:9])
        mid.append(c.sock)
    wait_for(srv, base_fds + IDLE + MID_HANDSHAKE)
    fresh_roundtrip(srv)  # still serving while 600 connections idle
    for c in idle:
        c.close()
    for sock in mid:
        sock.close()
    assert settle(srv, base_fds) == base_fds, "descriptors leaked by idle connections"
    end_rss = rss(srv)
    per_idle = (idle_rss - after_churn_rss) / IDLE
    print(
        f"\nchurn[{workers} process(es)]: {cycles} cycles in {churn_s:.1f} s "
        f"({cycles / churn_s:.0f}/s); RSS base {base_rss >> 10} KiB, after churn "
        f"{after_churn_rss >> 10} KiB, with {IDLE} idle {idle_rss >> 10} KiB "
        f"({per_idle / 1024:.1f} KiB per idle connection), after close {end_rss >> 10} KiB"
    )
    assert after_churn_rss <= base_rss + RSS_SLACK, "RSS grew with churn"
    assert end_rss <= base_rss + RSS_SLACK, "RSS did not come back after idle connections"
    assert_healthy(srv, workers=workers)
