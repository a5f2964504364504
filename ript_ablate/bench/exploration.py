"""What RIPT can learn from at the start: the base's sampled behaviour next to its evaluated one, per task, for
several exploration settings, before any training.

    python -m ript_ablate.bench.exploration CONFIG [--set key=value ...] [--states 16] [--k 8]
        [--variant NAME key=value ...]

For each variant (the config with its own overrides on top of --set; default: the config as it is), builds or
reads the base, then runs K sampled rollouts on each of the first --states evaluation states per task (the RLOO
group RIPT would form there) and the deterministic one. Prints per task: evaluated success, sampled success, the
fraction of groups whose K rewards are all equal (no RLOO signal: all-fail or all-success), and the median
behaviour scale b (the scale head's exp(log_b) at the states' first step, before `scale_factor`). A sampled
success far below the evaluated one, or most groups all-equal, is where RIPT's gain is small.
"""

from __future__ import annotations

import argparse
import statistics
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ript_ablate.bc import get_base
from ript_ablate.bench import run_main
from ript_ablate.engine import RolloutEngine
from ript_ablate.episodes import EpisodeJob
from ript_ablate.plugins import build_world
from ript_ablate.plugins import load_checked_config as load_config


@dataclass
class TaskExploration:
    evaluated: float
    sampled: float
    equal_groups: float
    median_b: float | None


def median_scale(policy, world, task: str, states: list) -> float | None:
    """The base's median b over the action dims and chunk steps of `states`' first observations (None without a
    Laplace scale head)."""
    if getattr(policy, "family", "laplace") != "laplace":
        return None
    env = world.make_env(task)
    rows = [env.reset(s) for s in states]
    obs = {k: torch.as_tensor(np.stack([r[k] for r in rows]), dtype=torch.float32) for k in rows[0]}
    instr = policy.encode_instruction(world.instruction(task)).unsqueeze(0).expand(len(states), -1)
    with torch.no_grad():
        _, log_b = policy(obs, instr)
    return float(log_b.exp().median())


def explore(cfg, n_states: int, k: int) -> dict[str, TaskExploration]:
    world = build_world(cfg)
    out = {}
    with RolloutEngine(cfg, world) as engine:
        policy, _, _ = get_base(cfg, world, engine)
        engine.set_policy(policy)
        for task in world.tasks:
            states = world.eval_states(task)[:n_states]
            seeds = [zlib.crc32(s.state_id.encode()) for s in states]
            evaluated = engine.run([EpisodeJob(s, seed=seed, mode="mean") for s, seed in zip(states, seeds)])
            sampled = engine.run([EpisodeJob(s, seed=seed * 1000 + i, mode="sample")
                                  for s, seed in zip(states, seeds) for i in range(k)])
            groups = [[ep.success for ep in sampled[j * k:(j + 1) * k]] for j in range(len(states))]
            out[task] = TaskExploration(
                evaluated=statistics.fmean(ep.success for ep in evaluated),
                sampled=statistics.fmean(ep.success for ep in sampled),
                equal_groups=statistics.fmean(len(set(g)) == 1 for g in groups),
                median_b=median_scale(policy, world, task, states))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--states", type=int, default=16, help="evaluation states per task")
    parser.add_argument("--k", type=int, default=8, help="sampled rollouts per state (the RLOO group)")
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"))
    args = parser.parse_args()
    variants = args.variant or [["config"]]
    for name, *overrides in variants:
        cfg = load_config(args.config, [*args.set, *overrides])
        result = explore(cfg, args.states, args.k)
        print(f"{name} (scale_factor {cfg.algo.scale_factor:g}):", flush=True)
        for task, r in result.items():
            scale = f", median b {r.median_b:.4f}" if r.median_b is not None else ""
            print(f"  {task}: evaluated {100 * r.evaluated:.0f}%, sampled {100 * r.sampled:.0f}%, "
                  f"equal-reward groups {100 * r.equal_groups:.0f}%{scale}", flush=True)
        mean = {f: statistics.fmean(getattr(r, f) for r in result.values())
                for f in ("evaluated", "sampled", "equal_groups")}
        print(f"  mean: evaluated {100 * mean['evaluated']:.0f}%, sampled {100 * mean['sampled']:.0f}%, "
              f"equal-reward groups {100 * mean['equal_groups']:.0f}%", flush=True)


if __name__ == "__main__":
    run_main(main)
