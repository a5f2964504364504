"""The Meta-World suite: tasks, scripted-expert demonstrations, RIPT contexts and evaluation states.

Three independent seeded streams of initial states per task, so that changing one count never moves the
others: demonstration candidates, extra RL contexts (no demonstration), and evaluation states (own seed,
fixed across runs). The three are checked to be disjoint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ript_ablate.config import SuiteConfig
from ript_ablate.suites import metaworld_tasks as mw
from ript_ablate.suites.rollouts import Episode, EpisodeJob, InitialState, RolloutPool

DEMO_FORMAT_VERSION = 1


@dataclass
class Demonstrations:
    """Successful expert episodes per task (states are their initial states)."""

    episodes: dict[str, list[Episode]]
    states: dict[str, list[InitialState]]

    def n_steps(self) -> int:
        return sum(ep.length for eps in self.episodes.values() for ep in eps)


class MetaWorldSuite:
    obs_dim = mw.OBS_DIM
    action_dim = mw.ACTION_DIM

    def __init__(self, cfg: SuiteConfig, episode_length_override: int | None = None):
        from ript_ablate.suites import resolve_tasks

        self.cfg = cfg
        self.tasks = resolve_tasks(cfg.tasks)
        self.episode_length_override = episode_length_override
        self._samplers: dict[str, object] = {}

    def instruction(self, task: str) -> str:
        return mw.instruction(task)

    def episode_length(self, task: str) -> int:
        return mw.episode_length(task, self.episode_length_override)

    def _states(self, task: str, kind: str, seed: int, n: int) -> list[InitialState]:
        env = self._samplers.setdefault(task, mw.make_env(task))
        vecs = mw.sample_variations(task, mw.stream_seed(seed, task, kind), n, env)
        return [InitialState(task, f"{task}/{kind}/{i}", vecs[i]) for i in range(n)]

    def demo_candidates(self, task: str, n: int) -> list[InitialState]:
        return self._states(task, "demo", self.cfg.seed, n)

    def extra_contexts(self, task: str) -> list[InitialState]:
        return self._states(task, "context", self.cfg.seed, self.cfg.contexts_per_task)

    def eval_states(self, task: str) -> list[InitialState]:
        return self._states(task, "eval", self.cfg.eval_seed, self.cfg.eval_states_per_task)

    def training_contexts(self, demos: Demonstrations, tasks: list[str] | None = None) -> list[InitialState]:
        """RIPT contexts: each task's demonstration initial states, then its extra (demo-free) states."""
        return [s for t in (tasks or self.tasks) for s in demos.states[t] + self.extra_contexts(t)]

    def check_disjoint(self, demos: Demonstrations) -> None:
        for task in self.tasks:
            seen: dict[bytes, str] = {}
            for state in demos.states[task] + self.extra_contexts(task) + self.eval_states(task):
                key = np.round(state.rand_vec, 9).tobytes()
                if key in seen:
                    raise RuntimeError(f"initial states {seen[key]} and {state.state_id} coincide")
                seen[key] = state.state_id

    # -- demonstrations --------------------------------------------------------------------------------------
    def demo_key(self) -> str:
        import metaworld

        spec = {
            "format": DEMO_FORMAT_VERSION,
            "metaworld": getattr(metaworld, "__version__", "3.1.1"),
            "tasks": self.tasks,
            "demos_per_task": self.cfg.demos_per_task,
            "seed": self.cfg.seed,
            "lengths": [self.episode_length(t) for t in self.tasks],
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def demonstrations(self, pool: RolloutPool, cache_dir: str | Path | None = None,
                       on_batch: Callable[[list[Episode]], None] | None = None) -> Demonstrations:
        """`demos_per_task` successful expert episodes per task; failed expert episodes are skipped."""
        path = Path(cache_dir) / "demos" / f"{self.demo_key()}.npz" if cache_dir else None
        if path is not None and path.is_file():
            return self._load_demos(path)
        want = self.cfg.demos_per_task
        episodes: dict[str, list[Episode]] = {t: [] for t in self.tasks}
        states: dict[str, list[InitialState]] = {t: [] for t in self.tasks}
        n_candidates = {t: want + max(2, want // 4) for t in self.tasks}
        tried: dict[str, set[str]] = {t: set() for t in self.tasks}
        for _attempt in range(6):
            short = [t for t in self.tasks if len(episodes[t]) < want]
            if not short:
                break
            jobs = [EpisodeJob(state, seed=0, mode="expert") for task in short
                    for state in self.demo_candidates(task, n_candidates[task])
                    if state.state_id not in tried[task]]
            for job, ep in zip(jobs, pool.run(jobs, on_batch=on_batch)):  # job order: reproducible
                task = job.state.task
                tried[task].add(job.state.state_id)
                if ep.success and len(episodes[task]) < want:
                    episodes[task].append(ep)
                    states[task].append(job.state)
            for task in short:
                n_candidates[task] *= 2
        short = [t for t in self.tasks if len(episodes[t]) < want]
        if short:
            raise RuntimeError(f"the scripted expert failed too often on {short} to collect {want} demos")
        demos = Demonstrations(episodes, states)
        if path is not None:
            self._save_demos(path, demos)
        return demos

    def _save_demos(self, path: Path, demos: Demonstrations) -> None:
        arrays: dict[str, np.ndarray] = {}
        for ti, task in enumerate(self.tasks):
            eps = demos.episodes[task]
            arrays[f"{ti}/obs"] = np.concatenate([e.obs for e in eps])
            arrays[f"{ti}/actions"] = np.concatenate([e.actions for e in eps])
            arrays[f"{ti}/lengths"] = np.asarray([e.length for e in eps])
            arrays[f"{ti}/rand_vecs"] = np.stack([s.rand_vec for s in demos.states[task]])
            arrays[f"{ti}/ids"] = np.asarray([int(s.state_id.rsplit("/", 1)[1]) for s in demos.states[task]])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)

    def _load_demos(self, path: Path) -> Demonstrations:
        data = np.load(path, allow_pickle=False)
        episodes: dict[str, list[Episode]] = {}
        states: dict[str, list[InitialState]] = {}
        for ti, task in enumerate(self.tasks):
            lengths = data[f"{ti}/lengths"]
            bounds = np.concatenate([[0], np.cumsum(lengths)])
            obs, act = data[f"{ti}/obs"], data[f"{ti}/actions"]
            states[task] = [InitialState(task, f"{task}/demo/{i}", v)
                            for i, v in zip(data[f"{ti}/ids"], data[f"{ti}/rand_vecs"])]
            episodes[task] = [
                Episode(task, s.state_id, True, int(n), obs[a:b], act[a:b], np.ones((int(n), 1), dtype=bool))
                for s, n, a, b in zip(states[task], lengths, bounds[:-1], bounds[1:])
            ]
        return Demonstrations(episodes, states)
