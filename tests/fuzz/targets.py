"""The servers the fuzzer attacks: in-process (either loop) and the real nbd-serve."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
from server.conftest import ThreadedServer
from server.crashwatch import crash_lines
from server.nbdtest import ServerProcess, running_server

from nbdserver.backends import open_backend
from nbdserver.server import make_export

from .runner import known_bytes
from .sessions import EXPORT_SIZE, KNOWN, SCRATCH


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def write_known(directory: Path) -> Path:
    path = directory / "known.img"
    path.write_bytes(known_bytes())
    return path


class InProcessTarget:
    """The real NBDServer in a thread (tests/server/conftest.py), crash-watched."""

    def __init__(self, server: ThreadedServer, lines: _Lines) -> None:
        self.server = server
        self.port = server.port
        self._lines = lines

    def crashes(self) -> list[str]:
        problems = list(self.server.watch.problems)
        self.server.watch.problems.clear()
        return problems

    def alive(self) -> bool:
        return self.server._thread.is_alive()

    def log_lines(self) -> list[str]:
        return self._lines.lines


@contextlib.contextmanager
def in_process(
    directory: Path, loop_factory: Callable[[], asyncio.AbstractEventLoop]
) -> Iterator[InProcessTarget]:
    scratch = open_backend("memory", size=EXPORT_SIZE)
    known = open_backend("file", path=str(write_known(directory)), read_only=True)
    exports = [
        make_export(SCRATCH.decode(), "fuzzed", scratch),
        make_export(KNOWN.decode(), "known bytes", known, read_only=True),
    ]
    lines = _Lines()
    logger = logging.getLogger("nbdserver")
    logger.addHandler(lines)
    try:
        with ThreadedServer(exports, loop_factory) as server:
            yield InProcessTarget(server, lines)
    finally:
        logger.removeHandler(lines)
        scratch.close()
        known.close()


class ProcessTarget:
    """``nbd-serve`` as users run it, with worker processes; its log is scanned."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.port = server.port
        self._checked = 0
        self._procs = [psutil.Process(server.proc.pid)]
        self._procs += self._procs[0].children()

    def crashes(self) -> list[str]:
        text = self.server.log()
        new, self._checked = text[self._checked :], len(text)
        return crash_lines(new, strict=True)

    def alive(self) -> bool:
        return all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in self._procs)

    def log_lines(self) -> list[str]:
        return [line for line in self.server.log().splitlines() if "WARNING" in line]

    @property
    def workers(self) -> int:
        return len(self._procs) - 1


@contextlib.contextmanager
def subprocess_server(directory: Path, workers: int) -> Iterator[ProcessTarget]:
    config = directory / "fuzz.toml"
    config.write_text(
        f"port = 0\nworkers = {workers}\n"
        f'[[exports]]\nname = ""\nbackend = "memory"\nsize = {EXPORT_SIZE}\n'
        f'[[exports]]\nname = "{KNOWN.decode()}"\nbackend = "file"\n'
        f'path = "{write_known(directory)}"\nread_only = true\n'
    )
    with running_server(
        directory, "--config", str(config), "--log-level", "warning", strict_log=True
    ) as server:
        yield ProcessTarget(server)
