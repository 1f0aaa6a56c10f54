"""TLS for the asyncio adapter: the server's context (stdlib :mod:`ssl`), built once at
startup from ``--tls-cert``, ``--tls-key`` and ``--tls-ca``, and two small facts about a
connection (its peer address for allow-lists, its TLS session for the log).

Every problem with those files becomes a :class:`~nbdserver.errors.ConfigError` that names
the file and says what to do, so ``nbd-serve`` exits 2 before it listens instead of
failing each client's handshake later.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import ssl
from pathlib import Path

from nbdserver.errors import ConfigError
from nbdserver.negotiation import IPAddress

_CERT_MARK = b"-----BEGIN CERTIFICATE-----"
_KEY_MARK = b"PRIVATE KEY-----"


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} file {path!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} file {path!r} is a directory; give the PEM file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path!r}: {exc.strerror}") from None


def server_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """An ``ssl.SSLContext`` for the server side of NBD_OPT_STARTTLS.

    Args:
        cert: PEM file with the server certificate (and any intermediates).
        key: PEM file with its unencrypted private key.
        ca: PEM file (or OpenSSL hashed directory) of CAs that sign client certificates;
            when given, a client without such a certificate fails the handshake.

    Raises:
        ConfigError: a file is missing, unreadable, not PEM, or the key does not match.
    """
    if _CERT_MARK not in _read(cert, "TLS certificate"):
        raise ConfigError(
            f"TLS certificate file {cert!r} holds no PEM certificate ({_CERT_MARK!r})"
        )
    if _KEY_MARK not in _read(key, "TLS key"):
        raise ConfigError(f"TLS key file {key!r} holds no PEM private key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # "NBD implementations supporting TLS MUST support TLS version 1.2 ... MAY support
    # older versions but SHOULD NOT do so by default" (doc/proto.md "TLS versions").
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2

    def no_passphrase() -> str:
        raise ConfigError(
            f"TLS key file {key!r} is encrypted; nbd-serve needs an unencrypted key"
            f" (e.g. openssl pkey -in {key} -out plain-key.pem, then chmod 600 it)"
        )

    try:
        ctx.load_cert_chain(cert, key, password=no_passphrase)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"cannot use TLS certificate {cert!r} with key {key!r}: {exc.reason or exc};"
            " check that both are PEM and that the key belongs to the certificate"
        ) from None
    if ca is not None:
        try:
            if os.path.isdir(ca):
                ctx.load_verify_locations(capath=ca)
            else:
                if _CERT_MARK not in _read(ca, "TLS CA"):
                    raise ConfigError(f"TLS CA file {ca!r} holds no PEM certificate")
                ctx.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise ConfigError(f"cannot load TLS CA file {ca!r}: {exc.reason or exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def peer_address(transport: asyncio.BaseTransport) -> IPAddress | None:
    """The client's IP address, for allow-lists (None on a Unix socket)."""
    peer = transport.get_extra_info("peername")
    if not isinstance(peer, tuple):
        return None
    return ipaddress.ip_address(str(peer[0]).partition("%")[0])  # drop an IPv6 zone


def describe_tls(transport: asyncio.BaseTransport) -> str:
    """``TLSv1.3 TLS_AES_256_GCM_SHA384, client 'name'`` for the log."""
    obj = transport.get_extra_info("ssl_object")
    if obj is None:
        return "no TLS object"
    cipher = obj.cipher()
    who = "no client certificate"
    peer = transport.get_extra_info("peercert")
    if peer:
        subject = dict(item for rdn in peer.get("subject", ()) for item in rdn)
        who = f"client {subject.get('commonName', '?')!r}"
    return f"{obj.version()} {cipher[0] if cipher else '?'}, {who}"


async def upgrade(
    raw: asyncio.Transport,
    protocol: asyncio.BaseProtocol,
    ctx: ssl.SSLContext,
    write_limit: int,
    log: logging.LoggerAdapter[logging.Logger],
) -> asyncio.Transport | None:
    """The server side of the TLS handshake once the STARTTLS ACK is queued (doc/proto.md
    "TLS support"): the TLS transport, with ``write_limit`` as its high-water mark, or
    None when the handshake failed (logged)."""
    try:
        tls = await asyncio.get_running_loop().start_tls(raw, protocol, ctx, server_side=True)
    except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
        # "If the handshake is unsuccessful ... the server MUST terminate the session":
        # the TLS layer has closed the transport, and reports connection_lost to us.
        log.warning("TLS handshake failed: %s", exc)
        return None
    if tls is None:
        return None
    tls.set_write_buffer_limits(high=write_limit, low=write_limit // 2)
    log.info("TLS established: %s", describe_tls(tls))
    return tls
