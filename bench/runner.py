"""Run the benchmark: one shared file, every server up, interleaved fio rounds, a report.

Order of work: check the tools, create the file on /dev/shm, start one instance of every
server per transport the workloads need (each confirmed on its endpoint), then for each
round, for each workload, run fio against each server in turn, the order rotated by one
every round (A B C, then B C A, then C A B) so that no server always runs first or right
after the same neighbour. CPU time and RSS
of the server under load are measured around each fio run. The optional peak-RSS scenario
runs last. Every server and the private directory are removed on the way out, also on
Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from bench import report
from bench.monitor import RssSampler, cpu_clock, steal_share, tree_cpu_seconds
from bench.servers import (
    ON_REQUEST,
    BenchError,
    ExportSpec,
    RunningServer,
    ServerKind,
    check_fio_nbd,
    checkout_command,
    checkout_version,
    require_tool,
    start_server,
    stop_server,
    tool_version,
)
from bench.workloads import (
    MIB,
    RSS_WORKLOAD,
    WORKLOADS_BY_NAME,
    FioOutputError,
    FioResult,
    Transport,
    Workload,
    fio_argv,
    parse_fio_json,
)

log = logging.getLogger(__name__)

FIO_GRACE_S = 60.0
"""fio gets runtime + ramp + this long before it is declared hung."""


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything a run needs to know, resolved from the command line."""

    servers: tuple[ServerKind, ...]
    workloads: tuple[Workload, ...]
    rounds: int
    runtime_s: float
    ramp_s: float
    file_size: int
    rss_scenario: bool
    rss_runtime_s: float
    baseline: ServerKind
    out_dir: Path
    name: str
    """Stem of the result files: NAME.md and NAME.json."""
    title: str
    sample_interval_s: float = 0.05
    shm_dir: Path = Path("/dev/shm")
    old_checkout: Path | None = None
    """The swapnbd checkout that server nbd-serve-old runs (``--old-nbd-serve``)."""
    pin: Pinning | None = None
    """``--pin``: fio and the servers on disjoint CPUs (:func:`pinning`)."""

    def estimate_s(self) -> float:
        per_cell = self.runtime_s + self.ramp_s + 0.55  # fio start-up and teardown
        cells = self.rounds * len(self.workloads) * len(self.servers)
        rss = len(self.servers) * (self.rss_runtime_s + 0.5) if self.rss_scenario else 0.0
        return cells * per_cell + rss + 3.0


@dataclass(frozen=True, slots=True)
class Pinning:
    """CPUs for fio and for every server's processes and threads."""

    fio: frozenset[int]
    servers: frozenset[int]

    def describe(self) -> dict[str, list[int]]:
        return {"fio": sorted(self.fio), "servers": sorted(self.servers)}


def pinning(allowed: set[int]) -> Pinning:
    """fio on the lowest CPU this process may use, the servers on the others.

    Without it the scheduler decides, run by run, whether fio and the server share a
    core: in the Unix-socket write cell that alone moved a server between about 100k and
    200k IOPS from round to round (docs/performance.md, "Checking for regressions").

    Raises:
        BenchError: fewer than two CPUs to split.
    """
    if len(allowed) < 2:
        raise BenchError(f"--pin needs at least two CPUs; this process may use {sorted(allowed)}")
    first = min(allowed)
    return Pinning(frozenset({first}), frozenset(allowed - {first}))


def pin_tree(proc: psutil.Process, cpus: frozenset[int]) -> int:
    """Pin every thread of ``proc`` and of its descendants to ``cpus``; returns how many.

    Threads and processes they start later inherit the mask. A thread that exits
    meanwhile is skipped.
    """
    pinned = 0
    for p in (proc, *proc.children(recursive=True)):
        try:
            tids = [t.id for t in p.threads()]
        except psutil.NoSuchProcess:
            continue
        for tid in tids:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(tid, cpus)
                pinned += 1
    return pinned


@dataclass(frozen=True, slots=True)
class Outcome:
    markdown: str
    document: dict[str, Any]
    md_path: Path
    json_path: Path


