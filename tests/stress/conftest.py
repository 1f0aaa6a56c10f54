"""Shared helpers for the guest-tool tests (swapstress, the vmstat collector).

The tools run as ``python -m stress.<tool>`` with ``PYTHONPATH`` pointing at the directory
that holds the ``stress`` package, exactly as the guest runs them from /opt/swapnbd.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# Safety net only: a hung tool fails the test instead of hanging the suite.
RUN_TIMEOUT_S = 120.0


def tool_env(extra: dict[str, str] | None = None, *, pythonpath: Path = REPO) -> dict[str, str]:
    """Environment for a guest tool: the package on PYTHONPATH, nothing else special."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWAPSTRESS_")}
    env["PYTHONPATH"] = str(pythonpath)
    if extra:
        env.update(extra)
    return env


def tool_argv(module: str, *args: str, python: str = sys.executable) -> list[str]:
    return [python, "-m", f"stress.{module}", *args]


def run_tool(
    module: str,
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    python: str = sys.executable,
) -> subprocess.CompletedProcess[str]:
    """Run a guest tool to completion and capture its output."""
    return subprocess.run(
        tool_argv(module, *args, python=python),
        cwd=cwd,
        env=env or tool_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def kernel_root(kernel: str, snap: str) -> Path:
    """A recorded /proc tree: ``kernel`` in {linux-6.1, linux-6.12}, ``snap`` in {t0, t1}."""
    root = FIXTURES / kernel / snap
    assert (root / "vmstat").is_file(), f"missing fixture {root}; run fixtures/make_fixtures.py"
    return root


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc/PID/task/TID/children)."""
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as handle:
            out.extend(int(x) for x in handle.read().split())
    return out


class LineStream:
    """Read JSON lines from a FIFO/pipe descriptor as they arrive (blocking reads)."""

    def __init__(self, fd: int) -> None:
        self._file = os.fdopen(fd, "r", buffering=1)

    def next(self) -> dict[str, Any] | None:
        line = self._file.readline()
        if not line:
            return None
        obj: dict[str, Any] = json.loads(line)
        return obj

    def rest(self) -> list[dict[str, Any]]:
        out = []
        while (obj := self.next()) is not None:
            out.append(obj)
        return out

    def close(self) -> None:
        self._file.close()


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "stream.fifo"
    os.mkfifo(path)
    yield path


@pytest.fixture
def proc_children() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; any still running at teardown are killed and reaped."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=RUN_TIMEOUT_S)  # reaps and closes the pipes
