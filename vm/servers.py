"""Launch the NBD server a run swaps to: nbd-serve, nbdkit or nbd-server.

Theory of operation
-------------------
Issue 5 records what a fixed port does: a second guest on the same machine connected
to the first run's server and wrote its swap into the first run's export.  So every
launcher here

* binds 127.0.0.1 only, on a port that is free *and confirmed as ours*:
  nbd-serve binds port 0 itself and reports the port in its ``--ready-file``; the peers
  cannot, so we pick a free port, start them, and check with psutil that *this* pid
  (and no other) listens on 127.0.0.1:PORT, retrying on a collision;
* exports under a fresh random name (``secrets.token_hex``) that only this run's
  guest is told (``nbd-client -N NAME``), refusing every other name;
* proves the export answers with an nbdinfo handshake on that name and size.

Each server runs in its own session so that :meth:`RunningServer.kill` takes down the
whole process group at once (nbd-server forks a child per connection), which the
"server dies mid-run" test uses.
"""

from __future__ import annotations

import contextlib
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import psutil

log = logging.getLogger(__name__)

ServerKind = Literal["nbd-serve", "nbdkit", "nbd-server"]
SERVER_KINDS: tuple[str, ...] = get_args(ServerKind)
Backing = Literal["memory", "file"]

HOST = "127.0.0.1"
START_ATTEMPTS = 5
READY_TIMEOUT_S = 30.0


class ServerError(Exception):
    """A server could not be started, or did not answer on its port."""


@dataclass(slots=True)
class RunningServer:
    """One started server; ``stop()`` or ``kill()`` it when the run ends."""

    kind: ServerKind
    port: int
    export_name: str
    size_bytes: int
    pid: int
    argv: list[str]
    backing: Backing
    workdir: Path
    stats_path: Path | None = None
    backing_path: Path | None = None
    host: str = HOST
    started_mono: float = field(default_factory=time.monotonic)
    _proc: subprocess.Popen[bytes] | None = None
    exit_status: int | None = None
    killed: bool = False

    @property
    def uri(self) -> str:
        return f"nbd://{self.host}:{self.port}/{self.export_name}"

    def alive(self) -> bool:
        if self._proc is not None and self._proc.pid == self.pid:
            return self._proc.poll() is None
        try:
            status: str = psutil.Process(self.pid).status()
            return bool(status != psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return False

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, sig)

    def _wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                if self._proc is not None:
                    self.exit_status = self._proc.wait()
                return True
            time.sleep(0.05)
        return False

    def kill(self) -> None:
        """SIGKILL the server and everything it forked, now (no final stats line)."""
        self.killed = True
        self._signal_group(signal.SIGKILL)
        self._wait(10.0)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (nbd-serve writes its final stats line), then SIGKILL after ``timeout``."""
        if self.alive():
            self._signal_group(signal.SIGTERM)
            if not self._wait(timeout):
                self._signal_group(signal.SIGKILL)
                self._wait(5.0)
        elif self._proc is not None:
            self.exit_status = self._proc.wait()
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
        }


def require_tool(name: str, package: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        raise ServerError(f"{name} not found; install it with: apt-get install {package}")
    return exe


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


def pid_listens(pid: int, host: str, port: int) -> bool:
    """True when process ``pid`` itself listens on host:port."""
    try:
        proc = psutil.Process(pid)
        conns = (
            proc.net_connections(kind="tcp")
            if hasattr(proc, "net_connections")
            else proc.connections(kind="tcp")
        )
    except psutil.NoSuchProcess:
        return False
    return any(
        c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.ip == host and c.laddr.port == port
        for c in conns
    )


def nbdinfo_size(uri: str, timeout: float = 20.0) -> int:
    """Handshake with ``uri`` through nbdinfo and return the export size.

    Raises:
        ServerError: nbdinfo is missing or the handshake fails.
    """
    exe = require_tool("nbdinfo", "libnbd-bin")
    try:
        out = subprocess.run(
            [exe, "--size", uri], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ServerError(f"nbdinfo {uri} did not answer within {timeout:.0f}s") from exc
    if out.returncode != 0:
        raise ServerError(f"nbdinfo {uri} failed: {out.stderr.strip()}")
    return int(out.stdout.strip())


def _wait_for(predicate: Any, timeout: float, proc: subprocess.Popen[bytes] | None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(predicate())
        time.sleep(0.05)
    return False


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-5:])


def nbd_serve_argv(
    name: str,
    size_bytes: int,
    *,
    ready: Path,
    stats: Path,
    backing: Backing,
    backing_path: Path,
) -> list[str]:
    """nbd-serve through this interpreter, so it works from a venv without the script on PATH."""
    launcher = "import sys; from nbdserver.cli import main; sys.exit(main())"
    argv = [
        sys.executable,
        "-c",
        launcher,
        "--bind",
        HOST,
        "--port",
        "0",
        "--ready-file",
        str(ready),
        "--name",
        name,
        "--stats",
        str(stats),
    ]
    if backing == "memory":
        argv += ["--memory", str(size_bytes)]
    else:
        argv.append(str(backing_path))
    return argv


def nbd_serve_available() -> bool:
    """The project's server exists in this checkout (nbdserver/cli.py importable)."""
    probe = subprocess.run(
        [sys.executable, "-c", "import nbdserver.cli"], capture_output=True, check=False
    )
    return probe.returncode == 0


