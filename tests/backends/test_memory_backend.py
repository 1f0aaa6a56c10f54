"""Memory-backend behaviour beyond the conformance suite: sparseness, sealing, fork."""

from __future__ import annotations

import os

import pytest

from nbdserver.backends import Extent, MemoryBackend, open_backend

TIB = 1 << 40


def open_memory(size: int) -> MemoryBackend:
    backend = open_backend("memory", size=size)
    assert isinstance(backend, MemoryBackend)
    return backend


def test_one_tebibyte_costs_only_what_is_written() -> None:
    backend = open_memory(TIB)
    try:
        assert backend.size == TIB
        assert backend.memory_used() == 0
        for offset in (0, TIB // 2 + 12345, TIB - 4096):
            backend.pwrite(b"\x55" * 4096, offset, False)
        used = backend.memory_used()
        assert 3 * 4096 <= used <= 4 * 2 * 1024 * 1024  # a few pages (huge pages at most)
        # Reading never-written ranges returns zeroes without allocating anything.
        assert bytes(backend.pread(TIB // 4, 1 << 20)) == bytes(1 << 20)
        assert backend.memory_used() == used
        extents = backend.extents(0, TIB)
        assert [e for e in extents if not e.hole] != []
        assert sum(e.length for e in extents if not e.hole) < 64 * 4096
        assert extents[0] == Extent(0, extents[0].length, hole=False, zero=False)
        assert extents[-1].offset + extents[-1].length == TIB
        # Punching gives the memory back.
        backend.trim(0, TIB, False)
        assert backend.memory_used() == 0
        assert backend.extents(0, TIB) == [Extent(0, TIB, hole=True, zero=True)]
    finally:
        backend.close()


def test_size_is_sealed() -> None:
    backend = open_memory(1 << 20)
    try:
        for size in (0, 2 << 20):
            with pytest.raises(PermissionError):
                os.ftruncate(backend.fd, size)
        assert os.fstat(backend.fd).st_size == 1 << 20
    finally:
        backend.close()


def test_flush_and_fua_succeed_and_keep_data() -> None:
    backend = open_memory(1 << 20)
    try:
        backend.pwrite(b"\x66" * 5000, 100, True)
        backend.flush()
        backend.zero(0, 50, False, False, True)
        assert bytes(backend.pread(0, 5100)) == bytes(100) + b"\x66" * 5000
    finally:
        backend.close()


def test_forked_worker_shares_the_disk() -> None:
    """A forked worker process writing through the inherited memfd is seen by the parent."""
    backend = open_memory(1 << 20)
    try:
        pid = os.fork()
        if pid == 0:  # child: write and leave without running any cleanup
            code = 0
            try:
                backend.pwrite(b"\x77" * 4096, 65536, False)
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert bytes(backend.pread(65536, 4096)) == b"\x77" * 4096
    finally:
        backend.close()
