"""Comparison statistics after rliable (Agarwal et al., 2021), in numpy/scipy.

One bootstrap: `interval_estimates`, in the shape of rliable's `get_interval_estimates` (a dict of runs x tasks
score matrices and an aggregate -> point estimates and stratified-bootstrap percentile intervals, runs resampled
within each task). On it: `seed_interval` (a configuration's score, honest for few seeds), `paired_effect` (a
factor's paired difference with a t-test p-value) and Holm's correction across comparisons; the interquartile
mean and the probability of improvement as in rliable. Curve-health measures live in `stability.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

from ript_ablate.study.objective import iqm

__all__ = ["MIN_BOOTSTRAP_PAIRS", "MIN_BOOTSTRAP_SEEDS", "Effect", "holm", "interval_estimates", "iqm", "mean",
           "paired_effect", "paired_t_p_value", "probability_of_improvement", "seed_interval", "state_variance",
           "t_interval"]

Aggregate = Callable[[np.ndarray], float]  # runs x tasks -> one number

MIN_BOOTSTRAP_SEEDS = 5  # below this a bootstrap over seeds is about the range of those few seeds: too narrow
MIN_BOOTSTRAP_PAIRS = 20  # below this the percentile bootstrap is too narrow (3 pairs: 10 distinct resamples)


def mean(matrix: np.ndarray) -> float:
    return float(np.mean(matrix))


def _as_matrix(scores: np.ndarray) -> np.ndarray:
    m = np.asarray(scores, dtype=float)
    return m[:, None] if m.ndim == 1 else m


def interval_estimates(scores: Mapping[str, np.ndarray], aggregate: Aggregate = mean, reps: int = 2000,
                       level: float = 0.95, seed: int = 0) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """rliable's interval function: per key, the aggregate of its runs x tasks matrix and a stratified-bootstrap
    percentile interval (runs resampled with replacement within each task). A matrix of one run has no interval
    (nan). The mean is computed vectorised; any other aggregate once per resample."""
    points: dict[str, float] = {}
    intervals: dict[str, tuple[float, float]] = {}
    for key, raw in scores.items():
        m = _as_matrix(raw)
        n_runs, n_tasks = m.shape
        points[key] = aggregate(m)
        if n_runs < 2:
            intervals[key] = (float("nan"), float("nan"))
            continue
        rng = np.random.default_rng(seed)
        samples = m[rng.integers(0, n_runs, size=(reps, n_runs, n_tasks)), np.arange(n_tasks)[None, None, :]]
        values = (samples.mean(axis=(1, 2)) if aggregate is mean
                  else np.array([aggregate(sample) for sample in samples]))
        lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
        intervals[key] = (float(lo), float(hi))
    return points, intervals


def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of `values` (nan for fewer than 2)."""
    v = np.asarray(values, float)
    if len(v) < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf(1 - (1 - level) / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean() - half), float(v.mean() + half)


def state_variance(rates: np.ndarray, states: np.ndarray) -> float:
    """The variance a finite set of evaluation states adds to a mean over tasks of success rates: each task's rate
    is a count over `states[t]` states, p(1 - p) / n (an upper bound: states differ in how hard they are). The
    seeds of a configuration share those states, so their spread does not contain it. 0 where counts are unknown."""
    r, n = np.asarray(rates, float), np.asarray(states, float)
    known = (n > 0) & np.isfinite(n) & np.isfinite(r)
    if not known.all() or len(r) == 0:
        return 0.0
    return float(np.sum(r * (1 - r) / n) / len(r) ** 2)


def _t_with_extra(values: np.ndarray, extra_var: float, level: float) -> tuple[float, float, float]:
    """(low, high, two-sided p against 0) of the mean of `values` whose variance also carries `extra_var` (known):
    Student-t with Welch-Satterthwaite degrees of freedom, a normal interval when the values do not vary."""
    v = np.asarray(values, float)
    spread = v.var(ddof=1) / len(v)
    var = spread + extra_var
    if var <= 0:
        return float(v.mean()), float(v.mean()), 0.0 if abs(v.mean()) > 1e-12 else 1.0
    df = (len(v) - 1) * var ** 2 / spread ** 2 if spread > 0 else np.inf
    half = stats.t.ppf(1 - (1 - level) / 2, df) * np.sqrt(var)
    p = 2 * stats.t.sf(abs(v.mean()) / np.sqrt(var), df)
    return float(v.mean() - half), float(v.mean() + half), float(p)


