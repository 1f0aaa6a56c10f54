"""The handshake state machine: tables of client bytes -> events and server bytes, fed
whole, byte by byte and with trailing data; hypothesis over arbitrary option streams."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdserver.negotiation import (
    MAX_OPTION_DATA,
    TRANSITIONS,
    Closed,
    Event,
    ExportInfo,
    Negotiation,
    OptionHandled,
    Phase,
    Ready,
)
from nbdserver.protocol import (
    CLIENT_FLAGS,
    IHAVEOPT,
    OPTION_HEADER,
    ClientFlag,
    Info,
    Opt,
    OptionReply,
    OptionRequest,
    Rep,
    TransmissionFlag,
    pack_info_go,
    pack_meta_context,
)

FLAGS = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_DF
EXPORTS = {
    "": ExportInfo("", "default disk", 1 << 30, FLAGS),
    "other": ExportInfo("other", "", 4096, FLAGS | TransmissionFlag.READ_ONLY),
}
CF = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES
HELLO = CLIENT_FLAGS.pack(CF)
GREETING_HEX = "4e42444d4147494349484156454f50540003"


def opt(option: int, data: bytes = b"") -> bytes:
    return OptionRequest(option, data).pack()


def parse_replies(out: bytes) -> list[OptionReply]:
    replies, pos = [], 0
    while pos < len(out):
        reply, used = OptionReply.unpack(out[pos:])
        replies.append(reply)
        pos += used
    return replies


def feed(chunks: list[bytes]) -> tuple[Negotiation, list[Event], bytes]:
    neg = Negotiation(EXPORTS)
    assert neg.data_to_send().hex() == GREETING_HEX
    events: list[Event] = []
    out = b""
    for chunk in chunks:
        if neg.phase in (Phase.TRANSMISSION, Phase.CLOSED):
            break
        events += neg.receive_data(chunk)
        out += neg.data_to_send()
    return neg, events, out


def modes(data: bytes) -> dict[str, list[bytes]]:
    return {"whole": [data], "bytewise": [data[i : i + 1] for i in range(len(data))]}


@dataclass(frozen=True)
class Case:
    name: str
    client: bytes
    replies: list[Rep]  # option reply types the server sends, in order
    final: type[Event] | None  # last event type
    check: Callable[[Negotiation, list[Event], bytes], None] | None = None
    #: The server's bytes are not option replies (EXPORT_NAME); ``check`` reads them.
    raw: bool = False


def _ready(neg: Negotiation, events: list[Event], out: bytes) -> None:
    ready = events[-1]
    assert isinstance(ready, Ready)
    assert ready.export.name == ""
    assert ready.structured and ready.meta_context == 1
    assert ready.flags & TransmissionFlag.SEND_DF


def _info(neg: Negotiation, events: list[Event], out: bytes) -> None:
    infos = [r.data for r in parse_replies(out) if r.reply == Rep.INFO]
    kinds = {int.from_bytes(d[:2], "big"): d[2:] for d in infos}
    assert kinds[Info.EXPORT] == (1 << 30).to_bytes(8, "big") + int(
        FLAGS & ~TransmissionFlag.SEND_DF
    ).to_bytes(2, "big")
    assert kinds[Info.NAME] == b""
    assert kinds[Info.DESCRIPTION] == b"default disk"
    assert kinds[Info.BLOCK_SIZE] == bytes.fromhex("00000001 00001000 02000000".replace(" ", ""))


def _list(neg: Negotiation, events: list[Event], out: bytes) -> None:
    servers = [r.data for r in parse_replies(out) if r.reply == Rep.SERVER]
    assert servers == [b"\0\0\0\0default disk", b"\0\0\0\5other"]


def _export_name(neg: Negotiation, events: list[Event], out: bytes) -> None:
    assert out[:8] == (4096).to_bytes(8, "big")  # the size of export "other"
    flags = int.from_bytes(out[8:10], "big")
    assert flags & TransmissionFlag.READ_ONLY and not flags & TransmissionFlag.SEND_DF
    assert len(out) == 10  # NO_ZEROES negotiated: no 124 zero bytes


CASES = [
    Case("list", HELLO + opt(Opt.LIST), [Rep.SERVER, Rep.SERVER, Rep.ACK], OptionHandled, _list),
    Case("list-with-data", HELLO + opt(Opt.LIST, b"x"), [Rep.ERR_INVALID], OptionHandled),
    Case(
        "unknown-then-list",
        HELLO + opt(99, b"abc") + opt(Opt.LIST),
        [Rep.ERR_UNSUP, Rep.SERVER, Rep.SERVER, Rep.ACK],
        OptionHandled,
    ),
    Case("extended-headers", HELLO + opt(Opt.EXTENDED_HEADERS), [Rep.ACK], OptionHandled),
    Case("starttls-tls-off", HELLO + opt(Opt.STARTTLS), [Rep.ERR_POLICY], OptionHandled),
    Case(
        "info",
        HELLO + opt(Opt.INFO, pack_info_go(b"", [Info.BLOCK_SIZE])),
        [Rep.INFO] * 4 + [Rep.ACK],
        OptionHandled,
        _info,
    ),
    Case(
        "info-unknown",
        HELLO + opt(Opt.INFO, pack_info_go(b"nope", [])),
        [Rep.ERR_UNKNOWN],
        OptionHandled,
    ),
    Case(
        "info-truncated", HELLO + opt(Opt.INFO, b"\0\0\0\x09ab"), [Rep.ERR_INVALID], OptionHandled
    ),
    Case(
        "info-count-mismatch",
        HELLO + opt(Opt.INFO, pack_info_go(b"", [1])[:-1]),
        [Rep.ERR_INVALID],
        OptionHandled,
    ),
    Case(
        "meta-before-structured",
        HELLO + opt(Opt.SET_META_CONTEXT, pack_meta_context(b"", [b"base:allocation"])),
        [Rep.ERR_INVALID],
        OptionHandled,
    ),
    Case(
        "list-meta-all",
        HELLO + opt(Opt.STRUCTURED_REPLY) + opt(Opt.LIST_META_CONTEXT, pack_meta_context(b"", [])),
        [Rep.ACK, Rep.META_CONTEXT, Rep.ACK],
        OptionHandled,
    ),
    Case(
        "list-meta-other-namespace",
        HELLO
        + opt(Opt.STRUCTURED_REPLY)
        + opt(Opt.LIST_META_CONTEXT, pack_meta_context(b"", [b"qemu:dirty"])),
        [Rep.ACK, Rep.ACK],
        OptionHandled,
    ),
    Case(
        "meta-no-colon",
        HELLO
        + opt(Opt.STRUCTURED_REPLY)
        + opt(Opt.SET_META_CONTEXT, pack_meta_context(b"", [b"junk"])),
        [Rep.ACK, Rep.ERR_INVALID],
        OptionHandled,
    ),
    Case(
        "structured-with-data",
        HELLO + opt(Opt.STRUCTURED_REPLY, b"x"),
        [Rep.ERR_INVALID],
        OptionHandled,
    ),
    Case(
        "go-structured-meta",
        HELLO
        + opt(Opt.STRUCTURED_REPLY)
        + opt(Opt.SET_META_CONTEXT, pack_meta_context(b"", [b"base:allocation"]))
        + opt(Opt.GO, pack_info_go(b"", [])),
        [Rep.ACK, Rep.META_CONTEXT, Rep.ACK, Rep.INFO, Rep.INFO, Rep.INFO, Rep.INFO, Rep.ACK],
        Ready,
        _ready,
    ),
    Case(
        "go-unknown",
        HELLO + opt(Opt.GO, pack_info_go(b"zzz", [])),
        [Rep.ERR_UNKNOWN],
        OptionHandled,
    ),
    Case("abort", HELLO + opt(Opt.ABORT), [Rep.ACK], Closed),
    Case("export-name", HELLO + opt(Opt.EXPORT_NAME, b"other"), [], Ready, _export_name, raw=True),
    Case("export-name-unknown", HELLO + opt(Opt.EXPORT_NAME, b"nope"), [], Closed),
    Case("unknown-client-flags", CLIENT_FLAGS.pack(0x80), [], Closed),
    Case("bad-option-magic", HELLO + b"\0" * 16, [], Closed),
]


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_handshake_table(case: Case, mode: str) -> None:
    neg, events, out = feed(modes(case.client)[mode])
    if case.raw:
        assert out and case.check is not None
    else:
        # Also when none are expected: a violation must close without a word.
        assert [r.reply for r in parse_replies(out)] == case.replies
    if case.final is None:
        assert events == []
    else:
        assert isinstance(events[-1], case.final)
    if case.check is not None:
        case.check(neg, events, out)


def test_export_name_zeroes_without_no_zeroes() -> None:
    _, events, out = feed(
        [CLIENT_FLAGS.pack(ClientFlag.FIXED_NEWSTYLE) + opt(Opt.EXPORT_NAME, b"")]
    )
    assert isinstance(events[-1], Ready)
    assert len(out) == 8 + 2 + 124 and out[10:] == bytes(124)


def test_trailing_data_after_go_is_kept() -> None:
    tail = b"\x25\x60\x95\x13" + b"T" * 30
    for chunks in modes(HELLO + opt(Opt.GO, pack_info_go(b"", [])) + tail).values():
        neg = Negotiation(EXPORTS)
        got = b""
        for chunk in chunks:
            if neg.phase is Phase.TRANSMISSION:
                got += chunk
                continue
            neg.receive_data(chunk)
            if neg.phase is Phase.TRANSMISSION:
                got += neg.trailing_data
        assert got == tail


def test_unknown_option_with_partial_next_header() -> None:
    neg, _, out = feed([HELLO + opt(99) + opt(Opt.LIST)[:7]])
    assert [r.reply for r in parse_replies(out)] == [Rep.ERR_UNSUP]
    assert neg.phase is Phase.OPTION_HEADER


def test_oversized_option_is_discarded_not_buffered() -> None:
    neg = Negotiation(EXPORTS)
    neg.data_to_send()
    announced = 3 * MAX_OPTION_DATA + 17
    neg.receive_data(HELLO + OPTION_HEADER.pack(IHAVEOPT, Opt.INFO, announced))
    assert neg.phase is Phase.DISCARD
    sent = 0
    while sent < announced:
        n = min(10_000, announced - sent)
        events = neg.receive_data(b"A" * n)
        sent += n
        assert len(neg._in) == 0  # nothing of the oversized option is kept
    assert [type(e) for e in events] == [OptionHandled]
    assert [r.reply for r in parse_replies(neg.data_to_send())] == [Rep.ERR_TOO_BIG]
    neg.receive_data(opt(Opt.LIST))
    assert [r.reply for r in parse_replies(neg.data_to_send())][-1] == Rep.ACK


def test_oversized_export_name_closes() -> None:
    _, events, _ = feed([HELLO + OPTION_HEADER.pack(IHAVEOPT, Opt.EXPORT_NAME, 2**32 - 1)])
    assert isinstance(events[-1], Closed) and events[-1].violation


def test_receive_after_end_raises() -> None:
    neg, _, _ = feed([HELLO + opt(Opt.ABORT)])
    with pytest.raises(RuntimeError, match="negotiation is over"):
        neg.receive_data(b"x")


def test_transition_table_is_closed() -> None:
    """Every phase but the terminal ones has a way out, and terminal ones have none."""
    sources = {phase for phase, _ in TRANSITIONS}
    assert sources == set(Phase) - {Phase.TRANSMISSION, Phase.CLOSED}
    assert Phase.TRANSMISSION in TRANSITIONS.values() and Phase.CLOSED in TRANSITIONS.values()


OPTIONS = st.sampled_from([int(o) for o in Opt] + [0, 12, 99, 2**32 - 1])
OPTION_DATA = st.one_of(
    st.binary(max_size=40),
    st.builds(
        pack_info_go,
        st.sampled_from([b"", b"other", b"x"]),
        st.lists(st.integers(0, 5), max_size=4),
    ),
    st.builds(
        pack_meta_context,
        st.sampled_from([b"", b"other"]),
        st.lists(st.sampled_from([b"base:", b"base:allocation", b"x:y", b"nocolon"]), max_size=3),
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(OPTIONS, OPTION_DATA), max_size=8), st.integers(1, 50))
def test_any_option_stream_is_answered_or_closed(
    options: list[tuple[int, bytes]], step: int
) -> None:
    """Every option gets exactly one final reply (ACK or error) unless the session ends,
    and chunking the input never changes the output."""
    data = HELLO + b"".join(opt(o, d) for o, d in options)
    _, events_whole, out_whole = feed([data])
    _, events_chunked, out_chunked = feed([data[i : i + step] for i in range(0, len(data), step)])
    assert out_chunked == out_whole
    assert events_chunked == events_whole
    handled = [e for e in events_whole if isinstance(e, OptionHandled)]
    ended = [e for e in events_whole if isinstance(e, (Ready, Closed))]
    assert len(ended) <= 1
    if not ended:
        assert len(handled) == len(options)
        if not any(o == Opt.EXPORT_NAME for o, _ in options):
            finals = [
                r for r in parse_replies(out_whole) if r.reply == Rep.ACK or r.reply & (1 << 31)
            ]
            assert len(finals) == len(options)
