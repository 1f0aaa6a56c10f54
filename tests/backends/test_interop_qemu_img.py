"""Cross-check the file backend's allocation map against a real peer: ``qemu-img map``."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from nbdserver.backends import Extent, open_backend

pytestmark = pytest.mark.interop

SIZE = 4 << 20


def qemu_img_zero_ranges(path: Path) -> list[tuple[int, int]]:
    """Ranges qemu-img reports as reading zero without data (holes, unwritten), merged."""
    tool = shutil.which("qemu-img")
    if tool is None:
        pytest.fail("qemu-img not found; install qemu-utils (apt-get install qemu-utils)")
    proc = subprocess.run(
        [tool, "map", "--output=json", "-f", "raw", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    ranges: list[tuple[int, int]] = []
    for entry in json.loads(proc.stdout):
        if entry["data"]:
            continue
        assert entry["zero"], f"qemu-img: a non-data range that is not zero: {entry}"
        start, length = int(entry["start"]), int(entry["length"])
        if ranges and ranges[-1][0] + ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
        else:
            ranges.append((start, length))
    return ranges


def merged(extents: list[Extent]) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for e in extents:
        if ranges and ranges[-1][0] + ranges[-1][1] == e.offset:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + e.length)
        else:
            ranges.append((e.offset, e.length))
    return ranges


def test_extents_agree_with_qemu_img_map(ext4_tmp: Path) -> None:
    path = ext4_tmp / "disk.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    backend = open_backend("file", path=str(path))
    try:
        backend.pwrite(b"\x01" * 65536, 0, False)
        backend.pwrite(b"\x02" * 1000, 200_000, False)
        backend.pwrite(b"\x03" * (1 << 20), 1 << 20, True)
        backend.trim(1 << 20, 128 << 10, False)  # a hole inside data
        backend.zero(3 << 20, 256 << 10, False, False, False)  # NO_HOLE on a hole
        backend.zero((1 << 20) + (512 << 10), 64 << 10, True, True, False)  # fast, may punch
        backend.flush()
        extents = backend.extents(0, SIZE)
    finally:
        backend.close()
    # qemu-img (SEEK_DATA only) and we agree on what reads as zero without data ...
    assert merged([e for e in extents if e.zero]) == qemu_img_zero_ranges(path)
    # ... and we also know which of those ranges are allocated.
    assert Extent(3 << 20, 256 << 10, hole=False, zero=True) in extents
    holes = merged([e for e in extents if e.hole])
    assert holes == [
        (65536, 200_000 // 4096 * 4096 - 65536),
        (204800, (1 << 20) + (128 << 10) - 204800),
        ((1 << 20) + (512 << 10), 64 << 10),
        (2 << 20, 1 << 20),
        ((3 << 20) + (256 << 10), SIZE - (3 << 20) - (256 << 10)),
    ]
