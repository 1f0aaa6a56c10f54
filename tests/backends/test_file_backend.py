"""File-backend behaviour the conformance suite cannot see: errors, devices, sharing."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from nbdserver.backends import Extent, FileBackend, open_backend
from nbdserver.backends.file import MAX_EXTENTS
from nbdserver.errors import (
    ConfigError,
    IOFailure,
    NBDErrno,
    errno_from_oserror,
    errno_of,
)

from .support import loop_device, mounted


def make_file(path: Path, size: int, content: bytes = b"") -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(content)
    return path


def test_full_filesystem_gives_enospc(tmp_path: Path) -> None:
    """A real ENOSPC from a 1 MiB tmpfs travels as NBD_ENOSPC, and trim gives space back."""
    with mounted("tmpfs", "size=1M") as where:
        path = make_file(where / "disk.img", 4 << 20)  # sparse: larger than the filesystem
        backend = open_backend("file", path=str(path))
        try:
            assert backend.size == 4 << 20
            with pytest.raises(OSError) as info:
                backend.pwrite(b"\xaa" * (2 << 20), 0, False)
            assert info.value.errno == errno.ENOSPC
            assert errno_from_oserror(info.value) == NBDErrno.ENOSPC
            assert errno_of(info.value) == NBDErrno.ENOSPC
            # tmpfs has no ZERO_RANGE: NO_HOLE zeroing writes zeroes, so it fills up too.
            with pytest.raises(OSError) as info:
                backend.zero(2 << 20, 2 << 20, False, False, False)
            assert errno_of(info.value) == NBDErrno.ENOSPC
            # Punching gives the pages back; then a write fits again.
            backend.trim(0, 4 << 20, False)
            backend.pwrite(b"\xbb" * 65536, 0, True)
            assert bytes(backend.pread(0, 65536)) == b"\xbb" * 65536
        finally:
            backend.close()


def test_short_read_from_a_shrunk_file_is_an_io_error(tmp_path: Path) -> None:
    path = make_file(tmp_path / "disk.img", 65536, b"\x11" * 65536)
    backend = open_backend("file", path=str(path))
    try:
        os.truncate(path, 4096)  # someone else shrinks the file behind the server
        with pytest.raises(IOFailure) as info:
            backend.pread(0, 8192)
        assert errno_of(info.value) == NBDErrno.EIO
        with pytest.raises(IOFailure):
            backend.pread_into(memoryview(bytearray(8192)), 0)
        assert bytes(backend.pread(0, 4096)) == b"\x11" * 4096
    finally:
        backend.close()


def test_block_device_size_alignment_and_exclusive_open(tmp_path: Path) -> None:
    backing = make_file(tmp_path / "backing.img", 3 << 20, b"\x22" * (3 << 20))
    with loop_device(backing) as device:
        backend = open_backend("file", path=str(device))
        try:
            assert isinstance(backend, FileBackend)
            assert backend.size == 3 << 20
            assert backend.extents(0, backend.size)[0].hole is False
            # Unaligned zero: the kernel only takes whole sectors; edges are written by hand.
            backend.zero(1000, 5000, True, False, False)
            assert bytes(backend.pread(0, 8192)) == b"\x22" * 1000 + bytes(5000) + b"\x22" * 2192
            # A second writable open of the device is refused (O_EXCL), with a clear reason.
            with pytest.raises(ConfigError, match="in use"):
                open_backend("file", path=str(device))
            # A read-only open does not claim the device.
            reader = open_backend("file", path=str(device), read_only=True)
            try:
                assert reader.size == 3 << 20
            finally:
                reader.close()
            backend.flush()
        finally:
            backend.close()
        with open(backing, "rb") as f:
            assert f.read(8192) == b"\x22" * 1000 + bytes(5000) + b"\x22" * 2192


def test_two_backends_on_one_file_share_data(tmp_path: Path) -> None:
    """What multi-conn relies on: writes through one descriptor are seen through another."""
    path = make_file(tmp_path / "disk.img", 1 << 20)
    first = open_backend("file", path=str(path))
    second = open_backend("file", path=str(path))
    try:
        first.pwrite(b"\x33" * 4096, 8192, False)
        second.flush()
        assert bytes(second.pread(8192, 4096)) == b"\x33" * 4096
    finally:
        first.close()
        second.close()


def test_extents_of_a_very_fragmented_file_are_capped(ext4_tmp: Path) -> None:
    blocks = 2 * MAX_EXTENTS + 10
    path = make_file(ext4_tmp / "frag.img", blocks * 8192)
    fd = os.open(path, os.O_WRONLY)
    try:
        for i in range(blocks):
            os.pwrite(fd, b"\x44" * 4096, i * 8192)  # data, hole, data, hole ...
    finally:
        os.close(fd)
    backend = open_backend("file", path=str(path))
    try:
        extents = backend.extents(0, backend.size)
        assert len(extents) == MAX_EXTENTS
        assert extents[0].offset == 0
        assert [e.hole for e in extents[:4]] == [False, True, False, True]
        last = extents[-1]
        assert last.offset + last.length == MAX_EXTENTS * 4096
        rest = backend.extents(last.offset + last.length, backend.size - MAX_EXTENTS * 4096)
        assert rest[0].offset == MAX_EXTENTS * 4096
    finally:
        backend.close()


def test_many_preallocated_runs_are_all_found(ext4_tmp: Path) -> None:
    """More unwritten extents than one FIEMAP call returns: every one is reported."""
    runs = 300
    path = make_file(ext4_tmp / "prealloc.img", runs * 8192)
    backend = open_backend("file", path=str(path))
    try:
        for i in range(runs):
            backend.zero(i * 8192, 4096, False, False, False)  # allocated, reads zero
        extents = backend.extents(0, backend.size)
        assert len(extents) == 2 * runs
        for i, e in enumerate(extents):
            assert e == Extent(i * 4096, 4096, hole=bool(i % 2), zero=True)
    finally:
        backend.close()
