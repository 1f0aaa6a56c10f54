"""FLUSH and FUA mean stable storage: a syscall trace shows the sync before the reply.

Reading the data back cannot tell a synced write from one left in the page cache, so this
test watches the server instead. nbd-serve runs under ``strace -f -T``; a real libnbd client
writes, flushes, writes with FUA, trims with FUA and writes zeroes with FUA on a file
export. For each reply (found by its cookie in the bytes the server sends) the trace must
show, on the export's own descriptor:

- FLUSH: an ``fdatasync`` that completed after the earlier write returned and before the
  reply left;
- FUA on WRITE, TRIM and WRITE_ZEROES: the data change itself (``pwrite``/``pwritev2`` at
  the request's offset, or ``fallocate`` over its range) and, after it returned, an
  ``fdatasync`` that completed before the reply (or the write was ``RWF_DSYNC``).

A sync on another descriptor, a sync before the write (``fdatasync`` then ``pwrite``), or a
missing sync on TRIM or WRITE_ZEROES fails this test: that is its point, and
:func:`test_the_trace_reader_sees_a_missing_or_misplaced_sync` proves the reader catches
each.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from server.nbdtest import nbdsh_script, require_python3_libnbd, running_server

pytestmark = pytest.mark.interop

_LINE = re.compile(r"^(?P<pid>\d+)\s+(?P<time>\d+\.\d+)\s+(?P<rest>.*)$")
_HEX = re.compile(r"\\x([0-9a-f]{2})")
_DURATION = re.compile(r"\s+<(\d+\.\d+)>$")


@dataclass(frozen=True)
class Call:
    pid: int
    start: float
    """When the call was entered."""
    end: float
    """When it returned (entry plus strace -T's duration)."""
    name: str
    text: str
    """The whole call (unfinished and resumed halves joined)."""
    result: str

    @property
    def fd(self) -> int | None:
        match = re.match(r"\w+\((\d+)", self.text)
        return int(match[1]) if match else None

    @property
    def ok(self) -> bool:
        return not self.result.strip().startswith("-1")


def parse_trace(text: str) -> list[Call]:
    """``strace -f -ttt -T`` output -> completed calls, in the order they returned."""
    pending: dict[tuple[int, str], tuple[float, str]] = {}
    calls = []
    for raw in text.splitlines():
        match = _LINE.match(raw)
        if match is None:
            continue
        pid, stamp, rest = int(match["pid"]), float(match["time"]), match["rest"]
        unfinished = re.match(r"(\w+)\((.*) <unfinished \.\.\.>$", rest)
        if unfinished:
            pending[(pid, unfinished[1])] = (stamp, unfinished[1] + "(" + unfinished[2])
            continue
        duration = _DURATION.search(rest)
        spent = float(duration[1]) if duration else 0.0
        if duration:
            rest = rest[: duration.start()]
        start, end = stamp, stamp + spent
        resumed = re.match(r"<\.\.\. (\w+) resumed>(.*)$", rest)
        if resumed:
            began, head = pending.pop((pid, resumed[1]), (stamp, resumed[1] + "("))
            rest = head + resumed[2]
            start, end = began, max(stamp, began + spent)
        call = re.match(r"(\w+)\((.*)\)\s+=\s+(.*)$", rest)
        if call:
            calls.append(Call(pid, start, end, call[1], rest, call[3]))
    return sorted(calls, key=lambda c: c.end)


def sent_bytes(call: Call) -> bytes:
    """The bytes a send/write call carried (strace -xx prints every byte as \\xNN)."""
    return bytes(int(h, 16) for h in _HEX.findall(call.text))


def reply_time(calls: list[Call], cookie: int) -> float:
    """When the reply carrying ``cookie`` started to leave (a simple or structured header)."""
    want = cookie.to_bytes(8, "big")
    for call in calls:
        if call.name not in ("sendmsg", "sendto", "write", "writev"):
            continue
        data = sent_bytes(call)
        for magic in (b"\x67\x44\x66\x98", b"\x66\x8e\x33\xef"):
            start = data.find(magic)
            while start != -1:
                if data[start + 8 : start + 16] == want:
                    return call.start
                start = data.find(magic, start + 1)
    raise AssertionError(f"no reply with cookie {cookie} in the trace")


def export_fd(calls: list[Call]) -> int:
    """The export's descriptor: the one the first data write went to."""
    for call in calls:
        if call.name in ("pwrite64", "pwritev2") and call.ok and call.fd is not None:
            return call.fd
    raise AssertionError("the trace saw no data write")


def _covers(call: Call, offset: int) -> bool:
    """Whether a pwrite/pwritev2/fallocate call touches the byte at ``offset``."""
    numbers = [int(n) for n in re.findall(r"(?<![\w\\])(\d+)(?![\w])", call.text)]
    if call.name == "fallocate":  # fallocate(fd, mode, offset, len)
        tail = numbers[-3:-1] if len(numbers) >= 3 else []
        return len(tail) == 2 and tail[0] <= offset < tail[0] + tail[1]
    return offset in numbers  # pwrite64(fd, buf, count, offset) / pwritev2(..., offset, flags)


def change_then_sync(
    calls: list[Call], fd: int, after: float, reply: float, *, change: str, offset: int
) -> str | None:
    """None when the change at ``offset`` reached stable storage before ``reply``; else why not.

    The change (``write``: pwrite64/pwritev2, ``fallocate``) must be on ``fd`` and return
    after ``after``; then either it was an RWF_DSYNC write, or an fdatasync/fsync of ``fd``
    entered after the change returned and completed before the reply left.
    """
    names = ("pwrite64", "pwritev2") if change == "write" else ("fallocate",)
    changes = [
        c
        for c in calls
        if c.name in names and c.fd == fd and c.ok and after < c.end <= reply and _covers(c, offset)
    ]
    if not changes:
        return f"no {change} at offset {offset} on fd {fd} before the reply"
    last = changes[-1]
    if last.name == "pwritev2" and "RWF_DSYNC" in last.text:
        return None
    syncs = [c for c in calls if c.name in ("fdatasync", "fsync") and c.ok and c.end <= reply]
    if any(c.fd == fd and c.start >= last.end for c in syncs):
        return None
    if any(c.fd == fd for c in syncs if c.start < last.end and c.end > after):
        return f"fd {fd} was synced before its {change} returned, not after"
    if any(c.fd != fd for c in syncs if c.end > after):
        return f"a sync went to another descriptor, not the export's fd {fd}"
    return f"no sync of fd {fd} after the {change} and before the reply"


def flushed(calls: list[Call], fd: int, after: float, reply: float) -> str | None:
    """None when an fdatasync of ``fd`` entered after ``after`` and completed before ``reply``."""
    for c in calls:
        synced = c.name in ("fdatasync", "fsync") and c.ok and c.fd == fd
        if synced and c.start >= after and c.end <= reply:
            return None
    return f"no sync of fd {fd} between the write's reply and the flush's reply"


def traced(pids: list[int], log: Path) -> subprocess.Popen[bytes]:
    """``strace`` attached to every process of the server, once each is traced."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is not installed: apt-get install strace")
    argv = [strace, "-f", "-q", "-ttt", "-T", "-xx", "-s", "256", "-o", str(log)]
    argv += ["-e", "trace=fdatasync,fsync,pwritev2,pwrite64,fallocate,sendmsg,sendto,write,writev"]
    for pid in pids:
        argv += ["-p", str(pid)]
    proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        tracers = [psutil.Process(pid).status() for pid in pids]  # raises if the server died
        status = [Path(f"/proc/{pid}/status").read_text() for pid in pids]
        if all("TracerPid:\t0" not in text for text in status) and tracers:
            return proc
        time.sleep(0.05)
    proc.kill()
    pytest.fail("strace did not attach to nbd-serve within 30 s")


def test_flush_and_fua_are_synced_before_their_replies(tmp_path: Path) -> None:
    python = require_python3_libnbd()
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\xff" * (1 << 20))
    trace = tmp_path / "trace.log"
    # The requests get libnbd's cookies 1 to 5, in order.
    body = (
        "h = nbd.NBD()\nh.connect_uri(URI)\n"
        "h.pwrite(b'\\xa5' * 4096, 0)\n"  # cookie 1: plain write
        "h.flush()\n"  # cookie 2: FLUSH
        "h.pwrite(b'\\x5a' * 4096, 8192, nbd.CMD_FLAG_FUA)\n"  # cookie 3: FUA write
        "h.trim(65536, 65536, nbd.CMD_FLAG_FUA)\n"  # cookie 4: FUA trim of [64K, 128K)
        "h.zero(65536, 262144, nbd.CMD_FLAG_FUA)\n"  # cookie 5: FUA zeroes on [256K, 320K)
        "h.shutdown()\n"
    )
    with running_server(tmp_path, "--workers", "1", str(disk)) as server:
        top = psutil.Process(server.proc.pid)
        pids = [top.pid, *(child.pid for child in top.children(recursive=True))]
        tracer = traced(pids, trace)
        try:
            done = nbdsh_script(python, server.uri(), body)
            assert done.returncode == 0, done.stderr
        finally:
            tracer.send_signal(signal.SIGINT)  # detach; the server goes on
            tracer.wait(timeout=30)
        assert server.alive()
    calls = parse_trace(trace.read_text())
    fd = export_fd(calls)
    at = [reply_time(calls, cookie) for cookie in range(1, 6)]
    assert at == sorted(at), at
    plain, flush, fua, trim, zero = at
    assert flushed(calls, fd, plain, flush) is None
    assert change_then_sync(calls, fd, flush, fua, change="write", offset=8192) is None
    assert change_then_sync(calls, fd, fua, trim, change="fallocate", offset=65536) is None
    assert change_then_sync(calls, fd, trim, zero, change="fallocate", offset=262144) is None
    data = disk.read_bytes()
    assert data[8192:12288] == b"\x5a" * 4096
    assert data[65536:131072] == bytes(65536)  # a punched hole reads as zeroes
    assert data[131072:262144] == b"\xff" * 131072
    assert data[262144:327680] == bytes(65536)


TRACE_HEAD = (
    '10 100.000001 pwrite64(5, "\\xa5", 4096, 0) = 4096 <0.000001>\n'
    '10 100.000002 sendmsg(7, {msg_iov=[{iov_base="\\x67\\x44\\x66\\x98\\x00\\x00\\x00'
    '\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x01"}]}, 0) = 16 <0.000001>\n'
)


def reply(cookie: int, at: str) -> str:
    return (
        f'10 {at} sendmsg(7, {{msg_iov=[{{iov_base="\\x67\\x44\\x66\\x98\\x00\\x00'
        f'\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x{cookie:02x}"}}]}}, 0) = 16 <0.000001>\n'
    )


@pytest.mark.parametrize(
    ("middle", "why"),
    [
        # As the server does it: write, then fdatasync of the export, then the reply.
        (
            '11 100.000010 pwrite64(5, "\\x5a", 4096, 8192) = 4096 <0.000002>\n'
            "11 100.000020 fdatasync(5 <unfinished ...>\n"
            "11 100.000090 <... fdatasync resumed>) = 0 <0.000070>\n",
            None,
        ),
        # RWF_DSYNC: the write itself is durable.
        (
            '11 100.000010 pwritev2(5, [{iov_base="\\x5a", iov_len=4096}], 1, 8192, '
            "RWF_DSYNC) = 4096 <0.000050>\n",
            None,
        ),
        # Mutation: a FUA that syncs, then writes.
        (
            "11 100.000010 fdatasync(5) = 0 <0.000030>\n"
            '11 100.000050 pwrite64(5, "\\x5a", 4096, 8192) = 4096 <0.000002>\n',
            "fd 5 was synced before its write returned, not after",
        ),
        # Mutation: the sync went to another descriptor.
        (
            '11 100.000010 pwrite64(5, "\\x5a", 4096, 8192) = 4096 <0.000002>\n'
            "11 100.000020 fdatasync(9) = 0 <0.000030>\n",
            "a sync went to another descriptor, not the export's fd 5",
        ),
        # Mutation: no sync at all.
        (
            '11 100.000010 pwrite64(5, "\\x5a", 4096, 8192) = 4096 <0.000002>\n',
            "no sync of fd 5 after the write and before the reply",
        ),
    ],
)
def test_the_trace_reader_sees_a_missing_or_misplaced_sync(middle: str, why: str | None) -> None:
    """The checker itself, on FUA writes: each wrong order is caught and named."""
    calls = parse_trace(TRACE_HEAD + middle + reply(3, "100.000200"))
    fd = export_fd(calls)
    assert fd == 5
    first, fua = reply_time(calls, 1), reply_time(calls, 3)
    assert change_then_sync(calls, fd, first, fua, change="write", offset=8192) == why


@pytest.mark.parametrize(
    ("middle", "why"),
    [
        (
            "11 100.000010 fallocate(5, FALLOC_FL_KEEP_SIZE|FALLOC_FL_PUNCH_HOLE, 65536, "
            "65536) = 0 <0.000004>\n"
            "11 100.000020 fdatasync(5) = 0 <0.000030>\n",
            None,
        ),
        # Mutation: the FUA sync removed from TRIM (backends/file.py).
        (
            "11 100.000010 fallocate(5, FALLOC_FL_KEEP_SIZE|FALLOC_FL_PUNCH_HOLE, 65536, "
            "65536) = 0 <0.000004>\n",
            "no sync of fd 5 after the fallocate and before the reply",
        ),
        # A trim that never reached the file is not durable either.
        (
            "11 100.000020 fdatasync(5) = 0 <0.000030>\n",
            "no fallocate at offset 65536 on fd 5 before the reply",
        ),
    ],
)
def test_a_fua_trim_needs_its_own_sync(middle: str, why: str | None) -> None:
    calls = parse_trace(TRACE_HEAD + middle + reply(4, "100.000200"))
    first, trim = reply_time(calls, 1), reply_time(calls, 4)
    assert change_then_sync(calls, 5, first, trim, change="fallocate", offset=65536) == why


def test_a_flush_must_sync_the_export_after_the_write() -> None:
    synced = TRACE_HEAD + "11 100.000020 fdatasync(5) = 0 <0.000030>\n" + reply(2, "100.0002")
    calls = parse_trace(synced)
    assert flushed(calls, 5, reply_time(calls, 1), reply_time(calls, 2)) is None
    other = TRACE_HEAD + "11 100.000020 fdatasync(6) = 0 <0.000030>\n" + reply(2, "100.0002")
    calls = parse_trace(other)
    assert flushed(calls, 5, reply_time(calls, 1), reply_time(calls, 2)) == (
        "no sync of fd 5 between the write's reply and the flush's reply"
    )
