"""The report's figures (matplotlib, Agg): learning curves with interval bands, a forest plot of factor
effects, stability panels, and for Optuna studies the optimisation history and parameter importances."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ript_ablate.report.analysis import Analysis  # noqa: E402
from ript_ablate.tracking import tags as tag  # noqa: E402
from ript_ablate.report.collect import StudyData, series  # noqa: E402
from ript_ablate.report.stats import Effect, seed_interval  # noqa: E402

DPI = 110


def _colors(n: int) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


MIN_SPAN = 0.25  # a success axis never spans less: 2 points must not look like 20
LINESTYLES = ["-", "--", "-.", ":"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def _zoom(setter, limits: tuple[float, float]) -> None:
    """Success rates: zoom to the data, but over at least MIN_SPAN and within [0, 1], so differences of a few
    points stay visible without looking large."""
    lo, hi = limits
    if hi - lo < MIN_SPAN:
        mid = (lo + hi) / 2
        lo, hi = mid - MIN_SPAN / 2, mid + MIN_SPAN / 2
        if lo < 0:
            lo, hi = 0.0, MIN_SPAN
        if hi > 1:
            lo, hi = 1.0 - MIN_SPAN, 1.0
    pad = 0.05 * (hi - lo)
    setter(max(-0.02, lo - pad), min(1.02, hi + pad))


def _title(ax, text: str, width: int = 70, size: int = 10) -> None:
    """A title wrapped to the figure instead of cut off at its edge."""
    import textwrap

    ax.set_title("\n".join(textwrap.wrap(text, width)), fontsize=size)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def learning_curves(data: StudyData, analysis: Analysis, path: Path, metric: str | None = None,
                    ylabel: str | None = None) -> Path | None:
    """Mean over seeds per configuration, with a 95% band (as in the tables: t below 5 seeds) at each evaluation."""
    metric = metric or data.success_metric
    ylabel = ylabel or metric
    curves = series(data, metric)
    if curves.empty:
        return None
    runs = analysis.runs.set_index("cell_id")
    order = list(analysis.configs["config"])
    fig, ax = plt.subplots(figsize=(8, 5.2))
    n = len(order)
    dodge = 0.08 * (np.arange(n) - (n - 1) / 2) if n > 1 else np.zeros(1)  # overlapping lines stay visible
    bases = []
    for k, (color, config) in enumerate(zip(_colors(n), order)):
        cells = [c for c in runs.index[runs["config"] == config] if c in curves.index]
        block = curves.loc[cells].sort_index(axis=1)
        its = block.columns.to_numpy(int)
        stats = [seed_interval(block[i].dropna().to_numpy(), reps=500)[:3] if block[i].notna().sum()
                 else (np.nan, np.nan, np.nan) for i in block.columns]  # t for few seeds, bootstrap from 5
        mean = np.array([s[0] for s in stats])
        lo = np.array([s[1] for s in stats])
        hi = np.array([s[2] for s in stats])
        if len(its) and its[0] == 0:
            bases.append(mean[0])
        ax.plot(its + dodge[k], mean, marker=MARKERS[k % len(MARKERS)], ms=4,
                linestyle=LINESTYLES[k % len(LINESTYLES)], color=color, label=f"{config} (n={len(cells)})")
        if len(cells) > 1:
            ax.fill_between(its + dodge[k], lo, hi, color=color, alpha=0.12, linewidth=0)
    if bases:
        ax.axhline(float(np.mean(bases)), color="black", lw=0.9, ls=":", label="base (iteration 0, mean)")
    ax.set_xlabel("RIPT iteration")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _zoom(ax.set_ylim, ax.get_ylim())
    ax.grid(alpha=0.3)
    _title(ax, f"Learning curves ({metric}): mean over seeds with a 95% band; dotted: the base before RIPT")
    ax.legend(fontsize=7, loc="best", framealpha=0.8)
    return _save(fig, path)


def forest(effects: list[Effect], path: Path, title: str) -> Path | None:
    """Each effect's estimate and 95% interval; the zero line is the decision boundary."""
    if not effects:
        return None
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(effects)))
    ys = np.arange(len(effects))[::-1]
    for y, e in zip(ys, effects):
        color = "tab:green" if e.excludes_zero and e.estimate > 0 else "tab:red" if e.excludes_zero else "tab:gray"
        ax.errorbar(e.estimate, y, xerr=[[e.estimate - e.low], [e.high - e.estimate]], fmt="o", color=color,
                    capsize=4)
        p = e.p_holm if np.isfinite(e.p_holm) else e.p_value
        ax.annotate(f"{e.estimate:+.3f} [{e.low:+.3f}, {e.high:+.3f}], p={p:.3g}", (e.high, y),
                    xytext=(6, 0), textcoords="offset points", va="center", fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(ys, [e.label for e in effects], fontsize=8)
    ax.set_xlabel("change in final success rate (treatment - baseline), paired")
    _title(ax, title)
    lo = min(e.low for e in effects if np.isfinite(e.low)) if any(np.isfinite(e.low) for e in effects) else -0.1
    hi = max(e.high for e in effects if np.isfinite(e.high)) if any(np.isfinite(e.high) for e in effects) else 0.1
    span = max(hi - lo, 0.05)
    ax.set_xlim(min(lo, 0) - 0.1 * span, max(hi, 0) + 0.9 * span)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def stability_panels(data: StudyData, analysis: Analysis, path: Path) -> Path | None:
    """Per configuration over iterations: approx-KL, clip fraction, backbone gradient norm, mean log_b."""
    panels = [("ppo/approx_kl", "approx KL"), ("ppo/clip_fraction", "clip fraction"),
              ("grad_norm/backbone", "backbone grad norm"), ("scale/log_b_mean", "mean log b (scale head)")]
    frames = {m: series(data, m) for m, _ in panels}
    if all(f.empty for f in frames.values()):
        return None
    runs = analysis.runs.set_index("cell_id")
    order = list(analysis.configs["config"])
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    for ax, (metric, label) in zip(axes.ravel(), panels):
        frame = frames[metric]
        if frame.empty:
            ax.text(0.5, 0.5, f"{metric}: not logged", ha="center", va="center", transform=ax.transAxes, fontsize=9)
        for k, (color, config) in enumerate(zip(_colors(len(order)), order)):
            cells = [c for c in runs.index[runs["config"] == config] if c in frame.index]
            if not cells:
                continue
            block = frame.loc[cells].sort_index(axis=1)
            ax.plot(block.columns.to_numpy(int), block.mean(axis=0).to_numpy(), color=color, label=config,
                    linestyle=LINESTYLES[k % len(LINESTYLES)], lw=1.6 - 0.2 * (k % 4))  # equal lines stay visible
            ax.fill_between(block.columns.to_numpy(int), block.min(axis=0).to_numpy(), block.max(axis=0).to_numpy(),
                            color=color, alpha=0.12, linewidth=0)
        _title(ax, f"{label} (mean, min-max over seeds)", width=45, size=9)
        ax.set_xlabel("RIPT iteration", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, max(1, len(labels))), fontsize=7)
    fig.tight_layout(rect=(0, 0.05 + 0.02 * ((len(labels) - 1) // 3), 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def final_by_config(analysis: Analysis, path: Path) -> Path | None:
    """Final success per configuration: mean with its 95% stratified-bootstrap interval and every seed."""
    configs = analysis.configs
    if configs.empty:
        return None
    fig, ax = plt.subplots(figsize=(8, 1.9 + 0.5 * len(configs)))
    ys = np.arange(len(configs))[::-1]
    for y, (_, row) in zip(ys, configs.iterrows()):
        ax.errorbar(row["final"], y, xerr=[[row["final"] - row["final_lo"]], [row["final_hi"] - row["final"]]]
                    if np.isfinite(row["final_lo"]) else None, fmt="s", color="tab:blue", capsize=4,
                    label="final: mean and 95% interval" if y == ys[0] else None)
        if np.isfinite(row.get("base", np.nan)):
            ax.scatter([row["base"]], [y + 0.18], marker="|", s=120, color="black", zorder=3,
                       label="base (iteration 0)" if y == ys[0] else None)
        seeds = analysis.runs.loc[analysis.runs["config"] == row["config"], "final"]
        ax.scatter(seeds, np.full(len(seeds), y) - 0.18, s=12, color="tab:orange", zorder=3,
                   label="one seed" if y == ys[0] else None)
    ax.set_yticks(ys, list(configs["config"]), fontsize=8)
    ax.set_ylim(ys.min() - 0.6, ys.max() + 0.6)
    ax.set_xlabel("final evaluation success rate")
    _zoom(ax.set_xlim, ax.get_xlim())
    ax.grid(axis="x", alpha=0.3)
    _title(ax, "Final success per configuration: mean with its 95% interval, each seed, and the base before RIPT")
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)  # below: never over a point
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def optuna_history(trials: pd.DataFrame, direction: str, path: Path) -> Path | None:
    done = trials[trials["state"] == "COMPLETE"].sort_values("number")
    if done.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(done["number"], done["value"], color="tab:blue", s=20, label="configuration (seed aggregate)")
    best = done["value"].cummax() if direction == "maximize" else done["value"].cummin()
    ax.step(done["number"], best, where="post", color="tab:red", label="best so far")
    ax.set_xlabel("configuration (Optuna trial number)")
    ax.set_ylabel("objective")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Optimisation history", fontsize=10)
    return _save(fig, path)


def importances(values: dict[str, float], path: Path) -> Path | None:
    if not values:
        return None
    names = list(values)[::-1]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.4 * len(names)))
    ax.barh(names, [values[n] for n in names], color="tab:purple")
    ax.set_xlabel("importance (PED-ANOVA, Optuna)")
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Parameter importances", fontsize=10)
    return _save(fig, path)


