"""Commands against one export's backend: how each runs, inline, in the pool or by sendfile.

Where a command runs is decided by :meth:`nbdserver.connection.NBDConnection.route`: on
the event loop whatever cannot block for long, in the thread pool what may (FLUSH =
fdatasync, FUA writes, TRIM/WRITE_ZEROES = fallocate, CACHE), and large reads by
sendfile where the backend allows (docs/performance.md, "Inline or pool"). The
:class:`Dispatcher` runs it there and turns failures into error replies. Every reply is
framed by the :class:`~nbdserver.transmission.Transmission`; nothing here packs a byte.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Final

from nbdserver.backends.base import Backend
from nbdserver.connection import LARGE_READ
from nbdserver.errors import NBDError, PartialReply, errno_of
from nbdserver.fastpath import sendfile_reply
from nbdserver.protocol import (
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_NO_HOLE,
    Cmd,
)
from nbdserver.stats import ExportStats
from nbdserver.transmission import Command, Rejected, Transmission

#: What a backend may raise as an answer, not as a bug (see Dispatcher.failure).
EXPECTED_FAILURES: Final = (NBDError, OSError, MemoryError)

#: What a command produces for the wire: one buffer, or several for a vectored write.
Reply = bytes | bytearray | list[bytes | bytearray | memoryview]


class Dispatcher:
    """Runs one connection's validated commands against its export's backend."""

    __slots__ = (
        "_ack",
        "_extended",
        "_extents",
        "_read_prefix",
        "_read_reply",
        "_tx",
        "backend",
        "log",
        "stats",
    )

    def __init__(
        self,
        backend: Backend,
        tx: Transmission,
        log: logging.LoggerAdapter[logging.Logger],
        stats: ExportStats,
    ) -> None:
        self.backend = backend
        self.stats = stats
        self._tx = tx
        # Bound once: these run for every request.
        self._ack = tx.ack
        #: Extended replies carry the request's offset, so their ack needs the command.
        self._extended = tx.session.extended
        self._read_prefix = tx.read_prefix
        self._read_reply = tx.read_reply
        self.log = log
        self._extents = backend.capabilities.extents

    def completed(self, c: Command, future: Future[Reply], t0: int) -> Reply:
        """The reply of a pool job (:meth:`submit`) that ended, counted in the stats."""
        exc = future.exception()
        reply = future.result() if exc is None else self.failure(c, exc)
        self.stats.record(c.type, c.length, time.perf_counter_ns() - t0, exc is not None)
        return reply

    def rejected(self, event: Rejected, t0: int) -> bytes:
        """The error reply to a request that failed validation, counted in the stats."""
        self.log.debug("request %#x rejected: %s", event.cookie, event.error)
        self.stats.record(event.type, 0, time.perf_counter_ns() - t0, True)
        return self._tx.error_reply(
            event.cookie, event.error.errno, str(event.error), offset=event.offset
        )

    def execute(self, c: Command, payload: bytes | memoryview | None) -> Reply:
        """Run one validated command; return its reply. Backend errors propagate (see
        :meth:`failure`). Called on the loop or on a pool thread."""
        t = c.type
        backend = self.backend
        if t == CMD_READ:
            length = c.length
            prefix = self._read_prefix(c)
            if prefix is not None and length < LARGE_READ:
                # Header and data in one buffer, read straight in behind the header.
                size = len(prefix)
                buf = bytearray(size + length)
                buf[:size] = prefix
                if length:
                    backend.pread_into(memoryview(buf)[size:], c.offset)
                return buf
            # os.pread allocates without zero-filling; the core frames what it returned.
            data = backend.pread(c.offset, length) if length else b""
            return self._read_reply(c, data)
        fua = bool(c.flags & FLAG_FUA)
        if t == CMD_WRITE:
            assert payload is not None
            backend.pwrite(payload, c.offset, fua)
        elif t == CMD_FLUSH:
            backend.flush()
        elif t == CMD_TRIM:
            backend.trim(c.offset, c.length, fua)
        elif t == CMD_WRITE_ZEROES:
            backend.zero(
                c.offset,
                c.length,
                may_trim=not c.flags & FLAG_NO_HOLE,
                fast=bool(c.flags & FLAG_FAST_ZERO),
                fua=fua,
            )
        elif t == CMD_CACHE:
            backend.cache(c.offset, c.length)
        elif t == CMD_BLOCK_STATUS:
            extents = backend.extents(c.offset, c.length) if self._extents else []
            return self._tx.block_status_reply(c, extents)
        else:  # pragma: no cover - validate() rejects everything else
            raise AssertionError(f"unexpected command {t}")
        if self._extended:
            return self._tx.ack_command(c)
        return self._ack(c.cookie)

    def submit(
        self,
        c: Command,
        t0: int,
        executor: Executor,
        done: Callable[[Command, Future[Reply], int, int], None],
    ) -> int:
        """Run ``c`` in the thread pool; ``done(c, future, t0, held)`` follows on the loop.

        Returns the bytes the job holds (a WRITE's payload copy, a read being made).
        """
        # The payload view points into the receive buffer, which is reused once the
        # current callback returns: the pool gets a copy and the command no view at all.
        payload = bytes(c.payload) if c.payload is not None else None
        c = dataclasses.replace(c, payload=None)
        held = c.length if payload is not None or c.type == CMD_READ else 0
        future = executor.submit(self.execute, c, payload)
        loop = asyncio.get_running_loop()
        future.add_done_callback(lambda f: loop.call_soon_threadsafe(done, c, f, t0, held))
        return held

    def sendfile(
        self, c: Command, fd: int, queue: Callable[[bytes | bytearray | memoryview], None]
    ) -> bool:
        """Send a read with sendfile on socket ``fd``, framed by the core; what the socket
        does not take goes to ``queue``. False when nothing was sent (the range is not
        data in memory, or the socket is full); OSError once part of it may be sent."""
        backend = self.backend
        source = backend.sendfile_source(c.offset, c.length)
        if source < 0:
            return False
        header, trailer = self._tx.sendfile_frame(c)
        sent = sendfile_reply(
            fd,
            header,
            source=source,
            offset=c.offset,
            length=c.length,
            queue=queue,
            pread=backend.pread,
        )
        if sent and trailer:
            queue(trailer)
        return sent

    def finish_failed_sendfile(
        self, c: Command, exc: PartialReply, queue: Callable[[bytes], None]
    ) -> bool:
        """End a sendfile reply whose data failed midway with an error the client sees
        (structured replies); False when only a disconnect can end it (simple replies)."""
        tail = self._tx.sendfile_failed(c, exc.sent, exc.errno, str(exc))
        if tail is None:
            return False
        self.log.warning(
            "NBD_CMD_READ at %d+%d failed while sending: %s (%s)",
            c.offset,
            c.length,
            exc,
            exc.errno.name,
        )
        for piece in tail:
            queue(piece)
        return True

    def sendfile_read(
        self,
        c: Command,
        fd: int,
        write: Callable[[bytes | bytearray | memoryview], None],
        abort: Callable[[], None],
        t0: int,
    ) -> bool:
        """Answer a large read with sendfile on socket ``fd`` (docs/performance.md,
        "sendfile"), counted in the stats; False: nothing was sent, use the pool. The
        bytes bypass the transport, whose ``write`` queues what the socket did not take:
        it must be idle. A failure once data may be on the wire ends in an error reply
        (structured replies) or in ``abort`` (the stream cannot be resumed)."""
        stats = self.stats
        try:
            if not self.sendfile(c, fd, write):
                return False
        except PartialReply as exc:
            stats.record(CMD_READ, 0, time.perf_counter_ns() - t0, True)
            if not self.finish_failed_sendfile(c, exc, write):
                self.log.warning("read at %d+%d failed while sending: %s", c.offset, c.length, exc)
                abort()  # a simple reply's header promised the data
            return True
        except OSError as exc:
            # Part of the reply may be on the wire: the stream cannot be resumed.
            self.log.warning("read at %d+%d failed while sending: %s", c.offset, c.length, exc)
            stats.record(CMD_READ, 0, time.perf_counter_ns() - t0, True)
            abort()
            return True
        stats.record(CMD_READ, c.length, time.perf_counter_ns() - t0, False)
        return True

    def failure(self, c: Command, exc: BaseException) -> bytes:
        """A failing request becomes an error reply, never a crash.

        The backend's expected failures (an :class:`~nbdserver.errors.NBDError`, an
        ``OSError`` such as EIO or ENOSPC from the storage, ``MemoryError``) are the
        client's business: a WARNING and the mapped errno. Anything else is a bug in the
        server: the client still gets EIO, but it is logged at ERROR with its traceback
        and counted in ``internal_errors``, because for a swap backend an EIO on a
        swap-in kills a process in the guest and must never pass quietly.
        """
        errno = errno_of(exc)
        what = cmd_name(c.type)
        if isinstance(exc, EXPECTED_FAILURES):
            self.log.warning(
                "%s at %d+%d failed: %s (%s)", what, c.offset, c.length, exc, errno.name
            )
        else:
            self.stats.internal_errors += 1
            self.log.error(
                "internal error in %s at %d+%d: %s: %s; the client got %s",
                what,
                c.offset,
                c.length,
                type(exc).__name__,
                exc,
                errno.name,
                exc_info=exc,
            )
        return self._tx.error_reply(c.cookie, errno, str(exc), offset=c.offset)


def cmd_name(cmd: int) -> str:
    try:
        return f"NBD_CMD_{Cmd(cmd).name}"
    except ValueError:
        return f"command {cmd}"
