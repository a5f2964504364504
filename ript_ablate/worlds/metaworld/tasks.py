"""Meta-World task facts: presets, instructions, episode lengths, and seeded initial-state variations.

A variation (Meta-World's `rand_vec`: object and goal positions) fully fixes an episode's initial state:
a reset with a fixed variation is deterministic. RIPT contexts are variations; so are evaluation states.
"""

from __future__ import annotations

import pickle
import warnings
from functools import lru_cache
from typing import Any

import numpy as np

from ript_ablate.seeding import stream_seed  # noqa: F401 - the streams of initial states

PRESETS: dict[str, list[str]] = {
    # Tasks with headroom for RL from a few demonstrations: from 5 demonstrations each the base succeeds on about a
    # third to a half of the held-out states of each (measured here: drawer-open, button-press-topdown and door-open
    # reach 95-100% from a single demonstration and window-open 100% from five, so they leave RL nothing to learn).
    "quick": ["reach-v3", "push-v3", "pick-place-v3"],
    "mt10": [
        "reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
        "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3",
    ],
    # Meta-World's ML45 split (metaworld.env_dict.ML45_V3): 45 pre-training tasks and 5 held-out tasks.
    "ml45_train": [
        "assembly-v3", "basketball-v3", "button-press-topdown-v3", "button-press-topdown-wall-v3", "button-press-v3",
        "button-press-wall-v3", "coffee-button-v3", "coffee-pull-v3", "coffee-push-v3", "dial-turn-v3",
        "disassemble-v3", "door-close-v3", "door-open-v3", "drawer-close-v3", "drawer-open-v3", "faucet-open-v3",
        "faucet-close-v3", "hammer-v3", "handle-press-side-v3", "handle-press-v3", "handle-pull-side-v3",
        "handle-pull-v3", "lever-pull-v3", "pick-place-wall-v3", "pick-out-of-hole-v3", "push-back-v3",
        "pick-place-v3", "plate-slide-v3", "plate-slide-side-v3", "plate-slide-back-v3", "plate-slide-back-side-v3",
        "peg-insert-side-v3", "peg-unplug-side-v3", "soccer-v3", "stick-push-v3", "stick-pull-v3", "push-wall-v3",
        "push-v3", "reach-wall-v3", "reach-v3", "shelf-place-v3", "sweep-into-v3", "sweep-v3", "window-open-v3",
        "window-close-v3",
    ],
    "ml45_test": ["bin-picking-v3", "box-close-v3", "hand-insert-v3", "door-lock-v3", "door-unlock-v3"],
}

INSTRUCTIONS: dict[str, str] = {
    "reach-v3": "reach the goal position with the gripper",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "door-open-v3": "open the door by its handle",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "button-press-topdown-v3": "press the button from the top",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
    "bin-picking-v3": "pick up the puck from one bin and place it in the other bin",
    "box-close-v3": "pick up the lid and place it on the box",
    "hand-insert-v3": "push the puck into the hole",
    "door-lock-v3": "lock the door by turning the lock down",
    "door-unlock-v3": "unlock the door by turning the lock",
}

# Per-task episode limits: about twice the scripted expert's median episode length (measured on 20 variations:
# reach 48, push 62, pick-place 55, door-open 82, drawer-open 89, drawer-close 78, button-press-topdown 66,
# peg-insert-side 92, window-open 88, window-close 80 steps), so a slower learned policy can still finish.
EPISODE_LENGTHS: dict[str, int] = {
    "reach-v3": 120,
    "push-v3": 150,
    "pick-place-v3": 150,
    "door-open-v3": 200,
    "drawer-open-v3": 180,
    "drawer-close-v3": 160,
    "button-press-topdown-v3": 150,
    "peg-insert-side-v3": 250,
    "window-open-v3": 180,
    "window-close-v3": 160,
    # ML45's held-out tasks (scripted expert, 20 variations: bin-picking 123, box-close 110, hand-insert 58,
    # door-lock 66, door-unlock 44 steps; the expert solves box-close 17/20 and the others 20/20)
    "bin-picking-v3": 250,
    "box-close-v3": 220,
    "hand-insert-v3": 120,
    "door-lock-v3": 140,
    "door-unlock-v3": 100,
}
DEFAULT_EPISODE_LENGTH = 250

OBS_DIM = 39
ACTION_DIM = 4


@lru_cache(maxsize=1)
def all_task_names() -> tuple[str, ...]:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return tuple(ALL_V3_ENVIRONMENTS)


def instruction(task: str) -> str:
    """The policy's language input; tasks without a hand-written one get their name in words."""
    return INSTRUCTIONS.get(task, task.removesuffix("-v3").replace("-", " "))


def episode_length(task: str, override: int | None = None) -> int:
    return override if override is not None else EPISODE_LENGTHS.get(task, DEFAULT_EPISODE_LENGTH)


def quiet() -> None:
    """Meta-World and its scripted experts warn on every call; silence that in tight loops."""
    warnings.filterwarnings("ignore", module=r"metaworld.*")
    warnings.filterwarnings("ignore", module=r"gymnasium.*")
    warnings.filterwarnings("ignore", category=UserWarning)


def make_env(task: str) -> Any:
    """One raw Meta-World environment (goal observable, as in the MT benchmarks)."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    quiet()
    return ALL_V3_ENVIRONMENTS[task]()


def _task_kwargs(task: str) -> dict[str, Any]:
    from metaworld.env_dict import ML1_ARGS_KWARGS

    kwargs = dict(ML1_ARGS_KWARGS[task]["kwargs"])
    kwargs.pop("task_id", None)
    return kwargs


def sample_variations(task: str, seed: int, n: int, env: Any | None = None) -> np.ndarray:
    """n distinct variations of `task`, reproducible for `seed`.

    Uses the environment's own reset-time sampler (which rejects invalid layouts, e.g. goal too close to
    the object) driven by a seeded generator, exactly as Meta-World builds its benchmark tasks.
    """
    env = env if env is not None else make_env(task)
    env._freeze_rand_vec = False
    env.seeded_rand_vec = True
    env._set_task_called = True
    env._set_task_inner(**_task_kwargs(task))
    env.seed(int(seed % (2**32)))
    out: list[np.ndarray] = []
    seen: set[bytes] = set()
    while len(out) < n:
        env.reset()
        vec = np.asarray(env._last_rand_vec, dtype=np.float64).copy()
        if vec.tobytes() not in seen:
            seen.add(vec.tobytes())
            out.append(vec)
    env._freeze_rand_vec = True
    return np.stack(out) if out else np.zeros((0, 0))


def set_variation(env: Any, task: str, rand_vec: np.ndarray) -> None:
    """Point an existing environment at a variation (cheap: no new MuJoCo model)."""
    from metaworld.types import Task

    data = dict(_task_kwargs(task), rand_vec=np.asarray(rand_vec), env_cls=type(env), partially_observable=False)
    env.set_task(Task(env_name=task, data=pickle.dumps(data)))
