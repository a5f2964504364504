"""MLflow tracking of one run: params, tags, metrics buffered and written once per iteration, artifacts.

The default store is MLflow's own default (sqlite `mlflow.db` in the working directory); MLFLOW_TRACKING_URI or
`tracking.tracking_uri` (the environment wins) points elsewhere, e.g. a server for multi-machine studies.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

MAX_BATCH = 1000  # MLflow's limit of items per log_batch call
REACH_TIMEOUT_S = 5.0  # how long the start-up check waits for a tracking server before saying it is unreachable


def resolve_tracking_uri(configured: str | None = None) -> str | None:
    """The rule everywhere: MLFLOW_TRACKING_URI wins, then the config's or spec's URI, else None (MLflow's own
    default: sqlite `mlflow.db` in the working directory)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or None


def describe_tracking_uri(uri: str | None) -> str:
    """For messages: where the runs are, and why there (the environment, the config, or MLflow's default)."""
    if uri is None:
        return "MLflow's default store (sqlite:///mlflow.db in the working directory)"
    source = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") == uri else "the config"
    return f"{uri} (from {source})"


def check_tracking_store(uri: str | None, timeout: float = REACH_TIMEOUT_S) -> None:
    """Fail fast, in one line, when the tracking store cannot be reached, instead of MLflow's minutes of retries:
    a server must answer /health within `timeout`; a sqlite file's directory must exist."""
    from ript_ablate.errors import TrackingUnavailable

    if uri is None:
        return
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:  # noqa: S310
                response.read(64)
        except urllib.error.HTTPError as exc:
            if exc.code >= 500:
                raise TrackingUnavailable(f"MLflow tracking server {uri} answered HTTP {exc.code} to /health; check "
                                          "the server's log") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingUnavailable(
                f"MLflow tracking server {describe_tracking_uri(uri)} is unreachable ({reason}; waited {timeout:g} s): "
                "start it (mlflow server --host 127.0.0.1 --port 5000 ...) or point MLFLOW_TRACKING_URI at a "
                "reachable store") from None
    elif uri.startswith("sqlite:///"):
        directory = Path(uri[len("sqlite:///"):]).expanduser().resolve().parent
        if not directory.is_dir():
            raise TrackingUnavailable(f"MLflow store {describe_tracking_uri(uri)}: directory {directory} does not "
                                      "exist; create it or fix the URI")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """No-op base: an untracked run (`--no-track`) still buffers, so both paths do the same work."""

    run_id: str | None = None

    def __init__(self) -> None:
        self.buffer: list[tuple[str, float, int]] = []

    def start(self, params: dict[str, Any], tags: dict[str, str]) -> None:
        """Untracked: nothing to create."""

    def record(self, metrics: dict[str, float], step: int) -> None:
        self.buffer.extend((k, float(v), step) for k, v in metrics.items())

    def flush(self) -> None:
        self.buffer.clear()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Untracked: artifacts stay in the run directory only."""

    def end(self, status: str) -> None:
        self.flush()


class MlflowTracker(Tracker):
    def __init__(self, tracking_uri: str | None, experiment: str, run_name: str | None,
                 parent_run_id: str | None = None):
        super().__init__()
        from mlflow.tracking import MlflowClient

        uri = resolve_tracking_uri(tracking_uri)
        check_tracking_store(uri)
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_name = run_name
        self.parent_run_id = parent_run_id

    def start(self, params: dict[str, Any], tags: dict[str, str]) -> None:
        from mlflow.entities import Param

        all_tags = dict(tags)
        if self.parent_run_id:
            all_tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=all_tags)
        self.run_id = run.info.run_id
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def flush(self) -> None:
        """One log_batch call per iteration (split at MLflow's 1000-item limit)."""
        import time

        from mlflow.entities import Metric

        if not self.buffer or self.run_id is None:
            self.buffer.clear()
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v, step in self.buffer]
        for i in range(0, len(metrics), MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + MAX_BATCH])
        self.buffer.clear()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def end(self, status: str) -> None:
        """status: FINISHED | FAILED | KILLED; 'diverged' runs end FAILED with tag ript.status=diverged."""
        self.flush()
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)
