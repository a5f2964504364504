"""Training on camera images: behaviour cloning and a RIPT iteration on tiny images, and the pixel benchmark's tiny
CPU invocation (the script a GPU machine runs with --device cuda). Apart from tests/test_pixels.py so that the two
files run side by side."""

from __future__ import annotations

import pytest
import torch

from ript_ablate import plugins
from ript_ablate.config import config_from_dict

SIZE = 24


@pytest.fixture
def image_dict(tiny_dict):
    tiny_dict["suite"].update(observation="images", cameras=["corner"], image_size=SIZE, demos_per_task=1)
    tiny_dict["sft"]["image_shift"] = 2
    return tiny_dict


def test_behaviour_cloning_and_a_ript_iteration_run_on_images(image_dict, tmp_path):
    from ript_ablate import checkpoints
    from ript_ablate.bc import base_dir, ensure_base
    from ript_ablate.ript.trainer import Trainer

    image_dict["training"] = {"n_iterations": 1, "contexts_per_iteration": 2, "eval_interval": 1,
                              "save_interval": 1, "output_dir": str(tmp_path / "out")}
    image_dict["algo"].update(rloo_batch_size=2, max_step_batch_size=64, enable_dynamic_sampling=False)
    image_dict["suite"].update(eval_states_per_task=1, demos_per_task=2)  # 2: this seed's groups have mixed rewards
    cfg = config_from_dict(image_dict)
    ensure_base(cfg)
    base = checkpoints.load_tensors(base_dir(cfg, plugins.build_world(cfg)) / checkpoints.MODEL_FILE)
    encoder = [k for k in base if k.startswith("backbone.image_encoders.corner_image.conv.")]
    fresh = plugins.build_policy(cfg, plugins.build_world(cfg)).state_dict()
    assert encoder and all(not torch.equal(base[k], fresh[k]) for k in encoder)  # behaviour cloning trained it
    result = Trainer(cfg).run(tmp_path / "run")
    assert result.status == "finished"
    last = result.history[-1]
    assert 0.0 <= last["eval/success_rate"] <= 1.0
    assert last["perf/episode_mib"] > 0
    final = checkpoints.load_tensors(result.final_checkpoint / checkpoints.MODEL_FILE)
    assert all(torch.equal(base[k], final[k]) for k in encoder)  # the encoder stays frozen (LoRA: transformer)
    assert any(not torch.equal(base[k], final[k]) for k in base if k.startswith("action_head."))


def test_the_pixel_benchmark_runs_its_tiny_cpu_invocation(monkeypatch, capsys):
    """The same script a GPU machine runs with --device cuda: every section prints its figures."""
    from ript_ablate.bench import pixels

    monkeypatch.setattr("sys.argv", ["pixels", "--tiny", "--device", "cpu"])
    pixels.main()
    out = capsys.readouterr().out
    for line in ("state only", "16 px, corner", "central / replica", "base on images", "base on states",
                 "RIPT from the pixel base, 1 iteration(s)", "peak resident memory"):
        assert line in out, line
