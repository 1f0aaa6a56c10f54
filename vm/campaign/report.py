"""``swapnbd report``: the seed's comparison table from loaded runs (pure).

Theory of operation
-------------------
:func:`vm.campaign.archive.load_runs` reads the runs from disk; everything here is pure.
:func:`build_report` groups runs into *arms* by the label of :func:`vm.campaign.plan.label`
(kernel, arm, allocator, server, plus any other setting that differs between the runs
loaded), computes per-run metrics (:func:`run_metrics`) and aggregates them as mean and
sample standard deviation per arm, with the ratio of each mean to the baseline arm's.
:func:`render` turns the report into Markdown, CSV or JSON; :mod:`vm.campaign.plots` draws
the plots and :mod:`vm.campaign.publish` writes a published result.

Only completed runs have times: swapstress reports Sys, User+Sys and Elapsed when it ends,
and a lockup, crash or OOM never gets there.  The vmstat rows average every run (a lockup
run's counters run up to the guest's last sample, which is what it did before it stopped).
Interrupted runs (SIGINT/SIGTERM) are not measurements and are left out, and named.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vm.campaign import lockup_curve, plan, stats

MIB = 1024 * 1024
GIB = 1024 * MIB
PAGE = 4096  # bytes per pswpin/pswpout page (x86-64)


class ReportError(ValueError):
    """Input the report cannot use; the message says what and what to do."""


@dataclass(frozen=True, slots=True)
class Row:
    key: str
    name: str
    unit: str
    kind: str
    """``time`` (completed runs only, ratio shown), ``count``, ``percent`` or ``cost``."""


#: Rows that runs recorded before the stall watch (2026-12-06) do not have: left out when
#: no run has them, like the cost rows.
NEWER_KEYS = frozenset(
    {"stall_at_s", "stall_pages", "stall_count", "stall_s", "harness_locked_mib"}
)

#: The rows of the table, in order.
ROWS: tuple[Row, ...] = (
    Row("sys_s", "Sys Time", "s", "time"),
    Row("user_sys_s", "User+Sys Time", "s", "time"),
    Row("elapsed_s", "Total Elapsed Time", "s", "time"),
    Row("pswpin", "swap ins (pswpin)", "pages", "count"),
    Row("pswpout", "swap outs (pswpout)", "pages", "count"),
    Row("pgscan_direct_throttle", "pgscan_direct_throttle", "", "count"),
    Row("allocstall", "allocstall (sum of allocstall_*)", "", "count"),
    Row("pgscan_direct", "pgscan_direct", "pages", "count"),
    Row("pgsteal_direct", "pgsteal_direct", "pages", "count"),
    Row("direct_efficiency", "direct reclaim efficiency (steal/scan)", "%", "percent"),
    Row("pgscan_kswapd", "pgscan_kswapd", "pages", "count"),
    Row("pgsteal_kswapd", "pgsteal_kswapd", "pages", "count"),
    Row("kswapd_efficiency", "kswapd reclaim efficiency (steal/scan)", "%", "percent"),
    Row("pfmemalloc_drop", "PFMemallocDrop", "", "count"),
    Row("stall_at_s", "lockup: time to stall, into stress", "s", "count"),
    Row("stall_pages", "lockup: pages done at the stall", "pages", "count"),
    Row("qemu_s", "guest wall time (QEMU ran)", "s", "count"),
    Row("stall_count", "stalls that recovered", "", "count"),
    Row("stall_s", "time in recovered stalls", "s", "count"),
    Row("harness_locked_mib", "harness mlocked memory, peak in stress", "MiB", "count"),
    Row("server_cpu_s", "server CPU (user+sys)", "s", "cost"),
    Row("server_cpu_per_gib", "server CPU per GiB swapped", "s/GiB", "cost"),
    Row("server_peak_rss_mib", "server peak RSS", "MiB", "cost"),
    Row("server_wakeups_per_mib", "server wake-ups per MiB swapped", "", "cost"),
    Row("server_runqueue_wait_s", "server run-queue wait", "s", "cost"),
    Row("qemu_cpu_s", "QEMU CPU (user+sys)", "s", "cost"),
    Row("swap_read_await_ms", "swap device read await (guest)", "ms", "cost"),
    Row("swap_write_await_ms", "swap device write await (guest)", "ms", "cost"),
    Row("swap_write_kib", "swap device write size, mean", "KiB", "cost"),
    Row("swap_queue_depth", "swap device requests in flight, mean", "", "cost"),
)

#: Rows whose medians get rows of their own (with the ratio of medians): a server comparison
#: is judged on the median, which one stalled run cannot drag (issue 13).
MEDIAN_KEYS = ("elapsed_s", "sys_s", "server_cpu_per_gib")

VMSTAT_KEYS = (
    "pswpin",
    "pswpout",
    "pgscan_direct_throttle",
    "pgscan_direct",
    "pgsteal_direct",
    "pgscan_kswapd",
    "pgsteal_kswapd",
)


@dataclass(slots=True)
class RunData:
    """One run as loaded from disk."""

    path: Path
    """The run directory."""
    run: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    """The guest's phase and heartbeat events (events.jsonl), in order; [] when not kept."""

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> dict[str, Any]:
        cfg = self.run.get("config")
        return cfg if isinstance(cfg, dict) else {}


