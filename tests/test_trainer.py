"""The RIPT loop end to end on a tiny config: determinism, learning, checkpoint resume, MLflow, divergence."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from ript_ablate import checkpoints
from ript_ablate.bc import ensure_base
from ript_ablate.cli import EXIT_DIVERGED, main
from ript_ablate.config import AlgoConfig, PolicyConfig, config_from_dict
from ript_ablate.policies.reference import build_policy, inject_lora, lora_parameters
from ript_ablate.ript import rollouts as ript_rollouts
from ript_ablate.ript.trainer import Trainer
from ript_ablate.ript.update import PPOUpdater, Trajectory
from ript_ablate.episodes import Episode, InitialState


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """A cache holding the tiny config's behaviour-cloning base, built once (the explicit step before training)."""
    cache = str(tmp_path_factory.mktemp("cache"))
    ensure_base(config_from_dict(train_dict(cache, cache)))
    return cache


def train_dict(cache: str, out: str, **algo) -> dict:
    return {
        "suite": {"tasks": ["reach-v3"], "demos_per_task": 2, "contexts_per_task": 4, "eval_states_per_task": 4,
                  "num_workers": 0, "envs_per_worker": 8},
        "policy": {"d_model": 32, "n_layers": 1, "n_heads": 2, "chunk_size": 4},
        "sft": {"steps": 300, "scale_steps": 50, "batch_size": 64, "cache_dir": cache},
        "algo": {"max_episode_length": 60, "rloo_batch_size": 4, "scale_factor": 5.0, "lr": 1e-3,
                 "header_lr": 1e-3, "max_step_batch_size": 64, "gradient_accumulation_steps": 3, "lora_rank": 4,
                 **algo},
        "training": {"n_iterations": 2, "contexts_per_iteration": 2, "eval_interval": 1, "save_interval": 1,
                     "output_dir": out},
        "tracking": {"experiment": "tests"},
    }


def without_timings(history):
    return [{k: v for k, v in h.items() if not k.startswith("perf/")} for h in history]


def test_same_seed_same_history_and_parameters_move(shared_cache, tmp_path):
    cfg = config_from_dict(train_dict(shared_cache, str(tmp_path)))
    first = Trainer(cfg).run(tmp_path / "a")
    second = Trainer(cfg).run(tmp_path / "b")
    assert first.status == "finished"
    assert without_timings(first.history) == without_timings(second.history)
    assert first.history[1]["sampling/accepted_groups"] > 0, "the tiny setting must give mixed rewards"
    base = checkpoints.load_tensors(_base_file(shared_cache))
    final = checkpoints.load_tensors(first.final_checkpoint / checkpoints.MODEL_FILE)
    moved = [k for k in base if not torch.equal(base[k], final[k])]
    assert any(k.startswith("backbone.") for k in moved) and any(k.startswith("action_head.") for k in moved)
    assert not any(k.startswith("scale_head.") for k in moved)  # fix_scale_head (default true)
    for key in ("eval/success_rate", "train/success_rate", "rloo/advantage_mean", "rloo/nonzero_adv_fraction",
                "sampling/contexts_tried", "sampling/zero_variance_groups", "ppo/loss", "ppo/ratio_mean",
                "ppo/clip_fraction", "ppo/approx_kl", "grad_norm/backbone", "grad_norm/header", "scale/log_b_mean",
                "scale/log_b_clipped_fraction", "perf/env_steps_per_s", "perf/iteration_s",
                "health/nonfinite_events"):
        assert key in first.history[1], key


def test_evaluations_between_the_first_and_the_last_use_the_subset(shared_cache, tmp_path):
    data = train_dict(shared_cache, str(tmp_path))
    data["training"]["eval_subset_per_task"] = 1
    result = Trainer(config_from_dict(data)).run(tmp_path / "run")
    states = {int(h["iteration"]): h["eval/states/reach-v3"] for h in result.history if "eval/states/reach-v3" in h}
    assert states == {0: 4.0, 1: 1.0, 2: 4.0}


