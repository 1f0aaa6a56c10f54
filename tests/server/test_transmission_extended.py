"""The transmission core with extended headers (NBD_OPT_EXTENDED_HEADERS): the validation
rules they add, the 32-byte request decoder (whole, byte by byte, with trailing data, and
under hypothesis), NBD_CMD_FLAG_PAYLOAD_LEN, the protocol violations, and the framing of
every reply as an extended chunk that carries the request's offset."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdserver.errors import NBDErrno
from nbdserver.extended import ExtendedTransmission, open_transmission
from nbdserver.negotiation import Closed
from nbdserver.protocol import (
    BLOCK_DESCRIPTOR_EXT,
    BLOCK_STATUS_EXT_HEAD,
    EXTENDED_HEADER,
    Cmd,
    CmdFlag,
    ExtendedChunk,
    ExtendedRequest,
    Extent,
    ReplyFlag,
    ReplyType,
    Request,
    State,
)
from nbdserver.transmission import (
    Command,
    Event,
    Phase,
    Rejected,
    Session,
    Transmission,
    validate,
)
from server.test_transmission import ALL, DATA_HOLE_DATA, RW, K, _join

E = NBDErrno
GiB = 1 << 30
BIG = 16 * GiB
P = CmdFlag.PAYLOAD_LEN
EXT = Session(size=BIG, flags=ALL, structured=True, meta_context=1, max_block=65536, extended=True)


def test_open_transmission_picks_the_framing() -> None:
    assert type(open_transmission(EXT)) is ExtendedTransmission
    assert type(open_transmission(RW)) is Transmission
    assert open_transmission(EXT).needed == 32 and open_transmission(RW).needed == 28
    # Neither can be built for the other kind of session: a compact decoder on an
    # extended session would misread every request.
    with pytest.raises(ValueError, match="needs ExtendedTransmission"):
        Transmission(EXT)
    with pytest.raises(ValueError, match="needs a session with extended headers"):
        ExtendedTransmission(RW)


VALIDATION = [
    # (cmd, flags, offset, length, expected errno or None) in an extended session
    (Cmd.WRITE, P, 0, 4096, None),
    (Cmd.WRITE, P | CmdFlag.FUA, 0, 4096, None),
    # "NBD_CMD_WRITE MUST use the flag NBD_CMD_FLAG_PAYLOAD_LEN", but qemu's client does
    # not: its WRITE is served (the decoder reads its payload all the same).
    (Cmd.WRITE, 0, 0, 4096, None),
    (Cmd.WRITE, P, BIG - 1, 2, E.ENOSPC),
    # READ/WRITE stay bounded by the maximum block size; a longer read is EOVERFLOW
    # ("permitted to reject large read requests up front with NBD_EOVERFLOW").
    (Cmd.READ, 0, 0, 65536, None),
    (Cmd.READ, 0, 0, 65537, E.EOVERFLOW),
    (Cmd.READ, 0, 0, 5 * GiB, E.EOVERFLOW),
    (Cmd.WRITE, P, 0, 65537, E.EINVAL),
    # "for other commands, the flag will trigger an NBD_EINVAL error unless the command
    # documents an optional payload form ... and the server has implemented that form".
    (Cmd.READ, P, 0, 4096, E.EINVAL),
    (Cmd.TRIM, P, 0, 4096, E.EINVAL),
    (Cmd.FLUSH, P, 0, 0, E.EINVAL),
    (Cmd.BLOCK_STATUS, P, 0, 16, E.EINVAL),  # the payload form is not implemented
    # 64-bit effect lengths: past 4 GiB for commands without a payload.
    (Cmd.TRIM, 0, GiB, 5 * GiB, None),
    (Cmd.WRITE_ZEROES, CmdFlag.NO_HOLE, 0, 6 * GiB, None),
    (Cmd.CACHE, 0, 0, BIG, None),
    (Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE, 0, 8 * GiB, None),
    (Cmd.TRIM, 0, GiB, BIG, E.EINVAL),  # past the end
    (Cmd.WRITE_ZEROES, 0, GiB, BIG, E.ENOSPC),
    (Cmd.TRIM, 0, 0, 2**64 - 1, E.EINVAL),
]


@pytest.mark.parametrize(("cmd", "flags", "offset", "length", "errno"), VALIDATION)
def test_extended_validation_table(
    cmd: int, flags: int, offset: int, length: int, errno: int | None
) -> None:
    error = validate(cmd, flags, offset, length, EXT)
    assert (error.errno if error is not None else None) == errno


def test_payload_len_is_invalid_without_extended_headers() -> None:
    # "In the compact style, the client MUST NOT use the NBD_CMD_FLAG_PAYLOAD_LEN flag".
    error = validate(Cmd.WRITE, P, 0, 512, RW)
    assert error is not None and error.errno == E.EINVAL


def ext(flags: int, cmd: int, cookie: int, offset: int, length: int) -> bytes:
    return ExtendedRequest(flags, cmd, cookie, offset, length).pack()


Summary = tuple[int, int, int, bytes | None, int | None] | tuple[str, bool]


def _summary(e: Event) -> Summary:
    if isinstance(e, Closed):
        return (e.reason, e.violation)
    if isinstance(e, Rejected):
        return (e.type, e.cookie, e.length, None, e.error.errno)
    payload = bytes(e.payload) if e.payload is not None else None
    return (e.type, e.cookie, e.length, payload, None)


def _stream() -> tuple[bytes, list[Summary]]:
    reqs: list[tuple[bytes, Summary]] = [
        (ext(0, Cmd.READ, 1, 0, 4096), (Cmd.READ, 1, 4096, None, None)),
        (ext(P, Cmd.WRITE, 2, 512, 5) + b"hello", (Cmd.WRITE, 2, 5, b"hello", None)),
        # A payload on a command without a payload form: consumed, EINVAL, carry on.
        (ext(P, Cmd.TRIM, 3, 0, 7) + b"skipped", (Cmd.TRIM, 3, 7, None, E.EINVAL)),
        # A WRITE without PAYLOAD_LEN (as qemu sends it) still carries its data.
        (ext(0, Cmd.WRITE, 4, 8, 3) + b"abc", (Cmd.WRITE, 4, 3, b"abc", None)),
        # An invalid WRITE's payload is skipped, never buffered.
        (ext(P, Cmd.WRITE, 5, BIG, 6) + b"skipme", (Cmd.WRITE, 5, 6, None, E.ENOSPC)),
        (ext(0, Cmd.TRIM, 6, GiB, 5 * GiB), (Cmd.TRIM, 6, 5 * GiB, None, None)),
        (ext(0, Cmd.BLOCK_STATUS, 7, 0, 8 * GiB), (Cmd.BLOCK_STATUS, 7, 8 * GiB, None, None)),
        (ext(0, Cmd.READ, 8, 0, 5 * GiB), (Cmd.READ, 8, 5 * GiB, None, E.EOVERFLOW)),
        (ext(0, Cmd.FLUSH, 9, 0, 0), (Cmd.FLUSH, 9, 0, None, None)),
        (ext(0, Cmd.DISC, 10, 0, 0), (Cmd.DISC, 10, 0, None, None)),
    ]
    closed: Summary = ("client sent NBD_CMD_DISC", False)
    return b"".join(r for r, _ in reqs), [*(s for _, s in reqs), closed]


def _decode_all(chunks: list[bytes]) -> tuple[list[Summary], Transmission]:
    tx = open_transmission(EXT)
    buf = bytearray()
    seen: list[Summary] = []
    for chunk in chunks:
        buf += chunk
        view = memoryview(buf)
        events, used = tx.receive(view)
        seen += [_summary(e) for e in events]
        del events  # payload views pin the buffer
        view.release()
        del buf[:used]
    return seen, tx


def test_decode_whole_bytewise_and_trailing() -> None:
    data, expected = _stream()
    whole, tx = _decode_all([data])
    assert whole == expected
    assert tx.phase is Phase.DRAINING
    bytewise, _ = _decode_all([data[i : i + 1] for i in range(len(data))])
    assert bytewise == expected
    trailing, _ = _decode_all([data + ext(0, Cmd.READ, 99, 0, 1)])
    assert trailing == expected


def test_decode_partial_header_and_payload_wait() -> None:
    tx = open_transmission(EXT)
    raw = ext(P, Cmd.WRITE, 1, 0, 100)
    assert tx.receive(memoryview(raw[:31])) == ([], 0)
    assert tx.needed == 32
    assert tx.receive(memoryview(raw + b"x" * 50)) == ([], 0)
    assert tx.needed == 132


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        # A compact request after the ACK: "the client MUST use the 32-byte extended
        # request header".
        (
            Request(0, Cmd.READ, 2, 0, 512).pack() + bytes(4),
            "compact request 0x25609513 where an extended request was due",
        ),
        (bytes(32), "bad request magic 0x00000000 where an extended request was due"),
    ],
    ids=["compact", "garbage"],
)
def test_wrong_magic_is_a_violation(raw: bytes, reason: str) -> None:
    tx = open_transmission(EXT)
    good = ext(0, Cmd.READ, 1, 0, 512)
    events, used = tx.receive(memoryview(good + raw + good))
    assert events == [Command(Cmd.READ, 0, 1, 0, 512), Closed(reason, violation=True)]
    assert used == 32 and tx.phase is Phase.DRAINING
    assert tx.receive(memoryview(good)) == ([], 0)


def test_oversized_payload_is_a_hard_disconnect() -> None:
    # "A server SHOULD initiate hard disconnect if a client sets the
    # NBD_CMD_FLAG_PAYLOAD_LEN flag and uses a length larger than a server's advertised
    # or default maximum payload length".
    for cmd, flags in ((Cmd.WRITE, P), (Cmd.TRIM, P), (Cmd.WRITE, 0)):
        tx = open_transmission(EXT)
        events, used = tx.receive(memoryview(ext(flags, cmd, 3, 0, 65537) + b"z" * 100))
        assert events == [
            Closed("payload of 65537 bytes exceeds the maximum 65536", violation=True)
        ]
        assert used == 0 and tx.needed == 32  # nothing of it buffered


def test_refused_payload_is_skipped_without_buffering() -> None:
    tx = open_transmission(EXT)
    events, used = tx.receive(memoryview(ext(P, Cmd.CACHE, 7, 0, 60000) + b"z" * 1000))
    assert [_summary(e) for e in events] == [(Cmd.CACHE, 7, 60000, None, E.EINVAL)]
    assert used == 32 + 1000 and tx.needed == 32
    events, used = tx.receive(memoryview(b"z" * 59000 + ext(0, Cmd.FLUSH, 8, 0, 0)))
    assert [_summary(e) for e in events] == [(Cmd.FLUSH, 8, 0, None, None)]


def test_stopping_answers_eshutdown_and_skips_payloads() -> None:
    tx = open_transmission(EXT)
    tx.shutdown()
    wire = ext(P, Cmd.WRITE, 1, 0, 3) + b"abc" + ext(0, Cmd.DISC, 2, 0, 0)
    for chunks in ([wire], [wire[i : i + 1] for i in range(len(wire))]):
        tx = open_transmission(EXT)
        tx.shutdown()
        seen = []
        buf = bytearray()
        for chunk in chunks:
            buf += chunk
            events, used = tx.receive(memoryview(buf))
            seen += [_summary(e) for e in events]
            del buf[:used]
        assert seen == [
            (Cmd.WRITE, 1, 3, None, E.ESHUTDOWN),
            (Cmd.DISC, 2, 0, None, None),
            ("client sent NBD_CMD_DISC", False),
        ]


def test_disc_with_a_payload_is_refused_and_still_ends_the_session() -> None:
    tx = open_transmission(EXT)
    events, _ = tx.receive(memoryview(ext(P, Cmd.DISC, 3, 0, 4) + b"abcd"))
    assert [_summary(e) for e in events] == [
        (Cmd.DISC, 3, 4, None, E.EINVAL),
        ("client sent NBD_CMD_DISC", False),
    ]


def test_budget_counts_reads_and_writes() -> None:
    reads = b"".join(ext(0, Cmd.READ, i, 0, 4096) for i in range(4))
    tx = open_transmission(EXT)
    events, used = tx.receive(memoryview(reads), budget=8192)
    assert [e.cookie for e in events] == [0, 1] and used == 64
    events, used = tx.receive(memoryview(reads[used:]), budget=0)
    assert [e.cookie for e in events] == [2]


REQUEST_PARTS = st.tuples(
    st.sampled_from([0, int(P), int(CmdFlag.FUA), int(P | CmdFlag.FUA), 1 << 9]),
    st.sampled_from([*(int(c) for c in Cmd if c != Cmd.DISC), 42]),
    st.integers(0, 2**64 - 1),
    st.sampled_from([0, 512, BIG - 512, BIG, 2**64 - 1]),
    st.sampled_from([0, 1, 512, 4096, 65537, 5 * GiB]),
)


@settings(deadline=None)
@given(st.lists(REQUEST_PARTS, max_size=6), st.integers(1, 64))
def test_decode_is_chunking_invariant(
    parts: list[tuple[int, int, int, int, int]], step: int
) -> None:
    """Arbitrary extended requests, with payloads where they announce one, cut anywhere:
    the same events as fed whole, and a violation only for an oversized payload."""
    wire = b""
    for flags, cmd, cookie, offset, length in parts:
        carries = flags & P or cmd == Cmd.WRITE  # a WRITE carries data, flag or not
        payload = b"p" * length if carries and length <= 65537 else b""
        wire += ext(flags, cmd, cookie, offset, length)
        wire += payload
    whole, _ = _decode_all([wire])
    chunked, _ = _decode_all([wire[i : i + step] for i in range(0, len(wire), step)])
    assert chunked == whole
    for summary in whole:
        if len(summary) == 2:
            assert summary[1] and "exceeds the maximum" in str(summary[0])


# --- replies ---------------------------------------------------------------------------
def _chunks(raw: bytes) -> list[ExtendedChunk]:
    out, at = [], 0
    while at < len(raw):
        chunk, at = ExtendedChunk.unpack(raw, at)
        out.append(chunk)
    return out


TX = ExtendedTransmission(EXT)


def test_ack_and_error_are_extended_chunks() -> None:
    # "the server MUST NOT use simple replies even when there is no payload".
    trim = Command(Cmd.TRIM, 0, 5, GiB, 5 * GiB)
    assert _chunks(TX.ack_command(trim)) == [
        ExtendedChunk(ReplyFlag.DONE, ReplyType.NONE, 5, GiB, b"")
    ]
    (err,) = _chunks(TX.error_reply(6, E.ENOSPC, "full", offset=4096))
    assert (err.flags, err.type, err.cookie, err.offset) == (
        ReplyFlag.DONE,
        ReplyType.ERROR,
        6,
        4096,
    )
    assert err.payload == (28).to_bytes(4, "big") + (4).to_bytes(2, "big") + b"full"


def test_read_reply_shapes() -> None:
    """Data, hole, data; every chunk's header offset is the request's ("MUST match the
    offset of the client's request (even in reply types such as
    NBD_REPLY_TYPE_OFFSET_DATA ...)"), the payload offsets are the data's."""
    c = Command(Cmd.READ, 0, 7, 8 * K, len(DATA_HOLE_DATA))
    chunks = _chunks(_join(TX.read_reply(c, DATA_HOLE_DATA)))
    assert [(ch.type, ch.flags, ch.offset) for ch in chunks] == [
        (ReplyType.OFFSET_DATA, 0, 8 * K),
        (ReplyType.OFFSET_HOLE, 0, 8 * K),
        (ReplyType.OFFSET_DATA, ReplyFlag.DONE, 8 * K),
    ]
    assert chunks[0].payload == (8 * K).to_bytes(8, "big") + b"a" * (8 * K)
    assert chunks[1].payload == (16 * K).to_bytes(8, "big") + (16 * K).to_bytes(4, "big")
    assert chunks[2].payload == (32 * K).to_bytes(8, "big") + b"b" * (8 * K)
    # DF: one content chunk with the zeroes present.
    df = Command(Cmd.READ, CmdFlag.DF, 7, 8 * K, len(DATA_HOLE_DATA))
    (only,) = _chunks(_join(TX.read_reply(df, DATA_HOLE_DATA)))
    assert (only.type, only.flags, only.payload[8:]) == (
        ReplyType.OFFSET_DATA,
        ReplyFlag.DONE,
        DATA_HOLE_DATA,
    )
    empty = Command(Cmd.READ, 0, 8, 512, 0)
    assert _chunks(_join(TX.read_reply(empty, b""))) == [
        ExtendedChunk(ReplyFlag.DONE, ReplyType.NONE, 8, 512, b"")
    ]


