"""The wake mark (SO_RCVLOWAT, docs/performance.md "Wake mark"): while a WRITE's payload
streams in over TCP, the socket wakes the event loop only once the rest of it is there.

Checked on the server's real socket with getsockopt, over asyncio and uvloop: the mark
follows the bytes still missing, returns to 1 once the request is answered, and never
changes a byte; a Unix socket (which Linux polls without looking at the mark) gets none.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import os
import socket
import struct
import termios
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import uvloop

from nbdserver.fastpath import WAKE_MARK_MAX, WAKE_MARK_MIN, WakeMark
from nbdserver.protocol import Cmd, Request, SimpleReply
from nbdserver.server import Connection, NBDServer, make_export

from .conftest import ThreadedServer, memory
from .nbdtest import RawClient, running_server

MiB = 1 << 20
Start = Callable[..., ThreadedServer]


def only_connection(srv: ThreadedServer) -> Connection:
    assert srv.server is not None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        conns = [c for c in srv.server.connections if c.state.tx is not None]
        if len(conns) == 1:
            return conns[0]
        time.sleep(0.01)
    raise AssertionError("the client's connection never reached transmission")


def kernel_mark(conn: Connection) -> int:
    """SO_RCVLOWAT as the kernel has it on the server's end of the connection."""
    assert conn.transport is not None
    sock = conn.transport.get_extra_info("socket")
    value: int = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)
    return value


def wait_for_mark(conn: Connection, accept: Callable[[int], bool]) -> int:
    """Wait until the kernel's mark is one ``accept`` takes and the connection agrees."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        mark = kernel_mark(conn)
        if accept(mark) and conn.wake_mark is not None and conn.wake_mark.mark == mark:
            return mark
        time.sleep(0.005)
    raise AssertionError(f"the mark stayed at {kernel_mark(conn)}")


def missing(conn: Connection) -> int:
    """Bytes the connection still needs to complete the request it is receiving."""
    assert conn.state.tx is not None
    return conn.state.tx.needed - (conn.rx.end - conn.rx.start)


def test_mark_is_capped_while_a_large_write_streams_in(make_server: Start) -> None:
    srv = make_server(("", memory(16 * MiB), False), wake_mark=True)
    with RawClient(srv.port) as c:
        c.go(structured=False)
        conn = only_connection(srv)
        assert kernel_mark(conn) == 1  # idle: any byte wakes the loop
        data = os.urandom(3 * MiB)
        first = 256 * 1024
        c.send(Request(0, Cmd.WRITE, 7, MiB, len(data)).pack() + data[:first])
        # At least 2.75 MiB still to come, whatever the server has read: the cap.
        assert len(data) - first > WAKE_MARK_MAX
        wait_for_mark(conn, lambda mark: mark == WAKE_MARK_MAX)
        c.send(data[first:])
        assert c.simple_reply() == (SimpleReply(0, 7), b"")
        wait_for_mark(conn, lambda mark: mark == 1)
        c.request(Cmd.READ, MiB, len(data), cookie=8)
        assert c.simple_reply(len(data)) == (SimpleReply(0, 8), data)


def test_mark_is_what_the_request_still_lacks(make_server: Start) -> None:
    srv = make_server(("", memory(16 * MiB), False), wake_mark=True)
    with RawClient(srv.port) as c:
        c.go(structured=False)
        conn = only_connection(srv)
        data = os.urandom(200 * 1024)  # less than the cap
        sent = 24 * 1024
        c.send(Request(0, Cmd.WRITE, 3, 0, len(data)).pack() + data[:sent])
        # The server wakes for the first bytes and asks for exactly the rest of the
        # request: never more than can still arrive (the connection cannot stall)...
        mark = wait_for_mark(conn, lambda mark: mark > 1)
        assert len(data) - sent <= mark <= len(data)
        assert mark == missing(conn)
        c.send(data[sent:])
        assert c.simple_reply() == (SimpleReply(0, 3), b"")
        wait_for_mark(conn, lambda mark: mark == 1)  # ...and forgets it once answered
        c.request(Cmd.READ, 0, len(data), cookie=4)
        assert c.simple_reply(len(data)) == (SimpleReply(0, 4), data)


def test_no_mark_for_a_few_missing_bytes(make_server: Start) -> None:
    """A payload short by less than WAKE_MARK_MIN is not worth a system call."""
    srv = make_server(("", memory(), False), wake_mark=True)
    with RawClient(srv.port) as c:
        c.go(structured=False)
        conn = only_connection(srv)
        data = os.urandom(64 * 1024)
        short = WAKE_MARK_MIN - 1
        c.send(Request(0, Cmd.WRITE, 1, 0, len(data)).pack() + data[:-short])
        deadline = time.monotonic() + 10
        while missing(conn) != short:  # the server has read all that came
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert kernel_mark(conn) == 1
        c.send(data[-short:])
        assert c.simple_reply() == (SimpleReply(0, 1), b"")
        c.request(Cmd.READ, 0, len(data), cookie=2)
        assert c.simple_reply(len(data)) == (SimpleReply(0, 2), data)


def test_writes_in_small_pieces_arrive_whole(make_server: Start) -> None:
    """Many WRITEs sent in 1,000-byte pieces (a slow path, like QEMU's user network):
    every one is answered and every byte lands, with the mark moving all along."""
    srv = make_server(("", memory(), False), wake_mark=True)
    with RawClient(srv.port) as c:
        c.go(structured=False)
        blobs = [os.urandom(n) for n in (4096, 32768, 131072, 8192, 65536)]
        stream = b"".join(
            Request(0, Cmd.WRITE, i, i * 131072, len(b)).pack() + b for i, b in enumerate(blobs)
        )
        for at in range(0, len(stream), 1000):
            c.send(stream[at : at + 1000])
        for i in range(len(blobs)):
            assert c.simple_reply() == (SimpleReply(0, i), b"")
        for i, b in enumerate(blobs):
            c.request(Cmd.READ, i * 131072, len(b), cookie=100 + i)
            assert c.simple_reply(len(b)) == (SimpleReply(0, 100 + i), b)


def test_unix_sockets_get_no_mark() -> None:
    async def connect() -> tuple[WakeMark | None, Connection]:
        server = NBDServer([make_export("", "", memory())], wake_mark=True)
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX)
        transport, conn = await loop.connect_accepted_socket(lambda: Connection(server), ours)
        fd = conn.fd
        transport.close()
        theirs.close()
        await asyncio.sleep(0)
        assert fd >= 0  # the socket itself is known (sendfile, busy-poll)...
        return conn.wake_mark, conn

    for new_loop in (asyncio.new_event_loop, uvloop.new_event_loop):
        with asyncio.Runner(loop_factory=new_loop) as runner:
            mark, _ = runner.run(connect())
        assert mark is None  # ...but no mark: Linux polls Unix sockets without it


def test_on_by_default_and_off_when_disabled(make_server: Start) -> None:
    """NBDServer marks TCP connections unless told not to; wake_mark=False keeps the kernel's 1."""
    assert NBDServer([make_export("", "", memory())]).wake_mark is True
    srv = make_server(("", memory(), False), wake_mark=False)
    with RawClient(srv.port) as c:
        c.go(structured=False)
        conn = only_connection(srv)
        assert conn.wake_mark is None
        data = os.urandom(512 * 1024)
        c.send(Request(0, Cmd.WRITE, 1, 0, len(data)).pack() + data[: 64 * 1024])
        time.sleep(0.1)
        assert kernel_mark(conn) == 1
        c.send(data[64 * 1024 :])
        assert c.simple_reply() == (SimpleReply(0, 1), b"")


#: pidfd_getfd(2), Linux 5.6; the same number on every architecture's syscall table.
SYS_PIDFD_GETFD = 438


def mark_in_process(server_pid: int, client: socket.socket) -> tuple[int, int]:
    """(pid, SO_RCVLOWAT) of the server's end of ``client``'s connection, in whichever
    process of the server's tree serves it, read through a duplicate of its descriptor
    once the server has acted on what was sent: a mark is set, or it read every byte."""
    port = client.getsockname()[1]
    deadline = time.monotonic() + 10
    root = psutil.Process(server_pid)
    libc = ctypes.CDLL(None, use_errno=True)
    while time.monotonic() < deadline:
        for proc in (root, *root.children(recursive=True)):
            for c in proc.net_connections(kind="tcp"):
                if not (c.raddr and c.raddr.port == port and c.fd != -1):
                    continue
                pidfd = os.pidfd_open(proc.pid)
                try:
                    fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, c.fd, 0)
                    if fd < 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"pidfd_getfd: {os.strerror(err)}")
                finally:
                    os.close(pidfd)
                with socket.socket(fileno=fd) as dup:  # closes our duplicate only
                    unread = struct.unpack("i", fcntl.ioctl(dup, termios.FIONREAD, b"\0" * 4))[0]
                    value = dup.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)
                if value != 1 or unread == 0:
                    return proc.pid, value
        time.sleep(0.01)
    raise AssertionError(f"nbd-serve {server_pid} never read the connection nor set a mark")


