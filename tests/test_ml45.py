"""The ML45 protocol's benchmark: its gain interval against hand-computed cases, and one tiny end-to-end run."""

from __future__ import annotations

import numpy as np
import yaml

from ript_ablate.bench import ml45


def test_gain_interval_is_exact_without_sampling_error_and_finds_a_planted_gain():
    before, after = np.zeros((3, 5)), np.ones((3, 5))
    assert ml45.gain_interval(before, after, n_states=50) == (100.0, 100.0)
    assert ml45.failures_removed(63.6, 76.0) == "34%" and ml45.failures_removed(80.0, 90.0) == "50%"  # rates 0 and 1 cannot vary
    before, after = np.full((3, 5), 0.5), np.full((3, 5), 0.7)
    low, high = ml45.gain_interval(before, after, n_states=50)
    # 5 tasks x 3 seeds x 50 states: sd of the mean gain = 100 * sqrt(2 * 0.25/50 ... ) ~ 2.3 points
    assert 14 < low < 17 and 23 < high < 26
    seeds_apart = np.array([[0.5] * 5, [0.5] * 5, [0.5] * 5]), np.array([[0.5] * 5, [0.9] * 5, [0.5] * 5])
    low, high = ml45.gain_interval(*seeds_apart, n_states=10_000)
    assert low < 1 and high > 39  # resampling seeds: anywhere from no seed with the gain to all three


def test_benchmark_runs_the_three_stages_and_ript_and_prints_the_gain(tmp_path, capsys, monkeypatch):
    config = {
        "suite": {"name": "pointmass", "tasks": ["reach"], "demos_per_task": 1, "contexts_per_task": 2,
                  "eval_states_per_task": 4, "num_workers": 0},
        "policy": {"name": "mlp", "options": {"hidden": 16}},
        "sft": {"steps": 20, "scale_steps": 10, "batch_size": 32, "pretrain_tasks": ["reach-mirror"],
                "pretrain_demos_per_task": 2, "pretrain_steps": 20, "cache_dir": str(tmp_path / "cache")},
        "algo": {"rloo_batch_size": 2, "scale_factor": 3.0},
        "training": {"contexts_per_iteration": 1},
        "tracking": {"log_checkpoint": False},
    }
    path = tmp_path / "tiny_ml45.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr("sys.argv", ["ml45", str(path), "--seeds", "0", "1", "--iterations", "1",
                                      "--output-dir", str(tmp_path / "runs")])
    ml45.main()
    out = capsys.readouterr().out
    assert "pre-training demos" in out and "few-shot demos" in out
    assert out.count("seed ") >= 2 and "over 2 seeds" in out and "95% bootstrap" in out
    assert "QueST, ML45 5-shot (images)      63.6% -> 76.0% (+12.4; 34% of the base's failures removed)" in out
