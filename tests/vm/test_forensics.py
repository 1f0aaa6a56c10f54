"""What the host sees of the NBD server at a look: a real process on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from vm.run import forensics

SLEEPER = """
import socket, sys, time
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
if sys.argv[1] == "read":
    while conn.recv(65536):
        pass
time.sleep(600)
"""


@pytest.fixture(params=["read", "ignore"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[subprocess.Popen[str], int, str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SLEEPER, request.param], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    try:
        yield proc, port, request.param
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_the_probe_tells_a_reading_server_from_a_deaf_stopped_or_dead_one(
    server: tuple[subprocess.Popen[str], int, str],
) -> None:
    proc, port, mode = server
    probe = forensics.server_probe(proc.pid, port, gap_s=0.3)
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(b"x" * 5000)
        if mode == "read":
            deadline = time.monotonic() + 10  # the reader may be slow to run on a busy host
            while forensics.socket_queues(port) != (0, 0):
                assert time.monotonic() < deadline, forensics.socket_queues(port)
                time.sleep(0.05)
            assert probe() is None
        else:
            time.sleep(0.3)
            assert forensics.socket_queues(port) == (0, 5000)
            assert probe() == {
                "unresponsive": "is not reading its socket (5000 bytes unread for 0.3s)",
                "definitive": False,
            }
        os.kill(proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while (found := probe()) is None or not found["definitive"]:
            assert time.monotonic() < deadline, found
            time.sleep(0.05)
        assert found == {
            "unresponsive": f"is stopped (pid {proc.pid}, state T): it reads nothing",
            "definitive": True,
        }
        proc.kill()
        proc.wait()
        assert probe() == {
            "unresponsive": f"has exited (pid {proc.pid} is gone)",
            "definitive": True,
        }


def test_pressure_reads_the_parsed_memory_once_parsed() -> None:
    """The verdict's pressure comes from kernel_evidence's memory entry, not a re-parse."""
    import gzip
    from pathlib import Path

    from vm.run import evidence, watchdog

    data = Path(__file__).parent / "data" / "sysrq" / "6.1.192-vanilla.console.gz"
    memory = evidence.snapshots(gzip.decompress(data.read_bytes()).decode())[0].memory
    assert memory is not None
    st = watchdog.WatchState(started=0.0, last_activity=0.0)
    for t, out in ((1.0, 0), (2.0, 621)):
        st.observe({"type": "sample", "vmstat": {"pswpout": out}}, t, stream="samples")
    assert forensics.pressure(st, memory.as_dict()) == watchdog.Pressure(
        pswpout=621,
        swap_used_kb=17920,
        below_high=("DMA free 2276 kB < high 2392 kB", "DMA32 free 3228 kB < high 3860 kB"),
    )
    assert forensics.pressure(st, None) == watchdog.Pressure(pswpout=621)


def test_pressure_takes_swap_in_use_when_the_zones_were_not_parsed() -> None:
    """Swap in use proves swap-out began even when no zone line was understood: the
    pressure is met, and the zones are reported unknown, not as "above high"."""
    from vm.run import watchdog

    st = watchdog.WatchState(started=0.0, last_activity=0.0)
    st.observe({"type": "sample", "vmstat": {"pswpout": 0}}, 1.0, stream="samples")
    memory = {"zones": [], "below_high": [], "swap_used_kb": 7168, "writeback_pages": 1649}
    got = forensics.pressure(st, memory)
    assert got == watchdog.Pressure(pswpout=0, swap_used_kb=7168, below_high=None)
    assert got.met
    assert (
        got.text() == "pswpout 0, swap used 7168 kB, zone watermarks not seen (no zone lines in it)"
    )
