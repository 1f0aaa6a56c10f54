"""Layer 1 for the guest tools: sizes, the page pattern, the /proc parsers, line output."""

from __future__ import annotations

import itertools
import os
import pty
import struct
import threading
import tty
from pathlib import Path

import pytest
from conftest import kernel_root
from hypothesis import given, settings
from hypothesis import strategies as st

from stress import procfs
from stress.lineout import LineOutError, LineWriter
from stress.pattern import (
    CHUNK_PAGES,
    HEADER,
    MAGIC,
    PAGE_SIZE,
    ChunkPattern,
    diff_page,
    expected_page,
)
from stress.sizes import SizeError, format_size, parse_size

# --------------------------------------------------------------------------- sizes

SIZE_TABLE = [
    ("4096", 4096),
    ("1", 1),
    ("1K", 1024),
    ("64M", 64 * 1024**2),
    ("64m", 64 * 1024**2),
    ("2G", 2 * 1024**3),
    ("2GiB", 2 * 1024**3),
    ("2GB", 2 * 1024**3),
    ("1T", 1024**4),
    ("1.5G", 3 * 1024**3 // 2),
    ("0.5K", 512),
    (" 8M ", 8 * 1024**2),
    ("100B", 100),
]


@pytest.mark.parametrize(("text", "value"), SIZE_TABLE)
def test_parse_size_table(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "-1M", "12X", "1..2M", "0", "0K", "1 M B", "0.0001K"])
def test_parse_size_rejects_with_a_clear_message(text: str) -> None:
    with pytest.raises(SizeError) as info:
        parse_size(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize(
    ("value", "text"), [(4096, "4K"), (64 * 1024**2, "64M"), (3 * 1024**3, "3G"), (1000, "1000")]
)
def test_format_size(value: int, text: str) -> None:
    assert format_size(value) == text
    assert parse_size(format_size(value)) == value


# --------------------------------------------------------------------------- pattern


def test_expected_page_layout() -> None:
    page = expected_page(worker=3, page=77, generation=5)
    assert len(page) == PAGE_SIZE
    assert page.count(0) < PAGE_SIZE // 16  # overwhelmingly non-zero, never a zero page
    magic, number, worker, generation, tag = HEADER.unpack_from(page, 0)
    assert (magic, number, worker, generation) == (MAGIC, 77, 3, 5)
    assert tag != 0
    assert page[-HEADER.size :] == page[: HEADER.size]  # trailer repeats the header
    # the fill is not a constant byte: every 8-byte word in the middle differs from its neighbour
    words = struct.unpack_from("=504Q", page, HEADER.size)
    assert all(a != b for a, b in itertools.pairwise(words))


def test_expected_page_encodes_every_coordinate() -> None:
    base = expected_page(1, 2, 3)
    assert base != expected_page(0, 2, 3)
    assert base != expected_page(1, 1, 3)
    assert base != expected_page(1, 2, 4)
    # the fill itself changes with worker and generation, not only the header
    assert base[HEADER.size : -HEADER.size] != expected_page(0, 2, 3)[HEADER.size : -HEADER.size]
    assert base[HEADER.size : -HEADER.size] != expected_page(1, 2, 4)[HEADER.size : -HEADER.size]
    assert base[HEADER.size : -HEADER.size] == expected_page(1, 9, 3)[HEADER.size : -HEADER.size]


@settings(max_examples=40, deadline=None)
@given(
    worker=st.integers(0, 2**16),
    generation=st.integers(0, 2**20),
    first=st.integers(0, 2**30),
    npages=st.integers(1, CHUNK_PAGES),
)
def test_chunk_pattern_matches_page_by_page(
    worker: int, generation: int, first: int, npages: int
) -> None:
    pattern = ChunkPattern(worker, generation)
    pattern.chunk(first + 12345, CHUNK_PAGES)  # a previous chunk must leave no trace
    chunk = bytes(pattern.chunk(first, npages))
    assert len(chunk) == npages * PAGE_SIZE
    for i in (0, npages // 2, npages - 1):
        assert chunk[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] == expected_page(
            worker, first + i, generation
        )


def test_chunk_pattern_rejects_bad_sizes() -> None:
    pattern = ChunkPattern(0, 0)
    with pytest.raises(ValueError, match="npages"):
        pattern.chunk(0, 0)
    with pytest.raises(ValueError, match="npages"):
        pattern.chunk(0, CHUNK_PAGES + 1)


def test_diff_page_reports_first_block_and_count() -> None:
    good = expected_page(2, 300, 0)
    assert diff_page(good, good) is None
    bad = bytearray(good)
    bad[8] ^= 0x01
    bad[2000] ^= 0xFF
    diff = diff_page(bytes(bad), good)
    assert diff is not None
    assert diff.offset == 8
    assert diff.bad_bytes == 2
    assert diff.expected == good[:32].hex()
    assert diff.found == bytes(bad[:32]).hex()
    assert len(diff.found) == 64


# --------------------------------------------------------------------------- procfs


def test_parse_vmstat_keeps_unknown_fields_in_order() -> None:
    parsed = procfs.parse_vmstat("pswpin 5\nbrand_new_counter 7\n\npswpout 9\n")
    assert list(parsed.items()) == [("pswpin", 5), ("brand_new_counter", 7), ("pswpout", 9)]


@pytest.mark.parametrize("text", ["pswpin\n", "pswpin 1 2\n", "pswpin x\n"])
def test_parse_vmstat_rejects_bad_lines(text: str) -> None:
    with pytest.raises(procfs.ProcFormatError, match="vmstat"):
        procfs.parse_vmstat(text)


def test_parse_meminfo_bytes_and_counts() -> None:
    parsed = procfs.parse_meminfo("MemTotal:  2014980 kB\nHugePages_Total:       3\n")
    assert parsed == {"MemTotal": 2014980 * 1024, "HugePages_Total": 3}
    with pytest.raises(procfs.ProcFormatError, match="unit"):
        procfs.parse_meminfo("MemTotal: 5 MB\n")
    with pytest.raises(procfs.ProcFormatError, match="meminfo"):
        procfs.parse_meminfo("garbage\n")


def test_parse_psi() -> None:
    parsed = procfs.parse_psi(
        "some avg10=1.50 avg60=0.25 avg300=0.00 total=1234\n"
        "full avg10=0.75 avg60=0.00 avg300=0.00 total=99\n"
    )
    assert parsed == {
        "some": {"avg10": 1.5, "avg60": 0.25, "avg300": 0.0, "total": 1234},
        "full": {"avg10": 0.75, "avg60": 0.0, "avg300": 0.0, "total": 99},
    }
    with pytest.raises(procfs.ProcFormatError, match="pressure"):
        procfs.parse_psi("some avg10\n")


def test_parse_swaps_fixture() -> None:
    text = procfs.read_text("swaps", str(kernel_root("linux-6.1", "t1")))
    assert text is not None
    assert procfs.parse_swaps(text) == [
        {
            "filename": "/dev/vdb",
            "type": "partition",
            "size_bytes": 262140 * 1024,
            "used_bytes": 5248 * 1024,
            "priority": -2,
        }
    ]


def test_parse_netstat_fixture() -> None:
    text = procfs.read_text("net/netstat", str(kernel_root("linux-6.12", "t1")))
    assert text is not None
    parsed = procfs.parse_netstat(text)
    # The captured guest had no network traffic: the figures are zeros, the layout real.
    assert {name: len(fields) for name, fields in parsed.items()} == {
        "TcpExt": 131,
        "IpExt": 18,
        "MPTcpExt": 75,
    }
    assert parsed["TcpExt"]["PFMemallocDrop"] == 0
    # Names and values pair up by column.
    assert procfs.parse_netstat("TcpExt: A B C\nTcpExt: 1 2 3\n") == {
        "TcpExt": {"A": 1, "B": 2, "C": 3}
    }
    with pytest.raises(procfs.ProcFormatError, match="does not match"):
        procfs.parse_netstat("TcpExt: A B\nIpExt: 1 2\n")


def test_parse_diskstats_live_host() -> None:
    """Every device of this machine's /proc/diskstats, each with the eleven counters."""
    text = procfs.read_text("diskstats")
    assert text is not None, "the host has no /proc/diskstats"
    parsed = procfs.parse_diskstats(text)
    assert list(parsed) == [line.split()[2] for line in text.splitlines() if line.strip()]
    for name, fields in parsed.items():
        assert tuple(fields) == procfs.DISKSTATS_FIELDS, name
        assert all(value >= 0 for value in fields.values()), name


def test_parse_diskstats_every_kernel_layout() -> None:
    """Linux 4.18 added four discard columns and 5.5 two flush columns: the first eleven
    are the same in all three layouts."""
    counters = "48836 135055 1471128 152676 27535 200990 1828200 823287 3 42060 975963"
    expected = dict(zip(procfs.DISKSTATS_FIELDS, map(int, counters.split()), strict=True))
    for extra in ("", " 0 0 0 0", " 0 0 0 0 0 0"):
        assert procfs.parse_diskstats(f"  43       0 nbd0 {counters}{extra}\n") == {
            "nbd0": expected
        }
    with pytest.raises(procfs.ProcFormatError, match=r"at least 14 columns.*nbd1"):
        procfs.parse_diskstats(" 43 32 nbd1 1 2 3\n")
    with pytest.raises(procfs.ProcFormatError, match=r"non-integer column.*vda"):
        procfs.parse_diskstats(" 254 0 vda 1 2 3 4 5 6 7 x 9 10 11\n")


def test_read_text_missing_is_none(tmp_path: Path) -> None:
    assert procfs.read_text("pressure/memory", str(tmp_path)) is None


# --------------------------------------------------------------------------- line output


def test_line_writer_regular_file_appends(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text('{"old":1}\n')
    with LineWriter(str(path)) as writer:
        writer.write_json({"a": 1})
        writer.write_json({"b": [1, 2]})
        assert writer.lines_written == 2
    assert path.read_text() == '{"old":1}\n{"a":1}\n{"b":[1,2]}\n'


def test_line_writer_survives_eagain_on_a_full_nonblocking_pipe() -> None:
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    received = bytearray()

    def reader() -> None:
        while chunk := os.read(read_fd, 4096):
            received.extend(chunk)

    thread = threading.Thread(target=reader)
    writer = LineWriter(f"/dev/fd/{write_fd}")
    os.set_blocking(writer.fileno(), False)
    lines = [f"{i:06d}:" + "x" * 1000 for i in range(600)]  # 600 KB, ~10x a pipe buffer
    thread.start()
    try:
        for line in lines:
            writer.write_line(line)
    finally:
        writer.close()
        os.close(write_fd)
        thread.join()
        os.close(read_fd)
    assert received.decode().splitlines() == lines


def test_line_writer_broken_pipe_is_an_error_not_silence() -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    writer = LineWriter(f"/dev/fd/{write_fd}")
    try:
        with pytest.raises(LineOutError, match=r"write to .*/dev/fd/.* failed after 0 lines"):
            writer.write_line("lost?")
    finally:
        writer.close()
        os.close(write_fd)


def test_line_writer_character_device_pty() -> None:
    master, slave = pty.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    assert os.path.exists(path)
    try:
        with LineWriter(path) as writer:
            writer.write_json({"type": "sample", "seq": 0})
            writer.write_json({"type": "sample", "seq": 1})
        data = b""
        while data.count(b"\n") < 2:
            data += os.read(master, 4096)
    finally:
        os.close(master)
        os.close(slave)
    assert data == b'{"type":"sample","seq":0}\n{"type":"sample","seq":1}\n'


def test_line_writer_open_error_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(LineOutError, match=r"cannot open .*no-such-dir"):
        LineWriter(str(tmp_path / "no-such-dir" / "x.jsonl"))
