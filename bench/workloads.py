"""fio workloads for the benchmark, and the parsing of fio's JSON output.

Every workload runs fio's ``nbd`` engine (libnbd inside fio) against an NBD URI. fio opens
one NBD connection per job, so a workload with ``connections=N`` runs ``numjobs=N`` with
``group_reporting`` and fio sums the jobs into one result: that is how the multi-conn
figures are aggregated.

This module is pure: it builds argv lists and parses JSON text. Running fio is the job of
``bench.__main__``.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

KIB = 1024
MIB = 1024 * 1024
GIB = 1024 * MIB


class Transport(enum.StrEnum):
    """How fio reaches the server."""

    TCP = "tcp"
    UNIX = "unix"


class Pattern(enum.StrEnum):
    """fio's ``rw=`` values used here."""

    READ = "read"
    WRITE = "write"
    RANDREAD = "randread"
    RANDWRITE = "randwrite"


@dataclass(frozen=True, slots=True)
class Workload:
    """One fio job description: what to send, how deep, over how many connections."""

    name: str
    """Stable identifier used by ``--workloads`` and in the result files."""
    pattern: Pattern
    block_size: int
    """Bytes per request."""
    iodepth: int
    """Requests in flight per connection."""
    connections: int = 1
    """fio ``numjobs``; each job opens its own NBD connection."""
    transport: Transport = Transport.TCP

    @property
    def description(self) -> str:
        kind = {
            Pattern.READ: "seq read",
            Pattern.WRITE: "seq write",
            Pattern.RANDREAD: "rand read",
            Pattern.RANDWRITE: "rand write",
        }[self.pattern]
        size = (
            f"{self.block_size // MIB} MiB"
            if self.block_size >= MIB
            else f"{self.block_size // KIB} KiB"
        )
        conns = f" x{self.connections} conn" if self.connections > 1 else ""
        via = " unix" if self.transport is Transport.UNIX else ""
        return f"{kind} {size} QD{self.iodepth}{conns}{via}"


def _w(  # noqa: PLR0917 - a compact table row
    name: str,
    pattern: Pattern,
    bs: int,
    qd: int,
    conns: int = 1,
    transport: Transport = Transport.TCP,
) -> Workload:
    return Workload(name, pattern, bs, qd, conns, transport)


# The list, in the order the table shows it.
WORKLOADS: tuple[Workload, ...] = (
    _w("seq-read-1m-qd8", Pattern.READ, MIB, 8),
    _w("seq-write-1m-qd8", Pattern.WRITE, MIB, 8),
    _w("rand-read-4k-qd32", Pattern.RANDREAD, 4 * KIB, 32),
    _w("rand-write-4k-qd32", Pattern.RANDWRITE, 4 * KIB, 32),
    _w("rand-read-4k-qd1", Pattern.RANDREAD, 4 * KIB, 1),
    _w("rand-read-4k-qd32-2conn", Pattern.RANDREAD, 4 * KIB, 32, 2),
    _w("rand-write-4k-qd32-2conn", Pattern.RANDWRITE, 4 * KIB, 32, 2),
    _w("rand-read-4k-qd32-4conn", Pattern.RANDREAD, 4 * KIB, 32, 4),
    _w("rand-write-4k-qd32-4conn", Pattern.RANDWRITE, 4 * KIB, 32, 4),
    _w("unix-rand-read-4k-qd32", Pattern.RANDREAD, 4 * KIB, 32, 1, Transport.UNIX),
    _w("unix-rand-write-4k-qd32", Pattern.RANDWRITE, 4 * KIB, 32, 1, Transport.UNIX),
)

# The memory target of the issue: 4 connections at QD128 of 1 MiB writes. It is run
# separately from the table because what it measures is the server's peak RSS.
RSS_WORKLOAD = _w("rss-write-1m-qd128-4conn", Pattern.WRITE, MIB, 128, 4)

WORKLOADS_BY_NAME: dict[str, Workload] = {w.name: w for w in (*WORKLOADS, RSS_WORKLOAD)}


class FioOutputError(ValueError):
    """fio's output was not the JSON document this module expects."""


@dataclass(frozen=True, slots=True)
class FioResult:
    """The figures of one fio run, summed over its jobs and directions."""

    read_iops: float
    write_iops: float
    read_bytes_per_s: float
    write_bytes_per_s: float
    bytes_moved: int
    """Bytes read plus bytes written after ramp-up."""
    lat_mean_us: float
    """Mean completion latency, weighted by the number of I/Os in each direction."""
    lat_p99_us: float
    """Worst 99th-percentile completion latency of the two directions."""

    @property
    def iops(self) -> float:
        return self.read_iops + self.write_iops

    @property
    def mib_per_s(self) -> float:
        return (self.read_bytes_per_s + self.write_bytes_per_s) / MIB


