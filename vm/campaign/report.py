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
import io
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vm.campaign import plan

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


# ---------------------------------------------------------------------------- aggregation


def _stat(values: Sequence[float]) -> dict[str, float | int | None]:
    n = len(values)
    if n == 0:
        return {"mean": None, "sd": None, "n": 0, "median": None, "min": None, "max": None}
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if n >= 2 else None
    return {
        "mean": mean,
        "sd": sd,
        "n": n,
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def outcome_text(counts: Mapping[str, int], n: int) -> str:
    """``completed 2/3, lockup 1/3``: most frequent first."""
    order = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{k} {v}/{n}" for k, v in order)


def build_report(runs: Sequence[RunData], baseline: str | None = None) -> dict[str, Any]:
    """Group ``runs`` by arm and aggregate every row.

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
    arms: dict[str, list[RunData]] = {}
    for r in usable:
        arms.setdefault(plan.label(r.config, varying), []).append(r)
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
        "mean ± sample sd over the runs that have the value; (n=k) when fewer runs than "
        "the arm has; (r x) is the ratio of the mean to the baseline arm's.",
        "vmstat rows are deltas between the first and the last sample of each run; a run "
        "that did not complete counts up to its last sample.",
    ]
    if excluded:
        footnotes.append(
            f"{len(excluded)} interrupted run(s) left out: "
            + ", ".join(Path(e["run"]).name for e in excluded)
            + "."
        )
    return {
        "schema": 1,
        "baseline": baseline,
        "runs": len(usable),
        "arms": arm_list,
        "rows": rows,
        "excluded": excluded,
        "footnotes": footnotes,
    }


# ---------------------------------------------------------------------------- rendering


def _fmt_num(value: float | None, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind in ("time", "cost", "percent"):
        return f"{value:.2f}" if abs(value) < 1000 else f"{value:.0f}"
    return f"{value:.0f}" if abs(value) >= 100 or value == int(value) else f"{value:.1f}"


def cell_text(value: Mapping[str, Any], kind: str, arm_n: int, show_ratio: bool) -> str:
    """``12.30 ± 0.40 (1.05x) (n=2)`` or ``—`` when no run has the value."""
    n = value.get("n") or 0
    if n == 0:
        return "—"
    text = _fmt_num(value.get("mean"), kind)
    sd = value.get("sd")
    if sd is not None:
        text += f" ± {_fmt_num(sd, kind)}"
    ratio = value.get("ratio")
    if show_ratio and ratio is not None:
        text += f" ({ratio:.2f}x)"
    if n < arm_n:
        text += f" (n={n})"
    return text


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


def render_markdown(rep: Mapping[str, Any]) -> str:
    arms = rep["arms"]
    head = ["", *(a["label"] for a in arms)]
    lines = [
        "# swapnbd report",
        "",
        f"{rep['runs']} run(s) in {len(arms)} arm(s); baseline: `{rep['baseline']}`.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(arms)) + "|",
        "| runs | " + " | ".join(str(a["n"]) for a in arms) + " |",
        "| outcome | " + " | ".join(a["outcome_text"] for a in arms) + " |",
        "| lockup signature | " + " | ".join(a["signature_text"] for a in arms) + " |",
        "| kernel | " + " | ".join(", ".join(a["kernel_release"]) for a in arms) + " |",
    ]
    for row in rep["rows"]:
        unit = f" ({row['unit']})" if row["unit"] else ""
        cells = [
            cell_text(row["values"][a["label"]], row["kind"], a["n"], row["kind"] == "time")
            for a in arms
        ]
        lines.append(f"| {row['name']}{unit} | " + " | ".join(cells) + " |")
    for row in rep["rows"]:
        if row["key"] not in MEDIAN_KEYS:
            continue
        unit = f" ({row['unit']})" if row["unit"] else ""
        cells = [median_text(row["values"][a["label"]], row["kind"]) for a in arms]
        lines.append(f"| median {row['name']}{unit} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(f"- {note}" for note in rep["footnotes"])
    lines.append("")
    return "\n".join(lines)


def render_csv(rep: Mapping[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["arm", "metric", "unit", "mean", "sd", "n", "runs", "ratio_to_baseline", "text", "median"]
    )
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
                    "" if v["mean"] is None else repr(v["mean"]),
                    "" if v["sd"] is None else repr(v["sd"]),
                    v["n"],
                    arm["n"],
                    "" if v.get("ratio") is None else repr(v["ratio"]),
                    "",
                    "" if v.get("median") is None else repr(v["median"]),
                ]
            )
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
