"""Screening designs: the generated 2^(5-1) design is the textbook one (E = ABCD, balanced and orthogonal columns,
resolution V, nothing aliased up to two-factor interactions); the report's regression finds planted main effects and
a planted interaction with the right signs, and with nothing planted decides nothing falsely more than 5% of the
time over all effects of the design (Holm)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from ript_ablate.errors import ConfigError
from ript_ablate.report.analysis import design_effects
from ript_ablate.study.design import build_design, defining_words
from ript_ablate.study.spec import load_study

SWITCHES = {"algo.use_laplace_sampling": [True, False], "algo.fix_scale_head": [True, False],
            "algo.ppo_clip_high": [0.2, 0.28], "algo.header_lr": [1.0e-4, 1.0e-5],
            "algo.rloo_over_all_rollouts": [False, True]}


def test_the_half_fraction_is_the_textbook_resolution_v_design():
    design = build_design(list(SWITCHES), "fractional", resolution=5)
    m = design.matrix
    assert m.shape == (16, 5) and design.generators == "a b c d abcd"
    assert (m[:, 4] == m[:, 0] * m[:, 1] * m[:, 2] * m[:, 3]).all()  # E = ABCD
    assert (m.sum(axis=0) == 0).all()  # every column balanced
    assert (m.T @ m == 16 * np.eye(5)).all()  # and orthogonal
    pairs = np.column_stack([m[:, i] * m[:, j] for i in range(5) for j in range(i + 1, 5)])
    assert (np.column_stack([m, pairs]).T @ np.column_stack([m, pairs]) == 16 * np.eye(15)).all()
    assert len({tuple(r) for r in m}) == 16 and design.resolution == 5 and defining_words("a b c d abcd") == ["abcde"]
    assert design.aliases(2) == []  # no main effect or two-factor interaction aliased with another
    third = build_design(list("abcde"), "fractional", resolution=3)
    assert third.runs == 8 and "a = b x d = c x e" in third.aliases(2)


def spec_with(tmp_path, tiny_yaml, **fields):
    spec = {"name": "screen", "config": str(tiny_yaml), "factors": SWITCHES, "seeds": [0, 1, 2],
            "design": {"type": "fractional", "resolution": 5}, "output_dir": str(tmp_path), **fields}
    path = tmp_path / "screen.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return load_study(path)


def test_a_fractional_spec_runs_its_16_configurations_and_refuses_what_it_cannot_do(tmp_path, tiny_yaml):
    spec = spec_with(tmp_path, tiny_yaml)
    configs = spec.grid_configs()
    assert len(configs) == 16 and len({tuple(sorted(c.items())) for c in configs}) == 16
    with pytest.raises(ConfigError, match="two levels for every factor"):
        spec_with(tmp_path, tiny_yaml, factors={**SWITCHES, "algo.ppo_clip_high": [0.2, 0.28, 0.4]})
    with pytest.raises(ConfigError, match=r"design.generators.*letters a..e"):
        spec_with(tmp_path, tiny_yaml, design={"type": "fractional", "generators": "a b c d abcz"})
    with pytest.raises(ConfigError, match="design.resolution"):
        spec_with(tmp_path, tiny_yaml, design={"type": "fractional", "resolution": 6})


def synthetic(spec, rng, planted: dict, noise: float = 0.03) -> pd.DataFrame:
    """Final success of every cell: 0.5 + half of each planted effect times its coded level(s) + seed and noise."""
    keys = list(spec.factors)
    rows = []
    for values in spec.grid_configs():
        x = {k: 1.0 if values[k] == spec.factors[k][1] else -1.0 for k in keys}
        for seed in spec.seeds:
            y = 0.5 + 0.02 * seed + rng.normal(0, noise)
            for term, effect in planted.items():
                y += effect / 2 * np.prod([x[k] for k in term])
            rows.append({"seed": seed, "final": y, **{f"factor.{k}": values[k] for k in keys}})
    return pd.DataFrame(rows)


def decided(effects) -> list:
    return [e for e in effects if e.p_holm < 0.05 and e.excludes_zero]


def test_planted_main_effects_and_an_interaction_are_found_with_their_signs(tmp_path, tiny_yaml):
    spec = spec_with(tmp_path, tiny_yaml)
    planted = {("algo.ppo_clip_high",): 0.10, ("algo.use_laplace_sampling",): -0.08,
               ("algo.fix_scale_head", "algo.header_lr"): 0.09}
    runs = synthetic(spec, np.random.default_rng(1), planted)
    mains, pairs = design_effects(runs, SimpleNamespace(spec=spec))
    assert len(mains) == 5 and len(pairs) == 10
    found = {e.label: e for e in decided([*mains, *pairs])}
    assert set(found) == {"ppo_clip_high: 0.2 -> 0.28", "use_laplace_sampling: True -> False",
                          "fix_scale_head x header_lr"}
    assert found["ppo_clip_high: 0.2 -> 0.28"].estimate == pytest.approx(0.10, abs=0.03)
    assert found["use_laplace_sampling: True -> False"].estimate == pytest.approx(-0.08, abs=0.03)
    assert found["fix_scale_head x header_lr"].estimate == pytest.approx(0.09, abs=0.03)


def test_a_design_missing_a_configuration_decides_nothing(tmp_path, tiny_yaml):
    """A resolution V half-fraction is saturated: without one configuration its terms cannot be told apart, and a
    least-squares fit would return one of many solutions with tiny errors (a partial study once reported -25-point
    "effects" from finals that all lay within 37-49%)."""
    from ript_ablate.report.analysis import design_summary

    spec = spec_with(tmp_path, tiny_yaml)
    planted = {("algo.ppo_clip_high",): 0.10}
    runs = synthetic(spec, np.random.default_rng(2), planted)
    first = runs.iloc[0]
    keys = [c for c in runs.columns if c.startswith("factor.")]
    partial = runs[~(runs[keys] == first[keys]).all(axis=1)]
    assert len(partial) == len(runs) - 3
    mains, pairs = design_effects(partial, SimpleNamespace(spec=spec))
    assert all(np.isnan(e.estimate) and e.p_holm == 1.0 for e in [*mains, *pairs]) and not decided([*mains, *pairs])
    assert design_summary(mains, pairs)[0].startswith("Not estimable yet")
    one_seed = pd.concat([partial, runs.iloc[[0]]])  # one seed of it is enough
    assert decided(design_effects(one_seed, SimpleNamespace(spec=spec))[0])


def test_with_nothing_planted_the_familywise_false_decision_rate_is_at_most_5_percent(tmp_path, tiny_yaml):
    spec = spec_with(tmp_path, tiny_yaml)
    rng = np.random.default_rng(7)
    studies = 300
    false = sum(bool(decided([*m, *p])) for m, p in
                (design_effects(synthetic(spec, rng, {}), SimpleNamespace(spec=spec)) for _ in range(studies)))
    assert false / studies <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / studies), false


def test_a_fractional_study_is_reported_with_its_design_effects_and_interactions(tmp_path, tiny_yaml, monkeypatch):
    from ript_ablate.cli import main
    from ript_ablate.report.synthetic import log_synthetic_study

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    spec = spec_with(tmp_path, tiny_yaml, seeds=[0, 1])

    def effect(values: dict) -> float:  # clip-high helps, and only with the scale head fixed
        return 0.1 * (values["algo.ppo_clip_high"] == 0.28) * (1 if values["algo.fix_scale_head"] else -1)

    log_synthetic_study(spec, effect, noise=0.02, n_iterations=2, eval_interval=2)
    assert main(["report", str(spec.path), "--reports", str(tmp_path / "reports"), "--no-upload"]) == 0
    report = (tmp_path / "reports" / "screen" / "report.md").read_text()
    assert "fractional 2^(5-1) design, resolution V" in report and "nothing up to two-factor interactions" in report
    assert "fix_scale_head x ppo_clip_high" in report
    # the plain-language summary: fixed -> trained scale head costs 20 points with clip-high and nothing without
    summary = re.search(r"fix_scale_head \(True -> False\) changes final success by ([-+.\d]+) points at the high "
                        r"level of ppo_clip_high and by ([-+.\d]+) at its low level", report)
    assert summary and float(summary.group(1)) == pytest.approx(-20, abs=3) and abs(float(summary.group(2))) < 3
    assert (tmp_path / "reports" / "screen" / "interactions.png").is_file()


def adaptive_values(spec, planted: dict, seeds: int, rng, noise: float = 0.03) -> dict[str, float]:
    """Objective values of every design cell up to `seeds` seeds, keyed by cell id as the study storage has them."""
    from ript_ablate.study.spec import cell_id_for, config_id_for

    runs = synthetic(SimpleNamespace(factors=spec.factors, grid_configs=spec.grid_configs, seeds=range(seeds)), rng,
                     planted, noise)
    keys = list(spec.factors)
    return {cell_id_for(config_id_for({k: r[f"factor.{k}"] for k in keys}), int(r["seed"])): float(r["final"])
            for _, r in runs.iterrows()}


def test_an_adaptive_fractional_study_adds_seeds_only_while_an_effect_is_undecided(tmp_path, tiny_yaml):
    from ript_ablate.study.adaptive import looks, needs_another_seed

    spec = spec_with(tmp_path, tiny_yaml, seeds={"initial": 3, "max": 6, "min_effect": 5})
    assert len(spec.grid_configs()) == 16 and spec.seeds == [0, 1, 2]
    rng = np.random.default_rng(3)
    # large planted effects, the rest exactly null with little noise: every effect is decided at 3 seeds
    clear = adaptive_values(spec, {("algo.ppo_clip_high",): 0.20, ("algo.fix_scale_head", "algo.header_lr"): -0.15},
                            3, rng, noise=0.005)
    decisions = looks(spec, clear, 3)
    assert len(decisions) == 15 and not needs_another_seed(spec, clear, 3)
    assert decisions["ppo_clip_high: 0.2 -> 0.28"].state == "effect"
    assert decisions["fix_scale_head x header_lr"].state == "effect" and decisions[
        "fix_scale_head x header_lr"].estimate == pytest.approx(-15, abs=1.5)
    assert {d.state for k, d in decisions.items() if k not in ("ppo_clip_high: 0.2 -> 0.28",
                                                                 "fix_scale_head x header_lr")} == {"no_effect"}
    # a noisy study with a 6-point effect: undecided at 3 seeds, so the next seed comes; never past max
    noisy = adaptive_values(spec, {("algo.ppo_clip_high",): 0.06}, 6, np.random.default_rng(4), noise=0.08)
    assert needs_another_seed(spec, noisy, 3)
    assert any(d.state == "continue" for d in looks(spec, noisy, 3).values())
    assert not needs_another_seed(spec, noisy, 6)
    assert {d.state for d in looks(spec, noisy, 6).values()} <= {"effect", "no_effect", "undecided"}
    with pytest.raises(ConfigError, match="seeds.initial"):
        spec_with(tmp_path, tiny_yaml, seeds={"initial": 1, "max": 4, "min_effect": 5})


def test_adaptive_design_boundaries_keep_the_familywise_error_over_effects_and_looks():
    """Null designs, analysed look by look with the boundaries on max |t|: any false decision at most 5% of the
    time (over 400 simulated studies: within two standard errors of 5%)."""
    from ript_ablate.study.design import effect_terms, fit_effects
    from ript_ablate.study.sequential import SeedPlan, design_t_boundaries

    design = build_design(list(SWITCHES), "fractional", resolution=5)
    terms = effect_terms(design)
    columns = tuple(tuple(int(v) for v in np.prod(design.matrix[:, list(t)], axis=1)) for t in terms)
    plan = SeedPlan(initial=3, max=6, min_effect=5.0)
    bounds = design_t_boundaries(plan.initial, plan.max, columns)
    assert all(a > b for a, b in zip(bounds, bounds[1:]))  # O'Brien-Fleming: strict early, near fixed at the end
    rng = np.random.default_rng(11)
    false, studies = 0, 400
    for _ in range(studies):
        y = rng.normal(0, 5.0, (plan.max, 16))
        for seeds in range(plan.initial, plan.max + 1):
            coded = np.tile(design.matrix, (seeds, 1)).astype(float)
            effects, se, _ = fit_effects(coded, np.repeat(np.arange(seeds), 16), y[:seeds].ravel(), terms)
            if (np.abs(effects) / se >= bounds[seeds - plan.initial]).any():
                false += 1
                break
    assert false / studies <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / studies), false


def test_a_control_runs_beside_the_design_is_compared_and_stays_out_of_every_effect(tmp_path, tiny_yaml,
                                                                                      monkeypatch):
    from ript_ablate.report.analysis import analyse
    from ript_ablate.report.collect import collect
    from ript_ablate.report.synthetic import log_synthetic_study

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    spec = spec_with(tmp_path, tiny_yaml, seeds=[0, 1], controls={"no_learning": {"algo.lr": 0.0,
                                                                                  "algo.header_lr": 0.0}})
    configs = spec.grid_configs()
    assert len(configs) == 17 and configs[-1]["control"] == "no_learning"
    settings = spec.expand(configs[-1])
    assert settings["algo.lr"] == 0.0 and settings["algo.header_lr"] == 0.0  # on top of the factors' first levels
    assert settings["algo.ppo_clip_high"] == 0.2 and "control" not in settings
    assert spec.cell_config(configs[-1], 0).algo.header_lr == 0.0

    def effect(values: dict) -> float:  # clip-high helps by 10; the control scores far below everything
        return -0.35 if values.get("control") else 0.1 * (values["algo.ppo_clip_high"] == 0.28)

    log_synthetic_study(spec, effect, noise=0.01, n_iterations=2, eval_interval=2)
    analysis = analyse(collect(spec))
    assert len(analysis.runs) == 34 and len(analysis.configs) == 17
    assert any("no_learning" in c for c in analysis.configs["config"])
    effects = {e.label: e for e in [*analysis.effects, *analysis.interactions]}
    assert effects["ppo_clip_high: 0.2 -> 0.28"].estimate == pytest.approx(0.10, abs=0.02)
    assert all(abs(e.estimate) < 0.03 for k, e in effects.items() if k != "ppo_clip_high: 0.2 -> 0.28")
    with pytest.raises(ConfigError, match="controls.bad.algo.lrr: not a config key"):
        spec_with(tmp_path, tiny_yaml, controls={"bad": {"algo.lrr": 0.0}})
