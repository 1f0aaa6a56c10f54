"""The vmstat collector: recorded 6.1 and 6.12 /proc trees, the live /proc, and streaming."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    RUN_TIMEOUT_S,
    LineStream,
    kernel_root,
    read_json_lines,
    run_tool,
    tool_argv,
    tool_env,
)

from stress import procfs, vmstat
from stress.vmstat import KEY_FIELDS, is_counter, summarize, take_sample

SAMPLE_KEYS = {
    "type",
    "seq",
    "t_mono",
    "t_wall",
    "vmstat",
    "meminfo",
    "psi",
    "swaps",
    "netstat",
    "diskstats",
}
# Fields of the Debian cloud kernels' /proc/vmstat that only 6.12 has (from the captures).
ONLY_612 = {"swpin_zero", "swpout_zero", "pgscan_khugepaged", "pgsteal_khugepaged"}
# Neither cloud kernel has zswap: its counters are absent, not zero.
NO_ZSWAP = {"zswpin", "zswpout"}
# The captures predate the diskstats source (fixtures/README.md): absent, never zeros.
NOT_CAPTURED = {"diskstats"}


def fixture_pair(kernel: str) -> list[dict[str, Any]]:
    """t0 and t1 samples of a captured guest, set 10 s apart on the monotonic clock.

    The figures asserted below are the ones in the captured files
    (fixtures/capture_proc.py: 128 MiB guest, 256 MiB swap on /dev/vdb, 192 MiB touched).
    """
    first = take_sample(0, str(kernel_root(kernel, "t0")))
    last = take_sample(1, str(kernel_root(kernel, "t1")), final=True)
    first["t_mono"], last["t_mono"] = 100.0, 110.0
    return [first, last]


# --------------------------------------------------------------------------- recorded guests


def test_sample_linux_61() -> None:
    sample = take_sample(7, str(kernel_root("linux-6.1", "t1")))
    assert sample.keys() >= SAMPLE_KEYS
    assert (sample["type"], sample["seq"], sample["final"]) == ("sample", 7, False)
    v = sample["vmstat"]
    assert len(v) == 171
    assert next(iter(v)) == "nr_free_pages"  # kernel order kept
    assert v["pswpout"] == 134056
    assert v["allocstall_device"] == 0
    assert ONLY_612.isdisjoint(v)
    assert NO_ZSWAP.isdisjoint(v)
    assert sample["pgscan_direct_throttle"] == 14
    assert sample["meminfo"]["MemTotal"] == 94776 * 1024
    assert sample["meminfo"]["SwapFree"] == 256892 * 1024
    assert sample["meminfo"]["HugePages_Total"] == 0
    assert sample["meminfo_unit"] == "bytes"
    assert sample["psi"] == {
        "some": {"avg10": 40.58, "avg60": 12.29, "avg300": 2.82, "total": 9514307},
        "full": {"avg10": 27.81, "avg60": 8.9, "avg300": 2.06, "total": 6911182},
    }
    assert sample["netstat"] == {"PFMemallocDrop": 0}
    assert [s["filename"] for s in sample["swaps"]] == ["/dev/vdb"]
    json.dumps(sample)  # must serialise as one JSON line


def test_sample_linux_612() -> None:
    sample = take_sample(0, str(kernel_root("linux-6.12", "t1")))
    v = sample["vmstat"]
    assert len(v) == 182
    assert v.keys() >= ONLY_612
    assert NO_ZSWAP.isdisjoint(v)
    assert v["nr_memmap_boot_pages"] == 512
    assert v["swpout_zero"] == 49172  # the zero-filled pages 6.12 did not write to swap
    assert sample["psi"] == {
        "some": {"avg10": 39.28, "avg60": 11.01, "avg300": 2.48, "total": 7622369},
        "full": {"avg10": 27.89, "avg60": 7.9, "avg300": 1.78, "total": 5506913},
    }
    assert sample["netstat"] == {"PFMemallocDrop": 0}
    assert sample["swaps"] == [
        {
            "filename": "/dev/vdb",
            "type": "partition",
            "size_bytes": 262140 * 1024,
            "used_bytes": 5268 * 1024,
            "priority": -2,
        }
    ]
    assert sample["meminfo"]["AnonHugePages"] == 0


def test_sample_without_pressure_file(tmp_path: Path) -> None:
    """A kernel without PSI has no /proc/pressure: psi is None, not zeros."""
    root = tmp_path / "proc"
    shutil.copytree(kernel_root("linux-6.1", "t1"), root)
    shutil.rmtree(root / "pressure")
    sample = take_sample(0, str(root))
    assert sample["psi"] is None
    first = take_sample(0, str(root))
    assert "psi" in summarize([first, sample])["absent"]
    assert summarize([first, sample])["psi_delta"] is None


def test_sample_keeps_the_devices_that_did_io(tmp_path: Path) -> None:
    """The host's real /proc/diskstats in a captured tree: busy devices only."""
    root = tmp_path / "proc"
    shutil.copytree(kernel_root("linux-6.1", "t1"), root)
    assert take_sample(0, str(root))["diskstats"] is None  # the captures have none
    text = Path("/proc/diskstats").read_text()
    (root / "diskstats").write_text(text)
    every = procfs.parse_diskstats(text)
    busy = {n for n, f in every.items() if f["reads"] + f["writes"] > 0}
    assert busy, "no block device of this machine has done I/O"
    sample = take_sample(0, str(root))
    assert set(sample["diskstats"]) == busy
    assert sample["diskstats"] == {name: every[name] for name in busy}
    json.dumps(sample)


