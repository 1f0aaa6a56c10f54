"""In-flight bytes stay bounded: a client that pipelines big requests and does not read
its replies makes the server stop reading (pause_reading), not buffer without limit; every
reply still arrives, correct, once the client reads."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from nbdserver.backends.base import Backend
from nbdserver.protocol import Cmd, CmdFlag, Request
from nbdserver.server import Connection

from .conftest import ThreadedServer, file_backend, memory
from .nbdtest import STARTUP_GUARD_S, RawClient, running_server

MIB = 1 << 20
BOUND = 2 * MIB


def pattern(size: int) -> bytes:
    """Bytes that differ in every 1 MiB block (no zero runs, so no hole chunks)."""
    block = bytes(range(256)) * (MIB // 256)
    return b"".join(bytes([i & 0xFF]) + block[1:] for i in range(size // MIB))


def only_connection(srv: ThreadedServer) -> Connection:
    assert srv.server is not None
    deadline = time.monotonic() + STARTUP_GUARD_S
    while True:
        conns = [c for c in srv.server.connections if c.state.tx is not None]
        if conns:
            assert len(conns) == 1
            return conns[0]
        assert time.monotonic() < deadline, "the connection never reached transmission"
        time.sleep(0.01)


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Wait for a state change of the server (a guard against hangs, not a timing)."""
    deadline = time.monotonic() + STARTUP_GUARD_S
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


def check_read_replies(
    client: RawClient, data: bytes, count: int, every16: Callable[[], int] | None = None
) -> list[int]:
    """Read ``count`` simple replies to 1 MiB READs with cookie i at offset i MiB; replies
    may come in any order ("Replies need not be sent in the same order as requests")."""
    seen: set[int] = set()
    samples: list[int] = []
    for n in range(count):
        reply, payload = client.simple_reply(MIB)
        i = reply.cookie
        assert reply.error == 0, f"reply {i}: error {reply.error}"
        assert 0 <= i < count and i not in seen, f"unexpected cookie {i}"
        seen.add(i)
        assert payload == data[i * MIB : (i + 1) * MIB], f"reply {i} has wrong data"
        if every16 is not None and n % 16 == 0:
            samples.append(every16())
    assert seen == set(range(count))
    return samples


def test_pipelined_reads_pause_reading_at_the_bound(
    make_server: Callable[..., ThreadedServer],
) -> None:
    count = 64  # 64 MiB of replies against a 2 MiB bound
    backend = memory(count * MIB)
    data = pattern(count * MIB)
    backend.pwrite(data, 0, False)
    srv = make_server(("", backend, False))
    assert srv.server is not None
    srv.server.max_inflight_bytes = BOUND
    with RawClient(srv.port) as client:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        client.go(structured=False)
        conn = only_connection(srv)
        requests = b"".join(
            _request(Cmd.READ, cookie=i, offset=i * MIB, length=MIB) for i in range(count)
        )
        client.send(requests)  # 1.8 KB: the server receives all of it at once
        wait_for(lambda: conn.flow.read_paused and conn.flow.write_paused, "reading paused")
        answered = srv.exports[0].stats.requests["read"]
        assert answered < count, "the server answered everything: nothing held it back"
        # One request may cross the bound; never more.
        assert conn.flow.peak <= BOUND + MIB + 16, conn.flow.peak
        check_read_replies(client, data, count)
        assert conn.flow.peak <= BOUND + MIB + 16, conn.flow.peak
        assert srv.exports[0].stats.requests["read"] == count


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_pipelined_fua_writes_stay_bounded(
    make_server: Callable[..., ThreadedServer], tmp_path: Path, kind: str
) -> None:
    count = 48
    backend: Backend = (
        memory(count * MIB) if kind == "memory" else file_backend(tmp_path / "d", count * MIB)
    )
    data = pattern(count * MIB)
    srv = make_server(("", backend, False))
    assert srv.server is not None
    srv.server.max_inflight_bytes = BOUND
    with RawClient(srv.port) as client:
        client.go(structured=False)
        conn = only_connection(srv)
        sender = threading.Thread(
            target=lambda: client.send(
                b"".join(
                    _request(Cmd.WRITE, cookie=i, offset=i * MIB, length=MIB, flags=CmdFlag.FUA)
                    + data[i * MIB : (i + 1) * MIB]
                    for i in range(count)
                )
            )
        )
        sender.start()
        cookies = sorted(client.simple_reply()[0].cookie for _ in range(count))
        sender.join(STARTUP_GUARD_S)
        assert cookies == list(range(count))
        assert conn.flow.peak <= BOUND + MIB + 16, conn.flow.peak
    assert bytes(backend.pread(0, count * MIB)) == data


def _request(type_: int, *, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return Request(flags, type_, cookie, offset, length).pack()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_server_rss_stays_bounded_under_a_reader_that_does_not_read(
    tmp_path: Path, workers: str
) -> None:
    """The process-level proof: 192 MiB of pipelined READs, a 4 MiB bound; the server's
    RSS grows by far less than what was asked, and every reply is right."""
    count = 192
    size = count * MIB
    image = tmp_path / "disk.img"
    data = pattern(size)
    image.write_bytes(data)
    with running_server(
        tmp_path, str(image), "--max-inflight", "4M", "--workers", workers
    ) as server:
        procs = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children()]
        assert len(procs) == int(workers)
        with RawClient(server.port) as client:
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            client.go(structured=False)
            baseline = sum(p.memory_info().rss for p in procs)
            client.send(
                b"".join(
                    _request(Cmd.READ, cookie=i, offset=i * MIB, length=MIB) for i in range(count)
                )
            )
            # Give an unbounded server every chance to queue all 192 MiB.
            time.sleep(1.0)
            peak = sum(p.memory_info().rss for p in procs)
            samples = check_read_replies(
                client,
                data,
                count,
                every16=lambda: sum(p.memory_info().rss for p in procs),
            )
            peak = max(peak, *samples)
        growth = peak - baseline
        assert growth < 48 * MIB, f"server RSS grew by {growth / MIB:.1f} MiB"
    assert os.path.getsize(image) == size
