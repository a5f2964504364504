"""From the tidy frame to decisions: per-configuration comparison, per-factor effects, stability verdicts."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ript_ablate.report import stats
from ript_ablate.report.collect import StudyData, series
from ript_ablate.study.objective import reduce_points

EVAL = "eval/success_rate"


@dataclass
class Thresholds:
    collapse: float = 0.15  # a fall of this much below the running best that is not recovered
    kl_spike_factor: float = 5.0  # approx-KL above this multiple of its median
    kl_spike_floor: float = 0.02
    clip_spike: float = 0.5  # clip fraction above this
    grad_outlier_k: float = 5.0  # robust standard deviations above the median
    spread: float = 0.2  # seed-to-seed range of final success that counts as unstable
    persistence: int = 2  # consecutive spike iterations that make a warning sign count on its own


@dataclass
class Analysis:
    configs: pd.DataFrame  # per configuration: comparison columns
    runs: pd.DataFrame  # per cell: final, best, auc, stability columns
    effects: list[stats.Effect] = field(default_factory=list)
    interactions: list[stats.Effect] = field(default_factory=list)
    improvement: pd.DataFrame = field(default_factory=pd.DataFrame)  # P(row config > column config)
    verdicts: dict[str, str] = field(default_factory=dict)


def run_table(data: StudyData, th: Thresholds) -> pd.DataFrame:
    """One row per cell: the evaluation curve reduced three ways, and the stability measurements."""
    evals = series(data, EVAL)
    get = {m: series(data, m) for m in ("ppo/approx_kl", "ppo/clip_fraction", "grad_norm/backbone",
                                          "health/nonfinite_events", "scale/log_b_mean", "sampling/contexts_tried",
                                          "sampling/accepted_groups")}
    rows = []
    for _, cell in data.cells.iterrows():
        cid = cell["cell_id"]
        curve = evals.loc[cid].dropna() if cid in evals.index else pd.Series(dtype=float)
        points = list(zip(curve.index.astype(int), curve.values))

        def values(metric: str) -> np.ndarray:
            frame = get[metric]
            return frame.loc[cid].dropna().values if cid in frame.index else np.array([])

        tried, accepted = values("sampling/contexts_tried"), values("sampling/accepted_groups")
        log_b = values("scale/log_b_mean")
        kl = stats.spike_mask(values("ppo/approx_kl"), th.kl_spike_factor, th.kl_spike_floor)
        base = float(points[0][1]) if points and points[0][0] == 0 else float("nan")
        final = reduce_points(points, "final")
        row = {**cell.to_dict(),
               "base": base, "final": final, "gain": final - base, "best": reduce_points(points, "best"),
               "auc": reduce_points(points, "auc"), "drawdown": stats.drawdown(curve.values),
               "collapsed": stats.collapsed(curve.values, th.collapse),
               "kl_spikes": int(kl.sum()), "kl_run": stats.longest_run(kl),
               "clip_spikes": int(np.sum(values("ppo/clip_fraction") > th.clip_spike)),
               "grad_outliers": stats.outliers(values("grad_norm/backbone"), th.grad_outlier_k),
               "nonfinite": float(np.nansum(values("health/nonfinite_events"))),
               "log_b_drift": float(log_b[-1] - log_b[0]) if len(log_b) > 1 else 0.0,
               "tried_per_group": float(tried.sum() / accepted.sum()) if accepted.sum() > 0 else float("nan")}
        for task in data.tasks:
            metric = f"{EVAL}/{task}"
            task_curve = series(data, metric)
            row[f"final/{task}"] = (float(task_curve.loc[cid].dropna().values[-1])
                                    if cid in task_curve.index and task_curve.loc[cid].notna().any() else np.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def score_matrix(runs: pd.DataFrame, tasks: list[str], column: str = "final") -> np.ndarray:
    """seeds x tasks of final per-task success (the overall score when per-task values are absent)."""
    cols = [f"{column}/{t}" for t in tasks if f"{column}/{t}" in runs]
    if cols and column == "final" and not runs[cols].isna().any().any():
        return runs[cols].to_numpy(float)
    return runs[[column]].to_numpy(float)


def analyse(data: StudyData, th: Thresholds | None = None, reps: int = 2000) -> Analysis:
    th = th or Thresholds()
    runs = run_table(data, th)
    if runs.empty:
        return Analysis(pd.DataFrame(), runs)
    rows = []
    matrices = {}
    for config, group in runs.groupby("config", sort=False):
        m = score_matrix(group, data.tasks)
        matrices[config] = m
        final, flo, fhi, method = stats.seed_interval(m, reps)
        best, blo, bhi, _ = stats.seed_interval(group[["best"]].to_numpy(float), reps)
        iqm_point, ilo, ihi = stats.stratified_bootstrap_ci(m, stats.iqm, min(reps, 1000))
        if len(group) < stats.MIN_BOOTSTRAP_SEEDS:
            ilo = ihi = float("nan")  # no honest interval for an IQM of so few seeds
        auc, alo, ahi, _ = stats.seed_interval(group[["auc"]].to_numpy(float), reps)
        gains = group["gain"].dropna().to_numpy(float)
        gain = stats.paired_effect(str(config), gains, reps)
        rows.append({"config": config, "seeds": len(group), "interval": method,
                     "base": float(group["base"].mean()), "gain": gain.estimate, "gain_lo": gain.low,
                     "gain_hi": gain.high, "gain_p": gain.p_value,
                     "final": final, "final_lo": flo, "final_hi": fhi,
                     "best": best, "best_lo": blo, "best_hi": bhi, "iqm": iqm_point, "iqm_lo": ilo, "iqm_hi": ihi,
                     "auc": auc, "auc_lo": alo, "auc_hi": ahi,
                     "spread": float(group["final"].max() - group["final"].min()),
                     "collapse_rate": float(group["collapsed"].mean()), "max_drawdown": float(group["drawdown"].max()),
                     "kl_spikes": int(group["kl_spikes"].sum()), "kl_run": int(group["kl_run"].max()),
                     "kl_with_drawdown": int(((group["kl_spikes"] > 0) & (group["drawdown"] >= th.collapse)).sum()),
                     "clip_spikes": int(group["clip_spikes"].sum()),
                     "grad_outliers": int(group["grad_outliers"].sum()), "nonfinite": float(group["nonfinite"].sum()),
                     "log_b_drift": float(group["log_b_drift"].mean()),
                     "tried_per_group": float(group["tried_per_group"].mean())})
    configs = pd.DataFrame(rows).sort_values("final", ascending=False).reset_index(drop=True)
    names = list(configs["config"])
    improvement = pd.DataFrame(
        [[stats.probability_of_improvement(matrices[a], matrices[b]) if a != b else np.nan for b in names]
         for a in names], index=names, columns=names)
    analysis = Analysis(configs, runs, improvement=improvement)
    if data.spec.mode == "grid":  # a search's configurations share no levels to pair on: importances instead
        analysis.effects = factor_effects(runs, data, reps)
        analysis.interactions = interactions(runs, data, reps)
    p_adj = stats.holm([e.p_value for e in analysis.effects]) if analysis.effects else []
    for effect, p in zip(analysis.effects, p_adj):
        effect.p_holm = p
    analysis.verdicts = {row["config"]: verdict(row, th) for _, row in configs.iterrows()}
    return analysis


def short(factor: str) -> str:
    """'factor.algo.ppo_clip_high' -> 'ppo_clip_high' (as configurations are described)."""
    return factor.split(".", 2)[-1]


def _levels(data: StudyData, factor: str, runs: pd.DataFrame) -> list:
    key = factor[len("factor."):]
    spec_levels = data.spec.factors.get(key)
    present = list(dict.fromkeys(runs[factor].tolist()))
    return [v for v in spec_levels if v in present] if spec_levels else sorted(present, key=str)


def factor_effects(runs: pd.DataFrame, data: StudyData, reps: int) -> list[stats.Effect]:
    """Each level against the factor's first level, paired on seed and every other factor."""
    effects = []
    factors = data.factors
    for factor in factors:
        levels = _levels(data, factor, runs)
        others = ["seed", *[f for f in factors if f != factor]]
        wide = runs.pivot_table(index=others, columns=factor, values="final", aggfunc="mean")
        for level in levels[1:]:
            if levels[0] not in wide or level not in wide:
                continue
            diffs = (wide[level] - wide[levels[0]]).dropna().to_numpy()
            label = f"{short(factor)}: {levels[0]} -> {level}"
            effects.append(stats.paired_effect(label, diffs, reps))
    return effects


def interactions(runs: pd.DataFrame, data: StudyData, reps: int) -> list[stats.Effect]:
    """For two-level factor pairs on a complete grid: (A1B1 - A0B1) - (A1B0 - A0B0), paired on the rest."""
    out = []
    factors = [f for f in data.factors if len(_levels(data, f, runs)) == 2]
    for i, a in enumerate(factors):
        for b in factors[i + 1:]:
            a0, a1 = _levels(data, a, runs)
            b0, b1 = _levels(data, b, runs)
            others = ["seed", *[f for f in data.factors if f not in (a, b)]]
            wide = runs.pivot_table(index=others, columns=[a, b], values="final", aggfunc="mean")
            need = [(a0, b0), (a0, b1), (a1, b0), (a1, b1)]
            if not all(k in wide.columns for k in need):
                continue
            diffs = ((wide[(a1, b1)] - wide[(a0, b1)]) - (wide[(a1, b0)] - wide[(a0, b0)])).dropna().to_numpy()
            label = f"{short(a)} x {short(b)}"
            out.append(stats.paired_effect(label, diffs, reps))
    return out


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
