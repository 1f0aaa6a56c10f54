"""Real clients through the fault proxy (tests/faults/proxy.py) to a real nbd-serve.

What must hold whatever the network does: every request is answered or its connection
closed (libnbd reports it failed; none stays pending, no hang), data acknowledged before
a reset is there afterwards, the server stays healthy (no crash in its log, every process
alive) and serves the next client, and a client run again after a failure succeeds.
"""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from server.nbdtest import ServerProcess, require_python3_libnbd, require_tool

from faults.libnbd_workload import pattern
from faults.proxy import Fault, FaultProxy
from faults.support import assert_healthy, fresh_roundtrip, read_direct

pytestmark = pytest.mark.interop

WORKLOAD = Path(__file__).with_name("libnbd_workload.py")
COUNT = 60
#: A client run that takes longer than this has hung (it never does when healthy).
HANG_S = 90


def run_workload(port: int, count: int = COUNT) -> dict[str, object]:
    python = require_python3_libnbd()
    done = subprocess.run(
        [python, str(WORKLOAD), f"nbd://127.0.0.1:{port}/", str(count)],
        capture_output=True,
        text=True,
        timeout=HANG_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def run_tool(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=HANG_S, check=False)


def only_first(fault: Fault) -> Callable[[int], Fault]:
    return lambda index: fault if index == 0 else Fault()


def check_acked_data(srv: ServerProcess, result: dict[str, object]) -> None:
    slot_size = int(result.get("slot", 256 * 1024))  # type: ignore[call-overload]
    for slot, length in result["acked"]:  # type: ignore[attr-defined]
        got = read_direct(srv, slot * slot_size, length)
        assert got == pattern(slot, length), f"acknowledged write to slot {slot} lost"


@pytest.mark.parametrize("seed", range(16))
def test_random_fault_every_request_answered_or_failed(
    memory_server: ServerProcess, seed: int
) -> None:
    rng = random.Random(seed)
    fault = Fault.random(rng, max_after=3 << 20)
    with FaultProxy(memory_server.port, only_first(fault)) as proxy:
        result = run_workload(proxy.port)
    (record,) = proxy.records
    assert result["pending"] == 0, result
    assert result["corrupt"] == [], result
    if fault.action in ("delay", "stall") or not record.fired:
        # Late or fragmented bytes lose nothing.
        assert result["error"] == "" and result["failed"] == [], (fault, result)
        assert len(result["acked"]) == COUNT, (fault, result)  # type: ignore[arg-type]
    elif not (fault.direction == "up" and len(result["acked"]) == COUNT):  # type: ignore[arg-type]
        # Cut or reset before the last request: the client must have been told.
        assert result["error"] or result["failed"], (fault, record, result)
    check_acked_data(memory_server, result)
    assert_healthy(memory_server, workers=2)
    fresh_roundtrip(memory_server)


@pytest.mark.parametrize("action", ["truncate", "reset"])
@pytest.mark.parametrize("direction", ["up", "down"])
@pytest.mark.parametrize("after", [0, 17, 150, 200_000, 2_000_000])
def test_cut_at_fixed_points(
    memory_server: ServerProcess, action: str, direction: str, after: int
) -> None:
    """Cuts in the greeting (0, 17), in the options (150), and in transmission."""
    fault = Fault(action=action, direction=direction, after=after)  # type: ignore[arg-type]
    with FaultProxy(memory_server.port, only_first(fault)) as proxy:
        result = run_workload(proxy.port)
    assert proxy.records[0].fired
    assert result["pending"] == 0 and result["corrupt"] == [], result
    assert result["error"] or result["failed"], result
    check_acked_data(memory_server, result)
    assert_healthy(memory_server, workers=2)
    # A new libnbd handle (a reconnection) through the same proxy works in full.
    with FaultProxy(memory_server.port, lambda index: Fault()) as proxy:
        again = run_workload(proxy.port, count=10)
    assert again["error"] == "" and len(again["acked"]) == 10, again  # type: ignore[arg-type]


def test_nbdcopy_reset_then_rerun(memory_server: ServerProcess, tmp_path: Path) -> None:
    """nbdcopy spreads the copy over several connections; every one of them is reset
    after 1 MiB up (8 MiB over at most 4 connections: at least one is cut). nbdcopy must
    fail and say so; run again through a healthy proxy it copies everything."""
    nbdcopy = require_tool("nbdcopy")
    source = tmp_path / "source.img"
    source.write_bytes(random.Random(7).randbytes(8 << 20))
    reset = Fault(action="reset", direction="up", after=1 << 20)
    with FaultProxy(memory_server.port, lambda index: reset) as proxy:
        first = run_tool(nbdcopy, str(source), f"nbd://127.0.0.1:{proxy.port}/")
    assert any(r.fired for r in proxy.records)
    assert first.returncode != 0, "nbdcopy did not notice the reset"
    assert first.stderr.strip(), "nbdcopy failed without saying why"
    with FaultProxy(memory_server.port, lambda index: Fault()) as proxy:
        second = run_tool(nbdcopy, str(source), f"nbd://127.0.0.1:{proxy.port}/")
    assert second.returncode == 0, second.stderr
    back = tmp_path / "back.img"
    subprocess.run(
        [nbdcopy, memory_server.uri(), str(back)], check=True, timeout=HANG_S, capture_output=True
    )
    assert back.read_bytes()[: 8 << 20] == source.read_bytes()
    assert_healthy(memory_server, workers=2)


def test_nbdinfo_cut_in_handshake_then_rerun(memory_server: ServerProcess) -> None:
    nbdinfo = require_tool("nbdinfo")
    fault = Fault(action="truncate", direction="down", after=10)
    with FaultProxy(memory_server.port, only_first(fault)) as proxy:
        uri = f"nbd://127.0.0.1:{proxy.port}/"
        first = run_tool(nbdinfo, "--size", uri)
        assert first.returncode != 0 and first.stderr.strip(), first
        second = run_tool(nbdinfo, "--size", uri)
    assert second.returncode == 0 and int(second.stdout) == 64 << 20, second
    assert_healthy(memory_server, workers=2)
