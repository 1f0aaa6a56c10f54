"""One client connection's whole lifetime, sans-IO: the part of the core that decides.

Theory of operation
-------------------
:class:`NBDConnection` plays the part of h11's ``Connection`` or aioquic's
``QuicConnection``. It owns everything about a client that is a decision rather than
I/O:

- the handshake (:class:`~nbdserver.negotiation.Negotiation`) and the handoff to
  transmission once it says :class:`~nbdserver.negotiation.Ready`, with the bytes that
  came after the handshake;
- the phase, from greeting through transmission to drained (:attr:`handshaking`,
  :attr:`reading`, :meth:`drain_done`);
- flow accounting (:class:`~nbdserver.policy.FlowControl`): how many request bytes the
  next batch may decode, and when reading pauses;
- where each command runs (:meth:`route`): on the event loop, in the thread pool, or by
  sendfile.

The asyncio adapter (:class:`nbdserver.server.Connection`) moves bytes and acts on these
answers; no other module writes this object's state. Like the rest of the core it never
touches a socket, a transport, a clock or a backend (tests/server/test_layering.py).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

from nbdserver.extended import open_transmission
from nbdserver.negotiation import (
    Closed,
    ExportInfo,
    IPAddress,
    Negotiation,
    Ready,
    TlsMode,
)
from nbdserver.negotiation import Event as NegotiationEvent
from nbdserver.policy import FlowControl
from nbdserver.protocol import CMD_BLOCK_STATUS, CMD_DISC, CMD_READ, CMD_WRITE, FLAG_FUA
from nbdserver.transmission import Command, Phase, Session, Transmission

__all__ = ["LARGE_READ", "READING", "NBDConnection", "Route"]

#: Transmission phases that still decode requests (STOPPING answers them with ESHUTDOWN).
READING: Final = frozenset({Phase.OPEN, Phase.STOPPING})

#: Reads at least this long leave by sendfile or run in the pool, and simple-reply ones
#: skip the zero-filled combined buffer (docs/performance.md, "Large reads").
LARGE_READ: Final = 256 * 1024


class Route(enum.IntEnum):
    """Where a validated command runs (docs/performance.md, "Inline or pool")."""

    #: On the event loop: it cannot block for long.
    INLINE = 0
    #: In the thread pool: it may wait on the disk (fdatasync, fallocate, a FUA write).
    POOL = 1
    #: A large read: sendfile straight from the backend when it can, else the pool.
    SENDFILE = 2
    #: Nothing to run: NBD_CMD_DISC, which the transmission has already acted on.
    NONE = 3


# Module constants: an Enum member looked up on its class costs 0.2 µs on Python 3.11,
# too much for a rule that runs for every request.
_INLINE: Final = Route.INLINE
_POOL: Final = Route.POOL
_SENDFILE: Final = Route.SENDFILE
_NONE: Final = Route.NONE
_OPEN: Final = Phase.OPEN


class NBDConnection:
    """The decisions of one client connection, from greeting to drained.

    ``exports`` are the core's facts of every export, by name.
    """

    __slots__ = (
        "_exports",
        "_extended_headers",
        "_pool_write_flags",
        "_tls",
        "flow",
        "negotiation",
        "ready",
        "trailing",
        "tx",
    )

    def __init__(
        self,
        exports: Mapping[str, ExportInfo],
        *,
        tls: TlsMode = TlsMode.OFF,
        extended_headers: bool = True,
        max_requests: int,
        max_bytes: int,
    ) -> None:
        self._exports = exports
        self._tls = tls
        self._extended_headers = extended_headers
        #: The handshake, from :meth:`greet` until transmission starts or the session ends.
        self.negotiation: Negotiation | None = None
        #: The transmission phase, from the handoff on.
        self.tx: Transmission | None = None
        #: What the handshake agreed (None until the handoff).
        self.ready: Ready | None = None
        #: Bytes the client sent after the handshake: the first requests (set at the handoff).
        self.trailing = b""
        self.flow = FlowControl(max_requests, max_bytes)
        #: Flags that send a WRITE to the pool: FUA (a durable write may wait), unless the
        #: export's backend never blocks.
        self._pool_write_flags = FLAG_FUA

    # --- handshake ----------------------------------------------------------------
    @property
    def handshaking(self) -> bool:
        return self.negotiation is not None

    def greet(self, peer: IPAddress | None, refusal: str | None = None) -> bytes:
        """Start the handshake; the greeting to send. With ``refusal`` the handshake only
        tells the client why it is not served (``--max-connections``)."""
        self.negotiation = Negotiation(
            self._exports,
            refusal=refusal,
            tls=self._tls,
            peer=peer,
            extended_headers=self._extended_headers,
        )
        return self.negotiation.data_to_send()

    def receive_handshake(self, data: bytes) -> tuple[bytes, list[NegotiationEvent]]:
        """Feed handshake bytes; returns what to send and what the handshake decided.

        A :class:`~nbdserver.negotiation.Ready` event is the handoff: :attr:`tx`,
        :attr:`ready` and :attr:`trailing` are set and the handshake is over. After a
        :class:`~nbdserver.negotiation.Closed` it is over too.
        """
        neg = self.negotiation
        assert neg is not None, "the handshake is over"
        events = neg.receive_data(data)
        out = neg.data_to_send()
        for event in events:
            if isinstance(event, Ready):
                self.ready = event
                self.tx = open_transmission(Session.from_ready(event))
                self.trailing = neg.trailing_data
                if event.export.never_blocks:
                    self._pool_write_flags = 0
                self.negotiation = None
            elif isinstance(event, Closed):
                self.negotiation = None
        return out, events

    def tls_established(self) -> None:
        """The TLS handshake that StartTLS asked for succeeded: haggling starts afresh."""
        assert self.negotiation is not None
        self.negotiation.tls_established()

    # --- transmission -------------------------------------------------------------
    @property
    def reading(self) -> bool:
        """Requests are still decoded (open, or stopping with ESHUTDOWN answers)."""
        tx = self.tx
        return tx is not None and tx.phase in READING

    def route(self, c: Command) -> Route:
        """Where ``c`` runs. The one rule for it (docs/performance.md, "Inline or pool")."""
        t = c.type
        if t == CMD_READ:
            return _SENDFILE if c.length >= LARGE_READ else _INLINE
        if t == CMD_WRITE:
            return _POOL if c.flags & self._pool_write_flags else _INLINE
        if t == CMD_DISC:
            return _NONE
        if not self._pool_write_flags or t == CMD_BLOCK_STATUS:
            return _INLINE  # a backend that never blocks, or an extents lookup
        return _POOL

    def may_poll(self) -> bool:
        """The transmission is open and nothing is paused or in the pool: a busy-poll
        may wait for the client's next request (docs/performance.md, "Busy-poll")."""
        tx, flow = self.tx, self.flow
        return (
            tx is not None and tx.phase is Phase.OPEN and not flow.read_paused and not flow.requests
        )

    def should_pause(self, queued: int) -> bool:
        """Whether reading should pause now, with ``queued`` reply bytes in the transport."""
        tx = self.tx
        draining = tx is not None and tx.phase not in READING
        return self.flow.should_pause(queued, draining)

    def drain_done(self) -> bool:
        """True once, when a draining transmission has answered its last request: the
        adapter then closes the transport."""
        tx = self.tx
        if tx is not None and tx.phase is Phase.DRAINING and self.flow.requests == 0:
            tx.drained()
            return True
        return False

    def shutdown(self) -> None:
        """Server shutdown: new requests get ESHUTDOWN, those in flight finish."""
        if self.tx is not None:
            self.tx.shutdown()

    def deadline(self) -> None:
        """The shutdown grace is over: stop decoding, close once drained."""
        if self.tx is not None:
            self.tx.deadline()

    def lost(self) -> None:
        """The transport is gone."""
        self.negotiation = None
        if self.tx is not None:
            self.tx.lost()
