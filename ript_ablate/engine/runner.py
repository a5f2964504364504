"""Stepping episodes in one process: the environment side (`EpisodeBatch`) and the in-process runner.

An `EpisodeBatch` holds the environments of one batch of jobs (one task, one mode) and records every chunk;
it never sees the policy. Whoever holds the policy (a replica in this process, or the trainer in `central`
mode) asks the policy's family for the live rows' chunks (`family_act`: forward passes, then each row's draws from
its own generator) and hands them to `step_chunk`, which executes each chunk open-loop and keeps the family's
record. Both inference modes therefore share every line that touches an environment or a random generator: the
same seed gives the same episodes.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ript_ablate.demos import run_expert
from ript_ablate.episodes import Episode, EpisodeJob, Observation, stack_observations
from ript_ablate.families import ActionDistribution, ChunkDraw, ChunkFamily


def episode_limit(world: Any, cfg: Any, task: str) -> int:
    """`algo.max_episode_length` when set, else the world's own limit for the task."""
    return cfg.algo.max_episode_length or world.episode_length(task)


def family_act(family: ChunkFamily, policy: Any, obs: Observation, instruction: torch.Tensor,
               rngs: Sequence[np.random.Generator], stochastic: Sequence[bool], device: torch.device | None = None,
               precision: str = "fp32") -> ChunkDraw:
    """Numpy observations in, one chunk per row out (and the family's record), computed on `device`."""
    device = device or torch.device("cpu")
    batch = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in obs.items()}
    return family.act(policy, batch, instruction.to(device), rngs, stochastic, precision)


