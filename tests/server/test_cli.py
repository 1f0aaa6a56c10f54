"""The nbd-serve command line and configuration: errors exit 2 with a clear message,
the ready file and the stats lines follow docs/architecture.md."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from nbdserver.cli import main
from nbdserver.config import ExportConfig, build_config
from nbdserver.errors import ConfigError
from nbdserver.protocol import Cmd

from .nbdtest import NBD_SERVE, RawClient, running_server


def test_help_is_complete(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in (
        "--bind",
        "--port",
        "--unix",
        "--name",
        "--description",
        "--read-only",
        "--config",
        "--stats",
        "--stats-interval",
        "--ready-file",
        "--workers",
        "--max-inflight",
        "--poll-us",
        "--log-level",
        "--memory",
        "FILE",
        "examples:",
        "exit codes",
    ):
        assert flag in out, flag


BAD = [
    (["--memory", "1X"], "size '1X' is not understood"),
    (["--memory", "0"], "is zero"),
    (["--memory", "1G", "--port", "70000"], "port 70000 is not a TCP port"),
    (["--memory", "1G", "--log-level", "loud"], "log level 'loud'"),
    (["--memory", "1G", "--stats-interval", "0"], "stats interval 0.0"),
    (["--memory", "1G", "--poll-us", "-1"], "poll_us -1 must be a whole number"),
    (["--memory", "1G", "--poll-us", "20000"], "poll_us 20000 must be a whole number"),
    (["--memory", "1G", "--sched-slice-us", "100"], "unrecognized arguments: --sched-slice-us"),
    (
        ["--memory", "1G", "--sched-policy", "fast"],
        "argument --sched-policy: invalid choice: 'fast' (choose from 'normal', 'batch', 'idle')",
    ),
    ([], "nothing to serve"),
    (["--name", "x"], "--name describe the export given by FILE or --memory"),
    (["/nonexistent/disk.img"], "/nonexistent/disk.img"),
    (["--config", "/nonexistent.toml"], "config file '/nonexistent.toml' does not exist"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a) or "empty" for a, _ in BAD])
def test_bad_command_lines_exit_2(argv: list[str], message: str) -> None:
    done = subprocess.run(
        [NBD_SERVE, *argv], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("port = 'x'\n[[exports]]\nsize = '1G'\n", "port 'x' is not a TCP port"),
        ("[[exports]]\nbackend = 'floppy'\nsize = '1G'\n", "backend = 'floppy'"),
        ("[[exports]]\nbackend = 'memory'\n", "a memory export needs a size"),
        ("[[exports]]\nbackend = 'file'\n", "a file export needs path"),
        ("[[exports]]\nsize = '1G'\ncolour = 'red'\n", "unknown key(s) colour"),
        ("poll_us = 'fast'\n[[exports]]\nsize = '1G'\n", "poll_us 'fast' must be"),
        ("wake_mark = 'yes'\n[[exports]]\nsize = '1G'\n", "wake_mark = 'yes' is not true or false"),
        (
            "sched_policy = 'IDLE'\n[[exports]]\nsize = '1G'\n",
            "sched_policy 'IDLE' must be one of normal, batch, idle",
        ),
        ("sched_policy = 5\n[[exports]]\nsize = '1G'\n", "sched_policy 5 must be one of"),
        ("[[exports]]\nsize = '1G'\n[[exports]]\nsize = '2G'\n", "defined more than once"),
        ("bogus = 1\n", "unknown key(s) bogus"),
        ("[[exports]\n", "is not valid TOML"),
    ],
)
def test_bad_config_files(tmp_path: Path, toml: str, message: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError) as info:
        build_config({"config": str(config)})
    assert message in str(info.value)


def test_a_removed_key_is_refused_by_name(tmp_path: Path) -> None:
    """sched_slice_us was removed (docs/performance.md, "Scheduler slice"): a file that
    still sets it is refused, not silently run without it."""
    config = tmp_path / "c.toml"
    config.write_text("sched_slice_us = 100\n[[exports]]\nsize = '1G'\n")
    with pytest.raises(ConfigError) as info:
        build_config({"config": str(config)})
    assert str(info.value) == (
        f"config file {str(config)!r}: unknown key(s) sched_slice_us; allowed: bind, port,"
        " unix, stats, stats_interval, ready_file, log_level, workers, max_inflight,"
        " max_connections, poll_us, wake_mark, extended_headers, sched_policy, exports,"
        " exit_with_parent, fault, cow_dir, swap_safe, shutdown_grace, tls, tls_cert,"
        " tls_key, tls_ca"
    )


def test_extended_headers_switch_from_file_and_flag(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("extended_headers = false\n[[exports]]\nsize = '1M'\n")
    assert build_config({"config": str(config)}).extended_headers is False
    assert build_config({"config": str(config), "extended_headers": True}).extended_headers
    assert build_config({"memory": "1M"}).extended_headers is True


def test_every_allowed_key_of_a_file_is_read(tmp_path: Path) -> None:
    """A key the file may hold is never silently dropped (exit_with_parent and fault once
    were), and its value is checked like the flag's."""
    config = tmp_path / "c.toml"
    config.write_text(
        'exit_with_parent = true\nfault = "corrupt-read-after=3"\n[[exports]]\nsize = "1M"\n'
    )
    cfg = build_config({"config": str(config)})
    assert (cfg.exit_with_parent, cfg.fault) == (True, "corrupt-read-after=3")
    config.write_text('fault = "corrupt-everything"\n[[exports]]\nsize = "1M"\n')
    with pytest.raises(ConfigError, match="corrupt-read-after=N"):
        build_config({"config": str(config)})
    config.write_text('exit_with_parent = "yes"\n[[exports]]\nsize = "1M"\n')
    with pytest.raises(ConfigError, match=r"exit_with_parent .*true or false"):
        build_config({"config": str(config)})


