"""The NBD wire format: constants, messages and their packing.

Everything here is pure: no sockets, no event loop. Every wire constant and struct
layout is defined here and only here, and every message has one encoder here, used by
the server (through :mod:`nbdserver.negotiation` and :mod:`nbdserver.transmission`) and
by the tests' client alike. Names follow doc/proto.md of
NetworkBlockDevice/nbd; an enum member ``Opt.GO`` is the spec's ``NBD_OPT_GO``,
``Cmd.READ`` is ``NBD_CMD_READ`` and so on (the class name stands for the prefix).
All integers travel big-endian ("network byte order", doc/proto.md "Conventions").
"""

from __future__ import annotations

import enum
import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

# --- magics (doc/proto.md "Handshake" and "Transmission") ---------------------------
NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC", INIT_PASSWD
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT", newstyle magic and option magic
OPTION_REPLY_MAGIC: Final = 0x3E889045565A9
REQUEST_MAGIC: Final = 0x25609513  # NBD_REQUEST_MAGIC
SIMPLE_REPLY_MAGIC: Final = 0x67446698  # NBD_SIMPLE_REPLY_MAGIC
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF  # NBD_STRUCTURED_REPLY_MAGIC
# doc/proto.md "Request message" and "Extended reply chunk message" (extension-ext-header).
EXTENDED_REQUEST_MAGIC: Final = 0x21E41C71  # NBD_EXTENDED_REQUEST_MAGIC
EXTENDED_REPLY_MAGIC: Final = 0x6E8A278C  # NBD_EXTENDED_REPLY_MAGIC

#: "SHOULD be no longer than 256 bytes and MUST be no longer than 4096 bytes"
#: (doc/proto.md "Conventions", strings such as export names and messages).
MAX_STRING: Final = 4096


class HandshakeFlag(enum.IntFlag):
    """16-bit handshake flags sent by the server (NBD_FLAG_*)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """32-bit client flags (NBD_FLAG_C_*)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    """16-bit transmission flags (NBD_FLAG_*)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STAT_PAYLOAD = 1 << 12


class Opt(enum.IntEnum):
    """Option types (NBD_OPT_*)."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_FLAG_ERROR: Final = 1 << 31


class Rep(enum.IntEnum):
    """Option reply types (NBD_REP_*); errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_FLAG_ERROR | 1
    ERR_POLICY = _REP_FLAG_ERROR | 2
    ERR_INVALID = _REP_FLAG_ERROR | 3
    ERR_PLATFORM = _REP_FLAG_ERROR | 4
    ERR_TLS_REQD = _REP_FLAG_ERROR | 5
    ERR_UNKNOWN = _REP_FLAG_ERROR | 6
    ERR_SHUTDOWN = _REP_FLAG_ERROR | 7
    ERR_BLOCK_SIZE_REQD = _REP_FLAG_ERROR | 8
    ERR_TOO_BIG = _REP_FLAG_ERROR | 9
    ERR_EXT_HEADER_REQD = _REP_FLAG_ERROR | 10

    @property
    def is_error(self) -> bool:
        return bool(self.value & _REP_FLAG_ERROR)


class Info(enum.IntEnum):
    """Information types in NBD_REP_INFO (NBD_INFO_*)."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    """Request types (NBD_CMD_*)."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(enum.IntFlag):
    """Command flags (NBD_CMD_FLAG_*)."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


# Plain-int copies for the per-request paths, where comparing with an enum member costs
# more (docs/performance.md, "Decoder").
CMD_READ: Final = int(Cmd.READ)
CMD_WRITE: Final = int(Cmd.WRITE)
CMD_DISC: Final = int(Cmd.DISC)
CMD_FLUSH: Final = int(Cmd.FLUSH)
CMD_TRIM: Final = int(Cmd.TRIM)
CMD_CACHE: Final = int(Cmd.CACHE)
CMD_WRITE_ZEROES: Final = int(Cmd.WRITE_ZEROES)
CMD_BLOCK_STATUS: Final = int(Cmd.BLOCK_STATUS)
CMD_RESIZE: Final = int(Cmd.RESIZE)
FLAG_FUA: Final = int(CmdFlag.FUA)
FLAG_NO_HOLE: Final = int(CmdFlag.NO_HOLE)
FLAG_DF: Final = int(CmdFlag.DF)
FLAG_REQ_ONE: Final = int(CmdFlag.REQ_ONE)
FLAG_FAST_ZERO: Final = int(CmdFlag.FAST_ZERO)
FLAG_PAYLOAD_LEN: Final = int(CmdFlag.PAYLOAD_LEN)


class ReplyFlag(enum.IntFlag):
    """Structured reply flags (NBD_REPLY_FLAG_*)."""

    DONE = 1 << 0


class ReplyType(enum.IntEnum):
    """Structured reply chunk types (NBD_REPLY_TYPE_*)."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = (1 << 15) | 1
    ERROR_OFFSET = (1 << 15) | 2


