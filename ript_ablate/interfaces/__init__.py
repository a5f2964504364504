"""The public plug-in surface: implement `World` and `Policy` (see each module's docstring)."""

from ript_ablate.episodes import Demonstrations, Episode, EpisodeJob, InitialState, Observation
from ript_ablate.interfaces.policy import Policy
from ript_ablate.interfaces.world import Env, ExpertEnv, World

__all__ = ["Demonstrations", "Env", "Episode", "EpisodeJob", "ExpertEnv", "InitialState", "Observation", "Policy",
           "World"]
