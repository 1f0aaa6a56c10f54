"""Flow control's adapter half: one transport's reading follows the pure rule.

:class:`~nbdserver.policy.FlowControl` decides from numbers; :class:`TransportFlow` asks
it with the transport's queued bytes and the transmission phase, and pauses or resumes
reading to match (uvicorn's ``flow_control.py`` plays this part for HTTP).
"""

from __future__ import annotations

import asyncio
from typing import Final

from nbdserver.policy import FlowControl
from nbdserver.transmission import Phase, Transmission

_OPEN: Final = Phase.OPEN


class TransportFlow(FlowControl):
    """A connection's :class:`FlowControl`, bound to its transport and its phase."""

    __slots__ = ("transport", "tx")

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        super().__init__(max_requests, max_bytes)
        #: Set while connected (None before connection_made and after connection_lost).
        self.transport: asyncio.Transport | None = None
        #: Set once the handshake is over; past OPEN (draining) reading stays paused.
        self.tx: Transmission | None = None

    def update_reading(self) -> None:
        """Pause or resume reading as :meth:`FlowControl.should_pause` says now."""
        transport = self.transport
        if transport is None:
            return
        tx = self.tx
        draining = tx is not None and tx.phase is not _OPEN
        pause = self.should_pause(transport.get_write_buffer_size(), draining)
        if pause and not self.read_paused:
            transport.pause_reading()
            self.read_paused = True
        elif not pause and self.read_paused:
            self.read_paused = False
            transport.resume_reading()
