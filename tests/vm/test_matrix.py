"""vm.campaign.plan, .store and .matrix: planning (TOML -> interleaved runs, ids, shards, ETA),
the store and index (resume), the runner, and one real two-run matrix through real guests
(``vm`` marker)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from vm import cli
from vm.campaign import matrix
from vm.campaign import plan as matrix_plan
from vm.campaign import store as matrix_store
from vm.run import experiment
from vm.run.config import RunConfig

MIB = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]

SMALL = """
[matrix]
name = "small"
repeats = 2

[defaults]
memory = "128M"
workers = 4
total = "256M"
loops = 1
lockup_after = 60

[axes]
kernel = ["6.1", "6.12"]
arm = ["patched", "vanilla"]

[[cells]]
kernel = "6.1"
arm = "vanilla"
allocator = "slab"
repeats = 1
"""


def plan(text: str) -> list[matrix_plan.PlannedRun]:
    return matrix_plan.plan_runs(matrix_plan.parse_matrix(textwrap.dedent(text)))


# --- planning -------------------------------------------------------------------------


def test_runs_are_interleaved_with_readable_stable_ids() -> None:
    ids = [r.id for r in plan(SMALL)]
    assert ids == [
        "r01-6.1-patched-slub-nbd-serve-rep1",
        "r02-6.1-vanilla-slub-nbd-serve-rep1",
        "r03-6.12-patched-slub-nbd-serve-rep1",
        "r04-6.12-vanilla-slub-nbd-serve-rep1",
        "r05-6.1-vanilla-slab-nbd-serve-rep1",
        "r06-6.1-patched-slub-nbd-serve-rep2",
        "r07-6.1-vanilla-slub-nbd-serve-rep2",
        "r08-6.12-patched-slub-nbd-serve-rep2",
        "r09-6.12-vanilla-slub-nbd-serve-rep2",
    ]
    assert ids == [r.id for r in plan(SMALL)]  # same file, same ids


def test_cells_merge_defaults_and_become_run_configs(tmp_path: Path) -> None:
    runs = plan(SMALL)
    slab = runs[4]
    cfg = slab.config(tmp_path)
    assert cfg.out == tmp_path / slab.id
    assert (cfg.kernel, cfg.arm, cfg.allocator, cfg.server) == (
        "6.1",
        "vanilla",
        "slab",
        "nbd-serve",
    )
    assert (cfg.memory_mib, cfg.cpus, cfg.workers, cfg.total_bytes, cfg.ratio, cfg.loops) == (
        128,
        2,
        4,
        256 * MIB,
        None,
        1,
    )
    assert cfg.lockup_after_s == 60.0
    assert runs[0].config(tmp_path).allocator is None


def test_seed_matrix_is_the_issue_s_comparison() -> None:
    mx = matrix_plan.load_matrix(REPO / "vm" / "campaign" / "matrices" / "seed.toml")
    runs = matrix_plan.plan_runs(mx)
    assert len(runs) == 35  # 7 cells x 5 repeats
    assert {r.label for r in runs} == {
        "6.1-patched-slub-nbd-serve",
        "6.1-vanilla-slub-nbd-serve",
        "6.12-patched-slub-nbd-serve",
        "6.12-vanilla-slub-nbd-serve",
        "7.2-patched-slub-nbd-serve",
        "7.2-vanilla-slub-nbd-serve",
        "6.1-vanilla-slab-nbd-serve",
    }
    cfg = runs[0].config(Path("s"))
    assert (cfg.memory_mib, cfg.cpus, cfg.workers, cfg.ratio, cfg.total_bytes, cfg.loops) == (
        128,
        2,
        16,
        4.0,
        None,
        1,
    )
    assert (cfg.swap, cfg.server, cfg.lockup_after_s, cfg.timeout_s) == (
        "device",
        "nbd-serve",
        90.0,
        3600.0,
    )
    servers_runs = matrix_plan.plan_runs(
        matrix_plan.load_matrix(REPO / "vm" / "campaign" / "matrices" / "servers.toml")
    )
    assert [r.label for r in servers_runs[:3]] == [
        "6.1-patched-slub-nbd-serve",
        "6.1-patched-slub-nbdkit",
        "6.1-patched-slub-nbd-server",
    ]
    assert len(servers_runs) == 15


def test_the_slab_2x_matrix_is_the_second_2012_claim_where_vanilla_slab_survives() -> None:
    """slab-2x.toml: the seed's guest and workload at 2x, vanilla against patched on the
    one built 6.1 SLAB kernel, interleaved."""
    mx = matrix_plan.load_matrix(REPO / "vm" / "campaign" / "matrices" / "slab-2x.toml")
    runs = matrix_plan.plan_runs(mx)
    assert [r.id for r in runs[:2]] == [
        "r01-6.1-vanilla-slab-nbd-serve-rep1",
        "r02-6.1-patched-slab-nbd-serve-rep1",
    ]
    assert len(runs) == 20
    seed = matrix_plan.plan_runs(
        matrix_plan.load_matrix(REPO / "vm" / "campaign" / "matrices" / "seed.toml")
    )
    slab = next(r for r in seed if r.label == "6.1-vanilla-slab-nbd-serve").config(Path("s"))
    for run in runs:
        cfg = run.config(Path("s"))
        assert (cfg.kernel, cfg.allocator, cfg.ratio) == ("6.1", "slab", 2.0)
        # Everything else is the seed's SLAB cell.
        assert dataclasses.replace(cfg, ratio=4.0, arm="vanilla", out=slab.out) == slab


def test_a_differing_extra_axis_enters_the_label() -> None:
    runs = plan(
        """
        [defaults]
        total = "256M"
        [axes]
        memory = ["128M", "256M"]
        workers = [4, 8]
        """
    )
    assert [r.id for r in runs] == [
        "r01-6.1-patched-slub-nbd-serve-128M-w4-rep1",
        "r02-6.1-patched-slub-nbd-serve-128M-w8-rep1",
        "r03-6.1-patched-slub-nbd-serve-256M-w4-rep1",
        "r04-6.1-patched-slub-nbd-serve-256M-w8-rep1",
    ]


def test_no_axes_no_cells_is_one_cell_of_the_defaults() -> None:
    runs = plan('[matrix]\nrepeats = 3\n[defaults]\nkernel = "6.12"\n')
    assert [r.id for r in runs] == [
        "r01-6.12-patched-slub-nbd-serve-rep1",
        "r02-6.12-patched-slub-nbd-serve-rep2",
        "r03-6.12-patched-slub-nbd-serve-rep3",
    ]


def test_a_bzimage_path_kernel_becomes_its_file_name_in_the_id() -> None:
    runs = plan('[defaults]\nkernel = "/srv/k/bzImage-6.1 slab"\n')
    assert runs[0].id == "r01-bzImage-6.1_slab-patched-slub-nbd-serve-rep1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[defaults]\nmemroy = '128M'\n", "unknown key 'defaults.memroy'; a cell may set: "),
        ("[defaults]\nworkers = 0\n", r"defaults.workers must be a whole number >= 1, got 0"),
        ("[defaults]\nmemory = 'lots'\n", "defaults.memory: "),
        ("[defaults]\nserver = 'qemu-nbd'\n", "defaults.server must be one of nbd-serve"),
        ("[defaults]\narm = 'both'\n", "defaults.arm must be patched or vanilla, got 'both'"),
        ("[axes]\nkernel = '6.1'\n", "axes.kernel must be a non-empty list"),
        ("[[cells]]\nkernel = '6.1'\n[[cells]]\nkernel = '6.1'\n", r"cells\[1\] repeats the cell"),
        ("[matrix]\nrepeats = 0\n", "matrix.repeats must be >= 1, got 0"),
        ("[cell]\nkernel = '6.1'\n", "unknown top-level key"),
        ("[defaults]\nmemory = '32M'\n", "defaults: --memory must be at least 64M"),
        ("[defaults\n", "not valid TOML"),
    ],
)
def test_bad_matrix_files_get_clear_errors(text: str, message: str) -> None:
    with pytest.raises(matrix_plan.MatrixError, match=message):
        matrix_plan.parse_matrix(text)


def test_ratio_and_total_override_each_other_by_layer(tmp_path: Path) -> None:
    runs = plan('[defaults]\nratio = 4\n[[cells]]\ntotal = "300M"\n[[cells]]\nloops = 2\n')
    first, second = (r.config(tmp_path) for r in runs)
    assert (first.total_bytes, first.ratio) == (300 * MIB, None)
    assert (second.total_bytes, second.ratio) == (None, 4.0)


# --- selection: shards, --only, resume -------------------------------------------------


def test_shards_partition_the_plan_by_index() -> None:
    runs = plan(SMALL)
    shards = [matrix_plan.select_runs(runs, shard=(k, 3)) for k in (1, 2, 3)]
    assert [r.index for r in shards[0]] == [0, 3, 6]
    assert [r.index for r in shards[1]] == [1, 4, 7]
    assert [r.index for r in shards[2]] == [2, 5, 8]
    assert sorted(r.id for s in shards for r in s) == sorted(r.id for r in runs)


@pytest.mark.parametrize(("text", "expected"), [("1/2", (1, 2)), (" 3 / 3 ", (3, 3))])
def test_parse_shard(text: str, expected: tuple[int, int]) -> None:
    assert matrix_plan.parse_shard(text) == expected


@pytest.mark.parametrize("text", ["0/2", "3/2", "1/0", "2", "a/b"])
def test_bad_shards_are_refused(text: str) -> None:
    with pytest.raises(matrix_plan.MatrixError, match="--shard"):
        matrix_plan.parse_shard(text)


def test_only_takes_run_ids_and_cell_labels() -> None:
    runs = plan(SMALL)
    chosen = matrix_plan.select_runs(
        runs, only=["6.1-vanilla-slab-nbd-serve", "r08-6.12-patched-slub-nbd-serve-rep2"]
    )
    assert [r.index for r in chosen] == [4, 7]
    both = matrix_plan.select_runs(runs, only=["6.1-patched-slub-nbd-serve"], shard=(1, 3))
    assert [r.id for r in both] == ["r01-6.1-patched-slub-nbd-serve-rep1"]
    with pytest.raises(matrix_plan.MatrixError, match="no run or cell is called nope"):
        matrix_plan.select_runs(runs, only=["nope"])


@pytest.mark.parametrize(
    ("run_json", "finished", "status"),
    [
        (None, False, "pending"),
        ({"outcome": None}, False, "interrupted"),
        ({"outcome": "error", "interrupted": True}, False, "interrupted"),
        ({"outcome": "error", "outcome_reason": "image build failed"}, True, "finished"),
        ({"outcome": "lockup"}, True, "finished"),
        ({"outcome": "completed"}, True, "finished"),
    ],
)
def test_resume_reruns_only_what_has_no_measurement(
    run_json: dict[str, Any] | None, finished: bool, status: str
) -> None:
    assert matrix_store.is_finished(run_json) is finished
    assert matrix_store.run_status(run_json, dir_exists=run_json is not None) == status


def test_a_run_directory_without_run_json_is_started() -> None:
    assert matrix_store.run_status(None, dir_exists=True) == "started"


# --- estimates ------------------------------------------------------------------------


def test_eta_uses_the_size_model_until_runs_are_measured() -> None:
    runs = plan(SMALL)
    est = matrix_plan.Estimator()
    cfg = runs[0].config(Path("/"))
    # 45 s boot + 3 passes x 256 MiB / 12 MiB/s
    assert matrix_plan.model_seconds(cfg) == pytest.approx(45 + 3 * 256 / 12)
    assert est.seconds(runs[0]) == pytest.approx(109.0)
    assert est.total(runs) == pytest.approx(9 * 109.0)
    assert est.basis == "size model (nothing measured yet)"


def test_eta_prefers_the_same_cell_then_scales_the_model() -> None:
    runs = plan(SMALL)
    est = matrix_plan.Estimator()
    est.add(runs[0], 200.0)  # the model said 109 s
    est.add(runs[5], 300.0)  # same cell, repeat 2
    assert est.seconds(runs[0]) == pytest.approx(250.0)
    # another cell: the model scaled by measured/model = 500 / 218
    assert est.seconds(runs[1]) == pytest.approx(109.0 * 500 / 218)
    assert est.basis == "2 measured run(s)"


def test_model_is_capped_by_the_timeout() -> None:
    cfg = RunConfig(out=Path("/"), total_bytes=8192 * MIB, loops=4, timeout_s=600.0)
    assert matrix_plan.model_seconds(cfg) == 645.0


# --- the store and the runner (the run itself replaced: these test the bookkeeping) -----


def fake_runner(outcomes: dict[str, str], stop_at: str | None = None) -> Any:
    """Writes a run.json the way run_experiment does; ``stop_at`` is marked interrupted."""

    def run(cfg: RunConfig, emit: experiment.Emit) -> dict[str, Any]:
        emit("guest phase: stress")
        cfg.out.mkdir(parents=True, exist_ok=True)
        rid = cfg.out.name
        obj: dict[str, Any] = {
            "config": cfg.to_json(),
            "outcome": outcomes.get(rid, "completed"),
            "timings": {"total_s": 12.0},
        }
        if rid == stop_at:
            obj.update(outcome="error", interrupted=True)
        (cfg.out / "run.json").write_text(json.dumps(obj))
        return obj

    return run


def test_runner_writes_the_index_after_each_run_and_resume_skips_finished(
    tmp_path: Path,
) -> None:
    mx = matrix_plan.parse_matrix(SMALL, name="small")
    store = tmp_path / "store"
    lines: list[str] = []
    stop = "r03-6.12-patched-slub-nbd-serve-rep1"
    first = matrix.run_matrix(mx, store, emit=lines.append, run_one=fake_runner({}, stop_at=stop))
    assert first.interrupted
    assert first.ran == [
        "r01-6.1-patched-slub-nbd-serve-rep1",
        "r02-6.1-vanilla-slub-nbd-serve-rep1",
    ]
    index = json.loads((store / "index.json").read_text())
    assert index["counts"] == {"finished": 2, "interrupted": 1, "started": 0, "pending": 6}
    assert index["matrix"]["sha256"] == mx.sha256
    assert (store / "matrix.toml").read_text() == SMALL
    entry = index["runs"][0]
    assert (entry["status"], entry["outcome"], entry["duration_s"]) == (
        "finished",
        "completed",
        12.0,
    )
    assert entry["config"]["out"] == str(store / entry["id"])
    assert any(
        line.startswith("[1/9] run 1 of 9: r01-6.1-patched-slub-nbd-serve-rep1") for line in lines
    )
    assert any("[2/9] guest phase: stress  [matrix ETA " in line for line in lines)

    with pytest.raises(matrix_plan.MatrixError, match="pass --resume"):
        matrix.run_matrix(mx, store, run_one=fake_runner({}))

    second = matrix.run_matrix(
        mx,
        store,
        resume=True,
        run_one=fake_runner({"r04-6.12-vanilla-slub-nbd-serve-rep1": "lockup"}),
    )
    assert not second.interrupted
    assert second.skipped == first.ran
    assert second.ran[0] == stop
    assert len(second.ran) == 7
    assert second.outcomes["r04-6.12-vanilla-slub-nbd-serve-rep1"] == "lockup"
    index = json.loads((store / "index.json").read_text())
    assert index["counts"] == {"finished": 9, "interrupted": 0, "started": 0, "pending": 0}
    attic = list((store / ".attic").iterdir())
    assert [p.name.startswith(stop) for p in attic] == [True]  # the interrupted try is kept

    third = matrix.run_matrix(mx, store, resume=True, run_one=fake_runner({}))
    assert (third.ran, len(third.skipped)) == ([], 9)

    r05 = store / "r05-6.1-vanilla-slab-nbd-serve-rep1" / "run.json"
    r05.write_text(json.dumps({"outcome": "error", "outcome_reason": "no slab image"}))
    assert matrix.run_matrix(mx, store, resume=True, run_one=fake_runner({})).ran == []
    fourth = matrix.run_matrix(mx, store, resume=True, retry_errors=True, run_one=fake_runner({}))
    assert fourth.ran == ["r05-6.1-vanilla-slab-nbd-serve-rep1"]
    assert json.loads(r05.read_text())["outcome"] == "completed"


def test_a_store_of_another_matrix_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    mx = matrix_plan.parse_matrix(SMALL)
    matrix.run_matrix(
        mx, store, only=["r01-6.1-patched-slub-nbd-serve-rep1"], run_one=fake_runner({})
    )
    other = matrix_plan.parse_matrix(SMALL.replace("workers = 4", "workers = 5"))
    with pytest.raises(matrix_plan.MatrixError, match="holds runs of a different matrix file"):
        matrix.run_matrix(other, store, resume=True, run_one=fake_runner({}))


@pytest.mark.parametrize(("recorded", "resumes"), [(True, True), (False, False)])
def test_a_retired_setting_at_its_built_in_value_still_resumes(
    tmp_path: Path, recorded: bool, resumes: bool
) -> None:
    # Stores begun before --no-swap-flag went record nbd_swap_flag in every run's config.
    store = tmp_path / "store"
    mx = matrix_plan.parse_matrix(SMALL)
    first = "r01-6.1-patched-slub-nbd-serve-rep1"
    matrix.run_matrix(mx, store, only=[first], run_one=fake_runner({}))
    index_path = store / "index.json"
    index = json.loads(index_path.read_text())
    for entry in index["runs"]:
        if entry["id"] == first:
            entry["config"]["nbd_swap_flag"] = recorded
    index["matrix"]["sha256"] = "0" * 64  # the store's copy of the file differed (a comment)
    index_path.write_text(json.dumps(index))
    if resumes:
        again = matrix.run_matrix(mx, store, resume=True, run_one=fake_runner({}))
        assert first in again.skipped and first not in again.ran
    else:
        with pytest.raises(matrix_plan.MatrixError, match="does not keep all of its runs"):
            matrix.run_matrix(mx, store, resume=True, run_one=fake_runner({}))


def test_resume_with_more_repeats_adds_runs(tmp_path: Path) -> None:
    store = tmp_path / "store"
    mx = matrix_plan.parse_matrix(SMALL)
    first = matrix.run_matrix(mx, store, run_one=fake_runner({}))
    more = matrix_plan.parse_matrix(SMALL.replace("repeats = 2", "repeats = 3"))
    assert more.sha256 != mx.sha256
    with pytest.raises(matrix_plan.MatrixError, match="pass --resume"):
        matrix.run_matrix(more, store, run_one=fake_runner({}))
    second = matrix.run_matrix(more, store, resume=True, run_one=fake_runner({}))
    assert sorted(second.skipped) == sorted(first.ran)  # nothing measured twice
    assert len(second.ran) == 4 and all(rid.endswith("-rep3") for rid in second.ran)
    index = json.loads((store / "index.json").read_text())
    assert index["matrix"]["sha256"] == more.sha256
    assert (store / "matrix.toml").read_text() == more.text
    assert index["counts"]["finished"] == len(first.ran) + len(second.ran)
    # Fewer repeats than the store holds drops finished runs: refused.
    with pytest.raises(matrix_plan.MatrixError, match="does not keep all of its runs"):
        matrix.run_matrix(mx, store, resume=True, run_one=fake_runner({}))


def test_resume_with_a_kernel_added_runs_only_the_new_cells(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's case: 7.2 joins the seed's kernel axis. The interleaved plan renumbers
    every run after the first new one (r05-6.1-vanilla-slab-... becomes r07-...); the measured
    runs keep their directories and only the new kernel's runs are run."""
    store = tmp_path / "store"
    first = matrix.run_matrix(matrix_plan.parse_matrix(SMALL), store, run_one=fake_runner({}))
    assert len(first.ran) == 9
    grown_text = SMALL.replace('kernel = ["6.1", "6.12"]', 'kernel = ["6.1", "6.12", "7.2"]')
    grown = matrix_plan.parse_matrix(grown_text)
    renumbered = [r.id for r in matrix_plan.plan_runs(grown)]
    assert "r05-6.1-vanilla-slab-nbd-serve-rep1" in first.ran
    assert "r05-6.1-vanilla-slab-nbd-serve-rep1" not in renumbered
    assert "r07-6.1-vanilla-slab-nbd-serve-rep1" in renumbered
    path = tmp_path / "grown.toml"
    path.write_text(grown_text)
    assert cli.main(["matrix", str(path), "--out", str(store), "--dry-run", "--no-history"]) == 0
    dry = capsys.readouterr().out
    assert dry.count("~finished") == 9
    assert "estimated time: " in dry and " for 4 run(s) " in dry
    second = matrix.run_matrix(grown, store, resume=True, run_one=fake_runner({}))
    assert sorted(second.skipped) == sorted(first.ran)  # nothing measured twice
    assert sorted(r.split("-", 1)[1] for r in second.ran) == sorted(
        f"7.2-{arm}-slub-nbd-serve-rep{rep}" for arm in ("patched", "vanilla") for rep in (1, 2)
    )
    index = json.loads((store / "index.json").read_text())
    assert index["counts"]["finished"] == 13
    ids = [e["id"] for e in index["runs"]]
    assert len(set(ids)) == 13 and set(first.ran) <= set(ids)
    assert all((store / rid / "run.json").is_file() for rid in ids)
    # Nothing else is taken for the same run: the same label at another repeat is new.
    kept = matrix_store.keep_store_ids(matrix_plan.plan_runs(grown), store)
    assert [r.id for r in kept] == ids


