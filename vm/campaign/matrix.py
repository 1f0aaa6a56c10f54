"""``swapnbd matrix``: a TOML file of cells -> interleaved runs in a resumable store.

Theory of operation
-------------------
:mod:`vm.campaign.plan` turns the matrix file into the plan (runs in interleaved order,
with ids and estimates); :mod:`vm.campaign.store` keeps the store (run directories,
``index.json``, what is finished).  This module runs the plan: it selects this
invocation's runs (a shard, ``--only``), skips the finished ones, runs the rest one after
the other through :func:`vm.run.experiment.run_experiment`, rewrites the index around each
run and prints progress with the matrix's ETA.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from vm.campaign.plan import (
    Estimator,
    Matrix,
    PlannedRun,
    describe_run,
    plan_runs,
    run_seconds,
    select_runs,
)
from vm.campaign.store import (
    estimator_from_store,
    is_finished,
    keep_store_ids,
    move_to_attic,
    prepare_store,
    read_run_json,
    write_index,
)
from vm.image.progress import format_duration
from vm.run import experiment
from vm.run.config import RunConfig

RunFunc = Callable[[RunConfig, experiment.Emit], dict[str, Any]]


@dataclass(slots=True)
class MatrixResult:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    outcomes: dict[str, str | None] = field(default_factory=dict)
    interrupted: bool = False
    exhausted: str | None = None
    """A boundary that stopped because a setting used up its runs (what and why)."""


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


def _run_emit(
    say: experiment.Emit,
    prefix: str,
    expected_end: float,
    remaining_after: float,
    what: str = "matrix",
) -> experiment.Emit:
    """The current run's progress lines, tagged with ``[k/n]`` and the matrix's ETA."""

    def emit(line: str) -> None:
        left = max(0.0, expected_end - time.monotonic()) + remaining_after
        say(f"{prefix} {line}  [{what} ETA {format_duration(left)}]")

    return emit


@dataclass(slots=True)
class Stepper:
    """Runs one planned run after another into a store, with the bookkeeping every runner
    shares (the matrix here, the boundary in :mod:`vm.campaign.boundary`): the leftovers
    of an earlier try go to the attic, the index is rewritten before and after the run,
    the outcome is recorded, the estimator learns the run's duration and the progress
    lines carry ``[k/n]`` and the ETA."""

    matrix: Matrix
    plan: Sequence[PlannedRun]
    store: Path
    source: Path | None
    runner: RunFunc
    est: Estimator
    say: experiment.Emit
    result: MatrixResult
    eta_label: str = "matrix"
    """What the ETA in each progress line is of (``matrix``, ``boundary``)."""

    def write_index(self) -> None:
        write_index(self.matrix, self.plan, self.store, self.source)

    def step(self, run: PlannedRun, prefix: str, remaining_after: float, what: str) -> bool:
        """Run ``run``; False when it came back interrupted (the caller stops)."""
        move_to_attic(self.store, run.id)
        this_est = self.est.seconds(run)
        t0 = time.monotonic()
        self.say(
            f"{prefix} {what}: {run.id} ({describe_run(run)}); "
            f"ETA {format_duration(this_est + remaining_after)}"
        )
        cfg = run.config(self.store)
        cfg.out.mkdir(parents=True, exist_ok=True)
        self.write_index()  # this run shows as "started"
        emit = _run_emit(self.say, prefix, t0 + this_est, remaining_after, self.eta_label)
        rj = self.runner(cfg, emit)
        seconds = time.monotonic() - t0
        self.result.outcomes[run.id] = rj.get("outcome")
        self.write_index()
        if rj.get("interrupted"):
            self.result.interrupted = True
            self.say(f"{prefix} {run.id} interrupted; stopping (index written)")
            return False
        self.result.ran.append(run.id)
        own = run_seconds(rj.get("timings") or {})
        self.est.add(run, own if own is not None else seconds)
        self.say(f"{prefix} done: {run.id}: {rj.get('outcome')} in {format_duration(seconds)}")
        return True


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
    history: Sequence[Path] = (),
) -> MatrixResult:
    """Run the selected runs of ``matrix`` into ``store``.

    ``retry_errors`` also reruns runs whose outcome is ``error`` (the harness failed,
    e.g. an image that could not be built, since fixed).  ``run_one`` defaults to
    :func:`vm.run.experiment.run_experiment`.  ``history``: committed runs archives the
    estimates learn from too.  A KeyboardInterrupt (SIGINT, or SIGTERM under
    :func:`sigterm_as_interrupt`) between runs, or a run that comes back ``interrupted``,
    stops the matrix; the index is written either way.

    Raises:
        MatrixError: the store does not fit (see :func:`prepare_store`) or a bad ``only``.
    """
    say = emit or (lambda _m: None)
    runner: RunFunc = run_one or experiment.run_experiment
    plan = keep_store_ids(plan_runs(matrix), store)
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
    est = estimator_from_store(plan, store, history)
    stepper = Stepper(matrix, plan, store, source, runner, est, say, result)
    stepper.write_index()
    if result.skipped:
        say(f"matrix: {len(result.skipped)} run(s) already finished, skipped")
    say(
        f"matrix {matrix.name}: {len(todo)} run(s) to do of {len(plan)} in the plan, "
        f"estimated {format_duration(est.total(todo))} ({est.basis}); store {store}"
    )
    try:
        for k, run in enumerate(todo, start=1):
            prefix = f"[{k}/{len(todo)}]"
            if not stepper.step(run, prefix, est.total(todo[k:]), f"run {k} of {len(todo)}"):
                break
            say(f"{prefix} {len(todo) - k} left, matrix ETA {format_duration(est.total(todo[k:]))}")
    except KeyboardInterrupt:
        result.interrupted = True
        say("matrix: interrupted between runs; index written")
    finally:
        stepper.write_index()
    return result


def dry_run_lines(
    matrix: Matrix,
    store: Path | None,
    plan: Sequence[PlannedRun],
    selected: Sequence[PlannedRun],
    history: Sequence[Path] = (),
) -> list[str]:
    """What ``--dry-run`` prints: one line per run and the estimated total (learnt from
    the store's finished runs and the ``history`` archives). ``plan`` is the whole plan
    with the store's ids kept (:func:`vm.campaign.store.keep_store_ids`), ``selected``
    the runs of it to list."""
    est = estimator_from_store(plan, store, history)
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