def test_summarize_diskstats_delta() -> None:
    first, last = fixture_pair("linux-6.12")
    nbd0 = dict.fromkeys(procfs.DISKSTATS_FIELDS, 0)
    first["diskstats"] = {"nbd0": dict(nbd0, reads=10, read_ms=40, writes=2, in_flight=5)}
    last["diskstats"] = {
        "nbd0": dict(nbd0, reads=110, read_ms=340, writes=52, write_ms=900, in_flight=1),
        "vda": dict(nbd0, reads=7, read_sectors=56),  # idle (left out) at the first sample
    }
    delta = summarize([first, last])["diskstats_delta"]
    assert delta["nbd0"] == dict(
        dict.fromkeys([f for f in procfs.DISKSTATS_FIELDS if f != "in_flight"], 0),
        reads=100,
        read_ms=300,
        writes=50,
        write_ms=900,
    )
    assert delta["vda"]["reads"] == 7
    assert delta["vda"]["read_sectors"] == 56
    assert "diskstats" not in summarize([first, last])["absent"]
    first["diskstats"] = None  # a guest without /proc/diskstats: absent, never zeros
    summary = summarize([first, last])
    assert summary["diskstats_delta"] is None
    assert "diskstats" in summary["absent"]


# t1 - t0 in the captured guests (values read off the files; nr_free_pages is a gauge).
CAPTURED_DELTAS = {
    "linux-6.1": {
        "pswpout": 134056,
        "pswpin": 98686,
        "pgscan_direct_throttle": 14,
        "allocstall_normal": 5,
        "allocstall_dma32": 0,
        "nr_free_pages": 14759 - 11460,
    },
    "linux-6.12": {
        "pswpout": 83991,
        "pswpin": 49834,
        "pgscan_direct_throttle": 84,
        "allocstall_normal": 5,
        "allocstall_dma32": 0,
        "nr_free_pages": 15594 - 12433,
    },
}
CAPTURED_SWAP_USED_KIB = {"linux-6.1": 5248, "linux-6.12": 5268}
CAPTURED_AVAILABLE_KIB = {"linux-6.1": 67800, "linux-6.12": 63128}


@pytest.mark.parametrize("kernel", ["linux-6.1", "linux-6.12"])
def test_summarize_recorded_guest(kernel: str) -> None:
    summary = summarize(fixture_pair(kernel))
    delta, rates = summary["vmstat_delta"], summary["rates"]
    assert summary["interval_s"] == 10.0
    assert summary["samples"] == 2
    assert (summary["first_seq"], summary["last_seq"]) == (0, 1)
    expected = CAPTURED_DELTAS[kernel]
    assert {name: delta[name] for name in expected} == expected
    assert delta["pgscan_direct_throttle"] == summary["pgscan_direct_throttle"]
    assert delta["oom_kill"] == 0
    assert rates["pswpout"] == pytest.approx(expected["pswpout"] / 10)
    assert rates["pgscan_direct_throttle"] == pytest.approx(expected["pgscan_direct_throttle"] / 10)
    assert "nr_free_pages" not in rates
    assert "nr_dirty_threshold" not in rates
    assert set(rates) == {name for name in delta if is_counter(name)}
    assert summary["swap_used_bytes_max"] == CAPTURED_SWAP_USED_KIB[kernel] * 1024
    assert summary["meminfo_last"]["MemAvailable"] == CAPTURED_AVAILABLE_KIB[kernel] * 1024
    for name in summary["absent"]:  # absent means absent, never a zero
        assert name not in delta
        assert name not in rates


