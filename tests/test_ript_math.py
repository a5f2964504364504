"""RIPT's numbers against hand-computed values: RLOO, the asymmetric clipped loss, log-probs in every mode."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ript_ablate.ript.advantages import rloo, rloo_over_all
from ript_ablate.ript.distributions import log_prob
from ript_ablate.ript.update import clipped_loss


def test_rloo_per_group():
    adv = rloo(np.array([[1, 0, 0, 1], [1, 1, 1, 1]]))
    np.testing.assert_allclose(adv[0], [1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3])
    np.testing.assert_allclose(adv[1], 0.0)  # a degenerate group carries no signal


def test_rloo_over_all_rollouts():
    # pool of N = 4: A = R - (3 - R) / 3
    np.testing.assert_allclose(rloo_over_all(np.array([[1, 0], [1, 1]])), [[1 / 3, -1.0], [1 / 3, 1 / 3]])


def test_rloo_needs_two():
    with pytest.raises(ValueError):
        rloo(np.array([[1.0]]))


@pytest.mark.parametrize(
    "ratio, adv, expected",
    [
        (1.05, 1.0, -1.05),  # inside the clip range: plain -A * ratio
        (1.05, -1.0, 1.05),
        (1.5, 1.0, -1.3),  # above 1 + high (0.3), A > 0: clipped
        (1.5, -1.0, 1.5),  # above, A < 0: the pessimistic unclipped term
        (0.5, 1.0, -0.5),  # below 1 - low (0.1), A > 0: unclipped
        (0.5, -1.0, 0.9),  # below, A < 0: clipped at 0.9
    ],
)
def test_asymmetric_clipped_loss(ratio, adv, expected):
    assert float(clipped_loss(torch.tensor(ratio), adv, clip_low=0.1, clip_high=0.3)) == pytest.approx(expected)


def _one():
    a = torch.tensor([[[0.5, 0.0]]])  # (C=1, H=1, D=2)
    mu = torch.zeros_like(a)
    log_b = torch.full_like(a, math.log(0.5), requires_grad=True)
    return a, mu, log_b


def test_laplace_log_prob_modes():
    a, mu, log_b = _one()
    # element 0: -log 0.5 - 0.5/0.5 - log 2 = -1; element 1: -log 0.5 - 0 - log 2 = 0
    kw = dict(laplace=True, log_scale_clip=(-2.0, 0.5))
    torch.testing.assert_close(log_prob(a, mu, log_b, mode="sum_on_action_dim", **kw), torch.tensor([[-1.0]]))
    torch.testing.assert_close(log_prob(a, mu, log_b, mode="avg_on_action_dim", **kw), torch.tensor([[-0.5]]))
    torch.testing.assert_close(log_prob(a, mu, log_b, mode="ratio_on_action_dim", **kw), torch.tensor([[[-1.0, 0.0]]]))


def test_gaussian_log_prob():
    a, mu, log_b = _one()
    expected = (math.log(2) - 0.5 - 0.5 * math.log(2 * math.pi)) + (math.log(2) - 0.5 * math.log(2 * math.pi))
    got = log_prob(a, mu, log_b, laplace=False, mode="sum_on_action_dim", log_scale_clip=(-2.0, 0.5))
    assert float(got) == pytest.approx(expected)
    ref = torch.distributions.Normal(mu, log_b.exp()).log_prob(a).sum()
    assert float(got) == pytest.approx(float(ref))


def test_log_scale_clip_clamps_and_blocks_gradient():
    a = torch.tensor([[[0.5, 0.5, 0.5]]])
    log_b = torch.tensor([[[1.0, -3.0, 0.0]]], requires_grad=True)  # above, below, inside [-2, 0.5]
    lp = log_prob(a, torch.zeros_like(a), log_b, laplace=True, mode="ratio_on_action_dim", log_scale_clip=(-2.0, 0.5))
    expected = [-0.5 - 0.5 / math.exp(0.5) - math.log(2), 2.0 - 0.5 / math.exp(-2.0) - math.log(2), -0.5 - math.log(2)]
    torch.testing.assert_close(lp, torch.tensor([[expected]]))
    lp.sum().backward()
    assert log_b.grad[0, 0, 0] == 0 and log_b.grad[0, 0, 1] == 0 and log_b.grad[0, 0, 2] != 0


def test_original_mode_ignores_scale_factor_exact_mode_is_the_sampling_density():
    a, mu, log_b = _one()
    kw = dict(laplace=True, mode="sum_on_action_dim", log_scale_clip=(-2.0, 0.5))
    original = log_prob(a, mu, log_b, scale_factor=5.0, **kw)
    torch.testing.assert_close(original, log_prob(a, mu, log_b, scale_factor=1.0, **kw))
    exact = log_prob(a, mu, log_b, scale_factor=5.0, exact=True, **kw)
    density = torch.distributions.Laplace(mu, 5.0 * log_b.exp()).log_prob(a).sum(-1)
    torch.testing.assert_close(exact, density)
    # exact mode does not clamp: a log-scale far outside the clip range keeps its value and gradient
    big = torch.full_like(a, 2.0, requires_grad=True)
    exact_big = log_prob(a, mu, big, scale_factor=1.0, exact=True, **kw)
    torch.testing.assert_close(exact_big, torch.distributions.Laplace(mu, big.exp()).log_prob(a).sum(-1))


def test_one_distribution_object_samples_and_scores_as_the_switches_say():
    """`ActionDistribution.from_algo`: sampling uses scale_factor x b; the ratio's log-prob leaves it out and clamps
    log_b (the original) or uses the sampling density itself (exact_behavior_logprob)."""
    from ript_ablate.config import AlgoConfig
    from ript_ablate.ript.distributions import ActionDistribution

    mu, log_b = np.zeros((2, 3), np.float32), np.full((2, 3), -3.0, np.float32)
    for laplace in (True, False):
        dist = ActionDistribution.from_algo(AlgoConfig(use_laplace_sampling=laplace, scale_factor=4.0))
        noise_rng, rng = np.random.default_rng(7), np.random.default_rng(7)
        noise = noise_rng.laplace(size=(2, 3)) if laplace else noise_rng.standard_normal((2, 3))
        np.testing.assert_allclose(dist.sample(mu, log_b, rng), 4.0 * np.exp(-3.0) * noise, rtol=1e-6)
    a = torch.full((1, 1, 1), 0.1)
    mu_t, lb_t = torch.zeros(1, 1, 1), torch.full((1, 1, 1), -3.0)
    original = ActionDistribution.from_algo(AlgoConfig(scale_factor=4.0))  # clamp [-2, 0.5], no scale_factor
    exact = ActionDistribution.from_algo(AlgoConfig(scale_factor=4.0, exact_behavior_logprob=True))
    b = 4.0 * math.exp(-3.0)
    assert float(exact.log_prob(a, mu_t, lb_t)) == pytest.approx(-math.log(2 * b) - 0.1 / b, rel=1e-5)
    assert float(original.log_prob(a, mu_t, lb_t)) == pytest.approx(2.0 - math.log(2) - 0.1 / math.exp(-2.0), rel=1e-5)
