"""`ript-ablate report STUDY`: collect, analyse, plot, and write reports/<study>/report.md (+ PNGs and the tidy
CSV), then attach the same files to the study's parent MLflow run."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ript_ablate.progress import console
from ript_ablate.report import plots, stats
from ript_ablate.report.analysis import Analysis, analyse, design_summary, health_table
from ript_ablate.report.collect import StudyData, collect, expected_cells, from_metrics_csv
from ript_ablate.report.stability import Thresholds
from ript_ablate.study.spec import StudySpec, describe, format_value


def _pct(x: float) -> str:
    return "-" if not np.isfinite(x) else f"{100 * x:.1f}"


def _ci(point: float, lo: float, hi: float, signed: bool = False) -> str:
    fmt = (lambda x: "-" if not np.isfinite(x) else f"{100 * x:+.1f}") if signed else _pct
    if not np.isfinite(lo):
        return fmt(point)
    return f"{fmt(point)} [{fmt(lo)}, {fmt(hi)}]"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def optuna_section(spec: StudySpec, storage: str | None, out: Path) -> tuple[str, list[Path], dict[str, str]]:
    """Best configurations, importances and history from the study's Optuna storage (optuna mode only)."""
    import optuna

    from ript_ablate.study.store import load_search

    search = load_search(spec, spec.storage_url(storage))
    trials = (search.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs")) if search
              else pd.DataFrame())
    if search is None or trials.empty:
        return "No configurations have been sampled yet.", [], {}
    expected = {}
    for t in search.get_trials(deepcopy=False):
        if "config_id" in t.user_attrs:
            for s in spec.seeds:
                expected[f"{t.user_attrs['config_id']}-s{s}"] = describe(t.params)
    done = trials[trials["state"] == "COMPLETE"].sort_values("value", ascending=spec.objective.direction != "maximize")
    param_cols = [c for c in trials.columns if c.startswith("params_")]
    rows = [[str(int(r["number"])), f"{r['value']:.3f}", *[format_value(r[c]) for c in param_cols]]
            for _, r in done.head(5).iterrows()]
    text = ["### Best configurations (Optuna)", "",
            _table(["trial", f"objective ({spec.objective.aggregation} over seeds)",
                    *[c[len("params_algo."):] if c.startswith("params_algo.") else c[7:] for c in param_cols]], rows)]
    figures = []
    history = plots.optuna_history(trials, spec.objective.direction, out / "optuna_history.png")
    if history:
        figures.append(history)
        text += ["", f"![optimisation history]({history.name})"]
    completed = [t for t in search.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(completed) >= 2:
        try:
            imp = optuna.importance.get_param_importances(
                search, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
        except (RuntimeError, ValueError) as exc:
            imp = {}
            text += ["", f"Parameter importances not available: {exc}"]
        if imp:
            path = plots.importances(imp, out / "optuna_importances.png")
            figures.append(path)
            text += ["", "Parameter importances (PED-ANOVA): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in imp.items()), "", f"![importances]({path.name})"]
    params = {c[len("params_"):]: c for c in param_cols}
    scatter = plots.objective_vs_params(done, params, spec.objective.metric, out / "optuna_params.png")
    if scatter:
        figures.append(scatter)
        text += ["", "Which parameters matter: a search's configurations share no levels to pair on, so instead of "
                 "paired effects, the importances above and the objective against each parameter (one point per "
                 "completed configuration):", "", f"![objective against each parameter]({scatter.name})"]
    n_pruned = int((trials["state"] == "PRUNED").sum())
    text += ["", f"{len(done)} configuration(s) complete, {n_pruned} pruned, "
             f"{int((trials['state'] == 'FAIL').sum())} failed."]
    return "\n".join(text), figures, expected


def write_report(spec: StudySpec, out_root: Path = Path("reports"), storage: str | None = None,
                 tracking_uri: str | None = None, thresholds: Thresholds | None = None,
                 upload: bool = True, metrics_csv: Path | None = None) -> Path:
    """The report of `spec` from its runs in MLflow, or (`metrics_csv`, a grid study's) from the metrics a report
    wrote, with no MLflow: a committed report rebuilt from its own numbers."""
    from ript_ablate.tracking import check_tracking_store, describe_tracking_uri, resolve_tracking_uri

    start = time.perf_counter()
    th = thresholds or Thresholds()
    out = out_root / spec.name
    optuna_text, optuna_figs, expected = ("", [], None)
    if metrics_csv is not None:
        if spec.mode != "grid":
            from ript_ablate.errors import RiptAblateError

            raise RiptAblateError(f"--from-metrics rebuilds a grid study's report; {spec.path} is a {spec.mode} study")
        data = from_metrics_csv(spec, metrics_csv)
        out.mkdir(parents=True, exist_ok=True)
        upload = False
    else:
        tracking_uri = resolve_tracking_uri(tracking_uri or spec.tracking_uri)
        check_tracking_store(tracking_uri)
        out.mkdir(parents=True, exist_ok=True)
        if spec.mode == "optuna":
            optuna_text, optuna_figs, expected = optuna_section(spec, storage, out)
        data = collect(spec, tracking_uri, expected if spec.mode == "optuna" else expected_cells(spec))
        if data.parent_run_id is None:
            from ript_ablate.errors import RiptAblateError

            raise RiptAblateError(f"no runs of study {spec.name!r} in MLflow experiment {spec.experiment_name!r} "
                                  f"at {describe_tracking_uri(tracking_uri)}; run `ript-ablate study run "
                                  f"{spec.path}` with the same tracking URI")
    if metrics_csv is None or Path(metrics_csv).resolve() != (out / "metrics.csv").resolve():
        data.frame.to_csv(out / "metrics.csv", index=False)
    analysis = analyse(data, th)
    figures = [f for f in (
        plots.learning_curves(data, analysis, out / "learning_curves.png"),
        plots.final_by_config(analysis, out / "final_success.png"),
        plots.forest(analysis.effects + analysis.interactions, out / "effects.png",
                     "Factor effects and interactions on final success (95% intervals; green/red: excludes 0)"),
        plots.stability_panels(data, analysis, out / "stability.png"),
        plots.interaction_plot(analysis.runs, spec, [e.label for e in analysis.interactions
                                                      if spec.design is not None and e.p_holm < 0.05
                                                      and e.excludes_zero], out / "interactions.png"),
    ) if f] + optuna_figs
    text = render(data, analysis, th, optuna_text, time.perf_counter() - start)
    report = out / "report.md"
    report.write_text(text)
    if upload and data.parent_run_id:
        from ript_ablate.tracking.runs import log_report

        log_report(tracking_uri, data.parent_run_id, [report, out / "metrics.csv", *figures], "report")
    console.print(f"report written to {report} ({len(figures)} figures) in {time.perf_counter() - start:.1f}s")
    return report


def render(data: StudyData, a: Analysis, th: Thresholds, optuna_text: str, seconds: float) -> str:
    spec = data.spec
    lines = [f"# Study `{spec.name}`", ""]
    if spec.description:
        lines += [spec.description, ""]
    n_cells = len(data.cells)
    lines += [f"Mode {spec.mode}; base config `{spec.config_path}`; seeds {spec.seeds}; objective: "
              f"{spec.objective.reduction} `{spec.objective.metric}` ({spec.objective.aggregation} over seeds, "
              f"{spec.objective.direction}). {n_cells} cell(s) with a result"
              + (f", {data.failed_attempts} failed or killed attempt(s) left out" if data.failed_attempts else "")
              + f"; tasks: {', '.join(data.tasks) or '-'}. "
              + (f"MLflow parent run `{data.parent_run_id}`." if data.parent_run_id
                 else "Rebuilt from `metrics.csv` (not read from MLflow)."), ""]
    if data.missing:
        lines += [f"**Partial study: {len(data.missing)} cell(s) missing** (no finished run yet); the statistics "
                  "below use what exists:", ""] + [f"- {m}" for m in data.missing] + [""]
    if data.pruned:
        lines += [f"{len(data.pruned)} cell(s) **pruned** by the study's pruner (stopped early as unpromising; left "
                  "out of the comparison):", ""] + [f"- {m}" for m in data.pruned] + [""]
    if a.configs.empty:
        return "\n".join(lines + ["No finished runs to report yet."])
    if spec.design is not None and a.effects:
        lines += ["**In short** (the screening design's decided effects):", "",
                  *[f"- {line}" for line in design_summary(a.effects, a.interactions)], ""]
    lines += ["## Comparison", "",
              "Success rates in %. **Base** is the evaluation before the first update (iteration 0), **gain** the "
              "final evaluation minus the base, paired per seed: a configuration that gains nothing is told apart "
              "from one that hurts. Final: the last evaluation; best: the best evaluation of a run; IQM: "
              "interquartile mean of seed x task final scores; AUC: the mean success over training. Intervals are "
              "95% and honest for the seeds they rest on (column *interval*): none for one seed, a Student-t "
              f"interval over seeds below {stats.MIN_BOOTSTRAP_SEEDS} seeds (a bootstrap of 2-4 seeds is little more "
              "than their range), rliable's stratified bootstrap (seeds resampled within each task) from "
              f"{stats.MIN_BOOTSTRAP_SEEDS} seeds on; the IQM gets no interval below that. Where runs logged their "
              "evaluation states per task (*+ evaluation states*), the final score's interval also carries the "
              "states' binomial noise, p(1 - p) / n per task, which the seeds share and so do not show; the gain's, "
              "the least the states can add, (|d| - d^2) / n for a change d (the base and the final share the states).",
              "",
              _table(["configuration", "seeds", "base", "final", "gain", "best", "IQM", "AUC", "interval"],
                     [[r["config"], str(r["seeds"]), _pct(r["base"]), _ci(r["final"], r["final_lo"], r["final_hi"]),
                       _ci(r["gain"], r["gain_lo"], r["gain_hi"], signed=True),
                       _ci(r["best"], r["best_lo"], r["best_hi"]), _ci(r["iqm"], r["iqm_lo"], r["iqm_hi"]),
                       _ci(r["auc"], r["auc_lo"], r["auc_hi"]), r["interval"]] for _, r in a.configs.iterrows()]),
              "", _gain_sentence(a), "", *_state_gain_lines(a),
              "![learning curves](learning_curves.png)", "", "![final success](final_success.png)", ""]
    if a.effects:
        lines += ["## Which switches matter", "",
                  "Main effect of each factor level against the factor's first level on final success (points), "
                  "paired on seed and every other factor; 95% bootstrap interval over the pairs (a Student-t interval "
                  "when there are fewer than 20 pairs, where the percentile bootstrap is too narrow); p-value of a "
                  "paired t-test, Holm-corrected across all main-effect comparisons. Decision: keep or drop when the "
                  "interval excludes 0 and the corrected p < 0.05.", "",
                  *_design_text(spec, a),
                  *_power_text(spec, a),
                  _table(["factor", "effect (points)", "95% interval", "pairs", "p", "p (Holm)", "decision",
                          "MDE 80% (points)", f"seeds for {_min_effect(spec):g} points"],
                         [[e.label, f"{100 * e.estimate:+.1f}", f"[{100 * e.low:+.1f}, {100 * e.high:+.1f}]",
                           str(e.n_pairs), f"{e.p_value:.3g}", f"{e.p_holm:.3g}", _verdict(e, spec, a),
                           *_power(e, spec, a)] for e in a.effects]), ""]
        if a.interactions:
            adaptive = bool(spec.seed_plan and spec.design is not None)
            lines += ["Interactions (difference of differences, paired):", "",
                      _table(["factors", "interaction (points)", "95% interval", "pairs", "p",
                              *(["decision"] if adaptive else [])],
                             [[e.label, f"{100 * e.estimate:+.1f}", f"[{100 * e.low:+.1f}, {100 * e.high:+.1f}]",
                               str(e.n_pairs), f"{e.p_value:.3g}", *([_verdict(e, spec, a)] if adaptive else [])]
                              for e in a.interactions]), ""]
        lines += ["![factor effects](effects.png)", ""]
        if spec.design is not None and any(e.p_holm < 0.05 and e.excludes_zero for e in a.interactions):
            lines += ["![decided interactions](interactions.png)", ""]
    if len(a.improvement) > 1:
        names = list(a.improvement.index)
        lines += ["Probability of improvement P(row > column) on final success (per task, averaged; rliable):", "",
                  _table(["", *names], [[n, *[("-" if np.isnan(v) else f"{v:.2f}") for v in a.improvement.loc[n]]]
                                        for n in names]), ""]
    if optuna_text:
        lines += ["## Search", "", optuna_text, "", *_race_lines(spec, a)]
    lines += ["## Stability", "",
              f"Collapse: a run that falls more than {th.collapse:.2f} below its running best evaluation and ends "
              f"there. KL spike: approx-KL above {th.kl_spike_factor:g}x its median (and {th.kl_spike_floor}); it "
              f"makes a configuration unstable only when it persists {th.persistence}+ iterations in a row or its run "
              f"also has a drawdown of {th.collapse:.2f} or more (the verdict names the rule that fired). "
              f"Gradient outlier: backbone gradient norm more than {th.grad_outlier_k:g} robust SDs above its median. "
              "log b drift: last minus first mean log-scale. Sampling load: contexts tried per accepted group.", "",
              *_not_computed(a),
              _table(["configuration", "verdict", "final spread", "collapse rate", "max drawdown", "KL spikes",
                      "clip>0.5 iters", "grad outliers", "non-finite", "log b drift", "tried/group"],
                     [[r["config"], a.verdicts[r["config"]], f"{r['spread']:.2f}", f"{r['collapse_rate']:.0%}",
                       f"{r['max_drawdown']:.2f}", *_health_cells(r, a.missing)] for _, r in a.configs.iterrows()]),
              "",
              "![stability](stability.png)", "",
              "Health: each task's success of the **sampled** behaviour (the rollouts of the last iteration) next to "
              "the **evaluated** policy's final success (its deterministic action unless `training.eval_mode: "
              "sample`), % (means over seeds), and the share of "
              "equal-reward groups (all K rollouts failed, or all succeeded: no RLOO signal) over training. A sampled "
              "success far below the evaluated one means exploration has drifted from what is evaluated.", "",
              _table(["configuration", *[f"{t} sampled / evaluated" for t in data.tasks], "equal-reward groups"],
                     health_table(a.runs, data.tasks)), "",
              "## Runs", "",
              _table(["cell", "configuration", "seed", "status", "final", "best", "AUC", "drawdown", "MLflow run"],
                     [[r["cell_id"], r["config"], str(r["seed"]), r["status"], _pct(r["final"]), _pct(r["best"]),
                       _pct(r["auc"]), f"{r['drawdown']:.2f}", f"`{r['run_id'][:8]}`"]
                      for _, r in a.runs.sort_values(["config", "seed"]).iterrows()]), "",
              f"Tidy metrics: `metrics.csv` (one row per cell, iteration and metric). Report built in {seconds:.1f}s "
              f"at {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    return "\n".join(lines)


# stability columns, each with the metric it needs
HEALTH_COLUMNS = (("kl_spikes", "ppo/approx_kl", "{}"), ("clip_spikes", "ppo/clip_fraction", "{}"),
                  ("grad_outliers", "grad_norm/backbone", "{}"), ("nonfinite", "health/nonfinite_events", "{:.0f}"),
                  ("log_b_drift", "scale/log_b_mean", "{:+.3f}"),
                  ("tried_per_group", "sampling/accepted_groups", "{:.1f}"))


def _health_cells(row, missing: list[str]) -> list[str]:
    """A configuration's stability measures; '-' where the runs logged no metric to compute one from."""
    return ["-" if metric in missing else fmt.format(row[column]) for column, metric, fmt in HEALTH_COLUMNS]


def _not_computed(a: Analysis) -> list[str]:
    if not a.missing:
        return []
    listed = ", ".join(f"`{m}`" for m in a.missing)
    return [f"Not computed (no run logged these metrics; shown as '-'): {listed}. Log them under these names to get "
            "the corresponding columns.", ""]


def _state_gain_lines(a: Analysis) -> list[str]:
    """The gain paired per evaluation state, where the runs tagged each state's outcome (none otherwise)."""
    if "state_gain" not in a.configs or not np.isfinite(a.configs["state_gain"]).any():
        return []
    rows = [[r["config"], str(r["seeds"]), str(int(r["state_gain_states"])),
             _ci(r["state_gain"], r["state_gain_lo"], r["state_gain_hi"], signed=True)]
            for _, r in a.configs.iterrows() if np.isfinite(r["state_gain"])]
    return ["**Gain paired per evaluation state**: each state's change from the base to the final evaluation, "
            "averaged over the seeds, then over the states of a task and over tasks; the 95% interval resamples the "
            "states within each task, so it is the evaluation states' noise for these seeds' runs (the seeds' own "
            "spread is in the gain column above).", "",
            _table(["configuration", "seeds", "states", "gain"], rows), ""]


def _gain_sentence(a: Analysis) -> str:
    """The headline a reader wants first: which configuration gained most over its starting point, and whether
    the interval says it gained at all."""
    best = a.configs.sort_values("gain", ascending=False).iloc[0]
    if not np.isfinite(best["gain"]):
        return "No configuration has an iteration-0 evaluation to measure a gain from."
    if np.isfinite(best["gain_lo"]):
        verdict = ("its interval excludes 0" if best["gain_lo"] > 0 or best["gain_hi"] < 0
                   else "its interval includes 0: no gain shown")
        interval = f" [{100 * best['gain_lo']:+.1f}, {100 * best['gain_hi']:+.1f}]"
    else:
        verdict, interval = "one seed: no interval", ""
    return (f"Largest gain over the base: **{best['config']}**, {100 * best['gain']:+.1f} points{interval} "
            f"({best['seeds']} seeds; {verdict}).")


def _race_lines(spec: StudySpec, a: Analysis) -> list[str]:
    """The race after an Optuna search, replayed from the cells' objectives: the best with a stated confidence."""
    from ript_ablate.study.adaptive import race, race_entrants

    if spec.race is None or a.runs.empty:
        return []
    reduction = spec.objective.reduction
    scores: dict[str, dict[int, float]] = {}
    for _, r in a.runs.iterrows():
        if r[reduction] == r[reduction]:
            scores.setdefault(r["config_id"], {})[int(r["seed"])] = float(r[reduction])
    entrants = race_entrants(spec, scores)
    if len(entrants) < 2:
        return ["### Race", "", "Fewer than 2 configurations finished all their search seeds: no race.", ""]
    seeds_run = max(len(scores[c]) for c in entrants)
    state = race(spec, scores, entrants, seeds_run)
    plan = spec.race.plan
    lines = ["### Race of the best configurations", "",
             (f"The top {len(entrants)} configurations after the search got added seeds (up to {plan.max}); each was "
              f"tested against the leader on paired seeds (points; O'Brien-Fleming alpha spending at "
              f"{plan.alpha:.0%}, as for adaptive seeds) and dropped once shown worse. Best: **{state.leader}** "
              f"({len(scores[state.leader])} seeds)."), ""]
    rows = []
    for c in entrants:
        if c == state.leader:
            rows.append([c, str(len(scores[c])), "leader"])
            continue
        d = state.dropped.get(c) or state.last.get(c)
        if d is None:
            continue
        if c in state.dropped:
            verdict = f"dropped at {d.seeds} seeds: worse by {-d.estimate:.1f} points [{d.low:+.1f}, {d.high:+.1f}]"
        elif d.state == "no_effect":
            verdict = f"within {plan.min_effect:g} points of the leader (at {d.seeds} seeds)"
        else:
            verdict = (f"undecided at {d.seeds} seeds: {d.low:+.1f} to {d.high:+.1f} points against the leader"
                       + (" (the limit)" if d.seeds >= plan.max else ""))
        rows.append([c, str(len(scores[c])), verdict])
    return [*lines, _table(["configuration", "seeds", "against the leader"], rows), ""]


def _min_effect(spec: StudySpec) -> float:
    """The effect worth finding, in points: the adaptive plan's, else 5 points."""
    return spec.seed_plan.min_effect if spec.seed_plan else 5.0


def _seeds_of(a: Analysis) -> int:
    return int(a.runs["seed"].nunique()) if not a.runs.empty else 0


def _power(e, spec: StudySpec, a: Analysis) -> list[str]:
    """The minimum detectable effect at 80% power with the pairs run, and the seeds a fixed design needs for the
    effect worth finding, from the observed paired spread."""
    from ript_ablate.study.sequential import minimum_detectable_effect, seeds_needed

    if math.isnan(e.sd):
        return ["-", "-"]
    mde = minimum_detectable_effect(100 * e.sd, e.n_pairs)
    need = seeds_needed(_min_effect(spec), 100 * e.sd, max(1, e.n_pairs // max(1, _seeds_of(a))))
    return ["-" if math.isnan(mde) else f"{mde:.1f}", str(need) if need else "> 1000"]


def _verdict(e, spec: StudySpec, a: Analysis) -> str:
    """Adaptive studies: the sequential verdict; otherwise the fixed-design decision."""
    if spec.seed_plan and e.label in a.sequential:
        d = a.sequential[e.label]
        if " -> " not in e.label:  # a design's interaction: its sign, not a level to prefer
            return d.sentence(f"{'+' if d.estimate > 0 else '-'}{abs(d.estimate):.1f} points",
                              spec.seed_plan.min_effect).replace("prefer ", "")
        base, _, level = e.label.partition(": ")[2].partition(" -> ")
        maximize = spec.objective.direction == "maximize"
        return d.sentence(level if (d.estimate > 0) == maximize else base, spec.seed_plan.min_effect)
    return f"{decision(e)} ({_seeds_of(a)} seeds)"


def _design_text(spec: StudySpec, a: Analysis) -> list[str]:
    """A screening design: what it is, how its effects are estimated, and what is aliased with what."""
    if spec.design is None:
        return []
    aliased = spec.design.aliases(2)
    text = [f"Design: {spec.design.describe()}. Its effects come from a least-squares fit of final success on the "
            "+-1 coded factors (and, at resolution V, their pairwise products) with seeds as blocks: each effect is "
            "the difference between the means of its high and low halves, with the fit's t interval; the Holm "
            "correction runs over every effect of the design, interactions included. Aliased: "
            + ("; ".join(aliased) if aliased else "nothing up to two-factor interactions") + ".", ""]
    if any(not np.isfinite(e.estimate) for e in a.effects):
        text += ["**Not estimable yet**: a configuration of the design has no result, so its effects cannot be told "
                 "apart (the table shows nan and decides nothing); they are estimated once every configuration has "
                 "at least one seed.", ""]
    return text


def _power_text(spec: StudySpec, a: Analysis) -> list[str]:
    text = [(f"MDE 80%: the smallest true effect these pairs detect 4 times in 5 (paired t-test, 5% two-sided, from "
             f"the observed paired spread); seeds for {_min_effect(spec):g} points: what a fixed design would need.")]
    plan = spec.seed_plan
    if plan:
        configs = len(spec.grid_configs())
        ran = len(a.runs)
        full = plan.max * configs
        decided = ", ".join(f"{label} at {d.seeds} seeds" for label, d in a.sequential.items()
                            if d.state in ("effect", "no_effect"))
        text += ["", (f"Adaptive seeds ({plan.initial} to {plan.max}, min effect {plan.min_effect:g} points; "
                      f"O'Brien-Fleming alpha spending at {plan.alpha:.0%}"
                      + (" on the largest |t| over every effect of the design, so familywise" if spec.design else "")
                      + f", the repeated confidence interval for 'no effect'): {ran} cells run of the {full} a fixed {plan.max}-seed design needs "
                      f"({1 - ran / full:.0%} saved). Decided: {decided or 'none yet'}.")]
    return [*text, ""]


def decision(e) -> str:
    """In the terms of the switch's values: which level to keep ('prefer X'), or that the data cannot tell."""
    if not np.isfinite(e.estimate):
        return "not estimable yet"
    if not np.isfinite(e.low):
        return "too few pairs"
    baseline, _, treatment = e.label.split(": ", 1)[-1].partition(" -> ")
    better = treatment if e.estimate > 0 else baseline
    if e.excludes_zero and e.p_holm < 0.05:
        return f"prefer {better}"
    if e.excludes_zero:
        return f"suggests {better} (not significant after Holm)"
    return "no detectable effect"

