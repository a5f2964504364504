"""Studies over your own trainer: cells that run a command (examples/own_trainer/train.py knows nothing of
ript-ablate), with metrics through MLflow or a JSON-lines file, exactly once, retried, resumed and reported."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest
import yaml

from ript_ablate.cli import main
from ript_ablate.errors import ConfigError
from ript_ablate.study.spec import load_study
from tests.test_study import alive, child_runs, running_trial, trials, wait_for

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_trainer"
SHORT = ["training.n_iterations=6", "training.eval_interval=3", "training.save_interval=2"]


@pytest.fixture
def own_env(tmp_path, monkeypatch):
    """The example trainer and its config in tmp_path, an MLflow sqlite store there."""
    for name in ("train.py", "config.yaml"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_spec(tmp_path: Path, command: dict | None = None, **fields) -> Path:
    spec = {"name": "own" + uuid.uuid4().hex[:6], "config": "config.yaml",
            "command": {"run": "{python} train.py --config_path {config} --output_dir {output_dir}",
                        "seed_key": "training.seed", "metrics": "mlflow",
                        "resume": {"checkpoint": "ckpt_*.npz", "args": "--resume_from {resume_from}"},
                        **(command or {})},
            "set": SHORT, "factors": {"algo.use_laplace_sampling": [True, False]}, "seeds": [0], "retries": 1,
            "heartbeat_s": 2, "output_dir": str(tmp_path / "studies"), **fields}
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def final_eval(run) -> float:
    from mlflow.tracking import MlflowClient

    history = MlflowClient().get_metric_history(run.info.run_id, "eval/success_rate")
    return max(history, key=lambda m: m.step).value


def test_example_study_2x2x2_each_cell_once_with_two_workers_then_reported(own_env, capsys):
    path = write_spec(own_env, factors={"algo.use_laplace_sampling": [True, False], "algo.scale_factor": [1.0, 2.0],
                                        "algo.ppo_clip_high": [0.2, 0.4]})
    assert main(["study", "run", str(path), "--workers", "2"]) == 0
    complete = Counter(t.user_attrs["cell_id"] for t in trials(path) if t.state.name == "COMPLETE")
    assert len(complete) == 8 and set(complete.values()) == {1}
    parent, children = child_runs(path)
    assert parent.info.status == "FINISHED" and len(children) == 8
    assert {r.info.status for r in children} == {"FINISHED"}
    by_cell = {r.data.tags["ript.cell_id"]: r for r in children}
    for t in trials(path):  # the objective is the trainer's own last evaluation, read back from its MLflow run
        run = by_cell[t.user_attrs["cell_id"]]
        assert t.value == pytest.approx(final_eval(run))
        assert run.data.params["algo.use_laplace_sampling"] in ("True", "False")  # the cell's YAML, flattened
    assert main(["report", str(path), "--reports", str(own_env / "reports"), "--no-upload"]) == 0
    text = (own_env / "reports" / load_study(path).name / "report.md").read_text()
    assert "Which switches matter" in text and "use_laplace_sampling: True -> False" in text
    assert "Not computed" in text and "`grad_norm/backbone`" in text  # what this trainer does not log is said


def test_jsonl_route_streams_the_file_into_the_run_and_is_reported(own_env):
    path = write_spec(own_env, command={
        "run": "{python} train.py --config_path {config} --output_dir {output_dir} --metrics_file {output_dir}/m.jsonl",
        "metrics": "jsonl", "metrics_file": "m.jsonl"})
    assert main(["study", "run", str(path), "--workers", "1"]) == 0
    from mlflow.tracking import MlflowClient

    _, children = child_runs(path)
    assert len(children) == 2
    for run in children:
        lines = [json.loads(x) for x in (load_study(path).study_dir / "cells" / run.data.tags["ript.cell_id"]
                                         / "m.jsonl").read_text().splitlines()]
        for metric in ("eval/success_rate", "ppo/approx_kl"):
            logged = {m.step: m.value for m in MlflowClient().get_metric_history(run.info.run_id, metric)}
            assert logged == {line["step"]: pytest.approx(line[metric]) for line in lines if metric in line}
    assert main(["report", str(path), "--reports", str(own_env / "reports"), "--no-upload"]) == 0


def test_failing_command_is_retried_and_its_last_output_is_the_reason(own_env, capsys):
    (own_env / "broken.py").write_text(
        "import os, sys\nprint('loading the policy...')\n"
        "print(f\"seed={os.environ['RIPT_ABLATE_SEED']} cuda={os.environ['CUDA_VISIBLE_DEVICES']!r}\")\n"
        "print('RuntimeError: CUDA out of memory', file=sys.stderr)\nsys.exit(3)\n")
    path = write_spec(own_env, command={"run": "{python} broken.py {config}"},
                      factors={"algo.use_laplace_sampling": [True]})
    assert main(["study", "run", str(path), "--workers", "1"]) == 4  # ended with a failed cell
    states = [t.state.name for t in trials(path)]
    assert states == ["FAIL", "FAIL"]  # the attempt and its one retry
    capsys.readouterr()
    assert main(["study", "status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "exited with code 3" in out and "CUDA out of memory" in out
    reason = trials(path)[-1].user_attrs["reason"]
    assert "seed=0 cuda=''" in reason and "loading the policy" in reason
    _, children = child_runs(path)
    assert [r.info.status for r in children] == ["FAILED", "FAILED"]


def test_typo_in_a_factor_key_is_refused_with_the_closest_key(own_env):
    path = write_spec(own_env, factors={"algo.ppo_clip_hihg": [0.2, 0.3]})
    with pytest.raises(ConfigError) as err:
        load_study(path)
    assert "algo.ppo_clip_hihg is not a key of config.yaml; did you mean algo.ppo_clip_high?" in str(err.value)
    path = write_spec(own_env, command={"run": "{python} train.py {cfg}", "seed_key": "training.sead"})
    problems = "\n".join(pytest.raises(ConfigError, load_study, path).value.problems)
    assert "unknown placeholder {cfg}" in problems and "did you mean training.seed?" in problems
    path = write_spec(own_env, command={"allow_new_keys": True}, factors={"algo.brand_new": [1, 2]})
    assert load_study(path).cell_data({"algo.brand_new": 2}, 5)["algo"]["brand_new"] == 2


def command_processes(marker: str) -> list[int]:
    """Pids of live processes whose command line mentions `marker` (the cell's config path)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "cmdline").read_bytes().decode(errors="replace") and alive(int(proc.name)):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def test_sigkill_of_a_worker_mid_cell_then_rerun_resumes_and_completes_once(own_env):
    path = write_spec(own_env, factors={"algo.use_laplace_sampling": [True]},
                      set=[*SHORT, "training.step_delay_s=2.0"])  # about 12 s of training: killed part-way
    proc = subprocess.Popen([sys.executable, "-m", "ript_ablate.cli", "study", "run", str(path), "--workers", "1"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    trial = wait_for(lambda: running_trial(path), 120, "a running cell")
    cell_dir = load_study(path).study_dir / "cells" / trial.user_attrs["cell_id"]
    wait_for(lambda: list(cell_dir.glob("ckpt_*.npz")), 60, "the trainer's first checkpoint")
    os.kill(int(trial.user_attrs["pid"]), signal.SIGKILL)
    proc.communicate(timeout=60)
    config = str(cell_dir / "config.yaml")
    # the command stops with its cell (the cell's watchdog takes its process group along), long before it would end
    wait_for(lambda: not command_processes(config), 4, "the command to stop with its cell")
    assert main(["study", "run", str(path), "--workers", "1"]) == 0
    ts = trials(path)
    assert [t.state.name for t in ts if t.state.name == "COMPLETE"] == ["COMPLETE"]
    assert not [t for t in ts if t.state.name == "RUNNING"]
    parent, children = child_runs(path)
    assert parent.info.status == "FINISHED" and not [r for r in children if r.info.status == "RUNNING"]
    resumed = [r for r in children if r.info.status == "FINISHED"]
    assert len(resumed) == 1 and resumed[0].data.tags["ript.resumed_from"].endswith(".npz")
    log = next(cell_dir.glob("attempt-*/output.log")).parent.parent
    assert any("resumed from" in p.read_text() for p in log.glob("attempt-*/output.log"))


def test_metrics_stream_placement_and_pruning_rules(tmp_path):
    from ript_ablate.study.attempt import prune_decision
    from ript_ablate.study.command_cell import JsonlStream, _prune, cuda_visible_devices

    path = tmp_path / "m.jsonl"
    stream = JsonlStream(path, "step")
    assert stream.read() == []  # no file yet
    path.write_text('{"step": 0, "eval/success_rate": 0.5}\nnot json\n'
                    '{"step": 1, "eval/success_rate": 0.2, "note": "x"}\n'
                    '{"step": 2, "eval/suc')  # the last line is still being written
    assert stream.read() == [(0, {"eval/success_rate": 0.5}), (1, {"eval/success_rate": 0.2})] and stream.skipped == 1
    with path.open("a") as f:
        f.write('cess_rate": 0.9}\n')
    assert stream.read() == [(2, {"eval/success_rate": 0.9})]
    assert (cuda_visible_devices("cuda:1"), cuda_visible_devices("cpu")) == ("1", "")

    class Trial:  # the pruner says stop from step 2 on
        _trial_id = 7

        def __init__(self):
            self.reported = []

        def report(self, value, step):
            self.reported.append((step, value))

        def should_prune(self):
            return self.reported[-1][0] >= 2

    class Store:
        def seed_states(self, config_id, exclude_trial):
            return []

    job = {"tags": {"ript.config_id": "cfg-1"}, "n_iterations": 4}
    trial, reported = Trial(), set()
    assert _prune((trial, Store()), {0: 0.5, 1: 0.4}, reported, job, prune_decision) is None
    assert _prune((trial, Store()), {0: 0.5, 1: 0.4, 2: 0.1}, reported, job, prune_decision) == "pruned at iteration 2"
    assert trial.reported == [(0, 0.5), (1, 0.4), (2, 0.1)]  # each point reported once
    assert _prune((trial, Store()), {4: 0.1}, set(), job, prune_decision) is None  # never at the last step


def test_adaptive_seeds_decide_one_factor_at_the_initial_seeds_and_add_a_seed_for_the_other(own_env, capsys):
    """A factor that changes nothing (a 1 ms pause per step) is settled at the 2 initial seeds as "no effect of 5
    points or more"; Laplace vs Gaussian is not, so every configuration gets a 3rd seed (the limit here)."""
    path = write_spec(own_env, factors={"algo.use_laplace_sampling": [True, False],
                                        "training.step_delay_s": [0.0, 0.001]},
                      seeds={"initial": 2, "max": 3, "min_effect": 5})
    assert main(["study", "run", str(path), "--workers", "2"]) == 0
    complete = Counter(t.user_attrs["seed"] for t in trials(path) if t.state.name == "COMPLETE")
    assert complete == {0: 4, 1: 4, 2: 4}  # 4 configurations x (2 initial seeds + the one added)
    capsys.readouterr()
    assert main(["study", "run", str(path), "--workers", "1"]) == 0  # a second run: nothing more to do
    assert len(trials(path)) == 12 and "nothing left to run" in capsys.readouterr().err  # and no worker started
    assert main(["report", str(path), "--reports", str(own_env / "reports"), "--no-upload"]) == 0
    text = (own_env / "reports" / load_study(path).name / "report.md").read_text()
    assert "no effect of 5 points or more (at 2 seeds)" in text
    laplace = next(line for line in text.splitlines() if line.startswith("| use_laplace_sampling: True -> False"))
    assert "(at 3 seeds)" in laplace or "undecided at the 3-seed limit" in laplace
    assert "12 cells run of the 12 a fixed 3-seed design needs" in text


def test_race_after_an_optuna_search_adds_seeds_to_the_best_two(own_env):
    path = write_spec(own_env, mode="optuna", sampler="random", n_configs=3, seeds=[0, 1],
                      factors=None, search_space={"algo.use_laplace_sampling": [True, False],
                                                  "algo.scale_factor": {"type": "float", "low": 1.0, "high": 2.0}},
                      race={"top": 2, "max_seeds": 3, "min_effect": 5})
    text = yaml.safe_load(path.read_text())
    del text["factors"]
    path.write_text(yaml.safe_dump(text))
    assert main(["study", "run", str(path), "--workers", "2"]) == 0
    seeds = {}
    for t in trials(path):
        if t.state.name == "COMPLETE":
            seeds.setdefault(t.user_attrs["config_id"], set()).add(t.user_attrs["seed"])
    by_size = sorted(seeds.values(), key=len)
    assert len(seeds) == 3 and by_size[0] == {0, 1}  # the third configuration is not raced
    raced = [c for c, s in seeds.items() if len(s) > 2]
    assert all(seeds[c] == {0, 1, 2} for c in raced) and len(raced) in (1, 2)  # the leader, and the other if open
    assert main(["report", str(path), "--reports", str(own_env / "reports"), "--no-upload"]) == 0
    report = (own_env / "reports" / load_study(path).name / "report.md").read_text()
    assert "Race of the best configurations" in report and "Best: **cfg-" in report