def objective_vs_params(done: pd.DataFrame, params: dict[str, str], metric: str, path: Path) -> Path | None:
    """For a search: the objective of each completed configuration against each parameter (log axis for a
    parameter sampled over decades), so continuous parameters are read as curves, not as paired levels."""
    if done.empty or not params:
        return None
    n = len(params)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, column) in zip(axes.ravel(), params.items()):
        x = done[column]
        if x.dtype == object or x.dtype == bool:
            labels = [str(v) for v in x]
            levels = sorted(set(labels))
            ax.scatter([levels.index(v) for v in labels], done["value"], s=18, color="tab:blue")
            ax.set_xticks(range(len(levels)), levels, fontsize=7)
        else:
            xs = x.astype(float)
            ax.scatter(xs, done["value"], s=18, color="tab:blue")
            if (xs > 0).all() and xs.max() / xs.min() > 20:
                ax.set_xscale("log")
        _title(ax, name.split(".", 1)[-1], width=40, size=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    axes[0, 0].set_ylabel(f"objective ({metric})", fontsize=8)
    return _save(fig, path)


def interaction_plot(runs: pd.DataFrame, spec: Any, labels: list[str], path: Path) -> Path | None:
    """For each decided two-factor interaction 'a x b': mean final success at a's two levels, one line per level of
    b (parallel lines: no interaction)."""
    pairs = [label.split(" x ") for label in labels]
    if not pairs:
        return None
    keys = {k.split(".", 1)[-1]: k for k in spec.factors}
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.4), squeeze=False)
    for ax, (a, b) in zip(axes[0], pairs):
        ka, kb = keys[a], keys[b]
        for level_b, color in zip(spec.factors[kb], _colors(2)):
            at_b = runs[runs[tag.FACTOR_PREFIX + kb] == level_b]
            means = [100 * at_b[at_b[tag.FACTOR_PREFIX + ka] == level_a]["final"].mean() for level_a in spec.factors[ka]]
            ax.plot([0, 1], means, marker="o", color=color, label=f"{b} = {level_b}")
        ax.set_xticks([0, 1], [str(v) for v in spec.factors[ka]])
        ax.set_xlabel(a)
        ax.set_ylabel("final success (%)")
        ax.legend(fontsize=8)
        _title(ax, f"{a} x {b}")
    fig.tight_layout()
    return _save(fig, path)
