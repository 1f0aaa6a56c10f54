"""The transmission core: validation tables, decoding (whole, byte by byte, with
trailing data), the phase table, reply framing, read planning and block status
descriptors, plus hypothesis."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdserver.errors import NBDErrno
from nbdserver.negotiation import Closed
from nbdserver.protocol import (
    REQUEST,
    Cmd,
    CmdFlag,
    Extent,
    ReplyFlag,
    ReplyType,
    Request,
    SimpleReply,
    State,
    StructuredChunk,
    TransmissionFlag,
    block_status_chunk,
)
from nbdserver.readplan import ReadPiece, block_status_descriptors, plan_read, zero_extents
from nbdserver.transmission import (
    TRANSITIONS,
    Command,
    Event,
    Phase,
    Rejected,
    Session,
    Transmission,
    Trigger,
    validate,
)

ALL = (
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_FAST_ZERO
    | TransmissionFlag.SEND_CACHE
    | TransmissionFlag.SEND_DF
)
SIZE = 1 << 20
RW = Session(size=SIZE, flags=ALL, structured=True, meta_context=1, max_block=65536)
RO = Session(size=SIZE, flags=ALL | TransmissionFlag.READ_ONLY, structured=True, meta_context=1)
SIMPLE = Session(
    size=SIZE, flags=ALL & ~TransmissionFlag.SEND_DF, structured=False, meta_context=None
)

E = NBDErrno
VALIDATION = [
    # (session, cmd, flags, offset, length, expected errno or None)
    (RW, Cmd.READ, 0, 0, 4096, None),
    (RW, Cmd.READ, 0, SIZE - 1, 1, None),
    (RW, Cmd.READ, 0, SIZE - 1, 2, E.EINVAL),
    (RW, Cmd.READ, 0, 0, 0, None),
    (RW, Cmd.READ, CmdFlag.DF, 0, 4096, None),
    (SIMPLE, Cmd.READ, CmdFlag.DF, 0, 4096, E.EINVAL),
    (RW, Cmd.READ, 0, 0, 65537, E.EINVAL),
    (RW, Cmd.READ, CmdFlag.NO_HOLE, 0, 1, E.EINVAL),
    (RW, Cmd.READ, CmdFlag.FUA, 0, 1, None),
    (RW, Cmd.WRITE, CmdFlag.FUA, 0, 512, None),
    (RW, Cmd.WRITE, 0, SIZE, 1, E.ENOSPC),
    (RW, Cmd.WRITE_ZEROES, 0, SIZE - 512, 1024, E.ENOSPC),
    (RW, Cmd.WRITE_ZEROES, CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO | CmdFlag.FUA, 0, 4096, None),
    (RW, Cmd.TRIM, 0, SIZE, 1, E.EINVAL),
    (RW, Cmd.CACHE, 0, SIZE, 1, E.EINVAL),
    (RW, Cmd.BLOCK_STATUS, 0, SIZE, 1, E.EINVAL),
    (RW, Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE, 0, SIZE, None),
    (RW, Cmd.BLOCK_STATUS, 0, 0, 0, E.EINVAL),
    (SIMPLE, Cmd.BLOCK_STATUS, 0, 0, 4096, E.EINVAL),
    (RW, Cmd.FLUSH, 0, 0, 0, None),
    (RW, Cmd.FLUSH, 0, 0, 1, E.EINVAL),
    (RW, Cmd.DISC, 0, 0, 0, None),
    (RW, 99, 0, 0, 0, E.EINVAL),
    (RW, Cmd.RESIZE, 0, 0, 0, E.EINVAL),
    (RW, Cmd.READ, 1 << 9, 0, 1, E.EINVAL),
    (RW, Cmd.TRIM, CmdFlag.REQ_ONE, 0, 1, E.EINVAL),
    (RO, Cmd.WRITE, 0, 0, 512, E.EPERM),
    (RO, Cmd.TRIM, 0, 0, 512, E.EPERM),
    (RO, Cmd.WRITE_ZEROES, 0, 0, 512, E.EPERM),
    (RO, Cmd.WRITE, 0, SIZE, 512, E.EPERM),
    (RO, Cmd.READ, 0, 0, 512, None),
    (Session(SIZE, ALL, True, 1, min_block=512), Cmd.READ, 0, 512, 1024, None),
    (Session(SIZE, ALL, True, 1, min_block=512), Cmd.READ, 0, 100, 512, E.EINVAL),
    (Session(SIZE, ALL, True, 1, min_block=512), Cmd.WRITE, 0, 0, 100, E.EINVAL),
    (Session(SIZE, TransmissionFlag.HAS_FLAGS, False, None), Cmd.FLUSH, 0, 0, 0, E.EINVAL),
    (
        Session(SIZE, TransmissionFlag.HAS_FLAGS, False, None),
        Cmd.WRITE,
        CmdFlag.FUA,
        0,
        1,
        E.EINVAL,
    ),
]


@pytest.mark.parametrize(("session", "cmd", "flags", "offset", "length", "errno"), VALIDATION)
def test_validation_table(  # noqa: PLR0917 - one argument per table column
    session: Session, cmd: int, flags: int, offset: int, length: int, errno: int | None
) -> None:
    error = validate(cmd, flags, offset, length, session)
    assert (error.errno if error is not None else None) == errno


def _stream() -> tuple[bytes, list[Summary]]:
    """Requests of every kind back to back, and what the decoder must report."""
    reqs = [
        (Request(0, Cmd.READ, 1, 0, 4096).pack(), (Cmd.READ, 1, None, None)),
        (Request(0, Cmd.WRITE, 2, 512, 5).pack() + b"hello", (Cmd.WRITE, 2, b"hello", None)),
        # Invalid write (past the end): its payload is skipped, not buffered.
        (Request(0, Cmd.WRITE, 3, SIZE, 6).pack() + b"skipme", (Cmd.WRITE, 3, None, E.ENOSPC)),
        (Request(0, Cmd.FLUSH, 4, 0, 0).pack(), (Cmd.FLUSH, 4, None, None)),
        (Request(0, 42, 5, 0, 0).pack(), (42, 5, None, E.EINVAL)),
        (Request(0, Cmd.DISC, 6, 0, 0).pack(), (Cmd.DISC, 6, None, None)),
    ]
    closed: Summary = ("client sent NBD_CMD_DISC", False)
    return b"".join(r for r, _ in reqs), [*(e for _, e in reqs), closed]


Summary = tuple[int, int, bytes | None, int | None] | tuple[str, bool]


def _decode_all(chunks: list[bytes]) -> tuple[list[Summary], Transmission]:
    tx = Transmission(RW)
    buf = bytearray()
    seen = []
    for chunk in chunks:
        buf += chunk
        view = memoryview(buf)
        events, used = tx.receive(view)
        seen += [_summary(e) for e in events]
        del events  # payload views pin the buffer; drop them before reusing it
        view.release()
        del buf[:used]
    return seen, tx


def _summary(e: Event) -> Summary:
    if isinstance(e, Closed):
        return (e.reason, e.violation)
    if isinstance(e, Rejected):
        return (e.type, e.cookie, None, e.error.errno)
    return (e.type, e.cookie, bytes(e.payload) if e.payload is not None else None, None)


def test_decode_whole_bytewise_and_trailing() -> None:
    data, expected = _stream()
    whole, tx = _decode_all([data])
    assert whole == expected
    assert tx.phase is Phase.DRAINING
    assert tx.closed == Closed("client sent NBD_CMD_DISC", violation=False)
    bytewise, _ = _decode_all([data[i : i + 1] for i in range(len(data))])
    assert bytewise == expected
    # Anything after NBD_CMD_DISC is ignored (the client MUST NOT send it).
    trailing, _ = _decode_all([data + Request(0, Cmd.READ, 9, 0, 1).pack()])
    assert trailing == expected


def test_decode_partial_header_waits() -> None:
    tx = Transmission(RW)
    raw = Request(0, Cmd.WRITE, 1, 0, 100).pack()
    events, used = tx.receive(memoryview(raw[:27]))
    assert (events, used, tx.needed) == ([], 0, 28)
    events, used = tx.receive(memoryview(raw + b"x" * 50))
    assert (events, used, tx.needed) == ([], 0, 128)


def test_decode_bad_magic_keeps_earlier_commands() -> None:
    good = Request(0, Cmd.READ, 1, 0, 1).pack()
    bad = b"\0" * 28
    tx = Transmission(RW)
    events, used = tx.receive(memoryview(good + bad + good))
    assert events == [
        Command(Cmd.READ, 0, 1, 0, 1),
        Closed("bad request magic 0x00000000", violation=True),
    ]
    assert used == 28
    assert tx.phase is Phase.DRAINING
    # Nothing more is decoded once the phase left OPEN.
    assert tx.receive(memoryview(good)) == ([], 0)


def test_huge_invalid_write_is_skipped_without_buffering() -> None:
    tx = Transmission(RW)
    header = Request(0, Cmd.WRITE, 7, 0, 2**32 - 1).pack()
    events, used = tx.receive(memoryview(header + b"z" * 1000))
    assert [_summary(e) for e in events] == [(Cmd.WRITE, 7, None, E.EINVAL)]
    assert used == 28 + 1000
    assert tx.needed == 28  # still skipping; asks for no more buffer than a header
    events, used = tx.receive(memoryview(b"z" * 4096))
    assert (events, used) == ([], 4096)


def test_disc_with_bad_flags_is_answered_and_still_ends_the_session() -> None:
    tx = Transmission(RW)
    events, _ = tx.receive(memoryview(Request(1 << 9, Cmd.DISC, 3, 0, 0).pack()))
    assert [_summary(e) for e in events] == [
        (Cmd.DISC, 3, None, E.EINVAL),
        ("client sent NBD_CMD_DISC", False),
    ]


def test_budget_stops_after_the_command_that_reaches_it() -> None:
    reads = b"".join(Request(0, Cmd.READ, i, 0, 4096).pack() for i in range(4))
    tx = Transmission(RW)
    events, used = tx.receive(memoryview(reads), budget=8192)
    assert [e.cookie for e in events if isinstance(e, Command)] == [0, 1]
    assert used == 56
    # A spent budget still lets one command through, so the caller makes progress.
    events, used = tx.receive(memoryview(reads[used:]), budget=0)
    assert [e.cookie for e in events if isinstance(e, Command)] == [2]


PHASE_TABLE = [
    # (trigger sequence, final phase)
    ((), Phase.OPEN),
    ((Trigger.SHUTDOWN,), Phase.STOPPING),
    ((Trigger.SHUTDOWN, Trigger.SHUTDOWN), Phase.STOPPING),
    ((Trigger.SHUTDOWN, Trigger.DRAINED), Phase.STOPPING),  # waits for DISC or DEADLINE
    ((Trigger.SHUTDOWN, Trigger.DEADLINE), Phase.DRAINING),
    ((Trigger.SHUTDOWN, Trigger.DEADLINE, Trigger.DRAINED), Phase.CLOSED),
    ((Trigger.DEADLINE, Trigger.DEADLINE), Phase.DRAINING),
    ((Trigger.LOST,), Phase.CLOSED),
    ((Trigger.SHUTDOWN, Trigger.LOST, Trigger.SHUTDOWN), Phase.CLOSED),
]


@pytest.mark.parametrize(("triggers", "final"), PHASE_TABLE)
def test_phase_table(triggers: tuple[Trigger, ...], final: Phase) -> None:
    tx = Transmission(RW)
    for trigger in triggers:
        {
            Trigger.SHUTDOWN: tx.shutdown,
            Trigger.DEADLINE: tx.deadline,
            Trigger.DRAINED: tx.drained,
            Trigger.LOST: tx.lost,
        }[trigger]()
    assert tx.phase is final


def test_stopping_answers_eshutdown_until_the_client_disconnects() -> None:
    """doc/proto.md: after a server shutdown, "any subsequently received requests SHOULD
    be ESHUTDOWN"; the client "MUST initiate a soft disconnect"."""
    tx = Transmission(RW)
    tx.shutdown()
    wire = (
        Request(0, Cmd.READ, 1, 0, 4096).pack()
        + Request(0, Cmd.WRITE, 2, 0, 8).pack()
        + b"payload!"
        + Request(0, Cmd.FLUSH, 3, 0, 0).pack()
        + Request(0, Cmd.DISC, 4, 0, 0).pack()
    )
    events, used = tx.receive(memoryview(wire))
    assert used == len(wire)
    rejected = [e for e in events if isinstance(e, Rejected)]
    assert [(e.cookie, e.error.errno) for e in rejected] == [
        (1, NBDErrno.ESHUTDOWN),
        (2, NBDErrno.ESHUTDOWN),
        (3, NBDErrno.ESHUTDOWN),
    ]
    assert isinstance(events[3], Command) and events[3].type == Cmd.DISC
    assert isinstance(events[4], Closed) and not events[4].violation
    assert tx.phase is Phase.DRAINING
    assert tx.receive(memoryview(Request(0, Cmd.READ, 5, 0, 1).pack())) == ([], 0)


