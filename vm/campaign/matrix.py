"""``swapnbd matrix``: a TOML file of cells -> interleaved runs in a resumable store.

Theory of operation
-------------------
A matrix file names *cells* (one combination of kernel, arm, allocator, server, guest size
and workload) and how many times to repeat each.  Planning is pure (this module's top
half): :func:`load_matrix` parses the TOML into :class:`Cell` objects, :func:`plan_runs`
expands them into :class:`PlannedRun` objects in interleaved order (every cell's first
repeat, then every cell's second, ...) so that drift on a shared machine (another job
starting, thermal limits) spreads over all cells instead of biasing the last one.

Run ids are ``rNN-KERNEL-ARM-ALLOCATOR-SERVER[-extras]-repR``: ``NN`` is the position in the
full plan (so ``ls`` shows the run order and shards of the same plan agree on it), the
middle part is the cell's label (the same label the report groups by) and ``R`` the
repeat.  Ids depend only on the matrix file, so ``--resume`` finds the same directories.

The store (``--out``) holds one directory per run, written by
:func:`vm.run.experiment.run_experiment` exactly as ``swapnbd run`` would, a copy of the
matrix file (``matrix.toml``) and ``index.json``.  The index is rebuilt from the run
directories on disk after every run and written atomically (tmp + rename) under a lock,
so killing the runner at any moment loses nothing already measured, and shards sharing a
store do not overwrite each other's entries.

A run is *finished* when its run.json has an outcome and is not marked ``interrupted``
(the mark run_experiment sets when SIGINT, or SIGTERM through :func:`sigterm_as_interrupt`,
stopped it).  ``--resume`` reruns everything else; the leftovers of an interrupted run are
moved to ``STORE/.attic/`` (kept, never averaged: the report skips hidden directories).

TOML format (see ``vm/campaign/matrices/seed.toml``)::

    [matrix]                 # optional: name, description, repeats (default 1)
    repeats = 3
    [defaults]               # settings every cell starts from (keys: CELL_KEYS)
    memory = "128M"
    [axes]                   # optional: cartesian product, one list per key
    kernel = ["6.1", "6.12"]
    [[cells]]                # optional: explicit combinations, added after the axes
    kernel = "6.1"           # ([[arms]] is accepted as another name for [[cells]])
    allocator = "slab"

With neither axes nor cells the matrix has one cell: the defaults.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import itertools
import json
import re
import shutil
import signal
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from peers import servers
from stress.sizes import SizeError, parse_size
from vm.image.progress import format_duration
from vm.run import experiment
from vm.run.config import RunConfig

MIB = 1024 * 1024
INDEX_SCHEMA = 1
INDEX_NAME = "index.json"
MATRIX_COPY = "matrix.toml"
ATTIC = ".attic"

#: Keys a cell (or ``[defaults]``, or ``[axes]``) may set, with what they mean.
CELL_KEYS: dict[str, str] = {
    "kernel": "kernel: stock 6.1 / 6.12, a built variant name or a bzImage path",
    "flavour": "Debian kernel flavour (cloud)",
    "arm": "patched or vanilla",
    "allocator": 'slab, slub or "stock" (the kernel as packaged)',
    "server": "nbd-serve, nbdkit or nbd-server",
    "backing": "memory or file",
    "memory": 'guest RAM, e.g. "128M"',
    "cpus": "guest vCPUs (also accepted as vcpus)",
    "workers": "swapstress workers",
    "ratio": "workload as a multiple of guest RAM (exclusive with total)",
    "total": 'workload in bytes or a size, e.g. "512M" (exclusive with ratio)',
    "loops": "verification passes",
    "swap": "device or file",
    "accel": "auto, tcg or kvm",
    "lockup_after": "seconds without progress that confirm a lockup (unless evidence did)",
    "stall_after": "seconds without progress that make a stall (SysRq looks)",
    "early_confirm": "true: the same deadlock signature in both looks confirms at once",
    "server_sched_policy": "nbd-serve's --sched-policy: normal, batch or idle",
    "timeout": "overall limit per run in seconds",
    "nbd_timeout": "nbd-client -t",
    "nbd_connections": "nbd-client -C",
    "min_free_kbytes": "vm.min_free_kbytes to pin",
    "repeats": "repeats of this cell (default: [matrix] repeats)",
}
_ALIASES = {"vcpus": "cpus"}

#: Keys that always appear in a label, in this order; the others only when they differ.
LABEL_KEYS = ("kernel", "arm", "allocator", "server")
#: The other keys that can tell cells apart, with how they appear in a label.
EXTRA_LABEL_KEYS = (
    "memory_mib",
    "cpus",
    "workers",
    "ratio",
    "total_bytes",
    "loops",
    "swap",
    "backing",
    "flavour",
    "nbd_connections",
    "server_sched_policy",
    "early_confirm",
)


class MatrixError(ValueError):
    """A matrix file or store that cannot be used; the message says what and what to do."""


# ---------------------------------------------------------------------------- planning


@dataclass(frozen=True, slots=True)
class Cell:
    """One combination of settings, run ``repeats`` times."""

    settings: Mapping[str, Any]
    """RunConfig keyword arguments (without ``out``)."""
    repeats: int
    source: str
    """Where it came from in the file (for error messages), e.g. ``cells[2]``."""

    def config(self, out: Path) -> RunConfig:
        return RunConfig(out=out, **dict(self.settings))


@dataclass(frozen=True, slots=True)
class PlannedRun:
    """One run of the plan: its position, id, cell and repeat."""

    index: int
    """0-based position in the full plan (shards select on it)."""
    id: str
    label: str
    rep: int
    cell: Cell

    def config(self, store: Path) -> RunConfig:
        return self.cell.config(store / self.id)


@dataclass(frozen=True, slots=True)
class Matrix:
    name: str
    description: str
    cells: tuple[Cell, ...]
    text: str
    """The file's text (copied into the store; its hash identifies the plan)."""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def _where(source: str, key: str) -> str:
    return f"{source}.{key}" if source else key


