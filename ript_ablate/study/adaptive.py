"""Adaptive seeds in a grid study: which factor comparisons are decided, replayed look by look from the cells'
objective values (so the runner, a second `study run` and the report all reach the same verdicts from the same
numbers, with no state of their own to keep in step).

A comparison is one level of a factor against the factor's first level, paired on seed and every other factor.
Looks happen at seeds initial, initial + 1, ...; a comparison stops at its first look that is not "continue"
(deciding later would spend error rate the boundaries did not budget for). While any comparison continues and
seeds < max, every configuration gets the next seed: in a full grid every configuration is in every factor's
pairs. A screening design's effects are decided by its regression instead (`design_looks`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
        for config in spec.effect_configs():
            if config[key] != base:
                continue
            a = values.get(cell_id_for(config_id_for(config), seed))
            b = values.get(cell_id_for(config_id_for({**config, key: level}), seed))
            if a is not None and b is not None:
                out.append(POINTS * (b - a))
    return np.asarray(out, float)


def design_label(spec: StudySpec, term: tuple[int, ...]) -> str:
    """As the report names a design's effect: 'ppo_clip_high: 0.2 -> 0.28', 'lr x header_lr'."""
    keys = list(spec.design.keys)
    names = [k.split(".", 1)[-1] for k in keys]
    if len(term) > 1:
        return " x ".join(names[i] for i in term)
    key = keys[term[0]]
    return f"{names[term[0]]}: {spec.factors[key][0]} -> {spec.factors[key][1]}"


def design_looks(spec: StudySpec, values: dict[str, float], seeds_run: int) -> dict[str, Decision]:
    """Each effect of a screening design at its first look that decided (else the last so far): the design's
    regression with seeds as blocks (`fit_effects`), against boundaries on max |t| over all its effects
    (`design_t_boundaries`), so the familywise error over every effect and look stays at alpha."""
    from ript_ablate.study.design import effect_terms, fit_effects
    from ript_ablate.study.sequential import decide_interval, design_t_boundaries

    plan = spec.seed_plan
    design = spec.design
    terms = effect_terms(design)
    rows = design.rows(spec.factors)
    columns = tuple(tuple(int(v) for v in np.prod(design.matrix[:, list(t)], axis=1)) for t in terms)
    bounds = design_t_boundaries(plan.initial, plan.max, columns, plan.alpha)
    out: dict[str, Decision] = {}
    for seeds in range(plan.initial, min(seeds_run, plan.max) + 1):
        cells = [(row, coded, seed) for seed in range(seeds) for row, coded in zip(rows, design.matrix)
                 if cell_id_for(config_id_for(row), seed) in values]
        y = np.array([POINTS * values[cell_id_for(config_id_for(row), seed)] for row, _, seed in cells])
        coded = np.array([c for _, c, _ in cells], float).reshape(len(cells), len(design.keys))
        effects, errors, dof = fit_effects(coded, np.array([s for _, _, s in cells]), y, terms)
        if dof < 1:  # failed cells left too few runs to estimate every effect: no look yet
            continue
        for term, effect, se in zip(terms, effects, errors):
            name = design_label(spec, term)
            if name in out and out[name].state != "continue":
                continue  # stopped at an earlier look
            out[name] = decide_interval(float(effect), float(se), bounds[seeds - plan.initial], seeds, len(y), plan)
    return out


def looks(spec: StudySpec, values: dict[str, float], seeds_run: int) -> dict[str, Decision]:
    """Each comparison's decision: at its first look that decided, else at the last look so far."""
    plan = spec.seed_plan
    assert plan is not None, "looks() is for adaptive-seed studies"
    if spec.design is not None:
        return design_looks(spec, values, seeds_run)
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


@dataclass
class RaceState:
    """Where a race stands after its looks so far."""

    leader: str
    alive: list[str]  # still raced (the leader included)
    dropped: dict[str, Decision] = field(default_factory=dict)  # shown worse than the leader, at their look
    last: dict[str, Decision] = field(default_factory=dict)  # each other alive configuration against the leader
    seeds: int = 0

    @property
    def racing(self) -> list[str]:
        """The configurations that need the next seed: the leader and every one still undecided against it."""
        undecided = [c for c in self.alive if c != self.leader and self.last.get(c) is not None
                     and self.last[c].state == "continue"]
        return [self.leader, *undecided] if undecided else []


def race_entrants(spec: StudySpec, scores: dict[str, dict[int, float]]) -> list[str]:
    """The `race.top` configurations with every search seed done, best first by the objective's aggregation."""
    from ript_ablate.study.objective import aggregate

    assert spec.race is not None
    done = {c: [s[seed] for seed in spec.seeds] for c, s in scores.items() if all(seed in s for seed in spec.seeds)}
    sign = 1.0 if spec.objective.direction == "maximize" else -1.0
    ranked = sorted(done, key=lambda c: (-sign * aggregate(done[c], spec.objective.aggregation), c))
    return ranked[: spec.race.top]


def race(spec: StudySpec, scores: dict[str, dict[int, float]], entrants: list[str], seeds_run: int) -> RaceState:
    """Replay the race's looks (after initial..seeds_run seeds): at each, the leader is the best mean so far; every
    other configuration is tested against it, paired on seed (in points, positive = better than the leader), and
    dropped once shown worse; one shown within min_effect of the leader needs no more seeds."""
    assert spec.race is not None
    plan = spec.race.plan
    sign = 1.0 if spec.objective.direction == "maximize" else -1.0
    all_seeds = spec.race_seeds(plan.max)
    state = RaceState(entrants[0], list(entrants))
    for k in range(plan.initial, min(seeds_run, plan.max) + 1):
        used = all_seeds[:k]

        def mean(c: str, used: list[int] = used) -> float:
            return float(np.mean([scores[c][s] for s in used if s in scores.get(c, {})] or [float("-inf")]))

        state.leader = max(state.alive, key=lambda c: (sign * mean(c), c))
        for c in state.alive:
            if c == state.leader or (c in state.last and state.last[c].state != "continue"):
                continue
            diffs = [POINTS * sign * (scores[c][s] - scores[state.leader][s]) for s in used
                     if s in scores.get(c, {}) and s in scores.get(state.leader, {})]
            decision = decide(np.asarray(diffs, float), k, plan)
            state.last[c] = decision
            if decision.state == "effect" and decision.estimate < 0:
                state.dropped[c] = decision
        state.alive = [c for c in state.alive if c not in state.dropped]
        state.seeds = k
    return state
