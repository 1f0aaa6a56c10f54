"""Synthetic fio JSON reports, shaped like fio 3.33's ``--output-format=json``."""

from __future__ import annotations

import json
from typing import Any


def direction(
    *, iops: float = 0.0, bw: float = 0.0, io_bytes: int = 0, n: int = 0, mean_ns: float = 0.0,
    p99_ns: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    clat: dict[str, Any] = {"min": 0, "max": 0, "mean": mean_ns, "stddev": 0.0, "N": n}
    if p99_ns is not None:
        clat["percentile"] = {"50.000000": p99_ns / 2, "99.000000": p99_ns}
    return {
        "io_bytes": io_bytes,
        "bw_bytes": bw,
        "iops": iops,
        "runtime": 1000,
        "total_ios": n,
        "clat_ns": clat,
        "lat_ns": {"min": 0, "max": 0, "mean": mean_ns, "stddev": 0.0, "N": n},
    }


def job(
    *, read: dict[str, Any] | None = None, write: dict[str, Any] | None = None, error: int = 0,
    name: str = "w",
) -> dict[str, Any]:  # fmt: skip
    return {
        "jobname": name,
        "groupid": 0,
        "error": error,
        "read": read or direction(),
        "write": write or direction(),
        "trim": direction(),
    }


def report(*jobs: dict[str, Any], chatter: str = "fio: connected to NBD server\n") -> str:
    doc = {"fio version": "fio-3.33", "jobs": list(jobs)}
    return chatter + json.dumps(doc, indent=2)
