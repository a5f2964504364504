"""A small MLP policy with action and scale heads, written against `ript_ablate.interfaces.Policy`.

The instruction is encoded as a hashed bag of words (a fixed float vector per task); the backbone reads the state
and that vector; the heads give the chunk's mean and log-scale. No adapter: RL fine-tunes the whole backbone at
`algo.lr` (the default `prepare_for_rl`).
"""

from __future__ import annotations

import difflib
import re
import zlib
from typing import Any

import torch
from torch import nn

from ript_ablate.interfaces import Policy

OPTIONS = {"hidden": 64, "chunk_size": 4, "instruction_dim": 16, "scale_bias_init": -2.0, "seed": 0,
           "replicable": True}


def bag_of_words(text: str, dim: int) -> torch.Tensor:
    vec = torch.zeros(dim)
    for word in re.findall(r"[a-z]+", text.lower()):
        vec[zlib.crc32(word.encode()) % dim] += 1.0
    return vec / max(float(vec.norm()), 1.0)


class MLPPolicy(Policy):
    def __init__(self, obs_dim: int, action_dim: int, options: dict[str, Any]):
        super().__init__()
        self.chunk_size, self.action_dim = int(options["chunk_size"]), action_dim
        self.instruction_dim, hidden = int(options["instruction_dim"]), int(options["hidden"])
        self.replicable = bool(options["replicable"])  # false: rollouts use central inference
        out = self.chunk_size * action_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(options["seed"]))
            self.backbone = nn.Sequential(nn.Linear(obs_dim + self.instruction_dim, hidden), nn.Tanh(),
                                          nn.Linear(hidden, hidden), nn.Tanh())
            self.action_head = nn.Linear(hidden, out)
            self.scale_head = nn.Linear(hidden, out)
            nn.init.normal_(self.scale_head.weight, std=1e-3)
            nn.init.constant_(self.scale_head.bias, float(options["scale_bias_init"]))

    def encode_instruction(self, text: str) -> torch.Tensor:
        return bag_of_words(text, self.instruction_dim)

    def forward(self, obs: dict[str, torch.Tensor], instruction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.backbone(torch.cat([obs["state"], instruction.to(obs["state"].dtype)], dim=-1))
        shape = (-1, self.chunk_size, self.action_dim)
        return self.action_head(hidden).view(shape), self.scale_head(hidden).view(shape)

    def modules_by_role(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, "action_head": self.action_head, "scale_head": self.scale_head}


def make_mlp_policy(cfg: Any, world: Any) -> MLPPolicy:
    """The `mlp` plug-in: settings from `policy.options` (see OPTIONS)."""
    (obs_dim,) = world.observation_shapes["state"]
    return MLPPolicy(obs_dim, world.action_dim, {**OPTIONS, **cfg.policy.options})


def _config_problems(cfg: Any) -> list[str]:
    return [f"policy.options.{k}: unknown option{closest(k, OPTIONS)}; options are {', '.join(OPTIONS)}"
            for k in cfg.policy.options if k not in OPTIONS]


def closest(name: str, known: dict) -> str:
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


make_mlp_policy.config_problems = _config_problems  # type: ignore[attr-defined]
# how rollouts run the policy changes none of its weights: the behaviour-cloning base is shared across it
make_mlp_policy.inert_options = frozenset({"replicable"})  # type: ignore[attr-defined]
