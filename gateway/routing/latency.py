"""Recent latency per deployment in this process: the p50 a routing policy can read (``p50_ms``)
and the decaying average the ``lowest_latency`` strategy orders by.

Each deployment keeps its last ``WINDOW`` successful latencies (time to the first byte of a
stream, or of the whole answer), recorded by the record stage. A process-local view: every gateway
process learns from its own traffic, which is enough to steer away from a slow deployment.
"""

from __future__ import annotations

import statistics
from collections import deque

WINDOW = 200
#: Weight of the newest latency in the decaying average (the ``lowest_latency`` strategy).
ALPHA = 0.2

_samples: dict[str, deque[float]] = {}
_ewma: dict[str, float] = {}


def observe(deployment_key: str, latency_ms: float) -> None:
    window = _samples.get(deployment_key)
    if window is None:
        window = _samples[deployment_key] = deque(maxlen=WINDOW)
    window.append(float(latency_ms))
    previous = _ewma.get(deployment_key)
    _ewma[deployment_key] = float(latency_ms) if previous is None else previous + ALPHA * (latency_ms - previous)


def ewma(deployment_key: str) -> float | None:
    """The decaying average latency in ms, or None before the first one."""
    return _ewma.get(deployment_key)


def p50(deployment_key: str) -> float | None:
    """The median of the recent latencies in ms, or None before the first one."""
    window = _samples.get(deployment_key)
    if not window:
        return None
    return float(statistics.median(window))


def reset() -> None:
    _samples.clear()
    _ewma.clear()
