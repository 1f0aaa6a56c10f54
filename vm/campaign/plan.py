"""A matrix file and its plan: TOML -> cells -> interleaved runs with ids, labels, estimates.

Theory of operation
-------------------
A matrix file names *cells* (one combination of kernel, arm, allocator, server, guest size
and workload) and how many times to repeat each.  Planning is pure: :func:`load_matrix`
parses the TOML into :class:`Cell` objects, :func:`plan_runs` expands them into
:class:`PlannedRun` objects in interleaved order (every cell's first repeat, then every
cell's second, ...) so that drift on a shared machine (another job starting, thermal
limits) spreads over all cells instead of biasing the last one.

Run ids are ``rNN-KERNEL-ARM-ALLOCATOR-SERVER[-extras]-repR``: ``NN`` is the position in the
full plan (so ``ls`` shows the run order and shards of the same plan agree on it), the
middle part is the cell's label (the same label the report groups by) and ``R`` the
repeat.  Ids depend only on the matrix file, so ``--resume`` finds the same directories.

Running the plan is :mod:`vm.campaign.matrix`; the store it writes is :mod:`vm.campaign.store`.

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

import hashlib
import itertools
import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peers import servers
from stress.sizes import SizeError, parse_size
from vm.run.config import RunConfig

MIB = 1024 * 1024

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
    "min_free_kbytes",
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


def parse_matrix(
    text: str, name: str = "matrix", *, extra_tables: frozenset[str] = frozenset()
) -> Matrix:
    """Parse a matrix file's text; ``extra_tables`` are top-level tables another reader
    owns (the boundary's ``[boundary]``) and this one skips.

    Raises:
        MatrixError: invalid TOML, an unknown key, a bad value, a duplicate cell or a
            cell whose settings RunConfig rejects.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MatrixError(f"{name}: not valid TOML: {exc}") from exc
    known = {"matrix", "defaults", "axes", "cells", "arms"}
    unknown = sorted(set(doc) - known - extra_tables)
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
    if key == "min_free_kbytes":
        return "mf-auto" if value is None else f"mf{value}"  # None: the kernel's formula
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


_RUN_ID = re.compile(r"r\d+-(?P<label>.+)-rep(?P<rep>\d+)")


def run_id_parts(run_id: str) -> tuple[str, int] | None:
    """``(label, repeat)`` of a run id as :func:`plan_runs` writes it
    (``rNN-LABEL-repR``), or None for another name."""
    m = _RUN_ID.fullmatch(run_id)
    return None if m is None else (m["label"], int(m["rep"]))


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


# ---------------------------------------------------------------------------- estimates

#: Model when nothing is measured yet: boot and setup, then this many MiB of page
#: operations per second (TCG on a loaded 2-core host moves 10-50; KVM far more).
MODEL_BOOT_S = 45.0
MODEL_MIB_PER_S = 12.0


def model_seconds(cfg: RunConfig) -> float:
    """A run's expected duration from its size alone (no measurement)."""
    work = MODEL_BOOT_S + cfg.passes * cfg.workload_bytes / MIB / MODEL_MIB_PER_S
    return min(work, cfg.effective_timeout_s + MODEL_BOOT_S)


def run_seconds(timings: Mapping[str, Any]) -> float | None:
    """A finished run's own duration for estimates: its total less the guest image build,
    a one-off the cache saves every later run (the first SLAB run of a matrix builds the
    kernel for 20-60 min; counting that made every later SLAB run look as long)."""
    total = timings.get("total_s")
    if not isinstance(total, int | float):
        return None
    image = timings.get("image_s")
    return float(total) - (float(image) if isinstance(image, int | float) else 0.0)


def model_seconds_of(config: Mapping[str, Any]) -> float:
    """:func:`model_seconds` of a run.json ``config`` (what :meth:`RunConfig.to_json` wrote)."""
    memory = num_or(config.get("memory_mib"), 128.0)
    total = config.get("total_bytes")
    ratio = config.get("ratio")
    if isinstance(total, int | float) and not isinstance(total, bool):
        work = float(total)
    else:
        work = num_or(ratio, 4.0) * memory * MIB
    passes = 1 + 2 * num_or(config.get("loops"), 1.0)
    seconds = MODEL_BOOT_S + passes * work / MIB / MODEL_MIB_PER_S
    timeout = config.get("effective_timeout_s")
    if isinstance(timeout, int | float) and not isinstance(timeout, bool):
        seconds = min(seconds, float(timeout) + MODEL_BOOT_S)
    return seconds


def num_or(value: Any, default: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return float(value)


def cell_keys(config: Mapping[str, Any]) -> tuple[tuple[Any, ...], ...]:
    """How alike two runs are, for estimates, from the closest to the loosest match.

    0. the same cell: kernel, arm, allocator, guest, workload, swap, cutoff, min_free;
    1. the same but for the amount of work (ratio or total, min_free): the boundary's
       other settings of the same arm;
    2. the same kernel, arm and allocator with the same lockup cutoff (a vanilla run ends
       at the cutoff, so a run with another cutoff says little about it);
    3. the same kernel and arm.
    ``6.1`` with allocator ``slab`` and the ``6.1-slab`` build are one kernel here.
    Looser matches are scaled by the size model (:func:`model_seconds_of`)."""
    kernel = str(config.get("kernel", "6.1"))
    arm = str(config.get("arm") or "patched")
    allocator = str(config.get("allocator") or "slub")
    if allocator == "slab" and kernel.endswith("-slab"):
        kernel = kernel.removesuffix("-slab")  # 6.1 --allocator slab is the 6.1-slab build
    cutoff = config.get("lockup_after_s")
    shape = (
        kernel,
        arm,
        allocator,
        config.get("memory_mib"),
        config.get("cpus"),
        config.get("workers"),
        config.get("loops"),
        config.get("swap"),
        cutoff,
        config.get("early_confirm", True),
    )
    return (
        (*shape, config.get("ratio"), config.get("total_bytes"), config.get("min_free_kbytes")),
        shape,
        (kernel, arm, allocator, cutoff),
        (kernel, arm),
    )


@dataclass(frozen=True, slots=True)
class Measured:
    """One measured run's duration, with what it is compared by."""

    keys: tuple[tuple[Any, ...], ...]
    seconds: float
    model: float
    committed: bool
    """From a committed archive (docs/results), not from this store."""


@dataclass(slots=True)
class Estimator:
    """Seconds per run from measured runs, the store's and the committed archives' alike:
    the mean of the closest match of :func:`cell_keys` (each measured duration scaled by the
    size model from its run to this one), else the size model scaled by how every measured
    run compared with it."""

    samples: list[Measured] = field(default_factory=list)

    def add(self, run: PlannedRun, seconds: float) -> None:
        self.add_config(run.config(Path("/")).to_json(), seconds)

    def add_config(
        self, config: Mapping[str, Any], seconds: float, *, committed: bool = False
    ) -> None:
        """A measured run by its run.json ``config``."""
        self.samples.append(
            Measured(cell_keys(config), seconds, model_seconds_of(config), committed)
        )

    def seconds(self, run: PlannedRun) -> float:
        return self.seconds_of(run.config(Path("/")).to_json())

    def seconds_of(self, config: Mapping[str, Any]) -> float:
        keys = cell_keys(config)
        model = model_seconds_of(config)
        for level, key in enumerate(keys):
            same = [m for m in self.samples if m.keys[level] == key]
            if same:
                if level == 0:
                    return sum(m.seconds for m in same) / len(same)
                return sum(m.seconds * model / m.model for m in same) / len(same)
        model_sum = sum(m.model for m in self.samples)
        scale = sum(m.seconds for m in self.samples) / model_sum if model_sum > 0 else 1.0
        return model * scale

    def total(self, runs: Sequence[PlannedRun]) -> float:
        return sum(self.seconds(r) for r in runs)

    @property
    def basis(self) -> str:
        n = len(self.samples)
        if not n:
            return "size model (nothing measured yet)"
        committed = sum(1 for m in self.samples if m.committed)
        if not committed:
            return f"{n} measured run(s)"
        return f"{n} measured run(s), {committed} of them from committed results"


def describe_run(run: PlannedRun) -> str:
    s = run.cell.settings
    amount = f"ratio {s['ratio']:g}" if s.get("ratio") else f"total {s['total_bytes'] // MIB}M"
    return (
        f"{s['memory_mib']}M {s['cpus']} vCPU, {s['workers']} workers, {amount}, "
        f"loops {s['loops']}, swap {s.get('swap', 'device')}, "
        f"lockup after {s['lockup_after_s']:g}s"
    )
