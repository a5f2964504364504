"""The study's MLflow side: one experiment per study, a parent run for the study, and clean-up of child runs
whose process died (a killed cell's run is marked KILLED, so nothing is left RUNNING after a resume)."""

from __future__ import annotations

from typing import Any

STUDY_TAG = "ript.study"
ROLE_TAG = "ript.role"


def client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    from ript_ablate.tracking import resolve_tracking_uri

    return MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))


def experiment_id(mlflow, name: str) -> str:
    found = mlflow.get_experiment_by_name(name)
    return found.experiment_id if found else mlflow.create_experiment(name)


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
    from mlflow.entities import Param

    run = mlflow.create_run(experiment_id(mlflow, experiment), run_name=f"study-{study}",
                            tags={STUDY_TAG: study, ROLE_TAG: "study"})
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        mlflow.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


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
            mlflow.set_tag(run_id, key, str(value)[:5000])
        mlflow.set_terminated(run_id, status=status)


def child_runs(tracking_uri: str | None, experiment: str, parent_run_id: str) -> list:
    """Every child run of the study's parent run (all statuses)."""
    mlflow = client(tracking_uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs, token = [], None
    while True:
        page = mlflow.search_runs([found.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def sweep_orphans(tracking_uri: str | None, experiment: str, parent_run_id: str, live_trials: set[str],
                  reason: str) -> int:
    """Mark KILLED every child run still RUNNING whose trial is not running any more; returns how many."""
    n = 0
    for run in child_runs(tracking_uri, experiment, parent_run_id):
        if run.info.status == "RUNNING" and run.data.tags.get("ript.trial_number") not in live_trials:
            mark_run(tracking_uri, run.info.run_id, "KILLED", {"ript.status": "lost", "ript.reason": reason})
            n += 1
    return n


def finish_parent(tracking_uri: str | None, run_id: str, status: str, metrics: dict[str, float],
                  tags: dict[str, str], artifacts: list[str]) -> None:
    import time

    from mlflow.entities import Metric

    mlflow = client(tracking_uri)
    now = int(time.time() * 1000)
    if metrics:
        mlflow.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    for key, value in tags.items():
        mlflow.set_tag(run_id, key, value)
    for path in artifacts:
        mlflow.log_artifact(run_id, path)
    mlflow.set_terminated(run_id, status=status)
