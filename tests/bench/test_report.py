"""Medians, per-round ratios and the rendered tables (pure)."""

from __future__ import annotations

import math

import pytest

from bench import report
from bench.report import Cell, RssRun
from bench.workloads import GIB, MIB, FioResult, select_workloads

WL = select_workloads("seq-read-1m-qd8,rand-read-4k-qd32")
SEQ, RAND = (w.name for w in WL)


def result(iops: float, *, bs: int = 4096, lat: float = 10.0) -> FioResult:
    return FioResult(
        read_iops=iops, write_iops=0.0, read_bytes_per_s=iops * bs, write_bytes_per_s=0.0,
        bytes_moved=int(iops * bs), lat_mean_us=lat, lat_p99_us=lat * 3,
    )  # fmt: skip


def cell(rnd: int, workload: str, server: str, iops: float, **kw: float) -> Cell:
    return Cell(
        rnd, workload, server, result(iops), kw.get("cpu", 1.0), int(kw.get("rss", MIB)),
        kw.get("steal"),
    )  # fmt: skip


def test_median() -> None:
    assert report.median([3.0, 1.0, 2.0]) == 2.0
    assert report.median([1.0, 4.0]) == 2.5
    with pytest.raises(ValueError, match="empty"):
        report.median([])


def test_per_round_ratios_pair_cells_of_the_same_round() -> None:
    cells = [
        cell(1, RAND, "a", 200.0), cell(1, RAND, "b", 100.0),
        cell(2, RAND, "a", 150.0), cell(2, RAND, "b", 300.0),
        cell(3, RAND, "a", 90.0),  # no baseline in round 3: no ratio
        cell(1, SEQ, "a", 1.0), cell(1, SEQ, "b", 1000.0),  # another workload
    ]  # fmt: skip
    assert report.per_round_ratios(cells, workload=RAND, server="a", baseline="b") == [2.0, 0.5]
    assert report.per_round_ratios(cells, workload=RAND, server="b", baseline="b") == [1.0, 1.0]


def test_summarize_medians_ratios_and_peak() -> None:
    cells = [
        cell(1, RAND, "base", 100.0, rss=5 * MIB), cell(1, RAND, "peer", 50.0),
        cell(2, RAND, "base", 200.0, rss=9 * MIB), cell(2, RAND, "peer", 300.0),
        cell(3, RAND, "base", 100.0, rss=7 * MIB), cell(3, RAND, "peer", 80.0),
    ]  # fmt: skip
    got = report.summarize(cells, workloads=WL, servers=["base", "peer"], baseline="base")
    assert [(s.workload, s.server) for s in got] == [(RAND, "base"), (RAND, "peer")]
    base, peer = got
    assert base.rounds == 3
    assert base.iops == 100.0
    assert base.ratio == 1.0
    assert base.rss_peak == 9 * MIB
    assert peer.iops == 80.0
    # per-round ratios 0.5, 1.5, 0.8 -> median 0.8 (not 80 / 100 by accident: check the set)
    assert peer.round_ratio == pytest.approx(0.8)
    # two servers: one whole cycle (rounds 1-2), sqrt(0.5 * 1.5); round 3 is half a cycle
    assert peer.ratio == pytest.approx(0.75**0.5)
    assert base.ratio == 1.0
    assert peer.mib_per_s == pytest.approx(80.0 * 4096 / MIB)
    # cpu 1 s over iops*4096 bytes, median over rounds
    assert peer.cpu_s_per_gib == pytest.approx(GIB / (80.0 * 4096))


def test_summarize_without_baseline_cells_gives_no_ratio() -> None:
    got = report.summarize([cell(1, SEQ, "peer", 10.0)], workloads=WL, servers=["peer"],
                           baseline="base")  # fmt: skip
    assert got[0].ratio is None
    assert "n/a" in report.table_markdown(got, WL, "base")


def _summaries() -> list[report.Summary]:
    cells = [
        cell(1, SEQ, "nbd-serve", 1000.0), cell(1, SEQ, "nbdkit", 500.0),
        cell(1, SEQ, "qemu-nbd", 2000.0),
        cell(1, RAND, "nbd-serve", 100.0), cell(1, RAND, "nbdkit", 100.0),
        cell(1, RAND, "qemu-nbd", 25.0),
    ]  # fmt: skip
    return report.summarize(cells, workloads=WL, servers=["nbd-serve", "nbdkit", "qemu-nbd"],
                            baseline="nbd-serve")  # fmt: skip


