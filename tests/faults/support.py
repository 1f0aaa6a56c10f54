"""Helpers of the fault tests: health checks, descriptor and RSS counts, quick clients.

"Healthy" is stricter than "still answers": the log shows no crash (tests/server/
crashwatch.py: a traceback, asyncio's "Fatal error" - a handler that crashed closes only
its connection, which looks like a clean close - or a dead worker), and the process and
every worker process are alive.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil
from server.crashwatch import crash_lines
from server.nbdtest import RawClient, ServerProcess

from nbdserver.protocol import Cmd, StructuredChunk


def processes(srv: ServerProcess) -> list[psutil.Process]:
    """The server process and its worker processes."""
    top = psutil.Process(srv.proc.pid)
    return [top, *top.children()]


def assert_healthy(srv: ServerProcess, workers: int | None = None) -> None:
    """No crash in the log; the server (and ``workers`` processes in all) alive."""
    log = srv.log()
    bad = crash_lines(log)
    assert not bad, f"server log shows a crash: {bad[:5]}\n{log[-4000:]}"
    assert srv.alive(), f"server exited {srv.proc.returncode}:\n{log[-4000:]}"
    procs = processes(srv)
    assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs), procs
    if workers is not None:
        assert len(procs) == workers, f"{len(procs)} processes, expected {workers}"


def read_direct(srv: ServerProcess, offset: int, length: int) -> bytes:
    """Read through a fresh connection straight to the server (no proxy)."""
    with RawClient(srv.port) as c:
        c.go(structured=False)
        c.request(Cmd.READ, offset, length)
        reply, data = c.simple_reply(length)
        assert reply.error == 0, reply
        c.request(Cmd.DISC)
        return data


def fresh_roundtrip(srv: ServerProcess, offset: int = 63 << 20) -> None:
    """A new client writes 64 KiB and reads the same bytes back."""
    data = os.urandom(65536)
    with RawClient(srv.port) as c:
        c.go(structured=False)
        c.request(Cmd.WRITE, offset, len(data), payload=data)
        assert c.simple_reply()[0].error == 0
        c.request(Cmd.READ, offset, len(data), cookie=2)
        reply, got = c.simple_reply(len(data))
        assert reply.error == 0 and got == data
        c.request(Cmd.DISC)


def fd_count(srv: ServerProcess) -> int:
    """Open descriptors of the server and its workers."""
    return sum(len(os.listdir(f"/proc/{p.pid}/fd")) for p in processes(srv))


def rss(srv: ServerProcess) -> int:
    """Resident memory of the server and its workers, in bytes."""
    return sum(p.memory_info().rss for p in processes(srv))


def fill(path: Path, size: int) -> bytes:
    """Write ``size`` bytes of data (no holes) to ``path``, each 4 KiB page numbered."""
    text = (b"swapnbd!" * (size // 8 + 1))[:size]
    data = b"".join(i.to_bytes(4, "big") + text[i + 4 : i + 4096] for i in range(0, size, 4096))
    path.write_bytes(data)
    return data


def chunk_error(chunk: StructuredChunk) -> int:
    """The errno of an error chunk."""
    return int.from_bytes(chunk.payload[:4], "big")