def test_stopping_skips_a_refused_write_payload_byte_by_byte() -> None:
    tx = Transmission(RW)
    tx.shutdown()
    wire = (
        Request(0, Cmd.WRITE, 9, 0, 100).pack() + bytes(100) + Request(0, Cmd.DISC, 10, 0, 0).pack()
    )
    events: list[object] = []
    pos = 0
    for end in range(1, len(wire) + 1):
        got, used = tx.receive(memoryview(wire[pos:end]))
        events += got
        pos += used
    assert tx.needed == REQUEST.size  # the refused payload was never asked to be buffered
    assert [type(e).__name__ for e in events] == ["Rejected", "Command", "Closed"]


def test_deadline_ends_a_stopping_session() -> None:
    tx = Transmission(RW)
    tx.shutdown()
    tx.deadline()
    assert tx.phase is Phase.DRAINING
    assert tx.closed is not None and tx.closed.reason == "shutdown grace period over"


def test_every_phase_can_end() -> None:
    """From every phase LOST leads to CLOSED, and CLOSED is never left."""
    for phase in Phase:
        assert TRANSITIONS[(phase, Trigger.LOST)] is Phase.CLOSED
    assert {to for (frm, _), to in TRANSITIONS.items() if frm is Phase.CLOSED} == {Phase.CLOSED}


