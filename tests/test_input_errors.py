"""Classes of user mistakes are refused before any compute, with one message naming the key or file and what was
expected, never a traceback."""

from __future__ import annotations

import time

import pytest
import yaml

from ript_ablate.cli import main


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = int(exc.code)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def spec_file(tmp_path, tiny_yaml, **fields) -> str:
    data = {"name": "s", "config": str(tiny_yaml), "mode": "grid", "factors": {"algo.ppo_clip_high": [0.2, 0.3]},
            "seeds": [0, 1], **fields}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("override", ["algo.lr=inf", "algo.lr=.nan", "algo.scale_factor=-.inf", "algo.lr=nan"])
def test_non_finite_numbers_are_refused(tiny_yaml, capsys, override):
    code, out = run_cli(["validate", str(tiny_yaml), "--set", override], capsys)
    key = override.split("=")[0]
    assert code == 1 and f"{key}: got" in out and "finite" in out and "Traceback" not in out


def test_non_finite_number_in_a_yaml_file(tmp_path, tiny_dict, capsys):
    path = tmp_path / "c.yaml"
    tiny_dict["algo"]["ppo_clip_high"] = float("inf")
    path.write_text(yaml.safe_dump(tiny_dict))
    code, out = run_cli(["validate", str(path)], capsys)
    assert code == 1 and "algo.ppo_clip_high: got inf, expected a finite number" in out


@pytest.mark.parametrize(("override", "limit"), [("suite.contexts_per_task=1000000000", "10,000"),
                                                 ("suite.eval_states_per_task=99999999", "10,000"),
                                                 ("policy.d_model=1000000", "4,096"),
                                                 ("training.contexts_per_iteration=200000", "100,000")])
def test_sizes_that_cannot_fit_are_refused_up_front(tiny_yaml, capsys, override, limit):
    start = time.perf_counter()
    code, out = run_cli(["validate", str(tiny_yaml), "--set", override], capsys)
    assert code == 1 and override.split("=")[0] in out and f"at most {limit}" in out
    assert time.perf_counter() - start < 30  # refused in validation, not after generating anything


def test_file_that_is_not_utf8_text(tmp_path, capsys):
    path = tmp_path / "weights.yaml"
    path.write_bytes(b"suite:\n  tasks: [\xff\xfe reach]\n")
    code, out = run_cli(["validate", str(path)], capsys)
    assert code == 1 and "not UTF-8 text" in out and str(path) in out and "Traceback" not in out
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(b"\x00\x01\x02" * 10)
    code, out = run_cli(["validate", str(binary)], capsys)
    assert code == 1 and "binary file" in out


def test_duplicated_keys_are_refused(tmp_path, tiny_yaml, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text(f"name: dup\nconfig: {tiny_yaml}\nmode: grid\nseeds: [0]\nfactors:\n"
                    "  algo.ppo_clip_high: [0.2, 0.3, 0.4]\n  algo.ppo_clip_high: [0.2]\n")
    code, out = run_cli(["validate", str(path)], capsys)
    assert code == 1 and "'algo.ppo_clip_high' is given twice" in out and "line 6" in out
    cfg = tmp_path / "dupcfg.yaml"
    cfg.write_text("algo:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    code, out = run_cli(["validate", str(cfg)], capsys)
    assert code == 1 and "'lr' is given twice" in out


def test_empty_config_and_spec_files_are_refused(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# only a comment\n")
    for argv in (["validate", str(empty)], ["train", str(empty), "--no-track"], ["study", "run", str(empty)]):
        code, out = run_cli(argv, capsys)
        assert code == 1 and "the file is empty" in out and "Traceback" not in out


def test_study_spec_without_seeds_is_refused(tmp_path, tiny_yaml, capsys):
    path = spec_file(tmp_path, tiny_yaml)
    data = yaml.safe_load(open(path))
    del data["seeds"]
    open(path, "w").write(yaml.safe_dump(data))
    code, out = run_cli(["validate", path], capsys)
    assert code == 1 and "seeds: missing" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["study", "run", "SPEC", "--workers", "0"], "--workers: expected an integer in 1..256, got 0"),
    (["study", "run", "SPEC", "--workers", "two"], "--workers: expected an integer, got 'two'"),
    (["report", "SPEC", "--collapse-threshold", "-5"], "--collapse-threshold: expected a number in (0, 1]"),
    (["report", "SPEC", "--collapse-threshold", "nan"], "--collapse-threshold: expected a number in (0, 1]"),
])
def test_cli_numbers_out_of_range(tmp_path, tiny_yaml, capsys, argv, message):
    spec = spec_file(tmp_path, tiny_yaml)
    code, out = run_cli([spec if a == "SPEC" else a for a in argv], capsys)
    assert code == 2 and message in out


def test_config_where_a_spec_is_expected_and_back(tmp_path, tiny_yaml, capsys):
    code, out = run_cli(["study", "run", str(tiny_yaml)], capsys)
    assert code == 1 and "this is a config" in out and "not a study spec" in out
    assert out.count("\n  - ") == 1  # one problem, not every study key
    spec = spec_file(tmp_path, tiny_yaml)
    code, out = run_cli(["train", spec, "--no-track"], capsys)
    assert code == 1 and "this is a study spec" in out and "study run" in out


def test_unwritable_output_paths_are_one_line(tmp_path, tiny_yaml, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code, out = run_cli(["train", str(tiny_yaml), "--no-track", "--output", str(a_file / "run")], capsys)
    assert code == 1 and "Not a directory" in out and str(a_file) in out and "Traceback" not in out


def test_set_on_a_study_spec_is_refused(tmp_path, tiny_yaml, capsys):
    code, out = run_cli(["validate", spec_file(tmp_path, tiny_yaml), "--set", "algo.lr=1e-3"], capsys)
    assert code == 1 and "a study spec takes its overrides in its own `set:` list" in out
