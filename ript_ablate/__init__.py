"""ript-ablate: ablation studies of RIPT-style reinforcement post-training of robot policies."""

__version__ = "0.1.0"

import os as _os

# MLflow prints INFO lines (database creation, migrations) at start: only warnings are news to a user. Telemetry
# would try the network, which a study must never need.
_os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
_os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
