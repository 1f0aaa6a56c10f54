"""Swap-safe mode (nbdserver.swapsafe): every process of nbd-serve locks its memory and
is marked IO_FLUSHER, as the kernel itself shows in /proc, and the log and the stats
say so; where the privileges are missing, they say that and why."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import psutil
import pytest

from nbdserver.config import build_config
from nbdserver.protocol import Cmd, Request
from nbdserver.swapsafe import check_bounds

from . import nbdtest
from .nbdtest import STARTUP_GUARD_S, RawClient, ServerProcess, running_server

#: Task flags set by PR_SET_IO_FLUSHER (include/linux/sched.h), seen in /proc/PID/stat.
PF_MEMALLOC_NOIO = 0x00080000
PF_LOCAL_THROTTLE = 0x00100000


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def task_flags(pid: int) -> int:
    """The ``flags`` field (9th) of /proc/PID/stat, after the parenthesised comm."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[6])


def last_stats(server: ServerProcess, path: Path, workers: int) -> dict[str, object]:
    """The latest stats line once every worker's report has arrived."""
    deadline = time.monotonic() + STARTUP_GUARD_S
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if lines:
            last: dict[str, object] = json.loads(lines[-1])
            safe = last.get("swap_safe")
            if isinstance(safe, dict) and len([w for w in safe["workers"] if w]) == workers:
                return last
        assert time.monotonic() < deadline, f"no complete swap_safe stats: {server.log()}"
        time.sleep(0.05)


CAP_SYS_RESOURCE = 24
MIB = 1 << 20


