"""Recent latency per deployment in this process: the p50 a routing policy can read (``p50_ms``).

Each deployment keeps its last ``WINDOW`` successful latencies (time to the first byte of a
stream, or of the whole answer), recorded by the record stage. A process-local view: every gateway
process learns from its own traffic, which is enough to steer away from a slow deployment.
"""

from __future__ import annotations

import statistics
from collections import deque

WINDOW = 200

_samples: dict[str, deque[float]] = {}


def observe(deployment_key: str, latency_ms: float) -> None:
    window = _samples.get(deployment_key)
    if window is None:
        window = _samples[deployment_key] = deque(maxlen=WINDOW)
    window.append(float(latency_ms))


def p50(deployment_key: str) -> float | None:
    """The median of the recent latencies in ms, or None before the first one."""
    window = _samples.get(deployment_key)
    if not window:
        return None
    return float(statistics.median(window))


def reset() -> None:
    _samples.clear()
