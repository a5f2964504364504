"""The action distribution: how rollouts sample actions and how the update scores them, in one object.

`ActionDistribution.from_algo(algo)` is built once per run; rollouts call `sample` (numpy, each episode with
its own generator, so results never depend on which process or batch ran it) and the update calls `log_prob`
(torch). Sampling: a = mu + scale_factor * exp(log_b) * noise, noise Laplace(0, 1) or, for the ablation,
N(0, 1).

Log-probabilities as RIPT computes them for the PPO ratio.

Per element (chunk step h, action dim d) with b = exp(log_b):
    Laplace   -log_b - |a - mu| / b - log 2
    Gaussian  -log_b - (a - mu)^2 / (2 b^2) - log(2 pi) / 2
Original behaviour (`exact=False`): log_b is clamped to `log_scale_clip` (no gradient where the clamp is
active; `None`, the original base config's null, means no clamp) and `scale_factor` is left out, although
sampling used b * scale_factor unclamped: the ratio's density is not the behaviour density. `exact=True` uses
the sampling density itself (scale_factor in, no clamp).
The noise family follows the sampling switch (Laplace, or this project's Gaussian ablation).

Reduction over action dims (`log_prob_mode`):
    sum_on_action_dim    one log-prob (one ratio) per chunk step, summed over D
    avg_on_action_dim    one per chunk step, averaged over D
    ratio_on_action_dim  one per element (a ratio per action dim)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

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


def reduce_action_dims(logp: torch.Tensor, mode: str) -> torch.Tensor:
    """(..., H, D) -> (..., H) for the per-step modes; unchanged for the per-element mode."""
    if mode == "sum_on_action_dim":
        return logp.sum(-1)
    if mode == "avg_on_action_dim":
        return logp.mean(-1)
    if mode == "ratio_on_action_dim":
        return logp
    raise ValueError(f"unknown log_prob_mode {mode!r}")


def log_prob(actions: torch.Tensor, mu: torch.Tensor, log_b: torch.Tensor, *, laplace: bool, mode: str,
             log_scale_clip: Sequence[float] | None, scale_factor: float = 1.0, exact: bool = False) -> torch.Tensor:
    """The log-prob entering the PPO ratio, shaped per `mode` (see module docstring)."""
    log_scale = effective_log_scale(log_b, log_scale_clip, scale_factor, exact)
    return reduce_action_dims(elementwise_log_prob(actions, mu, log_scale, laplace), mode)


def step_mask(valid: torch.Tensor, mode: str, action_dim: int) -> torch.Tensor:
    """Valid mask matching `log_prob`'s shape: per step, or per element (normaliser multiplied by D)."""
    if mode == "ratio_on_action_dim":
        return valid.unsqueeze(-1).expand(*valid.shape, action_dim)
    return valid


@dataclass(frozen=True)
class ActionDistribution:
    """Laplace (or Gaussian) chunk distribution with RIPT's sampling and ratio switches; picklable, so
    rollout worker processes receive the same object the trainer uses."""

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

    def sample(self, mu: np.ndarray, log_b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One behaviour action chunk (H, D) for one episode, drawn from that episode's generator."""
        noise = rng.laplace(size=mu.shape) if self.laplace else rng.standard_normal(mu.shape)
        return mu + self.scale_factor * np.exp(log_b) * noise

    def log_prob(self, actions: torch.Tensor, mu: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
        """The log-prob entering the PPO ratio, shaped per `log_prob_mode`."""
        return log_prob(actions, mu, log_b, laplace=self.laplace, mode=self.log_prob_mode,
                        log_scale_clip=self.log_scale_clip, scale_factor=self.scale_factor, exact=self.exact)

    def mask(self, valid: torch.Tensor, action_dim: int) -> torch.Tensor:
        """A (C, H) mask of counted positions, shaped like `log_prob`'s output."""
        return step_mask(valid, self.log_prob_mode, action_dim)
