"""The asyncio adapter: sockets in, sans-IO core, backends, sockets out.

Theory of operation
-------------------
One :class:`Connection` (an ``asyncio.BufferedProtocol``) per client, glue in the manner
of aioquic's ``asyncio/protocol.py``. Every decision about the client belongs to its
sans-IO :class:`~nbdserver.connection.NBDConnection`: the handshake and the handoff to
transmission, the phase, flow accounting and where each command runs. The adapter moves
bytes: the event loop reads straight into a :class:`~nbdserver.fastpath.ReceiveBuffer`,
:meth:`Connection.buffer_updated` hands the new bytes to the core, and the adapter acts
on its answers. The core frames every reply.

The pieces, each small and named: :class:`~nbdserver.dispatch.Dispatcher` runs commands
against the backend, inline, in the thread pool or by sendfile, as the route says;
:class:`~nbdserver.policy.FlowControl` bounds in-flight bytes and requests
(``--max-inflight``) and the adapter pauses reads to match; :class:`~nbdserver.policy.PollWindow`
sizes the busy-poll after a lone request (``--poll-us``); :mod:`nbdserver.fastpath` holds
the receive buffer, the :class:`~nbdserver.fastpath.WakeMark` that lets a TCP socket wake
the loop only once a partly received request is complete, the busy-poll read and
sendfile. Replies of one decoded batch leave in one vectored write; pool replies go out
whenever they complete, matched to the request by its cookie: the "completion order" of
doc/proto.md, "Replies need not be sent in the same order as requests". The measured
reasons behind each fast path are in docs/performance.md.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import ssl
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, cast

from nbdserver.backends.base import Backend
from nbdserver.config import DEFAULT_MAX_INFLIGHT_BYTES, DEFAULT_POLL_US, DEFAULT_SHUTDOWN_GRACE
from nbdserver.connection import READING, NBDConnection, Route
from nbdserver.dispatch import Dispatcher, Reply
from nbdserver.fastpath import WAKE_MARK_MIN, ReceiveBuffer, WakeMark, busy_poll, tune_allocator
from nbdserver.negotiation import (
    Closed,
    ExportInfo,
    IPNetwork,
    OptionHandled,
    Ready,
    Refused,
    StartTLS,
    TlsMode,
    transmission_flags,
)
from nbdserver.negotiation import Event as NegotiationEvent
from nbdserver.policy import FlowControl, PollWindow
from nbdserver.protocol import Opt, Rep, TransmissionFlag
from nbdserver.stats import ExportStats
from nbdserver.tls import peer_address, upgrade
from nbdserver.transmission import Command, Phase, Rejected

__all__ = ["Connection", "Export", "NBDServer", "make_export", "tune_allocator"]

logger = logging.getLogger(__name__)

#: Initial receive buffer (two QD32 batches of 4 KiB writes); it grows (once) to fit
#: the largest WRITE actually received.
INITIAL_BUFFER: Final = 256 * 1024

_OPEN: Final = Phase.OPEN
_now: Final = time.perf_counter_ns


def _not_ready(*_args: object) -> Any:
    """The per-request callables before the handoff to transmission: never called,
    since no command is decoded before it."""
    raise AssertionError("a command before the transmission phase")


_INLINE: Final = Route.INLINE
_POOL: Final = Route.POOL
_SENDFILE: Final = Route.SENDFILE

_next_id = itertools.count(1)


@dataclass(slots=True)
class Export:
    """One served export: its negotiation facts, its storage and its counters."""

    info: ExportInfo
    backend: Backend
    stats: ExportStats


def make_export(
    name: str,
    description: str,
    backend: Backend,
    read_only: bool = False,
    allow: tuple[IPNetwork, ...] | None = None,
) -> Export:
    caps = backend.capabilities
    info = ExportInfo(
        name=name,
        description=description,
        size=backend.size,
        flags=transmission_flags(caps, read_only),
        min_block=caps.min_block,
        preferred_block=caps.preferred_block,
        max_block=caps.max_block,
        allow=allow,
        never_blocks=caps.never_blocks,
    )
    return Export(info, backend, ExportStats())


class NBDServer:
    """Listeners plus the set of live connections over a fixed list of exports."""

    def __init__(
        self,
        exports: Sequence[Export],
        *,
        workers: int = 16,
        max_inflight_requests: int = 256,
        max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
        poll_us: int = DEFAULT_POLL_US,
        shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
        max_connections: int | None = None,
        tls: TlsMode = TlsMode.OFF,
        ssl_context: ssl.SSLContext | None = None,
        wake_mark: bool = True,
        extended_headers: bool = True,
    ) -> None:
        if not exports:
            raise ValueError("an NBD server needs at least one export")
        if tls is not TlsMode.OFF and ssl_context is None:
            raise ValueError(f"TLS mode {tls.value} needs an ssl_context")
        self.tls = tls
        self.ssl_context = ssl_context
        #: SO_RCVLOWAT on TCP while a request streams in (fastpath.WakeMark).
        self.wake_mark = wake_mark
        #: Offer NBD_OPT_EXTENDED_HEADERS in the handshake.
        self.extended_headers = extended_headers
        self.exports = {e.info.name: e for e in exports}
        self.export_infos = {name: e.info for name, e in self.exports.items()}
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nbd-io")
        self.max_inflight_requests = max_inflight_requests
        self.max_inflight_bytes = max_inflight_bytes
        self.poll_ns = poll_us * 1000
        self.shutdown_grace = shutdown_grace
        self.connections: set[Connection] = set()
        #: --max-connections: past it a new connection is refused (see _refusal).
        self.max_connections = max_connections
        self.total_connections = 0
        self._servers: list[asyncio.Server] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self.closing = False
        #: Called after each connection closes (the worker pool counts its load).
        self.on_connection_closed: Callable[[], None] | None = None
        #: TLS handshakes under way (held so that they are not garbage-collected).
        self.handshakes: set[asyncio.Task[None]] = set()

    def handshake(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a connection's TLS handshake, holding its task until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self.handshakes.add(task)
        task.add_done_callback(self._handshake_done)

    def _handshake_done(self, task: asyncio.Task[None]) -> None:
        self.handshakes.discard(task)
        if not task.cancelled() and task.exception() is not None:  # a bug: say so now
            logger.error("TLS upgrade crashed", exc_info=task.exception())

    def _factory(self) -> Connection:
        return Connection(self)

    async def listen_tcp(self, host: str, port: int) -> list[tuple[str, int]]:
        """Listen on ``host:port`` (port 0 = ephemeral); return the bound addresses."""
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(self._factory, host, port, reuse_address=True)
        self._servers.append(srv)
        return [sock.getsockname()[:2] for sock in srv.sockets]

    async def adopt(self, sock: socket.socket, *, refuse: bool = False) -> None:
        """Serve a connection accepted elsewhere (handed over by the worker pool), or
        with ``refuse`` only tell it the server is full (the pool counts the limit)."""
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(lambda: Connection(self, refuse=refuse), sock)

    async def adopt_listener(self, sock: socket.socket) -> None:
        """Serve on a listening socket bound by someone else (socket activation)."""
        loop = asyncio.get_running_loop()
        if sock.family == socket.AF_UNIX:
            srv = await loop.create_unix_server(self._factory, sock=sock)
        else:
            srv = await loop.create_server(self._factory, sock=sock)
        self._servers.append(srv)

    async def listen_unix(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        srv = await loop.create_unix_server(self._factory, path)
        self._servers.append(srv)

    def _opened(self, conn: Connection) -> None:
        self.connections.add(conn)
        self.total_connections += 1
        self._idle.clear()

    def receiving(self) -> dict[str, int]:
        """Requests partly received, for the stats line: how many connections hold part
        of one (``partial``) and the bytes their clients have still to send
        (``missing_bytes``). Such a connection waits, SO_RCVLOWAT set, for the rest: the
        bytes unread on its socket are not a server that stopped reading
        (vm.run.forensics.server_probe tells the two apart with this)."""
        partial = missing = 0
        for conn in self.connections:
            tx = conn.state.tx
            held = conn.rx.end - conn.rx.start
            if tx is not None and not conn.lost and 0 < held < tx.needed:
                partial += 1
                missing += tx.needed - held
        return {"partial": partial, "missing_bytes": missing}

    def _refusal(self, conn: Connection) -> str | None:
        """Why ``conn`` (just opened) is refused, or None when it is served."""
        limit = self.max_connections
        if not conn.refused and (
            limit is None or sum(not c.refused for c in self.connections) <= limit
        ):
            return None
        return f"server is at its connection limit (--max-connections {limit}); try again later"

    def _closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._idle.set()
        if self.on_connection_closed is not None and not conn.refused:
            self.on_connection_closed()

    async def shutdown(self) -> None:
        """Stop accepting; every connection finishes its in-flight requests and answers
        new ones with ESHUTDOWN until its client disconnects or the grace period ends."""
        self.closing = True
        for srv in self._servers:
            srv.close()
        for conn in list(self.connections):
            conn.shutdown()
        try:
            await asyncio.wait_for(self._idle.wait(), self.shutdown_grace)
        except TimeoutError:
            logger.info(
                "shutdown grace period (%.1f s) over: disconnecting %d client(s)",
                self.shutdown_grace,
                len(self.connections),
            )
            for conn in list(self.connections):
                conn.hang_up()
            await self._idle.wait()
        for srv in self._servers:
            await srv.wait_closed()
        self.executor.shutdown(wait=True)


class _ConnectionLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every message with the connection's peer and id."""

    def __init__(self, base: logging.Logger, conn: Connection) -> None:
        super().__init__(base, {})
        self.conn = conn

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.conn.peer} #{self.conn.id}] {msg}", kwargs

    def handshake(self, event: NegotiationEvent) -> None:
        """Log what the handshake decided."""
        if isinstance(event, OptionHandled):
            self.option(event)
        elif isinstance(event, Refused):
            self.warning("refused: %s", event.reason)
        elif isinstance(event, Closed):
            self.closed(event, "handshake", 0)
        elif isinstance(event, Ready):
            self.ready(event)

    def option(self, event: OptionHandled) -> None:
        try:
            name = f"NBD_OPT_{Opt(event.option).name}"
        except ValueError:
            name = f"option {event.option}"
        if event.reply is Rep.ACK:
            self.debug("%s: ok", name)
        else:
            self.debug("%s: %s %s", name, event.reply.name, event.detail)

    def closed(self, event: Closed, phase: str, inflight: int) -> None:
        if event.violation:
            self.warning("%s violation, closing: %s", phase, event.reason)
        else:
            self.debug("%s; %d requests in flight", event.reason, inflight)

    def ready(self, ready: Ready) -> None:
        flags = "|".join(f.name for f in TransmissionFlag if f in ready.flags and f.name)
        self.info(
            "export %r size=%d flags=%s structured=%s extended=%s meta=%s no_zeroes=%s",
            ready.export.name,
            ready.export.size,
            flags,
            "yes" if ready.structured else "no",
            "yes" if ready.extended else "no",
            "base:allocation" if ready.meta_context is not None else "none",
            "yes" if ready.no_zeroes else "no",
        )


