"""The transmission phase of NBD as a sans-IO state machine (server side).

Theory of operation
-------------------
:class:`Transmission` is fed the client's bytes and a byte budget
(:meth:`Transmission.receive`) and answers with events: a :class:`Command` for each valid
request, a :class:`Rejected` for each request that failed validation (answer it with its
error and carry on), and a :class:`~nbdserver.negotiation.Closed` - the same event the
handshake uses - when the client sent NBD_CMD_DISC or broke the protocol. It never
touches a socket, a backend or a clock.

Each request header is validated (:func:`validate`) the moment it is parsed, *before* its
payload is awaited: a WRITE that fails validation (too long, past the end, read-only
export, bad flags) has its payload skipped as it arrives instead of being buffered, so a
client can never make the server allocate what it merely announced. A valid WRITE's
payload is handed out as a memoryview into the caller's buffer (zero copy).

The phases are data (:data:`TRANSITIONS`): OPEN decodes requests; STOPPING (the server
is shutting down) still decodes them, but answers every one except NBD_CMD_DISC with
ESHUTDOWN while the adapter finishes what was in flight, and waits for the client's soft
disconnect; DRAINING (after NBD_CMD_DISC, a protocol violation, or the end of the
shutdown grace period) decodes nothing more while the adapter answers what is in flight;
CLOSED is the end. A (phase, trigger) pair not in the table is a bug and raises. New
phases (TLS) are new rows.

The object also builds every reply of the phase, so the adapter never packs a byte:
acks, errors, block status, and reads - whole (:meth:`Transmission.read_reply`, which
describes zero runs as OFFSET_HOLE chunks and follows the DF and DONE rules), with the
data in one buffer behind a header (:meth:`Transmission.read_prefix`), or as the header
and trailer around a payload the adapter sends itself (:meth:`Transmission.sendfile_frame`,
h11's "data passthrough"). The encoders themselves are :mod:`nbdserver.protocol`'s.

A session that negotiated extended headers gets the subclass in :mod:`nbdserver.extended`
(:func:`nbdserver.extended.open_transmission` picks); read replies are planned by
:mod:`nbdserver.readplan` for both.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from nbdserver.errors import (
    InvalidRequest,
    NBDError,
    NoSpace,
    Overflow,
    PermissionDenied,
    ShuttingDown,
)
from nbdserver.negotiation import Closed, Ready
from nbdserver.protocol import (
    CMD_BLOCK_STATUS,
    CMD_DISC,
    CMD_FLUSH,
    CMD_READ,
    CMD_RESIZE,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    FLAG_DF,
    FLAG_PAYLOAD_LEN,
    FLAG_REQ_ONE,
    REQUEST,
    REQUEST_MAGIC,
    Cmd,
    CmdFlag,
    Extent,
    TransmissionFlag,
    ack_reply,
    block_status_chunk,
    done_chunk,
    error_chunk,
    error_offset_chunk,
    offset_data_header,
    offset_hole_chunk,
    simple_reply,
)
from nbdserver.readplan import block_status_descriptors, content_chunks

#: Structured reads at least this long are scanned for zero blocks (:func:`zero_extents`),
#: which then travel as OFFSET_HOLE chunks; shorter ones go out as one OFFSET_DATA chunk.
HOLE_SCAN_MIN: Final = 64 * 1024

_WRITE_TYPES: Final = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES})
_NEEDS_FLAG: Final = {
    Cmd.FLUSH: TransmissionFlag.SEND_FLUSH,
    Cmd.TRIM: TransmissionFlag.SEND_TRIM,
    Cmd.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES,
}


@dataclass(frozen=True, slots=True)
class Session:
    """What was negotiated for one connection's transmission phase."""

    size: int
    flags: TransmissionFlag
    structured: bool
    meta_context: int | None
    max_block: int = 32 * 1024 * 1024
    min_block: int = 1
    #: NBD_OPT_EXTENDED_HEADERS was negotiated: 32-byte requests, extended replies only.
    extended: bool = False
    #: Command -> valid command flags (plain ints: IntFlag arithmetic is slow on the
    #: per-request path), computed once per session.
    allowed: dict[int, int] = field(init=False, repr=False, compare=False)
    read_only: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed", {int(c): int(allowed_flags(c, self)) for c in Cmd})
        object.__setattr__(self, "read_only", bool(self.flags & TransmissionFlag.READ_ONLY))

    @classmethod
    def from_ready(cls, ready: Ready) -> Session:
        """The session the handshake's :class:`~nbdserver.negotiation.Ready` describes."""
        return cls(
            size=ready.export.size,
            flags=ready.flags,
            structured=ready.structured,
            meta_context=ready.meta_context,
            max_block=ready.export.max_block,
            min_block=ready.export.min_block,
            extended=ready.extended,
        )


