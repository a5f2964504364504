"""One iteration's rollouts: contexts x K stochastic episodes, with dynamic sampling.

Dynamic sampling (`enable_dynamic_sampling`): a context whose K rewards are all 0 or all 1 carries no RLOO signal
and is discarded; further contexts are tried until int(`early_stop_percentage` x quota) groups are accepted (the
original applies that floor with dynamic sampling off too; a short iteration is never padded). The
original loops forever when every context is solved (upstream issue #10); here the attempts are capped
(`max_sampling_attempts`, 0 = 4 x quota) and the shortfall is logged, never padded with duplicates.

Contexts are judged strictly in order, as one at a time would; only the scheduling is batched. After the first
round, a round rolls out as many contexts as the acceptance rate so far says the quota needs (at least two per
worker), so the workers are not left idle by a string of ever smaller rounds. Groups rolled out past the point
where the quota was met are discarded unseen (`sampling/surplus_contexts`): the accepted groups, their order and
`sampling/contexts_tried` are exactly those of sequential sampling.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ript_ablate.config import AlgoConfig
from ript_ablate.distributed import Ranks
from ript_ablate.episodes import Episode, EpisodeJob, InitialState
from ript_ablate.families import ActionDistribution, ChunkFamily
from ript_ablate.seeding import stream_seed


@dataclass
class Group:
    """K rollouts of one context (or, with mix_val_init_in_rloo, K states of one task)."""

    context: InitialState
    episodes: list[Episode]

    @property
    def rewards(self) -> np.ndarray:
        return np.asarray([float(e.success) for e in self.episodes])

    @property
    def degenerate(self) -> bool:
        r = self.rewards
        return bool(r.min() == r.max())


@dataclass
class IterationRollouts:
    accepted: list[Group]
    tried: int
    zero_variance: int
    all_episodes: list[Episode] = field(repr=False)
    seconds: float
    quota: int  # the groups this iteration aimed at (after early_stop_percentage)
    surplus_episodes: list[Episode] = field(default_factory=list, repr=False)  # rolled out past the quota
    group_size: int = 1
    busy_seconds: float = 0.0  # time spent rolling out (not waiting for other ranks)

    def tally(self) -> dict[str, Any]:
        """What the iteration's metrics need, small and picklable: one rank's share of a multi-process trial."""
        return {"tried": self.tried, "zero_variance": self.zero_variance, "accepted": len(self.accepted),
                "quota": self.quota, "seconds": self.seconds, "group_size": self.group_size,
                "busy_seconds": self.busy_seconds,
                "episode_bytes": sum(e.nbytes() for e in self.all_episodes),
                "episodes": [(e.task, bool(e.success), int(e.length)) for e in self.all_episodes],
                "surplus": [(e.task, bool(e.success), int(e.length)) for e in self.surplus_episodes]}

    def metrics(self, tasks: list[str]) -> dict[str, float]:
        return rollout_metrics([self.tally()], tasks)


def rollout_metrics(tallies: list[dict[str, Any]], tasks: list[str]) -> dict[str, float]:
    """The iteration's sampling, success and throughput metrics over every rank's tally (one in one process): counts
    add up, rates are over all episodes, and the rollout time is the slowest rank's (it is what the step waits for).
    """
    episodes = [e for t in tallies for e in t["episodes"]]
    ran = episodes + [e for t in tallies for e in t["surplus"]]
    seconds = max(t["seconds"] for t in tallies)
    env_steps = sum(length for _, _, length in ran)
    surplus = sum(len(t["surplus"]) // max(t["group_size"], 1) for t in tallies)
    accepted = sum(t["accepted"] for t in tallies)
    tried = sum(t["tried"] for t in tallies)
    out = {
        "sampling/contexts_tried": float(tried),
        "sampling/zero_variance_groups": float(sum(t["zero_variance"] for t in tallies)),
        "sampling/accepted_groups": float(accepted),
        "sampling/shortfall": float(tallies[0]["quota"] - accepted),
        "sampling/surplus_contexts": float(surplus),
        # groups of the contexts tried whose K rewards were all equal (no RLOO signal); the health line shows it
        "sampling/equal_reward_fraction": sum(t["zero_variance"] for t in tallies) / max(tried, 1),
        "train/success_rate": float(np.mean([s for _, s, _ in episodes])),
        "perf/env_steps_per_s": env_steps / max(seconds, 1e-9),
        "perf/env_steps": float(env_steps),
        "perf/rollout_s": seconds,
        # what the episodes rolled out and judged this iteration hold in memory (observations at decision steps only;
        # images dominate; groups discarded unseen past the quota are not counted)
        "perf/episode_mib": sum(t.get("episode_bytes", 0) for t in tallies) / 2**20,
    }
    if len(tallies) > 1:  # the busiest rank's rollout time over the least busy's: what the others wait for
        busy = [t["busy_seconds"] for t in tallies]
        out["perf/rank_rollout_imbalance"] = max(busy) / max(min(busy), 1e-9)
    for task in tasks:
        counted = [s for t, s, _ in episodes if t == task]
        if counted:
            out[f"train/success_rate/{task}"] = float(np.mean(counted))
        lengths = [length for t, _, length in ran if t == task]
        if lengths:
            out[f"perf/env_steps/{task}"] = float(sum(lengths))
            out[f"perf/episodes/{task}"] = float(len(lengths))
    return out


def sampling_target(algo: AlgoConfig, quota: int) -> int:
    """Accepted groups an iteration stops at: int(early_stop_percentage x quota), floored, with or without dynamic
    sampling, as the original's shared counter does (without dynamic sampling every group is accepted)."""
    return int(algo.early_stop_percentage * quota)


