"""Adaptive seeds: the group-sequential decision rule and its operating characteristics, by simulation (no
training: the statistics and the allocation alone)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from ript_ablate.study.sequential import (
    SeedPlan,
    decide,
    minimum_detectable_effect,
    obrien_fleming_spending,
    seeds_needed,
    simulate,
    t_boundaries,
)

PLAN = SeedPlan(initial=3, max=10, min_effect=5.0)
SD, PAIRS = 8.0, 4  # a 2x2x2 grid: each seed adds 4 pairs per factor; paired SD of 8 points
REPS = 20000


def test_spending_and_power_against_hand_computed_values():
    assert obrien_fleming_spending(1.0, 0.05) == pytest.approx(0.05)
    assert obrien_fleming_spending(0.3, 0.05) == pytest.approx(2 - 2 * stats.norm.cdf(1.959964 / np.sqrt(0.3)))
    assert obrien_fleming_spending(0.0, 0.05) == 0.0
    bounds = t_boundaries(3, 10, 4)
    assert len(bounds) == 8 and all(a > b for a, b in zip(bounds, bounds[1:]))  # strict early, near 1.96 late
    assert bounds[-1] == pytest.approx(2.2, abs=0.1) and bounds[0] > 4
    t = stats.t.ppf(0.975, 11) + stats.t.ppf(0.8, 11)  # 12 pairs, SD 6
    assert minimum_detectable_effect(6.0, 12) == pytest.approx(t * 6 / np.sqrt(12))
    need = seeds_needed(5.0, SD, PAIRS)
    assert minimum_detectable_effect(SD, need * PAIRS) <= 5.0 < minimum_detectable_effect(SD, (need - 1) * PAIRS)


def test_a_look_decides_effect_no_effect_or_asks_for_a_seed():
    rng = np.random.default_rng(0)
    clear = decide(rng.normal(20, 2, 12), 3, PLAN)
    assert clear.state == "effect" and clear.low > 0
    assert clear.sentence("True", 5) == "decided: prefer True (at 3 seeds)"
    tight_null = decide(rng.normal(0, 1, 40), 10, PLAN)
    assert tight_null.state == "no_effect" and -5 < tight_null.low < tight_null.high < 5
    assert tight_null.sentence("x", 5) == "no effect of 5 points or more (at 10 seeds)"
    assert decide(rng.normal(0, 20, 12), 3, PLAN).state == "continue"
    limit = decide(rng.normal(3, 20, 40), 10, PLAN)
    assert limit.state == "undecided" and "undecided at the 10-seed limit" in limit.sentence("a", 5)


def test_the_vectorised_simulation_is_the_look_by_look_rule():
    """simulate() must count exactly what decide() decides, look after look, study by study."""
    for effect in (0.0, 5.0):
        op = simulate(effect, PLAN, SD, PAIRS, reps=300, seed=11)
        diffs = np.random.default_rng(11).normal(effect, SD, (300, PLAN.max * PAIRS))
        seeds_used, decided = [], 0
        for row in diffs:
            for seeds in range(PLAN.initial, PLAN.max + 1):
                d = decide(row[: seeds * PAIRS], seeds, PLAN)
                if d.state != "continue":
                    break
            seeds_used.append(seeds if d.state in ("effect", "no_effect") else PLAN.max)
            decided += d.state == "effect"
        assert op.decided_effect == pytest.approx(decided / 300) and op.mean_seeds == pytest.approx(np.mean(seeds_used))


def test_error_rates_of_adaptive_seeds_by_simulation():
    """No effect: the adaptive procedure declares one at most 5% of the time, while a naive t-test at every look
    does so far more often. An effect of min_effect: decided right at least 80% of the time, on fewer cells on
    average than running max seeds everywhere."""
    null = simulate(0.0, PLAN, SD, PAIRS, REPS, seed=1)
    naive = simulate(0.0, PLAN, SD, PAIRS, REPS, seed=1, rule="naive")
    assert null.decided_effect <= 0.05
    assert naive.decided_effect > 0.08  # the uncorrected repeated look: 12% measured
    real = simulate(PLAN.min_effect, PLAN, SD, PAIRS, REPS, seed=2)
    fixed = simulate(PLAN.min_effect, PLAN, SD, PAIRS, REPS, seed=2, rule="fixed")
    assert real.decided_right >= 0.8 and fixed.decided_right >= 0.8
    assert real.mean_seeds < fixed.mean_seeds == PLAN.max
    assert null.mean_seeds < PLAN.max  # a null factor is mostly settled as "no effect of 5 points" early too


def test_adaptive_seed_specs_are_checked(tmp_path):
    import yaml

    from ript_ablate.errors import ConfigError
    from ript_ablate.study.spec import load_study

    (tmp_path / "c.yaml").write_text("training: {n_iterations: 2}\n")
    spec = {"name": "a", "config": "c.yaml", "factors": {"algo.ppo_clip_high": [0.2, 0.3]},
            "seeds": {"initial": 1, "max": 2, "min_effect": -5, "extra": 1}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    problems = "\n".join(pytest.raises(ConfigError, load_study, tmp_path / "s.yaml").value.problems)
    assert "seeds.initial" in problems and "seeds.min_effect" in problems and "extra" in problems
    spec["seeds"] = {"initial": 3, "max": 6, "min_effect": 5}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    loaded = load_study(tmp_path / "s.yaml")
    assert loaded.seeds == [0, 1, 2] and loaded.seed_plan == SeedPlan(3, 6, 5.0)


def test_race_drops_a_clearly_worse_configuration_and_settles_a_tie(tmp_path):
    """Planted scores: B is 60 points below the leader A (dropped at the first look), C within a point of A (no
    effect of 5 points or more): nothing left to race, so no seed is added."""
    import yaml

    from ript_ablate.study.adaptive import race, race_entrants
    from ript_ablate.study.spec import load_study

    (tmp_path / "c.yaml").write_text("algo: {lr: 0.1}\ntraining: {seed: 0}\n")
    spec = {"name": "r", "config": "c.yaml", "mode": "optuna", "n_configs": 3, "seeds": [0, 1, 2],
            "search_space": {"algo.lr": {"type": "float", "low": 0.01, "high": 1.0}},
            "command": {"run": "{python} x.py {config}", "seed_key": "training.seed"},
            "race": {"top": 3, "max_seeds": 6, "min_effect": 5}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    study = load_study(tmp_path / "s.yaml")
    noise = np.random.default_rng(0).normal(0, 0.001, (3, 3))
    scores = {name: {seed: level + noise[i, seed] for seed in range(3)}
              for i, (name, level) in enumerate((("A", 0.8), ("B", 0.2), ("C", 0.79)))}
    assert race_entrants(study, scores) == ["A", "C", "B"]
    state = race(study, scores, ["A", "C", "B"], 3)
    assert state.leader == "A" and "B" in state.dropped and state.dropped["B"].seeds == 3
    assert state.last["C"].state == "no_effect" and state.racing == []
    assert study.race_seeds(5) == [0, 1, 2, 3, 4]
    spec.update(mode="grid", factors={"algo.lr": [0.1, 0.2]})
    del spec["search_space"], spec["n_configs"]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(Exception, match="grids take adaptive seeds"):
        load_study(tmp_path / "s.yaml")
