"""The asyncio adapter: sockets in, sans-IO core, backends, sockets out.

Theory of operation
-------------------
One :class:`Connection` (an ``asyncio.BufferedProtocol``) per client. The event loop
reads straight into a preallocated receive buffer (:meth:`Connection.get_buffer`);
:meth:`Connection.buffer_updated` hands the new bytes to the sans-IO
:class:`~nbdserver.negotiation.Negotiation` and then to the
:class:`~nbdserver.transmission.RequestDecoder`.

Backend calls that cannot block for long (every call of the memory backend; small reads,
plain writes and extent queries of the file backend, which hit the page cache) run
inline. Their replies are collected while one decoded batch is dispatched and leave in
one vectored write: one ``send`` per read event instead of one per request (the
per-reply ``send`` was 38% of the CPU of a QD32 4 KiB read load under py-spy). Calls that
may block (FLUSH = fdatasync, FUA writes, TRIM/WRITE_ZEROES = fallocate, CACHE) go to a
thread pool. Reads of at least :data:`LARGE_READ` bytes that start in data leave by
``sendfile`` straight from the page cache when the socket has nothing queued
(:meth:`Connection._sendfile_read`); the others go to the pool too, where ``os.pread``
releases the GIL while the loop sends the previous reply. Pool replies go out whenever
they complete, matched to the request by its cookie: the "completion order" of
doc/proto.md, "Replies need not be sent in the same order as requests".

Latency: after answering a lone request on the only connection of a process, the
connection reads its socket for a short, adaptive window before going back to the loop
(:meth:`Connection._poll`), which saves a sleep and a wake-up per request for clients
that keep one request in flight.

Flow control: a connection's in-flight bytes are the reply bytes queued in its transport
plus the bytes held by its pool jobs (WRITE payload copies, large reads being made).
Requests are decoded in batches whose READ/WRITE lengths fit what is left of
``max_inflight_bytes`` (``--max-inflight``); past the bound the rest of the received
bytes stay undecoded and reading pauses (``pause_reading``). The transport's high-water
mark is the same bound, so ``resume_writing`` (or a pool completion) always comes to
resume decoding. Reading also pauses while ``max_inflight_requests`` pool jobs are
outstanding or after NBD_CMD_DISC.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, cast

from nbdserver.backends.base import Backend
from nbdserver.backends.memory import MemoryBackend
from nbdserver.config import DEFAULT_MAX_INFLIGHT_BYTES, DEFAULT_POLL_US
from nbdserver.errors import errno_of
from nbdserver.negotiation import Closed, ExportInfo, Negotiation, OptionHandled, Ready
from nbdserver.protocol import (
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Opt,
    Rep,
    TransmissionFlag,
)
from nbdserver.stats import ExportStats
from nbdserver.transmission import (
    Command,
    RequestDecoder,
    Session,
    block_status_chunk,
    block_status_descriptors,
    done_chunk,
    error_reply,
    offset_data_header,
    offset_hole_chunk,
    plan_read,
    simple_reply,
    zero_extents,
)

logger = logging.getLogger(__name__)

#: Initial receive buffer (two QD32 batches of 4 KiB writes); it grows (once) to fit
#: the largest WRITE actually received.
INITIAL_BUFFER: Final = 256 * 1024
#: Below this much free tail space the buffer is compacted before the next read.
MIN_FREE: Final = 64 * 1024
#: Structured reads at least this long are scanned for zero blocks, which then travel
#: as NBD_REPLY_TYPE_OFFSET_HOLE chunks (see transmission.zero_extents).
HOLE_SCAN_MIN: Final = 64 * 1024
#: Reads at least this long leave by sendfile or run in the pool (see the module
#: docstring), and simple-reply ones skip the zero-filled combined buffer.
LARGE_READ: Final = 256 * 1024
#: The window grows from this when a request came soon after the previous reply.
POLL_GROW_START_NS: Final = 10_000

_FUA: Final = int(CmdFlag.FUA)
_NO_HOLE: Final = int(CmdFlag.NO_HOLE)
_FAST_ZERO: Final = int(CmdFlag.FAST_ZERO)
_REQ_ONE: Final = int(CmdFlag.REQ_ONE)
_DF: Final = int(CmdFlag.DF)
_READ: Final = int(Cmd.READ)
_WRITE: Final = int(Cmd.WRITE)
_DISC: Final = int(Cmd.DISC)
_BLOCK_STATUS: Final = int(Cmd.BLOCK_STATUS)

_SIMPLE_HEADER: Final = 16
_DATA_HEADER: Final = 28  # structured chunk header (20) + offset (8)

_pack_simple: Final = SIMPLE_REPLY.pack

_next_id = itertools.count(1)

#: What a command produces for the wire: one buffer, or several for a vectored write.
Reply = bytes | bytearray | list[bytes | bytearray | memoryview]


@dataclass(slots=True)
class Export:
    """One served export: its negotiation facts, its storage and its counters."""

    info: ExportInfo
    backend: Backend
    stats: ExportStats
    #: Run every backend call on the loop thread (the memory backend never blocks).
    inline: bool


def tune_allocator() -> bool:
    """Keep large reply buffers on the malloc heap (glibc only; False elsewhere).

    A 1 MiB read allocates a 1 MiB bytes object; by default glibc serves that with a
    fresh mmap and unmaps it on free, so every read pays 256 page faults (measured:
    1 ms per 1 MiB read, 2.4x slower sequential reads). Raising the mmap and trim
    thresholds lets freed buffers be reused; one malloc arena keeps that reuse from
    multiplying by the number of pool threads.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    ok = mallopt(m_mmap_threshold, 32 * 1024 * 1024) == 1
    ok = mallopt(m_trim_threshold, 256 * 1024 * 1024) == 1 and ok
    # One arena: the pool threads that make large reads would otherwise each get an
    # arena that keeps its freed megabytes (measured: 91 MiB RSS for a QD8 1 MiB
    # reader, 38 MiB with one arena). Python allocates under the GIL anyway, so a
    # single arena adds no lock contention.
    return bool(mallopt(m_arena_max, 1) == 1 and ok)


