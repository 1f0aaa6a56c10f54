"""Byte sizes for the guest tools: ``64M`` -> 67108864.

The guest has no copy of ``nbdserver`` (and must not import it), so the stress tools carry
their own small parser.  Suffixes are binary multiples, as ``dd`` and ``usemem`` read
them: ``K`` = 1024, ``M`` = 1024**2, ``G`` = 1024**3, ``T`` = 1024**4.  ``KiB``/``KB``/``k``
spellings are accepted; a bare number is bytes; a decimal fraction (``1.5G``) is allowed
and rounded down to a whole byte.
"""

from __future__ import annotations

import re

__all__ = ["SizeError", "format_size", "parse_size"]

_MULTIPLIERS: dict[str, int] = {
    "": 1,
    "B": 1,
    "K": 1024,
    "M": 1024**2,
    "G": 1024**3,
    "T": 1024**4,
}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


class SizeError(ValueError):
    """A size string that cannot be parsed; the message says what is accepted."""


def parse_size(text: str) -> int:
    """Parse ``text`` such as ``4096``, ``64M``, ``1.5G`` or ``2GiB`` into bytes.

    Raises:
        SizeError: empty, negative, unknown suffix, or a result of zero bytes.
    """
    match = _SIZE_RE.match(text)
    if match is None:
        raise SizeError(
            f"invalid size {text!r}: expected a number with an optional K, M, G or T "
            "suffix (binary multiples), e.g. 4096, 64M, 1.5G"
        )
    number: str = match.group(1)
    suffix: str = match.group(2)
    multiplier = _MULTIPLIERS[suffix.upper()]
    value: int
    if "." in number:
        whole, frac = number.split(".")
        value = int(whole) * multiplier + int(frac) * multiplier // 10 ** len(frac)
    else:
        value = int(number) * multiplier
    if value <= 0:
        raise SizeError(f"invalid size {text!r}: must be at least 1 byte")
    return value


def format_size(value: int) -> str:
    """Render ``value`` bytes with the largest binary suffix that divides it exactly."""
    for suffix in ("T", "G", "M", "K"):
        unit = _MULTIPLIERS[suffix]
        if value >= unit and value % unit == 0:
            return f"{value // unit}{suffix}"
    return str(value)
