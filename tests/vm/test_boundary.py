"""vm.campaign.boundary: the boundary file, the runner over a store (the run itself
scripted: these test which run comes next, resume and the bookkeeping), the dry run, and
one real boundary through a real guest (``vm`` marker), interrupted and resumed."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vm import cli
from vm.campaign import boundary
from vm.campaign.plan import MatrixError, plan_runs
from vm.run import experiment
from vm.run.config import RunConfig

REPO = Path(__file__).resolve().parents[2]

TINY = """
[matrix]
name = "tiny"

[defaults]
memory = "128M"
workers = 4
loops = 1
lockup_after = 60

[axes]
arm = ["vanilla", "patched"]

[boundary]
ratios = [1.5, 2.0, 3.0]
max_runs = 4
spare_runs = 1
"""

V = "6.1-vanilla-slub-nbd-serve"
P = "6.1-patched-slub-nbd-serve"


def scripted(
    locks: Callable[[RunConfig], bool],
    *,
    interrupt: set[str] = frozenset(),  # type: ignore[assignment]
    error: set[str] = frozenset(),  # type: ignore[assignment]
    log: list[str] | None = None,
) -> Any:
    """A run_experiment stand-in: writes run.json with ``lockup`` when ``locks(cfg)``; run
    ids in ``interrupt`` come back interrupted and in ``error`` as harness errors (once)."""

    def run(cfg: RunConfig, emit: experiment.Emit) -> dict[str, Any]:
        emit("guest phase: stress")
        cfg.out.mkdir(parents=True, exist_ok=True)
        rid = cfg.out.name
        if log is not None:
            log.append(rid)
        obj: dict[str, Any] = {
            "config": cfg.to_json(),
            "outcome": "lockup" if locks(cfg) else "completed",
            "timings": {"total_s": 100.0},
        }
        if rid in interrupt:
            interrupt.discard(rid)
            obj.update(outcome="error", interrupted=True)
        elif rid in error:
            error.discard(rid)
            obj.update(outcome="error", outcome_reason="harness")
        (cfg.out / "run.json").write_text(json.dumps(obj))
        return obj

    return run


def vanilla_from_2(cfg: RunConfig) -> bool:
    """Vanilla locks up from ratio 2 on; patched never does."""
    return cfg.arm == "vanilla" and (cfg.ratio or 0) >= 2.0


def test_a_boundary_file_is_a_grid_matrix_with_curves() -> None:
    bnd = boundary.parse_boundary(textwrap.dedent(TINY), "tiny")
    assert [c.name for c in bnd.curves] == [V, P]
    assert [c.ratios for c in bnd.curves] == [(1.5, 2.0, 3.0)] * 2
    runs = plan_runs(bnd.matrix)
    assert len(runs) == 2 * 3 * 5  # arms x ratios x (max_runs + spare_runs)
    assert [r.id for r in runs[:6]] == [
        f"r01-{V}-x1.5-rep1",
        f"r02-{V}-x2-rep1",
        f"r03-{V}-x3-rep1",
        f"r04-{P}-x1.5-rep1",
        f"r05-{P}-x2-rep1",
        f"r06-{P}-x3-rep1",
    ]
    cfg = runs[1].config(Path("/s"))
    assert (cfg.ratio, cfg.total_bytes, cfg.min_free_kbytes, cfg.workers) == (2.0, None, None, 4)
    assert (bnd.policy.level, bnd.policy.max_runs, bnd.spare_runs) == (0.5, 4, 1)


def test_min_free_kbytes_is_the_second_axis_and_enters_the_name() -> None:
    text = TINY.replace("spare_runs = 1", 'spare_runs = 1\nmin_free_kbytes = ["auto", 8192]')
    bnd = boundary.parse_boundary(textwrap.dedent(text))
    assert [c.name for c in bnd.curves] == [
        f"{V}-mf-auto",
        f"{V}-mf8192",
        f"{P}-mf-auto",
        f"{P}-mf8192",
    ]
    run = next(r for r in plan_runs(bnd.matrix) if r.id.endswith("mf8192-rep1"))
    assert run.config(Path("/s")).pinned_min_free_kbytes == 8192


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("[boundary]", "[notboundary]"), "unknown top-level key"),
        (("ratios = [1.5, 2.0, 3.0]", "ratios = [2.0, 1.5]"), "distinct and ascending"),
        (("ratios = [1.5, 2.0, 3.0]", "ratios = []"), "boundary.ratios must be a non-empty"),
        (("max_runs = 4", "max_runs = 0"), "boundary.max_runs must be a whole number >= 1"),
        (("max_runs = 4", "maxruns = 4"), "unknown key.*in .boundary.: maxruns"),
        (("max_runs = 4", "confidence = 0.5"), "confidence must be one of"),
        (("max_runs = 4", "level = 1.5"), r"boundary.level must be a number in \(0, 1\)"),
        (("workers = 4", "workers = 4\nratio = 2"), "defaults.ratio: the boundary sets it"),
        (
            ('arm = ["vanilla", "patched"]', 'arm = ["vanilla", "patched"]\n[[cells]]\ntotal = 1'),
            r"cells\[0\].total: the boundary sets it",
        ),
        (
            ("spare_runs = 1", "min_free_kbytes = [64]"),
            r"boundary.min_free_kbytes\[\] must be a whole number >= 128, got 64",
        ),
    ],
)
def test_bad_boundary_files_get_clear_errors(change: tuple[str, str], message: str) -> None:
    text = textwrap.dedent(TINY).replace(*change)
    with pytest.raises(MatrixError, match=message):
        boundary.parse_boundary(text)


def test_the_runner_follows_the_policy_and_stops(tmp_path: Path) -> None:
    bnd = boundary.parse_boundary(textwrap.dedent(TINY), "tiny")
    store = tmp_path / "store"
    log: list[str] = []
    lines: list[str] = []
    result = boundary.run_boundary(
        bnd, store, emit=lines.append, run_one=scripted(vanilla_from_2, log=log)
    )
    assert not result.interrupted and result.exhausted is None
    # x2 first (the middle), arms in turn; 4 one-way runs decide a setting; then vanilla
    # bisects down to 1.5 and patched up to 3.
    assert log == [
        f"r02-{V}-x2-rep1",
        f"r05-{P}-x2-rep1",
        f"r08-{V}-x2-rep2",
        f"r11-{P}-x2-rep2",
        f"r14-{V}-x2-rep3",
        f"r17-{P}-x2-rep3",
        f"r20-{V}-x2-rep4",
        f"r23-{P}-x2-rep4",
        f"r01-{V}-x1.5-rep1",
        f"r06-{P}-x3-rep1",
        f"r07-{V}-x1.5-rep2",
        f"r12-{P}-x3-rep2",
        f"r13-{V}-x1.5-rep3",
        f"r18-{P}-x3-rep3",
        f"r19-{V}-x1.5-rep4",
        f"r24-{P}-x3-rep4",
    ]
    assert lines[-1] == "boundary tiny: done after 16 trial(s)"
    assert any(line.startswith("[1] guest phase: stress  [boundary ETA ") for line in lines), lines[
        :5
    ]
    summ = json.loads((store / "boundary.json").read_text())
    assert [
        (c["curve"], [(s["ratio"], s["lockups"], s["trials"], s["state"]) for s in c["settings"]])
        for c in summ["curves"]
    ] == [
        (V, [(1.5, 0, 4, "below"), (2.0, 4, 4, "above"), (3.0, 0, 0, "open")]),
        (P, [(1.5, 0, 0, "open"), (2.0, 0, 4, "below"), (3.0, 0, 4, "below")]),
    ]
    index = json.loads((store / "index.json").read_text())
    assert index["counts"] == {"finished": 16, "interrupted": 0, "started": 0, "pending": 14}
    again = boundary.run_boundary(bnd, store, resume=True, run_one=scripted(vanilla_from_2))
    assert again.ran == []


def test_interrupt_resume_and_harness_errors(tmp_path: Path) -> None:
    bnd = boundary.parse_boundary(textwrap.dedent(TINY), "tiny")
    store = tmp_path / "store"
    log: list[str] = []
    stop = f"r08-{V}-x2-rep2"
    first = boundary.run_boundary(
        bnd,
        store,
        run_one=scripted(vanilla_from_2, interrupt={stop}, error={f"r05-{P}-x2-rep1"}, log=log),
    )
    assert first.interrupted
    # r05 is no trial, so patched has fewer than vanilla and goes next.
    assert log == [f"r02-{V}-x2-rep1", f"r05-{P}-x2-rep1", f"r11-{P}-x2-rep2", stop]
    with pytest.raises(MatrixError, match="pass --resume"):
        boundary.run_boundary(bnd, store, run_one=scripted(vanilla_from_2))
    log.clear()
    second = boundary.run_boundary(
        bnd, store, resume=True, run_one=scripted(vanilla_from_2, log=log)
    )
    assert not second.interrupted
    # The interrupted run is rerun in place; the harness error is no trial, so patched x2
    # needs four more runs and takes repeats 2-5 (the spare one included).
    assert log[:4] == [stop, f"r17-{P}-x2-rep3", f"r14-{V}-x2-rep3", f"r23-{P}-x2-rep4"]
    assert f"r29-{P}-x2-rep5" in log
    assert [p.name.startswith(stop) for p in (store / ".attic").iterdir()] == [True]
    summ = json.loads((store / "boundary.json").read_text())
    assert summ["trials"] == 16


def test_a_setting_whose_runs_are_used_up_by_errors_stops_the_boundary(tmp_path: Path) -> None:
    text = textwrap.dedent(TINY).replace("spare_runs = 1", "spare_runs = 0")
    bnd = boundary.parse_boundary(text, "tiny")
    store = tmp_path / "store"
    errors = {f"r02-{V}-x2-rep1"}
    result = boundary.run_boundary(bnd, store, run_one=scripted(vanilla_from_2, error=errors))
    assert result.exhausted == (
        f"{V} at ratio 2: all 4 runs are used up, harness errors among them; fix the "
        "harness and resume with --retry-errors"
    )
    log: list[str] = []
    retried = boundary.run_boundary(
        bnd, store, resume=True, retry_errors=True, run_one=scripted(vanilla_from_2, log=log)
    )
    assert retried.exhausted is None
    assert log[0] == f"r02-{V}-x2-rep1"


def test_curve_runs_some_curves_first_and_a_resume_without_it_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--curve: the cheap arms first; the other curves' trials and summary are untouched,
    and a --resume without --curve decides them as if they had run all along."""
    path = tmp_path / "tiny.toml"
    path.write_text(textwrap.dedent(TINY))
    store = tmp_path / "store"
    bnd = boundary.parse_boundary(path.read_text(), "tiny")
    log: list[str] = []
    lines: list[str] = []
    first = boundary.run_boundary(
        bnd,
        store,
        emit=lines.append,
        run_one=scripted(vanilla_from_2, log=log),
        only=["vanilla"],
    )
    assert not first.interrupted and first.exhausted is None
    assert log == [
        f"r{n:02d}-{V}-x{r}-rep{k}"
        for r, n0 in (("2", 2), ("1.5", 1))
        for k, n in ((k, n0 + 6 * (k - 1)) for k in range(1, 5))
    ]
    assert (
        lines[0]
        == f"boundary tiny: 0 trial(s) in the store; 2 curve(s), running 1 (--curve); store {store}"
    )
    assert lines[-1] == (
        "boundary tiny: done after 8 trial(s); the other curves wait for a --resume without --curve"
    )
    summ = json.loads((store / "boundary.json").read_text())
    assert [c["curve"] for c in summ["curves"]] == [V, P]
    assert all(s["trials"] == 0 for s in summ["curves"][1]["settings"])

    assert (
        cli.main(
            [
                "boundary",
                str(path),
                "--dry-run",
                "--out",
                str(store),
                "--no-history",
                "--curve",
                "patched",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "  --curve: 1 of 2 curve(s) (resume without --curve for the rest)"
    assert [line.split()[0] for line in out[2:-1] if line.startswith("  6.1")] == [P]
    # Patched has no run of its own yet: its runs are estimated from vanilla's.
    assert out[-1] == (
        "estimated time: likely 14m23s for 8 run(s), at most 21m35s for 12 run(s) "
        "(8 measured run(s))"
    )

    assert cli.main(["boundary", str(path), "--dry-run", "--curve", "slab"]) == cli.EXIT_USAGE
    assert capsys.readouterr().err == (
        f"swapnbd boundary: error: --curve 'slab' is in none of the curves' names: {V}, {P}\n"
    )

    log.clear()
    rest = boundary.run_boundary(bnd, store, resume=True, run_one=scripted(vanilla_from_2, log=log))
    assert rest.exhausted is None
    assert log == [
        f"r{n:02d}-{P}-x{r}-rep{k}"
        for r, n0 in (("2", 5), ("3", 6))
        for k, n in ((k, n0 + 6 * (k - 1)) for k in range(1, 5))
    ]
    summ = json.loads((store / "boundary.json").read_text())
    assert summ["trials"] == 16


def test_dry_run_shows_the_settings_and_the_estimate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(textwrap.dedent(TINY))
    store = tmp_path / "store"
    bnd = boundary.parse_boundary(path.read_text(), "tiny")
    boundary.run_boundary(
        bnd,
        store,
        run_one=scripted(vanilla_from_2, interrupt={f"r11-{P}-x2-rep2"}),
    )
    assert cli.main(["boundary", str(path), "--dry-run", "--out", str(store), "--no-history"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "boundary tiny: 2 curve(s) x 3 ratio(s); decide at P(lockup) 0.5 (0.95 Wilson "
        "interval), at most 4 run(s) per setting; 3 trial(s) so far",
        f"  {V:<44} x2 2/2 [0.34-1.00] open; next x2",
        # x2 needs 2 more one-way runs, then one more setting of 4 decides x1.5 or x3;
        # at most every open setting to max_runs.
        f"  {'':<44} ~1m40s a run, likely 6 more, at most 10",
        f"  {P:<44} x2 0/1 [0.00-0.79] open; next x2",
        f"  {'':<44} ~1m40s a run, likely 7 more, at most 11",
        "estimated time: likely 21m40s for 13 run(s), at most 35m00s for 21 run(s) "
        "(3 measured run(s))",
    ]


def test_the_committed_boundary_file() -> None:
    bnd = boundary.load_boundary(REPO / "vm" / "campaign" / "matrices" / "boundary-6.1.toml")
    assert [c.name for c in bnd.curves] == [
        "6.1-vanilla-slub-nbd-serve",
        "6.1-patched-slub-nbd-serve",
        "6.1-vanilla-slab-nbd-serve",
        "6.1-patched-slab-nbd-serve",
    ]
    assert bnd.curves[0].ratios == (1.25, 1.5, 2.0, 2.5, 3.0, 4.0)
    cfg = plan_runs(bnd.matrix)[0].config(Path("/s"))
    assert (cfg.memory_mib, cfg.cpus, cfg.workers, cfg.loops, cfg.lockup_after_s) == (
        128,
        2,
        16,
        1,
        90.0,
    )
    assert (bnd.policy.level, bnd.policy.max_runs, bnd.confidence) == (0.5, 10, 0.95)


def test_the_7_2_boundary_file_is_6_1_s_on_another_kernel() -> None:
    """boundary-7.2.toml: the same guest, workload and policy as boundary-6.1.toml, so the
    curves compare; SLUB only (7.2 has no SLAB)."""
    matrices = REPO / "vm" / "campaign" / "matrices"
    seven = boundary.load_boundary(matrices / "boundary-7.2.toml")
    six = boundary.load_boundary(matrices / "boundary-6.1.toml")
    assert [c.name for c in seven.curves] == [
        "7.2-vanilla-slub-nbd-serve",
        "7.2-patched-slub-nbd-serve",
    ]
    assert seven.curves[0].ratios == six.curves[0].ratios
    assert (seven.policy, seven.confidence) == (six.policy, six.confidence)
    cfg7 = plan_runs(seven.matrix)[0].config(Path("/s"))
    cfg6 = plan_runs(six.matrix)[0].config(Path("/s"))
    assert (cfg7.kernel, cfg7.allocator) == ("7.2", None)
    assert dataclasses.replace(cfg7, kernel="6.1", allocator=cfg6.allocator, out=cfg6.out) == cfg6


# --- the report ----------------------------------------------------------------------


def test_report_shows_p_lockup_with_intervals_and_the_curve(tmp_path: Path) -> None:
    """A boundary store as the runner leaves it; harness errors and interrupted runs are
    no trials; the table, the CSV lines, the plot and report.html carry the curve."""
    bnd = boundary.parse_boundary(textwrap.dedent(TINY), "tiny")
    store = tmp_path / "store"
    boundary.run_boundary(
        bnd,
        store,
        run_one=scripted(
            vanilla_from_2, error={f"r01-{V}-x1.5-rep1"}, interrupt={f"r24-{P}-x3-rep4"}
        ),
    )
    rc = cli.main(["report", str(store), "--format", "json", "--output", str(tmp_path / "r.json")])
    assert rc == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert [
        (p["curve"], p["ratio"], p["lockups"], p["trials"], p["errors"], round(p["high"], 4))
        for p in rep["boundary"]
    ] == [
        (V, 1.5, 0, 4, 1, 0.4899),
        (V, 2.0, 4, 4, 0, 1.0),
        (P, 2.0, 0, 4, 0, 0.4899),
        (P, 3.0, 0, 3, 0, 0.5615),  # the interrupted fourth run is no trial
    ]
    assert rc == cli.main(["report", str(store), "--output", str(tmp_path / "r.md")])
    md = (tmp_path / "r.md").read_text()
    assert "## Boundary: P(lockup) by overcommit ratio" in md
    assert (
        f"| {V} | 1.5 | 0/4 | 0.00 | [0.00, 0.49] | completed 4/4; 1 harness error(s), not "
        "trials |" in md
    )
    assert f"| {V} | 2 | 4/4 | 1.00 | [0.51, 1.00] | — |" in md
    cli.main(["report", str(store), "--format", "csv", "--output", str(tmp_path / "r.csv")])
    csv_lines = (tmp_path / "r.csv").read_text().splitlines()
    assert (
        f"{P},p_lockup_ratio_3,,0.0,,3,3,,"
        '"0/3 lockups, 95% Wilson interval [0.00, 0.56]",,,0.0,0.5614970317550455,,,,'
    ) in csv_lines
    page = tmp_path / "report.html"
    plot_dir = tmp_path / "plots"
    assert cli.main(["report", str(store), "--plots", str(plot_dir), "--html", str(page)]) == 0
    assert (plot_dir / "boundary.png").stat().st_size > 10_000
    html = page.read_text()
    assert '<table id="boundary">' in html
    assert 'alt="boundary.png"' in html


def test_a_published_boundary_is_resumed_from_its_archive(tmp_path: Path) -> None:
    """A boundary stopped part-way and published (runs.tar.xz) goes on elsewhere: the
    archive unpacked is a store --resume accepts, with every trial, and the runs that
    follow are those the uninterrupted boundary would have run."""
    bnd = boundary.parse_boundary(textwrap.dedent(TINY), "tiny")
    whole: list[str] = []
    boundary.run_boundary(bnd, tmp_path / "whole", run_one=scripted(vanilla_from_2, log=whole))

    store = tmp_path / "store"
    first: list[str] = []
    stop = whole[6]
    boundary.run_boundary(bnd, store, run_one=scripted(vanilla_from_2, interrupt={stop}, log=first))
    assert first == whole[:7]
    published = tmp_path / "published"
    assert cli.main(["report", str(store), "--publish", str(published)]) == 0
    unpacked = tmp_path / "elsewhere"
    unpacked.mkdir()
    subprocess.run(["tar", "-xJf", str(published / "runs.tar.xz"), "-C", str(unpacked)], check=True)
    # The interrupted run is raw data too: it is archived, and rerun in place on resume.
    assert sorted(p.name for p in unpacked.iterdir()) == sorted(whole[:7])
    rest: list[str] = []
    again = boundary.run_boundary(
        bnd, unpacked, resume=True, run_one=scripted(vanilla_from_2, log=rest)
    )
    assert again.exhausted is None and not again.interrupted
    assert rest == whole[6:]
    summ = json.loads((unpacked / "boundary.json").read_text())
    assert summ == json.loads((tmp_path / "whole" / "boundary.json").read_text())


# --- the real thing -------------------------------------------------------------------

E2E = """
[matrix]
name = "e2e-boundary"

[defaults]
kernel = "6.1"
arm = "patched"
memory = "128M"
cpus = 2
workers = 4
loops = 1
lockup_after = 180

[boundary]
ratios = [2.0]
max_runs = 1
spare_runs = 0
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.vm
def test_real_boundary_is_interrupted_resumed_and_reported(tmp_path: Path) -> None:
    """One arm, one setting, one run through a real guest: SIGTERM in the stress phase
    stops QEMU and the server and leaves the run unfinished; --resume reruns it to the end
    and the boundary is done; a second --resume runs nothing; the report has the curve."""
    path = tmp_path / "e2e.toml"
    path.write_text(E2E)
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "vm.cli", "boundary", str(path), "--out", str(store)]
    rid = "r01-6.1-patched-slub-nbd-serve-rep1"
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    seen: list[str] = []
    qemu_pid = None
    for line in proc.stderr:
        seen.append(line)
        if "QEMU started (pid " in line:
            qemu_pid = int(line.split("QEMU started (pid ")[1].split(",")[0])
        if "guest phase: stress" in line:
            break
    assert qemu_pid is not None, "".join(seen)[-3000:]
    assert any(
        f"[1] boundary run 1, 6.1-patched-slub-nbd-serve at ratio 2 (trial 1 there): {rid}" in line
        for line in seen
    ), "".join(seen)[-3000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-3000:]
    assert f"interrupted: continue with --resume --out {store}" in out
    run = json.loads((store / rid / "run.json").read_text())
    assert (run["outcome"], run["interrupted"]) == ("error", True)
    assert not _alive(qemu_pid)
    assert not _alive(run["server"]["pid"])
    index = json.loads((store / "index.json").read_text())
    assert [(e["id"], e["status"]) for e in index["runs"]] == [(rid, "interrupted")]
    assert json.loads((store / "boundary.json").read_text())["trials"] == 0

    resumed = subprocess.run(
        [*cmd, "--resume"], cwd=REPO, capture_output=True, text=True, check=False, timeout=5400
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "boundary e2e-boundary: done after 1 trial(s)" in resumed.stderr
    run = json.loads((store / rid / "run.json").read_text())
    assert (run["outcome"], run["interrupted"]) == ("completed", False)
    assert run["config"]["ratio"] == 2.0
    assert run["vmstat_delta"]["pswpout"] > 0
    index = json.loads((store / "index.json").read_text())
    assert [(e["id"], e["status"], e["outcome"]) for e in index["runs"]] == [
        (rid, "finished", "completed")
    ]
    assert [p.name.startswith(rid) for p in (store / ".attic").iterdir()] == [True]
    summ = json.loads((store / "boundary.json").read_text())
    assert summ["curves"][0]["settings"] == [
        {
            "ratio": 2.0,
            "lockups": 0,
            "trials": 1,
            "p": 0.0,
            "low": 0.0,
            "high": pytest.approx(0.7935, abs=1e-4),
            "state": "exhausted",
        }
    ]

    again = subprocess.run(
        [*cmd, "--resume"], cwd=REPO, capture_output=True, text=True, check=False, timeout=300
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "boundary e2e-boundary: ran 0; outcomes none" in again.stdout
    assert "QEMU started" not in again.stderr

    rep = subprocess.run(
        [sys.executable, "-m", "vm.cli", "report", str(store), "--format", "json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert rep.returncode == 0, rep.stderr[-3000:]
    curve = json.loads(rep.stdout)["boundary"]
    assert [(c["curve"], c["ratio"], c["lockups"], c["trials"]) for c in curve] == [
        ("6.1-patched-slub-nbd-serve", 2.0, 0, 1)
    ]
