"""Paths no other test reached (issue 11): an I/O error in the middle of a sendfile read,
a client that vanishes while the thread pool works for it, zero-length WRITE, TRIM and
WRITE_ZEROES, and an export name that is not UTF-8. Each ends with a healthy server."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from server.nbdtest import RawClient, running_server

from faults.support import assert_healthy, chunk_error, fd_count, fill, fresh_roundtrip
from nbdserver.protocol import (
    Cmd,
    CmdFlag,
    Opt,
    OptionRequest,
    Rep,
    Request,
    SimpleReply,
    pack_info_go,
)

MiB = 1 << 20
EIO = 5
#: Guard against a server that never finishes; the waits poll, nothing asserts on time.
GUARD_S = 60.0


# --- (b) a client that vanishes while the pool works for it ---------------------------
def rst_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def last_stats(path: Path) -> dict[str, object]:
    lines = path.read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def test_client_vanishes_during_pool_operations(tmp_path: Path) -> None:
    """FUA WRITEs (each synced to disk), a FLUSH and WRITE_ZEROES run in the thread pool
    on a disk file. The client sends them, waits for the first reply (so the pool is
    busy for it) and resets the connection. The jobs in flight finish for nobody: more
    WRITEs run than the client saw answered, with no traceback, no descriptor left, and
    the next client is served."""
    image = tmp_path / "disk.img"
    with image.open("wb") as fh:
        fh.truncate(256 * MiB)
    stats = tmp_path / "stats.jsonl"
    args = [str(image), "--workers", "1", "--stats", str(stats), "--stats-interval", "0.1"]
    with running_server(tmp_path, *args) as srv:
        fresh_roundtrip(srv, offset=0)  # warm-up (one-time descriptors); one WRITE
        deadline = time.monotonic() + GUARD_S
        while open_connections(stats) and time.monotonic() < deadline:
            time.sleep(0.05)  # the server closes its side of the warm-up connection
        base = fd_count(srv)
        payload = os.urandom(MiB)
        rounds, answered = 3, 1
        for _ in range(rounds):
            c = RawClient(srv.port)
            c.go(structured=False)
            batch = b"".join(
                request(Cmd.WRITE, i * MiB, MiB, CmdFlag.FUA, i) + payload for i in range(32)
            )
            batch += request(Cmd.FLUSH, 0, 0, 0, 100)
            batch += request(Cmd.WRITE_ZEROES, 64 * MiB, 128 * MiB, CmdFlag.NO_HOLE, 101)
            sender = threading.Thread(target=send_quietly, args=(c.sock, batch))
            sender.start()
            assert c.simple_reply()[0].error == 0  # the pool is at work for this client
            answered += 1
            rst_close(c.sock)
            sender.join(GUARD_S)
        deadline = time.monotonic() + GUARD_S
        writes = 0
        while time.monotonic() < deadline:
            s = last_stats(stats)
            exports = s.get("exports", {})
            writes = exports.get("", {}).get("requests", {}).get("write", 0)  # type: ignore[attr-defined]
            if writes > answered and fd_count(srv) == base:
                break
            time.sleep(0.1)
        assert writes > answered, f"{writes} WRITEs ran, {answered} answered"
        assert fd_count(srv) == base, "descriptors left behind by vanished clients"
        assert_healthy(srv, workers=1)
        fresh_roundtrip(srv)


def open_connections(stats: Path) -> int:
    """Connections the server holds, from its last stats line (-1 before the first)."""
    line = last_stats(stats)
    return int(line["connections"]["open"]) if line else -1  # type: ignore[index]


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send until the connection is reset under us (that is the point of the test)."""
    with contextlib.suppress(OSError):
        sock.sendall(data)


def request(cmd: int, offset: int, length: int, flags: int, cookie: int) -> bytes:
    return Request(flags, cmd, cookie, offset, length).pack()


