"""The embedded default world: Meta-World v3 tasks with scripted experts."""

from ript_ablate.worlds.metaworld.world import MetaWorld, MetaWorldEnv, resolve_tasks

__all__ = ["MetaWorld", "MetaWorldEnv", "resolve_tasks"]
