"""Evaluation on each task's fixed held-out initial states: by default each policy family's deterministic action
(the mean, the argmax token, the ODE from noise seeded per episode); with `training.eval_mode: sample` the sampled
behaviour RIPT trains, one episode a state with noise seeded by the state's id."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table

from ript_ablate.distributed import Ranks
from ript_ablate.episodes import EpisodeJob
from ript_ablate.progress import progress


@dataclass
class EvalResult:
    per_task: dict[str, float]
    episodes: int
    env_steps: int
    states: dict[str, int] = field(default_factory=dict)  # evaluation states per task: a rate's binomial noise
    # per task, each evaluation state's success in the world's state order ("0110..."): what lets a report pair
    # the base and the final policy state by state (report/analysis.py, per-state gain)
    outcomes: dict[str, str] = field(default_factory=dict)

    @property
    def success_rate(self) -> float:
        """Mean over tasks (each task weighs the same whatever its number of states)."""
        return sum(self.per_task.values()) / len(self.per_task)

    def metrics(self) -> dict[str, float]:
        out = {"eval/success_rate": self.success_rate}
        out.update({f"eval/success_rate/{t}": v for t, v in self.per_task.items()})
        out.update({f"eval/states/{t}": float(n) for t, n in self.states.items()})
        return out

    def table(self, title: str = "evaluation") -> Table:
        table = Table(title=title)
        table.add_column("task")
        table.add_column("success", justify="right")
        for task, rate in self.per_task.items():
            table.add_row(task, f"{100 * rate:.1f}%")
        table.add_row("[bold]mean over tasks", f"[bold]{100 * self.success_rate:.1f}%")
        return table


def evaluation_job(state: Any, mode: str = "mean") -> EpisodeJob:
    """An episode from `state` acting by `mode` (mean: deterministic; sample: RIPT's sampled behaviour), seeded by
    the state's own id (a flow policy's initial noise, the sampling noise), so the same whichever rank, batch or
    benchmark runs it, and the same noise at the base and after training (paired per state)."""
    return EpisodeJob(state, seed=zlib.crc32(state.state_id.encode()), mode=mode)


def evaluate(world: Any, engine: Any, tasks: list[str] | None = None, ranks: Ranks | None = None,
             states_per_task: int = 0, mode: str = "mean") -> EvalResult:
    """Success per task on `world.eval_states` (the first `states_per_task` of each; 0: all), acting with the policy
    the engine was last given (`set_policy`) by `mode` (`training.eval_mode`). In a multi-process trial each rank
    runs every size-th episode and all ranks get the whole result."""
    if mode not in ("mean", "sample"):
        raise ValueError(f"evaluation mode {mode!r}: expected mean or sample (training.eval_mode)")
    ranks = ranks or Ranks()
    tasks = tasks or world.tasks
    jobs = ranks.split([evaluation_job(s, mode) for t in tasks
                        for s in world.eval_states(t)[:states_per_task or None]])
    with progress() as bar:
        task_id = bar.add_task("evaluation", total=len(jobs), status="")
        episodes = engine.run(jobs, on_batch=lambda eps: bar.advance(task_id, len(eps))) if jobs else []
    outcomes = [o for part in ranks.gather([(e.task, e.state_id, float(e.success), int(e.length)) for e in episodes])
                for o in part]
    per_task = {t: 0.0 for t in tasks}
    counts = {t: 0 for t in tasks}
    by_state: dict[tuple[str, str], float] = {}
    for task, state_id, success, _ in outcomes:
        per_task[task] += success
        counts[task] += 1
        by_state[task, state_id] = success
    in_order = {t: "".join("1" if by_state[t, s.state_id] else "0"
                           for s in world.eval_states(t)[:states_per_task or None] if (t, s.state_id) in by_state)
                for t in tasks}
    return EvalResult({t: per_task[t] / counts[t] for t in tasks}, len(outcomes), sum(o[3] for o in outcomes),
                      counts, in_order)