def slice_record(record: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {k: v[start:stop] for k, v in record.items()}


class EpisodeBatch:
    """The environments of one batch of jobs, reset to their states; steps chunks and records the episodes."""

    def __init__(self, jobs: Sequence[EpisodeJob], envs: list[Any], limit: int, horizon: int):
        self.jobs, self.envs, self.limit, self.horizon = list(jobs), envs, limit, horizon
        self.task = jobs[0].state.task
        n = len(jobs)
        self.obs: list[Observation] = [env.reset(job.state) for env, job in zip(envs, jobs)]
        self.done = np.zeros(n, dtype=bool)
        self.success = np.zeros(n, dtype=bool)
        self.steps = np.zeros(n, dtype=np.int64)
        self.records: list[dict[str, list[Any]]] = [
            {"obs": [], "actions": [], "valid": [], "record": []} for _ in range(n)]

    def live(self) -> np.ndarray:
        return np.flatnonzero(~self.done)

    def observations(self, rows: Sequence[int]) -> Observation:
        return stack_observations([self.obs[i] for i in rows])

    def step_chunk(self, rows: Sequence[int], actions: Sequence[np.ndarray], record: dict[str, np.ndarray]) -> None:
        """Execute each live row's chunk open-loop, up to success (sticky) or the step limit; keep the family's
        record of it (`record`: each (len(rows), ...))."""
        for j, i in enumerate(rows):
            action = actions[j]
            valid = np.zeros(self.horizon, dtype=bool)
            kept = self.records[i]
            kept["obs"].append(self.obs[i])
            env = self.envs[i]
            unobserved = getattr(env, "step_unobserved", None)
            for h in range(self.horizon):
                if self.done[i]:
                    break
                step_action = np.asarray(action[h], dtype=np.float64)
                if unobserved is not None and h < self.horizon - 1:  # nobody reads an observation inside a chunk
                    success = unobserved(step_action)
                else:
                    self.obs[i], success = env.step(step_action)
                valid[h] = True
                self.steps[i] += 1
                if success:
                    self.success[i] = self.done[i] = True
                elif self.steps[i] >= self.limit:
                    self.done[i] = True
            kept["actions"].append(np.asarray(action, dtype=np.float32))
            kept["valid"].append(valid)
            kept["record"].append({k: v[j] for k, v in record.items()})

    def episodes(self) -> list[Episode]:
        return [
            Episode(task=self.task, state_id=job.state.state_id, success=bool(self.success[i]),
                    length=int(self.steps[i]), obs=stack_observations(r["obs"]), actions=np.stack(r["actions"]),
                    valid=np.stack(r["valid"]),
                    record={k: np.stack([c[k] for c in r["record"]]) for k in (r["record"][0] if r["record"] else {})})
            for i, (job, r) in enumerate(zip(self.jobs, self.records))
        ]


def expand_rows(encoding: torch.Tensor, n: int) -> torch.Tensor:
    """One task's instruction encoding repeated for n observation rows: (n, *encoding.shape)."""
    return encoding.unsqueeze(0).expand(n, *encoding.shape)


class EpisodeRunner:
    """Runs whole batches of episodes in one process (a worker process wraps one): its environments, reused per
    task, and, in replica mode, its own copy of the policy."""

    def __init__(self, cfg: Any, world: Any = None):
        self.cfg = cfg
        self._world = world
        self.pool: dict[tuple[str, int], list[Any]] = {}  # (task, slot) -> environments
        self.replica: Any = None  # this process's own copy (replica mode)
        self.policy: Any = None  # the policy acting in run_batch: the replica, or the trainer's own
        self.device = torch.device("cpu")
        self.precision = "fp32"
        self.instructions: dict[str, torch.Tensor] = {}
        self.batches: dict[int, EpisodeBatch] = {}  # central mode: batches being stepped for the trainer
        self.slots: dict[int, int] = {}  # central mode: batch id -> its environment slot

    @property
    def world(self) -> Any:
        if self._world is None:
            from ript_ablate.plugins import build_world

            self._world = build_world(self.cfg)
        return self._world

    # -- policy ----------------------------------------------------------------------------------------------
    def set_policy(self, state: dict[str, np.ndarray]) -> None:
        """Load a replica's weights (building the replica once)."""
        from ript_ablate.plugins import build_policy

        if self.replica is None:
            self.replica = build_policy(self.cfg, self.world).eval()
        self.replica.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
        if self.policy is not self.replica:
            self.policy, self.device, self.precision = self.replica, torch.device("cpu"), "fp32"
            self.instructions = {}

    def use_policy(self, policy: Any, device: torch.device, precision: str) -> None:
        """Act with the trainer's own policy object (in-process central mode: no copy)."""
        self.policy, self.device, self.precision = policy, device, precision
        self.instructions = {}

    def instruction(self, task: str) -> torch.Tensor:
        if task not in self.instructions:
            self.instructions[task] = self.policy.encode_instruction(self.world.instruction(task))
        return self.instructions[task]

    # -- environments ----------------------------------------------------------------------------------------
    def envs(self, task: str, n: int, slot: int = 0) -> list[Any]:
        """n environments of `task` from slot `slot` (batches in flight at once each need their own). Beyond
        `suite.max_envs_per_worker` kept environments, the least recently used tasks' are closed first."""
        envs = self.pool.pop((task, slot), [])
        self.pool[(task, slot)] = envs  # most recently used last
        while len(envs) < n:
            envs.append(self.world.make_env(task))
        cap = self.cfg.suite.max_envs_per_worker
        if cap:
            self._evict(cap, keep={(task, slot)} | {(self.batches[i].task, s) for i, s in self.slots.items()})
        return envs[:n]

    def _evict(self, cap: int, keep: set[tuple[str, int]]) -> None:
        """Close the least recently used environments (never those of `keep`: in use) until at most `cap` remain."""
        kept = sum(len(v) for v in self.pool.values())
        for key in [k for k in self.pool if k not in keep]:
            if kept <= cap:
                break
            kept -= len(self.pool[key])
            for env in self.pool.pop(key):
                close = getattr(env, "close", None)
                if close is not None:
                    close()

    def open_batch(self, jobs: Sequence[EpisodeJob], horizon: int, slot: int = 0) -> EpisodeBatch:
        task = jobs[0].state.task
        assert all(j.state.task == task for j in jobs), "a batch holds one task"
        return EpisodeBatch(jobs, self.envs(task, len(jobs), slot), episode_limit(self.world, self.cfg, task),
                            horizon)

    def run_batch(self, jobs: Sequence[EpisodeJob], family: ChunkFamily = ActionDistribution()) -> list[Episode]:
        """Episodes of one task, stepped together with this runner's policy (or the expert)."""
        task = jobs[0].state.task
        if jobs[0].mode == "expert":
            return run_expert(jobs, self.envs(task, 1)[0], episode_limit(self.world, self.cfg, task),
                              self.cfg.suite.demo_action_noise)
        batch = self.open_batch(jobs, self.policy.chunk_size)
        rngs = [np.random.default_rng(j.seed) for j in jobs]
        stochastic = jobs[0].mode == "sample"
        instruction = self.instruction(task)
        while not batch.done.all():
            rows = batch.live()
            obs = batch.observations(rows)
            draw = family_act(family, self.policy, obs, expand_rows(instruction, len(rows)),
                              [rngs[i] for i in rows], [stochastic] * len(rows), self.device, self.precision)
            batch.step_chunk(rows, draw.actions, draw.record)
        return batch.episodes()

    # -- central mode: the trainer computes actions, this runner steps ---------------------------------------
    def central_open(self, batch_id: int, jobs: Sequence[EpisodeJob], horizon: int) -> tuple[Any, ...]:
        """Reset a batch's environments: ('obs', batch_id, live rows, their observations)."""
        slot = min(set(range(len(self.slots) + 1)) - set(self.slots.values()))
        batch = self.open_batch(jobs, horizon, slot)
        self.batches[batch_id], self.slots[batch_id] = batch, slot
        rows = batch.live()
        return "obs", batch_id, rows, batch.observations(rows)

    def central_step(self, batch_id: int, rows: np.ndarray, actions: list[np.ndarray],
                     record: dict[str, np.ndarray]) -> tuple[Any, ...]:
        """Step the chunk: ('obs', batch_id, next live rows, observations), or ('done', batch_id, episodes)."""
        batch = self.batches[batch_id]
        batch.step_chunk(rows, actions, record)
        if batch.done.all():
            del self.slots[batch_id]
            return "done", batch_id, self.batches.pop(batch_id).episodes()
        rows = batch.live()
        return "obs", batch_id, rows, batch.observations(rows)

    # -- throughput ceiling ----------------------------------------------------------------------------------
    def raw_steps(self, task: str, n_envs: int, seconds: float, states: list[Any],
                  episode_length: int | None = None) -> tuple[int, float]:
        """Random-action stepping on this runner's envs: the ceiling rollouts are measured against. Each env is
        reset onto the next of `states` at the start and every `episode_length` steps (when given)."""
        envs = self.envs(task, n_envs)
        cycle = itertools.cycle(states)
        for env in envs:
            env.reset(next(cycle))
        limit = episode_length or episode_limit(self.world, self.cfg, task)
        counts = [0] * n_envs
        rng = np.random.default_rng(0)
        dim = self.world.action_dim
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for i, env in enumerate(envs):
                if counts[i] >= limit:
                    env.reset(next(cycle))
                    counts[i] = 0
                env.step(rng.uniform(-1, 1, dim))
                counts[i] += 1
                count += 1
        return count, time.perf_counter() - start
