"""The public plug-in surface: implement `World` and `Policy` (see each module's docstring). A world whose
environments have a scripted expert (`ExpertEnv.expert_action`) gives demonstrations by calling
`collect_demonstrations(tasks, engine, want, candidates, demo_cache_path(world, cache_dir), on_batch)` from its
`demonstrations` method."""

from ript_ablate.demos import collect_demonstrations, demo_cache_path
from ript_ablate.episodes import Demonstrations, Episode, EpisodeJob, InitialState, Observation
from ript_ablate.interfaces.policy import FlowPolicy, Policy, TokenPolicy
from ript_ablate.interfaces.world import Env, ExpertEnv, UnobservedStepEnv, World

__all__ = ["Demonstrations", "Env", "Episode", "EpisodeJob", "ExpertEnv", "FlowPolicy", "InitialState", "Observation", "Policy", "TokenPolicy",
           "UnobservedStepEnv",
           "World", "collect_demonstrations", "demo_cache_path"]
