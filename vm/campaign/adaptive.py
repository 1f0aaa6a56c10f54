"""Where to spend the next run of a boundary: the adaptive sampling policy (pure, no I/O).

Theory of operation
-------------------
A boundary has *curves*: one arm (kernel x allocator x vanilla/patched) at one
``min_free_kbytes``, over a grid of overcommit ratios.  Each ratio of a curve is a
*setting* with ``k`` lockups in ``n`` trials and a Wilson interval
(:mod:`vm.campaign.wilson`).  A setting is

- ``below``: the interval lies wholly under the decision level (it rarely locks up),
- ``above``: wholly over it (it usually locks up),
- ``exhausted``: ``max_runs`` trials and still straddling (P is near the level: the
  boundary itself), or
- ``open``: none of these; it needs more runs.

Lockups get likelier with pressure, so a curve is searched like a sorted array:
``lo`` is the highest ratio decided ``below`` under the lowest ratio decided ``above``
(``hi``).  The candidates are the ratios strictly between them that are not exhausted.
A candidate already sampled is finished first (its interval still straddles the level:
that is where the curve changes); otherwise the middle candidate is taken, which bisects
the gap between a setting that never locks and one that always does.  No candidates left
means the curve is done: the change lies between ``lo`` and ``hi``, on exhausted settings.
A decided ``below`` above ``hi`` (a non-monotone curve, or bad luck) is not sampled
again; the report shows it as it is.

Arms are interleaved as the matrix interleaves cells: the next run goes to the curve with
the fewest trials so far that is not done (file order breaks ties), so drift on a shared
machine spreads over every arm.  ``max_total`` caps the whole boundary.

Everything is a function of the trials so far, so ``--resume`` replays the store's
finished runs and continues exactly where the last invocation stopped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from vm.campaign.wilson import Z_95, Interval, wilson

State = Literal["below", "above", "exhausted", "open"]


@dataclass(frozen=True, slots=True)
class Policy:
    """When a setting is decided and how much a boundary may spend."""

    level: float = 0.5
    """The decision level: a setting is decided once its interval excludes this P(lockup)."""
    z: float = Z_95
    """Normal quantile of the interval (1.96: 95 %)."""
    max_runs: int = 10
    """Trials per setting before it counts as straddling the level for good."""
    max_total: int | None = None
    """Trials in the whole boundary (None: until every curve is done)."""

    def __post_init__(self) -> None:
        if not 0 < self.level < 1:
            raise ValueError(f"level must be in (0, 1), got {self.level}")
        if self.max_runs < 1:
            raise ValueError(f"max_runs must be >= 1, got {self.max_runs}")
        if self.max_total is not None and self.max_total < 1:
            raise ValueError(f"max_total must be >= 1, got {self.max_total}")


@dataclass(frozen=True, slots=True)
class Curve:
    """One arm at one ``min_free_kbytes`` over a grid of ratios (ascending)."""

    name: str
    ratios: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.ratios or list(self.ratios) != sorted(set(self.ratios)):
            raise ValueError(f"{self.name}: ratios must be distinct and ascending")


@dataclass(frozen=True, slots=True)
class Trial:
    """One finished run that counts: a lockup or not."""

    curve: str
    ratio: float
    locked: bool


@dataclass(frozen=True, slots=True)
class Choice:
    """The next run: which curve, at which ratio, as its how-manieth trial there."""

    curve: str
    ratio: float
    trial: int
    """1-based: the trial number this run will be at its setting."""


Counts = Mapping[float, tuple[int, int]]
"""ratio -> (lockups, trials)."""


def tally(trials: Sequence[Trial], curve: str) -> dict[float, tuple[int, int]]:
    """(lockups, trials) per ratio of one curve."""
    out: dict[float, tuple[int, int]] = {}
    for t in trials:
        if t.curve != curve:
            continue
        k, n = out.get(t.ratio, (0, 0))
        out[t.ratio] = (k + int(t.locked), n + 1)
    return out


def interval(counts: Counts, ratio: float, policy: Policy) -> Interval:
    k, n = counts.get(ratio, (0, 0))
    return wilson(k, n, policy.z)


def state(counts: Counts, ratio: float, policy: Policy) -> State:
    """What is known of one setting (module docstring)."""
    iv = interval(counts, ratio, policy)
    if iv.n and iv.high < policy.level:
        return "below"
    if iv.n and iv.low > policy.level:
        return "above"
    if iv.n >= policy.max_runs:
        return "exhausted"
    return "open"


def bracket(curve: Curve, counts: Counts, policy: Policy) -> tuple[int, int]:
    """(lo, hi): indices of the highest ``below`` under the lowest ``above``; -1 and
    ``len(ratios)`` when there is none."""
    states = [state(counts, r, policy) for r in curve.ratios]
    hi = next((i for i, s in enumerate(states) if s == "above"), len(states))
    lo = max((i for i, s in enumerate(states[:hi]) if s == "below"), default=-1)
    return lo, hi


def next_ratio(curve: Curve, counts: Counts, policy: Policy) -> float | None:
    """The ratio of ``curve`` to run next, or None when the curve is done."""
    lo, hi = bracket(curve, counts, policy)
    candidates = [i for i in range(lo + 1, hi) if state(counts, curve.ratios[i], policy) == "open"]
    if not candidates:
        return None
    started = [i for i in candidates if counts.get(curve.ratios[i], (0, 0))[1] > 0]
    if started:
        return curve.ratios[started[0]]
    return curve.ratios[candidates[len(candidates) // 2]]


def next_run(curves: Sequence[Curve], trials: Sequence[Trial], policy: Policy) -> Choice | None:
    """The next run of the boundary, or None when it is done (every curve, or the budget).

    Raises:
        ValueError: two curves with one name, or a trial of an unknown curve or ratio.
    """
    names = [c.name for c in curves]
    if len(set(names)) != len(names):
        raise ValueError("two curves have the same name")
    grid = {c.name: set(c.ratios) for c in curves}
    for t in trials:
        if t.ratio not in grid.get(t.curve, ()):
            raise ValueError(f"a trial of {t.curve} at ratio {t.ratio:g} is not on any curve")
    if policy.max_total is not None and len(trials) >= policy.max_total:
        return None
    spent = dict.fromkeys(names, 0)
    for t in trials:
        spent[t.curve] += 1
    best: Choice | None = None
    best_spent = 0
    for curve in curves:
        counts = tally(trials, curve.name)
        ratio = next_ratio(curve, counts, policy)
        if ratio is None:
            continue
        if best is None or spent[curve.name] < best_spent:
            best = Choice(curve.name, ratio, counts.get(ratio, (0, 0))[1] + 1)
            best_spent = spent[curve.name]
    return best


def runs_to_decide(policy: Policy) -> int:
    """Trials a setting whose every run goes one way (P = 0 or 1) needs to be decided:
    the smallest n whose 0/n interval lies under the level and whose n/n interval lies
    over it, at most ``max_runs``."""
    for n in range(1, policy.max_runs + 1):
        if wilson(0, n, policy.z).high < min(policy.level, 1 - policy.level):
            return n
    return policy.max_runs


def remaining_steps(curve: Curve, counts: Counts, policy: Policy) -> int:
    """Settings a bisection of the open gap still has to decide (ceil log2 of it + 1)."""
    lo, hi = bracket(curve, counts, policy)
    gap = sum(1 for i in range(lo + 1, hi) if state(counts, curve.ratios[i], policy) == "open")
    return gap.bit_length()
