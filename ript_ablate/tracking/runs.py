"""Creating and reading runs: a study's experiment and parent run, its child runs (one per cell attempt), and
closing the runs of processes that died before they could (so nothing is left RUNNING after a resume).

The study runner, the cells and the report all go through these functions: the report reads MLflow, never the
study's own storage, for anything a run holds."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from ript_ablate.tracking import tags as tag
from ript_ablate.tracking.uri import resolve_tracking_uri

PARAMS_PER_BATCH = 100  # MLflow's limit of params per log_batch call
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
METRICS_PER_BATCH = 1000  # MLflow's limit of metrics per log_batch call


def client(tracking_uri: str | None):
    """An MlflowClient on the resolved URI (MLFLOW_TRACKING_URI wins)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))


def experiment_id(mlflow, name: str) -> str:
    found = mlflow.get_experiment_by_name(name)
    return found.experiment_id if found else mlflow.create_experiment(name)


def create_run(mlflow, experiment: str, run_name: str | None, tags: dict[str, str], params: dict[str, Any]) -> str:
    """A RUNNING run with its tags and params (in MLflow's batch sizes); returns its id."""
    from mlflow.entities import Param

    run = mlflow.create_run(experiment, run_name=run_name, tags=tags)
    items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()]
    for i in range(0, len(items), PARAMS_PER_BATCH):
        mlflow.log_batch(run.info.run_id, params=items[i:i + PARAMS_PER_BATCH])
    return run.info.run_id


def log_metrics(mlflow, run_id: str, points: Iterable[tuple[str, float, int]]) -> None:
    """Metrics as (name, value, step), in as few log_batch calls as MLflow's limit allows."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(name, float(value), now, int(step)) for name, value, step in points]
    for i in range(0, len(metrics), METRICS_PER_BATCH):
        mlflow.log_batch(run_id, metrics=metrics[i:i + METRICS_PER_BATCH])


def ensure_parent_run(tracking_uri: str | None, experiment: str, study: str, run_id: str | None,
                      params: dict[str, Any]) -> str:
    """The study's parent run: reuse the recorded one (set RUNNING again on a resume) or create it."""
    mlflow = client(tracking_uri)
    if run_id:
        try:
            run = mlflow.get_run(run_id)
            if run.info.status != "RUNNING":
                mlflow.update_run(run_id, status="RUNNING")
            return run_id
        except Exception:  # recorded in the study storage but gone from this tracking store: make a new one
            pass
    return create_run(mlflow, experiment_id(mlflow, experiment), f"study-{study}",
                      {tag.STUDY: study, tag.ROLE: tag.ROLE_STUDY}, params)


def find_parent_run(tracking_uri: str | None, experiment: str) -> str | None:
    """The study's parent run in its experiment (the latest, should there be several), or None."""
    mlflow = client(tracking_uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = mlflow.search_runs([found.experiment_id], f"tags.`{tag.ROLE}` = '{tag.ROLE_STUDY}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def mark_run(tracking_uri: str | None, run_id: str | None, status: str, tags: dict[str, str]) -> None:
    """End a cell's run on behalf of a process that died before it could (KILLED or FAILED)."""
    if not run_id:
        return
    mlflow = client(tracking_uri)
    try:
        run = mlflow.get_run(run_id)
    except Exception:  # never created
        return
    if run.info.status == "RUNNING":
        for key, value in tags.items():
            mlflow.set_tag(run_id, key, str(value)[:tag.MAX_TAG_CHARS])
        mlflow.set_terminated(run_id, status=status)


def child_runs(tracking_uri: str | None, experiment: str, parent_run_id: str) -> list:
    """Every child run of the study's parent run (all statuses)."""
    mlflow = client(tracking_uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs, token = [], None
    while True:
        page = mlflow.search_runs([found.experiment_id], f"tags.`{tag.PARENT_RUN}` = '{parent_run_id}'",
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def mark_lost(tracking_uri: str | None, experiment: str, parent_run_id: str, is_lost, reason: str) -> int:
    """Mark KILLED (status "lost") every child run still RUNNING whose trial number `is_lost(number)`; returns how
    many."""
    n = 0
    for run in child_runs(tracking_uri, experiment, parent_run_id):
        if run.info.status == "RUNNING" and is_lost(run.data.tags.get(tag.TRIAL_NUMBER)):
            mark_run(tracking_uri, run.info.run_id, "KILLED", tag.outcome_tags("lost", reason))
            n += 1
    return n


def sweep_orphans(tracking_uri: str | None, experiment: str, parent_run_id: str, live_trials: set[str],
                  reason: str) -> int:
    """Mark KILLED every child run still RUNNING whose trial is not running any more; returns how many."""
    return mark_lost(tracking_uri, experiment, parent_run_id, lambda number: number not in live_trials, reason)


def finish_parent(tracking_uri: str | None, run_id: str, status: str, metrics: dict[str, float],
                  tags: dict[str, str], artifacts: list[str]) -> None:
    mlflow = client(tracking_uri)
    log_metrics(mlflow, run_id, [(name, value, 0) for name, value in metrics.items()])
    for key, value in tags.items():
        mlflow.set_tag(run_id, key, value)
    for path in artifacts:
        mlflow.log_artifact(run_id, path)
    mlflow.set_terminated(run_id, status=status)


def metric_histories(tracking_uri: str | None, run_id: str, names: list[str]) -> dict[str, dict[int, float]]:
    """{metric: {step: value}} for the named metrics of one run (the last value at a step wins)."""
    mlflow = client(tracking_uri)
    return {name: {m.step: m.value for m in mlflow.get_metric_history(run_id, name)} for name in names}


def log_report(tracking_uri: str | None, run_id: str, paths: list, artifact_path: str) -> None:
    """Attach a report's files to the study's parent run."""
    mlflow = client(tracking_uri)
    for path in paths:
        mlflow.log_artifact(run_id, str(path), artifact_path)
