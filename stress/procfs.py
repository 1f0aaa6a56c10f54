"""Parsers for the /proc files the guest tools read.  Text in, plain dicts out.

Every parser takes the file's text (so tests feed recorded fixtures) and keeps fields it does
not know: kernels add and drop counters between releases, and the collector must record
whatever the running kernel exposes.  :func:`read_text` reads a file below a ``root`` that
defaults to ``/proc`` (tests point it at ``tests/stress/fixtures/linux-6.x``).
"""

from __future__ import annotations

import errno
import os
from typing import Any

__all__ = [
    "DISKSTATS_FIELDS",
    "ProcFormatError",
    "parse_diskstats",
    "parse_meminfo",
    "parse_netstat",
    "parse_psi",
    "parse_swaps",
    "parse_vmstat",
    "read_text",
]

PROC = "/proc"

DISKSTATS_FIELDS: tuple[str, ...] = (
    "reads",
    "reads_merged",
    "read_sectors",
    "read_ms",
    "writes",
    "writes_merged",
    "write_sectors",
    "write_ms",
    "in_flight",
    "io_ms",
    "queue_ms",
)
"""The first eleven counters of a /proc/diskstats line, in the kernel's order
(Documentation/admin-guide/iostats.rst).  Sectors are 512 bytes; ``*_ms`` are the
milliseconds requests spent from issue to completion, summed; ``in_flight`` is a level;
``queue_ms`` is time weighted by the requests in flight.  Later kernels append discard and
flush counters, which are not kept."""


class ProcFormatError(ValueError):
    """A /proc file did not have the expected layout; the message quotes the line."""


def read_text(name: str, root: str = PROC) -> str | None:
    """Contents of ``root/name``, or ``None`` when the file does not exist.

    ``/proc/pressure/memory`` is missing without CONFIG_PSI (or with ``psi=0``), and
    reading it then gives ENOENT or EOPNOTSUPP; both mean "absent".
    """
    path = os.path.join(root, name)
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
            return None
        raise


def parse_vmstat(text: str) -> dict[str, int]:
    """``/proc/vmstat``: ``name value`` per line, every field kept, in kernel order."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ProcFormatError(f"/proc/vmstat: expected 'name value', got {line!r}")
        try:
            out[parts[0]] = int(parts[1])
        except ValueError as exc:
            raise ProcFormatError(f"/proc/vmstat: non-integer value in {line!r}") from exc
    return out


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` in **bytes**: ``kB`` fields are multiplied by 1024.

    Fields without a unit (``HugePages_Total``, ``HugePages_Free`` ...) are counts and are
    kept as they are.
    """
    out: dict[str, int] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if not sep or not fields or len(fields) > 2:
            raise ProcFormatError(f"/proc/meminfo: unexpected line {line!r}")
        try:
            value = int(fields[0])
        except ValueError as exc:
            raise ProcFormatError(f"/proc/meminfo: non-integer value in {line!r}") from exc
        if len(fields) == 2:
            if fields[1] != "kB":
                raise ProcFormatError(f"/proc/meminfo: unknown unit in {line!r}")
            value *= 1024
        out[name.strip()] = value
    return out


def parse_psi(text: str) -> dict[str, dict[str, float | int]]:
    """``/proc/pressure/memory``: ``{"some": {...}, "full": {...}}``.

    ``avg10``/``avg60``/``avg300`` are percentages (floats); ``total`` is microseconds of
    stall (an integer counter).
    """
    out: dict[str, dict[str, float | int]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        kind, *pairs = line.split()
        entry: dict[str, float | int] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise ProcFormatError(f"/proc/pressure/memory: bad field {pair!r} in {line!r}")
            try:
                entry[key] = int(value) if key == "total" else float(value)
            except ValueError as exc:
                raise ProcFormatError(f"/proc/pressure/memory: bad number in {line!r}") from exc
        out[kind] = entry
    return out


def parse_swaps(text: str) -> list[dict[str, Any]]:
    """``/proc/swaps``: one dict per active swap area, sizes in bytes."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    if not lines[0].startswith("Filename"):
        raise ProcFormatError(f"/proc/swaps: missing header, got {lines[0]!r}")
    out: list[dict[str, Any]] = []
    for line in lines[1:]:
        parts = line.split()
        if len(parts) != 5:
            raise ProcFormatError(f"/proc/swaps: expected 5 columns, got {line!r}")
        filename, kind, size_kib, used_kib, priority = parts
        try:
            out.append(
                {
                    "filename": filename.replace("\\040", " "),
                    "type": kind,
                    "size_bytes": int(size_kib) * 1024,
                    "used_bytes": int(used_kib) * 1024,
                    "priority": int(priority),
                }
            )
        except ValueError as exc:
            raise ProcFormatError(f"/proc/swaps: non-integer column in {line!r}") from exc
    return out


def parse_netstat(text: str) -> dict[str, dict[str, int]]:
    """``/proc/net/netstat``: header/value line pairs -> ``{"TcpExt": {...}, "IpExt": {...}}``."""
    out: dict[str, dict[str, int]] = {}
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) % 2:
        raise ProcFormatError("/proc/net/netstat: odd number of lines (header without values)")
    for header, values in zip(lines[0::2], lines[1::2], strict=True):
        names = header.split()
        numbers = values.split()
        if names[0] != numbers[0] or len(names) != len(numbers):
            raise ProcFormatError(
                f"/proc/net/netstat: header {names[0]!r} does not match values {numbers[0]!r}"
            )
        try:
            out[names[0].rstrip(":")] = {
                name: int(number) for name, number in zip(names[1:], numbers[1:], strict=True)
            }
        except ValueError as exc:
            raise ProcFormatError(f"/proc/net/netstat: non-integer value in {names[0]!r}") from exc
    return out


def parse_diskstats(text: str) -> dict[str, dict[str, int]]:
    """``/proc/diskstats``: device name -> :data:`DISKSTATS_FIELDS`."""
    out: dict[str, dict[str, int]] = {}
    width = len(DISKSTATS_FIELDS)
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 3 + width:
            raise ProcFormatError(
                f"/proc/diskstats: expected at least {3 + width} columns, got {line!r}"
            )
        try:
            out[parts[2]] = dict(zip(DISKSTATS_FIELDS, map(int, parts[3 : 3 + width]), strict=True))
        except ValueError as exc:
            raise ProcFormatError(f"/proc/diskstats: non-integer column in {line!r}") from exc
    return out
