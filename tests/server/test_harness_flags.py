"""The flags nbd-serve offers its harness: --exit-with-parent and the test-only --fault."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from nbdserver.backends import open_backend
from nbdserver.backends.fault import FLIP_AT, FaultBackend, parse_fault
from nbdserver.errors import ConfigError

from .nbdtest import NBD_SERVE, nbdsh_script, require_python3_libnbd, running_server

PAGE = 4096


def page(tag: bytes, fill: int) -> bytes:
    return tag + bytes([fill]) * (PAGE - len(tag))


def test_fault_spec_is_parsed_and_bad_specs_are_refused() -> None:
    spec = parse_fault("corrupt-read-after=5,match=SWAPNBD1")
    assert (spec.corrupt_read_after, spec.match) == (5, b"SWAPNBD1")
    assert parse_fault("corrupt-read-after=0").match == b""
    for bad in ("", "corrupt-read-after", "corrupt-read-after=-1", "flip=3", "x=1,match=A"):
        with pytest.raises(ConfigError, match="--fault"):
            parse_fault(bad)


def test_fault_backend_corrupts_one_matching_page_once_and_in_the_store() -> None:
    inner = open_backend("memory", size=16 * PAGE)
    backend = FaultBackend(inner, parse_fault("corrupt-read-after=2,match=MAGIC"))
    inner.pwrite(page(b"other", 1) + page(b"MAGIC", 2) + page(b"MAGIC", 3), 0, False)
    clean = bytes(inner.pread(0, 3 * PAGE))
    assert bytes(backend.pread(0, 3 * PAGE)) == clean  # read 1
    assert bytes(backend.pread(0, 3 * PAGE)) == clean  # read 2
    got = bytearray(3 * PAGE)
    backend.pread_into(memoryview(got), 0)  # read 3: the first MAGIC page is hit
    diff = [i for i in range(len(got)) if got[i] != clean[i]]
    assert diff == [PAGE + FLIP_AT]
    assert got[PAGE + FLIP_AT] == clean[PAGE + FLIP_AT] ^ 0xFF
    assert bytes(inner.pread(PAGE, PAGE)) == bytes(got[PAGE : 2 * PAGE])  # written back
    again = bytes(backend.pread(0, 3 * PAGE))
    assert again == bytes(got)  # once only: the store keeps the flip, nothing new is flipped
    assert backend.sendfile_source(0, PAGE) == -1
    backend.close()


def test_fault_through_a_real_client(tmp_path: Path) -> None:
    python = require_python3_libnbd()
    with running_server(
        tmp_path, "--memory", "1M", "--fault", "corrupt-read-after=1,match=MAGIC"
    ) as srv:
        body = f"""
h = nbd.NBD()
h.connect_uri(URI)
data = b"MAGIC" + b"\\x07" * ({PAGE} - 5)
h.pwrite(data, 8192)
first = h.pread({PAGE}, 8192)
second = h.pread({PAGE}, 8192)
print(json.dumps([first == data, [i for i in range({PAGE}) if second[i] != data[i]]]))
"""
        out = nbdsh_script(python, srv.uri(), body)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == [True, [FLIP_AT]]
        assert "fault: corrupted READ #2" in srv.log()
        assert f"export offset {8192}" in srv.log()


def test_unknown_fault_is_a_usage_error(tmp_path: Path) -> None:
    out = subprocess.run(
        [NBD_SERVE, "--memory", "1M", "--fault", "explode=1"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 2
    assert "--fault 'explode=1' is not understood" in out.stderr


INTERMEDIATE = """
import subprocess, sys, time
log = open(sys.argv[1], "wb")
proc = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stderr=log)
print(proc.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("flag", [True, False])
def test_exit_with_parent_ends_the_server_when_its_parent_is_killed(
    tmp_path: Path, flag: bool
) -> None:
    ready = tmp_path / "ready.json"
    argv = [NBD_SERVE, "--port", "0", "--ready-file", str(ready), "--memory", "1M"]
    if flag:
        argv.append("--exit-with-parent")
    parent = subprocess.Popen(
        [sys.executable, "-c", INTERMEDIATE, str(tmp_path / "serve.log"), *argv],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    server = psutil.Process(int(parent.stdout.readline()))
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert time.monotonic() < deadline, "nbd-serve never became ready"
            time.sleep(0.05)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        gone, _alive = psutil.wait_procs([server], timeout=10 if flag else 3)
        if flag:
            assert gone, "nbd-serve --exit-with-parent outlived its parent"
            assert "parent process" in (tmp_path / "serve.log").read_text()
        else:
            assert not gone, "without the flag the server must keep serving"
    finally:
        parent.stdout.close()
        if server.is_running():
            server.kill()
