"""``swapnbd report --plots``: one PNG per arm from the runs' vmstat samples (matplotlib).

matplotlib is the optional ``plot`` extra, imported only when plots are drawn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vm.campaign import lockup_curve, plan
from vm.campaign.report import MIB, ReportError, RunData, is_interrupted, num, outcome_text

#: The boundary curve's file name in the plots directory (report.html embeds it too).
BOUNDARY_PNG = "boundary.png"


def series(samples: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Time series for the plots, from the samples in order.

    ``t`` seconds since the first sample; ``memfree_mib``; ``swapin_rate`` and
    ``swapout_rate`` in pages/s between consecutive samples (the first point is 0);
    ``throttle`` the cumulative pgscan_direct_throttle since the first sample.
    """
    out: dict[str, list[float]] = {
        k: [] for k in ("t", "memfree_mib", "swapin_rate", "swapout_rate", "throttle")
    }
    if not samples:
        return out
    t0 = float(samples[0]["t_mono"])
    v0 = samples[0].get("vmstat") or {}
    prev: Mapping[str, Any] | None = None
    for s in samples:
        t = float(s["t_mono"]) - t0
        vm = s.get("vmstat") or {}
        mem = s.get("meminfo") or {}
        out["t"].append(t)
        free = num(mem.get("MemFree"))
        out["memfree_mib"].append(free / MIB if free is not None else math.nan)
        for key, name in (("pswpin", "swapin_rate"), ("pswpout", "swapout_rate")):
            rate = 0.0
            if prev is not None:
                dt = float(s["t_mono"]) - float(prev["t_mono"])
                a, b = num((prev.get("vmstat") or {}).get(key)), num(vm.get(key))
                if dt > 0 and a is not None and b is not None:
                    rate = (b - a) / dt
            out[name].append(rate)
        a0, b0 = num(v0.get("pgscan_direct_throttle")), num(vm.get("pgscan_direct_throttle"))
        out["throttle"].append(b0 - a0 if a0 is not None and b0 is not None else math.nan)
        prev = s
    return out


def _safe_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in label)


def write_plots(
    runs: Sequence[RunData], out_dir: Path, *, boundary: bool | None = None
) -> list[Path]:
    """One PNG per arm (``ARM.png``): free memory, swap-in and swap-out rates and the
    cumulative pgscan_direct_throttle over time, one line per run.  A run that did not
    complete ends where its samples end, marked with an x.  With ``boundary`` (None:
    when an arm ran at more than one ratio, as the report decides), also
    :data:`BOUNDARY_PNG`, the boundary curve (:func:`draw_boundary`).

    Raises:
        ReportError: matplotlib is not installed.
    """
    try:
        import matplotlib  # noqa: PLC0415 - optional extra

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as exc:
        raise ReportError(
            "--plots needs matplotlib: pip install 'swapnbd[plot]' (./dev setup installs it)"
        ) from exc
    usable = [r for r in runs if not is_interrupted(r.run)]
    varying = plan.varying_keys([r.config for r in usable])
    arms: dict[str, list[RunData]] = {}
    for r in usable:
        arms.setdefault(plan.label(r.config, varying), []).append(r)
    out_dir.mkdir(parents=True, exist_ok=True)
    panels = (
        ("memfree_mib", "MemFree (MiB)"),
        ("swapin_rate", "swap-in (pages/s)"),
        ("swapout_rate", "swap-out (pages/s)"),
        ("throttle", "pgscan_direct_throttle (cumulative)"),
    )
    written = []
    for label, rs in arms.items():
        if not any(r.samples for r in rs):  # runs from before samples were kept: no axes
            continue
        fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
        for r in rs:
            ser = series(r.samples)
            if not ser["t"]:
                continue
            outcome = str(r.run.get("outcome"))
            for ax, (key, _title) in zip(axes.flat, panels, strict=True):
                (line,) = ax.plot(ser["t"], ser[key], linewidth=1, label=f"{r.name} ({outcome})")
                if outcome != "completed":
                    ax.plot(ser["t"][-1], ser[key][-1], "x", color=line.get_color(), markersize=9)
        for ax, (_key, title) in zip(axes.flat, panels, strict=True):
            ax.set_title(title, fontsize=10)
            ax.grid(True, alpha=0.3)
        for ax in axes[1]:
            ax.set_xlabel("seconds since the first sample")
        handles, names = axes.flat[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, names, loc="lower center", ncol=min(3, len(names)), fontsize=8)
        counts = _counts(rs)
        stopped = (
            " (x: where a run that did not complete stopped)" if set(counts) - {"completed"} else ""
        )
        fig.suptitle(f"{label}: {outcome_text(counts, len(rs))}{stopped}")
        fig.tight_layout(rect=(0, 0.08, 1, 0.96))
        path = out_dir / f"{_safe_name(label)}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    points = lockup_curve.curve_points([r.run for r in usable])
    if boundary or (boundary is None and lockup_curve.spans_settings(points)):
        written.append(draw_boundary(points, out_dir / BOUNDARY_PNG))
    return written


def draw_boundary(points: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """P(lockup) against the overcommit ratio, one line per arm, the 95% Wilson interval
    as error bars and ``k/n`` beside each point."""
    import matplotlib  # noqa: PLC0415 - optional extra; write_plots checked it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(9, 5.5))
    curves: dict[str, list[Mapping[str, Any]]] = {}
    for p in points:
        if p["trials"]:
            curves.setdefault(p["curve"], []).append(p)
    for i, (curve, pts) in enumerate(curves.items()):
        # A small sideways shift per arm keeps bars at the same ratio apart.
        shift = (i - (len(curves) - 1) / 2) * 0.02
        xs = [p["ratio"] + shift for p in pts]
        ys = [p["p"] for p in pts]
        err = [[p["p"] - p["low"] for p in pts], [p["high"] - p["p"] for p in pts]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, linewidth=1.5, label=curve)
        for x, p in zip(xs, pts, strict=True):
            ax.annotate(
                f"{p['lockups']}/{p['trials']}",
                (x, p["p"]),
                textcoords="offset points",
                xytext=(6, 4),
                fontsize=7,
            )
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("overcommit ratio (workload / guest RAM)")
    ax.set_ylabel("P(lockup)")
    ax.set_title("Where lockups begin: P(lockup) with 95% Wilson intervals")
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _counts(rs: Sequence[RunData]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rs:
        key = str(r.run.get("outcome"))
        counts[key] = counts.get(key, 0) + 1
    return counts
