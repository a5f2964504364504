"""The study runner: spec checks, exactly-once cells under concurrent workers (journal file and PostgreSQL),
crash recovery after SIGKILL, retries, failure reasons, and the MLflow parent/child hierarchy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from ript_ablate.cli import main
from ript_ablate.errors import ConfigError
from ript_ablate.plugins import build_world
from ript_ablate.study.objective import aggregate, iqm, metric_points, reduce_points
from ript_ablate.study.resources import plan_slots
from ript_ablate.study.spec import config_id_for, load_study
from ript_ablate.study.store import StudyStore, with_driver

PG_ADMIN = os.environ.get("RIPT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")

# Cells train the example plug-in's point-mass world (examples/pointmass: no physics engine to start, so a cell is
# mostly process start-up); the tests that must kill a cell mid-run slow its steps down with the plug-in's
# `step_delay_s` (sleeping, so the cell's length does not depend on the load of the machine).
CELL_CONFIG = {
    "suite": {"name": "pointmass", "tasks": ["reach"], "demos_per_task": 1, "contexts_per_task": 2,
              "eval_states_per_task": 2, "num_workers": 0, "envs_per_worker": 8},
    "policy": {"name": "mlp", "options": {"hidden": 16}},
    "sft": {"steps": 30, "scale_steps": 10, "batch_size": 32},
    "algo": {"rloo_batch_size": 2, "scale_factor": 3.0, "max_step_batch_size": 64},
    "training": {"n_iterations": 1, "contexts_per_iteration": 1, "eval_interval": 1, "save_interval": 1},
    "tracking": {"log_checkpoint": False},
}
METAWORLD_CELL_CONFIG = {  # the families' study cells (tests/test_families_runs.py)
    **CELL_CONFIG,
    "suite": {"tasks": ["reach-v3"], "demos_per_task": 1, "contexts_per_task": 2, "eval_states_per_task": 2,
              "num_workers": 0, "envs_per_worker": 8},
    "policy": {"d_model": 16, "n_layers": 1, "n_heads": 2, "chunk_size": 4},
    "algo": {"max_episode_length": 60, "rloo_batch_size": 2, "scale_factor": 5.0, "lora_rank": 2,
             "max_step_batch_size": 64},
}


def slow_cell(study_env: Path, n_iterations: int, step_delay_s: float = 0.004) -> None:
    """The study's base config, `n_iterations` long, on a point mass whose steps sleep (the plug-in's stand-in for
    a slow simulator): a cell still running when killed, whose length does not depend on how busy the CPU is."""
    config = json.loads(json.dumps(CELL_CONFIG))
    config["sft"]["cache_dir"] = str(study_env / "cache")
    config["suite"]["options"] = {"step_delay_s": step_delay_s}
    config["training"].update(n_iterations=n_iterations)
    (study_env / "tiny.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture
def study_env(tmp_path, monkeypatch):
    """A tiny base config in tmp_path and an MLflow sqlite store there (inherited by worker processes)."""
    cfg = json.loads(json.dumps(CELL_CONFIG))
    cfg["sft"]["cache_dir"] = str(tmp_path / "cache")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_spec(tmp_path: Path, **fields) -> Path:
    spec = {"name": "s" + uuid.uuid4().hex[:6], "config": "tiny.yaml", "mode": "grid",
            "factors": {"algo.ppo_clip_high": [0.2, 0.3]}, "seeds": [0], "retries": 1, "heartbeat_s": 2,
            "output_dir": str(tmp_path / "studies"), **fields}
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def child_runs(spec_path: Path) -> list:
    from mlflow.tracking import MlflowClient

    spec = load_study(spec_path)
    client = MlflowClient()
    exp = client.get_experiment_by_name(spec.experiment_name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("ript.role") == "study"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(runs) - 1, "every other run of the study's experiment nests under its parent"
    return parents[0], children


def trials(spec_path: Path, storage: str | None = None):
    spec = load_study(spec_path)
    return StudyStore(spec, spec.storage_url(storage), create=False).cells.get_trials()


# --- spec and pure pieces ---------------------------------------------------------------------------------------
def test_invalid_spec_lists_every_problem_before_anything_runs(study_env, capsys):
    path = write_spec(study_env, factors={"algo.ppo_clip_hgh": [0.2], "algo.ppo_clip_high": ["wide"],
                                          "algo.model_seed": [1]},
                      seeds=[0, 0], objective={"reduction": "median"}, retries=-1, colour="red")
    with pytest.raises(ConfigError) as err:
        load_study(path)
    text = str(err.value)
    for needle in ("colour: unknown study key", "factors.algo.ppo_clip_hgh: not a config key",
                   "factors.algo.model_seed: seeds are an axis", "seeds: got [0, 0]", "objective.reduction",
                   "retries: got -1"):
        assert needle in text, needle
    good_keys = write_spec(study_env, factors={"algo.ppo_clip_high": ["wide", 0.2]})
    with pytest.raises(ConfigError, match="with ppo_clip_high=wide: algo.ppo_clip_high"):
        load_study(good_keys)
    assert main(["study", "run", str(path)]) == 1
    assert "configuration error" in capsys.readouterr().err
    assert not (study_env / "studies").exists(), "nothing may be created for an invalid spec"


def test_optuna_spec_checks_ranges(study_env):
    path = write_spec(study_env, mode="optuna", factors=None, n_configs=0, sampler="grid",
                      search_space={"algo.header_lr": {"type": "float", "low": 0.0, "high": 1e-3, "log": True},
                                    "algo.scale_factor": {"type": "float", "low": 5, "high": 2}})
    text = yaml.safe_load(path.read_text())
    del text["factors"]
    path.write_text(yaml.safe_dump(text))
    with pytest.raises(ConfigError) as err:
        load_study(path)
    for needle in ("n_configs", "sampler", "search_space.algo.header_lr.low", "search_space.algo.scale_factor"):
        assert needle in str(err.value), needle


def test_grid_expansion_ids_and_objective_math(study_env):
    spec = load_study(write_spec(study_env, factors={"algo.use_laplace_sampling": [True, False],
                                                     "algo.ppo_clip_high": [0.2, 0.3, 0.4]}, seeds=[0, 1]))
    configs = spec.grid_configs()
    assert len(configs) == 6 and configs[0] == {"algo.use_laplace_sampling": True, "algo.ppo_clip_high": 0.2}
    assert spec.cell_config(configs[-1], 1).algo.model_seed == 1
    assert spec.cell_config(configs[-1], 1).algo.use_laplace_sampling is False
    history = [{"iteration": 0, "eval/success_rate": 0.2}, {"iteration": 1, "ppo/loss": 1.0},
               {"iteration": 5, "eval/success_rate": 0.6}, {"iteration": 10, "eval/success_rate": 0.4},
               {"iteration": 10, "eval/success_rate": 0.5}]  # a resumed run re-evaluates: the last value wins
    points = metric_points(history, "eval/success_rate")
    assert points == [(0, 0.2), (5, 0.6), (10, 0.5)]
    assert reduce_points(points, "final") == 0.5
    assert reduce_points(points, "best") == 0.6
    assert reduce_points(points, "best", "minimize") == 0.2
    assert reduce_points(points, "auc") == pytest.approx(((0.2 + 0.6) / 2 * 5 + (0.6 + 0.5) / 2 * 5) / 10)
    assert iqm([0.0, 0.5, 0.6, 10.0]) == pytest.approx(0.55)
    assert aggregate([0.1, 0.3], "mean") == pytest.approx(0.2)


def test_worker_slots_split_the_cores():
    one = plan_slots(1, "cpu", cores=2)
    assert [(s.device, s.threads, s.rollout_workers) for s in one] == [("cpu", 2, 2)]
    two = plan_slots(2, "cpu", cores=2)
    assert [(s.threads, s.rollout_workers) for s in two] == [(1, 0), (1, 0)]
    assert two[0].overrides(2) == {"training.device": "cpu", "suite.num_workers": 0}
    assert plan_slots(2, "cpu", cores=8)[0].overrides(2)["suite.num_workers"] == 2
    with pytest.raises(Exception, match="one trial per GPU"):
        plan_slots(3, "cuda:0,cuda:1", cores=8)


# --- end to end ---------------------------------------------------------------------------------------------------
def assert_exactly_once(spec_path: Path, n_cells: int, storage: str | None = None) -> None:
    ts = trials(spec_path, storage)
    complete = Counter(t.user_attrs["cell_id"] for t in ts if t.state.name == "COMPLETE")
    assert len(complete) == n_cells and set(complete.values()) == {1}, complete
    assert len(ts) == n_cells, "no cell was run twice (no duplicate or extra trials)"
    parent, children = child_runs(spec_path)
    assert parent.info.status == "FINISHED"
    assert Counter(r.data.tags["ript.cell_id"] for r in children) == {c: 1 for c in complete}
    assert {r.info.status for r in children} == {"FINISHED"}
    clip_values = {str(v) for v in load_study(spec_path).factors["algo.ppo_clip_high"]}
    assert {r.data.tags["factor.algo.ppo_clip_high"] for r in children} == clip_values


EIGHT = {"algo.ppo_clip_high": [0.2, 0.3], "algo.use_laplace_sampling": [True, False]}  # x 2 seeds


def test_eight_cells_four_workers_each_exactly_once_on_journal(study_env, capsys):
    path = write_spec(study_env, factors=EIGHT, seeds=[0, 1])
    assert main(["study", "run", str(path), "--workers", "4"]) == 0
    assert_exactly_once(path, 8)
    assert main(["study", "run", str(path), "--workers", "4"]) == 0, "a finished study re-run is a no-op"
    assert len(trials(path)) == 8
    capsys.readouterr()
    assert main(["study", "status", str(path)]) == 0
    assert "8/8 ended" in capsys.readouterr().out
    # every cell tagged each evaluation state's outcome at iterations 0 and 1: the gain paired per state (one task)
    # is then the seeds' mean gain exactly, and the report gives it its own table
    from ript_ablate.report.analysis import analyse
    from ript_ablate.report.collect import collect
    from ript_ablate.report.render import _state_gain_lines

    analysis = analyse(collect(load_study(path)), reps=200)
    configs = analysis.configs
    assert list(configs["state_gain_states"]) == [2] * 4
    assert np.allclose(configs["state_gain"], configs["gain"])
    assert (configs["state_gain_lo"] <= configs["state_gain"]).all() and (configs["state_gain"] <= configs["state_gain_hi"]).all()
    assert _state_gain_lines(analysis)[0].startswith("**Gain paired per evaluation state**")


@pytest.fixture
def postgres_url():
    """A fresh database on the PostgreSQL of this machine (127.0.0.1:5432); skipped, saying why, if none."""
    sqlalchemy = pytest.importorskip("sqlalchemy")
    name = "ript_test_" + uuid.uuid4().hex[:8]
    try:
        engine = sqlalchemy.create_engine(with_driver(PG_ADMIN), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    except Exception as exc:
        pytest.skip(f"no PostgreSQL reachable at {PG_ADMIN} (set RIPT_TEST_POSTGRES): {exc}")
    yield PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    engine.dispose()


def test_eight_cells_four_workers_each_exactly_once_on_postgresql(study_env, postgres_url):
    path = write_spec(study_env, factors=EIGHT, seeds=[0, 1])
    assert main(["study", "run", str(path), "--workers", "4", "--storage", postgres_url]) == 0
    assert_exactly_once(path, 8, postgres_url)


def test_sigkill_mid_cell_then_rerun_completes_every_cell_once(study_env):
    slow_cell(study_env, n_iterations=6, step_delay_s=0.002)
    path = write_spec(study_env, factors={"algo.ppo_clip_high": [0.2, 0.3]})
    spec = load_study(path)
    proc = subprocess.Popen([sys.executable, "-m", "ript_ablate.cli", "study", "run", str(path), "--workers", "1"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    checkpoint = None
    while time.time() < deadline and checkpoint is None:
        found = sorted(spec.study_dir.glob("cells/*/checkpoints/iter_0002/meta.json"))
        checkpoint = found[0] if found else None
        time.sleep(0.2)
    assert checkpoint is not None, "the first cell never reached its second checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)  # the coordinator, its worker and the running cell, at once
    proc.wait()
    killed_cell = checkpoint.parents[2].name
    assert main(["study", "run", str(path), "--workers", "1"]) == 0
    ts = trials(path)
    assert not [t for t in ts if t.state.name in ("RUNNING", "WAITING")]
    complete = Counter(t.user_attrs["cell_id"] for t in ts if t.state.name == "COMPLETE")
    assert complete == {c: 1 for c in complete} and len(complete) == 2
    lost = [t for t in ts if t.state.name == "FAIL"]
    assert [t.user_attrs["cell_id"] for t in lost] == [killed_cell]
    assert lost[0].user_attrs["status"] == "lost" and "gone" in lost[0].user_attrs["reason"]
    _, children = child_runs(path)
    runs = sorted((r for r in children if r.data.tags["ript.cell_id"] == killed_cell), key=lambda r: r.info.start_time)
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]
    assert runs[1].data.tags["ript.resumed_from"].endswith("iter_0002") or "iter_000" in runs[1].data.tags[
        "ript.resumed_from"]
    assert not [r for r in children if r.info.status == "RUNNING"]
    from mlflow.tracking import MlflowClient

    steps = [m.step for m in MlflowClient().get_metric_history(runs[1].info.run_id, "eval/success_rate")]
    assert steps[0] == 0 and steps[-1] == 6, "the resumed run carries the whole curve, from iteration 0"
    assert len(steps) == len(set(steps)), f"one point per evaluated iteration after a resume: {steps}"
    per_iteration = [m.step for m in MlflowClient().get_metric_history(runs[1].info.run_id, "train/success_rate")]
    assert per_iteration == list(range(1, 7)), "every iteration exactly once, replayed or not"


def test_retry_then_success_and_permanent_failure_with_reason(study_env, monkeypatch, capsys):
    path = write_spec(study_env, retries=1)
    spec = load_study(path)
    flaky, broken = [f"{config_id_for(v)}-s0" for v in spec.grid_configs()]
    monkeypatch.setenv("RIPT_ABLATE_INJECT_FAULT", f"{flaky}@1,{broken}@*")
    assert main(["study", "run", str(path), "--workers", "1"]) == 4  # the study ended with a failed cell
    by_cell: dict[str, list] = {}
    for t in trials(path):
        by_cell.setdefault(t.user_attrs["cell_id"], []).append(t)
    assert [t.state.name for t in by_cell[flaky]] == ["FAIL", "COMPLETE"]
    assert [t.state.name for t in by_cell[broken]] == ["FAIL", "FAIL"]
    reason = by_cell[broken][-1].user_attrs["reason"]
    assert "InjectedFault" in reason and "(traceback in " in reason
    log = Path(reason.rsplit("(traceback in ", 1)[1].rstrip(")"))
    assert "Traceback (most recent call last)" in log.read_text() and "InjectedFault" in log.read_text()
    capsys.readouterr()
    assert main(["study", "status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "failed" in out and "InjectedFault" in out
    assert str(log) in out.replace("\n", ""), "the whole reason, log path included, below the table"
    parent, children = child_runs(path)
    assert parent.info.status == "FAILED" and parent.data.tags["ript.status"] == "complete-with-failures"
    assert sorted(r.info.status for r in children) == ["FAILED", "FAILED", "FAILED", "FINISHED"]


def test_optuna_search_runs_each_configuration_on_all_seeds_and_tells_the_mean(study_env):
    path = write_spec(study_env, mode="optuna", sampler="random", n_configs=3, seeds=[0, 1], pruner="median",
                      search_space={"algo.ppo_clip_high": {"type": "float", "low": 0.1, "high": 0.4},
                                    "algo.use_laplace_sampling": [True, False]})
    text = yaml.safe_load(path.read_text())
    del text["factors"]
    path.write_text(yaml.safe_dump(text))
    assert main(["study", "run", str(path), "--workers", "2"]) == 0
    spec = load_study(path)
    store = StudyStore(spec, spec.storage_url(), create=False)
    configs = store.search.get_trials()
    assert len(configs) == 3 and {t.state.name for t in configs} <= {"COMPLETE", "PRUNED"}
    cells = [t for t in store.cells.get_trials() if t.state.name == "COMPLETE"]
    for config in configs:
        if config.state.name != "COMPLETE":
            continue
        seeds = [t for t in cells if t.user_attrs["config_trial"] == config.number]
        assert sorted(t.user_attrs["seed"] for t in seeds) == [0, 1]
        assert config.value == pytest.approx(sum(t.value for t in seeds) / 2)
        assert json.loads(seeds[0].user_attrs["values"]) == config.params
    _, children = child_runs(path)
    assert not [r for r in children if r.info.status == "RUNNING"]
    assert main(["report", str(path), "--reports", str(study_env / "reports")]) == 0
    report = (study_env / "reports" / spec.name / "report.md").read_text()
    assert (study_env / "reports" / spec.name / "optuna_params.png").is_file()
    assert "Which switches matter" not in report, "no paired effects over sampled float levels"
    import re

    assert not re.search(r"\d\.\d{7,}", report), "parameters are rounded for reading"


# --- faults: infrastructure, signals, stale workers, independent workers --------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_is_one_line_at_start(study_env, monkeypatch, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    path = write_spec(study_env)
    for argv in (["study", "run", str(path)], ["train", str(study_env / "tiny.yaml")], ["report", str(path)]):
        start = time.time()
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert time.time() - start < 20, argv
        assert f"MLflow tracking server {url} (from MLFLOW_TRACKING_URI) is unreachable" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
    assert not (study_env / "studies").exists(), "nothing is created while the tracking store is away"


def test_storage_errors_read_as_one_line(study_env):
    from ript_ablate.errors import is_infrastructure_error, readable_error
    from ript_ablate.study.store import StorageError

    sqlalchemy = pytest.importorskip("sqlalchemy")
    try:
        sqlalchemy.create_engine(f"postgresql+psycopg2://u@127.0.0.1:{free_port()}/db").connect()
    except Exception as exc:  # a real driver error, with the SQLAlchemy decorations
        line = readable_error(exc)
        assert is_infrastructure_error(exc)
    assert line.startswith("OperationalError: ") and "\n" not in line and "sqlalche.me" not in line, line
    with pytest.raises(StorageError) as err:
        StudyStore(load_study(write_spec(study_env)), f"postgresql://u@127.0.0.1:{free_port()}/db")
    assert "\n" not in str(err.value) and "[SQL" not in str(err.value)


def test_infrastructure_failure_is_waited_out_not_charged_to_the_cell(study_env, monkeypatch):
    path = write_spec(study_env, retries=0, factors={"algo.ppo_clip_high": [0.2]})
    spec = load_study(path)
    (cell,) = [f"{config_id_for(v)}-s0" for v in spec.grid_configs()]
    monkeypatch.setenv("RIPT_ABLATE_INJECT_FAULT", f"{cell}@1:infra")
    assert main(["study", "run", str(path), "--workers", "1"]) == 0, "retries: 0, yet the cell completes"
    ts = sorted(trials(path), key=lambda t: t.number)
    assert [t.state.name for t in ts] == ["FAIL", "COMPLETE"]
    assert ts[0].user_attrs["status"] == "infra" and "connection refused" in ts[0].user_attrs["reason"]
    assert ts[1].user_attrs["attempt"] == 1 and ts[1].user_attrs["infra_failures"] == 1
    log = (spec.study_dir / "logs" / "worker-0.log").read_text()
    assert "infrastructure unavailable" in log and "not counted against any cell's retries" in log
    _, children = child_runs(path)
    assert sorted(r.info.status for r in children) == ["FAILED", "FINISHED"]


def test_finalize_survives_a_tracking_store_that_went_away(study_env, monkeypatch, capsys):
    from ript_ablate.study.runner import finalize

    path = write_spec(study_env)
    assert main(["study", "run", str(path), "--workers", "1"]) == 0
    spec = load_study(path)
    store = StudyStore(spec, spec.storage_url(), create=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    assert finalize(spec, store, None) == 1
    err = capsys.readouterr().err
    assert "could not close runs left open" in err and "Traceback" not in err


def wait_for(predicate, seconds: float, what: str):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def running_trial(path: Path):
    from ript_ablate.study.store import StorageError

    try:
        return next((t for t in trials(path) if t.state.name == "RUNNING" and "cell_pid" in t.user_attrs), None)
    except StorageError:  # not set up yet
        return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT to the process group"])
def test_signals_stop_workers_and_cells_and_leave_nothing_running(study_env, how, monkeypatch):
    path = write_spec(study_env, factors={"algo.ppo_clip_high": [0.2]})  # one cell: the one interrupted
    (cell,) = [f"{config_id_for(v)}-s0" for v in load_study(path).grid_configs()]
    monkeypatch.setenv("RIPT_ABLATE_INJECT_FAULT", f"{cell}@1:stall")  # still running when the signal lands
    proc = subprocess.Popen([sys.executable, "-m", "ript_ablate.cli", "study", "run", str(path), "--workers", "1"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    trial = wait_for(lambda: running_trial(path), 120, "a running cell")
    worker_pid, cell_pid = int(trial.user_attrs["pid"]), int(trial.user_attrs["cell_pid"])
    wait_for(lambda: list(load_study(path).study_dir.glob("cells/*/attempt-1/run.json")), 60, "the cell's MLflow run")
    if how == "SIGTERM":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the runner and its workers
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "marked killed" in err and "Traceback" not in err
    assert not alive(worker_pid) and not alive(cell_pid), "workers and cells are stopped, not orphaned"
    ts = trials(path)
    assert not [t for t in ts if t.state.name == "RUNNING"]
    killed = [t for t in ts if t.user_attrs.get("status") == "killed"]
    assert len(killed) == 1 and killed[0].state.name == "FAIL"
    parent, children = child_runs(path)
    assert parent.info.status == "KILLED" and not [r for r in children if r.info.status == "RUNNING"]
    assert [r.info.status for r in children] == ["KILLED"]
    # the next run resumes and completes every cell once
    assert main(["study", "run", str(path), "--workers", "1"]) == 0
    complete = Counter(t.user_attrs["cell_id"] for t in trials(path) if t.state.name == "COMPLETE")
    assert len(complete) == 1 and set(complete.values()) == {1}


def test_signal_just_after_the_cell_wrote_its_result_keeps_the_result(study_env, monkeypatch):
    """The cell finished (result written, MLflow run FINISHED) and then the signal reached the worker: the cell is
    recorded complete, not killed and run again, and the worker still stops."""
    from ript_ablate.study import worker as worker_module
    from ript_ablate.study import zygote
    from ript_ablate.study.resources import plan_slots
    from ript_ablate.study.runner import open_store, set_up
    from ript_ablate.tracking import resolve_tracking_uri

    signalled = []
    wait = zygote.ZygoteCell.wait

    def signal_after_exit(self, timeout=None):
        code = wait(self)
        if not signalled:  # the worker's wait for its cell: the signal lands right after the exit
            signalled.append(True)
            raise KeyboardInterrupt
        return code

    spec = load_study(write_spec(study_env, factors={"algo.ppo_clip_high": [0.2]}))
    uri = resolve_tracking_uri(spec.tracking_uri)
    store = open_store(spec, None, create=True)
    set_up(spec, store, uri)
    worker = worker_module.Worker(spec, store, plan_slots(1, "cpu")[0], uri)
    monkeypatch.setattr(zygote.ZygoteCell, "wait", signal_after_exit)
    with pytest.raises(KeyboardInterrupt):
        worker.run_cell(store.claim())
    worker.zygote.close()
    (trial,) = trials(spec.path)
    assert trial.state.name == "COMPLETE" and trial.user_attrs["status"] == "finished"
    _, children = child_runs(spec.path)
    assert [r.info.status for r in children] == ["FINISHED"]


def test_stale_worker_that_comes_back_writes_nothing(study_env):
    """A worker paused past its lease (SIGSTOP) while another recovers and finishes its cell: its cell, still
    running, writes no history line once the lease is gone and closes its MLflow run KILLED; resumed (SIGCONT), the
    worker records nothing; one FINISHED run per cell. (Only the worker is paused: a paused cell could hold the SQLite
    tracking store's write lock, which stops every writer until it resumes.)"""
    # 8 iterations of about 2 s: paused after 2, the lease (4 s) is lost near the 5th, so the cell still runs then
    slow_cell(study_env, n_iterations=8)
    path = write_spec(study_env, factors={"algo.ppo_clip_high": [0.2]}, heartbeat_s=1, lease_timeout_s=4)
    spec = load_study(path)
    first = subprocess.Popen([sys.executable, "-m", "ript_ablate.cli", "study", "run", str(path), "--workers", "1"],
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trial = wait_for(lambda: running_trial(path), 120, "a running cell")
    stale = [int(trial.user_attrs["pid"])]
    wait_for(lambda: (spec.study_dir / "cells" / trial.user_attrs["cell_id"] / "history.jsonl").is_file()
             and (spec.study_dir / "cells" / trial.user_attrs["cell_id"] / "history.jsonl").read_text().count("\n")
             >= 2, 60, "two history lines")
    for pid in stale:
        os.kill(pid, signal.SIGSTOP)
    try:
        # another worker finds the lease expired, fails the trial, and runs the retry to the end
        assert main(["study", "worker", str(path)]) == 0
    finally:
        for pid in stale:
            os.kill(pid, signal.SIGCONT)
    first.wait(timeout=120)
    cell_dir = spec.study_dir / "cells" / trial.user_attrs["cell_id"]
    iterations = [json.loads(line)["iteration"] for line in (cell_dir / "history.jsonl").read_text().splitlines()]
    assert iterations == sorted(set(iterations)) and iterations[-1] == 8, iterations
    _, children = child_runs(path)
    statuses = Counter(r.info.status for r in children)
    assert statuses["FINISHED"] == 1 and statuses["RUNNING"] == 0, statuses
    stale_runs = [r for r in children if r.data.tags.get("ript.trial_number") == str(trial.number)]
    assert [r.info.status for r in stale_runs] == ["KILLED"]
    assert Counter(t.state.name for t in trials(path)) == {"FAIL": 1, "COMPLETE": 1}


def test_workers_on_postgresql_can_start_before_any_study_run(study_env, postgres_url):
    path = write_spec(study_env, factors={"algo.ppo_clip_high": [0.2, 0.3]})  # 2 cells for 2 racing workers
    cmd = [sys.executable, "-m", "ript_ablate.cli", "study", "worker", str(path), "--storage", postgres_url,
           "--devices", "cpu"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    ts = trials(path, postgres_url)
    complete = Counter(t.user_attrs["cell_id"] for t in ts if t.state.name == "COMPLETE")
    assert len(ts) == 2 and len(complete) == 2 and set(complete.values()) == {1}
    assert main(["study", "run", str(path), "--storage", postgres_url]) == 0  # closes the parent run
    parent, children = child_runs(path)  # one parent, every run nested
    assert parent.info.status == "FINISHED" and len(children) == 2


def test_prune_decision_keeps_final_results_and_one_state_per_configuration():
    from ript_ablate.study.attempt import prune_decision

    class FakeTrial:
        _trial_id = 7

        def __init__(self, prune: bool):
            self.prune = prune

        def should_prune(self) -> bool:
            return self.prune

    class FakeStore:
        def __init__(self, states: set[str]):
            self.states = states

        def seed_states(self, config_id: str, exclude_trial: int | None = None) -> set[str]:
            assert exclude_trial == 7
            return self.states

    assert prune_decision(FakeTrial(True), FakeStore(set()), "cfg", 2, 2) is None  # the last evaluation
    assert prune_decision(FakeTrial(True), FakeStore(set()), "cfg", 1, 2) == "pruned at iteration 1"
    assert prune_decision(FakeTrial(True), FakeStore({"COMPLETE"}), "cfg", 1, 2) is None  # a sibling finished
    assert "another seed was pruned" in prune_decision(FakeTrial(False), FakeStore({"PRUNED"}), "cfg", 1, 2)
    assert prune_decision(FakeTrial(False), FakeStore({"RUNNING"}), "cfg", 1, 2) is None


def test_median_pruner_waits_for_whole_configurations_and_early_iterations(study_env):
    config = yaml.safe_load((study_env / "tiny.yaml").read_text())
    config["training"].update(n_iterations=9)
    (study_env / "tiny.yaml").write_text(yaml.safe_dump(config))
    path = write_spec(study_env, mode="optuna", sampler="random", n_configs=4, seeds=[0, 1, 2], pruner="median",
                      search_space={"algo.ppo_clip_high": {"type": "float", "low": 0.1, "high": 0.4}})
    text = yaml.safe_load(path.read_text())
    del text["factors"]
    path.write_text(yaml.safe_dump(text))
    pruner = StudyStore(load_study(path), str(study_env / "j.journal"))._pruner()
    assert pruner._n_startup_trials == 3 * 3  # three whole configurations of 3 seeds before any comparison
    assert pruner._n_warmup_steps == 3  # not within the first third of a 9-iteration run


def test_every_cell_of_a_study_shares_one_pretrained_model(study_env, monkeypatch):
    """Cells differing in their fine-tuning get their own bases, all from one pre-training (trained once)."""
    from ript_ablate import bc
    from ript_ablate.study.runner import prepare_bases

    config = yaml.safe_load((study_env / "tiny.yaml").read_text())
    config["sft"].update(pretrain_tasks=["reach-mirror"], pretrain_demos_per_task=2, pretrain_steps=20)
    (study_env / "tiny.yaml").write_text(yaml.safe_dump(config))
    stages: list[bool] = []
    train = bc.train_bc
    monkeypatch.setattr(bc, "train_bc", lambda *a, pretraining=False, **k: stages.append(pretraining)
                        or train(*a, pretraining=pretraining, **k))
    spec = load_study(write_spec(study_env, factors={"sft.steps": [20, 25], "algo.ppo_clip_high": [0.2, 0.3]},
                                 seeds=[0, 1]))
    prepare_bases(spec)
    assert stages == [True, False, False]  # one pre-training, then one fine-tuning per distinct base
    infos = [json.loads(p.read_text()) for p in (study_env / "cache" / "sft").glob("*/info.json")]
    bases = [i for i in infos if "pretrain" in i]
    assert len(bases) == 2 and len({b["pretrain"]["key"] for b in bases}) == 1
    for values in spec.grid_configs():  # and each cell, when it starts, finds its base in the cache
        for seed in spec.seeds:
            cfg = spec.cell_config(values, seed)
            assert bc.ensure_base(cfg) == bc.cached_base(cfg, build_world(cfg))
    assert stages == [True, False, False]


def test_unknown_pretraining_task_is_named_before_any_compute(study_env, capsys):
    config = yaml.safe_load((study_env / "tiny.yaml").read_text())
    config["sft"]["pretrain_tasks"] = ["reach-mirorr"]
    (study_env / "tiny.yaml").write_text(yaml.safe_dump(config))
    assert main(["sft", str(study_env / "tiny.yaml")]) == 1
    err = capsys.readouterr().err
    assert "sft.pretrain_tasks: unknown point-mass task 'reach-mirorr'" in err
