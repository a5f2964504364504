"""The rollout engine: environment worker processes and the two ways of running the policy for them.

`replica`  each worker holds a copy of the (small) policy and runs whole episodes for a batch of environments;
           one message per batch. Best on CPU: measured on 2 cores, a lock-step vector env paid a pipe round
           trip per step costing as much as the physics.
`central`  the policy stays where the trainer keeps it (CUDA when present); workers only step environments.
           Every chunk, the engine gathers the observations of all batches that are waiting, runs one batched
           forward, draws each episode's actions from that episode's own generator and sends each worker its
           chunk. Each worker holds two batches in flight, so it steps one while the policy computes the other's
           actions (the overlap `perf/` figures and `python -m ript_ablate.bench.rollout_throughput` measure).
           This is how the original and large-VLA frameworks roll out; a policy with `replicable = False` must.

Reproducibility: every episode draws its noise from its own generator (seeded by its job) and jobs are cut into
batches deterministically, so neither the worker that ran a batch nor the inference mode changes an episode
(beyond float rounding of a different batch composition in the forward; tested).
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np
import torch

from ript_ablate.engine.runner import EpisodeRunner, expand_rows, family_act, slice_record
from ript_ablate.episodes import Episode, EpisodeJob, concat_observations
from ript_ablate.families import ActionDistribution, ChunkFamily, build_family

BATCHES_IN_FLIGHT = 2  # per worker in central mode: one stepping while the policy computes the other


def resolve_inference(mode: str, policy: Any, device: torch.device) -> str:
    """`auto`: central on CUDA or for a policy that cannot be replicated, else replica."""
    if mode != "auto":
        return mode
    if device.type == "cuda" or not getattr(policy, "replicable", True):
        return "central"
    return "replica"


def _worker_main(conn: Connection, cfg: Any) -> None:
    torch.set_num_threads(1)
    runner = EpisodeRunner(cfg)
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


class RolloutEngine:
    """Runs episode jobs on `suite.num_workers` processes (0 = in this process). Use as a context manager.

    `world` is this process's world (workers build their own from `cfg`); `set_policy(policy, mode, ...)` says
    which policy acts and how (see the module docstring) before `run`.
    """

    def __init__(self, cfg: Any, world: Any = None):
        self.cfg = cfg
        self.envs_per_worker = cfg.suite.envs_per_worker
        self.local = EpisodeRunner(cfg, world) if cfg.suite.num_workers == 0 else None
        self.mode = "replica"
        self.batches_in_flight = BATCHES_IN_FLIGHT
        self.policy: Any = None
        self.family: ChunkFamily | None = None
        self.device = torch.device("cpu")
        self.precision = "fp32"
        self._instructions: dict[str, torch.Tensor] = {}
        self._world = world
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        ctx = mp.get_context("spawn")
        for _ in range(cfg.suite.num_workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, cfg), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def __enter__(self) -> RolloutEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def num_workers(self) -> int:
        return len(self.conns)

    @property
    def world(self) -> Any:
        if self._world is None:
            from ript_ablate.plugins import build_world

            self._world = build_world(self.cfg)
        return self._world

    def _call_all(self, command: str, *args: Any) -> list[Any]:
        if self.local is not None:
            return [getattr(self.local, command)(*args)]
        for conn in self.conns:
            conn.send((command, args))
        return [self._receive(conn) for conn in self.conns]

    def _receive(self, conn: Connection) -> Any:
        try:
            status, payload = conn.recv()
        except (EOFError, ConnectionResetError, BrokenPipeError):
            raise RolloutError("a rollout worker exited unexpectedly (killed, out of memory, or it could not start: "
                               "a script that starts workers needs `if __name__ == '__main__':`)") from None
        if status == "error":
            raise RolloutError(f"rollout worker failed:\n{payload}")
        return payload

    # -- policy ----------------------------------------------------------------------------------------------
    def set_policy(self, policy: Any, mode: str = "replica", device: torch.device | None = None,
                   precision: str = "fp32", family: ChunkFamily | None = None) -> None:
        """Make `policy` act in the next `run`s: `replica` sends its current weights to every worker (call again
        after each update); `central` keeps it here, on `device`, under `precision`. `family` samples its chunks
        (default: the policy's family with the config's switches)."""
        if mode not in ("replica", "central"):
            raise ValueError(f"inference mode {mode!r}: expected replica or central")
        self.mode = mode
        self.family = family or build_family(self.cfg.algo, policy)
        self.policy, self.device, self.precision = policy, device or torch.device("cpu"), precision
        self._instructions = {}
        if mode == "central":
            if self.local is not None:
                self.local.use_policy(policy, self.device, precision)
            return
        state = {k: v.numpy() for k, v in policy.rollout_state().items()}
        self._call_all("set_policy", state)

    def _instruction(self, task: str) -> torch.Tensor:
        if task not in self._instructions:
            self._instructions[task] = self.policy.encode_instruction(self.world.instruction(task))
        return self._instructions[task]

    # -- running ---------------------------------------------------------------------------------------------
    def run(self, jobs: Sequence[EpisodeJob], family: ChunkFamily | None = None,
            on_batch: Callable[[list[Episode]], None] | None = None) -> list[Episode]:
        """All jobs' episodes, in job order, sampled by `family` (default: the one `set_policy` chose)."""
        distribution = family or self.family or ActionDistribution()
        batches = make_batches(jobs, self.envs_per_worker)
        results: list[Episode | None] = [None] * len(jobs)

        def store(idx: list[int], episodes: list[Episode]) -> None:
            for i, ep in zip(idx, episodes):
                results[i] = ep
            if on_batch is not None:
                on_batch(episodes)

        if self.local is not None:
            for idx in batches:
                store(idx, self.local.run_batch([jobs[i] for i in idx], distribution))
        elif self.mode == "central" and any(jobs[idx[0]].mode != "expert" for idx in batches):
            self._run_central(jobs, batches, distribution, store)
        else:
            self._run_replica(jobs, batches, distribution, store)
        return results  # type: ignore[return-value]

    def _run_replica(self, jobs: Sequence[EpisodeJob], batches: list[list[int]], distribution: ChunkFamily,
                     store: Callable[[list[int], list[Episode]], None]) -> None:
        """Whole batches to whichever worker is free next."""
        pending = list(reversed(batches))
        busy: dict[Any, list[int]] = {}
        for conn in self.conns:
            if pending:
                idx = pending.pop()
                conn.send(("run_batch", ([jobs[i] for i in idx], distribution)))
                busy[conn] = idx
        while busy:
            for conn in wait(list(busy)):
                idx = busy.pop(conn)
                store(idx, self._receive(conn))  # type: ignore[arg-type]
                if pending:
                    nxt = pending.pop()
                    conn.send(("run_batch", ([jobs[i] for i in nxt], distribution)))  # type: ignore[union-attr]
                    busy[conn] = nxt

    def _run_central(self, jobs: Sequence[EpisodeJob], batches: list[list[int]], distribution: ChunkFamily,
                     store: Callable[[list[int], list[Episode]], None]) -> None:
        """Lock-step chunks: one batched forward for every batch waiting for actions, workers step the rest."""
        horizon = self.policy.chunk_size
        pending = list(enumerate(batches))[::-1]
        rngs = {i: np.random.default_rng(jobs[i].seed) for idx in batches for i in idx}
        in_flight: dict[Connection, int] = {conn: 0 for conn in self.conns}
        owner: dict[int, Connection] = {}

        def open_next(conn: Connection) -> None:
            batch_id, idx = pending.pop()
            owner[batch_id] = conn
            in_flight[conn] += 1
            conn.send(("central_open", (batch_id, [jobs[i] for i in idx], horizon)))

        for _ in range(self.batches_in_flight):
            for conn in self.conns:
                if pending:
                    open_next(conn)
        while any(in_flight.values()):
            waiting: list[tuple[int, np.ndarray, dict[str, np.ndarray]]] = []
            for conn in wait([c for c, n in in_flight.items() if n]):  # every worker with a reply ready
                kind, batch_id, *payload = self._receive(conn)  # type: ignore[arg-type]
                in_flight[conn] -= 1  # type: ignore[index]
                if kind == "done":
                    store(batches[batch_id], payload[0])
                    if pending:
                        open_next(conn)  # type: ignore[arg-type]
                else:
                    waiting.append((batch_id, payload[0], payload[1]))
            if waiting:
                self._act_central(jobs, batches, waiting, rngs, distribution, owner, in_flight)

    def _act_central(self, jobs: Sequence[EpisodeJob], batches: list[list[int]],
                     waiting: list[tuple[int, np.ndarray, dict[str, np.ndarray]]], rngs: dict[int, np.random.Generator],
                     distribution: ChunkFamily, owner: dict[int, Connection],
                     in_flight: dict[Connection, int]) -> None:
        """One forward over the waiting batches' live rows; each batch gets its chunk of actions back."""
        obs = concat_observations([o for _, _, o in waiting])
        instructions = torch.cat([expand_rows(self._instruction(jobs[batches[b][0]].state.task), len(rows))
                                  for b, rows, _ in waiting])
        row_rngs = [rngs[batches[b][r]] for b, rows, _ in waiting for r in rows]
        stochastic = [jobs[batches[b][0]].mode == "sample" for b, rows, _ in waiting for _r in rows]
        draw = family_act(distribution, self.policy, obs, instructions, row_rngs, stochastic, self.device,
                          self.precision)
        start = 0
        for batch_id, rows, _ in waiting:
            stop = start + len(rows)
            conn = owner[batch_id]
            conn.send(("central_step", (batch_id, rows, draw.actions[start:stop],
                                        slice_record(draw.record, start, stop))))
            in_flight[conn] += 1
            start = stop

    def raw_steps_per_second(self, task: str, seconds: float = 3.0, episode_length: int | None = None) -> float:
        """Aggregate random-action stepping rate of all workers at once, with their batch size of envs, reset
        onto the task's evaluation states (every `episode_length` steps when given)."""
        states = self.world.eval_states(task)
        counts = self._call_all("raw_steps", task, self.envs_per_worker, seconds, states, episode_length)
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
