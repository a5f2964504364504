"""The report: statistics against hand-computed values, and on synthetic studies logged to a real MLflow store a
planted effect is found, a null factor is not, a planted collapse is flagged and missing cells are listed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as scipy_stats

from ript_ablate.cli import main
from ript_ablate.report import stability, stats
from ript_ablate.report.analysis import analyse
from ript_ablate.report.collect import collect
from ript_ablate.report.synthetic import log_synthetic_study
from ript_ablate.study.spec import cell_id_for, config_id_for, load_study


def test_statistics_against_hand_computed_values():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    x, y = np.array([[0.9], [0.5]]), np.array([[0.5], [0.1]])
    assert stats.probability_of_improvement(x, y) == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    assert stats.iqm(np.array([[0.0], [1.0], [2.0], [100.0]])) == pytest.approx(1.5)
    points, intervals = stats.interval_estimates({"flat": np.full((4, 2), 0.3), "one run": np.array([[0.7, 0.1]]),
                                                  "outlier": np.array([[0.0], [1.0], [2.0], [100.0]])}, stats.iqm)
    assert points["flat"] == intervals["flat"][0] == intervals["flat"][1] == pytest.approx(0.3)
    assert points["one run"] == pytest.approx(0.4) and np.isnan(intervals["one run"]).all()
    assert points["outlier"] == pytest.approx(1.5) and intervals["outlier"][1] <= 100.0
    # resampled within each task: a task column that is constant adds no width
    lo, hi = stats.interval_estimates({"x": np.array([[0.0, 0.5], [1.0, 0.5]])})[1]["x"]
    assert (lo, hi) == pytest.approx((0.25, 0.75))


def test_curve_health_against_hand_computed_values():
    assert stability.drawdown(np.array([0.2, 0.6, 0.3, 0.5])) == pytest.approx(0.3)
    assert stability.collapsed(np.array([0.2, 0.6, 0.3]), 0.15)
    assert not stability.collapsed(np.array([0.2, 0.6, 0.55]), 0.15)
    mask = stability.spike_mask(np.array([0.01, 0.012, 0.03, 0.2, 0.25, 0.011]), 5, 0.02)  # median 0.021
    assert mask.tolist() == [False, False, False, True, True, False] and stability.longest_run(mask) == 2
    assert stability.outliers(np.array([1.0, 1.1, 0.9, 1.0, 9.0]), k=5) == 1  # MAD 0.1 x 1.4826: 9 is far out
    health = stability.run_health(np.array([0.2, 0.6, 0.3]), {"sampling/contexts_tried": np.array([6.0, 6.0]),
                                                              "sampling/accepted_groups": np.array([2.0, 2.0])},
                                  stability.Thresholds())
    assert health["collapsed"] and health["tried_per_group"] == pytest.approx(3.0) and health["kl_spikes"] == 0
    effect = stats.paired_effect("x", np.array([0.1, 0.2, 0.3]))  # t interval: 0.2 +- 4.303 * 0.1 / sqrt(3)
    assert effect.estimate == pytest.approx(0.2)
    assert (effect.low, effect.high) == pytest.approx((0.2 - 0.24841, 0.2 + 0.24841), abs=1e-4)
    t = 0.2 / (0.1 / np.sqrt(3))  # df 2: the t CDF is 1/2 + t / (2 sqrt(t^2 + 2))
    assert stats.paired_t_p_value(np.array([0.1, 0.2, 0.3])) == pytest.approx(1 - t / np.sqrt(t * t + 2))


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"suite": {"tasks": ["reach-v3", "push-v3"]}}))

    def make(name: str, seeds: list[int], **kwargs):
        spec_path = tmp_path / f"{name}.yaml"
        spec_path.write_text(yaml.safe_dump({
            "name": name, "config": "base.yaml", "mode": "grid", "seeds": seeds,
            "factors": {"algo.use_laplace_sampling": [False, True], "algo.fix_scale_head": [True, False]}},
            sort_keys=False))
        spec = load_study(spec_path)
        log_synthetic_study(spec, **kwargs)
        return spec, spec_path

    return make


def planted(values: dict) -> float:
    return 0.2 if values["algo.use_laplace_sampling"] else 0.0  # fix_scale_head: no effect


@pytest.mark.parametrize("n_seeds", [3, 5])
def test_planted_effect_found_and_null_factor_not(synthetic, n_seeds):
    spec, _ = synthetic(f"planted{n_seeds}", list(range(n_seeds)), effect=planted, seed=n_seeds)
    analysis = analyse(collect(spec))
    by_label = {e.label.split(":")[0]: e for e in analysis.effects}
    laplace, fixed = by_label["use_laplace_sampling"], by_label["fix_scale_head"]
    assert laplace.excludes_zero and laplace.low > 0.1 and laplace.estimate == pytest.approx(0.2, abs=0.05)
    assert laplace.p_holm < 0.05
    assert not fixed.excludes_zero and fixed.low < 0 < fixed.high
    assert len(analysis.interactions) == 1 and not analysis.interactions[0].excludes_zero
    best = analysis.configs.iloc[0]["config"]
    assert "use_laplace_sampling=True" in best
    worse = [c for c in analysis.improvement.columns if "use_laplace_sampling=False" in c]
    assert all(analysis.improvement.loc[best, c] > 0.9 for c in worse)


def test_collapse_flagged_and_partial_study_lists_missing_cells(synthetic, tmp_path, capsys):
    bad = {"algo.use_laplace_sampling": True, "algo.fix_scale_head": False}
    collapsing = {cell_id_for(config_id_for(bad), s) for s in (0, 1, 2)}
    missing = cell_id_for(config_id_for({"algo.use_laplace_sampling": False, "algo.fix_scale_head": True}), 2)
    spec, spec_path = synthetic("collapse", [0, 1, 2], effect=planted, collapse=collapsing, skip={missing})
    assert main(["report", str(spec_path), "--reports", str(tmp_path / "reports")]) == 0
    report = (tmp_path / "reports" / "collapse" / "report.md").read_text()
    assert "Partial study: 1 cell(s) missing" in report and missing in report
    verdicts = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in report.splitlines()
                if line.startswith("| use_laplace") and ("stable" in line)}
    collapsed_config = "use_laplace_sampling=True, fix_scale_head=False"
    assert verdicts[collapsed_config].startswith("unstable") and "collapsed" in verdicts[collapsed_config]
    assert all(v.startswith("stable") for k, v in verdicts.items() if k != collapsed_config)
    for png in ("learning_curves.png", "final_success.png", "effects.png", "stability.png"):
        assert (tmp_path / "reports" / "collapse" / png).stat().st_size > 10_000
    from mlflow.tracking import MlflowClient

    data = collect(spec)
    names = {a.path for a in MlflowClient().list_artifacts(data.parent_run_id, "report")}
    assert {"report/report.md", "report/effects.png", "report/metrics.csv"} <= names
    frame = data.frame
    assert set(frame.columns) >= {"cell_id", "config", "seed", "iteration", "metric", "value"}
    assert frame["cell_id"].nunique() == 11


def test_report_of_an_unknown_study_is_a_clear_error(synthetic, tmp_path, capsys):
    path = tmp_path / "never.yaml"
    path.write_text(yaml.safe_dump({"name": "never", "config": "base.yaml", "factors": {"algo.lr": [1e-4]},
                                    "seeds": [0]}))
    assert main(["report", str(path)]) == 1
    assert "no runs of study 'never'" in capsys.readouterr().err


def test_intervals_are_honest_for_few_seeds():
    point, lo, hi, method = stats.seed_interval(np.array([[0.4], [0.6]]))
    half = 12.7062 * np.std([0.4, 0.6], ddof=1) / np.sqrt(2)  # t(0.975, df 1) = 12.706
    assert point == pytest.approx(0.5) and (lo, hi) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-3)
    assert method == "t, 2 seeds" and lo < 0.4 - 0.5  # far wider than the two numbers' range
    blo, bhi = stats.interval_estimates({"two seeds": np.array([[0.4], [0.6]])})[1]["two seeds"]
    assert (blo, bhi) == pytest.approx((0.4, 0.6))  # what the bootstrap claimed: the range of two numbers
    assert stats.seed_interval(np.array([[0.4]]))[3] == "1 seed: no interval"
    assert np.isnan(stats.seed_interval(np.array([[0.4]]))[1])
    assert stats.seed_interval(np.linspace(0.1, 0.5, 5)[:, None])[3] == "bootstrap, 5 seeds"


def test_intervals_count_the_evaluation_states_own_noise():
    """Seeds that land on the same count of the same states still leave the states' binomial noise."""
    assert stats.state_variance(np.array([0.5, 0.2]), np.array([50, 100])) == pytest.approx(
        (0.25 / 50 + 0.16 / 100) / 4)
    assert stats.state_variance(np.array([0.5, 0.2]), np.array([50, np.nan])) == 0.0  # counts unknown: none
    same = np.full((3, 1), 58 / 90)
    assert stats.seed_interval(same)[1:3] == (pytest.approx(58 / 90), pytest.approx(58 / 90))  # zero width before
    var = (58 / 90) * (32 / 90) / 90
    point, lo, hi, method = stats.seed_interval(same, state_var=var)
    half = 1.959964 * np.sqrt(var)  # the seeds do not vary: the states' noise alone, a normal interval
    assert (lo, hi) == (pytest.approx(point - half, abs=1e-6), pytest.approx(point + half, abs=1e-6))
    assert method == "t, 3 seeds + evaluation states"
    spread = np.array([[0.60], [0.64], [0.68]])  # Welch-Satterthwaite: seeds' variance of the mean plus the states'
    a = spread.var(ddof=1) / 3
    df = 2 * (a + var) ** 2 / a ** 2
    half = scipy_stats.t.ppf(0.975, df) * np.sqrt(a + var)
    _, lo, hi, _ = stats.seed_interval(spread, state_var=var)
    assert (lo, hi) == (pytest.approx(0.64 - half), pytest.approx(0.64 + half))
    assert stats.seed_interval(np.linspace(0.5, 0.7, 6)[:, None], state_var=var)[3] == (
        "bootstrap, 6 seeds + evaluation states")
    from ript_ablate.report.analysis import state_noise

    group = pd.DataFrame({"final/a": [0.6, 0.7], "base/a": [0.4, 0.4], "states/a": [50, 50],
                          "final/b": [0.2, 0.2], "base/b": [0.3, 0.3], "states/b": [100, 100]})
    assert state_noise(group, ["a", "b"]) == pytest.approx((0.65 * 0.35 / 50 + 0.2 * 0.8 / 100) / 4)
    # the gain: the base and the final share their states, so at least |d| - d^2 over n per task
    assert state_noise(group, ["a", "b"], gain=True) == pytest.approx(((0.25 - 0.0625) / 50 + (0.1 - 0.01) / 100) / 4)
    gain = stats.paired_effect("g", np.full(3, 0.1), state_var=0.05 ** 2)  # 2 standard errors: p = 0.0455
    assert gain.p_value == pytest.approx(0.0455, abs=1e-4) and gain.low == pytest.approx(0.1 - 1.959964 * 0.05)


