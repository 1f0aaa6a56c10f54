"""Start and stop the NBD servers under test, each on a freshly confirmed loopback endpoint.

Theory of operation: every server exports the same file under a unique export name, on
127.0.0.1 with a port nobody else holds, or on a Unix socket in the run's private
directory. nbd-serve picks its own port (``--port 0``) and reports it in its
``--ready-file``. The peers cannot, so the harness asks the kernel for a free port
(bind port 0, read it back, close), starts the peer on it, and then *confirms* the port:
psutil must show the server's process tree listening on exactly that address, and
``nbdinfo --size`` must open the export and report the file's size. A peer that lost the
race for its port is restarted on another one.

nbd-server 3.24 handles one client and exits when started with ``-d``, so it runs as the
daemon it wants to be (fork per client) and is tracked through its pid file.
qemu-nbd takes a POSIX lock on its image; the harness runs two of them on one file (TCP and
Unix), so it opens the image with ``locking=off``.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import psutil

from bench.workloads import Transport

log = logging.getLogger(__name__)


class BenchError(Exception):
    """Root of the benchmark's errors; the message says what to do."""


class ToolMissingError(BenchError):
    """A program the benchmark needs is not installed."""


class ServerStartError(BenchError):
    """A server did not come up on its endpoint."""


class ServerKind(enum.StrEnum):
    """The servers the benchmark knows, named as in the table."""

    NBD_SERVE = "nbd-serve"
    NBDKIT = "nbdkit"
    QEMU_NBD = "qemu-nbd"
    NBD_SERVER = "nbd-server"


# Executable -> the Debian package that ships it.
DEBIAN_PACKAGES: dict[str, str] = {
    "fio": "fio",
    "nbdinfo": "libnbd-bin",
    "nbdkit": "nbdkit",
    "qemu-nbd": "qemu-utils",
    "nbd-server": "nbd-server",
}

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
PORT_ATTEMPTS = 3


def require_tool(name: str) -> str:
    """Absolute path of the executable *name*.

    Raises:
        ToolMissingError: not on PATH; the message names the package to install.
    """
    if name == ServerKind.NBD_SERVE:
        return nbd_serve_path()
    found = shutil.which(name)
    if found is None:
        pkg = DEBIAN_PACKAGES.get(name, name)
        raise ToolMissingError(f"'{name}' not found on PATH; install it: apt-get install {pkg}")
    return found


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller confirms it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(slots=True)
class RunningServer:
    """A started server and the endpoint it was confirmed on."""

    kind: ServerKind
    transport: Transport
    export: str
    uri: str
    pid: int
    """The process that owns the listening socket (the daemon for nbd-server)."""
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    """Our direct child, when the server did not daemonize."""
    stopped: bool = field(default=False)

    @property
    def label(self) -> str:
        return f"{self.kind} ({self.transport})"

    def process(self) -> psutil.Process:
        return psutil.Process(self.pid)


@dataclass(frozen=True, slots=True)
class ExportSpec:
    """What every server exports."""

    path: Path
    size: int
    workdir: Path
    """Private directory for configs, logs, sockets and ready files."""


_starts = itertools.count(1)


def _names(kind: ServerKind, transport: Transport) -> tuple[str, str]:
    """(export name, file tag) unique to this start of a server in this process: a
    restarted server never finds its predecessor's ready file, socket or log."""
    n = next(_starts)
    return f"bench-{kind.value}-{transport.value}-{os.getpid()}-{n}", f"{kind.value}-{n}"


def start_server(kind: ServerKind, transport: Transport, spec: ExportSpec) -> RunningServer:
    """Start *kind* over *transport*, confirm its endpoint, and return it.

    Raises:
        ToolMissingError: the server's program is not installed.
        ServerStartError: it did not come up (the message quotes its log).
    """
    exe = require_tool(kind.value)
    if kind is ServerKind.NBD_SERVE:
        return _start_nbd_serve(exe, transport, spec)
    last: ServerStartError | None = None
    for _attempt in range(PORT_ATTEMPTS):
        try:
            return _start_peer(exe, kind, transport, spec)
        except _PortLostError as exc:
            log.warning("%s did not come up on its port, retrying: %s", kind, exc)
            last = ServerStartError(str(exc))
    assert last is not None
    raise last


class _PortLostError(ServerStartError):
    """The chosen port was taken before the server bound it."""


