"""Valid client byte sessions, frame by frame: the seeds the mutation fuzzer starts from.

A session is what a correct client sends: the fixed-newstyle client flags, options
(STRUCTURED_REPLY or EXTENDED_HEADERS, SET_META_CONTEXT, LIST, INFO, then GO or
EXPORT_NAME) and transmission requests (READ, WRITE, FLUSH, TRIM, WRITE_ZEROES,
BLOCK_STATUS, CACHE, DISC), compact or extended as negotiated. Each frame is kept apart so
mutations can work on frame boundaries (truncate, duplicate, reorder).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from nbdserver.protocol import (
    CLIENT_FLAGS,
    EXTENDED_REQUEST,
    EXTENDED_REQUEST_MAGIC,
    REQUEST,
    ClientFlag,
    Cmd,
    CmdFlag,
    ExtendedRequest,
    Opt,
    OptionRequest,
    Request,
    pack_info_go,
    pack_meta_context,
)

#: The writable export the fuzzer hammers, and the read-only one whose bytes are known.
SCRATCH = b""
KNOWN = b"known"
EXPORT_SIZE = 1 << 20
#: Offsets and lengths that sit on the export's edges.
EDGES = (0, 1, 511, 512, 4095, 4096, 65536, EXPORT_SIZE - 4096, EXPORT_SIZE - 1, EXPORT_SIZE)


@dataclass(frozen=True)
class Negotiated:
    """What a session negotiates, needed to read the server's replies."""

    export: bytes
    structured: bool
    meta: bool
    export_name: bool  # entered with NBD_OPT_EXPORT_NAME instead of GO
    #: NBD_OPT_EXTENDED_HEADERS: 32-byte requests, extended reply chunks.
    extended: bool = False


@dataclass
class Session:
    handshake: list[bytes]
    requests: list[bytes]
    negotiated: Negotiated

    def frames(self) -> list[bytes]:
        return [*self.handshake, *self.requests]


def options(rng: random.Random, n: Negotiated) -> list[bytes]:
    """Client flags and options that end in transmission of ``n.export``."""
    frames = [CLIENT_FLAGS.pack(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)]
    if rng.random() < 0.3:
        frames.append(OptionRequest(Opt.LIST, b"").pack())
    if rng.random() < 0.3:
        frames.append(OptionRequest(Opt.INFO, pack_info_go(n.export, [0, 1, 2, 3])).pack())
    if n.extended:
        if rng.random() < 0.3:  # "A client MAY request structured replies first"
            frames.append(OptionRequest(Opt.STRUCTURED_REPLY, b"").pack())
        frames.append(OptionRequest(Opt.EXTENDED_HEADERS, b"").pack())
    elif n.structured:
        frames.append(OptionRequest(Opt.STRUCTURED_REPLY, b"").pack())
    if n.structured:
        if rng.random() < 0.3:
            query = pack_meta_context(n.export, [b"base:"])
            frames.append(OptionRequest(Opt.LIST_META_CONTEXT, query).pack())
        if n.meta:
            query = pack_meta_context(n.export, [b"base:allocation"])
            frames.append(OptionRequest(Opt.SET_META_CONTEXT, query).pack())
    if n.export_name:
        frames.append(OptionRequest(Opt.EXPORT_NAME, n.export).pack())
    else:
        frames.append(OptionRequest(Opt.GO, pack_info_go(n.export, [])).pack())
    return frames


def negotiated(rng: random.Random) -> Negotiated:
    structured = rng.random() < 0.7
    return Negotiated(
        export=SCRATCH if rng.random() < 0.8 else KNOWN,
        structured=structured,
        meta=structured and rng.random() < 0.7,
        export_name=not structured and rng.random() < 0.3,
        extended=structured and rng.random() < 0.4,
    )


def pack_request(
    flags: int, cmd: int, cookie: int, offset: int, length: int, *, extended: bool
) -> bytes:
    """A request header, compact or extended."""
    if extended:
        return ExtendedRequest(flags, cmd, cookie, offset, length).pack()
    return Request(flags, cmd, cookie, offset, length).pack()


def parse_request(frame: bytes) -> tuple[bool, int, int, int, int, int, bytes]:
    """(extended, flags, cmd, cookie, offset, length, payload) of a request frame, by its
    magic (a frame too short for an extended header is compact)."""
    extended = (
        len(frame) >= EXTENDED_REQUEST.size
        and int.from_bytes(frame[:4], "big") == EXTENDED_REQUEST_MAGIC
    )
    layout = EXTENDED_REQUEST if extended else REQUEST
    _, flags, cmd, cookie, offset, length = layout.unpack_from(frame)
    return extended, flags, cmd, cookie, offset, length, frame[layout.size :]


def request(
    rng: random.Random, cookie: int, max_length: int = 70000, extended: bool = False
) -> bytes:
    """One valid request for a writable export of EXPORT_SIZE bytes."""
    cmd = rng.choice(
        [Cmd.READ] * 4
        + [Cmd.WRITE] * 4
        + [Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES]
        + [Cmd.BLOCK_STATUS, Cmd.CACHE]
    )
    if cmd == Cmd.FLUSH:
        return pack_request(0, cmd, cookie, 0, 0, extended=extended)
    length = rng.choice([1, 512, 4096, 4096, 65536, rng.randrange(1, 70000)])
    length = min(length, max_length)
    offset = rng.randrange(0, EXPORT_SIZE - length + 1)
    flags = 0
    if rng.random() < 0.2:
        flags |= CmdFlag.FUA
    if cmd == Cmd.WRITE_ZEROES and rng.random() < 0.3:
        flags |= CmdFlag.NO_HOLE
    if cmd == Cmd.BLOCK_STATUS and rng.random() < 0.3:
        flags |= CmdFlag.REQ_ONE
    payload = rng.randbytes(length) if cmd == Cmd.WRITE else b""
    if extended and payload:
        # "The command NBD_CMD_WRITE MUST use the flag NBD_CMD_FLAG_PAYLOAD_LEN".
        flags |= CmdFlag.PAYLOAD_LEN
    return pack_request(flags, cmd, cookie, offset, length, extended=extended) + payload


def session(rng: random.Random, max_length: int = 70000) -> Session:
    """A random valid session; it ends with NBD_CMD_DISC most of the time."""
    n = negotiated(rng)
    count = rng.randrange(1, 9)
    reqs = [request(rng, cookie, max_length, n.extended) for cookie in range(1, count + 1)]
    if rng.random() < 0.8:
        reqs.append(pack_request(0, Cmd.DISC, 0xD15C, 0, 0, extended=n.extended))
    return Session(options(rng, n), reqs, n)
