"""The numbers behind an experiment report (numpy and scipy): means, percentiles and the tests.

numpy and scipy.stats hold about 75 MiB resident once imported, and only a report or an
auto-promotion run (``ledger.experiments``: the admin's, the CLI's or the periodic task's) needs
them, so no module a gateway process imports at start-up imports this one: ``ledger.experiments``
loads it when it first computes. Each function takes plain lists and returns plain floats.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

__all__ = ["chi2_yates", "constant", "fisher", "mean", "min_expected", "percentile", "welch_t"]


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values))


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q))


def constant(values: Sequence[float]) -> bool:
    """Every value the same (variance 0)."""
    return bool(np.var(values) == 0)


def welch_t(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Welch's t-test, two-sided, unequal variances: (statistic, p value)."""
    result = stats.ttest_ind(a, b, equal_var=False)
    return float(result.statistic), float(result.pvalue)


def _table(rows: Sequence[Sequence[float]]) -> np.ndarray:
    return np.array(rows, dtype=float)


def min_expected(rows: Sequence[Sequence[float]]) -> float:
    """The smallest expected cell count of the 2x2 table under independence."""
    return float(stats.contingency.expected_freq(_table(rows)).min())


def fisher(rows: Sequence[Sequence[float]]) -> tuple[float, float]:
    """Fisher's exact test, two-sided: (odds ratio, p value)."""
    result = stats.fisher_exact(_table(rows).astype(int))
    return float(result.statistic), float(result.pvalue)


def chi2_yates(rows: Sequence[Sequence[float]]) -> tuple[float, float]:
    """Pearson's chi-square test with Yates' continuity correction: (statistic, p value)."""
    result = stats.chi2_contingency(_table(rows), correction=True)
    return float(result.statistic), float(result.pvalue)
