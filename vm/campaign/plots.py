"""``swapnbd report --plots``: the overlays of every arm, and each arm's runs (matplotlib).

``overlays.png`` (:data:`OVERLAY_FILE`) puts every arm on shared axes, one colour per arm
and one line per run, from :mod:`vm.campaign.series`; ``arms.png`` (:data:`ARMS_PNG`)
gives each arm a row of its own runs; a boundary adds ``boundary.png``.
matplotlib is the optional ``plot`` extra, imported only when plots are drawn.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vm.campaign import lockup_curve
from vm.campaign.report import (
    MIB,
    ReportError,
    RunData,
    arms_of,
    is_interrupted,
    num,
    outcome_text,
)
from vm.campaign.series import RunSeries, run_series

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: The overlays' file name in a plots directory.
OVERLAY_FILE = "overlays.png"

#: The overlay panels: (RunSeries field, title); ``pages_done`` is drawn against the
#: heartbeats' times, the rest against the samples'.
OVERLAY_PANELS: tuple[tuple[str, str], ...] = (
    ("pages_done", "progress: pages written or verified (heartbeats)"),
    ("memfree_mib", "MemFree (MiB) against vm.min_free_kbytes (dashed)"),
    ("swapout_rate", "swap-out, pswpout (pages/s)"),
    ("swapin_rate", "swap-in, pswpin (pages/s)"),
    ("pgscan_direct_rate", "direct scan, pgscan_direct (pages/s)"),
    ("pgsteal_direct_rate", "direct steal, pgsteal_direct (pages/s)"),
    ("nr_writeback", "nr_writeback (pages under writeback)"),
)

#: Below this many seconds the overlays' time axis is linear, above it logarithmic: a
#: vanilla run locks up within seconds of the stress phase and a patched one runs for
#: minutes, and both must be readable on one axis.
LINEAR_SECONDS = 10.0

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


def _pyplot() -> Any:
    try:
        import matplotlib  # noqa: PLC0415 - optional extra

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as exc:
        raise ReportError(
            "--plots needs matplotlib: pip install 'swapnbd[plot]' (./dev setup installs it)"
        ) from exc
    return plt


def _arms(runs: Sequence[RunData]) -> dict[str, list[RunData]]:
    """The usable runs by arm label, as the report groups them."""
    return arms_of([r for r in runs if not is_interrupted(r.run)])


@dataclass(frozen=True, slots=True)
class Overlays:
    """What the overlay figure shows: the arms in legend order, and the runs left out."""

    arms: tuple[str, ...]
    """Arm labels, each with its colour, in legend order."""
    runs: dict[str, tuple[str, ...]]
    """Per arm, the runs drawn."""
    left_out: tuple[str, ...]
    """Runs with no stress phase event or no samples: nothing to put on the shared axis."""
    min_free: str
    """What the dashed line in the MemFree panel is."""


def _min_free_text(drawn: Sequence[RunSeries]) -> str:
    values = sorted({(s.min_free_kbytes, s.min_free_source) for s in drawn})
    known = sorted({k for k, _ in values if k is not None})
    if not known:
        return "no vm.min_free_kbytes recorded: no line"
    sources = sorted({src for k, src in values if k is not None})
    where = " and ".join(
        {"guest": "read back in the guest", "config": "as the run pinned it"}[src]
        for src in sources
    )
    kb = ", ".join(f"{k} kB" for k in known)
    return (
        f"dashed: vm.min_free_kbytes ({kb}, {where}), the sum of the zones' min watermarks "
        "before watermark boosting; /proc/zoneinfo is not sampled, so the boosted watermark "
        "that SysRq m shows at a stall is not drawn"
    )


def draw_overlays(runs: Sequence[RunData]) -> tuple[Figure, Overlays] | None:
    """Every arm on shared axes (:data:`OVERLAY_PANELS`), x in seconds since the stress
    phase began; one colour per arm, one line per run, an x where a run that did not
    complete stopped.  None when no run has a series.

    Raises:
        ReportError: matplotlib is not installed.
    """
    drawn: dict[str, list[RunSeries]] = {}
    left_out: list[str] = []
    for label, rs in _arms(runs).items():
        for r in rs:
            ser = run_series(r)
            if ser is None or not ser.t:
                left_out.append(r.name)
            else:
                drawn.setdefault(label, []).append(ser)
    if not drawn:
        return None
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if len(drawn) <= 10 else "tab20")
    fig, axes = plt.subplots(4, 2, figsize=(13, 15), sharex=True)
    panels = list(zip(axes.flat, OVERLAY_PANELS, strict=False))
    everything = [s for ss in drawn.values() for s in ss]
    for i, sers in enumerate(drawn.values()):
        colour = cmap(i % cmap.N)
        for ser in sers:
            for ax, (key, _title) in panels:
                xs = ser.heartbeat_t if key == "pages_done" else ser.t
                ys = getattr(ser, key)
                ax.plot(xs, ys, color=colour, linewidth=1, alpha=0.8)
                if ser.outcome != "completed" and xs:
                    ax.plot(xs[-1], ys[-1], "x", color=colour, markersize=8)
    kbytes = sorted({s.min_free_kbytes for s in everything if s.min_free_kbytes is not None})
    memfree_ax = panels[1][0]
    for kb in kbytes:
        memfree_ax.axhline(kb * 1024 / MIB, color="black", linestyle="--", linewidth=1)
    starts = [s.t[0] for s in everything] + [s.heartbeat_t[0] for s in everything if s.pages_done]
    ends = [s.t[-1] for s in everything] + [s.heartbeat_t[-1] for s in everything if s.pages_done]
    for ax, (_key, title) in panels:
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.set_xscale("symlog", linthresh=LINEAR_SECONDS)
        ax.set_xlim(min(starts), max(ends) * 1.05)
    for ax in axes[-1]:
        ax.set_xlabel(f"seconds since the stress phase began (linear to {LINEAR_SECONDS:g} s)")
    legend_ax = axes.flat[len(OVERLAY_PANELS)]
    legend_ax.axis("off")
    handles = [plt.Line2D([], [], color=cmap(i % cmap.N), linewidth=3) for i in range(len(drawn))]
    counts = {label: _counts(rs) for label, rs in _arms(runs).items()}
    names = [
        f"{label}: {outcome_text(counts[label], sum(counts[label].values()))}" for label in drawn
    ]
    legend_ax.legend(handles, names, loc="center", fontsize=8, frameon=False)
    min_free = _min_free_text(everything)
    note = "x: where a run that did not complete stopped. " + min_free + "."
    if left_out:
        note += f" Not drawn (no stress phase event or no samples): {', '.join(left_out)}."
    fig.suptitle("every arm on shared axes: one colour per arm, one line per run")
    fig.text(0.5, 0.01, textwrap.fill(note, 170), ha="center", va="bottom", fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    return fig, Overlays(
        arms=tuple(drawn),
        runs={label: tuple(s.name for s in sers) for label, sers in drawn.items()},
        left_out=tuple(left_out),
        min_free=min_free,
    )


def write_overlays(runs: Sequence[RunData], out_dir: Path) -> Path | None:
    """:func:`draw_overlays` saved as ``out_dir/overlays.png``; None when nothing to draw."""
    drawn = draw_overlays(runs)
    if drawn is None:
        return None
    fig, _ = drawn
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / OVERLAY_FILE
    fig.savefig(path, dpi=80)
    _pyplot().close(fig)
    return path


#: Every arm's own runs, one row of panels per arm (free memory, swap-in and swap-out
#: rates, the cumulative pgscan_direct_throttle): one file however many arms a result has.
ARMS_PNG = "arms.png"

#: The panels of an arm's row in :data:`ARMS_PNG`: (series key, title).
ARM_PANELS: tuple[tuple[str, str], ...] = (
    ("memfree_mib", "MemFree (MiB)"),
    ("swapin_rate", "swap-in (pages/s)"),
    ("swapout_rate", "swap-out (pages/s)"),
    ("throttle", "pgscan_direct_throttle (cumulative)"),
)


def write_plots(
    runs: Sequence[RunData], out_dir: Path, *, boundary: bool | None = None
) -> list[Path]:
    """``overlays.png`` (:func:`write_overlays`), then :data:`ARMS_PNG`
    (:func:`draw_arms`) and, with ``boundary`` (None: when an arm ran at more than one
    ratio, as the report decides), :data:`BOUNDARY_PNG`, the boundary curve
    (:func:`draw_boundary`).

    Raises:
        ReportError: matplotlib is not installed.
    """
    overlay = write_overlays(runs, out_dir)
    written = [] if overlay is None else [overlay]
    arms = draw_arms(runs, out_dir / ARMS_PNG)
    if arms is not None:
        written.append(arms)
    usable = [r for r in runs if not is_interrupted(r.run)]
    points = lockup_curve.curve_points([r.run for r in usable])
    if boundary or (boundary is None and lockup_curve.spans_settings(points)):
        written.append(draw_boundary(points, out_dir / BOUNDARY_PNG))
    return written


def draw_arms(runs: Sequence[RunData], path: Path) -> Path | None:
    """One row per arm (:data:`ARM_PANELS`), one line per run against seconds since its
    first sample, the row titled with the arm's outcomes. A run that did not complete ends
    where its samples end, marked with an x. None when no arm has samples (runs from
    before samples were kept)."""
    plt = _pyplot()
    arms = {label: rs for label, rs in _arms(runs).items() if any(r.samples for r in rs)}
    if not arms:
        return None
    fig, axes = plt.subplots(
        len(arms), len(ARM_PANELS), figsize=(15, 0.6 + 2.7 * len(arms)), squeeze=False
    )
    for row, (label, rs) in zip(axes, arms.items(), strict=True):
        for r in rs:
            ser = series(r.samples)
            if not ser["t"]:
                continue
            outcome = str(r.run.get("outcome"))
            run_no = r.name.split("-", 1)[0]
            for ax, (key, _title) in zip(row, ARM_PANELS, strict=True):
                (line,) = ax.plot(ser["t"], ser[key], linewidth=1, label=f"{run_no} {outcome}")
                if outcome != "completed":
                    ax.plot(ser["t"][-1], ser[key][-1], "x", color=line.get_color(), markersize=8)
        for ax, (_key, title) in zip(row, ARM_PANELS, strict=True):
            ax.set_title(title, fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
        row[0].set_ylabel(
            f"{label}\n{outcome_text(_counts(rs), len(rs))}", fontsize=9, fontweight="bold"
        )
        row[-1].legend(fontsize=6, loc="upper left", ncol=2)
    for ax in axes[-1]:
        ax.set_xlabel("seconds since the run's first sample", fontsize=8)
    fig.suptitle(
        "Each arm's runs, one row per arm (x: where a run that did not complete stopped)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (0.6 + 2.7 * len(arms))))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def draw_boundary(points: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """P(lockup) against the overcommit ratio, one line per arm, the 95% Wilson interval
    as error bars and ``k/n`` beside each point."""
    plt = _pyplot()
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
