"""Command-line resolution and usage errors (no server is started)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bench.__main__ import build_parser, main, plan_from_args
from bench.runner import Plan, balance_warning, leads, parse_servers, rotated
from bench.servers import ON_REQUEST, ServerKind
from bench.workloads import MIB, WORKLOADS

REPO = Path(__file__).resolve().parents[2]


def plan(*argv: str) -> Plan:
    return plan_from_args(build_parser().parse_args(list(argv)))


def test_full_defaults() -> None:
    p = plan()
    assert p.servers == tuple(k for k in ServerKind if k not in ON_REQUEST)
    assert ServerKind.NBD_SERVE_OLD not in p.servers
    assert p.workloads == WORKLOADS
    assert (p.rounds, p.runtime_s, p.ramp_s, p.file_size) == (3, 4.0, 1.0, 1024 * MIB)
    assert p.rss_scenario
    assert p.baseline is ServerKind.NBD_SERVE
    assert p.name == "full"
    # The full run must stay under ~15 minutes on the reference machine.
    assert p.estimate_s() < 15 * 60


def test_quick_fits_two_minutes_and_overrides_win() -> None:
    p = plan("--quick")
    assert p.rounds == 1
    assert p.name == "quick"
    assert p.estimate_s() < 120
    p = plan("--quick", "--rounds", "5", "--runtime", "2.5", "--no-rss", "--name", "x")
    assert (p.rounds, p.runtime_s, p.rss_scenario, p.name) == (5, 2.5, False, "x")


def test_smoke_and_filters() -> None:
    p = plan("--smoke", "--servers", "nbd-serve,nbdkit")
    assert p.servers == (ServerKind.NBD_SERVE, ServerKind.NBDKIT)
    assert [w.name for w in p.workloads] == ["rand-read-4k-qd32", "unix-rand-write-4k-qd32"]
    assert not p.rss_scenario
    p = plan("--servers", "qemu-nbd,nbdkit", "--workloads", "rand-read-4k-qd1")
    assert p.servers == (ServerKind.NBDKIT, ServerKind.QEMU_NBD)  # canonical order
    assert p.baseline is ServerKind.NBDKIT  # nbd-serve absent: the first server
    assert plan("--servers", "nbdkit,qemu-nbd", "--baseline", "qemu-nbd").baseline is (
        ServerKind.QEMU_NBD
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--servers", "nbdkit,foo"], "unknown server(s) foo; known: nbd-serve, nbdkit"),
        (["--workloads", "bar"], "unknown workload(s) bar"),
        (["--rounds", "0"], "--rounds must be >= 1, got 0"),
        (["--runtime", "0"], "--runtime must be > 0 seconds"),
        (["--ramp", "-1"], "--ramp must be >= 0 seconds"),
        (["--file-mib", "1"], "--file-mib must be >= 16"),
        (["--servers", "nbdkit", "--baseline", "qemu-nbd"], "is not among the servers run"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_old_nbd_serve_joins_the_run(tmp_path: Path) -> None:
    p = plan("--servers", "nbd-serve", "--old-nbd-serve", str(tmp_path))
    assert p.servers == (ServerKind.NBD_SERVE, ServerKind.NBD_SERVE_OLD)
    assert p.old_checkout == tmp_path


def test_old_nbd_serve_needs_a_checkout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--servers", "nbd-serve,nbd-serve-old"]) == 2
    assert "server nbd-serve-old needs --old-nbd-serve DIR" in capsys.readouterr().err


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for w in WORKLOADS:
        assert w.name in out
    assert "rss-write-1m-qd128-4conn" in out


def test_parse_servers_rejects_empty() -> None:
    with pytest.raises(ValueError, match="none given"):
        parse_servers(" ,")


def test_shell_wrapper_uses_the_venv() -> None:
    wrapper = Path(__file__).resolve().parents[2] / "bench" / "run"
    ok = subprocess.run(
        [str(wrapper), "--list"], capture_output=True, text=True, timeout=60, check=False
    )
    assert ok.returncode == 0, ok.stderr
    assert "rand-read-4k-qd32-4conn" in ok.stdout
    bad = subprocess.run(
        [str(wrapper), "--rounds", "0"], capture_output=True, text=True, timeout=60, check=False
    )
    assert bad.returncode == 2
    assert "--rounds must be >= 1, got 0" in bad.stderr


def test_rounds_rotate_the_server_order() -> None:
    a, b, c = ServerKind.NBD_SERVE, ServerKind.NBDKIT, ServerKind.NBD_SERVER
    orders = [rotated((a, b, c), r) for r in range(4)]
    assert orders == [[a, b, c], [b, c, a], [c, a, b], [a, b, c]]
    # Over as many rounds as servers, each runs first once and in every position once.
    assert {o[0] for o in orders[:3]} == {a, b, c}
    assert rotated((a, b), 1) == [b, a]
    assert rotated((), 3) == []


def test_leads_count_the_rounds_each_server_runs_first() -> None:
    a, b, c = ServerKind.NBD_SERVE, ServerKind.NBDKIT, ServerKind.NBD_SERVER
    assert leads((a, b, c), 10) == {"nbd-serve": 4, "nbdkit": 3, "nbd-server": 3}
    assert leads((a, b, c), 9) == {"nbd-serve": 3, "nbdkit": 3, "nbd-server": 3}
    assert leads((a,), 5) == {"nbd-serve": 5}


def test_uneven_rounds_are_warned_about() -> None:
    p = plan("--servers", "nbd-serve,nbdkit,nbd-server", "--rounds", "10")
    assert balance_warning(p) == (
        "10 rounds over 3 servers: rounds led by each server: nbd-serve 4, nbdkit 3,"
        " nbd-server 3. The first run of a cell can be slower whoever makes it, so ratios"
        " lean against a server that leads more often; use a multiple of 3 rounds for even"
        " ratios"
    )
    assert (
        balance_warning(plan("--servers", "nbd-serve,nbdkit,nbd-server", "--rounds", "9")) is None
    )
    assert balance_warning(plan("--servers", "nbdkit", "--rounds", "4")) is None


def test_render_regenerates_a_committed_result(tmp_path: Path) -> None:
    """`--render` runs nothing: the committed house run's JSON gives its Markdown again,
    with every workload's row, and the ratios by rotation cycle."""
    committed = REPO / "bench" / "results" / "house-vs-58cec2b.json"
    assert main(["--render", str(committed), "--out", str(tmp_path)]) == 0
    md = (tmp_path / "house-vs-58cec2b.md").read_text()
    assert "median over rotation cycles (2 rounds" in md
    for description in json.loads(committed.read_text())["meta"]["workloads"].values():
        assert f"| {description} | nbd-serve |" in md
    assert (tmp_path / "house-vs-58cec2b.md").read_text() == (
        REPO / "bench" / "results" / "house-vs-58cec2b.md"
    ).read_text()


def test_render_refuses_a_file_that_is_not_a_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "x.json"
    bad.write_text('{"meta": {}}')
    assert main(["--render", str(bad), "--out", str(tmp_path)]) == 1
    assert "cannot render" in capsys.readouterr().err
