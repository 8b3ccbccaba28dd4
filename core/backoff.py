"""One backoff rule for every retry loop: exponential, capped, with jitter."""

from __future__ import annotations

import random


def delay(exponent: int, *, base: float, cap: float, low: float = 0.5, high: float = 1.0) -> float:
    """``min(cap, base * 2**exponent)`` scaled by a random factor in ``[low, high]``.

    The default draws from the upper half ("equal jitter"): retries from many processes spread
    out, and none waits much less than the nominal delay.
    """
    nominal = min(cap, base * 2.0 ** min(max(exponent, 0), 32))
    return nominal * random.uniform(low, high)
