"""``nbd-serve``: the command line of the NBD server.

Exit codes: 0 after a clean shutdown (SIGINT/SIGTERM), 1 on a runtime failure (e.g. the
port is taken), 2 on a usage or configuration error, 3 after a clean shutdown when a
worker process had died during the run (it was respawned; see the log).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import ssl
import stat
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import uvloop

from nbdserver.activation import ActivationError, activation_fds, listening_sockets
from nbdserver.backends import open_backend
from nbdserver.backends.base import Backend
from nbdserver.backends.cow import open_cow
from nbdserver.backends.fault import FaultBackend, parse_fault
from nbdserver.config import (
    SCHED_POLICIES,
    ExportConfig,
    ServerConfig,
    build_config,
    log_level_number,
)
from nbdserver.errors import ConfigError
from nbdserver.exposure import startup_warnings
from nbdserver.reload import Reloader
from nbdserver.sched import set_policy
from nbdserver.server import Export, NBDServer, make_export, tune_allocator
from nbdserver.stats import StatsWriter, stats_line
from nbdserver.swapsafe import Outcome, SwapSafeReport, enter_swap_safe_mode
from nbdserver.tls import server_context
from nbdserver.workers import (
    EXIT_WORKER_DIED,
    Acceptor,
    default_workers,
    flush_backends,
    fork_workers,
    respawn_worker,
    run_worker,
    set_connection_ids,
)

logger = logging.getLogger("nbdserver")

EPILOG = """\
examples:
  nbd-serve --memory 1G
      serve a 1 GiB sparse RAM disk as the default export on 127.0.0.1:10809;
      then: nbdinfo nbd://127.0.0.1:10809
  nbd-serve --port 0 --ready-file /tmp/ready.json --memory 512M
      bind any free port and write {"pid", "listen": [...], "exports": [...]} to
      /tmp/ready.json once listening (wait for that file instead of guessing ports)
  nbd-serve --name disk --read-only --description "golden image" /var/lib/disk.img
      serve a file (or block device) read-only under the name "disk"
  nbd-serve --unix /run/swapnbd.sock --memory 1G
      listen on a Unix socket only (add --port to listen on TCP as well)
  nbd-serve --config exports.toml --stats stats.jsonl --stats-interval 0.5
      several exports from a TOML file, statistics as JSON lines every 0.5 s
  nbd-serve --cow --cow-dir /dev/shm /var/lib/golden.img
      serve an image copy-on-write: the file keeps its bytes and mtime
  kill -HUP $(pidof nbd-serve)
      re-read --config: exports added and removed, clients of the others stay
  nbd-serve --tls require --tls-cert server-cert.pem --tls-key server-key.pem \
            --tls-ca ca-cert.pem --memory 1G
      TLS only (NBD_OPT_STARTTLS), and only for clients with a certificate signed by
      ca-cert.pem; then: nbdinfo 'nbds://127.0.0.1:10809/?tls-certificates=DIR'
  nbd-serve --bind 0.0.0.0 --allow 10.0.0.0/8,192.168.1.7 --memory 1G
      listen on every address but serve the export only to those clients
  nbd-serve --workers 4 --max-inflight 16M /dev/shm/disk.img
      four processes serve the connections (multi-conn clients spread over cores);
      each connection stops reading once 16 MiB of replies wait to be sent

config file (TOML; command-line flags override only what they set):
  bind = "127.0.0.1"
  port = 10809
  workers = 2               # default: one per core, at most 4
  max_inflight = "8M"
  max_connections = 64      # default: no limit
  poll_us = 50              # 0 = never busy-poll
  wake_mark = true          # false = wake for every TCP segment (--no-wake-mark)
  extended_headers = true   # false = refuse NBD_OPT_EXTENDED_HEADERS (--no-extended-headers)
  sched_policy = "idle"     # run when a CPU would idle (default "normal"; or "batch")
  [[exports]]
  name = "swap"
  backend = "memory"        # or "file" with path = "/some/file"
  size = "1G"
  description = "RAM disk"
  read_only = false
  swap = true               # a swap device: turns on --swap-safe (warned about under TLS)
  allow = ["127.0.0.1", "10.0.0.0/8"]   # default: every client
  [[exports]]
  name = "golden"
  path = "/var/lib/disk.img"
  cow = true                # never write the file; writes go to a private overlay
  # server keys for TLS: tls = "off"|"on"|"require", tls_cert, tls_key, tls_ca

