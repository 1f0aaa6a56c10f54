"""``nbd-serve --cow``: real clients write, trim and zero through the export, read their
writes back and the base image's untouched bytes through it, and afterwards the base file
has the same bytes and mtime as before (nbdserver.backends.cow)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from server.nbdtest import require_tool, running_server

MIB = 1 << 20


def qemu_io(uri: str, *commands: str) -> str:
    argv = [require_tool("qemu-io"), "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    done = subprocess.run([*argv, uri], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "failed" not in done.stdout and "Pattern verification" not in done.stdout, done.stdout
    return done.stdout


@pytest.mark.interop
@pytest.mark.parametrize("workers", ["1", "2"])
def test_cow_session_leaves_the_base_untouched(tmp_path: Path, workers: str) -> None:
    nbdcopy = require_tool("nbdcopy")
    base = tmp_path / "base.img"
    base.write_bytes(b"\xa5" * (16 * MIB))
    os.utime(base, ns=(1_000_000_000, 1_000_000_000))  # a known, old mtime
    before = base.read_bytes(), base.stat().st_mtime_ns
    cow_dir = tmp_path / "overlays"
    cow_dir.mkdir()
    args = [str(base), "--cow", "--cow-dir", str(cow_dir), "--workers", workers]
    with running_server(tmp_path, *args) as server:
        uri = server.uri()
        qemu_io(
            uri,
            "write -P 0x11 1M 1M",  # whole blocks
            "write -P 0x22 5000 3000",  # inside one block: copy-up of the rest
            "write -z 4M 256k",  # WRITE_ZEROES
            "discard 8M 1M",  # TRIM
            "flush",
        )
        qemu_io(
            uri,
            "read -P 0x11 1M 1M",
            "read -P 0xa5 0 5000",  # the base's bytes around the small write
            "read -P 0x22 5000 3000",
            "read -P 0xa5 8000 4288",
            "read -P 0 4M 256k",
            "read -P 0xa5 12M 4M",  # never written: straight from the base
        )
        copy = tmp_path / "copy.img"
        done = subprocess.run(
            [nbdcopy, uri, str(copy)], capture_output=True, text=True, check=False, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert not list(cow_dir.iterdir()), "the overlay must be unlinked at once"
        assert server.alive()
        log = server.log()
        assert "Traceback" not in log and "Fatal error" not in log, log
    expected = bytearray(before[0])
    expected[1 * MIB : 2 * MIB] = b"\x11" * MIB
    expected[5000:8000] = b"\x22" * 3000
    expected[4 * MIB : 4 * MIB + 256 * 1024] = bytes(256 * 1024)
    got = copy.read_bytes()
    trimmed = got[8 * MIB : 9 * MIB]
    assert trimmed in (bytes(MIB), b"\xa5" * MIB)  # a TRIM is a hint
    expected[8 * MIB : 9 * MIB] = trimmed
    assert got == bytes(expected)
    assert (base.read_bytes(), base.stat().st_mtime_ns) == before, "--cow changed the base"
    done = subprocess.run(["cmp", str(base), str(tmp_path / "copy.img")], check=False)
    assert done.returncode == 1, "the session's writes are visible through the export only"


def test_cow_needs_a_file_export(tmp_path: Path) -> None:
    from server.nbdtest import NBD_SERVE

    done = subprocess.run(
        [NBD_SERVE, "--memory", "1M", "--cow"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert "--cow (cow = true) needs a file export" in done.stderr
