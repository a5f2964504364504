"""Rollout workers: many Meta-World environments stepped in a few processes, each with a CPU policy replica.

Why this shape (measured on 2 cores: gymnasium's AsyncVectorEnv with 2 workers gave only 0-20% over one process):
a lock-step vector env pays a pipe round trip per step that costs as much as the physics. Here a worker runs
whole episodes for a batch of environments with its own copy of the (small) policy, so the only traffic is one
message per batch. Environment instances are reused per task (switching variation with `set_task`), never built
per state.

Reproducibility: every episode draws its noise from its own generator (seeded by the job), and jobs are cut
into batches deterministically before dispatch, so results do not depend on which worker ran a batch.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np

from ript_ablate.suites import metaworld_tasks as mw

MODES = ("sample", "mean", "expert")


@dataclass(frozen=True)
class InitialState:
    """A context: one task variation. `state_id` names it in logs, e.g. 'reach-v3/context/3'."""

    task: str
    state_id: str
    rand_vec: np.ndarray = field(compare=False)


@dataclass(frozen=True)
class Sampling:
    """How stochastic actions are drawn: mu + scale_factor * exp(log_b) * noise, noise Laplace or Gaussian."""

    laplace: bool = True
    scale_factor: float = 1.0


@dataclass
class EpisodeJob:
    state: InitialState
    seed: int
    mode: str = "sample"  # sample | mean (deterministic) | expert (scripted policy)


@dataclass
class Episode:
    """One episode. Policy modes store one row per policy call (chunk); expert mode one row per step."""

    task: str
    state_id: str
    success: bool
    length: int
    obs: np.ndarray  # (C, obs_dim) observation at each chunk start (expert: each step)
    actions: np.ndarray  # (C, H, D) executed/sampled actions (expert: (T, D), clipped to [-1, 1])
    valid: np.ndarray  # (C, H) bool, action steps actually executed (steps after success are not)
    mu: np.ndarray | None = None  # (C, H, D) behaviour-time mean
    log_b: np.ndarray | None = None  # (C, H, D) behaviour-time log-scale (unclamped)

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


class EpisodeRunner:
    """Runs batches of episodes in one process; the unit a worker process wraps."""

    def __init__(self, envs_per_worker: int, episode_length_override: int | None = None):
        self.envs_per_worker = envs_per_worker
        self.episode_length_override = episode_length_override
        self.pool: dict[str, list[Any]] = {}
        self.policy: Any = None
        self.instructions: dict[str, np.ndarray] = {}

    # -- policy ------------------------------------------------------------------------------------------
    def set_policy(self, policy_cfg: dict[str, Any], state: dict[str, np.ndarray], obs_dim: int,
                   action_dim: int) -> None:
        import torch

        from ript_ablate.config import PolicyConfig
        from ript_ablate.policy import build_policy

        cfg = PolicyConfig(**policy_cfg)
        if self.policy is None or self.policy.cfg != cfg:
            self.policy = build_policy(cfg, obs_dim, action_dim).eval()
            self.instructions = {}
        self.policy.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})

    def _instruction_ids(self, task: str) -> np.ndarray:
        from ript_ablate.policy import tokenize

        if task not in self.instructions:
            cfg = self.policy.cfg
            self.instructions[task] = np.asarray(tokenize(mw.instruction(task), cfg.vocab_size,
                                                          cfg.max_instruction_tokens), dtype=np.int64)
        return self.instructions[task]

    def _act(self, task: str, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        instr = np.broadcast_to(self._instruction_ids(task), (obs.shape[0], self.policy.cfg.max_instruction_tokens))
        with torch.inference_mode():
            mu, log_b = self.policy(torch.from_numpy(obs.astype(np.float32)), torch.from_numpy(instr.copy()))
        return mu.numpy(), log_b.numpy()

    # -- environments ------------------------------------------------------------------------------------
    def _envs(self, task: str, n: int) -> list[Any]:
        envs = self.pool.setdefault(task, [])
        while len(envs) < n:
            envs.append(mw.make_env(task))
        return envs[:n]

    def run_batch(self, jobs: Sequence[EpisodeJob], sampling: Sampling) -> list[Episode]:
        """Episodes of one task, stepped together; ends each at success (sticky) or the task's length."""
        mw.quiet()
        task = jobs[0].state.task
        assert all(j.state.task == task for j in jobs), "a batch holds one task"
        mode = jobs[0].mode
        limit = mw.episode_length(task, self.episode_length_override)
        envs = self._envs(task, len(jobs))
        obs = []
        for env, job in zip(envs, jobs):
            mw.set_variation(env, task, job.state.rand_vec)
            obs.append(env.reset()[0])
        if mode == "expert":
            return self._run_expert(task, jobs, envs, np.stack(obs), limit)
        return self._run_policy(task, jobs, envs, np.stack(obs), limit, sampling)

    def _run_policy(self, task: str, jobs: Sequence[EpisodeJob], envs: list[Any], obs: np.ndarray, limit: int,
                    sampling: Sampling) -> list[Episode]:
        n = len(jobs)
        horizon = self.policy.cfg.chunk_size
        rngs = [np.random.default_rng(j.seed) for j in jobs]
        done = np.zeros(n, dtype=bool)
        success = np.zeros(n, dtype=bool)
        steps = np.zeros(n, dtype=np.int64)
        rec: list[dict[str, list[np.ndarray]]] = [{"obs": [], "actions": [], "valid": [], "mu": [], "log_b": []}
                                                  for _ in range(n)]
        stochastic = jobs[0].mode == "sample"
        while not done.all():
            live = np.flatnonzero(~done)
            mu, log_b = self._act(task, obs[live])
            for row, i in enumerate(live):
                if stochastic:
                    noise = rngs[i].laplace(size=mu[row].shape) if sampling.laplace else rngs[i].standard_normal(
                        mu[row].shape)
                    action = mu[row] + sampling.scale_factor * np.exp(log_b[row]) * noise
                else:
                    action = mu[row]
                valid = np.zeros(horizon, dtype=bool)
                r = rec[i]
                r["obs"].append(obs[i].copy())
                for h in range(horizon):
                    if done[i]:
                        break
                    o, _, _, _, info = envs[i].step(action[h].astype(np.float64))
                    valid[h] = True
                    steps[i] += 1
                    obs[i] = o
                    if info["success"] > 0:
                        success[i] = done[i] = True
                    elif steps[i] >= limit:
                        done[i] = True
                r["actions"].append(action.astype(np.float32))
                r["valid"].append(valid)
                r["mu"].append(mu[row])
                r["log_b"].append(log_b[row])
        return [
            Episode(task=task, state_id=j.state.state_id, success=bool(success[i]), length=int(steps[i]),
                    obs=np.stack(rec[i]["obs"]).astype(np.float32), actions=np.stack(rec[i]["actions"]),
                    valid=np.stack(rec[i]["valid"]), mu=np.stack(rec[i]["mu"]), log_b=np.stack(rec[i]["log_b"]))
            for i, j in enumerate(jobs)
        ]

    def _run_expert(self, task: str, jobs: Sequence[EpisodeJob], envs: list[Any], obs: np.ndarray,
                    limit: int) -> list[Episode]:
        from metaworld.policies import ENV_POLICY_MAP

        out = []
        for i, job in enumerate(jobs):
            expert = ENV_POLICY_MAP[task]()
            o = obs[i]
            seq_obs, seq_act, success = [], [], False
            for _ in range(limit):
                action = np.clip(expert.get_action(o), -1.0, 1.0)
                seq_obs.append(o.copy())
                seq_act.append(action)
                o, _, _, _, info = envs[i].step(action)
                if info["success"] > 0:
                    success = True
                    break
            t = len(seq_act)
            out.append(Episode(task=task, state_id=job.state.state_id, success=success, length=t,
                               obs=np.asarray(seq_obs, dtype=np.float32), actions=np.asarray(seq_act, dtype=np.float32),
                               valid=np.ones((t, 1), dtype=bool)))
        return out

    def raw_steps(self, task: str, n_envs: int, seconds: float,
                  episode_length: int | None = None) -> tuple[int, float]:
        """Random-action stepping on this runner's envs: the ceiling rollouts are measured against. With
        `episode_length`, each env is reset onto a new variation every that many steps, as rollouts do."""
        mw.quiet()
        envs = self._envs(task, n_envs)
        variations = itertools.cycle(mw.sample_variations(task, 0, 4 * n_envs, envs[0]))
        for env in envs:
            mw.set_variation(env, task, next(variations))
            env.reset()
        limit = episode_length or envs[0].max_path_length - 1
        rng = np.random.default_rng(0)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for env in envs:
                if env.curr_path_length >= limit:
                    if episode_length:
                        mw.set_variation(env, task, next(variations))
                    env.reset()
                env.step(rng.uniform(-1, 1, 4))
                count += 1
        return count, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------- processes


