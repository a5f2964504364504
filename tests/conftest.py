"""Shared fixtures: a tiny one-task config so the suite runs in seconds on 2 cores, and an MLflow store per test
that is a copy of one created once (creating an MLflow sqlite store takes about 2 s)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest
import yaml


ALL_CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def _keep_xdist_worker_to_its_cores() -> None:
    """Under pytest-xdist, each worker (and every process it starts: study workers, cells, ranks) keeps to its own
    share of the cores, with that many torch threads. Without this, two workers on 2 cores each run 2-thread torch
    and 2-thread cells, and the oversubscribed OpenMP threads spin-wait for one another."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    if len(ALL_CORES) < count:
        return
    share = set(ALL_CORES[int(worker.removeprefix("gw")) % count::count])
    os.sched_setaffinity(0, share)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(len(share))
    import torch

    torch.set_num_threads(len(share))


_keep_xdist_worker_to_its_cores()

# Each test file's measured seconds (tests/file_seconds.json): `make test` hands files to its 2 processes heaviest
# first (with --no-loadscope-reorder, xdist keeps this order), so that a long file is not the last one started while
# the other process sits idle. `make test-times` measures them anew.
FILE_SECONDS = Path(__file__).with_name("file_seconds.json")
RECORD_ENV = "RIPT_RECORD_FILE_SECONDS"


def pytest_collection_modifyitems(config, items) -> None:
    seconds = json.loads(FILE_SECONDS.read_text()) if FILE_SECONDS.is_file() else {}
    items.sort(key=lambda item: -seconds.get(item.path.name, 0.0))  # stable: a file's own order is kept


_measured: dict[str, float] = {}


def pytest_runtest_logreport(report) -> None:
    if os.environ.get(RECORD_ENV):
        name = report.nodeid.split("::")[0].rsplit("/", 1)[-1]
        _measured[name] = _measured.get(name, 0.0) + report.duration


def pytest_sessionfinish(session) -> None:
    if os.environ.get(RECORD_ENV) and _measured and not os.environ.get("PYTEST_XDIST_WORKER"):
        rounded = {name: round(s, 1) for name, s in sorted(_measured.items(), key=lambda kv: -kv[1])}
        FILE_SECONDS.write_text(json.dumps(rounded, indent=1) + "\n")

from ript_ablate.config import Config, config_from_dict

TINY = {
    "suite": {"tasks": ["reach-v3"], "demos_per_task": 2, "contexts_per_task": 2, "eval_states_per_task": 3,
              "num_workers": 0, "envs_per_worker": 4},
    "policy": {"d_model": 32, "n_layers": 1, "n_heads": 2, "chunk_size": 4, "max_instruction_tokens": 8},
    "sft": {"steps": 20, "scale_steps": 10, "batch_size": 32},
    "algo": {"max_episode_length": 40},
}


@pytest.fixture
def all_cores():
    """For a test whose cells run several processes (the runner refuses more processes than it has cores): every
    core of the machine for the test's duration, as a user's run would have."""
    if not ALL_CORES:
        yield
        return
    own = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(ALL_CORES))
    try:
        yield
    finally:
        os.sched_setaffinity(0, own)


@pytest.fixture
def tiny_dict(tmp_path) -> dict:
    data = {k: dict(v) for k, v in TINY.items()}
    data["sft"]["cache_dir"] = str(tmp_path / "cache")
    return data


@pytest.fixture
def tiny_cfg(tiny_dict) -> Config:
    return config_from_dict(tiny_dict)


@pytest.fixture
def tiny_yaml(tmp_path, tiny_dict):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_dict))
    return path


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory):
    """An empty MLflow sqlite store with its tables created, once per test session."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def fresh_mlflow_store(tmp_path, mlflow_template):
    """Every test's tmp_path/mlflow.db starts as a copy of the template: the tests that track into
    sqlite:///<tmp_path>/mlflow.db skip MLflow's table creation, and each still gets a store of its own."""
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")

