"""Comparison statistics after rliable (Agarwal et al., 2021), in numpy/scipy: interquartile mean, stratified
bootstrap confidence intervals over runs within tasks, probability of improvement; paired factor effects with a
bootstrap interval, a paired t-test p-value and Holm's correction across comparisons (a sign-flip randomisation
test is here too, for when the pairs are many).

Score matrices are runs x tasks (rows: seeds of one configuration; columns: tasks), as in rliable.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats

Statistic = Callable[[np.ndarray], float]


def iqm(matrix: np.ndarray) -> float:
    """Mean of the middle 50% of all run x task scores."""
    return float(stats.trim_mean(np.asarray(matrix, dtype=float).ravel(), 0.25))


def mean(matrix: np.ndarray) -> float:
    return float(np.mean(matrix))


def stratified_bootstrap_ci(matrix: np.ndarray, statistic: Statistic = mean, reps: int = 2000, level: float = 0.95,
                            seed: int = 0) -> tuple[float, float, float]:
    """(point, low, high): runs resampled with replacement within each task (column), percentile interval."""
    m = np.asarray(matrix, dtype=float)
    if m.ndim == 1:
        m = m[:, None]
    n_runs, n_tasks = m.shape
    point = statistic(m)
    if n_runs < 2:
        return point, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_runs, size=(reps, n_runs, n_tasks))
    cols = np.arange(n_tasks)[None, None, :]
    samples = m[idx, cols]  # reps x runs x tasks
    if statistic is mean:
        values = samples.mean(axis=(1, 2))
    else:
        values = np.array([statistic(s) for s in samples])
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return point, float(lo), float(hi)


MIN_BOOTSTRAP_SEEDS = 5  # below this a bootstrap over seeds is about the range of those few seeds: too narrow


def seed_interval(matrix: np.ndarray, reps: int = 2000, level: float = 0.95,
                  seed: int = 0) -> tuple[float, float, float, str]:
    """(mean, low, high, method) of a configuration's score, honest for the number of seeds it rests on: none for
    one seed; a Student-t interval over the seeds' scores (each the mean over tasks) below MIN_BOOTSTRAP_SEEDS;
    rliable's stratified bootstrap from there on. With 2 seeds the percentile bootstrap is the range of the two
    numbers, far narrower than the t interval (t = 12.7 at one degree of freedom)."""
    m = np.asarray(matrix, dtype=float)
    m = m[:, None] if m.ndim == 1 else m
    n = m.shape[0]
    point = float(m.mean())
    if n < 2:
        return point, float("nan"), float("nan"), "1 seed: no interval"
    if n < MIN_BOOTSTRAP_SEEDS:
        lo, hi = t_interval(m.mean(axis=1), level)
        return point, lo, hi, f"t, {n} seeds"
    _, lo, hi = stratified_bootstrap_ci(m, mean, reps, level, seed)
    return point, lo, hi, f"bootstrap, {n} seeds"


def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of `values` (nan for fewer than 2)."""
    v = np.asarray(values, float)
    if len(v) < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf(1 - (1 - level) / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean() - half), float(v.mean() + half)


def probability_of_improvement(x: np.ndarray, y: np.ndarray) -> float:
    """P(X > Y) + P(X = Y)/2 per task (Mann-Whitney), averaged over tasks; x, y are runs x tasks."""
    x, y = np.atleast_2d(np.asarray(x, float).T).T, np.atleast_2d(np.asarray(y, float).T).T
    per_task = []
    for t in range(x.shape[1]):
        a, b = x[:, t][:, None], y[:, t][None, :]
        per_task.append(float(((a > b) + 0.5 * (a == b)).mean()))
    return float(np.mean(per_task))


def probability_of_improvement_ci(x: np.ndarray, y: np.ndarray, reps: int = 1000, level: float = 0.95,
                                  seed: int = 0) -> tuple[float, float, float]:
    x, y = np.asarray(x, float), np.asarray(y, float)
    x, y = (x[:, None] if x.ndim == 1 else x), (y[:, None] if y.ndim == 1 else y)
    point = probability_of_improvement(x, y)
    if len(x) < 2 or len(y) < 2:
        return point, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(reps):
        xi = x[rng.integers(0, len(x), (len(x), x.shape[1])), np.arange(x.shape[1])[None, :]]
        yi = y[rng.integers(0, len(y), (len(y), y.shape[1])), np.arange(y.shape[1])[None, :]]
        values.append(probability_of_improvement(xi, yi))
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return point, float(lo), float(hi)


