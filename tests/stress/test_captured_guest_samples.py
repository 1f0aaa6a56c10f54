"""summarize() on collector samples of two real experiments.

The fixtures under ``fixtures/captured/`` are the first and last collector samples of two
real ``swapnbd run`` experiments on the reference machine (TCG, swap on /dev/nbd0 through
nbd-serve): Debian's 6.1.0-56 cloud kernel (8 workers, 512 MiB in a 128 MiB guest) and
6.12.117 cloud (8 workers, 256 MiB). The expected deltas are the ones those runs recorded
in run.json, so a change to summarize() that shifts them is caught. They also pin down
how the two kernels' field sets differ (the /proc trees beside them agree).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stress.vmstat import summarize

CAPTURED = Path(__file__).parent / "fixtures" / "captured"


def load(name: str) -> list[dict[str, Any]]:
    lines = (CAPTURED / f"{name}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "linux-6.1.0-56-cloud-amd64",
            {"pswpin": 832135, "pswpout": 980905, "pgscan_direct_throttle": 11},
        ),
        (
            "linux-6.12.117+deb12-cloud-amd64",
            {"pswpin": 197145, "pswpout": 231898, "pgscan_direct_throttle": 192},
        ),
    ],
)
def test_deltas_match_the_recorded_runs(name: str, expected: dict[str, int]) -> None:
    summary = summarize(load(name))
    delta = summary["vmstat_delta"]
    assert {key: delta[key] for key in expected} == expected
    assert summary["pgscan_direct_throttle"] == expected["pgscan_direct_throttle"]
    assert summary["rates"]["pswpout"] > 0


def test_zero_page_counters_exist_only_on_6_12() -> None:
    """6.12 counts zero-filled pages it did not write to swap; 6.1 has no such field."""
    old = summarize(load("linux-6.1.0-56-cloud-amd64"))["vmstat_delta"]
    new = summarize(load("linux-6.12.117+deb12-cloud-amd64"))["vmstat_delta"]
    assert "swpout_zero" not in old and "swpin_zero" not in old
    assert "swpout_zero" in new and "swpin_zero" in new
    assert "pgscan_khugepaged" in new and "pgscan_khugepaged" not in old


def test_zswap_fields_of_the_cloud_kernels_are_absent_not_zero() -> None:
    """Debian's cloud kernels have no zswap: its counters must be reported absent."""
    for name in ("linux-6.1.0-56-cloud-amd64", "linux-6.12.117+deb12-cloud-amd64"):
        summary = summarize(load(name))
        assert "zswpout" in summary["absent"], name
        assert "zswpout" not in summary["vmstat_delta"], name