def _worker_main(conn: Connection, envs_per_worker: int, episode_length_override: int | None) -> None:
    import torch

    torch.set_num_threads(1)
    runner = EpisodeRunner(envs_per_worker, episode_length_override)
    while True:
        try:
            command, args = conn.recv()
        except EOFError:
            return
        if command == "close":
            return
        try:
            conn.send(("ok", getattr(runner, command)(*args)))
        except Exception:  # report to the parent, which raises with this traceback
            conn.send(("error", traceback.format_exc()))


class RolloutError(RuntimeError):
    """A rollout worker failed; carries the worker's traceback."""


def make_batches(jobs: Sequence[EpisodeJob], size: int) -> list[list[int]]:
    """Indices of jobs cut into batches of one task and one mode, at most `size` each, in a fixed order."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((job.state.task, job.mode), []).append(i)
    return [idx[s:s + size] for idx in groups.values() for s in range(0, len(idx), size)]


class RolloutPool:
    """Runs episode jobs on `num_workers` processes (0 = in this process). Use as a context manager."""

    def __init__(self, num_workers: int, envs_per_worker: int, episode_length_override: int | None = None):
        self.envs_per_worker = envs_per_worker
        self.local = EpisodeRunner(envs_per_worker, episode_length_override) if num_workers == 0 else None
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        ctx = mp.get_context("spawn")
        for _ in range(num_workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, envs_per_worker, episode_length_override),
                               daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def __enter__(self) -> RolloutPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def num_workers(self) -> int:
        return len(self.conns)

    def _call_all(self, command: str, *args: Any) -> list[Any]:
        if self.local is not None:
            return [getattr(self.local, command)(*args)]
        for conn in self.conns:
            conn.send((command, args))
        return [self._receive(conn) for conn in self.conns]

    def _receive(self, conn: Connection) -> Any:
        try:
            status, payload = conn.recv()
        except EOFError:
            raise RolloutError("a rollout worker exited unexpectedly (killed or out of memory?)") from None
        if status == "error":
            raise RolloutError(f"rollout worker failed:\n{payload}")
        return payload

    def set_policy(self, policy: Any) -> None:
        """Send the policy's current weights (LoRA merged) to every worker."""
        import dataclasses

        from ript_ablate.policy import merged_state_dict

        state = {k: v.numpy() for k, v in merged_state_dict(policy).items()}
        self._call_all("set_policy", dataclasses.asdict(policy.cfg), state, policy.obs_dim, policy.action_dim)

    def run(self, jobs: Sequence[EpisodeJob], sampling: Sampling = Sampling(),
            on_batch: Callable[[list[Episode]], None] | None = None) -> list[Episode]:
        """All jobs' episodes, in job order. Batches go to whichever worker is free next."""
        batches = make_batches(jobs, self.envs_per_worker)
        results: list[Episode | None] = [None] * len(jobs)

        def store(idx: list[int], episodes: list[Episode]) -> None:
            for i, ep in zip(idx, episodes):
                results[i] = ep
            if on_batch is not None:
                on_batch(episodes)

        if self.local is not None:
            for idx in batches:
                store(idx, self.local.run_batch([jobs[i] for i in idx], sampling))
            return results  # type: ignore[return-value]
        pending = list(reversed(batches))
        busy: dict[Connection, list[int]] = {}
        for conn in self.conns:
            if pending:
                idx = pending.pop()
                conn.send(("run_batch", ([jobs[i] for i in idx], sampling)))
                busy[conn] = idx
        while busy:
            for conn in wait(list(busy)):
                idx = busy.pop(conn)  # type: ignore[arg-type]
                store(idx, self._receive(conn))  # type: ignore[arg-type]
                if pending:
                    nxt = pending.pop()
                    conn.send(("run_batch", ([jobs[i] for i in nxt], sampling)))  # type: ignore[union-attr]
                    busy[conn] = nxt  # type: ignore[index]
        return results  # type: ignore[return-value]

    def raw_steps_per_second(self, task: str, seconds: float = 3.0, episode_length: int | None = None) -> float:
        """Aggregate random-action stepping rate of all workers at once, with their batch size of envs (and
        resets onto new variations every `episode_length` steps when given)."""
        counts = self._call_all("raw_steps", task, self.envs_per_worker, seconds, episode_length)
        return sum(c for c, _ in counts) / max(s for _, s in counts)

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("close", ()))
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        self.conns, self.procs = [], []
