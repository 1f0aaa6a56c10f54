"""Per-export statistics and the ``--stats`` JSON-lines writer.

Counters are plain integers updated on the hot path (no locks: everything runs on the
event loop thread). The line format is the contract in docs/architecture.md:
``{"t_wall", "t_mono", "connections": {"open", "total"}, "exports": {NAME: {"requests",
"bytes", "errors", "latency_us": {CMD: {"le": [...], "counts": [...]}}}}}``.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from nbdserver.protocol import Cmd

#: Command names as they appear in the stats lines.
COMMANDS: Final = (
    "read",
    "write",
    "flush",
    "trim",
    "write_zeroes",
    "cache",
    "block_status",
    "disc",
)
_NAME_OF: Final[dict[int, str]] = {
    Cmd.READ: "read",
    Cmd.WRITE: "write",
    Cmd.FLUSH: "flush",
    Cmd.TRIM: "trim",
    Cmd.WRITE_ZEROES: "write_zeroes",
    Cmd.CACHE: "cache",
    Cmd.BLOCK_STATUS: "block_status",
    Cmd.DISC: "disc",
}

#: Upper bounds of the latency buckets in microseconds; a last bucket catches the rest
#: (its bound is written as null in JSON).
LATENCY_BOUNDS_US: Final = (
    1, 2, 5, 10, 20, 50, 100, 200, 500,
    1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000,
    1_000_000, 2_000_000, 5_000_000, 10_000_000,
)  # fmt: skip


def command_name(cmd: int) -> str | None:
    """The stats name of a command, or None for commands not counted (unknown ones)."""
    return _NAME_OF.get(cmd)


class Histogram:
    """A fixed-bucket latency histogram."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BOUNDS_US) + 1)

    def add(self, micros: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BOUNDS_US, micros)] += 1

    def snapshot(self) -> dict[str, list[int | None]]:
        bounds: list[int | None] = [*LATENCY_BOUNDS_US, None]
        return {"le": bounds, "counts": list(self.counts)}


class ExportStats:
    """Counters for one export, shared by all its connections."""

    def __init__(self) -> None:
        self.requests = dict.fromkeys(COMMANDS, 0)
        self.errors = dict.fromkeys(COMMANDS, 0)
        self.bytes = {"read": 0, "write": 0}
        self.latency = {name: Histogram() for name in COMMANDS}

    def record(self, cmd: int, nbytes: int, latency_ns: int, error: bool) -> None:
        """Count one finished request."""
        name = command_name(cmd)
        if name is None:
            return
        self.requests[name] += 1
        if error:
            self.errors[name] += 1
        elif name in self.bytes:
            self.bytes[name] += nbytes
        self.latency[name].add(latency_ns / 1000)

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "bytes": dict(self.bytes),
            "errors": dict(self.errors),
            "latency_us": {name: h.snapshot() for name, h in self.latency.items()},
        }


def stats_line(
    t_wall: float,
    t_mono: float,
    open_connections: int,
    total_connections: int,
    exports: Mapping[str, ExportStats],
) -> str:
    """One JSON line (with the newline) in the architecture.md format."""
    record = {
        "t_wall": t_wall,
        "t_mono": t_mono,
        "connections": {"open": open_connections, "total": total_connections},
        "exports": {name: stats.snapshot() for name, stats in exports.items()},
    }
    return json.dumps(record, separators=(",", ":")) + "\n"


class StatsWriter:
    """Appends lines to the ``--stats`` file; each line is one write, flushed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, line: str) -> None:
        os.write(self._fd, line.encode())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
