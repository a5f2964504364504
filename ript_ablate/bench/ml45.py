"""The paper's Meta-World protocol: ML45 pre-training -> few-shot fine-tuning on the 5 held-out tasks -> RIPT.

    python -m ript_ablate.bench.ml45 [CONFIG ...] [--seeds 0 1 2] [--iterations 15] [--set key=value ...]
        [--output-dir DIR]

CONFIG defaults to configs/metaworld_ml45_5shot.yaml and configs/metaworld_ml45_1shot.yaml. For each config it
builds (or finds in the cache) the pre-trained model and the few-shot base, then runs RIPT once per seed
(`algo.model_seed`) from that base, and prints per seed and over seeds the held-out success on the 5 test tasks
before and after, per task and overall, with a 95% bootstrap interval of the gain (seeds resampled, and within
each seed the evaluation states of each task, drawn binomially from its success rate), the equal-reward group
fraction (what dynamic sampling discards: no RLOO signal), train vs held-out success, and the wall time of each
stage; then the paper's rows for the same protocol. The paper's policy (QueST) sees images; ours sees states.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from ript_ablate.bc import get_base
from ript_ablate.bench import run_main
from ript_ablate.engine import RolloutEngine
from ript_ablate.plugins import build_world
from ript_ablate.plugins import load_checked_config as load_config
from ript_ablate.ript.trainer import Trainer
from ript_ablate.tracking import Tracker

DEFAULT_CONFIGS = ["configs/metaworld_ml45_5shot.yaml", "configs/metaworld_ml45_1shot.yaml"]

# Tan et al. 2025, Meta-World ML45 (success %, before -> after RIPT): the rows of the same protocol.
PAPER_ROWS = [
    ("QueST, ML45 5-shot (images)", 63.6, 76.0),
    ("QueST, ML45 full data (images)", 91.0, 92.2),
]


def gain_interval(before: np.ndarray, after: np.ndarray, n_states: int, reps: int = 5000, level: float = 0.95,
                  seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the mean gain (after - before, mean over tasks and seeds), in points.

    `before` and `after` are (seeds, tasks) success rates on `n_states` evaluation states per task. Each
    replicate resamples the seeds, then redraws every task's successes Binomial(n_states, rate) before and after
    (the evaluation states' sampling error; the pairing of states is ignored, which widens the interval)."""
    rng = np.random.default_rng(seed)
    n_seeds = before.shape[0]
    picks = rng.integers(0, n_seeds, (reps, n_seeds))
    b = rng.binomial(n_states, before[picks]) / n_states
    a = rng.binomial(n_states, after[picks]) / n_states
    gains = 100 * (a - b).mean(axis=(1, 2))
    tail = (1 - level) / 2
    return float(np.quantile(gains, tail)), float(np.quantile(gains, 1 - tail))


def failures_removed(base: float, after: float) -> str:
    """The gain as a share of the base's headroom (100 - base), the figure comparable across bases."""
    return f"{100 * (after - base) / (100 - base):.0f}%" if base < 100 else "n/a"


def _stage_times(info: dict, seconds: float) -> str:
    pre = info.get("pretrain") or {}
    parts = []
    if pre:
        parts.append(f"pre-training demos {pre.get('demo_seconds', 0):.0f}s + BC {pre.get('train_seconds', 0):.0f}s "
                     f"({len(pre.get('tasks', []))} tasks, {pre.get('samples', 0):,} samples)")
    parts.append(f"few-shot demos {info.get('demo_seconds', 0):.0f}s + fine-tuning and scale head "
                 f"{info.get('train_seconds', 0):.0f}s")
    now = "found in the cache" if info.get("cache_hit") else "built now"
    return "; ".join(parts) + f"; {now} ({seconds:.0f}s)"


def _evals(history: list[dict]) -> tuple[dict, dict]:
    evals = [h for h in history if "eval/success_rate" in h]
    return evals[0], evals[-1]


