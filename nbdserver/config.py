"""Typed configuration for ``nbd-serve``: a TOML file, overridden by command-line flags.

A configuration file looks like this (every key is optional; see :class:`ServerConfig`
and :class:`ExportConfig` for the meaning of each)::

    bind = "127.0.0.1"
    port = 10809
    # unix = "/run/swapnbd.sock"
    stats = "/var/log/nbd-stats.jsonl"
    stats_interval = 1.0
    log_level = "info"
    workers = 2             # processes serving connections (default: one per core, max 4)
    max_inflight = "8M"     # per-connection bound on unanswered bytes (backpressure)
    max_connections = 64    # past it new clients are refused at the handshake (default: no limit)
    poll_us = 50            # adaptive busy-poll window for one-request-at-a-time clients (0 = off)
    wake_mark = true        # on TCP, wake only once a partly received request is whole
    extended_headers = true # offer NBD_OPT_EXTENDED_HEADERS (false: compact headers only)
    sched_policy = "idle"   # normal (default), batch or idle: how the kernel schedules it
    tls = "require"         # off (default), on (clients may upgrade) or require
    tls_cert = "/etc/swapnbd/server-cert.pem"
    tls_key = "/etc/swapnbd/server-key.pem"
    tls_ca = "/etc/swapnbd/ca-cert.pem"    # optional: clients must show a certificate it signed

    [[exports]]
    name = "swap"
    description = "1 GiB RAM disk for swap experiments"
    backend = "memory"
    size = "1G"
    swap = true             # the client swaps on it (logged: TLS under swap can deadlock)
    allow = ["127.0.0.1", "10.0.0.0/8"]   # only these clients see and use it

    [[exports]]
    name = "image"
    backend = "file"
    path = "/var/lib/swapnbd/disk.img"
    read_only = true

Command-line flags override only what the user actually gave; ``FILE`` or ``--memory``
adds one more export (named by ``--name``, default ``""``).
"""

from __future__ import annotations

import ipaddress
import logging
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

from nbdserver.errors import ConfigError
from nbdserver.negotiation import IPNetwork, TlsMode
from nbdserver.sizes import parse_size

BackendKind = Literal["file", "memory"]
LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")

#: Default bound on one connection's in-flight bytes (nbdserver.server.Connection._process):
#: eight 1 MiB replies, what a QD8 1 MiB reader keeps outstanding.
DEFAULT_MAX_INFLIGHT_BYTES: Final = 8 * 1024 * 1024
#: Default upper bound of the adaptive poll window, in µs (nbdserver.fastpath.busy_poll).
DEFAULT_POLL_US: Final = 50
#: Default seconds a shutting-down server waits for clients to disconnect after ESHUTDOWN.
DEFAULT_SHUTDOWN_GRACE: Final = 2.0
#: Longest busy-poll window accepted: polling spins a core, so it stays short.
MAX_POLL_US: Final = 10_000
#: --sched-policy's names (nbdserver.sched._POLICIES maps them to the kernel's).
SCHED_POLICIES: Final = ("normal", "batch", "idle")

_SERVER_KEYS: Final = (
    "bind",
    "port",
    "unix",
    "stats",
    "stats_interval",
    "ready_file",
    "log_level",
    "workers",
    "max_inflight",
    "max_connections",
    "poll_us",
    "wake_mark",
    "extended_headers",
    "sched_policy",
    "exports",
    "exit_with_parent",
    "fault",
    "cow_dir",
    "swap_safe",
    "shutdown_grace",
    "tls",
    "tls_cert",
    "tls_key",
    "tls_ca",
)
_EXPORT_KEYS: Final = (
    "name",
    "description",
    "backend",
    "path",
    "size",
    "read_only",
    "cow",
    "allow",
    "swap",
)
#: "MUST be no longer than 4096 bytes" (doc/proto.md "Conventions", for every string).
MAX_STRING_BYTES: Final = 4096


