"""Launchers for NBD servers on loopback, used by the experiment and by bench.

Theory of operation
-------------------
Issue 5 records what a fixed port does: a second guest on the same machine connected
to the first run's server and wrote its swap into the first run's export.  So every
launcher here

* listens on 127.0.0.1 only, on a port that is free *and confirmed as ours*, or on a
  Unix socket in the caller's private directory: nbd-serve binds port 0 itself and
  reports its endpoint in its ``--ready-file``; the peers (nbdkit, nbd-server, qemu-nbd)
  cannot, so we pick a free port, start them, and check with psutil that *this* pid
  listens on 127.0.0.1:PORT (or on the socket) and that no other pid does, restarting
  on another port and under a fresh name when the check fails;
* exports under a name the caller chooses per attempt (the experiment: a fresh random
  ``secrets.token_hex`` that only its guest is told);
* proves the export answers with an ``nbdinfo --size`` handshake on that name and size.

nbd-server 3.24 handles one client and exits when started with ``-d``, so it runs as the
daemon it wants to be (fork per client) and is tracked through its pid file.  qemu-nbd
takes a POSIX lock on its image; bench runs two of them on one file (TCP and Unix), so it
opens the image with ``locking=off``.

Each server runs in its own session so that :meth:`RunningServer.kill` and
:meth:`RunningServer.stop` take down the whole process group and process tree at once
(nbd-server forks a child per connection), which the "server dies mid-run" test uses.

No server outlives the process that launched it, even when that process is SIGKILLed
(:mod:`peers.lifeline`): nbd-serve and nbdkit run with ``--exit-with-parent``, every direct
child gets ``PR_SET_PDEATHSIG`` when launched from the main thread, and the nbd-server
daemon, which forks away from both, is watched by a ``peers.lifeline`` guard process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn, get_args

import psutil

from peers import lifeline

log = logging.getLogger(__name__)

ServerKind = Literal["nbd-serve", "nbdkit", "nbd-server"]
"""The servers a run can swap to."""
SERVER_KINDS: tuple[str, ...] = get_args(ServerKind)
LauncherKind = Literal["nbd-serve", "nbdkit", "nbd-server", "qemu-nbd"]
"""Every server this module can launch (bench also compares qemu-nbd)."""
LAUNCHER_KINDS: tuple[str, ...] = get_args(LauncherKind)
Backing = Literal["memory", "file"]
Transport = Literal["tcp", "unix"]

HOST = "127.0.0.1"
START_ATTEMPTS = 5
READY_TIMEOUT_S = 30.0

# Executable -> the Debian package that ships it.
DEBIAN_PACKAGES: dict[str, str] = {
    "fio": "fio",
    "nbdinfo": "libnbd-bin",
    "nbdkit": "nbdkit",
    "qemu-nbd": "qemu-utils",
    "nbd-server": "nbd-server",
    "taskset": "util-linux",
}


class ServerError(Exception):
    """A server could not be started, or did not answer on its endpoint."""


class ToolMissingError(ServerError):
    """A program the launcher needs is not installed; the message names the package."""


class _UnconfirmedError(ServerError):
    """The server did not come up on its endpoint (lost its port, another pid listens
    there, or the export did not answer as expected): worth another attempt."""


@dataclass(slots=True)
class RunningServer:
    """One started server; ``stop()`` or ``kill()`` it when the run ends."""

    kind: str
    port: int
    """0 on the Unix transport."""
    export_name: str
    size_bytes: int
    pid: int
    """The process that owns the listening socket (the daemon for nbd-server)."""
    argv: list[str]
    backing: Backing
    workdir: Path
    transport: Transport = "tcp"
    socket_path: Path | None = None
    log_path: Path | None = None
    stats_path: Path | None = None
    backing_path: Path | None = None
    """A sparse file the launcher created for this server; removed by ``stop()``."""
    host: str = HOST
    popen: subprocess.Popen[bytes] | None = None
    """Our direct child, when the server did not daemonize."""
    exit_status: int | None = None
    killed: bool = False
    frozen: bool = False
    stopped: bool = False
    guard: subprocess.Popen[bytes] | None = None
    """The peers.lifeline watcher of a daemonized server (nbd-server), reaped by stop/kill."""

    @property
    def uri(self) -> str:
        if self.transport == "unix":
            return f"nbd+unix:///{self.export_name}?socket={self.socket_path}"
        return f"nbd://{self.host}:{self.port}/{self.export_name}"

    @property
    def label(self) -> str:
        return f"{self.kind} ({self.transport})"

    def process(self) -> psutil.Process:
        return psutil.Process(self.pid)

    def alive(self) -> bool:
        if self.popen is not None and self.popen.pid == self.pid:
            return self.popen.poll() is None
        if self.pid <= 1:
            return False
        try:
            status: str = psutil.Process(self.pid).status()
            return bool(status != psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return False

    def _tree(self) -> list[psutil.Process]:
        if self.pid <= 1:  # not started yet (or a placeholder): nothing of ours to signal
            return []
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _signal(self, procs: list[psutil.Process], sig: signal.Signals) -> None:
        if self.pid <= 1:  # never signal init or "every process"
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(sig)

    def _wait(self, procs: list[psutil.Process], timeout: float) -> bool:
        """Wait for the server and the processes it had forked; True when all are gone."""
        deadline = time.monotonic() + timeout
        if self.popen is not None:
            try:
                self.exit_status = self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return False
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        _gone, left = psutil.wait_procs(procs, timeout=max(deadline - time.monotonic(), 0.0))
        return not left and not self.alive()

    def kill(self) -> None:
        """SIGKILL the server and everything it forked, now (no final stats line)."""
        self.killed = True
        procs = self._tree()
        self._signal(procs, signal.SIGKILL)
        self._wait(procs, 10.0)
        self._reap_guard()

    def _reap_guard(self) -> None:
        """The guard exits by itself once its server is gone; reap it (or end it)."""
        if self.guard is None:
            return
        try:
            self.guard.wait(timeout=3.0)
        except subprocess.TimeoutExpired:
            self.guard.kill()
            self.guard.wait()

    def freeze(self) -> None:
        """SIGSTOP the server and everything it forked: its sockets stay open and nothing
        is answered (a server that hangs, not one that dies; :meth:`stop` resumes it)."""
        self.frozen = True
        self._signal(self._tree(), signal.SIGSTOP)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (nbd-serve writes its final stats line), then SIGKILL after ``timeout``.

        A second call does nothing: the pid may belong to another process by then.
        """
        if self.stopped:
            return
        self.stopped = True
        procs = self._tree()
        if procs:
            self._signal(procs, signal.SIGTERM)
            if self.frozen:  # a stopped process acts on SIGTERM only once continued
                self._signal(procs, signal.SIGCONT)
            if not self._wait(procs, timeout):
                log.warning("%s: pid %d ignored SIGTERM; killing it", self.label, self.pid)
                self._signal(procs, signal.SIGKILL)
                self._wait(procs, 5.0)
        elif self.popen is not None:
            self.exit_status = self.popen.wait()
        self._reap_guard()
        if self.backing_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.backing_path.unlink()

    def describe(self) -> dict[str, Any]:
        """What run.json records about the server."""
        return {
            "kind": self.kind,
            "host": self.host,
            "port": self.port,
            "export_name": self.export_name,
            "size_bytes": self.size_bytes,
            "backing": self.backing,
            "pid": self.pid,
            "argv": self.argv,
            "exit_status": self.exit_status,
            "killed": self.killed,
            "frozen": self.frozen,
            "log": str(self.log_path) if self.log_path is not None else None,
        }


