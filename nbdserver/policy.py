"""Two small pure policies of the asyncio adapter: busy-poll sizing and flow control.

Neither touches a socket, a transport or a clock: the adapter feeds them numbers (time
as ``now`` in nanoseconds, queued bytes as counted by its transport) and acts on the
answers, so both are tested without sockets (tests/server/test_policy.py).
"""

from __future__ import annotations

from typing import Final

#: The window grows from this when a request came soon after the previous reply.
POLL_GROW_START_NS: Final = 10_000


class PollWindow:
    """How long to busy-poll the socket after answering a lone request.

    The rule of KVM's halt polling: a wait that a window of ``max_ns`` would have
    covered doubles the window (from :data:`POLL_GROW_START_NS`); a longer wait halves
    it, down to zero, so an idle or slow client costs no polling. Why polling pays at
    all: docs/performance.md, "Busy-poll".
    """

    __slots__ = ("max_ns", "waiting_since", "window")

    def __init__(self, max_ns: int) -> None:
        #: The largest window (``--poll-us``); 0 disables polling.
        self.max_ns = max_ns
        #: The current window in ns (0 = do not poll).
        self.window = 0
        #: When the adapter last went back to waiting for the client in a way that
        #: should resize the window (0: the next arrival says nothing).
        self.waiting_since = 0

    def waiting(self, now: int) -> None:
        """The adapter stops polling and waits in the event loop from ``now``."""
        self.waiting_since = now

    def forget(self) -> None:
        """The coming wait says nothing about the client (polling was not allowed)."""
        self.waiting_since = 0

    def arrived(self, now: int) -> None:
        """Bytes came in through the event loop at ``now``: resize from the wait."""
        if self.waiting_since:
            self.adapt(now - self.waiting_since)
            self.waiting_since = 0

    def adapt(self, waited: int) -> None:
        """Resize the window from how long (ns) the client took to send its next request."""
        if waited <= self.max_ns:
            self.window = min(self.max_ns, max(POLL_GROW_START_NS, self.window * 2))
        else:
            self.window //= 2
            if self.window < POLL_GROW_START_NS:
                self.window = 0


class FlowControl:
    """One connection's in-flight accounting and the rule for pausing its reads.

    In-flight bytes are the reply bytes queued in the transport (``queued``, which the
    adapter reads from it) plus the bytes ``held`` by pool jobs (WRITE payload copies,
    large reads being made). Requests are decoded in batches whose READ/WRITE lengths
    fit the :meth:`budget`; past the bound reading pauses. The transport's high-water
    mark is the same bound, so ``resume_writing`` (or a pool completion) always comes to
    resume decoding. Reading also pauses while ``max_requests`` pool jobs are
    outstanding and once the transmission phase stopped decoding (draining).
    """

    __slots__ = (
        "held",
        "max_bytes",
        "max_requests",
        "peak",
        "read_paused",
        "requests",
        "write_paused",
    )

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        #: Pool jobs outstanding, and the bytes they hold.
        self.requests = 0
        self.held = 0
        #: Highest in-flight byte count seen; tests check the bound.
        self.peak = 0
        #: The transport asked us to stop writing (pause_writing).
        self.write_paused = False
        #: We asked the transport to stop reading (pause_reading).
        self.read_paused = False

    def budget(self, queued: int) -> int:
        """Bytes of READ/WRITE the next batch may add; negative: decode nothing now
        (past the byte bound, writing paused, or ``max_requests`` pool jobs out)."""
        if self.write_paused or self.requests >= self.max_requests:
            return -1
        return self.max_bytes - self.held - queued

    def hold(self, nbytes: int) -> None:
        """A pool job starts, holding ``nbytes``."""
        self.requests += 1
        self.held += nbytes
        self.peak = max(self.peak, self.held)

    def release(self, nbytes: int) -> None:
        """A pool job holding ``nbytes`` finished."""
        self.requests -= 1
        self.held -= nbytes

    def queued(self, queued: int) -> None:
        """Replies were handed to the transport, which now holds ``queued`` bytes."""
        self.peak = max(self.peak, self.held + queued)

    def should_pause(self, queued: int, draining: bool) -> bool:
        """Whether reading should be paused now."""
        return (
            draining
            or self.write_paused
            or self.requests >= self.max_requests
            or self.held + queued > self.max_bytes
        )
