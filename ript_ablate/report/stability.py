"""Is training stable? Curve-health measures of one run (drawdown, collapse, approx-KL spikes and how long they
persist, clip-fraction spikes, gradient-norm outliers, non-finite updates, scale drift) and the plain-language
verdict for a configuration, with the thresholds that decide it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass
class Thresholds:
    collapse: float = 0.15  # a fall of this much below the running best that is not recovered
    kl_spike_factor: float = 5.0  # approx-KL above this multiple of its median
    kl_spike_floor: float = 0.02
    clip_spike: float = 0.5  # clip fraction above this
    grad_outlier_k: float = 5.0  # robust standard deviations above the median
    spread: float = 0.2  # seed-to-seed range of final success that counts as unstable
    persistence: int = 2  # consecutive spike iterations that make a warning sign count on its own


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


def run_health(curve: np.ndarray, metric: dict[str, np.ndarray], th: Thresholds) -> dict[str, float]:
    """One run's stability measurements: `curve` is its evaluation success over iterations, `metric` its training
    series by name (ppo/approx_kl, ppo/clip_fraction, grad_norm/backbone, health/nonfinite_events,
    scale/log_b_mean, sampling/contexts_tried, sampling/accepted_groups; missing ones read as empty)."""
    def get(name: str) -> np.ndarray:
        return np.asarray(metric.get(name, []), float)

    kl = spike_mask(get("ppo/approx_kl"), th.kl_spike_factor, th.kl_spike_floor)
    log_b, tried, accepted = get("scale/log_b_mean"), get("sampling/contexts_tried"), get("sampling/accepted_groups")
    return {"drawdown": drawdown(curve), "collapsed": collapsed(curve, th.collapse),
            "kl_spikes": int(kl.sum()), "kl_run": longest_run(kl),
            "clip_spikes": int(np.sum(get("ppo/clip_fraction") > th.clip_spike)),
            "grad_outliers": outliers(get("grad_norm/backbone"), th.grad_outlier_k),
            "nonfinite": float(np.nansum(get("health/nonfinite_events"))),
            "log_b_drift": float(log_b[-1] - log_b[0]) if len(log_b) > 1 else 0.0,
            "tried_per_group": float(tried.sum() / accepted.sum()) if accepted.sum() > 0 else float("nan")}


def config_health(group: pd.DataFrame, th: Thresholds) -> dict[str, float]:
    """A configuration's stability columns from its runs' `run_health` rows (one per seed)."""
    return {"spread": float(group["final"].max() - group["final"].min()),
            "collapse_rate": float(group["collapsed"].mean()), "max_drawdown": float(group["drawdown"].max()),
            "kl_spikes": int(group["kl_spikes"].sum()), "kl_run": int(group["kl_run"].max()),
            "kl_with_drawdown": int(((group["kl_spikes"] > 0) & (group["drawdown"] >= th.collapse)).sum()),
            "clip_spikes": int(group["clip_spikes"].sum()),
            "grad_outliers": int(group["grad_outliers"].sum()), "nonfinite": float(group["nonfinite"].sum()),
            "log_b_drift": float(group["log_b_drift"].mean()),
            "tried_per_group": float(group["tried_per_group"].mean())}


def verdict(row: pd.Series, th: Thresholds) -> str:
    """One plain line: stable or not, and which rule fired. A warning sign (an approx-KL spike) counts only when
    it persists over `th.persistence` consecutive iterations or comes with a consequence (a drawdown of at least
    the collapse threshold in the same run): one noisy value does not make a run unstable."""
    reasons, notes = [], []
    if row["nonfinite"] > 0:
        reasons.append(f"{row['nonfinite']:.0f} non-finite update(s)")
    if row["collapse_rate"] > 0:
        reasons.append(f"collapse: {row['collapse_rate']:.0%} of seeds collapsed (fell more than {th.collapse:.2f} "
                       f"below their best and stayed; largest drawdown {row['max_drawdown']:.2f})")
    if row["spread"] > th.spread:
        reasons.append(f"spread: seeds disagree by {row['spread']:.2f} in final success (> {th.spread:.2f})")
    if row["kl_spikes"] > 0:
        if row["kl_run"] >= th.persistence:
            reasons.append(f"persistent approx-KL spikes ({row['kl_run']} iterations in a row)")
        elif row["kl_with_drawdown"] > 0:
            reasons.append(f"approx-KL spike with a drawdown >= {th.collapse:.2f} in {row['kl_with_drawdown']} run(s)")
        else:
            notes.append(f"{row['kl_spikes']} isolated approx-KL spike(s), no drawdown: not counted")
    if row["grad_outliers"] > 0:
        notes.append(f"{row['grad_outliers']} gradient-norm outlier(s)")
    if row["clip_spikes"]:
        notes.append(f"clip fraction above {th.clip_spike} on {row['clip_spikes']} iteration(s)")
    tail = ("; " + "; ".join(notes)) if notes else ""
    if not reasons:
        return (f"stable: no collapse, seeds within {row['spread']:.2f}, largest drawdown {row['max_drawdown']:.2f}"
                + tail)
    return "unstable: " + "; ".join(reasons) + tail
