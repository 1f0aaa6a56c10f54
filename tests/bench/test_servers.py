"""Pure and cheap parts of the launchers: configs, ports, tool errors."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from bench import servers
from bench.servers import ServerKind, ToolMissingError
from bench.workloads import Transport
from peers import servers as launcher


def test_nbd_server_config_tcp_binds_loopback_only() -> None:
    text = servers.nbd_server_config("ex", Path("/dev/shm/d.img"), Transport.TCP, port=4321,
                                     sock=Path("/x.sock"))  # fmt: skip
    assert text.splitlines() == [
        "[generic]", "listenaddr = 127.0.0.1", "port = 4321", "[ex]",
        "exportname = /dev/shm/d.img",
    ]  # fmt: skip


def test_nbd_server_config_unix_has_no_tcp_listener() -> None:
    text = servers.nbd_server_config("ex", Path("/d.img"), Transport.UNIX, port=0,
                                     sock=Path("/run/x.sock"))  # fmt: skip
    assert "unixsock = /run/x.sock" in text
    assert "port =" not in text
    assert "duallisten" not in text


def test_free_port_is_bindable_on_loopback() -> None:
    port = servers.free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        assert s.getsockname()[1] == port


@pytest.mark.parametrize(
    ("tool", "package"),
    [("fio", "fio"), ("nbdinfo", "libnbd-bin"), ("qemu-nbd", "qemu-utils"),
     ("nbd-server", "nbd-server"), ("nbdkit", "nbdkit")],
)  # fmt: skip
def test_missing_tool_names_the_debian_package(
    tool: str, package: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolMissingError, match=f"'{tool}' not found.*apt-get install {package}$"):
        servers.require_tool(tool)


def test_missing_nbd_serve_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(ToolMissingError, match=re.escape("pip install -e .")):
        servers.require_tool(ServerKind.NBD_SERVE.value)


@pytest.mark.interop
@pytest.mark.parametrize("kind", [ServerKind.NBDKIT, ServerKind.QEMU_NBD, ServerKind.NBD_SERVER])
def test_peer_that_loses_its_port_is_restarted_on_another(
    kind: ServerKind, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The first port handed out is already held by us: the launcher must notice that the
    server is not listening there, and come up on the next one."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"\x5a" * (4 * 1024 * 1024))
    spec = servers.ExportSpec(path=image, size=4 * 1024 * 1024, workdir=tmp_path)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        ports = iter([busy, servers.free_port()])
        # the shared launcher in peers.servers picks the ports
        monkeypatch.setattr(launcher, "free_port", lambda: next(ports))
        server = servers.start_server(kind, Transport.TCP, spec)
        try:
            assert server.uri.startswith("nbd://127.0.0.1:")
            port = int(server.uri.split(":")[2].split("/")[0])
            assert port != busy
            assert server.export_name in server.uri
            pid = server.pid
            assert psutil.pid_exists(pid)
        finally:
            servers.stop_server(server)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_checkout_command_runs_the_checkouts_own_nbdserver(tmp_path: Path) -> None:
    """nbd-serve-old must import the other tree's nbdserver, not this venv's or the cwd's."""
    package = tmp_path / "nbdserver"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "cli.py").write_text("def main():\n    print(__file__)\n    return 0\n")
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        servers.checkout_command(tmp_path), cwd=repo, capture_output=True, text=True, check=True
    )
    assert proc.stdout.strip() == str((package / "cli.py").resolve())


def test_checkout_command_refuses_a_non_checkout(tmp_path: Path) -> None:
    with pytest.raises(
        servers.BenchError, match=r"is not a swapnbd checkout \(no nbdserver/cli.py\)"
    ):
        servers.checkout_command(tmp_path)
