"""Camera images through the whole pipeline, on tiny images: the world renders them, the reference policy reads them,
rollouts carry them as uint8 at decision steps only, both inference modes act identically on them, and behaviour
cloning and a RIPT iteration run on them (tests/test_pixels_training.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ript_ablate import plugins
from ript_ablate.augment import random_shift
from ript_ablate.config import config_from_dict
from ript_ablate.engine import RolloutEngine
from ript_ablate.episodes import EpisodeJob
from ript_ablate.errors import ConfigError
from ript_ablate.families import ActionDistribution
from ript_ablate.policies.reference.vision import SpatialSoftmax
from ript_ablate.rendering import choose_gl_backend
from tests.test_plugins import episodes_by_layout

SIZE = 24


@pytest.fixture
def image_dict(tiny_dict):
    tiny_dict["suite"].update(observation="images", cameras=["corner", "gripperPOV"], image_size=SIZE)
    tiny_dict["sft"]["image_shift"] = 2
    return tiny_dict


@pytest.fixture
def image_world(image_dict):
    return plugins.build_world(config_from_dict(image_dict))


def test_images_are_turned_views_that_change_when_the_arm_moves_and_repeat_for_a_state(image_world):
    env = image_world.make_env("reach-v3")
    state = image_world.eval_states("reach-v3")[0]
    first = env.reset(state)
    assert set(first) == {"proprio", "corner_image", "gripperPOV_image"}
    for key in ("corner_image", "gripperPOV_image"):
        image = first[key]
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        assert image.std() > 5, f"{key} is (nearly) constant"
    moved = first
    for _ in range(10):
        moved, _ = env.step(np.array([1.0, 0.0, 0.0, 0.0]))
    assert np.abs(moved["corner_image"].astype(int) - first["corner_image"]).mean() > 0.5
    # the corner camera's raw render is upside down (checked by eye); the world turns it 180 degrees, the wrist
    # camera it leaves as rendered
    from ript_ablate.rendering import CameraRenderer

    raw = CameraRenderer(env.env.model, env.env.data, ["corner", "gripperPOV"], SIZE).render()
    np.testing.assert_array_equal(moved["corner_image"], raw["corner"][::-1, ::-1])
    np.testing.assert_array_equal(moved["gripperPOV_image"], raw["gripperPOV"])
    np.testing.assert_array_equal(env.reset(state)["corner_image"], first["corner_image"])
    # a second image environment in the same process renders the same scene, not black frames, also once the
    # first is closed
    other = image_world.make_env("reach-v3")
    np.testing.assert_array_equal(other.reset(state)["corner_image"], first["corner_image"])
    env.close()
    third = image_world.make_env("reach-v3")
    np.testing.assert_array_equal(third.reset(state)["corner_image"], first["corner_image"])
    np.testing.assert_array_equal(other.reset(state)["corner_image"], first["corner_image"])


def test_observation_shapes_follow_the_config(image_dict):
    world = plugins.build_world(config_from_dict(image_dict))
    assert world.observation_shapes == {"proprio": (4,), "corner_image": (SIZE, SIZE, 3),
                                        "gripperPOV_image": (SIZE, SIZE, 3)}
    image_dict["suite"]["observation"] = "both"
    world = plugins.build_world(config_from_dict(image_dict))
    assert world.observation_shapes["state"] == (39,) and "proprio" not in world.observation_shapes
    image_dict["suite"]["observation"] = "state"
    assert plugins.build_world(config_from_dict(image_dict)).observation_shapes == {"state": (39,)}


def test_a_camera_the_world_lacks_is_refused_naming_it_and_the_cameras_it_has(image_dict):
    image_dict["suite"]["cameras"] = ["corner", "wrist"]
    with pytest.raises(ConfigError) as err:
        plugins.checked_config_from_dict(image_dict)
    text = str(err.value)
    assert "suite.cameras" in text and "'wrist'" in text and "gripperPOV" in text and "corner4" in text
    assert "'corner'" not in text.split("its cameras")[0]


def test_a_world_without_cameras_refuses_images(image_dict):
    image_dict["suite"].update(name="pointmass", tasks=["all"])
    with pytest.raises(ConfigError, match=r"suite.observation: got 'images', but the world .* gives state"):
        plugins.checked_config_from_dict(image_dict)


def test_image_settings_are_validated(image_dict):
    image_dict["suite"].update(observation="pixels", image_size=4)
    image_dict["sft"]["image_shift"] = 3
    with pytest.raises(ConfigError) as err:
        config_from_dict(image_dict)
    problems = "\n".join(err.value.problems)
    assert "suite.observation: got 'pixels'" in problems
    assert "suite.image_size: got 4" in problems
    assert "sft.image_shift: got 3" in problems


def test_episodes_keep_uint8_images_only_at_decision_steps_and_modes_agree(image_dict):
    """Replica and central inference give the same episodes from the same seed, with images in the observations;
    an episode holds one image per chunk (not per step), as uint8, and says how many bytes it takes."""
    image_dict["algo"]["max_episode_length"] = 22
    cfg = config_from_dict(image_dict)
    world = plugins.build_world(cfg)
    policy = plugins.build_policy(cfg, world).eval()
    states = world.eval_states("reach-v3")
    jobs = [EpisodeJob(states[i % len(states)], seed=20 + i) for i in range(2)]
    distribution = ActionDistribution(scale_factor=5.0)
    runs = episodes_by_layout(cfg, world, policy, jobs, distribution, (0, 1))
    reference = runs[(0, "replica")]
    for key, episodes in runs.items():
        for a, b in zip(reference, episodes):
            assert (a.success, a.length) == (b.success, b.length), key
            np.testing.assert_array_equal(a.actions, b.actions, err_msg=str(key))
            np.testing.assert_array_equal(a.obs["corner_image"], b.obs["corner_image"], err_msg=str(key))
    episode = reference[0]
    chunks = episode.actions.shape[0]
    assert chunks == -(-episode.length // cfg.policy.chunk_size)  # one decision per chunk of 4 steps
    assert episode.obs["corner_image"].shape == (chunks, SIZE, SIZE, 3)
    assert episode.obs["corner_image"].dtype == np.uint8
    assert episode.nbytes() >= 2 * chunks * SIZE * SIZE * 3
    assert len({ep.obs["corner_image"][0].tobytes() for ep in reference}) > 1  # different states, different images
    assert not np.array_equal(episode.obs["corner_image"][0], episode.obs["corner_image"][-1])  # the arm moved


def test_stepping_inside_a_chunk_without_rendering_changes_no_episode(image_dict, monkeypatch):
    """`step_unobserved` (no image rendered inside an action chunk) gives exactly the episodes of rendering every
    step: the same observations at every decision, actions and lengths."""
    from ript_ablate.worlds.metaworld.world import MetaWorldEnv

    image_dict["algo"]["max_episode_length"] = 22
    cfg = config_from_dict(image_dict)
    world = plugins.build_world(cfg)
    policy = plugins.build_policy(cfg, world).eval()
    jobs = [EpisodeJob(s, seed=5) for s in world.eval_states("reach-v3")[:2]]
    distribution = ActionDistribution(scale_factor=5.0)
    with RolloutEngine(cfg, world) as engine:
        engine.set_policy(policy)
        lean = engine.run(jobs, distribution)
    monkeypatch.delattr(MetaWorldEnv, "step_unobserved")
    with RolloutEngine(cfg, plugins.build_world(cfg)) as engine:
        engine.set_policy(policy)
        full = engine.run(jobs, distribution)
    for a, b in zip(lean, full):
        assert (a.length, a.success) == (b.length, b.success)
        np.testing.assert_array_equal(a.actions, b.actions)
        for key in a.obs:
            np.testing.assert_array_equal(a.obs[key], b.obs[key], err_msg=key)


def test_random_shift_moves_each_image_by_its_own_offset_with_edges_repeated():
    images = torch.arange(2 * 5 * 5, dtype=torch.uint8).view(2, 5, 5, 1).expand(2, 5, 5, 3).contiguous()
    generator = torch.Generator().manual_seed(0)
    shifted = random_shift(images, 1, generator)
    assert shifted.dtype == torch.uint8 and shifted.shape == images.shape
    offsets = torch.randint(-1, 2, (2, 2), generator=torch.Generator().manual_seed(0))
    for i in range(2):
        dy, dx = offsets[i].tolist()
        rows = np.clip(np.arange(5) + dy, 0, 4)
        cols = np.clip(np.arange(5) + dx, 0, 4)
        np.testing.assert_array_equal(shifted[i].numpy(), images[i].numpy()[rows][:, cols])
    assert torch.equal(random_shift(images, 0, generator), images)


def test_spatial_softmax_finds_a_bright_spot():
    features = torch.full((1, 1, 5, 9), -50.0)
    features[0, 0, 4, 0] = 50.0  # bottom-left corner: x = -1, y = +1
    np.testing.assert_allclose(SpatialSoftmax()(features)[0, 0].tolist(), [-1.0, 1.0], atol=1e-4)


def test_a_headless_backend_is_chosen_only_when_none_is_set(monkeypatch):
    env = {"DISPLAY": ":0"}
    assert choose_gl_backend(env, "linux") is None and "MUJOCO_GL" not in env
    env = {"MUJOCO_GL": "osmesa"}
    assert choose_gl_backend(env, "linux") is None and env["MUJOCO_GL"] == "osmesa"
    assert choose_gl_backend({}, "darwin") is None
    installed = {"EGL"}
    monkeypatch.setattr("ctypes.util.find_library", lambda name: f"lib{name}.so" if name in installed else None)
    env = {}
    assert choose_gl_backend(env, "linux") == "egl" and env == {"MUJOCO_GL": "egl"}
    installed = {"OSMesa"}
    env = {}
    assert choose_gl_backend(env, "linux") == "osmesa" and env["PYOPENGL_PLATFORM"] == "osmesa"
    installed = set()
    assert choose_gl_backend({}, "linux") is None
    env = {"PYOPENGL_PLATFORM": "osmesa"}  # a robosuite set-up's choice is followed, whatever is installed
    installed = {"EGL"}
    assert choose_gl_backend(env, "linux") == "osmesa" and env["MUJOCO_GL"] == "osmesa"
    env = {"PYOPENGL_PLATFORM": "glx"}
    assert choose_gl_backend(env, "linux") is None and "MUJOCO_GL" not in env


def test_a_plug_in_image_that_is_not_uint8_is_named():
    from ript_ablate.plugin_check import observation_problems

    class World:
        observation_shapes = {"state": (2,), "cam_image": (4, 4, 3)}

    obs = {"state": np.zeros(2), "cam_image": np.zeros((4, 4, 3), np.float32)}
    problems = observation_problems(World(), obs, "env.reset")
    assert len(problems) == 1 and "'cam_image' as float32, expected uint8" in problems[0]
    assert observation_problems(World(), {**obs, "cam_image": np.zeros((4, 4, 3), np.uint8)}, "env.reset") == []


def test_camera_keys_with_dots_and_a_world_of_images_alone_build_a_policy(tiny_cfg):
    from ript_ablate.policies.reference import build_policy

    policy = build_policy(tiny_cfg.policy, 0, 4, image_keys=("cam.front_image",), vector_keys=())
    obs = {"cam.front_image": torch.zeros(2, 16, 16, 3, dtype=torch.uint8)}
    mu, log_b = policy(obs, policy.encode_instruction("reach").expand(2, -1))
    assert mu.shape == log_b.shape == (2, tiny_cfg.policy.chunk_size, 4)
