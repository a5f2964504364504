"""Every family end to end on Meta-World at tiny sizes: a study whose named configurations are the three families
(one base each) trains each cell; token and flow policies run as 2-process torchrun trials; replica and central
inference give the same episodes (bitwise where the forward passes see the same batches)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import yaml

from ript_ablate import plugins
from ript_ablate.cli import main
from ript_ablate.config import config_from_dict
from ript_ablate.engine import RolloutEngine
from ript_ablate.episodes import EpisodeJob
from ript_ablate.errors import ConfigError
from ript_ablate.families import build_family
from ript_ablate.study.spec import load_study
from tests.test_distributed import train
from tests.test_study import METAWORLD_CELL_CONFIG, child_runs, study_env, write_spec  # noqa: F401 - a fixture

FAMILIES = {"laplace": {"policy.head": "laplace"},
            "tokens": {"policy.head": "tokens", "policy.n_bins": 16, "algo.temperature": 1.5},
            "flow": {"policy.head": "flow", "policy.denoise_steps": 3, "algo.flow_logprob": "flow_noise"}}


def metaworld_base(study_env) -> None:
    config = json.loads(json.dumps(METAWORLD_CELL_CONFIG))
    config["sft"]["cache_dir"] = str(study_env / "cache")
    config["training"]["n_iterations"] = 1
    (study_env / "tiny.yaml").write_text(yaml.safe_dump(config))


def test_a_study_of_named_configurations_trains_every_family(study_env):
    metaworld_base(study_env)
    path = write_spec(study_env, configurations=FAMILIES, factors={}, seeds=[0])
    assert main(["study", "run", str(path), "--workers", "2"]) == 0
    _, runs = child_runs(path)
    assert sorted(r.data.tags["factor.configuration"] for r in runs) == ["flow", "laplace", "tokens"]
    for run in runs:
        assert run.info.status == "FINISHED" and "eval/success_rate" in run.data.metrics
        assert run.data.params["policy.head"] == run.data.tags["factor.configuration"]
    bases = list((study_env / "cache" / "sft").glob("*/model.safetensors"))
    assert len(bases) == 3  # one behaviour-cloning base per family
    assert main(["report", str(path), "--reports", str(study_env / "reports"), "--no-upload"]) == 0
    report = (study_env / "reports" / load_study(path).name / "report.md").read_text()
    assert "configuration: laplace -> tokens" in report and "configuration: laplace -> flow" in report


def test_a_switch_that_means_nothing_for_the_family_is_refused_before_any_compute(study_env):
    metaworld_base(study_env)
    bad = {**FAMILIES, "tokens": {**FAMILIES["tokens"], "algo.scale_factor": 9.0}}
    with pytest.raises(ConfigError, match=r"algo.scale_factor: got 9.0, but it does not apply to a tokens policy"):
        load_study(write_spec(study_env, configurations=bad, factors={}, seeds=[0]))
    with pytest.raises(ConfigError, match="algo.top_k: got 5, but it does not apply to a laplace policy"):
        load_study(write_spec(study_env, factors={"algo.top_k": [0, 5]}, seeds=[0]))
    assert load_study(write_spec(study_env, configurations=FAMILIES, factors={}, seeds=[0])).configurations


@pytest.mark.parametrize("family", ["tokens", "flow"])
def test_a_two_process_trial_trains_token_and_flow_policies(tmp_path, tiny_dict, family):
    data = copy.deepcopy(tiny_dict)
    for key, value in {**FAMILIES[family], "algo.rloo_batch_size": 2, "algo.lora_rank": 2,
                       "training.n_iterations": 1, "training.contexts_per_iteration": 2,
                       "training.eval_interval": 1, "tracking.enabled": False}.items():
        section, name = key.split(".")
        data.setdefault(section, {})[name] = value
    if family == "tokens":
        data["algo"]["token_logprob"] = "original"  # the token-average loss: one collective per update
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    assert main(["sft", str(config)]) == 0
    proc = train(config, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history[-1]["iteration"] == 1 and "eval/success_rate" in history[-1]


@pytest.mark.parametrize("family", ["tokens", "flow"])
def test_replica_and_central_episodes_agree_for_token_and_flow_policies(tiny_cfg, family):
    """In one process (0 workers) or one replica per worker, the forward passes see the same batches: every episode
    bitwise equal. The central forward over several workers' batches: the same chunks at least 99% of the time."""
    from ript_ablate.policies.reference import build_policy

    cfg = copy.deepcopy(tiny_cfg)
    for key, value in FAMILIES[family].items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    world = plugins.build_world(cfg)
    torch.manual_seed(0)
    policy = build_policy(cfg.policy, 39, 4).eval()
    states = world.eval_states("reach-v3")
    jobs = [EpisodeJob(states[i % len(states)], seed=10 + i) for i in range(5)]
    jobs += [EpisodeJob(states[0], seed=3, mode="mean")]
    family_obj = build_family(cfg.algo, policy)
    runs = {}
    for workers in (0, 2):
        layout = copy.deepcopy(cfg)
        layout.suite.num_workers, layout.suite.envs_per_worker = workers, 3
        with RolloutEngine(layout, world) as engine:
            for mode in ("replica", "central") if workers else ("replica",):
                engine.set_policy(policy, mode, family=family_obj)
                runs[(workers, mode)] = engine.run(jobs)
    reference = runs[(0, "replica")]
    same = total = 0
    for key, episodes in runs.items():
        for a, b in zip(reference, episodes):
            if key != (2, "central"):
                assert (a.success, a.length) == (b.success, b.length), key
                np.testing.assert_array_equal(a.actions, b.actions, err_msg=str(key))
                for name in a.record:
                    np.testing.assert_array_equal(a.record[name], b.record[name], err_msg=f"{key} {name}")
            else:
                n = min(len(a.actions), len(b.actions))  # a flipped token (or the physics) may change the length
                same += int((np.abs(a.actions[:n] - b.actions[:n]) < 1e-3).all(axis=(1, 2)).sum())
                total += max(len(a.actions), len(b.actions))
    assert same / total >= 0.99, f"central agreed on {same} of {total} chunks"
