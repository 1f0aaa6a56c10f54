"""The matrix store (``--out``): run directories, ``index.json``, resume and the attic.

Theory of operation
-------------------
The store holds one directory per run, written by
:func:`vm.run.experiment.run_experiment` exactly as ``swapnbd run`` would, a copy of the
matrix file (``matrix.toml``) and ``index.json``.  The index is rebuilt from the run
directories on disk after every run and written atomically (tmp + rename) under a lock,
so killing the runner at any moment loses nothing already measured, and shards sharing a
store do not overwrite each other's entries.

A run is *finished* when its run.json has an outcome and is not marked ``interrupted``
(the mark run_experiment sets when SIGINT, or SIGTERM through
:func:`vm.campaign.matrix.sigterm_as_interrupt`, stopped it).  ``--resume`` reruns everything
else; the leftovers of an interrupted run are moved to ``STORE/.attic/`` (kept, never
averaged: the report skips hidden directories).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from vm.campaign.archive import read_run_jsons
from vm.campaign.plan import (
    Estimator,
    Matrix,
    MatrixError,
    PlannedRun,
    run_id_parts,
    run_seconds,
)

INDEX_SCHEMA = 1
INDEX_NAME = "index.json"
MATRIX_COPY = "matrix.toml"
ATTIC = ".attic"
# Settings a run's config no longer has, at the one value whose behaviour is now built in:
# a run recorded with it is the same run as one without (9a09c3e: nbd-client always gets
# -swap). Any other value was a different experiment, and stays a different config.
RETIRED_SETTINGS: Mapping[str, Any] = {"nbd_swap_flag": True}


def is_finished(run_json: Mapping[str, Any] | None) -> bool:
    """A measurement to keep: an outcome, and not stopped by SIGINT/SIGTERM."""
    if not run_json:
        return False
    return run_json.get("outcome") is not None and not run_json.get("interrupted")


def run_status(run_json: Mapping[str, Any] | None, dir_exists: bool) -> str:
    """``finished``, ``interrupted``, ``started`` (a directory, no run.json yet) or
    ``pending``."""
    if run_json is not None:
        return "finished" if is_finished(run_json) else "interrupted"
    return "started" if dir_exists else "pending"


def read_run_json(path: Path) -> dict[str, Any] | None:
    """run.json, or None when absent or unreadable (a half-written file is not a result)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


@contextlib.contextmanager
def _locked(store: Path) -> Iterator[None]:
    with open(store / ".index.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_index(
    matrix: Matrix, runs: Sequence[PlannedRun], store: Path, source: Path | None
) -> dict[str, Any]:
    """The index from the plan and the run directories on disk."""
    entries = []
    for run in runs:
        rdir = store / run.id
        rj = read_run_json(rdir / "run.json")
        status = run_status(rj, rdir.is_dir())
        entry: dict[str, Any] = {
            "id": run.id,
            "index": run.index,
            "label": run.label,
            "rep": run.rep,
            "cell": run.cell.source,
            "status": status,
            "outcome": rj.get("outcome") if rj else None,
            "outcome_reason": rj.get("outcome_reason") if rj else None,
            "duration_s": (rj.get("timings") or {}).get("total_s") if rj else None,
            "config": run.config(store).to_json(),
        }
        entries.append(entry)
    return {
        "schema": INDEX_SCHEMA,
        "matrix": {
            "name": matrix.name,
            "file": str(source) if source else None,
            "copy": MATRIX_COPY,
            "sha256": matrix.sha256,
        },
        "updated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "counts": {
            s: sum(1 for e in entries if e["status"] == s)
            for s in ("finished", "interrupted", "started", "pending")
        },
        "runs": entries,
    }