class State(enum.IntFlag):
    """base:allocation status flags (NBD_STATE_*)."""

    HOLE = 1 << 0
    ZERO = 1 << 1


BASE_ALLOCATION: Final = "base:allocation"

# --- struct layouts ----------------------------------------------------------------
GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+124 zeroes)
INFO_EXPORT = struct.Struct(">HQH")
INFO_BLOCK_SIZE = struct.Struct(">HIII")
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
OFFSET_DATA_HEADER = struct.Struct(">IHHQIQ")  # STRUCTURED_HEADER + the data's offset
OFFSET_HOLE_PAYLOAD = struct.Struct(">QI")
ERROR_PAYLOAD = struct.Struct(">IH")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
U16 = struct.Struct(">H")
BLOCK_DESCRIPTOR = struct.Struct(">II")  # extent length, status flags
# Extended headers: every request and reply header is 32 bytes.
EXTENDED_REQUEST = struct.Struct(">IHHQQQ")  # magic, flags, type, cookie, offset, length
EXTENDED_HEADER = struct.Struct(">IHHQQQ")  # magic, flags, type, cookie, offset, length
EXTENDED_DATA_HEADER = struct.Struct(">IHHQQQQ")  # EXTENDED_HEADER + the data's offset
BLOCK_STATUS_EXT_HEAD = struct.Struct(">II")  # context id, descriptor count
BLOCK_DESCRIPTOR_EXT = struct.Struct(">QQ")  # extent length, status flags (64 bits each)

EXPORT_NAME_ZEROES: Final = bytes(124)


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of the export with uniform allocation state (base:allocation).

    It lives with the wire format because it is what NBD_REPLY_TYPE_BLOCK_STATUS and the
    hole chunks of a read describe; backends produce it (and re-export it from
    :mod:`nbdserver.backends.base`).
    """

    offset: int
    length: int
    hole: bool  # NBD_STATE_HOLE: not allocated
    zero: bool  # NBD_STATE_ZERO: reads as zeroes


# --- reply encoders (the only ones: the server and the tests' client both use them) ---
_DONE: Final = int(ReplyFlag.DONE)
_OFFSET_DATA: Final = int(ReplyType.OFFSET_DATA)
_pack_simple: Final = SIMPLE_REPLY.pack
_pack_chunk_header: Final = STRUCTURED_HEADER.pack
_pack_data_header: Final = OFFSET_DATA_HEADER.pack


def simple_reply(cookie: int, error: int = 0) -> bytes:
    """A simple reply (16 bytes); a read's data follows it unframed."""
    return _pack_simple(SIMPLE_REPLY_MAGIC, error, cookie)


#: ``ack_reply(cookie)`` is ``simple_reply(cookie)`` (error 0) without a Python frame: it
#: answers every write and flush.
ack_reply: Final = functools.partial(_pack_simple, SIMPLE_REPLY_MAGIC, 0)


