"""Fixtures for the backend tests: every backend flavour, opened on real storage.

``export`` is parametrized over the flavours below; each one is the real thing, set up
here and torn down afterwards:

- ``file-ext4``: a file on a freshly made, loop-mounted ext4: punch hole, zero range,
  SEEK_DATA and FIEMAP all work, whatever filesystem /tmp is.
- ``file-tmpfs``: a file in /dev/shm: punch hole and SEEK_DATA, but no ZERO_RANGE, so
  NO_HOLE zeroing takes the write-zeroes path.
- ``file-ramfs``: a file on a freshly mounted ramfs: no fallocate at all and no holes, so
  every fallback path runs.
- ``blockdev``: a loop device over a file on that ext4: a real block device (512-byte
  sectors, size from lseek(SEEK_END), punch/zero-range by sector, hardware write-zeroes).
- ``memory``: the memfd RAM disk.
- ``cow``: nbdserver.backends.cow over a file in /dev/shm (the base must stay untouched).

Mounts and loop devices need root (mount, losetup); without it those tests fail and say so.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import EXPORT_SIZE, FLAVOURS, Export, ExportFactory, ext4_filesystem, mounted


@pytest.fixture(scope="session")
def ramfs_dir() -> Iterator[Path]:
    with mounted("ramfs") as where:
        yield where


@pytest.fixture(scope="session")
def ext4_dir() -> Iterator[Path]:
    with ext4_filesystem() as where:
        yield where


@pytest.fixture
def ext4_tmp(ext4_dir: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory on the test ext4 (for tests that need real holes and FIEMAP)."""
    where = ext4_dir / re.sub(r"\W", "_", request.node.name)
    where.mkdir()
    try:
        yield where
    finally:
        shutil.rmtree(where)


@pytest.fixture(params=list(FLAVOURS))
def factory(request: pytest.FixtureRequest) -> ExportFactory:
    flavour = FLAVOURS[request.param]
    ramfs: Path | None = None
    ext4: Path | None = None
    if flavour.name == "file-ramfs":
        ramfs = request.getfixturevalue("ramfs_dir")
    if flavour.name in ("file-ext4", "blockdev"):
        ext4 = request.getfixturevalue("ext4_dir")
    return ExportFactory(flavour, ramfs, ext4)


@pytest.fixture
def export(factory: ExportFactory) -> Iterator[Export]:
    with factory.open(EXPORT_SIZE) as opened:
        yield opened
