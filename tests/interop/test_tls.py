"""TLS with real clients: nbdinfo and libnbd (GnuTLS) on ``nbds://`` URIs against the real
``nbd-serve`` process (two worker processes by default on this machine, so a TLS session
also runs in a worker that was handed the connection), plus raw-socket checks of what the
spec says a TLS-required server answers. Certificates: tests/server/tlscerts.py."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from server.nbdtest import (
    RawClient,
    ServerProcess,
    nbdsh_script,
    require_python3_libnbd,
    require_tool,
    running_server,
)
from server.tlscerts import Pki, make_pki, starttls

from nbdserver.protocol import (
    OPTION_REPLY_HEADER,
    ClientFlag,
    Cmd,
    Opt,
    OptionRequest,
    Rep,
    pack_info_go,
)

pytestmark = pytest.mark.interop
MiB = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_args(pki: Pki, mode: str, *, ca: bool = False) -> list[str]:
    args = ["--tls", mode, "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    return [*args, "--tls-ca", str(pki.ca_cert)] if ca else args


def nbds(srv: ServerProcess, certs: Path, name: str = "") -> str:
    return f"nbds://127.0.0.1:{srv.port}/{name}?tls-certificates={certs}"


def assert_healthy(srv: ServerProcess) -> None:
    """The server is alive and logged no crash (a crash is not a clean close)."""
    assert srv.alive()
    log = srv.log()
    assert "Traceback" not in log and "Fatal error" not in log, log


@pytest.fixture
def require_server(tmp_path: Path, pki: Pki) -> Iterator[ServerProcess]:
    with running_server(tmp_path, *tls_args(pki, "require", ca=True), "--memory", "64M") as srv:
        yield srv


def nbdinfo(uri: str, *, debug: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("nbdinfo"), "--json", uri],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "LIBNBD_DEBUG": "1" if debug else "0"},
    )


def test_nbdinfo_over_tls(require_server: ServerProcess, pki: Pki) -> None:
    done = nbdinfo(nbds(require_server, pki.client_dir))
    assert done.returncode == 0, done.stderr
    (export,) = json.loads(done.stdout)["exports"]
    assert export["export-size"] == 64 * MiB
    assert_healthy(require_server)
    assert "TLS established" in require_server.log()


# Writes of mixed sizes, then reads back: 1 MiB reads are the size the server would send
# with sendfile from a RAM disk, and lone 4 KiB reads on the only connection are the ones
# it would busy-poll the socket after; either would put plaintext on a TLS stream.
LIBNBD_DATA = """
import os, hashlib
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates(CERTS)
h.connect_uri(URI)
assert h.get_tls_negotiated() == 1
size = h.get_size()
data = os.urandom(4 * 1024 * 1024)
h.pwrite(data[:4096], 0)
h.pwrite(data[4096:1048576], 4096)
h.pwrite(data[1048576:], 1048576, nbd.CMD_FLAG_FUA)
h.flush()
back = b"".join(h.pread(1048576, off) for off in range(0, len(data), 1048576))
assert back == data, "1 MiB reads differ"
small = b"".join(h.pread(4096, off) for off in range(0, 262144, 4096))
assert small == data[:262144], "4 KiB reads differ"
# Several reads in flight at once (out-of-order completion over one TLS stream).
bufs = [nbd.Buffer(1048576) for _ in range(4)]
pending = {h.aio_pread(b, i * 1048576) for i, b in enumerate(bufs)}
while pending:
    h.poll(-1)
    pending = {c for c in pending if not h.aio_command_completed(c)}