def attempt_cap(algo: AlgoConfig, quota: int) -> int:
    return algo.max_sampling_attempts or 4 * quota


def group_jobs(context: InitialState, k: int, seeds: list[int], mix_states: list[InitialState] | None,
               rng: np.random.Generator) -> list[EpisodeJob]:
    """K jobs for one group: the context tiled K times, or K random states of its task (mix_val_init_in_rloo)."""
    if mix_states is not None:
        picks = rng.choice(len(mix_states), size=k, replace=len(mix_states) < k)
        return [EpisodeJob(mix_states[int(i)], seed) for i, seed in zip(picks, seeds)]
    return [EpisodeJob(context, seed) for seed in seeds]


def collect(engine: Any, contexts: list[InitialState], algo: AlgoConfig, quota: int, iteration: int,
            eval_states: dict[str, list[InitialState]] | None = None,
            distribution: ChunkFamily | None = None, ranks: Ranks | None = None) -> IterationRollouts:
    """Roll out contexts (reshuffled each iteration) in rounds until the quota is met or the cap is reached.

    `contexts` are the training contexts, or the evaluation states when `use_val_init`; `eval_states` (per task)
    is needed for `mix_val_init_in_rloo`. In a multi-process trial `contexts` are this rank's, `quota` is the
    trial's: each rank aims at its share, and all stop once int(early_stop_percentage x quota) groups are accepted
    over all ranks (a sum after every round: the original's shared counter, as a collective), so the accepted
    total can pass that threshold by what the last round of each rank accepted, as the original's can.
    """
    ranks = ranks or Ranks()
    start = time.perf_counter()
    k = algo.rloo_batch_size
    rank_part = ("rank", ranks.rank) if ranks.size > 1 else ()  # one process keeps its streams unchanged
    rng = np.random.default_rng(stream_seed(algo.model_seed, "contexts", iteration, *rank_part))
    order = rng.permutation(len(contexts))
    share = ranks.share(quota)
    cap = attempt_cap(algo, share) if algo.enable_dynamic_sampling else share
    target = sampling_target(algo, quota)
    local_target = min(share, target)
    accepted: list[Group] = []
    all_episodes: list[Episode] = []
    surplus: list[Episode] = []
    tried = zero_variance = 0
    busy = 0.0
    distribution = distribution or ActionDistribution.from_algo(algo)
    mix = algo.use_val_init and algo.mix_val_init_in_rloo
    min_round = 2 * getattr(engine, "num_workers", 1)
    while True:
        going = len(accepted) < local_target and tried < cap and len(contexts) > 0
        if ranks.size > 1:
            total, active = ranks.sum([len(accepted), float(going)])
            if total >= target or active == 0:
                break
            if not going:
                continue  # this rank is done: wait for the others' next round
        elif not going:
            break
        need = local_target - len(accepted)
        n = need if tried == 0 else max(math.ceil(need * tried / max(len(accepted), 1)), min_round)
        n = min(n, cap - tried)
        picked = [contexts[order[(tried + i) % len(order)]] for i in range(n)]
        jobs: list[EpisodeJob] = []
        for i, ctx in enumerate(picked):
            seeds = [stream_seed(algo.model_seed, "noise", iteration, *rank_part, tried + i, j) for j in range(k)]
            jobs += group_jobs(ctx, k, seeds, (eval_states or {}).get(ctx.task) if mix else None, rng)
        busy_from = time.perf_counter()
        episodes = engine.run(jobs, distribution)
        busy += time.perf_counter() - busy_from
        for i, ctx in enumerate(picked):
            group = Group(ctx, episodes[i * k:(i + 1) * k])
            if len(accepted) >= local_target:  # the quota was met earlier in this round: not judged, not used
                surplus += group.episodes
                continue
            tried += 1
            all_episodes += group.episodes
            if algo.enable_dynamic_sampling and group.degenerate:
                zero_variance += 1
            else:
                zero_variance += int(group.degenerate)
                accepted.append(group)
    return IterationRollouts(accepted, tried, zero_variance, all_episodes, time.perf_counter() - start, target,
                             surplus, k, busy)
