"""The one conformance suite every backend passes (parametrized over flavours in conftest).

Each test states the contract of nbdserver.backends.base.Backend it checks. Where
flavours legitimately differ (holes, fast zero), the expectation comes from the flavour's
:class:`~tests.backends.support.Flavour` and is asserted exactly, not loosely.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdserver.backends import Backend, Capabilities, Extent
from nbdserver.errors import NBDErrno, NBDError, NotSupported, PermissionDenied, errno_of

from .support import EXPORT_SIZE, Export, ExportFactory

PATTERN = bytes(range(1, 256))  # no zero byte, so "reads as zero" is never an accident


def pattern(length: int, seed: int = 0) -> bytes:
    """``length`` non-zero bytes that differ with ``seed``."""
    reps = (length + seed) // len(PATTERN) + 2
    return (PATTERN * reps)[seed % len(PATTERN) :][:length]


def read_into(backend: Backend, offset: int, length: int) -> bytes:
    buf = bytearray(b"\xee" * length)
    backend.pread_into(memoryview(buf), offset)
    return bytes(buf)


def check_extents(extents: Sequence[Extent], offset: int, length: int) -> None:
    """The shape base.Backend.extents promises: contiguous, from offset, within range."""
    assert extents, "extents() must cover at least one byte"
    assert extents[0].offset == offset
    pos = offset
    for e in extents:
        assert e.offset == pos, f"gap or overlap before {e}"
        assert e.length > 0, f"empty extent {e}"
        assert e.zero or not e.hole, f"{e}: holes in files and memfds read as zeroes"
        pos += e.length
    assert pos <= offset + length, f"extents run past the range: {extents}"


def hole_bytes(extents: Sequence[Extent]) -> set[int]:
    return {i for e in extents if e.hole for i in range(e.offset, e.offset + e.length)}


def allocated(backend: Backend, offset: int, length: int) -> bool:
    extents = backend.extents(offset, length)
    check_extents(extents, offset, length)
    return all(not e.hole for e in extents) and extents[-1].offset + extents[-1].length == (
        offset + length
    )


# -- basics -----------------------------------------------------------------------------


def test_size_and_capabilities(export: Export) -> None:
    backend = export.backend
    assert isinstance(backend, Backend)
    assert backend.size == EXPORT_SIZE
    caps = backend.capabilities
    assert caps == Capabilities(
        read_only=False,
        flush=True,
        fua=True,
        trim=True,
        zero=True,
        fast_zero=True,
        cache=True,
        extents=True,
        multi_conn=True,
        min_block=1,
        preferred_block=4096,
        max_block=32 * 1024 * 1024,
        never_blocks=export.flavour.never_blocks,
    )


def test_never_written_reads_zeroes(export: Export) -> None:
    backend = export.backend
    assert bytes(backend.pread(0, EXPORT_SIZE)) == bytes(EXPORT_SIZE)
    assert read_into(backend, EXPORT_SIZE - 4097, 4097) == bytes(4097)


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, 1),
        (1, 1),
        (511, 2),
        (4095, 4098),
        (12345, 67890),
        (EXPORT_SIZE - 1, 1),
        (EXPORT_SIZE - 4099, 4099),
        (0, EXPORT_SIZE),
    ],
)
def test_write_read_round_trip_at_odd_offsets(export: Export, offset: int, length: int) -> None:
    backend = export.backend
    data = pattern(length, seed=offset)
    backend.pwrite(memoryview(data), offset, False)
    assert bytes(backend.pread(offset, length)) == data
    assert read_into(backend, offset, length) == data
    # Neighbours are untouched.
    if offset > 0:
        assert bytes(backend.pread(offset - 1, 1)) == b"\0"
    if offset + length < EXPORT_SIZE:
        assert bytes(backend.pread(offset + length, 1)) == b"\0"


def test_sendfile_source_gives_the_same_bytes_as_pread(export: Export) -> None:
    """sendfile_source: a descriptor whose bytes at the range equal pread's, or -1; -1
    where the range starts in a hole of a flavour that reports holes (that read keeps
    its OFFSET_HOLE chunks), and always -1 for storage-backed flavours."""
    backend = export.backend
    data = pattern(3 * 65536, seed=7)
    backend.pwrite(data, 65536, False)
    source = backend.sendfile_source(65536, len(data))
    if not export.flavour.in_memory:
        # A sendfile could wait for the disk on the event loop: never offered.
        assert source == -1
        return
    assert source >= 0, "a range that starts with written data can be sent zero-copy"
    rfd, wfd = os.pipe()
    try:
        os.set_blocking(wfd, True)
        fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, len(data))  # the whole range fits in the pipe
        sent = 0
        while sent < len(data):
            sent += os.sendfile(wfd, source, 65536 + sent, len(data) - sent)
        got = b""
        while len(got) < len(data):
            got += os.read(rfd, len(data) - len(got))
    finally:
        os.close(rfd)
        os.close(wfd)
    assert got == data == bytes(backend.pread(65536, len(data)))
    hole_start = backend.sendfile_source(EXPORT_SIZE - 65536, 65536)
    if export.flavour.reports_holes:
        assert hole_start == -1
    else:
        # Without hole reporting everything is data; whatever it sends must be zeroes.
        assert hole_start >= 0


def test_write_accepts_every_buffer_type(export: Export) -> None:
    backend = export.backend
    data = pattern(10000, seed=3)
    backend.pwrite(data, 0, False)
    backend.pwrite(bytearray(data), 20000, False)
    backend.pwrite(memoryview(bytearray(data))[100:200], 40000, False)
    backend.pwrite(memoryview(data).cast("B", (100, 100)), 60000, False)
    assert bytes(backend.pread(0, 10000)) == data
    assert bytes(backend.pread(20000, 10000)) == data
    assert bytes(backend.pread(40000, 100)) == data[100:200]
    assert bytes(backend.pread(60000, 10000)) == data


def test_pread_into_a_slice_of_a_larger_buffer(export: Export) -> None:
    backend = export.backend
    backend.pwrite(pattern(5000), 777, False)
    buf = bytearray(b"\xee" * 6000)
    backend.pread_into(memoryview(buf)[500:5500], 777)
    assert buf[:500] == b"\xee" * 500
    assert buf[500:5500] == pattern(5000)
    assert buf[5500:] == b"\xee" * 500


def test_fua_write_is_in_the_store_when_it_returns(export: Export) -> None:
    backend = export.backend
    data = pattern(9000, seed=7)
    backend.pwrite(data, 3000, True)
    assert bytes(backend.pread(3000, 9000)) == data
    if export.store is not None:
        with open(export.store, "rb") as f:
            f.seek(3000)
            assert f.read(9000) == data


def test_flush_makes_plain_writes_reach_the_store(export: Export) -> None:
    backend = export.backend
    data = pattern(70000, seed=11)
    backend.pwrite(data, 8192, False)
    backend.flush()
    assert bytes(backend.pread(8192, 70000)) == data
    if export.store is not None:
        with open(export.store, "rb") as f:
            f.seek(8192)
            assert f.read(70000) == data


def test_cache_leaves_content_alone(export: Export) -> None:
    backend = export.backend
    backend.pwrite(pattern(4096), 4096, False)
    backend.cache(0, EXPORT_SIZE)
    assert bytes(backend.pread(0, 12288)) == bytes(4096) + pattern(4096) + bytes(4096)


def test_concurrent_calls_from_a_thread_pool(export: Export) -> None:
    """The asyncio adapter runs backend calls in threads: they must not interfere."""
    backend = export.backend
    region = 65536

    def worker(n: int) -> bytes:
        base = n * region
        for round_ in range(20):
            data = pattern(region - 1000, seed=n * 31 + round_)
            backend.pwrite(data, base + 500, round_ % 3 == 0)
            backend.zero(base + 4096, 8192, round_ % 2 == 0, False, False)
            backend.trim(base, 1, False)
            backend.extents(base, region)
            backend.flush()
        return bytes(backend.pread(base + 500, region - 1000))

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(worker, range(16)))
    for n, got in enumerate(results):
        want = bytearray(pattern(region - 1000, seed=n * 31 + 19))
        want[4096 - 500 : 4096 - 500 + 8192] = bytes(8192)
        assert got == want, f"region {n} was disturbed by another thread"


# -- trim and zero ------------------------------------------------------------------------

# Aligned; unaligned at both ends; one byte; one-byte head and tail around whole sectors.
TRIM_RANGES = [(65536, 131072), (100, 9000), (511, 1026)]
ZERO_RANGES = [*TRIM_RANGES, (1000, 1)]


@pytest.mark.parametrize(("offset", "length"), TRIM_RANGES)
def test_trim_is_stable_and_touches_only_its_range(
    export: Export, offset: int, length: int
) -> None:
    backend, flavour = export.backend, export.flavour
    old = pattern(EXPORT_SIZE, seed=5)
    backend.pwrite(old, 0, False)
    backend.trim(offset, length, False)
    after = bytes(backend.pread(0, EXPORT_SIZE))
    assert after[:offset] == old[:offset]
    assert after[offset + length :] == old[offset + length :]
    inside = after[offset : offset + length]
    assert all(b in (0, o) for b, o in zip(inside, old[offset : offset + length], strict=True))
    assert bytes(backend.pread(0, EXPORT_SIZE)) == after, "content after trim must be stable"
    aligned = offset % 4096 == 0 and length % 4096 == 0
    if aligned:
        expected = bytes(length) if flavour.trim_zeroes else old[offset : offset + length]
        assert inside == expected
        holes = hole_bytes(backend.extents(0, EXPORT_SIZE))
        if flavour.reports_holes:
            assert holes == set(range(offset, offset + length))
        else:
            assert holes == set()


def test_trim_with_fua(export: Export) -> None:
    backend = export.backend
    backend.pwrite(pattern(8192), 0, False)
    backend.trim(0, 4096, True)
    expected_head = bytes(4096) if export.flavour.trim_zeroes else pattern(4096)
    assert bytes(backend.pread(0, 8192)) == expected_head + pattern(8192)[4096:]


@pytest.mark.parametrize("fua", [False, True])
@pytest.mark.parametrize(
    ("offset", "length"), [(65536, 131072), (100, 9000), (1000, 1), (511, 1026)]
)
def test_zero_may_trim_reads_zeroes(export: Export, offset: int, length: int, fua: bool) -> None:
    backend, flavour = export.backend, export.flavour
    old = pattern(EXPORT_SIZE, seed=9)
    backend.pwrite(old, 0, False)
    backend.zero(offset, length, True, False, fua)
    after = bytes(backend.pread(0, EXPORT_SIZE))
    assert after == old[:offset] + bytes(length) + old[offset + length :]
    if flavour.reports_holes and offset % 4096 == 0 and length % 4096 == 0:
        assert hole_bytes(backend.extents(0, EXPORT_SIZE)) == set(range(offset, offset + length))


@pytest.mark.parametrize("fua", [False, True])
@pytest.mark.parametrize(
    ("offset", "length"), [(65536, 131072), (100, 9000), (1000, 1), (511, 1026)]
)
def test_zero_no_hole_reads_zeroes_and_stays_allocated(
    export: Export, offset: int, length: int, fua: bool
) -> None:
    backend = export.backend
    old = pattern(EXPORT_SIZE, seed=13)
    backend.pwrite(old, 0, False)
    backend.zero(offset, length, False, False, fua)
    assert allocated(backend, 0, EXPORT_SIZE)  # before reading: reads fill the page cache
    after = bytes(backend.pread(0, EXPORT_SIZE))
    assert after == old[:offset] + bytes(length) + old[offset + length :]


def test_zero_no_hole_allocates_a_hole(export: Export) -> None:
    """NO_HOLE over a never-written (or trimmed) range leaves it allocated."""
    backend, flavour = export.backend, export.flavour
    backend.trim(0, EXPORT_SIZE, False)
    backend.zero(8192, 65536, False, False, False)
    # Ask before reading: a read fills the page cache, which changes what SEEK_DATA says.
    zero = flavour.no_hole_reports_zero
    assert backend.extents(8192, 65536) == [Extent(8192, 65536, hole=False, zero=zero)]
    assert bytes(backend.pread(8192, 65536)) == bytes(65536)
    if flavour.reports_holes:
        assert backend.extents(0, 8192) == [Extent(0, 8192, hole=True, zero=True)]


@pytest.mark.parametrize("may_trim", [True, False])
def test_fast_zero_is_fast_or_refused_without_side_effects(export: Export, may_trim: bool) -> None:
    backend, flavour = export.backend, export.flavour
    old = pattern(EXPORT_SIZE, seed=17)
    backend.pwrite(old, 0, False)
    expect_fast = flavour.fast_zero_may_trim if may_trim else flavour.fast_zero_no_hole
    if expect_fast:
        backend.zero(4096, 65536, may_trim, True, False)
        assert bytes(backend.pread(0, 73728)) == old[:4096] + bytes(65536) + old[69632:73728]
    else:
        with pytest.raises(NotSupported) as info:
            backend.zero(4096, 65536, may_trim, True, False)
        assert errno_of(info.value) == NBDErrno.ENOTSUP
        assert bytes(backend.pread(0, EXPORT_SIZE)) == old, "a refused fast zero changed data"


# -- extents ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, EXPORT_SIZE), (0, 1), (5000, 1), (4095, 8194), (300000, 700000), (EXPORT_SIZE - 1, 1)],
)
def test_extents_shape_and_truth(export: Export, offset: int, length: int) -> None:
    backend, flavour = export.backend, export.flavour
    writes = [(8192, 4096), (300000, 5000), (EXPORT_SIZE - 4096, 4096)]
    for at, n in writes:
        backend.pwrite(pattern(n, seed=at), at, False)
    extents = backend.extents(offset, length)
    check_extents(extents, offset, length)
    content = bytes(backend.pread(offset, length))
    for e in extents:
        if e.zero:
            rel = e.offset - offset
            assert content[rel : rel + e.length] == bytes(e.length), f"{e} does not read zero"
    holes = hole_bytes(extents)
    for at, n in writes:
        assert not holes & set(range(at, at + n)), "written bytes reported as a hole"
    if flavour.reports_holes and offset == 0 and length == EXPORT_SIZE:
        # 100000..290000 was never written; any real filesystem has a hole in there.
        assert set(range(100000, 290000)) <= holes
    if not flavour.reports_holes:
        assert holes == set()


def test_extents_cover_a_fresh_export(export: Export) -> None:
    backend, flavour = export.backend, export.flavour
    extents = backend.extents(0, EXPORT_SIZE)
    check_extents(extents, 0, EXPORT_SIZE)
    if flavour.reports_holes:
        assert extents == [Extent(0, EXPORT_SIZE, hole=True, zero=True)]
    else:
        assert extents == [Extent(0, EXPORT_SIZE, hole=False, zero=False)]


# -- requests the caller should have refused ---------------------------------------------


def test_out_of_range_requests_are_refused_and_change_nothing(export: Export) -> None:
    backend = export.backend
    backend.pwrite(b"\x99" * 10, EXPORT_SIZE - 10, False)
    writes: list[Callable[[], None]] = [
        lambda: backend.pwrite(b"x" * 11, EXPORT_SIZE - 10, False),
        lambda: backend.pwrite(b"x", EXPORT_SIZE, True),
        lambda: backend.pwrite(b"x", -1, False),
        lambda: backend.zero(EXPORT_SIZE - 10, 4096, True, False, False),
        lambda: backend.zero(EXPORT_SIZE - 10, 4096, False, True, False),
    ]
    for call in writes:
        with pytest.raises(NBDError) as info:
            call()
        assert errno_of(info.value) == NBDErrno.ENOSPC
    others: list[Callable[[], object]] = [
        lambda: backend.pread(EXPORT_SIZE - 10, 11),
        lambda: backend.pread_into(memoryview(bytearray(11)), EXPORT_SIZE - 10),
        lambda: backend.trim(EXPORT_SIZE, 1, False),
        lambda: backend.cache(EXPORT_SIZE - 1, 2),
        lambda: backend.extents(EXPORT_SIZE - 1, 2),
        lambda: backend.extents(-1, 2),
    ]
    for other in others:
        with pytest.raises(NBDError) as info:
            other()
        assert errno_of(info.value) == NBDErrno.EINVAL
    assert backend.size == EXPORT_SIZE
    if export.store is not None:
        assert export.store.stat().st_size == EXPORT_SIZE
    assert bytes(backend.pread(EXPORT_SIZE - 11, 11)) == b"\0" + b"\x99" * 10


def test_empty_requests_do_nothing(export: Export) -> None:
    backend = export.backend
    backend.pwrite(b"\x98" * 4096, 0, False)
    assert bytes(backend.pread(10, 0)) == b""
    backend.pread_into(memoryview(bytearray()), EXPORT_SIZE)
    backend.pwrite(b"", EXPORT_SIZE, True)
    backend.trim(100, 0, True)
    backend.zero(100, 0, True, True, True)
    backend.zero(100, 0, False, False, False)
    backend.cache(EXPORT_SIZE, 0)
    assert backend.extents(100, 0) == []
    assert bytes(backend.pread(0, 4096)) == b"\x98" * 4096


# -- read-only ----------------------------------------------------------------------------


def test_read_only_rejects_every_write_type_call(factory: ExportFactory) -> None:
    flavour = factory.flavour
    prefill = pattern(8192, seed=21) if flavour.persistent else b""
    with factory.open(EXPORT_SIZE, read_only=True, prefill=prefill) as export:
        backend = export.backend
        caps = backend.capabilities
        assert caps.read_only
        assert not (caps.fua or caps.trim or caps.zero or caps.fast_zero)
        before = bytes(backend.pread(0, EXPORT_SIZE))
        assert before == prefill + bytes(EXPORT_SIZE - len(prefill))
        calls: list[Callable[[], None]] = [
            lambda: backend.pwrite(b"x" * 4096, 0, False),
            lambda: backend.pwrite(b"x", 1, True),
            lambda: backend.trim(0, 4096, False),
            lambda: backend.zero(0, 4096, True, False, False),
            lambda: backend.zero(0, 4096, False, True, False),
        ]
        for call in calls:
            with pytest.raises(PermissionDenied) as info:
                call()
            assert errno_of(info.value) == NBDErrno.EPERM
        backend.flush()  # allowed, and harmless
        assert bytes(backend.pread(0, EXPORT_SIZE)) == before


def test_close_is_idempotent(factory: ExportFactory) -> None:
    with factory.open(65536) as export:
        export.backend.close()
        export.backend.close()
        # The descriptor number may be reused by the next open(): a late call must fail
        # with EBADF rather than read or write someone else's file.
        other = os.open(os.devnull, os.O_RDWR)
        try:
            with pytest.raises(OSError) as info:
                export.backend.pread(0, 1)
            assert info.value.errno == errno.EBADF
            with pytest.raises(OSError):
                export.backend.pwrite(b"x", 0, False)
        finally:
            os.close(other)


def test_descriptor_is_not_inherited_by_exec(export: Export) -> None:
    fd = getattr(export.backend, "fd", None)
    assert isinstance(fd, int)
    assert not os.get_inheritable(fd)


# -- model-based: random operation sequences against a bytearray ----------------------------

MODEL_SIZE = 96 * 1024


@dataclass(frozen=True, slots=True)
class Op:
    """One backend call of a random sequence (fields a kind does not use are ignored)."""

    kind: Literal["write", "zero", "trim", "read", "extents", "flush"]
    offset: int
    length: int  # clipped to the end of the export
    seed: int  # write: which pattern
    fua: bool
    may_trim: bool
    fast: bool

    @property
    def span(self) -> int:
        return min(self.length, MODEL_SIZE - self.offset)


operations = st.builds(
    Op,
    kind=st.sampled_from(["write", "zero", "trim", "read", "extents", "flush"]),
    offset=st.integers(0, MODEL_SIZE - 1),
    length=st.integers(1, 20000),
    seed=st.integers(0, 254),
    fua=st.booleans(),
    may_trim=st.booleans(),
    fast=st.booleans(),
)


class Model:
    """Expected content; trimmed bytes may read as old or zero until first observed."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.unsettled = bytearray(size)  # 1 = trimmed and not read since

    def set(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data
        self.unsettled[offset : offset + len(data)] = bytes(len(data))

    def trim(self, offset: int, length: int) -> None:
        self.unsettled[offset : offset + length] = b"\1" * length

    def observe(self, offset: int, got: bytes) -> None:
        want = self.data[offset : offset + len(got)]
        if got != want:
            for i, (g, w) in enumerate(zip(got, want, strict=True)):
                if g != w:
                    assert self.unsettled[offset + i] and g == 0, (
                        f"byte {offset + i}: read {g}, expected {w}"
                        f"{' or 0 (trimmed)' if self.unsettled[offset + i] else ''}"
                    )
        self.set(offset, got)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(operations, max_size=25))
