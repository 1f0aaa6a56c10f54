"""Test certificates made with the ``openssl`` command line (Debian package ``openssl``).

Why the CLI and not a PyPI package such as trustme: it adds no dependency (openssl is on
every Debian system and in ./dev's package list), and the certificates come from a TLS
stack other than the one under test, read by libnbd's GnuTLS on the client side. EC P-256
keys keep generation fast.

:func:`make_pki` writes a CA, a server certificate for ``localhost``/``127.0.0.1``, a
client certificate signed by the CA, and one signed by an unrelated "rogue" CA, laid out
as libnbd's ``set_tls_certificates(DIR)`` wants them (``ca-cert.pem``,
``client-cert.pem``, ``client-key.pem``).
"""

from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

from nbdserver.protocol import Opt, Rep
from server.nbdtest import RawClient, require_tool

_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    #: A libnbd certificate directory with a client certificate the CA signed.
    client_dir: Path
    #: ca-cert.pem only: the client verifies the server but shows no certificate.
    anonymous_dir: Path
    #: A client certificate signed by another CA.
    rogue_dir: Path


def _run(*args: str, cwd: Path) -> None:
    proc = subprocess.run(
        [require_tool("openssl"), *args], cwd=cwd, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, f"openssl {' '.join(args)} failed: {proc.stderr}"


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    _run(
        "req", "-x509", *_KEY, "-keyout", str(key), "-out", str(cert), "-days", "3",
        "-subj", f"/CN=swapnbd test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return cert, key


def _leaf(directory: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    cert, key, csr = (directory / f"{name}-{k}.pem" for k in ("cert", "key", "csr"))
    ext = directory / f"{name}.ext"
    ext.write_text(extensions)
    _run("req", *_KEY, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}", cwd=directory)
    _run(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-out", str(cert), "-days", "3", "-extfile", str(ext),
        cwd=directory,
    )  # fmt: skip
    return cert, key


def _client_dir(directory: Path, ca_cert: Path, leaf: tuple[Path, Path] | None) -> Path:
    directory.mkdir()
    (directory / "ca-cert.pem").write_bytes(ca_cert.read_bytes())
    if leaf is not None:
        (directory / "client-cert.pem").write_bytes(leaf[0].read_bytes())
        (directory / "client-key.pem").write_bytes(leaf[1].read_bytes())
        (directory / "client-key.pem").chmod(0o600)
    return directory


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(directory, "ca")
    rogue_ca = _ca(directory, "rogue-ca")
    usage = "keyUsage=critical,digitalSignature\n"
    server = _leaf(
        directory,
        "server",
        ca,
        usage + "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    client_ext = usage + "extendedKeyUsage=clientAuth\n"
    client = _leaf(directory, "client", ca, client_ext)
    rogue = _leaf(directory, "rogue", rogue_ca, client_ext)
    return Pki(
        ca_cert=ca[0],
        server_cert=server[0],
        server_key=server[1],
        client_dir=_client_dir(directory / "client", ca[0], client),
        anonymous_dir=_client_dir(directory / "anonymous", ca[0], None),
        rogue_dir=_client_dir(directory / "rogue", ca[0], rogue),
    )


def client_context(directory: Path) -> ssl.SSLContext:
    """A Python client context from a libnbd-style certificate directory."""
    ctx = ssl.create_default_context(cafile=str(directory / "ca-cert.pem"))
    if (directory / "client-cert.pem").exists():
        ctx.load_cert_chain(directory / "client-cert.pem", directory / "client-key.pem")
    return ctx


def starttls(client: RawClient, directory: Path) -> RawClient:
    """Send NBD_OPT_STARTTLS on a raw client after its handshake; return a RawClient on
    the TLS socket (the caller keeps using that one)."""
    (reply,) = client.option(Opt.STARTTLS)
    assert reply.reply == Rep.ACK, Rep(reply.reply)
    tls = client_context(directory).wrap_socket(client.sock, server_hostname="localhost")
    return RawClient(sock=tls)
