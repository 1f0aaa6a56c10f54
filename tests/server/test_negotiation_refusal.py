"""The handshake of a refused connection (``--max-connections``): bytes in, bytes out.

The spec's rule for a server that does not want a client: "it MUST (save where set out
above) simply error inbound options until the client gets the hint that it is unwelcome"
(doc/proto.md "Termination of the session during option haggling"). So every option
but NBD_OPT_ABORT gets NBD_REP_ERR_POLICY with the reason, and NBD_OPT_EXPORT_NAME,
which cannot carry an error, ends the session.
"""

from __future__ import annotations

import pytest

from nbdserver.negotiation import Closed, Negotiation, OptionHandled, Phase, Ready
from nbdserver.protocol import CLIENT_FLAGS, ClientFlag, Opt, OptionReply, OptionRequest, Rep
from nbdserver.protocol import pack_info_go as go_data

from .test_negotiation import EXPORTS, parse_replies

HELLO = CLIENT_FLAGS.pack(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
REASON = "server is at its connection limit (--max-connections 2); try again later"


def refused() -> Negotiation:
    neg = Negotiation(EXPORTS, refusal=REASON)
    neg.data_to_send()  # the greeting is the same as for anyone
    return neg


@pytest.mark.parametrize(
    "option", [Opt.GO, Opt.INFO, Opt.LIST, Opt.STRUCTURED_REPLY, Opt.SET_META_CONTEXT, 99]
)
def test_every_option_is_refused_with_the_reason(option: int) -> None:
    neg = refused()
    data = go_data(b"", []) if option in (Opt.GO, Opt.INFO) else b""
    events = neg.receive_data(HELLO + OptionRequest(option, data).pack())
    (reply,) = parse_replies(neg.data_to_send())
    assert reply == OptionReply(option, Rep.ERR_POLICY, REASON.encode())
    assert events == [OptionHandled(option, Rep.ERR_POLICY, REASON)]
    assert neg.phase is Phase.OPTION_HEADER  # the client may still abort politely
    assert not any(isinstance(e, Ready) for e in events)


def test_abort_is_still_acknowledged() -> None:
    neg = refused()
    events = neg.receive_data(HELLO + OptionRequest(Opt.ABORT, b"").pack())
    assert parse_replies(neg.data_to_send())[0].reply == Rep.ACK
    assert isinstance(events[-1], Closed) and not events[-1].violation


def test_export_name_closes_without_a_reply() -> None:
    neg = refused()
    events = neg.receive_data(HELLO + OptionRequest(Opt.EXPORT_NAME, b"").pack())
    assert neg.data_to_send() == b""
    assert events == [Closed(f"NBD_OPT_EXPORT_NAME refused: {REASON}", False)]
    assert neg.phase is Phase.CLOSED


def test_unrefused_negotiation_is_unchanged() -> None:
    neg = Negotiation(EXPORTS)
    neg.data_to_send()
    events = neg.receive_data(HELLO + OptionRequest(Opt.GO, go_data(b"", [])).pack())
    assert isinstance(events[-1], Ready)