def _base_file(cache: str):
    from pathlib import Path

    (path,) = Path(cache).glob("sft/*/model.safetensors")
    return path


def test_checkpoint_round_trip_resumes_identically(shared_cache, tmp_path):
    full = Trainer(config_from_dict(train_dict(shared_cache, str(tmp_path)))).run(tmp_path / "full")
    saved = full.output_dir / "checkpoints" / "iter_0001"
    assert (saved / checkpoints.ADAPTER_FILE).is_file() and checkpoints.read_meta(saved)["iteration"] == 1
    resumed = Trainer(config_from_dict(train_dict(shared_cache, str(tmp_path), lora_adaptor_ckpt=str(saved)))).run(
        tmp_path / "resumed")
    assert [h["iteration"] for h in resumed.history] == [1, 2]
    a = checkpoints.load_tensors(full.final_checkpoint / checkpoints.ADAPTER_FILE)
    b = checkpoints.load_tensors(resumed.final_checkpoint / checkpoints.ADAPTER_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # eval-only from the saved adapter: parameters identical to those saved
    only = Trainer(config_from_dict(train_dict(shared_cache, str(tmp_path), lora_adaptor_ckpt=str(saved),
                                               eval_only=True))).run(tmp_path / "only")
    c = checkpoints.load_tensors(only.final_checkpoint / checkpoints.ADAPTER_FILE)
    d = checkpoints.load_tensors(saved / checkpoints.ADAPTER_FILE)
    assert all(torch.equal(c[k], d[k]) for k in d)


def test_missing_adapter_directory_is_named(shared_cache, tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(train_dict(shared_cache, str(tmp_path), lora_adaptor_ckpt=str(tmp_path / "nope"))))
    assert main(["train", str(path), "--no-track"]) == 1
    err = capsys.readouterr().err
    assert "adapter directory not found" in err and "Traceback" not in err


def test_tracked_run_in_mlflow(shared_cache, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    calls = []
    original = MlflowClient.log_batch

    def counting(self, run_id, metrics=(), params=(), tags=(), **kw):
        if metrics:
            calls.append(len(metrics))
        return original(self, run_id, metrics=metrics, params=params, tags=tags, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", counting)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(train_dict(shared_cache, str(tmp_path / "runs"))))
    assert main(["train", str(path), "--output", str(tmp_path / "run")]) == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["ript.status"] == "finished"
    assert run.data.params["algo.ppo_clip_high"] == "0.1" and "git_commit" in run.data.tags
    assert run.data.tags["device"] == "cpu" and run.data.tags["torch_version"] == torch.__version__
    assert len(calls) == 3  # iteration 0 (eval), 1 and 2: one batch each
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "eval/success_rate")]
    assert steps == [0, 1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoint"} <= artifacts


def test_nonfinite_updates_end_the_run_diverged(shared_cache, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from ript_ablate.ript import update

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(update, "clipped_loss", lambda ratio, adv, lo, hi: ratio * float("nan"))
    data = train_dict(shared_cache, str(tmp_path / "runs"))
    data["training"]["max_nonfinite"] = 0
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["train", str(path)]) == EXIT_DIVERGED
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["ript.status"] == "diverged"
    assert run.data.metrics["health/nonfinite_events"] >= 1


# ----------------------------------------------------------------------------------------------- unit pieces


def tiny_policy(algo: AlgoConfig):
    cfg = PolicyConfig(d_model=16, n_layers=1, n_heads=2, chunk_size=2, max_instruction_tokens=4)
    policy = build_policy(cfg, 39, 4)
    inject_lora(policy, algo.lora_rank, 8, 0.0, cfg.lora_targets)
    return policy


def trajectory(policy, advantage: float, mode: str = "sum_on_action_dim", seed: int = 0) -> Trajectory:
    g = torch.Generator().manual_seed(seed)
    obs, actions = torch.randn(3, 39, generator=g), torch.randn(3, 2, 4, generator=g) * 0.1
    shape = (3, 2, 4) if mode == "ratio_on_action_dim" else (3, 2)
    return Trajectory({"state": obs}, torch.tensor([1, 2, 0, 0]), actions, torch.ones(shape), torch.full(shape, -1.0), advantage)


@pytest.mark.parametrize("fix", [True, False])
def test_parameter_groups_and_fix_scale_head(fix):
    # a wide log_scale_clip: under the original [-2, 0.5] the BC scale (log_b ~ -3) is clamped and gets no gradient
    algo = AlgoConfig(lr=1e-3, header_lr=1e-5, fix_scale_head=fix, lora_rank=2, log_scale_clip=[-10.0, 10.0])
    policy = tiny_policy(algo)
    updater = PPOUpdater(policy, algo, torch.device("cpu"))
    backbone, header = updater.optimizer.param_groups
    assert backbone["lr"] == 1e-3 and header["lr"] == 1e-5
    assert {id(p) for p in backbone["params"]} == {id(p) for p in lora_parameters(policy)}
    scale_ids = {id(p) for p in policy.scale_head.parameters()}
    assert scale_ids.isdisjoint({id(p) for p in header["params"]}) == fix
    # gradient reaches the backbone through log_b even when the scale head is fixed
    policy.zero_grad()
    _, log_b = policy({"state": torch.randn(2, 39)}, torch.tensor([[1, 2, 0, 0]] * 2))
    log_b.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(policy))
    before = [p.detach().clone() for p in policy.scale_head.parameters()]
    policy.zero_grad()
    updater.update([trajectory(policy, 1.0), trajectory(policy, -1.0, seed=1)], np.random.default_rng(0), 3)
    moved = any(not torch.equal(a, b) for a, b in zip(before, policy.scale_head.parameters()))
    assert moved == (not fix)


def test_gradient_accumulation_steps_on_a_leftover_group():
    algo = AlgoConfig(gradient_accumulation_steps=2, num_ppo_epochs=2, lora_rank=2)
    policy = tiny_policy(algo)
    updater = PPOUpdater(policy, algo, torch.device("cpu"))
    trajs = [trajectory(policy, (-1.0) ** i, seed=i) for i in range(5)]
    out = updater.update(trajs, np.random.default_rng(0), 3)
    assert out["metrics"]["ppo/optimizer_steps"] == 2 * 3  # groups of 2, 2 and the leftover 1, per pass


def test_micro_step_gradient_is_the_weighted_trajectory_mean_loss():
    """weight x mean over valid steps of max(-A r, -A clip(r)): a leftover group of one steps with weight 1."""
    algo = AlgoConfig(gradient_accumulation_steps=4, lora_rank=2)
    policy = tiny_policy(algo)
    updater = PPOUpdater(policy, algo, torch.device("cpu"))
    traj = trajectory(policy, 1.0)
    traj.mask[2, 1] = 0.0  # one invalid step (after success)
    stats = {k: torch.zeros(()) for k in ("loss", "ratio", "clipped_low", "clipped_high", "approx_kl", "count",
                                          "log_b", "log_b_clipped", "log_b_count", "micro_batches")}
    for weight in (1.0, 0.25):
        policy.zero_grad()
        updater._micro_step(traj, weight, stats)
        got = [p.grad.clone() for p in updater.head_params]
        policy.zero_grad()
        mu, log_b = policy(traj.obs, traj.instr.expand(3, -1))
        lb = log_b.clamp(-2.0, 0.5)
        lp = (-lb - (traj.actions - mu).abs() / lb.exp() - math.log(2)).sum(-1)
        r = torch.exp(lp - traj.old_logp)
        per_step = torch.maximum(-r, -r.clamp(0.9, 1.1))
        (weight * (per_step * traj.mask).sum() / 5.0).backward()
        for a, p in zip(got, updater.head_params):
            torch.testing.assert_close(a, p.grad)
    assert float(stats["count"]) == 2 * 5


@pytest.mark.parametrize("mode", ["sum_on_action_dim", "ratio_on_action_dim"])
def test_packed_group_gradient_equals_the_sum_of_per_trajectory_gradients(mode):
    """Packing a GA group's rows into shared passes changes nothing but speed: same gradient, same statistics."""
    algo = AlgoConfig(gradient_accumulation_steps=3, lora_rank=2, max_step_batch_size=4, log_prob_mode=mode,
                      fix_scale_head=False, log_scale_clip=[-10.0, 10.0])
    policy = tiny_policy(algo)
    updater = PPOUpdater(policy, algo, torch.device("cpu"))
    trajs = [trajectory(policy, adv, mode=mode, seed=i) for i, adv in enumerate((1.0, -0.5, 0.25))]
    trajs[1].mask[2] = 0.0  # a trajectory that ended early: its mean runs over fewer steps
    keys = ("loss", "ratio", "clipped_low", "clipped_high", "approx_kl", "count", "log_b", "log_b_clipped",
            "log_b_count", "micro_batches")
    weights = [1 / 3] * 3
    packed_stats = {k: torch.zeros(()) for k in keys}
    policy.zero_grad()
    updater._micro_batch(trajs, weights, packed_stats)  # 9 rows in passes of 4, 4 and 1: rows of 2-3 trajectories
    packed = [p.grad.clone() for p in updater.backbone_params + updater.head_params]
    single_stats = {k: torch.zeros(()) for k in keys}
    policy.zero_grad()
    for traj, weight in zip(trajs, weights):
        updater._micro_step(traj, weight, single_stats)
    for a, p in zip(packed, updater.backbone_params + updater.head_params):
        torch.testing.assert_close(a, p.grad)
    for key in keys:
        torch.testing.assert_close(packed_stats[key], single_stats[key])


class FakePool:
    """Deterministic stand-in for the rollout pool: success = f(state, seed)."""

    def __init__(self, success):
        self.success = success
        self.jobs = []

    def run(self, jobs, sampling=None, on_batch=None):
        self.jobs += jobs
        out = []
        for job in jobs:
            ok = self.success(job)
            out.append(Episode(job.state.task, job.state.state_id, ok, 5, {"state": np.zeros((2, 39), np.float32)},
                               np.zeros((2, 2, 4), np.float32), np.ones((2, 2), bool),
                               {"mu": np.zeros((2, 2, 4), np.float32), "log_b": np.zeros((2, 2, 4), np.float32)}))
        return out


def states(n, task="reach-v3"):
    return [InitialState(task, f"{task}/context/{i}", np.full(3, float(i))) for i in range(n)]


def test_dynamic_sampling_is_capped_when_every_context_is_solved():
    algo = AlgoConfig(rloo_batch_size=4, max_sampling_attempts=7)
    got = ript_rollouts.collect(FakePool(lambda job: True), states(5), algo, quota=3, iteration=1)
    assert got.tried == 7 and got.accepted == [] and got.zero_variance == 7
    assert got.metrics(["reach-v3"])["sampling/shortfall"] == 3


def test_dynamic_sampling_keeps_mixed_groups_and_stops_at_the_quota():
    # contexts with an even id succeed in half their rollouts, odd ones never
    def success(job):
        return int(job.state.state_id.rsplit("/", 1)[1]) % 2 == 0 and job.seed % 2 == 0

    algo = AlgoConfig(rloo_batch_size=8)
    got = ript_rollouts.collect(FakePool(success), states(10), algo, quota=3, iteration=1)
    assert len(got.accepted) == 3 and all(not g.degenerate for g in got.accepted)
    assert got.tried == 3 + got.zero_variance
    off = ript_rollouts.collect(FakePool(success), states(10), AlgoConfig(rloo_batch_size=8,
                                enable_dynamic_sampling=False), quota=3, iteration=1)
    assert off.tried == 3 and len(off.accepted) == 3  # without dynamic sampling nothing is discarded


def test_speculative_rounds_accept_exactly_what_sequential_sampling_accepts():
    """Rounds are sized from the acceptance rate, but contexts are judged in order: the accepted groups are the first
    `quota` mixed groups of the iteration's context order, and what was rolled out past them is surplus."""
    mixed_ids = {1, 4, 5, 9, 12, 13, 17}  # these contexts succeed in half their rollouts, the others never

    def success(job):
        return int(job.state.state_id.rsplit("/", 1)[1]) in mixed_ids and job.seed % 2 == 0

    class TwoWorkers(FakePool):
        num_workers = 2

    pool = TwoWorkers(success)
    algo = AlgoConfig(rloo_batch_size=4)
    got = ript_rollouts.collect(pool, states(20), algo, quota=4, iteration=3)
    # the sequential reference: judge position p's context with position p's noise seeds, one at a time
    order = np.random.default_rng(ript_rollouts.stream_seed(algo.model_seed, "contexts", 3)).permutation(20)
    mixed_positions = []
    for p, i in enumerate(order):
        rewards = {i in mixed_ids and ript_rollouts.stream_seed(0, "noise", 3, p, j) % 2 == 0 for j in range(4)}
        if len(rewards) == 2:
            mixed_positions.append(p)
    expected = [f"reach-v3/context/{order[p]}" for p in mixed_positions[:4]]
    assert [g.context.state_id for g in got.accepted] == expected
    assert got.tried == mixed_positions[3] + 1 and got.zero_variance == got.tried - 4
    rolled = len(pool.jobs) // 4
    assert rolled >= got.tried and len(got.surplus_episodes) == 4 * (rolled - got.tried)
    metrics = got.metrics(["reach-v3"])
    assert metrics["sampling/surplus_contexts"] == rolled - got.tried
    assert metrics["perf/env_steps"] == 5 * len(pool.jobs)  # the surplus cost steps too
    assert metrics["perf/env_steps/reach-v3"] == 5 * len(pool.jobs)
    assert metrics["perf/episodes/reach-v3"] == len(pool.jobs)


def test_early_stop_percentage_lowers_the_target():
    algo = AlgoConfig(rloo_batch_size=4, early_stop_percentage=0.5)
    got = ript_rollouts.collect(FakePool(lambda job: job.seed % 2 == 0), states(10), algo, quota=4, iteration=1)
    assert len(got.accepted) == 2


def test_val_init_mixing_gives_each_rollout_its_own_state():
    evals = {"reach-v3": states(20)}
    mixed = AlgoConfig(rloo_batch_size=8, use_val_init=True, mix_val_init_in_rloo=True,
                       enable_dynamic_sampling=False)
    pool = FakePool(lambda job: True)
    ript_rollouts.collect(pool, evals["reach-v3"], mixed, quota=1, iteration=1, eval_states=evals)
    assert len({j.state.state_id for j in pool.jobs}) > 1
    tiled = AlgoConfig(rloo_batch_size=8, use_val_init=True, enable_dynamic_sampling=False)
    pool = FakePool(lambda job: True)
    ript_rollouts.collect(pool, evals["reach-v3"], tiled, quota=1, iteration=1, eval_states=evals)
    assert len({j.state.state_id for j in pool.jobs}) == 1 and len({j.seed for j in pool.jobs}) == 8


def test_ript_gain_mean_episode_lengths_weigh_by_episodes():
    from ript_ablate.bench.ript_gain import mean_episode_lengths, rollout_efficiency

    history = [{"iteration": 0},
               {"iteration": 1, "perf/env_steps/a": 300.0, "perf/episodes/a": 2.0, "perf/rollout_s": 2.0},
               {"iteration": 2, "perf/env_steps/a": 100.0, "perf/episodes/a": 2.0, "perf/env_steps/b": 50.0,
                "perf/episodes/b": 1.0, "perf/rollout_s": 1.0}]
    assert mean_episode_lengths(history) == {"a": 100, "b": 50}
    # raw stepping would need 400/200 + 50/100 = 2.5 s for what the rollouts did in 3 s
    assert rollout_efficiency(history, {"a": 200.0, "b": 100.0}) == pytest.approx(2.5 / 3.0)


def test_the_start_evaluation_is_computed_once_per_start_policy(tmp_path, monkeypatch):
    """Runs from one base share their iteration-0 evaluation whatever their seed or switches; a start policy that
    computes something else (here: its preparation moves the action head) is evaluated afresh."""
    cache = str(tmp_path / "cache")
    data = train_dict(cache, str(tmp_path))
    data["training"]["n_iterations"] = 0
    ensure_base(config_from_dict(data))
    first = Trainer(config_from_dict(data)).run(tmp_path / "a")
    other = {**data, "algo": {**data["algo"], "model_seed": 7, "use_laplace_sampling": False}}
    second = Trainer(config_from_dict(other)).run(tmp_path / "b")
    (start1,), (start2,) = first.history, second.history
    assert start1["perf/eval_cached"] == 0.0 and start2["perf/eval_cached"] == 1.0
    assert without_timings([start1]) == without_timings([start2])
    computed = Trainer(config_from_dict(other))  # the same start evaluated for real agrees with the cached one
    monkeypatch.setattr("ript_ablate.eval_cache.load", lambda cfg, key: None)
    assert without_timings(computed.run(tmp_path / "c").history) == without_timings([start1])
    monkeypatch.undo()
    from ript_ablate.policies.reference import model

    prepare = model.ReferencePolicy.prepare_for_rl

    def moved(self, cfg):
        prepare(self, cfg)
        with torch.no_grad():
            self.action_head.bias.add_(0.5)

    monkeypatch.setattr(model.ReferencePolicy, "prepare_for_rl", moved)
    third = Trainer(config_from_dict(data)).run(tmp_path / "d")
    assert third.history[0]["perf/eval_cached"] == 0.0


def test_ript_gain_prints_the_seed_and_the_per_state_intervals():
    from ript_ablate.bench.ript_gain import gain_intervals

    # 2 seeds, one task of 4 states: changes per state averaged over seeds 1, 0.5, 0, -0.5 -> +25.0 paired per state
    tags = [{"ript.outcomes.0.t": "0011", "ript.outcomes.5.t": "1011"},
            {"ript.outcomes.0.t": "0011", "ript.outcomes.5.t": "1110"}]
    histories = [[{"iteration": 0, "eval/states/t": 4.0}, {"iteration": 5, "eval/states/t": 4.0}]] * 2
    text = gain_intervals([0.25, 0.25], [{"t": 0.25}, {"t": 0.25}], histories, tags)
    # equal seeds: the interval is the states' least noise alone, (|d| - d^2) / n = 0.1875 / 4, a known variance
    # (Welch-Satterthwaite: infinite degrees of freedom, a normal quantile)
    half = 1.959964 * (0.1875 / 4) ** 0.5
    assert f"[{25 - 100 * half:+.1f}, {25 + 100 * half:+.1f}]" in text
    assert "paired per evaluation state (4 states) +25.0 [" in text
    one_seed = gain_intervals([0.25], [{"t": 0.25}], histories[:1], [{}])
    assert "paired per evaluation state" not in one_seed and "nan" not in one_seed
    assert "interval over seeds: needs 2 seeds or more" in one_seed


def test_ript_gain_continues_from_its_results_file(tiny_yaml, tmp_path, monkeypatch, capsys):
    """A seed in the results file is read, not run again; the summary covers every seed; a seed recorded under
    another configuration is refused, naming the file, and nothing is run."""
    from ript_ablate.bench import ript_gain
    from ript_ablate.errors import RiptAblateError

    ran = []

    def fake_run(cfg, tracker, out):  # success 50% -> 50% + seed/10 on one task of 4 states
        seed = cfg.algo.model_seed
        ran.append(seed)
        tracker.set_tags({"ript.outcomes.0.t": "0101", "ript.outcomes.5.t": "0111" if seed else "0101"})
        history = [{"iteration": 0, "eval/success_rate": 0.5, "eval/success_rate/t": 0.5, "eval/states/t": 4.0},
                   {"iteration": 5, "eval/success_rate": 0.5 + seed / 10, "eval/success_rate/t": 0.5 + seed / 10,
                    "eval/states/t": 4.0, "perf/rollout_s": 1.0, "perf/env_steps/t": 10.0, "perf/episodes/t": 1.0}]
        return history, 1.0, "base-a" if seed < 2 else "base-b"  # seed 2 as if measured at a commit that changed it

    monkeypatch.setattr(ript_gain, "run", fake_run)
    monkeypatch.setattr(ript_gain, "raw_rates", lambda cfg, seconds, lengths=None: {"t": 100.0})
    results = tmp_path / "gain.jsonl"

    def main(*args):
        monkeypatch.setattr("sys.argv", ["ript_gain", str(tiny_yaml), "--results", str(results), *args])
        ript_gain.main()
        return capsys.readouterr().out

    main("--seeds", "0")
    out = main("--seeds", "0", "1", "2")
    assert ran == [0, 1, 2]  # seed 0 once: the second invocation read it
    assert "measured earlier, read from" in out
    assert "mean gain over 3 seeds: +10.0 points" in out and "per seed: +0.0 +10.0 +20.0" in out
    assert ("these seeds started from 2 different bases (base-a, base-b); they evaluate alike on every one of the 4 "
            "evaluation states") in out
    assert len(results.read_text().splitlines()) == 3
    with pytest.raises(RiptAblateError, match=r"gain.jsonl holds seed 0 of variant 'config' measured with another "
                                              r"configuration \(algo.lr was [0-9.e-]+, now 0.0\)"):
        main("--seeds", "0", "3", "--set", "algo.lr=0")
    assert ran == [0, 1, 2]


def test_ript_gain_says_whether_different_bases_evaluate_alike():
    """Pooled seeds from two bases: the note says on how many states the bases' own evaluations differ."""
    from ript_ablate.bench.ript_gain import describe_bases

    def seed(base, reach, push):
        return {"base": base, "outcomes": {"ript.outcomes.0.reach": reach, "ript.outcomes.0.push": push,
                                           "ript.outcomes.15.reach": "1111", "ript.outcomes.15.push": "1111"}}

    assert describe_bases([seed("a", "0011", "01"), seed("a", "1111", "11")]) is None  # one base
    differ = describe_bases([seed("a", "0011", "01"), seed("b", "0111", "00"), seed("c", "0011", "01")])
    # b differs from a on reach's 2nd state and push's 2nd: 2 of 6; a and c succeed on 3 of 6, b on 3 of 6
    assert differ.endswith("differ on up to 2 of 6 evaluation states (base success 50.0%, 50.0%, 50.0%): the "
                           "pooled gain mixes bases")
    assert "3 different bases (a, b, c)" in differ
    missing = describe_bases([seed("a", "0011", "01"), {"base": "b", "outcomes": {}}])
    assert missing.endswith("cannot be compared")


def test_a_seed_records_its_commit_without_counting_the_results_file_it_grows(tmp_path):
    """A committed results file grows with each seed: that is no change to the code a seed ran; any other is."""
    import subprocess

    from ript_ablate.bench.gain_results import code_commit

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "measurements").mkdir()
    results, code = tmp_path / "measurements" / "gain.jsonl", tmp_path / "code.py"
    results.write_text("{}\n")
    code.write_text("x = 1\n")
    git("add", ".")
    git("commit", "-qm", "start")
    head = git("rev-parse", "HEAD")
    results.write_text("{}\n{}\n")  # the first seed appended
    assert code_commit(results, checkout=tmp_path / "measurements") == head
    assert code_commit(None, checkout=tmp_path) == head + "+changes"
    assert code_commit(tmp_path.parent / "elsewhere.jsonl", checkout=tmp_path) == head + "+changes"
    code.write_text("x = 2\n")
    assert code_commit(results, checkout=tmp_path) == head + "+changes"


