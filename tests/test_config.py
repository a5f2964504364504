"""Config loading: typed overrides, every class of invalid value, unknown keys, the original algo block."""

from __future__ import annotations

import pytest
import yaml

from ript_ablate.cli import main
from ript_ablate.config import AlgoConfig, config_from_dict, load_config
from ript_ablate.errors import ConfigError
from ript_ablate.plugins import checked_config_from_dict


def problems_of(data: dict) -> list[str]:
    """Every problem a run would be refused for: the config's own and the chosen world's and policy's."""
    with pytest.raises(ConfigError) as info:
        checked_config_from_dict(data, "test.yaml")
    return info.value.problems


def test_defaults_are_the_originals():
    algo = AlgoConfig()
    assert (algo.rloo_batch_size, algo.ppo_clip_range, algo.ppo_clip_high) == (8, 0.1, 0.1)
    assert algo.log_scale_clip == [-2.0, 0.5] and algo.log_prob_mode == "sum_on_action_dim"
    assert algo.use_laplace_sampling and algo.fix_scale_head and algo.enable_dynamic_sampling
    assert algo.gradient_accumulation_steps == 4 and algo.early_stop_percentage == 1.0


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("algo", "rloo_batch_size", 1, ">= 2"),
        ("algo", "ppo_clip_range", 1.5, "(0, 1)"),
        ("algo", "ppo_clip_range", 0.0, "(0, 1)"),
        ("algo", "ppo_clip_high", -0.1, "> 0"),
        ("algo", "log_scale_clip", [0.5, -2.0], "low < high"),
        ("algo", "log_scale_clip", [0.5], "low < high"),
        ("algo", "log_prob_mode", "sum_over_everything", "sum_on_action_dim"),
        ("algo", "lr", -1e-4, ">= 0"),
        ("algo", "header_lr", -1e-5, ">= 0"),
        ("algo", "early_stop_percentage", 0.0, "(0, 1]"),
        ("algo", "early_stop_percentage", 1.2, "(0, 1]"),
        ("algo", "scale_factor", 0, "> 0"),
        ("policy", "n_heads", 3, "divisor"),
        ("suite", "tasks", ["reach-v9"], "reach-v3"),
        ("suite", "demo_action_noise", 1.5, "between 0 and 1"),
        ("suite", "demo_action_noise", -0.1, "between 0 and 1"),
        ("training", "device", "tpu", "cuda"),
        ("training", "eval_mode", "stochastic", "mean | sample"),
    ],
)
def test_invalid_values_name_key_value_and_expectation(section, key, value, expected):
    problems = problems_of({section: {key: value}})
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{section}.{key}:")
    assert expected in problems[0]
    assert str(value).strip("[]") in problems[0]


def test_wrong_types_are_named():
    problems = problems_of({"algo": {"rloo_batch_size": "eight", "use_val_init": "yes please"}})
    assert any("algo.rloo_batch_size: got 'eight', expected an integer" in p for p in problems)
    assert any("algo.use_val_init" in p and "true or false" in p for p in problems)


def test_every_error_is_reported_not_only_the_first():
    problems = problems_of({"algo": {"rloo_batch_size": 1, "ppo_clip_high": 0, "log_prob_mode": "x"}})
    assert {p.split(":")[0] for p in problems} == {"algo.rloo_batch_size", "algo.ppo_clip_high", "algo.log_prob_mode"}


def test_unknown_key_names_file_and_closest_key():
    problems = problems_of({"algo": {"ppo_clip_hgh": 0.2}})
    assert problems == ["algo.ppo_clip_hgh: unknown key in test.yaml (did you mean 'algo.ppo_clip_high'?)"]


def test_key_in_wrong_section_suggests_the_right_one():
    (problem,) = problems_of({"training": {"rloo_batch_size": 8}})
    assert "training.rloo_batch_size: unknown key" in problem and "algo.rloo_batch_size" in problem


def test_unknown_section_is_named():
    (problem,) = problems_of({"algoo": {}})
    assert "algoo: unknown section" in problem and "did you mean 'algo'" in problem


def test_original_algo_block_accepted_with_warnings_for_unread_keys():
    with pytest.warns(UserWarning) as record:
        cfg = load_config("tests/data/original_oft_algo.yaml")
    messages = [str(w.message) for w in record]
    assert len(messages) == 4 and all("no effect" in m for m in messages)
    assert any("algo.kl_coef" in m for m in messages)
    assert cfg.algo.scale_factor == 5.0 and cfg.algo.header_lr == 5e-5 and cfg.algo.model_seed == 7


def test_set_overrides_are_parsed_to_the_field_type(tiny_yaml):
    cfg = load_config(tiny_yaml, ["algo.ppo_clip_high=0.28", "algo.use_laplace_sampling=false",
                                  "algo.log_scale_clip=[-3, 1]", "training.n_iterations=2", "algo.lr=1e-3"])
    assert cfg.algo.ppo_clip_high == 0.28 and cfg.algo.use_laplace_sampling is False
    assert cfg.algo.log_scale_clip == [-3.0, 1.0] and cfg.training.n_iterations == 2
    assert cfg.algo.lr == 1e-3 and isinstance(cfg.algo.lr, float)


def test_bad_set_override_is_named(tiny_yaml):
    with pytest.raises(ConfigError) as info:
        load_config(tiny_yaml, ["algo.rloo_batch_size=1", "nosuchkey"])
    assert "expected dotted.key=value" in str(info.value)


def test_validate_cli_lists_every_error_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"algo": {"rloo_batch_size": 1, "ppo_clip_hgh": 0.2, "log_prob_mode": "x"}}))
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "3 configuration error(s)" in err and "algo.rloo_batch_size" in err
    assert "did you mean 'algo.ppo_clip_high'" in err and "algo.log_prob_mode" in err


def test_validate_cli_prints_resolved_config(tiny_yaml, capsys):
    assert main(["validate", str(tiny_yaml), "--set", "algo.ppo_clip_high=0.3"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["algo"]["ppo_clip_high"] == 0.3 and resolved["suite"]["tasks"] == ["reach-v3"]


def test_missing_and_malformed_files(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 1
    assert "file not found" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("algo: [unclosed\n")
    assert main(["validate", str(broken)]) == 1
    assert "not valid YAML" in capsys.readouterr().err


def test_shipped_configs_and_studies_are_valid(tmp_path):
    import glob

    from ript_ablate.plugins import load_checked_config
    from ript_ablate.study.spec import load_study

    configs, studies = glob.glob("configs/*.yaml"), glob.glob("studies/*.yaml")
    assert len(configs) >= 5 and len(studies) >= 7, "run from the repository root"
    for path in configs:
        load_checked_config(path)  # the world's own checks too (task names, presets)
    for path in studies:
        load_study(path, output_dir=tmp_path)


def test_benchmark_scripts_report_a_bad_config_in_one_line(monkeypatch, capsys, tiny_yaml):
    """`python -m ript_ablate.bench.*` with a mistyped key: the error names it and exits 1, no traceback."""
    from ript_ablate.bench import ript_gain, run_main

    monkeypatch.setattr("sys.argv", ["ript_gain", str(tiny_yaml), "--set", "algo.scale_factr=40"])
    with pytest.raises(SystemExit) as exit_info:
        run_main(ript_gain.main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "algo.scale_factr" in err and "algo.scale_factor" in err and "Traceback" not in err
