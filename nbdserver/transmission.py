"""The transmission phase of NBD, sans-IO: request decoding, validation, reply building.

Theory of operation
-------------------
:class:`RequestDecoder` turns a buffer of client bytes into :class:`Command` events.
Each request header is validated (:func:`validate`) the moment it is parsed, *before* its
payload is awaited: a WRITE that fails validation (too long, past the end, read-only
export, bad flags) has its payload skipped as it arrives instead of being buffered, so a
client can never make the server allocate what it merely announced. A valid WRITE's
payload is handed out as a memoryview into the caller's buffer (zero copy).

A bad request magic cannot be resynchronised, so it raises
:class:`~nbdserver.errors.ProtocolError` and the adapter closes that one connection.

Replies are built by small pure functions returning ``bytes``; reads are planned with
:func:`plan_read` from the backend's extents so that zero ranges travel as
NBD_REPLY_TYPE_OFFSET_HOLE chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from nbdserver.backends.base import Extent
from nbdserver.errors import (
    InvalidRequest,
    NBDError,
    NoSpace,
    PermissionDenied,
    ProtocolError,
)
from nbdserver.protocol import (
    ERROR_PAYLOAD,
    MAX_STRING,
    OFFSET_DATA_HEADER,
    OFFSET_HOLE_PAYLOAD,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_HEADER,
    STRUCTURED_REPLY_MAGIC,
    U32,
    Cmd,
    CmdFlag,
    ReplyFlag,
    ReplyType,
    State,
    TransmissionFlag,
)

#: Zero runs shorter than this are sent inside OFFSET_DATA rather than as a hole chunk.
MIN_HOLE_CHUNK: Final = 4096

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
    #: Command -> valid command flags (plain ints: IntFlag arithmetic is slow on the
    #: per-request path), computed once per session.
    allowed: dict[int, int] = field(init=False, repr=False, compare=False)
    read_only: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed", {int(c): int(allowed_flags(c, self)) for c in Cmd})
        object.__setattr__(self, "read_only", bool(self.flags & TransmissionFlag.READ_ONLY))


@dataclass(slots=True)
class Command:
    """One parsed request. ``error`` is set when validation failed (reply with it).

    Treat it as immutable. It is not declared frozen because a frozen dataclass sets
    each field through ``object.__setattr__``: 0.81 µs per command against 0.22 µs,
    a third of the decoder's cost per 4 KiB request.
    """

    type: int
    flags: int
    cookie: int
    offset: int
    length: int
    #: WRITE payload, a view into the decoder's input buffer (valid until it is reused).
    payload: memoryview | None = None
    error: NBDError | None = None


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
        allowed |= CmdFlag.REQ_ONE
    return allowed


_READ: Final = int(Cmd.READ)
_DONE: Final = int(ReplyFlag.DONE)
_OFFSET_DATA: Final = int(ReplyType.OFFSET_DATA)
_WRITE: Final = int(Cmd.WRITE)
_DISC: Final = int(Cmd.DISC)
_FLUSH: Final = int(Cmd.FLUSH)
_WRITE_ZEROES: Final = int(Cmd.WRITE_ZEROES)
_BLOCK_STATUS: Final = int(Cmd.BLOCK_STATUS)
_RESIZE: Final = int(Cmd.RESIZE)
_WRITE_TYPES_INT: Final = frozenset(int(c) for c in _WRITE_TYPES)
_NEEDS_FLAG_INT: Final = {int(c): int(f) for c, f in _NEEDS_FLAG.items()}


def validate(cmd: int, flags: int, offset: int, length: int, session: Session) -> NBDError | None:
    """Check one request against the session; return the error to reply with, if any."""
    allowed = session.allowed.get(cmd)
    if allowed is None:
        # "The server SHOULD return NBD_EINVAL if it receives an unknown command."
        return InvalidRequest(f"unknown command {cmd}")
    if cmd == _RESIZE:
        return InvalidRequest("NBD_CMD_RESIZE is not supported")
    bad = flags & ~allowed
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
    elif cmd == _FLUSH:
        if not session.flags & _NEEDS_FLAG_INT[_FLUSH]:
            return InvalidRequest("NBD_CMD_FLUSH was not advertised for this export")
        # "For a flush request, length and offset are reserved, and MUST be set to
        # all-zero."
        if offset or length:
            return InvalidRequest("NBD_CMD_FLUSH with nonzero offset or length")
        return None
    elif cmd == _DISC:
        return None
    if cmd in (_READ, _WRITE):
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
        if cmd in (_WRITE, _WRITE_ZEROES):
            # "The server SHOULD return NBD_ENOSPC if it receives a write request
            # including one or more sectors beyond the size of the device."
            return NoSpace(f"{name} past the end: {offset}+{length} > {session.size}")
        # "It SHOULD return NBD_EINVAL if it receives a read or trim request including
        # one or more sectors beyond the size of the device"; BLOCK_STATUS likewise.
        return InvalidRequest(f"{name} past the end: {offset}+{length} > {session.size}")
    if cmd == _BLOCK_STATUS:
        if session.meta_context is None:
            # "Servers SHOULD reply to clients doing so anyway with EINVAL."
            return InvalidRequest("NBD_CMD_BLOCK_STATUS without a selected metadata context")
        if length == 0:
            return InvalidRequest("NBD_CMD_BLOCK_STATUS of length 0")
    return None


class RequestDecoder:
    """Incremental request parser for one connection."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._skip = 0
        #: Bytes the next message needs contiguously in the buffer (header, or header
        #: plus a valid WRITE payload); skipped payloads never count.
        self.needed = REQUEST.size
        #: True after NBD_CMD_DISC: "A client MUST NOT send anything to the server after
        #: sending an NBD_CMD_DISC command", so nothing more is decoded.
        self.disconnected = False
        #: Set when the stream broke the protocol (bad magic); nothing more is decoded
        #: and the connection must be dropped once the commands before it are answered.
        self.violation: ProtocolError | None = None

    def decode(self, buf: memoryview, budget: int | None = None) -> tuple[list[Command], int]:
        """Parse the complete requests in ``buf``.

        Args:
            buf: the received bytes not consumed yet.
            budget: stop after the command whose READ/WRITE lengths bring the batch's
                total to ``budget`` bytes or more (None = no limit). At least one
                command is always returned when one is complete, so a caller that
                keeps unanswered bytes below a bound still makes progress.

        Returns:
            The commands and how many bytes of ``buf`` were consumed. A bad request
            magic sets :attr:`violation` (a ProtocolError) and stops decoding: "Either
            side MAY initiate a hard disconnect if it detects a violation by the other
            party of a mandatory condition" (doc/proto.md "Terminating the transmission
            phase").
        """
        commands: list[Command] = []
        pos = 0
        end = len(buf)
        header_size = REQUEST.size
        session = self.session
        size = session.size
        max_block = session.max_block
        # The spec makes block sizes powers of two; any other value takes the slow path.
        align = session.min_block - 1 if not session.min_block & (session.min_block - 1) else -1
        fast_max_cmd = _READ if session.read_only else _WRITE
        cost = 0
        limit = -1 if budget is None else budget
        while not self.disconnected and self.violation is None:
            if 0 <= limit <= cost and commands:
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
                self.violation = ProtocolError(f"bad request magic {magic:#010x}")
                break
            if (
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
            if cmd == _WRITE:
                if error is not None:
                    # Skip the payload as it streams in; never buffer it.
                    pos += header_size
                    self._skip = length
                    commands.append(Command(cmd, flags, cookie, offset, length, None, error))
                    continue
                total = header_size + length
                if end - pos < total:
                    self.needed = total
                    break
                payload = buf[pos + header_size : pos + total]
                pos += total
                cost += length
                commands.append(Command(cmd, flags, cookie, offset, length, payload))
                continue
            pos += header_size
            if cmd == _READ and error is None:
                cost += length
            commands.append(Command(cmd, flags, cookie, offset, length, None, error))
            if cmd == _DISC:
                self.disconnected = True
        return commands, pos


# --- replies -------------------------------------------------------------------------
def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(flags: int, type_: int, cookie: int, length: int) -> bytes:
    return STRUCTURED_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, type_, cookie, length)


