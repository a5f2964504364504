"""Adaptive seeds in a grid study: which factor comparisons are decided, replayed look by look from the cells'
objective values (so the runner, a second `study run` and the report all reach the same verdicts from the same
numbers, with no state of their own to keep in step).

A comparison is one level of a factor against the factor's first level, paired on seed and every other factor.
Looks happen at seeds initial, initial + 1, ...; a comparison stops at its first look that is not "continue"
(deciding later would spend error rate the boundaries did not budget for). While any comparison continues and
seeds < max, every configuration gets the next seed: in a full grid every configuration is in every factor's
pairs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ript_ablate.study.sequential import Decision, decide
from ript_ablate.study.spec import StudySpec, cell_id_for, config_id_for

POINTS = 100.0  # min_effect and the verdicts are in points: 100 x the objective (a success rate in %)


def comparisons(spec: StudySpec) -> list[tuple[str, Any, Any]]:
    """(factor key, baseline level, level) for every level after the first."""
    return [(key, levels[0], level) for key, levels in spec.factors.items() for level in levels[1:]]


def label(key: str, base: Any, level: Any) -> str:
    """As the report names a main effect: 'ppo_clip_high: 0.2 -> 0.4'."""
    return f"{key.split('.', 1)[-1]}: {base} -> {level}"


def paired_diffs(spec: StudySpec, values: dict[str, float], key: str, base: Any, level: Any,
                 seeds: int) -> np.ndarray:
    """(level minus baseline) in points, for every seed below `seeds` and setting of the other factors where both
    cells have a value."""
    out = []
    for seed in range(seeds):
        for config in spec.grid_configs():
            if config[key] != base:
                continue
            a = values.get(cell_id_for(config_id_for(config), seed))
            b = values.get(cell_id_for(config_id_for({**config, key: level}), seed))
            if a is not None and b is not None:
                out.append(POINTS * (b - a))
    return np.asarray(out, float)


def looks(spec: StudySpec, values: dict[str, float], seeds_run: int) -> dict[str, Decision]:
    """Each comparison's decision: at its first look that decided, else at the last look so far."""
    plan = spec.seed_plan
    assert plan is not None, "looks() is for adaptive-seed studies"
    out = {}
    for key, base, level in comparisons(spec):
        decision = None
        for seeds in range(plan.initial, min(seeds_run, plan.max) + 1):
            decision = decide(paired_diffs(spec, values, key, base, level, seeds), seeds, plan)
            if decision.state != "continue":
                break
        if decision is not None:
            out[label(key, base, level)] = decision
    return out


def needs_another_seed(spec: StudySpec, values: dict[str, float], seeds_run: int) -> bool:
    plan = spec.seed_plan
    if plan is None or seeds_run >= plan.max:
        return False
    return any(d.state == "continue" for d in looks(spec, values, seeds_run).values())
