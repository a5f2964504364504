"""The mixed-precision path (bf16 autocast over fp32 master weights), exercised on the CPU: the same autocast code a
GPU runs, with the device type as the only difference, so the CUDA path is tested before a GPU is lent."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ript_ablate.bc import ensure_base
from ript_ablate.config import AlgoConfig, config_from_dict
from ript_ablate.device import autocast, uses_bf16
from ript_ablate.ript.trainer import Trainer
from ript_ablate.ript.update import PPOUpdater
from tests.test_fidelity import small_policy, with_ratios
from tests.test_trainer import train_dict


def test_precision_rule_and_the_cuda_branch_without_a_gpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert uses_bf16(cuda) and not uses_bf16(cpu)  # auto: bf16 where the device is CUDA
    assert uses_bf16(cpu, "bf16") and not uses_bf16(cuda, "fp32")
    context = autocast(cuda)  # the CUDA branch builds the CUDA autocast (disabled here: no CUDA)
    assert isinstance(context, torch.autocast) and context.device == "cuda" and context.fast_dtype == torch.bfloat16
    on_cpu = autocast(cpu, "bf16")
    assert isinstance(on_cpu, torch.autocast) and on_cpu.device == "cpu" and on_cpu.fast_dtype == torch.bfloat16


def test_update_under_bf16_autocast_keeps_fp32_masters_and_matches_fp32():
    algo = AlgoConfig(lora_rank=2, gradient_accumulation_steps=4, log_scale_clip=[-10.0, 10.0], fix_scale_head=False)
    policy = small_policy(chunk=4)
    # b = e^-1: bf16 keeps mu to about 3 significant digits, so |a - mu| / b moves by ~1e-2 per element; at the
    # behaviour-cloned b (~e^-3 and below) the same rounding moves ratios by several percent (README, "Device")
    torch.nn.init.constant_(policy.scale_head.bias, -1.0)
    # ratios inside the clip band: at a band edge (1.1 here) bf16 rounding flips positions in and out of the clip,
    # which changes the gradient by whole terms (measured: cosine 0.94 at 1.1, > 0.9999 at 1.05)
    trajs = [with_ratios(policy, algo, [[1.0] * 4, [1.05] * 4], (-1.0) ** i, seed=i) for i in range(4)]
    results, grads = {}, {}
    for precision in ("fp32", "bf16"):
        clone = copy.deepcopy(policy)
        updater = PPOUpdater(clone, algo, torch.device("cpu"), precision)
        stats = {k: torch.zeros(()) for k in ("loss", "ratio", "clipped_low", "clipped_high", "approx_kl", "count",
                                              "log_b", "log_b_clipped", "log_b_count", "micro_batches")}
        updater._micro_batch(trajs, [0.25] * 4, stats)
        params = updater.backbone_params + updater.head_params
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params), precision
        grads[precision] = torch.cat([p.grad.flatten() for p in params])
        results[precision] = updater.update(trajs, np.random.default_rng(0), 3)["metrics"]
        assert all(p.dtype == torch.float32 for p in clone.parameters())
    for key in ("ppo/loss", "ppo/ratio_mean", "scale/log_b_mean"):
        assert np.isfinite(results["bf16"][key])
        assert results["bf16"][key] == pytest.approx(results["fp32"][key], rel=2e-2, abs=1e-2), key
    cosine = torch.nn.functional.cosine_similarity(grads["bf16"], grads["fp32"], dim=0)
    assert cosine > 0.999  # the same update direction within bf16 rounding
    assert not torch.equal(grads["bf16"], grads["fp32"])  # and bf16 really ran


def test_a_short_training_under_bf16_autocast(tmp_path):
    data = train_dict(str(tmp_path / "cache"), str(tmp_path))
    data["training"]["precision"] = "bf16"
    cfg = config_from_dict(data)
    ensure_base(cfg)
    result = Trainer(cfg).run(tmp_path / "run")
    assert result.status == "finished"
    updates = [h for h in result.history if "ppo/loss" in h]
    assert updates and all(np.isfinite(h["ppo/loss"]) and np.isfinite(h["grad_norm/backbone"]) for h in updates)
    assert all(np.isfinite(h["eval/success_rate"]) for h in result.history if "eval/success_rate" in h)
