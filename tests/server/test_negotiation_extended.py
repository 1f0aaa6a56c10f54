"""NBD_OPT_EXTENDED_HEADERS in the handshake core (doc/proto.md of the extension-ext-header
branch): the option's own rules, its interplay with NBD_OPT_STRUCTURED_REPLY both ways,
the options it unlocks or forbids, the transmission flags and the server's switch. Every
case is fed whole and byte by byte."""

from __future__ import annotations

import pytest

from nbdserver.negotiation import (
    Closed,
    ExportInfo,
    Negotiation,
    OptionHandled,
    Phase,
    Ready,
)
from nbdserver.protocol import (
    Info,
    Opt,
    Rep,
    TransmissionFlag,
    pack_info_go,
    pack_meta_context,
)
from server.test_negotiation import EXPORTS, HELLO, feed, modes, opt, parse_replies

MODES = pytest.mark.parametrize("mode", ["whole", "bytewise"])
EXT = opt(Opt.EXTENDED_HEADERS)
SR = opt(Opt.STRUCTURED_REPLY)
META = opt(Opt.SET_META_CONTEXT, pack_meta_context(b"", [b"base:allocation"]))
GO = opt(Opt.GO, pack_info_go(b"", []))

#: (name, client options after the client flags, the option replies expected in order,
#: whether extended headers are on afterwards)
REPLY_CASES = [
    ("ack", EXT, [Rep.ACK], True),
    # "The client MUST NOT send any additional data with the option, and the server
    # SHOULD reject a request that includes data with NBD_REP_ERR_INVALID."
    ("with-data", opt(Opt.EXTENDED_HEADERS, b"\0"), [Rep.ERR_INVALID], False),
    ("repeat", EXT + EXT, [Rep.ACK, Rep.ACK], True),
    # "A client MAY request structured replies first".
    ("structured-first", SR + EXT, [Rep.ACK, Rep.ACK], True),
    # NBD_OPT_STRUCTURED_REPLY: "NBD_REP_ERR_EXT_HEADER_REQD: The client has already
    # successfully negotiated extended headers, which takes precedence over this option."
    ("structured-after", EXT + SR, [Rep.ACK, Rep.ERR_EXT_HEADER_REQD], True),
    # A refused option changes nothing: data on the option leaves structured replies open.
    (
        "bad-then-structured",
        opt(Opt.EXTENDED_HEADERS, b"x") + SR,
        [Rep.ERR_INVALID, Rep.ACK],
        False,
    ),
    # SET_META_CONTEXT needs "structured replies or extended headers ... first".
    ("meta-after-extended", EXT + META, [Rep.ACK, Rep.META_CONTEXT, Rep.ACK], True),
    (
        "list-meta-after-extended",
        EXT + opt(Opt.LIST_META_CONTEXT, pack_meta_context(b"", [])),
        [Rep.ACK, Rep.META_CONTEXT, Rep.ACK],
        True,
    ),
]


@MODES
@pytest.mark.parametrize(
    ("name", "client", "expected", "extended"), REPLY_CASES, ids=[c[0] for c in REPLY_CASES]
)
def test_extended_headers_replies(
    name: str, client: bytes, expected: list[Rep], extended: bool, mode: str
) -> None:
    neg, events, out = feed(modes(HELLO + client)[mode])
    assert [r.reply for r in parse_replies(out)] == expected
    assert isinstance(events[-1], OptionHandled)
    assert events[-1].reply == expected[-1]
    assert neg.extended is extended


@MODES
@pytest.mark.parametrize("before", [b"", SR], ids=["alone", "after-structured"])
def test_go_after_extended_headers_is_ready_extended(before: bytes, mode: str) -> None:
    _, events, out = feed(modes(HELLO + before + EXT + META + GO)[mode])
    ready = events[-1]
    assert isinstance(ready, Ready)
    assert ready.extended and ready.structured and ready.meta_context == 1
    # SEND_DF: "MUST leave this flag clear if neither structured replies nor extended
    # headers have been negotiated": extended headers alone set it.
    assert ready.flags & TransmissionFlag.SEND_DF
    assert parse_replies(out)[-1].reply == Rep.ACK


@MODES
def test_go_without_extended_headers_is_compact(mode: str) -> None:
    _, events, _ = feed(modes(HELLO + SR + GO)[mode])
    ready = events[-1]
    assert isinstance(ready, Ready) and ready.structured and not ready.extended


@MODES
def test_export_name_after_extended_headers_ends_the_session(mode: str) -> None:
    # "a client that has used NBD_OPT_EXTENDED_HEADERS to negotiate extended headers MUST
    # NOT use this option" (NBD_OPT_EXPORT_NAME), which cannot carry an error reply.
    neg, events, out = feed(modes(HELLO + EXT + opt(Opt.EXPORT_NAME, b""))[mode])
    assert [r.reply for r in parse_replies(out)] == [Rep.ACK]  # no export data follows
    closed = events[-1]
    assert isinstance(closed, Closed) and closed.violation
    assert "NBD_OPT_EXTENDED_HEADERS" in closed.reason
    assert not any(isinstance(e, Ready) for e in events)
    assert neg.phase is Phase.CLOSED


def test_block_status_payload_is_never_advertised() -> None:
    # NBD_FLAG_BLOCK_STATUS_PAYLOAD: the payload form of NBD_CMD_BLOCK_STATUS is optional
    # and not implemented, so the bit is cleared even if an export's flags carried it
    # ("Servers MUST NOT advertise this bit unless the client successfully negotiates
    # extended headers").
    flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.BLOCK_STAT_PAYLOAD
    exports = {"": ExportInfo("", "", 4096, flags)}
    for client in (HELLO + EXT + GO, HELLO + GO):
        neg = Negotiation(exports)
        neg.data_to_send()
        events = neg.receive_data(client)
        ready = events[-1]
        assert isinstance(ready, Ready)
        assert not ready.flags & TransmissionFlag.BLOCK_STAT_PAYLOAD


def test_info_after_extended_headers_advertises_send_df() -> None:
    _, _, out = feed([HELLO + EXT + opt(Opt.INFO, pack_info_go(b"", [Info.BLOCK_SIZE]))])
    export = next(r.data for r in parse_replies(out) if r.data[:2] == b"\0\0")
    assert int.from_bytes(export[10:12], "big") & TransmissionFlag.SEND_DF


@MODES
def test_switched_off_extended_headers_are_unsupported(mode: str) -> None:
    # "clients SHOULD be prepared to also handle NBD_REP_ERR_UNSUP; in this case, only
    # the compact transmission headers will be used".
    neg = Negotiation(EXPORTS, extended_headers=False)
    neg.data_to_send()
    events = []
    for chunk in modes(HELLO + EXT + SR + GO)[mode]:
        if isinstance(events[-1:] and events[-1], Ready):
            break
        events += neg.receive_data(chunk)
    assert [r.reply for r in parse_replies(neg.data_to_send())][:2] == [Rep.ERR_UNSUP, Rep.ACK]
    ready = events[-1]
    assert isinstance(ready, Ready) and ready.structured and not ready.extended
