"""``swapnbd boundary``: where lockups begin, per arm, sampled adaptively into a matrix store.

Theory of operation
-------------------
A boundary file is a matrix file (``[matrix]``, ``[defaults]``, ``[axes]``/``[[cells]]``)
whose cells are the *arms*, plus a ``[boundary]`` table with the pressure grid and the
stopping rule::

    [boundary]
    ratios = [1.25, 1.5, 2.0, 2.5, 3.0, 4.0]   # overcommit ratios (axis 1)
    min_free_kbytes = ["auto", 8192]            # axis 2 ("auto": the kernel's formula)
    level = 0.5                                 # decide each setting against this P(lockup)
    confidence = 0.95                           # of the Wilson interval
    max_runs = 10                               # trials per setting at most
    spare_runs = 2                              # extra runs per setting for harness errors
    max_total = 200                             # trials in all (optional)

:func:`parse_boundary` expands it into an ordinary :class:`vm.campaign.plan.Matrix`: one
cell per arm x ``min_free_kbytes`` x ratio, each with ``max_runs + spare_runs`` repeats.
That grid matrix gives the runs their ids, the store its ``index.json`` (runs never
chosen stay ``pending``), and ``--resume`` its check that the store is this boundary's;
the runs themselves go through the matrix runner's :class:`vm.campaign.matrix.Stepper`.
What differs is only *which* run is next: :mod:`vm.campaign.adaptive` decides, from the
trials in the store, and this module takes the lowest repeat of that cell not yet
finished.  A run that ended in ``error`` is no trial (it uses one of the spare runs), and
an interrupted one is rerun in place, as in a matrix.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vm.campaign import adaptive
from vm.campaign.adaptive import Choice, Curve, Policy, Trial
from vm.campaign.matrix import MatrixResult, RunFunc, Stepper
from vm.campaign.plan import (
    Cell,
    Matrix,
    MatrixError,
    PlannedRun,
    label,
    parse_matrix,
    plan_runs,
    varying_keys,
)
from vm.campaign.store import (
    estimator_from_store,
    is_finished,
    prepare_store,
    read_run_json,
)
from vm.campaign.wilson import z_for
from vm.image.progress import format_duration
from vm.run import experiment

#: What the boundary sets itself, so an arm may not.
SET_BY_BOUNDARY = ("ratio", "total", "min_free_kbytes")
BOUNDARY_KEYS = (
    "ratios",
    "min_free_kbytes",
    "level",
    "confidence",
    "max_runs",
    "spare_runs",
    "max_total",
)
#: The file the runner leaves in the store: every setting's trials and interval.
SUMMARY_NAME = "boundary.json"


@dataclass(frozen=True, slots=True)
class Boundary:
    matrix: Matrix
    """The grid: one cell per arm x min_free_kbytes x ratio."""
    curves: tuple[Curve, ...]
    policy: Policy
    spare_runs: int
    setting_of: Mapping[str, tuple[str, float]]
    """A grid cell's ``source`` -> (curve name, ratio)."""
    confidence: float


