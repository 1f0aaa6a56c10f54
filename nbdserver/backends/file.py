"""The ``file`` backend: a regular file or a block device.

Theory of operation
-------------------
One file descriptor, opened once, serves every connection. All I/O is positioned
(``pread``/``preadv``/``pwrite``/``pwritev``/``fallocate``/``lseek(SEEK_DATA)``), so there is
no shared file offset and calls may run concurrently in worker threads. Because every
connection goes through the same descriptor and page cache, an ``fdatasync`` issued for
one connection covers writes completed on all of them: the export is multi-conn safe
(doc/proto.md, NBD_FLAG_CAN_MULTI_CONN).

Durability. FLUSH is ``fdatasync``. A FUA write is ``pwritev(..., RWF_DSYNC)``, which makes
just that write durable; if the kernel or filesystem refuses the flag we fall back, once and
for all, to ``pwrite`` followed by ``fdatasync``. FUA on TRIM and WRITE_ZEROES is an
``fdatasync`` after the operation.

Sparseness. ``extents()`` walks the file with ``lseek(SEEK_DATA/SEEK_HOLE)``, which is
page-cache aware: what it calls a hole reads as zeroes, everything else is data. A hole may
still be *allocated* (unwritten extents left by FALLOC_FL_ZERO_RANGE, i.e. NO_HOLE zeroing),
so the holes are split with ``FS_IOC_FIEMAP``: allocated runs become "zero, not a hole"
(NBD_STATE_ZERO alone), the rest "hole and zero". FIEMAP never decides what is data: ext4
marks an extent unwritten until writeback even when the page cache holds new data, which
is how FIEMAP-based copy tools used to lose data. Filesystems without SEEK_DATA (and block
devices) answer "all data", a truthful, conservative answer.

Zeroing ladder. ``zero()`` tries, in order, the cheapest way that leaves the range reading
as zeroes and honours the request:

1. ``fallocate(PUNCH_HOLE|KEEP_SIZE)`` when the client allows holes (``may_trim``);
2. ``fallocate(ZERO_RANGE|KEEP_SIZE)``, which keeps the blocks allocated (NBD_CMD_FLAG_NO_HOLE);
3. writing zeroes in bounded chunks. That is the slow path: a FAST_ZERO request gets
   :class:`~nbdserver.errors.NotSupported` (NBD_ENOTSUP) instead, before anything is
   changed, because doc/proto.md (NBD_CMD_FLAG_FAST_ZERO) has the server fail quickly
   rather than fall back to something no faster than a write.

A mode the filesystem rejects with EOPNOTSUPP is remembered and never tried again. TRIM is
only step 1 (it is a hint; with no punch support it does nothing and the data stays
stable). Python has no binding for ``fallocate(2)`` modes other than plain allocation, so
it is called through ctypes (the call releases the GIL).

Block devices. The size comes from ``lseek(SEEK_END)``. Punch and zero-range must be
aligned to the logical block size, so the aligned middle goes to ``fallocate`` and the
unaligned head and tail (less than one block each) are written as zeroes; a TRIM simply
ignores its unaligned edges. The kernel implements PUNCH_HOLE on a block device as
"write zeroes, unmap allowed, no fallback", so it is fast or fails; ZERO_RANGE may fall
back to writing zero pages inside the kernel, so it counts as fast only when the device
advertises hardware write-zeroes (``queue/write_zeroes_max_bytes`` in sysfs). A writable
block device is opened with ``O_EXCL`` so a mounted filesystem is never served.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import logging
import os
import stat
import struct
from collections.abc import Callable
from typing import ClassVar, Final, cast

from nbdserver.backends.base import Capabilities, Extent
from nbdserver.errors import (
    ConfigError,
    InvalidRequest,
    IOFailure,
    NoSpace,
    NotSupported,
    PermissionDenied,
)

__all__ = ["MAX_EXTENTS", "FallocMode", "FileBackend", "fallocate", "open_file"]

log = logging.getLogger(__name__)

#: At most this many extents per ``extents()`` call; the caller asks again for the rest.
MAX_EXTENTS: Final = 16384

#: Largest single write when zeroes have to be written by hand.
_ZERO_CHUNK: Final = 1 << 20
_ZEROES: Final = bytes(_ZERO_CHUNK)

# <linux/fs.h>: _IO(0x12, 104), logical sector size of a block device.
_BLKSSZGET: Final = 0x1268

# <linux/fiemap.h>: struct fiemap (32 bytes) followed by struct fiemap_extent (56 bytes).
_FS_IOC_FIEMAP: Final = 0xC020660B
_FIEMAP_HEADER: Final = struct.Struct("=QQIIII")  # start, length, flags, mapped, count, reserved
_FIEMAP_EXTENT: Final = struct.Struct("=QQQQQIIII")  # logical, physical, length, 2 reserved, flags
_FIEMAP_EXTENT_LAST: Final = 0x1
_FIEMAP_BATCH: Final = 128
_FIEMAP_SIZE: Final = _FIEMAP_HEADER.size + _FIEMAP_BATCH * _FIEMAP_EXTENT.size

# errnos that mean "this fallocate mode is not available here".
_UNSUPPORTED: Final = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


class FallocMode(enum.IntFlag):
    """``fallocate(2)`` mode bits, named as in <linux/falloc.h>."""

    FALLOC_FL_KEEP_SIZE = 0x01
    FALLOC_FL_PUNCH_HOLE = 0x02
    FALLOC_FL_ZERO_RANGE = 0x10


_PUNCH: Final = FallocMode.FALLOC_FL_PUNCH_HOLE | FallocMode.FALLOC_FL_KEEP_SIZE
_ZERO_RANGE: Final = FallocMode.FALLOC_FL_ZERO_RANGE | FallocMode.FALLOC_FL_KEEP_SIZE


def _load_fallocate() -> Callable[[int, int, int, int], int]:
    libc = ctypes.CDLL(None, use_errno=True)
    func = getattr(libc, "fallocate64", None) or libc.fallocate
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return cast("Callable[[int, int, int, int], int]", func)


_libc_fallocate: Final = _load_fallocate()


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Call ``fallocate(2)``; raise ``OSError`` with the kernel's errno on failure."""
    while True:
        if _libc_fallocate(fd, int(mode), offset, length) == 0:
            return
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, f"fallocate(mode={int(mode):#x}): {os.strerror(err)}")


