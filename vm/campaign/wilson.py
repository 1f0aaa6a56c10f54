"""The Wilson score interval for a binomial proportion (pure, standard library only).

Theory of operation
-------------------
A setting of the boundary gives ``k`` lockups in ``n`` trials.  The normal-approximation
("Wald") interval ``p ± z·sqrt(p(1-p)/n)`` collapses to a point at 0/n and n/n, exactly
the settings the boundary is made of, so it would call 0 lockups in 2 runs certain.  The
Wilson score interval (Wilson 1927) inverts the score test instead::

    centre    = (p + z²/2n) / (1 + z²/n)
    halfwidth = z / (1 + z²/n) · sqrt(p(1-p)/n + z²/4n²)

It stays inside [0, 1], is never empty, and at 0/n its upper end is ``z²/(n + z²)``:
0 lockups in 4 runs still allows P up to 0.49 at 95 %.  ``z`` is the two-sided normal
quantile; :data:`Z_95` (1.959964) is the usual 95 % one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: The two-sided 95 % quantile of the standard normal distribution (97.5th percentile).
Z_95 = 1.959963984540054

#: Two-sided normal quantiles by confidence level, for the levels a boundary file may ask.
Z_BY_CONFIDENCE: dict[float, float] = {
    0.80: 1.2815515655446004,
    0.90: 1.6448536269514722,
    0.95: Z_95,
    0.99: 2.5758293035489004,
}


@dataclass(frozen=True, slots=True)
class Interval:
    """``k`` events in ``n`` trials: the proportion and its Wilson score interval."""

    k: int
    n: int
    p: float
    low: float
    high: float

    def excludes(self, level: float) -> bool:
        """Whether the whole interval lies on one side of ``level`` (a decisive setting)."""
        return self.high < level or self.low > level


def wilson(k: int, n: int, z: float = Z_95) -> Interval:
    """The Wilson score interval of ``k`` successes in ``n`` trials.

    With ``n == 0`` nothing is known: p is 0 by convention and the interval is [0, 1].

    Raises:
        ValueError: ``n`` negative, ``k`` outside [0, n], or ``z`` not positive.
    """
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if z <= 0:
        raise ValueError(f"z must be positive, got {z}")
    if n == 0:
        return Interval(0, 0, 0.0, 0.0, 1.0)
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
    # At k = 0 and k = n the bounds are exactly 0 and 1; rounding must not move them.
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return Interval(k, n, p, low, high)


def z_for(confidence: float) -> float:
    """The two-sided normal quantile of a tabulated ``confidence`` level.

    Raises:
        ValueError: a level not in :data:`Z_BY_CONFIDENCE`.
    """
    for level, z in Z_BY_CONFIDENCE.items():
        if math.isclose(level, confidence):
            return z
    raise ValueError(
        f"confidence must be one of {', '.join(f'{c:g}' for c in Z_BY_CONFIDENCE)}, "
        f"got {confidence!r}"
    )
