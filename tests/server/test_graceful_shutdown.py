"""SIGTERM with requests in flight (doc/proto.md "Terminating the transmission phase"):
"On a server shutdown, the server SHOULD wait for inflight requests to be serviced prior
to initiating a hard disconnect ... The error value issued in respect of these requests
and any subsequently received requests SHOULD be ESHUTDOWN. If the client receives an
ESHUTDOWN error it MUST initiate a soft disconnect."

A slow FLUSH (``--fault flush-delay-ms``) is in flight when the signal comes: it finishes
and gets its success reply, requests sent after the signal get ESHUTDOWN (108), the
exports are flushed, the client's NBD_CMD_DISC ends the connection, and the process
exits 0; a client that never disconnects is cut off after the grace period."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import psutil
import pytest

from nbdserver.backends.fault import parse_fault
from nbdserver.errors import NBDErrno
from nbdserver.protocol import Cmd

from .nbdtest import STARTUP_GUARD_S, RawClient, ServerProcess, running_server

ESHUTDOWN = 108
FLUSH_DELAY_MS = 1500


def wait_log(server: ServerProcess, text: str) -> None:
    deadline = time.monotonic() + STARTUP_GUARD_S
    while text not in server.log():
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{server.log()}"
        time.sleep(0.01)


def test_eshutdown_is_the_spec_errno() -> None:
    assert NBDErrno.ESHUTDOWN == ESHUTDOWN
    spec = parse_fault("flush-delay-ms=250")
    assert (spec.flush_delay_ms, spec.corrupt_read_after) == (250, None)
    assert parse_fault("corrupt-read-after=1,flush-delay-ms=5").corrupt_read_after == 1


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_finishes_in_flight_and_refuses_the_rest(tmp_path: Path, workers: str) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 << 20))
    stats = tmp_path / "stats.jsonl"
    args = [str(image), "--workers", workers, "--fault", f"flush-delay-ms={FLUSH_DELAY_MS}"]
    args += ["--stats", str(stats)]
    payload = b"\x5e" * 65536
    with running_server(tmp_path, *args) as server:
        processes = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children()]
        with RawClient(server.port) as c:
            c.go(structured=False)
            c.request(Cmd.WRITE, 0, len(payload), cookie=1, payload=payload)
            assert c.simple_reply()[0].error == 0
            c.request(Cmd.FLUSH, cookie=2)  # sleeps FLUSH_DELAY_MS in the backend
            time.sleep(0.3)  # let the server take it in
            server.proc.send_signal(signal.SIGTERM)
            wait_log(server, "shutting down")
            c.request(Cmd.WRITE, 65536, 4096, cookie=3, payload=b"\x01" * 4096)
            c.request(Cmd.READ, 0, 4096, cookie=4)
            c.request(Cmd.FLUSH, cookie=5)
            replies = [c.simple_reply()[0] for _ in range(4)]
            by_cookie = {r.cookie: r.error for r in replies}
            assert by_cookie == {2: 0, 3: ESHUTDOWN, 4: ESHUTDOWN, 5: ESHUTDOWN}, replies
            # The refusals come at once; the FLUSH in flight is answered when it is done.
            assert [r.cookie for r in replies][-1] == 2, replies
            c.request(Cmd.DISC)  # the soft disconnect the spec asks of the client
            assert c.at_eof()
        code = server.proc.wait(timeout=STARTUP_GUARD_S)
        assert code == 0, server.log()
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes)
    log = server.log()
    assert "Traceback" not in log and "Fatal error" not in log, log
    assert "flushed at shutdown" in log, log
    assert image.read_bytes()[:65536] == payload
    assert image.read_bytes()[65536 : 65536 + 4096] == bytes(4096), "a refused WRITE was done"
    last = json.loads(stats.read_text().splitlines()[-1])["exports"][""]
    assert last["requests"]["flush"] == 2 and last["errors"]["flush"] == 1
    assert last["errors"]["write"] == 1 and last["errors"]["read"] == 1


def test_a_client_that_never_disconnects_is_cut_off_after_the_grace(tmp_path: Path) -> None:
    args = ["--memory", "8M", "--workers", "1", "--shutdown-grace", "0.5"]
    with running_server(tmp_path, *args) as server, RawClient(server.port) as c:
        c.go(structured=False)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        wait_log(server, "shutting down")
        c.request(Cmd.READ, 0, 512, cookie=7)
        reply, _ = c.simple_reply()
        assert (reply.cookie, reply.error) == (7, ESHUTDOWN)
        # No DISC from this client: the server hangs up once the grace is over.
        assert c.at_eof()
        assert server.proc.wait(timeout=STARTUP_GUARD_S) == 0
        assert time.monotonic() - started < STARTUP_GUARD_S
    assert "Traceback" not in server.log()
    assert "grace period" in server.log()