def _start_peer(
    exe: str, kind: ServerKind, transport: Transport, spec: ExportSpec
) -> RunningServer:
    export, tag = _names(kind, transport)
    log_path = spec.workdir / f"{tag}.log"
    sock = spec.workdir / f"{tag}.sock"
    port = 0
    if transport is Transport.TCP:
        port = free_port()
        uri = f"nbd://127.0.0.1:{port}/{export}"
    else:
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        uri = f"nbd+unix:///{export}?socket={sock}"

    pidfile: Path | None = None
    if kind is ServerKind.NBDKIT:
        where = (
            ["-U", str(sock)]
            if transport is Transport.UNIX
            else ["-i", "127.0.0.1", "-p", str(port)]
        )
        argv = [exe, "--foreground", "--exit-with-parent", *where, "-e", export,
                "file", f"file={spec.path}"]  # fmt: skip
    elif kind is ServerKind.QEMU_NBD:
        where = (
            ["-k", str(sock)]
            if transport is Transport.UNIX
            else ["-b", "127.0.0.1", "-p", str(port)]
        )
        argv = [exe, "--cache=writeback", "--aio=threads", "--shared=8", "--persistent",
                *where, "-x", export, "--image-opts",
                _qemu_image_opts(spec.path)]  # fmt: skip
    elif kind is ServerKind.NBD_SERVER:
        conf = spec.workdir / f"{tag}.conf"
        pidfile = spec.workdir / f"{tag}.pid"
        conf.write_text(nbd_server_config(export, spec.path, transport, port=port, sock=sock))
        argv = [exe, "-C", str(conf), "-p", str(pidfile)]
    else:  # pragma: no cover - exhaustive above
        raise AssertionError(kind)

    log.debug("starting %s: %s", tag, " ".join(argv))
    with log_path.open("wb") as logf:
        popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    server = RunningServer(kind, transport, export, uri, popen.pid, log_path, popen)
    try:
        if pidfile is not None:
            # nbd-server forks into the background; the parent exits once it has bound.
            rc = popen.wait(timeout=START_TIMEOUT_S)
            server.popen = None
            server.pid = _read_pidfile(pidfile, log_path) if rc == 0 else -1
            if rc != 0:
                _fail_start(server, f"exited with status {rc}", port)
        _wait_listening(server, port=port, sock=sock)
        _check_nbdinfo(server, spec.size)
    except BaseException:
        stop_server(server)
        raise
    return server


def _qemu_image_opts(path: Path) -> str:
    # locking=off: the TCP and the Unix instance open the same image.
    return f"driver=raw,file.driver=file,file.filename={path},file.locking=off"


def nbd_server_config(
    export: str, path: Path, transport: Transport, *, port: int, sock: Path
) -> str:
    """An nbd-server INI config exporting *path* as *export* on one endpoint.

    On TCP the server listens on 127.0.0.1 only; on Unix only on the socket (no TCP
    listener at all: without ``duallisten`` nbd-server skips TCP when ``unixsock`` is set).
    """
    lines = ["[generic]"]
    if transport is Transport.TCP:
        lines += ["listenaddr = 127.0.0.1", f"port = {port}"]
    else:
        lines += [f"unixsock = {sock}"]
    lines += [f"[{export}]", f"exportname = {path}", ""]
    return "\n".join(lines)


def _read_pidfile(pidfile: Path, log_path: Path) -> int:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(pidfile.read_text().strip())
        time.sleep(0.02)
    raise ServerStartError(f"nbd-server wrote no pid file {pidfile}; log: {_tail(log_path)}")


def _tail(path: Path, limit: int = 800) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "(no log)"
    return text[-limit:] or "(empty log)"


def _alive(server: RunningServer) -> bool:
    if server.popen is not None:
        return server.popen.poll() is None
    try:
        status = psutil.Process(server.pid).status()
    except psutil.NoSuchProcess:
        return False
    return bool(status != psutil.STATUS_ZOMBIE)


def _fail_start(server: RunningServer, why: str, port: int) -> None:
    text = _tail(server.log_path)
    msg = f"{server.label} {why}; log {server.log_path}: {text}"
    if port:
        # Most likely another process took the port between free_port() and the bind
        # (nbd-server logs to syslog, so the log cannot tell): start_server retries.
        raise _PortLostError(msg)
    raise ServerStartError(msg)


