"""The transmission core: validation tables, decoding (whole, byte by byte, with
trailing data), read planning and block status descriptors, plus hypothesis."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdserver.backends.base import Extent
from nbdserver.errors import NBDErrno
from nbdserver.protocol import Cmd, CmdFlag, Request, State, TransmissionFlag
from nbdserver.transmission import (
    Command,
    ReadPiece,
    RequestDecoder,
    Session,
    block_status_chunk,
    block_status_descriptors,
    error_reply,
    plan_read,
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


def _stream() -> tuple[bytes, list[tuple[int, int, bytes | None, int | None]]]:
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
    return b"".join(r for r, _ in reqs), [e for _, e in reqs]


def _decode_all(
    chunks: list[bytes],
) -> tuple[list[tuple[int, int, bytes | None, int | None]], RequestDecoder]:
    decoder = RequestDecoder(RW)
    buf = bytearray()
    seen = []
    for chunk in chunks:
        buf += chunk
        view = memoryview(buf)
        commands, used = decoder.decode(view)
        seen += [_summary(c) for c in commands]
        del commands  # payload views pin the buffer; drop them before reusing it
        view.release()
        del buf[:used]
    return seen, decoder


def _summary(c: Command) -> tuple[int, int, bytes | None, int | None]:
    return (
        c.type,
        c.cookie,
        bytes(c.payload) if c.payload is not None else None,
        c.error.errno if c.error is not None else None,
    )


def test_decode_whole_bytewise_and_trailing() -> None:
    data, expected = _stream()
    whole, decoder = _decode_all([data])
    assert whole == expected
    assert decoder.disconnected
    bytewise, _ = _decode_all([data[i : i + 1] for i in range(len(data))])
    assert bytewise == expected
    # Anything after NBD_CMD_DISC is ignored (the client MUST NOT send it).
    trailing, _ = _decode_all([data + Request(0, Cmd.READ, 9, 0, 1).pack()])
    assert trailing == expected


def test_decode_partial_header_waits() -> None:
    decoder = RequestDecoder(RW)
    raw = Request(0, Cmd.WRITE, 1, 0, 100).pack()
    commands, used = decoder.decode(memoryview(raw[:27]))
    assert (commands, used, decoder.needed) == ([], 0, 28)
    commands, used = decoder.decode(memoryview(raw + b"x" * 50))
    assert (commands, used, decoder.needed) == ([], 0, 128)


def test_decode_bad_magic_keeps_earlier_commands() -> None:
    good = Request(0, Cmd.READ, 1, 0, 1).pack()
    bad = b"\0" * 28
    decoder = RequestDecoder(RW)
    commands, used = decoder.decode(memoryview(good + bad + good))
    assert [c.cookie for c in commands] == [1]
    assert used == 28
    assert decoder.violation is not None and "bad request magic" in str(decoder.violation)


def test_huge_invalid_write_is_skipped_without_buffering() -> None:
    decoder = RequestDecoder(RW)
    header = Request(0, Cmd.WRITE, 7, 0, 2**32 - 1).pack()
    commands, used = decoder.decode(memoryview(header + b"z" * 1000))
    assert [(c.cookie, c.error.errno if c.error else None) for c in commands] == [(7, E.EINVAL)]
    assert used == 28 + 1000
    assert decoder.needed == 28  # still skipping; asks for no more buffer than a header
    commands, used = decoder.decode(memoryview(b"z" * 4096))
    assert (commands, used) == ([], 4096)


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


def test_error_reply_shapes() -> None:
    assert error_reply(SIMPLE, 5, E.EINVAL).hex() == "67446698000000160000000000000005"
    chunk = error_reply(RW, 5, E.ENOSPC, "no")
    assert chunk.hex() == "668e33ef000180010000000000000005000000080000001c00026e6f"


def test_zero_extents_table() -> None:
    from nbdserver.transmission import zero_extents

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
    from nbdserver.transmission import zero_extents

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
