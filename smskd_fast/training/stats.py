"""Small-sample statistics for the study: Student-t intervals, paired t-tests and Holm's adjustment.

SciPy is not a dependency, so the t distribution is computed here: its CDF through
the regularized incomplete beta function (a continued fraction, evaluated with the
modified Lentz method), its quantile by bisection on the CDF.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

__all__ = ["t_cdf", "t_quantile", "Summary", "Paired", "summarize_values", "paired_comparison", "holm",
           "format_p"]


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return result


def _regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df > 0 degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    tail = 0.5 * _regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(probability: float, df: float) -> float:
    """The t with t_cdf(t, df) = probability (bisection to about 1e-12)."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {probability}")
    low, high = -1.0, 1.0
    while t_cdf(low, df) > probability:
        low *= 2.0
    while t_cdf(high, df) < probability:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if t_cdf(middle, df) < probability:
            low = middle
        else:
            high = middle
        if high - low < 1e-12:
            break
    return 0.5 * (low + high)


@dataclass
class Summary:
    """Mean, sample standard deviation and the two-sided t-interval of the mean; std, low and
    high are None for a single value (no spread is known, so there is no interval)."""

    n: int
    mean: float
    std: Optional[float]
    low: Optional[float]
    high: Optional[float]

    def as_dict(self) -> Dict[str, Optional[float]]:
        return asdict(self)


def summarize_values(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """Summary of `values`; with one value std and the interval are None (not a zero-width interval)."""
    n = len(values)
    if n == 0:
        raise ValueError("values: need at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return Summary(1, mean, None, None, None)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


# Differences whose spread is below this fraction of the values' magnitude are equal up to floating-point
# rounding (accuracies k / N * 100 of the same image count k differ by ~1e-14): no real spread to test.
_RELATIVE_SPREAD_FLOOR = 1e-9


@dataclass
class Paired:
    """Per-seed differences a - b, their summary and the two-sided paired t-test p-value.

    t and p_value are None where the test is undefined (one pair; every difference equal and
    non-zero, i.e. no spread between seeds); `note` then says why, in words."""

    differences: list
    summary: Summary
    t: Optional[float]
    p_value: Optional[float]
    note: Optional[str] = None

    def as_dict(self) -> dict:
        return {"differences": self.differences, **self.summary.as_dict(), "t": self.t, "p_value": self.p_value,
                "note": self.note}


def paired_comparison(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Paired:
    """a - b seed by seed (equal lengths, same seed order), two-sided paired t-test with n - 1
    degrees of freedom. With one pair there is no test (t, p None); when every difference is
    zero p is 1; when every difference is the same non-zero value (up to float rounding) the
    test is undefined (t, p None, the interval collapses to that value) and `note` says so."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    differences = [x - y for x, y in zip(a, b)]
    summary = summarize_values(differences, confidence)
    n = len(differences)
    if n < 2:
        return Paired(differences, summary, None, None, "one seed: no interval and no test")
    scale = max([1.0, *(abs(v) for v in (*a, *b))])
    if summary.std <= _RELATIVE_SPREAD_FLOOR * scale:
        summary = Summary(n, summary.mean, 0.0, summary.mean, summary.mean)
        if abs(summary.mean) <= _RELATIVE_SPREAD_FLOOR * scale:
            return Paired(differences, summary, 0.0, 1.0, f"every one of the {n} differences is 0")
        return Paired(differences, summary, None, None,
                      f"every one of the {n} differences is {summary.mean:+.2f}: no spread between seeds, "
                      "so the t-test is undefined (more seeds needed)")
    t = summary.mean / (summary.std / math.sqrt(n))
    return Paired(differences, summary, t, 2.0 * t_cdf(-abs(t), n - 1))


def holm(p_values: Sequence[Optional[float]]) -> List[Optional[float]]:
    """Holm's step-down adjustment of a family of p-values (valid under any dependence between
    the tests). None (no test) stays None but counts towards the family size (conservative)."""
    present = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: List[Optional[float]] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (len(p_values) - rank) * p))
        adjusted[i] = running
    return adjusted


def format_p(p: Optional[float]) -> str:
    """'p<0.001' below 0.001 (never 'p=0.000'), else p to three decimals; 'p n/a' for no test."""
    if p is None:
        return "p n/a"
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"
