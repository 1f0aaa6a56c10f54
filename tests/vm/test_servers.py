"""peers.servers: every launcher binds a confirmed free loopback port under a random export name.

These start the real servers and talk to them with the real nbdinfo.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers import servers

pytestmark = pytest.mark.interop

SIZE = 80 * 1024 * 1024


def require(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is missing: apt-get install {package}")


@pytest.fixture
def launched(tmp_path: Path) -> Iterator[list[servers.RunningServer]]:
    started: list[servers.RunningServer] = []
    yield started
    for s in started:
        s.kill()
        s.stop()


def nbdinfo(uri: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.parametrize("kind", servers.SERVER_KINDS)
def test_launch_answers_only_the_random_export_on_loopback(
    kind: servers.ServerKind, tmp_path: Path, launched: list[servers.RunningServer]
) -> None:
    require("nbdinfo", "libnbd-bin")
    if kind == "nbd-serve" and not servers.nbd_serve_available():
        pytest.fail("nbd-serve is not importable (nbdserver/cli.py missing): pip install -e .")
    first = servers.launch_server(kind, SIZE, tmp_path / "a", stats_path=tmp_path / "stats.jsonl")
    launched.append(first)
    second = servers.launch_server(kind, SIZE, tmp_path / "b", stats_path=tmp_path / "s2.jsonl")
    launched.append(second)

    assert first.host == "127.0.0.1"
    assert first.port != second.port
    assert first.export_name != second.export_name
    assert len(first.export_name) == 32 and int(first.export_name, 16) >= 0
    assert servers.pid_listens(first.pid, "127.0.0.1", first.port)
    assert servers.listening_pids("127.0.0.1", first.port) == {first.pid}

    ok = nbdinfo(first.uri)
    assert ok.returncode == 0, ok.stderr
    assert int(ok.stdout) == SIZE
    # another run's export name is refused
    wrong = nbdinfo(f"nbd://127.0.0.1:{first.port}/{second.export_name}")
    assert wrong.returncode != 0

    desc = first.describe()
    assert (desc["kind"], desc["port"], desc["size_bytes"]) == (kind, first.port, SIZE)

    second.kill()
    assert not second.alive()
    assert nbdinfo(second.uri).returncode != 0
    first.stop()
    assert not first.alive()


@pytest.mark.parametrize("kind", servers.SERVER_KINDS)
def test_launch_from_a_relative_workdir(
    kind: servers.ServerKind,
    tmp_path: Path,
    launched: list[servers.RunningServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A matrix run with --out results/x passes relative paths; nbd-server daemonizes into
    # "/" and never found its pid file (every nbd-server run of a matrix was an error).
    require("nbdinfo", "libnbd-bin")
    monkeypatch.chdir(tmp_path)
    server = servers.launch_server(kind, SIZE, Path("results") / "run")
    launched.append(server)
    ok = nbdinfo(server.uri)
    assert (ok.returncode, ok.stdout.strip()) == (0, str(SIZE)), ok.stderr
    assert server.pid > 1 and servers.pid_listens(server.pid, "127.0.0.1", server.port)


@pytest.mark.parametrize("kind", servers.SERVER_KINDS)
def test_default_export_is_refused(
    kind: servers.ServerKind, tmp_path: Path, launched: list[servers.RunningServer]
) -> None:
    """A guest that asks for no name (nbd-client without -N) must not get this run's export."""
    require("nbdinfo", "libnbd-bin")
    if kind == "nbd-serve" and not servers.nbd_serve_available():
        pytest.fail("nbd-serve is not importable (nbdserver/cli.py missing): pip install -e .")
    server = servers.launch_server(kind, SIZE, tmp_path, stats_path=tmp_path / "stats.jsonl")
    launched.append(server)
    default = nbdinfo(f"nbd://127.0.0.1:{server.port}/")
    assert default.returncode != 0, f"{kind} served its export to a client that gave no name"


def test_nbd_serve_records_stats(tmp_path: Path, launched: list[servers.RunningServer]) -> None:
    if not servers.nbd_serve_available():
        pytest.fail("nbd-serve is not importable (nbdserver/cli.py missing): pip install -e .")
    stats = tmp_path / "server-stats.jsonl"
    s = servers.launch_server("nbd-serve", SIZE, tmp_path, stats_path=stats)
    launched.append(s)
    s.stop()
    lines = stats.read_text().splitlines()
    assert lines, "nbd-serve wrote no stats line"
    assert s.export_name in lines[-1]


def test_listening_pids_sees_our_own_socket() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert servers.listening_pids("127.0.0.1", port) == {os.getpid()}
        assert servers.pid_listens(os.getpid(), "127.0.0.1", port)
    assert not servers.pid_listens(os.getpid(), "127.0.0.1", port)


def test_bad_size_and_kind_are_refused(tmp_path: Path) -> None:
    with pytest.raises(servers.ServerError, match="multiple of 4096"):
        servers.launch_server("nbdkit", 1000, tmp_path)
    with pytest.raises(servers.ServerError, match="unknown server kind"):
        servers.launch_server("qemu-nbd", SIZE, tmp_path)  # type: ignore[arg-type]


def test_nbd_server_needs_a_file(tmp_path: Path) -> None:
    require("nbd-server", "nbd-server")
    with pytest.raises(servers.ServerError, match="only serves files"):
        servers.launch_server("nbd-server", SIZE, tmp_path, backing="memory")


def test_nbdkit_file_backing_is_sparse_and_removed(
    tmp_path: Path, launched: list[servers.RunningServer]
) -> None:
    require("nbdkit", "nbdkit")
    s = servers.launch_server("nbdkit", SIZE, tmp_path, backing="file")
    launched.append(s)
    assert s.backing_path is not None
    st = s.backing_path.stat()
    assert st.st_size == SIZE
    assert st.st_blocks * 512 < SIZE // 10
    s.stop()
    assert not s.backing_path.exists()