def require_tool(name: str) -> str:
    """Absolute path of the executable *name*.

    Raises:
        ToolMissingError: not on PATH; the message names the package to install.
    """
    found = shutil.which(name)
    if found is None:
        pkg = DEBIAN_PACKAGES.get(name, name)
        raise ToolMissingError(f"'{name}' not found on PATH; install it: apt-get install {pkg}")
    return found


def free_port(host: str = HOST) -> int:
    """A port the kernel considers free right now (a peer may still take it: we confirm later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def listening_pids(host: str, port: int) -> set[int]:
    """Pids that hold a LISTEN socket on host:port (needs to see other processes' sockets)."""
    pids: set[int] = set()
    for conn in psutil.net_connections(kind="tcp"):
        if (
            conn.status == psutil.CONN_LISTEN
            and conn.laddr
            and conn.pid is not None
            and conn.laddr.port == port
            and conn.laddr.ip in (host, "0.0.0.0", "::")
        ):
            pids.add(conn.pid)
    return pids


def _connections(pid: int, kind: str) -> list[Any]:
    proc = psutil.Process(pid)
    if hasattr(proc, "net_connections"):
        return list(proc.net_connections(kind=kind))
    return list(proc.connections(kind=kind))


def pid_listens(pid: int, host: str, port: int) -> bool:
    """True when process ``pid`` itself listens on host:port."""
    try:
        conns = _connections(pid, "tcp")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return any(
        c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.ip == host and c.laddr.port == port
        for c in conns
    )


def pid_listens_unix(pid: int, path: Path) -> bool:
    """True when process ``pid`` itself holds the Unix socket ``path``."""
    try:
        conns = _connections(pid, "unix")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return any(c.laddr == str(path) for c in conns)


def nbdinfo_size(uri: str, timeout: float = 20.0) -> int:
    """Handshake with ``uri`` through nbdinfo and return the export size.

    Raises:
        ServerError: nbdinfo is missing, the handshake fails or prints no size.
    """
    exe = require_tool("nbdinfo")
    try:
        out = subprocess.run(
            [exe, "--size", uri], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ServerError(f"nbdinfo {uri} did not answer within {timeout:.0f}s") from exc
    got = out.stdout.strip()
    if out.returncode != 0 or not got.isdigit():
        raise ServerError(
            f"'nbdinfo --size {uri}' gave {got!r} (status {out.returncode}): {out.stderr.strip()}"
        )
    return int(got)


def log_tail(path: Path | None, limit: int = 800) -> str:
    """The end of a server log, on one line, for error messages."""
    if path is None:
        return "(no log)"
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "(no log)"
    return " | ".join(text[-limit:].splitlines()) or "(empty log)"


def nbd_serve_available() -> bool:
    """The project's server exists in this checkout (nbdserver/cli.py importable)."""
    probe = subprocess.run(
        [sys.executable, "-c", "import nbdserver.cli"], capture_output=True, check=False
    )
    return probe.returncode == 0


def nbd_serve_command() -> list[str]:
    """nbd-serve of this checkout, through this interpreter.

    The interpreter makes it work from a venv without the script on PATH; the path makes it
    this checkout's server even when the venv's editable install points at another one (a
    git worktree sharing the main checkout's venv).
    """
    checkout = str(Path(__file__).resolve().parents[1])
    code = (
        f"import sys; sys.path.insert(0, {checkout!r}); "
        "from nbdserver.cli import main; sys.exit(main())"
    )
    return [sys.executable, "-c", code]


def nbd_server_config(
    export: str,
    path: Path,
    transport: Transport,
    *,
    port: int,
    sock: Path,
    options: Sequence[str] = (),
) -> str:
    """An nbd-server INI config exporting *path* as *export* on one endpoint.

    On TCP the server listens on 127.0.0.1 only; on Unix only on the socket (no TCP
    listener at all: without ``duallisten`` nbd-server skips TCP when ``unixsock`` is set).
    ``options`` are extra lines of the export's section (``flush = true``).
    """
    lines = ["[generic]"]
    if transport == "tcp":
        lines += [f"listenaddr = {HOST}", f"port = {port}"]
    else:
        lines += [f"unixsock = {sock}"]
    lines += [f"[{export}]", f"exportname = {path}", *options, ""]
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Launch:
    """How to start one server; :func:`start_server` turns it into a confirmed endpoint."""

    kind: LauncherKind
    transport: Transport
    size_bytes: int
    """Export size; nbdinfo must report exactly this."""
    workdir: Path
    """Private directory for configs, logs, sockets, pid, ready and export files."""
    backing: Backing = "memory"
    path: Path | None = None
    """File to export; with ``backing="file"`` and no path, a sparse file is created
    per attempt and removed when the server stops."""
    names: Callable[[], str] = field(default=lambda: secrets.token_hex(16))
    """A fresh export name for every attempt."""
    nbd_serve: Sequence[str] | None = None
    """How to run nbd-serve (default :func:`nbd_serve_command`)."""
    nbd_serve_args: Sequence[str] = ()
    """Extra nbd-serve flags, such as ``--stats FILE``."""
    strict_name: bool = True
    """nbdkit refuses every export name but ours (the exportname filter)."""
    nbd_server_options: Sequence[str] = ()
    attempts: int = START_ATTEMPTS
    timeout_s: float = READY_TIMEOUT_S


_starts = itertools.count(1)


def start_server(how: Launch) -> RunningServer:
    """Start a server as *how* says and confirm its endpoint; retry on another port and
    under a fresh name while the endpoint cannot be confirmed.

    Raises:
        ToolMissingError: the server's program or nbdinfo is not installed.
        ServerError: it did not come up (the message quotes its log).
    """
    if how.kind not in LAUNCHER_KINDS:
        raise ServerError(
            f"unknown server kind {how.kind!r}; choose one of {', '.join(LAUNCHER_KINDS)}"
        )
    if how.backing == "memory" and how.path is not None:
        raise ServerError(f"a memory export has no file, but path={how.path} was given")
    if how.backing == "memory" and how.kind in ("nbd-server", "qemu-nbd"):
        raise ServerError(f"{how.kind} only serves files; use the file backing")
    require_tool("nbdinfo")
    # nbd-server daemonizes into "/": a relative config, pid file or export path (a
    # matrix run with --out results/x) would name files it can never find.
    how = dataclasses.replace(
        how,
        workdir=how.workdir.resolve(),
        path=None if how.path is None else how.path.resolve(),
    )
    exe = list(how.nbd_serve or nbd_serve_command()) if how.kind == "nbd-serve" else None
    if exe is None:
        exe = [require_tool(how.kind)]
    last_error = "no attempt made"
    for attempt in range(1, how.attempts + 1):
        try:
            server = _start_once(how, exe)
        except _UnconfirmedError as exc:
            last_error = str(exc)
            log.warning("%s attempt %d failed: %s", how.kind, attempt, last_error)
            continue
        log.info("%s listening on %s (pid %d)", how.kind, server.uri, server.pid)
        return server
    if how.attempts == 1:
        raise ServerError(last_error)
    raise ServerError(f"could not start {how.kind} after {how.attempts} attempts: {last_error}")


def _start_once(how: Launch, exe: list[str]) -> RunningServer:
    name = how.names()
    tag = f"{how.kind}-{os.getpid()}-{next(_starts)}"
    sock = how.workdir / f"{tag}.sock"
    port = free_port() if how.transport == "tcp" and how.kind != "nbd-serve" else 0
    if how.transport == "unix":
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
    owned: Path | None = None
    path = how.path
    if how.backing == "file" and path is None:
        owned = path = how.workdir / f"export-{tag}.img"
        with open(path, "wb") as f:
            f.truncate(how.size_bytes)
    server = RunningServer(
        kind=how.kind,
        transport=how.transport,
        export_name=name,
        size_bytes=how.size_bytes,
        pid=0,
        argv=[],
        backing=how.backing,
        workdir=how.workdir,
        port=port,
        socket_path=sock if how.transport == "unix" else None,
        backing_path=owned,
    )
    try:
        _spawn(server, how, exe, path, tag)
        _confirm(server, how)
    except BaseException:
        server.stop()
        raise
    return server


def _argv(how: Launch, server: RunningServer, *, exe: list[str], path: Path | None, tag: str
          ) -> list[str]:  # fmt: skip
    """The command line of one attempt; nbd-server's config is written here too."""
    name, port, sock = server.export_name, server.port, how.workdir / f"{tag}.sock"
    unix = how.transport == "unix"
    if how.kind == "nbd-serve":
        where = ["--unix", str(sock)] if unix else ["--bind", HOST, "--port", "0"]
        ready = how.workdir / f"{tag}.ready.json"
        export = ["--memory", str(how.size_bytes)] if path is None else [str(path)]
        # This checkout's nbd-serve dies with us; another build (bench's --nbd-serve of
        # an older commit) may not know the flag, and keeps PDEATHSIG only.
        tie = ["--exit-with-parent"] if how.nbd_serve is None else []
        return [*exe, *where, "--ready-file", str(ready), "--name", name,
                *tie, *how.nbd_serve_args, *export]  # fmt: skip
    if how.kind == "nbdkit":
        where = ["-U", str(sock)] if unix else ["--ipaddr", HOST, "--port", str(port)]
        plugin = ["memory", str(how.size_bytes)] if path is None else ["file", f"file={path}"]
        if how.strict_name:
            named = ["--filter=exportname", *plugin, f"exportname={name}",
                     "exportname-strict=true"]  # fmt: skip
        else:
            named = ["-e", name, *plugin]
        return [*exe, "--foreground", "--exit-with-parent", *where, *named]
    if how.kind == "qemu-nbd":
        where = ["-k", str(sock)] if unix else ["-b", HOST, "-p", str(port)]
        # locking=off: bench's TCP and Unix instances open the same image.
        opts = f"driver=raw,file.driver=file,file.filename={path},file.locking=off"
        return [*exe, "--cache=writeback", "--aio=threads", "--shared=8", "--persistent",
                *where, "-x", name, "--image-opts", opts]  # fmt: skip
    # nbd-server
    conf = how.workdir / f"{tag}.conf"
    assert path is not None
    conf.write_text(
        nbd_server_config(
            name, path, how.transport, port=port, sock=sock, options=how.nbd_server_options
        )
    )
    return [*exe, "-C", str(conf), "-p", str(how.workdir / f"{tag}.pid")]


def _spawn(server: RunningServer, how: Launch, exe: list[str], path: Path | None, tag: str) -> None:
    server.argv = _argv(how, server, exe=exe, path=path, tag=tag)
    log.debug("starting %s: %s", tag, " ".join(server.argv))
    server.log_path = how.workdir / f"{tag}.log"
    with server.log_path.open("wb") as logf:
        server.popen = subprocess.Popen(
            server.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lifeline.parent_death_signal(signal.SIGTERM),  # noqa: PLW1509 - prctl only
        )  # fmt: skip
    server.pid = server.popen.pid
    if how.kind == "nbd-server":
        # nbd-server forks into the background; the parent exits once it has bound.
        try:
            rc = server.popen.wait(timeout=how.timeout_s)
        except subprocess.TimeoutExpired:
            _fail(server, f"did not daemonize within {how.timeout_s:g} s")
        server.exit_status = rc
        if rc != 0:
            # Most likely another process took the port between free_port() and the
            # bind (nbd-server logs to syslog, so the log cannot tell): retried.
            _fail(server, f"exited with status {rc}")
        server.popen = None
        server.pid = _read_pidfile(server, how.workdir / f"{tag}.pid", how.timeout_s)
        server.guard = lifeline.guard([server.pid])  # the daemon cannot carry PDEATHSIG
    elif how.kind == "nbd-serve":
        _read_ready_file(server, how.workdir / f"{tag}.ready.json", how.timeout_s)


def _fail(server: RunningServer, why: str, *, retry: bool = True) -> NoReturn:
    msg = f"{server.label} {why}; log {server.log_path}: {log_tail(server.log_path)}"
    raise (_UnconfirmedError if retry else ServerError)(msg)


def _read_pidfile(server: RunningServer, pidfile: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
            pid = int(pidfile.read_text().split()[0])
            if pid > 1:
                return pid
        time.sleep(0.02)
    _fail(server, f"wrote no pid file {pidfile} in {timeout:g} s", retry=False)


def _read_ready_file(server: RunningServer, ready: Path, timeout: float) -> None:
    """Wait for nbd-serve's ready file and take its endpoint from it."""
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if not server.alive():
            status = server.popen.poll() if server.popen is not None else None
            _fail(server, f"exited (status {status}) before writing its ready file", retry=False)
        if time.monotonic() >= deadline:
            _fail(server, f"wrote no ready file {ready} in {timeout:g} s", retry=False)
        time.sleep(0.02)
    try:
        info = json.loads(ready.read_text())
    except json.JSONDecodeError as exc:
        raise ServerError(
            f"{ready} is not JSON ({exc}); the file must be written atomically"
        ) from exc
    if not isinstance(info, dict):
        raise ServerError(f"{ready} holds {info!r}, not an object")
    listen = info.get("listen")
    if not isinstance(listen, list):
        raise ServerError(f"{ready}: no 'listen' list in {info!r}")
    for entry in listen:
        if server.transport == "tcp" and entry.get("kind") == "tcp":
            server.port = int(entry["port"])
            return
        if server.transport == "unix" and entry.get("kind") == "unix":
            server.socket_path = Path(entry["path"])
            return
    raise ServerError(f"{ready} lists no {server.transport} listener: {listen!r}")


def _listening(server: RunningServer) -> bool:
    if server.transport == "tcp":
        return pid_listens(server.pid, server.host, server.port)
    assert server.socket_path is not None
    return pid_listens_unix(server.pid, server.socket_path)


def _confirm(server: RunningServer, how: Launch) -> None:
    """This pid, and no other, listens on the endpoint, and the export has our size."""
    where = f"{server.host}:{server.port}" if server.transport == "tcp" else server.socket_path
    deadline = time.monotonic() + how.timeout_s
    while not _listening(server):
        if not server.alive():
            _fail(server, "exited before listening")
        if time.monotonic() >= deadline:
            _fail(server, f"is not listening on {where} after {how.timeout_s:g} s")
        time.sleep(0.02)
    if server.transport == "tcp":
        owners = listening_pids(server.host, server.port)
        if not owners <= {server.pid}:
            _fail(server, f"pid {server.pid} is not the only listener on {where} "
                          f"(listeners: {sorted(owners)})")  # fmt: skip
    try:
        size = nbdinfo_size(server.uri)
    except ToolMissingError:
        raise
    except ServerError as exc:
        _fail(server, f"did not answer: {exc}")
    else:
        if size != how.size_bytes:
            _fail(server, f"export {server.uri} reports size {size}, expected {how.size_bytes}")


def launch_server(
    kind: ServerKind,
    size_bytes: int,
    workdir: Path,
    *,
    stats_path: Path | None = None,
    backing: Backing | None = None,
    extra_args: Sequence[str] = (),
) -> RunningServer:
    """Start ``kind`` on 127.0.0.1 at a confirmed free port under a fresh random export name.

    Args:
        kind: which server.
        size_bytes: export size (the run sizes it at >= 5x guest RAM).
        workdir: where logs, config, pid files and file exports go.
        stats_path: nbd-serve's ``--stats`` file (ignored by the peers, which have none).
        backing: ``memory`` (nbd-serve, nbdkit default) or a sparse ``file`` (nbd-server).
        extra_args: more nbd-serve flags (the tests' ``--fault``); nbd-serve only.

    Raises:
        ServerError: the tool is missing, or no attempt produced a confirmed listener.
    """
    if kind not in SERVER_KINDS:
        raise ServerError(f"unknown server kind {kind!r}; choose one of {', '.join(SERVER_KINDS)}")
    if size_bytes <= 0 or size_bytes % 4096:
        raise ServerError(f"export size must be a positive multiple of 4096, not {size_bytes}")
    if extra_args and kind != "nbd-serve":
        raise ServerError(f"extra server flags {list(extra_args)} are for nbd-serve, not {kind}")
    workdir.mkdir(parents=True, exist_ok=True)
    stats = stats_path or workdir / "server-stats.jsonl"
    server = start_server(
        Launch(
            kind=kind,
            transport="tcp",
            size_bytes=size_bytes,
            workdir=workdir,
            backing=backing or ("file" if kind == "nbd-server" else "memory"),
            nbd_serve_args=("--stats", str(stats), *extra_args),
            nbd_server_options=("flush = true", "trim = true"),
        )
    )
    if kind == "nbd-serve":
        server.stats_path = stats
    return server