def done_chunk(cookie: int) -> bytes:
    """NBD_REPLY_TYPE_NONE: "MUST always be used with the NBD_REPLY_FLAG_DONE bit set"."""
    return chunk_header(ReplyFlag.DONE, ReplyType.NONE, cookie, 0)


def error_chunk(cookie: int, error: int, message: str = "") -> bytes:
    """NBD_REPLY_TYPE_ERROR with a message "suitable for direct display"."""
    text = message.encode("utf-8", "replace")[:MAX_STRING]
    payload = ERROR_PAYLOAD.pack(error, len(text)) + text
    return chunk_header(ReplyFlag.DONE, ReplyType.ERROR, cookie, len(payload)) + payload


def error_reply(session: Session, cookie: int, error: int, message: str = "") -> bytes:
    """The error reply for any command.

    With structured replies the server "MUST NOT use a simple reply for NBD_CMD_READ" and
    "SHOULD prefer sending errors via a structured reply" (doc/proto.md "Structured
    reply chunk message"), so every error is a structured ERROR chunk then.
    """
    if session.structured:
        return error_chunk(cookie, error, message)
    return simple_reply(cookie, error)


def offset_data_header(cookie: int, offset: int, length: int, done: bool) -> bytes:
    """Header of an OFFSET_DATA chunk carrying ``length`` data bytes (data follows)."""
    # One pack with int constants: this runs for every structured read.
    return OFFSET_DATA_HEADER.pack(
        STRUCTURED_REPLY_MAGIC, _DONE if done else 0, _OFFSET_DATA, cookie, 8 + length, offset
    )


def offset_hole_chunk(cookie: int, offset: int, length: int, done: bool) -> bytes:
    flags = ReplyFlag.DONE if done else 0
    payload = OFFSET_HOLE_PAYLOAD.pack(offset, length)
    return chunk_header(flags, ReplyType.OFFSET_HOLE, cookie, len(payload)) + payload


@dataclass(frozen=True, slots=True)
class ReadPiece:
    offset: int
    length: int
    hole: bool


