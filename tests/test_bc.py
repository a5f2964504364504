"""Behaviour-cloning base: cached by a hash of its inputs; clear errors for missing or corrupt checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ript_ablate.bc import base_key, build_bc_data, get_base, load_base, sft_key
from ript_ablate.cli import main
from ript_ablate.config import config_from_dict
from ript_ablate.engine import RolloutEngine
from ript_ablate.episodes import Demonstrations, Episode
from ript_ablate.plugins import build_world


def test_bc_chunks_are_the_next_h_actions_masked_past_the_end(tiny_cfg):
    actions = np.arange(12, dtype=np.float32).reshape(3, 4)  # 3 steps, D=4
    ep = Episode("reach-v3", "reach-v3/demo/0", True, 3, {"state": np.zeros((3, 39), np.float32)}, actions,
                 np.ones((3, 1), bool))
    data = build_bc_data(Demonstrations({"reach-v3": [ep]}, {"reach-v3": []}), ["reach-v3"],
                         {"reach-v3": torch.tensor([5, 0])}, tiny_cfg.policy.chunk_size)
    assert data.instr.tolist() == [[5, 0]] * 3 and data.obs["state"].shape == (3, 39)
    assert data.target.shape == (3, 4, 4)
    torch.testing.assert_close(data.target[1, :2], torch.from_numpy(actions[1:3]))
    assert data.mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]]


def test_base_is_cached_and_reused(tiny_cfg):
    world = build_world(tiny_cfg)
    with RolloutEngine(tiny_cfg, world) as engine:
        policy, path, info = get_base(tiny_cfg, world, engine)
        assert not info["cache_hit"] and path.is_file()
        stamp = path.stat().st_mtime_ns
        again, path2, info2 = get_base(tiny_cfg, build_world(tiny_cfg), engine)
    assert info2["cache_hit"] and path2 == path and path.stat().st_mtime_ns == stamp
    for (k, a), (_, b) in zip(policy.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    # the scale head was fitted: log_b moved away from its -3 initial bias toward the demos' spread
    assert not torch.allclose(policy.scale_head.bias, torch.full((4,), -3.0))


def test_cache_key_tracks_what_produced_the_base(tiny_dict):
    base = config_from_dict(tiny_dict)
    assert sft_key(base, "demos") == sft_key(config_from_dict(tiny_dict), "demos")
    assert sft_key(base, "demos") != sft_key(base, "other-demos")
    changed = dict(tiny_dict, sft=dict(tiny_dict["sft"], steps=21))
    assert sft_key(base, "demos") != sft_key(config_from_dict(changed), "demos")
    moved = dict(tiny_dict, sft=dict(tiny_dict["sft"], cache_dir="/elsewhere"))
    assert sft_key(base, "demos") == sft_key(config_from_dict(moved), "demos")  # location is not an input


def test_eval_cli_on_base_prints_a_table(tiny_yaml, capsys):
    assert main(["sft", str(tiny_yaml), "--eval"]) == 0
    err = capsys.readouterr().err
    assert "reach-v3" in err and "mean over tasks" in err and "3 episodes" in err


def test_missing_or_corrupt_checkpoint_gives_a_clear_error(tiny_yaml, tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    assert main(["eval", str(tiny_yaml), "--checkpoint", str(missing)]) == 1
    err = capsys.readouterr().err
    assert "checkpoint file not found" in err and str(missing) in err and "Traceback" not in err
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    assert main(["eval", str(tiny_yaml), "--checkpoint", str(corrupt)]) == 1
    err = capsys.readouterr().err
    assert "cannot read model checkpoint" in err and str(corrupt) in err and "Traceback" not in err


def test_checkpoint_of_another_architecture_is_named(tiny_yaml, tmp_path, capsys):
    from ript_ablate.checkpoints import save_tensors

    wrong = tmp_path / "wrong.safetensors"
    save_tensors({"action_head.weight": torch.zeros(4, 64)}, wrong)
    assert main(["eval", str(tiny_yaml), "--checkpoint", str(wrong)]) == 1
    err = capsys.readouterr().err
    assert "does not fit this policy" in err and "shape mismatch" in err


def _pretraining(tiny_dict: dict, **sft) -> dict:
    stage = {"pretrain_tasks": ["push-v3"], "pretrain_demos_per_task": 2, "pretrain_steps": 15, **sft}
    return dict(tiny_dict, sft={**tiny_dict["sft"], **stage})


def test_pretraining_then_few_shot_then_scale_head_compose_and_share_the_pretrained_model(tiny_dict):
    """pre-train on push -> fine-tune on reach -> fit the scale head; a second base reuses the pre-trained model."""
    cfg = config_from_dict(_pretraining(tiny_dict))
    world = build_world(cfg)
    with RolloutEngine(cfg, world) as engine:
        policy, path, info = get_base(cfg, world, engine)
    assert not info["cache_hit"] and info["pretrain_cache_hit"] is False
    assert info["pretrain"]["tasks"] == ["push-v3"] and info["pretrain"]["samples"] > 0
    pre_dir = Path(cfg.sft.cache_dir) / "sft" / info["pretrain"]["key"]
    pretrained = load_base(pre_dir / "model.safetensors", cfg, world)
    # the base keeps the pre-training's observation statistics (from push's demonstrations) ...
    torch.testing.assert_close(policy.obs_mean, pretrained.obs_mean)
    assert not torch.allclose(pretrained.obs_mean, torch.zeros_like(pretrained.obs_mean))
    # ... fine-tuning on reach moved the backbone, and only the last stage fitted the scale head
    assert not torch.allclose(policy.action_head.weight, pretrained.action_head.weight)
    torch.testing.assert_close(pretrained.scale_head.bias, torch.full((4,), -3.0))
    assert not torch.allclose(policy.scale_head.bias, torch.full((4,), -3.0))

    stamp = (pre_dir / "model.safetensors").stat().st_mtime_ns
    other = config_from_dict(_pretraining(tiny_dict, steps=12))  # another fine-tuning of the same pre-training
    assert base_key(other, world) != base_key(cfg, world)
    with RolloutEngine(other, world) as engine:
        _, path2, info2 = get_base(other, world, engine)
    assert not info2["cache_hit"] and info2["pretrain_cache_hit"] is True and path2 != path
    assert (pre_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_pretraining_settings_enter_the_base_key_and_plain_keys_do_not_move(tiny_dict):
    world = build_world(config_from_dict(tiny_dict))
    plain = config_from_dict(tiny_dict)
    with_defaults = config_from_dict(dict(tiny_dict, sft=dict(tiny_dict["sft"], pretrain_steps=7)))
    assert base_key(plain, world) == base_key(with_defaults, world)  # no pre-training: its settings are inert
    pre = config_from_dict(_pretraining(tiny_dict))
    keys = {base_key(plain, world), base_key(pre, world),
            base_key(config_from_dict(_pretraining(tiny_dict, pretrain_lr=5e-4)), world),
            base_key(config_from_dict(_pretraining(tiny_dict, pretrain_demos_per_task=3)), world)}
    assert len(keys) == 4


def test_ml45_presets_are_metaworlds_split():
    from metaworld.env_dict import ML45_V3

    from ript_ablate.worlds.metaworld.tasks import PRESETS, episode_length

    assert PRESETS["ml45_train"] == list(ML45_V3["train"]) and PRESETS["ml45_test"] == list(ML45_V3["test"])
    assert all(episode_length(t) < 250 for t in ["box-close-v3", "hand-insert-v3", "door-lock-v3", "door-unlock-v3"])


def test_a_scale_head_fitted_on_held_out_demonstrations_measures_the_error_on_new_states(tiny_dict):
    """The action head fits its own demonstrations almost exactly, so a scale head fitted on them says b is tiny;
    fitted on further demonstrations it never saw, b is the size of its error on new states. The action weights are
    the same either way, and the two bases are cached apart."""
    tiny_dict["sft"].update(steps=150, scale_steps=100, scale_lr=3e-2)
    own, held_out = config_from_dict(tiny_dict), config_from_dict(
        dict(tiny_dict, sft=dict(tiny_dict["sft"], scale_demos_per_task=3)))
    world = build_world(own)
    with RolloutEngine(own, world) as engine:
        fitted_on_own, _, own_info = get_base(own, world, engine)
        fitted_on_new, _, new_info = get_base(held_out, build_world(held_out), engine)
    assert base_key(own, world) != base_key(held_out, world)
    assert (own_info["scale_samples"], new_info["samples"]) == (own_info["samples"], own_info["samples"])
    assert new_info["scale_samples"] > own_info["samples"]  # 3 held-out episodes against 2 training ones
    action_weights = {k: v for k, v in fitted_on_own.state_dict().items() if not k.startswith("scale_head")}
    for key, value in action_weights.items():
        torch.testing.assert_close(fitted_on_new.state_dict()[key], value, msg=key)

    wide = build_world(config_from_dict(dict(tiny_dict, suite=dict(tiny_dict["suite"], demos_per_task=5))))
    with RolloutEngine(own, wide) as engine:
        demos = wide.demonstrations(engine, own.sft.cache_dir)
    new_episodes = Demonstrations({"reach-v3": demos.episodes["reach-v3"][2:]}, {"reach-v3": demos.states["reach-v3"][2:]})
    data = build_bc_data(new_episodes, ["reach-v3"], {"reach-v3": fitted_on_own.encode_instruction(
        world.instruction("reach-v3"))}, own.policy.chunk_size)
    with torch.no_grad():
        mu, log_b_own = fitted_on_own(data.obs, data.instr)
        _, log_b_new = fitted_on_new(data.obs, data.instr)
    error = ((data.target - mu).abs().mean(-1) * data.mask).sum() / data.mask.sum()
    b_own, b_new = log_b_own.exp().mean(), log_b_new.exp().mean()
    print(float(b_own), float(b_new), float(error))
    assert b_own < 0.5 * error, (float(b_own), float(error))  # far below the error the policy makes on new states
    assert abs(b_new - error) < abs(b_own - error), (float(b_new), float(b_own), float(error))


def test_base_fit_separates_demonstrations_new_placements_and_evaluation_states():
    """The diagnosis tells the three sets apart: hand-planted outcomes per set come back per task and overall."""
    from types import SimpleNamespace

    from ript_ablate.bench.base_fit import fit_rows, format_table, overall
    from ript_ablate.episodes import InitialState

    def states(task, kind, n):
        return [InitialState(task, f"{task}/{kind}/{i}", i) for i in range(n)]

    tasks = ["a", "b"]
    demos = Demonstrations({t: [] for t in tasks}, {t: states(t, "demo", 4) for t in tasks})
    world = SimpleNamespace(
        tasks=tasks,
        training_contexts=lambda task, d: d.states[task] + states(task, "context", 6),
        eval_states=lambda task: states(task, "eval", 5))
    # planted: task a succeeds on every demonstration state, on the first context and on no evaluation state;
    # task b on the even-numbered states of every set
    wins = {"a": lambda kind, i: kind == "demo" or (kind == "context" and i == 0), "b": lambda kind, i: i % 2 == 0}

    class Engine:
        def run(self, jobs, on_batch=None):
            assert all(job.mode == "mean" for job in jobs)
            out = []
            for job in jobs:
                task, kind, i = job.state.state_id.split("/")
                out.append(Episode(task, job.state.state_id, wins[task](kind, int(i)), 1, {}, np.zeros((1, 1, 1)),
                                   np.ones((1, 1), bool)))
            return out

    rows = fit_rows(world, Engine(), demos, 3)
    a, b = rows
    assert a.counts == {"demonstrations": 3, "new placements": 3, "evaluation": 3}  # first 3; no demo among contexts
    assert a.success == {"demonstrations": 1.0, "new placements": 1 / 3, "evaluation": 0.0}
    assert b.success == {"demonstrations": 2 / 3, "new placements": 2 / 3, "evaluation": 2 / 3}
    assert overall(rows, "demonstrations") == 5 / 6 and overall(rows, "evaluation") == 1 / 3
    assert "| a | 100% of 3 | 33% of 3 | 0% of 3 |" in format_table(rows)