@dataclass(frozen=True, slots=True)
class ExportConfig:
    """One export."""

    name: str = ""
    """The name clients ask for; ``""`` is the default export."""
    description: str = ""
    """Free text shown by ``nbdinfo`` (NBD_INFO_DESCRIPTION)."""
    backend: BackendKind = "memory"
    """``file`` (a regular file or block device) or ``memory`` (a sparse RAM disk)."""
    path: str | None = None
    """The file or block device of a ``file`` export."""
    size: int | None = None
    """The size in bytes of a ``memory`` export."""
    read_only: bool = False
    """Refuse every write-type request with EPERM and advertise NBD_FLAG_READ_ONLY."""
    cow: bool = False
    """Copy-on-write (``--cow``, file exports only): the file is opened read-only and
    never written; writes go to a private overlay that disappears with the server
    (nbdserver.backends.cow)."""
    allow: tuple[IPNetwork, ...] | None = None
    """Client addresses (IPs or CIDR networks) that may see and use the export; None =
    every client. Others get NBD_REP_ERR_POLICY and do not see it in NBD_OPT_LIST."""
    swap: bool = False
    """The export is a swap device: swap-safe mode defaults to on (ServerConfig.swap_safe),
    and with TLS on a warning is logged (nbd-client documents TLS under swap as
    deadlock-prone)."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The whole server."""

    bind: str = "127.0.0.1"
    """TCP address to listen on."""
    port: int = 10809
    """TCP port; 0 picks a free one (see ``ready_file``)."""
    tcp: bool = True
    """Listen on TCP at all (false when only ``--unix`` was asked for)."""
    unix: str | None = None
    """Path of a Unix socket to listen on as well."""
    exports: tuple[ExportConfig, ...] = field(default_factory=tuple)
    """The exports, in order; the first is the default when none is named ``""``."""
    stats: str | None = None
    """File that receives one JSON line of statistics per interval."""
    stats_interval: float = 1.0
    """Seconds between two statistics lines."""
    ready_file: str | None = None
    """File written atomically with the bound addresses once listening."""
    log_level: str = "info"
    """debug, info, warning, error or critical."""
    workers: int | None = None
    """Processes serving connections; None = one per usable core, at most 4. The first
    process accepts and hands each connection to the least busy one (nbdserver.workers)."""
    max_inflight: int = DEFAULT_MAX_INFLIGHT_BYTES
    """Per-connection bound, in bytes, on replies queued for sending plus WRITE payloads
    held by pending requests; past it the connection stops reading (pause_reading) until
    the client has taken enough replies."""
    max_connections: int | None = None
    """Open connections served at once, counted over all worker processes; past it a new
    client is refused during the handshake (every option answered NBD_REP_ERR_POLICY
    with the reason, NBD_OPT_EXPORT_NAME closed) and a warning is logged. None = no limit.
    """
    poll_us: int = DEFAULT_POLL_US
    """Upper bound, in microseconds, of the adaptive busy-poll window: after answering a
    lone request on the only connection of a process, read the socket for up to this
    long before going back to the event loop (0 = never poll). See
    nbdserver.fastpath.busy_poll."""
    wake_mark: bool = True
    """On TCP, set SO_RCVLOWAT to the bytes still missing while a request is partly
    received, so the kernel wakes the loop once per request instead of once per segment
    (nbdserver.fastpath.WakeMark; docs/performance.md, "Wake mark")."""
    extended_headers: bool = True
    """Offer NBD extended headers (NBD_OPT_EXTENDED_HEADERS): 32-byte requests with 64-bit
    effect lengths and extended replies. False answers the option NBD_REP_ERR_UNSUP, which
    clients take as "compact headers only"."""
    sched_policy: str = "normal"
    """Scheduling policy for every thread: ``normal`` (SCHED_OTHER, leave it as started),
    ``batch`` (SCHED_BATCH: no preemption on wake-up) or ``idle`` (SCHED_IDLE: run when a
    CPU would otherwise idle; nbdserver.sched; docs/performance.md, "Scheduling
    policy")."""
    exit_with_parent: bool = False
    """Shut down cleanly when the process that started the server exits (as nbdkit's
    --exit-with-parent), so a killed harness leaves no server behind."""
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    """Seconds after SIGTERM during which clients get ESHUTDOWN for new requests and may
    disconnect themselves (NBD_CMD_DISC); then the rest are disconnected once their
    in-flight requests are answered."""
    cow_dir: str | None = None
    """Directory for the ``--cow`` overlay files (default: next to the base image)."""
    swap_safe: bool | None = None
    """mlockall, PR_SET_IO_FLUSHER and a fixed in-flight bound (nbdserver.swapsafe);
    None = on exactly when an export has ``swap = true``."""
    fault: str | None = None
    """TEST ONLY: ``corrupt-read-after=N[,match=TEXT]`` wraps every export in
    :class:`nbdserver.backends.fault.FaultBackend`, which corrupts one READ on purpose."""
    tls: TlsMode = TlsMode.OFF
    """off: no TLS (STARTTLS refused); on: clients may upgrade with STARTTLS; require:
    every option before STARTTLS is refused with NBD_REP_ERR_TLS_REQD."""
    tls_cert: str | None = None
    """PEM file with the server's X.509 certificate (chain); needed unless tls is off."""
    tls_key: str | None = None
    """PEM file with the private key of ``tls_cert``; needed unless tls is off."""
    tls_ca: str | None = None
    """PEM file of CA certificates; when given, clients must present a certificate
    signed by one of them (CERT_REQUIRED)."""


