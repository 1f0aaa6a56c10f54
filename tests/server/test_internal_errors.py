"""An internal error is never a quiet WARNING (issue 25).

A backend's expected failures (EIO, ENOSPC from the storage) are the client's business: a
WARNING and the mapped errno. A bug in the server (any other exception in a request
handler) still answers the client with EIO, since the connection must go on, but it is
logged at ERROR with its traceback, counted in ``internal_errors``, and fails the test
that met it through the crash watch. For a swap backend an EIO on a swap-in kills a
process in the guest: it must never pass unseen.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable

import pytest

from nbdserver.backends.memory import MemoryBackend
from nbdserver.errors import NBDErrno
from nbdserver.protocol import Cmd
from nbdserver.server import make_export

from .conftest import ThreadedServer
from .nbdtest import RawClient

SIZE = 1 << 20


class BuggyBackend(MemoryBackend):
    """A real memory backend with a bug in FLUSH and a full disk behind TRIM."""

    __slots__ = ()

    def flush(self) -> None:
        raise RuntimeError("a bug in the flush path")

    def trim(self, offset: int, length: int, fua: bool) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


def buggy() -> BuggyBackend:
    fd = os.memfd_create("buggy", os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    return BuggyBackend(fd, SIZE, read_only=False, name="buggy")


def test_an_internal_error_is_loud_counted_and_fails_the_crash_watch(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    backend = buggy()
    export = make_export("", "buggy", backend, False, None)
    srv = ThreadedServer([export], loop_factory).__enter__()
    try:
        with RawClient(srv.port) as c:
            c.go(structured=False)
            c.request(Cmd.FLUSH, cookie=7)
            reply, _ = c.simple_reply()
            assert (reply.cookie, reply.error) == (7, NBDErrno.EIO)
            c.request(Cmd.TRIM, 0, 4096, cookie=8)
            reply, _ = c.simple_reply()
            assert (reply.cookie, reply.error) == (8, NBDErrno.ENOSPC)
            # The connection goes on: a bug in one request is not the end of the session.
            c.request(Cmd.WRITE, 0, 4, cookie=9, payload=b"swap")
            assert c.simple_reply()[0].error == 0
        assert srv.server is not None
        snap = srv.server.exports[""].stats.snapshot()
        assert snap["internal_errors"] == 1  # the bug; not the full disk
        assert snap["errors"]["flush"] == 1 and snap["errors"]["trim"] == 1
        problems = list(srv.watch.problems)
        assert len(problems) == 1, problems
        assert problems[0].startswith("ERROR nbdserver.server: [127.0.0.1:"), problems[0]
        assert (
            "] internal error in NBD_CMD_FLUSH at 0+0: RuntimeError: a bug in the flush path; "
            "the client got EIO\n" in problems[0]
        ), problems[0]
        assert "Traceback (most recent call last)" in problems[0]
        assert "in flush" in problems[0]
    finally:
        with pytest.raises(AssertionError, match="internal error in NBD_CMD_FLUSH"):
            srv.__exit__(None, None, None)  # the crash watch fails the test
        backend.close()
