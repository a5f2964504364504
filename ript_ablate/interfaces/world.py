"""The World interface: what RIPT needs from a simulator and its tasks. Implement it to train on your own.

A world is built from the run's config (`factory(cfg) -> World`, usually the class itself) in the trainer and
again in every rollout worker process, so building it must be cheap and deterministic: the same config gives the
same tasks, contexts and evaluation states everywhere. Environments are built lazily with `make_env`.

Why an abstract base class and not a Protocol: a world inherits working defaults (no demonstrations, no extra
config checks, presets) and a missing method fails when the world is built, naming the method, rather than
deep inside a rollout.

Minimal world:

    class MyWorld(World):
        action_dim = 2
        observation_shapes = {"state": (4,)}
        def __init__(self, cfg): self.tasks = ["reach"]; self.cfg = cfg
        def instruction(self, task): return "move to the target"
        def episode_length(self, task): return 50
        def training_contexts(self, task, demos): return [InitialState(task, f"{task}/train/{i}", i) ...]
        def eval_states(self, task): return [InitialState(task, f"{task}/eval/{i}", 1000 + i) ...]
        def make_env(self, task): return MyEnv()      # reset(state) -> obs, step(action) -> (obs, success)

Observations are dicts of numpy arrays ({"state": (n,)}, and e.g. {"image": (h, w, 3)} where the world renders);
the policy reads the keys it knows. Actions are numpy arrays (action_dim,); success is sticky (the engine ends an
episode at its first success or at `episode_length(task)` steps).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from ript_ablate.episodes import Demonstrations, Episode, InitialState, Observation

if TYPE_CHECKING:
    from ript_ablate.config import Config


@runtime_checkable
class Env(Protocol):
    """One environment instance; the engine reuses it across episodes of its task."""

    def reset(self, state: InitialState) -> Observation:
        """Reset to exactly this initial state (deterministic) and return the first observation."""

    def step(self, action: np.ndarray) -> tuple[Observation, bool]:
        """Apply one action (action_dim,); return the next observation and whether the task is now solved."""


class UnobservedStepEnv(Env, Protocol):
    """Optional: an environment whose observations are costly (rendered images) may step without making one. The
    engine reads an observation only where the policy acts (the first step of each action chunk), so it calls this
    for the other steps of a chunk; an environment without it is stepped with `step` and the observation dropped."""

    def step_unobserved(self, action: np.ndarray) -> bool:
        """Apply one action like `step`; return only whether the task is now solved."""


class ExpertEnv(Env, Protocol):
    """An environment with a scripted expert, which the built-in demonstration collection uses."""

    def expert_action(self, obs: Observation) -> np.ndarray:
        """The expert's action for this observation (the environment may keep expert state between calls)."""


class World(ABC):
    """Tasks, instructions, contexts, evaluation states, optional demonstrations, and environments."""

    tasks: list[str]  # the tasks of this run, presets expanded
    action_dim: int
    observation_shapes: dict[str, tuple[int, ...]]  # each observation key's shape, e.g. {"state": (39,)}
    run_config: Config  # the config the world was built from, set by the framework (cache keys read it)
    inert_options: frozenset[str] = frozenset()  # `suite.options` that change no demonstration: not in cache keys
    #: the `suite.observation` settings this world honours (state; images and both for a world that renders
    #: `suite.cameras` at `suite.image_size` as uint8 (S, S, 3) arrays); any other is refused before compute
    observations: tuple[str, ...] = ("state",)

    @abstractmethod
    def instruction(self, task: str) -> str:
        """The task's language instruction, which the policy encodes its own way."""

    @abstractmethod
    def episode_length(self, task: str) -> int:
        """Step limit of an episode of `task` (the engine stops there, counted as a failure)."""

    @abstractmethod
    def training_contexts(self, task: str, demos: Demonstrations | None) -> list[InitialState]:
        """RIPT's contexts for `task` (the original: the demonstrations' own initial states, then more)."""

    @abstractmethod
    def eval_states(self, task: str) -> list[InitialState]:
        """Fixed held-out evaluation initial states, disjoint from the training contexts."""

    @abstractmethod
    def make_env(self, task: str) -> Env:
        """A new environment of `task` (called once per environment slot in each worker process)."""

    # -- optional --------------------------------------------------------------------------------------------
    def demonstrations(self, engine: Any, cache_dir: str | None = None,
                       on_batch: Callable[[list[Episode]], None] | None = None) -> Demonstrations | None:
        """Expert demonstrations for behaviour cloning (`sft.*`), or None when the world has none (then a run
        must start from `algo.checkpoint_path`). Worlds whose environments have `expert_action` return
        `collect_demonstrations(self.tasks, engine, want, candidates, demo_cache_path(self, cache_dir), on_batch)`
        (both from `ript_ablate.interfaces`), where `candidates(task, n)` gives n initial states to try in order."""
        return None

    @classmethod
    def config_problems(cls, cfg: Config) -> list[str]:
        """Config errors this world can see before any compute (unknown task names, ...), each naming its key."""
        return []

    def describe(self) -> dict[str, Any]:
        """What identifies this world's data beyond its settings and code, e.g. the simulator's version (hashed
        into the demonstration key with `suite.name/tasks/demos_per_task/seed/options` and the world's package:
        see `ript_ablate.cache_keys`)."""
        return {"world": type(self).__name__, "tasks": self.tasks}
