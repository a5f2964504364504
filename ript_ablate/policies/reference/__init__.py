"""The `reference` policy: a small transformer VLA stand-in with action and scale heads and LoRA for RL."""

from ript_ablate.policies.reference.model import (
                                                  ReferencePolicy,
                                                  build_policy,
                                                  inject_lora,
                                                  lora_parameters,
                                                  make_reference_policy,
                                                  merged_state_dict,
                                                  tokenize,
)

__all__ = ["ReferencePolicy", "build_policy", "inject_lora", "lora_parameters", "make_reference_policy",
           "merged_state_dict", "tokenize"]
