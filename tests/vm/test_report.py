"""vm.campaign.archive, .report, .plots and .publish: loading run.json trees, per-arm
aggregation, Markdown/CSV/JSON, plots.

The fixtures in ``data/report`` come from a real ``swapnbd run`` (128M guest, 4 workers,
256M, 1 loop, Debian 6.1, nbd-serve) trimmed by ``data/report/make_fixtures.py``;
``lockup/`` is the same run cut at 40% of its samples and labelled as the vanilla arm.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from vm import cli
from vm.campaign import archive, plots, publish, report

DATA = Path(__file__).resolve().parent / "data" / "report"
PATCHED = "6.1-patched-slub-nbd-serve"
VANILLA = "6.1-vanilla-slub-nbd-serve"


def fixture(name: str) -> report.RunData:
    (run,) = archive.load_runs([DATA / name])
    return run


def synthetic(
    base: report.RunData, *, outcome: str = "completed", sys_s: float = 10.0, **over: Any
) -> report.RunData:
    run = copy.deepcopy(base.run)
    run["outcome"] = outcome
    run["swapstress"] = {"sys_s": sys_s, "user_sys_s": sys_s + 1.0, "elapsed_s": sys_s * 10}
    run["config"].update(over)
    return report.RunData(base.path, run, base.samples)


# --- loading --------------------------------------------------------------------------


def test_load_finds_runs_recursively_and_skips_hidden_dirs(tmp_path: Path) -> None:
    shutil.copytree(DATA / "completed", tmp_path / "store" / "r01")
    shutil.copytree(DATA / "lockup", tmp_path / "store" / "r02")
    shutil.copytree(DATA / "lockup", tmp_path / "store" / ".attic" / "r02-old")
    runs = archive.load_runs([tmp_path / "store", tmp_path / "store" / "r01"])
    assert [r.name for r in runs] == ["r01", "r02"]  # r01 given twice, counted once
    assert len(runs[0].samples) == 156
    assert len(runs[1].samples) == 62


def test_load_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(report.ReportError, match="does not exist"):
        archive.load_runs([tmp_path / "nope"])
    with pytest.raises(report.ReportError, match=r"no run\.json under"):
        archive.load_runs([tmp_path])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "run.json").write_text("{cut")
    with pytest.raises(report.ReportError, match="is not readable JSON"):
        archive.load_runs([tmp_path / "bad"])


# --- metrics from the real run --------------------------------------------------------


def test_metrics_of_the_real_completed_run() -> None:
    m = report.run_metrics(fixture("completed"))
    assert (m["sys_s"], m["user_sys_s"], m["elapsed_s"]) == (46.666407, 48.72359, 150.898838)
    assert (m["pswpin"], m["pswpout"], m["pgscan_direct_throttle"]) == (134351, 190985, 4)
    assert m["allocstall"] == 27 + 2219  # allocstall_normal + allocstall_movable
    assert (m["pgscan_direct"], m["pgsteal_direct"]) == (340631, 101612)
    assert m["direct_efficiency"] == pytest.approx(100 * 101612 / 340631)
    assert m["kswapd_efficiency"] == pytest.approx(100 * 97890 / 372866)
    assert m["pfmemalloc_drop"] == 0
    assert m["server_cpu_s"] is None  # this run.json predates the cost section


def test_a_lockup_run_has_counters_but_no_times() -> None:
    m = report.run_metrics(fixture("lockup"))
    assert (m["sys_s"], m["user_sys_s"], m["elapsed_s"]) == (None, None, None)
    assert (m["pswpin"], m["pswpout"]) == (33327, 98791)


def test_pfmemalloc_drop_is_last_minus_first_sample() -> None:
    samples = [
        {"netstat": {"PFMemallocDrop": 3}},
        {"netstat": None},
        {"netstat": {"PFMemallocDrop": 10}},
    ]
    assert report.pfmemalloc_drop(samples) == 7
    assert report.pfmemalloc_drop([{"netstat": None}, {"netstat": {"PFMemallocDrop": 1}}]) is None
    assert report.pfmemalloc_drop([]) is None


def test_cost_rows_come_from_run_json_cost() -> None:
    data = fixture("completed")
    data.run["cost"] = {
        "server": {
            "user_s": 3.5,
            "system_s": 6.5,
            "peak_rss_bytes": 64 * 1024 * 1024,
            "wakeups": 1000,
            "runqueue_wait_s": 0.75,
        },
        "qemu": {"user_s": 100.0, "system_s": 20.0},
        "host_steal_s": None,
    }
    m = report.run_metrics(data)
    assert (m["server_cpu_s"], m["server_peak_rss_mib"], m["qemu_cpu_s"]) == (10.0, 64.0, 120.0)
    assert m["server_runqueue_wait_s"] == 0.75
    rep = report.build_report([data])
    assert [r["key"] for r in rep["rows"]][-6:] == [
        "server_cpu_s",
        "server_cpu_per_gib",
        "server_peak_rss_mib",
        "server_wakeups_per_mib",
        "server_runqueue_wait_s",
        "qemu_cpu_s",
    ]
    del data.run["cost"]["server"]["runqueue_wait_s"]  # a run.json from before it was kept
    assert "server_runqueue_wait_s" not in [r["key"] for r in report.build_report([data])["rows"]]
    del data.run["cost"]["server"]["wakeups"]  # a run.json from before wake-ups were kept
    assert report.run_metrics(data)["server_wakeups_per_mib"] is None
    assert "server_wakeups_per_mib" not in [r["key"] for r in report.build_report([data])["rows"]]


def test_swap_device_rows_are_iostat_figures() -> None:
    """await = ms from issue to completion / requests; queue depth = weighted ms / interval.
    The figures are those of a real swap-path run's nbd0 (2026-11-30)."""
    data = fixture("completed")
    data.run["swap_device"] = {
        "name": "nbd0",
        "interval_s": 45.19141285,
        "reads": 48836,
        "read_sectors": 1471128,
        "read_ms": 152676,
        "writes": 27535,
        "write_sectors": 1828200,
        "write_ms": 823287,
        "io_ms": 42060,
        "queue_ms": 975963,
    }
    m = report.run_metrics(data)
    assert m["swap_read_await_ms"] == pytest.approx(3.1263, abs=1e-4)
    assert m["swap_write_await_ms"] == pytest.approx(29.8996, abs=1e-4)
    assert m["swap_write_kib"] == pytest.approx(33.1977, abs=1e-4)
    assert m["swap_queue_depth"] == pytest.approx(21.5962, abs=1e-4)
    keys = [r["key"] for r in report.build_report([data])["rows"]]
    assert keys[-4:] == [
        "swap_read_await_ms",
        "swap_write_await_ms",
        "swap_write_kib",
        "swap_queue_depth",
    ]
    data.run["swap_device"]["writes"] = 0  # no write in the window: no await, not 0
    assert report.run_metrics(data)["swap_write_await_ms"] is None
    del data.run["swap_device"]  # a run.json from before the collector read diskstats
    assert not set(keys[-4:]) & {r["key"] for r in report.build_report([data])["rows"]}