def test_drained_while_open_keeps_it_open() -> None:
    tx = Transmission(RW)
    tx.drained()
    assert tx.phase is Phase.OPEN


@given(
    st.lists(
        st.tuples(
            st.sampled_from([Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.FLUSH, 77]),
            st.integers(0, SIZE + 10),
            st.integers(0, 3000),
            st.integers(0, 31),
        ),
        max_size=12,
    ),
    st.lists(st.integers(1, 64), min_size=1, max_size=30),
)
def test_decode_is_chunking_invariant(
    reqs: list[tuple[int, int, int, int]], cuts: list[int]
) -> None:
    data = b""
    for i, (cmd, offset, length, flags) in enumerate(reqs):
        data += Request(flags, cmd, i, offset, length).pack()
        if cmd == Cmd.WRITE:
            data += bytes([i % 256]) * length
    whole, _ = _decode_all([data])
    chunks, pos, k = [], 0, 0
    while pos < len(data):
        step = cuts[k % len(cuts)]
        chunks.append(data[pos : pos + step])
        pos += step
        k += 1
    pieces, _ = _decode_all(chunks)
    assert pieces == whole
    assert [c[1] for c in whole] == list(range(len(reqs)))


def test_plan_read_table() -> None:
    ext = [
        Extent(0, 8192, hole=False, zero=False),
        Extent(8192, 16384, hole=True, zero=True),
        Extent(24576, 1024, hole=True, zero=True),  # merged into the hole before it
        Extent(25600, 100, hole=False, zero=True),  # allocated but zero: joins the hole
        Extent(25700, 1000, hole=False, zero=False),
        Extent(26700, 1000, hole=True, zero=True),  # short zero run: stays data
    ]
    assert plan_read(0, 32768, ext) == [
        ReadPiece(0, 8192, False),
        ReadPiece(8192, 17508, True),
        ReadPiece(25700, 7068, False),
    ]
    assert plan_read(4096, 100, ()) == [ReadPiece(4096, 100, False)]
    # Extents that do not start at the offset are ignored (never trusted past a gap).
    assert plan_read(0, 4096, [Extent(100, 8000, True, True)]) == [ReadPiece(0, 4096, False)]


