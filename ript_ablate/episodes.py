"""The records every layer shares: initial states (contexts), episode jobs, episodes and demonstrations.

Plain data (numpy), picklable, so they travel between the trainer and rollout worker processes. Observations are
dicts of arrays ({"state": ..., "image": ...}) as the world gives them; an episode stores each key stacked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

Observation = dict[str, np.ndarray]

MODES = ("sample", "mean", "expert")


@dataclass(frozen=True)
class InitialState:
    """A context: one task variation. `state_id` names it in logs (e.g. 'reach-v3/context/3'); `data` is whatever
    the world needs to reset an environment to it (Meta-World: the variation vector), opaque to everything else."""

    task: str
    state_id: str
    data: Any = field(compare=False)


def check_states_disjoint(states: list[InitialState], decimals: int) -> None:
    """Raise naming the first two of `states` whose data coincide to `decimals` places (e.g. a training context that
    is also an evaluation state)."""
    seen: dict[bytes, str] = {}
    for state in states:
        key = np.round(np.asarray(state.data), decimals).tobytes()
        if key in seen:
            raise RuntimeError(f"initial states {seen[key]} and {state.state_id} coincide")
        seen[key] = state.state_id


@dataclass
class EpisodeJob:
    state: InitialState
    seed: int
    mode: str = "sample"  # sample | mean (deterministic) | expert (the world's scripted policy)


def stack_observations(rows: list[Observation]) -> Observation:
    """[{key: (...)}] * T -> {key: (T, ...)}; float64 states become float32, as the policy reads them."""
    out = {}
    for key in rows[0]:
        arr = np.stack([r[key] for r in rows])
        out[key] = arr.astype(np.float32) if arr.dtype == np.float64 else arr
    return out


def concat_observations(parts: list[Observation]) -> Observation:
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def slice_observations(obs: Observation, index: Any) -> Observation:
    return {key: value[index] for key, value in obs.items()}


@dataclass
class Episode:
    """One episode. Policy modes store one row per policy call (chunk); expert mode one row per step."""

    task: str
    state_id: str
    success: bool
    length: int
    obs: Observation  # each (C, ...) observation at each chunk start (expert: each step)
    actions: np.ndarray  # (C, H, D) executed/sampled actions (expert: (T, D))
    valid: np.ndarray  # (C, H) bool, action steps actually executed (steps after success are not)
    #: what the policy family recorded per chunk to re-score it, each (C, ...): the Laplace family's behaviour-time
    #: mu and log_b (unclamped), a token policy's sampled tokens, a flow policy's chain and stochastic step
    record: dict[str, np.ndarray] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Memory of the episode's arrays: observations (images dominate), actions, mask and the family's record."""
        arrays = [*self.obs.values(), self.actions, self.valid, *self.record.values()]
        return int(sum(a.nbytes for a in arrays))

    @property
    def mu(self) -> np.ndarray | None:
        return self.record.get("mu")

    @property
    def log_b(self) -> np.ndarray | None:
        return self.record.get("log_b")

    def recorded_chunks(self) -> np.ndarray:
        """(C,) bool: the chunks the original records. It appends a chunk after stepping its first action, unless
        that step ended the episode in success (its loop breaks before the append); a time limit does not break."""
        recorded = np.ones(self.valid.shape[0], dtype=bool)
        if self.success and self.valid.shape[0] and self.valid[-1].sum() == 1:
            recorded[-1] = False
        return recorded

    def loss_mask(self, executed_only: bool = False) -> np.ndarray:
        """(C, H) bool: the action positions the PPO loss counts. As the original: all H positions of each
        recorded chunk, executed or not. `executed_only`: the steps actually executed, in every chunk."""
        if executed_only:
            return self.valid.copy()
        return np.repeat(self.recorded_chunks()[:, None], self.valid.shape[1], axis=1)


@dataclass
class Demonstrations:
    """Successful expert episodes per task (`states` are their initial states, in the same order)."""

    episodes: dict[str, list[Episode]]
    states: dict[str, list[InitialState]]
    # per task, (successes, expert episodes run) while collecting them: the expert's success rate (empty where
    # unknown: demonstrations that were not collected by `collect_demonstrations`)
    expert_record: dict[str, tuple[int, int]] = field(default_factory=dict)

    def n_steps(self) -> int:
        return sum(ep.length for eps in self.episodes.values() for ep in eps)

    def expert_summary(self) -> str:
        """One line: the expert's successes over its episodes, and the task where it succeeded least."""
        if not self.expert_record:
            return ""
        wins = sum(w for w, _ in self.expert_record.values())
        runs = sum(n for _, n in self.expert_record.values())
        task, (w, n) = min(self.expert_record.items(), key=lambda item: item[1][0] / max(1, item[1][1]))
        return f"the expert succeeded in {wins} of {runs} episodes ({wins / max(1, runs):.0%}; least: {task} {w}/{n})"
