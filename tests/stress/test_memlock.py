"""The guest tools' mlockall: locked, but only what they touch (MCL_ONFAULT)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, re, sys
from stress.memlock import mlockall
problem = mlockall(on_fault=sys.argv[1] == "1")
status = open("/proc/self/status").read()
kb = lambda name: int(re.search(name + r":\\s+(\\d+)", status).group(1))
print(json.dumps({"problem": problem, "rss_kb": kb("VmRSS"), "locked_kb": kb("VmLck")}))
"""


def locked(on_fault: bool) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, "1" if on_fault else "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, int] = json.loads(done.stdout)
    return result


def test_on_fault_locks_without_pulling_every_mapping_into_ram() -> None:
    plain, lazy = locked(on_fault=False), locked(on_fault=True)
    if plain["problem"]:
        pytest.fail(f"mlockall needs root or CAP_IPC_LOCK here: {plain['problem']}")
    assert lazy["problem"] is None
    # Both lock every mapping (VmLck counts locked areas, touched or not) ...
    assert lazy["locked_kb"] > 0 and plain["locked_kb"] > 0
    # ... but only the plain lock populates them: resident memory the guest loses.
    assert plain["rss_kb"] >= plain["locked_kb"] * 0.95
    assert lazy["rss_kb"] < plain["rss_kb"] - 1024, (lazy, plain)
