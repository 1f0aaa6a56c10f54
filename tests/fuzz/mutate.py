"""Seeded mutations of valid sessions (tests/fuzz/sessions.py).

Two kinds:
- :func:`mutate_frames` breaks anything: flips bits, overwrites fields with edge values,
  corrupts magics, truncates frames, inserts garbage, duplicates, drops and reorders
  frames. The server may close; it must not crash.
- :func:`reshape_options` does the same for the handshake's options: each must get a
  final reply (ACK or an error) echoing its option, until one GO succeeds.
- :func:`reshape_requests` keeps every request well framed (the magic, and a WRITE's
  length equal to its payload): it changes flags, commands, offsets and lengths,
  duplicates, drops and reorders requests, and renumbers the cookies. Each request must
  then be answered (or the connection closed with a reason in the log).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

from nbdserver.protocol import (
    IHAVEOPT,
    OPTION_HEADER,
    Cmd,
    CmdFlag,
    Opt,
    OptionRequest,
    pack_info_go,
)

from .sessions import EDGES, EXPORT_SIZE, pack_request, parse_request

#: Values that sit on type boundaries, for overwritten fields of each width.
INTERESTING = {
    1: (0, 1, 0x7F, 0x80, 0xFF),
    2: (0, 1, 0x7FFF, 0x8000, 0xFFFF),
    4: (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, EXPORT_SIZE, EXPORT_SIZE + 1),
    8: (0, 1, 2**63, 2**64 - 1, 2**64 - 512, EXPORT_SIZE, EXPORT_SIZE - 1),
}
_PACK = {1: ">B", 2: ">H", 4: ">I", 8: ">Q"}

Frames = list[bytes]


def _pick(rng: random.Random, frames: Frames) -> int:
    return rng.randrange(len(frames))


def flip_bits(rng: random.Random, frames: Frames) -> None:
    i = _pick(rng, frames)
    frame = bytearray(frames[i])
    if frame:
        for _ in range(rng.randint(1, 4)):
            bit = rng.randrange(len(frame) * 8)
            frame[bit // 8] ^= 1 << (bit % 8)
    frames[i] = bytes(frame)


def overwrite_field(rng: random.Random, frames: Frames) -> None:
    i = _pick(rng, frames)
    frame = bytearray(frames[i])
    width = rng.choice((1, 2, 4, 8))
    if len(frame) < width:
        return
    at = rng.randrange(0, len(frame) - width + 1)
    value = rng.choice((*INTERESTING[width], rng.getrandbits(width * 8)))
    struct.pack_into(_PACK[width], frame, at, value)
    frames[i] = bytes(frame)


def corrupt_magic(rng: random.Random, frames: Frames) -> None:
    i = _pick(rng, frames)
    frame = frames[i]
    # Options start with an 8-byte magic, requests with a 4-byte one.
    width = 8 if frame[:8] == b"IHAVEOPT" else 4
    frames[i] = rng.randbytes(width) + frame[width:]


def truncate(rng: random.Random, frames: Frames) -> None:
    i = _pick(rng, frames)
    frames[i] = frames[i][: rng.randrange(0, max(1, len(frames[i])))]
    if rng.random() < 0.5:
        del frames[i + 1 :]  # the client vanishes mid-frame


def insert_garbage(rng: random.Random, frames: Frames) -> None:
    size = rng.choice((1, 3, 4, 7, 28, 64, rng.randrange(1, 600)))
    frames.insert(rng.randrange(len(frames) + 1), rng.randbytes(size))


def duplicate(rng: random.Random, frames: Frames) -> None:
    i = _pick(rng, frames)
    frames.insert(rng.randrange(len(frames) + 1), frames[i])


def drop(rng: random.Random, frames: Frames) -> None:
    if len(frames) > 1:
        del frames[_pick(rng, frames)]


def swap(rng: random.Random, frames: Frames) -> None:
    i, j = _pick(rng, frames), _pick(rng, frames)
    frames[i], frames[j] = frames[j], frames[i]


MUTATORS: tuple[Callable[[random.Random, Frames], None], ...] = (
    flip_bits,
    overwrite_field,
    overwrite_field,
    corrupt_magic,
    truncate,
    insert_garbage,
    duplicate,
    drop,
    swap,
)


def mutate_frames(rng: random.Random, frames: Frames) -> tuple[Frames, list[str]]:
    """1-4 arbitrary mutations; returns the new frames and the mutators' names."""
    out = list(frames)
    names = []
    for _ in range(rng.randint(1, 4)):
        mutator = rng.choice(MUTATORS)
        mutator(rng, out)
        names.append(mutator.__name__)
        if not out:
            out.append(b"")
    return out, names


