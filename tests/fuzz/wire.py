"""The fuzzer's client side: send a case while reading, then read the replies.

:func:`exchange` sends all of a case's bytes while draining what the server sends
(large READ replies must not deadlock against a server that paused reading), then
half-closes and reads to EOF. :func:`read_replies` parses transmission replies and
says which cookies were answered.
"""

from __future__ import annotations

import selectors
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from nbdserver.protocol import (
    EXTENDED_HEADER,
    EXTENDED_REPLY_MAGIC,
    GREETING,
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_HEADER,
    OPTION_REPLY_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_HEADER,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    Opt,
    Rep,
    ReplyFlag,
)

from .sessions import parse_request

#: Guard against a server that never answers or never closes; not a timed assert.
GUARD_S = 30.0


class Hung(AssertionError):
    """The server neither answered nor closed within the guard."""


def exchange(
    sock: socket.socket, data: bytes, until: Callable[[bytes], bool] | None = None
) -> bytes:
    """Send ``data`` while receiving; once all is sent and ``until(received)`` holds
    (at once without ``until``), shut our side and read to EOF. Returns all received."""
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    received = bytearray()
    view = memoryview(data)
    deadline = time.monotonic() + GUARD_S
    writing = True
    shut = False
    try:
        while True:
            if writing and not view:
                writing = False
                sel.modify(sock, selectors.EVENT_READ)
            if not writing and not shut and (until is None or until(bytes(received))):
                shut = True
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Hung(f"no EOF after {GUARD_S} s; received {len(received)} bytes")
            for _key, events in sel.select(remaining):
                if events & selectors.EVENT_READ:
                    try:
                        chunk = sock.recv(1 << 20)
                    except (ConnectionResetError, BrokenPipeError):
                        chunk = b""
                    if not chunk:
                        return bytes(received)
                    received += chunk
                if events & selectors.EVENT_WRITE and view:
                    try:
                        view = view[sock.send(view) :]
                    except (ConnectionResetError, BrokenPipeError):
                        view = view[:0]  # the server closed: the rest cannot go
    finally:
        sel.close()
    return bytes(received)


@dataclass
class Replies:
    answered: Counter[int]
    #: Bytes that are not a whole reply (the connection ended mid-reply).
    leftover: int


def expected_replies(requests: list[bytes]) -> tuple[Counter[int], int | None, dict[int, int]]:
    """Cookies that must be answered (requests before the first DISC), the DISC's cookie
    (a DISC with bad flags may get its EINVAL), and each READ's length (a simple reply
    to it carries that much data)."""
    want: Counter[int] = Counter()
    read_len: dict[int, int] = {}
    for frame in requests:
        _, _flags, cmd, cookie, _offset, length, _ = parse_request(frame)
        if cmd == Cmd.DISC:
            return want, cookie, read_len
        want[cookie] += 1
        if cmd == Cmd.READ:
            read_len[cookie] = length
    return want, None, read_len


def read_replies(stream: bytes, read_len: dict[int, int]) -> Replies:
    """Parse simple, structured and extended replies; a chunked reply counts at its DONE
    chunk.

    Raises AssertionError on bytes that are no reply at all.
    """
    answered: Counter[int] = Counter()
    pos = 0
    end = len(stream)
    while end - pos >= 4:
        magic = int.from_bytes(stream[pos : pos + 4], "big")
        if magic == SIMPLE_REPLY_MAGIC:
            if end - pos < SIMPLE_REPLY.size:
                break
            _, error, cookie = SIMPLE_REPLY.unpack_from(stream, pos)
            size = SIMPLE_REPLY.size + (read_len.get(cookie, 0) if error == 0 else 0)
            if end - pos < size:
                break
            pos += size
            answered[cookie] += 1
        elif magic == STRUCTURED_REPLY_MAGIC:
            if end - pos < STRUCTURED_HEADER.size:
                break
            _, flags, _type, cookie, length = STRUCTURED_HEADER.unpack_from(stream, pos)
            if end - pos < STRUCTURED_HEADER.size + length:
                break
            pos += STRUCTURED_HEADER.size + length
            if flags & ReplyFlag.DONE:
                answered[cookie] += 1
        elif magic == EXTENDED_REPLY_MAGIC:
            if end - pos < EXTENDED_HEADER.size:
                break
            _, flags, _type, cookie, _offset, length = EXTENDED_HEADER.unpack_from(stream, pos)
            if end - pos < EXTENDED_HEADER.size + length:
                break
            pos += EXTENDED_HEADER.size + length
            if flags & ReplyFlag.DONE:
                answered[cookie] += 1
        else:
            raise AssertionError(f"not a reply at byte {pos}: {stream[pos : pos + 32].hex()}")
    return Replies(answered, end - pos)


@dataclass
class OptionReplies:
    #: Options answered with a final reply (ACK or an error), in order.
    answered: int
    #: A GO was acknowledged: transmission began after option ``answered``.
    transmission: bool


def read_option_replies(stream: bytes, options: list[int]) -> OptionReplies:
    """Parse the greeting and the replies to ``options`` (option codes, in order).

    Raises AssertionError on anything that is no option reply, or a reply that does not
    echo its option ("the server MUST ... reply ... the option type being replied to").
    """
    if len(stream) < GREETING.size:
        return OptionReplies(0, False)
    magic, opt_magic, _flags = GREETING.unpack_from(stream)
    assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT), stream[:18].hex()
    pos = GREETING.size
    answered = 0
    for option in options:
        while True:
            if len(stream) - pos < OPTION_REPLY_HEADER.size:
                return OptionReplies(answered, False)
            magic, echoed, reply, length = OPTION_REPLY_HEADER.unpack_from(stream, pos)
            assert magic == OPTION_REPLY_MAGIC, (
                f"not an option reply: {stream[pos : pos + 20].hex()}"
            )
            assert echoed == option, f"reply to option {echoed} while {option} was asked"
            if len(stream) - pos < OPTION_REPLY_HEADER.size + length:
                return OptionReplies(answered, False)
            pos += OPTION_REPLY_HEADER.size + length
            if reply == Rep.ACK or reply & (1 << 31):
                break
        answered += 1
        if option == Opt.GO and reply == Rep.ACK:
            return OptionReplies(answered, True)
    return OptionReplies(answered, False)
