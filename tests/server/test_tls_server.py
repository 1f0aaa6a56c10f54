"""The asyncio adapter's TLS upgrade, in process, on the asyncio loop and on uvloop
(``loop.start_tls`` after the STARTTLS ACK), with a Python ``ssl`` client on a raw NBD
socket: data through TLS, the fast paths (sendfile, busy-poll) kept off the TLS stream,
a failed handshake that leaves no connection behind, and allow-lists by source address."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable

import pytest

from nbdserver.negotiation import TlsMode
from nbdserver.protocol import ClientFlag, Cmd, Opt, Rep, pack_info_go
from nbdserver.tls import server_context
from server.conftest import ThreadedServer, memory
from server.nbdtest import STARTUP_GUARD_S, RawClient
from server.tlscerts import Pki, make_pki, starttls

MiB = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


Start = Callable[..., ThreadedServer]


@pytest.fixture
def tls_server(make_server: Start, pki: Pki) -> Start:
    def start(
        mode: TlsMode = TlsMode.REQUIRE, *, verify: bool = True, allow: str | None = None
    ) -> ThreadedServer:
        ca = str(pki.ca_cert) if verify else None
        ctx = server_context(str(pki.server_cert), str(pki.server_key), ca)
        networks = None if allow is None else (ipaddress.ip_network(allow),)
        return make_server(("", memory(8 * MiB), False), tls=mode, ssl_context=ctx, allow=networks)

    return start


def no_crash(caplog: pytest.LogCaptureFixture) -> None:
    text = caplog.text
    assert "Traceback" not in text and "Fatal error" not in text, text


def wait_for_no_connections(srv: ThreadedServer) -> None:
    """The server dropped every connection (bounded wait, not a timing assertion)."""
    assert srv.server is not None
    deadline = time.monotonic() + STARTUP_GUARD_S
    while srv.server.connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not srv.server.connections


def test_data_through_tls(tls_server: Start, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    srv = tls_server()
    data = os.urandom(2 * MiB)
    with RawClient(srv.port) as plain:
        plain.handshake(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
        # Negotiated before STARTTLS, and so forgotten by it: the session below is simple.
        with starttls(plain, pki.client_dir) as c:
            assert isinstance(c.sock, ssl.SSLSocket) and c.sock.version() in ("TLSv1.2", "TLSv1.3")
            assert c.go(structured=False, greet=False) == 8 * MiB
            c.request(Cmd.WRITE, 0, len(data), cookie=1, payload=data)
            assert c.simple_reply()[0].error == 0
            # A lone 1 MiB read from a RAM disk is what the server sends with sendfile,
            # and lone small reads on the only connection are what it busy-polls after.
            for cookie, (offset, length) in enumerate([(0, MiB), (MiB, MiB)], start=2):
                c.request(Cmd.READ, offset, length, cookie=cookie)
                assert c.simple_reply(length)[1] == data[offset : offset + length]
            for i in range(64):
                c.request(Cmd.READ, i * 4096, 4096, cookie=100 + i)
                assert c.simple_reply(4096)[1] == data[i * 4096 : (i + 1) * 4096]
            c.request(Cmd.FLUSH, 0, 0, cookie=999)
            assert c.simple_reply()[0].error == 0
    wait_for_no_connections(srv)
    assert "TLS established" in caplog.text
    no_crash(caplog)


def test_failed_handshake_leaves_nothing_behind(
    tls_server: Start, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    srv = tls_server(verify=True)
    for certs in (pki.anonymous_dir, pki.rogue_dir):
        with RawClient(srv.port) as plain:
            plain.handshake()
            refused = False
            try:
                with starttls(plain, certs) as c:
                    # TLS 1.3 lets the client finish first; the refusal shows on reading.
                    c.go(greet=False)
            except (ssl.SSLError, ConnectionError):
                refused = True
            assert refused, f"{certs.name} client was served"
    wait_for_no_connections(srv)
    assert caplog.text.count("TLS handshake failed") == 2
    with RawClient(srv.port) as plain:  # a good client is still served
        plain.handshake()
        with starttls(plain, pki.client_dir) as c:
            assert c.go(greet=False) == 8 * MiB
    no_crash(caplog)


def test_tls_on_serves_plain_clients_too(tls_server: Start, pki: Pki) -> None:
    srv = tls_server(TlsMode.ON, verify=False)
    data = os.urandom(MiB)
    with RawClient(srv.port) as c:
        assert c.go(structured=False) == 8 * MiB
        c.request(Cmd.WRITE, 0, MiB, cookie=1, payload=data)
        assert c.simple_reply()[0].error == 0
        c.request(Cmd.READ, 0, MiB, cookie=2)  # plain: the fast paths may run
        assert c.simple_reply(MiB)[1] == data


def test_require_refuses_before_tls(tls_server: Start) -> None:
    srv = tls_server(verify=False)
    with RawClient(srv.port) as c:
        c.handshake()
        (reply,) = c.option(Opt.GO, pack_info_go(b"", []))
        assert reply.reply == Rep.ERR_TLS_REQD


def test_allow_list_by_source_address(tls_server: Start, pki: Pki) -> None:
    srv = tls_server(TlsMode.ON, verify=False, allow="127.0.0.1/32")
    sock = socket.socket()
    sock.settimeout(STARTUP_GUARD_S)
    sock.bind(("127.0.0.2", 0))
    sock.connect(("127.0.0.1", srv.port))
    with RawClient(sock=sock) as c:
        c.handshake()
        (reply,) = c.option(Opt.GO, pack_info_go(b"", []))
        assert reply.reply == Rep.ERR_POLICY
    with RawClient(srv.port) as c:
        c.handshake()
        with starttls(c, pki.anonymous_dir) as t:
            assert t.go(greet=False) == 8 * MiB
