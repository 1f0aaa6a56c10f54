"""``--max-connections N``: connection N+1 is refused in the handshake with a reason the
client can show, the N earlier ones keep working, and a slot freed is a slot reused."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from server.nbdtest import RawClient, ServerProcess, require_tool, running_server

from faults.support import assert_healthy
from nbdserver.protocol import Cmd, Opt, Rep, pack_info_go

LIMIT = 3
#: Guard for the wait until a closed connection is counted (not a timed assert).
GUARD_S = 30.0


def served(port: int) -> RawClient:
    c = RawClient(port)
    c.go(structured=False)
    return c


def roundtrip(c: RawClient, offset: int) -> None:
    data = os.urandom(4096)
    c.request(Cmd.WRITE, offset, len(data), payload=data, cookie=1)
    assert c.simple_reply()[0].error == 0
    c.request(Cmd.READ, offset, len(data), cookie=2)
    reply, got = c.simple_reply(len(data))
    assert reply.error == 0 and got == data


def try_go(port: int) -> tuple[int, str]:
    """Handshake and ask for the default export; return the final reply and its text."""
    with RawClient(port) as c:
        c.handshake()
        final = c.option(Opt.GO, pack_info_go(b"", []))[-1]
        if final.reply == Rep.ACK:
            c.request(Cmd.DISC)
        else:  # a refused client can still end politely: NBD_OPT_ABORT is acknowledged
            assert c.option(Opt.ABORT)[-1].reply == Rep.ACK
        return final.reply, final.data.decode()


@pytest.mark.parametrize("workers", [1, 2])
def test_connection_past_the_limit_is_refused_clearly(tmp_path: Path, workers: int) -> None:
    args = ["--memory", "16M", "--workers", str(workers), "--max-connections", str(LIMIT)]
    with running_server(tmp_path, *args) as srv:
        clients = [served(srv.port) for _ in range(LIMIT)]
        reply, message = try_go(srv.port)
        assert reply == Rep.ERR_POLICY, (reply, message)
        assert f"--max-connections {LIMIT}" in message and "limit" in message, message
        nbdinfo = require_tool("nbdinfo")
        info = subprocess.run(
            [nbdinfo, "--size", srv.uri()], capture_output=True, text=True, timeout=60, check=False
        )
        assert info.returncode != 0, info
        # qemu shows the server's reason to its user as it came.
        qemu_img = require_tool("qemu-img")
        probe = subprocess.run(
            [qemu_img, "info", srv.uri()], capture_output=True, text=True, timeout=60, check=False
        )
        assert probe.returncode != 0 and f"--max-connections {LIMIT}" in probe.stderr, probe
        for i, c in enumerate(clients):  # the earlier connections are untouched
            roundtrip(c, i * 65536)
        assert "refusing the connection" in srv.log()
        # One leaves; the next client gets its slot (once its close is counted).
        clients.pop().close()
        deadline = time.monotonic() + GUARD_S
        while try_go(srv.port)[0] == Rep.ERR_POLICY and time.monotonic() < deadline:
            time.sleep(0.05)
        clients.append(served(srv.port))
        roundtrip(clients[-1], 1 << 20)
        for c in clients:
            c.close()
        assert_healthy(srv, workers=workers)


def assert_no_refusal_without_limit(srv: ServerProcess) -> None:
    clients = [served(srv.port) for _ in range(LIMIT + 2)]
    for i, c in enumerate(clients):
        roundtrip(c, i * 65536)
        c.close()
    assert "refusing" not in srv.log()


def test_no_limit_by_default(tmp_path: Path) -> None:
    with running_server(tmp_path, "--memory", "16M", "--workers", "1") as srv:
        assert_no_refusal_without_limit(srv)
        assert_healthy(srv, workers=1)


def test_bad_limit_is_a_usage_error(tmp_path: Path) -> None:
    from server.nbdtest import NBD_SERVE

    done = subprocess.run(
        [NBD_SERVE, "--memory", "1M", "--max-connections", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "max connections" in done.stderr, done