# --- framing-preserving ------------------------------------------------------------
_WRITE = int(Cmd.WRITE)
_DISC = int(Cmd.DISC)
_PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)
#: Commands without payload a header may turn into (200: unknown to the spec).
_NO_PAYLOAD = (0, 2, 3, 4, 5, 6, 7, 8, 200, 0xFFFF)


def _reshape_one(rng: random.Random, frame: bytes) -> bytes:
    extended, flags, cmd, cookie, offset, length, payload = parse_request(frame)
    field = rng.choice(("flags", "cmd", "offset", "length", "offset", "payload"))
    if field == "flags":
        flags = rng.choice((0, 1, 2, 4, 8, 16, 32, 1 << 15, rng.getrandbits(16)))
        if extended:
            # NBD_CMD_FLAG_PAYLOAD_LEN decides the framing: keep it as the payload says,
            # or the case would stop being well framed.
            flags = flags & ~_PAYLOAD_LEN | (_PAYLOAD_LEN if payload else 0)
    elif field == "payload" and extended and cmd != _WRITE:
        # A payload where the command has none: consumed, answered NBD_EINVAL.
        payload = rng.randbytes(rng.choice((1, 8, 12, 100)))
        flags |= _PAYLOAD_LEN
        length = len(payload)
    elif field == "cmd" and cmd != _WRITE:
        cmd = rng.choice(_NO_PAYLOAD)
    elif field == "offset":
        offset = rng.choice((*EDGES, *INTERESTING[8], rng.getrandbits(64)))
    elif field == "length" and not payload:
        choices = (*EDGES, *INTERESTING[4], rng.getrandbits(32) & 0x3FFFFFF)
        if extended:  # a 64-bit effect length
            choices += (*INTERESTING[8], 5 << 30, rng.getrandbits(64))
        length = rng.choice(choices)
        if cmd == Cmd.READ:  # never ask for more than the export: keep cases fast
            length = min(length, EXPORT_SIZE)
    return pack_request(flags, cmd, cookie, offset, length, extended=extended) + payload


def reshape_requests(rng: random.Random, requests: Frames) -> tuple[Frames, list[str]]:
    """Well-framed mutations; cookies are renumbered 1.. in the new order, and nothing
    follows the first NBD_CMD_DISC."""
    out = list(requests)
    names = []
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(("field", "field", "field", "duplicate", "drop", "swap"))
        names.append(op)
        if op == "field":
            i = _pick(rng, out)
            out[i] = _reshape_one(rng, out[i])
        else:
            {"duplicate": duplicate, "drop": drop, "swap": swap}[op](rng, out)
    renumbered = []
    for cookie, frame in enumerate(out, 1):
        extended, flags, cmd, _, offset, length, payload = parse_request(frame)
        renumbered.append(
            pack_request(flags, cmd, cookie, offset, length, extended=extended) + payload
        )
        if cmd == _DISC:
            # "A client MUST NOT send anything to the server after sending an
            # NBD_CMD_DISC command": the server may close with those bytes unread, and
            # the kernel then resets the connection, losing replies in flight
            # (mutate_frames covers that misbehaviour).
            break
    return renumbered, names


#: Options a reshaped option may become: every one that keeps the handshake going
#: (not EXPORT_NAME, which has no error reply, nor ABORT), plus unknown ones.
_OPTIONS = (3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 0, 0x7FFFFFFF, 0xFFFFFFFF)


def _reshape_option(rng: random.Random, frame: bytes) -> bytes:
    _, option, _length = OPTION_HEADER.unpack_from(frame)
    data = bytearray(frame[OPTION_HEADER.size :])
    op = rng.choice(("option", "data", "data", "shorter", "longer"))
    if op == "option":
        option = rng.choice(_OPTIONS)
    elif op == "data" and data:
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.getrandbits(8)
    elif op == "shorter" and data:
        del data[rng.randrange(len(data)) :]
    else:
        data += rng.randbytes(rng.choice((1, 2, 4, 16)))
    return OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + bytes(data)


def reshape_options(rng: random.Random, options: Frames) -> tuple[Frames, list[str]]:
    """Well-framed mutations of a session's options (``options[0]`` is the client flags,
    kept): the framing (magic, length = data) holds, so each option must be answered."""
    out = [frame for frame in options[1:] if OPTION_HEADER.unpack_from(frame)[1] != Opt.EXPORT_NAME]
    if not out:
        out.append(OptionRequest(Opt.GO, pack_info_go(b"", [])).pack())
    names = []
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(("option", "option", "duplicate", "drop", "swap"))
        names.append(f"option-{op}")
        if op == "option":
            i = _pick(rng, out)
            out[i] = _reshape_option(rng, out[i])
        else:
            {"duplicate": duplicate, "drop": drop, "swap": swap}[op](rng, out)
    return [options[0], *out], names
