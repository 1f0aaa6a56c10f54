"""The core's end of a sendfile READ whose data failed midway (Transmission.sendfile_failed):
bytes in, bytes out, for structured and simple replies."""

from __future__ import annotations

from nbdserver.errors import NBDErrno
from nbdserver.protocol import ReplyFlag, ReplyType
from nbdserver.transmission import Command, Transmission

from .test_transmission import RW, SIMPLE, _chunks

READ = Command(0, 0, 7, 8192, 4096)  # type READ, flags 0, cookie 7, offset 8192, 4096 bytes


def test_structured_reply_is_padded_and_ends_with_error_offset() -> None:
    tx = Transmission(RW)
    header, _ = tx.sendfile_frame(READ)
    sent = 1000
    tail = tx.sendfile_failed(READ, sent, NBDErrno.EIO, "short read")
    assert tail is not None
    chunks = _chunks(header + b"d" * sent + b"".join(tail))
    assert [(ch.type, ch.flags) for ch in chunks] == [
        (ReplyType.OFFSET_DATA, 0),
        (ReplyType.ERROR_OFFSET, ReplyFlag.DONE),
    ]
    data, error = chunks
    # The data chunk is completed: its promised length, zero padding after the bytes sent.
    assert data.payload[8:] == b"d" * sent + bytes(4096 - sent)
    assert int.from_bytes(error.payload[:4], "big") == NBDErrno.EIO
    length = int.from_bytes(error.payload[4:6], "big")
    assert error.payload[6 : 6 + length] == b"short read"
    # The offset is the first byte that was not sent: the client keeps what came before.
    assert int.from_bytes(error.payload[6 + length :], "big") == 8192 + sent


def test_simple_reply_cannot_be_finished() -> None:
    assert Transmission(SIMPLE).sendfile_failed(READ, 10, NBDErrno.EIO, "x") is None
