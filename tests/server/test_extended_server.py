"""Extended headers through the asyncio adapter with real sockets (over asyncio and
uvloop, see conftest): a round trip on a 16 GiB sparse RAM disk with offsets and effect
lengths past 4 GiB, block status as NBD_REPLY_TYPE_BLOCK_STATUS_EXT, the sendfile path,
error chunks, and the violations that end a session."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import pytest

from nbdserver.errors import NBDErrno
from nbdserver.protocol import (
    BLOCK_DESCRIPTOR_EXT,
    BLOCK_STATUS_EXT_HEAD,
    Cmd,
    CmdFlag,
    ExtendedChunk,
    ExtendedRequest,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    Request,
    State,
    pack_info_go,
)

from .conftest import ThreadedServer, memory
from .nbdtest import RawClient
from .test_server import read_data as reassemble

MiB = 1 << 20
GiB = 1 << 30
SIZE = 16 * GiB
HOLE = State.HOLE | State.ZERO
Start = Callable[..., ThreadedServer]


def read_data(chunks: list[ExtendedChunk], offset: int, length: int) -> bytes:
    """Reassemble an extended read reply; every chunk echoes the request's offset."""
    assert all(c.offset == offset for c in chunks), chunks
    return reassemble(chunks, offset, length)


def block_status(c: RawClient, offset: int, length: int, cookie: int) -> list[tuple[int, int]]:
    c.request(Cmd.BLOCK_STATUS, offset, length, cookie=cookie)
    (chunk,) = c.ext_reply()
    assert (chunk.type, chunk.flags, chunk.cookie, chunk.offset) == (
        ReplyType.BLOCK_STATUS_EXT,
        ReplyFlag.DONE,
        cookie,
        offset,
    )
    context, count = BLOCK_STATUS_EXT_HEAD.unpack_from(chunk.payload)
    assert context == 1 and len(chunk.payload) == 8 + 16 * count
    return [BLOCK_DESCRIPTOR_EXT.unpack_from(chunk.payload, 8 + 16 * i) for i in range(count)]


def ack(c: RawClient, cookie: int, offset: int) -> None:
    assert c.ext_reply() == [ExtendedChunk(ReplyFlag.DONE, ReplyType.NONE, cookie, offset, b"")]


def error(c: RawClient, cookie: int, offset: int) -> int:
    (chunk,) = c.ext_reply()
    assert (chunk.type, chunk.flags, chunk.cookie, chunk.offset) == (
        ReplyType.ERROR,
        ReplyFlag.DONE,
        cookie,
        offset,
    )
    return int.from_bytes(chunk.payload[:4], "big")