@pytest.mark.parametrize(("flags", "expected"), [((), WAKE_MARK_MAX), (("--no-wake-mark",), 1)])
def test_every_worker_process_follows_the_flag(
    tmp_path: Path, flags: tuple[str, ...], expected: int
) -> None:
    """nbd-serve with two processes: a half-sent 512 KiB WRITE leaves the mark at its cap
    on the server's socket by default, and at the kernel's 1 with --no-wake-mark, in the
    parent and in the forked worker alike."""
    args = ["--memory", "16M", "--workers", "2", "--poll-us", "0", *flags]
    with running_server(tmp_path, *args) as server:
        clients = [RawClient(server.port), RawClient(server.port)]
        try:
            for c in clients:
                c.go(structured=False)
            data = os.urandom(512 * 1024)
            seen: dict[int, int] = {}
            for i, c in enumerate(clients):
                c.send(Request(0, Cmd.WRITE, i, 0, len(data)).pack() + data[: 64 * 1024])
            for c in clients:
                pid, mark = mark_in_process(server.proc.pid, c.sock)
                seen[pid] = mark
            assert len(seen) == 2, f"both connections in one process: {seen}"
            assert set(seen.values()) == {expected}, seen
            for i, c in enumerate(clients):
                c.send(data[64 * 1024 :])
                assert c.simple_reply() == (SimpleReply(0, i), b"")
        finally:
            for c in clients:
                c.close()
        assert server.alive()
        server.assert_no_crash(strict=True)
