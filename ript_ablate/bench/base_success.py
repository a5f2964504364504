"""Behaviour-cloning base success versus demonstrations per task, with wall times.

    python -m ript_ablate.bench.base_success CONFIG --demos 1 5 50 [--eval-states 20] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import time

from ript_ablate.bc import get_base
from ript_ablate.bench import run_main
from ript_ablate.engine import RolloutEngine
from ript_ablate.evaluation import evaluate
from ript_ablate.plugins import build_world
from ript_ablate.plugins import load_checked_config as load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config")
    parser.add_argument("--demos", type=int, nargs="+", default=[1, 5, 50])
    parser.add_argument("--eval-states", type=int, default=None)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    rows = []
    for n in args.demos:
        overrides = [*args.set, f"suite.demos_per_task={n}"]
        if args.eval_states:
            overrides.append(f"suite.eval_states_per_task={args.eval_states}")
        cfg = load_config(args.config, overrides)
        world = build_world(cfg)
        start = time.perf_counter()
        with RolloutEngine(cfg, world) as engine:
            policy, _, info = get_base(cfg, world, engine)
            base_seconds = time.perf_counter() - start
            t0 = time.perf_counter()
            engine.set_policy(policy)
            result = evaluate(world, engine)
            eval_seconds = time.perf_counter() - t0
        rows.append((n, result, base_seconds, eval_seconds, info))
        per_task = ", ".join(f"{t.removesuffix('-v3')} {100 * v:.0f}" for t, v in result.per_task.items())
        print(f"demos/task={n}: success {100 * result.success_rate:.1f}% ({per_task}); "
              f"base {base_seconds:.0f}s (demos {info.get('demo_seconds', 0):.0f}s, BC {info.get('train_seconds', 0):.0f}s, "
              f"cache hit {info.get('cache_hit')}), eval {eval_seconds:.0f}s for {result.episodes} episodes "
              f"({result.env_steps / eval_seconds:,.0f} env steps/s)", flush=True)


if __name__ == "__main__":
    run_main(main)
