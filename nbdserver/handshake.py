"""The adapter's handshake step: a connection's bytes go to the sans-IO
:class:`~nbdserver.negotiation.Negotiation`, and its events become log lines, a TLS
upgrade, a close, or the start of transmission.

These are :class:`~nbdserver.server.Connection`'s own steps, kept here as plain functions
of the connection (as :mod:`nbdserver.fastpath` keeps its fast paths) so the connection
reads as its callbacks and its transmission loop. None of this runs per request.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from nbdserver.dispatch import Dispatcher
from nbdserver.negotiation import Closed, Negotiation, OptionHandled, Ready, Refused, StartTLS
from nbdserver.tls import peer_address, upgrade
from nbdserver.transmission import Session, Transmission

if TYPE_CHECKING:
    from nbdserver.server import Connection


def begin(conn: Connection, transport: asyncio.Transport) -> None:
    """Greet the client: past ``--max-connections`` the handshake only says why it is
    refused; otherwise the TLS mode and the client's address decide what it may do."""
    server = conn.server
    refusal = server._refusal(conn)
    if refusal is not None:
        conn.refused = True
        conn.log.warning("refusing the connection: %s", refusal)
    conn.negotiation = Negotiation(
        server.export_infos, refusal=refusal, tls=server.tls, peer=peer_address(transport)
    )
    transport.write(conn.negotiation.data_to_send())


def negotiate(conn: Connection) -> None:
    """Feed the received bytes to the handshake and act on what it decided."""
    neg, transport = conn.negotiation, conn.transport
    assert neg is not None and transport is not None
    events = neg.receive_data(conn.rx.take())
    out = neg.data_to_send()
    if out:
        transport.write(out)
    for event in events:
        if isinstance(event, OptionHandled):
            conn.log.option(event)
        elif isinstance(event, Refused):
            conn.log.warning("refused: %s", event.reason)
        elif isinstance(event, StartTLS):
            # The ClientHello is for the TLS layer: nothing may reach us until then.
            transport.pause_reading()
            conn.server.handshake(start_tls(conn))
            return
        elif isinstance(event, Closed):
            conn.log.closed(event, "handshake", 0)
            conn.negotiation = None
            transport.close()
            return
        elif isinstance(event, Ready):
            conn.log.ready(event)
            conn.export = export = conn.server.exports[event.export.name]
            conn.tx = conn.flow.tx = Transmission(Session.from_ready(event))
            conn.dispatcher = Dispatcher(export.backend, conn.tx, conn.log)
            conn.rx.put(neg.trailing_data)
            conn.negotiation = None
            return


async def start_tls(conn: Connection) -> None:
    """Option haggling goes on over TLS once the handshake succeeds (tls.upgrade)."""
    neg, raw, ctx = conn.negotiation, conn.transport, conn.server.ssl_context
    assert neg is not None and raw is not None and ctx is not None
    tls = await upgrade(raw, conn, ctx, conn.server.max_inflight_bytes, conn.log)
    if tls is not None and not conn.lost:
        conn.transport = conn.flow.transport = tls
        conn.fd = -1  # sendfile and the busy-poll use the socket itself: never under TLS
        conn.wake_mark = None  # the mark would count encrypted bytes
        neg.tls_established()
