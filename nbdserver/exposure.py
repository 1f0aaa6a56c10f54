"""What a configuration exposes, and the warnings ``nbd-serve`` logs about it at startup.

Pure: a :class:`~nbdserver.config.ServerConfig` in, sentences out (the CLI logs them).
"""

from __future__ import annotations

import ipaddress

from nbdserver.config import ServerConfig
from nbdserver.negotiation import TlsMode


def is_loopback(host: str) -> bool:
    """Whether a ``--bind`` value listens on loopback only (a name other than
    ``localhost`` counts as not loopback: it may resolve anywhere)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def startup_warnings(config: ServerConfig) -> list[str]:
    """Warnings for a configuration that is allowed but risky."""
    out: list[str] = []
    if config.tcp and not is_loopback(config.bind) and config.tls is TlsMode.OFF:
        open_exports = [e.name for e in config.exports if e.allow is None]
        if open_exports:
            out.append(
                f"listening on {config.bind or 'all addresses'!r}, which is not loopback,"
                f" without TLS, and export(s) {open_exports} have no allow-list: anyone who"
                " can reach this address can read and write them in plain text; use --tls"
                " require with certificates, or allow = [...] (--allow ADDR) per export"
            )
    if config.tls is not TlsMode.OFF:
        for export in config.exports:
            if export.swap:
                out.append(
                    f"export {export.name!r} is marked swap = true and TLS is"
                    f" {config.tls.value}: nbd-client documents TLS on a swap device as"
                    " deadlock-prone (the kernel must allocate memory for the TLS layer"
                    " while it is reclaiming memory by swapping); prefer a trusted network"
                    " or an allow-list without TLS for swap"
                )
    return out
