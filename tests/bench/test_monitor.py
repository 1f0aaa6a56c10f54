"""CPU and RSS accounting against a real child process tree."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from bench.monitor import RssSampler, cpu_clock, steal_share, tree_cpu_seconds, tree_rss
from bench.workloads import MIB

# A parent that forks a child holding 64 MiB and burning CPU until stdin closes.
CHILD = """
import os, sys, time
if os.fork() == 0:
    block = bytearray(64 * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    # Burn CPU as the kernel accounts it for /proc/PID/stat (os.times reads the same
    # tick-based utime+stime psutil reports): load cannot shorten it, and rounding
    # cannot leave the reading below the floor (process_time, which is finer, could).
    while sum(os.times()[:2]) < 0.3:
        pass
    print("ready", flush=True)
    sys.stdin.read()
    os._exit(0)
os.wait()
"""


def test_sampler_sees_a_child_and_cpu_counts_it() -> None:
    sampler = RssSampler(interval=0.01)
    with subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        try:
            parent = psutil.Process(proc.pid)
            sampler.watch(parent, "tree")
            assert proc.stdout.readline() == "ready\n"
            time.sleep(0.05)  # at least one sample while the child holds its memory
            assert tree_rss(parent) >= 64 * MIB
            assert tree_cpu_seconds(parent) >= 0.3
            peak = sampler.stop()
        finally:
            proc.stdin.close()
            proc.wait(timeout=10)
            sampler.close()
    assert peak >= 64 * MIB
    assert sampler.overall == {"tree": peak}


def test_sampler_rejects_bad_interval() -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        RssSampler(interval=0)


def test_the_cpu_clock_reads_this_machine_and_steal_is_a_share_of_it() -> None:
    before = cpu_clock()
    time.sleep(0.2)
    after = cpu_clock()
    # Every CPU's time advances: about 0.2 s each (the clock ticks at USER_HZ, 10 ms).
    assert after[1] - before[1] >= 0.1 * (psutil.cpu_count() or 1)
    assert 0.0 <= after[0] - before[0] <= after[1] - before[1]
    assert 0.0 <= steal_share(before, after) <= 1.0
    assert steal_share((1.0, 100.0), (3.0, 200.0)) == pytest.approx(0.02)
    assert steal_share((1.0, 100.0), (1.0, 100.0)) == 0.0  # no time passed: nothing stolen