# --- events --------------------------------------------------------------------------
@dataclass(slots=True)
class Command:
    """One valid request, ready for the backend.

    Treat it as immutable. It is not declared frozen because a frozen dataclass sets
    each field through ``object.__setattr__``, which costs a third of the decoder's
    time per 4 KiB request (docs/performance.md, "Decoder").
    """

    type: int
    flags: int
    cookie: int
    offset: int
    length: int
    #: WRITE payload, a view into the caller's input buffer (valid until it is reused).
    payload: memoryview | None = None


@dataclass(slots=True)
class Rejected:
    """A request that failed validation: answer it with ``error`` (connection stays)."""

    type: int
    flags: int
    cookie: int
    offset: int
    length: int
    error: NBDError


Event = Command | Rejected | Closed


class Phase(enum.Enum):
    OPEN = enum.auto()
    STOPPING = enum.auto()
    DRAINING = enum.auto()
    CLOSED = enum.auto()


class Trigger(enum.Enum):
    #: The client sent NBD_CMD_DISC.
    DISC = enum.auto()
    #: The client broke a MUST of the phase (bad request magic).
    VIOLATION = enum.auto()
    #: The server is shutting down (new requests get ESHUTDOWN).
    SHUTDOWN = enum.auto()
    #: The shutdown grace period is over: hard disconnect once in-flight requests end.
    DEADLINE = enum.auto()
    #: Every request decoded so far has been answered.
    DRAINED = enum.auto()
    #: The connection went away (or was aborted).
    LOST = enum.auto()


#: The transmission phase as a table: (phase, trigger) -> next phase.
TRANSITIONS: Final[Mapping[tuple[Phase, Trigger], Phase]] = {
    (Phase.OPEN, Trigger.DISC): Phase.DRAINING,
    (Phase.OPEN, Trigger.VIOLATION): Phase.DRAINING,
    (Phase.OPEN, Trigger.SHUTDOWN): Phase.STOPPING,
    (Phase.OPEN, Trigger.DEADLINE): Phase.DRAINING,
    (Phase.OPEN, Trigger.LOST): Phase.CLOSED,
    (Phase.STOPPING, Trigger.DISC): Phase.DRAINING,
    (Phase.STOPPING, Trigger.VIOLATION): Phase.DRAINING,
    (Phase.STOPPING, Trigger.SHUTDOWN): Phase.STOPPING,
    (Phase.STOPPING, Trigger.DEADLINE): Phase.DRAINING,
    (Phase.STOPPING, Trigger.LOST): Phase.CLOSED,
    (Phase.DRAINING, Trigger.SHUTDOWN): Phase.DRAINING,
    (Phase.DRAINING, Trigger.DEADLINE): Phase.DRAINING,
    (Phase.DRAINING, Trigger.DRAINED): Phase.CLOSED,
    (Phase.DRAINING, Trigger.LOST): Phase.CLOSED,
    (Phase.CLOSED, Trigger.SHUTDOWN): Phase.CLOSED,
    (Phase.CLOSED, Trigger.DEADLINE): Phase.CLOSED,
    (Phase.CLOSED, Trigger.DRAINED): Phase.CLOSED,
    (Phase.CLOSED, Trigger.LOST): Phase.CLOSED,
}


