"""Regenerate the report fixtures from a real ``swapnbd run`` directory.

    swapnbd run --memory 128M --cpus 2 --workers 4 --total 256M --loops 1 --out /tmp/real
    python tests/vm/data/report/make_fixtures.py /tmp/real

writes ``completed/`` (the run, trimmed to the fields the report reads) and ``lockup/``
(the same run cut at 40% of its samples and relabelled as the vanilla arm's lockup: no
swapstress result, counters up to the last kept sample), next to this file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from vm.campaign.report import VMSTAT_KEYS

HERE = Path(__file__).resolve().parent
# What the report reads (vm.campaign.report.VMSTAT_KEYS), plus the allocstall_* it sums.
VMSTAT_KEEP = (
    *VMSTAT_KEYS,
    "allocstall_dma",
    "allocstall_dma32",
    "allocstall_normal",
    "allocstall_movable",
    "allocstall_device",
)


def trim_sample(s: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "sample",
        "seq": s["seq"],
        "t_mono": s["t_mono"],
        "vmstat": {k: s["vmstat"][k] for k in VMSTAT_KEEP if k in s["vmstat"]},
        "meminfo": {"MemFree": s["meminfo"]["MemFree"]},
        "netstat": s.get("netstat"),
    }


def trim_run(run: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "schema",
        "config",
        "kernel",
        "outcome",
        "outcome_reason",
        "swapstress",
        "vmstat_delta",
        "timings",
        "files",
        "accel",
        "evidence",
        "counts",
    )
    out = {k: run[k] for k in keep if k in run}
    out["vmstat_delta"] = {k: v for k, v in run["vmstat_delta"].items() if k in VMSTAT_KEEP}
    if out.get("swapstress"):
        out["swapstress"] = {k: v for k, v in out["swapstress"].items() if k != "workers"}
    return out


def write(name: str, run: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    d = HERE / name
    d.mkdir(exist_ok=True)
    (d / "run.json").write_text(json.dumps(run, indent=1) + "\n")
    (d / "vmstat.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))


def main(src: Path) -> None:
    run = json.loads((src / "run.json").read_text())
    lines = (src / "vmstat.jsonl").read_text().splitlines()
    samples = [trim_sample(json.loads(x)) for x in lines if x.strip()]
    write("completed", trim_run(run), samples)

    cut = samples[: int(len(samples) * 0.4)]
    lock = trim_run(run)
    lock["config"] = dict(lock["config"], arm="vanilla", out="lockup")
    lock["outcome"] = "lockup"
    lock["outcome_reason"] = "no heartbeat and no sample for 60s (fixture: samples cut at 40%)"
    lock["swapstress"] = None
    first, last = cut[0]["vmstat"], cut[-1]["vmstat"]
    lock["vmstat_delta"] = {k: last[k] - first[k] for k in last if k in first}
    lock["counts"] = dict(lock.get("counts", {}), samples=len(cut))
    write("lockup", lock, cut)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
