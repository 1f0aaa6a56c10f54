"""vm.campaign.wilson and vm.campaign.adaptive: the interval against published values, and
the sampling policy replayed on scripted outcomes (the exact next run, the exact stop)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from vm.campaign import adaptive
from vm.campaign.adaptive import Choice, Curve, Policy, Trial
from vm.campaign.wilson import Z_95, wilson, z_for

# --- the Wilson interval --------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (score, no CC).
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
        # Closed forms: 0/n has high = z²/(n + z²); n/n is its mirror; 5/10 is symmetric.
        (0, 4, 0.0, 0.4899),
        (4, 4, 0.5101, 1.0),
        (5, 10, 0.2366, 0.7634),
    ],
)
def test_wilson_matches_published_values(k: int, n: int, low: float, high: float) -> None:
    iv = wilson(k, n)
    assert (round(iv.low, 4), round(iv.high, 4)) == (low, high)
    assert iv.p == k / n


def test_wilson_edges_and_bad_input() -> None:
    assert wilson(0, 0) == wilson(0, 0, z=1.0)
    nothing = wilson(0, 0)
    assert (nothing.low, nothing.high, nothing.excludes(0.5)) == (0.0, 1.0, False)
    assert wilson(0, 3).high == pytest.approx(Z_95**2 / (3 + Z_95**2))
    assert wilson(0, 3).excludes(0.5) is False  # 0 of 3 still allows 0.56
    assert wilson(0, 4).excludes(0.5) is True
    assert z_for(0.9) == pytest.approx(1.6448536)
    for k, n in ((3, 2), (-1, 2), (0, -1)):
        with pytest.raises(ValueError, match="need 0 <= k <= n"):
            wilson(k, n)
    with pytest.raises(ValueError, match=r"confidence must be one of 0\.8, 0\.9, 0\.95, 0\.99"):
        z_for(0.5)


# --- the policy -----------------------------------------------------------------------

GRID = (1.25, 1.5, 2.0, 2.5, 3.0, 4.0)


def replay(
    curves: list[Curve], policy: Policy, outcome: Callable[[str, float, int], bool]
) -> tuple[list[Choice], list[Trial]]:
    """Ask the policy for the next run until it stops; ``outcome(curve, ratio, trial)``
    scripts whether that run locks up."""
    chosen: list[Choice] = []
    trials: list[Trial] = []
    while (choice := adaptive.next_run(curves, trials, policy)) is not None:
        chosen.append(choice)
        trials.append(
            Trial(choice.curve, choice.ratio, outcome(choice.curve, choice.ratio, choice.trial))
        )
        assert len(chosen) < 500
    return chosen, trials


def step(curve: str, ratio: float, trial: int) -> Choice:
    return Choice(curve, ratio, trial)


def test_bisection_finds_the_change_and_stops_each_setting_when_decisive() -> None:
    """Locks always from 2.5 up, never up to 1.5, half the time at 2.0."""

    def outcome(curve: str, ratio: float, trial: int) -> bool:
        if ratio == 2.0:
            return trial % 2 == 1
        return ratio >= 2.5

    chosen, trials = replay([Curve("A", GRID)], Policy(), outcome)
    assert chosen == (
        [step("A", 2.5, t) for t in range(1, 5)]  # the middle first; 4/4 lockups decide it
        + [step("A", 1.5, t) for t in range(1, 5)]  # bisect below: 0/4 decides it
        + [step("A", 2.0, t) for t in range(1, 11)]  # straddles 0.5 until max_runs
    )
    counts = adaptive.tally(trials, "A")
    assert counts == {2.5: (4, 4), 1.5: (0, 4), 2.0: (5, 10)}
    assert [adaptive.state(counts, r, Policy()) for r in GRID] == [
        "open",
        "below",
        "exhausted",
        "above",
        "open",
        "open",
    ]
    assert adaptive.bracket(Curve("A", GRID), counts, Policy()) == (1, 3)


def test_a_curve_that_never_locks_walks_up_to_the_top() -> None:
    chosen, _ = replay([Curve("patched", GRID)], Policy(max_runs=6), lambda *_: False)
    # 2.5, then the middle of what is left above it, 4.0: 0/4 there implies 3.0 is below too.
    assert [c.ratio for c in chosen if c.trial == 1] == [2.5, 4.0]
    assert len(chosen) == 8


def test_an_interval_that_straddles_gets_the_next_run_not_a_new_setting() -> None:
    curve = Curve("A", GRID)
    trials = [Trial("A", 2.5, True), Trial("A", 2.5, False), Trial("A", 2.5, True)]
    assert adaptive.next_run([curve], trials, Policy()) == Choice("A", 2.5, 4)


def test_arms_are_interleaved_by_fewest_trials_then_file_order() -> None:
    curves = [Curve("vanilla", GRID), Curve("patched", GRID)]

    def outcome(curve: str, ratio: float, trial: int) -> bool:
        return curve == "vanilla" or ratio >= 4.0

    chosen, trials = replay(curves, Policy(max_total=9), outcome)
    assert [(c.curve, c.ratio, c.trial) for c in chosen] == [
        ("vanilla", 2.5, 1),
        ("patched", 2.5, 1),
        ("vanilla", 2.5, 2),
        ("patched", 2.5, 2),
        ("vanilla", 2.5, 3),
        ("patched", 2.5, 3),
        ("vanilla", 2.5, 4),
        ("patched", 2.5, 4),
        ("vanilla", 1.5, 1),  # 2.5 is decided above for vanilla: bisect down
    ]
    assert len(trials) == 9  # max_total stops it there
    # Past the budget, one curve done and the other not: the rest go to the other.
    done = [Trial("vanilla", r, True) for r in (1.25,) * 4] + [
        Trial("vanilla", 2.5, True) for _ in range(4)
    ]
    assert adaptive.next_run(curves, done, Policy()) == Choice("patched", 2.5, 1)


def test_one_setting_with_one_run_stops_after_it() -> None:
    chosen, _ = replay([Curve("A", (2.0,))], Policy(max_runs=1), lambda *_: False)
    assert chosen == [Choice("A", 2.0, 1)]


def test_bad_policies_curves_and_trials_are_refused() -> None:
    with pytest.raises(ValueError, match="level must be in"):
        Policy(level=1.0)
    with pytest.raises(ValueError, match="max_runs must be >= 1"):
        Policy(max_runs=0)
    with pytest.raises(ValueError, match="ratios must be distinct and ascending"):
        Curve("A", (2.0, 1.0))
    with pytest.raises(ValueError, match="not on any curve"):
        adaptive.next_run([Curve("A", GRID)], [Trial("A", 7.0, True)], Policy())
    with pytest.raises(ValueError, match="same name"):
        adaptive.next_run([Curve("A", GRID), Curve("A", GRID)], [], Policy())


def test_estimate_helpers() -> None:
    assert adaptive.runs_to_decide(Policy()) == 4
    assert adaptive.runs_to_decide(Policy(max_runs=3)) == 3
    assert adaptive.remaining_steps(Curve("A", GRID), {}, Policy()) == 3
    assert adaptive.remaining_steps(Curve("A", GRID), {2.5: (4, 4)}, Policy()) == 2
