"""A plug-in checked against its contract the moment it is built, before any demonstration, base or rollout.

One reset of one environment checks the observation against the world's `observation_shapes` (keys, shapes, a
numeric dtype, uint8 for an (S, S, 3) image); one forward of the policy on a batch of two such observations (stacked as the rollout engine stacks
them) checks its outputs against its family's contract: `(mu, log_b)`, both `(B, chunk_size, action_dim)`
(laplace); logits `(B, chunk_size, action_dim, n_bins)` (tokens); a velocity `(B, chunk_size, action_dim)` from
`velocity(prefix, x_t, t)` at t = 1 (flow); all finite. A failure is one message that
names the plug-in, the method, what it returned and what was expected, instead of a broadcasting error deep in
behaviour cloning or an IndexError in the rollout engine after a base was trained and cached.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ript_ablate.episodes import stack_observations
from ript_ablate.errors import ConfigError

BATCH = 2


def _describe(value: Any) -> str:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return f"{type(value).__name__} of shape {tuple(value.shape)} ({value.dtype})"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}: " + ", ".join(_describe(v) for v in value)
    return type(value).__name__


def observation_problems(world: Any, obs: Any, where: str) -> list[str]:
    declared = {k: tuple(v) for k, v in world.observation_shapes.items()}
    if not isinstance(obs, dict):
        return [f"{where} returned {_describe(obs)}, expected a dict of numpy arrays with keys {sorted(declared)}"]
    problems = []
    if set(obs) != set(declared):
        problems.append(f"{where} returned the keys {sorted(obs)}, but observation_shapes declares {sorted(declared)}")
    for key in sorted(set(obs) & set(declared)):
        value = np.asarray(obs[key])
        if value.shape != declared[key]:
            problems.append(f"{where} returned {key!r} of shape {value.shape}, but observation_shapes declares "
                            f"{declared[key]}")
        elif not (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
            problems.append(f"{where} returned {key!r} of dtype {value.dtype}, expected a numeric array")
        elif len(declared[key]) == 3 and declared[key][2] == 3 and value.dtype != np.uint8:
            problems.append(f"{where} returned the image {key!r} as {value.dtype}, expected uint8 RGB (0-255): images "
                            "stay uint8 until the policy's first layer")
    return problems


def policy_problems(policy: Any, world: Any, obs: dict[str, np.ndarray], task: str, name: str) -> list[str]:
    batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in stack_observations([obs] * BATCH).items()}
    instruction = policy.encode_instruction(world.instruction(task))
    where = f"policy {name!r}: {type(policy).__name__}.forward(obs, instruction)"
    with torch.no_grad():
        try:
            out = policy(batch, instruction.unsqueeze(0).expand(BATCH, *instruction.shape))
        except Exception as exc:  # noqa: BLE001 - the plug-in's own failure, named
            return [f"{where} failed on a batch of {BATCH} observations from the world: {type(exc).__name__}: {exc}"]
    expected = (BATCH, int(policy.chunk_size), int(world.action_dim))
    family = getattr(policy, "family", "laplace")
    if family == "tokens":
        return _token_problems(policy, out, expected, where)
    if family == "flow":
        return _flow_problems(policy, out, expected, name)
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
        return [f"{where} returned {_describe(out)}, expected (mu, log_b), two tensors of shape (B, chunk_size, "
                f"action_dim) = {expected}"]
    problems = []
    for label, tensor in zip(("mu", "log_b"), out):
        if tuple(tensor.shape) != expected:
            problems.append(f"{where} returned {label} of shape {tuple(tensor.shape)}, expected (B, chunk_size, "
                            f"action_dim) = {expected} (chunk_size {policy.chunk_size} from the policy, "
                            f"action_dim {world.action_dim} from the world)")
        elif not torch.isfinite(tensor).all():
            problems.append(f"{where} returned a non-finite {label} for a fresh observation")
    return problems


def _token_problems(policy: Any, logits: Any, expected: tuple[int, ...], where: str) -> list[str]:
    n_bins = getattr(policy, "n_bins", None)
    if not isinstance(n_bins, int) or n_bins < 2:
        return [f"{where}: a token policy needs an integer n_bins >= 2, it has {n_bins!r}"]
    want = (*expected, n_bins)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != want:
        return [f"{where} returned {_describe(logits)}, expected logits of shape (B, chunk_size, action_dim, n_bins) "
                f"= {want}"]
    if not torch.isfinite(logits).all():
        return [f"{where} returned non-finite logits for a fresh observation"]
    return []


def _flow_problems(policy: Any, prefix: Any, expected: tuple[int, ...], name: str) -> list[str]:
    where = f"policy {name!r}: {type(policy).__name__}.velocity(prefix, x_t, t)"
    steps = getattr(policy, "denoise_steps", None)
    if not isinstance(steps, int) or steps < 1:
        return [f"{where}: a flow policy needs an integer denoise_steps >= 1, it has {steps!r}"]
    with torch.no_grad():
        try:
            v = policy.velocity(prefix, torch.zeros(expected), torch.ones(expected[0]))
        except Exception as exc:  # noqa: BLE001 - the plug-in's own failure, named
            return [f"{where} failed on the prefix its forward returned, x_t of shape {expected} and t of shape "
                    f"({expected[0]},): {type(exc).__name__}: {exc}"]
    if not isinstance(v, torch.Tensor) or tuple(v.shape) != expected:
        return [f"{where} returned {_describe(v)}, expected a velocity of shape (B, chunk_size, action_dim) = "
                f"{expected}"]
    if not torch.isfinite(v).all():
        return [f"{where} returned a non-finite velocity for a fresh observation"]
    return []


def check_plugins(cfg: Any, world: Any | None = None) -> None:
    """Reset one environment and run one forward; raises ConfigError with every problem found."""
    from ript_ablate.plugins import build_policy, build_world

    world = world or build_world(cfg)
    task = world.tasks[0]
    states = world.eval_states(task)
    if not states:
        raise ConfigError([f"suite.name {cfg.suite.name!r}: {type(world).__name__}.eval_states({task!r}) returned "
                           "no state; every task needs evaluation states"])
    env = world.make_env(task)
    try:
        obs = env.reset(states[0])
    finally:
        close = getattr(env, "close", None)
        if callable(close):
            close()
    where = f"world {cfg.suite.name!r}: {type(env).__name__}.reset(state) of task {task!r}"
    problems = observation_problems(world, obs, where)
    if not problems:
        policy = build_policy(cfg, world).eval()
        problems = policy_problems(policy, world, obs, task, cfg.policy.name)
    if problems:
        raise ConfigError(problems)
