"""The page pattern swapstress writes and verifies, at C speed.

Theory of operation
-------------------
Every 4 KiB page holds::

    offset 0     header  (32 bytes)  magic "SWAPNBD1", page u64, worker u32, generation u32, tag u64
    offset 32    fill    (4032 bytes) xorshift64* stream seeded from (worker, generation)
    offset 4064  trailer (32 bytes)  a copy of the header

All integers are native-endian (the guest and the checker are the same machine).  The page is
never all-zero (Linux 6.12 does not write zero-filled pages to swap at all, so a zero page
would prove nothing), and the whole page is checked, not only its first bytes: a flipped bit
anywhere, a page from another worker, another page of the same worker or a stale generation
all compare unequal.

Only the two page-number fields differ between pages of one (worker, generation).  A
:class:`ChunkPattern` therefore keeps one template buffer of :data:`CHUNK_PAGES` pages and,
for each chunk, patches the page numbers in with one strided memoryview assignment (two
C loops of ``CHUNK_PAGES`` items).  Writing a chunk is then a single ``mm[a:b] = template``
and verifying it a single ``mm[a:b] == template`` (memcpy + memcmp).  Python code runs
per chunk (1 MiB), never per byte; the per-page decoding in :func:`diff_page` runs only
once a chunk has already compared unequal.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass

__all__ = [
    "CHUNK_PAGES",
    "HEADER",
    "MAGIC",
    "PAGE_SIZE",
    "ChunkPattern",
    "PageDiff",
    "diff_page",
    "expected_page",
]

PAGE_SIZE = 4096
"""The unit of the pattern; x86-64 base page size (also what swap moves)."""

CHUNK_PAGES = 256
"""Pages per write/verify call: 1 MiB, large enough to amortise Python, small enough to
check the stop flag and report progress often under heavy swapping."""

MAGIC = b"SWAPNBD1"
HEADER = struct.Struct("=8sQIIQ")
"""magic, page, worker, generation, tag (a non-zero hash of worker and generation)."""

_Q_PER_PAGE = PAGE_SIZE // 8
_HEADER_PAGE_Q = 1  # index of the page field, in u64 units, from the page start
_TRAILER_OFFSET = PAGE_SIZE - HEADER.size
_TRAILER_PAGE_Q = _TRAILER_OFFSET // 8 + _HEADER_PAGE_Q
_MASK64 = (1 << 64) - 1


def _tag(worker: int, generation: int) -> int:
    """A non-zero 64-bit value mixing worker and generation (splitmix64 finaliser)."""
    z = (worker * 0x9E3779B97F4A7C15 + generation * 0xBF58476D1CE4E5B9 + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return z or 0x5A5A5A5A5A5A5A5A


def _fill(seed: int, nbytes: int) -> bytes:
    """``nbytes`` of xorshift64* output; computed once per (worker, generation)."""
    state = seed
    words = array("Q")
    for _ in range((nbytes + 7) // 8):
        state ^= state >> 12
        state ^= (state << 25) & _MASK64
        state ^= state >> 27
        words.append((state * 0x2545F4914F6CDD1D) & _MASK64)
    return words.tobytes()[:nbytes]


def expected_page(worker: int, page: int, generation: int) -> bytes:
    """The exact 4 KiB a page must hold (slow path: reporting and tests)."""
    tag = _tag(worker, generation)
    header = HEADER.pack(MAGIC, page, worker, generation, tag)
    fill = _fill(tag, PAGE_SIZE - 2 * HEADER.size)
    return header + fill + header


@dataclass(frozen=True, slots=True)
class PageDiff:
    """Where a page differs from its expected content (first differing 32-byte block)."""

    offset: int
    """Byte offset of the first differing byte within the page."""
    expected: str
    """Hex of the expected 32-byte aligned block containing that byte."""
    found: str
    """Hex of the same block as found in memory."""
    bad_bytes: int
    """How many bytes of the page differ."""


def diff_page(found: bytes, expected: bytes) -> PageDiff | None:
    """Compare one page; ``None`` when equal.  Runs only on the (rare) failure path."""
    if found == expected:
        return None
    bad = [i for i in range(len(expected)) if found[i] != expected[i]]
    first = bad[0]
    start = first - first % HEADER.size
    end = start + HEADER.size
    return PageDiff(
        offset=first,
        expected=expected[start:end].hex(),
        found=found[start:end].hex(),
        bad_bytes=len(bad),
    )


class ChunkPattern:
    """Template buffer for one (worker, generation); yields the bytes of any chunk.

    Args:
        worker: worker index, stored in every page.
        generation: pass generation, stored in every page.
    """

    __slots__ = ("_buffer", "_q", "generation", "worker")

    def __init__(self, worker: int, generation: int) -> None:
        self.worker = worker
        self.generation = generation
        page = expected_page(worker, 0, generation)
        self._buffer = bytearray(page * CHUNK_PAGES)
        self._q = memoryview(self._buffer).cast("Q")

    def chunk(self, first_page: int, npages: int) -> bytearray:
        """Expected bytes of pages ``first_page .. first_page + npages - 1``.

        The returned object is only valid until the next call (the buffer is reused).
        """
        if not 0 < npages <= CHUNK_PAGES:
            raise ValueError(f"npages must be in 1..{CHUNK_PAGES}, got {npages}")
        numbers = memoryview(array("Q", range(first_page, first_page + CHUNK_PAGES)))
        self._q[_HEADER_PAGE_Q::_Q_PER_PAGE] = numbers
        self._q[_TRAILER_PAGE_Q::_Q_PER_PAGE] = numbers
        if npages == CHUNK_PAGES:
            return self._buffer
        return self._buffer[: npages * PAGE_SIZE]  # a copy, once per pass (the tail)