def test_server_wakeups_per_mib_divides_by_the_pages_swapped_both_ways() -> None:
    data = fixture("completed")
    data.run["cost"] = {"server": {"user_s": 1.0, "system_s": 2.0, "wakeups": 51200}}
    data.run["vmstat_delta"] = {**data.run["vmstat_delta"], "pswpin": 131072, "pswpout": 131072}
    assert report.run_metrics(data)["server_wakeups_per_mib"] == 50.0  # 51,200 per GiB


def test_server_cpu_per_gib_divides_by_the_pages_swapped_both_ways() -> None:
    data = fixture("completed")
    data.run["cost"] = {"server": {"user_s": 1.0, "system_s": 2.0, "peak_rss_bytes": 1}}
    data.run["vmstat_delta"] = {**data.run["vmstat_delta"], "pswpin": 131072, "pswpout": 131072}
    assert report.run_metrics(data)["server_cpu_per_gib"] == 3.0  # 2 x 512 MiB = 1 GiB
    data.run["vmstat_delta"] = {**data.run["vmstat_delta"], "pswpin": 0, "pswpout": 0}
    assert report.run_metrics(data)["server_cpu_per_gib"] is None  # nothing swapped


def test_medians_get_rows_with_range_and_ratio_of_medians() -> None:
    base = fixture("completed")
    runs = [
        *(synthetic(base, sys_s=e / 10, server="nbdkit") for e in (70.0, 72.0, 90.0)),
        *(synthetic(base, sys_s=e / 10, server="nbd-serve") for e in (60.0, 63.0, 200.0)),
    ]
    rep = report.build_report(runs, baseline="6.1-patched-slub-nbdkit")
    (row,) = [r for r in rep["rows"] if r["key"] == "elapsed_s"]
    serve = row["values"]["6.1-patched-slub-nbd-serve"]
    assert (serve["median"], serve["min"], serve["max"]) == (63.0, 60.0, 200.0)
    assert serve["median_ratio"] == pytest.approx(63.0 / 72.0)
    assert serve["ratio"] == pytest.approx(323.0 / 232.0)  # the mean, dragged by one stall
    md = report.render(rep, "md")
    line = next(x for x in md.splitlines() if x.startswith("| median Total Elapsed Time (s)"))
    assert line == (
        "| median Total Elapsed Time (s) | 72.00 [70.00-90.00] (1.00x) "
        "| 63.00 [60.00-200.00] (0.88x) |"
    )


