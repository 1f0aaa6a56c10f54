"""parse_size / format_size: a table both ways, rejections with reasons, a round trip."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdserver.errors import ConfigError
from nbdserver.sizes import format_size, parse_size

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", 1),
        ("4096", 4096),
        ("512B", 512),
        ("512b", 512),
        ("1K", K),
        ("1k", K),
        ("4KB", 4 * K),
        ("4kib", 4 * K),
        ("4KiB", 4 * K),
        ("512M", 512 * M),
        ("512MiB", 512 * M),
        ("1G", G),
        ("1g", G),
        ("1GB", G),
        ("1GiB", G),
        ("2T", 2 * T),
        ("2TiB", 2 * T),
        (" 8 G ", 8 * G),
        ("007M", 7 * M),
        ("8388607T", 8388607 * T),
        ("1.5G", 3 * G // 2),
        ("0.5k", 512),
        ("2.25MiB", 9 * M // 4),
        ("1.0", 1),
    ],
)
def test_accepted(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "is empty"),
        ("   ", "is empty"),
        ("0", "is zero"),
        ("0G", "is zero"),
        ("-1", "is negative"),
        ("-1G", "is negative"),
        ("0.3K", r"not a whole number of bytes \(307\.2\)"),
        ("1.5", "not a whole number of bytes"),
        ("0.0001G", "not a whole number of bytes"),
        ("0.0M", "is zero"),
        ("1,5G", "not understood"),
        (".5G", "not understood"),
        ("1.G", "not understood"),
        ("G", "not understood"),
        ("1X", "not understood"),
        ("1P", "not understood"),
        ("1iB", "not understood"),
        ("1 G B", "not understood"),
        ("0x10", "not understood"),
        ("1e6", "not understood"),
        ("1_000", "not understood"),
        ("ten", "not understood"),
        ("8388608T", "more than the maximum"),
        ("9" * 5000, "has 5000 digits"),
        ("0." + "0" * 5000 + "1T", "has 5003 digits"),
    ],
)
def test_rejected_with_reason(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as info:
        parse_size(text)
    if text.strip() and len(text) < 40:
        assert repr(text) in str(info.value)


def test_rejects_non_strings() -> None:
    with pytest.raises(ConfigError, match="must be a string"):
        parse_size(1024)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "text"),
    [(1, "1"), (1000, "1000"), (K, "1K"), (1536, "1536"), (3 * M, "3M"), (G, "1G"), (T, "1T")],
)
def test_format(value: int, text: str) -> None:
    assert format_size(value) == text


@given(st.integers(1, (1 << 63) - 1))
def test_format_round_trips(value: int) -> None:
    assert parse_size(format_size(value)) == value