def chunk_header(flags: int, type_: int, cookie: int, length: int) -> bytes:
    """The 20-byte header of a structured reply chunk with a ``length``-byte payload."""
    return _pack_chunk_header(STRUCTURED_REPLY_MAGIC, flags, type_, cookie, length)


def done_chunk(cookie: int) -> bytes:
    """NBD_REPLY_TYPE_NONE: "MUST always be used with the NBD_REPLY_FLAG_DONE bit set"."""
    return chunk_header(_DONE, ReplyType.NONE, cookie, 0)


def offset_data_header(cookie: int, offset: int, length: int, done: bool) -> bytes:
    """Header of an OFFSET_DATA chunk carrying ``length`` data bytes (data follows)."""
    # One pack with int constants: this runs for every structured read.
    return _pack_data_header(
        STRUCTURED_REPLY_MAGIC, _DONE if done else 0, _OFFSET_DATA, cookie, 8 + length, offset
    )


def _hole_payload(offset: int, length: int) -> bytes:
    # "hole size (unsigned, MUST be nonzero)" is 32 bits in both header styles: reads are
    # bounded by the maximum payload, itself "capped at 32 bits" (doc/proto.md
    # NBD_REPLY_TYPE_OFFSET_HOLE).
    return OFFSET_HOLE_PAYLOAD.pack(offset, length)


def _error_payload(error: int, message: str) -> bytes:
    text = message.encode("utf-8", "replace")[:MAX_STRING]
    return ERROR_PAYLOAD.pack(error, len(text)) + text


def _block_status_payload(context_id: int, descriptors: Sequence[tuple[int, int]]) -> bytes:
    return U32.pack(context_id) + b"".join(
        BLOCK_DESCRIPTOR.pack(size, status) for size, status in descriptors
    )


def _block_status_ext_payload(context_id: int, descriptors: Sequence[tuple[int, int]]) -> bytes:
    # "The descriptor count field MUST correspond to the number of subsequent
    # descriptors" (doc/proto.md NBD_REPLY_TYPE_BLOCK_STATUS_EXT).
    return BLOCK_STATUS_EXT_HEAD.pack(context_id, len(descriptors)) + b"".join(
        BLOCK_DESCRIPTOR_EXT.pack(size, status) for size, status in descriptors
    )


def offset_hole_chunk(cookie: int, offset: int, length: int, done: bool) -> bytes:
    """An OFFSET_HOLE chunk: ``length`` bytes at ``offset`` read as zeroes."""
    payload = _hole_payload(offset, length)
    return chunk_header(_DONE if done else 0, ReplyType.OFFSET_HOLE, cookie, len(payload)) + payload


def error_chunk(cookie: int, error: int, message: str = "") -> bytes:
    """NBD_REPLY_TYPE_ERROR with a message "suitable for direct display"."""
    payload = _error_payload(error, message)
    return chunk_header(_DONE, ReplyType.ERROR, cookie, len(payload)) + payload


def error_offset_chunk(cookie: int, error: int, offset: int, message: str = "") -> bytes:
    """NBD_REPLY_TYPE_ERROR_OFFSET (with DONE): "an error occurred at a given offset",
    which lets the client keep the data before it (doc/proto.md "Structured reply types")."""
    payload = _error_payload(error, message) + U64.pack(offset)
    return chunk_header(_DONE, ReplyType.ERROR_OFFSET, cookie, len(payload)) + payload


def block_status_chunk(
    cookie: int, context_id: int, descriptors: Sequence[tuple[int, int]]
) -> bytes:
    """A final NBD_REPLY_TYPE_BLOCK_STATUS chunk: context id, then (length, status) pairs."""
    body = _block_status_payload(context_id, descriptors)
    return chunk_header(_DONE, ReplyType.BLOCK_STATUS, cookie, len(body)) + body


