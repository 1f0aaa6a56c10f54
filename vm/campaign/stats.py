"""Summary statistics and Welch's t-test for the report (pure, standard library only).

Theory of operation
-------------------
:func:`summary` gives one arm's mean, sample sd, coefficient of variation, median, min and
max of a row.  :func:`welch` compares an arm's mean with the baseline arm's without assuming
equal variances (Welch 1947): ``t = (m1 - m2) / sqrt(s1²/n1 + s2²/n2)`` with the
Welch-Satterthwaite degrees of freedom.  The difference is called significant at the 5%
level, two-sided, when ``|t|`` exceeds the critical value of Student's t for those degrees
of freedom, looked up in :data:`T_CRITICAL_5PCT` (no scipy): a fractional df is rounded
down and a df between two tabulated ones takes the lower, which can only make the test
stricter than the exact one.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

#: Two-sided 5% critical values of Student's t (the 97.5th percentile) by degrees of
#: freedom; any standard table (e.g. NIST/SEMATECH e-Handbook, section 1.3.6.7.2).
T_CRITICAL_5PCT: tuple[tuple[int, float], ...] = (
    (1, 12.706),
    (2, 4.303),
    (3, 3.182),
    (4, 2.776),
    (5, 2.571),
    (6, 2.447),
    (7, 2.365),
    (8, 2.306),
    (9, 2.262),
    (10, 2.228),
    (11, 2.201),
    (12, 2.179),
    (13, 2.160),
    (14, 2.145),
    (15, 2.131),
    (16, 2.120),
    (17, 2.110),
    (18, 2.101),
    (19, 2.093),
    (20, 2.086),
    (21, 2.080),
    (22, 2.074),
    (23, 2.069),
    (24, 2.064),
    (25, 2.060),
    (26, 2.056),
    (27, 2.052),
    (28, 2.048),
    (29, 2.045),
    (30, 2.042),
    (40, 2.021),
    (60, 2.000),
    (120, 1.980),
)
T_CRITICAL_INFINITE = 1.960


def t_critical(df: float) -> float:
    """The two-sided 5% critical value for ``df`` (>= 1) degrees of freedom, from the
    largest tabulated df not above it (conservative between table rows)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, not {df}")
    value = T_CRITICAL_5PCT[0][1]
    for row_df, crit in T_CRITICAL_5PCT:
        if row_df > df:
            return value
        value = crit
    return value if df < 1000 else T_CRITICAL_INFINITE


@dataclass(frozen=True, slots=True)
class Summary:
    n: int
    mean: float | None
    sd: float | None
    """Sample standard deviation (n - 1); None below two values."""
    cov_pct: float | None
    """sd / |mean| in percent; None without an sd or with a zero mean."""
    median: float | None
    min: float | None
    max: float | None


def summary(values: Sequence[float]) -> Summary:
    n = len(values)
    if n == 0:
        return Summary(0, None, None, None, None, None, None)
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if n >= 2 else None
    cov = sd / abs(mean) * 100.0 if sd is not None and mean else None
    return Summary(n, mean, sd, cov, statistics.median(values), min(values), max(values))


@dataclass(frozen=True, slots=True)
class Welch:
    t: float
    df: float
    critical: float
    significant: bool


def welch(a: Summary, b: Summary) -> Welch | None:
    """Welch's t-test of ``a``'s mean against ``b``'s at the 5% level, two-sided.

    None when it cannot be computed: fewer than two values on either side, or no spread at
    all (both sds zero).
    """
    if a.n < 2 or b.n < 2 or a.mean is None or b.mean is None:
        return None
    assert a.sd is not None and b.sd is not None
    va, vb = a.sd**2 / a.n, b.sd**2 / b.n
    if va + vb == 0:
        return None
    t = (a.mean - b.mean) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1))
    crit = t_critical(df)
    return Welch(t, df, crit, abs(t) > crit)
