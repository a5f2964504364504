"""Caches keyed by the code that produces them: demonstrations by the world's code and the framework's demonstration
code, bases by those plus the policy's and the behaviour-cloning code; the RL algorithm is in neither; options a
plug-in declares inert are in neither; a cache hit says what it matched; a base that no longer fits says --retrain."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from ript_ablate import cache_keys
from ript_ablate.bc import base_key, demo_key, get_base
from ript_ablate.config import config_from_dict
from ript_ablate.engine import RolloutEngine
from ript_ablate.errors import CheckpointError
from ript_ablate.plugins import build_world

PACKAGE = Path(cache_keys.__file__).parent


@pytest.fixture(autouse=True)
def fresh_digests():
    cache_keys.code_digest.cache_clear()
    yield
    cache_keys.code_digest.cache_clear()


def keys(cfg) -> tuple[str, str]:
    world = build_world(cfg)
    return demo_key(world), base_key(cfg, world)


def edited(monkeypatch, path: Path, addition: str) -> None:
    """`path` reads as if `addition` had been appended to it (the checkout itself is left alone)."""
    original = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        data = original(self)
        return data + addition.encode() if self.resolve() == path.resolve() else data

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    cache_keys.code_digest.cache_clear()


def test_world_code_moves_both_keys_and_the_rl_update_moves_neither(tiny_cfg, monkeypatch):
    before = keys(tiny_cfg)
    edited(monkeypatch, PACKAGE / "ript" / "update.py", "\n\ndef extra_update_helper():\n    return 1\n")
    assert keys(tiny_cfg) == before  # the RL algorithm produces no demonstration and no base
    monkeypatch.undo()
    edited(monkeypatch, PACKAGE / "worlds" / "metaworld" / "world.py", "\n\nEXTRA_CONSTANT = 2\n")
    moved = keys(tiny_cfg)
    assert moved[0] != before[0] and moved[1] != before[1]
    monkeypatch.undo()
    edited(monkeypatch, PACKAGE / "demos.py", "\n\nEXTRA = 3\n")
    assert keys(tiny_cfg)[0] != before[0]  # the framework's demonstration code
    monkeypatch.undo()
    edited(monkeypatch, PACKAGE / "bc.py", "\n\nEXTRA = 4\n")
    after_bc = keys(tiny_cfg)
    assert after_bc[0] == before[0] and after_bc[1] != before[1]  # behaviour cloning: the base only
    monkeypatch.undo()
    edited(monkeypatch, PACKAGE / "worlds" / "metaworld" / "world.py", "\n# a comment\n")
    assert keys(tiny_cfg) == before  # comments, docstrings and wrapping are not code
    monkeypatch.undo()
    noisy = dataclasses.replace(tiny_cfg, suite=dataclasses.replace(tiny_cfg.suite, demo_action_noise=0.1))
    assert keys(noisy)[0] != before[0]  # demonstrations collected with another action noise are others


def plugin_config(tmp_path: Path, **suite_options) -> object:
    return config_from_dict({
        "suite": {"name": "keyplug:NotedWorld", "tasks": ["reach"], "demos_per_task": 1, "contexts_per_task": 1,
                  "eval_states_per_task": 1, "num_workers": 0, "options": suite_options},
        "policy": {"name": "mlp", "options": {"hidden": 8}},
        "sft": {"steps": 5, "scale_steps": 2, "batch_size": 16, "cache_dir": str(tmp_path / "cache")},
    })


@pytest.fixture
def keyplug(tmp_path, monkeypatch) -> Path:
    """A plug-in package of its own (a point-mass world with an inert `note` option), importable from tmp_path."""
    package = tmp_path / "plugins" / "keyplug"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent('''
        import dataclasses

        from ript_pointmass.world import PointMassWorld


        class NotedWorld(PointMassWorld):
            inert_options = frozenset({"note"})  # a label for people: it changes no demonstration

            def __init__(self, cfg):
                options = {k: v for k, v in cfg.suite.options.items() if k != "note"}
                super().__init__(dataclasses.replace(cfg, suite=dataclasses.replace(cfg.suite, options=options)))

            @classmethod
            def config_problems(cls, cfg):
                return []
    '''))
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    return package


def test_any_file_of_a_plug_in_package_moves_its_keys_and_inert_options_do_not(keyplug, tmp_path):
    cfg = plugin_config(tmp_path)
    before = keys(cfg)
    assert keys(plugin_config(tmp_path, note="run by Ana")) == before  # declared inert by the world
    replicable_off = config_from_dict({**_as_dict(cfg), "policy": {"name": "mlp",
                                                                   "options": {"hidden": 8, "replicable": False}}})
    assert keys(replicable_off) == before  # declared inert by the policy factory
    assert keys(plugin_config(tmp_path, damping=0.3)) != before  # any other option counts
    (keyplug / "assets.txt").write_text("a texture the world renders\n")  # a file that is not Python
    cache_keys.code_digest.cache_clear()
    moved = keys(cfg)
    assert moved[0] != before[0] and moved[1] != before[1]


def _as_dict(cfg) -> dict:
    from ript_ablate.config import to_dict

    return to_dict(cfg)


def test_a_cache_hit_says_what_it_matched_and_a_base_that_no_longer_fits_says_retrain(keyplug, tmp_path, capsys):
    cfg = plugin_config(tmp_path)
    world = build_world(cfg)
    with RolloutEngine(cfg, world) as engine:
        _, weights, info = get_base(cfg, world, engine)
        assert not info["cache_hit"] and info["inputs"]["policy"]["options"] == {"hidden": 8}
        capsys.readouterr()
        _, _, again = get_base(cfg, world, engine)
    out = capsys.readouterr().err
    assert again["cache_hit"] and f"demonstrations {demo_key(world)}" in out and "world code" in out
    assert "policy code" in out and "behaviour-cloning code" in out
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    save_file({k: v[..., :1].contiguous() for k, v in tensors.items()}, weights)  # as an older policy wrote it
    with RolloutEngine(cfg, world) as engine, pytest.raises(CheckpointError, match="--retrain"):
        get_base(cfg, world, engine)
