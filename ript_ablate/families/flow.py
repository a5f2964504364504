"""The flow-matching family (pi0, pi0.5, SmolVLA, GR00T): an action expert integrates a velocity field over
`denoise_steps` K steps; the density of its output has no closed form, so the PPO ratio needs one of three tricks.

Notation (openpi/RLinf): denoising time t runs 1 (noise) -> 0 (action), x_t = t * eps + (1 - t) * a, the velocity
v ~ eps - a; step size d = 1/K, step k at t_k = 1 - k d; the deterministic (ODE) step is x_t - d v.

`flow_logprob`:
    flow_sde     (Flow-SDE, as piRL and Flow-GRPO) sigma_t = a sqrt(t / (1 - t)) (at t = 1 the denominator is
                 1 - t_1 = d), mean = x_t - d v - (sigma_t^2 d / (2 t)) (x_t + (1 - t) v), std = sqrt(d) sigma_t,
                 a = `flow_noise_level`. A rollout draws ONE step uniformly per chunk; that step is stochastic and its
                 Gaussian log-prob is the chunk's; the others follow the ODE. The record is the chain (K+1 states)
                 and the stochastic step; the update re-scores that step alone (gradient through its velocity only).
    flow_noise   (Flow-Noise, as ReinFlow and piRL) every step is stochastic around the ODE step's mean, with a
                 learned noise head whose std is bounded: std = lo + (hi - lo) sigmoid(raw), [lo, hi] =
                 `flow_noise_std`. The chain's log-prob is the initial noise's N(0, I) term and all K transitions,
                 summed (ReinFlow) or averaged over the K + 1 terms (RLinf), `flow_chain_logprob`; averaging divides
                 what a clip of 0.2 allows by K + 1. The head starts at `flow_noise_std_init` (the policy's
                 `prepare_for_rl`), stays there with `fix_scale_head`, learns at `header_lr` otherwise.
    laplace_ode  the ODE's output from zero initial noise is `mu`, the policy's Laplace scale head gives `log_b`, and
                 RIPT's Laplace sampling and every switch of the Laplace family apply (the record is mu, log_b).
Evaluation integrates the ODE deterministically: from an initial noise seeded per episode (`flow_eval_noise:
seeded`, as openpi evaluates), or from zeros (`zeros`); laplace_ode evaluates `mu` (zeros). The noise head is not
used at evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ript_ablate.families.base import ChunkDraw, ChunkFamily, inference, reduce_action_dims, to_numpy
from ript_ablate.families.laplace import ActionDistribution

from ript_ablate.config import FLOW_CHAIN_LOGPROBS, FLOW_EVAL_NOISE, FLOW_LOGPROBS  # noqa: F401 - re-exported
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def step_times(k: torch.Tensor | int, steps: int) -> Any:
    """t_k = 1 - k / K."""
    return 1.0 - k / steps


def sde_moments(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, d: float,
                level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the Flow-SDE transition from x_t to x_{t-d} (t broadcastable to x)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    denominator = torch.where(t >= 1.0, torch.full_like(t, d), 1.0 - t)
    sigma = level * torch.sqrt(t / denominator)
    mean = x - d * v - (sigma * sigma * d / (2.0 * t)) * (x + (1.0 - t) * v)
    return mean, math.sqrt(d) * sigma * torch.ones_like(mean)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    z = (x - mean) / std
    return -torch.log(std) - 0.5 * z * z - HALF_LOG_2PI


def bounded_std(raw: torch.Tensor, bounds: Sequence[float]) -> torch.Tensor:
    low, high = float(bounds[0]), float(bounds[1])
    return low + (high - low) * torch.sigmoid(raw)


def init_noise_head(head: torch.nn.Linear, bounds: Sequence[float], std: float) -> None:
    """Make a linear noise head output `std` everywhere (zero weights, the bias at the bounded map's inverse)."""
    low, high = float(bounds[0]), float(bounds[1])
    q = (std - low) / (high - low)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(math.log(q / (1.0 - q)))


def times(t: float, rows: int, device: torch.device) -> torch.Tensor:
    return torch.full((rows,), float(t), device=device)


def integrate_ode(policy: Any, prefix: Any, x: torch.Tensor, steps: int) -> torch.Tensor:
    """K deterministic Euler steps x <- x - d v(x, t) from t = 1 (gradient flows when enabled)."""
    d = 1.0 / steps
    for k in range(steps):
        x = x - d * policy.velocity(prefix, x, times(step_times(k, steps), x.shape[0], x.device)).float()
    return x


def laplace_outputs(policy: Any, obs: dict[str, torch.Tensor], instr: torch.Tensor,
                    steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, log_b) of laplace_ode: the ODE from zero initial noise and the policy's scale head."""
    prefix = policy(obs, instr)
    zeros = torch.zeros(instr.shape[0], policy.chunk_size, policy.action_dim, device=instr.device)
    return integrate_ode(policy, prefix, zeros, steps or policy.denoise_steps), policy.log_scale(prefix)


@dataclass(frozen=True)
class FlowFamily(ChunkFamily):
    family: ClassVar[str] = "flow"

    steps: int = 4
    logprob: str = "flow_sde"
    noise_level: float = 0.5
    noise_std: tuple[float, float] = (0.08, 0.16)
    chain: str = "mean"
    eval_noise: str = "seeded"
    log_prob_mode: str = "sum_on_action_dim"
    laplace: ActionDistribution = ActionDistribution()  # laplace_ode's sampling and ratio

    @classmethod
    def from_algo(cls, algo: Any, policy: Any) -> FlowFamily:
        lo, hi = algo.flow_noise_std
        return cls(steps=int(policy.denoise_steps), logprob=algo.flow_logprob, noise_level=float(algo.flow_noise_level),
                   noise_std=(float(lo), float(hi)), chain=algo.flow_chain_logprob, eval_noise=algo.flow_eval_noise,
                   log_prob_mode=algo.log_prob_mode, laplace=ActionDistribution.from_algo(algo))

    @property
    def variant(self) -> str:
        return self.logprob

    @property
    def scored_record_keys(self) -> tuple[str, ...]:
        return {"flow_sde": ("chain", "step"), "flow_noise": ("chain",)}.get(self.logprob, ())

    @property
    def scale_name(self) -> str | None:
        return {"flow_noise": "noise_std", "laplace_ode": "log_b"}.get(self.logprob)

    def forward_passes(self) -> str:
        return f"1 + {self.steps} expert"

    # -- rollouts ----------------------------------------------------------------------------------------------
    def act(self, policy: Any, obs: dict[str, torch.Tensor], instr: torch.Tensor,
            rngs: Sequence[np.random.Generator], stochastic: Sequence[bool], precision: str) -> ChunkDraw:
        device = instr.device
        if self.logprob == "laplace_ode":
            with inference(device, precision):
                mu, log_b = laplace_outputs(policy, obs, instr, self.steps)
            return self.laplace.choose(to_numpy(mu), to_numpy(log_b), rngs, stochastic)
        rows, shape = len(rngs), (policy.chunk_size, policy.action_dim)
        x = np.zeros((rows, *shape), np.float32)
        for i, rng in enumerate(rngs):  # each row's draws in a fixed order: initial noise, step, step noises
            if stochastic[i] or self.eval_noise == "seeded":
                x[i] = rng.standard_normal(shape)
        noisy_step = np.full(rows, -1, np.int64)
        if self.logprob == "flow_sde":
            for i, rng in enumerate(rngs):
                if stochastic[i]:
                    noisy_step[i] = rng.integers(self.steps)
        chain = [x]
        d = 1.0 / self.steps
        with inference(device, precision):
            prefix = policy(obs, instr)
        for k in range(self.steps):
            t = step_times(k, self.steps)
            x_t = torch.from_numpy(x).to(device)
            with inference(device, precision):
                v = policy.velocity(prefix, x_t, times(t, rows, device))
                raw = policy.noise_std_raw(prefix, x_t, times(t, rows, device)) if self.logprob == "flow_noise" \
                    else None
            v_np = to_numpy(v)
            nxt = (x - d * v_np).astype(np.float32)
            std = to_numpy(bounded_std(raw.float(), self.noise_std)) if raw is not None else None
            for i, rng in enumerate(rngs):
                if not stochastic[i]:
                    continue
                if self.logprob == "flow_sde" and noisy_step[i] == k:
                    mean, sd = sde_moments(torch.from_numpy(x[i]).double(), torch.from_numpy(v_np[i]).double(), t,
                                           d, self.noise_level)
                    nxt[i] = (mean.numpy() + sd.numpy() * rng.standard_normal(shape)).astype(np.float32)
                elif std is not None:
                    nxt[i] = (nxt[i] + std[i] * rng.standard_normal(shape)).astype(np.float32)
            x = nxt
            chain.append(x)
        return ChunkDraw([x[i] for i in range(rows)], {"chain": np.stack(chain, 1), "step": noisy_step})

    # -- the update --------------------------------------------------------------------------------------------
    def score(self, policy: Any, obs: dict[str, torch.Tensor], instr: torch.Tensor, actions: torch.Tensor,
              record: dict[str, torch.Tensor], precision: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from ript_ablate.device import autocast

        device = instr.device
        if self.logprob == "laplace_ode":
            with autocast(device, precision):
                mu, log_b = laplace_outputs(policy, obs, instr, self.steps)
            return self.laplace.log_prob(actions, mu.float(), log_b.float()), {"log_b": log_b.float()}
        chain = record["chain"]
        d = 1.0 / self.steps
        with autocast(device, precision):
            prefix = policy(obs, instr)
        if self.logprob == "flow_sde":
            step = record["step"].clamp_min(0)
            rows = torch.arange(chain.shape[0], device=device)
            x, nxt = chain[rows, step], chain[rows, step + 1]
            t = step_times(step.float(), self.steps)
            with autocast(device, precision):
                v = policy.velocity(prefix, x, t)
            mean, std = sde_moments(x, v.float(), t.view(-1, 1, 1), d, self.noise_level)
            return reduce_action_dims(gaussian_log_prob(nxt, mean, std), self.log_prob_mode), {}
        total = gaussian_log_prob(chain[:, 0], torch.zeros_like(chain[:, 0]), torch.ones_like(chain[:, 0]))
        stds = []
        for k in range(self.steps):
            x = chain[:, k]
            t = times(step_times(k, self.steps), x.shape[0], device)
            with autocast(device, precision):
                v = policy.velocity(prefix, x, t)
                raw = policy.noise_std_raw(prefix, x, t)
            std = bounded_std(raw.float(), self.noise_std)
            total = total + gaussian_log_prob(chain[:, k + 1], x - d * v.float(), std)
            stds.append(std)
        if self.chain == "mean":
            total = total / (self.steps + 1)
        return reduce_action_dims(total, self.log_prob_mode), {"noise_std": torch.stack(stds).mean(0)}

    def old_log_prob(self, actions: torch.Tensor, record: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.logprob == "laplace_ode":
            return self.laplace.old_log_prob(actions, record)
        return None


def bc_loss(policy: Any, obs: dict[str, torch.Tensor], instr: torch.Tensor, target: torch.Tensor,
            mask: torch.Tensor, precision: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """The flow-matching loss: || v(x_t, t) - (eps - a) ||^2 at t ~ U(0, 1), x_t = t eps + (1 - t) a, averaged over
    the valid chunk steps and the action dims."""
    from ript_ablate.device import autocast

    rows = target.shape[0]
    t = torch.rand(rows, generator=generator).to(target.device)
    eps = torch.randn(target.shape, generator=generator).to(target.device)
    x_t = t.view(-1, 1, 1) * eps + (1.0 - t.view(-1, 1, 1)) * target
    with autocast(instr.device, precision):
        v = policy.velocity(policy(obs, instr), x_t, t)
    err = F.mse_loss(v.float(), eps - target, reduction="none").mean(-1)
    return (err * mask).sum() / mask.sum()
