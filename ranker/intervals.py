"""Confidence intervals shared by the A/B arms' report and off-policy evaluation."""

from __future__ import annotations

import math

#: The normal quantile of a two-sided 95% interval.
Z95 = 1.959963984540054


def wilson(plays: float, likes: float, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a like rate (likes clamped to [0, plays]; plays may be an effective,
    fractional count); (0, 1) without plays. Unlike the normal approximation it stays inside [0, 1] and
    is sensible for rates near 0, and it has width where a rate of exactly 0 or 1 was seen."""
    if plays <= 0:
        return 0.0, 1.0
    n = float(plays)
    p = min(1.0, max(0.0, likes / n))
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)