# --- extended reply encoders (NBD_OPT_EXTENDED_HEADERS) ------------------------------
# Every extended chunk carries the request's offset: "The extended reply has an additional
# field offset which MUST match the offset of the client's request (even in reply types
# such as NBD_REPLY_TYPE_OFFSET_DATA where the payload itself contains a different offset
# representing the middle of the buffer)" (doc/proto.md "Extended reply chunk message").
_pack_ext_header: Final = EXTENDED_HEADER.pack
_pack_ext_data_header: Final = EXTENDED_DATA_HEADER.pack


def ext_chunk_header(flags: int, type_: int, cookie: int, offset: int, length: int) -> bytes:
    """The 32-byte header of an extended reply chunk with a ``length``-byte payload,
    answering the request at ``offset``."""
    return _pack_ext_header(EXTENDED_REPLY_MAGIC, flags, type_, cookie, offset, length)


def ext_done_chunk(cookie: int, offset: int) -> bytes:
    """NBD_REPLY_TYPE_NONE with DONE: the extended success reply of any command ("the
    server MUST NOT use simple replies even when there is no payload")."""
    return _pack_ext_header(EXTENDED_REPLY_MAGIC, _DONE, 0, cookie, offset, 0)


def ext_offset_data_header(
    cookie: int, request_offset: int, offset: int, length: int, done: bool
) -> bytes:
    """Header of an extended OFFSET_DATA chunk carrying ``length`` data bytes from
    ``offset`` (data follows)."""
    return _pack_ext_data_header(
        EXTENDED_REPLY_MAGIC,
        _DONE if done else 0,
        _OFFSET_DATA,
        cookie,
        request_offset,
        8 + length,
        offset,
    )


def ext_offset_hole_chunk(
    cookie: int, request_offset: int, offset: int, length: int, done: bool
) -> bytes:
    """An extended OFFSET_HOLE chunk: ``length`` bytes at ``offset`` read as zeroes."""
    payload = _hole_payload(offset, length)
    flags = _DONE if done else 0
    return ext_chunk_header(flags, ReplyType.OFFSET_HOLE, cookie, request_offset, 12) + payload


def ext_error_chunk(cookie: int, request_offset: int, error: int, message: str = "") -> bytes:
    """An extended NBD_REPLY_TYPE_ERROR chunk with DONE."""
    payload = _error_payload(error, message)
    return ext_chunk_header(_DONE, ReplyType.ERROR, cookie, request_offset, len(payload)) + payload


def ext_error_offset_chunk(
    cookie: int, request_offset: int, error: int, offset: int, message: str = ""
) -> bytes:
    """An extended NBD_REPLY_TYPE_ERROR_OFFSET chunk with DONE (see
    :func:`error_offset_chunk`)."""
    payload = _error_payload(error, message) + U64.pack(offset)
    header = ext_chunk_header(_DONE, ReplyType.ERROR_OFFSET, cookie, request_offset, len(payload))
    return header + payload


def block_status_ext_chunk(
    cookie: int, request_offset: int, context_id: int, descriptors: Sequence[tuple[int, int]]
) -> bytes:
    """A final NBD_REPLY_TYPE_BLOCK_STATUS_EXT chunk: context id, descriptor count, then
    64-bit (length, status) pairs. "*length* MUST be 8 + (a positive multiple of 16)"."""
    body = _block_status_ext_payload(context_id, descriptors)
    header = ext_chunk_header(_DONE, ReplyType.BLOCK_STATUS_EXT, cookie, request_offset, len(body))
    return header + body


# --- messages ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class OptionRequest:
    """C: IHAVEOPT, option, length, data."""

    option: int
    data: bytes

    def pack(self) -> bytes:
        return OPTION_HEADER.pack(IHAVEOPT, self.option, len(self.data)) + self.data


