"""Fidelity to the original RIPT (OpenVLA-OFT path): each test asserts a value computed by hand from the original's
behaviour, on a case where this project used to differ (the comments give the old value)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ript_ablate.config import AlgoConfig, PolicyConfig, config_from_dict
from ript_ablate.policies.reference import build_policy, inject_lora
from ript_ablate.ript import rollouts as ript_rollouts
from ript_ablate.ript.distributions import ActionDistribution, log_prob
from ript_ablate.ript.update import PPOUpdater, Trajectory, policy_log_prob
from ript_ablate.engine import RolloutEngine
from ript_ablate.episodes import Episode, EpisodeJob, InitialState
from ript_ablate.plugins import build_world

WIDE = [-10.0, 10.0]  # a log_scale_clip that never binds, so ratios are exactly what the test sets


def small_policy(chunk: int, rank: int = 2, alpha: float | None = None, init: str = "gaussian"):
    cfg = PolicyConfig(d_model=16, n_layers=1, n_heads=2, chunk_size=chunk, max_instruction_tokens=4)
    policy = build_policy(cfg, 39, 4)
    inject_lora(policy, rank, alpha, 0.0, cfg.lora_targets, init)
    return policy


def with_ratios(policy, algo: AlgoConfig, ratios: list[list[float]], advantage: float, seed: int) -> Trajectory:
    """A trajectory whose behaviour log-probs make the first forward's ratios exactly `ratios` (chunks x H)."""
    g = torch.Generator().manual_seed(seed)
    n, h = len(ratios), len(ratios[0])
    obs, actions = torch.randn(n, 39, generator=g), torch.randn(n, h, 4, generator=g) * 0.1
    instr = torch.tensor([1, 2, 0, 0])
    with torch.no_grad():
        logp, _ = policy_log_prob(policy, {"state": obs}, instr.expand(n, -1), actions,
                                  ActionDistribution.from_algo(algo), torch.device("cpu"))
    old = logp - torch.log(torch.tensor(ratios))
    return Trajectory({"state": obs}, instr, actions, torch.ones(n, h), old, advantage)


# 1. ppo/clip_fraction ---------------------------------------------------------------------------------------------


def test_clip_fraction_counts_where_the_clipped_term_is_taken_per_side():
    algo = AlgoConfig(lora_rank=2, gradient_accumulation_steps=4, log_scale_clip=WIDE)  # band [0.9, 1.1]
    policy = small_policy(chunk=2)
    trajs = [
        with_ratios(policy, algo, [[0.8, 1.0]], +1.0, 0),   # r < band with A > 0: unclipped term wins: 0
        with_ratios(policy, algo, [[1.2, 1.05]], +1.0, 1),  # 1.2 above with A > 0: high
        with_ratios(policy, algo, [[0.8, 1.2]], -1.0, 2),   # 0.8 below with A < 0: low; 1.2 with A < 0: 0
        with_ratios(policy, algo, [[0.85, 1.0]], -1.0, 3),  # 0.85 below with A < 0: low
    ]
    metrics = PPOUpdater(policy, algo, torch.device("cpu")).update(trajs, np.random.default_rng(0), 3)["metrics"]
    assert metrics["ppo/clip_fraction_low"] == pytest.approx(2 / 8)
    assert metrics["ppo/clip_fraction_high"] == pytest.approx(1 / 8)
    assert metrics["ppo/clip_fraction"] == pytest.approx(3 / 8)  # "any ratio outside the band" would give 5 / 8


def test_clip_fraction_zero_when_the_unclipped_term_wins():
    algo = AlgoConfig(lora_rank=2, gradient_accumulation_steps=1, log_scale_clip=WIDE)
    policy = small_policy(chunk=2)
    metrics = PPOUpdater(policy, algo, torch.device("cpu")).update(
        [with_ratios(policy, algo, [[0.8, 0.8]], +1.0, 0)], np.random.default_rng(0), 3)["metrics"]
    assert metrics["ppo/clip_fraction"] == 0.0  # r = 0.8, A = +1, band [0.9, 1.1]: was 1.0


# 2. ppo/loss --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("step_batch", "expected"), [(1, 0.5), (2, 1.0)])
def test_ppo_loss_is_the_mean_over_the_original_micro_batches(step_batch, expected):
    """One trajectory of 2 chunks, H = 8, ratio 1 and A = -1: every position's loss is 1, per-chunk sums 8, 16
    positions. Per micro-batch of one chunk: 8 / 16 = 0.5, mean 0.5 (was 1.0, the sum per optimizer step); with
    both chunks in one micro-batch: 16 / 16 = 1.0."""
    algo = AlgoConfig(lora_rank=2, gradient_accumulation_steps=1, max_step_batch_size=step_batch, log_scale_clip=WIDE)
    policy = small_policy(chunk=8)
    traj = with_ratios(policy, algo, [[1.0] * 8, [1.0] * 8], -1.0, 0)
    metrics = PPOUpdater(policy, algo, torch.device("cpu")).update([traj], np.random.default_rng(0), 3)["metrics"]
    assert metrics["ppo/loss"] == pytest.approx(expected, rel=1e-4)