def fio_argv(
    workload: Workload,
    *,
    uri: str,
    size: int,
    runtime_s: float,
    ramp_s: float,
    output: str,
    fio: str = "fio",
) -> list[str]:
    """The fio command line for *workload* against the export at *uri*.

    Args:
        size: bytes of the export fio may touch (the whole file).
        output: path fio writes its JSON report to. fio's nbd engine prints
            "connected to NBD server" on stdout, so stdout is not clean JSON.
    """
    if runtime_s <= 0:
        raise ValueError(f"runtime must be > 0 seconds, got {runtime_s}")
    if ramp_s < 0:
        raise ValueError(f"ramp time must be >= 0 seconds, got {ramp_s}")
    argv = [
        fio,
        f"--name={workload.name}",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={workload.pattern.value}",
        f"--bs={workload.block_size}",
        f"--iodepth={workload.iodepth}",
        f"--numjobs={workload.connections}",
        "--group_reporting",
        f"--size={size}",
        "--time_based",
        f"--runtime={_ms(runtime_s)}",
        "--output-format=json",
        f"--output={output}",
    ]
    if ramp_s > 0:
        argv.append(f"--ramp_time={_ms(ramp_s)}")
    if workload.pattern in (Pattern.RANDREAD, Pattern.RANDWRITE):
        # Keeping a map of visited blocks costs fio CPU that the server would rather have.
        argv += ["--norandommap", "--randrepeat=0"]
    return argv


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def parse_fio_json(text: str) -> FioResult:
    """Parse fio's ``--output-format=json`` report (one group-reported job).

    Text before the first ``{`` (fio's engines print chatter there) is ignored.

    Raises:
        FioOutputError: the text is not a fio report, a job reports an error, or no
            I/O was done.
    """
    start = text.find("{")
    if start < 0:
        raise FioOutputError(f"no JSON object in fio output: {text[:200]!r}")
    try:
        doc = json.loads(text[start:])
    except json.JSONDecodeError as exc:
        raise FioOutputError(f"fio output is not valid JSON: {exc}") from exc
    jobs = doc.get("jobs") if isinstance(doc, dict) else None
    if not isinstance(jobs, list) or not jobs:
        raise FioOutputError("fio report has no 'jobs' list")
    read_iops = write_iops = read_bw = write_bw = 0.0
    moved = 0
    lat_weighted = 0.0
    ios = 0
    p99 = 0.0
    for job in jobs:
        if not isinstance(job, dict):
            raise FioOutputError("fio job entry is not an object")
        if job.get("error"):
            raise FioOutputError(f"fio job {job.get('jobname')!r} failed: error {job['error']}")
        for direction in ("read", "write"):
            stats = _obj(job, direction)
            iops = float(stats.get("iops", 0.0))
            bw = float(stats.get("bw_bytes", 0.0))
            io_bytes = int(stats.get("io_bytes", 0))
            clat = _obj(stats, "clat_ns")
            n = int(clat.get("N", 0))
            if direction == "read":
                read_iops += iops
                read_bw += bw
            else:
                write_iops += iops
                write_bw += bw
            moved += io_bytes
            if n:
                lat_weighted += float(clat.get("mean", 0.0)) * n
                ios += n
                pct = clat.get("percentile")
                if isinstance(pct, dict) and "99.000000" in pct:
                    p99 = max(p99, float(pct["99.000000"]))
    if moved <= 0:
        raise FioOutputError("fio moved no data (0 bytes read and written)")
    return FioResult(
        read_iops=read_iops,
        write_iops=write_iops,
        read_bytes_per_s=read_bw,
        write_bytes_per_s=write_bw,
        bytes_moved=moved,
        lat_mean_us=(lat_weighted / ios / 1000.0) if ios else 0.0,
        lat_p99_us=p99 / 1000.0,
    )


def _obj(parent: dict[str, Any], key: str) -> dict[str, Any]:
    value = parent.get(key)
    if not isinstance(value, dict):
        raise FioOutputError(f"fio report lacks the object {key!r}")
    return value


def select_workloads(spec: str | None) -> tuple[Workload, ...]:
    """Workloads named in a comma-separated *spec*, in table order; all when None.

    Raises:
        ValueError: a name is unknown (the message lists the known names).
    """
    if spec is None:
        return WORKLOADS
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError("--workloads is empty; give a comma-separated list of names")
    table = {w.name: w for w in WORKLOADS}
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(table)}")
    return tuple(w for w in WORKLOADS if w.name in names)
