"""The connection's lifetime, without a socket: the handoff, the routes, flow and drain.

:class:`~nbdserver.connection.NBDConnection` owns every decision the asyncio adapter acts
on, so each is checked here from bytes and numbers alone.
"""

from __future__ import annotations

import pytest

from nbdserver.connection import LARGE_READ, NBDConnection, Route
from nbdserver.negotiation import Closed, ExportInfo, Ready
from nbdserver.protocol import (
    CLIENT_FLAGS,
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_DISC,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    FLAG_FUA,
    ClientFlag,
    Opt,
    OptionRequest,
    Request,
    TransmissionFlag,
    pack_info_go,
)
from nbdserver.stats import ExportStats
from nbdserver.transmission import Command, Phase

FLAGS = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
EXPORTS = {
    "disk": ExportInfo("disk", "", 1 << 30, FLAGS),
    "ram": ExportInfo("ram", "", 1 << 30, FLAGS, never_blocks=True),
}
HELLO = CLIENT_FLAGS.pack(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)


def connected(name: str, after: bytes = b"") -> NBDConnection:
    """A connection whose client chose ``name`` with NBD_OPT_GO and sent ``after`` with it."""
    conn = NBDConnection(EXPORTS, max_requests=4, max_bytes=1 << 20)
    assert conn.greet(peer=None)
    assert conn.handshaking and conn.tx is None
    go = OptionRequest(Opt.GO, pack_info_go(name.encode(), [])).pack()
    out, events = conn.receive_handshake(HELLO + go + after)
    assert out, "NBD_OPT_GO is answered"
    assert [type(e) for e in events][-1] is Ready, events
    return conn


def command(type_: int, length: int = 4096, flags: int = 0) -> Command:
    return Command(type=type_, flags=flags, cookie=1, offset=0, length=length)


def test_the_handoff_keeps_the_first_requests_and_ends_the_handshake() -> None:
    first = Request(0, CMD_READ, 7, 0, 512).pack()
    conn = connected("disk", after=first)
    assert not conn.handshaking and conn.negotiation is None
    assert conn.ready is not None and conn.ready.export.name == "disk"
    assert conn.tx is not None and conn.tx.phase is Phase.OPEN
    assert conn.trailing == first
    assert conn.reading


def test_a_closed_handshake_ends_without_a_transmission() -> None:
    conn = NBDConnection(EXPORTS, max_requests=4, max_bytes=1 << 20)
    conn.greet(peer=None)
    _, events = conn.receive_handshake(HELLO + OptionRequest(Opt.ABORT, b"").pack())
    assert any(isinstance(e, Closed) for e in events)
    assert not conn.handshaking and conn.tx is None and not conn.reading


@pytest.mark.parametrize(
    ("cmd", "flags", "length", "disk", "ram"),
    [
        (CMD_READ, 0, 4096, Route.INLINE, Route.INLINE),
        (CMD_READ, 0, LARGE_READ - 1, Route.INLINE, Route.INLINE),
        (CMD_READ, 0, LARGE_READ, Route.SENDFILE, Route.SENDFILE),
        (CMD_WRITE, 0, 4096, Route.INLINE, Route.INLINE),
        (CMD_WRITE, FLAG_FUA, 4096, Route.POOL, Route.INLINE),
        (CMD_FLUSH, 0, 0, Route.POOL, Route.INLINE),
        (CMD_TRIM, 0, 4096, Route.POOL, Route.INLINE),
        (CMD_WRITE_ZEROES, 0, 4096, Route.POOL, Route.INLINE),
        (CMD_CACHE, 0, 4096, Route.POOL, Route.INLINE),
        (CMD_BLOCK_STATUS, 0, 4096, Route.INLINE, Route.INLINE),
        (CMD_DISC, 0, 0, Route.NONE, Route.NONE),
    ],
)
def test_routes(cmd: int, flags: int, length: int, disk: Route, ram: Route) -> None:
    """What may block goes to the pool, unless the export's backend never blocks."""
    c = command(cmd, length, flags)
    assert connected("disk").route(c) is disk
    assert connected("ram").route(c) is ram


def test_flow_pauses_past_the_bound_and_while_draining() -> None:
    conn = connected("disk")
    assert not conn.should_pause(queued=1 << 20)
    assert conn.should_pause(queued=(1 << 20) + 1)
    conn.flow.hold(4096)
    assert conn.may_poll() is False, "a pool job is out"
    assert conn.drain_done() is False
    conn.shutdown()  # STOPPING still reads: new requests get ESHUTDOWN
    assert conn.reading and not conn.should_pause(queued=0)
    conn.deadline()  # DRAINING: no more decoding, close once the pool job is back
    assert not conn.reading and conn.should_pause(queued=0)
    assert conn.drain_done() is False
    conn.flow.release(4096)
    assert conn.drain_done() is True
    assert conn.tx is not None and conn.tx.phase is Phase.CLOSED
    assert conn.drain_done() is False, "once"


def test_polling_needs_an_open_idle_transmission() -> None:
    conn = NBDConnection(EXPORTS, max_requests=4, max_bytes=1 << 20)
    assert conn.may_poll() is False, "no transmission yet"
    conn = connected("ram")
    assert conn.may_poll() is True
    conn.flow.read_paused = True
    assert conn.may_poll() is False


def test_only_reads_and_writes_count_as_data_moved() -> None:
    """The stats' one rule: a TRIM's or a BLOCK_STATUS's length is what it affects, not
    bytes moved; a failed request moves nothing."""
    stats = ExportStats()
    stats.record(CMD_READ, 512, 1000, False)
    stats.record(CMD_WRITE, 4096, 1000, False)
    stats.record(CMD_WRITE, 4096, 1000, True)
    for cmd in (CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE, CMD_BLOCK_STATUS, CMD_FLUSH):
        stats.record(cmd, 1 << 20, 1000, False)
    assert stats.bytes == {"read": 512, "write": 4096}
    assert stats.requests["trim"] == 1 and stats.requests["write"] == 2
