"""The servers under test, started through :mod:`peers.servers`, and the tools around them.

Every server exports the same file (an :class:`ExportSpec`) under a unique export name, on
127.0.0.1 at a confirmed port or on a Unix socket in the run's private directory; the
launching, confirming, retrying and stopping is :mod:`peers.servers`, shared with the
experiment. What stays here is the benchmark's own: the server list in table order, the
names of its exports, nbd-serve from the venv, fio's nbd engine and the tool versions in
the report.
"""

from __future__ import annotations

import enum
import itertools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from bench.workloads import Transport
from peers import servers as launcher
from peers.servers import (
    DEBIAN_PACKAGES,
    LauncherKind,
    RunningServer,
    ServerError,
    ToolMissingError,
    free_port,
    nbd_server_config,
)

__all__ = [
    "DEBIAN_PACKAGES",
    "BenchError",
    "ExportSpec",
    "RunningServer",
    "ServerError",
    "ServerKind",
    "ToolMissingError",
    "check_fio_nbd",
    "checkout_command",
    "free_port",
    "nbd_serve_path",
    "nbd_server_config",
    "require_tool",
    "start_server",
    "stop_server",
    "tool_version",
]


class BenchError(Exception):
    """Root of the benchmark's own errors; the message says what to do.

    Failures to find a tool or start a server are :class:`peers.servers.ServerError`
    (:class:`ToolMissingError` among them); callers catch both.
    """


class ServerKind(enum.StrEnum):
    """The servers the benchmark knows, named as in the table."""

    NBD_SERVE = "nbd-serve"
    NBDKIT = "nbdkit"
    QEMU_NBD = "qemu-nbd"
    NBD_SERVER = "nbd-server"
    NBD_SERVE_OLD = "nbd-serve-old"
    """nbd-serve from another checkout (``--old-nbd-serve DIR``): one version against
    another in the same interleaved run."""


#: Servers that run only when asked for by name (or by ``--old-nbd-serve``).
ON_REQUEST: frozenset[ServerKind] = frozenset({ServerKind.NBD_SERVE_OLD})

#: How :mod:`peers.servers` launches each: both nbd-serves alike, from different trees.
_LAUNCHER: dict[ServerKind, LauncherKind] = {
    ServerKind.NBD_SERVE: "nbd-serve",
    ServerKind.NBDKIT: "nbdkit",
    ServerKind.QEMU_NBD: "qemu-nbd",
    ServerKind.NBD_SERVER: "nbd-server",
    ServerKind.NBD_SERVE_OLD: "nbd-serve",
}


START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
PORT_ATTEMPTS = 3


def require_tool(name: str) -> str:
    """Absolute path of the executable *name* (nbd-serve: the venv's own first).

    Raises:
        ToolMissingError: not found; the message names the package to install.
    """
    if name == ServerKind.NBD_SERVE:
        return nbd_serve_path()
    return launcher.require_tool(name)


def nbd_serve_path() -> str:
    """nbd-serve from the interpreter's own venv, else from PATH."""
    beside = Path(sys.executable).parent / "nbd-serve"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nbd-serve")
    if found is None:
        raise ToolMissingError(
            "'nbd-serve' not found next to this Python nor on PATH; install the project "
            "into the venv: .venv/bin/pip install -e . (or run ./dev setup)"
        )
    return found


def checkout_command(checkout: Path) -> list[str]:
    """nbd-serve from the swapnbd checkout *checkout*, on this interpreter and its deps.

    ``-P`` keeps the working directory off ``sys.path`` and PYTHONPATH comes before the
    venv's own (editable) install, so ``nbdserver`` is the checkout's.

    Raises:
        BenchError: *checkout* holds no swapnbd source tree.
    """
    if not (checkout / "nbdserver" / "cli.py").is_file():
        raise BenchError(
            f"{checkout} is not a swapnbd checkout (no nbdserver/cli.py); make one with "
            "`git worktree add /tmp/nbdserve-old REV`"
        )
    return [
        "env",
        f"PYTHONPATH={checkout.resolve()}",
        sys.executable,
        "-P",
        "-c",
        "import sys; from nbdserver.cli import main; sys.exit(main())",
    ]