def test_a_results_line_survives_a_setting_added_later_at_its_default(tiny_cfg):
    """Hours of measurement stay usable when the code grows a switch: a setting the line lacks is no difference
    at its default, and is one away from it; a line from before settings were kept needs its exact digest."""
    import dataclasses

    from ript_ablate.bench import gain_results
    from ript_ablate.errors import RiptAblateError

    line = {"config": gain_results.settings(tiny_cfg), "config_digest": "old"}
    del line["config"]["sft.token_label_sigma"]  # as if measured before the switch existed
    records = {("config", 0): line}
    assert gain_results.reusable(records, "r.jsonl", "config", 0, tiny_cfg) is line
    spread = dataclasses.replace(tiny_cfg, sft=dataclasses.replace(tiny_cfg.sft, token_label_sigma=4.0))
    with pytest.raises(RiptAblateError, match=r"sft.token_label_sigma is 4.0, not the default 0.0"):
        gain_results.reusable(records, "r.jsonl", "config", 0, spread)
    legacy = {("config", 0): {"config_digest": gain_results.config_digest(tiny_cfg)}}
    assert gain_results.reusable(legacy, "r.jsonl", "config", 0, tiny_cfg) is legacy[("config", 0)]
    with pytest.raises(RiptAblateError, match=r"predates kept settings"):
        gain_results.reusable(legacy, "r.jsonl", "config", 0, spread)


