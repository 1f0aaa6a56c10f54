"""Socket activation (LISTEN_FDS) and captive mode (``nbdinfo [ nbd-serve ... ]``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from nbdserver.activation import ActivationError, activation_fds

from .nbdtest import NBD_SERVE, require_tool

# --------------------------------------------------------------------------- pure


@pytest.mark.parametrize(
    ("env", "pid", "fds"),
    [
        ({}, 42, []),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "1"}, 42, [3]),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "3", "LISTEN_FDNAMES": "a:b:c"}, 42, [3, 4, 5]),
        ({"LISTEN_PID": "41", "LISTEN_FDS": "1"}, 42, []),  # meant for another process
        ({"LISTEN_FDS": "1"}, 42, []),
    ],
)
def test_activation_fds(env: dict[str, str], pid: int, fds: list[int]) -> None:
    assert activation_fds(env, pid) == fds
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(env), "variables are unset"


@pytest.mark.parametrize(
    ("value", "message"),
    [("x", "LISTEN_FDS='x' is not a number"), ("0", "LISTEN_FDS=0: socket activation passed")],
)
def test_bad_activation_variables(value: str, message: str) -> None:
    with pytest.raises(ActivationError, match=message):
        activation_fds({"LISTEN_PID": "7", "LISTEN_FDS": value}, 7)


# --------------------------------------------------------------------------- real processes


def clean_log(text: str) -> None:
    assert "Traceback" not in text and "Fatal error" not in text, text


@pytest.mark.interop
def test_captive_mode_under_nbdinfo(tmp_path: Path) -> None:
    """``nbdinfo -- [ nbd-serve ... ]``: libnbd binds, starts nbd-serve, asks, stops it."""
    nbdinfo = require_tool("nbdinfo")
    done = subprocess.run(
        [nbdinfo, "--json", "--", "[", NBD_SERVE, "--memory", "64M", "--workers", "2", "]"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    (export,) = info["exports"]
    assert export["export-size"] == 64 * 1024 * 1024
    assert export["can_multi_conn"] is True
    assert "listening on " in done.stderr and "activated" not in done.stderr
    clean_log(done.stderr)


@pytest.mark.interop
def test_systemd_socket_activate_on_a_unix_socket(tmp_path: Path) -> None:
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.fail("systemd-socket-activate is missing: apt-get install systemd")
    nbdinfo = require_tool("nbdinfo")
    path = tmp_path / "nbd.sock"
    log = tmp_path / "server.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [activate, "-l", str(path), NBD_SERVE, "--memory", "32M", "--name", "swap"],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 30
        while not path.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.05)
        done = subprocess.run(
            [nbdinfo, "--size", f"nbd+unix:///swap?socket={path}"],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr + log.read_text()
        assert done.stdout.strip() == str(32 * 1024 * 1024)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    text = log.read_text()
    assert f"listening on {path}" in text
    clean_log(text)


@pytest.mark.interop
def test_activated_tcp_socket_is_served_and_reported(tmp_path: Path) -> None:
    """A TCP socket bound by the test (port 0, confirmed) and passed as fd 3."""
    nbdinfo = require_tool("nbdinfo")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    ready = tmp_path / "ready.json"
    log = tmp_path / "server.log"

    def hand_over() -> None:  # in the child, before exec: fd 3 and LISTEN_PID = its own pid
        os.dup2(listener.fileno(), 3)
        os.environ["LISTEN_PID"] = str(os.getpid())
        os.environ["LISTEN_FDS"] = "1"

    with log.open("wb") as err:
        proc = subprocess.Popen(
            [NBD_SERVE, "--memory", "16M", "--ready-file", str(ready), "--workers", "1"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            preexec_fn=hand_over,  # noqa: PLW1509 - fd 3 and LISTEN_PID belong to the child
            close_fds=False,
        )
    listener.close()
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        listen = json.loads(ready.read_text())["listen"]
        assert listen == [{"kind": "tcp", "host": "127.0.0.1", "port": port, "activated": True}]
        done = subprocess.run(
            [nbdinfo, "--size", f"nbd://127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == str(16 * 1024 * 1024)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    clean_log(log.read_text())
