"""The transmission phase with extended headers (NBD_OPT_EXTENDED_HEADERS), sans-IO.

Extended headers change both directions, so a session that negotiated them gets
:class:`ExtendedTransmission` (:func:`open_transmission` picks): its decoder reads 32-byte
requests with a 64-bit length that is a payload length when NBD_CMD_FLAG_PAYLOAD_LEN is
set and an effect length otherwise, and every reply is an extended chunk carrying the
request's offset. It shares the compact :class:`~nbdserver.transmission.Transmission`'s
phases, validation and read planning; the compact decoder and framing stay as they are,
so sessions without extended headers pay nothing for these.
"""

from __future__ import annotations

from collections.abc import Sequence

from nbdserver.errors import (
    NBDError,
    ShuttingDown,
)
from nbdserver.protocol import (
    CMD_DISC,
    CMD_READ,
    CMD_WRITE,
    EXTENDED_REQUEST,
    EXTENDED_REQUEST_MAGIC,
    FLAG_DF,
    FLAG_PAYLOAD_LEN,
    FLAG_REQ_ONE,
    REQUEST_MAGIC,
    Extent,
    block_status_ext_chunk,
    ext_done_chunk,
    ext_error_chunk,
    ext_error_offset_chunk,
    ext_offset_data_header,
    ext_offset_hole_chunk,
)
from nbdserver.readplan import block_status_descriptors, content_chunks
from nbdserver.transmission import (
    _OPEN,
    HOLE_SCAN_MIN,
    Command,
    Event,
    Phase,
    Rejected,
    Session,
    Transmission,
    Trigger,
    validate,
)


