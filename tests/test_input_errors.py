"""Classes of user mistakes are refused before any compute, with one message naming the key or file and what was
expected, never a traceback."""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager

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


# --- documents that expand: refused before anything is constructed ----------------------------------------------
def alias_bomb(levels: int, merge: bool, indent: int) -> str:
    """Each level refers ten times to the level below: 10**levels nodes once constructed."""
    pad = " " * indent
    lines = [f"{pad}l0: &l0 {{x: 1}}" if merge else f"{pad}l0: &l0 [x]"]
    for i in range(1, levels + 1):
        refs = ", ".join([f"*l{i - 1}"] * 10)
        lines.append(f"{pad}l{i}: &l{i} {{<<: [{refs}], y{i}: 1}}" if merge else f"{pad}l{i}: &l{i} [{refs}]")
    return "\n".join(lines) + "\n"


@contextmanager
def hang_guard(seconds: int):
    """Fails the test instead of hanging CI: a refused bomb answers in milliseconds."""
    def alarm(*_):
        raise AssertionError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("merge", [False, True], ids=["aliases", "merge keys"])
def test_alias_and_merge_key_bombs_are_refused_before_construction(tmp_path, tiny_yaml, capsys, monkeypatch, merge):
    def constructed(*_args, **_kwargs):
        raise AssertionError("a YAML object was constructed")

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("suite:\n  tasks: [reach-v3]\n  options:\n" + alias_bomb(9, merge, 4))
    monkeypatch.setattr(yaml.constructor.BaseConstructor, "construct_object", constructed)
    with hang_guard(30):
        code, out = run_cli(["validate", str(bomb)], capsys)
    assert code == 1 and str(bomb) in out and "expand to more than" in out and "Traceback" not in out
    spec = tmp_path / "spec.yaml"  # the same in a study spec, and in a --set value
    spec.write_text(f"name: s\nconfig: {tiny_yaml}\nmode: grid\nseeds: [0]\ndescription:\n" + alias_bomb(9, merge, 2))
    with hang_guard(30):
        code, out = run_cli(["validate", str(spec)], capsys)
    assert code == 1 and "expand to more than" in out
    monkeypatch.undo()  # the base config itself is constructed before its --set values are read
    value = "{" + ", ".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 10)) + "}"
    with hang_guard(30):
        code, out = run_cli(["validate", str(tiny_yaml), "--set", f"suite.options=[&l0 [x], {value}]"], capsys)
    assert code == 1 and "expand to more than" in out


def test_recursive_anchor_is_refused_and_small_aliases_and_merges_load(tmp_path, capsys):
    loop = tmp_path / "loop.yaml"
    loop.write_text("suite:\n  options: &me\n    again: *me\n")
    with hang_guard(30):
        code, out = run_cli(["validate", str(loop)], capsys)
    assert code == 1 and "recursive alias" in out and "line 2" in out
    ok = tmp_path / "ok.yaml"
    ok.write_text("algo: &a {lr: 1.0e-3, header_lr: 1.0e-3}\n"
                  "training: {n_iterations: 3}\nsuite: {tasks: [reach-v3]}\n")
    code, out = run_cli(["validate", str(ok)], capsys)
    assert code == 0, out
    from ript_ablate.config import parse_yaml

    assert parse_yaml("base: &b {p: 1, q: 2}\nmine: {<<: *b, q: 3}\n", "m") == {
        "base": {"p": 1, "q": 2}, "mine": {"p": 1, "q": 3}}