def test_table_has_a_row_per_workload_and_server() -> None:
    table = report.table_markdown(_summaries(), WL, "nbd-serve").splitlines()
    assert table[0].startswith("| Workload | Server | IOPS | MiB/s | vs nbd-serve |")
    rows = table[2:]
    assert len(rows) == 6
    assert rows[1].startswith("| seq read 1 MiB QD8 | nbdkit | 500 | ")
    assert "| 0.50x |" in rows[1]
    assert "| 2.00x |" in rows[2]


def test_versus_inverts_and_marks_misses() -> None:
    text = report.versus_markdown(_summaries(), WL, ["nbd-serve", "nbdkit", "qemu-nbd"],
                                  "nbd-serve").splitlines()  # fmt: skip
    assert text[0] == "| Workload | nbd-serve ÷ nbdkit | nbd-serve ÷ qemu-nbd |"
    assert text[2] == "| seq read 1 MiB QD8 | 2.00x | 0.50x ✗ |"
    assert text[3] == "| rand read 4 KiB QD32 | 1.00x | 4.00x |"
    assert report.versus_markdown(_summaries(), WL, ["nbd-serve"], "nbd-serve") == ""


def test_versus_judges_the_printed_ratio() -> None:
    cells = [cell(1, RAND, "nbd-serve", 998.0), cell(1, RAND, "nbdkit", 1000.0),
             cell(1, SEQ, "nbd-serve", 990.0), cell(1, SEQ, "nbdkit", 1000.0)]  # fmt: skip
    s = report.summarize(cells, workloads=WL, servers=["nbd-serve", "nbdkit"],
                         baseline="nbd-serve")  # fmt: skip
    text = report.versus_markdown(s, WL, ["nbd-serve", "nbdkit"], "nbd-serve").splitlines()
    assert text[2] == "| seq read 1 MiB QD8 | 0.99x ✗ |"
    assert text[3] == "| rand read 4 KiB QD32 | 1.00x |"


META = {
    "cpus": 2, "cpu_model": "Test CPU", "kernel": "6.1", "python": "3.11", "started": "now",
    "duration_s": 12.0, "rounds": 1, "runtime_s": 1.0, "ramp_s": 0.0, "file_size": 64 * MIB,
    "fio": "fio-3.33", "server_versions": {"nbdkit": "nbdkit 1.32.5"},
    "sample_interval_s": 0.05, "baseline_rss_peak": 30 * MIB,
}  # fmt: skip


def test_render_markdown_and_json() -> None:
    summaries = _summaries()
    rss = [RssRun("nbd-serve", result(100.0, bs=MIB), 42 * MIB)]
    md = report.render_markdown(
        title="t", meta=META, summaries=summaries, workloads=WL,
        servers=["nbd-serve", "nbdkit", "qemu-nbd"], baseline="nbd-serve", rss_runs=rss,
        rss_description="seq write 1 MiB QD128 x4 conn",
    )  # fmt: skip
    assert md.startswith("# t\n")
    assert "2 CPUs (Test CPU), shared" in md
    assert "rotated by one each round;" in md  # META records no leads
    for leads, text in [
        ({"nbd-serve": 3, "nbdkit": 3}, "rotated by one each round (each first in 3);"),
        (
            {"nbd-serve": 4, "nbdkit": 3, "qemu-nbd": 3},
            "rotated by one each round (rounds led: nbd-serve 4, nbdkit 3, qemu-nbd 3; uneven,"
            " so ratios lean against the server that led most);",
        ),
    ]:
        md2 = report.render_markdown(
            title="t", meta={**META, "leads": leads}, summaries=summaries, workloads=WL,
            servers=["nbd-serve", "nbdkit", "qemu-nbd"], baseline="nbd-serve", rss_runs=rss,
            rss_description="seq write 1 MiB QD128 x4 conn",
        )  # fmt: skip
        assert text in md2
    assert "| nbd-serve | 42.0 | 100 |" in md
    assert "nbd-serve peak RSS over the table's runs (one long-lived instance per " in md
    assert "transport): 30.0 MiB." in md
    doc = report.to_json(meta=META, cells=[cell(1, SEQ, "nbdkit", 500.0, cpu=0.25)],
                         summaries=summaries, rss_runs=rss)  # fmt: skip
    assert doc["cells"][0]["iops"] == 500.0
    assert doc["cells"][0]["cpu_s"] == 0.25
    assert doc["rss"][0]["rss_peak"] == 42 * MIB
    assert [s["server"] for s in doc["summary"]] == ["nbd-serve", "nbdkit", "qemu-nbd"] * 2


def test_dumps_compact_round_trips_with_a_line_per_item() -> None:
    import json

    doc = {"meta": {"a": 1, "b": [1, 2]}, "cells": [{"x": 1.5}, {"x": 2}], "empty": []}
    text = report.dumps_compact(doc)
    assert json.loads(text) == doc
    assert '  {"x": 1.5},\n  {"x": 2}\n' in text


