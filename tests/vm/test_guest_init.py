"""vm.image.guest_init: the host-testable parts of the guest's PID 1 (config, argv, events)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peers import servers
from vm.image import guest_init
from vm.run.config import RunConfig, encode_guest_config, guest_config


def sample_server(tmp_path: Path) -> servers.RunningServer:
    return servers.RunningServer(
        kind="nbdkit",
        port=40123,
        export_name="ab" * 16,
        size_bytes=640 * 1024 * 1024,
        pid=1,
        argv=[],
        backing="memory",
        workdir=tmp_path,
    )


def test_config_round_trips_through_the_kernel_cmdline(tmp_path: Path) -> None:
    cfg = RunConfig(out=tmp_path, nbd_connections=2, swap="file")
    gcfg = guest_config(cfg, sample_server(tmp_path))
    line = f"console=ttyS0 panic=-1 swapnbd.cfg={encode_guest_config(gcfg)} quiet"
    decoded = guest_init.read_config(line)
    assert decoded == gcfg
    assert decoded["server"] == {"host": "10.0.2.2", "port": 40123, "name": "ab" * 16}
    assert decoded["swap"] == {"mode": "file", "size_bytes": None}
    assert decoded["sysctl"] == {"vm.min_free_kbytes": 1448}
    assert decoded["stress"]["args"] == [
        "--workers",
        "8",
        "--total",
        str(256 * 1024 * 1024),
        "--loops",
        "1",
        "--mlock",
        "--force",
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("console=ttyS0 panic=-1", "no swapnbd.cfg"),
        ("swapnbd.cfg=!!!notbase64", "not base64url JSON"),
        ("swapnbd.cfg=WzFd", "JSON object"),  # [1]
        ("swapnbd.cfg=e30", "lacks the 'server' section"),  # {}
    ],
)
def test_bad_config_is_a_clear_error(line: str, message: str) -> None:
    with pytest.raises(guest_init.GuestError, match=message):
        guest_init.read_config(line)


def test_nbd_client_argv_defaults() -> None:
    argv = guest_init.nbd_client_argv(
        {"host": "10.0.2.2", "port": 40123, "name": "n1"}, {"block_size": 4096, "timeout": 0}
    )
    assert argv == [
        "nbd-client",
        "10.0.2.2",
        "40123",
        "/dev/nbd0",
        "-N",
        "n1",
        "-b",
        "4096",
        "-swap",
    ]


def test_nbd_client_argv_settings() -> None:
    argv = guest_init.nbd_client_argv(
        {"port": 1, "name": "n"},
        {"timeout": 30, "connections": 4, "resident": True},
    )
    assert argv[argv.index("-t") + 1] == "30"
    assert argv[argv.index("-C") + 1] == "4"
    assert argv[-2:] == ["-swap", "-L"]
    plain = guest_init.nbd_client_argv({"port": 1, "name": "n"}, {})
    assert plain[-1] == "-swap" and "-t" not in plain and "-C" not in plain


def test_the_resident_client_swaps_too(tmp_path: Path) -> None:
    cfg = RunConfig(out=tmp_path, resident_client=True)
    nbd = guest_config(cfg, sample_server(tmp_path))["nbd"]
    argv = guest_init.nbd_client_argv({"port": 1, "name": "n"}, nbd)
    assert argv[-2:] == ["-swap", "-L"]


def test_events_are_json_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = guest_init.Events(tmp_path / "events")
    events.send("phase", phase="not-open")  # not open: console only, nothing lost silently
    events.open()
    events.send("phase", phase="boot", kernel_release="6.1.0")
    events.close()
    events.open()
    events.send("error", phase="network", message="no eth0")
    events.close()
    lines = [json.loads(x) for x in (tmp_path / "events").read_text().splitlines()]
    assert [(r["type"], r["phase"]) for r in lines] == [("phase", "boot"), ("error", "network")]
    assert lines[1]["message"] == "no eth0"
    assert {"t_mono", "t_wall"} <= set(lines[0])
    assert "not-open" in capsys.readouterr().out


def test_missing_guest_tools_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guest_init, "PAYLOAD_DIR", tmp_path)
    with pytest.raises(guest_init.GuestError, match=r"guest tools missing: .*stress/__init__\.py"):
        guest_init.check_tools()
    (tmp_path / "stress").mkdir()
    for name in ("__init__.py", "vmstat.py"):
        (tmp_path / "stress" / name).write_text("")
    with pytest.raises(guest_init.GuestError, match=r"swapstress\.py"):
        guest_init.check_tools()
    (tmp_path / "stress" / "swapstress.py").write_text("")
    guest_init.check_tools()


def test_failed_command_names_the_step() -> None:
    with pytest.raises(guest_init.GuestError, match=r"^probe: false exited 1"):
        guest_init.run(["false"], "probe")
    with pytest.raises(guest_init.GuestError, match="not installed in the guest"):
        guest_init.run(["/nonexistent/tool"], "probe")
    assert guest_init.run(["echo", "hi"], "probe") == "hi\n"


def test_guest_init_uses_only_the_standard_library() -> None:
    """And the guest tools (stress/), which the initramfs packs beside it and which are
    standard library only themselves."""
    import ast
    import sys

    tree = ast.parse(Path(guest_init.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported
    assert imported <= set(sys.stdlib_module_names) | {"__future__", "stress"}


def test_arm_proof_reads_switches_cmdline_words_and_kernel_log() -> None:
    line = "console=ttyS0 nbd.memalloc=0 quiet pfmemalloc_throttle=0 swapnbd.cfg=xyz"
    proof = guest_init.read_arm_proof(line)
    assert proof["cmdline"] == ["nbd.memalloc=0", "pfmemalloc_throttle=0"]
    assert set(proof["switches"]) == set(guest_init.ARM_SWITCHES)
    for name, path in guest_init.ARM_SWITCHES.items():  # None exactly when absent
        assert (proof["switches"][name] is None) == (not Path(path).exists())
    assert all("swapnbd" in entry for entry in proof["dmesg"])
