"""Wire-format tables (bytes <-> messages, both ways) and hypothesis round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdserver.protocol import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST,
    EXTENDED_REQUEST_MAGIC,
    CmdFlag,
    ExtendedChunk,
    ExtendedRequest,
    Opt,
    OptionReply,
    OptionRequest,
    Rep,
    ReplyType,
    Request,
    SimpleReply,
    StructuredChunk,
    TransmissionFlag,
    block_status_ext_chunk,
    ext_done_chunk,
    ext_error_chunk,
    ext_error_offset_chunk,
    ext_offset_data_header,
    ext_offset_hole_chunk,
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


# --- extended headers (doc/proto.md "Request message", "Extended reply chunk message") ---
EXTENDED_REQUESTS = [
    (
        ExtendedRequest(flags=0x21, type=1, cookie=1, offset=4096, length=512),
        "21e41c71 0021 0001 0000000000000001 0000000000001000 0000000000000200",
    ),
    (
        # A 64-bit effect length: a TRIM of 5 GiB.
        ExtendedRequest(flags=0, type=4, cookie=2**64 - 1, offset=0, length=5 << 30),
        "21e41c71 0000 0004 ffffffffffffffff 0000000000000000 0000000140000000",
    ),
]


@pytest.mark.parametrize(("message", "hexbytes"), EXTENDED_REQUESTS)
def test_extended_request_table(message: ExtendedRequest, hexbytes: str) -> None:
    raw = bytes.fromhex(hexbytes.replace(" ", ""))
    assert EXTENDED_REQUEST.size == 32 and len(raw) == 32
    assert message.pack() == raw
    assert ExtendedRequest.unpack(raw + b"\x99" * 5) == message


def test_extended_request_refuses_a_compact_magic() -> None:
    compact = Request(0, 0, 1, 0, 0).pack() + bytes(4)
    with pytest.raises(ValueError, match="bad extended request magic 0x25609513"):
        ExtendedRequest.unpack(compact)


EXT_REPLIES = [
    # NONE with DONE; the offset field echoes the request's.
    (
        ext_done_chunk(5, 4096),
        "6e8a278c 0001 0000 0000000000000005 0000000000001000 0000000000000000",
    ),
    # OFFSET_DATA header: header offset = the request's, payload offset = the data's.
    (
        ext_offset_data_header(5, 4096, 8192, 16, False),
        "6e8a278c 0000 0001 0000000000000005 0000000000001000 0000000000000018 0000000000002000",
    ),
    # OFFSET_HOLE: 64-bit offset, 32-bit hole size in the payload.
    (
        ext_offset_hole_chunk(5, 0, 4096, 65536, True),
        "6e8a278c 0001 0002 0000000000000005 0000000000000000 000000000000000c"
        " 0000000000001000 00010000",
    ),
    (
        ext_error_chunk(5, 512, 22, "no"),
        "6e8a278c 0001 8001 0000000000000005 0000000000000200 0000000000000008 00000016 0002 6e6f",
    ),
    (
        ext_error_offset_chunk(5, 0, 5, 1024),
        "6e8a278c 0001 8002 0000000000000005 0000000000000000 000000000000000e"
        " 00000005 0000 0000000000000400",
    ),
    # BLOCK_STATUS_EXT: "length MUST be 8 + (a positive multiple of 16)"; 64-bit extent
    # length (6 GiB here) and 64-bit status.
    (
        block_status_ext_chunk(5, 0, 1, [(6 << 30, 3)]),
        "6e8a278c 0001 0006 0000000000000005 0000000000000000 0000000000000018"
        " 00000001 00000001 0000000180000000 0000000000000003",
    ),
]


@pytest.mark.parametrize(("raw", "hexbytes"), EXT_REPLIES, ids=range(len(EXT_REPLIES)))
def test_extended_reply_table(raw: bytes, hexbytes: str) -> None:
    expected = bytes.fromhex(hexbytes.replace(" ", ""))
    assert raw == expected
    if raw[6:8] != b"\0\1":  # a whole chunk (OFFSET_DATA is only a header): it parses back
        chunk, end = ExtendedChunk.unpack(raw)
        assert end == len(raw) and chunk.pack() == raw


def test_extended_chunk_errors() -> None:
    raw = ext_error_chunk(1, 0, 5, "x")
    with pytest.raises(ValueError, match="truncated extended reply chunk"):
        ExtendedChunk.unpack(raw[:-1])
    with pytest.raises(ValueError, match="bad extended reply magic 0x668e33ef"):
        ExtendedChunk.unpack(StructuredChunk(1, 0, 1, b"").pack() + bytes(12))


def test_ext_header_reqd_value() -> None:
    # "NBD_REP_ERR_EXT_HEADER_REQD (2^31 + 10)".
    assert int(Rep.ERR_EXT_HEADER_REQD) == 2**31 + 10 and Rep.ERR_EXT_HEADER_REQD.is_error
    assert int(ReplyType.BLOCK_STATUS_EXT) == 6 and int(CmdFlag.PAYLOAD_LEN) == 1 << 5
    assert int(TransmissionFlag.BLOCK_STAT_PAYLOAD) == 1 << 12
    assert (EXTENDED_REQUEST_MAGIC, EXTENDED_REPLY_MAGIC) == (0x21E41C71, 0x6E8A278C)


@given(u16, u16, u64, u64, u64)
def test_extended_request_round_trip(
    flags: int, type_: int, cookie: int, offset: int, length: int
) -> None:
    request = ExtendedRequest(flags, type_, cookie, offset, length)
    assert ExtendedRequest.unpack(request.pack()) == request


@given(u16, u16, u64, u64, st.binary(max_size=64))
def test_extended_chunk_round_trip(
    flags: int, type_: int, cookie: int, offset: int, payload: bytes
) -> None:
    chunk = ExtendedChunk(flags, type_, cookie, offset, payload)
    raw = chunk.pack()
    assert ExtendedChunk.unpack(raw) == (chunk, len(raw))
