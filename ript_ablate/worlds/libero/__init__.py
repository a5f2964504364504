"""LIBERO offline (the `libero` extra): LIBERO-Spatial and LIBERO-Object with scripted experts, every suite's
tasks and fixed evaluation states. Importing this package does not import LIBERO; building the world does."""

from ript_ablate.worlds.libero.world import LiberoEnv, LiberoWorld

__all__ = ["LiberoEnv", "LiberoWorld"]