def _socket_setup(
    transport: asyncio.Transport, wake_mark: bool
) -> tuple[str, int, WakeMark | None]:
    """TCP_NODELAY on TCP; returns the peer's name, the socket's descriptor (or -1) and,
    on TCP with ``wake_mark``, its :class:`~nbdserver.fastpath.WakeMark` (Unix sockets
    ignore SO_RCVLOWAT when polled)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return "?", -1, None
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        # "both the client and server SHOULD disable Nagle's algorithm" (doc/proto.md
        # "Protocol phases").
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        if peer is None:  # uvloop: the peer reset before the accept; the read will fail
            return "?", sock.fileno(), None
        return f"{peer[0]}:{peer[1]}", sock.fileno(), WakeMark(sock) if wake_mark else None
    return "unix", sock.fileno(), None


class _Outbox:
    """Replies on their way to the transport. Those of one decoded batch are collected
    and leave in one vectored write (docs/performance.md, "Batching"); the others (pool
    completions) leave at once."""

    __slots__ = ("batch", "flow", "transport")

    def __init__(self, flow: FlowControl) -> None:
        self.flow = flow
        #: The transport while connected (None before and after).
        self.transport: asyncio.Transport | None = None
        #: Replies collected during one decoded batch (None outside it).
        self.batch: list[bytes | bytearray | memoryview] | None = None

    def write(self, data: Reply) -> None:
        batch = self.batch
        if batch is not None:
            if isinstance(data, list):
                batch.extend(data)
            else:
                batch.append(data)
            return
        if self.transport is None:
            return
        if isinstance(data, (bytes, bytearray)):
            self.transport.write(data)
        else:
            self.transport.writelines(data)

    def flush(self) -> None:
        """Send the replies collected while dispatching one decoded batch."""
        batch = self.batch
        self.batch = None
        transport = self.transport
        if not batch or transport is None:
            return
        if len(batch) == 1:
            transport.write(batch[0])
        else:
            transport.writelines(batch)
        self.flow.queued(transport.get_write_buffer_size())

    def flush_batch(self) -> None:
        """Send what the batch holds so far and go on collecting (a sendfile reply must
        not overtake the replies decoded before it)."""
        if self.batch:
            self.flush()
            self.batch = []


class Connection(asyncio.BufferedProtocol):
    """One client's I/O: bytes between the transport and its ``NBDConnection`` (the core's
    decisions), commands to the ``Dispatcher``, replies back out."""

    def __init__(self, server: NBDServer, *, refuse: bool = False) -> None:
        self.server = server
        #: Past --max-connections: the handshake only says so (Negotiation refusal).
        self.refused = refuse
        self.id = next(_next_id)
        self.peer = "?"
        self.log = _ConnectionLog(logger, self)
        self.transport: asyncio.Transport | None = None
        self.rx = ReceiveBuffer(INITIAL_BUFFER)
        #: Every decision about this client: handshake, phase, flow, routes.
        self.state = NBDConnection(
            server.export_infos,
            tls=server.tls,
            extended_headers=server.extended_headers,
            max_requests=server.max_inflight_requests,
            max_bytes=server.max_inflight_bytes,
        )
        self.flow = self.state.flow
        #: NBDConnection.route, bound once: it runs for every request.
        self._route = self.state.route
        self.export: Export | None = None
        self.dispatcher: Dispatcher | None = None
        #: Dispatcher.execute and ExportStats.record for the inline path, bound at Ready.
        self._execute: Callable[[Command, bytes | memoryview | None], Reply] = _not_ready
        self._record: Callable[[int, int, int, bool], None] = _not_ready
        self.poll_window = PollWindow(server.poll_ns)
        self.lost = False  # connection_lost was called
        self._processing = False
        self.out = _Outbox(self.flow)
        #: The socket, for the poll loop and sendfile (-1: no socket, no fast paths).
        self.fd = -1
        #: Events in the last decoded batch (polling follows lone requests only).
        self.batch_size = 0
        #: SO_RCVLOWAT while a request streams in (TCP only; None under TLS).
        self.wake_mark: WakeMark | None = None

    # --- asyncio callbacks -------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = self.out.transport = transport
        self.peer, self.fd, self.wake_mark = _socket_setup(transport, self.server.wake_mark)
        # pause_writing fires exactly when queued replies pass the in-flight bound, so
        # a connection that stopped decoding at the bound is always resumed.
        limit = self.server.max_inflight_bytes
        transport.set_write_buffer_limits(high=limit, low=limit // 2)
        self.server._opened(self)
        if self.server.closing:
            transport.close()
            return
        refusal = self.server._refusal(self)
        if refusal is not None:
            self.refused = True
            self.log.warning("refusing the connection: %s", refusal)
        transport.write(self.state.greet(peer_address(transport), refusal))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.out.transport = None
        self.state.lost()
        # The connection and its log adapter form a reference cycle, which only a full
        # collection frees: drop the receive buffer now (bench/ saw RSS grow run by run).
        self.rx.release()
        if exc is not None:
            self.log.debug("connection lost: %s", exc)
        self.server._closed(self)

    def eof_received(self) -> bool:
        self.log.debug("client closed its side")
        return False

    def pause_writing(self) -> None:
        self.flow.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.flow.write_paused = False
        self._process()
        self._update_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        tx = self.state.tx
        return self.rx.space(tx.needed if tx is not None else 0)

    def buffer_updated(self, nbytes: int) -> None:
        self.rx.end += nbytes
        state = self.state
        if state.negotiation is not None:
            self._negotiate()
        tx = state.tx
        if tx is not None and not self.lost:
            if self.poll_window.waiting_since:
                self.poll_window.arrived(time.perf_counter_ns())
            self._process()
            while self._poll():
                self._process()
            mark = self.wake_mark
            if mark is not None:
                rx = self.rx
                missing = tx.needed - (rx.end - rx.start)
                if missing >= WAKE_MARK_MIN or mark.mark != 1:
                    mark.update(missing)

    def _negotiate(self) -> None:
        """Feed the received bytes to the handshake and act on what it decided."""
        transport = self.transport
        assert transport is not None
        out, events = self.state.receive_handshake(self.rx.take())
        if out:
            transport.write(out)
        for event in events:
            self.log.handshake(event)
            if isinstance(event, StartTLS):
                # The ClientHello is for the TLS layer: nothing may reach us until then.
                transport.pause_reading()
                self.server.handshake(self._start_tls())
                return
            if isinstance(event, Closed):
                transport.close()
                return
            if isinstance(event, Ready):
                tx = self.state.tx
                assert tx is not None
                self.export = export = self.server.exports[event.export.name]
                self.dispatcher = Dispatcher(export.backend, tx, self.log, export.stats)
                self._execute = self.dispatcher.execute
                self._record = export.stats.record
                self.rx.put(self.state.trailing)
                return

    async def _start_tls(self) -> None:
        """Option haggling goes on over TLS once the handshake succeeds (tls.upgrade)."""
        raw, ctx = self.transport, self.server.ssl_context
        assert raw is not None and ctx is not None
        tls = await upgrade(raw, self, ctx, self.server.max_inflight_bytes, self.log)
        if tls is not None and not self.lost:
            self.transport = self.out.transport = tls
            self.fd = -1  # sendfile and the busy-poll use the socket itself: never under TLS
            self.wake_mark = None  # the mark would count encrypted bytes
            self.state.tls_established()

    # --- transmission ------------------------------------------------------------
    def _process(self) -> None:
        """Answer the complete requests in the buffer while the in-flight budget lasts.

        Past the bound the rest stays undecoded and reading pauses; resume_writing and
        pool completions call this again (see :class:`~nbdserver.policy.FlowControl`).
        """
        tx = self.state.tx
        transport = self.transport
        if tx is None or transport is None or self._processing:
            return
        self._processing = True
        flow, rx, out = self.flow, self.rx, self.out
        try:
            while rx.start < rx.end and not self.lost:
                budget = flow.budget(transport.get_write_buffer_size())
                if budget < 0:  # past a bound: resume_writing or a completion resumes
                    break
                events, used = tx.receive(rx.view[rx.start : rx.end], budget)
                self.batch_size = len(events)
                batch: list[bytes | bytearray | memoryview] = []
                out.batch = batch
                try:
                    for event in events:
                        self._dispatch(event, batch)
                    out.flush()
                finally:
                    out.batch = None
                    rx.consume(used)  # payload views are all consumed (or copied) by now
                if not events or tx.phase not in READING:
                    break
        finally:
            self._processing = False
        if tx.phase is not _OPEN:
            self._finish_if_drained()
        self._update_reading()

    def _update_reading(self) -> None:
        """Pause or resume reading as the flow rule says now."""
        transport = self.transport
        if transport is None or self.lost:
            return
        pause = self.state.should_pause(transport.get_write_buffer_size())
        if pause != self.flow.read_paused:
            self.flow.read_paused = pause
            (transport.pause_reading if pause else transport.resume_reading)()

    def _dispatch(
        self, c: Command | Rejected | Closed, batch: list[bytes | bytearray | memoryview]
    ) -> None:
        """Answer one decoded event; inline replies join ``batch`` (sent by _process)."""
        t0 = _now()
        if c.__class__ is not Command:
            self._answer_event(c, t0)
            return
        route = self._route(c)
        if route is _INLINE:  # the hottest path: run it here, count it, batch its reply
            try:
                reply = self._execute(c, c.payload)
                error = False
            except Exception as exc:
                assert self.dispatcher is not None
                reply = self.dispatcher.failure(c, exc)
                error = True
            self._record(c.type, c.length, _now() - t0, error)
            if isinstance(reply, list):
                batch.extend(reply)
            else:
                batch.append(reply)
        elif route is _SENDFILE:
            if self.fd < 0 or not self._sendfile_read(c, t0):
                self._submit(c, t0)
        elif route is _POOL:
            self._submit(c, t0)
        else:  # NBD_CMD_DISC: the transmission has closed
            self._record(c.type, 0, 0, False)

    def _answer_event(self, event: Command | Rejected | Closed, t0: int) -> None:
        """A request that failed validation gets its error; the end of the session is logged."""
        if isinstance(event, Rejected):
            assert self.dispatcher is not None
            self.out.write(self.dispatcher.rejected(event, t0))
        elif isinstance(event, Closed):
            self.log.closed(event, "transmission", self.flow.requests)

    def _sendfile_read(self, c: Command, t0: int) -> bool:
        """A large read by sendfile on socket fd; False: it takes the pool. The bytes bypass
        the transport, so it must be idle and the replies decoded before this one go first."""
        transport, dispatcher = self.transport, self.dispatcher
        assert transport is not None and dispatcher is not None
        self.out.flush_batch()
        if transport.get_write_buffer_size():
            return False
        return dispatcher.sendfile_read(c, self.fd, transport.write, transport.abort, t0)

    def _poll(self) -> bool:
        """Busy-poll after a lone request (:func:`~nbdserver.fastpath.busy_poll`) when this
        process serves one connection and nothing is queued, paused or in the pool."""
        window, transport = self.poll_window, self.transport
        if (
            window.max_ns <= 0
            or self.batch_size != 1
            or self.fd < 0
            or self.lost
            or not self.state.may_poll()
            or transport is None
            or transport.get_write_buffer_size()
            or len(self.server.connections) != 1
        ):
            window.forget()
            return False
        assert self.export is not None
        try:
            return busy_poll(window, self.fd, self.rx, self.export.stats)
        except OSError as exc:  # the loop would have seen it too: the socket is done
            self.log.debug("connection lost while polling: %s", exc)
            transport.abort()
            return False

    def _submit(self, c: Command, t0: int) -> None:
        assert self.dispatcher is not None
        self.flow.hold(self.dispatcher.submit(c, t0, self.server.executor, self._completed))
        self._update_reading()

    def _completed(self, c: Command, future: Future[Reply], t0: int, held: int) -> None:
        assert self.dispatcher is not None
        self.flow.release(held)
        self.out.write(self.dispatcher.completed(c, future, t0))
        self._process()
        self._update_reading()
        self._finish_if_drained()

    def _finish_if_drained(self) -> None:
        if self.state.drain_done() and self.transport is not None:
            self.transport.close()

    def shutdown(self) -> None:
        """Server shutdown: new requests get ESHUTDOWN, those in flight finish; the
        client's NBD_CMD_DISC (or :meth:`hang_up`) ends the connection."""
        if self.transport is None:
            return
        if self.state.tx is None:
            self.transport.close()
            return
        self.state.shutdown()
        self._process()  # requests already received are answered with ESHUTDOWN
        self._update_reading()

    def hang_up(self) -> None:
        """The shutdown grace is over: close once the requests in flight are answered."""
        if self.state.tx is None or self.transport is None:
            return
        self.state.deadline()
        self._update_reading()
        self._finish_if_drained()
