"""The `reference` policy: a small transformer VLA stand-in with LoRA for RL, in the three families (`policy.head`)."""

from ript_ablate.policies.reference.model import (
                                                  ReferenceFlowPolicy,
                                                  ReferencePolicy,
                                                  ReferenceTokenPolicy,
                                                  build_policy,
                                                  inject_lora,
                                                  lora_parameters,
                                                  make_reference_policy,
                                                  merged_state_dict,
                                                  tokenize,
)

__all__ = ["ReferenceFlowPolicy", "ReferencePolicy", "ReferenceTokenPolicy", "build_policy", "inject_lora", "lora_parameters", "make_reference_policy",
           "merged_state_dict", "tokenize"]
