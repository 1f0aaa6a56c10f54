"""Per-run time series for the overlay plots (pure).

Theory of operation
-------------------
The guest writes two streams on one clock (its CLOCK_MONOTONIC): the collector's samples
(``vmstat.jsonl``: /proc/vmstat and /proc/meminfo once a second) and the events
(``events.jsonl``: phases, and swapstress's heartbeats with ``pages_done``).  The overlays
put every run of every arm on one x axis, seconds since the guest entered the ``stress``
phase, so :func:`run_series` takes that phase event's ``t_mono`` as zero.  A run with no
``stress`` phase event (one recorded before events were kept, or one that never got
there) has no zero, so it has no series (None) rather than a guessed one.

Counters (pswpin, pswpout, pgscan_direct, pgsteal_direct) become rates per second between
consecutive samples, each placed at the later sample (the first sample has none: NaN);
nr_writeback and MemFree are levels.  Progress is the heartbeats' ``pages_done`` (pages
written or verified, summed over workers).

The collector does not read /proc/zoneinfo, so the min watermark is the run's
``vm.min_free_kbytes`` (as the guest read it back, else as the run pinned it): the kernel
splits it over the zones as their min watermarks, before any watermark boost.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vm.campaign.report import MIB, RunData, num

#: Counters drawn as rates (pages/s), by the name of their RunSeries field.
RATE_KEYS: dict[str, str] = {
    "swapin_rate": "pswpin",
    "swapout_rate": "pswpout",
    "pgscan_direct_rate": "pgscan_direct",
    "pgsteal_direct_rate": "pgsteal_direct",
}


@dataclass(frozen=True, slots=True)
class RunSeries:
    """One run's series; times in seconds since the stress phase began (guest clock)."""

    name: str
    outcome: str
    t: tuple[float, ...]
    """Sample times."""
    memfree_mib: tuple[float, ...]
    swapin_rate: tuple[float, ...]
    swapout_rate: tuple[float, ...]
    pgscan_direct_rate: tuple[float, ...]
    pgsteal_direct_rate: tuple[float, ...]
    nr_writeback: tuple[float, ...]
    """Pages under writeback (a level, not a rate)."""
    heartbeat_t: tuple[float, ...]
    pages_done: tuple[float, ...]
    """Pages written or verified so far, at each heartbeat."""
    min_free_kbytes: int | None
    min_free_source: str
    """``guest`` (read back in the guest), ``config`` (as the run pinned it) or ``none``."""


def stress_start(events: Sequence[Mapping[str, Any]]) -> float | None:
    """``t_mono`` of the first ``stress`` phase event; None without one."""
    for event in events:
        if event.get("type") == "phase" and event.get("phase") == "stress":
            return num(event.get("t_mono"))
    return None


def min_free_kbytes(run: Mapping[str, Any]) -> tuple[int | None, str]:
    """The run's vm.min_free_kbytes and where it comes from (see :class:`RunSeries`)."""
    settings = (run.get("guest") or {}).get("settings") or {}
    text = settings.get("vm.min_free_kbytes")
    if isinstance(text, str) and text.strip().isdigit():
        return int(text), "guest"
    cfg = run.get("config") or {}
    for key in ("min_free_kbytes", "pinned_min_free_kbytes"):
        value = num(cfg.get(key))
        if value is not None:
            return int(value), "config"
    return None, "none"


def _level(value: Any, scale: float = 1.0) -> float:
    v = num(value)
    return math.nan if v is None else v / scale


def run_series(data: RunData) -> RunSeries | None:
    """The series of one run, or None when it has no stress phase event to start from."""
    t0 = stress_start(data.events)
    if t0 is None:
        return None
    times = [float(s["t_mono"]) - t0 for s in data.samples]
    rates: dict[str, list[float]] = {field: [] for field in RATE_KEYS}
    prev: Mapping[str, Any] | None = None
    for s, t in zip(data.samples, times, strict=True):
        vm = s.get("vmstat") or {}
        for field, key in RATE_KEYS.items():
            rate = math.nan
            if prev is not None:
                dt = t - (float(prev["t_mono"]) - t0)
                a, b = num((prev.get("vmstat") or {}).get(key)), num(vm.get(key))
                if dt > 0 and a is not None and b is not None:
                    rate = (b - a) / dt
            rates[field].append(rate)
        prev = s
    beats = [
        e
        for e in data.events
        if e.get("type") == "heartbeat"
        and num(e.get("t_mono")) is not None
        and num(e.get("pages_done")) is not None
    ]
    kbytes, source = min_free_kbytes(data.run)
    return RunSeries(
        name=data.name,
        outcome=str(data.run.get("outcome")),
        t=tuple(times),
        memfree_mib=tuple(
            _level((s.get("meminfo") or {}).get("MemFree"), MIB) for s in data.samples
        ),
        nr_writeback=tuple(
            _level((s.get("vmstat") or {}).get("nr_writeback")) for s in data.samples
        ),
        heartbeat_t=tuple(float(e["t_mono"]) - t0 for e in beats),
        pages_done=tuple(float(e["pages_done"]) for e in beats),
        min_free_kbytes=kbytes,
        min_free_source=source,
        swapin_rate=tuple(rates["swapin_rate"]),
        swapout_rate=tuple(rates["swapout_rate"]),
        pgscan_direct_rate=tuple(rates["pgscan_direct_rate"]),
        pgsteal_direct_rate=tuple(rates["pgsteal_direct_rate"]),
    )
