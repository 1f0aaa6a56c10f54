"""Allow-lists and exposure warnings through the real ``nbd-serve`` process.

Two loopback addresses stand for two hosts: Linux routes all of 127.0.0.0/8 to ``lo``,
so a client socket bound to 127.0.0.2 reaches the server on 127.0.0.1 from a different
source address. Nothing is ever sent to a non-loopback address, even when the server
binds 0.0.0.0.
"""

from __future__ import annotations

import socket
from pathlib import Path

from nbdserver.protocol import U32, Cmd, Opt, OptionRequest, Rep, pack_info_go
from server.nbdtest import STARTUP_GUARD_S, RawClient, ServerProcess, running_server


def client_from(source: str, port: int) -> RawClient:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(STARTUP_GUARD_S)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return RawClient(sock=sock)


def listed(c: RawClient) -> list[bytes]:
    names = []
    for reply in c.option(Opt.LIST):
        if reply.reply == Rep.SERVER:
            (length,) = U32.unpack_from(reply.data)
            names.append(reply.data[4 : 4 + length])
    return names


def assert_healthy(srv: ServerProcess) -> None:
    assert srv.alive()
    log = srv.log()
    assert "Traceback" not in log and "Fatal error" not in log, log


GUARDED_CONFIG = """
port = 0
[[exports]]
name = "open"
size = "1M"
[[exports]]
name = "guarded"
size = "1M"
allow = ["127.0.0.1", "10.0.0.0/8"]
"""


def test_allow_list_admits_one_address_and_refuses_another(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(GUARDED_CONFIG)
    with running_server(tmp_path, "--config", str(config)) as srv:
        with client_from("127.0.0.2", srv.port) as c:
            c.handshake()
            assert listed(c) == [b"open"]  # hidden from LIST
            for option in (Opt.INFO, Opt.GO):
                (reply,) = c.option(option, pack_info_go(b"guarded", []))
                assert reply.reply == Rep.ERR_POLICY
                assert b"not available to 127.0.0.2" in reply.data
            assert c.go(b"open", structured=False, greet=False) == 1 << 20  # the other one works
        with client_from("127.0.0.2", srv.port) as c:
            c.handshake()
            c.send(OptionRequest(Opt.EXPORT_NAME, b"guarded").pack())
            assert c.at_eof()  # EXPORT_NAME cannot fail politely: the session ends
        with client_from("127.0.0.1", srv.port) as c:
            c.handshake()
            assert listed(c) == [b"open", b"guarded"]
            assert c.go(b"guarded", structured=False, greet=False) == 1 << 20
            c.request(Cmd.WRITE, 0, 4, cookie=1, payload=b"ok!!")
            assert c.simple_reply()[0].error == 0
        assert_healthy(srv)
        log = srv.log()
        refusals = [line for line in log.splitlines() if "refused" in line]
        assert len(refusals) == 3, log  # INFO, GO, EXPORT_NAME from 127.0.0.2
        assert all("127.0.0.2" in line and "'guarded'" in line for line in refusals), refusals


def test_allow_flag_guards_the_command_line_export(tmp_path: Path) -> None:
    with running_server(tmp_path, "--allow", "127.0.0.1", "--memory", "1M") as srv:
        with client_from("127.0.0.2", srv.port) as c:
            c.handshake()
            assert listed(c) == []
            (reply,) = c.option(Opt.GO, pack_info_go(b"", []))
            assert reply.reply == Rep.ERR_POLICY
        with client_from("127.0.0.1", srv.port) as c:
            assert c.go(structured=False) == 1 << 20
        assert_healthy(srv)


def test_non_loopback_bind_without_protection_warns(tmp_path: Path) -> None:
    with running_server(tmp_path, "--bind", "0.0.0.0", "--memory", "1M") as srv:
        with RawClient(srv.port) as c:  # connects to 127.0.0.1 only
            assert c.go(structured=False) == 1 << 20
        log = srv.log()
        assert "WARNING" in log and "which is not loopback, without TLS" in log, log
    with running_server(
        tmp_path, "--bind", "0.0.0.0", "--allow", "127.0.0.1", "--memory", "1M"
    ) as srv:
        assert "not loopback" not in srv.log()
    with running_server(tmp_path, "--memory", "1M") as srv:  # the loopback default
        assert srv.ready["listen"][0]["host"] == "127.0.0.1"  # type: ignore[index]
        assert "not loopback" not in srv.log()


def test_swap_export_under_tls_warns(tmp_path: Path) -> None:
    from server.tlscerts import make_pki

    pki = make_pki(tmp_path / "pki")
    config = tmp_path / "c.toml"
    config.write_text(
        f'port = 0\ntls = "on"\ntls_cert = "{pki.server_cert}"\ntls_key = "{pki.server_key}"\n'
        '[[exports]]\nname = "swap"\nsize = "1M"\nswap = true\n'
    )
    with running_server(tmp_path, "--config", str(config)) as srv:
        log = srv.log()
        assert "'swap' is marked swap = true and TLS is on" in log and "deadlock" in log
