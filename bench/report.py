"""Turn per-round measurements into medians, ratios, a Markdown table and a JSON document.

Theory of operation: the benchmark runs every server once per workload per round, with
the servers of one workload back to back (A B C D, then the next workload, then the next
round). Machine drift (other tenants, CPU frequency) moves neighbouring cells together, so
the *per-round* ratio server / baseline is the drift-cancelled figure; the table shows the
median of those ratios over rounds, next to the median absolute figures.

Pure code: no clock, no processes, no files.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

from bench.workloads import GIB, MIB, FioResult, Workload


@dataclass(frozen=True, slots=True)
class Cell:
    """One fio run: one server, one workload, one round."""

    round: int
    workload: str
    server: str
    result: FioResult
    cpu_s: float
    """CPU seconds (user + system) the server's process tree used during the run."""
    rss_peak: int
    """Peak resident set size in bytes of the server's process tree, sampled."""
    steal: float | None = None
    """Share of the machine's CPU time the hypervisor gave other guests during the run
    (None: not measured, results before 2026-12-06 evening)."""

    @property
    def cpu_s_per_gib(self) -> float:
        return self.cpu_s / (self.result.bytes_moved / GIB)


@dataclass(frozen=True, slots=True)
class Summary:
    """Medians over rounds for one (workload, server)."""

    workload: str
    server: str
    rounds: int
    iops: float
    mib_per_s: float
    lat_mean_us: float
    lat_p99_us: float
    cpu_s_per_gib: float
    rss_peak: int
    """Maximum over rounds (a peak, not a median)."""
    ratio: float | None
    """Median over rotation cycles of the geometric mean of this server's IOPS / the
    baseline's IOPS in the cycle's rounds (:func:`cycle_ratios`); over single rounds when
    no whole cycle ran; None when the baseline did not run this workload."""
    round_ratio: float | None = None
    """Median over single rounds of the same ratio (the figure before cycles)."""
    cycles: int | None = None
    """Whole rotation cycles this ratio could use (None: no steal was measured)."""
    steady_cycles: int | None = None
    """Of them, those no run of which lost more than :data:`MAX_STEAL` to steal: the
    ones ``ratio`` is the median of (all of them, when none is steady)."""
    ratio_interval: tuple[float, float] | None = None
    """95% interval of that median (:func:`median_interval` over the same cycles); None
    with fewer than 6 cycles or when no steal was measured."""


#: A rotation cycle in which this server's or the baseline's run lost more than this share
#: of the machine's CPU time to steal timed the host's other tenants, not the servers: the
#: ratios leave it out. Set before any run measured steal (2026-12-06), not fitted to one.
MAX_STEAL: Final = 0.02


def median(values: Iterable[float]) -> float:
    """Median of *values*; raises ValueError on an empty input."""
    data = list(values)
    if not data:
        raise ValueError("median of an empty sequence")
    return float(statistics.median(data))


def median_interval(
    values: Iterable[float], confidence: float = 0.95
) -> tuple[float, float] | None:
    """A distribution-free interval for the median of ``values``: the order statistics
    x(k) and x(n-k+1) for the largest k whose binomial tail P(Bin(n, 1/2) < k) is at most
    (1 - confidence) / 2, so the interval covers the median with at least that
    confidence whatever the ratios' distribution. None when n is too small for any k
    (fewer than 6 values at 95%)."""
    data = sorted(values)
    n = len(data)
    alpha = (1.0 - confidence) / 2
    k, tail = 0, 0.0
    while k < n // 2:
        nxt = tail + math.comb(n, k) / 2**n  # P(Bin(n, 1/2) <= k)
        if nxt > alpha:
            break
        tail = nxt
        k += 1
    if k == 0:
        return None
    return data[k - 1], data[n - k]


def _iops_by_round(cells: Sequence[Cell], workload: str) -> dict[tuple[int, str], float]:
    """IOPS of *workload*'s cells by (round, server)."""
    return {(c.round, c.server): c.result.iops for c in cells if c.workload == workload}