@dataclass(frozen=True, slots=True)
class OptionReply:
    """S: reply magic, option, reply type, length, data."""

    option: int
    reply: int
    data: bytes = b""

    def pack(self) -> bytes:
        header = OPTION_REPLY_HEADER.pack(
            OPTION_REPLY_MAGIC, self.option, self.reply, len(self.data)
        )
        return header + self.data

    @classmethod
    def unpack(cls, buf: bytes) -> tuple[OptionReply, int]:
        """Parse one reply from the start of ``buf``; returns it and the bytes used."""
        magic, option, reply, length = OPTION_REPLY_HEADER.unpack_from(buf)
        if magic != OPTION_REPLY_MAGIC:
            raise ValueError(f"bad option reply magic {magic:#x}")
        end = OPTION_REPLY_HEADER.size + length
        if len(buf) < end:
            raise ValueError("truncated option reply")
        return cls(option, reply, bytes(buf[OPTION_REPLY_HEADER.size : end])), end


@dataclass(frozen=True, slots=True)
class Request:
    """A transmission request header (28 bytes), followed by ``length`` bytes for WRITE."""

    flags: int
    type: int
    cookie: int
    offset: int
    length: int

    def pack(self) -> bytes:
        return REQUEST.pack(
            REQUEST_MAGIC, self.flags, self.type, self.cookie, self.offset, self.length
        )

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, at: int = 0) -> Request:
        """Parse a request header; raise ValueError on a bad magic."""
        magic, flags, type_, cookie, offset, length = REQUEST.unpack_from(buf, at)
        if magic != REQUEST_MAGIC:
            raise ValueError(f"bad request magic {magic:#010x}")
        return cls(flags, type_, cookie, offset, length)


@dataclass(frozen=True, slots=True)
class ExtendedRequest:
    """An extended request header (32 bytes): *length* is a payload length when *flags*
    has NBD_CMD_FLAG_PAYLOAD_LEN (that many bytes follow), else a 64-bit effect length."""

    flags: int
    type: int
    cookie: int
    offset: int
    length: int

    def pack(self) -> bytes:
        return EXTENDED_REQUEST.pack(
            EXTENDED_REQUEST_MAGIC, self.flags, self.type, self.cookie, self.offset, self.length
        )

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, at: int = 0) -> ExtendedRequest:
        """Parse an extended request header; raise ValueError on a bad magic."""
        magic, flags, type_, cookie, offset, length = EXTENDED_REQUEST.unpack_from(buf, at)
        if magic != EXTENDED_REQUEST_MAGIC:
            raise ValueError(f"bad extended request magic {magic:#010x}")
        return cls(flags, type_, cookie, offset, length)


@dataclass(frozen=True, slots=True)
class SimpleReply:
    error: int
    cookie: int

    def pack(self) -> bytes:
        return simple_reply(self.cookie, self.error)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, at: int = 0) -> SimpleReply:
        magic, error, cookie = SIMPLE_REPLY.unpack_from(buf, at)
        if magic != SIMPLE_REPLY_MAGIC:
            raise ValueError(f"bad simple reply magic {magic:#010x}")
        return cls(error, cookie)


@dataclass(frozen=True, slots=True)
class StructuredChunk:
    """One structured reply chunk: header fields plus its payload."""

    flags: int
    type: int
    cookie: int
    payload: bytes

    def pack(self) -> bytes:
        return chunk_header(self.flags, self.type, self.cookie, len(self.payload)) + self.payload

    @classmethod
    def unpack(
        cls, buf: bytes | bytearray | memoryview, at: int = 0
    ) -> tuple[StructuredChunk, int]:
        magic, flags, type_, cookie, length = STRUCTURED_HEADER.unpack_from(buf, at)
        if magic != STRUCTURED_REPLY_MAGIC:
            raise ValueError(f"bad structured reply magic {magic:#010x}")
        start = at + STRUCTURED_HEADER.size
        end = start + length
        if len(buf) < end:
            raise ValueError("truncated structured reply chunk")
        return cls(flags, type_, cookie, bytes(buf[start:end])), end


