"""The policy families' math against hand-computed values: the Flow-SDE transition, which steps a flow chunk's
log-prob uses and where its gradient goes, the bounded noise head, token log-probs (full softmax; temperature and
top-k, with a token outside the new top-k), laplace_ode as a Laplace log-prob around the ODE's output, and every
family's PPO ratio at 1 on unchanged weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ript_ablate.config import AlgoConfig, Config
from ript_ablate.families import ActionDistribution, FlowFamily, TokenFamily, build_family
from ript_ablate.families.flow import bounded_std, init_noise_head, sde_moments
from ript_ablate.families.laplace import log_prob as laplace_log_prob
from ript_ablate.families.tokens import gaussian_bin_targets, sample_tokens, token_log_prob
from ript_ablate.interfaces.policy import FlowPolicy
from ript_ablate.ript.update import Trajectory, rescore


def test_flow_sde_transition_mean_and_std_by_hand():
    x, v = torch.tensor([1.0]), torch.tensor([2.0])
    # K = 4 (d = 0.25), t = 0.5, a = 0.5: sigma = 0.5 sqrt(0.5 / 0.5) = 0.5
    mean, std = sde_moments(x, v, torch.tensor(0.5), 0.25, 0.5)
    assert float(mean) == pytest.approx(1 - 0.25 * 2 - (0.25 * 0.25 / (2 * 0.5)) * (1 + 0.5 * 2))  # 0.375
    assert float(std) == pytest.approx(math.sqrt(0.25) * 0.5)
    # t = 1 (the first step): the denominator is 1 - t_1 = d, so sigma = 0.5 sqrt(1 / 0.25) = 1
    mean, std = sde_moments(x, v, torch.tensor(1.0), 0.25, 0.5)
    assert float(mean) == pytest.approx(1 - 0.5 - (1.0 * 0.25 / 2) * 1.0)
    assert float(std) == pytest.approx(0.5)


class StepwisePolicy(FlowPolicy):
    """A flow policy whose velocity at step k is theta[k] (per step, so a gradient shows which steps are scored)
    and whose noise head outputs rho[k]."""

    def __init__(self, steps: int = 3, chunk: int = 2, dim: int = 2):
        super().__init__()
        self.chunk_size, self.action_dim, self.denoise_steps = chunk, dim, steps
        self.theta = nn.Parameter(torch.tensor([0.3, -0.2, 0.5])[:steps])
        self.rho = nn.Parameter(torch.tensor([0.0, 1.0, -1.0])[:steps])
        self.scale = nn.Linear(1, dim)

    def _k(self, t: torch.Tensor) -> torch.Tensor:
        return torch.round((1 - t) * self.denoise_steps).long()

    def forward(self, obs, instr):
        return obs["state"]

    def velocity(self, prefix, x_t, t):
        return self.theta[self._k(t)].view(-1, 1, 1).expand_as(x_t) + 0 * x_t

    def noise_std_raw(self, prefix, x_t, t):
        return self.rho[self._k(t)].view(-1, 1, 1).expand_as(x_t)

    def log_scale(self, prefix):
        return self.scale(prefix[:, :1]).unsqueeze(1).expand(-1, self.chunk_size, -1)

    def encode_instruction(self, text):
        return torch.zeros(1)

    def modules_by_role(self):
        return {"backbone": nn.Identity(), "action_head": nn.Identity(), "scale_head": self.scale}


def chain_record(steps: int = 3, noisy: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"chain": torch.randn(1, steps + 1, 2, 2, generator=g), "step": torch.tensor([noisy])}


def gaussian(x: torch.Tensor, mean: torch.Tensor, std: float | torch.Tensor) -> torch.Tensor:
    std = torch.as_tensor(std)
    return -torch.log(std) - 0.5 * ((x - mean) / std) ** 2 - 0.5 * math.log(2 * math.pi)


def test_flow_sde_scores_only_its_stochastic_step_and_its_gradient_reaches_only_that_velocity():
    policy, rec = StepwisePolicy(), chain_record(noisy=1)
    family = FlowFamily(steps=3, logprob="flow_sde", noise_level=0.5, log_prob_mode="ratio_on_action_dim")
    logp, _ = family.score(policy, {"state": torch.zeros(1, 1)}, torch.zeros(1, 1), torch.zeros(1, 2, 2), rec, "fp32")
    x, nxt, t, d = rec["chain"][0, 1], rec["chain"][0, 2], 1 - 1 / 3, 1 / 3
    sigma = 0.5 * math.sqrt(t / (1 - t))
    mean = x - d * -0.2 - (sigma ** 2 * d / (2 * t)) * (x + (1 - t) * -0.2)
    torch.testing.assert_close(logp[0], gaussian(nxt, mean, math.sqrt(d) * sigma))
    logp.sum().backward()
    assert policy.theta.grad[1] != 0 and policy.theta.grad[0] == 0 and policy.theta.grad[2] == 0


@pytest.mark.parametrize("chain", ["sum", "mean"])
def test_flow_noise_scores_every_step_summed_or_averaged(chain):
    policy, rec = StepwisePolicy(), chain_record()
    bounds = (0.08, 0.16)
    family = FlowFamily(steps=3, logprob="flow_noise", noise_std=bounds, chain=chain,
                        log_prob_mode="ratio_on_action_dim")
    logp, scales = family.score(policy, {"state": torch.zeros(1, 1)}, torch.zeros(1, 1), torch.zeros(1, 2, 2), rec,
                                "fp32")
    c, d = rec["chain"][0], 1 / 3
    total = gaussian(c[0], torch.zeros(2, 2), 1.0)
    for k, (theta, rho) in enumerate(zip([0.3, -0.2, 0.5], [0.0, 1.0, -1.0])):
        std = 0.08 + 0.08 / (1 + math.exp(-rho))
        total = total + gaussian(c[k + 1], c[k] - d * theta, std)
    torch.testing.assert_close(logp[0], total if chain == "sum" else total / 4)
    logp.sum().backward()
    assert (policy.theta.grad != 0).all() and (policy.rho.grad != 0).all()  # every step, and the noise head
    assert "noise_std" in scales


def test_the_noise_head_std_stays_inside_its_bounds_and_starts_where_configured():
    raw = torch.tensor([-1e4, -3.0, 0.0, 3.0, 1e4])
    std = bounded_std(raw, (0.08, 0.16))
    assert (std >= 0.08).all() and (std <= 0.16).all() and std[0] == pytest.approx(0.08)
    head = nn.Linear(5, 3)
    init_noise_head(head, (0.04, 0.10), 0.05)
    torch.testing.assert_close(bounded_std(head(torch.randn(7, 5)), (0.04, 0.10)), torch.full((7, 3), 0.05))


def test_token_log_prob_full_softmax_and_tempered_top_k_with_a_token_outside_the_new_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], requires_grad=True)
    full = token_log_prob(logits, torch.tensor([2]), exact=False).detach()
    assert float(full) == pytest.approx(0.0 - math.log(sum(math.exp(v) for v in (2, 1, 0, -1))))
    # temperature 2, top-2: the behaviour distribution is softmax([1, 0.5]) over tokens {0, 1}
    inside = token_log_prob(logits, torch.tensor([0]), exact=True, temperature=2.0, top_k=2).detach()
    assert float(inside) == pytest.approx(1.0 - math.log(math.exp(1.0) + math.exp(0.5)))
    # token 3 was sampled when it was in the top-2; under these logits it is not: it stays in the support
    outside = token_log_prob(logits, torch.tensor([3]), exact=True, temperature=2.0, top_k=2)
    assert float(outside.detach()) == pytest.approx(-0.5 - math.log(math.exp(1.0) + math.exp(0.5) + math.exp(-0.5)))
    outside.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 3] > 0 and logits.grad[0, 2] == 0


def test_gaussian_bin_targets_by_hand():
    """4 bins over [-1, 1] (width 0.5), sigma one bin: inner edges -0.5, 0, 0.5 are -1, 0, +1 sigma from an action
    at 0, so the bins get Phi(-1), Phi(0) - Phi(-1), ...; the mass beyond the range stays in the end bins."""
    phi = [0.5 * (1 + math.erf(z / math.sqrt(2))) for z in (-1.0, 0.0, 1.0)]
    spread = gaussian_bin_targets(torch.tensor([0.0, 1.0]), 4, -1.0, 1.0, 1.0)
    np.testing.assert_allclose(spread[0].numpy(), [phi[0], phi[1] - phi[0], phi[2] - phi[1], 1 - phi[2]], atol=1e-6)
    np.testing.assert_allclose(spread.sum(-1).numpy(), [1.0, 1.0], atol=1e-6)
    far = 0.5 * (1 + math.erf(-1.0 / math.sqrt(2)))  # the action at 1.0: the last inner edge is 1 sigma below it
    assert float(spread[1, 3]) == pytest.approx(1 - far, abs=1e-6)
    sharp = gaussian_bin_targets(torch.tensor([0.3]), 4, -1.0, 1.0, 1e-3)  # a tiny sigma: the expert's bin alone
    np.testing.assert_allclose(sharp[0].numpy(), [0, 0, 1, 0], atol=1e-6)


def test_spread_token_targets_train_the_bin_order_that_one_hot_ones_do_not():
    """Cloned with the spread target, a bin next to the expert's keeps more probability than a far one."""
    from ript_ablate.families import tokens as token_family

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.z = nn.Parameter(torch.zeros(1, 1, 1, 8))

        def forward(self, obs, instr):
            return self.z

    target, mask = torch.full((1, 1, 1), -0.375), torch.ones(1, 1)  # the centre of bin 2 of 8 over [-1, 1]
    learned = {}
    for sigma in (0.0, 1.0):
        model = Logits()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        for _ in range(200):
            loss = token_family.bc_loss(model, {}, torch.zeros(1), target, mask, "fp32", None, sigma)
            opt.zero_grad()
            loss.backward()
            opt.step()
        learned[sigma] = torch.softmax(model.z.detach()[0, 0, 0], -1)
    one_hot, spread = learned[0.0], learned[1.0]
    assert int(one_hot.argmax()) == int(spread.argmax()) == 2
    assert spread[1] > 10 * spread[6] and one_hot[1] == pytest.approx(one_hot[6])  # one-hot: no order at all