def transmission_flags(backend: Backend, read_only: bool) -> TransmissionFlag:
    """The flags an export advertises (SEND_DF is added by negotiation)."""
    caps = backend.capabilities
    flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_DF
    if read_only or caps.read_only:
        flags |= TransmissionFlag.READ_ONLY
    if caps.flush:
        flags |= TransmissionFlag.SEND_FLUSH
    if caps.fua:
        flags |= TransmissionFlag.SEND_FUA
    if caps.trim:
        flags |= TransmissionFlag.SEND_TRIM
    if caps.zero:
        flags |= TransmissionFlag.SEND_WRITE_ZEROES
        if caps.fast_zero:
            flags |= TransmissionFlag.SEND_FAST_ZERO
    if caps.cache:
        flags |= TransmissionFlag.SEND_CACHE
    # CAN_MULTI_CONN: "the effects of NBD_CMD_FLUSH and NBD_CMD_FLAG_FUA MUST be visible
    # across all connections" - only when the backend says its cache is shared.
    if caps.multi_conn:
        flags |= TransmissionFlag.CAN_MULTI_CONN
    return flags


def make_export(name: str, description: str, backend: Backend, read_only: bool = False) -> Export:
    caps = backend.capabilities
    info = ExportInfo(
        name=name,
        description=description,
        size=backend.size,
        flags=transmission_flags(backend, read_only),
        min_block=caps.min_block,
        preferred_block=caps.preferred_block,
        max_block=caps.max_block,
    )
    return Export(info, backend, ExportStats(), inline=isinstance(backend, MemoryBackend))


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
    ) -> None:
        if not exports:
            raise ValueError("an NBD server needs at least one export")
        self.exports = {e.info.name: e for e in exports}
        self.export_infos = {name: e.info for name, e in self.exports.items()}
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nbd-io")
        self.max_inflight_requests = max_inflight_requests
        self.max_inflight_bytes = max_inflight_bytes
        self.poll_ns = poll_us * 1000
        self.connections: set[Connection] = set()
        self.total_connections = 0
        self._servers: list[asyncio.Server] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self.closing = False
        #: Called after each connection closes (the worker pool counts its load).
        self.on_connection_closed: Callable[[], None] | None = None

    def _factory(self) -> Connection:
        return Connection(self)

    async def listen_tcp(self, host: str, port: int) -> list[tuple[str, int]]:
        """Listen on ``host:port`` (port 0 = ephemeral); return the bound addresses."""
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(self._factory, host, port, reuse_address=True)
        self._servers.append(srv)
        return [sock.getsockname()[:2] for sock in srv.sockets]

    async def adopt(self, sock: socket.socket) -> None:
        """Serve a connection accepted elsewhere (handed over by the worker pool)."""
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(self._factory, sock)

    async def listen_unix(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        srv = await loop.create_unix_server(self._factory, path)
        self._servers.append(srv)

    def _opened(self, conn: Connection) -> None:
        self.connections.add(conn)
        self.total_connections += 1
        self._idle.clear()

    def _closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._idle.set()
        if self.on_connection_closed is not None:
            self.on_connection_closed()

    async def shutdown(self) -> None:
        """Stop accepting, let every connection finish its in-flight requests, close."""
        self.closing = True
        for srv in self._servers:
            srv.close()
        for conn in list(self.connections):
            conn.shutdown()
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


class Connection(asyncio.BufferedProtocol):
    """One client: handshake, then requests."""

    def __init__(self, server: NBDServer) -> None:
        self.server = server
        self.id = next(_next_id)
        self.peer = "?"
        self.log = _ConnectionLog(logger, self)
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray(INITIAL_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._negotiation: Negotiation | None = Negotiation(server.export_infos)
        self._decoder: RequestDecoder | None = None
        self._export: Export | None = None
        self._session: Session | None = None
        self._inflight = 0
        self._inflight_bytes = 0
        self._write_paused = False
        self._read_paused = False
        self._draining = False  # DISC received or server shutting down
        self._closed = False
        self._processing = False
        #: Highest in-flight byte count seen (see inflight_bytes); tests check the bound.
        self.peak_inflight = 0
        #: Replies collected during one decoded batch (None outside _process).
        self._batch: list[bytes | bytearray | memoryview] | None = None
        #: The socket, read directly by _poll (-1: no socket, never poll).
        self._fd = -1
        #: Current busy-poll window in ns (0 = do not poll); see _adapt.
        self._poll_window = 0
        #: perf_counter_ns when the loop last went back to waiting for this client, if
        #: that wait should resize the poll window (0 otherwise).
        self._wait_from = 0
        #: Commands in the last decoded batch (polling follows lone requests only).
        self._batch_size = 0

    # --- asyncio callbacks -------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        peername = transport.get_extra_info("peername")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # "both the client and server SHOULD disable Nagle's algorithm" (doc/proto.md
            # "Protocol phases").
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.peer = f"{peername[0]}:{peername[1]}"
        else:
            self.peer = "unix"
        if sock is not None:
            self._fd = sock.fileno()
        # pause_writing fires exactly when queued replies pass the in-flight bound, so
        # a connection that stopped decoding at the bound is always resumed.
        limit = self.server.max_inflight_bytes
        transport.set_write_buffer_limits(high=limit, low=limit // 2)
        self.server._opened(self)
        if self.server.closing:
            transport.close()
            return
        assert self._negotiation is not None
        transport.write(self._negotiation.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        # The connection and its log adapter form a reference cycle, which only a full
        # collection frees once the connection has lived long enough to reach the old
        # generation: drop the receive buffer now, or every closed connection keeps its
        # megabyte until then (seen as RSS growing run after run in bench/).
        self._view.release()
        self._buf = bytearray()
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        if exc is not None:
            self.log.debug("connection lost: %s", exc)
        self.server._closed(self)

    def eof_received(self) -> bool:
        self.log.debug("client closed its side")
        return False

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._process()
        self._update_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        needed = self._decoder.needed if self._decoder is not None else 0
        pending = self._end - self._start
        if self._start == self._end:
            self._start = self._end = 0
        if len(self._buf) - self._end < max(MIN_FREE, needed - pending):
            if self._start:
                self._view[0:pending] = self._view[self._start : self._end]
                self._start, self._end = 0, pending
            if len(self._buf) < needed:
                # A WRITE larger than the buffer: grow once to fit it (bounded by the
                # validated max block size, as invalid WRITEs are skipped, not buffered).
                new = bytearray(needed + MIN_FREE)
                new[:pending] = self._view[:pending]
                self._view.release()
                self._buf = new
                self._view = memoryview(new)
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        if self._negotiation is not None:
            self._negotiate()
        if self._decoder is not None and not self._closed:
            if self._wait_from:
                self._adapt(time.perf_counter_ns() - self._wait_from)
                self._wait_from = 0
            self._process()
            while self._poll():
                self._process()

    def _adapt(self, waited: int) -> None:
        """Resize the poll window from how long the client took to send its next request.

        The rule of KVM's halt polling: a wait that a window of ``poll_ns`` would have
        covered doubles the window (from :data:`POLL_GROW_START_NS`); a longer wait
        halves it, down to zero, so an idle or slow client costs no polling.
        """
        max_ns = self.server.poll_ns
        if waited <= max_ns:
            self._poll_window = min(max_ns, max(POLL_GROW_START_NS, self._poll_window * 2))
        else:
            self._poll_window //= 2
            if self._poll_window < POLL_GROW_START_NS:
                self._poll_window = 0

    def _poll(self) -> bool:
        """After a lone request was answered, read the socket for up to the poll window.

        A client with one request in flight (QD1: a swap-in page fault, a latency probe)
        sends the next one some 10-30 µs after our reply. Going back to epoll costs a
        sleep and a wake-up of this thread for every request; reading the socket in a
        short loop instead answers the next request without either (rand read 4 KiB QD1:
        nbd-serve ÷ nbdkit 0.68x before, 1.13x with it, bench/results). Only when this
        process serves one connection (polling would delay the others), nothing is
        queued, paused or in the pool, and the last batch was one request. The window
        adapts (:meth:`_adapt`), so a client that pauses stops the polling.

        Returns True when bytes were read into the buffer (the caller processes them).
        """
        server = self.server
        transport = self.transport
        if (
            server.poll_ns <= 0
            or self._batch_size != 1
            or self._fd < 0
            or self._closed
            or self._draining
            or self._read_paused
            or self._inflight
            or transport is None
            or transport.get_write_buffer_size()
            or len(server.connections) != 1
        ):
            self._wait_from = 0
            return False
        started = time.perf_counter_ns()
        window = self._poll_window
        if window:
            deadline = started + window
            view = self.get_buffer(0)
            fd = self._fd
            assert self._export is not None
            stats = self._export.stats
            while True:
                try:
                    n = os.readv(fd, [view])
                except BlockingIOError:
                    now = time.perf_counter_ns()
                    if now < deadline:
                        continue
                    stats.poll_misses += 1
                    stats.poll_ns += now - started
                    break
                except OSError as exc:
                    # The loop would have seen the same error; the socket is done.
                    self.log.debug("connection lost while polling: %s", exc)
                    self._wait_from = 0
                    transport.abort()
                    return False
                if n == 0:
                    # End of stream: left for the event loop to see (eof_received).
                    self._wait_from = 0
                    return False
                self._end += n
                stats.poll_hits += 1
                stats.poll_ns += time.perf_counter_ns() - started
                return True
        self._wait_from = started
        return False

    # --- handshake ---------------------------------------------------------------
    def _negotiate(self) -> None:
        neg = self._negotiation
        assert neg is not None and self.transport is not None
        data = bytes(self._view[self._start : self._end])
        self._start = self._end = 0
        events = neg.receive_data(data)
        out = neg.data_to_send()
        if out:
            self.transport.write(out)
        for event in events:
            if isinstance(event, OptionHandled):
                self._log_option(event)
            elif isinstance(event, Closed):
                if event.violation:
                    self.log.warning("handshake violation, closing: %s", event.reason)
                else:
                    self.log.debug("%s", event.reason)
                self._negotiation = None
                self.transport.close()
                return
            elif isinstance(event, Ready):
                self._enter_transmission(event)
                trailing = neg.trailing_data
                self._negotiation = None
                self._view[0 : len(trailing)] = trailing
                self._start, self._end = 0, len(trailing)
                return

    def _log_option(self, event: OptionHandled) -> None:
        try:
            name = f"NBD_OPT_{Opt(event.option).name}"
        except ValueError:
            name = f"option {event.option}"
        if event.reply is Rep.ACK:
            self.log.debug("%s: ok", name)
        else:
            self.log.debug("%s: %s %s", name, event.reply.name, event.detail)

    def _enter_transmission(self, ready: Ready) -> None:
        export = self.server.exports[ready.export.name]
        self._export = export
        self._session = Session(
            size=ready.export.size,
            flags=ready.flags,
            structured=ready.structured,
            meta_context=ready.meta_context,
            max_block=ready.export.max_block,
            min_block=ready.export.min_block,
        )
        self._decoder = RequestDecoder(self._session)
        flags = "|".join(f.name for f in TransmissionFlag if f in ready.flags and f.name)
        self.log.info(
            "export %r size=%d flags=%s structured=%s meta=%s no_zeroes=%s",
            export.info.name,
            export.info.size,
            flags,
            "yes" if ready.structured else "no",
            "base:allocation" if ready.meta_context is not None else "none",
            "yes" if ready.no_zeroes else "no",
        )

    # --- transmission ------------------------------------------------------------
    def _process(self) -> None:
        """Answer the complete requests in the buffer while the in-flight budget lasts.

        Requests are decoded in batches whose READ/WRITE bytes fit the budget left
        (``max_inflight_bytes`` minus reply bytes still queued in the transport and
        payloads held by pool jobs). Past the bound the rest stays undecoded in the
        receive buffer and reading pauses; :meth:`resume_writing` and pool completions
        call this again. Without the budget one 1 MiB receive buffer of pipelined
        1 MiB READs (32768 requests) would queue 32 GiB of replies.
        """
        decoder = self._decoder
        transport = self.transport
        if decoder is None or transport is None or self._processing:
            return
        self._processing = True
        server = self.server
        limit = server.max_inflight_bytes
        try:
            while (
                self._start < self._end
                and not self._closed
                and not self._write_paused
                and self._inflight < server.max_inflight_requests
            ):
                budget = limit - self._inflight_bytes - transport.get_write_buffer_size()
                if budget < 0:
                    break
                commands, used = decoder.decode(self._view[self._start : self._end], budget)
                self._batch_size = len(commands)
                # One send for all the replies of a batch instead of one per request: the
                # per-reply send() was 38% of the CPU of a QD32 4 KiB read load (py-spy).
                self._batch = []
                try:
                    for command in commands:
                        self._dispatch(command)
                    self._flush()
                finally:
                    self._batch = None
                    # Payload views point into the buffer; they are all consumed (or
                    # copied) by now, so the space can be reused.
                    self._start += used
                    if self._start == self._end:
                        self._start = self._end = 0
                if not commands or decoder.violation is not None or decoder.disconnected:
                    break
        finally:
            self._processing = False
        if self._draining:
            pass
        elif decoder.violation is not None:
            self.log.warning("closing connection: %s", decoder.violation)
            self._draining = True
            self._finish_if_drained()
        elif decoder.disconnected:
            self.log.debug("NBD_CMD_DISC: finishing %d in-flight requests", self._inflight)
            self._draining = True
            self._finish_if_drained()
        self._update_reading()

    def inflight_bytes(self) -> int:
        """Reply bytes queued in the transport plus WRITE payloads held by pool jobs."""
        queued = self.transport.get_write_buffer_size() if self.transport is not None else 0
        return self._inflight_bytes + queued

    def _write(self, data: Reply) -> None:
        batch = self._batch
        if batch is not None:
            # Inside _process: collected, sent by _flush in one vectored write.
            if isinstance(data, list):
                batch.extend(data)
            else:
                batch.append(data)
            return
        if self._closed or self.transport is None:
            return
        if isinstance(data, (bytes, bytearray)):
            self.transport.write(data)
        else:
            self.transport.writelines(data)

    def _flush(self) -> None:
        """Send the replies collected while dispatching one decoded batch."""
        batch = self._batch
        self._batch = None
        if not batch or self._closed or self.transport is None:
            return
        if len(batch) == 1:
            self.transport.write(batch[0])
        else:
            self.transport.writelines(batch)
        queued = self._inflight_bytes + self.transport.get_write_buffer_size()
        self.peak_inflight = max(self.peak_inflight, queued)

    def _dispatch(self, c: Command) -> None:
        export = self._export
        assert export is not None
        t0 = time.perf_counter_ns()
        t = c.type
        if c.error is not None:
            self._reject(c, t0)
            return
        if t == _DISC:
            export.stats.record(t, 0, 0, False)
            return
        if t == _READ and c.length >= LARGE_READ and self._sendfile_read(c, t0):
            return
        # Inline: everything for the memory backend; for files whatever hits the page
        # cache only (plain WRITEs, READs below LARGE_READ, BLOCK_STATUS). The checks
        # are spelled out rather than called: this runs once per request.
        if not (
            (t == _READ and c.length < LARGE_READ)
            or (t == _WRITE and (export.inline or not c.flags & _FUA))
            or (t != _READ and (export.inline or t == _BLOCK_STATUS))
        ):
            self._submit(c, t0)
            return
        try:
            reply = self._execute(c, c.payload)
            error = False
        except Exception as exc:
            reply = self._failure(c, exc)
            error = True
        export.stats.record(t, c.length if t <= _WRITE else 0, time.perf_counter_ns() - t0, error)
        batch = self._batch
        if batch is None:
            self._write(reply)
        elif isinstance(reply, list):
            batch.extend(reply)
        else:
            batch.append(reply)

    def _sendfile_read(self, c: Command, t0: int) -> bool:
        """Send a large read straight from the page cache with ``sendfile``, if possible.

        Through a buffer a 1 MiB read is copied twice (page cache to the buffer, buffer
        to the socket): 35% of the server's CPU in a seq read 1 MiB QD8 load (perf).
        sendfile hands the pages to the socket with no copy. This needs the socket to
        ourselves: nothing may be queued in the transport, since these bytes bypass it.
        The header goes first (a structured read's OFFSET_DATA chunk without DONE, then
        a NONE chunk with DONE: an error can still strike during the transfer); what
        the socket does not take at once is read with pread and queued in the transport
        behind it. Reads that start in a hole keep the buffered path, which describes
        zero runs as OFFSET_HOLE chunks.

        Returns False (nothing sent) when the buffered path must be taken instead.
        """
        transport = self.transport
        export = self._export
        session = self._session
        assert transport is not None and export is not None and session is not None
        if self._fd < 0:
            return False
        if self._batch:
            # Replies decoded before this read go first.
            self._flush()
            self._batch = []
        if transport.get_write_buffer_size():
            return False
        backend = export.backend
        source = backend.sendfile_source(c.offset, c.length)
        if source < 0:
            return False
        if session.structured:
            header = offset_data_header(c.cookie, c.offset, c.length, False)
            tail = done_chunk(c.cookie)
        else:
            header = simple_reply(c.cookie)
            tail = b""
        sock, offset, length = self._fd, c.offset, c.length
        sent = 0
        try:
            try:
                n = os.write(sock, header)
            except BlockingIOError:
                return False
            if n < len(header):
                transport.write(header[n:])
            else:
                with contextlib.suppress(BlockingIOError):
                    while sent < length:
                        k = os.sendfile(sock, source, offset + sent, length - sent)
                        if k == 0:
                            break
                        sent += k
            if sent < length:
                transport.write(backend.pread(offset + sent, length - sent))
        except OSError as exc:
            # Part of the reply may be on the wire: the stream cannot be resumed.
            self.log.warning("read at %d+%d failed while sending: %s; closing", offset, length, exc)
            export.stats.record(_READ, 0, time.perf_counter_ns() - t0, True)
            transport.abort()
            return True
        if tail:
            transport.write(tail)
        export.stats.record(_READ, length, time.perf_counter_ns() - t0, False)
        return True

    def _reject(self, c: Command, t0: int) -> None:
        """Answer a request that failed validation with its error."""
        assert self._export is not None and self._session is not None and c.error is not None
        self.log.debug("request %#x rejected: %s", c.cookie, c.error)
        self._export.stats.record(c.type, 0, time.perf_counter_ns() - t0, True)
        self._write(error_reply(self._session, c.cookie, c.error.errno, str(c.error)))

    def _submit(self, c: Command, t0: int) -> None:
        """Run a command that may block (or a large read) in the thread pool.

        Large reads that cannot leave by sendfile (:meth:`_sendfile_read`) go there too:
        os.pread releases the GIL, so the loop sends one reply while a pool thread
        copies the next one out of the page cache. This is its own method because the
        closure below would otherwise make every inline request pay for its cells.
        """
        # The payload view points into the receive buffer, which is reused once this
        # callback returns: the pool gets a copy and the command no view at all.
        payload = bytes(c.payload) if c.payload is not None else None
        c = dataclasses.replace(c, payload=None)
        held = c.length if payload is not None or c.type == _READ else 0
        self._inflight += 1
        self._inflight_bytes += held
        self.peak_inflight = max(self.peak_inflight, self._inflight_bytes)
        future = self.server.executor.submit(self._execute, c, payload)
        loop = asyncio.get_running_loop()
        future.add_done_callback(
            lambda f: loop.call_soon_threadsafe(self._completed, c, f, t0, held)
        )
        self._update_reading()

    def _completed(self, c: Command, future: Future[Reply], t0: int, held: int) -> None:
        self._inflight -= 1
        self._inflight_bytes -= held
        exc = future.exception()
        reply = future.result() if exc is None else self._failure(c, exc)
        assert self._export is not None
        self._export.stats.record(c.type, _nbytes(c), time.perf_counter_ns() - t0, exc is not None)
        self._write(reply)
        self._process()
        self._update_reading()
        self._finish_if_drained()

    def _failure(self, c: Command, exc: BaseException) -> bytes:
        """A failing backend call becomes an error reply, never a crash."""
        assert self._session is not None
        errno = errno_of(exc)
        self.log.warning(
            "%s at %d+%d failed: %s (%s)", _cmd_name(c.type), c.offset, c.length, exc, errno.name
        )
        return error_reply(self._session, c.cookie, errno, str(exc))

    def _execute(self, c: Command, payload: bytes | memoryview | None) -> Reply:
        """Run one validated command against the backend; return its reply bytes."""
        assert self._export is not None and self._session is not None
        backend = self._export.backend
        session = self._session
        fua = bool(c.flags & _FUA)
        t = c.type
        if t == _READ:
            return self._read(backend, session, c)
        if t == _WRITE:
            assert payload is not None
            backend.pwrite(payload, c.offset, fua)
        elif t == Cmd.FLUSH:
            backend.flush()
        elif t == Cmd.TRIM:
            backend.trim(c.offset, c.length, fua)
        elif t == Cmd.WRITE_ZEROES:
            backend.zero(
                c.offset,
                c.length,
                may_trim=not c.flags & _NO_HOLE,
                fast=bool(c.flags & _FAST_ZERO),
                fua=fua,
            )
        elif t == Cmd.CACHE:
            backend.cache(c.offset, c.length)
        elif t == Cmd.BLOCK_STATUS:
            assert session.meta_context is not None
            extents = backend.extents(c.offset, c.length) if backend.capabilities.extents else []
            descriptors = block_status_descriptors(
                c.offset, c.length, extents, bool(c.flags & _REQ_ONE)
            )
            return block_status_chunk(c.cookie, session.meta_context, descriptors)
        else:  # pragma: no cover - validate() rejects everything else
            raise AssertionError(f"unexpected command {t}")
        return _pack_simple(SIMPLE_REPLY_MAGIC, 0, c.cookie)

    def _read(self, backend: Backend, session: Session, c: Command) -> Reply:
        length = c.length
        if not session.structured:
            if length >= LARGE_READ:
                # os.pread allocates without zero-filling; header and data leave in one
                # vectored write.
                return [simple_reply(c.cookie), backend.pread(c.offset, length)]
            buf = bytearray(_SIMPLE_HEADER + length)
            buf[:_SIMPLE_HEADER] = simple_reply(c.cookie)
            if length:
                backend.pread_into(memoryview(buf)[_SIMPLE_HEADER:], c.offset)
            return buf
        if length == 0:
            return [done_chunk(c.cookie)]
        # All data is read before anything is sent, so the last content chunk can carry
        # NBD_REPLY_FLAG_DONE ("MUST NOT do so for a content chunk if it would still be
        # possible to detect an error while transmitting the chunk").
        if length < HOLE_SCAN_MIN:
            buf = bytearray(_DATA_HEADER + length)
            buf[:_DATA_HEADER] = offset_data_header(c.cookie, c.offset, length, True)
            backend.pread_into(memoryview(buf)[_DATA_HEADER:], c.offset)
            return buf
        data = backend.pread(c.offset, length)
        # DF: "the server MUST send at most one content chunk ... If the area being read
        # contains both data and a hole, the server MUST use NBD_REPLY_TYPE_OFFSET_DATA
        # with the zeroes explicitly present."
        if c.flags & _DF or not isinstance(data, (bytes, bytearray)):
            return [offset_data_header(c.cookie, c.offset, length, True), data]
        pieces = plan_read(c.offset, length, zero_extents(data, c.offset))
        out: list[bytes | bytearray | memoryview] = []
        view = memoryview(data)
        last = len(pieces) - 1
        for i, piece in enumerate(pieces):
            if piece.hole:
                out.append(offset_hole_chunk(c.cookie, piece.offset, piece.length, i == last))
            else:
                out.append(offset_data_header(c.cookie, piece.offset, piece.length, i == last))
                at = piece.offset - c.offset
                out.append(data if piece.length == length else view[at : at + piece.length])
        return out

    # --- flow control and shutdown ----------------------------------------------
    def _update_reading(self) -> None:
        if self.transport is None or self._closed:
            return
        server = self.server
        want_pause = (
            self._draining
            or self._write_paused
            or self._inflight >= server.max_inflight_requests
            or self.inflight_bytes() > server.max_inflight_bytes
        )
        if want_pause and not self._read_paused:
            self.transport.pause_reading()
            self._read_paused = True
        elif not want_pause and self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()

    def _finish_if_drained(self) -> None:
        if self._draining and self._inflight == 0 and self.transport is not None:
            self.transport.close()

    def shutdown(self) -> None:
        """Server shutdown: "SHOULD wait for inflight requests to be serviced prior to
        initiating a hard disconnect" (doc/proto.md "Terminating the transmission
        phase")."""
        if self.transport is None:
            return
        if self._decoder is None:
            self.transport.close()
            return
        self._draining = True
        self._update_reading()
        self._finish_if_drained()


def _nbytes(c: Command) -> int:
    return c.length if c.type in (_READ, _WRITE) else 0


def _cmd_name(cmd: int) -> str:
    try:
        return f"NBD_CMD_{Cmd(cmd).name}"
    except ValueError:
        return f"command {cmd}"


def describe_listeners(addresses: Iterable[tuple[str, int]]) -> list[dict[str, object]]:
    return [{"kind": "tcp", "host": host, "port": port} for host, port in addresses]