# ---------------------------------------------------------------------------- metrics


def num(value: Any) -> float | None:
    """A JSON number as a float; None for anything else (a bool too)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def pfmemalloc_drop(samples: Sequence[Mapping[str, Any]]) -> float | None:
    """TcpExt PFMemallocDrop, last sample minus first (None when the guest lacks it)."""
    if not samples:
        return None
    first = samples[0].get("netstat") or {}
    last = samples[-1].get("netstat") or {}
    a, b = num(first.get("PFMemallocDrop")), num(last.get("PFMemallocDrop"))
    return None if a is None or b is None else b - a


def _ratio(numerator: Any, denominator: Any, scale: float = 1.0) -> float | None:
    """``scale * numerator / denominator``; None when either is missing or the
    denominator is not positive."""
    a, b = num(numerator), num(denominator)
    return None if a is None or b is None or b <= 0 else a * scale / b


def swap_device_metrics(device: Mapping[str, Any] | None) -> dict[str, float | None]:
    """iostat's figures for the swap device from run.json ``swap_device``: mean ms from
    issue to completion per read and per write, mean KiB per write, and the mean number of
    requests in flight (time-weighted), all as the guest's block layer counted them."""
    d = device or {}
    return {
        "swap_read_await_ms": _ratio(d.get("read_ms"), d.get("reads")),
        "swap_write_await_ms": _ratio(d.get("write_ms"), d.get("writes")),
        "swap_write_kib": _ratio(d.get("write_sectors"), d.get("writes"), 512 / 1024),
        "swap_queue_depth": _ratio(d.get("queue_ms"), d.get("interval_s"), 1 / 1000),
    }