@given(
    st.integers(0, 10_000),
    st.integers(1, 50_000),
    st.lists(st.tuples(st.integers(1, 9000), st.booleans()), max_size=8),
)
def test_plan_read_covers_exactly(offset: int, length: int, runs: list[tuple[int, bool]]) -> None:
    extents, pos = [], offset
    for wanted, zero in runs:
        size = min(wanted, offset + length - pos)
        if size <= 0:
            break
        extents.append(Extent(pos, size, zero, zero))
        pos += size
    pieces = plan_read(offset, length, extents)
    assert pieces[0].offset == offset
    assert sum(p.length for p in pieces) == length
    for a, b in itertools.pairwise(pieces):
        assert a.offset + a.length == b.offset and a.hole != b.hole
    assert all(p.length >= 4096 for p in pieces if p.hole)


def test_block_status_descriptors() -> None:
    ext = [
        Extent(0, 4096, False, False),
        Extent(4096, 4096, True, True),
        Extent(8192, 4096, True, True),
    ]
    assert block_status_descriptors(0, 12288, ext, req_one=False) == [
        (4096, 0),
        (8192, State.HOLE | State.ZERO),
    ]
    assert block_status_descriptors(0, 12288, ext, req_one=True) == [(4096, 0)]
    assert block_status_descriptors(0, 512, [], req_one=True) == [(512, 0)]
    chunk = block_status_chunk(9, 1, [(4096, 3)])
    assert chunk.hex() == "668e33ef0001000500000000000000090000000c000000010000100000000003"
    reply = Transmission(RW).block_status_reply(
        Command(Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE, 9, 0, 12288), ext
    )
    assert reply == block_status_chunk(9, 1, [(4096, 0)])