def test_ppo_loss_divides_by_gradient_accumulation_like_the_original():
    """GA = 2, two one-chunk trajectories (H = 8, loss 1 per position): each micro-batch is 8 / 8 / 2 = 0.5."""
    algo = AlgoConfig(lora_rank=2, gradient_accumulation_steps=2, log_scale_clip=WIDE)
    policy = small_policy(chunk=8)
    trajs = [with_ratios(policy, algo, [[1.0] * 8], -1.0, s) for s in (0, 1)]
    metrics = PPOUpdater(policy, algo, torch.device("cpu")).update(trajs, np.random.default_rng(0), 3)["metrics"]
    assert metrics["ppo/loss"] == pytest.approx(0.5, rel=1e-4)


# 3, 4. LoRA alpha and initialisation --------------------------------------------------------------------------------


def lora_modules(policy):
    return [m for m in policy.backbone.modules() if hasattr(m, "lora_A") and hasattr(m, "scaling")]


@pytest.mark.parametrize(("rank", "alpha", "scaling"), [(8, None, 1.0), (32, None, 0.5), (4, None, 1.0),
                                                          (8, 16.0, 2.0)])
def test_lora_alpha_defaults_to_min_rank_16(rank, alpha, scaling):
    assert PolicyConfig().lora_alpha is None
    modules = lora_modules(small_policy(chunk=2, rank=rank, alpha=alpha))
    assert modules and all(m.scaling["default"] == pytest.approx(scaling) for m in modules)


def test_lora_init_is_gaussian_with_std_one_over_rank():
    assert PolicyConfig().lora_init == "gaussian"
    torch.manual_seed(0)
    a = torch.cat([m.lora_A["default"].weight.flatten() for m in lora_modules(small_policy(chunk=2, rank=4))])
    assert a.std().item() == pytest.approx(1 / 4, rel=0.1)
    assert a.abs().max().item() > 1 / math.sqrt(16)  # beyond the kaiming-uniform bound 1/sqrt(fan_in)
    torch.manual_seed(0)
    k = torch.cat([m.lora_A["default"].weight.flatten()
                   for m in lora_modules(small_policy(chunk=2, rank=4, init="kaiming_uniform"))])
    assert k.abs().max().item() <= 1 / math.sqrt(16) + 1e-6  # fan_in 16 (d_model) for q/k/v/o/fc1
    b = [m.lora_B["default"].weight.detach() for m in lora_modules(small_policy(chunk=2))]
    assert all(float(w.abs().sum()) == 0.0 for w in b)  # the policy is unchanged at the start


def test_lora_init_is_a_config_key_with_a_clear_error(tiny_dict):
    tiny_dict["policy"]["lora_init"] = "xavier"
    with pytest.raises(Exception, match="policy.lora_init: got 'xavier', expected one of gaussian, kaiming_uniform"):
        config_from_dict(tiny_dict)


# 5. which action positions count ------------------------------------------------------------------------------------


def episode(valid_rows: list[int], success: bool, h: int = 8) -> Episode:
    """An episode as the rollout runner records it: one row per policy call, `valid` = executed steps."""
    c = len(valid_rows)
    valid = np.zeros((c, h), dtype=bool)
    for i, n in enumerate(valid_rows):
        valid[i, :n] = True
    z = np.zeros((c, h, 4), np.float32)
    return Episode("reach-v3", "s", success, int(valid.sum()), {"state": np.zeros((c, 39), np.float32)}, z, valid,
                   {"mu": z, "log_b": z})


@pytest.mark.parametrize(("rows", "success", "original", "executed"), [
    ([6], True, 8, 6),          # success on action 6 of chunk 0: the whole recorded chunk counts
    ([8, 1], True, 8, 9),       # success on the first action of chunk 1: that chunk is never recorded
    ([8, 8, 4], False, 24, 20),  # a 20-step time limit: 3 recorded chunks
    ([1], True, 0, 1),          # success on the very first action: nothing recorded
    ([8, 1], False, 16, 9),     # a time limit on the first action of a chunk does not break: recorded
])
def test_loss_positions_match_the_original(rows, success, original, executed):
    ep = episode(rows, success)
    assert ep.loss_mask().sum() == original
    assert ep.loss_mask(executed_only=True).sum() == executed


