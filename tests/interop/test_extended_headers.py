"""NBD extended headers with real peers: trixie's libnbd 1.22 (nbdinfo, nbdcopy) and
qemu 10.0 (qemu-io, qemu-img) negotiate NBD_OPT_EXTENDED_HEADERS; bookworm's tools are
too old. They run from a trixie chroot built once by tests/interop/trixie.py, and reach
nbd-serve on the host's loopback. The server's "extended=yes" log line of each session
says which headers a client actually spoke."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from server.nbdtest import ServerProcess, running_server

from .trixie import TrixieRoot, trixie_root

pytestmark = pytest.mark.interop
MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture(scope="module")
def trixie() -> TrixieRoot:
    return trixie_root()


@pytest.fixture
def big_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """An 8 GiB sparse RAM disk: offsets and extents past 4 GiB."""
    with running_server(tmp_path, "--memory", "8G") as srv:
        yield srv


def sessions(srv: ServerProcess) -> list[str]:
    """The 'extended=' value of every session the server logged, in order."""
    return re.findall(r"structured=\w+ extended=(\w+)", srv.log())


def run_ok(trixie: TrixieRoot, *argv: str, srv: ServerProcess) -> str:
    done = trixie.run(*argv)
    assert done.returncode == 0, (
        f"{argv[0]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n"
        f"server log:\n{srv.log()}"
    )
    return done.stdout


def test_nbdinfo_uses_extended_packets(trixie: TrixieRoot, big_server: ServerProcess) -> None:
    out = run_ok(trixie, "nbdinfo", big_server.uri(), srv=big_server)
    assert "using extended packets" in out, out
    assert "export-size: 8589934592" in out
    assert sessions(big_server) == ["yes"]


def test_nbdinfo_without_extended_headers_uses_structured_packets(
    trixie: TrixieRoot, tmp_path: Path
) -> None:
    with running_server(tmp_path, "--memory", "64M", "--no-extended-headers") as srv:
        out = run_ok(trixie, "nbdinfo", srv.uri(), srv=srv)
        assert "using structured packets" in out, out
        assert sessions(srv) == ["no"]


def test_nbdinfo_map_shows_64_bit_extents(trixie: TrixieRoot, big_server: ServerProcess) -> None:
    """One write at 5 GiB leaves holes of 5 GiB and 3 GiB - 1 MiB around it: each is a
    single NBD_REPLY_TYPE_BLOCK_STATUS_EXT descriptor longer than 32 bits can say."""
    uri = big_server.uri()
    run_ok(trixie, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 5G 1M", uri, srv=big_server)
    out = run_ok(trixie, "nbdinfo", "--map", uri, srv=big_server)
    rows = [line.split() for line in out.splitlines() if line.strip()]
    extents = [(int(r[0]), int(r[1]), int(r[2])) for r in rows]
    assert extents == [
        (0, 5 * GiB, 3),
        (5 * GiB, MiB, 0),
        (5 * GiB + MiB, 3 * GiB - MiB, 3),
    ], out
    assert sessions(big_server) == ["yes", "yes"]


#: Round trips with the server's extended headers on and off: the same clients then speak
#: extended packets or fall back to structured ones, and the data must not care.
MODES = pytest.mark.parametrize(
    ("flags", "spoken"), [((), "yes"), (("--no-extended-headers",), "no")], ids=["on", "off"]
)


@MODES
def test_nbdcopy_round_trip(
    trixie: TrixieRoot, tmp_path: Path, flags: tuple[str, ...], spoken: str
) -> None:
    with (
        running_server(tmp_path, "--memory", "8M", *flags) as srv,
        trixie.scratch() as (host, inside),
    ):
        data = os.urandom(8 * MiB)
        (host / "in.img").write_bytes(data)
        run_ok(trixie, "nbdcopy", f"{inside}/in.img", srv.uri(), srv=srv)
        run_ok(trixie, "nbdcopy", srv.uri(), f"{inside}/out.img", srv=srv)
        assert (host / "out.img").read_bytes() == data
        assert sessions(srv) and set(sessions(srv)) == {spoken}


def test_qemu_io_round_trip_past_4_gib(trixie: TrixieRoot, big_server: ServerProcess) -> None:
    out = run_ok(
        trixie,
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write -P 0xab 4G 64k",
        "-c",
        "read -P 0xab 4G 64k",
        "-c",
        "write -z 6G 1G",
        "-c",
        "discard 7G 1G",
        "-c",
        "read -P 0 6G 64k",
        big_server.uri(),
        srv=big_server,
    )
    assert "Pattern verification failed" not in out, out
    assert out.count("read 65536/65536 bytes") == 2, out
    assert sessions(big_server) == ["yes"]


@MODES
def test_qemu_img_round_trip(
    trixie: TrixieRoot, tmp_path: Path, flags: tuple[str, ...], spoken: str
) -> None:
    with (
        running_server(tmp_path, "--memory", "16M", *flags) as srv,
        trixie.scratch() as (host, inside),
    ):
        data = os.urandom(16 * MiB)
        (host / "in.img").write_bytes(data)
        uri = srv.uri()
        run_ok(trixie, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw",
               f"{inside}/in.img", uri, srv=srv)  # fmt: skip
        run_ok(trixie, "qemu-img", "convert", "-f", "raw", "-O", "raw",
               uri, f"{inside}/out.img", srv=srv)  # fmt: skip
        assert (host / "out.img").read_bytes() == data
        info = run_ok(trixie, "qemu-img", "info", "-f", "raw", uri, srv=srv)
        assert "virtual size: 16 MiB" in info, info
        assert sessions(srv) and set(sessions(srv)) == {spoken}