def have_cap_sys_resource() -> bool:
    """Whether processes started from here may set IO_FLUSHER (some sandboxes drop it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            return bool(int(line.split()[1], 16) & (1 << CAP_SYS_RESOURCE))
    raise AssertionError("no CapBnd in /proc/self/status")


def pids(server: ServerProcess) -> list[int]:
    parent = psutil.Process(server.proc.pid)
    return [parent.pid, *(c.pid for c in parent.children())]


def test_swap_export_turns_it_on_and_the_kernel_shows_it(tmp_path: Path) -> None:
    stats = tmp_path / "stats.jsonl"
    config = tmp_path / "c.toml"
    config.write_text(
        'port = 0\nworkers = 2\n[[exports]]\nname = "swap"\nsize = "64M"\nswap = true\n'
    )
    args = ["--config", str(config), "--stats", str(stats), "--stats-interval", "0.1"]
    flusher = have_cap_sys_resource()
    with running_server(tmp_path, *args) as server:
        last = last_stats(server, stats, workers=1)
        safe = last["swap_safe"]
        assert isinstance(safe, dict)
        for report in [safe, *safe["workers"]]:
            assert report["mlockall"]["ok"] is True, report
            # Where CAP_SYS_RESOURCE is withheld (this sandbox), the refusal is reported.
            assert report["io_flusher"]["ok"] is flusher, report
            if not flusher:
                assert "Operation not permitted" in report["io_flusher"]["detail"]
            assert report["bounded_inflight"]["ok"] is True, report
            assert str(8 << 20) in report["bounded_inflight"]["detail"]
        processes = pids(server)
        assert len(processes) == 2
        assert sorted([safe["pid"], *(w["pid"] for w in safe["workers"])]) == sorted(processes)
        for pid in processes:
            assert status_kib(pid, "VmLck") > 0, f"pid {pid} locked nothing"
            # Everything resident is locked (MCL_CURRENT) and stays so (MCL_FUTURE).
            assert status_kib(pid, "VmLck") >= status_kib(pid, "VmRSS") * 9 // 10
            flags = task_flags(pid)
            noio = PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE
            assert flags & noio == (noio if flusher else 0), f"pid {pid}: flags {flags:#x}"
        log = server.log()
        assert log.count("swap-safe (pid") == 6, log
        assert log.count("mlockall in effect") == 2, log
        expected = "io_flusher in effect" if flusher else "io_flusher NOT in effect"
        assert log.count(expected) == 2, log
        assert "Traceback" not in log and "Fatal error" not in log


def test_off_by_default_and_by_flag(tmp_path: Path) -> None:
    stats = tmp_path / "stats.jsonl"
    config = tmp_path / "c.toml"
    config.write_text('port = 0\n[[exports]]\nsize = "16M"\nswap = true\n')
    args = ["--config", str(config), "--no-swap-safe", "--workers", "1", "--stats", str(stats)]
    with running_server(tmp_path, *args) as server:
        assert status_kib(server.proc.pid, "VmLck") == 0
        assert not task_flags(server.proc.pid) & PF_MEMALLOC_NOIO
    assert "swap_safe" not in json.loads(stats.read_text().splitlines()[-1])
    assert "swap-safe" not in server.log()
    assert build_config({"memory": "1M"}).swap_safe is None


def test_without_privileges_it_says_what_failed_and_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setpriv, prlimit = shutil.which("setpriv"), shutil.which("prlimit")
    if setpriv is None or prlimit is None:
        pytest.fail("setpriv/prlimit are missing: apt-get install util-linux", pytrace=False)
    stats = tmp_path / "stats.jsonl"
    wrapper = tmp_path / "unprivileged-nbd-serve"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"exec {prlimit} --memlock=65536 {setpriv} --inh-caps=-all"
        f' --bounding-set=-ipc_lock,-sys_resource {nbdtest.NBD_SERVE} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setattr(nbdtest, "NBD_SERVE", str(wrapper))
    args = ["--memory", "16M", "--swap-safe", "--workers", "1", "--stats", str(stats)]
    with running_server(tmp_path, *args) as server:
        pid = server.proc.pid
        assert status_kib(pid, "VmLck") == 0
        assert not task_flags(pid) & PF_MEMALLOC_NOIO
    safe = json.loads(stats.read_text().splitlines()[-1])["swap_safe"]
    assert safe["mlockall"]["ok"] is False
    assert "CAP_IPC_LOCK" in safe["mlockall"]["detail"]
    assert safe["io_flusher"]["ok"] is False
    assert "CAP_SYS_RESOURCE" in safe["io_flusher"]["detail"]
    assert "Operation not permitted" in safe["io_flusher"]["detail"]
    log = server.log()
    assert "mlockall NOT in effect" in log and "io_flusher NOT in effect" in log


def test_the_bound_is_reported() -> None:
    assert check_bounds(8 << 20, 32 << 20).ok
    assert not check_bounds(0, 32 << 20).ok


def test_a_deep_queue_of_large_reads_stays_within_the_in_flight_bound(tmp_path: Path) -> None:
    """128 x 1 MiB READs from a client that does not read its replies yet: the server
    stops reading requests past --max-inflight, so its locked memory grows by about that
    bound, not by the 128 MiB a QD128 x 1 MiB client asks for."""
    args = ["--memory", "256M", "--swap-safe", "--workers", "1", "--max-inflight", "8M"]
    with running_server(tmp_path, *args) as server:
        pid = server.proc.pid
        with RawClient(server.port) as c:
            c.go(structured=False)
            c.request(Cmd.WRITE, 0, MIB, cookie=1, payload=b"\xab" * MIB)
            assert c.simple_reply()[0].error == 0
            before = status_kib(pid, "VmLck")
            c.send(b"".join(Request(0, Cmd.READ, i, 0, MIB).pack() for i in range(128)))
            peak = 0
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                peak = max(peak, status_kib(pid, "VmLck"))
                time.sleep(0.01)
            grown_mib = (peak - before) / 1024
            assert grown_mib < 48, f"locked memory grew by {grown_mib:.0f} MiB under the queue"
            cookies = set()
            for _ in range(128):
                reply, data = c.simple_reply(MIB)
                assert (reply.error, data[:1]) == (0, b"\xab")
                cookies.add(reply.cookie)
            assert cookies == set(range(128))
        assert "Traceback" not in server.log()
