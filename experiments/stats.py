"""The statistics behind every verdict of docs/results.md (experiments/protocol.md says which test each claim uses).

Paired comparisons on the same seeds: every seed has its own warm-up model, its own problem set and its own sampling
streams, shared by all methods and settings run on it, so a difference is taken seed by seed and the interval is over
those differences.

    t_interval(d)          mean and two-sided 95 % Student-t interval of the paired differences d (n − 1 df)
    tost(d, margin)        equivalence: the 90 % t-interval lies inside (−margin, +margin) (two one-sided tests, α 0.05)
    detectable(sd, n)      the smallest true mean difference a two-sided 5 % paired t-test detects with 80 % power
    bootstrap_interval(d)  percentile bootstrap of the mean (a check on the t-interval; not used for verdicts)

No scipy: the t distribution's CDF is the regularised incomplete beta function (continued fraction, as in Numerical
Recipes §6.4), inverted by bisection; checked in tests/test_experiments.py against tabulated quantiles.
"""

from __future__ import annotations

import math
import random

__all__ = ["t_cdf", "t_quantile", "t_interval", "tost", "detectable", "bootstrap_interval", "mean_sd"]


def _betacf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2.0, 0.5, x)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (bisection to 1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def mean_sd(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan)


def t_interval(d: list[float], conf: float = 0.95) -> dict:
    """Mean of the paired differences ``d`` and its two-sided ``conf`` Student-t interval; ``excludes_0`` says
    whether the interval lies entirely above (+1) or below (−1) zero (0: it contains zero)."""
    n = len(d)
    m, sd = mean_sd(d)
    if n < 2:
        return dict(n=n, mean=m, sd=sd, lo=math.nan, hi=math.nan, excludes_0=0)
    h = t_quantile(0.5 + conf / 2.0, n - 1) * sd / math.sqrt(n)
    lo, hi = m - h, m + h
    return dict(n=n, mean=m, sd=sd, lo=lo, hi=hi, excludes_0=1 if lo > 0 else (-1 if hi < 0 else 0))


def tost(d: list[float], margin: float) -> dict:
    """Equivalence within ±``margin`` at α = 0.05: the two-sided 90 % t-interval lies inside (−margin, margin)."""
    ci = t_interval(d, conf=0.90)
    return dict(ci90=(ci["lo"], ci["hi"]), margin=margin, equivalent=bool(-margin < ci["lo"] and ci["hi"] < margin))


def detectable(sd: float, n: int, power: float = 0.8, alpha: float = 0.05) -> float:
    """The true mean paired difference that a two-sided level-``alpha`` t-test on ``n`` pairs with difference SD
    ``sd`` detects with probability ``power`` (the usual approximation (t_{1−α/2} + t_{power})·sd/√n)."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    return (t_quantile(1 - alpha / 2, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


def bootstrap_interval(d: list[float], conf: float = 0.95, reps: int = 20000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    n = len(d)
    means = sorted(sum(rng.choice(d) for _ in range(n)) / n for _ in range(reps))
    return means[int((1 - conf) / 2 * reps)], means[int((1 + conf) / 2 * reps) - 1]
