"""Real --smoke runs of the benchmark: real servers and fio on loopback.

Figures are not judged (speed lives in the benchmark, not in tests); what is checked is
that every server produced parsed, non-zero figures, that the report has a row per
server and workload, and that every server the run started is gone afterwards.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from bench.workloads import WORKLOADS_BY_NAME

REPO = Path(__file__).resolve().parents[2]
SMOKE_WORKLOADS = ("rand-read-4k-qd32", "unix-rand-write-4k-qd32")

pytestmark = pytest.mark.interop


def run_smoke(servers: list[str], out: Path, *extra: str) -> tuple[dict[str, Any], str, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--servers", ",".join(servers),
         "--out", str(out), "--name", "smoke", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stderr}"
    doc = json.loads((out / "smoke.json").read_text())
    md = (out / "smoke.md").read_text()
    return doc, md, proc.stderr


def check_run(servers: list[str], doc: dict[str, Any], md: str, stderr: str) -> None:
    cells = doc["cells"]
    assert sorted((c["server"], c["workload"]) for c in cells) == sorted(
        (s, w) for s in servers for w in SMOKE_WORKLOADS
    )
    for c in cells:
        assert c["iops"] > 0, c
        assert c["mib_per_s"] > 0, c
        assert c["bytes_moved"] > 0, c
        assert c["rss_peak"] > 0, c
    lines = md.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| Workload | Server |"))
    end = lines.index("", head)
    rows = lines[head + 2 : end]
    assert len(rows) == len(servers) * len(SMOKE_WORKLOADS)
    for w in SMOKE_WORKLOADS:
        desc = WORKLOADS_BY_NAME[w].description
        got = sorted(r.split(" | ")[1] for r in rows if r.startswith(f"| {desc} |"))
        assert got == sorted(servers), (w, rows)
    # Every server started on its own endpoint and is gone now.
    started = re.findall(r"^started (\S+) \((tcp|unix)\) pid (\d+) at (\S+)$", stderr, re.M)
    assert sorted((s, t) for s, t, _, _ in started) == sorted(
        (s, t) for s in servers for t in ("tcp", "unix")
    )
    rss = re.findall(r"^\[rss\] \S+ (\S+) +(tcp) pid (\d+) at (\S+): fresh", stderr, re.M)
    assert [s for s, *_ in rss] == (servers if doc["rss"] else [])
    started += rss
    for _s, t, pid, uri in started:
        if t == "tcp":
            assert re.fullmatch(r"nbd://127\.0\.0\.1:\d+/bench-\S+", uri), uri
        assert not psutil.pid_exists(int(pid)) or psutil.Process(int(pid)).status() == (
            psutil.STATUS_ZOMBIE
        ), f"server pid {pid} still running"
    assert len({uri for *_, uri in started}) == len(started)


def test_smoke_nbd_serve_beside_nbdkit(tmp_path: Path) -> None:
    servers = ["nbd-serve", "nbdkit"]
    doc, md, stderr = run_smoke(servers, tmp_path, "--rss")
    check_run(servers, doc, md, stderr)
    assert [r["server"] for r in doc["rss"]] == servers
    assert all(r["rss_peak"] > 0 and r["bytes_moved"] > 0 for r in doc["rss"])
    assert "## Peak RSS under write load" in md
    nbdkit = [s for s in doc["summary"] if s["server"] == "nbdkit"]
    assert all(s["ratio"] > 0 for s in nbdkit)
    assert "| vs nbd-serve |" in md


def test_smoke_peers(tmp_path: Path) -> None:
    servers = ["nbdkit", "qemu-nbd", "nbd-server"]
    doc, md, stderr = run_smoke(servers, tmp_path)
    check_run(servers, doc, md, stderr)
    assert doc["meta"]["baseline"] == "nbdkit"


def test_smoke_pinned(tmp_path: Path) -> None:
    """--pin: the same run, with the split recorded in the JSON and said in the report."""
    servers = ["nbd-serve", "nbdkit"]
    doc, md, stderr = run_smoke(servers, tmp_path, "--pin")
    check_run(servers, doc, md, stderr)
    cpus = sorted(os.sched_getaffinity(0))
    assert doc["meta"]["pin"] == {"fio": cpus[:1], "servers": cpus[1:]}
    servers_cpus = ",".join(map(str, cpus[1:]))
    assert f"fio pinned to CPU {cpus[0]}, every server to CPU {servers_cpus} (--pin)" in md
