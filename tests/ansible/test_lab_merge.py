"""vm.campaign.lab without hosts: reading the status step, progress lines, merging shares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vm.campaign import lab
from vm.campaign import plan as matrix_plan

TOML = """\
[matrix]
repeats = 4
[defaults]
memory = "128M"
workers = 4
total = "128M"
loops = 1
"""


def status_output(host: str, shard: str, running: bool, runs: list[list[object]]) -> str:
    """What the default callback prints for the status step's debug task."""
    msg = lab.STATUS_MARK + json.dumps(
        {"host": host, "shard": shard, "running": running, "runs": runs, "last_line": 'a "b"'}
    )
    return f'TASK [Show the progress] ***\nok: [{host}] => {{\n    "msg": {json.dumps(msg)}\n}}\n'


def test_status_lines_count_only_the_hosts_own_shard() -> None:
    runs: list[list[object]] = [[0, "finished"], [1, "finished"], [2, "started"], [3, "pending"]]
    text = status_output("runner2", "2/2", True, runs) + status_output(
        "runner1", "1/2", False, runs
    )
    one, two = lab.parse_status_output(text)
    assert (one.host, one.k, one.n, one.finished, one.total, one.running) == (
        "runner1",
        1,
        2,
        1,
        2,
        False,
    )
    assert (two.host, two.finished, two.total, two.running) == ("runner2", 1, 2, True)
    assert one.line() == (
        '[runner1 1/2] 1/2 runs finished, stopped early (run again to resume this share): a "b"'
    )
    assert two.line() == '[runner2 2/2] 1/2 runs finished, running: a "b"'
    assert lab.overall_line([one, two], 600.0, 0) == (
        "overall: 2/4 runs finished, 1/2 hosts running, ETA 10m00s, elapsed 10m00s"
    )


def write_run(store: Path, run_id: str, outcome: str | None, **extra: object) -> None:
    (store / run_id).mkdir(parents=True)
    if outcome is not None:
        body = {"outcome": outcome, "timings": {"total_s": 1.0}, **extra}
        (store / run_id / "run.json").write_text(json.dumps(body))


def test_merge_keeps_finished_runs_and_rebuilds_the_index(tmp_path: Path) -> None:
    plan = matrix_plan.plan_runs(matrix_plan.parse_matrix(TOML, "tiny"))
    ids = [r.id for r in plan]
    a, b, store = tmp_path / "a", tmp_path / "b", tmp_path / "store"
    for share in (a, b):
        share.mkdir()
        (share / "matrix.toml").write_text(TOML)
    write_run(a, ids[0], "completed")
    write_run(a, ids[2], "error", interrupted=True)  # stopped mid-run on host a
    write_run(b, ids[1], "completed")
    write_run(b, ids[3], "completed")
    (a / ".attic").mkdir()
    write_run(store, ids[0], "completed", note="merged before")  # an earlier drive's copy

    summary = lab.merge_stores(store, [a, b])

    assert sorted(summary["copied"]) == sorted([ids[1], ids[2], ids[3]])
    assert summary["kept"] == [ids[0]]
    assert json.loads((store / ids[0] / "run.json").read_text())["note"] == "merged before"
    index = json.loads((store / "index.json").read_text())
    assert index["counts"] == {"finished": 3, "interrupted": 1, "started": 0, "pending": 0}
    assert not (store / ".attic").exists()

    # The rerun on host a finished the run: it replaces the interrupted copy.
    (a / ids[2] / "run.json").write_text(json.dumps({"outcome": "completed"}))
    lab.merge_stores(store, [a, b])
    index = json.loads((store / "index.json").read_text())
    assert index["counts"]["finished"] == 4


def test_merge_refuses_shares_of_different_matrices(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for share, text in ((a, TOML), (b, TOML.replace("repeats = 4", "repeats = 2"))):
        share.mkdir()
        (share / "matrix.toml").write_text(text)
    with pytest.raises(lab.LabError, match=r"different matrix\.toml"):
        lab.merge_stores(tmp_path / "store", [a, b])


def test_missing_inventory_is_a_clear_error(tmp_path: Path) -> None:
    toml = tmp_path / "m.toml"
    toml.write_text(TOML)
    with pytest.raises(lab.LabError, match=r"inventory .*nope.* does not exist"):
        lab.run_matrix_on_inventory(toml, tmp_path / "nope", tmp_path / "s", print)
