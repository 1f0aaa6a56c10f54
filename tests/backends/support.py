"""Helpers behind the backend fixtures (see conftest.py): flavours, exports, mounts."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nbdserver.backends import Backend, open_backend
from nbdserver.backends.cow import open_cow


@dataclass(frozen=True, slots=True)
class Flavour:
    """What a backend flavour is expected to do; the suite asserts exactly this."""

    name: str
    reports_holes: bool  # extents() can show holes
    trim_zeroes: bool  # a trimmed (block-aligned) range reads back as zeroes
    fast_zero_may_trim: bool  # zero(fast=True, may_trim=True) succeeds
    fast_zero_no_hole: bool  # zero(fast=True, may_trim=False) succeeds
    persistent: bool  # has a backing file the test can read and prefill
    no_hole_reports_zero: bool  # a NO_HOLE zeroed range shows as allocated+zero (ZERO_RANGE)
    in_memory: bool  # pages are memory (tmpfs, ramfs, memfd): large reads may use sendfile
    never_blocks: bool = False  # capabilities promise no call waits for storage


FLAVOURS: dict[str, Flavour] = {
    f.name: f
    for f in (
        Flavour("file-ext4", True, True, True, True, True, True, False),
        Flavour("file-tmpfs", True, True, True, False, True, False, True),
        Flavour("file-ramfs", False, False, False, False, True, False, True),
        Flavour("blockdev", False, True, True, True, True, False, False),
        Flavour("memory", True, True, True, False, False, False, True, never_blocks=True),
        # --cow over a file in /dev/shm, overlay in /dev/shm: tmpfs answers, no sendfile
        # (a range may mix base and overlay), and the base file is never the store.
        Flavour("cow", True, True, True, False, True, False, False),
    )
}


@dataclass(frozen=True, slots=True)
class Export:
    """An opened backend plus, for persistent flavours, the file that holds its bytes."""

    backend: Backend
    flavour: Flavour
    store: Path | None


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.fail(f"{what} needs root (mount/losetup); run the backend tests as root")


def require_tool(name: str, package: str = "util-linux") -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` not found; install {package} (apt-get install {package})")
    return path


def run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip()


@contextlib.contextmanager
def mounted(fstype: str, options: str | None = None, source: str | None = None) -> Iterator[Path]:
    """Mount ``source`` (default: a fresh ``fstype``) on a temporary directory; clean up after."""
    require_root(f"mounting {fstype}")
    require_tool("mount")
    where = Path(tempfile.mkdtemp(prefix=f"swapnbd-{fstype}-"))
    argv = ["mount", "-t", fstype]
    if options:
        argv += ["-o", options]
    try:
        run(*argv, source or fstype, str(where))
        try:
            yield where
        finally:
            run("umount", str(where))
    finally:
        where.rmdir()


@contextlib.contextmanager
def ext4_filesystem(size: int = 256 << 20) -> Iterator[Path]:
    """A fresh ext4 on a sparse image, loop-mounted: known punch/zero-range/FIEMAP support
    whatever filesystem the test's tmp directory is on."""
    mkfs = require_tool("mkfs.ext4", "e2fsprogs")
    with tempfile.TemporaryDirectory(prefix="swapnbd-ext4img-") as tmp:
        image = Path(tmp) / "ext4.img"
        with open(image, "wb") as f:
            f.truncate(size)
        run(mkfs, "-q", "-F", "-b", "4096", "-E", "nodiscard", str(image))
        with mounted("ext4", "loop", source=str(image)) as where:
            yield where


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[Path]:
    """Attach ``backing`` to a free loop device; detach afterwards."""
    require_root("a loop block device")
    require_tool("losetup")
    device = Path(run("losetup", "--find", "--show", str(backing)))
    try:
        yield device
    finally:
        run("losetup", "--detach", str(device))


class ExportFactory:
    """Opens fresh exports of one flavour (several per test, e.g. inside hypothesis)."""

    def __init__(self, flavour: Flavour, ramfs: Path | None, ext4: Path | None) -> None:
        self.flavour = flavour
        self._ramfs = ramfs
        self._ext4 = ext4
        self._count = 0

    def _new_path(self, directory: Path) -> Path:
        self._count += 1
        return directory / f"export-{os.getpid()}-{self._count}.img"

    @contextlib.contextmanager
    def open(self, size: int, *, read_only: bool = False, prefill: bytes = b"") -> Iterator[Export]:
        """An export of ``size`` bytes whose first bytes are ``prefill`` (else zeroes)."""
        name = self.flavour.name
        if name == "memory":
            assert not prefill, "the memory flavour starts empty"
            backend = open_backend("memory", size=size, read_only=read_only)
            try:
                yield Export(backend, self.flavour, None)
            finally:
                backend.close()
            return
        if name == "cow":
            with self._cow(size, read_only, prefill) as export:
                yield export
            return
        directories = {
            "file-ext4": self._ext4,
            "blockdev": self._ext4,
            "file-tmpfs": Path("/dev/shm"),
            "file-ramfs": self._ramfs,
        }
        directory = directories[name]
        assert directory is not None, f"the {name} flavour needs its filesystem fixture"
        path = self._new_path(directory)
        with open(path, "wb") as f:
            f.truncate(size)
            f.write(prefill)
        try:
            if name == "blockdev":
                assert size % 512 == 0, "a loop device has 512-byte sectors"
                with loop_device(path) as device:
                    backend = open_backend("file", path=str(device), read_only=read_only)
                    try:
                        yield Export(backend, self.flavour, path)
                    finally:
                        backend.close()
            else:
                backend = open_backend("file", path=str(path), read_only=read_only)
                try:
                    yield Export(backend, self.flavour, path)
                finally:
                    backend.close()
        finally:
            path.unlink()

    @contextlib.contextmanager
    def _cow(self, size: int, read_only: bool, prefill: bytes) -> Iterator[Export]:
        """A --cow export over a prefilled base in /dev/shm; its overlay is in /dev/shm too.
        On the way out it checks that the base file was never written."""
        base_path = self._new_path(Path("/dev/shm"))
        with open(base_path, "wb") as f:
            f.truncate(size)
            f.write(prefill)
        before = base_path.read_bytes(), base_path.stat().st_mtime_ns
        try:
            base = open_backend("file", path=str(base_path), read_only=True)
            backend = open_cow(base, str(base_path), "/dev/shm", read_only=read_only)
            try:
                yield Export(backend, self.flavour, None)
            finally:
                backend.close()
            after = base_path.read_bytes(), base_path.stat().st_mtime_ns
            assert after == before, "--cow wrote to its base image"
        finally:
            base_path.unlink()


#: Size of the ``export`` fixture: 1 MiB plus a page, so ranges cross many blocks.
EXPORT_SIZE = (1 << 20) + 4096