def test_error_reply_shapes() -> None:
    assert Transmission(SIMPLE).error_reply(5, E.EINVAL).hex() == (
        "67446698000000160000000000000005"
    )
    chunk = Transmission(RW).error_reply(5, E.ENOSPC, "no")
    assert chunk.hex() == "668e33ef000180010000000000000005000000080000001c00026e6f"


def _chunks(raw: bytes) -> list[StructuredChunk]:
    out, at = [], 0
    while at < len(raw):
        chunk, at = StructuredChunk.unpack(raw, at)
        out.append(chunk)
    return out


def _join(reply: list[bytes | bytearray | memoryview]) -> bytes:
    return b"".join(bytes(part) for part in reply)


K = 4096
DATA_HOLE_DATA = b"a" * (8 * K) + bytes(16 * K) + b"b" * (8 * K)


def test_read_reply_shapes() -> None:
    """The framing rules of a read, checked on the bytes the tests' client decodes."""
    c = Command(Cmd.READ, 0, 7, 8 * K, len(DATA_HOLE_DATA))
    # Simple replies: the 16-byte header, then the data as is.
    simple = _join(Transmission(SIMPLE).read_reply(c, DATA_HOLE_DATA))
    assert SimpleReply.unpack(simple) == SimpleReply(0, 7)
    assert simple[16:] == DATA_HOLE_DATA
    # Structured: data, hole, data; only the last chunk carries DONE.
    chunks = _chunks(_join(Transmission(RW).read_reply(c, DATA_HOLE_DATA)))
    assert [(ch.type, ch.flags) for ch in chunks] == [
        (ReplyType.OFFSET_DATA, 0),
        (ReplyType.OFFSET_HOLE, 0),
        (ReplyType.OFFSET_DATA, ReplyFlag.DONE),
    ]
    assert chunks[1].payload == (16 * K).to_bytes(8, "big") + (16 * K).to_bytes(4, "big")
    assert chunks[2].payload[8:] == b"b" * (8 * K)
    # DF: "at most one content chunk", the zeroes explicitly present.
    df = Command(Cmd.READ, CmdFlag.DF, 7, 8 * K, len(DATA_HOLE_DATA))
    (only,) = _chunks(_join(Transmission(RW).read_reply(df, DATA_HOLE_DATA)))
    assert (only.type, only.flags, only.payload[8:]) == (
        ReplyType.OFFSET_DATA,
        ReplyFlag.DONE,
        DATA_HOLE_DATA,
    )
    # A zero-length read is a lone NONE chunk with DONE.
    empty = Command(Cmd.READ, 0, 8, 0, 0)
    assert _chunks(_join(Transmission(RW).read_reply(empty, b""))) == [
        StructuredChunk(ReplyFlag.DONE, ReplyType.NONE, 8, b"")
    ]