def test_token_sampling_never_leaves_the_top_k_and_follows_the_tempered_softmax():
    rng = np.random.default_rng(0)
    logits = np.tile(np.array([2.0, 1.0, 0.0, -1.0], np.float32), (20000, 1))
    drawn = sample_tokens(logits, 2.0, 3, rng)
    assert set(np.unique(drawn)) <= {0, 1, 2}
    p = np.exp(np.array([1.0, 0.5, 0.0]))
    np.testing.assert_allclose(np.bincount(drawn, minlength=3)[:3] / len(drawn), p / p.sum(), atol=0.01)


def test_laplace_ode_is_the_laplace_log_prob_around_the_ode_output():
    policy = StepwisePolicy()  # velocities 0.3, -0.2, 0.5 from zero noise: mu = -(0.3 - 0.2 + 0.5) / 3
    family = FlowFamily(steps=3, logprob="laplace_ode", laplace=ActionDistribution(scale_factor=3.0, exact=True))
    obs = {"state": torch.tensor([[0.7]])}
    actions = torch.tensor([[[0.1, -0.4], [0.0, 0.2]]])
    logp, scales = family.score(policy, obs, torch.zeros(1, 1), actions, {}, "fp32")
    mu = torch.full((1, 2, 2), -0.6 / 3)
    expected = laplace_log_prob(actions, mu, scales["log_b"], laplace=True, mode="sum_on_action_dim",
                                log_scale_clip=None, scale_factor=3.0, exact=True)
    torch.testing.assert_close(logp, expected)


