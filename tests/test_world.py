"""Meta-World world: reproducible demonstrations, contexts and evaluation states; rollout semantics."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from ript_ablate.config import config_from_dict
from ript_ablate.engine import RolloutEngine
from ript_ablate.demos import run_expert
from ript_ablate.episodes import EpisodeJob, InitialState
from ript_ablate.plugins import build_world
from ript_ablate.policies.reference import build_policy
from ript_ablate.ript.distributions import ActionDistribution
from ript_ablate.worlds.metaworld import resolve_tasks

build_suite = build_world


def with_rollout(cfg, workers: int, envs: int, length: int | None):
    """The config with this rollout layout."""
    cfg = copy.deepcopy(cfg)
    cfg.suite.num_workers, cfg.suite.envs_per_worker, cfg.algo.max_episode_length = workers, envs, length
    return cfg


def test_presets_expand():
    assert resolve_tasks(["quick"]) == ["reach-v3", "push-v3", "pick-place-v3"]
    assert len(resolve_tasks(["mt10"])) == 10
    assert resolve_tasks(["reach-v3", "quick"])[0] == "reach-v3" and len(resolve_tasks(["reach-v3", "quick"])) == 3


def test_states_reproducible_for_a_seed_and_disjoint(tiny_dict):
    a, b = build_suite(config_from_dict(tiny_dict)), build_suite(config_from_dict(tiny_dict))
    for kind in ("extra_contexts", "eval_states"):
        va = np.stack([s.data for s in getattr(a, kind)("reach-v3")])
        vb = np.stack([s.data for s in getattr(b, kind)("reach-v3")])
        np.testing.assert_array_equal(va, vb)
    other = dict(tiny_dict, suite=dict(tiny_dict["suite"], seed=5))
    c = build_suite(config_from_dict(other))
    assert not np.array_equal(a.extra_contexts("reach-v3")[0].data, c.extra_contexts("reach-v3")[0].data)
    # evaluation states have their own seed: the suite seed does not move them
    np.testing.assert_array_equal(a.eval_states("reach-v3")[0].data, c.eval_states("reach-v3")[0].data)


def test_demonstrations_reproducible_successful_and_disjoint_from_eval(tiny_cfg, tmp_path):
    suite = build_suite(tiny_cfg)
    with RolloutEngine(tiny_cfg) as pool:
        first = suite.demonstrations(pool, cache_dir=None)
        second = build_suite(tiny_cfg).demonstrations(pool, cache_dir=tmp_path)
        cached = build_suite(tiny_cfg).demonstrations(pool, cache_dir=tmp_path)
    for demos in (second, cached):
        assert [s.state_id for s in demos.states["reach-v3"]] == [s.state_id for s in first.states["reach-v3"]]
        for x, y in zip(first.episodes["reach-v3"], demos.episodes["reach-v3"]):
            np.testing.assert_array_equal(x.actions, y.actions)
            np.testing.assert_array_equal(x.obs["state"], y.obs["state"])
    assert all(ep.success for ep in first.episodes["reach-v3"]) and len(first.episodes["reach-v3"]) == 2
    assert np.abs(first.episodes["reach-v3"][0].actions).max() <= 1.0
    suite.check_disjoint(first)
    contexts = suite.training_contexts("reach-v3", first)
    assert len(contexts) == 2 + 2 and contexts[0].state_id.startswith("reach-v3/demo/")


def test_demonstrations_record_the_experts_success_rate_per_task_and_keep_it_in_the_cache(tmp_path):
    """An expert that fails on odd candidates: 3 demonstrations want 5 candidates (3 + 2 spare), and the third
    success comes from the fifth; a task where it always succeeds needs 3 of its 5. Saved and loaded with the cache."""
    from ript_ablate.demos import collect_demonstrations
    from ript_ablate.episodes import Episode, InitialState

    class Engine:
        def run(self, jobs, on_batch=None):
            return [Episode(j.state.task, j.state.state_id, j.state.task == "easy" or int(j.state.state_id) % 2 == 0,
                            1, {"state": np.zeros((1, 2))}, np.zeros((1, 4)), np.ones((1, 1), dtype=bool))
                    for j in jobs]

    def candidates(task, n):
        return [InitialState(task, str(i), np.full(3, i, dtype=float)) for i in range(n)]

    demos = collect_demonstrations(["hard", "easy"], Engine(), 3, candidates, tmp_path / "demos.npz")
    assert demos.expert_record == {"hard": (3, 5), "easy": (5, 5)}
    assert [s.state_id for s in demos.states["hard"]] == ["0", "2", "4"]
    assert demos.expert_summary() == "the expert succeeded in 8 of 10 episodes (80%; least: hard 3/5)"
    cached = collect_demonstrations(["hard", "easy"], Engine(), 3, candidates, tmp_path / "demos.npz")
    assert cached.expert_record == demos.expert_record


def _policy(cfg):
    policy = build_policy(cfg.policy, 39, 4)
    return policy


@pytest.mark.parametrize("workers", [0, 2])
def test_rollouts_reproducible_for_a_seed(tiny_cfg, workers):
    suite = build_suite(tiny_cfg)
    states = suite.extra_contexts("reach-v3")
    jobs = [EpisodeJob(states[i % 2], seed=100 + i) for i in range(6)]
    runs = []
    distribution = ActionDistribution(laplace=True, scale_factor=3.0)
    with RolloutEngine(with_rollout(tiny_cfg, workers, 2, 40)) as pool:
        pool.set_policy(_policy(tiny_cfg))
        for _ in range(2):
            runs.append(pool.run(jobs, distribution))
    with RolloutEngine(with_rollout(tiny_cfg, 0, 2, 40)) as pool:  # another process layout: same episodes
        pool.set_policy(_policy(tiny_cfg))
        runs.append(pool.run(jobs, distribution))
    for run in runs[1:]:
        for x, y in zip(runs[0], run):
            np.testing.assert_array_equal(x.actions, y.actions)
            assert x.length == y.length and x.success == y.success
    # different noise seeds give different actions
    assert not np.allclose(runs[0][0].actions, runs[0][2].actions)


def test_episode_layout_and_limits(tiny_cfg):
    suite = build_suite(tiny_cfg)
    state = suite.extra_contexts("reach-v3")[0]
    with RolloutEngine(with_rollout(tiny_cfg, 0, 4, 10)) as pool:
        pool.set_policy(_policy(tiny_cfg))
        ep_sample, ep_mean = pool.run([EpisodeJob(state, seed=1), EpisodeJob(state, seed=2, mode="mean")])
    h = tiny_cfg.policy.chunk_size
    assert ep_sample.length == 10 and not ep_sample.success  # untrained policy, 10-step limit
    assert ep_sample.actions.shape == (3, h, 4) and ep_sample.valid.shape == (3, h)
    assert ep_sample.valid.sum() == 10 and not ep_sample.valid[-1, 2:].any()
    np.testing.assert_array_equal(ep_mean.actions, ep_mean.mu)  # mean mode executes mu


def test_success_is_sticky_and_ends_the_episode(tiny_cfg):
    """The scripted expert succeeds; the episode stops at its first success."""
    suite = build_suite(tiny_cfg)
    state = suite.demo_candidates("reach-v3", 1)[0]
    with RolloutEngine(with_rollout(tiny_cfg, 0, 4, 120)) as pool:
        (ep,) = pool.run([EpisodeJob(state, seed=0, mode="expert")])
    assert ep.success and ep.length < 120 and ep.actions.shape[0] == ep.length


def test_raw_stepping_with_an_episode_length_resets_onto_new_states(tiny_cfg):
    """The efficiency ceiling that includes resets: every `episode_length` steps an env moves to the next state."""
    from ript_ablate.engine.runner import EpisodeRunner

    world = build_suite(tiny_cfg)
    states = world.eval_states("reach-v3")
    runner = EpisodeRunner(tiny_cfg, world)
    resets: list[str] = []
    envs = runner.envs("reach-v3", 2)
    for env in envs:
        reset = env.reset

        def recording_reset(state, reset=reset):
            resets.append(state.state_id)
            return reset(state)

        env.reset = recording_reset
    count, seconds = runner.raw_steps("reach-v3", 2, 0.3, states, episode_length=3)
    assert seconds >= 0.3 and count >= 6
    per_env = [(count + 1) // 2, count // 2]  # the envs step in turn
    assert len(resets) == 2 + sum((n - 1) // 3 for n in per_env)  # the start, then one before steps 4, 7, ...
    assert len(set(resets)) == min(len(states), len(resets))  # cycling through the states in order
    assert all(env.env.curr_path_length <= 3 for env in envs)


def test_a_worker_keeps_at_most_max_envs_per_worker_closing_the_least_recently_used_tasks(tiny_dict):
    """4 environments a task, a cap of 8: the third task's closes the first's (least recently used), never the
    batch's own; a task used again moves to the back of the line. Without a cap every task's are kept."""
    from ript_ablate.engine.runner import EpisodeRunner

    class Env:
        def __init__(self, task):
            self.task, self.closed = task, False

        def close(self):
            self.closed = True

    class World:
        def make_env(self, task):
            return Env(task)

    capped = config_from_dict(dict(tiny_dict, suite=dict(tiny_dict["suite"], envs_per_worker=4, max_envs_per_worker=8)))
    runner = EpisodeRunner(capped, World())
    a, b = runner.envs("a", 4), runner.envs("b", 4)
    runner.envs("a", 4)  # a used again: b is now the least recently used
    c = runner.envs("c", 4)
    assert [e.closed for e in b] == [True] * 4 and not any(e.closed for e in a + c)
    assert sorted(task for task, _ in runner.pool) == ["a", "c"]
    assert runner.envs("b", 4)[0] is not b[0]  # built again
    uncapped = EpisodeRunner(config_from_dict(tiny_dict), World())
    for task in "abc":
        uncapped.envs(task, 4)
    assert len(uncapped.pool) == 3 and not any(e.closed for envs in uncapped.pool.values() for e in envs)


class RecordingExpertEnv:
    """An environment whose expert always asks for the same action; it records what it is made to execute."""

    EXPERT = np.array([0.5, -0.2, 1.0], dtype=np.float32)

    def __init__(self):
        self.executed: list[np.ndarray] = []

    def reset(self, state):
        self.executed = []
        return {"state": np.zeros(2, dtype=np.float32)}

    def expert_action(self, obs):
        return self.EXPERT

    def step(self, action):
        self.executed.append(np.asarray(action).copy())
        return {"state": np.zeros(2, dtype=np.float32)}, len(self.executed) >= 200


def test_demonstration_action_noise_perturbs_what_is_executed_and_records_the_experts_action():
    env = RecordingExpertEnv()
    job = EpisodeJob(InitialState("t", "t/demo/0", None), seed=0, mode="expert")
    (episode,) = run_expert([job], env, 300, action_noise=0.1)
    executed = np.stack(env.executed)
    assert episode.success and episode.length == 200
    np.testing.assert_array_equal(episode.actions, np.tile(RecordingExpertEnv.EXPERT, (200, 1)))  # the label
    noise = executed - RecordingExpertEnv.EXPERT
    assert 0.08 < noise[:, 0].std() < 0.12 and abs(noise[:, 0].mean()) < 0.03  # N(0, 0.1) on a free dimension
    assert executed[:, 2].max() <= 1.0 and (executed[:, 2] < 1.0).mean() > 0.3  # clipped to the action bounds
    run_expert([job], env, 300, action_noise=0.1)
    np.testing.assert_array_equal(np.stack(env.executed), executed)  # seeded by the initial state
    run_expert([EpisodeJob(InitialState("t", "t/demo/1", None), seed=0, mode="expert")], env, 300, 0.1)
    assert not np.array_equal(np.stack(env.executed), executed)
    run_expert([job], env, 300)
    np.testing.assert_array_equal(np.stack(env.executed), np.tile(RecordingExpertEnv.EXPERT, (200, 1)))
