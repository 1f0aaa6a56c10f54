"""TLS and allow-lists across the server's lifecycle (branches ``ops`` and ``tls`` merged):
a worker forked at start, one respawned after a SIGKILL and one forked after a SIGHUP
reload all serve STARTTLS sessions with the server's certificate; a reload applies the
allow-lists of the exports it reopens, and warns about what the new exports expose."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from nbdserver.protocol import ClientFlag, Opt, Rep, pack_info_go
from nbdserver.workers import EXIT_WORKER_DIED

from .crashwatch import crash_lines
from .nbdtest import RawClient, ServerProcess, running_server
from .test_reload import hangup_and_wait
from .test_security_cli import client_from
from .test_supervision import holder_of, round_trip, wait_for
from .tlscerts import Pki, make_pki, starttls

TLS_CONFIG = """\
port = 0
workers = 2
tls = "require"
tls_cert = "{pki.server_cert}"
tls_key = "{pki.server_key}"
tls_ca = "{pki.ca_cert}"
[[exports]]
name = "disk"
size = "16M"
{extra}"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_client(port: int, pki: Pki, name: bytes = b"disk") -> RawClient:
    """A client in transmission over TLS (a client certificate signed by the CA)."""
    plain = RawClient(port)
    plain.handshake(ClientFlag.FIXED_NEWSTYLE)
    client = starttls(plain, pki.client_dir)
    client.go(name, structured=False, greet=False)
    return client


def served_by(
    pid: int, server: ServerProcess, connect: Callable[[], RawClient], held: list[RawClient]
) -> RawClient:
    """Open connections (kept in ``held``) until the hand-out gives one to ``pid``."""
    for _ in range(8):
        client = connect()
        held.append(client)
        if holder_of(server, client) == pid:
            return client
    raise AssertionError(f"no connection went to pid {pid}; log:\n{server.log()}")


def new_pid(server: ServerProcess, why: str) -> int:
    found = re.findall(rf"{why}: worker 1 is now pid (\d+)", server.log())
    assert found, server.log()
    return int(found[-1])


def test_every_worker_serves_tls_after_respawn_and_reload(tmp_path: Path, pki: Pki) -> None:
    config = tmp_path / "tls.toml"
    config.write_text(TLS_CONFIG.format(pki=pki, extra=""))
    held: list[RawClient] = []
    with running_server(tmp_path, "--config", str(config), expect_exit=EXIT_WORKER_DIED) as srv:
        try:
            (worker,) = {p.pid for p in psutil.Process(srv.proc.pid).children()}
            first = served_by(worker, srv, lambda: tls_client(srv.port, pki), held)
            round_trip(first, 1)
            # SIGKILL the worker: its replacement is forked from the serving parent.
            os.kill(worker, signal.SIGKILL)
            wait_for("a replacement", lambda: "respawn: worker 1 is now pid" in srv.log(), srv)
            text = srv.log()
            assert [line for line in crash_lines(text) if "killed by signal 9" not in line] == []
            srv.checked = len(text)  # the one expected death line is not a crash
            held.remove(first)
            first.close()
            respawned = new_pid(srv, "respawn")
            client = served_by(respawned, srv, lambda: tls_client(srv.port, pki), held)
            round_trip(client, 2)
            # SIGHUP with a new export: the worker forked for it serves TLS too.
            config.write_text(
                TLS_CONFIG.format(pki=pki, extra='[[exports]]\nname = "more"\nsize = "4M"\n')
            )
            hangup_and_wait(srv, "reload: worker 1 is now pid", 1)
            reloaded = new_pid(srv, "reload")
            assert reloaded != respawned
            fresh = served_by(reloaded, srv, lambda: tls_client(srv.port, pki, b"more"), held)
            round_trip(fresh, 3)
            round_trip(client, 4)  # the retiring worker's TLS session carries on
        finally:
            for c in held:
                c.close()
        wait_for("the old worker retires", lambda: "retired worker 1" in srv.log(), srv)
        assert srv.alive()
        srv.assert_no_crash()


GUARDED = """\
bind = "0.0.0.0"
port = 0
[[exports]]
name = "guarded"
size = "1M"
allow = ["{allow}"]
{extra}"""


def go_reply(client: RawClient, name: bytes) -> int:
    return client.option(Opt.GO, pack_info_go(name, []))[-1].reply


@pytest.mark.parametrize("workers", [1, 2])
def test_reload_applies_new_allow_lists(tmp_path: Path, workers: int) -> None:
    config = tmp_path / "guarded.toml"
    config.write_text(GUARDED.format(allow="127.0.0.2", extra=""))
    args = ["--config", str(config), "--workers", str(workers)]
    with running_server(tmp_path, *args) as srv:
        # 0.0.0.0 is only bound: every client here connects to 127.0.0.1.
        assert "not loopback" not in srv.log()  # the only export has an allow-list
        with client_from("127.0.0.1", srv.port) as c:
            c.handshake()
            assert go_reply(c, b"guarded") == Rep.ERR_POLICY
        config.write_text(
            GUARDED.format(allow="127.0.0.1", extra='[[exports]]\nname = "open"\nsize = "1M"\n')
        )
        hangup_and_wait(srv, "reloaded ", 1)
        assert "added ['guarded', 'open'], removed ['guarded']" in srv.log()
        # The reload says what the new export without an allow-list exposes.
        warnings = [line for line in srv.log().splitlines() if "reload: listening on" in line]
        assert len(warnings) == 1 and "['open']" in warnings[0], srv.log()
        held: list[RawClient] = []
        try:  # connections held open spread over every process: each has the new lists
            for _ in range(2 * workers):
                held.append(client_from("127.0.0.1", srv.port))
                assert held[-1].go(b"guarded", structured=False) == 1 << 20
                held.append(client_from("127.0.0.2", srv.port))
                held[-1].handshake()
                assert go_reply(held[-1], b"guarded") == Rep.ERR_POLICY
            pids = {psutil.Process(srv.proc.pid), *psutil.Process(srv.proc.pid).children()}
            assert {holder_of(srv, c) for c in held} == {p.pid for p in pids}
        finally:
            for c in held:
                c.close()
        assert srv.alive()
        srv.assert_no_crash()
