"""Run mutated sessions against a live nbd-serve and check it after every case.

After each case: no traceback or "Fatal error" (the target's crash reports), the server
(and each worker) is alive, and a fresh good client negotiates and READs known bytes.
For a well-framed case every option (:func:`~tests.fuzz.mutate.reshape_options`) or
request sent before NBD_CMD_DISC (:func:`~tests.fuzz.mutate.reshape_requests`) must be
answered, or the connection closed with a reason in the log.

Case ``i`` of seed ``s`` uses ``random.Random(f"{s}:{i}")``, so a failure names the
two numbers that replay it (``python -m tests.fuzz --seed s --first i --cases 1``).
"""

from __future__ import annotations

import random
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from server.nbdtest import RawClient

from nbdserver.protocol import OPTION_HEADER, Cmd

from .mutate import mutate_frames, reshape_options, reshape_requests
from .sessions import EXPORT_SIZE, KNOWN, Negotiated, session
from .wire import exchange, expected_replies, read_option_replies, read_replies


def known_bytes(size: int = EXPORT_SIZE) -> bytes:
    """The read-only export's content: every 4 KiB block differs."""
    return b"".join(i.to_bytes(4, "big") * 1024 for i in range(size // 4096))


class Target(Protocol):
    """A running server under test."""

    port: int

    def crashes(self) -> list[str]:
        """Crash reports (tracebacks, "Fatal error" ...) since the last call."""
        ...

    def alive(self) -> bool:
        """The server, and every worker process, still runs."""
        ...

    def log_lines(self) -> list[str]:
        """Log lines at WARNING or above written so far (for close reasons)."""
        ...


class CaseFailed(AssertionError):
    pass


@dataclass
class Stats:
    cases: int = 0
    well_framed: int = 0
    #: Options and requests of well-framed cases that got their final reply.
    requests_answered: int = 0
    closed_early: int = 0
    seconds: float = 0.0
    mutators: Counter[str] = field(default_factory=Counter)

    def rate(self) -> float:
        return self.cases / self.seconds if self.seconds else 0.0


def _negotiate(sock: socket.socket, n: Negotiated) -> None:
    client = RawClient(sock=sock)
    if n.export_name:
        client.export_name(n.export)
    else:
        client.go(n.export, structured=n.structured, meta=n.meta, extended=n.extended)


def good_client_served(port: int, known: bytes, rng: random.Random) -> None:
    with RawClient(port) as c:
        assert c.go(KNOWN, structured=False) == len(known)
        offset = rng.randrange(0, len(known) // 4096) * 4096
        c.request(Cmd.READ, offset, 4096, cookie=7)
        reply, data = c.simple_reply(4096)
        assert reply.error == 0 and data == known[offset : offset + 4096], "wrong data"
        c.request(Cmd.DISC)


def _close_reason(target: Target, local_port: int) -> str | None:
    tag = f"127.0.0.1:{local_port} #"
    lines = [line for line in target.log_lines() if tag in line]
    return lines[-1] if lines else None


def _options_case(
    target: Target, rng: random.Random, sock: socket.socket, handshake: list[bytes], stats: Stats
) -> list[str]:
    """Well-framed options: each is answered in order until a GO succeeds."""
    frames, names = reshape_options(rng, handshake)
    stats.well_framed += 1
    codes = [OPTION_HEADER.unpack_from(f)[1] for f in frames[1:]]
    local_port = sock.getsockname()[1]

    def all_answered(received: bytes) -> bool:
        replies = read_option_replies(received, codes)
        return replies.transmission or replies.answered == len(codes)

    stream = exchange(sock, b"".join(frames), until=all_answered)
    got = read_option_replies(stream, codes)
    stats.requests_answered += got.answered
    if not got.transmission and got.answered < len(codes):
        stats.closed_early += 1
        if _close_reason(target, local_port) is None:
            raise CaseFailed(f"options {codes[got.answered :]} unanswered, no reason logged")
    return names


def _requests_case(
    target: Target, rng: random.Random, sock: socket.socket, requests: list[bytes], stats: Stats
) -> list[str]:
    """Well-framed requests after a real handshake: each one before DISC is answered."""
    requests, names = reshape_requests(rng, requests)
    stats.well_framed += 1
    want, disc, read_len = expected_replies(requests)
    local_port = sock.getsockname()[1]
    stream = exchange(
        sock, b"".join(requests), until=lambda got: read_replies(got, read_len).answered >= want
    )
    got = read_replies(stream, read_len)
    stats.requests_answered += got.answered.total()
    missing = want - got.answered
    if missing:
        stats.closed_early += 1
        if _close_reason(target, local_port) is None:
            raise CaseFailed(f"requests {sorted(missing)} unanswered, no reason logged")
    extra = got.answered - want
    extra.pop(disc, None)
    assert not extra, f"replies to cookies never sent: {dict(extra)}"
    return names


def run_case(target: Target, seed: int, index: int, known: bytes, stats: Stats) -> None:
    rng = random.Random(f"{seed}:{index}")
    s = session(rng)
    sock = socket.create_connection(("127.0.0.1", target.port), timeout=10)
    try:
        kind = rng.random()
        if kind < 0.45:
            frames, names = mutate_frames(rng, s.frames())
            exchange(sock, b"".join(frames))
        elif kind < 0.6:
            names = _options_case(target, rng, sock, s.handshake, stats)
        else:
            _negotiate(sock, s.negotiated)
            names = _requests_case(target, rng, sock, s.requests, stats)
        stats.mutators.update(names)
    finally:
        sock.close()
    crashes = target.crashes()
    assert not crashes, "server crashed:\n" + "\n".join(crashes[:3])
    assert target.alive(), "server process (or a worker) died"
    good_client_served(target.port, known, rng)


def run(target: Target, seed: int, cases: int, first: int = 0) -> Stats:
    """Run cases ``first .. first+cases-1``; stop at the first failure, naming it."""
    known = known_bytes()
    stats = Stats()
    started = time.perf_counter()
    try:
        for index in range(first, first + cases):
            try:
                run_case(target, seed, index, known, stats)
            except (AssertionError, OSError) as exc:  # OSError: the good client failed
                raise CaseFailed(f"case seed={seed} index={index}: {exc}") from exc
            stats.cases += 1
    finally:
        stats.seconds = time.perf_counter() - started
    return stats