def allowed_flags(cmd: int, session: Session) -> CmdFlag:
    """Command flags valid for ``cmd`` in this session (doc/proto.md "Command flags")."""
    allowed = CmdFlag(0)
    # FUA: "valid for all commands, provided NBD_FLAG_SEND_FUA has been negotiated, in
    # which case the server MUST accept all commands with this bit set".
    if session.flags & TransmissionFlag.SEND_FUA:
        allowed |= CmdFlag.FUA
    if cmd == Cmd.READ and session.flags & TransmissionFlag.SEND_DF:
        allowed |= CmdFlag.DF
    elif cmd == Cmd.WRITE_ZEROES:
        allowed |= CmdFlag.NO_HOLE
        if session.flags & TransmissionFlag.SEND_FAST_ZERO:
            allowed |= CmdFlag.FAST_ZERO
    elif cmd == Cmd.BLOCK_STATUS:
        # The payload form (NBD_FLAG_BLOCK_STATUS_PAYLOAD) is not implemented, so
        # PAYLOAD_LEN is not valid here.
        allowed |= CmdFlag.REQ_ONE
    # PAYLOAD_LEN: "only valid if extended headers were negotiated ... the flag MUST be set
    # for NBD_CMD_WRITE ...; for other commands, the flag will trigger an NBD_EINVAL error
    # unless the command documents an optional payload form for the command and the
    # server has implemented that form" (doc/proto.md "Command flags").
    if cmd == Cmd.WRITE and session.extended:
        allowed |= CmdFlag.PAYLOAD_LEN
    return allowed


_WRITE_TYPES_INT: Final = frozenset(int(c) for c in _WRITE_TYPES)
_NEEDS_FLAG_INT: Final = {int(c): int(f) for c, f in _NEEDS_FLAG.items()}


def validate(cmd: int, flags: int, offset: int, length: int, session: Session) -> NBDError | None:
    """Check one request against the session; return the error to reply with, if any."""
    allowed = session.allowed.get(cmd)
    if allowed is None:
        # "The server SHOULD return NBD_EINVAL if it receives an unknown command."
        return InvalidRequest(f"unknown command {cmd}")
    if cmd == CMD_RESIZE:
        return InvalidRequest("NBD_CMD_RESIZE is not supported")
    bad = flags & ~allowed
    if bad & FLAG_PAYLOAD_LEN and session.extended:
        return InvalidRequest(f"{Cmd(cmd).name} takes no payload (NBD_CMD_FLAG_PAYLOAD_LEN)")
    if bad:
        # "SHOULD return NBD_EINVAL if it receives an unknown command flag ... or a
        # request with a flag not explicitly documented as applicable".
        return InvalidRequest(f"flags {bad:#x} are not valid for {Cmd(cmd).name}")
    if cmd in _WRITE_TYPES_INT:
        if session.read_only:
            # "SHOULD return NBD_EPERM if it receives a write or trim request on a
            # read-only export" (doc/proto.md "Error values"), likewise WRITE_ZEROES.
            return PermissionDenied(f"{Cmd(cmd).name} on a read-only export")
        needed = _NEEDS_FLAG_INT.get(cmd)
        if needed is not None and not session.flags & needed:
            return InvalidRequest(f"{Cmd(cmd).name} was not advertised for this export")
    elif cmd == CMD_FLUSH:
        if not session.flags & _NEEDS_FLAG_INT[CMD_FLUSH]:
            return InvalidRequest("NBD_CMD_FLUSH was not advertised for this export")
        # "For a flush request, length and offset are reserved, and MUST be set to
        # all-zero."
        if offset or length:
            return InvalidRequest("NBD_CMD_FLUSH with nonzero offset or length")
        return None
    elif cmd == CMD_DISC:
        return None
    if cmd in (CMD_READ, CMD_WRITE):
        if length > session.max_block and cmd == CMD_READ and session.extended:
            # A 64-bit effect length: "the server is also permitted to reject large read
            # requests up front with NBD_EOVERFLOW, so a client should be prepared to
            # retry with smaller requests" (doc/proto.md NBD_CMD_READ).
            return Overflow(f"read of {length} bytes exceeds the maximum {session.max_block}")
        if length > session.max_block:
            return InvalidRequest(
                f"length {length} exceeds the maximum block size {session.max_block}"
            )
        # "SHOULD return NBD_EINVAL if ... a read or write request is not aligned to
        # advertised minimum block sizes" (doc/proto.md "Error values").
        if session.min_block > 1 and (offset % session.min_block or length % session.min_block):
            return InvalidRequest(
                f"{offset}+{length} is not aligned to the minimum block size {session.min_block}"
            )
    if offset + length > session.size:
        name = Cmd(cmd).name
        if cmd in (CMD_WRITE, CMD_WRITE_ZEROES):
            # "The server SHOULD return NBD_ENOSPC if it receives a write request
            # including one or more sectors beyond the size of the device."
            return NoSpace(f"{name} past the end: {offset}+{length} > {session.size}")
        # "It SHOULD return NBD_EINVAL if it receives a read or trim request including
        # one or more sectors beyond the size of the device"; BLOCK_STATUS likewise.
        return InvalidRequest(f"{name} past the end: {offset}+{length} > {session.size}")
    if cmd == CMD_BLOCK_STATUS:
        if session.meta_context is None:
            # "Servers SHOULD reply to clients doing so anyway with EINVAL."
            return InvalidRequest("NBD_CMD_BLOCK_STATUS without a selected metadata context")
        if length == 0:
            return InvalidRequest("NBD_CMD_BLOCK_STATUS of length 0")
    return None