def plan_read(offset: int, length: int, extents: Sequence[Extent]) -> list[ReadPiece]:
    """Split a read into data and zero pieces covering exactly ``[offset, offset+length)``.

    Runs that read as zeroes (NBD_STATE_ZERO) become holes when at least
    :data:`MIN_HOLE_CHUNK` long; everything else, including ranges the extents do not
    cover, is data. Adjacent pieces of the same kind are merged.
    """
    end = offset + length
    runs: list[list[int]] = []  # [start, stop, zero]
    pos = offset
    for extent in extents:
        if extent.offset != pos or extent.length <= 0 or pos >= end:
            break
        stop = min(extent.offset + extent.length, end)
        zero = int(extent.zero)
        if runs and runs[-1][2] == zero:
            runs[-1][1] = stop
        else:
            runs.append([pos, stop, zero])
        pos = stop
    if pos < end:
        runs.append([pos, end, 0])
    pieces: list[ReadPiece] = []
    for start, stop, zero in runs:
        hole = bool(zero) and stop - start >= MIN_HOLE_CHUNK
        if pieces and pieces[-1].hole == hole:
            last = pieces.pop()
            pieces.append(ReadPiece(last.offset, stop - last.offset, hole))
        else:
            pieces.append(ReadPiece(start, stop - start, hole))
    return pieces


_ZERO_BLOCK: Final = bytes(MIN_HOLE_CHUNK)
_ZERO_NEEDLE: Final = bytes(2 * MIN_HOLE_CHUNK)
_ZERO_WORD: Final = bytes(8)


def zero_extents(data: bytes | bytearray, offset: int) -> list[Extent]:
    """Describe ``data`` (read from ``offset``) as extents whose zero flag marks runs of
    all-zero :data:`MIN_HOLE_CHUNK`-aligned blocks; feeds :func:`plan_read`.

    Any zero run of two blocks contains a whole aligned block, so ``bytes.find`` of a
    two-block needle (C speed, linear) locates candidates and ``startswith`` (memcmp)
    extends them block by block. An isolated single zero block may be missed, which
    only costs bandwidth. This beats asking the backend: SEEK_HOLE on shmem walks the
    whole data run after ``offset`` (0.5 ms for a 256 MiB run).
    """
    n = len(data)
    block = MIN_HOLE_CHUNK
    # Fast path: every zero block found below starts, at its aligned start, with eight
    # zero bytes. One word sampled per aligned block (C-level strided copy, ~1 us per
    # MiB) rules out most data before the full scan (44 us per MiB).
    first = (-offset) % block
    words = (n - first) // 8
    if words > 0:
        sample = memoryview(data)[first : first + words * 8].cast("Q")[:: block // 8]
        if _ZERO_WORD not in sample.tobytes():
            return [Extent(offset, n, False, False)]
    extents: list[Extent] = []
    pos = 0  # everything before pos is described
    search = 0
    while True:
        found = data.find(_ZERO_NEEDLE, search)
        if found < 0:
            break
        start = found + (-(offset + found)) % block
        stop = start
        while stop + block <= n and data.startswith(_ZERO_BLOCK, stop):
            stop += block
        if stop == start:  # pragma: no cover - the needle guarantees one block
            search = found + 1
            continue
        if start > pos:
            extents.append(Extent(offset + pos, start - pos, False, False))
        extents.append(Extent(offset + start, stop - start, True, True))
        pos = search = stop
    if pos < n:
        extents.append(Extent(offset + pos, n - pos, False, False))
    return extents


def block_status_descriptors(
    offset: int, length: int, extents: Sequence[Extent], req_one: bool
) -> list[tuple[int, int]]:
    """(length, status) descriptors for base:allocation, merged, never empty.

    With REQ_ONE "each chunk contains exactly one descriptor where the length of the
    descriptor MUST NOT be greater than the length of the request".
    """
    descriptors: list[tuple[int, int]] = []
    pos = offset
    end = offset + length
    for extent in extents:
        if extent.offset != pos or extent.length <= 0:
            break
        stop = min(extent.offset + extent.length, end)
        status = (State.HOLE if extent.hole else 0) | (State.ZERO if extent.zero else 0)
        size = stop - pos
        if descriptors and descriptors[-1][1] == status:
            descriptors[-1] = (descriptors[-1][0] + size, status)
        else:
            descriptors.append((size, int(status)))
        pos = stop
        if pos >= end:
            break
    if not descriptors:
        # "a server MAY always safely report a status of 0 for any block".
        descriptors.append((length, 0))
    if req_one:
        return descriptors[:1]
    return descriptors


def block_status_chunk(
    cookie: int, context_id: int, descriptors: Sequence[tuple[int, int]]
) -> bytes:
    """A final NBD_REPLY_TYPE_BLOCK_STATUS chunk: context id, then (length, status) pairs."""
    body = U32.pack(context_id) + b"".join(
        U32.pack(size) + U32.pack(status) for size, status in descriptors
    )
    return chunk_header(ReplyFlag.DONE, ReplyType.BLOCK_STATUS, cookie, len(body)) + body
