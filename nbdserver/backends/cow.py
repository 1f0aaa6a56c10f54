"""The ``--cow`` wrapper: writes go to an overlay, the base image is never written.

Theory of operation
-------------------
An experiment that swaps onto an image must start from the same bytes every run.
:class:`CowBackend` keeps the base (opened read-only, so even a bug cannot write it) and
an *overlay*: a sparse, already-unlinked temporary file of the same size in ``--cow-dir``
(default: the base's directory, else the system temporary directory). The export is
divided into :data:`BLOCK`-byte blocks; one bit per block says "this block lives in the
overlay". Reads of clean blocks fall through to the base, reads of dirty blocks come from
the overlay. The first write to a block that covers it only in part copies the base block
up first (copy-on-write); a write, TRIM or WRITE_ZEROES that covers whole blocks only marks
them dirty after doing its work on the overlay, so a zeroed block reads zero from the
overlay and never the base's old bytes.

The bitmap is one bit per block in a ``MAP_SHARED`` anonymous mapping made before any
worker is forked, so every worker process sees the same map over the same overlay
descriptor (the export stays multi-conn safe). Copy-up is serialised by a thread lock plus
a POSIX record lock on the overlay (``lockf``), which is per process: two workers never
copy the same block up at once. Writes that touch only dirty blocks, the steady state,
take no lock. The map costs ``size / BLOCK / 8`` bytes, fixed at start (32 MiB per TiB):
no allocation grows with the traffic.

FLUSH and FUA make the overlay durable (it is what the client wrote to); the base is
never flushed because it is never written. The overlay vanishes with the process: that is
the point of ``--cow``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Final

from nbdserver.backends.base import Backend, Capabilities, Extent
from nbdserver.backends.file import FileBackend
from nbdserver.errors import ConfigError, InvalidRequest, NoSpace, PermissionDenied

__all__ = ["BLOCK", "CowBackend", "open_cow"]

#: Copy-on-write granularity in bytes: the page size, what swap writes.
BLOCK: Final = 4096
#: extents() looks at no more than this many clean/dirty runs per call (the client asks
#: again for the rest).
MAX_RUNS: Final = 4096


class CowBackend:
    """A read-only base plus a private overlay (see the module docstring)."""

    def __init__(self, base: Backend, overlay: FileBackend, *, read_only: bool = False) -> None:
        if overlay.size != base.size:
            raise ValueError(f"overlay size {overlay.size} != base size {base.size}")
        self.base = base
        self.overlay = overlay
        self.size = self._size = base.size
        self._read_only = read_only
        self._blocks = (self._size + BLOCK - 1) // BLOCK
        self._map = mmap.mmap(-1, max(1, (self._blocks + 7) // 8))  # MAP_SHARED, zeroed
        self._lock = threading.Lock()
        caps = overlay.capabilities
        self.capabilities: Capabilities = replace(
            caps,
            read_only=read_only,
            fua=not read_only,
            trim=not read_only,
            zero=not read_only,
            fast_zero=not read_only and caps.fast_zero,
            never_blocks=caps.never_blocks and base.capabilities.never_blocks,
        )

    # -- the dirty map -----------------------------------------------------------------

    def _dirty(self, block: int) -> bool:
        return bool(self._map[block >> 3] & (1 << (block & 7)))

    def _mark(self, first: int, stop: int) -> None:
        m = self._map
        for block in range(first, stop):
            m[block >> 3] |= 1 << (block & 7)

    def _runs(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """``(start, stop, dirty)`` byte runs of uniform state covering the range."""
        end = offset + length
        pos = offset
        while pos < end:
            block = pos // BLOCK
            dirty = self._dirty(block)
            block += 1
            while block * BLOCK < end and self._dirty(block) == dirty:
                block += 1
            stop = min(block * BLOCK, end)
            yield pos, stop, dirty
            pos = stop

    def _all_dirty(self, offset: int, length: int) -> bool:
        first, stop = offset // BLOCK, (offset + length + BLOCK - 1) // BLOCK
        return all(self._dirty(b) for b in range(first, stop))

    @contextlib.contextmanager
    def _copy_up_lock(self) -> Iterator[None]:
        with self._lock:
            fd = self.overlay.fd
            if fd < 0:
                raise OSError(errno.EBADF, f"{self.overlay} is closed")
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, 0)
            try:
                yield
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, 0)

    def _prepare(self, offset: int, length: int) -> tuple[int, int]:
        """Copy up the clean blocks the range covers only in part; return the block
        range ``[first, stop)`` to mark dirty once the overlay holds the new bytes.
        Call with the copy-up lock held."""
        end = offset + length
        first, stop = offset // BLOCK, (end + BLOCK - 1) // BLOCK
        for block in {first, stop - 1}:
            start = block * BLOCK
            block_end = min(start + BLOCK, self._size)
            covered = offset <= start and end >= block_end
            if not covered and not self._dirty(block):
                self.overlay.pwrite(self.base.pread(start, block_end - start), start, False)
        return first, stop

    # -- Backend protocol --------------------------------------------------------------

    @property
    def fd(self) -> int:
        """The overlay's descriptor."""
        return self.overlay.fd

    def _check(self, what: str, offset: int, length: int) -> bool:
        """Refuse a range outside the export (as the file backend does); True if non-empty."""
        if offset < 0 or length < 0 or offset + length > self._size:
            error = NoSpace if what in ("write", "write zeroes") else InvalidRequest
            raise error(
                f"{what} of {length} bytes at {offset} is outside the {self._size}-byte export"
            )
        return length > 0

    def pread(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        if not self._check("read", offset, length):
            return b""
        buf = bytearray(length)
        self.pread_into(memoryview(buf), offset)
        return buf

    def pread_into(self, buf: memoryview, offset: int) -> None:
        length = buf.nbytes
        if not self._check("read", offset, length):
            return
        view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        for start, stop, dirty in self._runs(offset, length):
            source = self.overlay if dirty else self.base
            source.pread_into(view[start - offset : stop - offset], start)

    def _writable(self, what: str) -> None:
        if self._read_only:
            raise PermissionDenied(f"{what} on a read-only --cow export")

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int, fua: bool) -> None:
        self._writable("write")
        nbytes = data.nbytes if isinstance(data, memoryview) else len(data)
        if not self._check("write", offset, nbytes):
            return
        if self._all_dirty(offset, nbytes):
            self.overlay.pwrite(data, offset, fua)
            return
        with self._copy_up_lock():
            first, stop = self._prepare(offset, nbytes)
            self.overlay.pwrite(data, offset, fua)
            self._mark(first, stop)

    def flush(self) -> None:
        self.overlay.flush()

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self._writable("trim")
        if not self._check("trim", offset, length):
            return
        # A hint: only whole blocks are discarded; partly covered ones keep their bytes.
        first = (offset + BLOCK - 1) // BLOCK
        stop = (offset + length) // BLOCK
        if offset + length == self._size:
            stop = self._blocks
        if first >= stop:
            return
        start, end = first * BLOCK, min(stop * BLOCK, self._size)
        with self._copy_up_lock():
            # Clean blocks are holes in the overlay already; punching makes dirty ones so.
            self.overlay.zero(start, end - start, True, False, fua)
            self._mark(first, stop)

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        self._writable("write zeroes")
        if not self._check("write zeroes", offset, length):
            return
        with self._copy_up_lock():
            first, stop = self._prepare(offset, length)
            # A refused fast zero raises here, before any block is marked: nothing changed
            # that a read could see (a copied-up block holds the base's bytes).
            self.overlay.zero(offset, length, may_trim, fast, fua)
            self._mark(first, stop)

    def cache(self, offset: int, length: int) -> None:
        if not self._check("cache", offset, length):
            return
        for start, stop, dirty in self._runs(offset, length):
            (self.overlay if dirty else self.base).cache(start, stop - start)

    def extents(self, offset: int, length: int) -> list[Extent]:
        if not self._check("block status", offset, length):
            return []
        out: list[Extent] = []
        for count, (start, stop, dirty) in enumerate(self._runs(offset, length)):
            if count >= MAX_RUNS:
                break
            part = (self.overlay if dirty else self.base).extents(start, stop - start)
            out.extend(part)
            if not part or part[-1].offset + part[-1].length < stop:
                break  # the source stopped early: the caller asks again from there
        return out

    def sendfile_source(self, offset: int, length: int) -> int:
        return -1  # a range may mix base and overlay bytes: read it with pread

    def close(self) -> None:
        # The map stays (a late call must fail with EBADF from a descriptor, not with
        # "mmap closed"); it goes with the object.
        self.overlay.close()
        self.base.close()


