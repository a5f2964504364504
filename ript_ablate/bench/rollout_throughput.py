"""Rollout workers' env steps/s as a ratio of raw single-env stepping, measured side by side in one run.

    python -m ript_ablate.bench.rollout_throughput [CONFIG] [--seconds 5]
"""

from __future__ import annotations

import argparse
import time

from ript_ablate.bench import run_main
from ript_ablate.config import load_config
from ript_ablate.policy import build_policy
from ript_ablate.suites import build_suite
from ript_ablate.suites import metaworld_tasks as mw
from ript_ablate.suites.rollouts import EpisodeJob, EpisodeRunner, RolloutPool, Sampling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", nargs="?", default="configs/metaworld_quick.yaml")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--task", default="push-v3")
    args = parser.parse_args()
    cfg = load_config(args.config)
    suite = build_suite(cfg)
    task = args.task

    count, secs = EpisodeRunner(1).raw_steps(task, 1, args.seconds)
    single = count / secs
    print(f"raw stepping, 1 env, 1 process ({task}): {single:,.0f} steps/s")

    policy = build_policy(cfg.policy, suite.obs_dim, suite.action_dim)
    states = suite.extra_contexts(task) * 4
    with RolloutPool(cfg.suite.num_workers, cfg.suite.envs_per_worker, 500) as pool:
        pool.set_policy(policy)
        pool.run([EpisodeJob(states[0], 0)], Sampling())  # warm-up: workers started, envs built
        raw_pool = pool.raw_steps_per_second(task, args.seconds)
        jobs = [EpisodeJob(s, i) for i, s in enumerate(states)]
        start = time.perf_counter()
        episodes = pool.run(jobs, Sampling(scale_factor=1.0))
        elapsed = time.perf_counter() - start
    steps = sum(e.length for e in episodes)
    rollouts = steps / elapsed
    workers = cfg.suite.num_workers
    print(f"raw stepping, {workers} workers x {cfg.suite.envs_per_worker} envs: {raw_pool:,.0f} steps/s "
          f"({raw_pool / single:.2f}x one env)")
    print(f"policy rollouts, {workers} workers x {cfg.suite.envs_per_worker} envs, H={cfg.policy.chunk_size}: "
          f"{rollouts:,.0f} steps/s over {len(episodes)} episodes / {steps} steps")
    print(f"ratio rollouts / raw one env: {rollouts / single:.2f}x; rollouts / raw same processes: "
          f"{rollouts / raw_pool:.2f}")
    print(f"episode limit used: {mw.episode_length(task, 500)} steps")


if __name__ == "__main__":
    run_main(main)
