"""The vmstat collector: one JSON line per second of the guest's memory state.

Usage (in the guest: ``PYTHONPATH=/opt/swapnbd python3 -m stress.vmstat ...``)::

    python3 -m stress.vmstat --out /dev/virtio-ports/swapnbd.samples --mlock
    python3 -m stress.vmstat --out samples.jsonl --interval 0.5 --count 10
    python3 -m stress.vmstat --out - --duration 60 --summary summary.json

Theory of operation
-------------------
Every ``--interval`` seconds (on a fixed monotonic schedule, so a slow sample does not shift
the following ones) it reads /proc/vmstat, /proc/meminfo, /proc/pressure/memory, /proc/swaps,
/proc/net/netstat and /proc/diskstats, and writes one JSON line with
:class:`stress.lineout.LineWriter`: straight to the descriptor, no buffering, retried on
EAGAIN, an error if it cannot be written.  The target can be a regular file, a pipe/FIFO
or a character device (the virtio-serial port), so each line is on the host before the
next sample is taken, even if the guest hangs a moment later.  ``--mlock`` locks the
collector in RAM (``mlockall`` via ctypes) so that it keeps sampling while the guest
thrashes.

It stops after ``--count`` samples, after ``--duration`` seconds, or at SIGTERM/SIGINT; in
every case it writes one last sample (``"final": true``) and exits 0.  Exit codes: 0 ok,
1 a sample could not be read or written, 2 usage.

Sample keys (one JSON object per line):

- ``type``: always ``"sample"``.
- ``seq``: 0, 1, 2 ... in the order written.
- ``t_mono``: ``time.monotonic()`` when the sample was taken (seconds; CLOCK_MONOTONIC, the
  same clock swapstress heartbeats use).
- ``t_wall``: ``time.time()`` at the same moment (seconds since the epoch).
- ``final``: true on the last sample of the run.
- ``vmstat``: every /proc/vmstat field as ``name -> int``, unknown ones included.
- ``pgscan_direct_throttle``: /proc/vmstat ``pgscan_direct_throttle`` (direct reclaimers
  throttled on pfmemalloc_wait), copied to the top level; ``null`` if the kernel lacks it.
- ``meminfo``: every /proc/meminfo field in **bytes** (``kB`` x 1024); unitless fields
  (``HugePages_*``) stay counts.
- ``meminfo_unit``: ``"bytes"``, a reminder of the above.
- ``psi``: /proc/pressure/memory as ``{"some": {...}, "full": {...}}`` with ``avg10``,
  ``avg60``, ``avg300`` (percent) and ``total`` (microseconds); ``null`` without PSI.
- ``swaps``: /proc/swaps, one ``{"filename", "type", "size_bytes", "used_bytes",
  "priority"}`` per swap area.
- ``netstat``: ``{"PFMemallocDrop": n}`` from the TcpExt line of /proc/net/netstat (TCP
  segments dropped because they used pfmemalloc reserves on a non-memalloc socket);
  ``null`` if the counter is missing.
- ``diskstats``: /proc/diskstats for every block device that has done I/O, as
  ``{"nbd0": {"reads", "read_ms", ...}}`` (:data:`stress.procfs.DISKSTATS_FIELDS`): what
  iostat reads, so the swap device's latency is the one the guest saw.  Idle devices (the
  other fifteen nbd slots) are left out; ``null`` without /proc/diskstats.

:func:`summarize` turns samples into the run's figures (the host imports it for
``run.json``); its keys are documented there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import select
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from stress import procfs
from stress.lineout import LineOutError, LineWriter
from stress.memlock import mlockall

__all__ = [
    "GAUGE_NAMES",
    "KEY_FIELDS",
    "CollectorError",
    "is_counter",
    "main",
    "summarize",
    "take_sample",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

KEY_FIELDS: tuple[str, ...] = (
    "pgscan_direct_throttle",
    "pswpin",
    "pswpout",
    "pgpgin",
    "pgpgout",
    "pgscan_kswapd",
    "pgscan_direct",
    "pgscan_khugepaged",
    "pgsteal_kswapd",
    "pgsteal_direct",
    "pgsteal_khugepaged",
    "pgscan_anon",
    "pgscan_file",
    "pgsteal_anon",
    "pgsteal_file",
    "allocstall_dma",
    "allocstall_dma32",
    "allocstall_normal",
    "allocstall_movable",
    "allocstall_device",
    "pgfault",
    "pgmajfault",
    "oom_kill",
    "nr_vmscan_write",
    "nr_vmscan_immediate_reclaim",
    "nr_swapcached",
    "nr_free_pages",
    "nr_anon_pages",
    "workingset_refault_anon",
    "workingset_activate_anon",
    "workingset_restore_anon",
    "swap_ra",
    "swap_ra_hit",
    "swpin_zero",
    "swpout_zero",
    "zswpin",
    "zswpout",
    "pageoutrun",
    "nr_throttled_written",
)
"""vmstat fields the experiment reads.  Missing from a sample, they are listed in
``summarize()["absent"]`` even when missing from every sample (e.g. ``swpin_zero`` on 6.1),
so a reader never mistakes "this kernel has no such counter" for zero."""

GAUGE_NAMES: frozenset[str] = frozenset(
    {"workingset_nodes", "nr_dirty_threshold", "nr_dirty_background_threshold"}
)
"""Gauges that do not start with ``nr_``; a delta is reported for them but no rate."""


class CollectorError(Exception):
    """A /proc file the collector cannot do without is missing or unreadable."""


def is_counter(name: str) -> bool:
    """Whether a vmstat field is an event counter (rates make sense) rather than a gauge.

    The kernel prints node and zone state (``nr_*``, ``workingset_nodes``) before the event
    counters; state is a level that goes up and down, events only grow.
    """
    return not name.startswith("nr_") and name not in GAUGE_NAMES


def take_sample(seq: int, proc_root: str = procfs.PROC, *, final: bool = False) -> dict[str, Any]:
    """Read every source once and return one sample (see the module docstring for keys).

    Raises:
        CollectorError: /proc/vmstat or /proc/meminfo is missing.
        procfs.ProcFormatError: a file has an unexpected layout.
    """
    t_mono = time.monotonic()
    t_wall = time.time()
    vmstat_text = procfs.read_text("vmstat", proc_root)
    meminfo_text = procfs.read_text("meminfo", proc_root)
    if vmstat_text is None or meminfo_text is None:
        missing = "vmstat" if vmstat_text is None else "meminfo"
        raise CollectorError(f"{os.path.join(proc_root, missing)} does not exist")
    vmstat = procfs.parse_vmstat(vmstat_text)
    psi_text = procfs.read_text("pressure/memory", proc_root)
    swaps_text = procfs.read_text("swaps", proc_root)
    netstat_text = procfs.read_text("net/netstat", proc_root)
    diskstats_text = procfs.read_text("diskstats", proc_root)
    netstat: dict[str, int] | None = None
    if netstat_text is not None:
        drop = procfs.parse_netstat(netstat_text).get("TcpExt", {}).get("PFMemallocDrop")
        if drop is not None:
            netstat = {"PFMemallocDrop": drop}
    return {
        "type": "sample",
        "seq": seq,
        "t_mono": t_mono,
        "t_wall": t_wall,
        "final": final,
        "pgscan_direct_throttle": vmstat.get("pgscan_direct_throttle"),
        "vmstat": vmstat,
        "meminfo": procfs.parse_meminfo(meminfo_text),
        "meminfo_unit": "bytes",
        "psi": None if psi_text is None else procfs.parse_psi(psi_text),
        "swaps": [] if swaps_text is None else procfs.parse_swaps(swaps_text),
        "netstat": netstat,
        "diskstats": None if diskstats_text is None else _busy_devices(diskstats_text),
    }


def _busy_devices(text: str) -> dict[str, dict[str, int]]:
    return {
        name: fields
        for name, fields in procfs.parse_diskstats(text).items()
        if fields["reads"] or fields["writes"]
    }


def _diskstats_delta(first: dict[str, Any], last: dict[str, Any]) -> dict[str, Any] | None:
    d0, d1 = first.get("diskstats"), last.get("diskstats")
    if d0 is None or d1 is None:
        return None
    out: dict[str, dict[str, int]] = {}
    for name, now in d1.items():
        before = d0.get(name, {})  # left out of the first sample: it had done no I/O yet
        out[name] = {
            key: value - before.get(key, 0) for key, value in now.items() if key != "in_flight"
        }
    return out


def _psi_totals(sample: dict[str, Any]) -> dict[str, int] | None:
    psi = sample.get("psi")
    if not psi:
        return None
    out: dict[str, int] = {}
    for kind in ("some", "full"):
        total = psi.get(kind, {}).get("total")
        if total is not None:
            out[f"{kind}_total_us"] = int(total)
    return out


def summarize(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Delta and rates between the first and the last sample.

    Only the first and last samples are used, so a long run may keep just those two.

    Returns a dict with:

    - ``vmstat_delta``: ``last - first`` for every vmstat field present in both samples
      (gauges included: for ``nr_*`` fields it is the change in level).
    - ``rates``: ``delta / interval_s`` per second, for event counters only
      (:func:`is_counter`); empty when ``interval_s`` is 0.
    - ``absent``: sorted names missing from either sample: vmstat fields present in only
      one of them, every :data:`KEY_FIELDS` name missing from either, and ``"psi"`` /
      ``"netstat.PFMemallocDrop"`` when those sources are missing.  Absent fields have no
      delta and no rate; they are never reported as 0.
    - ``interval_s``: ``t_mono`` of the last minus the first sample.
    - ``samples``: how many samples were given.
    - ``first_seq``/``last_seq``: their ``seq`` numbers.
    - ``pgscan_direct_throttle``: its delta, or ``None`` when absent.
    - ``psi_delta``: ``{"some_total_us", "full_total_us"}`` deltas, or ``None``.
    - ``netstat_delta``: ``{"PFMemallocDrop": delta}``, or ``None``.
    - ``diskstats_delta``: ``{device: {field: last - first}}`` for every device in the last
      sample's ``diskstats`` (``in_flight``, a level, is left out), or ``None`` when either
      sample has no diskstats (``"diskstats"`` is then in ``absent``).
    - ``meminfo_last``: the last sample's meminfo (bytes).
    - ``swap_used_bytes_max``: the larger of the first and last total swap use.

    Raises:
        ValueError: no samples.
    """
    if not samples:
        raise ValueError("summarize() needs at least one sample")
    first, last = samples[0], samples[-1]
    interval = float(last["t_mono"]) - float(first["t_mono"])
    v0: dict[str, int] = first["vmstat"]
    v1: dict[str, int] = last["vmstat"]
    delta = {name: v1[name] - v0[name] for name in v1 if name in v0}
    rates: dict[str, float] = {}
    if interval > 0:
        rates = {name: value / interval for name, value in delta.items() if is_counter(name)}
    absent = set(v0).symmetric_difference(v1)
    absent.update(name for name in KEY_FIELDS if name not in v0 or name not in v1)

    psi0, psi1 = _psi_totals(first), _psi_totals(last)
    psi_delta = None
    if psi0 is not None and psi1 is not None:
        psi_delta = {k: psi1[k] - psi0[k] for k in psi1 if k in psi0}
    else:
        absent.add("psi")

    n0, n1 = first.get("netstat"), last.get("netstat")
    netstat_delta = None
    if n0 and n1 and "PFMemallocDrop" in n0 and "PFMemallocDrop" in n1:
        netstat_delta = {"PFMemallocDrop": n1["PFMemallocDrop"] - n0["PFMemallocDrop"]}
    else:
        absent.add("netstat.PFMemallocDrop")

    diskstats_delta = _diskstats_delta(first, last)
    if diskstats_delta is None:
        absent.add("diskstats")

    def swap_used(sample: dict[str, Any]) -> int:
        return sum(int(area["used_bytes"]) for area in sample.get("swaps") or [])

    return {
        "vmstat_delta": delta,
        "rates": rates,
        "absent": sorted(absent),
        "interval_s": interval,
        "samples": len(samples),
        "first_seq": first.get("seq"),
        "last_seq": last.get("seq"),
        "pgscan_direct_throttle": delta.get("pgscan_direct_throttle"),
        "psi_delta": psi_delta,
        "netstat_delta": netstat_delta,
        "diskstats_delta": diskstats_delta,
        "meminfo_last": last.get("meminfo"),
        "swap_used_bytes_max": max(swap_used(first), swap_used(last)),
    }


