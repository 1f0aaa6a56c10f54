"""The boundary curve: P(lockup) per arm and setting with its Wilson interval (pure).

Theory of operation
-------------------
A *curve* is an arm (the report's label without the ratio: kernel, arm, allocator,
server, and ``min_free_kbytes`` when it differs between the runs) and its points are the
overcommit ratios it was run at.  Each point counts its trials: every finished run except
harness errors (``error``: the harness failed, the kernel said nothing) and interrupted
runs (SIGINT/SIGTERM: no measurement).  A lockup is a run whose outcome is ``lockup``;
any other outcome (completed, oom, guest-crash, corruption) is a trial that did not lock
up, and is counted by name beside it.  The interval is :func:`vm.campaign.wilson.wilson`
at 95 %, as ``swapnbd boundary`` decides with by default.

:func:`curve_points` is what ``report.json`` holds under ``boundary``; the report shows it
when a curve has more than one point, or when asked (a boundary store).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vm.campaign import plan
from vm.campaign.wilson import wilson

CONFIDENCE = 0.95
NOTE = (
    "P(lockup): lockups / trials per arm and overcommit ratio, with the 95% Wilson score "
    "interval (it stays inside [0, 1] and is not a point at 0/n or n/n: 0 lockups in 4 "
    "runs still allows 0.49). Trials are finished runs; harness errors and interrupted "
    "runs are not trials. Other outcomes count as trials without a lockup and are named."
)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _config(run: Mapping[str, Any]) -> Mapping[str, Any]:
    cfg = run.get("config")
    return cfg if isinstance(cfg, dict) else {}


def curve_points(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One point per (curve, ratio) of the run.json objects ``runs``, curves in the order
    their first run appears, points by ratio.  Runs sized by ``total`` (no ratio) are on
    no curve; interrupted runs are left out."""
    usable = [
        r
        for r in runs
        if r.get("outcome") is not None
        and not r.get("interrupted")
        and _num(_config(r).get("ratio")) is not None
    ]
    varying = [k for k in plan.varying_keys([_config(r) for r in usable]) if k != "ratio"]
    groups: dict[str, dict[float, list[Mapping[str, Any]]]] = {}
    for r in usable:
        curve = plan.label(_config(r), varying)
        ratio = _num(_config(r).get("ratio"))
        assert ratio is not None
        groups.setdefault(curve, {}).setdefault(ratio, []).append(r)
    points = []
    for curve, by_ratio in groups.items():
        for ratio in sorted(by_ratio):
            rs = by_ratio[ratio]
            trials = [r for r in rs if r.get("outcome") != "error"]
            lockups = sum(1 for r in trials if r.get("outcome") == "lockup")
            others: dict[str, int] = {}
            for r in trials:
                outcome = str(r.get("outcome"))
                if outcome != "lockup":
                    others[outcome] = others.get(outcome, 0) + 1
            iv = wilson(lockups, len(trials))
            min_free = sorted(
                {
                    int(v)
                    for r in rs
                    if (v := _num(_config(r).get("pinned_min_free_kbytes"))) is not None
                }
            )
            points.append(
                {
                    "curve": curve,
                    "ratio": ratio,
                    "min_free_kbytes": min_free,
                    "lockups": lockups,
                    "trials": len(trials),
                    "p": iv.p if trials else None,
                    "low": iv.low,
                    "high": iv.high,
                    "errors": len(rs) - len(trials),
                    "other_outcomes": others,
                }
            )
    return points


def spans_settings(points: Sequence[Mapping[str, Any]]) -> bool:
    """Whether some curve has more than one point (a curve to draw)."""
    seen: dict[str, int] = {}
    for p in points:
        seen[p["curve"]] = seen.get(p["curve"], 0) + 1
    return any(n > 1 for n in seen.values())


def point_cells(point: Mapping[str, Any]) -> list[str]:
    """ratio, lockups/trials, P(lockup), the interval, the other outcomes (and errors)."""
    n = point["trials"]
    others = (
        ", ".join(f"{k} {v}/{n}" for k, v in sorted(point["other_outcomes"].items()))
        if point["other_outcomes"]
        else "—"
    )
    if point["errors"]:
        others += f"; {point['errors']} harness error(s), not trials"
    return [
        f"{point['ratio']:g}",
        f"{point['lockups']}/{n}",
        "—" if point["p"] is None else f"{point['p']:.2f}",
        f"[{point['low']:.2f}, {point['high']:.2f}]",
        others,
    ]


HEAD = ("arm", "ratio", "lockups/trials", "P(lockup)", "95% interval", "other outcomes")


def render_markdown(points: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [
        "## Boundary: P(lockup) by overcommit ratio",
        "",
        "| " + " | ".join(HEAD) + " |",
        "|---|" + "|".join(["---:"] * 4) + "|---|",
    ]
    for p in points:
        lines.append(f"| {p['curve']} | " + " | ".join(point_cells(p)) + " |")
    lines += ["", f"- {NOTE}", ""]
    return lines
