"""How much a swapstress run touches: workers, bytes per worker and passes (:class:`Plan`).

:func:`make_plan` resolves the flags and /proc/meminfo into a plan (8 x CPUs workers sharing
4 x MemTotal by default); ``--dry-run`` prints it and the result embeds it.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Literal

from stress.pattern import PAGE_SIZE

Mode = Literal["rewrite", "verify"]

DEFAULT_RATIO = 4.0
DEFAULT_LOOPS = 4


class UsageError(Exception):
    """Bad flags or an impossible plan; the message says what to change.  Exit code 2."""


@dataclass(frozen=True, slots=True)
class Plan:
    """What a run will do; printed by ``--dry-run`` and embedded in the result."""

    workers: int
    """Number of worker processes."""
    total_bytes: int
    """Bytes the workers touch together (``per_worker_bytes * workers``)."""
    requested_total_bytes: int
    """``--total``, or ``--ratio`` x MemTotal, before rounding down to whole pages."""
    mem_total_bytes: int
    """MemTotal from /proc/meminfo."""
    per_worker_bytes: int
    """Bytes each worker maps, a multiple of ``page_size``."""
    pages_per_worker: int
    """``per_worker_bytes / page_size``."""
    page_size: int
    """Pattern page size (4096)."""
    loops: int | None
    """Verify passes after the initial write, or ``None`` when ``duration_s`` is set."""
    duration_s: float | None
    """Run passes until this many seconds have elapsed, or ``None``."""
    mode: Mode
    """``rewrite`` (verify then write the next generation, usemem style) or ``verify``."""
    nohugepage: bool
    """Workers ``madvise(MADV_NOHUGEPAGE)`` their mapping (4 KiB pages whatever THP says)."""
    mem_available_bytes: int
    """MemAvailable from /proc/meminfo when planned."""
    swap_free_bytes: int
    """SwapFree from /proc/meminfo when planned."""

    @property
    def fits(self) -> bool:
        """Whether the plan fits in MemAvailable plus free swap."""
        return self.total_bytes <= self.mem_available_bytes + self.swap_free_bytes

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, ``fits`` included."""
        out = asdict(self)
        out["fits"] = self.fits
        return out


def make_plan(
    *,
    meminfo: dict[str, int],
    workers: int | None = None,
    total_bytes: int | None = None,
    ratio: float | None = None,
    loops: int | None = None,
    duration_s: float | None = None,
    mode: Mode = "rewrite",
    nohugepage: bool = False,
    cpu_count: int | None = None,
) -> Plan:
    """Resolve defaults (8 x CPUs workers, 4 x MemTotal) into a :class:`Plan`.

    Args:
        meminfo: parsed /proc/meminfo in bytes (:func:`stress.procfs.parse_meminfo`).

    Raises:
        UsageError: conflicting or out-of-range values, or a total too small to give each
            worker one page.
    """
    for name in ("MemTotal", "MemAvailable", "SwapFree"):
        if name not in meminfo:
            raise UsageError(f"/proc/meminfo has no {name} field; cannot plan the run")
    if total_bytes is not None and ratio is not None:
        raise UsageError("--total and --ratio are mutually exclusive; pass one of them")
    if loops is not None and duration_s is not None:
        raise UsageError("--loops and --duration are mutually exclusive; pass one of them")
    if workers is None:
        workers = 8 * (cpu_count or os.cpu_count() or 1)
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    if ratio is not None and not (ratio > 0 and math.isfinite(ratio)):
        raise UsageError(f"--ratio must be a positive number, got {ratio}")
    if loops is not None and loops < 0:
        raise UsageError(f"--loops must be 0 or more, got {loops}")
    if duration_s is not None and not (duration_s > 0 and math.isfinite(duration_s)):
        raise UsageError(f"--duration must be a positive number of seconds, got {duration_s}")
    if loops is None and duration_s is None:
        loops = DEFAULT_LOOPS
    mem_total = meminfo["MemTotal"]
    if total_bytes is None:
        total_bytes = int(mem_total * (DEFAULT_RATIO if ratio is None else ratio))
    per_worker = (total_bytes // workers) // PAGE_SIZE * PAGE_SIZE
    if per_worker < PAGE_SIZE:
        raise UsageError(
            f"total {total_bytes} bytes split over {workers} workers leaves less than one "
            f"{PAGE_SIZE}-byte page per worker; raise --total or lower --workers"
        )
    return Plan(
        workers=workers,
        total_bytes=per_worker * workers,
        requested_total_bytes=total_bytes,
        mem_total_bytes=mem_total,
        per_worker_bytes=per_worker,
        pages_per_worker=per_worker // PAGE_SIZE,
        page_size=PAGE_SIZE,
        loops=loops,
        duration_s=duration_s,
        mode=mode,
        nohugepage=nohugepage,
        mem_available_bytes=meminfo["MemAvailable"],
        swap_free_bytes=meminfo["SwapFree"],
    )