# --- aggregation ----------------------------------------------------------------------


def test_arms_mean_sd_ratio_and_outcome_counts() -> None:
    base = fixture("completed")
    runs = [
        synthetic(base, sys_s=10.0, arm="vanilla", allocator="slab"),
        synthetic(base, sys_s=12.0, arm="vanilla", allocator="slab"),
        synthetic(base, sys_s=8.0),
        synthetic(base, sys_s=9.0),
        synthetic(base, outcome="lockup", sys_s=99.0),
    ]
    rep = report.build_report(runs, baseline="6.1-vanilla-slab-nbd-serve")
    arms = {a["label"]: a for a in rep["arms"]}
    assert list(arms) == ["6.1-vanilla-slab-nbd-serve", PATCHED]
    assert arms[PATCHED]["outcome_text"] == "completed 2/3, lockup 1/3"
    assert arms["6.1-vanilla-slab-nbd-serve"]["outcome_text"] == "completed 2/2"
    sys_row = next(r for r in rep["rows"] if r["key"] == "sys_s")
    slab = sys_row["values"]["6.1-vanilla-slab-nbd-serve"]
    patched = sys_row["values"][PATCHED]
    assert (slab["mean"], slab["sd"], slab["n"], slab["ratio"]) == pytest.approx(
        (11.0, 1.4142135623730951, 2, 1.0)
    )
    # the lockup's 99 s is not averaged in: only completed runs have times
    assert (patched["mean"], patched["n"], patched["ratio"]) == pytest.approx((8.5, 2, 8.5 / 11))
    # Welch: t = -2.24 on 1.47 df (rounded down to 1: critical 12.706), so no mark
    assert report.cell_text(patched, "time", 3, True) == (
        "8.50 ± 0.71 (8.3%) [8.00-9.00] (n=2) -22.7%"
    )
    assert (patched["t"], patched["df"], patched["significant"]) == pytest.approx(
        (-2.5 / 1.25**0.5, 1.5625 / 1.0625, False)
    )
    assert "(1 such run(s) here)" in rep["footnotes"][0]


