"""An I/O error in the middle of a READ that leaves by sendfile (the zero-copy path of
a file export on tmpfs), made real by shrinking the backing file under the server: the
sendfile finds the end of the file after the reply header is already on the wire."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from server.nbdtest import RawClient, ServerProcess, running_server

from faults.support import assert_healthy, chunk_error, fill, fresh_roundtrip
from nbdserver.protocol import Cmd, ReplyType, SimpleReply, StructuredChunk

MiB = 1 << 20
EIO = 5


@pytest.fixture
def tmpfs_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A 16 MiB file on tmpfs (/dev/shm), so large READs leave by sendfile."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.fail("/dev/shm (tmpfs) is needed for the sendfile path", pytrace=False)
    with tempfile.TemporaryDirectory(dir=shm) as scratch:
        image = Path(scratch) / "export.img"
        data = fill(image, 16 * MiB)
        with running_server(tmp_path, str(image), "--workers", "1") as srv:
            srv.extra.update(image=image, data=data)
            yield srv


def read_structured(c: RawClient, offset: int, length: int) -> tuple[bytes, list[StructuredChunk]]:
    """One structured READ; returns the bytes of its data chunks and all its chunks."""
    c.request(Cmd.READ, offset, length, cookie=0xFEED)
    reply = c.reply()
    assert isinstance(reply, list), reply
    data = b"".join(ch.payload[8:] for ch in reply if ch.type == ReplyType.OFFSET_DATA)
    return data, reply


def test_sendfile_read_error_is_an_error_reply(tmpfs_server: ServerProcess) -> None:
    """The backing file shrinks under the server: sendfile sends the first bytes of a
    READ and then finds the end of the file. With structured replies the spec lets the
    server finish the chunk with padding and add an error chunk ("If an error is
    detected, the server MUST still complete the transmission of any current chunk ...
    The server MUST include an error chunk"), so the client gets EIO for that request and
    the connection goes on."""
    srv = tmpfs_server
    image, data = srv.extra["image"], srv.extra["data"]
    assert isinstance(image, Path) and isinstance(data, bytes)
    with RawClient(srv.port) as c:
        c.go(structured=True, meta=False)
        got, _ = read_structured(c, 8 * MiB, MiB)
        assert got == data[8 * MiB : 9 * MiB]  # the healthy sendfile read
        os.truncate(image, 8 * MiB + 8192)
        _, chunks = read_structured(c, 8 * MiB, MiB)
        shapes = [(ch.type, ch.flags, len(ch.payload)) for ch in chunks]
        assert [ch.type for ch in chunks] == [ReplyType.OFFSET_DATA, ReplyType.ERROR_OFFSET], shapes
        data_chunk, error = chunks
        assert len(data_chunk.payload) == 8 + MiB  # the chunk is completed (padded)
        assert chunk_error(error) == EIO and error.flags & 1  # EIO, DONE
        # The error's offset tells the client how much of the data is good.
        at = int.from_bytes(error.payload[-8:], "big")
        assert 8 * MiB <= at <= 8 * MiB + 8192, at
        assert data_chunk.payload[8 : 8 + at - 8 * MiB] == data[8 * MiB : at]
        # The same connection still answers, with the right bytes.
        got, _ = read_structured(c, 0, 64 * 1024)
        assert got == data[: 64 * 1024]
    log = srv.log()
    assert "READ" in log or "read" in log, log
    assert_healthy(srv, workers=1)
    fresh_roundtrip(srv, offset=0)


def test_sendfile_read_error_simple_reply_disconnects(tmpfs_server: ServerProcess) -> None:
    """Without structured replies the header (error 0) is already out, and the spec
    says the server "MUST immediately initiate a hard disconnect": the client sees the
    connection end, the server stays healthy and serves the next client."""
    srv = tmpfs_server
    image = srv.extra["image"]
    assert isinstance(image, Path)
    with RawClient(srv.port) as c:
        c.go(structured=False)
        os.truncate(image, 8 * MiB + 8192)
        c.request(Cmd.READ, 8 * MiB, MiB)
        reply = SimpleReply.unpack(c.recv_exact(16))
        assert reply.error == 0  # the header went out before the error
        with pytest.raises(ConnectionError):
            c.recv_exact(MiB)
    assert_healthy(srv, workers=1)
    fresh_roundtrip(srv, offset=0)
