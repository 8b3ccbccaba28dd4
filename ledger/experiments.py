"""A routing experiment's results from the ledger: per arm requests, error rate, latency p50/p95,
cost per request and feedback mean, and the significance of the differences (scipy).

Tests, each arm against the first (the control), at the experiment's significance level alpha:

- latency, cost per request and feedback score: Welch's t-test (two-sided, unequal variances,
  ``scipy.stats.ttest_ind(equal_var=False)``); latency over the requests that succeeded;
- error rate: Pearson's chi-square test on the 2x2 table of errors and successes (with Yates'
  continuity correction, ``scipy.stats.chi2_contingency``), or Fisher's exact test
  (``scipy.stats.fisher_exact``) when an expected cell count is under 5.

``winner`` (auto-promotion) asks more: every arm has at least the minimum samples, and the best
arm on the chosen metric beats every other arm with p below alpha divided by the number of
comparisons (Bonferroni), so adding arms does not make a false winner likelier.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ledger.models import Feedback, UsageRecord

__all__ = [
    "ERROR_STATUSES",
    "METRICS",
    "ArmSamples",
    "Comparison",
    "compare",
    "load_samples",
    "summarize",
    "winner",
]

#: A request that failed for the arm's reason (a client that went away is not the arm's error).
ERROR_STATUSES = frozenset({"upstream_error", "upstream_timeout", "error"})

#: metric -> (what is compared, True when higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "score": ("feedback score", True),
    "latency": ("latency (ms)", False),
    "cost": ("cost per request (USD)", False),
    "error_rate": ("error rate", False),
}


@dataclass(slots=True)
class ArmSamples:
    name: str
    requests: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)  # requests that succeeded
    costs_usd: list[float] = field(default_factory=list)  # every request
    scores: list[float] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)

    def values(self, metric: str) -> list[float]:
        if metric == "latency":
            return self.latencies_ms
        if metric == "cost":
            return self.costs_usd
        if metric == "score":
            return self.scores
        raise ValueError(f"no sample values for {metric}")

    def samples(self, metric: str) -> int:
        """How many observations the metric has (requests; scores for the feedback score)."""
        return len(self.scores) if metric == "score" else self.requests


@dataclass(frozen=True, slots=True)
class Comparison:
    metric: str
    arm: str
    control: str
    method: str
    statistic: float | None
    p_value: float | None
    alpha: float
    difference: float | None  # arm minus control (means, or error rates)

    @property
    def significant(self) -> bool:
        return self.p_value is not None and self.p_value < self.alpha

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "arm": self.arm,
            "control": self.control,
            "method": self.method,
            "statistic": self.statistic,
            "p_value": self.p_value,
            "alpha": self.alpha,
            "confidence": round(1 - self.alpha, 6),
            "difference": self.difference,
            "significant": self.significant,
        }


def load_samples(slug: str, arms: Sequence[str]) -> dict[str, ArmSamples]:
    """Every ledger row the experiment assigned, and the feedback on them, per arm (in arm order)."""
    found = {name: ArmSamples(name) for name in arms}
    rows = UsageRecord.objects.filter(experiment=slug).values_list("arm", "status", "latency_ms", "cost_micro")
    for arm, status, latency_ms, cost_micro in rows.iterator(chunk_size=5000):
        samples = found.setdefault(arm, ArmSamples(arm))
        samples.requests += 1
        samples.costs_usd.append(cost_micro / 1_000_000)
        if status in ERROR_STATUSES:
            samples.errors += 1
        elif status == UsageRecord.Status.OK:
            samples.latencies_ms.append(float(latency_ms))
    assigned = UsageRecord.objects.filter(experiment=slug).values("request_id")
    feedback = Feedback.objects.filter(request_id__in=assigned).values_list("request_id", "score", "label")
    arm_of = dict(
        UsageRecord.objects.filter(experiment=slug, request_id__in=Feedback.objects.values("request_id")).values_list(
            "request_id", "arm"
        )
    )
    for request_id, score, label in feedback.iterator(chunk_size=5000):
        samples = found.setdefault(arm_of[request_id], ArmSamples(arm_of[request_id]))
        if score is not None:
            samples.scores.append(float(score))
        if label:
            samples.labels[label] = samples.labels.get(label, 0) + 1
    return found


# numpy and scipy (``ledger.significance``) are imported by the functions that compute, on the first
# report or promotion check: a gateway process imports this module (through the admin) but never
# computes, and would otherwise hold ~75 MiB for nothing.


def _mean(values: Sequence[float]) -> float | None:
    from ledger import significance  # noqa: PLC0415  (numpy + scipy, ~75 MiB: not in a serving gateway)

    return significance.mean(values) if values else None


def _percentile(values: Sequence[float], q: float) -> float | None:
    from ledger import significance  # noqa: PLC0415  (numpy + scipy, ~75 MiB: not in a serving gateway)

    return significance.percentile(values, q) if values else None


def summarize(samples: ArmSamples) -> dict[str, Any]:
    return {
        "arm": samples.name,
        "requests": samples.requests,
        "errors": samples.errors,
        "error_rate": samples.errors / samples.requests if samples.requests else None,
        "latency_p50_ms": _percentile(samples.latencies_ms, 50),
        "latency_p95_ms": _percentile(samples.latencies_ms, 95),
        "cost_per_request_usd": _mean(samples.costs_usd),
        "feedback_n": len(samples.scores),
        "feedback_mean": _mean(samples.scores),
        "labels": dict(sorted(samples.labels.items())),
    }


def _finite(value: Any) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def welch(metric: str, arm: ArmSamples, control: ArmSamples, alpha: float) -> Comparison:
    from ledger import significance  # noqa: PLC0415  (numpy + scipy, ~75 MiB: not in a serving gateway)

    a, b = arm.values(metric), control.values(metric)
    difference = significance.mean(a) - significance.mean(b) if a and b else None
    if len(a) < 2 or len(b) < 2:
        return Comparison(
            metric, arm.name, control.name, "Welch's t-test: too few samples", None, None, alpha, difference
        )
    if significance.constant(a) and significance.constant(b):
        # Two constant samples: the t statistic is undefined (0/0) unless the means differ.
        p_value = 1.0 if difference == 0 else 0.0
        return Comparison(
            metric, arm.name, control.name, "Welch's t-test (both constant)", None, p_value, alpha, difference
        )
    statistic, p_value = significance.welch_t(a, b)
    return Comparison(
        metric,
        arm.name,
        control.name,
        "Welch's t-test (two-sided)",
        _finite(statistic),
        _finite(p_value),
        alpha,
        difference,
    )


def error_rate_test(arm: ArmSamples, control: ArmSamples, alpha: float) -> Comparison:
    from ledger import significance  # noqa: PLC0415  (numpy + scipy, ~75 MiB: not in a serving gateway)

    if not arm.requests or not control.requests:
        return Comparison("error_rate", arm.name, control.name, "no requests", None, None, alpha, None)
    difference = arm.errors / arm.requests - control.errors / control.requests
    table = [[arm.errors, arm.requests - arm.errors], [control.errors, control.requests - control.errors]]
    if arm.errors + control.errors == 0 or table[0][1] + table[1][1] == 0:
        # No errors at all (or nothing but errors) in both arms: no difference to test.
        return Comparison(
            "error_rate", arm.name, control.name, "no variation (same outcome everywhere)", None, 1.0, alpha, difference
        )
    if significance.min_expected(table) < 5:
        odds_ratio, p_value = significance.fisher(table)
        return Comparison(
            "error_rate",
            arm.name,
            control.name,
            "Fisher's exact test (two-sided)",
            _finite(odds_ratio),
            _finite(p_value),
            alpha,
            difference,
        )
    statistic, p_value = significance.chi2_yates(table)
    return Comparison(
        "error_rate",
        arm.name,
        control.name,
        "Pearson's chi-square test (Yates' correction)",
        _finite(statistic),
        _finite(p_value),
        alpha,
        difference,
    )


def pair_test(metric: str, arm: ArmSamples, control: ArmSamples, alpha: float) -> Comparison:
    if metric == "error_rate":
        return error_rate_test(arm, control, alpha)
    return welch(metric, arm, control, alpha)


def compare(samples: Sequence[ArmSamples], alpha: float) -> list[Comparison]:
    """Every arm after the first against the first, on each metric."""
    if len(samples) < 2:
        return []
    control = samples[0]
    return [pair_test(metric, arm, control, alpha) for arm in samples[1:] for metric in METRICS]


def _level(metric: str, samples: ArmSamples) -> float | None:
    if metric == "error_rate":
        return samples.errors / samples.requests if samples.requests else None
    return _mean(samples.values(metric))


def winner(samples: Sequence[ArmSamples], metric: str, min_samples: int, alpha: float) -> tuple[str | None, str]:
    """The arm to promote on ``metric``, or None; with the reason either way."""
    if metric not in METRICS:
        return None, f"unknown metric {metric!r}"
    short = [s.name for s in samples if s.samples(metric) < max(min_samples, 2)]
    if short:
        return None, f"too few samples in {', '.join(short)} (need {max(min_samples, 2)} per arm)"
    higher_better = METRICS[metric][1]
    levels = {s.name: _level(metric, s) for s in samples}
    known = [s for s in samples if levels[s.name] is not None]
    if len(known) < 2:
        return None, "not enough arms with data"
    best = (max if higher_better else min)(known, key=lambda s: levels[s.name] or 0.0)
    threshold = alpha / (len(samples) - 1)
    for other in samples:
        if other is best:
            continue
        result = pair_test(metric, best, other, alpha)
        if result.p_value is None or result.p_value >= threshold:
            p_text = "n/a" if result.p_value is None else f"{result.p_value:.4g}"
            return None, f"{best.name} vs {other.name}: p={p_text}, not below {threshold:.4g} ({result.method})"
    return best.name, (
        f"{best.name} beats every other arm on {METRICS[metric][0]} "
        f"(p < {threshold:.4g}, alpha {alpha} with Bonferroni over {len(samples) - 1} comparison(s))"
    )
