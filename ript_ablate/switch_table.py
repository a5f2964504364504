"""Where each switch applies (torch-free, read by config validation): the switch x family table, and the check that refuses a switch that means nothing for
the chosen family before any compute.

A variant is a row of the table: laplace (a Laplace/Gaussian head), tokens, and the flow family's three ways of
getting a log-prob (flow_sde, flow_noise, laplace_ode). A switch set explicitly (`--set`, a study factor or `set:`)
to a value other than its default is refused where it does not apply; a config file that merely carries one (the
quick config's `scale_factor` under a token policy) still runs, and `inert_switches` names it.
"""

from __future__ import annotations

from typing import Any

VARIANTS = ("laplace", "tokens", "flow_sde", "flow_noise", "laplace_ode")
LAPLACE_LIKE = ("laplace", "laplace_ode")
FLOW = ("flow_sde", "flow_noise", "laplace_ode")

# switch -> (variants where it applies, why it does not apply elsewhere)
APPLIES: dict[str, tuple[tuple[str, ...], str]] = {
    "algo.use_laplace_sampling": (LAPLACE_LIKE, "it picks the noise of a Laplace/Gaussian head's sample"),
    "algo.scale_factor": (LAPLACE_LIKE, "it multiplies a Laplace/Gaussian head's predicted scale"),
    "algo.log_scale_clip": (LAPLACE_LIKE, "it clamps a Laplace/Gaussian head's log-scale in the ratio"),
    "algo.exact_behavior_logprob": (LAPLACE_LIKE, "it chooses a Laplace/Gaussian head's ratio density"),
    "algo.fix_scale_head": (("laplace", "flow_noise", "laplace_ode"), "the policy has no scale or noise head in use"),
    "algo.header_checkpoint": (("laplace", "flow_noise", "laplace_ode"), "the policy has no scale or noise head in use"),
    "algo.temperature": (("tokens",), "only action tokens are sampled at a temperature"),
    "algo.top_k": (("tokens",), "only action tokens are sampled from a top-k set"),
    "algo.token_logprob": (("tokens",), "it chooses how action tokens are scored"),
    "policy.n_bins": (("tokens",), "only the token head has bins"),
    "policy.denoise_steps": (FLOW, "only a flow-matching policy denoises"),
    "algo.flow_logprob": (FLOW, "only a flow-matching policy needs a flow log-prob"),
    "algo.flow_eval_noise": (("flow_sde", "flow_noise"), "laplace_ode and non-flow policies evaluate their mean"),
    "algo.flow_noise_level": (("flow_sde",), "it is Flow-SDE's noise level a"),
    "algo.flow_noise_std": (("flow_noise",), "it bounds Flow-Noise's learned noise head"),
    "algo.flow_noise_std_init": (("flow_noise",), "it starts Flow-Noise's learned noise head"),
    "algo.flow_chain_logprob": (("flow_noise",), "it combines Flow-Noise's chain of log-probs"),
}


def reference_variant(cfg: Any) -> str | None:
    """The variant of the built-in policy (`policy.head`, `algo.flow_logprob`); None for a plug-in policy, whose
    family is known once it is built."""
    if cfg.policy.name != "reference":
        return None
    return cfg.algo.flow_logprob if cfg.policy.head == "flow" else cfg.policy.head


def policy_variant(cfg: Any, policy: Any) -> str:
    family = getattr(policy, "family", "laplace")
    return cfg.algo.flow_logprob if family == "flow" else family


def _value(cfg: Any, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


def _default(cfg: Any, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(type(getattr(cfg, section))(), name)


def inert_switches(cfg: Any, variant: str, keys: Any = None) -> list[tuple[str, Any, str]]:
    """(key, value, why) of the switches (among `keys`, default all) set to a non-default value that mean nothing
    for `variant`."""
    out = []
    for key, (where, why) in APPLIES.items():
        if keys is not None and key not in keys:
            continue
        if variant not in where and _value(cfg, key) != _default(cfg, key):
            out.append((key, _value(cfg, key), why))
    return out


def switch_problems(cfg: Any, explicit: Any, variant: str | None = None) -> list[str]:
    """Problems for the explicitly set switches that do not apply to the config's (or the given) variant."""
    variant = variant or reference_variant(cfg)
    if variant is None or not explicit:
        return []
    return [f"{key}: got {value!r}, but it does not apply to a {variant} policy ({why}); see the switch x family "
            f"table in docs/families.md" for key, value, why in inert_switches(cfg, variant, set(explicit))]


def table_rows() -> list[tuple[str, list[bool]]]:
    """The switch x family table, for the docs and their test."""
    return [(key, [v in where for v in VARIANTS]) for key, (where, _) in APPLIES.items()]



def markdown_table() -> str:
    """The switch x family table as the README and docs/families.md show it (a test keeps them equal)."""
    lines = ["| switch | " + " | ".join(VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
    always = ("algo.log_prob_mode", "algo.lr", "algo.header_lr", "algo.ppo_clip_range", "algo.ppo_clip_high",
              "algo.rloo_over_all_rollouts", "algo.use_val_init", "algo.lora_adaptor_ckpt", "algo.checkpoint_path")
    names = ", ".join("`" + key.split(".", 1)[1] + "`" for key in always)
    lines.append(f"| {names} | " + " | ".join(["yes"] * len(VARIANTS)) + " |")
    for key, flags in table_rows():
        lines.append(f"| `{key}` | " + " | ".join("yes" if f else "-" for f in flags) + " |")
    return "\n".join(lines)