def test_read_prefix_and_sendfile_frame() -> None:
    tx = Transmission(RW)
    small = Command(Cmd.READ, 0, 3, 4096, 512)
    prefix = tx.read_prefix(small)
    assert prefix is not None
    (chunk,) = _chunks(prefix + b"x" * 512)
    assert (chunk.type, chunk.flags, chunk.payload[:8]) == (
        ReplyType.OFFSET_DATA,
        ReplyFlag.DONE,
        (4096).to_bytes(8, "big"),
    )
    # Large enough for a hole scan: the data decides the framing.
    assert tx.read_prefix(Command(Cmd.READ, 0, 3, 0, 1 << 16)) is None
    assert tx.read_prefix(Command(Cmd.READ, 0, 3, 0, 0)) is None
    assert Transmission(SIMPLE).read_prefix(small) == SimpleReply(0, 3).pack()
    # sendfile: the data chunk cannot carry DONE (an error may strike mid-transfer).
    header, trailer = tx.sendfile_frame(small)
    chunks = _chunks(header + b"y" * 512 + trailer)
    assert [(ch.type, ch.flags) for ch in chunks] == [
        (ReplyType.OFFSET_DATA, 0),
        (ReplyType.NONE, ReplyFlag.DONE),
    ]
    assert Transmission(SIMPLE).sendfile_frame(small) == (SimpleReply(0, 3).pack(), b"")


def test_zero_extents_table() -> None:
    k = 4096
    data = b"d" * 100 + bytes(3 * k) + b"e" * k + bytes(k) + b"f" + bytes(5 * k)
    # From offset 4000, block boundaries fall at data indexes 96 + m * 4096. Only whole
    # aligned zero blocks become zero extents; the lone zero block is unaligned (data).
    ext = [(e.offset - 4000, e.length, e.zero) for e in zero_extents(data, 4000)]
    assert ext == [
        (0, 4192, False),
        (4192, 2 * k, True),
        (12384, 3 * k, False),
        (24672, 4 * k, True),
        (41056, 5, False),
    ]
    assert zero_extents(b"x" * 100_000, 0) == [Extent(0, 100_000, False, False)]
    assert zero_extents(bytes(65536), 0) == [Extent(0, 65536, True, True)]


@given(
    st.integers(0, 10_000), st.lists(st.tuples(st.integers(1, 20_000), st.booleans()), max_size=8)
)
def test_zero_extents_are_exact(offset: int, runs: list[tuple[int, bool]]) -> None:
    data = b"".join(bytes(n) if zero else b"\x01" * n for n, zero in runs)
    ext = zero_extents(data, offset)
    pos = offset
    for e in ext:
        assert e.offset == pos and e.length > 0
        if e.zero:
            assert (e.offset % 4096, e.length % 4096) == (0, 0)
            assert data[e.offset - offset : e.offset - offset + e.length] == bytes(e.length)
        pos += e.length
    assert pos == offset + len(data)
