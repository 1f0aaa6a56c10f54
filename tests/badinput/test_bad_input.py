"""Malformed and hostile input at the socket level. After every case the same server
process is still alive and a good client (nbdinfo) is served right away."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from server.nbdtest import RawClient, ServerProcess, require_tool, running_server

from nbdserver.errors import NBDErrno
from nbdserver.protocol import (
    CLIENT_FLAGS,
    IHAVEOPT,
    OPTION_HEADER,
    ClientFlag,
    Cmd,
    CmdFlag,
    Opt,
    OptionRequest,
    Rep,
    SimpleReply,
    pack_info_go,
)

MiB = 1 << 20
HELLO = CLIENT_FLAGS.pack(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)


def good_client_served(srv: ServerProcess) -> None:
    assert srv.alive(), srv.log()
    srv.assert_no_crash(strict=True, what="nbd-serve log of this test")
    nbdinfo = require_tool("nbdinfo")
    size = subprocess.run(
        [nbdinfo, "--size", srv.uri()], capture_output=True, text=True, check=True
    )
    assert int(size.stdout) == 8 * MiB


def connect(srv: ServerProcess) -> RawClient:
    return RawClient(srv.port)


# --- handshake: the server must close these connections --------------------------------
def _unknown_client_flags(c: RawClient) -> None:
    c.greeting()
    c.send(CLIENT_FLAGS.pack(0xFFFFFFFF))


def _http_request(c: RawClient) -> None:
    c.greeting()
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


def _bad_option_magic(c: RawClient) -> None:
    c.handshake()
    c.send(OPTION_HEADER.pack(0x1122334455667788, Opt.LIST, 0))


def _huge_export_name(c: RawClient) -> None:
    c.handshake()
    c.send(OPTION_HEADER.pack(IHAVEOPT, Opt.EXPORT_NAME, 2**32 - 1) + b"n" * 4096)


def _unknown_export_name(c: RawClient) -> None:
    c.handshake()
    c.send(OptionRequest(Opt.EXPORT_NAME, b"x" * 5000).pack())


def _bad_request_magic(c: RawClient) -> None:
    c.go()
    c.send(b"\x25\x60\x95\x14" + bytes(24))


CLOSING = {
    "unknown-client-flags": _unknown_client_flags,
    "http-request": _http_request,
    "bad-option-magic": _bad_option_magic,
    "huge-export-name": _huge_export_name,
    "unknown-export-name": _unknown_export_name,
    "bad-request-magic": _bad_request_magic,
}


@pytest.mark.parametrize("case", list(CLOSING))
def test_violation_closes_connection(victim: ServerProcess, case: str) -> None:
    with connect(victim) as c:
        CLOSING[case](c)
        assert c.at_eof()
    good_client_served(victim)


# --- the client vanishes at awkward moments ------------------------------------------------
def _silent(c: RawClient) -> None:
    pass


def _after_greeting(c: RawClient) -> None:
    c.greeting()


def _truncated_option_header(c: RawClient) -> None:
    c.handshake()
    c.send(OPTION_HEADER.pack(IHAVEOPT, Opt.GO, 100)[:9])


def _truncated_option_data(c: RawClient) -> None:
    c.handshake()
    c.send(OPTION_HEADER.pack(IHAVEOPT, Opt.GO, 100) + b"\0\0")


def _huge_option_then_gone(c: RawClient) -> None:
    c.handshake()
    c.send(OPTION_HEADER.pack(IHAVEOPT, Opt.INFO, 2**32 - 1) + b"i" * (4 * MiB))


def _half_write_payload(c: RawClient) -> None:
    c.go()
    c.request(Cmd.WRITE, 0, MiB, payload=b"w" * 1000)


def _big_read_then_gone(c: RawClient) -> None:
    c.go(structured=False)
    for i in range(8):
        c.request(Cmd.READ, 0, 8 * MiB, cookie=i)


def _garbage_after_go(c: RawClient) -> None:
    c.go()
    c.send(bytes(range(256)) * 8)


VANISHING = {
    "silent": _silent,
    "after-greeting": _after_greeting,
    "truncated-option-header": _truncated_option_header,
    "truncated-option-data": _truncated_option_data,
    "huge-option-then-gone": _huge_option_then_gone,
    "half-write-payload": _half_write_payload,
    "big-read-then-gone": _big_read_then_gone,
    "garbage-after-go": _garbage_after_go,
}


RST = b"\1\0\0\0\0\0\0\0"  # SO_LINGER on, 0 s: close() sends a reset


@pytest.mark.parametrize("case", list(VANISHING))
def test_client_vanishes(victim: ServerProcess, case: str) -> None:
    c = connect(victim)
    VANISHING[case](c)
    # "silent" closes gently: whether a reset lands before or after the server's accept
    # is a race, and test_client_resets_before_accept makes the "before" side certain.
    if case != "silent":
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
    c.close()
    good_client_served(victim)


@contextlib.contextmanager
def frozen(srv: ServerProcess) -> Iterator[None]:
    """SIGSTOP nbd-serve and its workers for the body: they accept nothing meanwhile."""
    procs = [psutil.Process(srv.proc.pid)]
    procs += procs[0].children()
    for p in procs:
        p.suspend()
    try:
        yield
    finally:
        for p in procs:
            p.resume()


# Found by the crash watch (issue 11): uvloop gave peername None for a peer that reset
# before the accept, and server._socket_setup crashed on it, leaking the descriptor.
def test_client_resets_before_accept(tmp_path: Path) -> None:
    # One process, so the reset connection is handled before the good client's.
    args = ("--memory", "8M", "--workers", "1", "--log-level", "debug")
    with running_server(tmp_path, *args, strict_log=True) as srv:
        with frozen(srv):
            c = connect(srv)
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
            c.close()
        good_client_served(srv)


# --- errors that keep the session -----------------------------------------------------------
def test_oversized_options_answered_and_session_continues(victim: ServerProcess) -> None:
    rss_before = psutil.Process(victim.proc.pid).memory_info().rss
    with connect(victim) as c:
        c.handshake()
        announced = 16 * MiB
        c.send(OPTION_HEADER.pack(IHAVEOPT, Opt.INFO, announced))
        chunk = b"\xee" * MiB
        for _ in range(16):
            c.send(chunk)
        header = c.recv_exact(20)
        assert int.from_bytes(header[12:16], "big") == Rep.ERR_TOO_BIG
        c.recv_exact(int.from_bytes(header[16:20], "big"))
        # Name too long (over 4096 bytes) inside a small option: ERR_INVALID.
        assert c.option(Opt.INFO, pack_info_go(b"n" * 5000, []))[-1].reply == Rep.ERR_INVALID
        assert c.option(Opt.LIST, b"junk")[-1].reply == Rep.ERR_INVALID
        assert c.option(12345)[-1].reply == Rep.ERR_UNSUP
        assert c.option(Opt.STARTTLS)[-1].reply == Rep.ERR_POLICY  # --tls off
        assert c.option(Opt.LIST)[-1].reply == Rep.ACK
    rss_after = psutil.Process(victim.proc.pid).memory_info().rss
    assert rss_after - rss_before < 8 * MiB  # the 16 MiB option was never held in memory
    good_client_served(victim)


TRANSMISSION_ERRORS: list[tuple[str, int, int, int, int, bytes, NBDErrno]] = [
    ("unknown-command", 200, 0, 0, 0, b"", NBDErrno.EINVAL),
    ("resize", Cmd.RESIZE, 0, 0, 0, b"", NBDErrno.EINVAL),
    ("unknown-flag", Cmd.READ, 1 << 15, 0, 512, b"", NBDErrno.EINVAL),
    ("flag-for-other-command", Cmd.WRITE, CmdFlag.REQ_ONE, 0, 4, b"abcd", NBDErrno.EINVAL),
    ("read-past-end", Cmd.READ, 0, 8 * MiB - 511, 512, b"", NBDErrno.EINVAL),
    ("read-offset-overflow", Cmd.READ, 0, 2**64 - 512, 512, b"", NBDErrno.EINVAL),
    ("write-past-end", Cmd.WRITE, 0, 8 * MiB, 512, b"x" * 512, NBDErrno.ENOSPC),
    ("trim-past-end", Cmd.TRIM, 0, 8 * MiB, 1, b"", NBDErrno.EINVAL),
    ("cache-past-end", Cmd.CACHE, 0, 8 * MiB, 1, b"", NBDErrno.EINVAL),
    ("zero-past-end", Cmd.WRITE_ZEROES, 0, 8 * MiB - 1, 2, b"", NBDErrno.ENOSPC),
    ("flush-with-length", Cmd.FLUSH, 0, 0, 4096, b"", NBDErrno.EINVAL),
    ("read-too-long", Cmd.READ, 0, 0, 64 * MiB, b"", NBDErrno.EINVAL),
    ("block-status-no-context", Cmd.BLOCK_STATUS, 0, 0, 4096, b"", NBDErrno.EINVAL),
]


@pytest.mark.parametrize("case", TRANSMISSION_ERRORS, ids=[t[0] for t in TRANSMISSION_ERRORS])
def test_bad_requests_get_errors(
    victim: ServerProcess, case: tuple[str, int, int, int, int, bytes, NBDErrno]
) -> None:
    _, cmd, flags, offset, length, payload, errno = case
    with connect(victim) as c:
        c.go(structured=False)
        c.request(cmd, offset, length, cookie=77, flags=flags, payload=payload)
        assert c.simple_reply() == (SimpleReply(errno, 77), b"")
        c.request(Cmd.READ, 0, 8, cookie=78)
        assert c.simple_reply(8)[0] == SimpleReply(0, 78)
    good_client_served(victim)


def test_huge_write_is_refused_without_buffering(victim: ServerProcess) -> None:
    rss_before = psutil.Process(victim.proc.pid).memory_info().rss
    with connect(victim) as c:
        c.go(structured=False)
        c.request(Cmd.WRITE, 0, 2**32 - 1, cookie=5)
        assert c.simple_reply() == (SimpleReply(NBDErrno.EINVAL, 5), b"")
        for _ in range(8):
            c.send(b"\xcc" * MiB)  # part of the announced payload, skipped as it arrives
        c.request(Cmd.READ, 0, 8, cookie=6)  # swallowed as payload, never answered
    rss_after = psutil.Process(victim.proc.pid).memory_info().rss
    assert rss_after - rss_before < 16 * MiB
    good_client_served(victim)


@pytest.mark.parametrize("cmd", [Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES])
def test_writes_to_read_only_get_eperm(victim: ServerProcess, cmd: Cmd) -> None:
    with connect(victim) as c:
        c.go(b"ro", structured=False)
        payload = b"x" * 512 if cmd == Cmd.WRITE else b""
        c.request(cmd, 0, 512, cookie=3, payload=payload)
        assert c.simple_reply() == (SimpleReply(NBDErrno.EPERM, 3), b"")
        c.request(Cmd.READ, 0, 512, cookie=4)
        assert c.simple_reply(512) == (SimpleReply(0, 4), bytes(512))


def test_bad_magic_leaves_other_connections_alone(victim: ServerProcess) -> None:
    with connect(victim) as good, connect(victim) as bad:
        good.go(structured=False)
        bad.go(structured=False)
        good.request(Cmd.WRITE, 4096, 4, cookie=1, payload=b"keep")
        assert good.simple_reply()[0] == SimpleReply(0, 1)
        bad.send(b"NOT A REQUEST AT ALL, REALLY..")
        assert bad.at_eof()
        good.request(Cmd.READ, 4096, 4, cookie=2)
        assert good.simple_reply(4) == (SimpleReply(0, 2), b"keep")
    good_client_served(victim)
