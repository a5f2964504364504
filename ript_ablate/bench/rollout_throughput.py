"""Rollout env steps/s of both inference modes, side by side in one run, against raw stepping.

    python -m ript_ablate.bench.rollout_throughput [CONFIG] [--seconds 5] [--task push-v3] [--rounds 2]

Raw stepping (random actions, the same processes and envs per worker, resets every episode length) is the
ceiling; `replica` (a policy copy per worker) and `central` (the policy in this process, one batched forward
per chunk for every waiting batch; with one batch in flight per worker instead of two, the overlap of stepping and
inference is gone) roll out the same jobs with the config's policy, alternating, `--rounds` times.
"""

from __future__ import annotations

import argparse
import statistics
import time

from ript_ablate.bench import run_main
from ript_ablate.engine import RolloutEngine
from ript_ablate.episodes import EpisodeJob
from ript_ablate.plugins import build_policy, build_world
from ript_ablate.plugins import load_checked_config as load_config
from ript_ablate.ript.distributions import ActionDistribution


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", nargs="?", default="configs/metaworld_quick.yaml")
    parser.add_argument("--seconds", type=float, default=5.0, help="raw stepping time per measurement")
    parser.add_argument("--task", default=None, help="task to roll out (default: the world's first)")
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    world = build_world(cfg)
    task = args.task or world.tasks[0]
    policy = build_policy(cfg, world).eval()
    states = world.eval_states(task)
    jobs = [EpisodeJob(states[i % len(states)], seed=i) for i in range(args.episodes)]
    distribution = ActionDistribution.from_algo(cfg.algo)
    limit = cfg.algo.max_episode_length or world.episode_length(task)
    modes = {"replica": ("replica", 2), "central": ("central", 2), "central, 1 batch in flight": ("central", 1)}
    rates: dict[str, list[float]] = {"raw": [], **{name: [] for name in modes}}
    with RolloutEngine(cfg, world) as engine:
        engine.set_policy(policy, "replica")
        engine.run(jobs[:2], distribution)  # warm-up: workers started, envs built
        for _ in range(args.rounds):
            rates["raw"].append(engine.raw_steps_per_second(task, args.seconds, limit))
            for name, (mode, in_flight) in modes.items():
                engine.set_policy(policy, mode)
                engine.batches_in_flight = in_flight
                start = time.perf_counter()
                episodes = engine.run(jobs, distribution)
                rates[name].append(sum(e.length for e in episodes) / (time.perf_counter() - start))
    workers = f"{cfg.suite.num_workers} workers x {cfg.suite.envs_per_worker} envs"
    raw = statistics.median(rates["raw"])
    print(f"{task}, {workers}, {args.episodes} episodes of at most {limit} steps, H={policy.chunk_size}, "
          f"median of {args.rounds} rounds:")
    print(f"  {'raw stepping':<27} {raw:8,.0f} env steps/s")
    for name in modes:
        rate = statistics.median(rates[name])
        print(f"  {name:<27} {rate:8,.0f} env steps/s  ({rate / raw:.2f} of raw)")
    print(f"  central / replica: {statistics.median(rates['central']) / statistics.median(rates['replica']):.2f}")


if __name__ == "__main__":
    run_main(main)