def test_cycle_ratios_cancel_the_place_in_the_round() -> None:
    """Two servers, the first run of a round 0.7x of the second whoever makes it, and
    "peer" truly 0.98x of "base": per-round ratios alternate 0.686 / 1.4, their median
    over an even count is their midpoint (1.043), the cycle ratio is 0.98 exactly."""
    cells = []
    for rnd in range(1, 9):
        first, second = ("peer", "base") if rnd % 2 else ("base", "peer")
        speed = {"peer": 98.0, "base": 100.0}
        cells += [
            cell(rnd, RAND, first, speed[first] * 0.7),
            cell(rnd, RAND, second, speed[second]),
        ]
    per_round = report.per_round_ratios(cells, workload=RAND, server="peer", baseline="base")
    assert per_round[:2] == [pytest.approx(0.686), pytest.approx(1.4)]
    cycles = report.cycle_ratios(cells, workload=RAND, server="peer", baseline="base", cycle=2)
    assert cycles == [pytest.approx(0.98)] * 4
    got = report.summarize(cells, workloads=WL, servers=["base", "peer"], baseline="base")
    assert got[1].ratio == pytest.approx(0.98)
    assert got[1].round_ratio == pytest.approx((0.686 + 1.4) / 2)


def test_cycle_ratios_drop_a_cycle_with_a_missing_round() -> None:
    cells = [
        cell(1, RAND, "base", 100.0), cell(1, RAND, "peer", 50.0),
        cell(2, RAND, "base", 100.0), cell(2, RAND, "peer", 200.0),
        cell(3, RAND, "base", 100.0), cell(3, RAND, "peer", 90.0),
        cell(4, RAND, "base", 100.0),  # peer did not run in round 4
    ]  # fmt: skip
    got = report.cycle_ratios(cells, workload=RAND, server="peer", baseline="base", cycle=2)
    assert got == [pytest.approx(1.0)]
    with pytest.raises(ValueError, match="at least 1"):
        report.cycle_ratios(cells, workload=RAND, server="peer", baseline="base", cycle=0)


def _stolen_run() -> list[Cell]:
    """Four cycles of two servers, "peer" truly 0.98x of "base"; in cycle 2 the host stole
    10% of the CPUs during base's run and it ran at a third of its speed (ratio 3x)."""
    cells = []
    for rnd in range(1, 9):
        stolen = rnd == 3
        cells += [
            cell(rnd, RAND, "base", 100.0 / (3 if stolen else 1), steal=0.10 if stolen else 0.001),
            cell(rnd, RAND, "peer", 98.0, steal=0.005),
        ]
    return cells


def test_a_cycle_with_a_stolen_run_is_left_out_of_the_ratio() -> None:
    cells = _stolen_run()
    every = report.cycle_ratios(cells, workload=RAND, server="peer", baseline="base", cycle=2)
    assert every == pytest.approx([0.98, 0.98 * 3**0.5, 0.98, 0.98])
    steady = report.cycle_ratios(
        cells, workload=RAND, server="peer", baseline="base", cycle=2, max_steal=report.MAX_STEAL
    )
    assert steady == pytest.approx([0.98] * 3)
    got = report.summarize(cells, workloads=WL, servers=["base", "peer"], baseline="base")
    peer = got[1]
    assert (peer.ratio, peer.cycles, peer.steady_cycles) == (pytest.approx(0.98), 4, 3)
    text = report.steal_markdown(cells, got, WL, "base")
    assert text.startswith("Steal (the share of the machine's CPU time the hypervisor gave ")
    assert "1 of 16 runs lost more than 2%, the worst 10.0%." in text
    assert text.endswith("cycles kept: rand read 4 KiB QD32 3/4.")


@pytest.mark.parametrize(
    ("n", "k"),
    # The largest k with P(Bin(n, 1/2) < k) <= 2.5%, from the binomial table: the
    # interval is the k-th smallest and the k-th largest value.
    [(5, None), (6, 1), (8, 1), (9, 2), (11, 2), (12, 3), (17, 5), (22, 6), (30, 10)],
)
def test_the_median_interval_is_the_binomial_order_statistics(n: int, k: int | None) -> None:
    values = [float(v) for v in range(n, 0, -1)]  # any order: n .. 1
    got = report.median_interval(values)
    if k is None:
        assert got is None
    else:
        assert got == (float(k), float(n + 1 - k))
        # Coverage: the tail left out on each side is at most 2.5%, one step more is not.
        tail = sum(math.comb(n, i) for i in range(k)) / 2**n
        assert tail <= 0.025 < tail + math.comb(n, k) / 2**n