# --- (c) zero-length WRITE, TRIM and WRITE_ZEROES ---------------------------------------
@pytest.mark.parametrize("backend", ["memory", "file"])
@pytest.mark.parametrize("structured", [False, True])
def test_zero_length_requests_succeed_and_change_nothing(
    tmp_path: Path, backend: str, structured: bool
) -> None:
    """doc/proto.md sets no minimum length for WRITE, TRIM or WRITE_ZEROES (only the
    bounds: offset + length within the export), so a zero-length one is valid, affects
    no byte, and gets a success reply; FUA on it "MAY" be ignored as nothing is written."""
    if backend == "memory":
        args = ["--memory", "16M"]
    else:
        image = tmp_path / "disk.img"
        fill(image, 16 * MiB)
        args = [str(image)]
    with running_server(tmp_path, *args, "--workers", "1") as srv:
        with RawClient(srv.port) as c:
            c.go(structured=structured, meta=False)
            c.request(Cmd.READ, 0, 8192, cookie=1)
            before = c.reply() if structured else c.simple_reply(8192)
            cases = [
                (Cmd.WRITE, 0),
                (Cmd.WRITE, CmdFlag.FUA),
                (Cmd.TRIM, 0),
                (Cmd.TRIM, CmdFlag.FUA),
                (Cmd.WRITE_ZEROES, 0),
                (Cmd.WRITE_ZEROES, CmdFlag.NO_HOLE),
                (Cmd.WRITE_ZEROES, CmdFlag.FAST_ZERO),
                (Cmd.WRITE_ZEROES, CmdFlag.FUA | CmdFlag.NO_HOLE),
            ]
            for cookie, (cmd, flags) in enumerate(cases, start=10):
                for offset in (0, 4096, 16 * MiB):  # the end of the export is in bounds
                    c.request(cmd, offset, 0, flags=flags, cookie=cookie)
                    reply = c.reply()
                    assert isinstance(reply, SimpleReply), (cmd, flags, reply)
                    assert (reply.error, reply.cookie) == (0, cookie), (cmd, flags, offset)
            c.request(Cmd.READ, 0, 8192, cookie=1)
            after = c.reply() if structured else c.simple_reply(8192)
            assert after == before
            # Past the end stays an error even at length 0.
            c.request(Cmd.WRITE, 16 * MiB + 4096, 0, cookie=99)
            reply = c.reply()
            errno = reply.error if isinstance(reply, SimpleReply) else chunk_error(reply[-1])
            assert errno != 0, reply
        assert_healthy(srv, workers=1)


# --- (d) an export name that is not UTF-8 -----------------------------------------------
BAD_NAMES = [b"\xff\xfe", b"swap\xc3", b"\xed\xa0\x80", b"ok\x80ok"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: n.hex())
def test_export_name_not_utf8(tmp_path: Path, name: bytes) -> None:
    """NBD_OPT_GO/INFO: NBD_REP_ERR_INVALID ("syntactically invalid"; a name is a string,
    "a sequence of UTF-8 code points") with a message naming the bytes; the session goes
    on. NBD_OPT_EXPORT_NAME cannot be answered with an error: the server closes. The log
    says why in readable text."""
    with running_server(
        tmp_path, "--memory", "8M", "--workers", "1", "--log-level", "debug"
    ) as srv:
        with RawClient(srv.port) as c:
            c.handshake()
            for option in (Opt.GO, Opt.INFO):
                (reply,) = c.option(option, pack_info_go(name, []))
                assert reply.reply == Rep.ERR_INVALID, reply
                message = reply.data.decode("utf-8")  # the message itself is valid UTF-8
                assert "UTF-8" in message and repr(name)[2:-1] in message, message
            # The same session can still pick the right export.
            replies = c.option(Opt.GO, pack_info_go(b"", []))
            assert replies[-1].reply == Rep.ACK
        with RawClient(srv.port) as c:
            c.handshake()
            c.send(OptionRequest(Opt.EXPORT_NAME, name).pack())
            assert c.at_eof()
        log = srv.log()
        lines = [line for line in log.splitlines() if "UTF-8" in line]
        assert len(lines) >= 3, log
        assert all(line.isprintable() for line in lines), lines
        assert_healthy(srv, workers=1)
        fresh_roundtrip(srv, offset=0)
