"""fio argv building and fio JSON parsing (pure)."""

from __future__ import annotations

import pytest

from bench.workloads import (
    KIB,
    MIB,
    RSS_WORKLOAD,
    WORKLOADS,
    FioOutputError,
    Pattern,
    Transport,
    fio_argv,
    parse_fio_json,
    select_workloads,
)

from .fio_samples import direction, job, report


def test_the_issue_workloads_are_all_there() -> None:
    desc = {w.description for w in WORKLOADS}
    assert desc == {
        "seq read 1 MiB QD8",
        "seq write 1 MiB QD8",
        "rand read 4 KiB QD32",
        "rand write 4 KiB QD32",
        "rand read 4 KiB QD1",
        "rand read 4 KiB QD32 x2 conn",
        "rand write 4 KiB QD32 x2 conn",
        "rand read 4 KiB QD32 x4 conn",
        "rand write 4 KiB QD32 x4 conn",
        "rand read 4 KiB QD32 unix",
        "rand write 4 KiB QD32 unix",
    }
    assert len({w.name for w in WORKLOADS}) == len(WORKLOADS)
    assert RSS_WORKLOAD.description == "seq write 1 MiB QD128 x4 conn"


def test_parse_sums_directions_and_skips_chatter() -> None:
    text = report(
        job(
            read=direction(iops=1000.0, bw=4096000.0, io_bytes=4096000, n=1000, mean_ns=100_000.0,
                           p99_ns=300_000.0),
            write=direction(iops=500.0, bw=2048000.0, io_bytes=2048000, n=500, mean_ns=400_000.0,
                            p99_ns=900_000.0),
        )
    )  # fmt: skip
    r = parse_fio_json(text)
    assert r.read_iops == 1000.0
    assert r.write_iops == 500.0
    assert r.iops == 1500.0
    assert r.bytes_moved == 6144000
    assert r.mib_per_s == pytest.approx(6144000 / MIB)
    # (100 us * 1000 + 400 us * 500) / 1500
    assert r.lat_mean_us == pytest.approx(200.0)
    assert r.lat_p99_us == pytest.approx(900.0)


def test_parse_adds_up_jobs_without_group_reporting() -> None:
    one = job(read=direction(iops=10.0, bw=40960.0, io_bytes=40960, n=10, mean_ns=1000.0))
    r = parse_fio_json(report(one, one))
    assert r.iops == 20.0
    assert r.bytes_moved == 81920
    assert r.lat_p99_us == 0.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("fio: connected to NBD server\n", "no JSON object"),
        ("{not json", "not valid JSON"),
        ('{"jobs": []}', "no 'jobs' list"),
        (report(job(error=5, name="x")), "fio job 'x' failed: error 5"),
        (report(job()), "moved no data"),
        ('{"jobs": [{"error": 0, "read": 3}]}', "lacks the object 'read'"),
    ],
)
def test_parse_rejects_bad_reports(text: str, message: str) -> None:
    with pytest.raises(FioOutputError, match=message):
        parse_fio_json(text)


def test_fio_argv_random_multiconn() -> None:
    w = select_workloads("rand-write-4k-qd32-4conn")[0]
    argv = fio_argv(w, uri="nbd://127.0.0.1:1234/x", size=64 * MIB, runtime_s=1.5, ramp_s=0.5,
                    output="/tmp/o.json", fio="/usr/bin/fio")  # fmt: skip
    assert argv[0] == "/usr/bin/fio"
    for opt in (
        "--ioengine=nbd", "--uri=nbd://127.0.0.1:1234/x", "--rw=randwrite", f"--bs={4 * KIB}",
        "--iodepth=32", "--numjobs=4", "--group_reporting", f"--size={64 * MIB}",
        "--runtime=1500ms", "--ramp_time=500ms", "--output=/tmp/o.json", "--norandommap",
    ):  # fmt: skip
        assert opt in argv


def test_fio_argv_sequential_without_ramp() -> None:
    w = select_workloads("seq-read-1m-qd8")[0]
    argv = fio_argv(w, uri="u", size=MIB, runtime_s=2, ramp_s=0, output="o")
    assert "--rw=read" in argv
    assert not any(a.startswith("--ramp_time") for a in argv)
    assert "--norandommap" not in argv


@pytest.mark.parametrize(("runtime", "ramp"), [(0, 0), (-1, 0), (1, -0.5)])
def test_fio_argv_rejects_bad_times(runtime: float, ramp: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        fio_argv(WORKLOADS[0], uri="u", size=MIB, runtime_s=runtime, ramp_s=ramp, output="o")


def test_select_keeps_table_order_and_names_unknowns() -> None:
    got = select_workloads("unix-rand-read-4k-qd32, seq-read-1m-qd8")
    assert [w.name for w in got] == ["seq-read-1m-qd8", "unix-rand-read-4k-qd32"]
    assert got[1].transport is Transport.UNIX
    assert got[0].pattern is Pattern.READ
    assert select_workloads(None) == WORKLOADS
    with pytest.raises(ValueError, match="unknown workload\\(s\\) nope; known: seq-read-1m-qd8"):
        select_workloads("nope,seq-read-1m-qd8")
    with pytest.raises(ValueError, match="empty"):
        select_workloads(" , ")