def test_read_prefix_sendfile_frame_and_failure() -> None:
    small = Command(Cmd.READ, 0, 3, 4096, 512)
    prefix = TX.read_prefix(small)
    assert prefix is not None
    (chunk,) = _chunks(prefix + b"x" * 512)
    assert (chunk.type, chunk.flags, chunk.offset, chunk.payload[:8]) == (
        ReplyType.OFFSET_DATA,
        ReplyFlag.DONE,
        4096,
        (4096).to_bytes(8, "big"),
    )
    assert TX.read_prefix(Command(Cmd.READ, 0, 3, 0, 1 << 16)) is None
    assert TX.read_prefix(Command(Cmd.READ, 0, 3, 0, 0)) is None
    # sendfile: no DONE on the data chunk; a NONE chunk ends the reply.
    header, trailer = TX.sendfile_frame(small)
    chunks = _chunks(header + b"y" * 512 + trailer)
    assert [(ch.type, ch.flags, ch.offset) for ch in chunks] == [
        (ReplyType.OFFSET_DATA, 0, 4096),
        (ReplyType.NONE, ReplyFlag.DONE, 4096),
    ]
    # A failure after 100 bytes: padding completes the chunk ("MUST still complete the
    # transmission of any current chunk"), then ERROR_OFFSET at the first byte not sent.
    tail = TX.sendfile_failed(small, 100, E.EIO, "gone")
    assert tail is not None
    chunks = _chunks(header + b"y" * 100 + b"".join(tail))
    assert chunks[0].payload[8:] == b"y" * 100 + bytes(412)
    err = chunks[1]
    assert (err.type, err.flags, err.offset) == (ReplyType.ERROR_OFFSET, ReplyFlag.DONE, 4096)
    assert err.payload == (5).to_bytes(4, "big") + (4).to_bytes(2, "big") + b"gone" + (
        4196
    ).to_bytes(8, "big")