def test_the_header_names_every_ratio_of_a_boundary_on_one_line() -> None:
    def run(**cfg: Any) -> report.RunData:
        base = {"workers": 16, "loops": 1, "swap": "device", "server": "nbd-serve"}
        return report.RunData(Path(f"r{len(cfg)}"), {"config": {**base, **cfg}})

    runs = [run(ratio=r, total_bytes=None) for r in (2.5, 1.25, 4.0, 1.25)]
    assert report.build_header(runs)[0] == {
        "name": "test",
        "value": "swapstress, 16 workers touching 1.25, 2.5 and 4 x guest RAM, 1 loop(s); "
        "swap on device via nbd-serve",
    }
    mixed = [run(ratio=2.0, total_bytes=None), run(ratio=None, total_bytes=256 * 2**20)]
    assert report.build_header(mixed)[0]["value"] == (
        "swapstress, 16 workers touching 2 x guest RAM, 256 MiB, 1 loop(s); swap on device "
        "via nbd-serve"
    )
    other = [*runs, run(ratio=2.0, total_bytes=None, server="nbdkit")]
    assert report.build_header(other)[0]["value"] == (
        "swapstress, 16 workers touching 1.25, 2.5 and 4 x guest RAM, 1 loop(s); swap on "
        "device via nbd-serve, swapstress, 16 workers touching 2 x guest RAM, 1 loop(s); "
        "swap on device via nbdkit"
    )


def test_a_result_grown_over_days_says_which_arms_ran_on_which_day() -> None:
    """7.2 joined the seed a day after its other cells, on a host three times as fast: the
    header names each day's arms, so no one reads a cross-day ratio as the kernel's."""

    def run(kernel: str, arm: str, day: str) -> report.RunData:
        cfg = {"kernel": kernel, "arm": arm, "server": "nbd-serve", "ratio": 4.0}
        host = {"started_utc": f"{day}T10:00:00+00:00"}
        return report.RunData(Path(f"{kernel}-{arm}"), {"config": cfg, "host": host})

    first = [run("6.1", "patched", "2026-12-06"), run("6.1", "vanilla", "2026-12-06")]
    dated = {h["name"]: h["value"] for h in report.build_header(first)}["runs dated"]
    assert dated == "2026-12-06 (UTC, host clock)"
    grown = [*first, run("7.2", "patched", "2026-12-07"), run("7.2", "patched", "2026-12-07")]
    dated = {h["name"]: h["value"] for h in report.build_header(grown)}["runs dated"]
    assert dated == (
        "2026-12-06 to 2026-12-07 (UTC, host clock); "
        "2026-12-06: 6.1-patched-slub-nbd-serve, 6.1-vanilla-slub-nbd-serve; "
        "2026-12-07: 7.2-patched-slub-nbd-serve; times compare within a day"
    )


def test_real_runs_grouped_by_arm_in_markdown() -> None:
    rep = report.build_report(archive.load_runs([DATA]))
    text = report.render(rep, "md")
    lines = text.splitlines()
    assert f"|  | {PATCHED} | {VANILLA} |" in lines
    assert "| outcome | completed 1/1 | lockup 1/1 |" in lines
    assert "| Sys Time (s) | 46.67 | — |" in lines
    assert "| Total Elapsed Time (s) | 150.90 | — |" in lines
    assert "| pgscan_direct_throttle | 4 | 4 +0.0% |" in lines
    assert "| swap outs (pswpout) (pages) | 190985 | 98791 -48.3% |" in lines
    assert "| direct reclaim efficiency (steal/scan) (%) | 29.83 | 31.23 +4.7% |" in lines
    assert "| PFMemallocDrop | 0 | 0 |" in lines
    # the header: what the runs recorded, "not recorded" for what these older runs lack
    assert (
        "- test: swapstress, 4 workers touching 256 MiB, 1 loop(s); swap on device via nbd-serve"
        in lines
    )
    assert "- guest: 128 MiB RAM, 2 vCPU(s), accel tcg" in lines
    assert "- lockup cutoff (no progress for): 180 s" in lines
    assert "- host CPU: not recorded" in lines
    assert "- guest kernel packages: linux-image-6.1.0-57-cloud-amd64 6.1.192-3" in lines
    assert any("lockup, guest-crash, oom and error runs have no times" in line for line in lines)


def test_csv_and_json_carry_the_same_numbers() -> None:
    rep = report.build_report(archive.load_runs([DATA]), baseline=VANILLA)
    rows = list(csv.DictReader(io.StringIO(report.render(rep, "csv"))))
    by = {(r["arm"], r["metric"]): r for r in rows}
    assert by[(PATCHED, "outcome")]["text"] == "completed 1/1"
    assert by[(VANILLA, "outcome_lockup")]["mean"] == "1"
    assert float(by[(PATCHED, "pswpout")]["mean"]) == 190985
    assert float(by[(PATCHED, "pswpout")]["ratio_to_baseline"]) == pytest.approx(190985 / 98791)
    assert by[(VANILLA, "sys_s")]["n"] == "0"
    obj = json.loads(report.render(rep, "json"))
    assert obj["baseline"] == VANILLA
    assert [a["outcomes"] for a in obj["arms"]] == [{"completed": 1}, {"lockup": 1}]


