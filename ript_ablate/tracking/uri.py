"""Where the runs are: one rule for the tracking URI, said in messages, checked before any work starts.

The default store is MLflow's own default (sqlite `mlflow.db` in the working directory); MLFLOW_TRACKING_URI or
`tracking.tracking_uri` (the environment wins) points elsewhere, e.g. a server for multi-machine studies.
"""

from __future__ import annotations

import os
from pathlib import Path

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


def absolute_tracking_uri(uri: str | None) -> str:
    """The URI as another process with another working directory must see it: MLflow's default made explicit,
    and a relative sqlite path or local directory made absolute."""
    import mlflow

    resolved = resolve_tracking_uri(uri) or mlflow.get_tracking_uri()
    if resolved.startswith("sqlite:///") and not resolved.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(resolved[len("sqlite:///"):]).resolve())
    if "://" not in resolved and not resolved.startswith("file:"):
        return str(Path(resolved).resolve())
    return resolved
