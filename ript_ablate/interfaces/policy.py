"""The Policy interface: what RIPT needs from a vision-language-action model. Implement it to train your own.

A policy is a torch module built by `factory(cfg, world) -> Policy` (`cfg.policy.options` carries your own
settings). Given a batch of observations (a dict of tensors, one key per observation the world gives, each
(B, ...)) and the encoded instruction of each row, it returns the action chunk's mean `mu` and log-scale `log_b`,
both (B, H, D). The algorithm owns everything else: sampling (mu + scale_factor * exp(log_b) * noise), the
log-prob, the loss and the optimizer.

Why an abstract base class (and an `nn.Module`): the trainer needs module behaviour (parameters, state_dict, .to,
train/eval) anyway, and the base class derives the checkpoint layout and the parameter groups from the three
modules a policy names, so a newcomer implements four methods and gets `lr`, `header_lr`, `fix_scale_head`,
`checkpoint_path`, `header_checkpoint` and `lora_adaptor_ckpt` for free.

Minimal policy:

    class MyPolicy(Policy):
        def __init__(self, obs_dim, action_dim, chunk_size):
            super().__init__()
            self.chunk_size, self.action_dim = chunk_size, action_dim
            self.backbone = nn.Sequential(nn.Linear(obs_dim + 8, 64), nn.Tanh())
            self.action_head = nn.Linear(64, chunk_size * action_dim)
            self.scale_head = nn.Linear(64, chunk_size * action_dim)
        def encode_instruction(self, text): return torch.tensor(my_text_embedding(text))   # (8,), once per task
        def forward(self, obs, instruction):
            h = self.backbone(torch.cat([obs["state"], instruction], -1))
            shape = (-1, self.chunk_size, self.action_dim)
            return self.action_head(h).view(shape), self.scale_head(h).view(shape)
        def modules_by_role(self):
            return {"backbone": self.backbone, "action_head": self.action_head, "scale_head": self.scale_head}

Parameter groups: the backbone's trainable parameters learn at `algo.lr` (after `prepare_for_rl`, which may
freeze the backbone and add an adapter, as the built-in policy does with LoRA); the action head at
`algo.header_lr`; the scale head at `header_lr` too, unless `algo.fix_scale_head` keeps it out of the optimizer.

Checkpoint layout (what the `algo` keys read, all safetensors):
    model    every weight of the policy as rollouts use it (adapters folded in): `algo.checkpoint_path`
    adapter  the backbone's trainable weights + both heads: `algo.lora_adaptor_ckpt`
    header   the scale head alone: `algo.header_checkpoint`

Rollouts: a policy with `replicable = True` (small, CPU-friendly) may be copied into rollout worker processes;
set it False for a large model, which then stays on the trainer's device and the workers only step environments.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from ript_ablate.config import Config

ROLES = ("backbone", "action_head", "scale_head")
CHECKPOINT_PARTS = ("model", "adapter", "header")


class Policy(nn.Module, ABC):
    """obs dict (B, ...) + encoded instructions (B, ...) -> mu (B, H, D), log_b (B, H, D)."""

    chunk_size: int  # H, actions per call, executed open-loop
    action_dim: int  # D
    replicable: bool = True  # small enough to copy into each rollout worker

    @abstractmethod
    def encode_instruction(self, text: str) -> torch.Tensor:
        """The instruction as the policy reads it (token ids, an embedding, ...); called once per task. The
        trainer stacks one row per observation, so every task's encoding must have the same shape."""

    @abstractmethod
    def forward(self, obs: dict[str, torch.Tensor], instruction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, log_b), both (B, H, D), for observations (each (B, ...)) and stacked instruction encodings."""

    @abstractmethod
    def modules_by_role(self) -> dict[str, nn.Module]:
        """The submodules playing each role in `ROLES`: backbone, action_head, scale_head."""

    # -- optional hooks ----------------------------------------------------------------------------------------
    def observe_demonstrations(self, obs: dict[str, torch.Tensor]) -> None:
        """Called once before behaviour cloning with every demonstration observation (e.g. to fit a normaliser)."""

    def prepare_for_rl(self, cfg: Config) -> None:
        """Called once before RL, after the base weights are loaded: add adapters, freeze what must not move.
        Default: the whole backbone trains at `algo.lr`."""

    def rollout_state(self) -> dict[str, torch.Tensor]:
        """Weights a freshly built policy loads to act exactly as this one (adapters folded in)."""
        return {k: v.detach().float().cpu().clone() for k, v in self.state_dict().items()}

    # -- derived: parameter groups and checkpoint layout -------------------------------------------------------
    def role_prefixes(self) -> dict[str, str]:
        """state_dict key prefix of each role's module, e.g. {'scale_head': 'scale_head.'}."""
        roles = self.modules_by_role()
        missing = [r for r in ROLES if r not in roles]
        if missing:
            raise TypeError(f"{type(self).__name__}.modules_by_role() lacks {missing}; it must name {list(ROLES)}")
        names = {id(module): name for name, module in self.named_modules()}
        return {role: names[id(module)] + "." for role, module in roles.items()}

    def backbone_trainable(self) -> list[nn.Parameter]:
        return [p for p in self.modules_by_role()["backbone"].parameters() if p.requires_grad]

    def checkpoint_tensors(self, part: str) -> dict[str, torch.Tensor]:
        """The tensors of one checkpoint part (see the module docstring)."""
        if part == "model":
            return self.rollout_state()
        prefixes = self.role_prefixes()
        state = self.state_dict()
        if part == "header":
            return {k: v for k, v in state.items() if k.startswith(prefixes["scale_head"])}
        if part == "adapter":
            backbone = prefixes["backbone"]
            trainable = {backbone + n for n, p in self.modules_by_role()["backbone"].named_parameters()
                         if p.requires_grad}
            heads = (prefixes["action_head"], prefixes["scale_head"])
            return {k: v for k, v in state.items() if k in trainable or k.startswith(heads)}
        raise ValueError(f"unknown checkpoint part {part!r}; parts are {CHECKPOINT_PARTS}")


def describe_policy(policy: Any) -> str:
    n = sum(p.numel() for p in policy.parameters())
    return f"{type(policy).__name__} ({n / 1e6:.2f}M parameters, H={policy.chunk_size}, D={policy.action_dim})"
