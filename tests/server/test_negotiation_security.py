"""The handshake's security rules, in the sans-IO core: the three TLS modes of doc/proto.md
("NOTLS", "SELECTIVETLS", "FORCEDTLS"), the restart of option haggling after STARTTLS,
and per-export allow-lists. Each case is fed whole and byte by byte."""

from __future__ import annotations

import ipaddress

import pytest

from nbdserver.negotiation import (
    Closed,
    Event,
    ExportInfo,
    Negotiation,
    OptionHandled,
    Phase,
    Ready,
    Refused,
    StartTLS,
    TlsMode,
    address_allowed,
)
from nbdserver.protocol import (
    CLIENT_FLAGS,
    IHAVEOPT,
    OPTION_HEADER,
    ClientFlag,
    Opt,
    OptionReply,
    OptionRequest,
    Rep,
    TransmissionFlag,
    pack_info_go,
    pack_meta_context,
)
from server.test_negotiation import opt
from server.test_negotiation import parse_replies as replies

FLAGS = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
LOCAL = ipaddress.ip_address("127.0.0.1")
OTHER = ipaddress.ip_address("127.0.0.2")
ONLY_LOCAL = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))
EXPORTS = {
    "open": ExportInfo("open", "", 4096, FLAGS),
    "guarded": ExportInfo("guarded", "", 8192, FLAGS, allow=ONLY_LOCAL),
}
HELLO = CLIENT_FLAGS.pack(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
GO_OPEN = OptionRequest(Opt.GO, pack_info_go(b"open", [])).pack()


def run(
    neg: Negotiation, data: bytes, bytewise: bool
) -> tuple[list[Event], list[OptionReply] | bytes]:
    """Feed ``data``; return the events and the option replies the server sent."""
    neg.data_to_send()  # the greeting
    events: list[Event] = []
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    for chunk in chunks:
        if neg.phase in (Phase.TRANSMISSION, Phase.CLOSED, Phase.TLS_HANDSHAKE):
            break
        events += neg.receive_data(chunk)
    return events, replies(neg.data_to_send())


def kinds(rs: list[OptionReply] | bytes) -> list[Rep]:
    assert isinstance(rs, list)
    return [Rep(r.reply) for r in rs]


BYTEWISE = pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])

#: FORCEDTLS: "any other option, including NBD_OPT_INFO and unsupported options" gets
#: NBD_REP_ERR_TLS_REQD before TLS.
REFUSED_BEFORE_TLS = [
    ("list", opt(Opt.LIST)),
    ("info", opt(Opt.INFO, pack_info_go(b"open", []))),
    ("go", GO_OPEN),
    ("structured", opt(Opt.STRUCTURED_REPLY)),
    ("extended", opt(Opt.EXTENDED_HEADERS)),
    ("list-meta", opt(Opt.LIST_META_CONTEXT, pack_meta_context(b"open", []))),
    ("set-meta", opt(Opt.SET_META_CONTEXT, pack_meta_context(b"open", []))),
    ("unknown", opt(99, b"xyz")),
    ("oversized", OPTION_HEADER.pack(IHAVEOPT, Opt.INFO, 70_000) + b"\0" * 70_000),
]


@BYTEWISE
@pytest.mark.parametrize(
    ("name", "data"), REFUSED_BEFORE_TLS, ids=[n for n, _ in REFUSED_BEFORE_TLS]
)
def test_require_refuses_every_option_before_tls(name: str, data: bytes, bytewise: bool) -> None:
    neg = Negotiation(EXPORTS, tls=TlsMode.REQUIRE, peer=LOCAL)
    events, rs = run(neg, HELLO + data, bytewise and name != "oversized")
    assert kinds(rs) == [Rep.ERR_TLS_REQD]
    assert neg.phase is Phase.OPTION_HEADER  # the session goes on: the client may STARTTLS
    assert any(isinstance(e, Refused) for e in events)