def _type_error(where: str, key: str, value: object, expected: str) -> ConfigError:
    return ConfigError(f"{where}: {key} = {value!r} is not {expected}")


def _export_from_table(table: object, where: str) -> ExportConfig:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: each [[exports]] entry must be a table, got {table!r}")
    unknown = sorted(set(table) - set(_EXPORT_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_EXPORT_KEYS)}"
        )
    name = table.get("name", "")
    description = table.get("description", "")
    backend = table.get("backend")
    path = table.get("path")
    size = table.get("size")
    read_only = table.get("read_only", False)
    flags = {key: table.get(key, False) for key in ("cow", "swap")}
    allow = None
    if "allow" in table:
        raw_allow = table["allow"]
        if not isinstance(raw_allow, list) or not all(isinstance(a, str) for a in raw_allow):
            raise _type_error(
                where, "allow", raw_allow, 'a list such as ["127.0.0.1", "10.0.0.0/8"]'
            )
        allow = parse_allow(raw_allow, where)
    if not isinstance(name, str):
        raise _type_error(where, "name", name, "a string")
    if not isinstance(description, str):
        raise _type_error(where, "description", description, "a string")
    if backend is None:
        backend = "file" if path is not None else "memory"
    if backend not in ("file", "memory"):
        raise ConfigError(f'{where}: backend = {backend!r}; choose "file" or "memory"')
    if path is not None and not isinstance(path, str):
        raise _type_error(where, "path", path, "a string")
    if not isinstance(read_only, bool):
        raise _type_error(where, "read_only", read_only, "true or false")
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise _type_error(where, key, value, "true or false")
    size_bytes: int | None = None
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, (int, str)):
            raise _type_error(where, "size", size, 'a size such as "1G" or 1073741824')
        try:
            size_bytes = parse_size(str(size))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    kind: BackendKind = "file" if backend == "file" else "memory"
    export = ExportConfig(
        name,
        description,
        kind,
        path,
        size_bytes,
        read_only,
        cow=flags["cow"],
        allow=allow,
        swap=flags["swap"],
    )
    check_export(export, where)
    return export


def parse_allow(entries: list[str], where: str) -> tuple[IPNetwork, ...]:
    """Turn ``["127.0.0.1", "10.0.0.0/8", "::1"]`` into networks (an address is a /32 or /128).

    Raises:
        ConfigError: an entry is not an IP address or network, or the list is empty.
    """
    if not entries:
        raise ConfigError(
            f"{where}: allow = [] admits no client; remove the key to admit every client"
        )
    networks: list[IPNetwork] = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=True))
        except ValueError as exc:
            hint = ""
            if "host bits set" in str(exc):
                hint = f"; did you mean {ipaddress.ip_network(entry.strip(), strict=False)}?"
            raise ConfigError(
                f"{where}: allow entry {entry!r} is not an IP address or CIDR network{hint}"
            ) from None
    return tuple(networks)


def check_string(label: str, what: str, value: str) -> None:
    """Raise ConfigError unless ``value`` is a string the NBD protocol can carry:
    "a sequence of UTF-8 code points, which ... MUST NOT contain NUL characters ... and
    MUST be no longer than 4096 bytes" (doc/proto.md "Conventions")."""
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        # A command-line byte that is not UTF-8 arrives as a lone surrogate.
        shown = value.encode("utf-8", "surrogateescape")
        raise ConfigError(f"{label}: the {what} {shown!r} is not valid UTF-8") from None
    if "\0" in value:
        raise ConfigError(f"{label}: the {what} contains a NUL character, which NBD forbids")
    if len(encoded) > MAX_STRING_BYTES:
        raise ConfigError(
            f"{label}: the {what} is {len(encoded)} bytes long; the NBD protocol allows at"
            f" most {MAX_STRING_BYTES}"
        )