def test_extended_round_trip_past_4_gib(
    make_server: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nbdserver.server")
    srv = make_server(("", memory(SIZE), False))
    at = 5 * GiB
    data = os.urandom(8192)
    with RawClient(srv.port) as c:
        assert c.go(extended=True) == SIZE
        c.request(Cmd.WRITE, at, cookie=1, payload=data)
        ack(c, 1, at)
        c.request(Cmd.READ, at, len(data), cookie=2)
        assert read_data(c.ext_reply(), at, len(data)) == data
        # 64-bit extent lengths: the holes on both sides are longer than 4 GiB.
        assert block_status(c, 0, 10 * GiB, 3) == [
            (at, HOLE),
            (8192, 0),
            (5 * GiB - 8192, HOLE),
        ]
        # Effect lengths past 4 GiB (no payload, so the 64-bit length is the effect).
        c.request(Cmd.TRIM, 4 * GiB, 6 * GiB, cookie=4)
        ack(c, 4, 4 * GiB)
        assert block_status(c, 0, 10 * GiB, 5) == [(10 * GiB, HOLE)]
        c.request(Cmd.READ, at, len(data), cookie=6)
        assert read_data(c.ext_reply(), at, len(data)) == bytes(len(data))
        c.request(Cmd.WRITE_ZEROES, GiB, 5 * GiB, cookie=7)
        ack(c, 7, GiB)
        c.request(Cmd.CACHE, 0, SIZE, cookie=8)
        ack(c, 8, 0)
        c.request(Cmd.FLUSH, cookie=9)
        ack(c, 9, 0)
        c.request(Cmd.DISC)
        assert c.at_eof()
    assert "structured=yes extended=yes" in caplog.text


def test_extended_large_read_goes_by_sendfile(make_server: Start) -> None:
    """A large read of data in memory leaves by sendfile, framed as extended chunks: an
    OFFSET_DATA chunk without DONE, then NONE with DONE, both with the request's offset."""
    srv = make_server(("", memory(SIZE), False))
    at = 6 * GiB + 4096
    data = os.urandom(4 * MiB)
    with RawClient(srv.port) as c:
        c.go(extended=True)
        c.request(Cmd.WRITE, at, cookie=1, payload=data)
        ack(c, 1, at)
        c.request(Cmd.READ, at + MiB, 2 * MiB, cookie=2)
        chunks = c.ext_reply()
        assert [(ch.type, ch.flags) for ch in chunks] == [
            (ReplyType.OFFSET_DATA, 0),
            (ReplyType.NONE, ReplyFlag.DONE),
        ]
        assert read_data(chunks, at + MiB, 2 * MiB) == data[MiB : 3 * MiB]


def test_extended_errors_are_chunks_and_the_session_goes_on(make_server: Start) -> None:
    srv = make_server(("", memory(SIZE), False))
    with RawClient(srv.port) as c:
        c.go(extended=True)
        # READ stays bounded by the maximum block size (32 MiB here).
        c.request(Cmd.READ, 0, 64 * MiB, cookie=1)
        assert error(c, 1, 0) == NBDErrno.EOVERFLOW
        # WRITE without NBD_CMD_FLAG_PAYLOAD_LEN, as qemu's client sends it: served.
        c.send(ExtendedRequest(0, Cmd.WRITE, 2, 4096, 3).pack() + b"abc")
        ack(c, 2, 4096)
        c.request(Cmd.READ, 4096, 3, cookie=20)
        assert read_data(c.ext_reply(), 4096, 3) == b"abc"
        # A payload on TRIM is consumed and refused; the next request is understood.
        c.send(ExtendedRequest(CmdFlag.PAYLOAD_LEN, Cmd.TRIM, 3, 0, 16).pack() + bytes(16))
        assert error(c, 3, 0) == NBDErrno.EINVAL
        c.request(Cmd.WRITE, SIZE - 512, cookie=4, payload=bytes(1024))
        assert error(c, 4, SIZE - 512) == NBDErrno.ENOSPC
        c.request(Cmd.FLUSH, cookie=5)
        ack(c, 5, 0)


def test_compact_request_after_extended_headers_ends_the_session(
    make_server: Start, caplog: pytest.LogCaptureFixture
) -> None:
    srv = make_server(("", memory(), False))
    with RawClient(srv.port) as c:
        c.go(extended=True)
        c.send(Request(0, Cmd.READ, 1, 0, 512).pack() + bytes(4))
        assert c.at_eof()
    assert "compact request 0x25609513 where an extended request was due" in caplog.text


def test_structured_reply_after_extended_headers_is_refused(make_server: Start) -> None:
    srv = make_server(("", memory(), False))
    with RawClient(srv.port) as c:
        c.handshake()
        assert c.option(Opt.EXTENDED_HEADERS)[-1].reply == Rep.ACK
        assert c.option(Opt.STRUCTURED_REPLY)[-1].reply == Rep.ERR_EXT_HEADER_REQD
        assert c.option(Opt.GO, pack_info_go(b"", []))[-1].reply == Rep.ACK
        c.extended = True  # extended headers stay on: a READ gets extended chunks
        c.request(Cmd.READ, 0, 512, cookie=1)
        assert read_data(c.ext_reply(), 0, 512) == bytes(512)


def test_switched_off_extended_headers_fall_back_to_compact(
    make_server: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nbdserver.server")
    srv = make_server(("", memory(), False), extended_headers=False)
    with RawClient(srv.port) as c:
        c.handshake()
        assert c.option(Opt.EXTENDED_HEADERS)[-1].reply == Rep.ERR_UNSUP
        c.go(greet=False)
        c.request(Cmd.FLUSH, cookie=1)
        reply = c.reply()
        assert not isinstance(reply, list) and reply.cookie == 1
    assert "structured=yes extended=no" in caplog.text
