"""The PPO update: asymmetric clipped loss per action step, trajectory-mean loss, gradient accumulation over
trajectories, and two parameter groups (backbone adapter at `lr`; heads at `header_lr`), each clipped apart.

Per action step (or per element in ratio_on_action_dim mode):
    ratio = exp(logp_new - logp_old)
    loss  = max(-A * ratio, -A * clamp(ratio, 1 - ppo_clip_range, 1 + ppo_clip_high))
A trajectory's loss is the mean over the action positions it counts (all H positions of every chunk the
original records, see `Episode.loss_mask`); GA trajectories are averaged per optimizer step, and a leftover group
smaller than GA at the end of a pass still steps (the original leaks it into the next iteration). No KL, entropy
or value terms. Statistics stay on the device and are read once per iteration.

Logged as the original logs them: `ppo/loss` is the mean over the original's micro-batches (one forward of
`max_step_batch_size` chunks of one trajectory) of each micro-batch's share of the loss, i.e. the sum of the loss
over the pass divided by the number of such micro-batches; `ppo/clip_fraction` counts the positions where the
clipped term is the one taken (`-A clamp(r) > -A r`), split into `ppo/clip_fraction_low` (r < 1 - low, A < 0) and
`ppo/clip_fraction_high` (r > 1 + high, A > 0). Fractions are over counted positions, which equals the original's
mean over micro-batches when every micro-batch has the same size (`max_step_batch_size: 1`, the original default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ript_ablate.config import AlgoConfig
from ript_ablate.distributed import Ranks
from ript_ablate.families import ActionDistribution, ChunkFamily, build_family
from ript_ablate.interfaces.policy import Policy


@dataclass
class Trajectory:
    obs: dict[str, torch.Tensor]  # each (C, ...)
    instr: torch.Tensor  # the task's instruction encoding
    actions: torch.Tensor  # (C, H, D)
    mask: torch.Tensor  # (C, H) or (C, H, D): float, 1 where the step counts
    old_logp: torch.Tensor  # same shape as mask
    advantage: float
    counted_chunks: int | None = None  # chunks with any counted position (None: read from the mask)
    record: dict[str, torch.Tensor] = field(default_factory=dict)  # what the family re-scores, each (C, ...)

    def __post_init__(self) -> None:
        if self.counted_chunks is None:
            self.counted_chunks = int((self.mask.reshape(self.mask.shape[0], -1).sum(-1) > 0).sum())


def clipped_loss(ratio: torch.Tensor, advantage: torch.Tensor | float, clip_low: float,
                 clip_high: float) -> torch.Tensor:
    """Elementwise pessimistic PPO loss with the asymmetric clip [1 - clip_low, 1 + clip_high]."""
    return torch.maximum(-advantage * ratio, -advantage * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high))


def active_clips(ratio: torch.Tensor, advantage: torch.Tensor | float, clip_low: float,
                 clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) boolean masks of the positions where the clipped term is the one the max takes: below the
    band with a negative advantage, above it with a positive one (the original's clip fraction is their union)."""
    adv = torch.as_tensor(advantage, device=ratio.device)
    return (ratio < 1.0 - clip_low) & (adv < 0), (ratio > 1.0 + clip_high) & (adv > 0)


