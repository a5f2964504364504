"""A planar point mass that must reach a target and stay near it: two tasks, told apart only by the instruction.

State observation (6,): position (2), velocity (2), goal (2), all in [-1, 1]. Action (2,): a force in [-1, 1]^2.
`reach` targets the goal; `reach-mirror` targets the goal mirrored through the origin, so a policy must read its
instruction. Success: within `success_radius` of the target. Initial states (start and goal) come from three
seeded streams per task (demonstration candidates, training contexts, evaluation states), as in Meta-World.
"""

from __future__ import annotations

import difflib
import time
import zlib
from typing import Any

import numpy as np

from ript_ablate.interfaces import Demonstrations, InitialState, World, collect_demonstrations, demo_cache_path

TASKS = {"reach": "move the point to the goal", "reach-mirror": "move the point to the mirror image of the goal"}
# step_delay_s: seconds each step sleeps, standing in for a slow simulator without using the CPU (the tests that
# must stop a cell mid-run use it); it changes no demonstration, so it stays out of the cache keys.
OPTIONS = {"success_radius": 0.1, "episode_length": 60, "damping": 0.5, "max_speed": 0.05, "step_delay_s": 0.0}


def closest(name: str, known: dict) -> str:
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


class PointMassEnv:
    """Velocity follows the force with damping; the point stays inside the unit square."""

    def __init__(self, task: str, options: dict[str, float]):
        self.sign = -1.0 if task == "reach-mirror" else 1.0
        self.radius, self.damping, self.max_speed = (options["success_radius"], options["damping"],
                                                     options["max_speed"])
        self.delay = float(options["step_delay_s"])
        self.pos = self.vel = self.goal = np.zeros(2)

    def _obs(self) -> dict[str, np.ndarray]:
        return {"state": np.concatenate([self.pos, self.vel / self.max_speed, self.goal]).astype(np.float32)}

    def reset(self, state: InitialState) -> dict[str, np.ndarray]:
        data = np.asarray(state.data, dtype=np.float64)
        self.pos, self.goal, self.vel = data[:2].copy(), data[2:4].copy(), np.zeros(2)
        return self._obs()

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], bool]:
        if self.delay:
            time.sleep(self.delay)
        force = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        self.vel = self.damping * self.vel + (1.0 - self.damping) * self.max_speed * force
        self.pos = np.clip(self.pos + self.vel, -1.0, 1.0)
        return self._obs(), bool(np.linalg.norm(self.pos - self.sign * self.goal) < self.radius)

    def expert_action(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """A PD controller toward the target (the scripted expert of the demonstrations)."""
        error = self.sign * self.goal - self.pos
        return np.clip(error / self.max_speed - 0.5 * self.vel / self.max_speed, -1.0, 1.0)


class PointMassWorld(World):
    action_dim = 2
    observation_shapes = {"state": (6,)}  # noqa: RUF012 - the interface's class attribute
    inert_options = frozenset({"step_delay_s"})

    def __init__(self, cfg: Any):
        unknown = [t for t in cfg.suite.tasks if t not in TASKS and t != "all"]
        if unknown:
            raise ValueError(f"unknown point-mass tasks {unknown}")
        self.tasks = list(TASKS) if "all" in cfg.suite.tasks else list(dict.fromkeys(cfg.suite.tasks))
        self.suite = cfg.suite
        self.options = {**OPTIONS, **cfg.suite.options}

    @classmethod
    def config_problems(cls, cfg: Any) -> list[str]:
        problems = [f"suite.tasks: unknown point-mass task {t!r}; tasks are {', '.join(TASKS)} (or 'all')"
                    for t in cfg.suite.tasks if t not in TASKS and t != "all"]
        problems += [f"suite.options.{k}: unknown option{closest(k, OPTIONS)}; options are {', '.join(OPTIONS)}"
                     for k in cfg.suite.options if k not in OPTIONS]
        return problems

    def instruction(self, task: str) -> str:
        return TASKS[task]

    def episode_length(self, task: str) -> int:
        return int(self.options["episode_length"])

    def make_env(self, task: str) -> PointMassEnv:
        return PointMassEnv(task, self.options)

    def _states(self, task: str, kind: str, seed: int, n: int) -> list[InitialState]:
        rng = np.random.default_rng([seed, zlib.crc32(f"{task}/{kind}".encode())])
        starts = rng.uniform(-0.8, 0.8, (n, 2))
        goals = rng.uniform(-0.8, 0.8, (n, 2))
        return [InitialState(task, f"{task}/{kind}/{i}", np.concatenate([starts[i], goals[i]])) for i in range(n)]

    def demo_candidates(self, task: str, n: int) -> list[InitialState]:
        return self._states(task, "demo", self.suite.seed, n)

    def training_contexts(self, task: str, demos: Demonstrations | None) -> list[InitialState]:
        extra = self._states(task, "context", self.suite.seed, self.suite.contexts_per_task)
        return (demos.states[task] if demos is not None else []) + extra

    def eval_states(self, task: str) -> list[InitialState]:
        return self._states(task, "eval", self.suite.eval_seed, self.suite.eval_states_per_task)

    def demonstrations(self, engine: Any, cache_dir: str | None = None, on_batch: Any = None) -> Demonstrations:
        # cached under a key of this package's code and the suite's settings (tasks, demos_per_task, seed, options)
        return collect_demonstrations(self.tasks, engine, self.suite.demos_per_task, self.demo_candidates,
                                      demo_cache_path(self, cache_dir), on_batch)
