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

Families: this class is the Laplace family (`family = "laplace"`). `TokenPolicy` (action tokens: `forward` returns
logits (B, H, D, n_bins)) and `FlowPolicy` (flow matching: `forward` returns a prefix, `velocity` integrates) are
the others; `ript_ablate.families` samples and scores each, with the switches of docs/families.md. A family without
a scale head returns None for the `scale_head` role.

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
    family: str = "laplace"  # laplace | tokens | flow (ript_ablate.families)

    @abstractmethod
    def encode_instruction(self, text: str) -> torch.Tensor:
        """The instruction as the policy reads it (token ids, an embedding, ...); called once per task. The
        trainer stacks one row per observation, so every task's encoding must have the same shape."""

    @abstractmethod
    def forward(self, obs: dict[str, torch.Tensor], instruction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, log_b), both (B, H, D), for observations (each (B, ...)) and stacked instruction encodings."""

    @abstractmethod
    def modules_by_role(self) -> dict[str, nn.Module | None]:
        """The submodules playing each role in `ROLES`: backbone, action_head, scale_head (None: the family has
        none, as a token policy)."""

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
        return {role: names[id(module)] + "." for role, module in roles.items() if module is not None}

    def backbone_trainable(self) -> list[nn.Parameter]:
        return [p for p in self.modules_by_role()["backbone"].parameters() if p.requires_grad]

    def checkpoint_tensors(self, part: str) -> dict[str, torch.Tensor]:
        """The tensors of one checkpoint part (see the module docstring)."""
        if part == "model":
            return self.rollout_state()
        prefixes = self.role_prefixes()
        state = self.state_dict()
        if part == "header":
            if "scale_head" not in prefixes:
                return {}
            return {k: v for k, v in state.items() if k.startswith(prefixes["scale_head"])}
        if part == "adapter":
            backbone = prefixes["backbone"]
            trainable = {backbone + n for n, p in self.modules_by_role()["backbone"].named_parameters()
                         if p.requires_grad}
            heads = tuple(prefixes[r] for r in ("action_head", "scale_head") if r in prefixes)
            return {k: v for k, v in state.items() if k in trainable or k.startswith(heads)}
        raise ValueError(f"unknown checkpoint part {part!r}; parts are {CHECKPOINT_PARTS}")


class TokenPolicy(Policy):
    """The action-token family: `forward(obs, instruction)` returns logits (B, H, D, n_bins), one token per chunk
    step and action dim; token j stands for the centre of the j-th of n_bins equal bins over [action_low,
    action_high]. The `action_head` role is the logits head; there is no scale head (return None for it)."""

    family = "tokens"
    n_bins: int
    action_low: float = -1.0
    action_high: float = 1.0

    @abstractmethod
    def forward(self, obs: dict[str, torch.Tensor], instruction: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Logits (B, chunk_size, action_dim, n_bins)."""


class FlowPolicy(Policy):
    """The flow-matching family (pi0-style): `forward(obs, instruction)` computes the prefix once per chunk (what the
    action expert attends to: a KV cache, hidden states), `velocity(prefix, x_t, t)` is the expert, called once per
    denoising step. `noise_std_raw` (an unbounded noise-head output, for flow_noise) and `log_scale` (a Laplace
    scale head, for laplace_ode) are needed only by the log-prob that uses them. Roles: `action_head` the expert,
    `scale_head` the module holding those heads."""

    family = "flow"
    denoise_steps: int = 4

    @abstractmethod
    def forward(self, obs: dict[str, torch.Tensor], instruction: torch.Tensor) -> Any:  # type: ignore[override]
        """The prefix the expert reads (any tensor or tuple of tensors with B rows)."""

    @abstractmethod
    def velocity(self, prefix: Any, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v (B, H, D) at noisy chunks x_t (B, H, D) and times t (B,), 1 = noise, 0 = action."""

    def noise_std_raw(self, prefix: Any, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """flow_noise: the noise head's unbounded output (B, H, D), mapped into algo.flow_noise_std by a sigmoid."""
        raise NotImplementedError(f"{type(self).__name__} has no noise head: algo.flow_logprob flow_noise needs "
                                  "noise_std_raw(prefix, x_t, t)")

    def log_scale(self, prefix: Any) -> torch.Tensor:
        """laplace_ode: log_b (B, H, D) of the Laplace distribution around the ODE's output."""
        raise NotImplementedError(f"{type(self).__name__} has no Laplace scale head: algo.flow_logprob laplace_ode "
                                  "needs log_scale(prefix)")


def describe_policy(policy: Any) -> str:
    n = sum(p.numel() for p in policy.parameters())
    return (f"{type(policy).__name__} ({getattr(policy, 'family', 'laplace')} family, {n / 1e6:.2f}M parameters, "
            f"H={policy.chunk_size}, D={policy.action_dim})")
