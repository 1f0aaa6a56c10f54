"""Long mutation-fuzzing runs outside CI, from the repository root::

    python -m tests.fuzz --cases 200000                 # in-process, uvloop
    python -m tests.fuzz --cases 50000 --loop asyncio --seed 7
    python -m tests.fuzz --nbd-serve --workers 2 --cases 50000
    python -m tests.fuzz --seed 11 --first 1001 --cases 1   # replay one failing case

It prints the figures (cases/s, distinct arcs in nbdserver/) and exits 1 on a failure,
naming the seed and case index that replay it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: server.*, fuzz.*

from server.conftest import LOOPS

from fuzz.paths import measured
from fuzz.report import record, summary_lines
from fuzz.runner import CaseFailed, run
from fuzz.targets import in_process, subprocess_server


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    parser.add_argument("--cases", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--first", type=int, default=0, help="index of the first case")
    parser.add_argument("--loop", choices=list(LOOPS), default="uvloop")
    parser.add_argument("--nbd-serve", action="store_true", help="attack the real nbd-serve")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="swapnbd-fuzz-"))
    try:
        if args.nbd_serve:
            with subprocess_server(directory, args.workers) as target:
                stats = run(target, args.seed, args.cases, args.first)
            entry = record(f"nbd-serve-workers-{args.workers}", stats, None, directory)
        else:
            with measured() as paths, in_process(directory, LOOPS[args.loop]) as target:
                stats = run(target, args.seed, args.cases, args.first)
            entry = record(f"in-process-{args.loop}", stats, paths, directory)
    except CaseFailed as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    print("\n".join(summary_lines()))
    print(json.dumps(entry))
    return 0


if __name__ == "__main__":
    sys.exit(main())
