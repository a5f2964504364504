"""The evaluation before the first update, computed once per start policy and cached.

Every cell of a study that starts from the same base starts from the same function: RIPT's adapters begin as the
identity (LoRA's B is zero), whatever the cell's seed or switches. Its iteration-0 evaluation (deterministic mean
actions on fixed states, or sampled ones with noise seeded per state) is therefore the same for all of them, and in
short cells it is a third of the work.

The key holds a *probe* of the start policy: its outputs, to the bit, on the first observations of each task's
first demonstration. A policy whose preparation for RL changes what it computes, a different base, header or
adapter gets another probe and so its own entry. With the probe go the evaluation states (ids and data), episode
limits, the world's description and code, the evaluation and rollout-engine code, how inference is batched and
the precision and torch's thread count. Multi-process trials evaluate as before (their ranks split the episodes).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ript_ablate.cache_keys import code_digest, digest, owning_package
from ript_ablate.device import autocast
from ript_ablate.evaluation import EvalResult

PROBE_ROWS = 8
EVAL_CODE = ("ript_ablate.evaluation", "ript_ablate.engine", "ript_ablate.episodes", "ript_ablate.families")


def probe_digest(policy: Any, world: Any, demos: Any, device: torch.device, precision: str) -> str | None:
    """The start policy's outputs on a few demonstration observations per task, hashed; None without demos."""
    if demos is None or not all(demos.episodes.get(t) for t in world.tasks):
        return None
    sha = hashlib.sha256()
    with torch.no_grad():
        for task in world.tasks:
            episode = demos.episodes[task][0]
            obs = {k: torch.as_tensor(np.asarray(v[:PROBE_ROWS])).to(device) for k, v in episode.obs.items()}
            rows = next(iter(obs.values())).shape[0]
            instruction = policy.encode_instruction(world.instruction(task)).to(device)
            with autocast(device, precision):
                out = policy(obs, instruction.unsqueeze(0).expand(rows, *instruction.shape))
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                sha.update(tensor.detach().float().cpu().numpy().tobytes())
        if getattr(policy, "family", "laplace") != "laplace":  # its action also depends on modules past forward
            for name, tensor in sorted(policy.rollout_state().items()):
                sha.update(name.encode() + tensor.numpy().tobytes())
    return sha.hexdigest()[:16]


def eval_key(cfg: Any, world: Any, probe: str, inference: str, device: torch.device) -> str:
    states = hashlib.sha256()
    for task in world.tasks:
        for state in world.eval_states(task):
            states.update(state.state_id.encode() + np.asarray(state.data, dtype=np.float64).tobytes())
    suite = cfg.suite
    family = {"flow_logprob": cfg.algo.flow_logprob, "flow_eval_noise": cfg.algo.flow_eval_noise}  # what evaluates
    return digest({"format": 1, "probe": probe, "family": family, "states": states.hexdigest(), "world": world.describe(),
                   "lengths": [world.episode_length(t) for t in world.tasks],
                   "world_code": code_digest(owning_package(type(world))), "eval_code": code_digest(*EVAL_CODE),
                   "inference": inference, "batching": [suite.num_workers, suite.envs_per_worker],
                   "precision": cfg.training.precision, "device": device.type, "torch": torch.__version__,
                   "threads": torch.get_num_threads(), **_observation(cfg, world), **_sampling(cfg)})


def _sampling(cfg: Any) -> dict[str, Any]:
    """With `training.eval_mode: sample`, the settings that shape the sampled actions (nothing for the mean
    action's evaluation, whose keys stay as they were)."""
    if cfg.training.eval_mode == "mean":
        return {}
    a = cfg.algo
    return {"eval_mode": cfg.training.eval_mode,
            "sampling": [a.use_laplace_sampling, a.scale_factor, a.temperature, a.top_k, a.flow_noise_level,
                         list(a.flow_noise_std), a.flow_noise_std_init]}


def _observation(cfg: Any, world: Any) -> dict[str, Any]:
    """What the evaluated policy sees, when it is images: the cameras, their size and the OpenGL backend rendering
    them (nothing for state observations, whose keys stay as they were)."""
    suite = cfg.suite
    if suite.observation == "state":
        return {}
    cameras = list(getattr(world, "cameras", suite.cameras))
    return {"observation": [suite.observation, cameras, suite.image_size, os.environ.get("MUJOCO_GL", "")]}


def _path(cfg: Any, key: str) -> Path:
    return Path(cfg.sft.cache_dir) / "eval" / f"start-{key}.json"


def load(cfg: Any, key: str) -> EvalResult | None:
    path = _path(cfg, key)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if "outcomes" not in data:
            return None  # written before per-state outcomes were kept: evaluated once more, so runs can tag them
        return EvalResult({k: float(v) for k, v in data["per_task"].items()}, int(data["episodes"]),
                          int(data["env_steps"]), {k: int(v) for k, v in data.get("states", {}).items()},
                          {k: str(v) for k, v in data["outcomes"].items()})
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged entry is evaluated again and rewritten


def save(cfg: Any, key: str, result: EvalResult) -> None:
    path = _path(cfg, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"per_task": result.per_task, "episodes": result.episodes,
                               "env_steps": result.env_steps, "states": result.states,
                               "outcomes": result.outcomes}))
    tmp.replace(path)