# --------------------------------------------------------------------------- CLI


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The collector's argument parser."""
    parser = argparse.ArgumentParser(
        prog="swapnbd-vmstat",
        description=(
            "Sample /proc/vmstat, /proc/meminfo, /proc/pressure/memory, /proc/swaps and "
            "TcpExt PFMemallocDrop, one flushed JSON line per sample.  SIGTERM/SIGINT write "
            "a final sample and exit 0.  Exit codes: 0 ok, 1 read/write failure, 2 usage."
        ),
        epilog=(
            "examples:\n"
            "  python3 -m stress.vmstat --out /dev/virtio-ports/swapnbd.samples --mlock\n"
            "  python3 -m stress.vmstat --out samples.jsonl --interval 0.5 --count 10\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out",
        default="-",
        metavar="PATH",
        help="file, FIFO/pipe or character device ('-' = stdout, the default)",
    )
    parser.add_argument(
        "--interval", type=_positive_float, default=1.0, help="seconds between samples (1)"
    )
    stop = parser.add_mutually_exclusive_group()
    stop.add_argument("--count", type=_positive_int, help="stop after N samples")
    stop.add_argument("--duration", type=_positive_float, help="stop after S seconds")
    parser.add_argument(
        "--summary", metavar="PATH", help="at exit, write summarize() of the run here as JSON"
    )
    parser.add_argument(
        "--mlock", action="store_true", help="mlockall() so sampling continues under thrashing"
    )
    parser.add_argument("--proc-root", default=procfs.PROC, help=argparse.SUPPRESS)
    return parser


class _Stopper:
    """SIGTERM/SIGINT wake the sleep through a self-pipe (``signal.set_wakeup_fd``)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._old_wakeup = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._old = {
            sig: signal.signal(sig, self._handler) for sig in (signal.SIGTERM, signal.SIGINT)
        }

    def _handler(self, signum: int, _frame: object) -> None:
        self.signal_name = signal.Signals(signum).name

    def sleep_until(self, t_mono: float) -> None:
        """Sleep until ``t_mono`` or until a stop signal arrives."""
        while self.signal_name is None:
            remaining = t_mono - time.monotonic()
            if remaining <= 0:
                return
            ready, _, _ = select.select([self._r], [], [], remaining)
            if ready:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._r, 512):
                        pass

    def close(self) -> None:
        signal.set_wakeup_fd(self._old_wakeup)
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        os.close(self._r)
        os.close(self._w)


def _write_summary(path: str, summary: dict[str, Any]) -> None:
    text = json.dumps({"type": "summary", **summary}, indent=2) + "\n"
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Entry point (``swapnbd-vmstat``); returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.mlock:
        problem = mlockall()
        if problem is not None:
            print(f"swapnbd-vmstat: warning: {problem}; sampling unlocked", file=sys.stderr)
    stopper = _Stopper()
    first: dict[str, Any] | None = None
    last: dict[str, Any] | None = None
    try:
        with LineWriter(args.out) as out:
            start = time.monotonic()
            seq = 0
            while True:
                due = start + seq * args.interval
                is_last = args.count is not None and seq + 1 >= args.count
                if args.duration is not None and due >= start + args.duration:
                    due = start + args.duration
                    is_last = True
                if seq:
                    stopper.sleep_until(due)
                if stopper.signal_name is not None:
                    is_last = True
                sample = take_sample(seq, args.proc_root, final=is_last)
                out.write_json(sample)
                if first is None:
                    first = sample
                last = sample
                seq += 1
                if is_last:
                    break
    except (LineOutError, CollectorError, procfs.ProcFormatError) as exc:
        print(f"swapnbd-vmstat: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        stopper.close()
    if args.summary is not None and first is not None and last is not None:
        _write_summary(args.summary, summarize([first, last]))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