@BYTEWISE
def test_require_export_name_before_tls_ends_the_session(bytewise: bool) -> None:
    # "as this request cannot error, it MUST terminate the session" (FORCEDTLS mode).
    neg = Negotiation(EXPORTS, tls=TlsMode.REQUIRE, peer=LOCAL)
    events, rs = run(neg, HELLO + opt(Opt.EXPORT_NAME, b"open"), bytewise)
    assert rs == []  # no export data leaked
    assert neg.phase is Phase.CLOSED
    assert isinstance(events[-1], Closed) and "requires TLS" in events[-1].reason
    assert isinstance(events[0], Refused)


def test_require_lets_abort_through() -> None:
    neg = Negotiation(EXPORTS, tls=TlsMode.REQUIRE, peer=LOCAL)
    events, rs = run(neg, HELLO + opt(Opt.ABORT), False)
    assert kinds(rs) == [Rep.ACK]
    assert isinstance(events[-1], Closed) and not events[-1].violation


@pytest.mark.parametrize("mode", [TlsMode.ON, TlsMode.REQUIRE])
@BYTEWISE
def test_starttls_then_haggling_restarts(mode: TlsMode, bytewise: bool) -> None:
    neg = Negotiation(EXPORTS, tls=mode, peer=LOCAL)
    stateful = (
        opt(Opt.STRUCTURED_REPLY)
        + opt(Opt.EXTENDED_HEADERS)
        + opt(Opt.SET_META_CONTEXT, pack_meta_context(b"open", [b"base:allocation"]))
    )
    before = stateful if mode is TlsMode.ON else b""
    events, rs = run(neg, HELLO + before + opt(Opt.STARTTLS), bytewise)
    assert kinds(rs)[-1] == Rep.ACK and isinstance(events[-1], StartTLS)
    assert neg.phase is Phase.TLS_HANDSHAKE
    with pytest.raises(RuntimeError, match="TLS handshake"):
        neg.receive_data(b"\x16\x03\x01")  # the adapter must not feed the ClientHello here
    neg.tls_established()
    assert neg.tls_active and neg.phase is Phase.OPTION_HEADER
    # A second STARTTLS: "it MUST reply with NBD_REP_ERR_INVALID".
    events = neg.receive_data(opt(Opt.STARTTLS))
    assert kinds(replies(neg.data_to_send())) == [Rep.ERR_INVALID]
    # No state survives STARTTLS: the GO below is a plain (simple-reply) session.
    events = neg.receive_data(GO_OPEN)
    out = kinds(replies(neg.data_to_send()))
    assert Rep.ERR_TLS_REQD not in out and out[-1] == Rep.ACK
    ready = events[-1]
    assert isinstance(ready, Ready) and ready.export.name == "open"
    assert not ready.structured and ready.meta_context is None
    assert not ready.extended  # "MUST renegotiate extended headers" (NBD_OPT_EXTENDED_HEADERS)


def test_plaintext_after_starttls_is_a_violation() -> None:
    neg = Negotiation(EXPORTS, tls=TlsMode.ON, peer=LOCAL)
    events, rs = run(neg, HELLO + opt(Opt.STARTTLS) + GO_OPEN, False)
    assert kinds(rs) == [Rep.ACK]
    assert isinstance(events[-1], Closed) and events[-1].violation
    assert not any(isinstance(e, StartTLS) for e in events)  # no handshake is started
    assert neg.phase is Phase.CLOSED


@pytest.mark.parametrize(
    ("mode", "expected"),
    [(TlsMode.OFF, Rep.ERR_POLICY), (TlsMode.ON, Rep.ACK), (TlsMode.REQUIRE, Rep.ACK)],
)
def test_starttls_answer_per_mode(mode: TlsMode, expected: Rep) -> None:
    neg = Negotiation(EXPORTS, tls=mode, peer=LOCAL)
    _, rs = run(neg, HELLO + opt(Opt.STARTTLS), False)
    assert kinds(rs) == [expected]
    # NOTLS: "The server MUST NOT respond to any option request with NBD_REP_ERR_TLS_REQD".
    if mode is not TlsMode.REQUIRE:
        neg2 = Negotiation(EXPORTS, tls=mode, peer=LOCAL)
        _, rs2 = run(neg2, HELLO + GO_OPEN, False)
        assert kinds(rs2)[-1] == Rep.ACK


