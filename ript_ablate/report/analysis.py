"""From the tidy frame to decisions: per-configuration comparison, per-factor effects, stability verdicts (the
measures and rules behind those are in `stability.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ript_ablate.report import stats
from ript_ablate.report.collect import CONTROL_COLUMN, StudyData, series
from ript_ablate.report.stability import Thresholds, config_health, run_health, verdict
from ript_ablate.study.adaptive import design_label
from ript_ablate.study.design import effect_terms, fit_effects
from ript_ablate.study.objective import reduce_points
from ript_ablate.tracking import tags as tag
from ript_ablate.tracking.tags import factor_key


@dataclass
class Analysis:
    configs: pd.DataFrame  # per configuration: comparison columns
    runs: pd.DataFrame  # per cell: final, best, auc, stability columns
    effects: list[stats.Effect] = field(default_factory=list)
    interactions: list[stats.Effect] = field(default_factory=list)
    improvement: pd.DataFrame = field(default_factory=pd.DataFrame)  # P(row config > column config)
    verdicts: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # stability metrics no run logged: not computed
    sequential: dict = field(default_factory=dict)  # adaptive seeds: comparison label -> its Decision


HEALTH_METRICS = ("ppo/approx_kl", "ppo/clip_fraction", "grad_norm/backbone", "health/nonfinite_events",
                  "scale/log_b_mean", "sampling/contexts_tried", "sampling/accepted_groups")


def run_table(data: StudyData, th: Thresholds) -> pd.DataFrame:
    """One row per cell: the evaluation curve reduced three ways, and the stability measurements."""
    evals = series(data, data.success_metric)
    training = {m: series(data, m) for m in HEALTH_METRICS}
    per_task = {task: series(data, f"{data.success_metric}/{task}") for task in data.tasks}
    states = {task: series(data, f"eval/states/{task}") for task in data.tasks}
    sampled = {task: series(data, f"train/success_rate/{task}") for task in data.tasks}
    equal_reward = series(data, "sampling/equal_reward_fraction")
    rows = []
    for _, cell in data.cells.iterrows():
        cid = cell["cell_id"]
        curve = evals.loc[cid].dropna() if cid in evals.index else pd.Series(dtype=float)
        points = list(zip(curve.index.astype(int), curve.values))
        metric = {m: frame.loc[cid].dropna().values for m, frame in training.items() if cid in frame.index}
        base = float(points[0][1]) if points and points[0][0] == 0 else float("nan")
        final = reduce_points(points, "final")
        row = {**cell.to_dict(),
               "base": base, "final": final, "gain": final - base, "best": reduce_points(points, "best"),
               "auc": reduce_points(points, "auc"), **run_health(curve.values, metric, th)}
        for task, task_curve in per_task.items():
            row[f"final/{task}"] = _last(task_curve, cid)
            row[f"base/{task}"] = _first(task_curve, cid)
            row[f"states/{task}"] = _last(states[task], cid)
            row[f"sampled/{task}"] = _last(sampled[task], cid)  # the health table: sampled next to evaluated
        row["equal_reward"] = (float(equal_reward.loc[cid].dropna().mean())
                               if cid in equal_reward.index and equal_reward.loc[cid].notna().any() else np.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def _first(frame: pd.DataFrame, cid: str) -> float:
    """The value at iteration 0 (the base's evaluation), nan when the run did not log one."""
    if cid not in frame.index or 0 not in frame.columns:
        return float("nan")
    value = frame.loc[cid, 0]
    return float(value) if value == value else float("nan")


def state_noise(group: pd.DataFrame, tasks: list[str], gain: bool = False) -> float:
    """The evaluation states' own variance in a configuration's mean over tasks: of its final success (p(1 - p) / n
    per task, an upper bound: states differ in difficulty) or of its gain (|d| - d^2 per task over n, d the final
    minus the base: the least it can be, when the final policy succeeds wherever the base did; the base and the final
    are evaluated on the same states, so most of their noise is shared). 0 when the runs did not log state counts."""
    def column(name: str) -> np.ndarray:
        return np.array([group[f"{name}/{t}"].mean() if f"{name}/{t}" in group else np.nan for t in tasks])

    states, final = column("states"), column("final")
    if not gain:
        return stats.state_variance(final, states)
    return gain_state_variance(final - column("base"), states)


def gain_state_variance(change: np.ndarray, states: np.ndarray) -> float:
    """The least variance the shared evaluation states add to a gain averaged over tasks: (|d| - d^2) / n per task,
    d a task's change and n its states; 0 when a change or a count is missing."""
    change, states = np.abs(np.asarray(change, float)), np.asarray(states, float)
    if not (np.isfinite(change).all() and np.isfinite(states).all() and (states > 0).all()) or len(change) == 0:
        return 0.0
    return float(np.sum((change - change ** 2) / states) / len(change) ** 2)


def _last(frame: pd.DataFrame, cid: str) -> float:
    """A cell's last logged value of a metric's series, or nan."""
    return float(frame.loc[cid].dropna().values[-1]) if cid in frame.index and frame.loc[cid].notna().any() else np.nan


def health_table(runs: pd.DataFrame, tasks: list[str]) -> list[list[str]]:
    """Per configuration: each task's sampled success at the last iteration next to its final evaluated success
    (means over seeds, %), and the mean fraction of equal-reward groups over training."""
    rows = []
    for config, group in runs.groupby("config", sort=False):
        cells = []
        for task in tasks:
            s, e = group.get(f"sampled/{task}"), group.get(f"final/{task}")
            sampled = f"{100 * s.mean():.0f}" if s is not None and s.notna().any() else "-"
            evaluated = f"{100 * e.mean():.0f}" if e is not None and e.notna().any() else "-"
            cells.append(f"{sampled} / {evaluated}")
        share = group["equal_reward"] if "equal_reward" in group else pd.Series(dtype=float)
        rows.append([str(config), *cells, f"{100 * share.mean():.0f}%" if share.notna().any() else "-"])
    return rows


def outcome_matrices(runs: list[dict[int, dict[str, str]]], tasks: list[str] | None = None
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None:
    """Per task, seeds x states of 0/1 at iteration 0 and at each run's last full evaluation, from the runs'
    outcome tags (collect.state_outcomes); None unless every run has both on the same tasks (`tasks` when given)
    and states."""
    pairs = []
    for found in runs:
        if 0 not in found or len(found) < 2:  # the base is the iteration-0 evaluation (a resumed run has none)
            return None
        pairs.append((found[0], found[max(found)]))
    names = sorted(pairs[0][0]) if pairs else []
    shapes = {t: len(pairs[0][0][t]) for t in names}
    if not names or (tasks and names != sorted(tasks)) or any(
            sorted(b) != names or sorted(f) != names or any(len(b[t]) != shapes[t] or len(f[t]) != shapes[t]
                                                            for t in names) for b, f in pairs):
        return None
    bits = lambda text: np.frombuffer(text.encode(), np.uint8) - ord("0")  # noqa: E731
    return ({t: np.stack([bits(b[t]) for b, _ in pairs]) for t in names},
            {t: np.stack([bits(f[t]) for _, f in pairs]) for t in names})


def state_gain(data: StudyData, cell_ids: list[str], reps: int) -> dict[str, float]:
    """The gain paired per evaluation state (stats.state_paired_gain) of a configuration's runs, where their
    outcome tags allow it (outcome_matrices, over every task of the study); NaN otherwise (older runs, a
    metrics.csv, a task with more states than a tag holds)."""
    matrices = outcome_matrices([data.outcomes.get(cell, {}) for cell in cell_ids], data.tasks)
    if matrices is None:
        return {"state_gain": float("nan"), "state_gain_lo": float("nan"), "state_gain_hi": float("nan"),
                "state_gain_states": 0}
    gain, lo, hi = stats.state_paired_gain(*matrices, reps)
    return {"state_gain": gain, "state_gain_lo": lo, "state_gain_hi": hi,
            "state_gain_states": sum(m.shape[1] for m in matrices[0].values())}


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
        final, flo, fhi, method = stats.seed_interval(m, reps, state_var=state_noise(group, data.tasks))
        best, blo, bhi, _ = stats.seed_interval(group[["best"]].to_numpy(float), reps)
        iqm_point = stats.iqm(m)
        ilo, ihi = (stats.interval_estimates({"iqm": m}, stats.iqm, min(reps, 1000))[1]["iqm"]
                    if len(group) >= stats.MIN_BOOTSTRAP_SEEDS else (float("nan"), float("nan")))  # none for few seeds
        auc, alo, ahi, _ = stats.seed_interval(group[["auc"]].to_numpy(float), reps)
        gains = group["gain"].dropna().to_numpy(float)
        gain = stats.paired_effect(str(config), gains, reps,
                                   state_var=state_noise(group, data.tasks, gain=True))
        by_state = state_gain(data, list(group["cell_id"]), reps)
        rows.append({"config": config, "seeds": len(group), "interval": method,
                     "base": float(group["base"].mean()), "gain": gain.estimate, "gain_lo": gain.low,
                     "gain_hi": gain.high, "gain_p": gain.p_value, **by_state,
                     "final": final, "final_lo": flo, "final_hi": fhi,
                     "best": best, "best_lo": blo, "best_hi": bhi, "iqm": iqm_point, "iqm_lo": ilo, "iqm_hi": ihi,
                     "auc": auc, "auc_lo": alo, "auc_hi": ahi, **config_health(group, th)})
    configs = pd.DataFrame(rows).sort_values("final", ascending=False).reset_index(drop=True)
    names = list(configs["config"])
    improvement = pd.DataFrame(
        [[stats.probability_of_improvement(matrices[a], matrices[b]) if a != b else np.nan for b in names]
         for a in names], index=names, columns=names)
    logged = set(data.frame["metric"]) if not data.frame.empty else set()
    analysis = Analysis(configs, runs, improvement=improvement, missing=[m for m in HEALTH_METRICS if m not in logged])
    in_effects = runs[runs[CONTROL_COLUMN].isna()] if CONTROL_COLUMN in runs else runs  # controls stand apart
    if data.spec.mode == "grid" and data.spec.design is not None:  # a fraction has no pairs: a regression
        analysis.effects, analysis.interactions = design_effects(in_effects, data)
    elif data.spec.mode == "grid":  # a search's configurations share no levels to pair on: importances instead
        analysis.effects = factor_effects(in_effects, data, reps)
        analysis.interactions = interactions(in_effects, data, reps)
    if data.spec.seed_plan and data.spec.mode == "grid":
        from ript_ablate.study.adaptive import looks

        reduction = data.spec.objective.reduction
        values = {r["cell_id"]: float(r[reduction]) for _, r in runs.iterrows() if r[reduction] == r[reduction]}
        analysis.sequential = looks(data.spec, values, int(runs["seed"].max()) + 1)
    if data.spec.design is None:  # a design's effects are Holm-corrected over all its effects already
        p_adj = stats.holm([e.p_value for e in analysis.effects]) if analysis.effects else []
        for effect, p in zip(analysis.effects, p_adj):
            effect.p_holm = p
    analysis.verdicts = {row["config"]: verdict(row, th) for _, row in configs.iterrows()}
    return analysis


def short(factor: str) -> str:
    """'factor.algo.ppo_clip_high' -> 'ppo_clip_high' (as configurations are described)."""
    return factor.split(".", 2)[-1]


def _levels(data: StudyData, factor: str, runs: pd.DataFrame) -> list:
    key = factor_key(factor)
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


def design_effects(runs: pd.DataFrame, data: StudyData,
                   level: float = 0.95) -> tuple[list[stats.Effect], list[stats.Effect]]:
    """Main effects and (at resolution V and above) two-factor interactions of a screening design: a least-squares fit
    of final success on the +-1 coded factors and their pairwise products, with seeds as blocks. Each effect is the
    difference between the means of its high and low halves, twice the coded coefficient; its interval and p-value
    are the fit's t with the residual degrees of freedom. Terms aliased with each other (resolution below V) are
    left out of the fit; the alias table in the report says with what."""
    from scipy import stats as sps

    design = data.spec.design
    keys = list(design.keys)
    columns = [tag.FACTOR_PREFIX + k for k in keys]
    used = runs.dropna(subset=["final"])
    if used.empty or not all(c in used for c in columns):
        return [], []
    coded = np.column_stack([[1.0 if v == data.spec.factors[k][1] else -1.0 for v in used[c]]
                             for k, c in zip(keys, columns)])
    terms = effect_terms(design)
    y = used["final"].to_numpy(float)
    effects, errors, dof = fit_effects(coded, used["seed"].to_numpy(), y, terms)
    out: list[stats.Effect] = []
    quantile = float(sps.t.ppf(1 - (1 - level) / 2, dof)) if dof > 0 else float("nan")
    for term, effect, se in zip(terms, effects, errors):
        t = effect / se if se > 0 else float("nan")
        if not (np.isfinite(effect) and np.isfinite(se)):  # not estimable, or no residual freedom: nothing decided
            p = 1.0
        else:
            p = float(2 * sps.t.sf(abs(t), dof)) if se > 0 else (1.0 if effect == 0 else 0.0)
        label = design_label(data.spec, term)
        out.append(stats.Effect(label, float(effect), float(effect - quantile * se), float(effect + quantile * se), p,
                                len(y), sd=float(se * np.sqrt(len(y))) if np.isfinite(se) else float("nan")))
    mains = out[:len(keys)]
    pairs = out[len(keys):]
    for effect, p_holm in zip(out, stats.holm([e.p_value for e in out])):  # familywise over every effect
        effect.p_holm = p_holm
    return mains, pairs


def design_summary(mains: list[stats.Effect], pairs: list[stats.Effect]) -> list[str]:
    """Plain-language sentences for a screening design's decided effects (Holm p < 0.05, interval excluding 0): a
    main effect alone, or, where one of its interactions is decided, the effect at each level of the other factor
    (main +- interaction: each half's difference of means)."""
    if any(not np.isfinite(e.estimate) for e in mains):
        return ["Not estimable yet: a configuration of the design has no result, so the switches' effects cannot be "
                "told apart; nothing is decided until every configuration has at least one seed."]
    decided = [e for e in [*mains, *pairs] if e.p_holm < 0.05 and e.excludes_zero]
    if not decided:
        return ["No effect of the design is decided at the 5% familywise level: with these seeds, none of the "
                "switches (nor any two together) moves final success detectably."]
    by_factor = {e.label.split(":")[0]: e for e in mains}
    lines = []
    for pair in (e for e in decided if " x " in e.label):
        a, b = pair.label.split(" x ")
        for first, other in ((a, b), (b, a)):
            main = by_factor.get(first)
            if main is None:
                continue
            change = main.label.split(": ", 1)[-1]
            lines.append(f"{first} ({change}) changes final success by {100 * (main.estimate + pair.estimate):+.1f} "
                         f"points at the high level of {other} and by {100 * (main.estimate - pair.estimate):+.1f} "
                         f"at its low level (interaction {100 * pair.estimate:+.1f} [{100 * pair.low:+.1f}, "
                         f"{100 * pair.high:+.1f}]).")
            break
    for main in (e for e in decided if " x " not in e.label):
        name, change = main.label.split(": ", 1)
        lines.append(f"{name} ({change}) changes final success by {100 * main.estimate:+.1f} points "
                     f"[{100 * main.low:+.1f}, {100 * main.high:+.1f}] averaged over the other switches.")
    return lines
