"""Worker processes: one acceptor hands each connection to the least busy process.

Theory of operation
-------------------
One CPython process runs Python on one core at a time; on the benchmark machine a single
process tops out near one core's worth of 4 KiB requests while a C server's threads use
every core. With ``--workers N`` the server forks N-1 workers before any event loop or
thread exists. They inherit every backend descriptor (the file, or the memfd of a memory
export), so all processes share one page cache and CAN_MULTI_CONN still holds: FLUSH is
``fdatasync`` on the one shared file and covers writes completed by any process, and a
memfd is the same RAM disk in every process.

The parent owns the listening sockets. It accepts, and gives each connection to the
process (itself included) with the fewest open connections, passing the descriptor with
SCM_RIGHTS over a ``SOCK_SEQPACKET`` socket pair. Neither alternative balances: with
SO_REUSEPORT the kernel hashes the address 4-tuple, so two connections share a worker half
of the time; with one shared listening socket libuv accepts until EAGAIN, so the first
worker to wake takes a whole burst of connections.

Control messages, one datagram each:

- parent -> worker: ``C`` with one descriptor attached (a new connection); ``Q`` (retire:
  no more connections will come; exit once the last one has closed, after a reload);
- worker -> parent: ``X`` (one of its connections closed) and ``S`` + JSON (its per-export
  stats snapshot, every stats interval and once more when it exits).

Statistics stay one line per interval for the whole server: the parent adds its own
counters to each worker's latest snapshot (so a worker's figures lag by at most one
interval; the final line waits for every worker's last snapshot).

Shutdown: the parent stops accepting and shuts down the write side of every control
socket; a worker then stops exactly as a single process does (in-flight requests are
answered), sends its last snapshot and exits.

Supervision: the parent holds a pidfd per worker, which becomes readable the moment the
worker exits, whatever killed it. A worker that dies while the server runs is reaped,
logged at ERROR with its exit status, counted in the stats line (``"workers"``), and
replaced by a fresh fork (:func:`respawn_worker`). Its connections die with it: the
parent closed its copy when it handed each one out, so the kernel closes them and their
clients see the connection end, while every other connection carries on. The counters it
had reported are kept, so the stats never go backwards. nbd-serve then exits with
:data:`EXIT_WORKER_DIED` instead of 0, so a dead worker is never hidden.

A respawn forks the running parent, not a pristine process: the child first forgets the
parent's event loop, replaces every inherited socket except its own control socket with
/dev/null (so a client connection or listener of the parent never stays open because of
it, and no stale socket object can close a reused descriptor), and only then starts its
own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import os
import signal
import socket
import ssl
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from nbdserver import server as server_module
from nbdserver.config import DEFAULT_SHUTDOWN_GRACE
from nbdserver.negotiation import TlsMode
from nbdserver.server import Export, NBDServer
from nbdserver.stats import ExportStats

logger = logging.getLogger(__name__)

#: Default worker count cap: every process costs ~20 MiB of RSS, and past the number of
#: cores more workers only add context switches.
MAX_DEFAULT_WORKERS: Final = 4

#: Seconds an accepted connection waits before it is handed out. Clients such as fio and
#: qemu-img open a short probe connection (to learn the size) right before the real
#: ones; waiting lets the probe's close be counted first (a worker reports it within
#: microseconds), so the real connections are spread evenly. It is paid once per
#: connection, never per request.
HANDOUT_DELAY: Final = 0.005

#: Exit status of nbd-serve when it shut down cleanly but a worker process had died.
EXIT_WORKER_DIED: Final = 3

_CONN: Final = b"C"
_CLOSED: Final = b"X"
_STATS: Final = b"S"
_REPORT: Final = b"R"
_RETIRE: Final = b"Q"
#: A worker's requests partly received (NBDServer.receiving), with every stats snapshot.
_RECEIVING: Final = b"V"
#: Seconds between two looks at a retiring worker's connections.
RETIRE_POLL: Final = 0.2
_MAX_MESSAGE: Final = 1 << 20


def default_workers() -> int:
    """One process per usable core, at most :data:`MAX_DEFAULT_WORKERS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_WORKERS))


def merge_stats(
    own: Mapping[str, ExportStats], snapshots: Sequence[Mapping[str, Any]]
) -> dict[str, ExportStats]:
    """Per-export counters of this process plus workers' snapshots (ExportStats.snapshot)."""
    merged: dict[str, ExportStats] = {}
    for name, stats in own.items():
        total = ExportStats()
        total.add(stats.snapshot())
        for snapshot in snapshots:
            if name in snapshot:
                total.add(snapshot[name])
        merged[name] = total
    return merged


def _snapshot_message(exports: Sequence[Export]) -> bytes:
    body = {e.info.name: e.stats.snapshot() for e in exports}
    return _STATS + json.dumps(body, separators=(",", ":")).encode()


@dataclass
class Worker:
    """The parent's view of one forked worker."""

    index: int
    pid: int
    ctrl: socket.socket
    load: int = 0
    alive: bool = True
    snapshot: dict[str, Any] = field(default_factory=dict)
    #: Its newest NBDServer.receiving() (nothing once it is gone).
    receiving: dict[str, int] = field(default_factory=dict)
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    pidfd: int = -1
    exit_code: int | None = None
    #: What the worker reported about itself at start (its swap-safe outcome).
    report: dict[str, Any] = field(default_factory=dict)
    #: Replaced after a reload: gets no new connections, exits when its last one closes.
    retiring: bool = False


def fork_workers(
    count: int, child: Callable[[int, socket.socket], int]
) -> list[tuple[int, socket.socket]]:
    """Fork ``count`` workers; each runs ``child(index, ctrl)`` and exits with its result.

    Must run before any event loop or thread exists in this process. Returns
    ``(pid, ctrl)`` per worker, index 1..count (index 0 is the parent).
    """
    made: list[tuple[int, socket.socket]] = []
    for index in range(1, count + 1):
        made.append(_fork_one(index, child, functools.partial(_close_siblings, list(made))))
    return made


def _close_siblings(
    siblings: list[tuple[int, socket.socket]], _ctrl: socket.socket
) -> None:  # pragma: no cover - runs in the child
    for _, ctrl in siblings:
        ctrl.close()


def _fork_one(
    index: int,
    child: Callable[[int, socket.socket], int],
    prepare: Callable[[socket.socket], object],
) -> tuple[int, socket.socket]:
    """Fork one worker; in the child, ``prepare(ctrl)`` then ``child(index, ctrl)``."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, measured by the CLI tests
        code = 1
        try:
            parent_end.close()
            prepare(child_end)
            code = child(index, child_end)
        except BaseException:
            logger.exception("worker %d failed", index)
        finally:
            logging.shutdown()
            os._exit(code)
    child_end.close()
    return pid, parent_end


def respawn_worker(
    index: int, child: Callable[[int, socket.socket], int]
) -> tuple[int, socket.socket]:
    """Fork a replacement worker from the running parent (see the module docstring)."""
    return _fork_one(index, child, _forget_parent)


def _forget_parent(ctrl: socket.socket) -> None:  # pragma: no cover - runs in the child
    """In a child forked from the serving parent: drop its loop, signals and sockets."""
    asyncio.events._set_running_loop(None)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    keep = ctrl.fileno()
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd in (keep, devnull):
                continue
            try:
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    os.dup2(devnull, fd)
            except OSError:
                continue  # the descriptor listdir itself used, already gone
    finally:
        os.close(devnull)


def set_connection_ids(index: int, count: int) -> None:
    """Make connection ids unique across processes (ids index+1, index+1+count, ...)."""
    server_module._next_id = itertools.count(index + 1, count)


async def run_worker(
    index: int,
    ctrl: socket.socket,
    exports: Sequence[Export],
    *,
    stats_interval: float | None,
    max_inflight_bytes: int,
    poll_us: int,
    wake_mark: bool = True,
    extended_headers: bool = True,
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
    report: Mapping[str, Any] | None = None,
    tls: TlsMode = TlsMode.OFF,
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    """A worker's event loop: adopt connections from ``ctrl`` until it reaches EOF.

    ``report`` (e.g. the swap-safe outcome in this process) is sent to the parent first.
    """
    loop = asyncio.get_running_loop()
    server = NBDServer(
        exports,
        max_inflight_bytes=max_inflight_bytes,
        poll_us=poll_us,
        wake_mark=wake_mark,
        extended_headers=extended_headers,
        shutdown_grace=shutdown_grace,
        tls=tls,
        ssl_context=ssl_context,
    )
    stop = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()
    ctrl.setblocking(False)

    def notify_closed() -> None:
        with contextlib.suppress(OSError):
            ctrl.send(_CLOSED)

    server.on_connection_closed = notify_closed

    async def adopt(sock: socket.socket) -> None:
        try:
            await server.adopt(sock)
        except OSError as exc:
            logger.warning("worker %d: cannot serve a handed-over connection: %s", index, exc)
            sock.close()
            notify_closed()

    async def retire() -> None:
        while server.connections:
            await asyncio.sleep(RETIRE_POLL)
        logger.info("worker %d (pid %d) retired after a reload", index, os.getpid())
        stop.set()

    def on_ctrl() -> None:
        while True:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(ctrl, 16, 4)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logger.error("worker %d: control socket failed: %s", index, exc)
                msg, fds = b"", []
            if not msg:
                loop.remove_reader(ctrl.fileno())
                stop.set()
                return
            if msg == _RETIRE:
                task = loop.create_task(retire())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            for fd in fds:
                sock = socket.socket(fileno=fd)
                task = loop.create_task(adopt(sock))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

    loop.add_reader(ctrl.fileno(), on_ctrl)
    if report is not None:
        with contextlib.suppress(OSError):
            ctrl.send(_REPORT + json.dumps(report, separators=(",", ":")).encode())
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        # The parent decides when to stop (it closes the control socket); a terminal's
        # ^C reaches the whole process group, and a worker must not stop before it.
        loop.add_signal_handler(signum, lambda: None)

    async def ticker(interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(BlockingIOError, InterruptedError):
                ctrl.send(_snapshot_message(exports))
                ctrl.send(_RECEIVING + json.dumps(server.receiving()).encode())

    tick = loop.create_task(ticker(stats_interval)) if stats_interval else None
    await stop.wait()
    await server.shutdown()
    flush_backends(exports)
    if tick is not None:
        tick.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tick
    ctrl.setblocking(True)
    with contextlib.suppress(OSError):
        ctrl.send(_snapshot_message(exports))
    ctrl.close()
    return 0


def flush_backends(exports: Sequence[Export]) -> None:
    """Flush every export's backend at shutdown; a failure is logged, never hidden."""
    for export in exports:
        try:
            export.backend.flush()
        except OSError as exc:
            logger.error("flushing export %r at shutdown failed: %s", export.info.name, exc)
        else:
            logger.info("export %r flushed at shutdown", export.info.name)


class Acceptor:
    """The parent's listening sockets and the connection hand-out to workers."""

    def __init__(
        self,
        server: NBDServer,
        workers: Sequence[tuple[int, socket.socket]],
        respawn: Callable[[int], tuple[int, socket.socket]] | None = None,
    ) -> None:
        """``respawn(index)`` forks a replacement for a dead worker (None: never)."""
        self.server = server
        self.workers = [Worker(i + 1, pid, ctrl) for i, (pid, ctrl) in enumerate(workers)]
        self.respawn = respawn
        #: Workers that died while serving, and replacements started.
        self.deaths = 0
        self.respawned = 0
        #: Counters of dead workers (their last snapshots), kept in the totals.
        self._retired: list[dict[str, Any]] = []
        #: Workers replaced by a reload that still serve their last connections.
        self._retiring: list[Worker] = []
        self.own_load = 0
        self.total = 0
        self._listeners: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._pending: list[socket.socket] = []
        self._handout_scheduled = False
        server.on_connection_closed = self._own_closed

    def start(self) -> None:
        for worker in self.workers:
            self._watch(worker)

    def _watch(self, worker: Worker) -> None:
        loop = asyncio.get_running_loop()
        worker.ctrl.setblocking(False)
        loop.add_reader(worker.ctrl.fileno(), self._on_ctrl, worker)
        worker.pidfd = os.pidfd_open(worker.pid)
        loop.add_reader(worker.pidfd, self._on_exit, worker)

    def listen_tcp(self, host: str, port: int) -> list[tuple[str, int]]:
        """Listen on every address of ``host:port`` (port 0 = ephemeral)."""
        infos = (
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE) or []
        )
        bound: list[tuple[str, int]] = []
        seen: set[tuple[Any, ...]] = set()
        for family, type_, proto, _name, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, type_, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
                sock.listen(1024)
            except OSError:
                sock.close()
                raise
            self._add_listener(sock)
            name = sock.getsockname()
            bound.append((name[0], name[1]))
        return bound

    def listen_unix(self, path: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(1024)
        except OSError:
            sock.close()
            raise
        self._add_listener(sock)

    def adopt_listener(self, sock: socket.socket) -> None:
        """Accept on a listening socket bound by someone else (socket activation)."""
        self._add_listener(sock)

    def _add_listener(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._listeners.append(sock)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_accept, sock)

    @property
    def open_connections(self) -> int:
        return self.own_load + sum(w.load for w in [*self.workers, *self._retiring] if w.alive)

    def roll(self) -> None:
        """After a reload: replace every worker by a fresh fork that has the new exports;
        the old ones keep their connections and exit when the last one closes."""
        for old in list(self.workers):
            if not old.alive or self._replace(old, "reload") is None:
                continue
            old.retiring = True
            with contextlib.suppress(OSError):
                old.ctrl.send(_RETIRE)
            self._retiring.append(old)
            logger.info("reload: pid %d retires with %d connection(s)", old.pid, old.load)

    def _replace(self, old: Worker, why: str) -> Worker | None:
        """Fork a worker to take ``old``'s place in the hand-out (None: could not)."""
        if self.respawn is None:
            return None
        try:
            pid, ctrl = self.respawn(old.index)
        except OSError as exc:
            logger.error("%s: cannot fork a new worker %d: %s", why, old.index, exc)
            return None
        new = Worker(old.index, pid, ctrl)
        self.workers[self.workers.index(old)] = new
        self._watch(new)
        level = logging.WARNING if why == "respawn" else logging.INFO
        logger.log(level, "%s: worker %d is now pid %d", why, old.index, pid)
        return new

    def stats(self, own: Mapping[str, ExportStats]) -> dict[str, ExportStats]:
        """This process's counters plus every worker's, dead and retiring ones included."""
        live = [w.snapshot for w in [*self.workers, *self._retiring] if w.snapshot]
        return merge_stats(own, [*self._retired, *live])

    def receiving(self, own: Mapping[str, int]) -> dict[str, int]:
        """This process's NBDServer.receiving plus the live workers' (as of their last
        snapshot)."""
        total = {"partial": int(own["partial"]), "missing_bytes": int(own["missing_bytes"])}
        for w in [*self.workers, *self._retiring]:
            if w.alive:
                for key in total:
                    total[key] += int(w.receiving.get(key, 0))
        return total

    def worker_stats(self) -> dict[str, Any]:
        """The ``"workers"`` entry of a stats line."""
        return {
            "alive": sum(1 for w in self.workers if w.alive),
            "pids": [w.pid for w in self.workers if w.alive],
            "died": self.deaths,
            "respawned": self.respawned,
            "retiring": [w.pid for w in self._retiring],
        }

    # --- accepting -----------------------------------------------------------------
    def _on_accept(self, listener: socket.socket) -> None:
        for _ in range(64):
            try:
                conn, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # EMFILE, ECONNABORTED...: try again on the next event
                logger.warning("accept failed: %s", exc)
                break
            self.total += 1
            self._pending.append(conn)
        if self._pending and not self._handout_scheduled:
            self._handout_scheduled = True
            asyncio.get_running_loop().call_later(HANDOUT_DELAY, self._hand_out_pending)

    def _hand_out_pending(self) -> None:
        self._handout_scheduled = False
        pending, self._pending = self._pending, []
        for conn in pending:
            self._hand_out(conn)

    def _hand_out(self, conn: socket.socket) -> None:
        logger.debug(
            "hand-out: loads %s", [self.own_load, *(w.load for w in self.workers if w.alive)]
        )
        limit = self.server.max_connections
        if limit is not None and self.open_connections >= limit:
            # The limit counts every process's connections, which only this one knows:
            # it tells the client itself (NBDServer._refusal) and counts it nowhere.
            self._serve_here(conn, refuse=True)
            return
        target: Worker | None = None
        best = self.own_load
        for worker in self.workers:
            if worker.alive and worker.load < best:
                target, best = worker, worker.load
        if target is not None:
            try:
                socket.send_fds(target.ctrl, [_CONN], [conn.fileno()])
            except OSError as exc:
                logger.error("worker %d (pid %d) unreachable: %s", target.index, target.pid, exc)
                target.alive = False
            else:
                target.load += 1
                conn.close()
                return
        self.own_load += 1
        self._serve_here(conn, refuse=False)

    def _serve_here(self, conn: socket.socket, *, refuse: bool) -> None:
        conn.setblocking(False)
        task = asyncio.get_running_loop().create_task(self._adopt(conn, refuse))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _adopt(self, conn: socket.socket, refuse: bool) -> None:
        try:
            await self.server.adopt(conn, refuse=refuse)
        except OSError as exc:
            logger.warning("cannot serve an accepted connection: %s", exc)
            if not refuse:
                self.own_load -= 1
            conn.close()

    def _own_closed(self) -> None:
        self.own_load -= 1

    def _on_ctrl(self, worker: Worker) -> None:
        while True:
            try:
                msg = worker.ctrl.recv(_MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logger.error("worker %d: control socket failed: %s", worker.index, exc)
                msg = b""
            if not msg:  # the worker closed it (exiting): the pidfd says when it is gone
                asyncio.get_running_loop().remove_reader(worker.ctrl.fileno())
                return
            kind = msg[:1]
            if kind == _CLOSED:
                worker.load -= 1
            elif kind == _STATS:
                worker.snapshot = json.loads(msg[1:])
            elif kind == _RECEIVING:
                worker.receiving = json.loads(msg[1:])
            elif kind == _REPORT:
                worker.report = json.loads(msg[1:])
            else:
                logger.error("worker %d sent an unknown message %r", worker.index, msg[:16])

    def _on_exit(self, worker: Worker) -> None:
        """The worker's pidfd is readable: the process has exited. Reap it and, while
        serving, report the death and start a replacement."""
        loop = asyncio.get_running_loop()
        loop.remove_reader(worker.pidfd)
        os.close(worker.pidfd)
        worker.pidfd = -1
        if worker.ctrl.fileno() >= 0:
            self._on_ctrl(worker)  # its last messages (the final snapshot) first
            loop.remove_reader(worker.ctrl.fileno())
            worker.ctrl.close()
        _pid, status = os.waitpid(worker.pid, 0)  # exited already: does not block
        worker.exit_code = os.waitstatus_to_exitcode(status)
        worker.alive = False
        worker.gone.set()
        if worker.retiring and worker.exit_code == 0:
            self._retiring.remove(worker)
            if worker.snapshot:
                self._retired.append(worker.snapshot)
            logger.info("retired worker %d (pid %d) exited", worker.index, worker.pid)
            return
        if worker.retiring:
            self._retiring.remove(worker)
        if self._closing:
            return
        self.deaths += 1
        how = (
            f"was killed by signal {-worker.exit_code}"
            if worker.exit_code < 0
            else f"exited with status {worker.exit_code}"
        )
        logger.error(
            "worker %d (pid %d) %s while serving; its %d connection(s) were closed",
            worker.index,
            worker.pid,
            how,
            worker.load,
        )
        if worker.snapshot:
            self._retired.append(worker.snapshot)
        if self._replace(worker, "respawn") is not None:
            self.respawned += 1

    # --- shutdown ------------------------------------------------------------------
    async def shutdown(self) -> None:
        """Stop accepting, stop the workers and this process's connections, reap."""
        self._closing = True
        loop = asyncio.get_running_loop()
        for sock in self._listeners:
            loop.remove_reader(sock.fileno())
            sock.close()
        self._listeners.clear()
        self._hand_out_pending()
        for worker in self.workers:
            with contextlib.suppress(OSError):
                worker.ctrl.shutdown(socket.SHUT_WR)
        for worker in self._retiring:
            with contextlib.suppress(OSError):
                worker.ctrl.shutdown(socket.SHUT_WR)
        await self.server.shutdown()
        flush_backends(list(self.server.exports.values()))
        for worker in [*self.workers, *self._retiring]:
            await worker.gone.wait()
            if worker.exit_code != 0:
                self.deaths += 1
                logger.error(
                    "worker %d (pid %d) exited with %s at shutdown",
                    worker.index,
                    worker.pid,
                    worker.exit_code,
                )


__all__ = [
    "EXIT_WORKER_DIED",
    "Acceptor",
    "default_workers",
    "flush_backends",
    "fork_workers",
    "merge_stats",
    "respawn_worker",
    "run_worker",
    "set_connection_ids",
]