def test_starttls_with_data_is_invalid() -> None:
    neg = Negotiation(EXPORTS, tls=TlsMode.REQUIRE, peer=LOCAL)
    _, rs = run(neg, HELLO + opt(Opt.STARTTLS, b"x"), False)
    assert kinds(rs) == [Rep.ERR_INVALID]


def test_require_without_fixed_newstyle_never_sends_tls_reqd() -> None:
    # Such a client forces NOTLS, whose rule is "MUST NOT respond ... NBD_REP_ERR_TLS_REQD";
    # the export is still not served in plaintext.
    neg = Negotiation(EXPORTS, tls=TlsMode.REQUIRE, peer=LOCAL)
    _, rs = run(neg, CLIENT_FLAGS.pack(0) + opt(Opt.STARTTLS) + GO_OPEN, False)
    assert kinds(rs) == [Rep.ERR_POLICY, Rep.ERR_POLICY]
    assert neg.phase is Phase.OPTION_HEADER


# --- allow-lists ------------------------------------------------------------------------
@BYTEWISE
def test_allow_list_refuses_go_info_and_meta(bytewise: bool) -> None:
    neg = Negotiation(EXPORTS, peer=OTHER)
    data = (
        HELLO
        + opt(Opt.INFO, pack_info_go(b"guarded", []))
        + opt(Opt.STRUCTURED_REPLY)
        + opt(Opt.LIST_META_CONTEXT, pack_meta_context(b"guarded", []))
        + opt(Opt.GO, pack_info_go(b"guarded", []))
    )
    events, rs = run(neg, data, bytewise)
    assert kinds(rs) == [Rep.ERR_POLICY, Rep.ACK, Rep.ERR_POLICY, Rep.ERR_POLICY]
    assert isinstance(rs, list) and b"127.0.0.2" in rs[-1].data
    refused = [e for e in events if isinstance(e, Refused)]
    assert len(refused) == 3 and "'guarded'" in refused[0].reason
    assert neg.phase is Phase.OPTION_HEADER


def test_allow_list_hides_the_export_from_list() -> None:
    def listed(peer: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> list[bytes]:
        neg = Negotiation(EXPORTS, peer=peer)
        _, rs = run(neg, HELLO + opt(Opt.LIST), False)
        assert isinstance(rs, list)
        return [r.data[4:] for r in rs if r.reply == Rep.SERVER]

    assert listed(LOCAL) == [b"open", b"guarded"]
    assert listed(OTHER) == [b"open"]
    assert listed(None) == [b"open"]


def test_allow_list_export_name_ends_the_session() -> None:
    neg = Negotiation(EXPORTS, peer=OTHER)
    events, rs = run(neg, HELLO + opt(Opt.EXPORT_NAME, b"guarded"), False)
    assert rs == [] and neg.phase is Phase.CLOSED
    assert isinstance(events[0], Refused) and isinstance(events[-1], Closed)


@pytest.mark.parametrize("peer", ["127.0.0.1", "10.200.3.4", "::ffff:127.0.0.1"])
def test_allow_list_admits_listed_addresses(peer: str) -> None:
    neg = Negotiation(EXPORTS, peer=ipaddress.ip_address(peer))
    events, rs = run(neg, HELLO + opt(Opt.GO, pack_info_go(b"guarded", [])), False)
    assert kinds(rs)[-1] == Rep.ACK
    assert isinstance(events[-1], Ready) and events[-1].export.name == "guarded"


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [("127.0.0.2", False), ("11.0.0.1", False), ("::1", False), (None, False), ("10.0.0.0", True)],
)
def test_address_allowed(peer: str | None, allowed: bool) -> None:
    address = None if peer is None else ipaddress.ip_address(peer)
    assert address_allowed(ONLY_LOCAL, address) is allowed
    assert address_allowed(None, address) is True


def test_refusal_events_are_logged_only_for_policy() -> None:
    neg = Negotiation(EXPORTS, peer=LOCAL)
    events, _ = run(neg, HELLO + opt(Opt.GO, pack_info_go(b"nope", [])), False)
    assert not any(isinstance(e, Refused) for e in events)
    assert isinstance(events[-1], OptionHandled) and events[-1].reply is Rep.ERR_UNKNOWN