def run_config(path: str, seeds: list[int], overrides: list[str], out: str) -> None:
    cfg = load_config(path, overrides)
    start = time.perf_counter()
    world = build_world(cfg)
    with RolloutEngine(cfg, world) as engine:
        _, weights, info = get_base(cfg, world, engine)  # its info keeps each stage's time when it was built
    print(f"=== {path}: {cfg.suite.demos_per_task} demonstration(s) per held-out task; base {weights.parent.name}",
          flush=True)
    print(f"   stages: {_stage_times(info, time.perf_counter() - start)}", flush=True)
    tasks = world.tasks
    before, after, equal, train = [], [], [], []
    for seed in seeds:
        cfg_seed = load_config(path, [*overrides, f"algo.model_seed={seed}"])
        t0 = time.perf_counter()
        history = Trainer(cfg_seed, Tracker()).run(f"{out}/{path.rsplit('/', 1)[-1]}/seed{seed}").history
        wall = time.perf_counter() - t0
        first, last = _evals(history)
        before.append([first[f"eval/success_rate/{t}"] for t in tasks])
        after.append([last[f"eval/success_rate/{t}"] for t in tasks])
        iters = [h for h in history if h["iteration"] > 0]
        tried = sum(h.get("sampling/contexts_tried", 0) for h in iters)
        equal.append(sum(h.get("sampling/zero_variance_groups", 0) for h in iters) / max(tried, 1))
        train.append([statistics.fmean(h.get(f"train/success_rate/{t}", float("nan")) for h in iters) for t in tasks])
        per_task = " ".join(f"{t.removesuffix('-v3')} {100 * b:.0f}->{100 * a:.0f}"
                            for t, b, a in zip(tasks, before[-1], after[-1]))
        print(f"seed {seed}: held-out {100 * first['eval/success_rate']:.1f}% -> {100 * last['eval/success_rate']:.1f}% "
              f"({100 * (last['eval/success_rate'] - first['eval/success_rate']):+.1f}) after {last['iteration']} "
              f"iterations; {per_task}; equal-reward groups {100 * equal[-1]:.0f}%; RIPT {wall:.0f}s "
              f"({wall / max(len(iters), 1):.0f}s/iteration)", flush=True)
    b, a, tr = np.asarray(before), np.asarray(after), np.asarray(train)
    low, high = gain_interval(b, a, cfg.suite.eval_states_per_task)
    print(f"over {len(seeds)} seeds: held-out {100 * b.mean():.1f}% -> {100 * a.mean():.1f}%, gain "
          f"{100 * (a - b).mean():+.1f} points [95% bootstrap {low:+.1f}, {high:+.1f}], "
          f"{failures_removed(100 * b.mean(), 100 * a.mean())} of the base's failures removed; equal-reward groups "
          f"{100 * statistics.fmean(equal):.0f}%", flush=True)
    for i, task in enumerate(tasks):
        print(f"   {task:<16} held-out {100 * b[:, i].mean():5.1f} -> {100 * a[:, i].mean():5.1f} "
              f"({100 * (a[:, i] - b[:, i]).mean():+5.1f}); rollout (train) success during RIPT "
              f"{100 * np.nanmean(tr[:, i]):5.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", default=DEFAULT_CONFIGS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=15, help="RIPT iterations per seed")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--output-dir", default=None, help="where the runs go (default: a new temporary folder)")
    args = parser.parse_args()
    overrides = [*args.set, f"training.n_iterations={args.iterations}", f"training.eval_interval={args.iterations}"]
    for path in args.configs:
        load_config(path, overrides)  # every config's mistakes before any compute
    out = args.output_dir or tempfile.mkdtemp(prefix="ript-ml45-")
    for path in args.configs:
        run_config(path, args.seeds, overrides, out)
    print("paper (Tan et al. 2025, Meta-World ML45; its policy sees images, ours states):")
    for name, base, ript in PAPER_ROWS:
        print(f"   {name:<32} {base:.1f}% -> {ript:.1f}% ({ript - base:+.1f}; {failures_removed(base, ript)} of the "
              "base's failures removed)")


if __name__ == "__main__":
    run_main(main)
