"""A crash is not a clean close: unhandled exceptions in a server fail the test.

asyncio and uvloop survive an exception raised in a protocol callback (``buffer_updated``,
a completion scheduled with ``call_soon_threadsafe`` ...): they report it through the
loop's exception handler as "Fatal error on transport ..." or "Exception in callback ...",
close that one connection and go on serving. So a test that only checks "the server
still serves a good client" also passes for a handler that crashed. Worse, asyncio's
selector transports close the connection *silently* when the exception is an OSError.

- :class:`CrashWatch` collects such reports for an in-process server: it is the loop's
  exception handler, a logging handler on the server's loggers, and (through
  :func:`watch_connections`) a guard around every protocol callback, which also sees the
  OSError asyncio would swallow. ``assert_clean()`` fails with what it saw.
- :func:`crash_lines` finds the same signatures in a subprocess server's log file.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from nbdserver.server import Connection, NBDServer

#: Signatures of an unhandled exception in a log: Python's traceback header, asyncio's
#: and uvloop's exception-handler messages, a dead worker (nbdserver.workers).
CRASH = re.compile(
    r"Traceback \(most recent call last\)"
    r"|Fatal error"
    r"|Exception in callback"
    r"|exception was never retrieved"
    r"|Unhandled (?:error|exception)"
    r"|\bCRITICAL\b"
    r"|\bERROR asyncio:"
    r"|worker \d+ (?:failed|\(pid \d+\) (?:exited with status|was killed by signal))"
)
#: In hostile-input tests every ERROR line is a failure too: bad input earns a WARNING.
ERROR_LINE = re.compile(r"\b(?:ERROR|CRITICAL)\b")

#: Loggers an in-process server writes to.
SERVER_LOGGERS = ("asyncio", "nbdserver")


def crash_lines(text: str, *, strict: bool = False) -> list[str]:
    """Lines of a server log that show an unhandled exception (``strict``: or any ERROR)."""
    return [
        line
        for line in text.splitlines()
        if CRASH.search(line) or (strict and ERROR_LINE.search(line))
    ]


def assert_log_clean(text: str, *, strict: bool = False, what: str = "server log") -> None:
    bad = crash_lines(text, strict=strict)
    assert not bad, f"{what} shows a crash: {bad[:5]}\n--- log ---\n{text[-6000:]}"


class CrashWatch(logging.Handler):
    """Everything that looks like an unhandled exception in one in-process server."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.problems: list[str] = []
        self._lock_problems = threading.Lock()

    def record(self, problem: str) -> None:
        with self._lock_problems:
            self.problems.append(problem)

    # --- logging.Handler -------------------------------------------------------------
    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.ERROR or record.exc_info or CRASH.search(message):
            text = f"{record.levelname} {record.name}: {message}"
            if record.exc_info and record.exc_info[1] is not None:
                text += "\n" + "".join(traceback.format_exception(record.exc_info[1]))
            self.record(text)

    # --- the event loop ----------------------------------------------------------------
    def loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        text = f"loop exception handler: {context.get('message')}"
        if isinstance(exc, BaseException):
            text += "\n" + "".join(traceback.format_exception(exc))
        self.record(text)
        loop.default_exception_handler(context)  # still logged as it would be

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.set_exception_handler(self.loop_exception)

    @contextmanager
    def logging_attached(self) -> Iterator[CrashWatch]:
        loggers = [logging.getLogger(name) for name in SERVER_LOGGERS]
        for lg in loggers:
            lg.addHandler(self)
        try:
            yield self
        finally:
            for lg in loggers:
                lg.removeHandler(self)

    def assert_clean(self, what: str = "in-process server") -> None:
        with self._lock_problems:
            problems = list(self.problems)
        assert not problems, f"{what} crashed ({len(problems)} reports):\n" + "\n".join(
            problems[:5]
        )


_CALLBACKS = (
    "connection_made",
    "connection_lost",
    "get_buffer",
    "buffer_updated",
    "eof_received",
    "pause_writing",
    "resume_writing",
)


def _guarded(name: str) -> Callable[..., Any]:
    def method(self: _WatchedConnection, *args: Any) -> Any:
        try:
            return getattr(super(_WatchedConnection, self), name)(*args)
        except BaseException as exc:
            self.crash_watch.record(f"{name} raised:\n" + "".join(traceback.format_exception(exc)))
            raise

    method.__name__ = name
    return method


class _WatchedConnection(Connection):
    """The real Connection; every asyncio callback reports what it raises."""

    crash_watch: CrashWatch


for _name in _CALLBACKS:
    setattr(_WatchedConnection, _name, _guarded(_name))


def watch_connections(server: NBDServer, watch: CrashWatch) -> None:
    """Make ``server`` build guarded connections (call before it listens)."""
    assert hasattr(server, "_factory"), "NBDServer no longer builds connections in _factory"

    def factory() -> Connection:
        conn = _WatchedConnection(server)
        conn.crash_watch = watch
        return conn

    server._factory = factory  # type: ignore[method-assign]
