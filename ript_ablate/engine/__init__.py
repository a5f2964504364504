"""The rollout engine: environment worker processes with `replica` or `central` policy inference."""

from ript_ablate.engine.pool import RolloutEngine, RolloutError, make_batches, resolve_inference

__all__ = ["RolloutEngine", "RolloutError", "make_batches", "resolve_inference"]