def run_metrics(data: RunData) -> dict[str, float | None]:
    """One run's value for every row (None: not measured or not meaningful)."""
    run = data.run
    out: dict[str, float | None] = {r.key: None for r in ROWS}
    sw = run.get("swapstress") or {}
    if run.get("outcome") == "completed":
        for key in ("sys_s", "user_sys_s", "elapsed_s"):
            out[key] = num(sw.get(key))
    delta = run.get("vmstat_delta") or {}
    for key in VMSTAT_KEYS:
        out[key] = num(delta.get(key))
    stalls = [num(v) for k, v in delta.items() if k.startswith("allocstall")]
    known = [v for v in stalls if v is not None]
    out["allocstall"] = sum(known) if known else None
    out["direct_efficiency"] = _ratio(out["pgsteal_direct"], out["pgscan_direct"], 100.0)
    out["kswapd_efficiency"] = _ratio(out["pgsteal_kswapd"], out["pgscan_kswapd"], 100.0)
    out["pfmemalloc_drop"] = pfmemalloc_drop(data.samples)
    cost = run.get("cost") or {}
    server = cost.get("server") or {}
    qemu = cost.get("qemu") or {}
    su, ss = num(server.get("user_s")), num(server.get("system_s"))
    out["server_cpu_s"] = su + ss if su is not None and ss is not None else None
    swapped = (out["pswpin"] or 0) + (out["pswpout"] or 0)
    out["server_cpu_per_gib"] = (
        out["server_cpu_s"] / (swapped * PAGE / GIB)
        if out["server_cpu_s"] is not None and swapped
        else None
    )
    wakeups = num(server.get("wakeups"))
    out["server_wakeups_per_mib"] = (
        wakeups / (swapped * PAGE / MIB) if wakeups is not None and swapped else None
    )
    out["server_runqueue_wait_s"] = num(server.get("runqueue_wait_s"))
    rss = num(server.get("peak_rss_bytes"))
    out["server_peak_rss_mib"] = rss / MIB if rss is not None else None
    qu, qs = num(qemu.get("user_s")), num(qemu.get("system_s"))
    out["qemu_cpu_s"] = qu + qs if qu is not None and qs is not None else None
    out.update(swap_device_metrics(run.get("swap_device")))
    stall = (run.get("evidence") or {}).get("stall") or {}
    if run.get("outcome") == "lockup":
        out["stall_at_s"] = num(stall.get("at_s"))
        pages = num(stall.get("pages_done"))
        out["stall_pages"] = max(0.0, pages) if pages is not None else None
    else:
        out["stall_at_s"] = out["stall_pages"] = None
    out["qemu_s"] = num((run.get("timings") or {}).get("qemu_s"))
    out["stall_count"] = num(run.get("stall_count"))
    out["stall_s"] = num(run.get("stall_s_total"))
    locked = num((run.get("footprint") or {}).get("mlocked_bytes"))
    out["harness_locked_mib"] = locked / MIB if locked is not None else None
    return out


def kernel_text(kernel: Mapping[str, Any]) -> str:
    """``6.1.0-57-cloud-amd64 (6.1.192-3)``: the release and the Debian version it came from.

    A release name such as 6.1.0-57 spans point releases, so the version is what tells two
    Debian kernels apart (a built kernel's version is its linux-source version, which its
    release name, ``6.1-slab (6.1.192-3)``, already carries).
    """
    release = str(kernel.get("release") or "?")
    version = kernel.get("version")
    return f"{release} ({version})" if version and f"({version})" not in release else release


def is_interrupted(run: Mapping[str, Any]) -> bool:
    return bool(run.get("interrupted")) or run.get("outcome") is None


# ---------------------------------------------------------------------------- header

#: The seed's published figures (Mel Gorman's "swap over NBD" V9 cover letter, on
#: 3.4.0-rc2; vm/campaign/matrices/seed.toml), shown beside a report with
#: ``--reference-2012``: on 2 GiB of RAM and real hardware for an hour, so their scale,
#: not their absolute values, is what compares.
REFERENCE_2012: dict[str, Any] = {
    "source": "swap over NBD V9 cover letter (Mel Gorman, 2012), 3.4.0-rc2",
    "arms": ["2012 vanilla-slab", "2012 patched"],
    "rows": {
        "sys_s": [87.90, 73.45],
        "user_sys_s": [91.93, 76.91],
        "elapsed_s": [4174.37, 2953.96],
    },
    "note": "2012 columns: the seed's published figures (swap over NBD V9 on 3.4.0-rc2, "
    "vanilla SLAB vs patched; 2 GiB RAM, 8 x NUM_CPU workers, 4x RAM, looped for an hour "
    "on real hardware), one run each, with the patched kernel's difference from vanilla in "
    "%. They show 2012's scale and direction, not values comparable with the columns "
    "measured here.",
}

NOT_RECORDED = "not recorded"


def _distinct(values: Sequence[Any]) -> str:
    """The distinct values, sorted, joined; ``not recorded`` for runs without one."""
    texts = sorted({NOT_RECORDED if v is None else str(v) for v in values})
    return ", ".join(texts) if texts else NOT_RECORDED


