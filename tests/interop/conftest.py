"""Interop fixtures: the real ``nbd-serve`` process on port 0 (see tests/server/nbdtest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from server.nbdtest import ServerProcess, running_server


@pytest.fixture
def memory_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A 256 MiB RAM disk as the default export, with statistics every 0.1 s."""
    stats = tmp_path / "stats.jsonl"
    with running_server(
        tmp_path,
        "--memory",
        "256M",
        "--description",
        "interop disk",
        "--stats",
        str(stats),
        "--stats-interval",
        "0.1",
    ) as srv:
        srv.stats_path = stats
        yield srv


@pytest.fixture(params=["memory", "file"])
def export_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerProcess]:
    """A 256 MiB default export, once as a RAM disk and once as a sparse file (whose
    FLUSH, FUA, TRIM and zeroing run in the thread pool)."""
    if request.param == "memory":
        args = ["--memory", "256M"]
    else:
        image = tmp_path / "export.img"
        with image.open("wb") as fh:
            fh.truncate(256 << 20)
        args = [str(image)]
    with running_server(tmp_path, *args) as srv:
        yield srv


@pytest.fixture
def multi_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """Three exports from a TOML config: memory, file, and a read-only file."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"\x5a" * 65536)
    with image.open("r+b") as fh:
        fh.truncate(32 << 20)
    config = tmp_path / "exports.toml"
    config.write_text(
        f"""
bind = "127.0.0.1"
port = 0
[[exports]]
name = "ram"
description = "RAM disk"
backend = "memory"
size = "64M"
[[exports]]
name = "disk"
description = "a sparse file"
backend = "file"
path = "{image}"
[[exports]]
name = "golden"
backend = "file"
path = "{image}"
read_only = true
"""
    )
    with running_server(tmp_path, "--config", str(config)) as srv:
        srv.extra["image"] = image
        yield srv