@dataclass(frozen=True, slots=True)
class ExtendedChunk:
    """One extended reply chunk: header fields (with the request's offset) plus payload."""

    flags: int
    type: int
    cookie: int
    offset: int
    payload: bytes

    def pack(self) -> bytes:
        header = ext_chunk_header(
            self.flags, self.type, self.cookie, self.offset, len(self.payload)
        )
        return header + self.payload

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, at: int = 0) -> tuple[ExtendedChunk, int]:
        magic, flags, type_, cookie, offset, length = EXTENDED_HEADER.unpack_from(buf, at)
        if magic != EXTENDED_REPLY_MAGIC:
            raise ValueError(f"bad extended reply magic {magic:#010x}")
        start = at + EXTENDED_HEADER.size
        end = start + length
        if len(buf) < end:
            raise ValueError("truncated extended reply chunk")
        return cls(flags, type_, cookie, offset, bytes(buf[start:end])), end


def pack_option_string(text: bytes) -> bytes:
    """A 32-bit length followed by the bytes, as used in INFO/GO and META_CONTEXT data."""
    return U32.pack(len(text)) + text


def pack_info_go(name: bytes, requests: list[int]) -> bytes:
    """The data of an NBD_OPT_INFO or NBD_OPT_GO option (:func:`unpack_info_go` reverses it)."""
    return (
        pack_option_string(name) + U16.pack(len(requests)) + b"".join(U16.pack(r) for r in requests)
    )


def unpack_info_go(data: bytes) -> tuple[bytes, list[int]]:
    """Split NBD_OPT_INFO/GO data into the export name and the information requests.

    Data: 32-bit name length "MUST be no larger than the option data length - 6", name,
    16-bit count, count x 16-bit info requests (doc/proto.md NBD_OPT_INFO).

    Raises:
        ValueError: the data is malformed (the message says how).
    """
    if len(data) < 6:
        raise ValueError("option data shorter than 6 bytes")
    (name_length,) = U32.unpack_from(data)
    if name_length > len(data) - 6:
        raise ValueError("export name length runs past the option")
    if name_length > MAX_STRING:
        raise ValueError(f"export name longer than {MAX_STRING}")
    name = data[4 : 4 + name_length]
    rest = data[4 + name_length :]
    (count,) = U16.unpack_from(rest)
    if len(rest) != 2 + 2 * count:
        raise ValueError(f"{count} information requests do not match the option length")
    return name, [U16.unpack_from(rest, 2 + 2 * i)[0] for i in range(count)]


def pack_meta_context(name: bytes, queries: list[bytes]) -> bytes:
    """The data of NBD_OPT_LIST/SET_META_CONTEXT (:func:`unpack_meta_context` reverses it)."""
    return (
        pack_option_string(name)
        + U32.pack(len(queries))
        + b"".join(pack_option_string(q) for q in queries)
    )


def unpack_meta_context(data: bytes) -> tuple[bytes, list[bytes]]:
    """Split META_CONTEXT option data into the export name and the queries.

    Raises:
        ValueError: the data is malformed; "If the option request is syntactically
            invalid ... the server MUST fail the request with NBD_REP_ERR_INVALID".
    """
    if len(data) < 8:
        raise ValueError("meta context option data shorter than 8 bytes")
    (name_length,) = U32.unpack_from(data)
    if name_length > len(data) - 8:
        raise ValueError("export name length runs past the option")
    name = data[4 : 4 + name_length]
    at = 4 + name_length
    (count,) = U32.unpack_from(data, at)
    at += 4
    queries: list[bytes] = []
    for _ in range(count):
        if at + 4 > len(data):
            raise ValueError(f"{count} queries announced, data ends early")
        (length,) = U32.unpack_from(data, at)
        at += 4
        if length > MAX_STRING or at + length > len(data):
            raise ValueError("query length runs past the option or over 4096")
        queries.append(data[at : at + length])
        at += length
    if at != len(data):
        raise ValueError(f"{len(data) - at} stray bytes after the queries")
    return name, queries