def test_random_operations_match_a_model(factory: ExportFactory, ops: list[Op]) -> None:
    with factory.open(MODEL_SIZE) as export:
        backend = export.backend
        model = Model(MODEL_SIZE)
        for op in ops:
            offset, length = op.offset, op.span
            if op.kind == "flush":
                backend.flush()
            elif op.kind == "write":
                data = pattern(length, seed=op.seed)
                backend.pwrite(data, offset, op.fua)
                model.set(offset, data)
            elif op.kind == "zero":
                try:
                    backend.zero(offset, length, op.may_trim, op.fast, op.fua)
                except NotSupported:
                    assert op.fast, "only a fast zero may be refused"
                else:
                    model.set(offset, bytes(length))
            elif op.kind == "trim":
                backend.trim(offset, length, op.fua)
                model.trim(offset, length)
            elif op.kind == "read":
                model.observe(offset, bytes(backend.pread(offset, length)))
            elif op.kind == "extents":
                extents = backend.extents(offset, length)
                check_extents(extents, offset, length)
                for e in extents:
                    if e.zero:
                        got = read_into(backend, e.offset, e.length)
                        assert got == bytes(e.length), f"{e} does not read as zeroes"
                        model.observe(e.offset, got)
        model.observe(0, bytes(backend.pread(0, MODEL_SIZE)))
        model.observe(0, read_into(backend, 0, MODEL_SIZE))  # and stable