def test_the_steal_paragraph_gives_each_kept_ratio_its_interval() -> None:
    """Eight steady cycles of a server at 0.90-0.97x of the baseline: the median and its
    95% interval (the 1st and 8th of the sorted cycle ratios) both say it is below."""
    cells = []
    for i, r in enumerate((0.95, 0.92, 0.97, 0.90, 0.94, 0.93, 0.96, 0.91)):
        for rnd in (2 * i + 1, 2 * i + 2):
            cells += [
                cell(rnd, RAND, "base", 100.0, steal=0.0),
                cell(rnd, RAND, "peer", 100 * r, steal=0.0),
            ]
    got = report.summarize(cells, workloads=WL, servers=["base", "peer"], baseline="base")
    assert got[1].ratio == pytest.approx(0.935)
    assert got[1].ratio_interval == pytest.approx((0.90, 0.97))
    assert got[0].ratio_interval == pytest.approx((1.0, 1.0))
    text = report.steal_markdown(cells, got, WL, "base")
    assert text.endswith(
        "cycles kept, with the 95% interval of the median ratio where there are at least 6: "
        "rand read 4 KiB QD32 8/8 (0.90-0.97)."
    )
    doc = report.to_json(meta={}, cells=cells, summaries=got, rss_runs=[])
    assert doc["summary"][1]["ratio_interval"] == [0.9, 0.97]


def test_when_every_cycle_was_stolen_all_of_them_count() -> None:
    cells = [
        cell(rnd, RAND, srv, iops, steal=0.05)
        for rnd in (1, 2)
        for srv, iops in (("base", 100.0), ("peer", 90.0))
    ]
    got = report.summarize(cells, workloads=WL, servers=["base", "peer"], baseline="base")
    assert (got[1].ratio, got[1].cycles, got[1].steady_cycles) == (pytest.approx(0.9), 1, 0)


def test_without_steal_figures_nothing_changes() -> None:
    """Results from before steal was measured render as they did (no paragraph)."""
    cells = _stolen_run()
    bare = [Cell(c.round, c.workload, c.server, c.result, c.cpu_s, c.rss_peak) for c in cells]
    got = report.summarize(bare, workloads=WL, servers=["base", "peer"], baseline="base")
    assert (got[1].cycles, got[1].steady_cycles) == (None, None)
    assert got[1].ratio == pytest.approx(0.98)  # the median of 0.98, 1.70, 0.98, 0.98
    assert report.steal_markdown(bare, got, WL, "base") == ""
    doc = report.to_json(meta={}, cells=bare, summaries=got, rss_runs=[])
    assert "steal" not in doc["cells"][0]


def test_from_json_gives_back_what_to_json_wrote() -> None:
    cells = [
        cell(1, RAND, "base", 100.0, cpu=0.5, rss=3 * MIB, steal=0.0125),
        cell(1, RAND, "peer", 90.0, steal=0.0),
        cell(2, RAND, "base", 110.0, steal=0.5), cell(2, RAND, "peer", 120.0, steal=0.001),
    ]  # fmt: skip
    rss = [RssRun("peer", result(50.0, bs=MIB), 7 * MIB)]
    got = report.summarize(cells, workloads=WL, servers=["base", "peer"], baseline="base")
    doc = report.to_json(meta={"rounds": 2}, cells=cells, summaries=got, rss_runs=rss)
    back, back_rss = report.from_json(doc)

    # What the ratios and the table are made of comes back exactly; MiB/s as rounded (2 places)
    def key(c: Cell) -> tuple[object, ...]:
        return (c.round, c.workload, c.server, c.result.iops, c.cpu_s, c.rss_peak, c.steal)

    assert [key(c) for c in back] == [key(c) for c in cells]
    assert [c.result.mib_per_s for c in back] == [
        pytest.approx(c.result.mib_per_s, abs=0.005) for c in cells
    ]
    assert [(r.server, r.rss_peak, r.result.iops) for r in back_rss] == [("peer", 7 * MIB, 50.0)]
    again = report.summarize(back, workloads=WL, servers=["base", "peer"], baseline="base")
    assert [(s.ratio, s.round_ratio, s.iops) for s in again] == [
        (s.ratio, s.round_ratio, s.iops) for s in got
    ]


def test_from_json_refuses_a_document_that_is_not_a_bench_result() -> None:
    with pytest.raises(ValueError, match="not a bench result document: KeyError"):
        report.from_json({"cells": [{"round": 1}]})
    with pytest.raises(ValueError, match="not a bench result document"):
        report.from_json({"meta": {}})