def open_cow(base: Backend, base_path: str, cow_dir: str | None, *, read_only: bool) -> CowBackend:
    """Wrap ``base`` (opened read-only from ``base_path``) with a fresh overlay.

    The overlay is a sparse file created in ``cow_dir`` (default: the base's directory,
    or the temporary directory when that is not writable) and unlinked at once.

    Raises:
        ConfigError: ``cow_dir`` is missing or not writable, or the overlay cannot be sized.
    """
    candidates = (
        [cow_dir] if cow_dir is not None else [str(Path(base_path).parent), tempfile.gettempdir()]
    )
    errors: list[str] = []
    for directory in candidates:
        try:
            fd, path = tempfile.mkstemp(prefix=".nbd-cow-", suffix=".overlay", dir=directory)
        except OSError as exc:
            errors.append(f"{directory}: {exc.strerror}")
            continue
        os.unlink(path)
        try:
            os.ftruncate(fd, base.size)
        except OSError as exc:
            os.close(fd)
            raise ConfigError(
                f"cannot make a {base.size}-byte --cow overlay in {directory}: {exc.strerror}"
            ) from None
        overlay = FileBackend(fd, base.size, read_only=False, name=f"cow overlay of {base_path}")
        return CowBackend(base, overlay, read_only=read_only)
    raise ConfigError(
        "cannot create the --cow overlay file ("
        + "; ".join(errors)
        + "); give a writable directory with --cow-dir"
    )
