"""What every policy family supplies to RIPT: a behaviour sample, the log-prob that enters the PPO ratio, a
deterministic action for evaluation, and the record a rollout keeps to re-score its sample later.

A family sits below both the rollout engine (which calls `act` for the live rows of a batch, in replica or central
mode alike) and the algorithm (which calls `score` in the update and `old_log_prob` once per trajectory). Every row
draws its randomness from its own episode's generator, in a fixed order within the row, so an episode never depends
on which process ran it or which other rows shared its forward pass.

Reduction over action dims (`log_prob_mode`), shared by every family whose log-prob is per action element:
    sum_on_action_dim    one log-prob (one ratio) per chunk step, summed over D
    avg_on_action_dim    one per chunk step, averaged over D
    ratio_on_action_dim  one per element (a ratio per action dim; for action tokens, a ratio per token)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ript_ablate.config import LOG_PROB_MODES  # noqa: F401 - re-exported


def reduce_action_dims(logp: torch.Tensor, mode: str) -> torch.Tensor:
    """(..., H, D) -> (..., H) for the per-step modes; unchanged for the per-element mode."""
    if mode == "sum_on_action_dim":
        return logp.sum(-1)
    if mode == "avg_on_action_dim":
        return logp.mean(-1)
    if mode == "ratio_on_action_dim":
        return logp
    raise ValueError(f"unknown log_prob_mode {mode!r}")


def step_mask(valid: torch.Tensor, mode: str, action_dim: int) -> torch.Tensor:
    """Valid mask matching the log-prob's shape: per step, or per element (normaliser multiplied by D)."""
    if mode == "ratio_on_action_dim":
        return valid.unsqueeze(-1).expand(*valid.shape, action_dim)
    return valid


@dataclass
class ChunkDraw:
    """One chunk for each row of a forward: what the environments execute and what the episode records."""

    actions: list[np.ndarray]  # one (H, D) chunk per row
    record: dict[str, np.ndarray]  # each (B, ...): what re-scoring the chunk needs (mu/log_b, tokens, a chain)


class ChunkFamily(ABC):
    """A chunk distribution and its PPO log-prob. Instances are small frozen dataclasses: picklable, so rollout
    worker processes receive the very object the trainer uses."""

    family: ClassVar[str]  # laplace | tokens | flow: the kind of policy it reads
    log_prob_mode: str

    @property
    def scored_record_keys(self) -> tuple[str, ...]:
        """Keys of the record the update needs on the training device (the rest stay with the episode)."""
        return ()

    @property
    def scale_name(self) -> str | None:
        """Name of the per-element scale `score` returns and the update reports (scale/<name>_mean), or None."""
        return None
    @property
    def variant(self) -> str:
        """The row of the switch table this family is (laplace, tokens, flow_sde, flow_noise, laplace_ode)."""
        return self.family

    @property
    def loss_average(self) -> str:
        """`trajectory`: each trajectory's loss is the mean over its counted positions (RIPT's OpenVLA-OFT path);
        `token`: every counted position of an optimizer step weighs the same (the original QueST's)."""
        return "trajectory"

    @abstractmethod
    def act(self, policy: Any, obs: dict[str, torch.Tensor], instr: torch.Tensor,
            rngs: Sequence[np.random.Generator], stochastic: Sequence[bool], precision: str) -> ChunkDraw:
        """Chunks for a batch of rows (on the policy's device): a behaviour sample from each stochastic row's
        generator, the deterministic evaluation action for the others."""

    @abstractmethod
    def score(self, policy: Any, obs: dict[str, torch.Tensor], instr: torch.Tensor, actions: torch.Tensor,
              record: dict[str, torch.Tensor], precision: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(log-prob shaped per `log_prob_mode`, {scale name: (B, H, D)}) of recorded chunks under the current
        weights, with gradient; the forward under the run's precision, the log-prob in fp32."""

    def old_log_prob(self, actions: torch.Tensor, record: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The behaviour log-prob from the record alone, or None: the trainer's model re-scores the chunks before
        the first epoch (no gradient)."""
        return None

    def mask(self, valid: torch.Tensor, action_dim: int) -> torch.Tensor:
        """A (C, H) mask of counted positions, shaped like the log-prob."""
        return step_mask(valid, self.log_prob_mode, action_dim)

    def forward_passes(self) -> str:
        """Forward passes one chunk costs, for people (benchmarks)."""
        return "1"


def inference(device: torch.device, precision: str) -> Any:
    """No-gradient inference under the run's precision (bf16 autocast on CUDA)."""
    from contextlib import ExitStack

    from ript_ablate.device import autocast

    stack = ExitStack()
    stack.enter_context(torch.inference_mode())
    stack.enter_context(autocast(device, precision))
    return stack


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.float().cpu().numpy()
