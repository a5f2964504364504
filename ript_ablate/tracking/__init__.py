"""MLflow's one home in ript-ablate: the tracking-URI rule (`uri`), the tag names (`tags`), one run's tracker
(`tracker`) and creating and reading a study's runs (`runs`). Nothing else imports mlflow's client."""

from ript_ablate.tracking.tracker import MlflowTracker, Tracker, git_commit
from ript_ablate.tracking.uri import check_tracking_store, describe_tracking_uri, resolve_tracking_uri

__all__ = ["MlflowTracker", "Tracker", "check_tracking_store", "describe_tracking_uri", "git_commit",
           "resolve_tracking_uri"]
