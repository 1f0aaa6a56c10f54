"""qemu-io, qemu-img and fio's nbd engine against the real nbd-serve."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from server.nbdtest import ServerProcess, require_tool

pytestmark = pytest.mark.interop
MiB = 1 << 20


def test_qemu_io_pattern_write_and_read(export_server: ServerProcess) -> None:
    qemu_io = require_tool("qemu-io")
    uri = export_server.uri()
    done = subprocess.run(
        [
            qemu_io,
            "-f",
            "raw",
            "-c",
            "write -P 0xa5 1M 3M",
            "-c",
            "write -P 0x3c 7M 64k",
            "-c",
            "write -z 1M 64k",
            "-c",
            "read -P 0xa5 1088k 2944k",
            "-c",
            "read -P 0x3c 7M 64k",
            "-c",
            "read -P 0 1M 64k",
            "-c",
            "read -P 0 0 1M",
            "-c",
            "flush",
            uri,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Pattern verification failed" not in done.stdout
    assert done.stdout.count("read ") == 4 and done.stdout.count("wrote ") == 3, done.stdout
    # A wrong pattern is detected, so the checks above can fail.
    wrong = subprocess.run(
        [qemu_io, "-f", "raw", "-c", "read -P 0xa5 7M 64k", uri],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "Pattern verification failed" in wrong.stdout + wrong.stderr


def test_qemu_img_compare_and_map(export_server: ServerProcess, tmp_path: Path) -> None:
    qemu_img = require_tool("qemu-img")
    image = tmp_path / "src.raw"
    with image.open("wb") as fh:
        fh.truncate(256 * MiB)
        fh.seek(8 * MiB)
        fh.write(os.urandom(2 * MiB))
        fh.seek(100 * MiB)
        fh.write(os.urandom(MiB))
    uri = export_server.uri()
    subprocess.run(
        [qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(image), uri], check=True
    )
    same = subprocess.run(
        [qemu_img, "compare", "-f", "raw", "-F", "raw", str(image), uri],
        capture_output=True,
        text=True,
        check=False,
    )
    assert same.returncode == 0 and "Images are identical" in same.stdout, same.stdout + same.stderr
    mapped = subprocess.run(
        [qemu_img, "map", "--output=json", "-f", "raw", uri],
        capture_output=True,
        text=True,
        check=True,
    )
    data = [(e["start"], e["length"]) for e in json.loads(mapped.stdout) if e["data"]]
    assert data == [(8 * MiB, 2 * MiB), (100 * MiB, MiB)]
    # Change one byte through qemu-io: compare now reports a difference.
    subprocess.run(
        [require_tool("qemu-io"), "-f", "raw", "-c", "write -P 0x01 9M 512", uri],
        check=True,
        capture_output=True,
    )
    differ = subprocess.run(
        [qemu_img, "compare", "-f", "raw", "-F", "raw", str(image), uri],
        capture_output=True,
        text=True,
        check=False,
    )
    assert differ.returncode == 1 and "Content mismatch at offset 9437184" in differ.stdout


@pytest.mark.parametrize("rw", ["randwrite", "write"])
def test_fio_nbd_engine_verify(export_server: ServerProcess, tmp_path: Path, rw: str) -> None:
    fio = require_tool("fio")
    out = tmp_path / "fio.json"
    done = subprocess.run(
        [
            fio,
            "--name=verify",
            "--ioengine=nbd",
            f"--uri={export_server.uri()}",
            f"--rw={rw}",
            "--bs=4k",
            "--size=32M",
            "--iodepth=32",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--output-format=json",
            f"--output={out}",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,  # fio drops its verify state file in the working directory
    )
    assert done.returncode == 0, done.stdout + done.stderr
    job = json.loads(out.read_text())["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 32 * MiB
    assert job["read"]["io_bytes"] == 32 * MiB  # the verify pass read everything back
