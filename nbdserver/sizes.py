"""Human-readable sizes for the command line: ``parse_size("1G") == 1073741824``.

Suffixes are binary multiples, as disk tools use them: ``K`` = 1024, ``M`` = 1024**2,
``G`` = 1024**3, ``T`` = 1024**4. Each may be followed by ``B`` or ``iB``; a bare ``B`` or no
suffix means bytes. Case does not matter and blanks around the number or between the number
and its suffix are allowed. A decimal fraction is accepted when it comes to a whole number
of bytes (``1.5G``, ``0.5K``), never rounded (``0.3K`` is refused): an export size must be
exact. ``0``, ``-1``, ``1,5G`` and ``1X`` are rejected with a
:class:`~nbdserver.errors.ConfigError` that says why.

(``stress/sizes.py`` is the guest tools' own parser: the guest has no nbdserver package.)
"""

from __future__ import annotations

import re
from fractions import Fraction

from nbdserver.errors import ConfigError

__all__ = ["MAX_SIZE", "MULTIPLIERS", "format_size", "parse_size"]

MULTIPLIERS: dict[str, int] = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

#: NBD sizes travel as unsigned 64-bit integers, but the kernel limits files to 2**63 - 1.
MAX_SIZE = (1 << 63) - 1

_SIZE_RE = re.compile(
    r"""
    \s*
    (?P<number>[0-9]+(?:\.[0-9]+)?)
    \s*
    (?: (?P<prefix>[kmgt]) (?:i?b)?   # 4K, 4KB, 4KiB
      | b                             # 512B
    )?
    \s*
    """,
    re.IGNORECASE | re.VERBOSE,
)

_HINT = "use a number of bytes or a K, M, G or T suffix, e.g. 4096, 512M, 1.5G or 2TiB"


def parse_size(text: str) -> int:
    """Parse a size such as ``"1G"``, ``"1.5GiB"``, ``"4kb"`` or ``"65536"`` into bytes.

    Raises:
        ConfigError: ``text`` is empty, malformed, not a whole number of bytes, negative,
            zero, or larger than the largest file size the kernel accepts (2**63 - 1).
    """
    if not isinstance(text, str):
        raise ConfigError(f"size must be a string such as '1G', not {type(text).__name__}")
    stripped = text.strip()
    if not stripped:
        raise ConfigError(f"size is empty: {_HINT}")
    if stripped.startswith("-"):
        raise ConfigError(f"size {text!r} is negative: a size must be greater than zero")
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise ConfigError(f"size {text!r} is not understood: {_HINT}")
    prefix = (match.group("prefix") or "").lower()
    number = match.group("number")
    if len(number) > 40:  # no real size needs more; keeps int() within its digit limit
        raise ConfigError(
            f"size {text.strip()[:20]!r}... has {len(number)} digits; a size is a number of"
            " at most 2**63-1 bytes"
        )
    exact = Fraction(number) * MULTIPLIERS[prefix]
    if exact.denominator != 1:
        raise ConfigError(
            f"size {text!r} is not a whole number of bytes ({float(exact):.1f});"
            " give the size in a smaller unit"
        )
    value = int(exact)
    if value == 0:
        raise ConfigError(f"size {text!r} is zero: a size must be greater than zero")
    if value > MAX_SIZE:
        raise ConfigError(f"size {text!r} is {value} bytes, more than the maximum 2**63-1")
    return value


def format_size(value: int) -> str:
    """The shortest exact spelling of ``value`` that :func:`parse_size` reads back."""
    for suffix in ("T", "G", "M", "K"):
        multiplier = MULTIPLIERS[suffix.lower()]
        if value >= multiplier and value % multiplier == 0:
            return f"{value // multiplier}{suffix}"
    return str(value)