class Terminated(BaseException):
    """SIGTERM arrived; unwinds like KeyboardInterrupt so cleanup runs."""


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_tools(plan: Plan) -> str:
    """Resolve every program the plan needs; returns fio's path."""
    fio = require_tool("fio")
    check_fio_nbd(fio)
    require_tool("nbdinfo")
    if plan.pin is not None:
        require_tool("taskset")
    for kind in plan.servers:
        if kind is ServerKind.NBD_SERVE_OLD:
            if plan.old_checkout is None:
                raise BenchError("server nbd-serve-old needs --old-nbd-serve DIR")
            checkout_command(plan.old_checkout)
        else:
            require_tool(kind.value)
    return fio


def make_shared_file(directory: Path, size: int) -> Path:
    """A *size*-byte file filled with non-zero data, so reads touch real pages."""
    if size < MIB or size % MIB:
        raise BenchError(f"file size must be a positive multiple of 1 MiB, got {size}")
    path = directory / "disk.img"
    block = os.urandom(MIB)
    with path.open("wb") as f:
        for _ in range(size // MIB):
            f.write(block)
    return path


def run_fio(
    fio: str, workload: Workload, uri: str, *, size: int, runtime_s: float, ramp_s: float,
    workdir: Path, cpus: frozenset[int] | None = None,
) -> FioResult:  # fmt: skip
    """Run one fio job (on ``cpus`` if given) and parse its report.

    Raises:
        BenchError: fio failed, hung, or reported no I/O.
    """
    out = workdir / "fio.json"
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    argv = fio_argv(
        workload, uri=uri, size=size, runtime_s=runtime_s, ramp_s=ramp_s, output=str(out), fio=fio
    )
    if cpus is not None:
        argv = ["taskset", "--cpu-list", ",".join(map(str, sorted(cpus))), *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        chatter, _ = proc.communicate(timeout=runtime_s + ramp_s + FIO_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise BenchError(f"fio hung on {workload.name} against {uri}; killed it") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise BenchError(
            f"fio exited {proc.returncode} on {workload.name} against {uri}: "
            f"{chatter.strip()[-600:]}"
        )
    try:
        return parse_fio_json(out.read_text())
    except (OSError, FioOutputError) as exc:
        raise BenchError(f"{workload.name} against {uri}: {exc}") from exc


def rotated(servers: Sequence[ServerKind], shift: int) -> list[ServerKind]:
    """*servers* rotated left by *shift*: round r runs them from the r-th one on.

    A fixed order biases the ratios: the first server of a cell always follows the
    previous cell's last one. In 8 rotated rounds of the Unix-socket write cell
    (2026-11-29, two nbd-serve versions), the server that ran first made a median 163k
    IOPS and the one that ran second 194k, whichever it was.
    """
    k = shift % len(servers) if servers else 0
    return [*servers[k:], *servers[:k]]


def leads(servers: Sequence[ServerKind], rounds: int) -> dict[str, int]:
    """How many of ``rounds`` rotated rounds each server runs first in."""
    counts = {k.value: 0 for k in servers}
    for r in range(rounds):
        order = rotated(servers, r)
        if order:
            counts[order[0].value] += 1
    return counts


def balance_warning(plan: Plan) -> str | None:
    """Why ``plan``'s ratios may lean, when its rounds do not put every server first equally
    often; None when they do.

    The first run of a cell can be the slow one whichever server makes it: in the Unix
    write cell, 0.73x-0.86x of the same server's IOPS in the other positions, for every
    server, in three runs of 2026-11-29/30 (docs/performance.md, "Checking for
    regressions").
    """
    counts = leads(plan.servers, plan.rounds)
    if len(set(counts.values())) <= 1:
        return None
    n = len(plan.servers)
    listed = ", ".join(f"{k} {v}" for k, v in counts.items())
    return (
        f"{plan.rounds} rounds over {n} servers: rounds led by each server: {listed}. The"
        " first run of a cell can be slower whoever makes it, so ratios lean against a server"
        f" that leads more often; use a multiple of {n} rounds for even ratios"
    )


def _measure(
    *,
    fio: str, workload: Workload, server: RunningServer, sampler: RssSampler,
    spec: ExportSpec, runtime_s: float, ramp_s: float, label: str | None = None,
    pin: Pinning | None = None,
) -> tuple[FioResult, float, int, float]:  # fmt: skip
    """One fio run: its result, the server tree's CPU seconds, its peak RSS and the
    machine's steal share over the run (ramp included)."""
    proc = server.process()
    if pin is not None:  # again each time: a forking server's child of the last run is gone
        pin_tree(proc, pin.servers)
    cpu0 = tree_cpu_seconds(proc)
    clock0 = cpu_clock()
    sampler.watch(proc, label or server.kind)
    try:
        result = run_fio(
            fio, workload, server.uri, size=spec.size, runtime_s=runtime_s, ramp_s=ramp_s,
            workdir=spec.workdir, cpus=pin.fio if pin is not None else None,
        )  # fmt: skip
    finally:
        peak = sampler.stop()
    steal = steal_share(clock0, cpu_clock())
    # Let a forking server reap the child that served fio, so its CPU time is counted.
    time.sleep(0.05)
    # fio does not count the bytes of its ramp-up; scale the CPU time the same way, so
    # CPU s/GiB relates work to the bytes it moved (the load is steady over the run).
    cpu = (tree_cpu_seconds(proc) - cpu0) * runtime_s / (runtime_s + ramp_s)
    if not proc.is_running():
        raise BenchError(f"{server.label} died during {workload.name}; log: {server.log_path}")
    return result, max(cpu, 0.0), peak, steal


def _machine() -> dict[str, Any]:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count() or 0,
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def run(plan: Plan) -> Outcome:
    """Execute *plan* and write NAME.md and NAME.json into ``plan.out_dir``.

    Raises:
        BenchError: fio failed, or the shared file could not be made.
        peers.servers.ServerError: a tool is missing (ToolMissingError) or a server failed.
    """
    fio = check_tools(plan)
    started_wall = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    load0 = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="swapnbd-bench-", dir=plan.shm_dir))
    running: dict[tuple[ServerKind, Transport], RunningServer] = {}
    extra: list[RunningServer] = []
    sampler = RssSampler(plan.sample_interval_s)
    cells: list[report.Cell] = []
    rss_runs: list[report.RssRun] = []
    try:
        with _sigterm_unwinds():
            path = make_shared_file(workdir, plan.file_size)
            spec = ExportSpec(path=path, size=plan.file_size, workdir=workdir)
            transports = sorted({w.transport for w in plan.workloads}
                                | ({Transport.TCP} if plan.rss_scenario else set()))  # fmt: skip
            for kind in plan.servers:
                for t in transports:
                    srv = start_server(kind, t, spec, checkout=plan.old_checkout)
                    running[(kind, t)] = srv
                    _progress(f"started {srv.label} pid {srv.pid} at {srv.uri}")
            _progress(f"estimated duration: {plan.estimate_s():.0f} s")
            warning = balance_warning(plan)
            if warning is not None:
                _progress(f"warning: {warning}")
            for rnd in range(1, plan.rounds + 1):
                for w in plan.workloads:
                    for kind in rotated(plan.servers, rnd - 1):
                        srv = running[(kind, w.transport)]
                        result, cpu, peak, steal = _measure(
                            fio=fio, workload=w, server=srv, sampler=sampler, spec=spec,
                            runtime_s=plan.runtime_s, ramp_s=plan.ramp_s, pin=plan.pin,
                        )  # fmt: skip
                        cells.append(report.Cell(rnd, w.name, kind.value, result, cpu, peak, steal))
                        _progress(
                            f"[round {rnd}/{plan.rounds}] {w.name:<26} {kind.value:<10} "
                            f"{result.iops:>10,.0f} IOPS {result.mib_per_s:>8.1f} MiB/s "
                            f"cpu {cpu:5.2f} s rss {peak / MIB:6.1f} MiB steal {steal:6.1%}"
                        )
            if plan.rss_scenario:
                # A fresh instance per server, so the figure is this scenario's alone and
                # not what earlier connections left behind.
                for srv in running.values():
                    stop_server(srv)
                for kind in plan.servers:
                    srv = start_server(kind, Transport.TCP, spec, checkout=plan.old_checkout)
                    extra.append(srv)
                    result, _cpu, peak, _steal = _measure(
                        fio=fio, workload=RSS_WORKLOAD, server=srv, sampler=sampler, spec=spec,
                        runtime_s=plan.rss_runtime_s, ramp_s=0.0, label=f"{kind.value} (rss)",
                        pin=plan.pin,
                    )  # fmt: skip
                    stop_server(srv)
                    rss_runs.append(report.RssRun(kind.value, result, peak))
                    _progress(
                        f"[rss] {RSS_WORKLOAD.name} {kind.value:<10} tcp pid {srv.pid} at "
                        f"{srv.uri}: fresh instance, peak RSS {peak / MIB:.1f} MiB, "
                        f"{result.mib_per_s:.0f} MiB/s"
                    )
    finally:
        for srv in [*running.values(), *extra]:
            stop_server(srv)
        sampler.close()
        shutil.rmtree(workdir, ignore_errors=True)

    servers = [k.value for k in plan.servers]
    baseline = plan.baseline.value
    summaries = report.summarize(
        cells, workloads=plan.workloads, servers=servers, baseline=baseline
    )
    meta: dict[str, Any] = {
        **_machine(),
        "started": started_wall.strftime("%Y-%m-%d %H:%M"),
        "duration_s": round(time.monotonic() - t0, 1),
        "loadavg_start": [round(x, 2) for x in load0],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "rounds": plan.rounds,
        "runtime_s": plan.runtime_s,
        "ramp_s": plan.ramp_s,
        "file_size": plan.file_size,
        "sample_interval_s": plan.sample_interval_s,
        "servers": servers,
        "baseline": baseline,
        "workloads": {w.name: w.description for w in plan.workloads},
        "fio": tool_version("fio"),
        "server_versions": {
            k.value: checkout_version(plan.old_checkout)
            if k is ServerKind.NBD_SERVE_OLD and plan.old_checkout is not None
            else tool_version(k)
            for k in plan.servers
        },
        "baseline_rss_peak": sampler.overall.get(baseline),
        "rss_peak_by_server": dict(sampler.overall),
        "qemu_nbd_args": "--cache=writeback --aio=threads --shared=8",
        "pin": plan.pin.describe() if plan.pin is not None else None,
        "leads": leads(plan.servers, plan.rounds),
    }
    markdown = report.render_markdown(
        title=plan.title,
        meta=meta,
        summaries=summaries,
        workloads=plan.workloads,
        servers=servers,
        baseline=baseline,
        rss_runs=rss_runs,
        rss_description=RSS_WORKLOAD.description,
        cells=cells,
    )
    document = report.to_json(meta=meta, cells=cells, summaries=summaries, rss_runs=rss_runs)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    md_path = plan.out_dir / f"{plan.name}.md"
    json_path = plan.out_dir / f"{plan.name}.json"
    md_path.write_text(markdown)
    json_path.write_text(report.dumps_compact(document))
    return Outcome(markdown, document, md_path, json_path)


def parse_servers(spec: str | None) -> tuple[ServerKind, ...]:
    """Servers named in a comma-separated *spec*, in the canonical order; when None, all
    but those run only on request (:data:`bench.servers.ON_REQUEST`)."""
    if spec is None:
        return tuple(k for k in ServerKind if k not in ON_REQUEST)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    known = {k.value: k for k in ServerKind}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(
            f"unknown server(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}"
        )
    return tuple(k for k in ServerKind if k.value in names)


def describe(workloads: Sequence[Workload]) -> str:
    return "\n".join(f"{w.name:<28} {w.description}" for w in workloads)


def render(json_path: Path, out_dir: Path, name: str) -> Outcome:
    """Summarise and render a results JSON again from its cells (``--render``): a
    committed result regenerates its Markdown, and an older run gets today's figures.

    Raises:
        BenchError: the file is not a bench result.
    """
    try:
        document = json.loads(json_path.read_text())
        meta = document["meta"]
        cells, rss_runs = report.from_json(document)
        workloads = [WORKLOADS_BY_NAME[w] for w in meta["workloads"]]
        servers, baseline = list(meta["servers"]), str(meta["baseline"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"{json_path}: cannot render: {exc}") from None
    summaries = report.summarize(cells, workloads=workloads, servers=servers, baseline=baseline)
    markdown = report.render_markdown(
        title=f"swapnbd bench: {name} run",
        meta=meta,
        summaries=summaries,
        workloads=workloads,
        servers=servers,
        baseline=baseline,
        rss_runs=rss_runs,
        rss_description=RSS_WORKLOAD.description,
        cells=cells,
    )
    document = report.to_json(meta=meta, cells=cells, summaries=summaries, rss_runs=rss_runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, out_json = out_dir / f"{name}.md", out_dir / f"{name}.json"
    md_path.write_text(markdown)
    out_json.write_text(report.dumps_compact(document))
    return Outcome(markdown, document, md_path, out_json)
