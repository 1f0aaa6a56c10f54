"""The asyncio adapter with real sockets, over asyncio and uvloop (see conftest)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from nbdserver.errors import NBDErrno
from nbdserver.protocol import (
    Cmd,
    CmdFlag,
    ExtendedChunk,
    Opt,
    Rep,
    ReplyType,
    SimpleReply,
    State,
    StructuredChunk,
    pack_info_go,
)

from .conftest import ThreadedServer, faulty, file_backend, memory
from .nbdtest import RawClient

MiB = 1 << 20
Start = Callable[..., ThreadedServer]


def read_data(chunks: Sequence[StructuredChunk | ExtendedChunk], offset: int, length: int) -> bytes:
    """Reassemble a structured (or extended) read reply; zero holes are filled in."""
    out = bytearray(length)
    covered = 0
    for c in chunks:
        if c.type == ReplyType.OFFSET_DATA:
            at = int.from_bytes(c.payload[:8], "big") - offset
            out[at : at + len(c.payload) - 8] = c.payload[8:]
            covered += len(c.payload) - 8
        elif c.type == ReplyType.OFFSET_HOLE:
            covered += int.from_bytes(c.payload[8:12], "big")
        else:
            assert c.type == ReplyType.NONE, c
    assert covered == length
    return bytes(out)


def test_simple_write_read_round_trip(make_server: Start) -> None:
    srv = make_server(("", memory(), False))
    with RawClient(srv.port) as c:
        assert c.go(structured=False) == 16 * MiB
        data = os.urandom(8192)
        c.request(Cmd.WRITE, 4096, len(data), cookie=11, payload=data)
        assert c.simple_reply() == (SimpleReply(0, 11), b"")
        c.request(Cmd.READ, 4096, len(data), cookie=12)
        assert c.simple_reply(len(data)) == (SimpleReply(0, 12), data)
        c.request(Cmd.DISC)
        assert c.at_eof()


def test_structured_read_sends_holes(make_server: Start) -> None:
    srv = make_server(("", memory(), False))
    with RawClient(srv.port) as c:
        c.go()
        data = b"\xab" * 4096
        c.request(Cmd.WRITE, MiB, 4096, cookie=1, payload=data)
        assert c.reply() == SimpleReply(0, 1)
        c.request(Cmd.READ, 0, 2 * MiB, cookie=2)
        chunks = c.reply()
        assert isinstance(chunks, list)
        types = [ch.type for ch in chunks]
        assert types == [ReplyType.OFFSET_HOLE, ReplyType.OFFSET_DATA, ReplyType.OFFSET_HOLE]
        assert all(ch.cookie == 2 for ch in chunks) and chunks[-1].flags & 1
        assert read_data(chunks, 0, 2 * MiB) == bytes(MiB) + data + bytes(MiB - 4096)
        # With DF: exactly one content chunk, zeroes explicitly present.
        c.request(Cmd.READ, 0, 2 * MiB, cookie=3, flags=CmdFlag.DF)
        chunks = c.reply()
        assert isinstance(chunks, list)
        assert [ch.type for ch in chunks] == [ReplyType.OFFSET_DATA]
        assert read_data(chunks, 0, 2 * MiB)[MiB : MiB + 4096] == data


def test_block_status_and_req_one(make_server: Start) -> None:
    srv = make_server(("", memory(), False))
    with RawClient(srv.port) as c:
        c.go()
        c.request(Cmd.WRITE, 0, 65536, cookie=1, payload=b"x" * 65536)
        assert c.reply() == SimpleReply(0, 1)
        c.request(Cmd.BLOCK_STATUS, 0, 4 * MiB, cookie=2)
        (chunk,) = c.reply()  # type: ignore[misc]
        assert chunk.type == ReplyType.BLOCK_STATUS and chunk.flags & 1
        body = chunk.payload
        assert int.from_bytes(body[:4], "big") == 1  # the context id handed out
        pairs = [
            (int.from_bytes(body[i : i + 4], "big"), int.from_bytes(body[i + 4 : i + 8], "big"))
            for i in range(4, len(body), 8)
        ]
        assert pairs == [(65536, 0), (4 * MiB - 65536, State.HOLE | State.ZERO)]
        c.request(Cmd.BLOCK_STATUS, 0, 4 * MiB, cookie=3, flags=CmdFlag.REQ_ONE)
        (chunk,) = c.reply()  # type: ignore[misc]
        assert len(chunk.payload) == 12 and chunk.payload[4:8] == (65536).to_bytes(4, "big")


def test_errors_keep_the_connection(make_server: Start) -> None:
    srv = make_server(("", memory(MiB), False), ("ro", memory(MiB, read_only=True), True))
    with RawClient(srv.port) as c:
        c.go(structured=False)
        cases = [
            (Cmd.WRITE, MiB, 512, 0, NBDErrno.ENOSPC),
            (Cmd.WRITE_ZEROES, MiB - 512, 1024, 0, NBDErrno.ENOSPC),
            (Cmd.READ, MiB, 1, 0, NBDErrno.EINVAL),
            (Cmd.TRIM, MiB, 1, 0, NBDErrno.EINVAL),
            (Cmd.CACHE, 0, MiB + 1, 0, NBDErrno.EINVAL),
            (42, 0, 0, 0, NBDErrno.EINVAL),
            (Cmd.READ, 0, 512, 1 << 7, NBDErrno.EINVAL),
        ]
        for i, (cmd, offset, length, flags, errno) in enumerate(cases):
            payload = b"p" * length if cmd == Cmd.WRITE else b""
            c.request(cmd, offset, length, cookie=100 + i, flags=flags, payload=payload)
            assert c.simple_reply() == (SimpleReply(errno, 100 + i), b""), cmd
        c.request(Cmd.READ, 0, 512, cookie=7)
        assert c.simple_reply(512) == (SimpleReply(0, 7), bytes(512))
    with RawClient(srv.port) as c:
        c.go(b"ro")
        for i, cmd in enumerate((Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)):
            payload = b"w" * 512 if cmd == Cmd.WRITE else b""
            c.request(cmd, 0, 512, cookie=i, payload=payload)
            (chunk,) = c.reply()  # type: ignore[misc]
            assert chunk.type == ReplyType.ERROR
            assert int.from_bytes(chunk.payload[:4], "big") == NBDErrno.EPERM
            assert b"read-only" in chunk.payload


def test_backend_failure_becomes_error_reply(make_server: Start) -> None:
    srv = make_server(("", faulty(), False))
    with RawClient(srv.port) as c:
        c.go()
        c.request(Cmd.READ, MiB, 4096, cookie=1)
        (chunk,) = c.reply()  # type: ignore[misc]
        assert (chunk.type, chunk.cookie) == (ReplyType.ERROR, 1)
        assert int.from_bytes(chunk.payload[:4], "big") == NBDErrno.EIO
        assert b"injected read failure" in chunk.payload
        c.request(Cmd.WRITE, MiB, 8, cookie=2, payload=b"12345678")
        (chunk,) = c.reply()  # type: ignore[misc]
        assert int.from_bytes(chunk.payload[:4], "big") == NBDErrno.EIO
        c.request(Cmd.WRITE, 0, 8, cookie=3, payload=b"12345678")
        assert c.reply() == SimpleReply(0, 3)


def test_large_faulty_read_becomes_error_reply(make_server: Start) -> None:
    srv = make_server(("", faulty(), False))
    with RawClient(srv.port) as c:
        c.go()
        c.request(Cmd.WRITE, 0, MiB, cookie=1, payload=b"\x01" * MiB)
        assert c.reply() == SimpleReply(0, 1)
        c.request(Cmd.READ, MiB - 4096, MiB, cookie=2)
        (chunk,) = c.reply()  # type: ignore[misc]
        assert (chunk.type, chunk.cookie) == (ReplyType.ERROR, 2)
        assert int.from_bytes(chunk.payload[:4], "big") == NBDErrno.EIO


def test_large_reads_of_data_leave_by_sendfile(make_server: Start, tmp_path: Path) -> None:
    """A large read that starts in data, from memory (a memfd, a tmpfs file), goes out
    zero-copy: one OFFSET_DATA chunk without DONE (an error could still strike
    mid-transfer), then NONE with DONE."""
    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        backends = (memory(8 * MiB), file_backend(shm / "disk.img", 8 * MiB))
        for backend in backends:
            check_sendfile_reads(make_server(("", backend, False)))
    finally:
        shutil.rmtree(shm)


def test_large_reads_of_disk_files_stay_off_the_event_loop(
    make_server: Start, tmp_path: Path
) -> None:
    """A file on storage could make sendfile wait for the disk on the event loop, so its
    large reads take the buffered path: one OFFSET_DATA chunk that carries DONE."""
    assert tmp_path.stat().st_dev != os.stat("/dev/shm").st_dev
    srv = make_server(("", file_backend(tmp_path / "disk.img", 8 * MiB), False))
    data = os.urandom(2 * MiB)
    with RawClient(srv.port) as c:
        c.go()
        c.request(Cmd.WRITE, 0, len(data), cookie=1, payload=data)
        assert c.reply() == SimpleReply(0, 1)
        c.request(Cmd.READ, 0, len(data), cookie=2)
        chunks = c.reply()
        assert isinstance(chunks, list)
        assert [(ch.type, ch.flags & 1) for ch in chunks] == [(ReplyType.OFFSET_DATA, 1)]
        assert read_data(chunks, 0, len(data)) == data


def check_sendfile_reads(srv: ThreadedServer) -> None:
    """Reply shapes and bytes of large reads through ``srv``, structured and simple."""
    data = os.urandom(4 * MiB)
    with RawClient(srv.port) as c:
        c.go()
        c.request(Cmd.WRITE, 0, len(data), cookie=1, payload=data)
        assert c.reply() == SimpleReply(0, 1)
        c.request(Cmd.READ, 4096, 2 * MiB, cookie=2)
        chunks = c.reply()
        assert isinstance(chunks, list)
        assert [(ch.type, ch.flags & 1) for ch in chunks] == [
            (ReplyType.OFFSET_DATA, 0),
            (ReplyType.NONE, 1),
        ]
        assert read_data(chunks, 4096, 2 * MiB) == data[4096 : 4096 + 2 * MiB]
    with RawClient(srv.port) as c:
        c.go(structured=False)
        c.request(Cmd.READ, MiB, 3 * MiB, cookie=3)
        assert c.simple_reply(3 * MiB) == (SimpleReply(0, 3), data[MiB:])


def test_pipelined_large_reads_survive_a_full_socket(make_server: Start) -> None:
    """The client sends many large reads before reading any reply: sendfile meets a
    full socket, queues the rest through the transport, and later reads take the
    buffered path behind it. Every byte arrives, in one reply per cookie."""
    srv = make_server(("", memory(64 * MiB), False))
    data = os.urandom(48 * MiB)
    with RawClient(srv.port) as c:
        c.go(structured=False)
        half = len(data) // 2  # a WRITE may carry at most 32 MiB
        for cookie, at in ((1, 0), (2, half)):
            c.request(Cmd.WRITE, at, half, cookie=cookie, payload=data[at : at + half])
            assert c.simple_reply() == (SimpleReply(0, cookie), b"")
        from nbdserver.protocol import Request

        size = 2 * MiB
        c.send(b"".join(Request(0, Cmd.READ, 100 + i, i * size, size).pack() for i in range(24)))
        seen = {}
        for _ in range(24):
            reply, payload = c.simple_reply(size)
            assert reply.error == 0
            seen[reply.cookie] = payload
        assert sorted(seen) == list(range(100, 124))
        assert b"".join(seen[100 + i] for i in range(24)) == data


def test_replies_in_completion_order(make_server: Start, tmp_path: Path) -> None:
    """FLUSH on a file export goes to the thread pool; a READ pipelined behind it is
    served inline, so its reply comes first, matched by cookie."""
    srv = make_server(("", file_backend(tmp_path / "disk.img"), False))
    with RawClient(srv.port) as c:
        c.go(structured=False)
        from nbdserver.protocol import Request

        c.send(Request(0, Cmd.FLUSH, 1, 0, 0).pack() + Request(0, Cmd.READ, 2, 0, 16).pack())
        first = c.simple_reply(16)
        second = c.simple_reply()
        assert (first[0].cookie, first[1], second[0].cookie) == (2, bytes(16), 1)
        assert (first[0].error, second[0].error) == (0, 0)


def test_many_in_flight_and_large_writes(make_server: Start) -> None:
    srv = make_server(("", memory(64 * MiB), False))
    with RawClient(srv.port) as c:
        c.go(structured=False)
        big = os.urandom(8 * MiB)  # larger than the initial receive buffer
        c.request(Cmd.WRITE, 0, len(big), cookie=1, payload=big)
        assert c.simple_reply() == (SimpleReply(0, 1), b"")
        # 64 pipelined reads in one send; every cookie answered exactly once.
        from nbdserver.protocol import Request

        c.send(b"".join(Request(0, Cmd.READ, 1000 + i, i * 65536, 65536).pack() for i in range(64)))
        seen = {}
        for _ in range(64):
            reply, data = c.simple_reply(65536)
            seen[reply.cookie] = data
        assert sorted(seen) == list(range(1000, 1064))
        assert b"".join(seen[1000 + i] for i in range(64)) == big[: 64 * 65536]


def test_oversized_write_is_refused_and_skipped(make_server: Start) -> None:
    srv = make_server(("", memory(), False))
    with RawClient(srv.port) as c:
        c.go(structured=False)
        too_big = 33 * MiB  # above the advertised 32 MiB maximum block size
        c.request(Cmd.WRITE, 0, too_big, cookie=5)
        assert c.simple_reply() == (SimpleReply(NBDErrno.EINVAL, 5), b"")
        chunk = b"\0" * MiB
        for _ in range(33):
            c.send(chunk)
        c.request(Cmd.READ, 0, 4, cookie=6)
        assert c.simple_reply(4) == (SimpleReply(0, 6), bytes(4))


def test_bad_magic_closes_only_that_connection(make_server: Start) -> None:
    srv = make_server(("", memory(), False))
    with RawClient(srv.port) as good, RawClient(srv.port) as bad:
        good.go()
        bad.go()
        bad.send(b"\xff" * 28)
        assert bad.at_eof()
        good.request(Cmd.READ, 0, 16, cookie=9, flags=CmdFlag.DF)
        (chunk,) = good.reply()  # type: ignore[misc]
        assert chunk.type == ReplyType.OFFSET_DATA and chunk.payload == bytes(24)


def test_multi_conn_flush_covers_other_connection(make_server: Start) -> None:
    srv = make_server(("", memory(), False))
    with RawClient(srv.port) as a, RawClient(srv.port) as b:
        a.go(structured=False)
        b.go(structured=False)
        a.request(Cmd.WRITE, 8192, 5, cookie=1, payload=b"hello")
        assert a.simple_reply()[0] == SimpleReply(0, 1)
        b.request(Cmd.FLUSH, cookie=2)
        assert b.simple_reply()[0] == SimpleReply(0, 2)
        b.request(Cmd.READ, 8192, 5, cookie=3)
        assert b.simple_reply(5) == (SimpleReply(0, 3), b"hello")


def test_stats_are_counted(make_server: Start) -> None:
    srv = make_server(("", memory(), False))
    with RawClient(srv.port) as c:
        c.go(structured=False)
        c.request(Cmd.WRITE, 0, 100, cookie=1, payload=b"a" * 100)
        c.simple_reply()
        c.request(Cmd.READ, 0, 50, cookie=2)
        c.simple_reply(50)
        c.request(Cmd.READ, 16 * MiB, 50, cookie=3)
        c.simple_reply()
        c.request(Cmd.FLUSH, cookie=4)
        c.simple_reply()
    assert srv.server is not None
    snap = srv.server.exports[""].stats.snapshot()
    assert snap["requests"]["read"] == 2 and snap["requests"]["write"] == 1
    assert snap["requests"]["flush"] == 1
    assert snap["bytes"] == {"read": 50, "write": 100}
    assert snap["errors"]["read"] == 1 and snap["errors"]["write"] == 0
    assert sum(snap["latency_us"]["read"]["counts"]) == 2
    # Sizes of the successful data requests, by power of two: 50 is in [32, 64), 100 in
    # [64, 128); the failed READ (past the end) is not a size the client got.
    sizes = snap["size_bytes"]
    assert sizes["read"]["ge"][6:8] == [32, 64]
    assert (sizes["read"]["counts"][6], sum(sizes["read"]["counts"])) == (1, 1)
    assert (sizes["write"]["counts"][7], sum(sizes["write"]["counts"])) == (1, 1)


def test_export_name_and_option_errors(make_server: Start) -> None:
    srv = make_server(("disk", memory(MiB), False))
    with RawClient(srv.port) as c:
        size, flags = c.export_name(b"disk")
        assert size == MiB and flags & 1
    with RawClient(srv.port) as c:
        c.handshake()
        assert c.option(Opt.GO, pack_info_go(b"missing", []))[-1].reply == Rep.ERR_UNKNOWN
        assert c.option(77)[-1].reply == Rep.ERR_UNSUP
        # The empty name is the default export only when one is called "": a client
        # that gives no name never lands on a named export.
        assert c.option(Opt.GO, pack_info_go(b"", []))[-1].reply == Rep.ERR_UNKNOWN
    s = socket.create_connection(("127.0.0.1", srv.port))
    with RawClient(sock=s) as c:
        c.handshake()
        assert c.option(Opt.ABORT)[-1].reply == Rep.ACK
        assert c.at_eof()