def test_interrupted_runs_are_left_out_and_named() -> None:
    base = fixture("completed")
    stopped = synthetic(base, outcome="error")
    stopped.run["interrupted"] = True
    stopped.path = Path("/store/r02-x")
    rep = report.build_report([base, stopped])
    assert rep["runs"] == 1
    assert rep["footnotes"][-1] == "1 interrupted run(s) left out: r02-x."


def test_unknown_baseline_names_the_arms() -> None:
    with pytest.raises(
        report.ReportError, match=f"--baseline 'x' is not an arm here; arms: {PATCHED}, {VANILLA}"
    ):
        report.build_report(archive.load_runs([DATA]), baseline="x")


def test_a_differing_axis_splits_arms() -> None:
    base = fixture("completed")
    rep = report.build_report([synthetic(base, workers=4), synthetic(base, workers=16)])
    assert [a["label"] for a in rep["arms"]] == [f"{PATCHED}-w4", f"{PATCHED}-w16"]


# --- plots ----------------------------------------------------------------------------


def test_series_rates_and_cumulative_throttle() -> None:
    samples = [
        {
            "t_mono": 10.0,
            "vmstat": {"pswpin": 0, "pswpout": 0, "pgscan_direct_throttle": 5},
            "meminfo": {"MemFree": 8 * 1024 * 1024},
        },
        {
            "t_mono": 12.0,
            "vmstat": {"pswpin": 100, "pswpout": 400, "pgscan_direct_throttle": 7},
            "meminfo": {"MemFree": 4 * 1024 * 1024},
        },
    ]
    s = plots.series(samples)
    assert s == {
        "t": [0.0, 2.0],
        "memfree_mib": [8.0, 4.0],
        "swapin_rate": [0.0, 50.0],
        "swapout_rate": [0.0, 200.0],
        "throttle": [0.0, 2.0],
    }


def test_the_lockup_series_ends_where_the_samples_end() -> None:
    full = plots.series(fixture("completed").samples)
    cut = plots.series(fixture("lockup").samples)
    assert len(cut["t"]) == 62 < len(full["t"]) == 156
    assert cut["t"] == full["t"][:62]


def test_plots_one_row_per_arm(tmp_path: Path) -> None:
    """Runs without events: no overlays, and arms.png with the two arms' rows."""
    written = plots.write_plots(archive.load_runs([DATA]), tmp_path / "plots")
    assert [p.name for p in written] == [plots.ARMS_PNG]
    png = written[0].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert int.from_bytes(png[20:24], "big") == round((0.6 + 2.7 * 2) * 72)


def test_cli_report_writes_the_output_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r.csv"
    assert cli.main(["report", str(DATA), "--format", "csv", "--output", str(out)]) == 0
    assert out.read_text().startswith(
        "arm,metric,unit,mean,sd,n,runs,ratio_to_baseline,text,median,cov_pct,min,max,"
        "diff_pct,welch_t,welch_df,significant_5pct\n"
    )
    assert cli.main(["report", str(tmp_path / "none")]) == 2
    assert "swapnbd report: error: " in capsys.readouterr().err


def test_the_kernel_row_names_the_debian_version() -> None:
    """6.1.0-57 spans point releases: the report must say which one each arm ran."""
    stock = {"release": "6.1.0-57-cloud-amd64", "version": "6.1.192-3"}
    assert report.kernel_text(stock) == "6.1.0-57-cloud-amd64 (6.1.192-3)"
    assert report.kernel_text({"release": "6.1.0-57-cloud-amd64"}) == "6.1.0-57-cloud-amd64"
    assert report.kernel_text({}) == "?"
    built = {"release": "6.1-slab (6.1.192-3)", "version": "6.1.192-3"}
    assert report.kernel_text(built) == "6.1-slab (6.1.192-3)"
    rep = report.build_report(archive.load_runs([DATA]))
    assert "| kernel | 6.1.0-57-cloud-amd64 | 6.1.0-57-cloud-amd64 |" in report.render(rep, "md")


