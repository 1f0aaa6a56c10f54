"""TEST ONLY: a backend wrapper that corrupts one READ on purpose (``nbd-serve --fault``).

Theory of operation
-------------------
The swap experiment must prove that it reports ``corruption`` when a real guest's
swap-in returns wrong bytes (issue 9 §3).  Nothing in a healthy stack does that, so
this wrapper does it once, deterministically:

``corrupt-read-after=N[,match=TEXT]``
    after N READ requests have been answered, the first later READ that holds a 4 KiB
    page starting with TEXT (any page when TEXT is empty) gets one byte of that page
    flipped (offset :data:`FLIP_AT` in the page, XOR 0xFF).  The flipped page is also
    written back to the store, so that a guest which drops the page and reads it again
    sees the same wrong byte.  Exactly one page is corrupted per server process.

The wrapper logs one WARNING line ``fault: corrupted ...`` with the export offset and
the page's first 32 bytes in hex, so a test can name the page it expects to be reported.

``flush-delay-ms=N`` (alone or with the above)
    every FLUSH sleeps N ms before flushing: a slow backend, so that a test can have a
    request in flight when it sends SIGTERM (graceful shutdown). The wrapper then
    never claims ``never_blocks``, so FLUSH runs in the thread pool, off the event loop.
It never offers sendfile (reads must pass through it) and is never the fast inline path.
Do not use it for anything but tests: it destroys data by design.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

from nbdserver.backends.base import Backend, Capabilities, Extent
from nbdserver.errors import ConfigError

__all__ = ["FLIP_AT", "FaultBackend", "FaultSpec", "parse_fault"]

logger = logging.getLogger("nbdserver.fault")

PAGE = 4096
FLIP_AT = 100
"""Offset of the flipped byte inside the page (in the fill, past any 32-byte header)."""


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """A parsed ``--fault`` value."""

    corrupt_read_after: int | None
    match: bytes = b""
    flush_delay_ms: int = 0


def parse_fault(text: str) -> FaultSpec:
    """Parse ``corrupt-read-after=N[,match=TEXT][,flush-delay-ms=N]``.

    Raises:
        ConfigError: anything else, with the accepted form.
    """
    form = "--fault corrupt-read-after=N[,match=TEXT] and/or flush-delay-ms=N (a test-only fault)"
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key in fields:
            raise ConfigError(f"--fault {text!r} is not understood; the form is {form}")
        fields[key.strip()] = value
    known = {"corrupt-read-after", "match", "flush-delay-ms"}
    if set(fields) - known or not {"corrupt-read-after", "flush-delay-ms"} & set(fields):
        raise ConfigError(f"--fault {text!r} is not understood; the form is {form}")
    if "match" in fields and "corrupt-read-after" not in fields:
        raise ConfigError(f"--fault {text!r}: match= goes with corrupt-read-after=N")
    numbers: dict[str, int | None] = {}
    for key in ("corrupt-read-after", "flush-delay-ms"):
        given = fields.get(key)
        if given is not None and not given.isdigit():
            raise ConfigError(f"--fault: {key}={given!r} must be a whole number >= 0")
        numbers[key] = None if given is None else int(given)
    match = fields.get("match", "").encode()
    if len(match) > FLIP_AT:
        raise ConfigError(f"--fault: match={fields['match']!r} is longer than {FLIP_AT} bytes")
    return FaultSpec(numbers["corrupt-read-after"], match, numbers["flush-delay-ms"] or 0)


class FaultBackend:
    """Wraps ``inner`` and corrupts one page of one READ (see the module docstring)."""

    def __init__(self, inner: Backend, spec: FaultSpec) -> None:
        self.inner = inner
        self.spec = spec
        self.reads = 0
        self.fired = False

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def capabilities(self) -> Capabilities:
        caps = self.inner.capabilities
        return replace(caps, never_blocks=False) if self.spec.flush_delay_ms else caps

    def _corrupt(self, data: bytearray | memoryview, offset: int) -> None:
        """Flip a byte of the first matching page of ``data``, read at ``offset``."""
        self.reads += 1
        after = self.spec.corrupt_read_after
        if self.fired or after is None or self.reads <= after:
            return
        first = -offset % PAGE  # the first page boundary inside the read
        for start in range(first, len(data) - PAGE + 1, PAGE):
            page = data[start : start + PAGE]
            if bytes(page[: len(self.spec.match)]) != self.spec.match:
                continue
            self.fired = True
            data[start + FLIP_AT] ^= 0xFF
            self.inner.pwrite(bytes(page), offset + start, False)  # a re-read sees it too
            logger.warning(
                "fault: corrupted READ #%d: byte %d of the page at export offset %d "
                "flipped; page header %s",
                self.reads,
                FLIP_AT,
                offset + start,
                bytes(page[:32]).hex(),
            )
            return

    def pread(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        data = bytearray(self.inner.pread(offset, length))
        self._corrupt(data, offset)
        return data

    def pread_into(self, buf: memoryview, offset: int) -> None:
        self.inner.pread_into(buf, offset)
        self._corrupt(buf, offset)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int, fua: bool) -> None:
        self.inner.pwrite(data, offset, fua)

    def flush(self) -> None:
        if self.spec.flush_delay_ms:
            time.sleep(self.spec.flush_delay_ms / 1000)  # on a pool thread: see capabilities
        self.inner.flush()

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self.inner.trim(offset, length, fua)

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        self.inner.zero(offset, length, may_trim, fast, fua)

    def cache(self, offset: int, length: int) -> None:
        self.inner.cache(offset, length)

    def extents(self, offset: int, length: int) -> list[Extent]:
        return self.inner.extents(offset, length)

    def sendfile_source(self, offset: int, length: int) -> int:
        return -1  # every read passes through _corrupt

    def close(self) -> None:
        self.inner.close()