class ExtendedTransmission(Transmission):
    """The transmission phase of a session that negotiated extended headers.

    Requests: "the client MUST use the 32-byte extended request header, with proper use of
    NBD_CMD_FLAG_PAYLOAD_LEN for all commands sending a payload; and the server MUST use
    the 32-byte extended reply header" (doc/proto.md NBD_OPT_EXTENDED_HEADERS). Replies:
    "all server replies MUST use an extended reply; the server MUST NOT use simple replies
    even when there is no payload" (doc/proto.md "Extended reply chunk message").
    """

    EXTENDED = True

    def __init__(self, session: Session) -> None:
        if not session.extended:
            raise ValueError("ExtendedTransmission needs a session with extended headers")
        super().__init__(session)
        self.needed = EXTENDED_REQUEST.size

    def receive(self, buf: memoryview, budget: int | None = None) -> tuple[list[Event], int]:
        """Parse the complete extended requests in ``buf``; see :meth:`Transmission.receive`.

        The 64-bit *length* is a payload length with NBD_CMD_FLAG_PAYLOAD_LEN, else an
        effect length (TRIM, WRITE_ZEROES, CACHE and BLOCK_STATUS may pass 4 GiB; READ is
        bounded by the maximum block size, see :func:`validate`). A request that fails
        validation has its payload, if it announced one, skipped as it arrives: "a server
        SHOULD gracefully consume *length* bytes of payload (even if it then replies with
        an NBD_EINVAL failure because the particular command was not expecting a
        payload), and proceed with the next client command" (doc/proto.md "Request
        message").
        """
        events: list[Event] = []
        stopping = self.phase is Phase.STOPPING
        if self.phase is not _OPEN and not stopping:
            return events, 0
        pos = 0
        end = len(buf)
        header_size = EXTENDED_REQUEST.size
        session = self.session
        max_block = session.max_block
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
                    self.needed = header_size
                    break
            if end - pos < header_size:
                self.needed = header_size
                break
            magic, flags, cmd, cookie, offset, length = EXTENDED_REQUEST.unpack_from(buf, pos)
            if magic != EXTENDED_REQUEST_MAGIC:
                # A compact request is a violation too: after the ACK "the client MUST use
                # the 32-byte extended request header" (doc/proto.md NBD_OPT_EXTENDED_HEADERS).
                what = "compact request" if magic == REQUEST_MAGIC else "bad request magic"
                reason = f"{what} {magic:#010x} where an extended request was due"
                events.append(self._close(Trigger.VIOLATION, reason, violation=True))
                break
            # "The command NBD_CMD_WRITE MUST use the flag NBD_CMD_FLAG_PAYLOAD_LEN in this
            # mode" (doc/proto.md "Request message"), but qemu's client (up to 10.0 at
            # least) leaves it clear and sends the data anyway, and qemu's own server
            # reads it: a WRITE always carries *length* bytes, flag or not.
            payload = length if flags & FLAG_PAYLOAD_LEN or cmd == CMD_WRITE else 0
            if payload > max_block:
                # "A server SHOULD initiate hard disconnect if a client sets the
                # NBD_CMD_FLAG_PAYLOAD_LEN flag and uses a length larger than a server's
                # advertised or default maximum payload length" (doc/proto.md "Request
                # message").
                reason = f"payload of {payload} bytes exceeds the maximum {max_block}"
                events.append(self._close(Trigger.VIOLATION, reason, violation=True))
                break
            if stopping and cmd != CMD_DISC:
                error: NBDError | None = ShuttingDown("server shutting down: send NBD_CMD_DISC")
            else:
                error = validate(cmd, flags, offset, length, session)
            if error is not None:
                pos += header_size
                self._skip = payload
                events.append(Rejected(cmd, flags, cookie, offset, length, error))
                if cmd == CMD_DISC:
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
                data = buf[pos + header_size : pos + total]
                pos += total
                cost += length
                events.append(Command(cmd, flags, cookie, offset, length, data))
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

    # --- output: every reply an extended chunk with the request's offset ---------------
    def ack_command(self, c: Command) -> bytes:
        """NBD_REPLY_TYPE_NONE with DONE: "MUST always be used with the
        NBD_REPLY_FLAG_DONE bit set" (doc/proto.md "Structured reply types")."""
        return ext_done_chunk(c.cookie, c.offset)

    def error_reply(self, cookie: int, error: int, message: str = "", offset: int = 0) -> bytes:
        """An extended NBD_REPLY_TYPE_ERROR chunk, whatever the command."""
        return ext_error_chunk(cookie, offset, error, message)

    def read_prefix(self, c: Command) -> bytes | None:
        length = c.length
        if length and (length < HOLE_SCAN_MIN or c.flags & FLAG_DF):
            return ext_offset_data_header(c.cookie, c.offset, c.offset, length, True)
        return None

    def read_reply(
        self, c: Command, data: bytes | bytearray | memoryview
    ) -> list[bytes | bytearray | memoryview]:
        cookie, offset, length = c.cookie, c.offset, c.length
        if length == 0:
            return [ext_done_chunk(cookie, offset)]
        if length < HOLE_SCAN_MIN or c.flags & FLAG_DF or not isinstance(data, (bytes, bytearray)):
            return [ext_offset_data_header(cookie, offset, offset, length, True), data]
        return content_chunks(
            offset,
            length,
            data,
            ext_offset_hole_chunk,
            ext_offset_data_header,
            lead=(cookie, offset),
        )

    def sendfile_frame(self, c: Command) -> tuple[bytes, bytes]:
        """An OFFSET_DATA header without DONE and a NONE chunk to end the reply, as with
        structured replies (:meth:`Transmission.sendfile_frame`), in extended framing."""
        header = ext_offset_data_header(c.cookie, c.offset, c.offset, c.length, False)
        return header, ext_done_chunk(c.cookie, c.offset)

    def sendfile_failed(
        self, c: Command, sent: int, errno: int, message: str
    ) -> list[bytes] | None:
        """Zero padding for the rest of the chunk, then an extended ERROR_OFFSET chunk at
        the first byte not sent (the rule quoted in :meth:`Transmission.sendfile_failed`)."""
        at = c.offset + sent
        tail = ext_error_offset_chunk(c.cookie, c.offset, errno, at, message)
        return [bytes(c.length - sent), tail]

    def block_status_reply(self, c: Command, extents: Sequence[Extent]) -> bytes:
        """NBD_REPLY_TYPE_BLOCK_STATUS_EXT: "only NBD_REPLY_TYPE_BLOCK_STATUS_EXT for
        extended headers" (doc/proto.md NBD_CMD_BLOCK_STATUS), with 64-bit extent lengths,
        so one descriptor may describe more than 4 GiB. "For metadata contexts that only
        return a 32-bit status (including all contexts in the "base:" namespace), the
        most-significant 32 bits of status MUST be all zeroes": base:allocation's are."""
        context = self.session.meta_context
        assert context is not None  # validate() rejects BLOCK_STATUS without a context
        descriptors = block_status_descriptors(
            c.offset, c.length, extents, bool(c.flags & FLAG_REQ_ONE)
        )
        return block_status_ext_chunk(c.cookie, c.offset, context, descriptors)


def open_transmission(session: Session) -> Transmission:
    """The transmission phase for ``session``: extended or compact headers."""
    return ExtendedTransmission(session) if session.extended else Transmission(session)
