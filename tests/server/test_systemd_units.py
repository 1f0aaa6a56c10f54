"""The systemd units shipped in nbdserver/systemd/: they pass ``systemd-analyze verify``,
and the service's own ExecStart, run under ``systemd-socket-activate`` on the socket
unit's kind of listener (TCP on loopback), serves nbdinfo."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

import nbdserver

from .nbdtest import NBD_SERVE, STARTUP_GUARD_S, require_tool, run_tool

UNITS = Path(nbdserver.__file__).parent / "systemd"
INSTALLED_BINARY = "/usr/local/bin/nbd-serve"
INSTALLED_CONFIG = "/etc/swapnbd/nbd-serve.toml"


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / name).read_text())
    return parser


def require_systemd_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: apt-get install systemd", pytrace=False)
    return path


def free_loopback_port() -> int:
    """A TCP port nobody listens on right now (bound and released: never a fixed port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_units_declare_what_nbd_serve_needs() -> None:
    sock = unit("nbd-serve.socket")
    assert sock["Socket"]["ListenStream"].startswith("127.0.0.1:"), "loopback by default"
    assert sock["Socket"]["Accept"] == "no", "one nbd-serve owns the listener"
    service = unit("nbd-serve.service")
    argv = shlex.split(service["Service"]["ExecStart"])
    assert argv[:3] == [INSTALLED_BINARY, "--config", INSTALLED_CONFIG]
    assert service["Service"]["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Unit"]["Requires"] == "nbd-serve.socket"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require_systemd_tool("systemd-analyze")
    # verify checks that ExecStart exists: point it at this environment's nbd-serve.
    for name in ("nbd-serve.socket", "nbd-serve.service"):
        text = (UNITS / name).read_text().replace(INSTALLED_BINARY, NBD_SERVE)
        (tmp_path / name).write_text(text)
    units = [str(tmp_path / "nbd-serve.socket"), str(tmp_path / "nbd-serve.service")]
    done = run_tool(analyze, "verify", "--man=no", *units)
    assert done.returncode == 0, done.stderr
    assert "Unknown" not in done.stderr and "Invalid" not in done.stderr, done.stderr


@pytest.mark.interop
def test_shipped_exec_start_under_socket_activation(tmp_path: Path) -> None:
    activate = require_systemd_tool("systemd-socket-activate")
    nbdinfo = require_tool("nbdinfo")
    config = tmp_path / "nbd-serve.toml"
    config.write_text('workers = 2\n[[exports]]\nname = "swap"\nsize = "32M"\nswap = false\n')
    argv = shlex.split(unit("nbd-serve.service")["Service"]["ExecStart"])
    argv = [NBD_SERVE if a == INSTALLED_BINARY else a for a in argv]
    argv = [str(config) if a == INSTALLED_CONFIG else a for a in argv]
    port = free_loopback_port()
    log = tmp_path / "server.log"
    # systemd-socket-activate passes on only the variables it is told to (-E).
    env = [f"--setenv=PYTHONPATH={os.environ['PYTHONPATH']}"] if "PYTHONPATH" in os.environ else []
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [activate, "-l", f"127.0.0.1:{port}", *env, *argv],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + STARTUP_GUARD_S
        while True:  # systemd-socket-activate listens before it starts nbd-serve
            assert proc.poll() is None, log.read_text()
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.05)
        for _ in range(3):
            done = run_tool(nbdinfo, "--size", f"nbd://127.0.0.1:{port}/swap")
            assert (done.returncode, done.stdout.strip()) == (0, str(32 << 20)), done.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=STARTUP_GUARD_S)
    text = log.read_text()
    assert code == 0, text
    assert "activated" in text or "listening on 127.0.0.1:" + str(port) in text, text
    assert "Traceback" not in text and "Fatal error" not in text, text
