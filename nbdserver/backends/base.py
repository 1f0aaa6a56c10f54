"""The interface every storage backend implements.

The transmission layer validates requests (bounds, flags, read-only) *before* calling a
backend, so a backend only sees in-range offsets and lengths. Backends are synchronous:
the asyncio adapter decides whether a call runs inline (page-cache hits, or every call of
a backend whose capabilities say ``never_blocks``) or in a thread pool (calls that may
block, such as fdatasync). A backend reports failure by
raising ``OSError`` (mapped by :func:`nbdserver.errors.errno_from_oserror`) or an
:class:`nbdserver.errors.NBDError` subclass; it never returns an error code.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

# Defined in the pure core (which must never import a backend), re-exported here.
from nbdserver.negotiation import Capabilities
from nbdserver.protocol import Extent

__all__ = ["Backend", "Capabilities", "Extent"]


@runtime_checkable
class Backend(Protocol):
    """Storage behind one export. Offsets and lengths are already validated."""

    @property
    def size(self) -> int:
        """Export size in bytes."""
        ...

    @property
    def capabilities(self) -> Capabilities: ...

    def pread(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Return exactly ``length`` bytes starting at ``offset``."""
        ...

    def pread_into(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` (whole) from ``offset``; the zero-copy variant of pread."""
        ...

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int, fua: bool) -> None:
        """Write ``data`` at ``offset``; with ``fua`` it is durable before returning."""
        ...

    def flush(self) -> None:
        """Make every completed write durable (fdatasync for files)."""
        ...

    def trim(self, offset: int, length: int, fua: bool) -> None:
        """Discard a range (a hint: content afterwards is unspecified but stable)."""
        ...

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        """Make the range read as zeroes.

        ``may_trim`` is False when the client sent NBD_CMD_FLAG_NO_HOLE. With ``fast``
        (NBD_CMD_FLAG_FAST_ZERO) raise :class:`nbdserver.errors.NotSupported` unless the
        zeroing is faster than writing zeroes.
        """
        ...

    def cache(self, offset: int, length: int) -> None:
        """Prefetch a range (posix_fadvise WILLNEED for files)."""
        ...

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Allocation map covering at least ``[offset, offset+1)`` and at most the range.

        Extents are contiguous, start at ``offset`` and never run past offset+length.
        """
        ...

    def sendfile_source(self, offset: int, length: int) -> int:
        """A descriptor the adapter may ``sendfile()`` this range from, or -1.

        Only where the bytes at ``offset`` are data (not a hole), so that sending the
        range as data costs no OFFSET_HOLE chunk a sparse read would have used, and
        where reading cannot wait for storage (the adapter calls sendfile on its event
        loop). -1 means: read it with :meth:`pread`.
        """
        ...

    def close(self) -> None: ...
