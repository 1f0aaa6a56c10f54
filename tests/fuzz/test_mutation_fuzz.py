"""Raw-socket mutation fuzzing of nbd-serve over valid sessions (see runner.py).

CI runs a bounded number of cases: 1000 per event loop in-process and 250 against
``nbd-serve --workers 2``, about 15 s of CPU in all, so the suite stays near a minute on
a loaded 2-core machine. ``SWAPNBD_FUZZ_CASES`` (and ``SWAPNBD_FUZZ_SEED``) or
``python -m tests.fuzz`` run longer.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from server.conftest import LOOPS

from .paths import measured
from .report import record
from .runner import run
from .targets import in_process, subprocess_server

CASES = int(os.environ.get("SWAPNBD_FUZZ_CASES", "1000"))
SEED = int(os.environ.get("SWAPNBD_FUZZ_SEED", "11"))


@pytest.mark.parametrize("loop", list(LOOPS))
def test_in_process_server_survives_mutated_sessions(loop: str, tmp_path: Path) -> None:
    with measured() as paths, in_process(tmp_path, LOOPS[loop]) as target:
        stats = run(target, SEED, CASES)
    entry = record(f"in-process-{loop}", stats, paths, tmp_path)
    print(entry)
    assert stats.cases == CASES
    # Both kinds of case ran, and well-framed ones were answered.
    assert 0 < stats.well_framed < CASES
    assert stats.requests_answered > stats.well_framed
    assert paths.arcs > 0


def test_nbd_serve_with_workers_survives_mutated_sessions(tmp_path: Path) -> None:
    cases = max(1, CASES // 4)
    with subprocess_server(tmp_path, workers=2) as target:
        assert target.workers == 1, "nbd-serve --workers 2 should fork one worker"
        stats = run(target, SEED + 1, cases)
        assert target.alive()
    entry = record("nbd-serve-workers-2", stats, None, tmp_path)
    print(entry)
    assert stats.cases == cases
    assert stats.requests_answered > 0