def policy_log_prob(policy: Policy, obs: dict[str, torch.Tensor], instr: torch.Tensor, actions: torch.Tensor,
                    distribution: ActionDistribution, device: torch.device,
                    precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(logp per `log_prob_mode`, log_b) of `actions` under a Laplace-family policy; the forward pass under the
    run's precision, the log-prob and the loss always in fp32."""
    logp, scales = distribution.score(policy, obs, instr.to(device), actions, {}, precision)
    return logp, scales["log_b"]


def parameter_groups(policy: Policy, algo: AlgoConfig) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone's trainable parameters, heads). With fix_scale_head the scale head is frozen and left out of the
    optimizer; gradient still flows through log_b into the backbone, as in the original."""
    roles = policy.modules_by_role()
    backbone = policy.backbone_trainable()
    heads = list(roles["action_head"].parameters())
    scale_head = roles.get("scale_head")
    if scale_head is not None:
        for p in scale_head.parameters():
            p.requires_grad = not algo.fix_scale_head
        if not algo.fix_scale_head:
            heads += list(scale_head.parameters())
    return backbone, heads


class PPOUpdater:
    """The update of one process, or of one rank of a multi-process trial: there every optimizer step takes the
    same place in every rank's pass, each trajectory weighs 1 / (trajectories of this step on all ranks), and the
    gradients are summed over the ranks before both groups are clipped (see `ript_ablate.distributed`)."""

    def __init__(self, policy: Policy, algo: AlgoConfig, device: torch.device, precision: str = "auto",
                 ranks: Ranks | None = None, family: ChunkFamily | None = None):
        self.policy, self.algo, self.device, self.precision = policy, algo, device, precision
        self.ranks = ranks or Ranks()
        self.family = family or build_family(algo, policy)
        self.backbone_params, self.head_params = parameter_groups(policy, algo)
        groups = [{"params": self.backbone_params, "lr": algo.lr, "name": "backbone"},
                  {"params": self.head_params, "lr": algo.header_lr, "name": "header"}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=algo.weight_decay)
        self.consecutive_nonfinite = 0

    def _micro_step(self, traj: Trajectory, weight: float, stats: dict[str, torch.Tensor]) -> None:
        """Forward/backward one trajectory with weight `weight` (see `_micro_batch`)."""
        self._micro_batch([traj], [weight], stats)

    def _micro_batch(self, trajs: list[Trajectory], weights: list[float], stats: dict[str, torch.Tensor]) -> None:
        """Forward/backward the trajectories of one accumulation group, packed `max_step_batch_size` policy calls
        per pass. Each row carries its trajectory's advantage and weight / n_valid, so the gradient is exactly
        sum_i weight_i * mean over i's valid steps of the clipped loss, however the rows are packed. No host syncs.
        """
        algo = self.algo
        obs = {k: torch.cat([t.obs[k] for t in trajs]) for k in trajs[0].obs}
        instr = torch.cat([t.instr.unsqueeze(0).expand(t.mask.shape[0], *t.instr.shape) for t in trajs])
        actions = torch.cat([t.actions for t in trajs])
        record = {k: torch.cat([t.record[k] for t in trajs]) for k in trajs[0].record}
        mask = torch.cat([t.mask for t in trajs])
        old_logp = torch.cat([t.old_logp for t in trajs])
        row_adv = torch.cat([torch.full((t.mask.shape[0],), t.advantage, device=mask.device) for t in trajs])
        row_weight = torch.cat([(w / t.mask.sum().clamp_min(1.0)).expand(t.mask.shape[0])
                                for t, w in zip(trajs, weights)])
        tail = (1,) * (mask.dim() - 1)  # broadcast per-row values over (H,) or (H, D)
        size = algo.max_step_batch_size
        lo, hi = algo.log_scale_clip if algo.log_scale_clip is not None else (-math.inf, math.inf)
        stats["micro_batches"] += sum(math.ceil(t.counted_chunks / size) for t in trajs)
        for s in range(0, mask.shape[0], size):
            m = mask[s:s + size]
            logp, scales = self.family.score(self.policy, {k: v[s:s + size] for k, v in obs.items()},
                                             instr[s:s + size], actions[s:s + size],
                                             {k: v[s:s + size] for k, v in record.items()}, self.precision)
            log_ratio = logp - old_logp[s:s + size]
            ratio = torch.exp(log_ratio)
            adv = row_adv[s:s + size].view(-1, *tail)
            loss = (clipped_loss(ratio, adv, algo.ppo_clip_range, algo.ppo_clip_high) * m
                    * row_weight[s:s + size].view(-1, *tail)).sum()
            loss.backward()
            with torch.no_grad():
                low, high = active_clips(ratio, adv, algo.ppo_clip_range, algo.ppo_clip_high)
                stats["loss"] += loss.detach()
                stats["ratio"] += (ratio * m).sum()
                stats["clipped_low"] += (low * m).sum()
                stats["clipped_high"] += (high * m).sum()
                stats["approx_kl"] += (((ratio - 1) - log_ratio) * m).sum()
                stats["count"] += m.sum()
                scale = scales.get(self.family.scale_name or "")
                if scale is not None:  # the family's scale (log_b, a noise std) over the counted positions
                    step_valid = m if m.dim() == scale.dim() else m.unsqueeze(-1).expand_as(scale)
                    stats["log_b"] += (scale * step_valid).sum()
                    stats["log_b_clipped"] += (((scale < lo) | (scale > hi)) * step_valid).sum()
                    stats["log_b_count"] += step_valid.sum()

    def _optimizer_step(self, stats: dict[str, torch.Tensor]) -> bool:
        """Sum the gradients over the ranks, clip each group apart and step; skip (and count) a non-finite update
        (the same decision on every rank: it reads only summed values). One host sync per step."""
        if self.ranks.size > 1:
            stats["step_loss"] = self.ranks.sum_gradients(self.backbone_params + self.head_params,
                                                          stats["step_loss"])
        norms = []
        for params, max_norm in ((self.backbone_params, self.algo.grad_norm_clip_model),
                                 (self.head_params, self.algo.grad_norm_clip_header)):
            grads = [p for p in params if p.grad is not None]
            norms.append(torch.nn.utils.clip_grad_norm_(grads, max_norm) if grads
                         else torch.zeros((), device=self.device))
        finite = bool(torch.isfinite(norms[0]) & torch.isfinite(norms[1]) & torch.isfinite(stats["step_loss"]))
        if finite:
            self.optimizer.step()
            stats["grad_norm_backbone"] += norms[0]
            stats["grad_norm_header"] += norms[1]
            stats["steps"] += 1
            self.consecutive_nonfinite = 0
        else:
            stats["nonfinite"] += 1
            self.consecutive_nonfinite += 1
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    def _step_positions(self, counted: list[float], orders: list[np.ndarray],
                        steps_per_pass: int) -> list[list[float]]:
        """For the family's `token` loss average: the counted positions of every optimizer step over all ranks
        (one collective per update), so that every position of a step weighs the same."""
        ga = self.algo.gradient_accumulation_steps
        local = [float(sum(counted[int(i)] for i in order[s * ga:(s + 1) * ga]))
                 for order in orders for s in range(steps_per_pass)]
        total = [sum(v) for v in zip(*self.ranks.gather(local))] if self.ranks.size > 1 else local
        return [[max(total[e * steps_per_pass + s], 1.0) for s in range(steps_per_pass)] for e in range(len(orders))]

    def update(self, trajectories: list[Trajectory], rng: np.random.Generator, max_nonfinite: int) -> dict:
        """`num_ppo_epochs` reshuffled passes. Returns metrics and whether the run diverged."""
        keys = ("loss", "ratio", "clipped_low", "clipped_high", "approx_kl", "count", "log_b", "log_b_clipped",
                "log_b_count", "micro_batches", "grad_norm_backbone", "grad_norm_header", "steps", "nonfinite",
                "step_loss")
        stats = {k: torch.zeros((), device=self.device) for k in keys}
        ga = self.algo.gradient_accumulation_steps
        counts = [int(n) for n in self.ranks.gather(len(trajectories))]
        steps_per_pass = max(math.ceil(n / ga) for n in counts)
        diverged = False
        orders = [rng.permutation(len(trajectories)) for _ in range(self.algo.num_ppo_epochs)]
        token_average = self.family.loss_average == "token"
        counted = [float(t.mask.sum()) for t in trajectories] if token_average else []  # one read each
        positions = self._step_positions(counted, orders, steps_per_pass) if token_average else None
        self.policy.train()
        self.optimizer.zero_grad(set_to_none=True)
        for epoch, order in enumerate(orders):
            for step in range(steps_per_pass):
                group = order[step * ga:(step + 1) * ga]  # the last group may be smaller: it still steps
                in_step = sum(min(max(n - step * ga, 0), ga) for n in counts)  # this step's trajectories, all ranks
                before = stats["loss"].clone()
                if len(group):
                    members = [trajectories[int(i)] for i in group]
                    weights = ([counted[int(i)] / positions[epoch][step] for i in group] if positions
                               else [1.0 / in_step] * len(group))
                    self._micro_batch(members, weights, stats)
                stats["step_loss"] = stats["loss"] - before
                if not self._optimizer_step(stats) and self.consecutive_nonfinite > max_nonfinite:
                    diverged = True
                    break
            if diverged:
                break
        self.policy.eval()
        scale_name = self.family.scale_name
        per_rank = ("loss", "ratio", "clipped_low", "clipped_high", "approx_kl", "count", "log_b", "log_b_clipped",
                    "log_b_count", "micro_batches")  # the rest are the same on every rank (read after the reduction)
        if self.ranks.size > 1:
            summed = self.ranks.sum([float(stats[k]) for k in per_rank])
            stats.update({k: torch.tensor(v) for k, v in zip(per_rank, summed)})
        values = {k: float(v) for k, v in stats.items()}  # the one read of the iteration
        count, steps = max(values["count"], 1.0), max(values["steps"], 1.0)
        scale_metrics = {}
        if scale_name == "log_b":
            scale_metrics = {"scale/log_b_mean": values["log_b"] / max(values["log_b_count"], 1.0),
                             "scale/log_b_clipped_fraction": values["log_b_clipped"] / max(values["log_b_count"], 1.0)}
        elif scale_name is not None:
            scale_metrics = {f"scale/{scale_name}_mean": values["log_b"] / max(values["log_b_count"], 1.0)}
        return {
            "metrics": {
                "ppo/loss": values["loss"] / max(values["micro_batches"], 1.0),
                "ppo/ratio_mean": values["ratio"] / count,
                "ppo/clip_fraction": (values["clipped_low"] + values["clipped_high"]) / count,
                "ppo/clip_fraction_low": values["clipped_low"] / count,
                "ppo/clip_fraction_high": values["clipped_high"] / count,
                "ppo/approx_kl": values["approx_kl"] / count,
                "ppo/optimizer_steps": values["steps"],
                "grad_norm/backbone": values["grad_norm_backbone"] / steps,
                "grad_norm/header": values["grad_norm_header"] / steps,
                **scale_metrics,
                "health/nonfinite_events": values["nonfinite"],
            },
            "diverged": diverged,
        }


def rescore(policy: Policy, family: ChunkFamily, traj: Trajectory, rows: int, precision: str) -> torch.Tensor:
    """The behaviour log-prob recomputed by the trainer's model before the first epoch (no gradient), `rows` chunks
    a forward: what a family without a closed-form record needs (tokens, flow_sde, flow_noise)."""
    parts = []
    was_training = policy.training
    policy.eval()
    with torch.no_grad():
        for s in range(0, traj.actions.shape[0], rows):
            obs = {k: v[s:s + rows] for k, v in traj.obs.items()}
            instr = traj.instr.unsqueeze(0).expand(obs[next(iter(obs))].shape[0], *traj.instr.shape)
            parts.append(family.score(policy, obs, instr, traj.actions[s:s + rows],
                                      {k: v[s:s + rows] for k, v in traj.record.items()}, precision)[0])
    policy.train(was_training)
    return torch.cat(parts)


def build_trajectories(groups: list, advantages: np.ndarray, instr_of: dict[str, torch.Tensor], algo: AlgoConfig,
                       device: torch.device, distribution: ChunkFamily | None = None, policy: Policy | None = None,
                       precision: str = "auto") -> list[Trajectory]:
    """Tensors for every accepted rollout, on the training device once per iteration, with their behaviour
    log-probs: from the record (Laplace family), or re-scored by `policy` (the others)."""
    family = distribution or ActionDistribution.from_algo(algo)
    out = []
    for g, group in enumerate(groups):
        for k, ep in enumerate(group.episodes):
            d = ep.actions.shape[-1]
            counted = ep.loss_mask(executed_only=algo.loss_on_executed_steps_only)
            mask = family.mask(torch.from_numpy(counted).float(), d)
            actions = torch.from_numpy(ep.actions)
            old = family.old_log_prob(actions, {key: torch.from_numpy(v) for key, v in ep.record.items()})
            traj = Trajectory({key: torch.from_numpy(v).to(device) for key, v in ep.obs.items()},
                              instr_of[ep.task].to(device), actions.to(device), mask.to(device),
                              old.to(device) if old is not None else torch.zeros(0), float(advantages[g, k]),
                              int(counted.any(-1).sum()),
                              {key: torch.from_numpy(ep.record[key]).to(device) for key in family.scored_record_keys})
            if old is None:
                if policy is None:
                    raise ValueError(f"the {family.variant} family re-scores its chunks: pass the policy")
                traj.old_logp = rescore(policy, family, traj, algo.max_step_batch_size, precision)
            out.append(traj)
    return out
