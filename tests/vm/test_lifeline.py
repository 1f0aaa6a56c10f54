"""peers.lifeline: every server dies with the process that launched it, even on SIGKILL.

Issue 9 §4: a SIGKILLed harness used to leave QEMU and nbd-serve spinning at full CPU.
Each test launches a real server from a throwaway parent process, SIGKILLs that parent
and checks that the server's whole process tree is gone.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from peers import lifeline, servers

LAUNCHER = """
import json, sys, time
from pathlib import Path
from peers import servers
server = servers.launch_server(sys.argv[1], 64 * 1024 * 1024, Path(sys.argv[2]))
print(json.dumps({"pid": server.pid, "guard": server.guard.pid if server.guard else None}),
      flush=True)
time.sleep(600)
"""


def alive(pids: list[int]) -> list[int]:
    left = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
    return left


def wait_gone(pids: list[int], within_s: float) -> list[int]:
    deadline = time.monotonic() + within_s
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive(pids)


@pytest.mark.parametrize("kind", servers.SERVER_KINDS)
def test_server_dies_when_its_launcher_is_sigkilled(tmp_path: Path, kind: str) -> None:
    servers.require_tool("nbdinfo")
    if kind != "nbd-serve":
        servers.require_tool(kind)
    parent = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, kind, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert parent.stdout is not None
    tree: list[int] = []
    try:
        line = parent.stdout.readline()
        assert line, f"the launcher exited {parent.wait()} before starting {kind}"
        info = json.loads(line)
        root = psutil.Process(info["pid"])
        tree = [root.pid, *(p.pid for p in root.children(recursive=True))]
        if info["guard"] is not None:
            tree.append(info["guard"])
        assert (info["guard"] is not None) == (kind == "nbd-server")  # only the daemon
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert wait_gone(tree, 15.0) == [], f"{kind} outlived its launcher"
    finally:
        parent.stdout.close()
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in alive(tree):
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


def test_guard_leaves_before_its_process_when_the_process_ends_first() -> None:
    sleeper = subprocess.Popen(["sleep", "30"], start_new_session=True)
    guard = lifeline.guard([sleeper.pid])
    try:
        time.sleep(0.5)
        assert guard.poll() is None  # watching
        sleeper.kill()
        sleeper.wait()
        assert guard.wait(timeout=10) == 0  # nothing left to guard: it leaves by itself
    finally:
        for proc in (sleeper, guard):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_parent_death_signal_only_from_the_main_thread() -> None:
    import threading

    assert lifeline.parent_death_signal() is not None
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(lifeline.parent_death_signal()))
    t.start()
    t.join()
    assert got == [None]


def test_lifeline_usage_error() -> None:
    assert lifeline.main(["x"]) == 2