def check_export(export: ExportConfig, where: str) -> None:
    """Raise ConfigError when an export's name or description cannot go on the wire or
    the export lacks what its backend needs."""
    label = f"{where}: export {export.name!r}"
    check_string(label, "name", export.name)
    check_string(label, "description", export.description)
    if export.backend == "memory":
        if export.size is None:
            raise ConfigError(f'{label}: a memory export needs a size, e.g. size = "1G"')
        if export.path is not None:
            raise ConfigError(f"{label}: a memory export takes a size, not path = {export.path!r}")
        if export.cow:
            raise ConfigError(f"{label}: --cow (cow = true) needs a file export, not memory")
    else:
        if export.path is None:
            raise ConfigError(f'{label}: a file export needs path = "/some/file"')
        if export.size is not None:
            raise ConfigError(
                f"{label}: a file export takes its size from the file; remove size ="
                f" {export.size} (resize with `truncate -s SIZE {export.path}`)"
            )


#: Reads one config-file value: (file, key, value) -> the field's value, or ConfigError.
_Reader = Callable[[str, str, Any], Any]


def _as_given(where: str, key: str, value: Any) -> Any:
    """For a value check_server checks, as it checks the command line's."""
    return value


def _of_type(kind: type, expected: str) -> _Reader:
    def read(where: str, key: str, value: Any) -> Any:
        if not isinstance(value, kind):
            raise _type_error(where, key, value, expected)
        return value

    return read


def _tls(where: str, key: str, value: Any) -> TlsMode:
    return parse_tls_mode(value, where)


def _size(where: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _type_error(where, key, value, 'a size such as "8M"')
    return parse_size(str(value))


_STRING: Final = _of_type(str, "a string")
_FLAG: Final = _of_type(bool, "true or false")
#: How load_file reads each server key but ``exports``, in the order it checks them (the
#: first bad value is the one reported).
_FILE_READERS: Final[dict[str, _Reader]] = {
    "bind": _STRING,
    "unix": _STRING,
    "stats": _STRING,
    "ready_file": _STRING,
    "log_level": _STRING,
    "cow_dir": _STRING,
    "tls_cert": _STRING,
    "tls_key": _STRING,
    "tls_ca": _STRING,
    "tls": _tls,
    "port": _as_given,
    "stats_interval": _as_given,
    "shutdown_grace": _as_given,
    "workers": _as_given,
    "poll_us": _as_given,
    "max_connections": _as_given,
    "sched_policy": _as_given,
    "wake_mark": _FLAG,
    "extended_headers": _FLAG,
    "swap_safe": _FLAG,
    "exit_with_parent": _FLAG,
    "fault": _STRING,
    "max_inflight": _size,
}


def load_file(path: str) -> dict[str, Any]:
    """Read and check a TOML configuration file; return its keys as config fields."""
    try:
        with Path(path).open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(_SERVER_KEYS))
    if unknown:
        raise ConfigError(
            f"config file {path!r}: unknown key(s) {', '.join(unknown)};"
            f" allowed: {', '.join(_SERVER_KEYS)}"
        )
    out = {key: read(path, key, data[key]) for key, read in _FILE_READERS.items() if key in data}
    raw_exports = data.get("exports", [])
    if not isinstance(raw_exports, list):
        raise ConfigError(f"config file {path!r}: exports must be an array of tables ([[exports]])")
    out["exports"] = tuple(
        _export_from_table(t, f"{path} [[exports]] #{i + 1}") for i, t in enumerate(raw_exports)
    )
    return out


def parse_tls_mode(value: object, where: str) -> TlsMode:
    modes = [m.value for m in TlsMode]
    if value not in modes:
        raise ConfigError(f"{where}: tls = {value!r}; choose one of {', '.join(modes)}")
    return TlsMode(value)