def test_cli_overrides_only_what_was_given(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        'bind = "127.0.0.2"\nport = 1234\nlog_level = "debug"\n'
        '[[exports]]\nname = "a"\nsize = "1M"\n'
    )
    cfg = build_config(
        {"config": str(config), "port": 0, "memory": "2M", "name": "b", "read_only": True}
    )
    assert (cfg.bind, cfg.port, cfg.log_level) == ("127.0.0.2", 0, "debug")
    assert cfg.exports == (
        ExportConfig("a", "", "memory", None, 1 << 20, False),
        ExportConfig("b", "", "memory", None, 2 << 20, True),
    )
    only_unix = build_config({"memory": "1M", "unix": "/tmp/x.sock"})
    assert (only_unix.tcp, only_unix.unix) == (False, "/tmp/x.sock")
    both = build_config({"memory": "1M", "unix": "/tmp/x.sock", "port": 0})
    assert both.tcp is True


def test_ready_file_stats_and_clean_shutdown(tmp_path: Path) -> None:
    stats = tmp_path / "stats.jsonl"
    sock = tmp_path / "nbd.sock"
    with running_server(
        tmp_path,
        "--memory",
        "4M",
        "--port",
        "0",
        "--unix",
        str(sock),
        "--stats",
        str(stats),
        "--stats-interval",
        "0.05",
    ) as srv:
        kinds = sorted(item["kind"] for item in srv.ready["listen"])  # type: ignore[attr-defined]
        assert kinds == ["tcp", "unix"]
        assert srv.ready["exports"] == [""] and srv.ready["pid"] == srv.proc.pid
        with RawClient(srv.port) as c:
            c.go(structured=False)
            c.request(Cmd.WRITE, 0, 4096, cookie=1, payload=b"s" * 4096)
            c.simple_reply()
            c.request(Cmd.READ, 0, 4096, cookie=2)
            c.simple_reply(4096)
            c.request(Cmd.READ, 8 << 20, 1, cookie=3)
            c.simple_reply()
        import socket as _socket

        unix = _socket.socket(_socket.AF_UNIX)
        unix.connect(str(sock))
        with RawClient(sock=unix) as c:
            assert c.go(structured=False) == 4 << 20
    assert not sock.exists()  # removed at shutdown
    lines = [json.loads(line) for line in stats.read_text().splitlines()]
    last = lines[-1]  # written once more at shutdown
    assert set(last) - {"workers"} == {"t_wall", "t_mono", "connections", "exports", "receiving"}
    assert last["connections"] == {"open": 0, "total": 2}
    assert last["receiving"] == {"partial": 0, "missing_bytes": 0}
    export = last["exports"][""]
    assert export["requests"]["read"] == 2 and export["requests"]["write"] == 1
    assert export["bytes"] == {"read": 4096, "write": 4096}
    assert export["errors"]["read"] == 1
    hist = export["latency_us"]["read"]
    assert len(hist["le"]) == len(hist["counts"]) and sum(hist["counts"]) == 2
    assert [ln["t_mono"] for ln in lines] == sorted(ln["t_mono"] for ln in lines)


def test_port_in_use_is_a_runtime_failure(tmp_path: Path) -> None:
    with running_server(tmp_path, "--memory", "1M") as first:
        done = subprocess.run(
            [NBD_SERVE, "--memory", "1M", "--port", str(first.port)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert done.returncode == 1
        assert "cannot listen" in done.stderr


def test_serves_a_file_read_only(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(os.urandom(8192))
    with (
        running_server(tmp_path, "--name", "img", "--read-only", str(image)) as srv,
        RawClient(srv.port) as c,
    ):
        assert c.go(b"img", structured=False) == 8192
        c.request(Cmd.READ, 0, 8192, cookie=1)
        assert c.simple_reply(8192)[1] == image.read_bytes()
        c.request(Cmd.WRITE, 0, 1, cookie=2, payload=b"x")
        assert c.simple_reply()[0].error == 1  # EPERM
