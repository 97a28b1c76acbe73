"""Weight schedules of the SSL loss terms, in training iterations."""

from __future__ import annotations

import math


def sigmoid_rampup(current: float, length: float) -> float:
    """The sigmoid-shaped ramp of Laine & Aila (ICLR 2017), used by Mean Teacher and SSL4MIS:
    ``exp(-5 (1 - t)^2)`` with ``t = clip(current / length, 0, 1)``. A length of 0 means no ramp (returns 1)."""
    if length <= 0:
        return 1.0
    t = min(max(current / length, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def linear_rampup(current: float, delay: float, length: float) -> float:
    """QG-SSL's ``LambdaScheduler`` shape (linear): 0 before ``delay``, then ``(current - delay) / length``
    clipped to [0, 1]. A length of 0 gives a step at ``delay``."""
    if current < delay:
        return 0.0
    if length <= 0:
        return 1.0
    return float(min((current - delay) / length, 1.0))