def _listening(server: RunningServer, *, port: int, sock: Path) -> bool:
    try:
        root = psutil.Process(server.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for proc in procs:
        try:
            if port:
                conns = proc.net_connections(kind="tcp4")
                if any(
                    c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.ip == "127.0.0.1"
                    and c.laddr.port == port
                    for c in conns
                ):  # fmt: skip
                    return True
            else:
                conns = proc.net_connections(kind="unix")
                if any(c.laddr == str(sock) for c in conns):
                    return True
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return False


def _wait_listening(server: RunningServer, *, port: int, sock: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if _listening(server, port=port, sock=sock):
            return
        if not _alive(server):
            _fail_start(server, "exited before listening", port)
        time.sleep(0.02)
    where = f"127.0.0.1:{port}" if port else str(sock)
    _fail_start(server, f"is not listening on {where} after {START_TIMEOUT_S:g} s", port)


def _check_nbdinfo(server: RunningServer, size: int) -> None:
    nbdinfo = require_tool("nbdinfo")
    proc = subprocess.run(
        [nbdinfo, "--size", server.uri], capture_output=True, text=True, timeout=30, check=False
    )
    got = proc.stdout.strip()
    if proc.returncode != 0 or got != str(size):
        raise ServerStartError(
            f"{server.label}: 'nbdinfo --size {server.uri}' gave {got!r} (status "
            f"{proc.returncode}, expected {size}): {proc.stderr.strip()}; server log: "
            f"{_tail(server.log_path)}"
        )


def _start_nbd_serve(exe: str, transport: Transport, spec: ExportSpec) -> RunningServer:
    export, tag = _names(ServerKind.NBD_SERVE, transport)
    ready = spec.workdir / f"{tag}.ready.json"
    log_path = spec.workdir / f"{tag}.log"
    sock = spec.workdir / f"{tag}.sock"
    where = (
        ["--unix", str(sock)]
        if transport is Transport.UNIX
        else ["--bind", "127.0.0.1", "--port", "0"]
    )
    argv = [exe, str(spec.path), "--name", export, "--ready-file", str(ready), *where]
    log.debug("starting %s: %s", tag, " ".join(argv))
    with log_path.open("wb") as logf:
        popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    server = RunningServer(ServerKind.NBD_SERVE, transport, export, "", popen.pid, log_path, popen)
    try:
        info = _wait_ready_file(server, ready)
        port = 0
        listen = info.get("listen")
        if not isinstance(listen, list):
            raise ServerStartError(f"{ready}: no 'listen' list in {info!r}")
        for entry in listen:
            if transport is Transport.TCP and entry.get("kind") == "tcp":
                port = int(entry["port"])
                server.uri = f"nbd://127.0.0.1:{port}/{export}"
            elif transport is Transport.UNIX and entry.get("kind") == "unix":
                server.uri = f"nbd+unix:///{export}?socket={entry['path']}"
                sock = Path(entry["path"])
        if not server.uri:
            raise ServerStartError(f"{ready} lists no {transport} listener: {listen!r}")
        _wait_listening(server, port=port, sock=sock)
        _check_nbdinfo(server, spec.size)
    except BaseException:
        stop_server(server)
        raise
    return server


def _wait_ready_file(server: RunningServer, ready: Path) -> dict[str, object]:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if ready.exists():
            try:
                data = json.loads(ready.read_text())
            except json.JSONDecodeError as exc:
                raise ServerStartError(f"{ready} is not JSON ({exc}); the file must be "
                                       "written atomically") from exc  # fmt: skip
            if not isinstance(data, dict):
                raise ServerStartError(f"{ready} holds {data!r}, not an object")
            return data
        if not _alive(server):
            _fail_start(server, "exited before writing its ready file", 0)
        time.sleep(0.02)
    _fail_start(server, f"wrote no ready file {ready} in {START_TIMEOUT_S:g} s", 0)
    raise AssertionError("unreachable")


def stop_server(server: RunningServer) -> None:
    """SIGTERM the server's process tree, SIGKILL what is left after a grace period."""
    if server.stopped:
        return
    server.stopped = True
    procs: list[psutil.Process] = []
    try:
        root = psutil.Process(server.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    if server.popen is not None:
        try:
            server.popen.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.popen.kill()
            server.popen.wait()
    _gone, alive = psutil.wait_procs(procs, timeout=STOP_TIMEOUT_S)
    for p in alive:
        log.warning("%s: pid %d ignored SIGTERM; killing it", server.label, p.pid)
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=STOP_TIMEOUT_S)