def checkout_version(checkout: Path) -> str:
    """The commit of a checkout, for the report."""
    proc = subprocess.run(
        ["git", "-C", str(checkout), "log", "-1", "--format=%h %s"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    rev = proc.stdout.strip() if proc.returncode == 0 else "unknown commit"
    return f"swapnbd checkout {checkout} at {rev}"


def check_fio_nbd(fio: str) -> None:
    """Fail unless fio was built with the nbd engine."""
    proc = subprocess.run(
        [fio, "--enghelp=nbd"], capture_output=True, text=True, timeout=30, check=False
    )
    if proc.returncode != 0 or "uri" not in proc.stdout:
        raise ToolMissingError(
            f"{fio} has no 'nbd' ioengine (fio --enghelp=nbd failed); install Debian's fio "
            "package (bookworm's fio is linked with libnbd): apt-get install fio"
        )


def tool_version(kind: ServerKind | str) -> str:
    """A one-line version string, for the report."""
    if kind == ServerKind.NBD_SERVE:
        try:
            return f"swapnbd {metadata.version('swapnbd')}"
        except metadata.PackageNotFoundError:
            return "swapnbd (not installed)"
    argv = {
        ServerKind.NBDKIT: ["nbdkit", "--version"],
        ServerKind.QEMU_NBD: ["qemu-nbd", "--version"],
        ServerKind.NBD_SERVER: ["nbd-server", "-V"],
        "fio": ["fio", "--version"],
    }[kind]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError as exc:
        return f"unknown ({exc})"
    text = (proc.stdout + proc.stderr).strip().splitlines()
    return text[0].removeprefix("This is ").strip() if text else "unknown"


@dataclass(frozen=True, slots=True)
class ExportSpec:
    """What every server exports."""

    path: Path
    size: int
    workdir: Path
    """Private directory for configs, logs, sockets and ready files."""


_starts = itertools.count(1)


def _export_name(kind: ServerKind, transport: Transport) -> str:
    """An export name unique to this start of a server in this process."""
    return f"bench-{kind.value}-{transport.value}-{os.getpid()}-{next(_starts)}"


def start_server(
    kind: ServerKind, transport: Transport, spec: ExportSpec, *, checkout: Path | None = None
) -> RunningServer:
    """Start *kind* over *transport*, confirm its endpoint, and return it.

    ``checkout`` is the swapnbd tree that :attr:`ServerKind.NBD_SERVE_OLD` runs.

    A peer on TCP that does not come up on its port is restarted on another one, up to
    ``PORT_ATTEMPTS`` times; nbd-serve picks its own port and Unix sockets are private,
    so those get one attempt.

    Raises:
        ToolMissingError: the server's program is not installed.
        ServerError: it did not come up (the message quotes its log).
    """
    ours = kind in (ServerKind.NBD_SERVE, ServerKind.NBD_SERVE_OLD)
    if kind is ServerKind.NBD_SERVE_OLD:
        if checkout is None:
            raise BenchError("nbd-serve-old needs the checkout to run: --old-nbd-serve DIR")
        command = tuple(checkout_command(checkout))
    else:
        command = (require_tool(kind.value),)
    peer_on_tcp = not ours and transport is Transport.TCP
    return launcher.start_server(
        launcher.Launch(
            kind=_LAUNCHER[kind],
            transport="tcp" if transport is Transport.TCP else "unix",
            size_bytes=spec.size,
            workdir=spec.workdir,
            backing="file",
            path=spec.path,
            names=lambda: _export_name(kind, transport),
            nbd_serve=command,
            strict_name=False,
            attempts=PORT_ATTEMPTS if peer_on_tcp else 1,
            timeout_s=START_TIMEOUT_S,
        )
    )


def stop_server(server: RunningServer) -> None:
    """SIGTERM the server's process tree, SIGKILL what is left after a grace period."""
    server.stop(STOP_TIMEOUT_S)
