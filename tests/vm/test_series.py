"""The overlays' series (vm/campaign/series.py) from real runs: the committed seed archive.

Every expected value below is read off the run's own files in
docs/results/seed-2026-12-06/runs.tar.xz (events.jsonl and vmstat.jsonl of
r04-6.12-vanilla-slub-nbd-serve-rep1, a 6.12 vanilla lockup that made some progress first):
the stress phase event at t_mono 17.801086229, 24 samples, 9 heartbeats.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from vm.campaign import archive, series
from vm.campaign.report import RunData

SEED = Path(__file__).resolve().parents[2] / "docs" / "results" / "seed-2026-12-06" / "runs.tar.xz"
T0 = 17.801086229  # the stress phase event of r04


@pytest.fixture(scope="module")
def seed() -> dict[str, RunData]:
    return {r.name: r for r in archive.load_runs([SEED])}


def r04(seed: dict[str, RunData]) -> series.RunSeries:
    ser = series.run_series(seed["r04-6.12-vanilla-slub-nbd-serve-rep1"])
    assert ser is not None
    return ser


def test_the_archive_gives_each_run_its_phases_and_heartbeats(seed: dict[str, RunData]) -> None:
    run = seed["r04-6.12-vanilla-slub-nbd-serve-rep1"]
    kinds = [e["type"] for e in run.events]
    assert kinds.count("heartbeat") == 9
    assert [e["phase"] for e in run.events if e["type"] == "phase"] == [
        "boot",
        "network",
        "nbd-connect",
        "swapon",
        "collector",
        "stress",
    ]
    assert series.stress_start(run.events) == T0
    assert len(seed) == 35 and all(series.stress_start(r.events) is not None for r in seed.values())


def test_times_are_seconds_since_the_stress_phase(seed: dict[str, RunData]) -> None:
    ser = r04(seed)
    assert ser.name == "r04-6.12-vanilla-slub-nbd-serve-rep1" and ser.outcome == "lockup"
    assert len(ser.t) == 24
    assert ser.t[0] == pytest.approx(17.526973423 - T0, abs=1e-9)  # the collector starts first
    assert ser.t[-1] == pytest.approx(40.529333772 - T0, abs=1e-9)
    assert ser.heartbeat_t[0] == pytest.approx(35.295535376 - T0, abs=1e-9)
    assert ser.heartbeat_t[-1] == pytest.approx(41.899540737 - T0, abs=1e-9)


def test_progress_is_the_heartbeats_pages_done(seed: dict[str, RunData]) -> None:
    assert r04(seed).pages_done == (0, 6656, 6656, 6656, 7424, 7680, 7680, 8192, 9472)
    # the run's stall record agrees with the last heartbeat
    assert (
        seed["r04-6.12-vanilla-slub-nbd-serve-rep1"].run["evidence"]["stall"]["pages_done"] == 9472
    )


def test_counters_become_rates_between_samples(seed: dict[str, RunData]) -> None:
    ser = r04(seed)
    for rates in (
        ser.swapin_rate,
        ser.swapout_rate,
        ser.pgscan_direct_rate,
        ser.pgsteal_direct_rate,
    ):
        assert len(rates) == 24 and math.isnan(rates[0]) and rates[1] == rates[2] == 0.0
    assert ser.swapout_rate[3] == pytest.approx(1306 / (20.551643645 - 19.528647957), rel=1e-12)
    dt = 21.549384149 - 20.551643645
    assert ser.pgscan_direct_rate[4] == pytest.approx((4610 - 3330) / dt, rel=1e-12)
    assert ser.pgsteal_direct_rate[4] == pytest.approx((3282 - 2384) / dt, rel=1e-12)
    assert ser.swapin_rate[8] == pytest.approx(12 / (25.529319921 - 24.534211752), rel=1e-12)


def test_levels_writeback_and_free_memory(seed: dict[str, RunData]) -> None:
    ser = r04(seed)
    assert ser.nr_writeback[:5] == (0, 0, 0, 1180, 657)
    assert ser.memfree_mib[0] == 26783744 / 2**20 == 25.54296875
    assert ser.memfree_mib[3] == 5009408 / 2**20
    assert (ser.min_free_kbytes, ser.min_free_source) == (1448, "guest")


def test_a_run_without_heartbeats_has_no_progress_line(seed: dict[str, RunData]) -> None:
    ser = series.run_series(seed["r02-6.1-vanilla-slub-nbd-serve-rep1"])
    assert ser is not None
    assert (len(ser.t), ser.heartbeat_t, ser.pages_done) == (4, (), ())


def test_no_stress_phase_no_series_and_the_configured_min_free(seed: dict[str, RunData]) -> None:
    run = seed["r04-6.12-vanilla-slub-nbd-serve-rep1"]
    no_phase = replace(run, events=[e for e in run.events if e.get("phase") != "stress"])
    assert series.run_series(no_phase) is None
    cfg_only = {"config": dict(run.run["config"], min_free_kbytes=4096)}
    assert series.min_free_kbytes(cfg_only) == (4096, "config")
    pinned = {"config": {"pinned_min_free_kbytes": 1448}, "guest": {"settings": {}}}
    assert series.min_free_kbytes(pinned) == (1448, "config")
    assert series.min_free_kbytes({}) == (None, "none")