def test_a_report_of_seeds_with_equal_counts_gives_a_configuration_an_interval(synthetic):
    spec, _ = synthetic("counted", [0, 1, 2], effect=lambda v: 0.0, noise=0.0, eval_states=50)
    configs = analyse(collect(spec)).configs
    assert (configs["final_hi"] - configs["final_lo"] > 0.1).all()  # 3 equal seeds, 50 states: about +-0.14
    assert set(configs["interval"]) == {"t, 3 seeds + evaluation states"}
    bare, _ = synthetic("uncounted", [0, 1, 2], effect=lambda v: 0.0, noise=0.0)
    assert set(analyse(collect(bare)).configs["interval"]) == {"t, 3 seeds"}  # no counts logged: seeds alone


def test_report_shows_base_final_and_gain_per_configuration(synthetic, tmp_path):
    spec, spec_path = synthetic("gains", [0, 1], effect=planted, noise=0.0)
    assert main(["report", str(spec_path), "--reports", str(tmp_path / "reports")]) == 0
    report = (tmp_path / "reports" / "gains" / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| configuration | seeds | base"))
    assert header.split("|")[3:6] == [" base ", " final ", " gain "]
    rows = {line.split("|")[1].strip(): line.split("|") for line in report.splitlines()
            if line.startswith("| use_laplace_sampling=True, fix_scale_head=True |") and "t, 2 seeds" in line}
    row = rows["use_laplace_sampling=True, fix_scale_head=True"]
    # synthetic curves start at base - 0.1 = 0.30 and end at 0.4 + 0.2 = 0.60 with no noise: gain +30.0 exactly
    assert row[3].strip() == "30.0" and row[4].strip().startswith("60.0") and row[5].strip().startswith("+30.0")
    assert "Largest gain over the base" in report and "(2 seeds" in report
    assert "prefer True (2 seeds)" in report


def test_one_kl_spike_is_not_instability_but_a_persistent_one_is(synthetic, tmp_path):
    one = {"algo.use_laplace_sampling": False, "algo.fix_scale_head": True}
    two = {"algo.use_laplace_sampling": True, "algo.fix_scale_head": True}
    spikes = {cell_id_for(config_id_for(one), 0): [7], cell_id_for(config_id_for(two), 0): [7, 8]}
    spec, _ = synthetic("kl", [0, 1, 2], effect=planted, kl_spikes=spikes)
    verdicts = analyse(collect(spec)).verdicts
    isolated = verdicts["use_laplace_sampling=False, fix_scale_head=True"]
    persistent = verdicts["use_laplace_sampling=True, fix_scale_head=True"]
    assert isolated.startswith("stable") and "1 isolated approx-KL spike(s), no drawdown: not counted" in isolated
    assert persistent.startswith("unstable") and "persistent approx-KL spikes (2 iterations in a row)" in persistent


def test_pruned_cells_are_called_pruned_not_missing(synthetic, tmp_path):
    cell = cell_id_for(config_id_for({"algo.use_laplace_sampling": False, "algo.fix_scale_head": False}), 1)
    spec, spec_path = synthetic("pruning", [0, 1], effect=planted, pruned={cell})
    data = collect(spec)
    assert [p.split(" ")[0] for p in data.pruned] == [cell] and not data.missing
    assert main(["report", str(spec_path), "--reports", str(tmp_path / "reports")]) == 0
    report = (tmp_path / "reports" / "pruning" / "report.md").read_text()
    assert "1 cell(s) **pruned**" in report and "missing" not in report


def test_success_axes_never_span_less_than_a_quarter():
    from ript_ablate.report.plots import MIN_SPAN, _zoom

    got = []
    _zoom(lambda lo, hi: got.append((lo, hi)), (0.50, 0.52))
    lo, hi = got[0]
    assert hi - lo >= MIN_SPAN and lo < 0.50 and hi > 0.52
    got.clear()
    _zoom(lambda lo, hi: got.append((lo, hi)), (0.95, 1.0))
    assert got[0][1] <= 1.02 and got[0][1] - got[0][0] >= MIN_SPAN


def test_factor_values_read_with_three_significant_digits():
    from ript_ablate.study.spec import describe

    assert describe({"algo.ppo_clip_high": 0.28316032453460394, "algo.use_laplace_sampling": True}) == \
        "ppo_clip_high=0.283, use_laplace_sampling=True"
    assert describe({"algo.header_lr": 1.2345e-05}) == "header_lr=1.23e-05"


def test_the_health_line_and_table_put_sampled_next_to_evaluated_success():
    import pandas as pd

    from ript_ablate.report.analysis import health_table
    from ript_ablate.ript.health import health_line
    from ript_ablate.ript.rollouts import rollout_metrics

    tally = {"tried": 8, "zero_variance": 6, "accepted": 2, "quota": 2, "seconds": 1.0, "group_size": 2,
             "busy_seconds": 1.0, "episodes": [("reach", True, 5), ("reach", False, 9)] * 8, "surplus": []}
    metrics = rollout_metrics([tally], ["reach"])
    assert metrics["sampling/equal_reward_fraction"] == 0.75
    line = health_line({**metrics, "eval/success_rate/reach": 0.9, "eval/success_rate": 0.9})
    assert line == "health: reach sampled 50% / evaluated 90% | equal-reward groups 75%"
    assert health_line({"eval/success_rate/reach": 0.9}) is None  # iteration 0: nothing sampled yet
    runs = pd.DataFrame([{"config": "a", "sampled/reach": 0.1, "final/reach": 0.9, "equal_reward": 0.8},
                         {"config": "a", "sampled/reach": 0.3, "final/reach": 0.7, "equal_reward": 0.6}])
    assert health_table(runs, ["reach"]) == [["a", "20 / 80", "70%"]]


def test_factor_values_read_back_from_tags_keep_their_type():
    from ript_ablate.report.collect import _parse

    assert _parse("1e-05") == 1e-05 and _parse("0.2") == 0.2 and _parse("True") is True and _parse("3") == 3
    assert _parse("laplace") == "laplace" and _parse("nan") == "nan" and _parse("infinity") == "infinity"


def test_gain_paired_per_state_against_hand_computed_values():
    from ript_ablate.report.stats import state_paired_gain

    # one task, 2 seeds x 4 states: the changes averaged over seeds are 1, 0.5, 0, -0.5 -> +0.25
    base = {"a": np.array([[0, 0, 1, 1], [0, 0, 1, 1]])}
    final = {"a": np.array([[1, 0, 1, 1], [1, 1, 1, 0]])}
    gain, lo, hi = state_paired_gain(base, final, reps=4000)
    assert gain == pytest.approx(0.25) and -0.5 <= lo < 0.25 < hi <= 1.0
    # a second task without change halves it (tasks weigh alike, as in the success rate)
    gain2, _, _ = state_paired_gain({**base, "b": np.zeros((2, 10))}, {**final, "b": np.zeros((2, 10))}, reps=100)
    assert gain2 == pytest.approx(0.125)
    # nothing changes on any state: the interval is exactly 0
    assert state_paired_gain(base, base, reps=100) == (0.0, 0.0, 0.0)
    # a planted effect on 300 states: 20% of the failures turned into successes on every seed, found
    rng = np.random.default_rng(1)
    start = (rng.random((1, 300)) < 0.4).repeat(3, 0)
    flipped = start | (rng.random((1, 300)) < 0.2).repeat(3, 0)
    gain, lo, hi = state_paired_gain({"t": start}, {"t": flipped}, reps=2000)
    assert lo > 0.05 and gain == pytest.approx((flipped[0].astype(float) - start[0]).mean())


def test_outcome_tags_are_all_or_nothing_and_read_back():
    from ript_ablate.report.collect import state_outcomes
    from ript_ablate.tracking.tags import outcome_state_tags

    tags = outcome_state_tags(5, {"reach-v3": "0110", "pick_up_the_bowl": "1"})
    assert tags == {"ript.outcomes.5.reach-v3": "0110", "ript.outcomes.5.pick_up_the_bowl": "1"}
    assert state_outcomes({**tags, "ript.seed": "0"}) == {5: {"reach-v3": "0110", "pick_up_the_bowl": "1"}}
    # a name MLflow refuses in a key, or more states than a tag holds: no task is tagged (a pairing needs them all)
    assert outcome_state_tags(5, {"reach-v3": "01", "a:b": "1"}) == {}
    assert outcome_state_tags(5, {"reach-v3": "0" * 5001}) == {}
