"""MLflow tracking of one run: params, tags, metrics buffered and written once per iteration, artifacts."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from ript_ablate.tracking import tags as tag
from ript_ablate.tracking.uri import check_tracking_store, resolve_tracking_uri


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

    def set_tags(self, tags: dict[str, str]) -> None:
        """Untracked: nothing to tag."""

    def end(self, status: str) -> None:
        self.flush()


class MlflowTracker(Tracker):
    def __init__(self, tracking_uri: str | None, experiment: str, run_name: str | None,
                 parent_run_id: str | None = None):
        super().__init__()
        from ript_ablate.tracking.runs import client, experiment_id

        uri = resolve_tracking_uri(tracking_uri)
        check_tracking_store(uri)
        self.client = client(uri)
        self.experiment_id = experiment_id(self.client, experiment)
        self.run_name = run_name
        self.parent_run_id = parent_run_id

    def start(self, params: dict[str, Any], tags: dict[str, str]) -> None:
        from ript_ablate.tracking.runs import create_run

        all_tags = {**tags, **({tag.PARENT_RUN: self.parent_run_id} if self.parent_run_id else {})}
        self.run_id = create_run(self.client, self.experiment_id, self.run_name, all_tags, params)

    def flush(self) -> None:
        """One log_batch call per iteration (split at MLflow's 1000-item limit)."""
        from ript_ablate.tracking.runs import log_metrics

        if self.buffer and self.run_id is not None:
            log_metrics(self.client, self.run_id, self.buffer)
        self.buffer.clear()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        """log_batch calls of at most 100 tags (MLflow's limit for one call)."""
        from mlflow.entities import RunTag

        if self.run_id is None:
            return
        items = [RunTag(k, str(v)[:tag.MAX_TAG_CHARS]) for k, v in tags.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, tags=items[start:start + 100])

    def end(self, status: str) -> None:
        """status: FINISHED | FAILED | KILLED; 'diverged' runs end FAILED with their status tag
        (`tags.STATUS`) saying diverged."""
        self.flush()
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)