def _g(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _range(values: Sequence[float]) -> str:
    if not values:
        return NOT_RECORDED
    lo, hi = min(values), max(values)
    return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"


def run_date(data: RunData) -> tuple[str, str] | None:
    """The day the run ran (UTC) and the clock that says so: the host's, recorded as the
    run started, or for older runs the guest's wall clock at its first sample or last
    heartbeat (the guest boots with the host's time)."""
    started = (data.run.get("host") or {}).get("started_utc")
    if isinstance(started, str) and len(started) >= 10:
        return started[:10], "host"
    for t in (
        num(data.samples[0].get("t_wall")) if data.samples else None,
        num((data.run.get("last_heartbeat") or {}).get("t_wall")),
    ):
        if t is not None:
            return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d"), "guest"
    return None


def _workload(cfg: Mapping[str, Any]) -> str:
    """``4 x guest RAM`` (``ratio``) or ``256 MiB`` (``total_bytes``)."""
    total = num(cfg.get("total_bytes"))
    if total is not None:
        return f"{total / MIB:g} MiB"
    return f"{_g(cfg.get('ratio'))} x guest RAM"


def _tests(cfgs: Sequence[Mapping[str, Any]]) -> str:
    """The workload line(s): runs that differ only in their pressure share one line that
    names every pressure (a boundary's ratios), in ascending order."""
    groups: dict[tuple[str, str, Any, Any], list[Mapping[str, Any]]] = {}
    for c in cfgs:
        key = (_g(c.get("workers")), _g(c.get("loops")), c.get("swap"), c.get("server"))
        groups.setdefault(key, []).append(c)
    lines = []
    for (workers, loops, swap, server), members in groups.items():
        lines.append(
            f"swapstress, {workers} workers touching {_workloads(members)}, "
            f"{loops} loop(s); swap on {swap} via {server}"
        )
    return _distinct(lines)


def _workloads(cfgs: Sequence[Mapping[str, Any]]) -> str:
    """``4 x guest RAM``; ``1.25, 1.5 and 2 x guest RAM`` for several ratios; each
    workload, comma-separated, when they mix ratios and sizes."""
    ratios = sorted({r for c in cfgs if (r := num(c.get("ratio"))) is not None})
    by_ratio = all(num(c.get("total_bytes")) is None and "ratio" in c for c in cfgs)
    if by_ratio and len(ratios) > 1:
        names = [_g(r) for r in ratios]
        return f"{', '.join(names[:-1])} and {names[-1]} x guest RAM"
    return ", ".join(sorted({_workload(c) for c in cfgs}))


def build_header(runs: Sequence[RunData]) -> list[dict[str, str]]:
    """The test and the machine, as the runs recorded them: one ``{"name", "value"}`` per
    line, each value the distinct values over the runs (``not recorded`` where a run
    predates the field).  Nothing here depends on when or where the report is rendered."""
    cfgs = [r.config for r in runs]
    hosts = [r.run.get("host") or {} for r in runs]
    test = _tests(cfgs)
    guest = _distinct(
        [
            f"{_g(c.get('memory_mib'))} MiB RAM, {_g(c.get('cpus'))} vCPU(s), accel "
            f"{(r.run.get('accel') or {}).get('used') or c.get('accel')}"
            for r, c in zip(runs, cfgs, strict=True)
        ]
    )
    cutoff = _distinct(
        [
            None if num(c.get("lockup_after_s")) is None else f"{c['lockup_after_s']:g} s"
            for c in cfgs
        ]
    )
    loads = [num((h.get("loadavg") or [None])[0]) for h in hosts]
    known_loads = [x for x in loads if x is not None]
    load = _range(known_loads) + (
        f" (not recorded for {len(loads) - len(known_loads)} run(s))"
        if known_loads and len(known_loads) < len(loads)
        else ""
    )
    return [
        {"name": "test", "value": test},
        {"name": "guest", "value": guest},
        {"name": "lockup cutoff (no progress for)", "value": cutoff},
        {"name": "host CPU", "value": _distinct([h.get("cpu_model") for h in hosts])},
        {"name": "host cores", "value": _distinct([h.get("cpus") for h in hosts])},
        {"name": "host load (1-min average at each run's start)", "value": load},
        {"name": "host kernel", "value": _distinct([h.get("kernel") for h in hosts])},
        {
            "name": "QEMU",
            "value": _distinct([(r.run.get("qemu") or {}).get("version") for r in runs]),
        },
        {
            "name": "guest kernel packages",
            "value": _distinct([(r.run.get("kernel") or {}).get("package") for r in runs]),
        },
        {"name": "swapnbd commit", "value": _distinct([h.get("swapnbd_commit") for h in hosts])},
        {"name": "runs dated", "value": _when(runs)},
    ]


def arms_of(runs: Sequence[RunData]) -> dict[str, list[RunData]]:
    """``runs`` by arm label, in order of first appearance: :func:`vm.campaign.plan.label`
    over the settings that vary among them (pass the usable runs: the report's arms)."""
    varying = plan.varying_keys([r.config for r in runs])
    arms: dict[str, list[RunData]] = {}
    for r in runs:
        arms.setdefault(plan.label(r.config, varying), []).append(r)
    return arms


def _when(runs: Sequence[RunData]) -> str:
    """The day, or the first and last day and which arms ran on which: a result grown
    over days (7.2 added to the seed a day later) mixes hosts and loads, so its times
    compare within a day only."""
    dates = [run_date(r) for r in runs]
    days = sorted({d[0] for d in dates if d is not None})
    clocks = sorted({d[1] for d in dates if d is not None})
    if not days:
        return NOT_RECORDED
    clock = f" (UTC, {' and '.join(clocks)} clock)"
    if len(days) == 1:
        return days[0] + clock
    by_day: dict[str, list[str]] = {}
    for name, rs in arms_of(runs).items():
        for day in dict.fromkeys((d[0] if (d := run_date(r)) else NOT_RECORDED) for r in rs):
            by_day.setdefault(day, []).append(name)
    parts = "; ".join(f"{day}: {', '.join(names)}" for day, names in sorted(by_day.items()))
    return f"{days[0]} to {days[-1]}{clock}; {parts}; times compare within a day"


# ---------------------------------------------------------------------------- aggregation


def _stat(values: Sequence[float]) -> dict[str, Any]:
    st = stats.summary(values)
    return {
        "mean": st.mean,
        "sd": st.sd,
        "n": st.n,
        "cov_pct": st.cov_pct,
        "median": st.median,
        "min": st.min,
        "max": st.max,
    }


def _compare(values: dict[str, Any], base: Mapping[str, Any]) -> None:
    """The % difference of ``values``' mean from ``base``'s, and Welch's t-test of it."""
    own, ref = values["mean"], base["mean"]
    values["diff_pct"] = (own - ref) / abs(ref) * 100.0 if own is not None and ref else None
    test = stats.welch(_summary(values), _summary(base))
    values["t"] = None if test is None else test.t
    values["df"] = None if test is None else test.df
    values["significant"] = None if test is None else test.significant


def _summary(values: Mapping[str, Any]) -> stats.Summary:
    return stats.Summary(
        values["n"],
        values["mean"],
        values["sd"],
        values["cov_pct"],
        values["median"],
        values["min"],
        values["max"],
    )


def outcome_text(counts: Mapping[str, int], n: int) -> str:
    """``completed 2/3, lockup 1/3``: most frequent first."""
    order = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{k} {v}/{n}" for k, v in order)


def build_report(
    runs: Sequence[RunData],
    baseline: str | None = None,
    *,
    reference_2012: bool = False,
    boundary: bool | None = None,
) -> dict[str, Any]:
    """Group ``runs`` by arm and aggregate every row; with ``reference_2012``, add the
    2012 figures (:data:`REFERENCE_2012`) as a reference column.  ``boundary``: add the
    P(lockup) table (:mod:`vm.campaign.lockup_curve`) as ``boundary``; None adds it when
    an arm was run at more than one ratio.

    Raises:
        ReportError: no usable (non-interrupted) run, or a ``baseline`` that is no arm.
    """
    usable = [r for r in runs if not is_interrupted(r.run)]
    excluded = [
        {"run": str(r.path), "reason": "interrupted (SIGINT/SIGTERM): not a measurement"}
        for r in runs
        if is_interrupted(r.run)
    ]
    if not usable:
        raise ReportError(
            "every run found was interrupted; finish them with swapnbd matrix --resume"
        )
    varying = plan.varying_keys([r.config for r in usable])
    arms = arms_of(usable)
    labels = list(arms)
    if baseline is None:
        baseline = labels[0]
    elif baseline not in arms:
        raise ReportError(f"--baseline {baseline!r} is not an arm here; arms: {', '.join(labels)}")
    metrics = {label: [run_metrics(r) for r in rs] for label, rs in arms.items()}
    arm_list = []
    for label, rs in arms.items():
        counts: dict[str, int] = {}
        for r in rs:
            key = str(r.run.get("outcome"))
            counts[key] = counts.get(key, 0) + 1
        releases = sorted({kernel_text(r.run.get("kernel") or {}) for r in rs})
        signatures: dict[str, int] = {}
        for r in rs:
            sig = (r.run.get("evidence") or {}).get("signature")
            if r.run.get("outcome") == "lockup":
                key = str(sig) if sig else "no evidence"
                signatures[key] = signatures.get(key, 0) + 1
        arm_list.append(
            {
                "label": label,
                "runs": [str(r.path) for r in rs],
                "n": len(rs),
                "outcomes": counts,
                "outcome_text": outcome_text(counts, len(rs)),
                "signatures": signatures,
                "signature_text": outcome_text(signatures, sum(signatures.values()))
                if signatures
                else "—",
                "kernel_release": releases,
                "parts": {
                    k: v
                    for k, v in plan.label_parts(rs[0].config).items()
                    if k in (*plan.LABEL_KEYS, *varying)
                },
            }
        )
    rows = []
    for row in ROWS:
        values: dict[str, dict[str, float | int | None]] = {}
        for label in labels:
            vals = [m[row.key] for m in metrics[label]]
            values[label] = _stat([v for v in vals if v is not None])
        for stat, key in (("mean", "ratio"), ("median", "median_ratio")):
            base = values[baseline][stat]
            for label in labels:
                own = values[label][stat]
                values[label][key] = (
                    own / base if own is not None and isinstance(base, float) and base else None
                )
        for label in labels:
            _compare(values[label], values[baseline])
        optional = row.kind == "cost" or row.key in NEWER_KEYS
        if all(v["n"] == 0 for v in values.values()) and optional:
            continue  # runs from before run.json had a cost section
        rows.append(
            {"key": row.key, "name": row.name, "unit": row.unit, "kind": row.kind, "values": values}
        )
    not_completed = sum(1 for r in usable if r.run.get("outcome") != "completed")
    footnotes = [
        "Times (Sys, User+Sys, Total Elapsed: swapstress's own figures) average completed "
        "runs only; lockup, guest-crash, oom and error runs have no times"
        + (f" ({not_completed} such run(s) here)." if not_completed else "."),
        "Each cell: mean ± sample sd (CoV: sd/mean) [min-max] over the runs that have the "
        "value, (n=k) when fewer runs than the arm has; then the difference of the mean from "
        "the baseline arm's in %. * marks a difference significant at the 5% level by "
        "Welch's t-test, two-sided (unequal variances; Welch-Satterthwaite degrees of "
        "freedom; critical t from a table by df, a fractional df rounded down, which is "
        "conservative); no mark where it is not, and none without two runs with the value "
        "on both sides or with no spread on either.",
        "vmstat rows are deltas between the first and the last sample of each run; a run "
        "that did not complete counts up to its last sample.",
    ]
    if excluded:
        footnotes.append(
            f"{len(excluded)} interrupted run(s) left out: "
            + ", ".join(Path(e["run"]).name for e in excluded)
            + "."
        )
    if reference_2012:
        footnotes.append(REFERENCE_2012["note"])
    rep: dict[str, Any] = {
        "schema": 2,
        "baseline": baseline,
        "reference_2012": REFERENCE_2012 if reference_2012 else None,
        "header": build_header(usable),
        "runs": len(usable),
        "arms": arm_list,
        "rows": rows,
        "excluded": excluded,
        "footnotes": footnotes,
    }
    points = lockup_curve.curve_points([r.run for r in usable])
    if boundary or (boundary is None and lockup_curve.spans_settings(points)):
        rep["boundary"] = points  # absent otherwise: published reports stay as they were
    return rep


# ---------------------------------------------------------------------------- rendering


def _fmt_num(value: float | None, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind in ("time", "cost", "percent"):
        return f"{value:.2f}" if abs(value) < 1000 else f"{value:.0f}"
    return f"{value:.0f}" if abs(value) >= 100 or value == int(value) else f"{value:.1f}"


def cell_text(value: Mapping[str, Any], kind: str, arm_n: int, compare: bool) -> str:
    """``12.30 ± 0.40 (3.3%) [11.90-12.70] -16.4%*`` (``compare``: the % difference from
    the baseline and the significance mark), ``(n=k)`` when fewer runs than the arm's have
    the value, ``—`` when none has."""
    n = value.get("n") or 0
    if n == 0:
        return "—"
    text = _fmt_num(value.get("mean"), kind)
    sd = value.get("sd")
    if sd is not None:
        text += f" ± {_fmt_num(sd, kind)}"
    cov = value.get("cov_pct")
    if cov is not None:
        text += f" ({cov:.1f}%)"
    if n >= 2:
        text += f" [{_fmt_num(value.get('min'), kind)}-{_fmt_num(value.get('max'), kind)}]"
    if n < arm_n:
        text += f" (n={n})"
    diff = value.get("diff_pct")
    if compare and diff is not None:
        text += f" {diff:+.1f}%" + ("*" if value.get("significant") else "")
    return text


def reference_cells(rep: Mapping[str, Any], key: str) -> list[str]:
    """The 2012 columns of one row: vanilla, then patched with its difference in %."""
    ref = rep.get("reference_2012")
    if not ref:
        return []
    pair = ref["rows"].get(key)
    if not pair:
        return ["", ""]
    vanilla, patched = pair
    return [f"{vanilla:.2f}", f"{patched:.2f} {(patched - vanilla) / vanilla * 100:+.1f}%"]


def median_text(value: Mapping[str, Any], kind: str) -> str:
    """``84.90 [71.40-90.20] (1.18x)``: median, range, ratio of medians to the baseline's."""
    if not value.get("n"):
        return "—"
    text = (
        f"{_fmt_num(value['median'], kind)} "
        f"[{_fmt_num(value['min'], kind)}-{_fmt_num(value['max'], kind)}]"
    )
    ratio = value.get("median_ratio")
    return text if ratio is None else text + f" ({ratio:.2f}x)"


def _arm_head(rep: Mapping[str, Any]) -> list[str]:
    ref = rep.get("reference_2012")
    return [a["label"] for a in rep["arms"]] + (
        [f"{name} (2012 scale)" for name in ref["arms"]] if ref else []
    )


def render_markdown(rep: Mapping[str, Any]) -> str:
    arms = rep["arms"]
    head = ["", *_arm_head(rep)]
    extra = len(head) - 1 - len(arms)
    pad = [""] * extra
    lines = [
        "# swapnbd report",
        "",
        f"{rep['runs']} run(s) in {len(arms)} arm(s); baseline: `{rep['baseline']}`.",
        "",
    ]
    lines.extend(f"- {item['name']}: {item['value']}" for item in rep["header"])
    lines += [
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
        "| runs | " + " | ".join([*(str(a["n"]) for a in arms), *(["1"] * extra)]) + " |",
        "| outcome | " + " | ".join([*(a["outcome_text"] for a in arms), *pad]) + " |",
        "| lockup signature | " + " | ".join([*(a["signature_text"] for a in arms), *pad]) + " |",
        "| kernel | "
        + " | ".join([*(", ".join(a["kernel_release"]) for a in arms), *(["3.4.0-rc2"] * extra)])
        + " |",
    ]
    for row in rep["rows"]:
        unit = f" ({row['unit']})" if row["unit"] else ""
        cells = [
            cell_text(row["values"][a["label"]], row["kind"], a["n"], a["label"] != rep["baseline"])
            for a in arms
        ]
        cells += reference_cells(rep, row["key"])
        lines.append(f"| {row['name']}{unit} | " + " | ".join(cells) + " |")
    for row in rep["rows"]:
        if row["key"] not in MEDIAN_KEYS:
            continue
        unit = f" ({row['unit']})" if row["unit"] else ""
        cells = [median_text(row["values"][a["label"]], row["kind"]) for a in arms]
        lines.append(f"| median {row['name']}{unit} | " + " | ".join([*cells, *pad]) + " |")
    lines.append("")
    lines.extend(f"- {note}" for note in rep["footnotes"])
    lines.append("")
    if rep.get("boundary"):
        lines.extend(lockup_curve.render_markdown(rep["boundary"]))
    return "\n".join(lines)


CSV_FIELDS = (
    "arm",
    "metric",
    "unit",
    "mean",
    "sd",
    "n",
    "runs",
    "ratio_to_baseline",
    "text",
    "median",
    "cov_pct",
    "min",
    "max",
    "diff_pct",
    "welch_t",
    "welch_df",
    "significant_5pct",
)


def _csv_num(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return repr(value)


def render_csv(rep: Mapping[str, Any]) -> str:
    """One line per (arm, metric); the header's lines as arm ``header``; the 2012 figures,
    when shown, as arms of their own; the boundary's points as ``p_lockup_ratio_R`` (mean:
    P(lockup), min/max: the 95% Wilson interval)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for item in rep["header"]:
        w.writerow(["header", item["name"], "", "", "", "", "", "", item["value"]])
    for arm in rep["arms"]:
        w.writerow([arm["label"], "outcome", "", "", "", "", arm["n"], "", arm["outcome_text"]])
        for sig, count in sorted(arm["signatures"].items()):
            w.writerow([arm["label"], f"signature_{sig}", "runs", count, "", "", arm["n"], "", ""])
        for outcome, count in sorted(arm["outcomes"].items()):
            w.writerow(
                [arm["label"], f"outcome_{outcome}", "runs", count, "", "", arm["n"], "", ""]
            )
    for row in rep["rows"]:
        for arm in rep["arms"]:
            v = row["values"][arm["label"]]
            w.writerow(
                [
                    arm["label"],
                    row["key"],
                    row["unit"],
                    _csv_num(v["mean"]),
                    _csv_num(v["sd"]),
                    v["n"],
                    arm["n"],
                    _csv_num(v.get("ratio")),
                    "",
                    _csv_num(v.get("median")),
                    _csv_num(v.get("cov_pct")),
                    _csv_num(v.get("min")),
                    _csv_num(v.get("max")),
                    _csv_num(v.get("diff_pct")),
                    _csv_num(v.get("t")),
                    _csv_num(v.get("df")),
                    _csv_num(v.get("significant")),
                ]
            )
    for point in rep.get("boundary") or []:
        cells = lockup_curve.point_cells(point)
        line = dict.fromkeys(CSV_FIELDS, "")
        line.update(
            arm=point["curve"],
            metric=f"p_lockup_ratio_{cells[0]}",
            mean=_csv_num(point["p"]),
            n=str(point["trials"]),
            runs=str(point["trials"] + point["errors"]),
            text=f"{cells[1]} lockups, 95% Wilson interval {cells[3]}",
            min=_csv_num(point["low"]),
            max=_csv_num(point["high"]),
        )
        w.writerow(line.values())
    ref = rep.get("reference_2012")
    if ref:
        for key, pair in ref["rows"].items():
            unit = next(r.unit for r in ROWS if r.key == key)
            for name, value in zip(ref["arms"], pair, strict=True):
                diff = repr((value - pair[0]) / pair[0] * 100.0) if value != pair[0] else ""
                line = dict.fromkeys(CSV_FIELDS, "")
                line.update(arm=name, metric=key, unit=unit, mean=repr(value), n="1", runs="1")
                line.update(text=ref["source"], diff_pct=diff)
                w.writerow(line.values())
    return buf.getvalue()


def render(rep: Mapping[str, Any], fmt: str) -> str:
    """``md``, ``csv`` or ``json``.

    Raises:
        ReportError: another format.
    """
    if fmt == "md":
        return render_markdown(rep)
    if fmt == "csv":
        return render_csv(rep)
    if fmt == "json":
        return json.dumps(rep, indent=2, allow_nan=False) + "\n"
    raise ReportError(f"unknown format {fmt!r}; use md, csv or json")