def _append_extent(extents: list[Extent], extent: Extent) -> None:
    """Append, merging with the previous extent when the state is the same."""
    if extents:
        prev = extents[-1]
        if (prev.hole, prev.zero) == (extent.hole, extent.zero):
            extents[-1] = Extent(prev.offset, prev.length + extent.length, prev.hole, prev.zero)
            return
    extents.append(extent)


def _as_bytes_view(data: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _block_device_info(fd: int, st: os.stat_result) -> tuple[int, bool]:
    """(logical block size, device has hardware write-zeroes) of a block device."""
    raw = fcntl.ioctl(fd, _BLKSSZGET, struct.pack("i", 0))
    (logical,) = struct.unpack("i", raw)
    base = f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    write_zeroes = 0
    # A partition has no queue/ of its own; its disk's is one level up.
    for queue in (f"{base}/queue", f"{base}/../queue"):
        try:
            with open(f"{queue}/write_zeroes_max_bytes", encoding="ascii") as f:
                write_zeroes = int(f.read().strip())
            break
        except (OSError, ValueError):
            continue
    return max(logical, 1), write_zeroes > 0


#: statfs f_type of the filesystems whose pages are memory: sendfile from them never waits
#: on storage (linux/magic.h: TMPFS_MAGIC, also memfd; RAMFS_MAGIC; HUGETLBFS_MAGIC).
_MEMORY_FILESYSTEMS: Final = frozenset({0x01021994, 0x858458F6, 0x958458F6})


def _in_memory(fd: int) -> bool:
    """Whether ``fd`` is a regular file on tmpfs, ramfs or hugetlbfs (or a memfd)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        # struct statfs is 120 bytes on 64-bit Linux; f_type (a long) comes first.
        buf = ctypes.create_string_buffer(256)
        if libc.fstatfs(fd, buf) != 0:
            return False
    except (OSError, AttributeError):
        return False
    f_type = int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_long)], "little") & 0xFFFFFFFF
    return f_type in _MEMORY_FILESYSTEMS


class FileBackend:
    """A regular file or block device behind an export (see the module docstring)."""

    #: Whether extents() should ask FIEMAP which holes are really allocated.
    _probe_fiemap: ClassVar[bool] = True
    #: Capabilities.never_blocks: no call can wait for storage (shmem-backed subclasses).
    _never_blocks: ClassVar[bool] = False

    def __init__(
        self,
        fd: int,
        size: int,
        *,
        read_only: bool,
        block_size: int = 1,
        block_device: bool = False,
        zero_range_is_fast: bool = True,
        name: str = "",
    ) -> None:
        """Wrap an open descriptor; the backend owns it and closes it in :meth:`close`.

        Args:
            fd: descriptor opened O_RDONLY or O_RDWR to match ``read_only``.
            size: export size in bytes (the file or device size).
            block_size: alignment fallocate needs (the logical sector size of a device).
            block_device: whether ``fd`` is a block device (no holes to look for).
            zero_range_is_fast: whether FALLOC_FL_ZERO_RANGE beats writing zeroes.
            name: what to call the backend in messages.
        """
        self._fd = fd
        self._size = size
        self._read_only = read_only
        self._block_size = block_size
        self._block_device = block_device
        self._zero_range_is_fast = zero_range_is_fast
        self._name = name or f"fd {fd}"
        self._closed = False
        # Learned on first EOPNOTSUPP and never retried; plain bools are safe across threads.
        self._can_punch = True
        self._can_zero_range = True
        self._can_rwf_dsync = hasattr(os, "RWF_DSYNC") and hasattr(os, "pwritev")
        self._can_fiemap = self._probe_fiemap and not block_device
        # sendfile runs on the event loop: only where reading cannot wait for a disk.
        self._sendfile_ok = not block_device and _in_memory(fd)
        self._capabilities = Capabilities(
            read_only=read_only,
            flush=True,
            fua=not read_only,
            trim=not read_only,
            zero=not read_only,
            fast_zero=not read_only,
            cache=True,
            extents=True,
            multi_conn=True,
            never_blocks=self._never_blocks,
        )

    def __repr__(self) -> str:
        mode = "ro" if self._read_only else "rw"
        return f"<{type(self).__name__} {self._name} size={self._size} {mode}>"

    # -- Backend protocol --------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def fd(self) -> int:
        """The descriptor (e.g. to share with forked workers)."""
        return self._fd

    def sendfile_source(self, offset: int, length: int) -> int:
        if not self._sendfile_ok:
            # Storage-backed: a sendfile could block the event loop on a page-cache
            # miss, so these reads keep the thread pool.
            return -1
        try:
            # SEEK_DATA is cheap through holes (it skips them in the page-cache tree);
            # its SEEK_HOLE twin walks every page of a data run, so it is not asked.
            data = os.lseek(self._fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # no SEEK_DATA here: every byte is data
                return self._fd
            return -1  # ENXIO: only holes from offset on
        return self._fd if data == offset else -1

    def pread(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        self._check_range("read", offset, length)
        data = os.pread(self._fd, length, offset)
        if len(data) == length:
            return data
        buf = bytearray(length)
        buf[: len(data)] = data
        self._read_fully(memoryview(buf)[len(data) :], offset + len(data))
        return buf

    def pread_into(self, buf: memoryview, offset: int) -> None:
        nbytes = buf.nbytes
        # Two comparisons before the helper call: this runs once per request.
        if offset < 0 or offset + nbytes > self._size:
            self._check_range("read", offset, nbytes)  # raises
        if os.preadv(self._fd, [buf], offset) != nbytes:  # one syscall in the usual case
            self._read_fully(_as_bytes_view(buf), offset)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int, fua: bool) -> None:
        if not fua and not self._read_only:
            # The usual case in one syscall and no helper calls (this runs once per
            # request on the event loop); anything unusual takes the checked path below.
            nbytes = data.nbytes if type(data) is memoryview else len(data)
            if (
                offset >= 0
                and offset + nbytes <= self._size
                and os.pwrite(self._fd, data, offset) == nbytes
            ):
                return
        self._check_writable("write")
        view = _as_bytes_view(data)
        self._check_range("write", offset, len(view))
        if fua and self._durable_writes() and self._can_rwf_dsync:
            try:
                self._write_fully(view, offset, os.RWF_DSYNC)
                return
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED and exc.errno != errno.EINVAL:
                    raise
                log.info("%s: pwritev(RWF_DSYNC) refused (%s); using fdatasync", self, exc)
                self._can_rwf_dsync = False
        self._write_fully(view, offset, 0)
        if fua:
            self._sync()

    def flush(self) -> None:
        self._sync()

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self._check_writable("trim")
        if not self._check_range("trim", offset, length):
            return
        # A hint: unaligned edges of a device range and filesystems without punch are
        # left alone, which keeps the content stable as the spec requires.
        if self._punch(offset, length, exact=False) and fua:
            self._sync()

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        self._check_writable("write zeroes")
        if not self._check_range("write zeroes", offset, length):
            return
        if may_trim and self._punch(offset, length, exact=True):
            pass  # punched holes read as zeroes
        elif (not fast or self._zero_range_is_fast) and self._zero_range(offset, length):
            pass  # allocated and zeroed (NO_HOLE honoured)
        elif fast:
            raise NotSupported(
                f"{self}: no fast way to zero {length} bytes at {offset}"
                f" ({'holes not allowed' if not may_trim else 'hole punching unsupported'})"
            )
        else:
            self._write_zeroes(offset, length)
        if fua:
            self._sync()

    def cache(self, offset: int, length: int) -> None:
        if not self._check_range("cache", offset, length):
            return
        os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def extents(self, offset: int, length: int) -> list[Extent]:
        if not self._check_range("block status", offset, length):
            return []
        end = offset + length
        if self._block_device:
            return [Extent(offset, length, hole=False, zero=False)]
        extents: list[Extent] = []
        pos = offset
        while pos < end and len(extents) < MAX_EXTENTS:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data at or after pos
                    data = end
                elif exc.errno == errno.EINVAL and not extents:  # SEEK_DATA unsupported
                    return [Extent(offset, length, hole=False, zero=False)]
                else:
                    raise
            if data > pos:
                stop = min(data, end)
                for extent in self._zero_extents(pos, stop):
                    _append_extent(extents, extent)
                pos = stop
                continue
            hole = os.lseek(self._fd, pos, os.SEEK_HOLE)
            if hole <= pos:  # raced with a punch between the two calls: look again
                continue
            stop = min(hole, end)
            _append_extent(extents, Extent(pos, stop - pos, hole=False, zero=False))
            pos = stop
        del extents[MAX_EXTENTS:]
        return extents

    def _zero_extents(self, start: int, stop: int) -> list[Extent]:
        """Split a SEEK_HOLE range into real holes and allocated-but-zero runs.

        lseek reports unwritten extents (FALLOC_FL_ZERO_RANGE, preallocation) as holes
        unless their pages are cached, although their blocks are allocated. FIEMAP tells
        them apart. FIEMAP alone would be unsafe for *content*: ext4 keeps an extent
        "unwritten" until writeback, while the page cache already holds data. So
        SEEK_DATA decides what reads as zero, and FIEMAP only what is allocated.
        """
        runs = self._fiemap(start, stop) if self._can_fiemap else []
        out: list[Extent] = []
        pos = start
        for run_start, run_stop in runs:
            if run_start > pos:
                out.append(Extent(pos, run_start - pos, hole=True, zero=True))
            out.append(Extent(run_start, run_stop - run_start, hole=False, zero=True))
            pos = run_stop
        if pos < stop:
            out.append(Extent(pos, stop - pos, hole=True, zero=True))
        return out

    def _fiemap(self, start: int, stop: int) -> list[tuple[int, int]]:
        """Allocated runs inside ``[start, stop)``, sorted and clipped (FS_IOC_FIEMAP)."""
        runs: list[tuple[int, int]] = []
        pos = start
        while pos < stop:
            request = bytearray(_FIEMAP_SIZE)
            _FIEMAP_HEADER.pack_into(request, 0, pos, stop - pos, 0, 0, _FIEMAP_BATCH, 0)
            try:
                fcntl.ioctl(self._fd, _FS_IOC_FIEMAP, request, True)
            except OSError as exc:
                # An optimisation only: without it unwritten extents are reported as holes.
                log.info("%s: no FIEMAP (%s); preallocated ranges will show as holes", self, exc)
                self._can_fiemap = False
                return []
            mapped = _FIEMAP_HEADER.unpack_from(request, 0)[3]
            last = True
            for i in range(mapped):
                logical, _, size, _, _, flags, *_ = _FIEMAP_EXTENT.unpack_from(
                    request, _FIEMAP_HEADER.size + i * _FIEMAP_EXTENT.size
                )
                run_start, run_stop = max(logical, pos), min(logical + size, stop)
                if run_start < run_stop:
                    if runs and runs[-1][1] >= run_start:
                        runs[-1] = (runs[-1][0], max(runs[-1][1], run_stop))
                    else:
                        runs.append((run_start, run_stop))
                last = bool(flags & _FIEMAP_EXTENT_LAST)
                pos = max(pos, logical + size)
            if mapped < _FIEMAP_BATCH or last:
                break
        return runs

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            fd, self._fd = self._fd, -1  # a late call gets EBADF, never a reused descriptor
            os.close(fd)

    def __enter__(self) -> FileBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------

    def _durable_writes(self) -> bool:
        """Whether FUA needs real work (False for memory, which is never more durable)."""
        return True

    def _sync(self) -> None:
        os.fdatasync(self._fd)

    def _check_range(self, what: str, offset: int, length: int) -> bool:
        """Refuse a range outside the export; return whether it is non-empty.

        The transmission layer validates first. This backstop costs two comparisons and
        keeps a stray request from growing a file or reading past its end.
        """
        if offset < 0 or length < 0 or offset + length > self._size:
            error = NoSpace if what in ("write", "write zeroes") else InvalidRequest
            raise error(
                f"{what} of {length} bytes at {offset} is outside the {self._size}-byte export"
            )
        return length > 0

    def _check_writable(self, what: str) -> None:
        # The transmission layer rejects writes to read-only exports first; this is the
        # backstop, and it keeps EBADF (which would map to EIO) from ever reaching a client.
        if self._read_only:
            raise PermissionDenied(f"{what} on read-only export {self._name}")

    def _read_fully(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:] if done else view], offset + done)
            if n == 0:
                raise IOFailure(
                    f"{self}: short read at {offset + done} (the file shrank below"
                    f" {offset + len(view)} bytes?)"
                )
            done += n

    def _write_fully(self, view: memoryview, offset: int, flags: int) -> None:
        done = 0
        while done < len(view):
            chunk = view[done:] if done else view
            if flags:
                n = os.pwritev(self._fd, [chunk], offset + done, flags)
            else:
                n = os.pwrite(self._fd, chunk, offset + done)
            if n == 0:
                raise IOFailure(f"{self}: write at {offset + done} made no progress")
            done += n

    def _write_zeroes(self, offset: int, length: int) -> None:
        zeroes = memoryview(_ZEROES)
        end = offset + length
        while offset < end:
            n = min(_ZERO_CHUNK, end - offset)
            self._write_fully(zeroes[:n], offset, 0)
            offset += n

    def _aligned(self, offset: int, length: int) -> tuple[int, int]:
        """The block-aligned part ``[start, stop)`` of a range (empty if start >= stop)."""
        bs = self._block_size
        return -(-offset // bs) * bs, (offset + length) // bs * bs

    def _fallocate_aligned(self, mode: int, offset: int, length: int, exact: bool) -> None:
        """fallocate the aligned middle; with ``exact`` write zeroes over the edges."""
        if self._block_size == 1:
            fallocate(self._fd, mode, offset, length)
            return
        start, stop = self._aligned(offset, length)
        if start < stop:
            fallocate(self._fd, mode, start, stop - start)
        if exact:
            end = offset + length
            if start >= stop:  # inside one block
                self._write_zeroes(offset, length)
                return
            if offset < start:
                self._write_zeroes(offset, start - offset)
            if stop < end:
                self._write_zeroes(stop, end - stop)

    def _punch(self, offset: int, length: int, exact: bool) -> bool:
        """Punch a hole; False if this file cannot (nothing was changed then)."""
        if not self._can_punch:
            return False
        try:
            self._fallocate_aligned(_PUNCH, offset, length, exact)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            log.info("%s: cannot punch holes (%s)", self, exc)
            self._can_punch = False
            return False
        return True

    def _zero_range(self, offset: int, length: int) -> bool:
        """FALLOC_FL_ZERO_RANGE; False if this file cannot (nothing was changed then)."""
        if not self._can_zero_range:
            return False
        try:
            self._fallocate_aligned(_ZERO_RANGE, offset, length, exact=True)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            log.info("%s: no FALLOC_FL_ZERO_RANGE (%s)", self, exc)
            self._can_zero_range = False
            return False
        return True


def open_file(path: str, *, read_only: bool = False) -> FileBackend:
    """Open a regular file or block device as an export.

    Raises:
        ConfigError: the path is missing, not a regular file or block device, empty,
            not accessible in the requested mode, or (block devices) in use.
    """
    if not path:
        raise ConfigError("the file backend needs a path to a regular file or block device")
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(
            f"export file {path!r} does not exist; create it first, e.g. `truncate -s 1G {path}`"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot stat export file {path!r}: {exc.strerror}") from None
    is_block = stat.S_ISBLK(st.st_mode)
    if not (is_block or stat.S_ISREG(st.st_mode)):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ConfigError(f"export path {path!r} is {kind}; give a regular file or a block device")
    if is_block and not read_only:
        flags |= os.O_EXCL  # refuse a device that is mounted or otherwise claimed
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and not read_only:
            raise ConfigError(
                f"cannot open {path!r} for writing: {exc.strerror}; use --read-only to serve"
                " it read-only"
            ) from None
        if exc.errno == errno.EBUSY:
            raise ConfigError(
                f"block device {path!r} is in use (mounted, or held by another program);"
                " unmount it or use --read-only"
            ) from None
        raise ConfigError(f"cannot open export file {path!r}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)  # the object actually opened, not whatever the path named before
        if is_block:
            size = os.lseek(fd, 0, os.SEEK_END)
            block_size, hw_zeroes = _block_device_info(fd, st)
        else:
            size, block_size, hw_zeroes = st.st_size, 1, True
        if size <= 0:
            what = "block device" if is_block else "file"
            raise ConfigError(
                f"export {what} {path!r} is empty (0 bytes); an NBD export needs a size > 0"
                + ("" if is_block else f", e.g. `truncate -s 1G {path}`")
            )
    except BaseException:
        os.close(fd)
        raise
    return FileBackend(
        fd,
        size,
        read_only=read_only,
        block_size=block_size,
        block_device=is_block,
        zero_range_is_fast=hw_zeroes,
        name=path,
    )
