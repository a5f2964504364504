"""Reference policy: output shapes for H and D, scale-head initialisation, LoRA placement and merging."""

from __future__ import annotations

import pytest
import torch

from ript_ablate.config import PolicyConfig
from ript_ablate.policies.reference import build_policy, inject_lora, lora_parameters, merged_state_dict, tokenize


@pytest.mark.parametrize("horizon, action_dim", [(1, 4), (4, 4), (8, 7)])
def test_output_shapes(horizon, action_dim):
    cfg = PolicyConfig(d_model=32, n_layers=1, n_heads=2, chunk_size=horizon)
    policy = build_policy(cfg, obs_dim=39, action_dim=action_dim)
    instr = torch.tensor([tokenize("push the puck", cfg.vocab_size, cfg.max_instruction_tokens)] * 5)
    mu, log_b = policy({"state": torch.randn(5, 39)}, instr)
    assert mu.shape == log_b.shape == (5, horizon, action_dim)
    # scale head starts near its bias (-3), as in the original
    assert torch.allclose(log_b, torch.full_like(log_b, -3.0), atol=0.05)


def test_instruction_changes_the_output():
    cfg = PolicyConfig(d_model=32, n_layers=1, n_heads=2)
    policy = build_policy(cfg, 39, 4)
    obs = {"state": torch.randn(1, 39)}
    a = policy(obs, torch.tensor([tokenize("open the drawer", 512, cfg.max_instruction_tokens)]))[0]
    b = policy(obs, torch.tensor([tokenize("close the drawer", 512, cfg.max_instruction_tokens)]))[0]
    assert not torch.allclose(a, b)


def test_lora_adapters_present_where_configured_and_merge_exactly():
    cfg = PolicyConfig(d_model=32, n_layers=2, n_heads=2, lora_targets=["q", "v", "fc1"])
    policy = build_policy(cfg, 39, 4)
    inject_lora(policy, rank=4, alpha=8, dropout=0.0, targets=cfg.lora_targets)
    names = {n for n, _ in policy.named_parameters() if "lora_A" in n}
    wrapped = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in names}
    assert wrapped == {"q", "v", "fc1"} and len(names) == 2 * 3
    trainable_backbone = [n for n, p in policy.backbone.named_parameters() if p.requires_grad]
    assert trainable_backbone and all("lora_" in n for n in trainable_backbone)
    assert all(p.requires_grad for p in policy.action_head.parameters())
    # rank 4: q and v are (4x32 + 32x4), fc1 is (4x32 + 128x4); two layers
    assert sum(p.numel() for p in lora_parameters(policy)) == 2 * (256 + 256 + 640)
    # make the adapter non-trivial, then check the merged plain policy computes the same function
    with torch.no_grad():
        for p in lora_parameters(policy):
            p.normal_(0, 0.1)
    plain = build_policy(cfg, 39, 4)
    plain.load_state_dict(merged_state_dict(policy))
    obs, instr = {"state": torch.randn(3, 39)}, torch.tensor([tokenize("reach", 512, cfg.max_instruction_tokens)] * 3)
    for x, y in zip(policy(obs, instr), plain(obs, instr)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_tokenize_is_stable():
    assert tokenize("Reach the goal", 512, 5) == tokenize("reach  the goal!", 512, 5)
    assert tokenize("a b c d e f", 512, 3)[-1] != 0 and tokenize("a", 512, 3)[1:] == [0, 0]
