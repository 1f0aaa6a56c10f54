"""What the host sees of the NBD server at a look: a real process on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from server.nbdtest import RawClient, running_server

from nbdserver.protocol import Cmd
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


@pytest.mark.parametrize("workers", ["1", "2"])  # one process; a parent and its workers
def test_the_probe_tells_a_server_waiting_for_the_rest_of_a_request_from_a_deaf_one(
    tmp_path: Path, workers: str
) -> None:
    """A vanilla guest's sender stuck mid-WRITE leaves bytes unread under nbd-serve's wake
    mark: the stats line says the server waits for the rest, so it is not unresponsive.
    Without the stats the same socket reads as a server that stopped reading."""
    stats = tmp_path / "stats.jsonl"
    args = ("--memory", "1M", "--workers", workers, "--stats", str(stats))
    args += ("--stats-interval", "0.2")
    with running_server(tmp_path, *args) as srv, RawClient(srv.port) as client:
        client.go()
        length = 64 * 1024
        client.request(Cmd.WRITE, 0, length, cookie=7)
        client.send(b"a" * 8192)
        time.sleep(0.3)
        client.send(b"b" * 8192)  # below the mark the first bytes set: stays unread
        sent = 16384
        # However the server took the first bytes (the header alone, or with the first
        # part), what it waits for and what stays unread on its socket add up.
        deadline = time.monotonic() + 10
        while True:
            unsent, unread = forensics.socket_queues(srv.port)
            receiving = (forensics.last_stats_line(stats) or {}).get("receiving")
            expected = {"partial": 1, "missing_bytes": length - sent + unread}
            if unsent == 0 and unread >= 8192 and receiving == expected:
                break
            assert time.monotonic() < deadline, (unsent, unread, receiving)
            time.sleep(0.05)
        assert forensics.awaits_the_rest(stats, unread)
        assert forensics.server_probe(srv.proc.pid, srv.port, gap_s=0.3, stats_path=stats)() is None
        assert forensics.server_probe(srv.proc.pid, srv.port, gap_s=0.3)() == {
            "unresponsive": f"is not reading its socket ({unread} bytes unread for 0.3s)",
            "definitive": False,
        }
        client.send(b"c" * (length - sent))
        reply = client.reply()
        assert not isinstance(reply, list) or reply[-1].flags  # answered: it was waiting
        deadline = time.monotonic() + 10
        while (forensics.last_stats_line(stats) or {}).get("receiving") != {
            "partial": 0,
            "missing_bytes": 0,
        }:
            assert time.monotonic() < deadline, forensics.last_stats_line(stats)
            time.sleep(0.05)
        assert not forensics.awaits_the_rest(stats, 0)


def test_a_stale_or_missing_stats_line_says_nothing(tmp_path: Path) -> None:
    stats = tmp_path / "stats.jsonl"
    assert not forensics.awaits_the_rest(stats, 10)  # no file
    assert not forensics.awaits_the_rest(None, 10)
    line = {"t_wall": time.time() - 60, "receiving": {"partial": 1, "missing_bytes": 4096}}
    stats.write_text(json.dumps(line) + "\n")
    assert not forensics.awaits_the_rest(stats, 10)  # a minute old
    line["t_wall"] = time.time()
    stats.write_text(json.dumps(line) + "\n" + '{"t_wall": 1, "truncat')
    assert forensics.awaits_the_rest(stats, 10)  # the torn last line is passed over
    assert not forensics.awaits_the_rest(stats, 4096)  # the unread bytes complete it
