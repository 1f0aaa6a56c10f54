"""A bounded atheris run over the sans-IO core (tests/fuzz/core_harness.py).

libFuzzer exits non-zero on the first exception or broken invariant and prints the
input; ``SWAPNBD_ATHERIS_RUNS`` runs longer. The run is a subprocess because
``atheris.Fuzz()`` never returns.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from .report import RESULTS

HARNESS = Path(__file__).with_name("core_harness.py")
RUNS = int(os.environ.get("SWAPNBD_ATHERIS_RUNS", "5000"))


def test_core_never_raises_on_any_bytes(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(HARNESS),
            f"-runs={RUNS}",
            "-seed=11",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, f"atheris found a failing input:\n{proc.stderr[-4000:]}"
    done = re.search(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)", proc.stderr)
    assert done, proc.stderr[-2000:]
    runs, cov, features, corpus = (int(g) for g in done.groups())
    assert runs == RUNS
    took = re.search(r"Done \d+ runs in (\d+) second", proc.stderr)
    RESULTS.append(
        {
            "target": "atheris-core",
            "summary": f"fuzz atheris sans-IO core: {runs} runs in {took.group(1) if took else '?'}"
            f" s, cov {cov} edges, {features} features, corpus {corpus} inputs",
        }
    )