security: nbd-serve listens on 127.0.0.1 unless told otherwise, and warns when it
listens elsewhere without TLS and without allow-lists. --tls on lets clients upgrade
with NBD_OPT_STARTTLS; --tls require refuses every option before it
(NBD_REP_ERR_TLS_REQD). With --tls-ca, clients need a certificate signed by that CA.

workers: the first process listens and hands each new connection to the process with
the fewest connections; all share the export's file or RAM disk, so FLUSH/FUA effects
are visible on every connection (NBD_FLAG_CAN_MULTI_CONN). The --stats lines and the
ready file's pid are the first process's and cover all workers.

exit codes: 0 clean shutdown (SIGINT/SIGTERM), 1 runtime failure, 2 usage/config error,
  3 clean shutdown but a worker process died during the run (it was respawned)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbd-serve",
        description="Serve files, block devices or RAM disks over the NBD protocol "
        "(fixed newstyle, structured replies, block status, multi-conn).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("file", nargs="?", metavar="FILE", help="regular file or block device")
    parser.add_argument(
        "--memory", metavar="SIZE", help="serve a sparse RAM disk of SIZE (K/M/G/T)"
    )
    parser.add_argument(
        "--bind", metavar="ADDR", help="TCP address to listen on (default 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, metavar="N", help="TCP port (default 10809; 0 = any)")
    parser.add_argument("--unix", metavar="PATH", help="listen on a Unix socket at PATH")
    parser.add_argument("--name", metavar="NAME", help='export name (default "")')
    parser.add_argument("--description", metavar="TEXT", help="export description")
    parser.add_argument("--read-only", action="store_true", help="refuse writes (EPERM)")
    parser.add_argument(
        "--cow",
        action="store_true",
        help="copy-on-write: never write FILE; writes go to a private overlay that is"
        " discarded when the server exits (TOML: cow = true per export)",
    )
    parser.add_argument(
        "--cow-dir",
        metavar="DIR",
        help="where --cow overlays live (default: next to the file, else the temp dir)",
    )
    parser.add_argument(
        "--swap-safe",
        action=argparse.BooleanOptionalAction,
        help="mlockall, PR_SET_IO_FLUSHER and bounded in-flight memory, each reported in"
        " the log and --stats (default: on when an export has swap = true)",
    )
    parser.add_argument(
        "--allow",
        action="append",
        metavar="ADDR[,ADDR...]",
        help="serve the export only to these client IPs or CIDR networks (repeatable;"
        " default: every client); others get NBD_REP_ERR_POLICY",
    )
    parser.add_argument(
        "--tls",
        choices=["off", "on", "require"],
        help="off (default): no TLS; on: clients may upgrade with STARTTLS; require:"
        " plaintext clients are refused (NBD_REP_ERR_TLS_REQD)",
    )
    parser.add_argument("--tls-cert", metavar="PEM", help="server certificate (with --tls)")
    parser.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    parser.add_argument(
        "--tls-ca",
        metavar="PEM",
        help="CA certificates; clients must present a certificate signed by one of them",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file with server settings and exports"
    )
    parser.add_argument("--stats", metavar="FILE", help="append JSON-lines statistics to FILE")
    parser.add_argument(
        "--stats-interval",
        type=float,
        metavar="SECONDS",
        help="seconds between stats lines (default 1)",
    )
    parser.add_argument(
        "--ready-file", metavar="PATH", help="write bound addresses as JSON to PATH once listening"
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="processes serving connections (default: one per CPU core, at most 4)",
    )
    parser.add_argument(
        "--max-inflight",
        metavar="SIZE",
        help="per-connection bound on unanswered bytes; reading pauses past it (default 8M)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="serve at most N connections at once (all workers together); a client past"
        " it is refused in the handshake with the reason (NBD_REP_ERR_POLICY) and a"
        " warning is logged (default: no limit)",
    )
    parser.add_argument(
        "--wake-mark",
        action=argparse.BooleanOptionalAction,
        help="on TCP, let the kernel wake the server only once a partly received request"
        " is complete (SO_RCVLOWAT): one wake-up per request instead of one per segment"
        ' (default: on; docs/performance.md, "Wake mark")',
    )
    parser.add_argument(
        "--extended-headers",
        action=argparse.BooleanOptionalAction,
        help="offer NBD extended headers (NBD_OPT_EXTENDED_HEADERS: 64-bit lengths for"
        " trim, write zeroes and block status); --no-extended-headers answers the option"
        " NBD_REP_ERR_UNSUP, so clients use compact headers (default: on)",
    )
    parser.add_argument(
        "--poll-us",
        type=int,
        metavar="N",
        help="busy-poll a lone client's socket up to N µs after each reply, adapting to"
        " how soon its next request comes (default 50; 0 = off)",
    )
    parser.add_argument(
        "--sched-policy",
        choices=SCHED_POLICIES,
        help="how the kernel schedules the server's threads: normal (as started), batch"
        " (no preemption on wake-up) or idle (run when a CPU would otherwise idle; the swap"
        ' experiment\'s choice, docs/performance.md, "Scheduling policy"); no privilege'
        " needed (default normal)",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        metavar="SECONDS",
        help="after SIGTERM, answer new requests with ESHUTDOWN and wait up to SECONDS for"
        " clients to disconnect before hanging up on them (default 2)",
    )
    parser.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="shut down cleanly when the parent process exits (for harnesses; like nbdkit's)",
    )
    parser.add_argument(
        "--fault",
        metavar="SPEC",
        help="TEST ONLY, destroys data: corrupt-read-after=N[,match=TEXT] flips a byte in one"
        " page of one READ after N reads; flush-delay-ms=N makes every FLUSH N ms slow"
        " (see nbdserver/backends/fault.py)",
    )
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        help="debug, info, warning, error or critical (default info)",
    )
    return parser


