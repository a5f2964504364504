"""Where a behaviour-cloned base fails: on its own demonstrations' initial states (it did not fit them), on new
placements drawn as those were (it fits but does not generalise), or only on the evaluation states (the training
placements and the evaluation states differ). The three successes side by side, per task, acting with the mean
action as an evaluation does.

    python -m ript_ablate.bench.base_fit CONFIG [--states 10] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

from ript_ablate.bc import get_base
from ript_ablate.bench import run_main
from ript_ablate.engine import RolloutEngine
from ript_ablate.episodes import InitialState
from ript_ablate.evaluation import evaluation_job
from ript_ablate.plugins import build_world
from ript_ablate.plugins import load_checked_config as load_config
from ript_ablate.progress import progress

STATE_SETS = ("demonstrations", "new placements", "evaluation")


@dataclass
class FitRow:
    """One task's successes (0-1) on each of `STATE_SETS` and how many states each had."""

    task: str
    success: dict[str, float]
    counts: dict[str, int]


def state_sets(world: Any, demos: Any, task: str, n: int) -> dict[str, list[InitialState]]:
    """The first `n` of each set for `task`. New placements are the task's training contexts that are not its
    demonstrations' own initial states (the world draws them as it drew those)."""
    own = list(demos.states.get(task, []))
    own_ids = {s.state_id for s in own}
    new = [s for s in world.training_contexts(task, demos) if s.state_id not in own_ids]
    return {"demonstrations": own[:n], "new placements": new[:n], "evaluation": world.eval_states(task)[:n]}


def fit_rows(world: Any, engine: Any, demos: Any, n: int) -> list[FitRow]:
    """Each task's mean-action success on its `n` first states of each set (engine: the base set as its policy)."""
    sets = {task: state_sets(world, demos, task, n) for task in world.tasks}
    jobs, keys = [], []
    for task, by_set in sets.items():
        for name, states in by_set.items():
            for state in states:
                jobs.append(evaluation_job(state))
                keys.append((task, name))
    with progress() as bar:
        bar_id = bar.add_task("base fit", total=len(jobs), status="")
        episodes = engine.run(jobs, on_batch=lambda eps: bar.advance(bar_id, len(eps)))
    wins: dict[tuple[str, str], float] = {}
    for key, episode in zip(keys, episodes):
        wins[key] = wins.get(key, 0.0) + float(episode.success)
    rows = []
    for task, by_set in sets.items():
        counts = {name: len(by_set[name]) for name in STATE_SETS}
        rows.append(FitRow(task, {name: wins.get((task, name), 0.0) / counts[name] if counts[name] else float("nan")
                                  for name in STATE_SETS}, counts))
    return rows


def overall(rows: list[FitRow], name: str) -> float:
    states = sum(r.counts[name] for r in rows)
    return sum(r.success[name] * r.counts[name] for r in rows) / states if states else float("nan")


def format_table(rows: list[FitRow]) -> str:
    lines = ["| task | " + " | ".join(STATE_SETS) + " |", "|---|" + "---|" * len(STATE_SETS)]
    for row in rows:
        cells = [f"{100 * row.success[n]:.0f}% of {row.counts[n]}" for n in STATE_SETS]
        lines.append(f"| {row.task} | " + " | ".join(cells) + " |")
    lines.append("| overall | " + " | ".join(f"{100 * overall(rows, n):.1f}%" for n in STATE_SETS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--states", type=int, default=10, help="states per task from each set")
    parser.add_argument("--set", action="append", default=[], help="a config override, key=value")
    args = parser.parse_args()
    if args.states < 1:
        parser.error(f"--states must be at least 1, got {args.states}")
    cfg = load_config(args.config, args.set)
    world = build_world(cfg)
    start = time.perf_counter()
    with RolloutEngine(cfg, world) as engine:
        policy, _, info = get_base(cfg, world, engine)
        base_seconds = time.perf_counter() - start
        demos = world.demonstrations(engine, cfg.sft.cache_dir)
        engine.set_policy(policy)
        t0 = time.perf_counter()
        rows = fit_rows(world, engine, demos, args.states)
    print(format_table(rows))
    print(f"base {base_seconds:.0f}s (cache hit {info.get('cache_hit')}), episodes {time.perf_counter() - t0:.0f}s",
          flush=True)


if __name__ == "__main__":
    run_main(main)