def _number(value: Any, where: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo < value < hi:
        raise MatrixError(f"{where} must be a number in ({lo:g}, {hi:g}), got {value!r}")
    return float(value)


def _whole(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MatrixError(f"{where} must be a whole number >= {minimum}, got {value!r}")
    return value


def parse_boundary(text: str, name: str = "boundary") -> Boundary:
    """Parse a boundary file's text.

    Raises:
        MatrixError: what :func:`vm.campaign.plan.parse_matrix` refuses, no or a bad
            ``[boundary]`` table, or an arm that sets what the boundary sets.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        doc = {}  # parse_matrix says what is wrong with it
    for section in ("defaults", "axes"):
        part = doc.get(section) or {}
        for key in SET_BY_BOUNDARY:
            if isinstance(part, dict) and key in part:
                raise MatrixError(
                    f"{name}: {section}.{key}: the boundary sets it; list the values in "
                    "[boundary] ratios / min_free_kbytes instead"
                )
    for section in ("cells", "arms"):
        entries = doc.get(section) or []
        for i, entry in enumerate(entries if isinstance(entries, list) else []):
            for key in SET_BY_BOUNDARY:
                if isinstance(entry, dict) and key in entry:
                    raise MatrixError(
                        f"{name}: {section}[{i}].{key}: the boundary sets it; list the values "
                        "in [boundary] ratios / min_free_kbytes instead"
                    )
    arms = parse_matrix(text, name, extra_tables=frozenset({"boundary"}))
    table = doc.get("boundary")
    if not isinstance(table, dict):
        raise MatrixError(f"{name}: a boundary file needs a [boundary] table with ratios = [...]")
    unknown = sorted(set(table) - set(BOUNDARY_KEYS))
    if unknown:
        raise MatrixError(
            f"{name}: unknown key(s) in [boundary]: {', '.join(unknown)}; "
            f"expected {', '.join(BOUNDARY_KEYS)}"
        )
    ratios_raw = table.get("ratios")
    if not isinstance(ratios_raw, list) or not ratios_raw:
        raise MatrixError(f"{name}: boundary.ratios must be a non-empty list such as [1.5, 2, 4]")
    ratios = [_number(r, "boundary.ratios[]", 0, 64.000001) for r in ratios_raw]
    if ratios != sorted(set(ratios)):
        raise MatrixError(f"{name}: boundary.ratios must be distinct and ascending, got {ratios}")
    mf_raw = table.get("min_free_kbytes", ["auto"])
    if not isinstance(mf_raw, list) or not mf_raw:
        raise MatrixError(f'{name}: boundary.min_free_kbytes must be a list such as ["auto", 8192]')
    min_frees: list[int | None] = []
    for value in mf_raw:
        if value == "auto":
            min_frees.append(None)
        else:
            min_frees.append(_whole(value, "boundary.min_free_kbytes[]", 128))
    if len(set(min_frees)) != len(min_frees):
        raise MatrixError(f"{name}: boundary.min_free_kbytes lists a value twice")
    confidence = _number(table.get("confidence", 0.95), "boundary.confidence", 0, 1)
    try:
        z = z_for(confidence)
        policy = Policy(
            level=_number(table.get("level", 0.5), "boundary.level", 0, 1),
            z=z,
            max_runs=_whole(table.get("max_runs", 10), "boundary.max_runs", 1),
            max_total=(
                None
                if table.get("max_total") is None
                else _whole(table.get("max_total"), "boundary.max_total", 1)
            ),
        )
    except ValueError as exc:
        if isinstance(exc, MatrixError):
            raise
        raise MatrixError(f"{name}: boundary.{exc}") from exc
    spare = _whole(table.get("spare_runs", 2), "boundary.spare_runs", 0)

    grid: list[tuple[Cell, float]] = []
    for arm in arms.cells:
        for mf in min_frees:
            for ratio in ratios:
                settings = dict(arm.settings)
                settings.update(ratio=ratio, total_bytes=None, min_free_kbytes=mf)
                mf_text = "auto" if mf is None else str(mf)
                source = f"{arm.source} ratio={ratio:g} min_free_kbytes={mf_text}"
                cell = Cell(settings=settings, repeats=policy.max_runs + spare, source=source)
                try:
                    cell.config(Path("/nonexistent")).validate()
                except ValueError as exc:
                    raise MatrixError(f"{name}: {source}: {exc}") from exc
                grid.append((cell, ratio))
    varying = [k for k in varying_keys([c.settings for c, _ in grid]) if k != "ratio"]
    setting_of: dict[str, tuple[str, float]] = {}
    curve_ratios: dict[str, list[float]] = {}
    for cell, ratio in grid:
        curve = label(cell.settings, varying)
        setting_of[cell.source] = (curve, ratio)
        curve_ratios.setdefault(curve, []).append(ratio)
    matrix = Matrix(
        name=arms.name,
        description=arms.description,
        cells=tuple(c for c, _ in grid),
        text=text,
    )
    return Boundary(
        matrix=matrix,
        curves=tuple(Curve(n, tuple(rs)) for n, rs in curve_ratios.items()),
        policy=policy,
        spare_runs=spare,
        setting_of=setting_of,
        confidence=confidence,
    )


def load_boundary(path: Path) -> Boundary:
    try:
        text = path.read_text()
    except OSError as exc:
        raise MatrixError(f"cannot read the boundary file {path}: {exc.strerror}") from exc
    return parse_boundary(text, name=path.stem)


def select_curves(bnd: Boundary, only: Sequence[str] = ()) -> tuple[Curve, ...]:
    """The curves whose name contains one of ``only`` (``--curve``; every curve when
    empty), in file order.

    Curves are independent (each run is chosen from its own curve's trials), so a runner
    may spend its time on some of them first, the cheap vanilla arms say, and a later
    ``--resume`` without ``--curve`` goes on with the rest.

    Raises:
        MatrixError: a text that names no curve.
    """
    if not only:
        return bnd.curves
    names = ", ".join(c.name for c in bnd.curves)
    for text in only:
        if not any(text in c.name for c in bnd.curves):
            raise MatrixError(f"--curve {text!r} is in none of the curves' names: {names}")
    return tuple(c for c in bnd.curves if any(text in c.name for text in only))


def next_choice(bnd: Boundary, curves: Sequence[Curve], trials: Sequence[Trial]) -> Choice | None:
    """The policy's next run among ``curves``; ``max_total`` counts every trial."""
    if bnd.policy.max_total is not None and len(trials) >= bnd.policy.max_total:
        return None
    names = {c.name for c in curves}
    return adaptive.next_run(curves, [t for t in trials if t.curve in names], bnd.policy)


# ---------------------------------------------------------------------------- the store


def trials_in_store(
    bnd: Boundary, plan: Sequence[PlannedRun], store: Path | None
) -> tuple[list[Trial], int]:
    """The trials the store holds (finished runs that are not harness errors), in plan
    order, and how many harness errors it holds."""
    trials: list[Trial] = []
    errors = 0
    if store is None or not store.is_dir():
        return trials, errors
    for run in plan:
        rj = read_run_json(store / run.id / "run.json")
        if not is_finished(rj) or rj is None:
            continue
        if rj.get("outcome") == "error":
            errors += 1
            continue
        curve, ratio = bnd.setting_of[run.cell.source]
        trials.append(Trial(curve, ratio, rj.get("outcome") == "lockup"))
    return trials, errors


def pick_run(
    bnd: Boundary,
    plan: Sequence[PlannedRun],
    store: Path,
    choice: Choice,
    retry: frozenset[str] = frozenset(),
) -> PlannedRun | None:
    """The lowest repeat of the chosen setting's cell that is not finished (or is a
    harness error listed in ``retry``); None when every repeat is used up."""
    for run in plan:
        if bnd.setting_of[run.cell.source] != (choice.curve, choice.ratio):
            continue
        rj = read_run_json(store / run.id / "run.json")
        if not is_finished(rj) or run.id in retry:
            return run
    return None


def _errors_to_retry(plan: Sequence[PlannedRun], store: Path) -> set[str]:
    out = set()
    for run in plan:
        rj = read_run_json(store / run.id / "run.json")
        if rj is not None and is_finished(rj) and rj.get("outcome") == "error":
            out.add(run.id)
    return out


def summary(bnd: Boundary, trials: Sequence[Trial]) -> dict[str, Any]:
    """Every curve's settings as the policy sees them: trials, lockups, interval, state."""
    curves = []
    for curve in bnd.curves:
        counts = adaptive.tally(trials, curve.name)
        settings = []
        for ratio in curve.ratios:
            iv = adaptive.interval(counts, ratio, bnd.policy)
            settings.append(
                {
                    "ratio": ratio,
                    "lockups": iv.k,
                    "trials": iv.n,
                    "p": iv.p if iv.n else None,
                    "low": iv.low,
                    "high": iv.high,
                    "state": adaptive.state(counts, ratio, bnd.policy),
                }
            )
        curves.append(
            {
                "curve": curve.name,
                "next_ratio": adaptive.next_ratio(curve, counts, bnd.policy),
                "settings": settings,
            }
        )
    return {
        "schema": 1,
        "level": bnd.policy.level,
        "confidence": bnd.confidence,
        "max_runs": bnd.policy.max_runs,
        "max_total": bnd.policy.max_total,
        "trials": len(trials),
        "curves": curves,
    }


def _write_summary(store: Path, obj: Mapping[str, Any]) -> None:
    tmp = store / f".{SUMMARY_NAME}.tmp"
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(store / SUMMARY_NAME)


# ---------------------------------------------------------------------------- estimates


@dataclass(frozen=True, slots=True)
class Outlook:
    """What is left of one curve: runs likely (each remaining bisection step decided by
    runs that all go one way) and at most (every open setting to ``max_runs``)."""

    curve: str
    likely_runs: int
    max_runs: int
    seconds_per_run: float


def outlook(
    bnd: Boundary,
    plan: Sequence[PlannedRun],
    trials: Sequence[Trial],
    seconds: Callable[[PlannedRun], float],
    curves: Sequence[Curve] | None = None,
) -> list[Outlook]:
    """Per curve (of ``curves``; None: every curve), the runs still to come and a run's
    estimated seconds (``seconds`` maps a PlannedRun to its estimate: the matrix's
    :class:`Estimator`)."""
    out = []
    decide = adaptive.runs_to_decide(bnd.policy)
    for curve in bnd.curves if curves is None else curves:
        counts = adaptive.tally(trials, curve.name)
        nxt = adaptive.next_ratio(curve, counts, bnd.policy)
        if nxt is None:
            out.append(Outlook(curve.name, 0, 0, 0.0))
            continue
        lo, hi = adaptive.bracket(curve, counts, bnd.policy)
        open_ = [
            r for r in curve.ratios[lo + 1 : hi] if adaptive.state(counts, r, bnd.policy) == "open"
        ]
        started = counts.get(nxt, (0, 0))[1]
        steps = adaptive.remaining_steps(curve, counts, bnd.policy)
        likely = max(1, steps * decide - min(started, decide - 1))
        most = sum(bnd.policy.max_runs - counts.get(r, (0, 0))[1] for r in open_)
        rep = next(r for r in plan if bnd.setting_of[r.cell.source] == (curve.name, nxt))
        out.append(Outlook(curve.name, likely, most, float(seconds(rep))))
    return out


def _cap(runs: int, bnd: Boundary, done: int) -> int:
    if bnd.policy.max_total is None:
        return runs
    return min(runs, max(0, bnd.policy.max_total - done))


def dry_run_lines(
    bnd: Boundary, store: Path | None, history: Sequence[Path] = (), only: Sequence[str] = ()
) -> list[str]:
    """What ``swapnbd boundary --dry-run`` prints: each curve's settings so far, the next
    run, and the runs and time likely left and at most (of the curves ``only`` names,
    :func:`select_curves`)."""
    plan = plan_runs(bnd.matrix)
    est = estimator_from_store(plan, store, history)
    trials, errors = trials_in_store(bnd, plan, store)
    chosen = select_curves(bnd, only)
    lines = [
        f"boundary {bnd.matrix.name}: {len(bnd.curves)} curve(s) x "
        f"{len(bnd.curves[0].ratios)} ratio(s); decide at P(lockup) {bnd.policy.level:g} "
        f"({bnd.confidence:g} Wilson interval), at most {bnd.policy.max_runs} run(s) per "
        f"setting; {len(trials)} trial(s) so far"
        + (f", {errors} harness error(s) (no trials)" if errors else "")
    ]
    if len(chosen) < len(bnd.curves):
        lines.append(
            f"  --curve: {len(chosen)} of {len(bnd.curves)} curve(s) "
            "(resume without --curve for the rest)"
        )
    summ = summary(bnd, trials)
    looks = {o.curve: o for o in outlook(bnd, plan, trials, est.seconds, chosen)}
    likely_s = most_s = 0.0
    likely_n = most_n = 0
    for curve in summ["curves"]:
        if curve["curve"] not in looks:
            continue
        look = looks[curve["curve"]]
        cells = []
        for s in curve["settings"]:
            if s["trials"]:
                cells.append(
                    f"x{s['ratio']:g} {s['lockups']}/{s['trials']} "
                    f"[{s['low']:.2f}-{s['high']:.2f}] {s['state']}"
                )
        nxt = curve["next_ratio"]
        lines.append(
            f"  {curve['curve']:<44} "
            + ("; ".join(cells) if cells else "no trials yet")
            + (f"; next x{nxt:g}" if nxt is not None else "; done")
        )
        if nxt is not None:
            lines.append(
                f"  {'':<44} ~{format_duration(look.seconds_per_run)} a run, likely "
                f"{look.likely_runs} more, at most {look.max_runs}"
            )
        likely_n += look.likely_runs
        most_n += look.max_runs
        likely_s += look.likely_runs * look.seconds_per_run
        most_s += look.max_runs * look.seconds_per_run
    capped_likely = _cap(likely_n, bnd, len(trials))
    capped_most = _cap(most_n, bnd, len(trials))
    if likely_n:
        likely_s *= capped_likely / likely_n
    if most_n:
        most_s *= capped_most / most_n
    lines.append(
        f"estimated time: likely {format_duration(likely_s)} for {capped_likely} run(s), "
        f"at most {format_duration(most_s)} for {capped_most} run(s) ({est.basis})"
    )
    return lines


# ---------------------------------------------------------------------------- the runner


def run_boundary(
    bnd: Boundary,
    store: Path,
    *,
    source: Path | None = None,
    resume: bool = False,
    retry_errors: bool = False,
    emit: experiment.Emit | None = None,
    run_one: RunFunc | None = None,
    history: Sequence[Path] = (),
    only: Sequence[str] = (),
) -> MatrixResult:
    """Run the boundary into ``store`` until every curve is done (every curve ``only``
    names, :func:`select_curves`), the budget is spent, a setting's runs are used up by
    harness errors, or a signal stops it.

    ``retry_errors`` reruns, once each, the runs of a chosen setting that ended in a
    harness error.  SIGINT (or SIGTERM under
    :func:`vm.campaign.matrix.sigterm_as_interrupt`) stops it as it stops a matrix; the
    index and ``boundary.json`` are written either way.

    Raises:
        MatrixError: the store does not fit (:func:`vm.campaign.store.prepare_store`).
    """
    say = emit or (lambda _m: None)
    runner: RunFunc = run_one or experiment.run_experiment
    chosen = select_curves(bnd, only)
    plan = plan_runs(bnd.matrix)
    prepare_store(bnd.matrix, store, resume=resume, plan=plan)
    result = MatrixResult()
    est = estimator_from_store(plan, store, history)
    stepper = Stepper(bnd.matrix, plan, store, source, runner, est, say, result, "boundary")
    stepper.write_index()
    retry = _errors_to_retry(plan, store) if retry_errors else set()
    trials, _ = trials_in_store(bnd, plan, store)
    result.skipped = [r.id for r in plan if is_finished(read_run_json(store / r.id / "run.json"))]
    say(
        f"boundary {bnd.matrix.name}: {len(trials)} trial(s) in the store; "
        f"{len(bnd.curves)} curve(s)"
        + (f", running {len(chosen)} (--curve)" if len(chosen) < len(bnd.curves) else "")
        + f"; store {store}"
    )
    k = 0
    try:
        while True:
            trials, _ = trials_in_store(bnd, plan, store)
            _write_summary(store, summary(bnd, trials))
            choice = next_choice(bnd, chosen, trials)
            if choice is None:
                rest = (
                    "; the other curves wait for a --resume without --curve"
                    if len(chosen) < len(bnd.curves)
                    else ""
                )
                say(f"boundary {bnd.matrix.name}: done after {len(trials)} trial(s){rest}")
                break
            run = pick_run(bnd, plan, store, choice, frozenset(retry))
            if run is None:
                result.exhausted = (
                    f"{choice.curve} at ratio {choice.ratio:g}: all "
                    f"{bnd.policy.max_runs + bnd.spare_runs} runs are used up, harness errors "
                    "among them; fix the harness and resume with --retry-errors"
                )
                say(f"boundary: stopped: {result.exhausted}")
                break
            retry.discard(run.id)
            k += 1
            left = sum(
                o.likely_runs * o.seconds_per_run
                for o in outlook(bnd, plan, trials, est.seconds, chosen)
            )
            left_after = max(0.0, left - est.seconds(run))
            what = (
                f"boundary run {k}, {choice.curve} at ratio {choice.ratio:g} "
                f"(trial {choice.trial} there)"
            )
            if not stepper.step(run, f"[{k}]", left_after, what):
                break
    except KeyboardInterrupt:
        result.interrupted = True
        say("boundary: interrupted between runs; index written")
    finally:
        stepper.write_index()
        trials, _ = trials_in_store(bnd, plan, store)
        _write_summary(store, summary(bnd, trials))
    return result