def test_lockup_signatures_stalls_and_the_harness_footprint_per_arm(tmp_path: Path) -> None:
    """The kernel's evidence reaches the report: signature counts, stalls, locked memory."""
    import json
    import shutil

    store = tmp_path / "store"
    for name, signature in (("lockup", "memalloc-deadlock"), ("lockup2", "server-unresponsive")):
        shutil.copytree(DATA / "lockup", store / name)
        path = store / name / "run.json"
        run = json.loads(path.read_text())
        run["evidence"]["signature"] = signature
        run["evidence"]["stall"] = {"at_s": 4.0 if name == "lockup" else 8.0, "pages_done": -1}
        path.write_text(json.dumps(run))
    shutil.copytree(DATA / "completed", store / "completed")
    path = store / "completed" / "run.json"
    run = json.loads(path.read_text())
    run.update(stall_count=2, stall_s_total=41.5, footprint={"mlocked_bytes": 20 * report.MIB})
    path.write_text(json.dumps(run))
    rep = report.build_report(archive.load_runs([store]))
    lines = report.render(rep, "md").splitlines()
    assert "| lockup signature | — | memalloc-deadlock 1/2, server-unresponsive 1/2 |" in lines
    assert "| stalls that recovered | 2 | — |" in lines
    assert ("| lockup: time to stall, into stress (s) | — | 6 ± 2.8 (47.1%) [4-8] |") in lines
    assert "| lockup: pages done at the stall (pages) | — | 0 ± 0 [0-0] |" in lines
    assert "| time in recovered stalls (s) | 41.5 | — |" in lines
    assert "| harness mlocked memory, peak in stress (MiB) | 20 | — |" in lines
    csv_text = report.render(rep, "csv")
    assert f"{VANILLA},signature_memalloc-deadlock,runs,1," in csv_text
    # Runs from before the stall watch have none of these rows' data: no empty rows.
    old = report.render(report.build_report(archive.load_runs([DATA])), "md")
    assert (
        "stalls that recovered" not in old and "| lockup signature | — | no evidence 1/1 |" in old
    )


def test_a_published_result_regenerates_from_its_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """publish writes runs.tar.xz, then the report from it; a reader gets the same bytes."""
    out = tmp_path / "result"
    written = publish.publish(archive.load_runs([DATA]), out, baseline=VANILLA)
    assert [p.name for p in written[:4]] == [
        "runs.tar.xz",
        "report.md",
        "report.csv",
        "report.json",
    ]
    assert sorted(p.name for p in (out / "plots").iterdir()) == [plots.ARMS_PNG]
    import tarfile

    with tarfile.open(out / "runs.tar.xz") as tar:
        names = tar.getnames()
        assert all(m.mtime == 0 and m.uname == "root" for m in tar.getmembers())
    assert "completed/run.json" in names and "lockup/vmstat.jsonl" in names
    first = (out / "runs.tar.xz").read_bytes()
    # The same runs give the same archive, byte for byte (so a re-publish shows no diff).
    archive.write_archive(archive.load_runs([DATA]), tmp_path / "again.tar.xz")
    assert (tmp_path / "again.tar.xz").read_bytes() == first
    monkeypatch.chdir(out)
    runs = archive.load_runs([Path("runs.tar.xz")])
    assert [r.name for r in runs] == ["completed", "lockup"]
    assert len(runs[0].samples) > 10  # the samples came out of the archive too
    rep = report.build_report(runs, baseline=VANILLA)
    for fmt in ("md", "csv", "json"):
        assert report.render(rep, fmt) == (out / f"report.{fmt}").read_text(), fmt


def test_a_bad_archive_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "runs.tar.xz"
    bad.write_bytes(b"not an archive")
    with pytest.raises(report.ReportError, match="is not a readable tar archive"):
        archive.load_runs([bad])
