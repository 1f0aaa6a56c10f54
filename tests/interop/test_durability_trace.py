"""FLUSH and FUA mean stable storage: a syscall trace shows the sync before the reply.

Reading the data back cannot tell a synced write from one left in the page
cache, so this test watches the server instead. nbd-serve runs under
``strace -f``; a real libnbd client writes, flushes and writes with FUA on a
file export; the trace must show, for each of those replies (found by its
cookie in the bytes the server sends), a completed ``fdatasync`` of the export
(FLUSH, and FUA's fallback) or a ``pwritev2(..., RWF_DSYNC)`` of the data (FUA)
*before* the reply left. Take the sync out of the file backend and this test
fails: that is its point.
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


@dataclass(frozen=True)
class Call:
    pid: int
    time: float
    name: str
    text: str
    """The whole call (unfinished and resumed halves joined)."""
    result: str


def parse_trace(text: str) -> list[Call]:
    """``strace -f -ttt`` output -> completed calls, stamped when they returned."""
    pending: dict[tuple[int, str], str] = {}
    calls = []
    for raw in text.splitlines():
        match = _LINE.match(raw)
        if match is None:
            continue
        pid, stamp, rest = int(match["pid"]), float(match["time"]), match["rest"]
        unfinished = re.match(r"(\w+)\((.*) <unfinished \.\.\.>$", rest)
        if unfinished:
            pending[(pid, unfinished[1])] = unfinished[1] + "(" + unfinished[2]
            continue
        resumed = re.match(r"<\.\.\. (\w+) resumed>(.*)$", rest)
        if resumed:
            head = pending.pop((pid, resumed[1]), resumed[1] + "(")
            rest = head + resumed[2]
        call = re.match(r"(\w+)\((.*)\)\s+=\s+(.*)$", rest)
        if call:
            calls.append(Call(pid, stamp, call[1], rest, call[3]))
    return calls


def sent_bytes(call: Call) -> bytes:
    """The bytes a send/write call carried (strace -xx prints every byte as \\xNN)."""
    return bytes(int(h, 16) for h in _HEX.findall(call.text))


def reply_time(calls: list[Call], cookie: int) -> float:
    """When the reply carrying ``cookie`` left (a simple or structured reply header)."""
    want = cookie.to_bytes(8, "big")
    for call in calls:
        if call.name not in ("sendmsg", "sendto", "write", "writev"):
            continue
        data = sent_bytes(call)
        for magic in (b"\x67\x44\x66\x98", b"\x66\x8e\x33\xef"):
            start = data.find(magic)
            while start != -1:
                if data[start + 8 : start + 16] == want:
                    return call.time
                start = data.find(magic, start + 1)
    raise AssertionError(f"no reply with cookie {cookie} in the trace")


def synced_before(calls: list[Call], when: float, *, dsync_write: bool) -> bool:
    """A sync of the export that completed (returned 0 or a byte count) before ``when``."""
    for call in calls:
        if call.time > when:
            break
        if call.name in ("fdatasync", "fsync") and call.result.strip() == "0":
            return True
        if dsync_write and call.name == "pwritev2" and "RWF_DSYNC" in call.text:
            return not call.result.startswith("-1")
    return False


def traced(pids: list[int], log: Path) -> subprocess.Popen[bytes]:
    """``strace`` attached to every process of the server, once each is traced."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is not installed: apt-get install strace")
    argv = [strace, "-f", "-q", "-ttt", "-xx", "-s", "256", "-o", str(log)]
    argv += ["-e", "trace=fdatasync,fsync,pwritev2,pwrite64,sendmsg,sendto,write,writev"]
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
    disk.write_bytes(b"\0" * (1 << 20))
    trace = tmp_path / "trace.log"
    # The three requests get libnbd's cookies 1, 2, 3, in order.
    body = (
        "h = nbd.NBD()\nh.connect_uri(URI)\n"
        "h.pwrite(b'\\xa5' * 4096, 0)\n"  # cookie 1: plain write
        "h.flush()\n"  # cookie 2: FLUSH
        "h.pwrite(b'\\x5a' * 4096, 8192, nbd.CMD_FLAG_FUA)\n"  # cookie 3: FUA write
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
    assert any(c.name in ("pwrite64", "pwritev2") for c in calls), "the trace saw no data write"
    plain_at = reply_time(calls, 1)
    flush_at = reply_time(calls, 2)
    fua_at = reply_time(calls, 3)
    assert plain_at < flush_at < fua_at
    # FLUSH: an fdatasync completed between the write's reply and the flush's reply.
    assert synced_before([c for c in calls if c.time > plain_at], flush_at, dsync_write=False)
    # FUA: its data reached stable storage before its reply (RWF_DSYNC or write + fdatasync).
    assert synced_before([c for c in calls if c.time > flush_at], fua_at, dsync_write=True)
    assert disk.read_bytes()[8192:12288] == b"\x5a" * 4096


def test_the_trace_reader_sees_a_missing_sync() -> None:
    """The checker itself: a reply with no sync before it is caught."""
    trace = (
        '10 100.000001 pwrite64(5, "\\xa5", 1, 0) = 1\n'
        '10 100.000002 sendmsg(7, {msg_iov=[{iov_base="\\x67\\x44\\x66\\x98\\x00\\x00\\x00'
        '\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x02"}]}, 0) = 16\n'
        "11 100.000003 fdatasync(5 <unfinished ...>\n"
        "11 100.000009 <... fdatasync resumed>) = 0\n"
    )
    calls = parse_trace(trace)
    assert [c.name for c in calls] == ["pwrite64", "sendmsg", "fdatasync"]
    when = reply_time(calls, 2)
    assert when == pytest.approx(100.000002)
    assert not synced_before(calls, when, dsync_write=False)
    assert synced_before(calls, 100.00001, dsync_write=False)
