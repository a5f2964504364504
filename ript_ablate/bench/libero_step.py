"""LIBERO env steps/s with and without `fewer_forwards` (robosuite's repeated forward passes skipped), side by side.

    python -m ript_ablate.bench.libero_step [--tasks libero_spatial:0 libero_object:0] [--steps 200]

Two environments of each task, one stepping as the world does and one as robosuite does, take the same actions
alternately (an expert episode, then random actions until `--steps`), so the machine's noise falls on both alike;
prints each one's steps/s, their ratio, and whether their states stayed equal to the bit.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import numpy as np

from ript_ablate.bench import run_main
from ript_ablate.plugins import build_world, checked_config_from_dict
from ript_ablate.worlds.libero import world as libero_world


def timed_step(env, action: np.ndarray, plain: bool) -> tuple[np.ndarray, bool, float]:
    original = libero_world.fewer_forwards
    if plain:
        libero_world.fewer_forwards = lambda sim: nullcontext()
    try:
        start = time.perf_counter()
        obs, done = env.step(action)
        return obs["state"], done, time.perf_counter() - start
    finally:
        libero_world.fewer_forwards = original


def compare(world, task: str, steps: int) -> None:
    fast, plain = world.make_env(task), world.make_env(task)
    start = world.demo_candidates(task, 1)[0]
    obs = fast.reset(start)
    plain.reset(start)
    rng = np.random.default_rng(0)
    seconds = {"fast": 0.0, "plain": 0.0}
    equal, expert_done = True, False
    for _ in range(steps):
        action = rng.uniform(-1, 1, 7) if expert_done else fast.expert_action(obs)
        state_fast, done, t_fast = timed_step(fast, action, plain=False)
        state_plain, _, t_plain = timed_step(plain, action, plain=True)
        obs = {"state": state_fast}
        seconds["fast"] += t_fast
        seconds["plain"] += t_plain
        equal &= bool(np.array_equal(state_fast, state_plain))
        expert_done |= done
    print(f"{task}: {steps / seconds['plain']:.0f} steps/s as robosuite steps, {steps / seconds['fast']:.0f} with "
          f"fewer forward passes: {seconds['fast'] / seconds['plain']:.2f} of the time; states equal to the bit: "
          f"{equal}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["libero_spatial:0", "libero_object:0"])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    cfg = checked_config_from_dict({"suite": {"name": "libero", "tasks": args.tasks, "demos_per_task": 1,
                                              "contexts_per_task": 1, "eval_states_per_task": 1, "num_workers": 0}})
    world = build_world(cfg)
    for task in world.tasks:
        compare(world, task, args.steps)


if __name__ == "__main__":
    run_main(main)
