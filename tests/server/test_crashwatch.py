"""The crash watch itself (tests/server/crashwatch.py), and the crash it found."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from .conftest import LOOPS, ThreadedServer, memory
from .crashwatch import crash_lines
from .nbdtest import RawClient

Start = Callable[..., ThreadedServer]
RST = b"\1\0\0\0\0\0\0\0"  # SO_LINGER on, 0 s: close() sends a reset

LOG_LINES: list[tuple[str, bool, bool]] = [  # line, crash, crash-or-error
    ("2026-11-29 12:00:00,000 ERROR asyncio: Fatal error on transport TCPTransport", True, True),
    ("ERROR asyncio: Exception in callback Connection._completed()", True, True),
    ("Traceback (most recent call last):", True, True),
    ("ERROR asyncio: Task exception was never retrieved", True, True),
    ("ERROR nbdserver.workers: worker 1 (pid 123) exited with status 1 while serving", True, True),
    ("ERROR nbdserver.workers: worker 2 (pid 9) was killed by signal 9 while serving", True, True),
    ("INFO nbdserver.workers: retired worker 1 (pid 123) exited", False, False),
    ("CRITICAL nbdserver: out of memory", True, True),
    ("ERROR nbdserver: cannot listen: [Errno 98] Address already in use", False, True),
    ("WARNING nbdserver.server: [1.2.3.4:5 #1] handshake violation, closing: x", False, False),
    ("DEBUG nbdserver.server: [1.2.3.4:5 #1] request 0x4d rejected: EINVAL", False, False),
]


@pytest.mark.parametrize(("line", "crash", "strict"), LOG_LINES)
def test_crash_lines(line: str, crash: bool, strict: bool) -> None:
    assert bool(crash_lines(line)) is crash
    assert bool(crash_lines(line, strict=True)) is strict


def test_an_exception_in_a_loop_callback_is_caught(make_server: Start) -> None:
    srv = make_server(("", memory(), False))
    assert srv._loop is not None

    def crash() -> None:
        raise RuntimeError("injected into the server's loop")

    srv._loop.call_soon_threadsafe(crash)
    with RawClient(srv.port) as c:  # the loop ran the callback before this handshake
        assert c.go() == 16 << 20
    with pytest.raises(AssertionError, match="injected into the server's loop"):
        srv.watch.assert_clean()
    srv.watch.problems.clear()  # seen; the teardown check would fail otherwise


@contextmanager
def loop_blocked(srv: ThreadedServer) -> Iterator[None]:
    """Hold the server's event loop still for the body (it accepts nothing meanwhile)."""
    assert srv._loop is not None
    blocked, release = threading.Event(), threading.Event()

    def hold() -> None:
        blocked.set()
        release.wait(30)

    srv._loop.call_soon_threadsafe(hold)
    assert blocked.wait(30)
    try:
        yield
    finally:
        release.set()


@pytest.mark.parametrize(
    "loop_factory",
    [
        pytest.param(LOOPS["asyncio"], id="asyncio"),
        # uvloop gave peername None here and server._socket_setup crashed on it (found
        # by the crash watch); each such connection leaked its descriptor.
        pytest.param(LOOPS["uvloop"], id="uvloop"),
    ],
)
def test_peer_that_resets_before_accept_is_no_crash(make_server: Start) -> None:
    srv = make_server(("", memory(), False))
    with loop_blocked(srv):
        gone = socket.create_connection(("127.0.0.1", srv.port))
        gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
        gone.close()
    with RawClient(srv.port) as c:  # accepted after the reset one
        assert c.go() == 16 << 20
    problems = list(srv.watch.problems)
    srv.watch.problems.clear()  # reported here, not again at teardown
    assert not problems, "\n".join(problems)
