"""Scripted-expert demonstrations for any world whose environments have `expert_action`, cached on disk.

A world calls `collect_demonstrations` from its `demonstrations` method with a function giving candidate initial
states per task; failed expert episodes are skipped and more candidates tried, so every task gets exactly
`want` successful demonstrations (or a clear error). The cache is an .npz of plain arrays (never pickles),
named by the world's own hash of what produced it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ript_ablate.episodes import Demonstrations, Episode, EpisodeJob, InitialState, stack_observations

MAX_ROUNDS = 6  # candidates double each round


def demo_cache_path(world: Any, cache_dir: str | Path | None) -> Path | None:
    """Where `world`'s demonstrations are cached under `cache_dir` (None: no cache), named by their key: the
    world's description, settings and code and the framework's demonstration code (`ript_ablate.cache_keys`)."""
    if not cache_dir:
        return None
    from ript_ablate.cache_keys import demo_key

    return Path(cache_dir) / "demos" / f"{demo_key(world, world.run_config)}.npz"


def run_expert(jobs: Sequence[EpisodeJob], env: Any, limit: int, action_noise: float = 0.0) -> list[Episode]:
    """Episodes of the world's scripted expert (environments with `expert_action`), one row per step. They run one
    after another on one environment (a reset fixes the initial state), so 45 tasks need 45 environments a worker.
    With `action_noise` (DART) the environment executes the expert's action plus Gaussian noise of that std (clipped
    to [-1, 1]) while the episode records the expert's own action: the states a cloned policy's small errors lead
    to, labelled with the expert's correction. The noise is seeded by the initial state, so a demonstration is
    the same on any worker."""
    out = []
    for job in jobs:
        if not hasattr(env, "expert_action"):
            raise TypeError(f"{type(env).__name__} has no expert_action(): the world cannot give demonstrations")
        rng = np.random.default_rng(zlib.crc32(job.state.state_id.encode())) if action_noise else None
        obs = env.reset(job.state)
        rows, actions, success = [], [], False
        for _ in range(limit):
            action = np.asarray(env.expert_action(obs), dtype=np.float32)
            rows.append(obs)
            actions.append(action)
            executed = action if rng is None else np.clip(action + rng.normal(0.0, action_noise, action.shape),
                                                          -1.0, 1.0).astype(np.float32)
            obs, success = env.step(executed)
            if success:
                break
        t = len(actions)
        out.append(Episode(task=job.state.task, state_id=job.state.state_id, success=bool(success), length=t,
                           obs=stack_observations(rows), actions=np.stack(actions), valid=np.ones((t, 1), bool)))
    return out


def collect_demonstrations(tasks: list[str], engine: Any, want: int,
                           candidates: Callable[[str, int], list[InitialState]], cache_path: Path | None = None,
                           on_batch: Callable[[list[Episode]], None] | None = None,
                           prepare: Callable[[dict[str, int]], None] | None = None) -> Demonstrations:
    """`want` successful expert episodes per task, from the first candidates (in order) where the expert succeeds.
    `prepare`, if given, is told each round how many candidates each short task will be asked for (a world that
    draws candidates slowly can draw them all at once, in parallel)."""
    if cache_path is not None and cache_path.is_file():
        return load_demonstrations(cache_path, tasks)
    episodes: dict[str, list[Episode]] = {t: [] for t in tasks}
    states: dict[str, list[InitialState]] = {t: [] for t in tasks}
    n_candidates = {t: want + max(2, want // 4) for t in tasks}
    tried: dict[str, set[str]] = {t: set() for t in tasks}
    wins = {t: 0 for t in tasks}
    for _round in range(MAX_ROUNDS):
        short = [t for t in tasks if len(episodes[t]) < want]
        if not short:
            break
        if prepare is not None:
            prepare({task: n_candidates[task] for task in short})
        jobs = [EpisodeJob(state, seed=0, mode="expert") for task in short
                for state in candidates(task, n_candidates[task]) if state.state_id not in tried[task]]
        for job, ep in zip(jobs, engine.run(jobs, on_batch=on_batch)):  # job order: reproducible
            task = job.state.task
            tried[task].add(job.state.state_id)
            wins[task] += bool(ep.success)
            if ep.success and len(episodes[task]) < want:
                episodes[task].append(ep)
                states[task].append(job.state)
        for task in short:
            n_candidates[task] *= 2
    short = [t for t in tasks if len(episodes[t]) < want]
    if short:
        raise RuntimeError(f"the scripted expert failed too often on {short} to collect {want} demonstrations")
    demos = Demonstrations(episodes, states, {t: (wins[t], len(tried[t])) for t in tasks})
    if cache_path is not None:
        save_demonstrations(cache_path, demos, tasks)
    return demos


def save_demonstrations(path: Path, demos: Demonstrations, tasks: list[str]) -> None:
    arrays: dict[str, np.ndarray] = {}
    for ti, task in enumerate(tasks):
        eps = demos.episodes[task]
        for key in eps[0].obs:
            arrays[f"{ti}/obs/{key}"] = np.concatenate([e.obs[key] for e in eps])
        arrays[f"{ti}/actions"] = np.concatenate([e.actions for e in eps])
        arrays[f"{ti}/lengths"] = np.asarray([e.length for e in eps])
        arrays[f"{ti}/state_data"] = np.stack([np.asarray(s.data) for s in demos.states[task]])
        arrays[f"{ti}/state_ids"] = np.asarray([s.state_id for s in demos.states[task]])
        if task in demos.expert_record:
            arrays[f"{ti}/expert_record"] = np.asarray(demos.expert_record[task])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load_demonstrations(path: Path, tasks: list[str]) -> Demonstrations:
    data = np.load(path, allow_pickle=False)
    episodes: dict[str, list[Episode]] = {}
    states: dict[str, list[InitialState]] = {}
    record: dict[str, tuple[int, int]] = {}
    for ti, task in enumerate(tasks):
        if f"{ti}/expert_record" in data.files:
            wins, runs = (int(v) for v in data[f"{ti}/expert_record"])
            record[task] = (wins, runs)
        lengths = data[f"{ti}/lengths"]
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        prefix = f"{ti}/obs/"
        obs = {name[len(prefix):]: data[name] for name in data.files if name.startswith(prefix)}
        actions = data[f"{ti}/actions"]
        states[task] = [InitialState(task, str(i), v) for i, v in zip(data[f"{ti}/state_ids"], data[f"{ti}/state_data"])]
        episodes[task] = [
            Episode(task, s.state_id, True, int(n), {k: v[a:b] for k, v in obs.items()}, actions[a:b],
                    np.ones((int(n), 1), dtype=bool))
            for s, n, a, b in zip(states[task], lengths, bounds[:-1], bounds[1:])
        ]
    return Demonstrations(episodes, states, record if len(record) == len(tasks) else {})
