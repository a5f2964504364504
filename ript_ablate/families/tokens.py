"""The action-token family (OpenVLA-style bins; the original RIPT's QueST samples codebook tokens the same way).

The policy returns logits (B, H, D, n_bins): one token per action dimension and chunk step, decoded in parallel.
Token j of a dimension stands for the centre of the j-th of `n_bins` equal bins over the policy's
[action_low, action_high]. Behaviour: each token sampled from softmax(logits / temperature) restricted to the
`top_k` largest logits (0: all), from the episode's generator; evaluation takes the argmax (greedy). The record is
the sampled tokens; the trainer's model re-scores them before the first epoch.

Scoring (`token_logprob`):
    original  as the original QueST: the FULL softmax at the sampled token, no temperature, no top-k (so the scored
              distribution is not the behaviour one); every token of a chunk scored; the loss averaged over every
              counted token of an optimizer step (`loss_average` token).
    exact     the behaviour distribution: softmax(logits / temperature) over the top-k set. A sampled token that
              falls outside the top-k of the new logits stays in the support: it is scored over (new top-k + that
              token), so its log-prob is finite and its gradient moves its own logit (never -inf or NaN).
The per-token log-probs reduce through `log_prob_mode`: ratio_on_action_dim is a ratio per token (QueST,
SimpleVLA-RL); sum_on_action_dim one per action, its dimensions' tokens summed (VLA-RL).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ript_ablate.families.base import ChunkDraw, ChunkFamily, inference, reduce_action_dims, to_numpy

from ript_ablate.config import TOKEN_LOGPROBS  # noqa: F401 - the choices, re-exported


def bin_centers(n_bins: int, low: float, high: float) -> np.ndarray:
    width = (high - low) / n_bins
    return (low + width * (np.arange(n_bins) + 0.5)).astype(np.float32)


def actions_to_tokens(actions: torch.Tensor, n_bins: int, low: float, high: float) -> torch.Tensor:
    """The bin of each action value (values outside [low, high] fall into the end bins)."""
    width = (high - low) / n_bins
    return torch.clamp(torch.floor((actions - low) / width), 0, n_bins - 1).long()


def top_k_keep(z: np.ndarray, top_k: int) -> np.ndarray:
    """Boolean mask of the logits at or above the k-th largest (ties kept); all when top_k is 0 or >= n."""
    n = z.shape[-1]
    if not 0 < top_k < n:
        return np.ones(z.shape, dtype=bool)
    kth = np.partition(z, n - top_k, axis=-1)[..., n - top_k:n - top_k + 1]
    return z >= kth


def sample_tokens(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """One token per (..., n_bins) row of logits by inverse CDF; u in (0, 1] never picks a zero-probability bin."""
    z = logits.astype(np.float64) / temperature
    z = np.where(top_k_keep(z, top_k), z, -np.inf)
    p = np.exp(z - z.max(-1, keepdims=True))
    cdf = np.cumsum(p, -1)
    cdf /= cdf[..., -1:]
    u = 1.0 - rng.random(z.shape[:-1])
    return (cdf < u[..., None]).sum(-1)


def token_log_prob(logits: torch.Tensor, tokens: torch.Tensor, *, exact: bool, temperature: float = 1.0,
                   top_k: int = 0) -> torch.Tensor:
    """Per-token log-prob (..., ) of `tokens` under `logits` (..., n_bins): the full softmax, or (`exact`) the
    tempered top-k behaviour distribution with the sampled token always kept in the support."""
    if not exact:
        return torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    z = logits / temperature
    n = z.shape[-1]
    if 0 < top_k < n:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        keep = (z >= kth) | torch.nn.functional.one_hot(tokens, n).bool()
        z = z.masked_fill(~keep, float("-inf"))
    return z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, -1)


@dataclass(frozen=True)
class TokenFamily(ChunkFamily):
    family: ClassVar[str] = "tokens"

    n_bins: int = 256
    action_low: float = -1.0
    action_high: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    scoring: str = "original"
    log_prob_mode: str = "sum_on_action_dim"

    @classmethod
    def from_algo(cls, algo: Any, policy: Any) -> TokenFamily:
        return cls(n_bins=int(policy.n_bins), action_low=float(getattr(policy, "action_low", -1.0)),
                   action_high=float(getattr(policy, "action_high", 1.0)), temperature=float(algo.temperature),
                   top_k=int(algo.top_k), scoring=algo.token_logprob, log_prob_mode=algo.log_prob_mode)

    @property
    def scored_record_keys(self) -> tuple[str, ...]:
        return ("tokens",)

    @property
    def loss_average(self) -> str:
        return "token" if self.scoring == "original" else "trajectory"

    def act(self, policy: Any, obs: dict[str, torch.Tensor], instr: torch.Tensor,
            rngs: Sequence[np.random.Generator], stochastic: Sequence[bool], precision: str) -> ChunkDraw:
        with inference(instr.device, precision):
            logits = policy(obs, instr)
        logits = to_numpy(logits)
        tokens = np.stack([sample_tokens(logits[i], self.temperature, self.top_k, rng) if s
                           else logits[i].argmax(-1) for i, (rng, s) in enumerate(zip(rngs, stochastic))])
        centers = bin_centers(self.n_bins, self.action_low, self.action_high)
        return ChunkDraw([centers[t] for t in tokens], {"tokens": tokens.astype(np.int64)})

    def log_prob(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        per_token = token_log_prob(logits, tokens, exact=self.scoring == "exact", temperature=self.temperature,
                                   top_k=self.top_k)
        return reduce_action_dims(per_token, self.log_prob_mode)

    def score(self, policy: Any, obs: dict[str, torch.Tensor], instr: torch.Tensor, actions: torch.Tensor,
              record: dict[str, torch.Tensor], precision: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from ript_ablate.device import autocast

        with autocast(instr.device, precision):
            logits = policy(obs, instr)
        return self.log_prob(logits.float(), record["tokens"]), {}


def gaussian_bin_targets(actions: torch.Tensor, n_bins: int, low: float, high: float, sigma_bins: float
                         ) -> torch.Tensor:
    """(..., n_bins) target distributions: a Gaussian of `sigma_bins` bin widths around each action value,
    integrated over each bin (the mass beyond [low, high] goes to the end bins), so it sums to 1."""
    width = (high - low) / n_bins
    edges = low + width * torch.arange(1, n_bins, dtype=torch.float32, device=actions.device)  # inner edges
    cdf = 0.5 * (1 + torch.erf((edges - actions.float().unsqueeze(-1)) / (sigma_bins * width * math.sqrt(2))))
    zeros, ones = torch.zeros_like(cdf[..., :1]), torch.ones_like(cdf[..., :1])
    return torch.diff(torch.cat([zeros, cdf, ones], -1), dim=-1)


def bc_loss(policy: Any, obs: dict[str, torch.Tensor], instr: torch.Tensor, target: torch.Tensor,
            mask: torch.Tensor, precision: str, generator: torch.Generator | None = None,
            label_sigma: float = 0.0) -> torch.Tensor:
    """Cross-entropy of the expert's action bins (one-hot, or spread as a Gaussian of `label_sigma` bin widths),
    averaged over the valid chunk steps and dimensions."""
    from ript_ablate.device import autocast

    with autocast(instr.device, precision):
        logits = policy(obs, instr)
    low, high = float(getattr(policy, "action_low", -1.0)), float(getattr(policy, "action_high", 1.0))
    log_p = torch.log_softmax(logits.float(), -1)
    if label_sigma > 0:
        spread = gaussian_bin_targets(target, logits.shape[-1], low, high, label_sigma)
        nll = -(spread * log_p).sum(-1).mean(-1)
    else:
        tokens = actions_to_tokens(target, logits.shape[-1], low, high)
        nll = -log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).mean(-1)
    return (nll * mask).sum() / mask.sum()