def test_block_status_ext_has_64_bit_lengths() -> None:
    """NBD_REPLY_TYPE_BLOCK_STATUS_EXT: "only NBD_REPLY_TYPE_BLOCK_STATUS_EXT for extended
    headers", 64-bit extent lengths (a 6 GiB hole in one descriptor) and 64-bit status
    whose upper half is zero for base:allocation."""
    extents = [Extent(GiB, 4096, False, False), Extent(GiB + 4096, 6 * GiB, True, True)]
    c = Command(Cmd.BLOCK_STATUS, 0, 9, GiB, 8 * GiB)
    (chunk,) = _chunks(TX.block_status_reply(c, extents))
    assert (chunk.type, chunk.flags, chunk.cookie, chunk.offset) == (
        ReplyType.BLOCK_STATUS_EXT,
        ReplyFlag.DONE,
        9,
        GiB,
    )
    # "*length* MUST be 8 + (a positive multiple of 16)"; the count matches.
    assert len(chunk.payload) == 8 + 2 * 16
    assert BLOCK_STATUS_EXT_HEAD.unpack_from(chunk.payload) == (1, 2)
    descriptors = [BLOCK_DESCRIPTOR_EXT.unpack_from(chunk.payload, 8 + 16 * i) for i in range(2)]
    assert descriptors == [(4096, 0), (6 * GiB, State.HOLE | State.ZERO)]
    one = Command(Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE, 9, GiB + 4096, 5 * GiB)
    (chunk,) = _chunks(TX.block_status_reply(one, extents[1:]))
    assert chunk.payload == bytes.fromhex("00000001 00000001".replace(" ", "")) + (
        BLOCK_DESCRIPTOR_EXT.pack(5 * GiB, 3)
    )
    assert EXTENDED_HEADER.size == 32
