"""A plug-in off its contract is refused when it is built, before any demonstration or base: one message naming
the plug-in, the method, what it returned and what was expected."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from ript_ablate.cli import main

BAD_PLUGINS = '''
from ript_pointmass.policy import OPTIONS, MLPPolicy
from ript_pointmass.world import PointMassWorld


class Flat(MLPPolicy):  # (B, H*D): one flat vector instead of a chunk
    def forward(self, obs, instruction):
        mu, log_b = super().forward(obs, instruction)
        return mu.flatten(1), log_b.flatten(1)


class OneAction(MLPPolicy):  # (B, 1, D): one action, not a chunk of chunk_size
    def forward(self, obs, instruction):
        mu, log_b = super().forward(obs, instruction)
        return mu[:, :1], log_b[:, :1]


class ScaleOfOther(MLPPolicy):  # log_b not shaped like mu
    def forward(self, obs, instruction):
        mu, log_b = super().forward(obs, instruction)
        return mu, log_b[..., :1]


def factory(cls):
    return lambda cfg, world: cls(world.observation_shapes["state"][0], world.action_dim, dict(OPTIONS))


flat, one_action, scale_of_other = factory(Flat), factory(OneAction), factory(ScaleOfOther)


class Misdeclared(PointMassWorld):  # declares a state of 7 values, resets to 6
    observation_shapes = {"state": (7,)}
'''


@pytest.fixture
def config(tmp_path, monkeypatch):
    (tmp_path / "badplug.py").write_text(textwrap.dedent(BAD_PLUGINS))
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(world: str = "pointmass", policy: str = "mlp") -> str:
        data = {"suite": {"name": world, "tasks": ["reach"], "demos_per_task": 1, "contexts_per_task": 1,
                          "eval_states_per_task": 1, "num_workers": 0},
                "policy": {"name": policy}, "sft": {"steps": 5, "scale_steps": 2, "cache_dir": str(tmp_path / "c")},
                "training": {"n_iterations": 1, "contexts_per_iteration": 1}, "tracking": {"enabled": False}}
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(data))
        return str(path)

    return write


@pytest.mark.parametrize("policy, returned", [
    ("badplug:flat", "returned mu of shape (2, 8), expected (B, chunk_size, action_dim) = (2, 4, 2)"),
    ("badplug:one_action", "returned mu of shape (2, 1, 2), expected (B, chunk_size, action_dim) = (2, 4, 2)"),
    ("badplug:scale_of_other", "returned log_b of shape (2, 4, 1), expected (B, chunk_size, action_dim) = (2, 4, 2)"),
])
def test_a_policy_off_its_output_contract_is_refused_before_any_demonstration(config, tmp_path, capsys, policy,
                                                                               returned):
    path = config(policy=policy)
    for command in (["sft", path], ["train", path, "--no-track"], ["validate", path]):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert f"policy '{policy}'" in err and ".forward(obs, instruction) " + returned in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "c").exists(), "no demonstration collected and no base trained or cached"
    assert main(["validate", path, "--no-env"]) == 0  # the flag that skips building an environment


def test_a_world_whose_observation_differs_from_its_declaration_is_refused_naming_the_key(config, tmp_path, capsys):
    assert main(["sft", config(world="badplug:Misdeclared")]) == 1
    err = capsys.readouterr().err
    assert "world 'badplug:Misdeclared'" in err and "reset(state)" in err
    assert "returned 'state' of shape (6,), but observation_shapes declares (7,)" in err
    assert not (tmp_path / "c").exists()


def test_a_plug_in_on_its_contract_passes_the_check(config, capsys):
    assert main(["validate", config()]) == 0
    assert "world and policy checked" in capsys.readouterr().err


def test_a_cell_checks_only_a_base_it_must_build_and_a_run_always_checks(config, monkeypatch):
    """A study's cells skip the check on a cached base (the runner checked when it built it: an environment build
    saved per cell); a base still to build is checked first, and `train` checks every time."""
    import ript_ablate.bc as bc
    from ript_ablate.plugins import load_checked_config

    checked = []
    real = bc.check_plugins
    monkeypatch.setattr(bc, "check_plugins", lambda cfg, world=None: checked.append(1) or real(cfg, world))
    cfg = load_checked_config(config(), [])
    built = bc.ensure_base(cfg, check_cached=False)  # nothing cached: checked, then built
    assert built.is_file() and len(checked) == 1
    assert bc.ensure_base(cfg, check_cached=False) == built and len(checked) == 1  # cached: no second check
    assert bc.ensure_base(cfg) == built and len(checked) == 2  # the default (train, the runner) checks