@dataclass
class Effect:
    """A paired difference (treatment minus baseline) with its bootstrap interval and randomisation p-value."""

    label: str
    estimate: float
    low: float
    high: float
    p_value: float
    n_pairs: int
    p_holm: float = float("nan")

    @property
    def excludes_zero(self) -> bool:
        return bool(self.low > 0 or self.high < 0)


def sign_flip_p_value(diffs: np.ndarray, max_exact: int = 16, draws: int = 20000, seed: int = 0) -> float:
    """Two-sided p-value of mean(diffs) = 0 under random sign flips (exact enumeration for few pairs)."""
    d = np.asarray(diffs, float)
    n = len(d)
    if n == 0:
        return float("nan")
    observed = abs(d.mean())
    if n <= max_exact:
        signs = np.array(list(itertools.product((-1.0, 1.0), repeat=n)))
    else:
        signs = np.random.default_rng(seed).choice((-1.0, 1.0), size=(draws, n))
    null = np.abs((signs * d).mean(axis=1))
    return float(((null >= observed - 1e-12).sum()) / len(null))


MIN_BOOTSTRAP_PAIRS = 20  # below this the percentile bootstrap is too narrow (3 pairs: 10 distinct resamples)


def paired_effect(label: str, diffs: np.ndarray, reps: int = 5000, level: float = 0.95, seed: int = 0) -> Effect:
    """Mean paired difference with a percentile bootstrap interval over the pairs, or a Student-t interval when
    there are fewer than MIN_BOOTSTRAP_PAIRS pairs."""
    d = np.asarray(diffs, float)
    if len(d) == 0:
        return Effect(label, float("nan"), float("nan"), float("nan"), float("nan"), 0)
    if len(d) < 2:
        lo, hi = np.nan, np.nan
    elif len(d) < MIN_BOOTSTRAP_PAIRS:
        lo, hi = t_interval(d, level)
    else:
        rng = np.random.default_rng(seed)
        boots = d[rng.integers(0, len(d), size=(reps, len(d)))].mean(axis=1)
        lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return Effect(label, float(d.mean()), float(lo), float(hi), paired_t_p_value(d), len(d))


def paired_t_p_value(diffs: np.ndarray) -> float:
    """Two-sided p-value of a one-sample t-test of the paired differences (0 when they are all equal and
    non-zero, 1 when all zero). Preferred over the sign-flip test for decisions: with 3 seeds x 2 levels (6 pairs)
    the sign-flip p-value cannot fall below 2/64 = 0.031, so nothing survives a Holm correction."""
    d = np.asarray(diffs, float)
    if len(d) < 2:
        return float("nan")
    if np.allclose(d, d[0]):
        return 0.0 if abs(d[0]) > 1e-12 else 1.0
    return float(stats.ttest_1samp(d, 0.0).pvalue)


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1)."""
    p = np.asarray(p_values, float)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    m = len(p)
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def drawdown(values: np.ndarray) -> float:
    """The largest fall below the running best (0 when the curve never falls)."""
    v = np.asarray(values, float)
    if len(v) == 0:
        return 0.0
    return float(np.max(np.maximum.accumulate(v) - v))


def collapsed(values: np.ndarray, threshold: float) -> bool:
    """Fell more than `threshold` below its running best and ended there (did not recover)."""
    v = np.asarray(values, float)
    return bool(len(v) > 1 and np.max(v) - v[-1] > threshold)


def spike_mask(values: np.ndarray, factor: float = 5.0, floor: float = 0.0) -> np.ndarray:
    """Per iteration: does a positive quantity exceed `factor` x its median (and `floor`)?"""
    v = np.asarray(values, float)
    finite = v[np.isfinite(v)]
    if len(finite) < 3:
        return np.zeros(len(v), dtype=bool)
    return np.isfinite(v) & (v > max(factor * float(np.median(finite)), floor))


def spikes(values: np.ndarray, factor: float = 5.0, floor: float = 0.0) -> int:
    """Iterations where a positive quantity exceeds `factor` x its median (and `floor`)."""
    return int(spike_mask(values, factor, floor).sum())


def longest_run(mask: np.ndarray) -> int:
    """The longest stretch of consecutive True values (persistence of a warning sign)."""
    best = current = 0
    for flag in np.asarray(mask, bool):
        current = current + 1 if flag else 0
        best = max(best, current)
    return best


def outliers(values: np.ndarray, k: float = 5.0) -> int:
    """Values more than k robust standard deviations (1.4826 x MAD) above the median."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) < 3:
        return 0
    med = np.median(v)
    mad = 1.4826 * np.median(np.abs(v - med))
    return int(np.sum(v > med + k * max(mad, 1e-12)))
