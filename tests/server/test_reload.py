"""SIGHUP re-reads --config: exports are added and removed while clients of unchanged
exports keep their connections (and their data); a broken file is refused, logged, and
the old exports stay (nbdserver.reload)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from nbdserver.config import ExportConfig
from nbdserver.protocol import Cmd
from nbdserver.reload import plan_reload

from .nbdtest import STARTUP_GUARD_S, RawClient, ServerProcess, running_server
from .nbdtest import require_tool as tool
from .nbdtest import run_tool as run

CONFIG = """\
port = 0
workers = {workers}
[[exports]]
name = "keep"
size = "8M"
{second}
"""
FILE_EXPORT = '[[exports]]\nname = "{name}"\npath = "{path}"\n'


def listed(server: ServerProcess) -> list[str]:
    done = run(tool("nbdinfo"), "--list", "--json", server.uri())
    assert done.returncode == 0, done.stderr
    return sorted(e["export-name"] for e in json.loads(done.stdout)["exports"])


def hangup_and_wait(server: ServerProcess, text: str, count: int) -> None:
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + STARTUP_GUARD_S
    while server.log().count(text) < count:
        assert time.monotonic() < deadline, f"no {text!r} after SIGHUP: {server.log()}"
        time.sleep(0.02)


def write_then_read(client: RawClient, offset: int, fill: int) -> None:
    payload = bytes([fill]) * 4096
    client.request(Cmd.WRITE, offset, 4096, cookie=1, payload=payload)
    assert client.simple_reply()[0].error == 0
    client.request(Cmd.READ, offset, 4096, cookie=2)
    reply, data = client.simple_reply(4096)
    assert (reply.error, reply.cookie, data) == (0, 2, payload)


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_adds_and_removes_exports_without_dropping_clients(
    tmp_path: Path, workers: int
) -> None:
    old_image, new_image = tmp_path / "old.img", tmp_path / "new.img"
    old_image.write_bytes(bytes(1 << 20))
    new_image.write_bytes(b"\x77" * (2 << 20))
    config = tmp_path / "exports.toml"
    config.write_text(
        CONFIG.format(workers=workers, second=FILE_EXPORT.format(name="old", path=old_image))
    )
    with running_server(tmp_path, "--config", str(config)) as server:
        assert listed(server) == ["keep", "old"]
        clients = [RawClient(server.port) for _ in range(2)]
        try:
            for i, c in enumerate(clients):
                c.go(b"keep", structured=False)
                write_then_read(c, i * 4096, 0x10 + i)
            config.write_text(
                CONFIG.format(
                    workers=workers, second=FILE_EXPORT.format(name="new", path=new_image)
                )
            )
            hangup_and_wait(server, "reloaded ", 1)
            assert "added ['new'], removed ['old'], unchanged ['keep']" in server.log()
            # The connections to the unchanged export were not dropped and keep working.
            for i, c in enumerate(clients):
                c.request(Cmd.READ, i * 4096, 4096, cookie=3)
                reply, data = c.simple_reply(4096)
                assert (reply.error, data) == (0, bytes([0x10 + i]) * 4096)
                write_then_read(c, (8 + i) * 4096, 0x20 + i)
            assert listed(server) == ["keep", "new"]
            with RawClient(server.port) as fresh:  # same RAM disk for a new connection
                fresh.go(b"keep", structured=False)
                fresh.request(Cmd.READ, 8 * 4096, 4096, cookie=4)
                assert fresh.simple_reply(4096)[1] == bytes([0x20]) * 4096
            with RawClient(server.port) as fresh:
                assert fresh.go(b"new", structured=False) == 2 << 20
                fresh.request(Cmd.READ, 0, 4096, cookie=5)
                assert fresh.simple_reply(4096)[1] == b"\x77" * 4096
            # A broken file: logged, refused, nothing changes.
            config.write_text("workers = [\n")
            hangup_and_wait(server, "reload failed, keeping the old configuration", 1)
            config.write_text(CONFIG.format(workers=workers, second='[[exports]]\nname = "x"\n'))
            hangup_and_wait(server, "reload failed, keeping the old configuration", 2)
            assert "a memory export needs a size" in server.log()
            assert listed(server) == ["keep", "new"]
            for i, c in enumerate(clients):
                write_then_read(c, (16 + i) * 4096, 0x30 + i)
        finally:
            for c in clients:
                c.close()
        if workers > 1:
            deadline = time.monotonic() + STARTUP_GUARD_S
            while "retired worker 1" not in server.log():
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.05)
        log = server.log()
        assert "Traceback" not in log and "Fatal error" not in log, log
        assert server.alive()


def test_plan_reload_compares_whole_export_settings() -> None:
    keep = ExportConfig("keep", size=1 << 20)
    old = {"keep": keep, "gone": ExportConfig("gone", size=1), "grow": ExportConfig("grow", size=1)}
    plan = plan_reload(old, [keep, ExportConfig("grow", size=2), ExportConfig("new", size=3)])
    assert plan.unchanged == ("keep",)
    assert plan.removed == ("gone", "grow")
    assert [e.name for e in plan.added] == ["grow", "new"]
    assert plan.changes_anything
    assert not plan_reload({"keep": keep}, [keep]).changes_anything