def write_index(
    matrix: Matrix, runs: Sequence[PlannedRun], store: Path, source: Path | None
) -> dict[str, Any]:
    with _locked(store):
        index = build_index(matrix, runs, store, source)
        _write_atomic(store / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    return index


def read_index(store: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads((store / INDEX_NAME).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def keep_store_ids(plan: Sequence[PlannedRun], store: Path | None) -> list[PlannedRun]:
    """``plan`` with every run the store has begun under another id kept under that id.

    Run ids number the interleaved plan (``r05-LABEL-rep1``), so a matrix file that gains
    a cell (a kernel added to an axis) renumbers the runs after it. A run of the same
    label and repeat is the same run: it keeps the directory it was measured in, and
    resuming the grown matrix runs only what is new instead of everything renumbered.

    A store without an index (a published ``runs.tar.xz`` unpacked to resume from) is
    read from its run directories' names, ``rNN-LABEL-repR``, the id format itself."""
    if store is None:
        return list(plan)
    index = read_index(store)
    if index is not None:
        begun = {
            (e.get("label"), e.get("rep")): e["id"]
            for e in index.get("runs", [])
            if e.get("status") != "pending" and isinstance(e.get("id"), str)
        }
    else:
        begun = _begun_by_directory(store)
    out = []
    for run in plan:
        old = begun.get((run.label, run.rep))
        out.append(run if old is None or old == run.id else replace(run, id=old))
    return out


def _begun_by_directory(store: Path) -> dict[tuple[str, int], str]:
    """(label, repeat) -> id for every run directory in ``store``."""
    begun: dict[tuple[str, int], str] = {}
    if not store.is_dir():
        return begun
    for rdir in sorted(store.iterdir()):
        parts = run_id_parts(rdir.name)
        if parts is not None and rdir.is_dir():
            begun.setdefault(parts, rdir.name)
    return begun


def extends(index: Mapping[str, Any], plan: Sequence[PlannedRun], store: Path) -> bool:
    """Whether ``plan`` keeps every run the store has begun, by id and configuration,
    so that resuming with it only adds runs (a matrix file edited to more repeats)."""
    planned = {run.id: run for run in plan}
    for entry in index.get("runs", []):
        if entry.get("status") == "pending":
            continue
        run = planned.get(entry.get("id"))
        if run is None or not same_config(run.config(store).to_json(), entry.get("config")):
            return False
    return True


def same_config(new: Mapping[str, Any], old: Any) -> bool:
    """Whether a recorded config ``old`` is ``new``, once settings retired at their
    built-in value (:data:`RETIRED_SETTINGS`) are set aside."""
    if not isinstance(old, Mapping):
        return False
    kept = {
        k: v
        for k, v in old.items()
        if not (k in RETIRED_SETTINGS and k not in new and v == RETIRED_SETTINGS[k])
    }
    return dict(new) == kept


def prepare_store(
    matrix: Matrix, store: Path, *, resume: bool, plan: Sequence[PlannedRun] = ()
) -> None:
    """Create the store or check that it belongs to this matrix.

    With ``resume``, a changed matrix file is accepted when its ``plan`` keeps every run
    the store has begun, with the same id and configuration (more repeats, say): the
    store's copy of the file is replaced by the new one.

    Raises:
        MatrixError: the store holds another matrix, or holds runs and ``resume`` is off.
    """
    index = read_index(store)
    if index is not None:
        sha = (index.get("matrix") or {}).get("sha256")
        if sha != matrix.sha256:
            if not extends(index, plan, store):
                raise MatrixError(
                    f"{store} holds runs of a different matrix file (sha256 "
                    f"{str(sha)[:12]}…, this one {matrix.sha256[:12]}…), and this one does "
                    "not keep all of its runs with the same settings; choose another --out"
                )
            if not resume:
                raise MatrixError(
                    f"{store} holds runs of an earlier version of this matrix file, all of "
                    "which it keeps; pass --resume to add the new runs or choose another --out"
                )
            _write_atomic(store / MATRIX_COPY, matrix.text)
        if not resume and any(
            (e.get("status") in ("finished", "interrupted", "started"))
            for e in index.get("runs", [])
        ):
            raise MatrixError(
                f"{store} already holds runs of this matrix; pass --resume to continue it "
                "or choose another --out"
            )
    elif store.exists() and any(store.iterdir()) and not resume:
        raise MatrixError(f"{store} exists and is not empty; choose another --out")
    store.mkdir(parents=True, exist_ok=True)
    copy = store / MATRIX_COPY
    if not copy.exists():
        _write_atomic(copy, matrix.text)


def estimator_from_store(
    runs: Sequence[PlannedRun], store: Path | None, history: Sequence[Path] = ()
) -> Estimator:
    """An estimator that knows the finished runs of ``store`` (None: no store yet) and of
    the committed ``history`` archives (:func:`vm.campaign.archive.committed_archives`;
    their harness errors left out: a failed image build says nothing of a run's length)."""
    est = Estimator()
    for archive in history:
        for committed in read_run_jsons(archive):
            own = run_seconds(committed.get("timings") or {})
            if own is not None and is_finished(committed) and committed.get("outcome") != "error":
                est.add_config(committed.get("config") or {}, own, committed=True)
    if store is None or not store.is_dir():
        return est
    for run in runs:
        rj = read_run_json(store / run.id / "run.json")
        own = run_seconds(rj.get("timings") or {}) if rj and is_finished(rj) else None
        if own is not None:
            est.add(run, own)
    return est


def move_to_attic(store: Path, run_id: str) -> None:
    """Move the leftovers of an unfinished run to ``STORE/.attic/`` (kept, never averaged)."""
    rdir = store / run_id
    if not rdir.exists():
        return
    attic = store / ATTIC
    attic.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = attic / f"{run_id}-{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = attic / f"{run_id}-{stamp}-{n}"
    shutil.move(str(rdir), str(target))
