"""The fuzz figures: printed in pytest's terminal summary and written as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .paths import Paths
from .runner import Stats

RESULTS: list[dict[str, Any]] = []


def record(name: str, stats: Stats, paths: Paths | None, directory: Path) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "target": name,
        "cases": stats.cases,
        "cases_per_s": round(stats.rate(), 1),
        "seconds": round(stats.seconds, 2),
        "well_framed_cases": stats.well_framed,
        "requests_answered": stats.requests_answered,
        "closed_early": stats.closed_early,
        "mutators": dict(stats.mutators),
    }
    if paths is not None:
        entry["paths"] = asdict(paths)
    RESULTS.append(entry)
    (directory / f"fuzz-{name}.json").write_text(json.dumps(entry, indent=1) + "\n")
    return entry


def summary_lines() -> list[str]:
    out = []
    for r in RESULTS:
        if "summary" in r:
            out.append(r["summary"])
            continue
        paths = r.get("paths")
        reach = (
            f", {paths['arcs']} distinct arcs / {paths['lines']} lines in nbdserver/"
            if paths
            else ""
        )
        out.append(
            f"fuzz {r['target']}: {r['cases']} cases in {r['seconds']} s"
            f" ({r['cases_per_s']}/s), {r['well_framed_cases']} well framed,"
            f" {r['requests_answered']} requests answered{reach}"
        )
    return out