def test_summarize_61_absent_fields() -> None:
    summary = summarize(fixture_pair("linux-6.1"))
    assert summary["absent"] == sorted(ONLY_612 | NO_ZSWAP | NOT_CAPTURED)
    assert summary["vmstat_delta"]["allocstall_device"] == 0
    assert summary["psi_delta"] == {"some_total_us": 9514307, "full_total_us": 6911182}
    assert summary["netstat_delta"] == {"PFMemallocDrop": 0}


def test_summarize_612_absent_fields() -> None:
    summary = summarize(fixture_pair("linux-6.12"))
    assert summary["absent"] == sorted(NO_ZSWAP | NOT_CAPTURED)
    assert summary["vmstat_delta"]["swpout_zero"] == 49172
    assert summary["psi_delta"] == {"some_total_us": 7622369, "full_total_us": 5506913}
    assert summary["netstat_delta"] == {"PFMemallocDrop": 0}


def test_summarize_field_in_only_one_sample() -> None:
    first, last = fixture_pair("linux-6.12")
    first["vmstat"]["brand_new_counter"] = 5
    del last["vmstat"]["pgmajfault"]
    last["vmstat"]["appeared_later"] = 9
    last["netstat"] = None
    summary = summarize([first, last])
    absent = set(summary["absent"])
    assert {"brand_new_counter", "pgmajfault", "appeared_later", "netstat.PFMemallocDrop"} <= absent
    assert "pgmajfault" not in summary["vmstat_delta"]
    assert "brand_new_counter" not in summary["rates"]
    assert summary["netstat_delta"] is None


def test_summarize_uses_first_and_last_only() -> None:
    first, last = fixture_pair("linux-6.1")
    middle = dict(first, seq=5, vmstat={"pswpout": 10**12})
    assert (
        summarize([first, middle, last])["vmstat_delta"] == summarize([first, last])["vmstat_delta"]
    )
    assert summarize([first, middle, last])["samples"] == 3


def test_summarize_single_and_empty() -> None:
    (first, _last) = fixture_pair("linux-6.1")
    one = summarize([first])
    assert one["interval_s"] == 0
    assert one["rates"] == {}
    assert set(one["vmstat_delta"].values()) == {0}
    with pytest.raises(ValueError, match="at least one sample"):
        summarize([])


def test_key_fields_cover_the_experiment() -> None:
    assert KEY_FIELDS[0] == "pgscan_direct_throttle"
    assert {"pswpin", "pswpout", "oom_kill", "allocstall_dma32"} <= set(KEY_FIELDS)


# --------------------------------------------------------------------------- live /proc


def test_live_proc_sample_and_summary() -> None:
    first = take_sample(0)
    _ = bytearray(8 * 1024 * 1024)  # fault in some pages between the samples
    last = take_sample(1)
    mem_total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert first["meminfo"]["MemTotal"] == mem_total
    with open("/proc/vmstat") as handle:
        names = [line.split()[0] for line in handle]
    assert list(first["vmstat"]) == names
    assert first["pgscan_direct_throttle"] == first["vmstat"]["pgscan_direct_throttle"]
    assert last["t_mono"] > first["t_mono"]
    assert last["t_wall"] >= first["t_wall"]
    summary = summarize([first, last])
    assert summary["vmstat_delta"]["pgfault"] > 0
    assert summary["vmstat_delta"]["pswpout"] == (
        last["vmstat"]["pswpout"] - first["vmstat"]["pswpout"]
    )
    assert set(summary["absent"]).isdisjoint(first["vmstat"].keys() & last["vmstat"].keys())
    assert (summary["psi_delta"] is None) == (not os.path.exists("/proc/pressure/memory"))


# --------------------------------------------------------------------------- CLI and streaming