def per_round_ratios(
    cells: Sequence[Cell], *, workload: str, server: str, baseline: str
) -> list[float]:
    """IOPS of *server* divided by IOPS of *baseline*, one value per round both ran."""
    by_round = _iops_by_round(cells, workload)
    ratios = []
    for (rnd, srv), iops in sorted(by_round.items()):
        if srv != server:
            continue
        base = by_round.get((rnd, baseline))
        if base is not None and base > 0:
            ratios.append(iops / base)
    return ratios


def cycle_ratios(
    cells: Sequence[Cell],
    *,
    workload: str,
    server: str,
    baseline: str,
    cycle: int,
    max_steal: float | None = None,
) -> list[float]:
    """One ratio per whole rotation cycle: rounds ``k*cycle+1 .. (k+1)*cycle`` (1-based),
    the geometric mean of *server*'s IOPS / *baseline*'s in each of them. A cycle missing
    a round (the run stopped early, or a server did not run) gives no value; with
    ``max_steal``, neither does one in which either server's run lost more than that
    share of the machine's CPU time to steal."""
    if cycle < 1:
        raise ValueError(f"cycle must be at least 1, got {cycle}")
    iops = _iops_by_round(cells, workload)
    stolen = {(c.round, c.server): c.steal or 0.0 for c in cells if c.workload == workload}
    rounds = sorted({r for r, _ in iops})
    out = []
    for first in range(1, (max(rounds) if rounds else 0) + 1, cycle):
        ratios = []
        for rnd in range(first, first + cycle):
            mine, base = iops.get((rnd, server)), iops.get((rnd, baseline))
            if mine is None or base is None or base <= 0 or mine <= 0:
                break
            if (
                max_steal is not None
                and max(stolen.get((rnd, server), 0.0), stolen.get((rnd, baseline), 0.0))
                > max_steal
            ):
                break
            ratios.append(mine / base)
        if len(ratios) == cycle:
            out.append(statistics.geometric_mean(ratios))
    return out


def summarize(
    cells: Sequence[Cell],
    *,
    workloads: Sequence[Workload],
    servers: Sequence[str],
    baseline: str,
) -> list[Summary]:
    """One Summary per (workload, server) that has cells, in workload then server order.
    A rotation cycle is as many rounds as there are *servers*."""
    out = []
    for w in workloads:
        for s in servers:
            mine = [c for c in cells if c.workload == w.name and c.server == s]
            if not mine:
                continue
            ratios = per_round_ratios(cells, workload=w.name, server=s, baseline=baseline)
            cycles = cycle_ratios(
                cells, workload=w.name, server=s, baseline=baseline, cycle=len(servers)
            )
            measured = any(c.steal is not None for c in mine)
            steady = (
                cycle_ratios(
                    cells,
                    workload=w.name,
                    server=s,
                    baseline=baseline,
                    cycle=len(servers),
                    max_steal=MAX_STEAL,
                )
                if measured
                else cycles
            )
            used = steady or cycles
            if used:
                ratio: float | None = median(used)
            else:
                ratio = median(ratios) if ratios else None
            out.append(
                Summary(
                    workload=w.name,
                    server=s,
                    rounds=len(mine),
                    iops=median(c.result.iops for c in mine),
                    mib_per_s=median(c.result.mib_per_s for c in mine),
                    lat_mean_us=median(c.result.lat_mean_us for c in mine),
                    lat_p99_us=median(c.result.lat_p99_us for c in mine),
                    cpu_s_per_gib=median(c.cpu_s_per_gib for c in mine),
                    rss_peak=max(c.rss_peak for c in mine),
                    ratio=ratio,
                    round_ratio=median(ratios) if ratios else None,
                    cycles=len(cycles) if measured else None,
                    steady_cycles=len(steady) if measured else None,
                    ratio_interval=median_interval(used) if measured else None,
                )
            )
    return out


