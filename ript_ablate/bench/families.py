"""Policy families under RIPT, side by side, in one invocation:

    python -m ript_ablate.bench.families [SPEC] [--workers 2] [--output DIR] [--no-run]

Runs the study (default `studies/families.yaml`: each family of the reference policy from its own behaviour-cloning
base, with its own exploration setting, x seeds; resumable like any study), then prints per configuration: the
base's evaluation success (iteration 0), the RIPT gain at the last evaluation with its 95% t interval over seeds,
forward passes per chunk, seconds per iteration, the fraction of equal-reward (zero-variance) groups among the
contexts tried, and every pairwise difference of gains with its Welch interval ("undecided" where it spans 0).
`--no-run` reads a study that already ran.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from ript_ablate.bench import run_main

DEFAULT_SPEC = Path(__file__).resolve().parents[2] / "studies" / "families.yaml"


def welch(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean difference a - b and its Welch t interval (scipy's unequal-variance t-test; nan below 2 values each)."""
    from scipy import stats

    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return diff, float("nan"), float("nan")
    interval = stats.ttest_ind(a, b, equal_var=False).confidence_interval(level)
    return diff, float(interval.low), float(interval.high)


def cell_summary(history: list[dict[str, float]]) -> dict[str, float]:
    evals = [h for h in history if "eval/success_rate" in h]
    trained = [h for h in history if "sampling/contexts_tried" in h]
    tried = sum(h["sampling/contexts_tried"] for h in trained)
    return {"base": 100 * evals[0]["eval/success_rate"], "final": 100 * evals[-1]["eval/success_rate"],
            "iteration_s": float(np.mean([h["perf/iteration_s"] for h in trained])) if trained else float("nan"),
            "equal_reward": sum(h["sampling/zero_variance_groups"] for h in trained) / max(tried, 1.0),
            "iterations": len(trained)}


def forward_passes(spec: Any, values: dict[str, Any]) -> str:
    from ript_ablate.families import build_family
    from ript_ablate.plugins import build_policy, build_world

    cfg = spec.cell_config(values, spec.seeds[0])
    return build_family(cfg.algo, build_policy(cfg, build_world(cfg))).forward_passes()


def table(spec: Any) -> str:
    from ript_ablate.report.stats import t_interval
    from ript_ablate.study.spec import cell_id_for, config_id_for, describe

    rows, gains = [], {}
    for values in spec.grid_configs():
        name = str(values.get("configuration", describe(values)))
        cells = []
        for seed in spec.seeds:
            path = spec.study_dir / "cells" / cell_id_for(config_id_for(values), seed) / "history.json"
            if path.is_file():
                cells.append(cell_summary(json.loads(path.read_text())))
        if not cells:
            rows.append(f"| {name} | (no finished cell) |")
            continue
        gain = np.array([c["final"] - c["base"] for c in cells])
        gains[name] = gain
        lo, hi = t_interval(gain)
        rows.append(f"| {name} | {np.mean([c['base'] for c in cells]):.1f} | {gain.mean():+.1f} [{lo:+.1f}, {hi:+.1f}] "
                    f"| {len(cells)} | {forward_passes(spec, values)} | "
                    f"{np.mean([c['iteration_s'] for c in cells]):.1f} | "
                    f"{np.mean([c['equal_reward'] for c in cells]):.2f} |")
    lines = ["| configuration | BC base success % | RIPT gain (points) [95% t over seeds] | seeds | forward passes "
             "per chunk | s per iteration | equal-reward group fraction |", "|---|---|---|---|---|---|---|", *rows,
             "", "| pair | gain difference (points) [95% Welch] | verdict |", "|---|---|---|"]
    for a, b in itertools.combinations(gains, 2):
        diff, lo, hi = welch(gains[a], gains[b])
        verdict = "undecided" if not (lo > 0 or hi < 0) else (f"{a} ahead" if lo > 0 else f"{b} ahead")
        lines.append(f"| {a} - {b} | {diff:+.1f} [{lo:+.1f}, {hi:+.1f}] | {verdict} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", nargs="?", default=str(DEFAULT_SPEC))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", default=None, help="the study's output directory (default: the spec's)")
    parser.add_argument("--no-run", action="store_true", help="only read the study's finished cells")
    args = parser.parse_args()
    from ript_ablate.cli import main as cli
    from ript_ablate.study.spec import load_study

    spec = load_study(args.spec, args.output)
    if not args.no_run:
        extra = ["--output-dir", args.output] if args.output else []
        code = cli(["study", "run", args.spec, "--workers", str(args.workers), *extra])
        if code != 0:
            raise SystemExit(code)
    print(table(spec))


if __name__ == "__main__":
    run_main(main)