@pytest.mark.parametrize(("head", "extra"), [
    ("laplace", {}), ("tokens", {"token_logprob": "original"}),
    ("tokens", {"token_logprob": "exact", "temperature": 1.5, "top_k": 5}), ("flow", {"flow_logprob": "flow_sde"}),
    ("flow", {"flow_logprob": "flow_noise", "flow_chain_logprob": "sum"}), ("flow", {"flow_logprob": "laplace_ode"}),
])
def test_every_familys_ppo_ratio_is_one_on_unchanged_weights(head, extra):
    from ript_ablate.policies.reference import build_policy

    cfg = Config()
    cfg.policy.head, cfg.policy.d_model, cfg.policy.n_layers, cfg.policy.n_bins = head, 32, 1, 16
    cfg.algo = AlgoConfig(**{"scale_factor": 5.0, **extra})
    torch.manual_seed(0)
    policy = build_policy(cfg.policy, 6, 3).eval()
    family = build_family(cfg.algo, policy)
    obs = {"state": torch.randn(5, 6)}
    instr = torch.randint(1, 50, (10,)).expand(5, -1)
    draw = family.act(policy, obs, instr, [np.random.default_rng(i) for i in range(5)], [True] * 5, "fp32")
    actions = torch.from_numpy(np.stack(draw.actions)).float()
    record = {k: torch.from_numpy(v) for k, v in draw.record.items()}
    old = family.old_log_prob(actions, record)
    if old is None:  # re-scored by the trainer's model before the first epoch
        traj = Trajectory(obs, instr[0], actions, torch.ones(5, 4), torch.zeros(0), 1.0,
                          record={k: record[k] for k in family.scored_record_keys})
        old = rescore(policy, family, traj, 2, "fp32")
    new, _ = family.score(policy, obs, instr[0].expand(5, -1), actions, record, "fp32")
    assert torch.isfinite(new).all()
    torch.testing.assert_close(torch.exp(new - old), torch.ones_like(new), atol=1e-4, rtol=0)
