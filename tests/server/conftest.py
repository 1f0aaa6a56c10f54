"""Fixtures for the in-process server tests: the real NBDServer on port 0 in a thread,
run on the asyncio loop and on uvloop (every test here runs over both). Any unhandled
exception in the server (see tests/server/crashwatch.py) fails the test at teardown."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from nbdserver.backends import open_backend
from nbdserver.backends.base import Backend
from nbdserver.backends.memory import MemoryBackend
from nbdserver.server import Export, NBDServer, make_export

from .crashwatch import CrashWatch, watch_connections

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


class ThreadedServer:
    """NBDServer listening on 127.0.0.1:0, its loop running in a background thread;
    ``watch`` collects its unhandled exceptions (``__exit__`` fails on any)."""

    def __init__(
        self,
        exports: list[Export],
        loop_factory: Callable[[], asyncio.AbstractEventLoop],
        **options: Any,
    ):
        self.exports = exports
        self.loop_factory = loop_factory
        #: Keyword arguments for NBDServer (e.g. tls, ssl_context).
        self.options = options
        self.port = 0
        self.server: NBDServer | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.watch = CrashWatch()
        self._logging = self.watch.logging_attached()

    def _run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=self.loop_factory) as runner:
                runner.run(self._main())
        except BaseException as exc:  # reported to the test thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.watch.install(self._loop)
        self._stop = asyncio.Event()
        self.server = NBDServer(self.exports, **self.options)
        watch_connections(self.server, self.watch)
        (addr,) = await self.server.listen_tcp("127.0.0.1", 0)
        self.port = addr[1]
        self._ready.set()
        await self._stop.wait()
        await self.server.shutdown()

    def __enter__(self) -> ThreadedServer:
        self._logging.__enter__()
        self._thread.start()
        assert self._ready.wait(30), "server thread did not start"
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        self._logging.__exit__(None, None, None)
        assert not self._thread.is_alive(), "server did not shut down"
        if self._error is not None:
            raise self._error
        self.watch.assert_clean()


class FaultyBackend(MemoryBackend):
    """A real memory backend whose I/O fails with EIO inside [bad_offset, +4096):
    fault injection for "a failing backend call becomes an error reply"."""

    __slots__ = ()
    bad_offset = 1 << 20

    def _hit(self, offset: int, length: int) -> bool:
        return offset < self.bad_offset + 4096 and offset + length > self.bad_offset

    def pread_into(self, buf: memoryview, offset: int) -> None:
        if self._hit(offset, len(buf)):
            raise OSError(errno.EIO, "injected read failure")
        super().pread_into(buf, offset)

    def pread(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        if self._hit(offset, length):
            raise OSError(errno.EIO, "injected read failure")
        return super().pread(offset, length)

    def sendfile_source(self, offset: int, length: int) -> int:
        # The faulty range must go through pread_into to fail.
        return -1 if self._hit(offset, length) else super().sendfile_source(offset, length)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int, fua: bool) -> None:
        if self._hit(offset, len(data)):
            raise OSError(errno.EIO, "injected write failure")
        super().pwrite(data, offset, fua)


@pytest.fixture(params=list(LOOPS))
def loop_factory(request: pytest.FixtureRequest) -> Callable[[], asyncio.AbstractEventLoop]:
    return LOOPS[request.param]


@pytest.fixture
def make_server(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> Iterator[Callable[..., ThreadedServer]]:
    started: list[ThreadedServer] = []
    backends: list[Backend] = []

    def start(*specs: tuple[str, Backend, bool], **options: Any) -> ThreadedServer:
        """Serve ``(name, backend, read_only)`` exports; ``options`` go to NBDServer,
        except ``allow``, the allow-list given to every export."""
        allow = options.pop("allow", None)
        exports = []
        for name, backend, read_only in specs:
            backends.append(backend)
            exports.append(make_export(name, f"{name} export", backend, read_only, allow))
        srv = ThreadedServer(exports, loop_factory, **options).__enter__()
        started.append(srv)
        return srv

    yield start
    failures: list[BaseException] = []
    for srv in started:
        try:
            srv.__exit__(None, None, None)
        except (AssertionError, Exception) as exc:  # stop every server, then report
            failures.append(exc)
    for backend in backends:
        backend.close()
    if failures:
        raise failures[0]


def memory(size: int = 16 << 20, read_only: bool = False) -> Backend:
    return open_backend("memory", size=size, read_only=read_only)


def file_backend(path: Path, size: int = 16 << 20) -> Backend:
    path.write_bytes(b"")
    with path.open("r+b") as fh:
        fh.truncate(size)
    return open_backend("file", path=str(path))


def faulty(size: int = 16 << 20) -> Backend:
    fd = os.memfd_create("faulty", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return FaultyBackend(fd, size, read_only=False, name="faulty")
