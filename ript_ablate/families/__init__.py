"""Policy families under RIPT: how a policy's output becomes an executed action chunk and how that chunk is scored.

    laplace  a Laplace/Gaussian head, mu and log_b (OpenVLA-OFT in RIPT)       `ActionDistribution`
    tokens   per-dimension action bins (OpenVLA-style; QueST's codebook alike)  `TokenFamily`
    flow     a flow-matching action expert (pi0, SmolVLA, GR00T)               `FlowFamily`

A policy names its family (`Policy.family`); `build_family(algo, policy)` turns the `algo` switches into the family
object that the rollout engine samples with and the update scores with (`ript_ablate.families.base.ChunkFamily`).
"""

from __future__ import annotations

from typing import Any

import torch

from ript_ablate.families import flow, tokens
from ript_ablate.families.base import LOG_PROB_MODES, ChunkDraw, ChunkFamily
from ript_ablate.families.flow import FLOW_CHAIN_LOGPROBS, FLOW_EVAL_NOISE, FLOW_LOGPROBS, FlowFamily
from ript_ablate.families.laplace import ActionDistribution
from ript_ablate.families.tokens import TOKEN_LOGPROBS, TokenFamily

from ript_ablate.config import FAMILIES

__all__ = ["FAMILIES", "FLOW_CHAIN_LOGPROBS", "FLOW_EVAL_NOISE", "FLOW_LOGPROBS", "LOG_PROB_MODES", "TOKEN_LOGPROBS",
           "ActionDistribution", "ChunkDraw", "ChunkFamily", "FlowFamily", "TokenFamily", "bc_loss",
           "build_family", "family_of", "scale_outputs"]


def family_of(policy: Any) -> str:
    family = getattr(policy, "family", "laplace")
    if family not in FAMILIES:
        raise TypeError(f"{type(policy).__name__}.family is {family!r}; families are {', '.join(FAMILIES)}")
    return family


def build_family(algo: Any, policy: Any) -> ChunkFamily:
    """The family object of `policy` with the run's `algo` switches."""
    family = family_of(policy)
    if family == "tokens":
        return TokenFamily.from_algo(algo, policy)
    if family == "flow":
        return FlowFamily.from_algo(algo, policy)
    return ActionDistribution.from_algo(algo)


def bc_loss(policy: Any, obs: dict[str, torch.Tensor], instr: torch.Tensor, target: torch.Tensor,
            mask: torch.Tensor, precision: str, generator: torch.Generator | None = None,
            token_label_sigma: float = 0.0) -> torch.Tensor:
    """Behaviour cloning the way each family is trained: L1 on the chunk (laplace), cross-entropy over bins
    (tokens; `token_label_sigma` spreads the target over neighbouring bins), the flow-matching loss (flow)."""
    family = family_of(policy)
    if family == "tokens":
        return tokens.bc_loss(policy, obs, instr, target, mask, precision, generator, token_label_sigma)
    if family == "flow":
        return flow.bc_loss(policy, obs, instr, target, mask, precision, generator)
    from ript_ablate.device import autocast

    with autocast(instr.device, precision):
        mu, _ = policy(obs, instr)
    err = (mu.float() - target).abs().mean(-1)
    return (err * mask).sum() / mask.sum()


def scale_outputs(policy: Any, obs: dict[str, torch.Tensor], instr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, log_b) a Laplace scale head is fitted against after behaviour cloning: the head's own outputs, or a flow
    policy's ODE mean from zero noise and its scale head (what laplace_ode samples from)."""
    if family_of(policy) == "flow":
        return flow.laplace_outputs(policy, obs, instr)
    return policy(obs, instr)