def test_a_published_matrix_resumes_from_its_archive_with_a_kernel_added(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """How 7.2 joined the seed: its published runs.tar.xz, unpacked, is the store (no
    index.json in it); the grown plan keeps every measured run under its directory and
    plans only 7.2's ten. The archive is taken back to the store it was before 7.2."""
    import tarfile

    store = tmp_path / "seed"
    store.mkdir()
    with tarfile.open(REPO / "docs" / "results" / "seed-2026-12-06" / "runs.tar.xz") as tar:
        tar.extractall(store, filter="data")
    for rdir in store.glob("r*-7.2-*"):
        subprocess.run(["rm", "-r", str(rdir)], check=True)
    measured = sorted(p.name for p in store.iterdir())
    assert len(measured) == 25 and not (store / "index.json").exists()
    seed = REPO / "vm" / "campaign" / "matrices" / "seed.toml"
    plan = matrix_store.keep_store_ids(matrix_plan.plan_runs(matrix_plan.load_matrix(seed)), store)
    new = [r.id for r in plan if r.id not in measured]
    assert set(measured) <= {r.id for r in plan}
    assert len(new) == 10 and all("-7.2-" in rid for rid in new)
    assert cli.main(["matrix", str(seed), "--out", str(store), "--dry-run", "--no-history"]) == 0
    dry = capsys.readouterr().out
    assert dry.count("~finished") == 25 and " for 10 run(s) " in dry


def test_dry_run_lists_runs_and_the_estimate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "m.toml"
    path.write_text(SMALL)
    rc = cli.main(["matrix", str(path), "--dry-run", "--shard", "1/3", "--no-history"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "matrix small: 3 of 9 run(s)"
    assert lines[1].split()[0] == "r01-6.1-patched-slub-nbd-serve-rep1"
    assert lines[1].endswith("~1m49s")
    assert lines[-1] == "estimated time: 5m27s for 3 run(s) (size model (nothing measured yet))"
    assert not (Path.cwd() / "results" / "matrix-small").exists()


def test_cli_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.toml"
    path.write_text("[defaults]\nworkers = 'many'\n")
    assert cli.main(["matrix", str(path), "--dry-run"]) == 2
    assert (
        "swapnbd matrix: error: defaults.workers must be a whole number" in capsys.readouterr().err
    )
    assert cli.main(["matrix", str(tmp_path / "none.toml")]) == 2
    assert "cannot read the matrix file" in capsys.readouterr().err


def test_sigterm_raises_keyboard_interrupt_only_inside_the_guard() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with matrix.sigterm_as_interrupt(), pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) == before


# --- the real thing -------------------------------------------------------------------

E2E = """
[matrix]
name = "e2e"
repeats = 1

[defaults]
kernel = "6.1"
arm = "patched"
memory = "128M"
cpus = 2
workers = 4
total = "256M"
loops = 1
# No timeout: the workload-sized default (about 40 min) holds on a host at load 20, where
# one of these runs took over 10 minutes; a hang is still caught by lockup_after.
lockup_after = 180

[axes]
server = ["nbd-serve", "nbdkit"]
"""


@pytest.mark.vm
def test_real_two_run_matrix_resume_and_report(tmp_path: Path) -> None:
    """Two small patched runs through real guests, then --resume runs nothing, then the
    report reads the store."""

    path = tmp_path / "e2e.toml"
    path.write_text(E2E)
    store = tmp_path / "store"
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "vm.cli", "matrix", str(path), "--out", str(store)]
    first = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=5400
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert "[1/2] run 1 of 2: r01-6.1-patched-slub-nbd-serve-rep1" in first.stderr
    assert "[2/2] run 2 of 2: r02-6.1-patched-slub-nbdkit-rep1" in first.stderr
    assert "matrix ETA" in first.stderr
    index = json.loads((store / "index.json").read_text())
    assert [(e["id"], e["status"], e["outcome"]) for e in index["runs"]] == [
        ("r01-6.1-patched-slub-nbd-serve-rep1", "finished", "completed"),
        ("r02-6.1-patched-slub-nbdkit-rep1", "finished", "completed"),
    ]
    for entry in index["runs"]:
        run = json.loads((store / entry["id"] / "run.json").read_text())
        assert run["config"]["out"] == str(store / entry["id"])
        assert run["swapstress"]["corrupt_pages"] == 0
        assert run["vmstat_delta"]["pswpout"] > 0
        assert entry["duration_s"] == run["timings"]["total_s"]

    again = subprocess.run(
        [*cmd, "--resume"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    assert "matrix e2e: ran 0, skipped 2" in again.stdout
    assert "QEMU started" not in again.stderr

    rep = subprocess.run(
        [
            sys.executable,
            "-m",
            "vm.cli",
            "report",
            str(store),
            "--format",
            "json",
            "--plots",
            str(tmp_path / "plots"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert rep.returncode == 0, rep.stderr
    obj = json.loads(rep.stdout)
    assert [(a["label"], a["outcome_text"]) for a in obj["arms"]] == [
        ("6.1-patched-slub-nbd-serve", "completed 1/1"),
        ("6.1-patched-slub-nbdkit", "completed 1/1"),
    ]
    sys_row = next(r for r in obj["rows"] if r["key"] == "sys_s")
    assert sys_row["values"]["6.1-patched-slub-nbd-serve"]["n"] == 1
    assert sys_row["values"]["6.1-patched-slub-nbd-serve"]["ratio"] == 1.0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["arms.png", "overlays.png"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.vm
def test_sigterm_stops_the_run_and_the_matrix_and_resume_redoes_it(tmp_path: Path) -> None:
    """SIGTERM mid-run: QEMU and the server stop, run.json is marked interrupted, the
    matrix stops with 130 and the index says so; the run is not finished for --resume."""
    path = tmp_path / "e2e.toml"
    path.write_text(E2E)
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "vm.cli", "matrix", str(path), "--out", str(store)]
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
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-3000:]
    assert f"interrupted: continue with --resume --out {store}" in out
    rid = "r01-6.1-patched-slub-nbd-serve-rep1"
    run = json.loads((store / rid / "run.json").read_text())
    assert (run["outcome"], run["interrupted"]) == ("error", True)
    assert not _alive(qemu_pid)
    assert not _alive(run["server"]["pid"])
    index = json.loads((store / "index.json").read_text())
    assert [(e["id"], e["status"]) for e in index["runs"]] == [
        (rid, "interrupted"),
        ("r02-6.1-patched-slub-nbdkit-rep1", "pending"),
    ]
    assert not (store / "r02-6.1-patched-slub-nbdkit-rep1").exists()
    dry = subprocess.run(
        [*cmd, "--dry-run"], cwd=REPO, capture_output=True, text=True, check=False, timeout=60
    )
    assert "estimated time: " in dry.stdout
    assert "for 2 run(s)" in dry.stdout  # the interrupted run is still to do


def test_stall_and_server_policy_keys_reach_the_run_and_the_label() -> None:
    m = matrix_plan.parse_matrix(
        "[matrix]\nrepeats = 1\n[defaults]\nstall_after = 20\nearly_confirm = false\n"
        '[axes]\nserver_sched_policy = ["idle", "normal"]\n'
    )
    cfgs = [c.settings for c in m.cells]
    assert [(c["stall_after_s"], c["early_confirm"]) for c in cfgs] == [(20.0, False)] * 2
    labels = [r.label for r in matrix_plan.plan_runs(m)]
    assert labels == [
        "6.1-patched-slub-nbd-serve-sched-idle",
        "6.1-patched-slub-nbd-serve-sched-normal",
    ]
    held = matrix_plan.parse_matrix(
        "[matrix]\nrepeats = 1\n[axes]\nearly_confirm = [true, false]\n"
    )
    assert [r.label for r in matrix_plan.plan_runs(held)] == [
        "6.1-patched-slub-nbd-serve-early",
        "6.1-patched-slub-nbd-serve-held",
    ]
    with pytest.raises(matrix_plan.MatrixError, match="early_confirm must be true or false"):
        matrix_plan.parse_matrix("[matrix]\nrepeats = 1\n[defaults]\nearly_confirm = 1\n")


def test_the_server_policy_splits_only_nbd_serve_runs() -> None:
    """run.json records the policy for nbd-serve only: nbd-serve beside nbdkit at the same
    policy are two servers, not two policies (the e2e matrix's labels must not change)."""
    idle = {"kernel": "6.1", "arm": "patched", "server": "nbd-serve", "server_sched_policy": "idle"}
    kit = {"kernel": "6.1", "arm": "patched", "server": "nbdkit", "server_sched_policy": None}
    assert matrix_plan.varying_keys([idle, kit]) == []
    normal = {**idle, "server_sched_policy": "normal"}
    varying = matrix_plan.varying_keys([idle, kit, normal])
    assert varying == ["server_sched_policy"]
    assert [matrix_plan.label(c, varying) for c in (idle, kit, normal)] == [
        "6.1-patched-slub-nbd-serve-sched-idle",
        "6.1-patched-slub-nbdkit",
        "6.1-patched-slub-nbd-serve-sched-normal",
    ]


def test_estimates_leave_out_the_one_off_image_build(tmp_path: Path) -> None:
    """A SLAB cell's first run built the kernel (25 min of its 26); its next runs take a
    minute, and the estimate must say so, not 26 min each (seen: 1h41m for 4 runs that
    took 6 min)."""
    from vm.campaign.plan import Estimator, plan_runs, run_seconds
    from vm.campaign.store import estimator_from_store

    assert run_seconds({"total_s": 1518.0, "image_s": 1432.0}) == 86.0
    assert run_seconds({"total_s": 71.0}) == 71.0
    assert run_seconds({}) is None
    path = tmp_path / "m.toml"
    path.write_text(SMALL)
    runs = plan_runs(matrix_plan.load_matrix(path))
    store = tmp_path / "store"
    first = runs[0]
    (store / first.id).mkdir(parents=True)
    done = {"outcome": "lockup", "timings": {"total_s": 1518.0, "image_s": 1432.0}}
    (store / first.id / "run.json").write_text(json.dumps(done))
    est = estimator_from_store(runs, store)
    twin = next(r for r in runs[1:] if r.label == first.label)
    assert est.seconds(twin) == 86.0
    assert isinstance(est, Estimator) and est.basis == "1 measured run(s)"


def test_estimates_learn_from_the_committed_archives() -> None:
    """The seed's patched 6.1 runs took 8-11 min (3 min on 2026-12-07's faster host) and
    its vanilla runs end at the cutoff: the estimate must say so from the committed
    results, matched by cell, and scale the closest measured cell by the size model where
    the cell itself was never run."""
    from vm.campaign import archive

    history = archive.committed_archives()
    assert [p.parent.name for p in history] == [
        "boundary-6.1-2026-12-07",
        "boundary-7.2-2026-12-07",
        "crosscheck-2026-12-06",
        "evidence-2026-12-06",
        "seed-2026-11-29",
        "seed-2026-12-06",
        "slab-2x-2026-12-07",
        "swap-path-2026-11-30-idle",
        "swap-path-2026-11-30-idle-pair",
    ]
    seed = matrix_plan.load_matrix(REPO / "vm" / "campaign" / "matrices" / "seed.toml")
    runs = matrix_plan.plan_runs(seed)
    est = matrix_store.estimator_from_store(runs, None, history)
    assert est.basis == "256 measured run(s), 256 of them from committed results"
    by_label = {r.label: est.seconds(r) for r in runs}
    # 6.1 patched SLUB at 4x, 90 s cutoff: the seeds' eight completed runs (3 of
    # 2026-11-29, 5 of 2026-12-06) and the boundary's four at 4x (2026-12-07: the same
    # cell, with the allocator named), each its total less the image build.
    patched = [641.59, 471.63, 685.01, 628.03, 513.15, 471.70, 558.40, 703.27]
    patched += [171.47, 180.0, 203.18, 176.99]
    assert by_label["6.1-patched-slub-nbd-serve"] == pytest.approx(sum(patched) / 12, abs=0.05)
    # 7.2 patched, added to the seed on 2026-12-07: its own five runs (the first one's
    # total includes a 40 s KVM probe) and the 7.2 boundary's four at 4x.
    seven = [231.76, 197.03, 213.6, 216.09, 212.57, 198.03, 196.53, 197.51, 190.01]
    assert by_label["7.2-patched-slub-nbd-serve"] == pytest.approx(sum(seven) / 9, abs=0.05)
    # 6.1 vanilla SLUB, 90 s cutoff: eight lockups, every one 1-2 minutes.
    assert 60 < by_label["6.1-vanilla-slub-nbd-serve"] < 120
    # Never measured at ratio 2: the same kernel, arm and cutoff, scaled by the model
    # (45 s + 3 x 256 MiB / 12 MiB/s against 45 s + 3 x 512 MiB / 12 MiB/s).
    half = matrix_plan.parse_matrix(seed.text.replace("ratio = 4.0", "ratio = 2.0"))
    half_runs = {r.label: est.seconds(r) for r in matrix_plan.plan_runs(half)}
    assert half_runs["6.12-vanilla-slub-nbd-serve"] == pytest.approx(
        by_label["6.12-vanilla-slub-nbd-serve"] * 109 / 173
    )
    # A kernel nothing was measured on: the size model, scaled by all measured runs.
    other = matrix_plan.parse_matrix(seed.text.replace('kernel = "6.1"\n', 'kernel = "6.1-x"\n'))
    lone = next(r for r in matrix_plan.plan_runs(other) if r.cell.settings["kernel"] == "6.1-x")
    scale = sum(m.seconds for m in est.samples) / sum(m.model for m in est.samples)
    assert est.seconds(lone) == pytest.approx(173 * scale)


def test_min_free_kbytes_is_a_matrix_key_and_enters_the_label() -> None:
    runs = plan('[defaults]\ntotal = "256M"\n[axes]\nmin_free_kbytes = [1448, 8192]\n')
    assert [r.label for r in runs] == [
        "6.1-patched-slub-nbd-serve-mf1448",
        "6.1-patched-slub-nbd-serve-mf8192",
    ]
    assert runs[1].config(Path("/")).pinned_min_free_kbytes == 8192