def _convert(key: str, value: Any, source: str) -> dict[str, Any]:
    """One TOML key/value -> RunConfig keyword arguments."""
    where = _where(source, key)

    def whole(minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise MatrixError(f"{where} must be a whole number >= {minimum}, got {value!r}")
        return value

    def seconds() -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise MatrixError(f"{where} must be a positive number of seconds, got {value!r}")
        return float(value)

    def text() -> str:
        if not isinstance(value, str) or not value:
            raise MatrixError(f"{where} must be a non-empty string, got {value!r}")
        return value

    def size() -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if not isinstance(value, str):
            raise MatrixError(f'{where} must be a size such as "512M", got {value!r}')
        try:
            return parse_size(value)
        except SizeError as exc:
            raise MatrixError(f"{where}: {exc}") from exc

    if key == "memory":
        nbytes = size()
        if nbytes % MIB:
            raise MatrixError(f"{where} must be a whole number of MiB, got {value!r}")
        return {"memory_mib": nbytes // MIB}
    if key == "total":
        return {"total_bytes": size(), "ratio": None}
    if key == "ratio":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 64:
            raise MatrixError(f"{where} must be a number in (0, 64], got {value!r}")
        return {"ratio": float(value), "total_bytes": None}
    if key in ("cpus", "workers", "loops", "nbd_connections"):
        return {key: whole(1)}
    if key in ("nbd_timeout",):
        return {key: whole(0)}
    if key == "min_free_kbytes":
        return {key: whole(128)}
    if key == "lockup_after":
        return {"lockup_after_s": seconds()}
    if key == "stall_after":
        return {"stall_after_s": seconds()}
    if key == "early_confirm":
        if not isinstance(value, bool):
            raise MatrixError(f"{where} must be true or false, got {value!r}")
        return {"early_confirm": value}
    if key == "server_sched_policy":
        return {"server_sched_policy": text()}
    if key == "timeout":
        return {"timeout_s": seconds()}
    if key == "allocator":
        name = text()
        return {"allocator": None if name == "stock" else name}
    if key == "server":
        name = text()
        if name not in servers.SERVER_KINDS:
            raise MatrixError(
                f"{where} must be one of {', '.join(servers.SERVER_KINDS)}, got {name!r}"
            )
        return {"server": name}
    if key == "arm":
        name = text()
        if name not in ("patched", "vanilla"):
            raise MatrixError(f"{where} must be patched or vanilla, got {name!r}")
        return {"arm": name}
    if key in ("swap", "backing", "accel", "kernel", "flavour"):
        return {key: text()}
    raise AssertionError(key)  # pragma: no cover - keys are checked before


def _layer(table: Mapping[str, Any], source: str) -> tuple[dict[str, Any], int | None]:
    """A TOML table of cell keys -> (RunConfig kwargs, repeats or None)."""
    settings: dict[str, Any] = {}
    repeats: int | None = None
    for raw_key, value in table.items():
        key = _ALIASES.get(raw_key, raw_key)
        if key not in CELL_KEYS:
            raise MatrixError(
                f"unknown key {_where(source, raw_key)!r}; a cell may set: "
                + ", ".join(sorted(CELL_KEYS))
            )
        if key == "repeats":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MatrixError(f"{_where(source, key)} must be a whole number >= 1")
            repeats = value
            continue
        settings.update(_convert(key, value, source))
    return settings, repeats


def _base_settings() -> dict[str, Any]:
    """The quick preset's workload with nbd-serve: what a key not given in the file means."""
    return {
        "memory_mib": 128,
        "cpus": 2,
        "workers": 8,
        "total_bytes": 256 * MIB,
        "ratio": None,
        "loops": 1,
        "server": "nbd-serve",
        "lockup_after_s": 180.0,
    }


def parse_matrix(text: str, name: str = "matrix") -> Matrix:
    """Parse a matrix file's text.

    Raises:
        MatrixError: invalid TOML, an unknown key, a bad value, a duplicate cell or a
            cell whose settings RunConfig rejects.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MatrixError(f"{name}: not valid TOML: {exc}") from exc
    known = {"matrix", "defaults", "axes", "cells", "arms"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise MatrixError(
            f"{name}: unknown top-level key(s) {', '.join(unknown)}; "
            f"expected {', '.join(sorted(known))}"
        )
    meta = doc.get("matrix", {})
    if not isinstance(meta, dict):
        raise MatrixError(f"{name}: [matrix] must be a table")
    bad_meta = sorted(set(meta) - {"name", "description", "repeats"})
    if bad_meta:
        raise MatrixError(
            f"{name}: unknown key(s) in [matrix]: {', '.join(bad_meta)}; "
            "expected name, description, repeats"
        )
    repeats_default = meta.get("repeats", 1)
    if isinstance(repeats_default, bool) or not isinstance(repeats_default, int):
        raise MatrixError(f"{name}: matrix.repeats must be a whole number >= 1")
    if repeats_default < 1:
        raise MatrixError(f"{name}: matrix.repeats must be >= 1, got {repeats_default}")

    defaults_table = doc.get("defaults", {})
    if not isinstance(defaults_table, dict):
        raise MatrixError(f"{name}: [defaults] must be a table")
    base = _base_settings()
    default_settings, default_repeats = _layer(defaults_table, "defaults")
    base.update(default_settings)
    if default_repeats is not None:
        repeats_default = default_repeats

    layers: list[tuple[dict[str, Any], int | None, str]] = []
    axes = doc.get("axes", {})
    if not isinstance(axes, dict):
        raise MatrixError(f"{name}: [axes] must be a table of lists")
    if axes:
        keys = list(axes)
        for key in keys:
            if not isinstance(axes[key], list) or not axes[key]:
                raise MatrixError(f"{name}: axes.{key} must be a non-empty list")
        for combo in itertools.product(*(axes[k] for k in keys)):
            table = dict(zip(keys, combo, strict=True))
            where = "axes(" + ", ".join(f"{k}={v}" for k, v in table.items()) + ")"
            settings, reps = _layer(table, where)
            layers.append((settings, reps, where))
    for section in ("cells", "arms"):
        entries = doc.get(section, [])
        if not isinstance(entries, list):
            raise MatrixError(f"{name}: {section} must be written [[{section}]]")
        for i, entry in enumerate(entries):
            where = f"{section}[{i}]"
            if not isinstance(entry, dict):
                raise MatrixError(f"{name}: {where} must be a table")
            settings, reps = _layer(entry, where)
            layers.append((settings, reps, where))
    if not layers:
        layers.append(({}, None, "defaults"))

    cells: list[Cell] = []
    seen: dict[str, str] = {}
    for settings, reps, where in layers:
        merged = dict(base)
        merged.update(settings)
        cell = Cell(settings=merged, repeats=reps or repeats_default, source=where)
        try:
            cell.config(Path("/nonexistent")).validate()
        except ValueError as exc:
            raise MatrixError(f"{name}: {where}: {exc}") from exc
        key = json.dumps(merged, sort_keys=True, default=str)
        if key in seen:
            raise MatrixError(f"{name}: {where} repeats the cell of {seen[key]}")
        seen[key] = where
        cells.append(cell)
    return Matrix(
        name=str(meta.get("name", name)),
        description=str(meta.get("description", "")),
        cells=tuple(cells),
        text=text,
    )


def load_matrix(path: Path) -> Matrix:
    try:
        text = path.read_text()
    except OSError as exc:
        raise MatrixError(f"cannot read the matrix file {path}: {exc.strerror}") from exc
    return parse_matrix(text, name=path.stem)


def _slug(text: str) -> str:
    """A piece of a run id: a bzImage path becomes its file name, odd characters become _."""
    if "/" in text:
        text = Path(text).name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def _fmt_extra(key: str, value: Any) -> str:
    if key == "memory_mib":
        return f"{value}M"
    if key == "cpus":
        return f"c{value}"
    if key == "workers":
        return f"w{value}"
    if key == "ratio":
        return "x-" if value is None else f"x{value:g}"
    if key == "total_bytes":
        return "t-" if value is None else f"t{value // MIB}M"
    if key == "loops":
        return f"l{value}"
    if key == "nbd_connections":
        return f"C{value}"
    if key == "server_sched_policy":
        return f"sched-{value or 'default'}"  # None: not nbd-serve, or not recorded
    if key == "early_confirm":
        return "held" if value is False else "early"
    return str(value)


def label_parts(config: Mapping[str, Any]) -> dict[str, str]:
    """The label pieces of one run's configuration (RunConfig kwargs or run.json config).

    A run.json written before the arm existed is the patched arm; allocator None is the
    kernel as packaged, SLUB on Debian 6.1 and 6.12.
    """
    parts = {
        "kernel": _slug(str(config.get("kernel", "6.1"))),
        "arm": str(config.get("arm") or "patched"),
        "allocator": str(config.get("allocator") or "slub"),
        "server": str(config.get("server", "?")),
    }
    for key in EXTRA_LABEL_KEYS:
        parts[key] = _slug(_fmt_extra(key, config.get(key)))
    if parts["server"] != "nbd-serve":
        parts["server_sched_policy"] = ""  # only nbd-serve takes the flag: not a difference
    return parts


def varying_keys(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The extra label keys whose value differs between ``configs``."""
    all_parts = [label_parts(c) for c in configs]
    return [k for k in EXTRA_LABEL_KEYS if len({p[k] for p in all_parts if p[k]}) > 1]


def label(config: Mapping[str, Any], varying: Sequence[str] = ()) -> str:
    """``KERNEL-ARM-ALLOCATOR-SERVER`` plus the ``varying`` extras, e.g.
    ``6.1-vanilla-slab-nbd-serve`` or ``6.1-patched-slub-nbd-serve-256M``."""
    parts = label_parts(config)
    return "-".join([parts[k] for k in LABEL_KEYS] + [parts[k] for k in varying if parts[k]])


def plan_runs(matrix: Matrix) -> list[PlannedRun]:
    """Every run of the matrix, interleaved: round r holds repeat r of each cell."""
    cells = matrix.cells
    varying = varying_keys([c.settings for c in cells])
    labels = [label(c.settings, varying) for c in cells]
    if len(set(labels)) != len(labels):  # pragma: no cover - varying keys tell cells apart
        raise MatrixError("two cells have the same label; make them differ in a label key")
    rounds = max(c.repeats for c in cells)
    order = [
        (cell, lab, rep)
        for rep in range(1, rounds + 1)
        for cell, lab in zip(cells, labels, strict=True)
        if rep <= cell.repeats
    ]
    width = max(2, len(str(len(order))))
    return [
        PlannedRun(index=i, id=f"r{i + 1:0{width}d}-{lab}-rep{rep}", label=lab, rep=rep, cell=cell)
        for i, (cell, lab, rep) in enumerate(order)
    ]


def parse_shard(text: str) -> tuple[int, int]:
    """``K/N`` -> (K, N) with 1 <= K <= N.

    Raises:
        MatrixError: not of that form.
    """
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise MatrixError(f"--shard must look like K/N (e.g. 1/3), got {text!r}")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= k <= n:
        raise MatrixError(f"--shard K/N needs 1 <= K <= N, got {text!r}")
    return k, n


def select_runs(
    runs: Sequence[PlannedRun],
    *,
    shard: tuple[int, int] | None = None,
    only: Sequence[str] = (),
) -> list[PlannedRun]:
    """The runs this invocation owns: shard ``K/N`` keeps index i with i % N == K-1;
    ``only`` keeps runs whose id or label is listed.

    Raises:
        MatrixError: an ``only`` entry that names no run.
    """
    chosen = list(runs)
    if only:
        wanted = set(only)
        known = {r.id for r in runs} | {r.label for r in runs}
        unknown = sorted(wanted - known)
        if unknown:
            raise MatrixError(
                f"--only: no run or cell is called {', '.join(unknown)}; see the ids with --dry-run"
            )
        chosen = [r for r in chosen if r.id in wanted or r.label in wanted]
    if shard is not None:
        k, n = shard
        chosen = [r for r in chosen if r.index % n == k - 1]
    return chosen


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


# ---------------------------------------------------------------------------- estimates

#: Model when nothing is measured yet: boot and setup, then this many MiB of page
#: operations per second (TCG on a loaded 2-core host moves 10-50; KVM far more).
MODEL_BOOT_S = 45.0
MODEL_MIB_PER_S = 12.0


def model_seconds(cfg: RunConfig) -> float:
    """A run's expected duration from its size alone (no measurement)."""
    work = MODEL_BOOT_S + cfg.passes * cfg.workload_bytes / MIB / MODEL_MIB_PER_S
    return min(work, cfg.effective_timeout_s + MODEL_BOOT_S)


@dataclass(slots=True)
class Estimator:
    """Seconds per run: the mean measured duration of the same cell when there is one,
    else the size model scaled by how measured runs compared with it."""

    measured: dict[str, list[float]] = field(default_factory=dict)
    """label -> measured durations."""
    model_sum: float = 0.0
    measured_sum: float = 0.0

    def add(self, run: PlannedRun, seconds: float) -> None:
        self.measured.setdefault(run.label, []).append(seconds)
        self.model_sum += model_seconds(run.config(Path("/")))
        self.measured_sum += seconds

    def seconds(self, run: PlannedRun) -> float:
        same = self.measured.get(run.label)
        if same:
            return sum(same) / len(same)
        scale = self.measured_sum / self.model_sum if self.model_sum > 0 else 1.0
        return model_seconds(run.config(Path("/"))) * scale

    def total(self, runs: Sequence[PlannedRun]) -> float:
        return sum(self.seconds(r) for r in runs)

    @property
    def basis(self) -> str:
        n = sum(len(v) for v in self.measured.values())
        if not n:
            return "size model (nothing measured yet)"
        return f"{n} measured run(s)"


def describe_run(run: PlannedRun) -> str:
    s = run.cell.settings
    amount = f"ratio {s['ratio']:g}" if s.get("ratio") else f"total {s['total_bytes'] // MIB}M"
    return (
        f"{s['memory_mib']}M {s['cpus']} vCPU, {s['workers']} workers, {amount}, "
        f"loops {s['loops']}, swap {s.get('swap', 'device')}, "
        f"lockup after {s['lockup_after_s']:g}s"
    )


# ---------------------------------------------------------------------------- the store


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


def extends(index: Mapping[str, Any], plan: Sequence[PlannedRun], store: Path) -> bool:
    """Whether ``plan`` keeps every run the store has begun, by id and configuration,
    so that resuming with it only adds runs (a matrix file edited to more repeats)."""
    planned = {run.id: run for run in plan}
    for entry in index.get("runs", []):
        if entry.get("status") == "pending":
            continue
        run = planned.get(entry.get("id"))
        if run is None or run.config(store).to_json() != entry.get("config"):
            return False
    return True


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


def estimator_from_store(runs: Sequence[PlannedRun], store: Path) -> Estimator:
    est = Estimator()
    for run in runs:
        rj = read_run_json(store / run.id / "run.json")
        total = (rj.get("timings") or {}).get("total_s") if rj and is_finished(rj) else None
        if isinstance(total, int | float):
            est.add(run, float(total))
    return est


# ---------------------------------------------------------------------------- the runner

RunFunc = Callable[[RunConfig, experiment.Emit], dict[str, Any]]


@dataclass(slots=True)
class MatrixResult:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    outcomes: dict[str, str | None] = field(default_factory=dict)
    interrupted: bool = False


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (timeout, CI, schedulers, Ansible) stops a run the way Ctrl-C does, so the
    current run still stops QEMU and the server and writes run.json."""
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _move_to_attic(store: Path, run_id: str) -> None:
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


def _run_emit(
    say: experiment.Emit, prefix: str, expected_end: float, remaining_after: float
) -> experiment.Emit:
    """The current run's progress lines, tagged with ``[k/n]`` and the matrix's ETA."""

    def emit(line: str) -> None:
        left = max(0.0, expected_end - time.monotonic()) + remaining_after
        say(f"{prefix} {line}  [matrix ETA {format_duration(left)}]")

    return emit


def run_matrix(
    matrix: Matrix,
    store: Path,
    *,
    source: Path | None = None,
    resume: bool = False,
    retry_errors: bool = False,
    shard: tuple[int, int] | None = None,
    only: Sequence[str] = (),
    emit: experiment.Emit | None = None,
    run_one: RunFunc | None = None,
) -> MatrixResult:
    """Run the selected runs of ``matrix`` into ``store``.

    ``retry_errors`` also reruns runs whose outcome is ``error`` (the harness failed,
    e.g. an image that could not be built, since fixed).  ``run_one`` defaults to
    :func:`vm.run.experiment.run_experiment`.  A KeyboardInterrupt (SIGINT, or SIGTERM under
    :func:`sigterm_as_interrupt`) between runs, or a run that comes back ``interrupted``,
    stops the matrix; the index is written either way.

    Raises:
        MatrixError: the store does not fit (see :func:`prepare_store`) or a bad ``only``.
    """
    say = emit or (lambda _m: None)
    runner: RunFunc = run_one or experiment.run_experiment
    plan = plan_runs(matrix)
    chosen = select_runs(plan, shard=shard, only=only)
    prepare_store(matrix, store, resume=resume, plan=plan)
    result = MatrixResult()
    todo: list[PlannedRun] = []
    for run in chosen:
        rj = read_run_json(store / run.id / "run.json")
        if is_finished(rj) and not (retry_errors and rj is not None and rj["outcome"] == "error"):
            result.skipped.append(run.id)
        else:
            todo.append(run)
    est = estimator_from_store(plan, store)
    write_index(matrix, plan, store, source)
    if result.skipped:
        say(f"matrix: {len(result.skipped)} run(s) already finished, skipped")
    say(
        f"matrix {matrix.name}: {len(todo)} run(s) to do of {len(plan)} in the plan, "
        f"estimated {format_duration(est.total(todo))} ({est.basis}); store {store}"
    )
    try:
        for k, run in enumerate(todo, start=1):
            _move_to_attic(store, run.id)
            remaining_after = est.total(todo[k:])
            this_est = est.seconds(run)
            t0 = time.monotonic()
            prefix = f"[{k}/{len(todo)}]"
            say(
                f"{prefix} run {k} of {len(todo)}: {run.id} ({describe_run(run)}); "
                f"matrix ETA {format_duration(this_est + remaining_after)}"
            )

            cfg = run.config(store)
            cfg.out.mkdir(parents=True, exist_ok=True)
            write_index(matrix, plan, store, source)  # this run shows as "started"
            rj = runner(cfg, _run_emit(say, prefix, t0 + this_est, remaining_after))
            seconds = time.monotonic() - t0
            result.outcomes[run.id] = rj.get("outcome")
            write_index(matrix, plan, store, source)
            if rj.get("interrupted"):
                result.interrupted = True
                say(f"{prefix} {run.id} interrupted; stopping the matrix (index written)")
                break
            result.ran.append(run.id)
            est.add(run, float((rj.get("timings") or {}).get("total_s") or seconds))
            say(
                f"{prefix} done: {run.id}: {rj.get('outcome')} in {format_duration(seconds)}; "
                f"{len(todo) - k} left, matrix ETA {format_duration(est.total(todo[k:]))}"
            )
    except KeyboardInterrupt:
        result.interrupted = True
        say("matrix: interrupted between runs; index written")
    finally:
        write_index(matrix, plan, store, source)
    return result


def dry_run_lines(matrix: Matrix, store: Path | None, selected: Sequence[PlannedRun]) -> list[str]:
    """What ``--dry-run`` prints: one line per run and the estimated total."""
    plan = plan_runs(matrix)
    est = estimator_from_store(plan, store) if store is not None and store.is_dir() else Estimator()
    lines = [f"matrix {matrix.name}: {len(selected)} of {len(plan)} run(s)"]
    todo = []
    for run in selected:
        rj = read_run_json(store / run.id / "run.json") if store is not None else None
        done = is_finished(rj)
        if not done:
            todo.append(run)
        mark = "finished" if done else format_duration(est.seconds(run))
        lines.append(f"  {run.id:<48} {describe_run(run)}  ~{mark}")
    lines.append(
        f"estimated time: {format_duration(est.total(todo))} for {len(todo)} run(s) ({est.basis})"
    )
    return lines