def _log_outcome(outcome: Outcome, failed: str) -> None:
    """A start-up setting's outcome: INFO when in effect, else WARNING led by ``failed``."""
    if outcome.ok:
        logger.info("%s", outcome.detail)
    else:
        logger.warning("%s%s", failed, outcome.detail)


def main(argv: list[str] | None = None) -> int:
    parent = os.getppid()  # before anything can outlive it (--exit-with-parent)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        config = build_config(vars(args))
        ssl_context = (
            server_context(config.tls_cert, config.tls_key, config.tls_ca)
            if config.tls_cert is not None and config.tls_key is not None
            else None
        )
    except ConfigError as exc:
        print(f"nbd-serve: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=log_level_number(config.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for warning in startup_warnings(config):
        logger.warning("%s", warning)
    try:
        activated = listening_sockets(activation_fds(os.environ, os.getpid()))
    except ActivationError as exc:
        print(f"nbd-serve: error: {exc}", file=sys.stderr)
        return 2
    tune_allocator()
    # Before any fork or thread: worker processes and threads inherit the policy.
    if config.sched_policy != "normal":
        _log_outcome(set_policy(config.sched_policy), "scheduling policy NOT in effect: ")

    def open_export(ec: ExportConfig) -> Export:
        backend = open_export_backend(ec, config.cow_dir)
        if config.fault is not None:
            backend = FaultBackend(backend, parse_fault(config.fault))
        return make_export(ec.name, ec.description, backend, ec.read_only, ec.allow)

    exports: list[Export] = []
    try:
        for ec in config.exports:
            exports.append(open_export(ec))
    except ConfigError as exc:
        for export in exports:
            export.backend.close()
        print(f"nbd-serve: error: {exc}", file=sys.stderr)
        return 2
    reloader = Reloader(vars(args), config, exports, open_export)
    count = config.workers if config.workers is not None else default_workers()
    swap_safe = swap_safe_wanted(config)
    workers: list[tuple[int, socket.socket]] = []

    def child(index: int, ctrl: socket.socket) -> int:
        # The exports in force now: a worker forked after a reload serves the new set.
        current = list(reloader.exports.values())
        return _worker(
            index, count, ctrl, config, current, swap_safe=swap_safe, ssl_context=ssl_context
        )

    try:
        if count > 1:
            workers = fork_workers(count - 1, child)
            set_connection_ids(0, count)
        report = _enter_swap_safe(config, exports) if swap_safe else None
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(
                serve(
                    config,
                    exports,
                    workers,
                    parent=parent,
                    activated=activated,
                    respawn=lambda index: respawn_worker(index, child),
                    swap_safe=report,
                    reloader=reloader,
                    ssl_context=ssl_context,
                )
            )
    finally:
        for backend in reloader.backends():
            backend.close()


def open_export_backend(ec: ExportConfig, cow_dir: str | None) -> Backend:
    """The backend of one configured export (with its --cow overlay, if asked)."""
    if not ec.cow:
        return open_backend(ec.backend, path=ec.path, size=ec.size, read_only=ec.read_only)
    assert ec.path is not None  # check_export: cow needs a file export
    base = open_backend("file", path=ec.path, read_only=True)
    try:
        return open_cow(base, ec.path, cow_dir, read_only=ec.read_only)
    except BaseException:
        base.close()
        raise


def swap_safe_wanted(config: ServerConfig) -> bool:
    """--swap-safe / --no-swap-safe, else on exactly when an export has swap = true."""
    if config.swap_safe is not None:
        return config.swap_safe
    return any(e.swap for e in config.exports)


def _enter_swap_safe(config: ServerConfig, exports: Sequence[Export]) -> SwapSafeReport:
    return enter_swap_safe_mode(config.max_inflight, max(e.info.max_block for e in exports))


def _worker(
    index: int,
    count: int,
    ctrl: socket.socket,
    config: ServerConfig,
    exports: list[Export],
    *,
    swap_safe: bool,
    ssl_context: ssl.SSLContext | None,
) -> int:
    """Body of a forked worker process (see nbdserver.workers)."""
    set_connection_ids(index, count)
    report = _enter_swap_safe(config, exports).as_dict() if swap_safe else None
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(
            run_worker(
                index,
                ctrl,
                exports,
                stats_interval=config.stats_interval if config.stats is not None else None,
                max_inflight_bytes=config.max_inflight,
                poll_us=config.poll_us,
                wake_mark=config.wake_mark,
                extended_headers=config.extended_headers,
                shutdown_grace=config.shutdown_grace,
                report=report,
                tls=config.tls,
                ssl_context=ssl_context,
            )
        )


def write_ready_file(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON atomically (temporary file + rename)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload) + "\n")
    tmp.replace(target)


