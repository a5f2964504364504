"""The study objective: one number per run (a reduction over its evaluation points), one per configuration
(an aggregation over its seeds). Shared by the runner, the Optuna sampler and the report."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def metric_points(history: Iterable[dict], metric: str) -> list[tuple[int, float]]:
    """(iteration, value) of a metric, one per iteration (the last logged wins: a resumed run re-evaluates the
    iteration it resumed from), in iteration order."""
    points: dict[int, float] = {}
    for entry in history:
        if metric in entry:
            points[int(entry["iteration"])] = float(entry[metric])
    return sorted(points.items())


def reduce_points(points: Sequence[tuple[int, float]], reduction: str, direction: str = "maximize") -> float:
    """final: the last value; best: the best value; auc: the area under the curve divided by its span, i.e. the
    mean value over training (trapezoids over the iterations where it was measured)."""
    if not points:
        return float("nan")
    xs = np.array([p[0] for p in points], dtype=float)
    ys = np.array([p[1] for p in points], dtype=float)
    if reduction == "final":
        return float(ys[-1])
    if reduction == "best":
        return float(ys.max() if direction == "maximize" else ys.min())
    if reduction == "auc":
        if len(xs) == 1 or xs[-1] == xs[0]:
            return float(ys.mean())
        return float(np.trapezoid(ys, xs) / (xs[-1] - xs[0]))
    raise ValueError(f"unknown reduction {reduction!r}")


def iqm(values: Sequence[float]) -> float:
    """Interquartile mean (rliable): the mean of the middle 50% of all values (a runs x tasks matrix counts every
    score), robust to one outlying seed."""
    from scipy import stats  # here, not at import: every cell imports this module and scipy costs a second

    return float(stats.trim_mean(np.asarray(values, dtype=float).ravel(), 0.25))


def aggregate(values: Sequence[float], aggregation: str) -> float:
    if len(values) == 0:
        return float("nan")
    if aggregation == "mean":
        return float(np.mean(values))
    if aggregation == "iqm":
        return iqm(values)
    raise ValueError(f"unknown aggregation {aggregation!r}")
