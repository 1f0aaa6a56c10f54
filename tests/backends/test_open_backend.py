"""open_backend(): the right backend for good input, a clear ConfigError for bad input."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from nbdserver.backends import Backend, FileBackend, MemoryBackend, open_backend
from nbdserver.errors import ConfigError


def test_file_and_memory_kinds(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\x01" * 12345)
    backend = open_backend("file", path=str(path))
    try:
        assert isinstance(backend, FileBackend)
        assert isinstance(backend, Backend)
        assert backend.size == 12345
        assert not backend.capabilities.read_only
    finally:
        backend.close()
    memory = open_backend("memory", size=1 << 30, read_only=True)
    try:
        assert isinstance(memory, MemoryBackend)
        assert memory.size == 1 << 30
        assert memory.capabilities.read_only
    finally:
        memory.close()


def test_read_only_file_is_opened_read_only(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(b"\x02" * 4096)
    backend = open_backend("file", path=str(path), read_only=True)
    try:
        assert isinstance(backend, FileBackend)
        assert backend.capabilities.read_only
        assert fcntl.fcntl(backend.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        assert bytes(backend.pread(0, 4096)) == b"\x02" * 4096
    finally:
        backend.close()


def _bad_file_cases(tmp: Path) -> list[tuple[dict[str, object], str]]:
    empty = tmp / "empty.img"
    empty.touch()
    fifo = tmp / "fifo"
    os.mkfifo(fifo)
    sized = tmp / "sized.img"
    sized.write_bytes(b"x")
    return [
        ({"path": str(tmp / "missing.img")}, r"does not exist; create it first.*truncate -s"),
        ({"path": str(tmp)}, r"is a directory; give a regular file or a block device"),
        ({"path": str(fifo)}, r"is not a regular file"),
        ({"path": "/dev/null"}, r"is not a regular file"),
        ({"path": str(empty)}, r"is empty \(0 bytes\)"),
        ({"path": ""}, r"needs a path"),
        ({}, r"needs a path"),
        ({"path": str(sized), "size": 4096}, r"takes its size from the file"),
    ]


def test_bad_file_input_is_a_config_error(tmp_path: Path) -> None:
    for kwargs, message in _bad_file_cases(tmp_path):
        with pytest.raises(ConfigError, match=message):
            open_backend("file", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, r"needs a size, e.g. --memory 1G"),
        ({"size": 0}, r"greater than zero, got 0"),
        ({"size": -4096}, r"greater than zero, got -4096"),
        ({"size": True}, r"must be an integer"),
        ({"size": "1G"}, r"must be an integer"),
        ({"size": 1 << 63}, r"more than the maximum 2\*\*63-1 bytes"),
        ({"size": 4096, "path": "/tmp/x"}, r"takes a size, not a path"),
    ],
)
def test_bad_memory_input_is_a_config_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_backend("memory", **kwargs)  # type: ignore[arg-type]


def test_unknown_kind() -> None:
    with pytest.raises(ConfigError, match=r"unknown backend kind 'nfs'; choose one of: file"):
        open_backend("nfs", path="/tmp/x")