def _fmt_num(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _load(values: Any) -> str:
    if not isinstance(values, list | tuple):
        return "n/a"
    return "/".join(f"{float(v):.1f}" for v in values)


def _fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def table_markdown(
    summaries: Sequence[Summary], workloads: Sequence[Workload], baseline: str
) -> str:
    """The main table: a row per (workload, server)."""
    desc = {w.name: w.description for w in workloads}
    lines = [
        f"| Workload | Server | IOPS | MiB/s | vs {baseline} | mean lat µs | p99 lat µs "
        "| CPU s/GiB | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        lines.append(
            f"| {desc.get(s.workload, s.workload)} | {s.server} | {_fmt_num(s.iops)} "
            f"| {_fmt_num(s.mib_per_s)} | {_fmt_ratio(s.ratio)} | {_fmt_num(s.lat_mean_us)} "
            f"| {_fmt_num(s.lat_p99_us)} | {_fmt_num(s.cpu_s_per_gib)} "
            f"| {s.rss_peak / MIB:.1f} |"
        )
    return "\n".join(lines)


def versus_markdown(
    summaries: Sequence[Summary],
    workloads: Sequence[Workload],
    servers: Sequence[str],
    baseline: str,
) -> str:
    """baseline ÷ each peer per workload (inverse of the per-round median ratio); the
    issue's target is >= 1.00 everywhere."""
    peers = [s for s in servers if s != baseline]
    if not peers:
        return ""
    ratio = {(s.workload, s.server): s.ratio for s in summaries}
    lines = [
        "| Workload | " + " | ".join(f"{baseline} ÷ {p}" for p in peers) + " |",
        "|---|" + "---:|" * len(peers),
    ]
    for w in workloads:
        cells = []
        for p in peers:
            r = ratio.get((w.name, p))
            if r is None or r <= 0:
                cells.append("n/a")
            else:
                shown = f"{1.0 / r:.2f}"
                # Judge the figure as printed, so a row never reads "1.00x ✗".
                cells.append(f"{shown}x" + ("" if float(shown) >= 1.0 else " ✗"))
        if any(c != "n/a" for c in cells):
            lines.append(f"| {w.description} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class RssRun:
    """The peak-RSS scenario for one server."""

    server: str
    result: FioResult
    rss_peak: int


def rss_markdown(runs: Sequence[RssRun], description: str) -> str:
    lines = [
        f"| Server | peak RSS MiB ({description}) | MiB/s |",
        "|---|---:|---:|",
    ]
    for r in runs:
        lines.append(f"| {r.server} | {r.rss_peak / MIB:.1f} | {_fmt_num(r.result.mib_per_s)} |")
    return "\n".join(lines)


def _leads(leads: dict[str, int] | None) -> str:
    if not leads or len(leads) < 2:
        return ""
    if len(set(leads.values())) == 1:
        return f" (each first in {next(iter(leads.values()))})"
    listed = ", ".join(f"{k} {v}" for k, v in leads.items())
    return f" (rounds led: {listed}; uneven, so ratios lean against the server that led most)"


def steal_markdown(
    cells: Sequence[Cell],
    summaries: Sequence[Summary],
    workloads: Sequence[Workload],
    baseline: str,
) -> str:
    """What steal took and which cycles the ratios kept; "" when steal was not measured."""
    measured = [c.steal for c in cells if c.steal is not None]
    if not measured:
        return ""
    over = sum(1 for x in measured if x > MAX_STEAL)
    desc = {w.name: w.description for w in workloads}
    peers = {s.server for s in summaries if s.server != baseline}
    kept = [
        f"{desc.get(s.workload, s.workload)}"
        + (f" ({s.server})" if len(peers) > 1 else "")
        + f" {s.steady_cycles}/{s.cycles}"
        + (
            f" ({s.ratio_interval[0]:.2f}-{s.ratio_interval[1]:.2f})"
            if s.ratio_interval is not None
            else ""
        )
        for s in summaries
        if s.server != baseline and s.cycles is not None
    ]
    return (
        f"Steal (the share of the machine's CPU time the hypervisor gave other tenants, read "
        f"around every run): {over} of {len(measured)} runs lost more than "
        f"{MAX_STEAL:.0%}, the worst {max(measured):.1%}. The 'vs {baseline}' ratios leave "
        "out the rotation cycles in which either server's run lost more than that (all "
        "cycles count when none is left); cycles kept"
        + (
            ", with the 95% interval of the median ratio where there are at least 6"
            if any(s.ratio_interval is not None for s in summaries)
            else ""
        )
        + ": "
        + "; ".join(kept)
        + "."
    )


def _pin(pin: dict[str, list[int]] | None) -> str:
    if not pin:
        return ""
    fio = ",".join(map(str, pin["fio"]))
    servers = ",".join(map(str, pin["servers"]))
    return f"; fio pinned to CPU {fio}, every server to CPU {servers} (--pin)"


def render_markdown(
    *,
    title: str,
    meta: dict[str, Any],
    summaries: Sequence[Summary],
    workloads: Sequence[Workload],
    servers: Sequence[str],
    baseline: str,
    rss_runs: Sequence[RssRun],
    rss_description: str,
    cells: Sequence[Cell] = (),
) -> str:
    """The whole Markdown report (``cells``: for the steal paragraph)."""
    m = meta
    parts = [
        f"# {title}",
        "",
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), shared with other tenants; "
        f"Linux {m['kernel']}; Python {m['python']}. fio and every server share these CPUs.",
        f"Run: {m['started']} UTC, {m['duration_s']:.0f} s; {m['rounds']} interleaved round(s) "
        f"of {m['runtime_s']:g} s (+{m['ramp_s']:g} s ramp) per cell; servers "
        f"{', '.join(servers)}, the order rotated by one each round"
        f"{_leads(m.get('leads'))}; "
        f"one {m['file_size'] // MIB} MiB file on /dev/shm shared by all.",
        f"Load: fio {m['fio']} nbd engine on loopback; one connection per fio job"
        f"{_pin(m.get('pin'))}. "
        f"Host load average (1/5/15 min) at start {_load(m.get('loadavg_start'))}, "
        f"at end {_load(m.get('loadavg_end'))}.",
        f"Servers: {'; '.join(f'{k}: {v}' for k, v in m['server_versions'].items())}.",
        "",
        f"Figures are medians over rounds; 'vs {baseline}' is the median over rotation cycles "
        f"({len(servers)} rounds: every server once in every place) of the geometric mean of "
        f"per-round ratios (this server's IOPS ÷ {baseline}'s in the same round). "
        "CPU s/GiB is the server process tree's user+system CPU time per GiB moved "
        "(ramp-up excluded pro rata). Peak RSS is sampled every "
        f"{m['sample_interval_s'] * 1000:.0f} ms, children included.",
        "",
    ]
    steal = steal_markdown(cells, summaries, workloads, baseline)
    if steal:
        parts += [steal, ""]
    parts += [
        table_markdown(summaries, workloads, baseline),
        "",
    ]
    versus = versus_markdown(summaries, workloads, servers, baseline)
    if versus:
        parts += [f"## {baseline} against each peer (target >= 1.00x; ✗ below)", "", versus, ""]
    if rss_runs:
        parts += [
            "## Peak RSS under write load",
            "",
            "Each server freshly started for this scenario alone.",
            "",
            rss_markdown(rss_runs, rss_description),
            "",
        ]
    if m.get("baseline_rss_peak") is not None:
        parts += [
            f"{baseline} peak RSS over the table's runs (one long-lived instance per "
            f"transport): {m['baseline_rss_peak'] / MIB:.1f} MiB.",
            "",
        ]
    return "\n".join(parts)


def to_json(
    *,
    meta: dict[str, Any],
    cells: Sequence[Cell],
    summaries: Sequence[Summary],
    rss_runs: Sequence[RssRun],
) -> dict[str, Any]:
    """A JSON-ready document with every cell (rounded) and the summaries."""

    def result(r: FioResult) -> dict[str, Any]:
        return {
            "iops": round(r.iops, 1),
            "read_iops": round(r.read_iops, 1),
            "write_iops": round(r.write_iops, 1),
            "mib_per_s": round(r.mib_per_s, 2),
            "bytes_moved": r.bytes_moved,
            "lat_mean_us": round(r.lat_mean_us, 1),
            "lat_p99_us": round(r.lat_p99_us, 1),
        }

    def rounded(d: dict[str, Any]) -> dict[str, Any]:
        def r3(v: Any) -> Any:
            if isinstance(v, float):
                return round(v, 3)
            if isinstance(v, tuple):
                return [r3(x) for x in v]
            return v

        return {k: r3(v) for k, v in d.items()}

    return {
        "meta": meta,
        "summary": [rounded(asdict(s)) for s in summaries],
        "rss": [{"server": r.server, "rss_peak": r.rss_peak, **result(r.result)} for r in rss_runs],
        "cells": [
            {
                "round": c.round,
                "workload": c.workload,
                "server": c.server,
                **result(c.result),
                "cpu_s": round(c.cpu_s, 3),
                "rss_peak": c.rss_peak,
                **({} if c.steal is None else {"steal": round(c.steal, 4)}),
            }
            for c in cells
        ],
    }


def _result_from(row: dict[str, Any]) -> FioResult:
    """A FioResult back from a JSON row: bytes/s split between the directions by their
    IOPS (every bench workload moves one direction, so the split is exact there)."""
    read_iops, write_iops = float(row["read_iops"]), float(row["write_iops"])
    total = read_iops + write_iops
    rate = float(row["mib_per_s"]) * MIB
    share = read_iops / total if total > 0 else 1.0
    return FioResult(
        read_iops=read_iops,
        write_iops=write_iops,
        read_bytes_per_s=rate * share,
        write_bytes_per_s=rate * (1.0 - share),
        bytes_moved=int(row["bytes_moved"]),
        lat_mean_us=float(row["lat_mean_us"]),
        lat_p99_us=float(row["lat_p99_us"]),
    )


def from_json(document: dict[str, Any]) -> tuple[list[Cell], list[RssRun]]:
    """The cells and RSS runs of a document :func:`to_json` wrote, so that a committed
    result can be summarised and rendered again (``python -m bench --render``).

    Raises:
        ValueError: the document lacks a field the bench writes.
    """
    try:
        cells = [
            Cell(
                round=int(row["round"]),
                workload=str(row["workload"]),
                server=str(row["server"]),
                result=_result_from(row),
                cpu_s=float(row["cpu_s"]),
                rss_peak=int(row["rss_peak"]),
                steal=None if row.get("steal") is None else float(row["steal"]),
            )
            for row in document["cells"]
        ]
        rss = [
            RssRun(str(row["server"]), _result_from(row), int(row["rss_peak"]))
            for row in document.get("rss") or []
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a bench result document: {exc!r}") from None
    return cells, rss


def dumps_compact(document: dict[str, Any]) -> str:
    """JSON with one line per list item, so result files stay small and diff well."""
    parts = []
    for key, value in document.items():
        if isinstance(value, list):
            items = ",\n  ".join(json.dumps(v, separators=(", ", ": ")) for v in value)
            parts.append(f"{json.dumps(key)}: [\n  {items}\n ]")
        else:
            parts.append(f"{json.dumps(key)}: {json.dumps(value, separators=(', ', ': '))}")
    return "{\n " + ",\n ".join(parts) + "\n}\n"
