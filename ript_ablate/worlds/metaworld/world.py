"""The Meta-World world: tasks, scripted-expert demonstrations, RIPT contexts and evaluation states.

Three independent seeded streams of initial states per task, so that changing one count never moves the
others: demonstration candidates, extra RL contexts (no demonstration), and evaluation states (own seed,
fixed across runs). The three are checked to be disjoint.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ript_ablate.demos import collect_demonstrations, demo_cache_path
from ript_ablate.episodes import Demonstrations, Episode, InitialState, Observation, check_states_disjoint
from ript_ablate.interfaces.world import World
from ript_ablate.rendering import CameraRenderer
from ript_ablate.worlds.metaworld import tasks as mw

DEMO_FORMAT_VERSION = 2  # 2: observations stored by key (the world-agnostic cache layout)
MAX_EPISODE_LENGTH = 500  # Meta-World's own step limit
# The cameras of Meta-World's scene (every task's model has them); the corner cameras' raw renders are upside down
CAMERAS = ("topview", "corner", "corner2", "corner3", "corner4", "behindGripper", "gripperPOV")
UPSIDE_DOWN_CAMERAS = ("corner", "corner2", "corner3", "corner4")
DEFAULT_CAMERAS = ("corner",)  # the whole table and arm in one upright view
PROPRIO_DIM = 4  # hand position (3) and gripper opening (1): the first entries of the state vector


def resolve_tasks(names: list[str]) -> list[str]:
    """Expand presets ('quick', 'mt10', 'ml45_train', 'ml45_test') into task names, keeping order and dropping repeats."""
    out: list[str] = []
    for name in names:
        for task in mw.PRESETS.get(name, [name]):
            if task not in out:
                out.append(task)
    return out


def _unknown_tasks(names: list[str], key: str) -> list[str]:
    known = mw.all_task_names()
    problems = []
    for name in names:
        if name in mw.PRESETS or name in known:
            continue
        match = difflib.get_close_matches(name, list(known) + list(mw.PRESETS), n=1, cutoff=0.5)
        hint = f" (did you mean '{match[0]}'?)" if match else ""
        problems.append(f"{key}: unknown task {name!r}{hint}; presets are {', '.join(mw.PRESETS)}")
    return problems


class MetaWorldEnv:
    """One raw Meta-World environment behind the `Env` interface; reset switches the variation in place.

    `observation` "state" gives {"state": (39,)}; "images" gives each camera's upright uint8 image under
    "<camera>_image" and the robot's proprioception {"proprio": (4,)} (hand position and gripper opening: what a VLA
    reads besides its cameras, nothing privileged); "both" gives the images and the full state."""

    def __init__(self, task: str, observation: str = "state", cameras: tuple[str, ...] = (), image_size: int = 64):
        self.task = task
        self.env = mw.make_env(task)
        self.expert: Any = None
        self.observation = observation
        self.state = np.zeros(mw.OBS_DIM)  # the last full state: the scripted expert reads it whatever is observed
        self.renderer: CameraRenderer | None = None
        if observation != "state":
            self.renderer = CameraRenderer(self.env.model, self.env.data, cameras, image_size, UPSIDE_DOWN_CAMERAS)

    def _observe(self, state: np.ndarray) -> Observation:
        self.state = state
        if self.renderer is None:
            return {"state": state}
        images = {f"{camera}_image": image for camera, image in self.renderer.render().items()}
        if self.observation == "images":
            return {"proprio": state[:PROPRIO_DIM].copy(), **images}
        return {"state": state, **images}

    def reset(self, state: InitialState) -> Observation:
        mw.quiet()
        mw.set_variation(self.env, self.task, state.data)
        self.expert = None
        return self._observe(self.env.reset()[0])

    def step(self, action: np.ndarray) -> tuple[Observation, bool]:
        obs, _, _, _, info = self.env.step(action)
        return self._observe(obs), bool(info["success"] > 0)

    def step_unobserved(self, action: np.ndarray) -> bool:
        """A step inside an action chunk: no images rendered (the engine reads none there)."""
        obs, _, _, _, info = self.env.step(action)
        self.state = obs
        return bool(info["success"] > 0)

    def expert_action(self, obs: Observation) -> np.ndarray:
        if self.expert is None:
            from metaworld.policies import ENV_POLICY_MAP

            self.expert = ENV_POLICY_MAP[self.task]()
        return np.clip(self.expert.get_action(self.state), -1.0, 1.0)

    def close(self) -> None:
        if self.renderer is not None:
            self.renderer.close()
        self.env.close()


def observation_shapes(observation: str, cameras: list[str], size: int) -> dict[str, tuple[int, ...]]:
    """The shape of each observation key for `suite.observation` (see `MetaWorldEnv`)."""
    images = {f"{camera}_image": (size, size, 3) for camera in cameras}
    if observation == "images":
        return {"proprio": (PROPRIO_DIM,), **images}
    if observation == "both":
        return {"state": (mw.OBS_DIM,), **images}
    return {"state": (mw.OBS_DIM,)}


class MetaWorld(World):
    """Meta-World v3 tasks, 4-D actions; state observations ({"state": (39,)}) or camera images (`suite.observation`,
    `suite.cameras`, `suite.image_size`: see `MetaWorldEnv`)."""

    action_dim = mw.ACTION_DIM
    observation_shapes = {"state": (mw.OBS_DIM,)}
    observations = ("state", "images", "both")

    def __init__(self, cfg: Any):
        self.cfg = cfg.suite
        self.tasks = resolve_tasks(cfg.suite.tasks)
        self.episode_length_override = cfg.algo.max_episode_length
        self._samplers: dict[str, object] = {}
        self.cameras = tuple(cfg.suite.cameras) or DEFAULT_CAMERAS
        self.observation_shapes = observation_shapes(cfg.suite.observation, list(self.cameras), cfg.suite.image_size)

    @classmethod
    def config_problems(cls, cfg: Any) -> list[str]:
        """Unknown task names (with the closest known one), rollout tasks outside the suite, and lengths."""
        problems = _unknown_tasks(cfg.suite.tasks, "suite.tasks")
        rollout_tasks = cfg.algo.rollout_training_task_names
        if not problems and rollout_tasks:
            tasks = set(resolve_tasks(cfg.suite.tasks))
            extra = [n for n in rollout_tasks if n not in tasks]
            if extra:
                problems.append(f"algo.rollout_training_task_names: got {rollout_tasks!r}, expected a subset of the "
                                f"suite's tasks {sorted(tasks)}")
        unknown = [c for c in cfg.suite.cameras if c not in CAMERAS]
        if unknown and cfg.suite.observation != "state":
            problems.append(f"suite.cameras: {unknown} not a Meta-World camera; its cameras are {', '.join(CAMERAS)}")
        length = cfg.algo.max_episode_length
        if length is not None and length > MAX_EPISODE_LENGTH:
            problems.append(f"algo.max_episode_length: got {length}, expected null or 1..{MAX_EPISODE_LENGTH} "
                            "(Meta-World stops at 500 steps)")
        return problems

    def instruction(self, task: str) -> str:
        return mw.instruction(task)

    def episode_length(self, task: str) -> int:
        return mw.episode_length(task, self.episode_length_override)

    def make_env(self, task: str) -> MetaWorldEnv:
        return MetaWorldEnv(task, self.cfg.observation, self.cameras, self.cfg.image_size)

    def _states(self, task: str, kind: str, seed: int, n: int) -> list[InitialState]:
        env = self._samplers.setdefault(task, mw.make_env(task))
        vecs = mw.sample_variations(task, mw.stream_seed(seed, task, kind), n, env)
        return [InitialState(task, f"{task}/{kind}/{i}", vecs[i]) for i in range(n)]

    def demo_candidates(self, task: str, n: int) -> list[InitialState]:
        return self._states(task, "demo", self.cfg.seed, n)

    def extra_contexts(self, task: str) -> list[InitialState]:
        return self._states(task, "context", self.cfg.seed, self.cfg.contexts_per_task)

    def eval_states(self, task: str) -> list[InitialState]:
        return self._states(task, "eval", self.cfg.eval_seed, self.cfg.eval_states_per_task)

    def training_contexts(self, task: str, demos: Demonstrations | None) -> list[InitialState]:
        """The task's demonstration initial states, then its extra (demo-free) states."""
        return (demos.states[task] if demos is not None else []) + self.extra_contexts(task)

    def check_disjoint(self, demos: Demonstrations) -> None:
        for task in self.tasks:
            check_states_disjoint(demos.states[task] + self.extra_contexts(task) + self.eval_states(task), 9)

    # -- demonstrations --------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        import metaworld
        import mujoco

        return {
            "format": DEMO_FORMAT_VERSION,
            "metaworld": getattr(metaworld, "__version__", "3.1.1"),
            "mujoco": mujoco.__version__,
            "lengths": [self.episode_length(t) for t in self.tasks],
        }

    def demonstrations(self, engine: Any, cache_dir: str | Path | None = None,
                       on_batch: Callable[[list[Episode]], None] | None = None) -> Demonstrations:
        """`demos_per_task` successful scripted-expert episodes per task; failed expert episodes are skipped."""
        return collect_demonstrations(self.tasks, engine, self.cfg.demos_per_task, self.demo_candidates,
                                      demo_cache_path(self, cache_dir), on_batch)