def test_an_evaluation_cached_without_state_outcomes_is_evaluated_again(tiny_cfg):
    from ript_ablate import eval_cache
    from ript_ablate.evaluation import EvalResult

    eval_cache.save(tiny_cfg, "k", EvalResult({"t": 0.5}, 2, 10, {"t": 2}, {"t": "01"}))
    assert eval_cache.load(tiny_cfg, "k").outcomes == {"t": "01"}
    path = eval_cache._path(tiny_cfg, "k")
    older = json.loads(path.read_text())
    del older["outcomes"]  # as written before outcomes were kept
    path.write_text(json.dumps(older))
    assert eval_cache.load(tiny_cfg, "k") is None


def test_sampled_evaluation_acts_as_rollouts_do_reproducibly_under_its_own_cache_key(tmp_path, monkeypatch):
    """`training.eval_mode: sample` evaluates the sampled behaviour (QueST's evaluation in the original): it moves
    with `scale_factor` where the mean action's evaluation does not, the same noise (seeded per state) gives the
    same outcomes when computed again, and it is cached apart from the mean action's evaluation."""
    def run(mode: str, scale_factor: float, name: str) -> dict:
        cfg = config_from_dict({
            "suite": {"name": "pointmass", "tasks": ["reach", "reach-mirror"], "demos_per_task": 5,
                      "contexts_per_task": 2, "eval_states_per_task": 20, "num_workers": 0},
            "policy": {"name": "mlp", "options": {"hidden": 64, "chunk_size": 4}},
            "sft": {"steps": 400, "scale_steps": 100, "batch_size": 64, "lr": 3e-3, "cache_dir": str(tmp_path / "c")},
            "algo": {"scale_factor": scale_factor, "log_scale_clip": None},
            "training": {"n_iterations": 0, "eval_mode": mode, "output_dir": str(tmp_path)},
            "tracking": {"enabled": False}})
        ensure_base(cfg)
        (start,) = Trainer(cfg).run(tmp_path / name).history
        return start

    mean, mean_wide = run("mean", 3.0, "a"), run("mean", 1000.0, "b")
    assert mean_wide["perf/eval_cached"] == 1.0  # the mean action does not depend on the sampling's scale
    sampled = run("sample", 3.0, "c")
    assert sampled["perf/eval_cached"] == 0.0  # not the mean action's entry
    assert sampled["eval/success_rate"] < mean["eval/success_rate"]  # this base's noise spoils its reaches
    wide = run("sample", 1000.0, "d")
    assert wide["perf/eval_cached"] == 0.0 and wide["eval/success_rate"] <= sampled["eval/success_rate"]
    monkeypatch.setattr("ript_ablate.eval_cache.load", lambda cfg, key: None)
    again = run("sample", 3.0, "e")  # computed afresh: the same noise per state, the same outcomes
    assert again["perf/eval_cached"] == 0.0 and without_timings([again]) == without_timings([sampled])
