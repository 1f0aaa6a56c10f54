"""Wire-format tables (bytes <-> messages, both ways) and hypothesis round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdserver.protocol import (
    Opt,
    OptionReply,
    OptionRequest,
    Rep,
    Request,
    SimpleReply,
    StructuredChunk,
    pack_info_go,
    pack_meta_context,
)

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)

REQUESTS = [
    (
        Request(flags=0, type=0, cookie=1, offset=0, length=4096),
        "25609513 0000 0000 0000000000000001 0000000000000000 00001000",
    ),
    (
        Request(flags=1, type=1, cookie=0xDEADBEEF, offset=1 << 40, length=512),
        "25609513 0001 0001 00000000deadbeef 0000010000000000 00000200",
    ),
    (
        Request(flags=0x18, type=7, cookie=2**64 - 1, offset=2**64 - 1, length=2**32 - 1),
        "25609513 0018 0007 ffffffffffffffff ffffffffffffffff ffffffff",
    ),
]


@pytest.mark.parametrize(("message", "hexbytes"), REQUESTS)
def test_request_table(message: Request, hexbytes: str) -> None:
    raw = bytes.fromhex(hexbytes.replace(" ", ""))
    assert message.pack() == raw
    assert Request.unpack(raw) == message
    # With trailing data the header parses the same.
    assert Request.unpack(raw + b"\x99" * 7) == message


def test_request_bad_magic() -> None:
    raw = bytearray(REQUESTS[0][0].pack())
    raw[0] ^= 0xFF
    with pytest.raises(ValueError, match="bad request magic"):
        Request.unpack(bytes(raw))


REPLIES = [
    (SimpleReply(0, 7), "67446698 00000000 0000000000000007"),
    (SimpleReply(28, 1 << 63), "67446698 0000001c 8000000000000000"),
]


@pytest.mark.parametrize(("message", "hexbytes"), REPLIES)
def test_simple_reply_table(message: SimpleReply, hexbytes: str) -> None:
    raw = bytes.fromhex(hexbytes.replace(" ", ""))
    assert message.pack() == raw
    assert SimpleReply.unpack(raw) == message


def test_structured_chunk_table() -> None:
    chunk = StructuredChunk(
        flags=1, type=2, cookie=5, payload=bytes.fromhex("0000000000001000 00010000")
    )
    raw = bytes.fromhex(
        "668e33ef 0001 0002 0000000000000005 0000000c 0000000000001000 00010000".replace(" ", "")
    )
    assert chunk.pack() == raw
    assert StructuredChunk.unpack(raw) == (chunk, len(raw))


def test_option_tables() -> None:
    assert OptionRequest(Opt.LIST, b"").pack() == bytes.fromhex(
        "49484156454f5054 00000003 00000000"
    )
    reply = OptionReply(Opt.GO, Rep.ERR_UNKNOWN, b"x")
    raw = bytes.fromhex("0003e889045565a9 00000007 80000006 00000001 78".replace(" ", ""))
    assert reply.pack() == raw
    assert OptionReply.unpack(raw + b"tail") == (reply, len(raw))
    assert pack_info_go(b"ab", [3]) == bytes.fromhex("00000002 6162 0001 0003".replace(" ", ""))
    assert pack_meta_context(b"", [b"base:"]) == bytes.fromhex(
        "00000000 00000001 00000005 626173653a".replace(" ", "")
    )


def test_rep_error_bit() -> None:
    assert Rep.ERR_UNSUP.is_error and Rep.ERR_TOO_BIG.is_error
    assert not Rep.ACK.is_error and not Rep.META_CONTEXT.is_error
    assert int(Rep.ERR_UNSUP) == 2**31 + 1


@given(u16, u16, u64, u64, u32)
def test_request_round_trip(flags: int, type_: int, cookie: int, offset: int, length: int) -> None:
    request = Request(flags, type_, cookie, offset, length)
    assert Request.unpack(request.pack()) == request


@given(u16, u16, u64, st.binary(max_size=64))
def test_chunk_round_trip(flags: int, type_: int, cookie: int, payload: bytes) -> None:
    chunk = StructuredChunk(flags, type_, cookie, payload)
    raw = chunk.pack()
    assert StructuredChunk.unpack(raw) == (chunk, len(raw))


@given(u32, u32, st.binary(max_size=64))
def test_option_reply_round_trip(option: int, reply: int, data: bytes) -> None:
    message = OptionReply(option, reply, data)
    raw = message.pack()
    assert OptionReply.unpack(raw) == (message, len(raw))