def test_cli_count_to_file(tmp_path: Path) -> None:
    out = tmp_path / "samples.jsonl"
    summary_path = tmp_path / "summary.json"
    argv = ["--out", str(out), "--interval", "0.05", "--count", "3", "--summary", str(summary_path)]
    proc = run_tool("vmstat", *argv, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = read_json_lines(out)
    assert [s["seq"] for s in lines] == [0, 1, 2]
    assert [s["final"] for s in lines] == [False, False, True]
    monos = [s["t_mono"] for s in lines]
    assert monos == sorted(monos)
    for sample in lines:
        assert sample.keys() >= SAMPLE_KEYS
    summary = json.loads(summary_path.read_text())
    assert summary["type"] == "summary"
    assert (summary["first_seq"], summary["last_seq"], summary["samples"]) == (0, 2, 2)
    assert summary["interval_s"] == pytest.approx(monos[2] - monos[0])


def test_cli_duration_ends_with_a_final_sample(tmp_path: Path) -> None:
    out = tmp_path / "samples.jsonl"
    argv = ["--out", str(out), "--interval", "0.25", "--duration", "0.5"]
    proc = run_tool(
        "vmstat", *argv, "--proc-root", str(kernel_root("linux-6.1", "t0")), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    lines = read_json_lines(out)
    assert [(s["seq"], s["final"]) for s in lines] == [(0, False), (1, False), (2, True)]
    assert lines[0]["vmstat"]["pswpout"] == 0


def test_cli_streams_to_a_fifo_as_lines_arrive_and_stops_on_sigterm(
    tmp_path: Path, fifo: Path, proc_children: list[subprocess.Popen[str]]
) -> None:
    argv = tool_argv("vmstat", "--out", str(fifo), "--interval", "0.05")
    proc = subprocess.Popen(argv, cwd=tmp_path, env=tool_env(), stderr=subprocess.PIPE, text=True)
    proc_children.append(proc)
    stream = LineStream(os.open(fifo, os.O_RDONLY))
    seen = [stream.next() for _ in range(3)]  # each line readable while the collector runs
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    rest = stream.rest()
    stream.close()
    _, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, stderr
    samples = [s for s in seen if s is not None] + rest
    assert [s["seq"] for s in samples] == list(range(len(samples)))
    assert samples[-1]["final"] is True
    assert not any(s["final"] for s in samples[:-1])


def test_cli_streams_to_an_os_pipe(
    tmp_path: Path, proc_children: list[subprocess.Popen[str]]
) -> None:
    read_fd, write_fd = os.pipe()
    argv = tool_argv("vmstat", "--out", f"/dev/fd/{write_fd}", "--interval", "0.05")
    proc = subprocess.Popen(
        argv, cwd=tmp_path, env=tool_env(), pass_fds=[write_fd], stderr=subprocess.PIPE, text=True
    )
    proc_children.append(proc)
    os.close(write_fd)
    stream = LineStream(read_fd)
    first = stream.next()
    second = stream.next()
    assert first is not None and second is not None
    assert (first["seq"], second["seq"]) == (0, 1)
    proc.send_signal(signal.SIGINT)
    rest = stream.rest()
    stream.close()
    _, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, stderr
    assert rest[-1]["final"] is True
    assert [s["seq"] for s in rest] == list(range(2, 2 + len(rest)))


def test_cli_write_failure_is_loud(tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)  # nobody will ever read: the first write gets EPIPE
    try:
        proc = subprocess.run(
            tool_argv("vmstat", "--out", f"/dev/fd/{write_fd}", "--count", "2"),
            cwd=tmp_path,
            env=tool_env(),
            pass_fds=[write_fd],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            check=False,
        )
    finally:
        os.close(write_fd)
    assert proc.returncode == vmstat.EXIT_FAILURE == 1
    assert "swapnbd-vmstat: error: write to" in proc.stderr
    assert "failed after 0 lines" in proc.stderr


def test_cli_missing_proc_is_an_error(tmp_path: Path) -> None:
    proc = run_tool("vmstat", "--count", "1", "--proc-root", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 1
    assert f"{tmp_path}/vmstat does not exist" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--interval", "0"], "must be a positive number"),
        (["--count", "0"], "must be at least 1"),
        (["--count", "2", "--duration", "1"], "not allowed with argument"),
    ],
)
def test_cli_usage_errors(tmp_path: Path, argv: list[str], message: str) -> None:
    proc = run_tool("vmstat", *argv, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_cli_mlock(tmp_path: Path) -> None:
    proc = run_tool("vmstat", "--mlock", "--count", "1", cwd=tmp_path)
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["seq"] == 0
    if os.geteuid() == 0:
        assert proc.stderr == ""
    else:  # without CAP_IPC_LOCK the lock may fail: that is a warning, never silence
        assert proc.stderr == "" or "CAP_IPC_LOCK" in proc.stderr