_OPEN: Final = Phase.OPEN


class Transmission:
    """Server side of the transmission phase for one connection: requests in, replies out."""

    #: Whether this class speaks extended headers (nbdserver.extended's does).
    EXTENDED: bool = False

    def __init__(self, session: Session) -> None:
        if session.extended and not self.EXTENDED:
            raise ValueError(
                "a session with extended headers needs ExtendedTransmission (nbdserver.extended)"
            )
        self.session = session
        self.phase = Phase.OPEN
        #: Why the phase left OPEN (None while it is open).
        self.closed: Closed | None = None
        self._skip = 0
        #: Bytes the next message needs contiguously in the buffer (header, or header
        #: plus a valid WRITE payload); skipped payloads never count.
        self.needed = REQUEST.size

    # --- state -----------------------------------------------------------------------
    def _go(self, trigger: Trigger) -> None:
        try:
            self.phase = TRANSITIONS[(self.phase, trigger)]
        except KeyError:
            raise RuntimeError(f"no transition from {self.phase.name} on {trigger.name}") from None

    def _close(self, trigger: Trigger, reason: str, violation: bool) -> Closed:
        self._go(trigger)
        event = Closed(reason, violation)
        if self.closed is None:
            self.closed = event
        return event

    def shutdown(self) -> None:
        """The server is stopping: OPEN becomes STOPPING, where every new request but
        NBD_CMD_DISC is answered with ESHUTDOWN.

        "On a server shutdown, the server SHOULD wait for inflight requests to be
        serviced prior to initiating a hard disconnect. ... The error value issued in
        respect of these requests and any subsequently received requests SHOULD be
        ESHUTDOWN. If the client receives an ESHUTDOWN error it MUST initiate a soft
        disconnect." (doc/proto.md "Terminating the transmission phase").
        """
        self._go(Trigger.SHUTDOWN)

    def deadline(self) -> None:
        """The shutdown grace period is over: decode nothing more, answer what is in
        flight, then the adapter hangs up (a hard disconnect)."""
        self._close(Trigger.DEADLINE, "shutdown grace period over", violation=False)

    def drained(self) -> None:
        """Every decoded request has been answered; DRAINING becomes CLOSED."""
        if self.phase is Phase.DRAINING:
            self._go(Trigger.DRAINED)

    def lost(self) -> None:
        """The connection is gone, whatever the phase."""
        self._go(Trigger.LOST)

    # --- input -----------------------------------------------------------------------
    def receive(self, buf: memoryview, budget: int | None = None) -> tuple[list[Event], int]:
        """Parse the complete requests in ``buf``.

        Args:
            buf: the received bytes not consumed yet.
            budget: stop after the command whose READ/WRITE lengths bring the batch's
                total to ``budget`` bytes or more (None = no limit). At least one
                command is always returned when one is complete, so a caller that
                keeps unanswered bytes below a bound still makes progress.

        Returns:
            The events and how many bytes of ``buf`` were consumed. NBD_CMD_DISC ends
            the list with a :class:`Closed` ("A client MUST NOT send anything to the
            server after sending an NBD_CMD_DISC command"); so does a bad request
            magic, with ``violation`` set: "Either side MAY initiate a hard disconnect
            if it detects a violation by the other party of a mandatory condition"
            (doc/proto.md "Terminating the transmission phase"). Either moves the
            phase to DRAINING, after which nothing more is decoded.
        """
        events: list[Event] = []
        stopping = self.phase is Phase.STOPPING
        if self.phase is not _OPEN and not stopping:
            return events, 0
        pos = 0
        end = len(buf)
        header_size = REQUEST.size
        session = self.session
        size = session.size
        max_block = session.max_block
        # The spec makes block sizes powers of two; any other value takes the slow path.
        align = session.min_block - 1 if not session.min_block & (session.min_block - 1) else -1
        fast_max_cmd = CMD_READ if session.read_only else CMD_WRITE
        cost = 0
        limit = -1 if budget is None else budget
        while True:
            if 0 <= limit <= cost and events:
                self.needed = header_size
                break
            if self._skip:
                take = min(self._skip, end - pos)
                pos += take
                self._skip -= take
                if self._skip:
                    # Skipped bytes are never buffered: ask only for a header's worth
                    # of space, or the adapter would grow its buffer to the skip size.
                    self.needed = header_size
                    break
            if end - pos < header_size:
                self.needed = header_size
                break
            magic, flags, cmd, cookie, offset, length = REQUEST.unpack_from(buf, pos)
            if magic != REQUEST_MAGIC:
                reason = f"bad request magic {magic:#010x}"
                events.append(self._close(Trigger.VIOLATION, reason, violation=True))
                break
            if stopping and cmd != CMD_DISC:
                # "... and any subsequently received requests SHOULD be ESHUTDOWN".
                error: NBDError | None = ShuttingDown("server shutting down: send NBD_CMD_DISC")
            elif (
                not flags
                and cmd <= fast_max_cmd
                and offset + length <= size
                and length <= max_block
                and not (offset | length) & align
            ):
                # The common case, a flagless in-range READ (or WRITE on a writable
                # export), needs none of validate()'s other checks.
                error = None
            else:
                error = validate(cmd, flags, offset, length, session)
            if error is not None:
                pos += header_size
                if cmd == CMD_WRITE:
                    # Skip the payload as it streams in; never buffer it.
                    self._skip = length
                events.append(Rejected(cmd, flags, cookie, offset, length, error))
                if cmd == CMD_DISC:  # even with bad flags, the client means to leave
                    events.append(
                        self._close(Trigger.DISC, "client sent NBD_CMD_DISC", violation=False)
                    )
                    break
                continue
            if cmd == CMD_WRITE:
                total = header_size + length
                if end - pos < total:
                    self.needed = total
                    break
                payload = buf[pos + header_size : pos + total]
                pos += total
                cost += length
                events.append(Command(cmd, flags, cookie, offset, length, payload))
                continue
            pos += header_size
            if cmd == CMD_READ:
                cost += length
            events.append(Command(cmd, flags, cookie, offset, length))
            if cmd == CMD_DISC:
                events.append(
                    self._close(Trigger.DISC, "client sent NBD_CMD_DISC", violation=False)
                )
                break
        return events, pos

    # --- output ----------------------------------------------------------------------
    #: ``ack(cookie)``: success for any command without data, a simple reply even with
    #: structured replies (the spec allows it for every command but READ).
    ack = staticmethod(ack_reply)

    def ack_command(self, c: Command) -> bytes:
        """Success for ``c`` (a command without data); :attr:`ack` is its per-request
        shortcut for compact sessions, which need only the cookie."""
        return ack_reply(c.cookie)

    def error_reply(self, cookie: int, error: int, message: str = "", offset: int = 0) -> bytes:
        """The error reply for any command (``offset``: the request's, which only
        extended replies carry).

        With structured replies the server "MUST NOT use a simple reply for NBD_CMD_READ"
        and "SHOULD prefer sending errors via a structured reply" (doc/proto.md
        "Structured reply chunk message"), so every error is a structured ERROR chunk then.
        """
        if self.session.structured:
            return error_chunk(cookie, error, message)
        return simple_reply(cookie, error)

    def read_prefix(self, c: Command) -> bytes | None:
        """The bytes that precede a read's data when the reply is that header and then
        the data unchanged, so the adapter can read straight in behind it; None when the
        framing depends on the data (a hole scan) or there is no data chunk.

        The data is complete before anything is sent, so the one content chunk carries
        NBD_REPLY_FLAG_DONE ("MUST NOT do so for a content chunk if it would still be
        possible to detect an error while transmitting the chunk").
        """
        if not self.session.structured:
            return simple_reply(c.cookie)
        length = c.length
        if length and (length < HOLE_SCAN_MIN or c.flags & FLAG_DF):
            return offset_data_header(c.cookie, c.offset, length, True)
        return None

    def read_reply(
        self, c: Command, data: bytes | bytearray | memoryview
    ) -> list[bytes | bytearray | memoryview]:
        """The whole reply to a read of ``data`` (all of it already read), as buffers
        for one vectored write. Zero runs become OFFSET_HOLE chunks unless DF is set."""
        cookie, offset, length = c.cookie, c.offset, c.length
        if not self.session.structured:
            return [simple_reply(cookie), data]
        if length == 0:
            return [done_chunk(cookie)]
        # DF: "the server MUST send at most one content chunk ... If the area being read
        # contains both data and a hole, the server MUST use NBD_REPLY_TYPE_OFFSET_DATA
        # with the zeroes explicitly present."
        if length < HOLE_SCAN_MIN or c.flags & FLAG_DF or not isinstance(data, (bytes, bytearray)):
            return [offset_data_header(cookie, offset, length, True), data]
        return content_chunks(
            offset, length, data, offset_hole_chunk, offset_data_header, lead=(cookie,)
        )

    def sendfile_frame(self, c: Command) -> tuple[bytes, bytes]:
        """Header and trailer around a read's data that the adapter sends itself.

        With structured replies the data goes in an OFFSET_DATA chunk *without* DONE and
        a NONE chunk ends the reply: the data is read while it is sent, so an error can
        still strike after the header left (see :meth:`read_prefix` for the rule).
        """
        if self.session.structured:
            return offset_data_header(c.cookie, c.offset, c.length, False), done_chunk(c.cookie)
        return simple_reply(c.cookie), b""

    def sendfile_failed(
        self, c: Command, sent: int, errno: int, message: str
    ) -> list[bytes] | None:
        """What ends a structured sendfile reply whose data failed after ``sent`` bytes:
        zero padding for the rest of the OFFSET_DATA chunk, then an ERROR_OFFSET chunk
        with DONE at the first byte not sent. "If an error is detected, the server MUST
        still complete the transmission of any current chunk (it MUST use padding bytes
        which SHOULD be zero ...). The server MUST include an error chunk" (doc/proto.md
        NBD_CMD_READ, "Structured replies"). None with simple replies: "the server MUST
        immediately initiate a hard disconnect" once a zero-error header left.
        """
        if not self.session.structured:
            return None
        at = c.offset + sent
        return [bytes(c.length - sent), error_offset_chunk(c.cookie, errno, at, message)]

    def block_status_reply(self, c: Command, extents: Sequence[Extent]) -> bytes:
        """The base:allocation reply to NBD_CMD_BLOCK_STATUS from the backend's extents."""
        context = self.session.meta_context
        assert context is not None  # validate() rejects BLOCK_STATUS without a context
        descriptors = block_status_descriptors(
            c.offset, c.length, extents, bool(c.flags & FLAG_REQ_ONE)
        )
        return block_status_chunk(c.cookie, context, descriptors)
