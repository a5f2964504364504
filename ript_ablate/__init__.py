"""ript-ablate: ablation studies of RIPT-style reinforcement post-training of robot policies."""

__version__ = "0.1.0"

import os as _os

# MLflow prints INFO lines (database creation, migrations) at start: only warnings are news to a user. Telemetry
# would try the network, which a study must never need.
_os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
_os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# MuJoCo reads MUJOCO_GL once, when first imported; without a display its default backend cannot render camera
# images. Choose a headless one now, before any simulator is imported (see ript_ablate.rendering).
if "MUJOCO_GL" not in _os.environ and not _os.environ.get("DISPLAY"):
    from ript_ablate.rendering import choose_gl_backend as _choose_gl_backend

    _choose_gl_backend()