def seed_interval(matrix: np.ndarray, reps: int = 2000, level: float = 0.95,
                  seed: int = 0, state_var: float = 0.0) -> tuple[float, float, float, str]:
    """(mean, low, high, method) of a configuration's score, honest for the number of seeds it rests on: none for
    one seed; a Student-t interval over the seeds' scores (each the mean over tasks) below MIN_BOOTSTRAP_SEEDS;
    rliable's stratified bootstrap from there on. With 2 seeds the percentile bootstrap is the range of the two
    numbers, far narrower than the t interval (t = 12.7 at one degree of freedom). `state_var` (`state_variance`)
    adds the evaluation states' own noise: three seeds that land on the same count no longer give a zero width."""
    m = _as_matrix(matrix)
    n = m.shape[0]
    point = float(m.mean())
    states = " + evaluation states" if state_var > 0 else ""
    if n < 2:
        return point, float("nan"), float("nan"), "1 seed: no interval"
    if n < MIN_BOOTSTRAP_SEEDS:
        lo, hi, _ = _t_with_extra(m.mean(axis=1), state_var, level)
        return point, lo, hi, f"t, {n} seeds{states}"
    if state_var <= 0:
        _, intervals = interval_estimates({"scores": m}, mean, reps, level, seed)
        return point, *intervals["scores"], f"bootstrap, {n} seeds"
    rng = np.random.default_rng(seed)
    n_tasks = m.shape[1]
    resampled = m[rng.integers(0, n, size=(reps, n, n_tasks)), np.arange(n_tasks)[None, None, :]].mean(axis=(1, 2))
    values = resampled + rng.normal(0.0, np.sqrt(state_var), reps)  # the states' noise, drawn with each resample
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return point, float(lo), float(hi), f"bootstrap, {n} seeds{states}"


def probability_of_improvement(x: np.ndarray, y: np.ndarray) -> float:
    """P(X > Y) + P(X = Y)/2 per task (Mann-Whitney), averaged over tasks; x, y are runs x tasks."""
    x, y = _as_matrix(x), _as_matrix(y)
    per_task = []
    for t in range(x.shape[1]):
        a, b = x[:, t][:, None], y[:, t][None, :]
        per_task.append(float(((a > b) + 0.5 * (a == b)).mean()))
    return float(np.mean(per_task))


@dataclass
class Effect:
    """A paired difference (treatment minus baseline) with its interval and paired t-test p-value."""

    label: str
    estimate: float
    low: float
    high: float
    p_value: float
    n_pairs: int
    p_holm: float = float("nan")
    sd: float = float("nan")  # of the paired differences: what the power of a comparison rests on

    @property
    def excludes_zero(self) -> bool:
        return bool(self.low > 0 or self.high < 0)


def paired_effect(label: str, diffs: np.ndarray, reps: int = 5000, level: float = 0.95, seed: int = 0,
                  state_var: float = 0.0) -> Effect:
    """Mean paired difference with a percentile bootstrap interval over the pairs, or a Student-t interval when
    there are fewer than MIN_BOOTSTRAP_PAIRS pairs. `state_var` (known) adds the evaluation states' noise to the
    interval and the p-value (Welch-Satterthwaite degrees of freedom; a normal draw with each bootstrap resample)."""
    d = np.asarray(diffs, float)
    if len(d) == 0:
        return Effect(label, float("nan"), float("nan"), float("nan"), float("nan"), 0)
    sd = float(d.std(ddof=1)) if len(d) > 1 else float("nan")
    if state_var > 0 and len(d) > 1:
        lo, hi, p = _t_with_extra(d, state_var, level)
        if len(d) >= MIN_BOOTSTRAP_PAIRS:
            rng = np.random.default_rng(seed)
            values = d[rng.integers(0, len(d), size=(reps, len(d)))].mean(1) + rng.normal(0, np.sqrt(state_var), reps)
            lo, hi = (float(q) for q in np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2]))
        return Effect(label, float(d.mean()), lo, hi, p, len(d), sd=sd)
    if len(d) < MIN_BOOTSTRAP_PAIRS:
        lo, hi = t_interval(d, level)
    else:
        lo, hi = interval_estimates({label: d}, mean, reps, level, seed)[1][label]
    return Effect(label, float(d.mean()), float(lo), float(hi), paired_t_p_value(d), len(d), sd=sd)


def paired_t_p_value(diffs: np.ndarray) -> float:
    """Two-sided p-value of a one-sample t-test of the paired differences (0 when they are all equal and
    non-zero, 1 when all zero). A t-test rather than a sign-flip test: with 3 seeds x 2 levels (6 pairs) a
    sign-flip p-value cannot fall below 2/64 = 0.031, so nothing would survive a Holm correction."""
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


def state_paired_gain(base: dict[str, np.ndarray], final: dict[str, np.ndarray], reps: int = 2000,
                      level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """The gain over the base paired per evaluation state: per task, `base[task]` and `final[task]` are seeds x
    states of 0/1 successes on the same states; each state's change is averaged over the seeds, a task's gain is the
    mean over its states and the score's gain the mean over tasks (as the success rate). The interval resamples
    the states within each task (a percentile bootstrap): it is the states' noise with these seeds' policies, where
    a t over a few seeds has little to go on. Returns (gain, low, high)."""
    changes = [np.asarray(final[t], float).mean(0) - np.asarray(base[t], float).mean(0) for t in base]
    estimate = float(np.mean([c.mean() for c in changes]))
    rng = np.random.default_rng(seed)
    draws = np.mean([c[rng.integers(0, len(c), size=(reps, len(c)))].mean(1) for c in changes], axis=0)
    lo, hi = np.quantile(draws, [(1 - level) / 2, 1 - (1 - level) / 2])
    return estimate, float(lo), float(hi)