def build_config(cli: dict[str, Any]) -> ServerConfig:
    """Combine the config file (if ``cli["config"]``) with the flags the user gave.

    ``cli`` holds only the options present on the command line (argparse SUPPRESS), so
    a flag overrides the file exactly when it was typed.
    """
    values: dict[str, Any] = {}
    if "config" in cli:
        values = load_file(cli["config"])
    for key in (
        "bind",
        "port",
        "unix",
        "stats",
        "stats_interval",
        "ready_file",
        "log_level",
        "workers",
        "max_connections",
        "poll_us",
        "wake_mark",
        "extended_headers",
        "sched_policy",
        "exit_with_parent",
        "fault",
        "cow_dir",
        "swap_safe",
        "shutdown_grace",
        "tls_cert",
        "tls_key",
        "tls_ca",
    ):
        if key in cli:
            values[key] = cli[key]
    if "tls" in cli:
        values["tls"] = parse_tls_mode(cli["tls"], "--tls")
    if "max_inflight" in cli:
        values["max_inflight"] = parse_size(cli["max_inflight"])
    exports = list(values.pop("exports", ()))
    source = "file" if "file" in cli else "memory" if "memory" in cli else None
    if source is not None:
        if "file" in cli and "memory" in cli:
            raise ConfigError("give either FILE or --memory SIZE, not both")
        size = parse_size(cli["memory"]) if source == "memory" else None
        export = ExportConfig(
            name=cli.get("name", ""),
            description=cli.get("description", ""),
            backend="file" if source == "file" else "memory",
            path=cli.get("file"),
            size=size,
            read_only=cli.get("read_only", False),
            cow=cli.get("cow", False),
            allow=_cli_allow(cli["allow"]) if "allow" in cli else None,
        )
        check_export(export, "command line")
        exports.append(export)
    else:
        given = [f for f in ("name", "description", "read_only", "cow", "allow") if f in cli]
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise ConfigError(
                f"{flags} describe the export given by FILE or --memory SIZE, and neither was"
                " given; put per-export settings in the [[exports]] tables of --config"
            )
    if not exports:
        raise ConfigError(
            "nothing to serve: give FILE, --memory SIZE, or --config with [[exports]] tables"
        )
    names = [e.name for e in exports]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"export name(s) {duplicates} are defined more than once")
    if "unix" in values and "bind" not in values and "port" not in values:
        values["tcp"] = False
    config = replace(ServerConfig(), exports=tuple(exports), **values)
    check_server(config)
    return config


def _cli_allow(values: list[str]) -> tuple[IPNetwork, ...]:
    """``--allow A,B --allow C`` -> networks."""
    entries = [e for value in values for e in value.split(",") if e.strip()]
    return parse_allow(entries, "--allow")


def check_tls(config: ServerConfig) -> None:
    """TLS on needs a certificate and key; certificate flags without TLS are a mistake."""
    given = [
        flag
        for flag, value in (
            ("--tls-cert", config.tls_cert),
            ("--tls-key", config.tls_key),
            ("--tls-ca", config.tls_ca),
        )
        if value is not None
    ]
    if config.tls is TlsMode.OFF:
        if given:
            raise ConfigError(
                f"{', '.join(given)} given but TLS is off; add --tls on or --tls require"
            )
        return
    missing = [
        flag
        for flag, value in (("--tls-cert", config.tls_cert), ("--tls-key", config.tls_key))
        if value is None
    ]
    if missing:
        raise ConfigError(
            f"--tls {config.tls.value} needs {' and '.join(missing)} (PEM files; tls_cert and"
            " tls_key in the config file)"
        )


def check_server(config: ServerConfig) -> None:
    port = config.port
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port {port!r} is not a TCP port: use 0..65535 (0 = any free port)")
    interval = config.stats_interval
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval <= 0:
        raise ConfigError(f"stats interval {interval!r} must be a number of seconds above 0")
    grace = config.shutdown_grace
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 <= grace <= 3600:
        raise ConfigError(f"shutdown grace {grace!r} must be a number of seconds from 0 to 3600")
    workers = config.workers
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 64
    ):
        raise ConfigError(f"workers {workers!r} must be a whole number from 1 to 64")
    limit = config.max_connections
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1_000_000
    ):
        raise ConfigError(
            f"max connections {limit!r} must be a whole number from 1 to 1000000"
            " (leave it out for no limit)"
        )
    poll = config.poll_us
    if isinstance(poll, bool) or not isinstance(poll, int) or not 0 <= poll <= MAX_POLL_US:
        raise ConfigError(
            f"poll_us {poll!r} must be a whole number of microseconds from 0 (off) to {MAX_POLL_US}"
        )
    if config.sched_policy not in SCHED_POLICIES:
        raise ConfigError(
            f"sched_policy {config.sched_policy!r} must be one of {', '.join(SCHED_POLICIES)}"
        )
    if config.max_inflight < 64 * 1024:
        raise ConfigError(
            f"max inflight {config.max_inflight} bytes is too small: give at least 64K"
        )
    if config.fault is not None:
        from nbdserver.backends.fault import parse_fault  # noqa: PLC0415 - test-only path

        parse_fault(config.fault)
    check_tls(config)
    if config.log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"log level {config.log_level!r} is not one of {', '.join(LOG_LEVELS)}")


def log_level_number(name: str) -> int:
    level: int = getattr(logging, name.upper())
    return level