def _start_nbd_serve(
    name: str, size_bytes: int, workdir: Path, stats_path: Path, backing: Backing
) -> RunningServer:
    ready = workdir / f"nbd-serve-{name[:8]}.ready.json"
    logf = workdir / "nbd-serve.log"
    backing_path = workdir / f"export-{name[:8]}.img"
    if backing == "file":
        with open(backing_path, "wb") as f:
            f.truncate(size_bytes)
    argv = nbd_serve_argv(
        name, size_bytes, ready=ready, stats=stats_path, backing=backing, backing_path=backing_path
    )
    with open(logf, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    if not _wait_for(ready.exists, READY_TIMEOUT_S, proc):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise ServerError(
            f"nbd-serve did not write its ready file within {READY_TIMEOUT_S:.0f}s "
            f"(exit status {proc.returncode}): {_log_tail(logf)}"
        )
    info = json.loads(ready.read_text())
    tcp = [entry for entry in info.get("listen", []) if entry.get("kind") == "tcp"]
    if not tcp:
        raise ServerError(f"nbd-serve ready file lists no TCP listener: {info}")
    port = int(tcp[0]["port"])
    return RunningServer(
        kind="nbd-serve",
        port=port,
        export_name=name,
        size_bytes=size_bytes,
        pid=proc.pid,
        argv=argv,
        backing=backing,
        workdir=workdir,
        stats_path=stats_path,
        backing_path=backing_path if backing == "file" else None,
        _proc=proc,
    )


def _start_peer(
    kind: ServerKind,
    name: str,
    size_bytes: int,
    workdir: Path,
    *,
    port: int,
    backing: Backing,
) -> RunningServer:
    logf = workdir / f"{kind}.log"
    backing_path = workdir / f"export-{name[:8]}.img"
    proc: subprocess.Popen[bytes] | None
    if kind == "nbdkit":
        exe = require_tool("nbdkit", "nbdkit")
        plugin = ["memory", str(size_bytes)] if backing == "memory" else ["file", str(backing_path)]
        if backing == "file":
            with open(backing_path, "wb") as f:
                f.truncate(size_bytes)
        argv = [
            exe,
            "--foreground",
            "--exit-with-parent",
            "--ipaddr",
            HOST,
            "--port",
            str(port),
            "--filter=exportname",
            *plugin,
            f"exportname={name}",
            "exportname-strict=true",
        ]
        with open(logf, "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        pid = proc.pid
    elif kind == "nbd-server":
        exe = require_tool("nbd-server", "nbd-server")
        if backing != "file":
            raise ServerError("nbd-server only serves files; use the file backing")
        with open(backing_path, "wb") as f:
            f.truncate(size_bytes)
        conf = workdir / f"nbd-server-{name[:8]}.conf"
        pidfile = workdir / f"nbd-server-{name[:8]}.pid"
        conf.write_text(
            "[generic]\n"
            f"    port = {port}\n"
            f"    listenaddr = {HOST}\n"
            "    allowlist = false\n"
            f"[{name}]\n"
            f"    exportname = {backing_path}\n"
            "    flush = true\n"
            "    trim = true\n"
        )
        # nbd-server daemonizes (its -d "do not fork" mode serves one client and exits);
        # the daemon's pid comes from the pid file.
        argv = [exe, "-C", str(conf), "-p", str(pidfile)]
        with open(logf, "ab") as out:
            starter = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=30,
                check=False,
            )
        if starter.returncode != 0 or not _wait_for(pidfile.exists, 10.0, None):
            raise ServerError(
                f"nbd-server failed to start (exit {starter.returncode}): {_log_tail(logf)}"
            )
        pid = int(pidfile.read_text().split()[0])
        proc = None
    else:
        raise ServerError(f"unknown server kind {kind!r}; choose one of {', '.join(SERVER_KINDS)}")
    return RunningServer(
        kind=kind,
        port=port,
        export_name=name,
        size_bytes=size_bytes,
        pid=pid,
        argv=argv,
        backing=backing,
        workdir=workdir,
        backing_path=backing_path if backing == "file" else None,
        _proc=proc,
    )


def launch_server(
    kind: ServerKind,
    size_bytes: int,
    workdir: Path,
    *,
    stats_path: Path | None = None,
    backing: Backing | None = None,
) -> RunningServer:
    """Start ``kind`` on 127.0.0.1 at a confirmed free port under a fresh random export name.

    Args:
        kind: which server.
        size_bytes: export size (the run sizes it at >= 5x guest RAM).
        workdir: where logs, config, pid files and file exports go.
        stats_path: nbd-serve's ``--stats`` file (ignored by the peers, which have none).
        backing: ``memory`` (nbd-serve, nbdkit default) or a sparse ``file`` (nbd-server).

    Raises:
        ServerError: the tool is missing, or no attempt produced a confirmed listener.
    """
    if kind not in SERVER_KINDS:
        raise ServerError(f"unknown server kind {kind!r}; choose one of {', '.join(SERVER_KINDS)}")
    if size_bytes <= 0 or size_bytes % 4096:
        raise ServerError(f"export size must be a positive multiple of 4096, not {size_bytes}")
    workdir.mkdir(parents=True, exist_ok=True)
    chosen: Backing = backing or ("file" if kind == "nbd-server" else "memory")
    last_error = "no attempt made"
    for attempt in range(1, START_ATTEMPTS + 1):
        name = secrets.token_hex(16)
        if kind == "nbd-serve":
            server = _start_nbd_serve(
                name, size_bytes, workdir, stats_path or workdir / "server-stats.jsonl", chosen
            )
        else:
            server = _start_peer(kind, name, size_bytes, workdir, port=free_port(), backing=chosen)
        ok = _wait_for(
            lambda s=server: pid_listens(s.pid, HOST, s.port), READY_TIMEOUT_S, server._proc
        )
        owners = listening_pids(HOST, server.port)
        if ok and owners <= {server.pid}:
            try:
                size = nbdinfo_size(server.uri)
            except ServerError as exc:
                last_error = str(exc)
            else:
                if size == size_bytes:
                    log.info("%s listening on %s (pid %d)", kind, server.uri, server.pid)
                    return server
                last_error = f"{server.uri} reports size {size}, expected {size_bytes}"
        else:
            last_error = (
                f"{kind} pid {server.pid} is not the only listener on {HOST}:{server.port} "
                f"(listeners: {sorted(owners)}); {_log_tail(workdir / (kind + '.log'))}"
            )
        log.warning("%s attempt %d failed: %s", kind, attempt, last_error)
        server.kill()
        server.stop()
    raise ServerError(f"could not start {kind} after {START_ATTEMPTS} attempts: {last_error}")