async def serve(
    config: ServerConfig,
    exports: list[Export],
    workers: Sequence[tuple[int, socket.socket]] = (),
    *,
    parent: int | None = None,
    activated: Sequence[socket.socket] = (),
    respawn: Callable[[int], tuple[int, socket.socket]] | None = None,
    swap_safe: SwapSafeReport | None = None,
    reloader: Reloader | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    """Listen, write the ready file, serve until SIGINT/SIGTERM, shut down cleanly.

    ``activated`` are listening sockets handed over by socket activation
    (nbdserver.activation); with them nbd-serve binds nothing itself.

    With ``workers`` (forked by :func:`~nbdserver.workers.fork_workers`) this process
    accepts and shares the connections out; otherwise it serves them all itself.
    With ``config.exit_with_parent``, the death of ``parent`` (the pid that started us)
    is a shutdown request too. ``respawn(index)`` replaces a worker that died;
    ``swap_safe`` is this process's swap-safe outcome, reported in every stats line.
    SIGHUP has ``reloader`` re-read the config file and change the exports (the TLS
    mode and ``ssl_context``, the server's for STARTTLS, stay as they are).

    Returns the exit status: 0, or EXIT_WORKER_DIED when a worker process died.
    """
    server = NBDServer(
        exports,
        max_inflight_bytes=config.max_inflight,
        poll_us=config.poll_us,
        wake_mark=config.wake_mark,
        extended_headers=config.extended_headers,
        shutdown_grace=config.shutdown_grace,
        max_connections=config.max_connections,
        tls=config.tls,
        ssl_context=ssl_context,
    )
    acceptor = Acceptor(server, workers, respawn) if workers else None
    listen: list[dict[str, Any]] = []
    try:
        if acceptor is not None:
            acceptor.start()
        for sock in activated:
            if acceptor is not None:
                acceptor.adopt_listener(sock)
            else:
                await server.adopt_listener(sock)
            name = sock.getsockname()
            if sock.family == socket.AF_UNIX:
                listen.append({"kind": "unix", "path": str(name), "activated": True})
            else:
                listen.append({"kind": "tcp", "host": name[0], "port": name[1], "activated": True})
        if config.tcp and not activated:
            if acceptor is not None:
                bound = acceptor.listen_tcp(config.bind, config.port)
            else:
                bound = await server.listen_tcp(config.bind, config.port)
            for host, port in bound:
                listen.append({"kind": "tcp", "host": host, "port": port})
        if config.unix is not None and not activated:
            _remove_stale_socket(config.unix)
            if acceptor is not None:
                acceptor.listen_unix(config.unix)
            else:
                await server.listen_unix(config.unix)
            listen.append({"kind": "unix", "path": config.unix})
    except OSError as exc:
        logger.error("cannot listen: %s", exc)
        if acceptor is not None:
            await acceptor.shutdown()
        else:
            await server.shutdown()
        return 1
    for item in listen:
        where = f"{item['host']}:{item['port']}" if item["kind"] == "tcp" else item["path"]
        logger.info("listening on %s, exports %s", where, [e.info.name for e in exports])
    if workers:
        logger.info("%d worker processes besides this one", len(workers))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    def on_hangup() -> None:
        if reloader is None:
            logger.warning("SIGHUP ignored: this server cannot reload")
            return
        plan = reloader.reload()
        if plan is None or not plan.changes_anything:
            return
        live = reloader.exports
        # Removed exports stay resolvable for handshakes already under way.
        server.exports = {**{e.info.name: e for e in reloader.retired}, **live}
        server.export_infos = {name: e.info for name, e in live.items()}
        if acceptor is not None:
            acceptor.roll()

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    # Ready only once the signals are handled: a supervisor (or a test) that sends
    # SIGTERM as soon as it reads the ready file must get a clean shutdown, not death
    # by the default action.
    if config.ready_file is not None:
        write_ready_file(
            config.ready_file,
            {"pid": os.getpid(), "listen": listen, "exports": [e.info.name for e in exports]},
        )
    parent_fd = _watch_parent(loop, parent, stop) if config.exit_with_parent else None
    writer = StatsWriter(Path(config.stats)) if config.stats is not None else None

    def emit() -> None:
        if writer is None:
            return
        stats_by_name = {name: server.exports[name].stats for name in server.export_infos}
        extra: dict[str, Any] = {}
        if swap_safe is not None:
            extra["swap_safe"] = {
                **swap_safe.as_dict(),
                "workers": [w.report for w in acceptor.workers] if acceptor else [],
            }
        if acceptor is not None:
            extra["workers"] = acceptor.worker_stats()
            extra["receiving"] = acceptor.receiving(server.receiving())
            line = stats_line(
                time.time(),
                time.monotonic(),
                acceptor.open_connections,
                acceptor.total,
                acceptor.stats(stats_by_name),
                extra=extra,
            )
        else:
            extra["receiving"] = server.receiving()
            line = stats_line(
                time.time(),
                time.monotonic(),
                len(server.connections),
                server.total_connections,
                stats_by_name,
                extra=extra,
            )
        writer.write(line)

    async def ticker() -> None:
        while True:
            await asyncio.sleep(config.stats_interval)
            emit()

    tick = asyncio.create_task(ticker()) if writer is not None else None
    await stop.wait()
    logger.info("shutting down: finishing in-flight requests")
    if acceptor is not None:
        await acceptor.shutdown()
    else:
        await server.shutdown()
        flush_backends(list(server.exports.values()))
    if tick is not None:
        tick.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tick
    emit()
    if writer is not None:
        writer.close()
    if config.unix is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(config.unix)
    if parent_fd is not None:
        loop.remove_reader(parent_fd)
        os.close(parent_fd)
    if acceptor is not None and acceptor.deaths:
        logger.error(
            "%d worker process(es) died during the run; exiting with %d",
            acceptor.deaths,
            EXIT_WORKER_DIED,
        )
        return EXIT_WORKER_DIED
    return 0


def _watch_parent(
    loop: asyncio.AbstractEventLoop, parent: int | None, stop: asyncio.Event
) -> int | None:
    """Set ``stop`` when ``parent`` exits: a pidfd becomes readable when its process ends.

    Returns the pidfd to close (None when the parent is already gone, or when pidfds are
    unavailable and a once-a-second getppid() check does the job instead).
    """
    if parent is None or os.getppid() != parent:  # already orphaned: reparented
        logger.info("parent process is gone; shutting down (--exit-with-parent)")
        stop.set()
        return None

    def gone() -> None:
        logger.info("parent process %d exited; shutting down (--exit-with-parent)", parent)
        stop.set()

    try:
        fd = os.pidfd_open(parent)
    except OSError:

        async def poll() -> None:
            while os.getppid() == parent:
                await asyncio.sleep(1.0)
            gone()

        task = loop.create_task(poll())
        _background.add(task)
        task.add_done_callback(_background.discard)
        return None
    if os.getppid() != parent:  # died between the check and pidfd_open (pid reused?)
        os.close(fd)
        gone()
        return None
    loop.add_reader(fd, gone)
    return fd


_background: set[asyncio.Task[None]] = set()


def _remove_stale_socket(path: str) -> None:
    """Remove a leftover socket file (never any other kind of file)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISSOCK(mode):
        os.unlink(path)


if __name__ == "__main__":
    sys.exit(main())