def test_time_limited_rollout_counts_all_positions_of_its_chunks(tiny_cfg):
    """The real runner, H = 8 and a 20-step limit (an untrained policy does not reach in 20 steps): 24 positions."""
    tiny_cfg.policy.chunk_size = 8
    tiny_cfg.algo.max_episode_length = 20
    state = build_world(tiny_cfg).extra_contexts("reach-v3")[0]
    with RolloutEngine(tiny_cfg) as engine:
        engine.set_policy(build_policy(tiny_cfg.policy, 39, 4))
        (ep,) = engine.run([EpisodeJob(state, seed=1)])
    assert not ep.success and ep.length == 20
    assert ep.loss_mask().sum() == 24 and ep.valid.sum() == 20


def test_trajectory_normaliser_counts_recorded_positions():
    """The loss of a trajectory is its position sum over the positions the original counts (8, not 6)."""
    from ript_ablate.ript.update import build_trajectories

    ep = episode([6], True)
    group = ript_rollouts.Group(InitialState("reach-v3", "s", np.zeros(3)), [ep, ep])
    algo = AlgoConfig()
    (t1, _) = build_trajectories([group], np.array([[1.0, -1.0]]), {"reach-v3": torch.tensor([1, 0])}, algo,
                                 torch.device("cpu"))
    assert float(t1.mask.sum()) == 8 and t1.counted_chunks == 1
    algo_exec = AlgoConfig(loss_on_executed_steps_only=True)
    (t2, _) = build_trajectories([group], np.array([[1.0, -1.0]]), {"reach-v3": torch.tensor([1, 0])}, algo_exec,
                                 torch.device("cpu"))
    assert float(t2.mask.sum()) == 6


# 6, 7. early-stop threshold -----------------------------------------------------------------------------------------


class MixedPool:
    """Every group has mixed rewards (even seeds succeed)."""

    num_workers = 1

    def run(self, jobs, sampling=None, on_batch=None):
        z = np.zeros((1, 2, 4), np.float32)
        return [Episode(j.state.task, j.state.state_id, j.seed % 2 == 0, 2, {"state": np.zeros((1, 39), np.float32)}, z,
                        np.ones((1, 2), bool), {"mu": z, "log_b": z}) for j in jobs]


def contexts(n: int) -> list[InitialState]:
    return [InitialState("reach-v3", f"reach-v3/context/{i}", np.full(3, float(i))) for i in range(n)]


def test_early_stop_threshold_is_floored():
    algo = AlgoConfig(rloo_batch_size=4, early_stop_percentage=0.7)
    got = ript_rollouts.collect(MixedPool(), contexts(20), algo, quota=8, iteration=1)
    assert len(got.accepted) == 5  # int(8 x 0.7) = 5 (was 6, rounded up)
    assert got.metrics(["reach-v3"])["sampling/shortfall"] == 0


def test_early_stop_applies_without_dynamic_sampling():
    algo = AlgoConfig(rloo_batch_size=4, early_stop_percentage=0.5, enable_dynamic_sampling=False)
    got = ript_rollouts.collect(MixedPool(), contexts(20), algo, quota=4, iteration=1)
    assert len(got.accepted) == 2 and got.tried == 2  # was 4: the percentage was ignored


def test_early_stop_target_of_zero_is_a_config_error(tiny_dict):
    tiny_dict["algo"]["early_stop_percentage"] = 0.1
    tiny_dict["training"] = {"contexts_per_iteration": 4}
    with pytest.raises(Exception, match="algo.early_stop_percentage: got 0.1"):
        config_from_dict(tiny_dict)


# 8. log_scale_clip: null ------------------------------------------------------------------------------------------


def test_log_scale_clip_null_means_no_clamp(tiny_dict):
    tiny_dict["algo"]["log_scale_clip"] = None
    assert config_from_dict(tiny_dict).algo.log_scale_clip is None
    a, mu = torch.tensor([[0.3, -0.2]]), torch.zeros(1, 2)
    log_b = torch.tensor([[-5.0, 1.0]], requires_grad=True)  # outside [-2, 0.5] on both sides
    lp = log_prob(a, mu, log_b, laplace=True, mode="ratio_on_action_dim", log_scale_clip=None)
    expected = -log_b - a.abs() / log_b.exp() - math.log(2)
    torch.testing.assert_close(lp, expected)
    lp.sum().backward()
    assert (log_b.grad != 0).all()  # no clamp, so gradient everywhere
    algo = AlgoConfig(lora_rank=2, log_scale_clip=None)
    policy = small_policy(chunk=2)
    metrics = PPOUpdater(policy, algo, torch.device("cpu")).update(
        [with_ratios(policy, algo, [[1.0, 1.0]], 1.0, 0)], np.random.default_rng(0), 3)["metrics"]
    assert metrics["scale/log_b_clipped_fraction"] == 0.0 and math.isfinite(metrics["ppo/loss"])