assert b"".join(b.to_bytearray() for b in bufs) == data, "parallel reads differ"
assert h.pread(4096, size - 4096) == bytes(4096)
h.shutdown()
print(json.dumps({"ok": True, "sha": hashlib.sha256(data).hexdigest()}))
"""


def test_libnbd_reads_and_writes_over_tls(require_server: ServerProcess, pki: Pki) -> None:
    python = require_python3_libnbd()
    body = f"CERTS = {str(pki.client_dir)!r}\n" + LIBNBD_DATA
    done = nbdsh_script(python, f"nbd://127.0.0.1:{require_server.port}/", body)
    assert done.returncode == 0, done.stderr + require_server.log()
    assert json.loads(done.stdout.splitlines()[-1])["ok"] is True
    assert_healthy(require_server)


def test_require_refuses_plain_clients(require_server: ServerProcess) -> None:
    done = nbdinfo(f"nbd://127.0.0.1:{require_server.port}/", debug=True)
    assert done.returncode != 0
    # The server's reason reaches the user (libnbd prints it in its debug output).
    assert "server error message: this server requires TLS" in done.stderr, done.stderr
    with RawClient(require_server.port) as c:
        c.handshake()
        # FORCEDTLS: every option but STARTTLS/ABORT gets NBD_REP_ERR_TLS_REQD.
        for option, data in [
            (Opt.GO, pack_info_go(b"", [])),
            (Opt.INFO, pack_info_go(b"", [])),
            (Opt.LIST, b""),
            (Opt.STRUCTURED_REPLY, b""),
            (99, b"?"),
        ]:
            replies = c.option(option, data)
            assert [r.reply for r in replies] == [Rep.ERR_TLS_REQD], option
            assert b"requires TLS" in replies[0].data
        assert [r.reply for r in c.option(Opt.ABORT)] == [Rep.ACK]
    with RawClient(require_server.port) as c:
        c.handshake()
        c.send(OptionRequest(Opt.EXPORT_NAME, b"").pack())
        assert c.at_eof()  # "it MUST terminate the session": no export data in plaintext
    assert_healthy(require_server)


def test_tls_on_serves_plain_and_tls_clients(tmp_path: Path, pki: Pki) -> None:
    python = require_python3_libnbd()
    with running_server(tmp_path, *tls_args(pki, "on"), "--memory", "8M") as srv:
        plain = nbdinfo(f"nbd://127.0.0.1:{srv.port}/")
        assert plain.returncode == 0, plain.stderr
        secure = nbdinfo(nbds(srv, pki.anonymous_dir))  # no client certificate needed
        assert secure.returncode == 0, secure.stderr
        for tls, expected in (("nbd.TLS_DISABLE", 0), ("nbd.TLS_REQUIRE", 1)):
            body = (
                f"h = nbd.NBD()\nh.set_tls({tls})\n"
                f"h.set_tls_certificates({str(pki.anonymous_dir)!r})\n"
                "h.connect_uri(URI)\nh.pwrite(b'x' * 512, 0)\n"
                "assert h.pread(512, 0) == b'x' * 512\n"
                "print(int(h.get_tls_negotiated()))\nh.shutdown()\n"
            )
            done = nbdsh_script(python, f"nbd://127.0.0.1:{srv.port}/", body)
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == str(expected)
        assert_healthy(srv)


def test_client_certificate_is_verified(tmp_path: Path, pki: Pki) -> None:
    with running_server(tmp_path, *tls_args(pki, "require", ca=True), "--memory", "8M") as srv:
        for refused in (pki.anonymous_dir, pki.rogue_dir):
            done = nbdinfo(nbds(srv, refused))
            assert done.returncode != 0, f"{refused.name} client was served"
        good = nbdinfo(nbds(srv, pki.client_dir))
        assert good.returncode == 0, good.stderr
        assert_healthy(srv)
        assert srv.log().count("TLS handshake failed") >= 2


def test_raw_starttls_then_haggling_restarts(require_server: ServerProcess, pki: Pki) -> None:
    with RawClient(require_server.port) as plain:
        plain.handshake(ClientFlag.FIXED_NEWSTYLE)
        with starttls(plain, pki.client_dir) as c:
            # Nothing negotiated before STARTTLS survives it, so this GO without
            # structured replies gives a simple-reply session.
            size = c.go(structured=False, greet=False)
            assert size == 64 * MiB
            c.request(Cmd.WRITE, 8192, 4096, cookie=1, payload=b"\xab" * 4096)
            assert c.simple_reply()[0].error == 0
            c.request(Cmd.READ, 8192, 4096, cookie=2)
            assert c.simple_reply(4096)[1] == b"\xab" * 4096
            c.request(Cmd.READ, 0, MiB, cookie=3)  # sendfile-sized: must stay inside TLS
            assert c.simple_reply(MiB)[1] == bytes(8192) + b"\xab" * 4096 + bytes(MiB - 12288)
    assert_healthy(require_server)


def test_plaintext_after_starttls_ack_closes(require_server: ServerProcess) -> None:
    # "all further data MUST be sent and received over TLS": a client that goes on in
    # plaintext after its STARTTLS gets the ACK and then the end of the connection.
    with RawClient(require_server.port) as c:
        c.handshake()
        c.send(OptionRequest(Opt.STARTTLS, b"").pack() + OptionRequest(Opt.LIST, b"").pack())
        header = c.recv_exact(OPTION_REPLY_HEADER.size)
        assert int.from_bytes(header[12:16], "big") == Rep.ACK
        assert c.at_eof()
    assert_healthy(require_server)
