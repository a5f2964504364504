"""The Laplace (or Gaussian) head family (OpenVLA-OFT in RIPT): the policy returns `mu` and `log_b`, both (B, H, D).

Sampling: a = mu + scale_factor * exp(log_b) * noise, noise Laplace(0, 1) or, for the ablation, N(0, 1); the
evaluation action is `mu`. The record is (mu, log_b) as the rollout saw them, and the behaviour log-prob is computed
from it (the original does not re-score before the update).

Log-probabilities as RIPT computes them for the PPO ratio, per element (chunk step h, action dim d), b = exp(log_b):
    Laplace   -log_b - |a - mu| / b - log 2
    Gaussian  -log_b - (a - mu)^2 / (2 b^2) - log(2 pi) / 2
Original behaviour (`exact=False`): log_b is clamped to `log_scale_clip` (no gradient where the clamp is
active; `None`, the original base config's null, means no clamp) and `scale_factor` is left out, although
sampling used b * scale_factor unclamped: the ratio's density is not the behaviour density. `exact=True` uses
the sampling density itself (scale_factor in, no clamp). The noise family follows the sampling switch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ript_ablate.families.base import ChunkDraw, ChunkFamily, inference, reduce_action_dims, step_mask, to_numpy

LOG2 = math.log(2.0)
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def effective_log_scale(log_b: torch.Tensor, log_scale_clip: Sequence[float] | None, scale_factor: float,
                        exact: bool) -> torch.Tensor:
    if exact:
        return log_b + math.log(scale_factor)
    if log_scale_clip is None:
        return log_b
    return torch.clamp(log_b, log_scale_clip[0], log_scale_clip[1])


def elementwise_log_prob(actions: torch.Tensor, mu: torch.Tensor, log_scale: torch.Tensor,
                         laplace: bool) -> torch.Tensor:
    z = (actions - mu) / torch.exp(log_scale)
    if laplace:
        return -log_scale - z.abs() - LOG2
    return -log_scale - 0.5 * z * z - HALF_LOG_2PI


def log_prob(actions: torch.Tensor, mu: torch.Tensor, log_b: torch.Tensor, *, laplace: bool, mode: str,
             log_scale_clip: Sequence[float] | None, scale_factor: float = 1.0, exact: bool = False) -> torch.Tensor:
    """The log-prob entering the PPO ratio, shaped per `mode` (see module docstring)."""
    log_scale = effective_log_scale(log_b, log_scale_clip, scale_factor, exact)
    return reduce_action_dims(elementwise_log_prob(actions, mu, log_scale, laplace), mode)


@dataclass(frozen=True)
class ActionDistribution(ChunkFamily):
    """Laplace (or Gaussian) chunk distribution with RIPT's sampling and ratio switches."""

    family: ClassVar[str] = "laplace"

    laplace: bool = True
    scale_factor: float = 1.0
    log_scale_clip: tuple[float, float] | None = None
    log_prob_mode: str = "sum_on_action_dim"
    exact: bool = False

    @classmethod
    def from_algo(cls, algo: Any) -> ActionDistribution:
        """From the `algo` config section (use_laplace_sampling, scale_factor, log_scale_clip, log_prob_mode,
        exact_behavior_logprob)."""
        clip = algo.log_scale_clip
        return cls(laplace=algo.use_laplace_sampling, scale_factor=algo.scale_factor,
                   log_scale_clip=None if clip is None else (float(clip[0]), float(clip[1])),
                   log_prob_mode=algo.log_prob_mode, exact=algo.exact_behavior_logprob)

    @property
    def scale_name(self) -> str | None:
        return "log_b"

    def sample(self, mu: np.ndarray, log_b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One behaviour action chunk (H, D) for one episode, drawn from that episode's generator."""
        noise = rng.laplace(size=mu.shape) if self.laplace else rng.standard_normal(mu.shape)
        return mu + self.scale_factor * np.exp(log_b) * noise

    def choose(self, mu: np.ndarray, log_b: np.ndarray, rngs: Sequence[np.random.Generator],
               stochastic: Sequence[bool]) -> ChunkDraw:
        """Each row's chunk from given (mu, log_b): a sample, or the mean for a deterministic row."""
        actions = [self.sample(mu[i], log_b[i], rng) if s else mu[i]
                   for i, (rng, s) in enumerate(zip(rngs, stochastic))]
        return ChunkDraw(actions, {"mu": mu, "log_b": log_b})

    def act(self, policy: Any, obs: dict[str, torch.Tensor], instr: torch.Tensor,
            rngs: Sequence[np.random.Generator], stochastic: Sequence[bool], precision: str) -> ChunkDraw:
        with inference(instr.device, precision):
            mu, log_b = policy(obs, instr)
        return self.choose(to_numpy(mu), to_numpy(log_b), rngs, stochastic)

    def log_prob(self, actions: torch.Tensor, mu: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
        """The log-prob entering the PPO ratio, shaped per `log_prob_mode`."""
        return log_prob(actions, mu, log_b, laplace=self.laplace, mode=self.log_prob_mode,
                        log_scale_clip=self.log_scale_clip, scale_factor=self.scale_factor, exact=self.exact)

    def score(self, policy: Any, obs: dict[str, torch.Tensor], instr: torch.Tensor, actions: torch.Tensor,
              record: dict[str, torch.Tensor], precision: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from ript_ablate.device import autocast

        with autocast(instr.device, precision):
            mu, log_b = policy(obs, instr)
        return self.log_prob(actions, mu.float(), log_b.float()), {"log_b": log_b.float()}

    def old_log_prob(self, actions: torch.Tensor, record: dict[str, torch.Tensor]) -> torch.Tensor:
        """From the mu/log_b stored at rollout (no recompute before the update, as the original)."""
        return self.log_prob(actions, record["mu"], record["log_b"])

    def mask(self, valid: torch.Tensor, action_dim: int) -> torch.Tensor:
        return step_mask(valid, self.log_prob_mode, action_dim)
