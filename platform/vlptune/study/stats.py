"""The statistics of an ablation table: pure functions over lists of numbers.

Per arm (a variant's values over seeds): the mean and the sample standard
deviation (``ddof=1``). Against the baseline: the difference of the means
(variant - baseline), its confidence interval with the Welch-Satterthwaite
degrees of freedom and a Student t quantile, and Welch's unequal-variance
t-test (``scipy.stats.ttest_ind(equal_var=False)``, two-sided)::

    se^2 = s_v^2 / n_v + s_b^2 / n_b
    df   = se^4 / ((s_v^2 / n_v)^2 / (n_v - 1) + (s_b^2 / n_b)^2 / (n_b - 1))
    CI   = diff +- t_{(1 + confidence) / 2, df} * se

When the numbers cannot support an interval or a test (fewer than
:data:`MIN_SEEDS` values in an arm, or no variance in either arm) the
comparison carries a plain-words ``note`` instead of a p-value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as _scipy_stats

MIN_SEEDS = 2  # values per arm below which there is no standard deviation, interval or test
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Summary:
    """One arm: n values, their mean and sample standard deviation (None when n < 2)."""

    n: int
    mean: float | None
    std: float | None


@dataclass(frozen=True)
class Comparison:
    """A variant against the baseline, for one metric."""

    diff: float | None  # mean(variant) - mean(baseline)
    se: float | None  # standard error of the difference
    df: float | None  # Welch-Satterthwaite degrees of freedom
    ci_low: float | None
    ci_high: float | None
    t: float | None  # Welch's t statistic
    p: float | None  # two-sided p-value of Welch's t-test
    confidence: float
    note: str | None  # why there is no interval or p-value (plain words), else None


def summarize(values: Sequence[float]) -> Summary:
    n = len(values)
    if n == 0:
        return Summary(0, None, None)
    mean = math.fsum(values) / n
    if n < MIN_SEEDS:
        return Summary(n, mean, None)
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return Summary(n, mean, math.sqrt(var))


def welch_df(var_a: float, n_a: int, var_b: float, n_b: int) -> float:
    """Welch-Satterthwaite degrees of freedom of the difference of two means."""
    qa, qb = var_a / n_a, var_b / n_b
    return (qa + qb) ** 2 / (qa**2 / (n_a - 1) + qb**2 / (n_b - 1))


def compare(variant: Sequence[float], baseline: Sequence[float], confidence: float = DEFAULT_CONFIDENCE) -> Comparison:
    """Difference of means with its interval and Welch's t-test (see the module docstring)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence}")
    a, b = summarize(variant), summarize(baseline)
    diff = a.mean - b.mean if a.mean is not None and b.mean is not None else None
    if a.n < MIN_SEEDS or b.n < MIN_SEEDS:
        if a.n == 0 or b.n == 0:
            which = "this variant" if a.n == 0 else "the baseline"
            note = f"no finished seed of {which}: nothing to compare"
        else:
            note = (
                f"too few seeds to say anything: {a.n} for this variant and {b.n} for the baseline; "
                f"an interval and a significance test need at least {MIN_SEEDS} finished seeds in each"
            )
        return Comparison(diff, None, None, None, None, None, None, confidence, note)
    # MIN_SEEDS >= 2 in both arms here, so both means and both deviations exist
    assert diff is not None and a.std is not None and b.std is not None
    var_a, var_b = a.std**2, b.std**2
    if var_a == 0.0 and var_b == 0.0:
        same = "the same value" if diff == 0.0 else "no spread"
        note = f"every seed gave {same} in both arms (zero variance): the difference is exact, a t-test is undefined"
        return Comparison(diff, 0.0, None, None, None, None, None, confidence, note)
    se = math.sqrt(var_a / a.n + var_b / b.n)
    df = welch_df(var_a, a.n, var_b, b.n)
    half = float(_scipy_stats.t.ppf(0.5 + confidence / 2.0, df)) * se
    test = _scipy_stats.ttest_ind(list(variant), list(baseline), equal_var=False)
    return Comparison(diff, se, df, diff - half, diff + half, float(test.statistic), float(test.pvalue), confidence, None)
