"""RIPT post-training gain on a config over seeds, with the time split and the tracking overhead.

    python -m ript_ablate.bench.ript_gain CONFIG --seeds 0 1 2 [--set key=value ...] [--overhead]

Prints, per seed: evaluation success before and after, mean seconds per iteration split into rollout, update
and evaluation, rollout env steps/s. With --overhead, runs seed 0 again tracked in MLflow (a temporary sqlite
store) and untracked, side by side, and prints the ratio of wall times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from ript_ablate.config import load_config
from ript_ablate.ript.trainer import Trainer
from ript_ablate.tracking import MlflowTracker, Tracker


def run(cfg, tracker, out) -> tuple[list[dict], float]:
    start = time.perf_counter()
    result = Trainer(cfg, tracker).run(out)
    tracker.end("FINISHED")
    return result.history, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--overhead", action="store_true")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="ript-gain-")
    gains = []
    for seed in args.seeds:
        cfg = load_config(args.config, [*args.set, f"algo.model_seed={seed}"])
        history, wall = run(cfg, Tracker(), f"{tmp}/seed{seed}")
        evals = [h for h in history if "eval/success_rate" in h]
        first, last = evals[0]["eval/success_rate"], evals[-1]["eval/success_rate"]
        gains.append(last - first)
        iters = [h for h in history if h["iteration"] > 0]
        mean = lambda key: statistics.fmean(h.get(key, 0.0) for h in iters)  # noqa: E731
        curve = " ".join(f"{h['iteration']}:{100 * h['eval/success_rate']:.0f}" for h in evals)
        print(f"seed {seed}: eval {100 * first:.1f}% -> {100 * last:.1f}% ({100 * (last - first):+.1f}); curve {curve}; "
              f"wall {wall:.0f}s; per iteration {mean('perf/iteration_s'):.1f}s = rollout {mean('perf/rollout_s'):.1f}s "
              f"+ update {mean('perf/update_s'):.2f}s + eval {mean('perf/eval_s'):.1f}s (eval iterations only "
              f"{statistics.fmean(h['perf/eval_s'] for h in iters if 'perf/eval_s' in h):.1f}s); "
              f"rollout {mean('perf/env_steps_per_s'):,.0f} env steps/s; contexts tried/iter "
              f"{mean('sampling/contexts_tried'):.1f}", flush=True)
    print(f"mean gain over {len(gains)} seeds: {100 * statistics.fmean(gains):+.1f} points")
    if args.overhead:
        cfg = load_config(args.config, [*args.set, "algo.model_seed=0"])
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        MlflowTracker(None, "warmup", None)  # create the database outside the timed runs
        _, untracked = run(cfg, Tracker(), f"{tmp}/untracked")
        _, tracked = run(cfg, MlflowTracker(None, "overhead", None), f"{tmp}/tracked")
        print(f"tracking overhead: tracked {tracked:.1f}s vs untracked {untracked:.1f}s = "
              f"{100 * (tracked / untracked - 1):+.1f}%")


if __name__ == "__main__":
    main()
