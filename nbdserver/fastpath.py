"""The adapter's fast paths, out of its control flow: the receive buffer, the busy-poll
read loop, sendfile, and the malloc tuning for large reply buffers.

Each is a small piece with a measured reason, recorded once in docs/performance.md
(the section named in each docstring). The framing of every byte they send comes from
:class:`nbdserver.transmission.Transmission`; when to use them is the adapter's
(:class:`nbdserver.server.Connection`) decision, made from its own state.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from nbdserver.errors import NBDError, PartialReply, errno_of

if TYPE_CHECKING:
    from nbdserver.policy import PollWindow
    from nbdserver.stats import ExportStats

#: Below this much free tail space the receive buffer is compacted before the next read.
MIN_FREE: Final = 64 * 1024


class ReceiveBuffer:
    """A preallocated buffer the event loop reads straight into (BufferedProtocol).

    Requests are decoded from ``view[start:end]``; WRITE payloads are handed out as
    views into it, so it is only compacted or grown between batches. It grows (once)
    to fit the largest valid WRITE actually received.

    The memory is an anonymous mmap, not a bytearray: its pages cost RAM only once data
    lands in them (an idle connection holds a page or two, where a zero-filled bytearray
    held all 256 KiB), and dropping it unmaps them, whereas freed heap memory stays with
    the process under :func:`tune_allocator`'s trim threshold (docs/performance.md,
    "malloc"; tests/faults/test_churn.py measures both).
    """

    __slots__ = ("buf", "end", "start", "view")

    def __init__(self, size: int) -> None:
        self.buf: mmap.mmap | bytearray = mmap.mmap(-1, size)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0

    def space(self, needed: int) -> memoryview:
        """Free space to read into, room for ``needed`` contiguous bytes included."""
        pending = self.end - self.start
        if pending == 0:
            self.start = self.end = 0
        if len(self.buf) - self.end < max(MIN_FREE, needed - pending):
            if self.start:
                self.view[0:pending] = self.view[self.start : self.end]
                self.start, self.end = 0, pending
            if len(self.buf) < needed:
                # A WRITE larger than the buffer: grow once to fit it (bounded by the
                # validated max block size, as invalid WRITEs are skipped, not buffered).
                new = mmap.mmap(-1, needed + MIN_FREE)
                new[:pending] = self.view[:pending]
                self.view.release()
                self.buf = new
                self.view = memoryview(new)
        return self.view[self.end :]

    def consume(self, used: int) -> None:
        """``used`` bytes were decoded (their payload views are all dropped by now)."""
        self.start += used
        if self.start == self.end:
            self.start = self.end = 0

    def take(self) -> bytes:
        """Everything pending, as a copy, leaving the buffer empty."""
        data = bytes(self.view[self.start : self.end])
        self.start = self.end = 0
        return data

    def put(self, data: bytes) -> None:
        """Replace the (empty) content with ``data``, which came out of this buffer."""
        self.view[0 : len(data)] = data
        self.start, self.end = 0, len(data)

    def release(self) -> None:
        """Drop the memory now (a closed connection may wait long for the cycle GC)."""
        self.view.release()
        self.buf = bytearray()
        self.view = memoryview(self.buf)
        self.start = self.end = 0


#: A partial request missing fewer bytes than this is not worth a system call.
WAKE_MARK_MIN: Final = 4096
#: The largest mark: a receive buffer's worth. A 1 MiB WRITE is then read in four parts
#: as it streams in, not in one after it has all arrived (with a 1 MiB cap, seq write
#: 1 MiB QD8 measured 0.95x of the server without a mark; docs/performance.md).
WAKE_MARK_MAX: Final = 256 * 1024


class WakeMark:
    """SO_RCVLOWAT on a TCP socket: while a request's payload streams in, the event loop
    wakes once the rest of it is there, not for every few segments that arrive
    (docs/performance.md, "Wake mark"). Linux still wakes the reader early when the
    receive window or memory runs short, so the mark cannot stall a connection."""

    __slots__ = ("mark", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock: socket.socket | None = sock
        #: The mark in force (1 is the kernel's default: wake for any byte).
        self.mark = 1

    def update(self, missing: int) -> None:
        """``missing`` bytes of a partly received request are still to come."""
        want = min(missing, WAKE_MARK_MAX) if missing >= WAKE_MARK_MIN else 1
        sock = self.sock
        if want == self.mark or sock is None:
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
        except OSError:  # the socket is going away: the event loop will see it
            self.sock = None
            return
        self.mark = want


def poll_read(fd: int, view: memoryview, deadline_ns: int) -> tuple[int, int]:
    """Read the non-blocking socket ``fd`` into ``view`` until bytes come or the deadline.

    Returns ``(n, now)``: n > 0 bytes read, 0 at end of stream, -1 when nothing came
    before ``deadline_ns`` (perf_counter_ns), with ``now`` the time it gave up (0 when
    it did not). Raises OSError from the socket. See docs/performance.md, "Busy-poll".
    """
    while True:
        try:
            return os.readv(fd, [view]), 0
        except BlockingIOError:
            now = time.perf_counter_ns()
            if now >= deadline_ns:
                return -1, now


def sendfile_reply(
    fd: int,
    header: bytes,
    *,
    source: int,
    offset: int,
    length: int,
    queue: Callable[[bytes | bytearray | memoryview], None],
    pread: Callable[[int, int], bytes | bytearray | memoryview],
) -> bool:
    """Send ``header`` then ``length`` bytes of ``source`` at ``offset`` on socket ``fd``.

    The caller makes sure nothing is queued ahead of this in its transport. What the
    socket does not take at once goes to ``queue`` (the transport's write), the data
    read with ``pread``. See docs/performance.md, "sendfile".

    Returns False when nothing was sent (the socket is full: use the buffered path).
    Raises :class:`~nbdserver.errors.PartialReply` when reading the data fails after the
    header left (how many data bytes are out is in it), OSError when the socket fails.
    """
    try:
        n = os.write(fd, header)
    except BlockingIOError:
        return False
    sent = 0
    try:
        if n < len(header):
            queue(header[n:])
        else:
            with contextlib.suppress(BlockingIOError):
                while sent < length:
                    k = os.sendfile(fd, source, offset + sent, length - sent)
                    if k == 0:  # the file ended early (it shrank): pread says why
                        break
                    sent += k
        if sent < length:
            queue(pread(offset + sent, length - sent))
    except ConnectionError:
        raise  # the socket is gone: nothing to finish
    except (OSError, NBDError) as exc:
        raise PartialReply(
            f"read failed after {sent} of {length} bytes were sent: {exc}", sent, errno_of(exc)
        ) from exc
    return True


def busy_poll(window: PollWindow, fd: int, rx: ReceiveBuffer, stats: ExportStats) -> bool:
    """After a lone request was answered, read socket ``fd`` into ``rx`` for up to the
    poll window (docs/performance.md, "Busy-poll"); True when bytes came (the caller
    processes them). The caller decides whether polling is allowed at all. Raises
    OSError when the socket failed (the caller closes it)."""
    started = time.perf_counter_ns()
    if window.window:
        try:
            n, now = poll_read(fd, rx.space(0), started + window.window)
        except OSError:
            window.forget()
            raise
        if n == 0:  # end of stream: left to the event loop
            window.forget()
            return False
        if n > 0:
            rx.end += n
            stats.polled(True, time.perf_counter_ns() - started)
            return True
        stats.polled(False, now - started)
    window.waiting(started)
    return False


def tune_allocator() -> bool:
    """Keep large reply buffers on the malloc heap (glibc only; False elsewhere).

    Raises glibc's mmap and trim thresholds so freed megabyte buffers are reused instead
    of unmapped, and keeps one arena; docs/performance.md, "malloc".
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    ok = mallopt(m_mmap_threshold, 32 * 1024 * 1024) == 1
    ok = mallopt(m_trim_threshold, 256 * 1024 * 1024) == 1 and ok
    return bool(mallopt(m_arena_max, 1) == 1 and ok)
