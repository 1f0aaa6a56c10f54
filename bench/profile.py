"""``python -m bench.profile``: where nbd-serve spends its CPU under one fio workload.

Starts nbd-serve on the usual /dev/shm file, puts a fio workload on it (default: random
4 KiB reads at QD32, the issue's hot path), and while the load is steady records it with
py-spy twice: once as collapsed stacks, summarized here as the functions with the most
*self* samples and the most *inclusive* samples, and once as a flame graph SVG.
py-spy drops samples of threads waiting in the kernel, so the percentages are shares of
the time nbd-serve was on a CPU.

py-spy is not a dependency of swapnbd: ``.venv/bin/pip install py-spy``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bench.runner import make_shared_file, run_fio
from bench.servers import (
    BenchError,
    ExportSpec,
    ServerError,
    ServerKind,
    ToolMissingError,
    require_tool,
    start_server,
    stop_server,
)
from bench.workloads import MIB, WORKLOADS, FioResult, select_workloads

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


@dataclass(frozen=True, slots=True)
class Hotspots:
    """Sample counts per function (``name (file)``), from collapsed stacks."""

    total: int
    self_counts: Counter[str]
    """Samples whose innermost Python frame is the function."""
    inclusive: Counter[str]
    """Samples with the function anywhere on the stack (counted once per sample)."""


def _frame_key(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if m is None:
        return frame.strip()
    path = m["file"]
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m['func']} ({path})"


def parse_collapsed(lines: Iterable[str]) -> Hotspots:
    """Parse py-spy's ``--format raw`` output (``frame;frame;... COUNT`` per line).

    Line numbers are dropped so one function is one key; process and thread prefixes
    (``process 12:"..."``, ``thread (0x..)``) are not functions and are skipped.

    Raises:
        ValueError: a non-empty line does not end in a sample count.
    """
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for raw in lines:
        line = raw.rstrip("\n")
        if not line.strip():
            continue
        m = _LINE.match(line)
        if m is None:
            raise ValueError(f"not a collapsed-stack line: {line[:120]!r}")
        count = int(m["count"])
        frames = [
            _frame_key(f)
            for f in m["stack"].split(";")
            if f and not f.startswith(("process ", "thread "))
        ]
        total += count
        if not frames:
            continue
        self_counts[frames[-1]] += count
        for key in set(frames):
            inclusive[key] += count
    return Hotspots(total, self_counts, inclusive)


def render_hotspots(h: Hotspots, *, top: int = 15) -> str:
    """Two Markdown tables: top functions by self and by inclusive samples."""
    if h.total == 0:
        return "no samples (was the server idle?)"
    out = [f"{h.total} samples on CPU.", "", "| self % | function |", "|---:|---|"]
    out += [f"| {100 * n / h.total:.1f} | `{k}` |" for k, n in h.self_counts.most_common(top)]
    out += ["", "| inclusive % | function |", "|---:|---|"]
    out += [f"| {100 * n / h.total:.1f} | `{k}` |" for k, n in h.inclusive.most_common(top)]
    return "\n".join(out)


def _py_spy(pid: int, *, seconds: float, rate: int, fmt: str, out: Path, native: bool) -> None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).is_file():
        raise ToolMissingError("py-spy not found; install it: .venv/bin/pip install py-spy")
    argv = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
            "--rate", str(rate), "--format", fmt, "--output", str(out),
            "--subprocesses"]  # fmt: skip
    if native:
        argv.append("--native")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if proc.returncode != 0:
        raise BenchError(f"py-spy failed ({proc.returncode}): {proc.stderr.strip()[-600:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description="Profile nbd-serve with py-spy under one fio workload.",
        epilog="example: python -m bench.profile --workload rand-read-4k-qd32 --seconds 8 "
        "--out /tmp/prof",
    )
    p.add_argument("--workload", default="rand-read-4k-qd32",
                   help=f"one of: {', '.join(w.name for w in WORKLOADS)}")  # fmt: skip
    p.add_argument("--seconds", type=float, default=8.0, help="length of each recording")
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--native", action="store_true", help="include C frames (slower)")
    p.add_argument("--out", type=Path, default=Path("."), help="directory for the outputs")
    p.add_argument("--top", type=int, default=15, help="rows per hotspot table")
    args = p.parse_args(argv)
    try:
        (workload,) = select_workloads(args.workload)
    except ValueError as exc:
        p.error(str(exc))
    if args.seconds < 1:
        p.error(f"--seconds must be >= 1, got {args.seconds}")
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "profile.collapsed.txt"
    svg = args.out / "profile.svg"
    try:
        fio = require_tool("fio")
        workdir = Path(tempfile.mkdtemp(prefix="swapnbd-profile-", dir="/dev/shm"))
        server = None
        try:
            size = 256 * MIB
            spec = ExportSpec(make_shared_file(workdir, size), size, workdir)
            server = start_server(ServerKind.NBD_SERVE, workload.transport, spec)
            uri = server.uri
            results: list[FioResult] = []
            errors: list[BaseException] = []

            def load() -> None:
                try:
                    results.append(
                        run_fio(fio, workload, uri, size=size,
                                runtime_s=2 * args.seconds + 2, ramp_s=1.0, workdir=workdir)
                    )  # fmt: skip
                except BaseException as exc:  # reported below, in the main thread
                    errors.append(exc)

            t = threading.Thread(target=load, name="fio")
            t.start()
            threading.Event().wait(1.5)  # connection set up, ramp under way
            _py_spy(server.pid, seconds=args.seconds, rate=args.rate, fmt="raw", out=raw,
                    native=args.native)  # fmt: skip
            _py_spy(server.pid, seconds=args.seconds, rate=args.rate, fmt="flamegraph",
                    out=svg, native=args.native)  # fmt: skip
            t.join()
            if errors:
                raise errors[0]
        finally:
            if server is not None:
                stop_server(server)
            shutil.rmtree(workdir, ignore_errors=True)
    except (BenchError, ServerError) as exc:
        print(f"bench.profile: error: {exc}", file=sys.stderr)
        return 1
    with raw.open() as f:
        hot = parse_collapsed(f)
    r = results[0]
    print(f"# nbd-serve profile: {workload.description}\n")
    print(f"fio during the recordings (py-spy slows the server): {r.iops:,.0f} IOPS, "
          f"{r.mib_per_s:.1f} MiB/s\n")  # fmt: skip
    print(render_hotspots(hot, top=args.top))
    print(f"\nwrote {raw} and {svg}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
