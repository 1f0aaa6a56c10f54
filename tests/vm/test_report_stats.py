"""vm.campaign.stats: the report's summary statistics and Welch's t-test, against values
worked by hand."""

from __future__ import annotations

import pytest

from vm.campaign import stats


def test_summary_mean_sd_cov_range() -> None:
    st = stats.summary([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (st.n, st.mean, st.median, st.min, st.max) == (5, 3.0, 3.0, 1.0, 5.0)
    assert st.sd == pytest.approx(2.5**0.5)
    assert st.cov_pct == pytest.approx(2.5**0.5 / 3 * 100)
    one = stats.summary([7.0])
    assert (one.sd, one.cov_pct, one.min, one.max) == (None, None, 7.0, 7.0)
    assert stats.summary([]).mean is None
    assert stats.summary([0.0, 0.0]).cov_pct is None  # no CoV of a zero mean


def test_welch_equal_spread_is_the_pooled_test() -> None:
    """Equal n and sd: t = -5 on 8 df (critical 2.306), significant."""
    a = stats.summary([1.0, 2.0, 3.0, 4.0, 5.0])
    b = stats.summary([6.0, 7.0, 8.0, 9.0, 10.0])
    test = stats.welch(a, b)
    assert test is not None
    assert (test.t, test.df, test.critical, test.significant) == pytest.approx(
        (-5.0, 8.0, 2.306, True)
    )


def test_welch_unequal_spread_and_the_cases_it_cannot_judge() -> None:
    a = stats.summary([10.0, 12.0])
    b = stats.summary([8.0, 9.0])
    test = stats.welch(b, a)
    assert test is not None
    assert test.df == pytest.approx(1.5625 / 1.0625)  # Welch-Satterthwaite
    assert (test.critical, test.significant) == (12.706, False)  # df 1.47 -> 1
    assert stats.welch(stats.summary([1.0]), a) is None  # one run
    assert stats.welch(stats.summary([1.0, 1.0]), stats.summary([2.0, 2.0])) is None


@pytest.mark.parametrize(
    ("df", "critical"),
    [
        (1, 12.706),
        (1.99, 12.706),
        (8.9, 2.306),
        (30, 2.042),
        (35, 2.042),
        (59.9, 2.021),
        (120, 1.980),
        (999, 1.980),
        (5000, 1.960),
    ],
)
def test_t_critical_rounds_down_to_the_table(df: float, critical: float) -> None:
    assert stats.t_critical(df) == critical


def test_t_critical_has_no_value_below_one_degree_of_freedom() -> None:
    with pytest.raises(ValueError, match="degrees of freedom"):
        stats.t_critical(0.5)
