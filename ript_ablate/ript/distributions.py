"""The Laplace family's action distribution, where it used to live: see `ript_ablate.families.laplace`."""

from ript_ablate.families.base import reduce_action_dims, step_mask
from ript_ablate.families.laplace import ActionDistribution, effective_log_scale, elementwise_log_prob, log_prob

__all__ = ["ActionDistribution", "effective_log_scale", "elementwise_log_prob", "log_prob", "reduce_action_dims",
           "step_mask"]
