"""Typed configuration tree: dataclasses with per-field help, YAML loading, `--set` overrides, validation.

Every problem is collected (not only the first) and reported with the dotted key, the offending value
and what was expected. The `algo` section mirrors the original RIPT OpenVLA-OFT config block, keys and
defaults included, so an original config block loads unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ript_ablate.errors import ConfigError

LOG_PROB_MODES = ("sum_on_action_dim", "avg_on_action_dim", "ratio_on_action_dim")
FAMILIES = ("laplace", "tokens", "flow")  # ript_ablate.families
TOKEN_LOGPROBS = ("original", "exact")
FLOW_LOGPROBS = ("flow_sde", "flow_noise", "laplace_ode")
FLOW_CHAIN_LOGPROBS = ("sum", "mean")
FLOW_EVAL_NOISE = ("seeded", "zeros")
LORA_INITS = ("gaussian", "kaiming_uniform")
PRECISIONS = ("auto", "bf16", "fp32")
INFERENCE_MODES = ("auto", "replica", "central")
OBSERVATIONS = ("state", "images", "both")
RANK_SPLITS = ("tasks", "contexts")
EVAL_MODES = ("mean", "sample")

# Keys present in original RIPT configs that the original code never reads: accepted, with a warning.
ORIGINAL_UNUSED_ALGO_KEYS = (
    "kl_coef",
    "update_ref_model_freq_epochs",
    "use_full_action_tokens",
    "ref_model_checkpoint_path",
)


def _f(default: Any, help: str) -> Any:
    """A dataclass field with a one-line help text (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class SuiteConfig:
    name: str = _f("metaworld", "World: a registered name (built in: metaworld) or an import path "
                                "'package.module:factory' (README 'Bring your own policy and world').")
    options: dict[str, Any] = _f({}, "Settings of a plug-in world, passed to it as they are.")
    tasks: list[str] = _f(["quick"], "Task names (e.g. reach-v3) or the world's presets (Meta-World: 'quick', "
                                     "'mt10', 'ml45_train', 'ml45_test').")
    demos_per_task: int = _f(5, "Successful scripted-expert demonstrations per task for behaviour cloning.")
    demo_action_noise: float = _f(0.0, "Std of Gaussian noise added to the action the scripted expert executes while "
                                       "demonstrating (DART: the recorded label stays the expert's own action), so "
                                       "the demonstrations show how it recovers from the policy's small errors.")
    contexts_per_task: int = _f(20, "RL contexts per task beyond the demonstrations' own initial states.")
    eval_states_per_task: int = _f(50, "Fixed held-out evaluation initial states per task.")
    seed: int = _f(0, "Seed of the demonstration and context initial states.")
    eval_seed: int = _f(1000, "Seed of the evaluation initial states (kept fixed across runs).")
    num_workers: int = _f(2, "Rollout worker processes (0 = roll out in the main process).")
    envs_per_worker: int = _f(8, "Environments stepped together in one worker (instances reused per task).")
    max_envs_per_worker: int = _f(0, "Environments a worker keeps across tasks; beyond it the least recently used "
                                     "tasks' are closed (and built again when needed). 0 keeps every task's: "
                                     "fine for Meta-World's (10-60 MB each), not for LIBERO's (about 130 MB).")
    inference: str = _f("auto", "Rollout inference: replica (a policy copy in each worker), central (the policy "
                                "stays on the trainer's device; workers only step environments) or auto (central "
                                "on CUDA or for a policy that cannot be replicated).")
    observation: str = _f("state", "What the policy sees: state (the world's state vector), images (camera images "
                                   "and the robot's proprioception, nothing privileged) or both (images and the "
                                   "state). Images need an OpenGL backend (README 'Camera images').")
    cameras: list[str] = _f([], "Cameras rendered when suite.observation is images or both; empty: the world's "
                                "default ones (Meta-World: corner; any of topview, corner, corner2, corner3, "
                                "corner4, behindGripper, gripperPOV. LIBERO: agentview and robot0_eye_in_hand).")
    image_size: int = _f(64, "Side of the square uint8 RGB images, in pixels.")


@dataclass
class PolicyConfig:
    name: str = _f("reference", "Policy: a registered name (built in: reference) or an import path "
                                "'package.module:factory'. The keys below configure 'reference'.")
    options: dict[str, Any] = _f({}, "Settings of a plug-in policy, passed to it as they are.")
    d_model: int = _f(64, "Transformer width.")
    n_layers: int = _f(2, "Transformer blocks.")
    n_heads: int = _f(4, "Attention heads (must divide d_model).")
    mlp_ratio: int = _f(4, "Hidden width of each block's MLP as a multiple of d_model.")
    n_obs_tokens: int = _f(2, "Tokens the flat observation (the state, or the proprioception next to images) is "
                              "projected into.")
    chunk_size: int = _f(4, "H: actions per policy call (an action chunk, executed open-loop).")
    max_instruction_tokens: int = _f(10, "Instruction words kept (padded or truncated).")
    vocab_size: int = _f(512, "Hashed word vocabulary of the instruction embedding.")
    scale_bias_init: float = _f(-3.0, "Initial bias of the scale head (log_b), as in the original.")
    obs_std_floor: float = _f(0.01, "Floor of the observation std used for normalisation.")
    lora_alpha: float | None = _f(None, "LoRA alpha of the backbone adapters (null: min(algo.lora_rank, 16), "
                                        "the original's rule).")
    lora_init: str = _f("gaussian", "LoRA A initialisation: gaussian (the original's) or kaiming_uniform "
                                    "(peft's default).")
    lora_targets: list[str] = _f(["q", "k", "v", "o", "fc1", "fc2"], "Backbone linear layers carrying LoRA.")
    seed: int = _f(0, "Seed of the policy's initial weights.")
    head: str = _f("laplace", "The reference policy's family: laplace (mu and log_b heads), tokens (per-dimension "
                              "action bins) or flow (a flow-matching action expert). docs/families.md.")
    n_bins: int = _f(256, "tokens: action bins per dimension over [-1, 1].")
    denoise_steps: int = _f(4, "flow: denoising steps K of a chunk (K forward passes of the expert).")
    image_tokens: int = _f(2, "Tokens each camera's image is encoded into (suite.observation images or both).")
    image_channels: int = _f(32, "Channels of each camera's convolutional encoder, and its spatial-softmax "
                                 "keypoints.")


@dataclass
class SFTConfig:
    steps: int = _f(2000, "Behaviour-cloning optimizer steps (L1 loss on the action chunk).")
    batch_size: int = _f(256, "Behaviour-cloning batch size (observation, chunk) pairs.")
    lr: float = _f(1e-3, "Behaviour-cloning learning rate (AdamW, cosine decay).")
    weight_decay: float = _f(1e-4, "Behaviour-cloning AdamW weight decay.")
    scale_steps: int = _f(500, "Steps fitting the scale head alone by Laplace negative log-likelihood.")
    scale_lr: float = _f(1e-3, "Learning rate of the scale-head fit.")
    scale_demos_per_task: int = _f(0, "Demonstrations the scale head is fitted on: 0, the behaviour-cloning ones "
                                      "(the original's; the action head fits them almost exactly, so log_b comes "
                                      "out tiny); N, N further expert demonstrations per task that the action "
                                      "head never saw, so b measures its error on new states.")
    token_label_sigma: float = _f(0.0, "tokens: the behaviour-cloning target spread over neighbouring bins as a "
                                       "Gaussian of this many bin widths around the expert's action, integrated "
                                       "over each bin (0: the expert's bin alone). A near-miss bin then costs less "
                                       "than a far one, so the bins are ordered as the actions are.")
    image_shift: int = _f(4, "Random-shift augmentation of camera images in behaviour cloning: each image moved by up "
                             "to this many pixels per axis (0: none). Never in the RL update.")
    seed: int = _f(0, "Seed of batch sampling.")
    cache_dir: str = _f(".ript_cache", "Where demonstrations and behaviour-cloning bases are cached.")
    # --- optional multi-task pre-training stage before the target tasks (README "Pre-train, then few-shot") ---
    pretrain_tasks: list[str] = _f([], "Tasks or presets (Meta-World: 'ml45_train') the base is first trained on "
                                       "by behaviour cloning; the steps above then fine-tune it on suite.tasks with "
                                       "suite.demos_per_task demonstrations. Empty: no pre-training stage.")
    pretrain_demos_per_task: int = _f(20, "Scripted demonstrations per pre-training task.")
    pretrain_steps: int = _f(20000, "Behaviour-cloning steps of the pre-training stage.")
    pretrain_lr: float = _f(1e-3, "Learning rate of the pre-training stage (AdamW, cosine decay).")


@dataclass
class AlgoConfig:
    # --- RIPT switches (original names, defaults and meaning; README "Fidelity to the original RIPT") ---
    rloo_batch_size: int = _f(8, "K: rollouts per context and RLOO group size (>= 2).")
    gradient_accumulation_steps: int = _f(4, "Trajectories averaged per optimizer step.")
    num_ppo_epochs: int = _f(1, "Passes over the iteration's trajectories (reshuffled each pass).")
    ppo_clip_range: float = _f(0.1, "Lower clip: ratio clamped at 1 - ppo_clip_range.")
    ppo_clip_high: float = _f(0.1, "Upper clip: ratio clamped at 1 + ppo_clip_high (clip-higher if > range).")
    lr: float = _f(1e-4, "Learning rate of the backbone adapter (LoRA).")
    header_lr: float = _f(1e-5, "Learning rate of the action head (and the scale head unless fixed).")
    use_laplace_sampling: bool = _f(True, "Laplace action noise; false samples a Gaussian of the same scale.")
    scale_factor: float = _f(1.0, "Multiplies the predicted scale when sampling only (not in the log-prob).")
    log_scale_clip: list[float] | None = _f([-2.0, 0.5], "[low, high] clamp of log_b inside the log-prob only "
                                             "(null: no clamp, the original base config's default).")
    log_prob_mode: str = _f("sum_on_action_dim", "sum_on_action_dim | avg_on_action_dim | ratio_on_action_dim.")
    fix_scale_head: bool = _f(True, "Keep the scale head out of the optimizer (gradient still reaches the backbone).")
    enable_dynamic_sampling: bool = _f(True, "Discard contexts whose K rewards are all equal; try the next one.")
    early_stop_percentage: float = _f(1.0, "Stop sampling at int(this x the context quota) accepted groups "
                                           "(floor, with or without dynamic sampling, as the original).")
    use_val_init: bool = _f(False, "Draw rollout contexts from the evaluation initial states.")
    mix_val_init_in_rloo: bool = _f(False, "With use_val_init: each of the K rollouts gets its own state.")
    rloo_over_all_rollouts: bool = _f(False, "RLOO baseline over all rollouts of the iteration, not per group.")
    max_step_batch_size: int = _f(1, "Policy calls re-forwarded together in the update (rows of one GA group).")
    checkpoint_path: str | None = _f(None, "Full model checkpoint to start from (default: the cached BC base).")
    header_checkpoint: str | None = _f(None, "Scale-head weights (trained by Laplace NLL before RL).")
    lora_adaptor_ckpt: str | None = _f(None, "Adapter directory (LoRA + action and scale heads) to resume from.")
    # --- beyond the original ---
    exact_behavior_logprob: bool = _f(False, "Ratio uses the exact sampling density (scale_factor, no clamp).")
    loss_on_executed_steps_only: bool = _f(False, "Loss counts only executed actions (the original counts all H "
                                                  "positions of each recorded chunk).")
    max_sampling_attempts: int = _f(0, "Cap on contexts tried per iteration (0 = 4 x the context quota).")
    # --- policy families (docs/families.md: the switch x family table) ---
    temperature: float = _f(1.0, "tokens: sampling temperature.")
    top_k: int = _f(0, "tokens: sample among the k largest logits (0: all).")
    token_logprob: str = _f("original", "tokens: original (the full softmax, as QueST in the original) | exact (the "
                                        "behaviour distribution: temperature and top-k).")
    flow_logprob: str = _f("flow_sde", "flow: flow_sde (one stochastic step a chunk) | flow_noise (a learned noise "
                                       "head, every step) | laplace_ode (Laplace around the ODE's output).")
    flow_noise_level: float = _f(0.5, "flow_sde: noise level a of sigma_t = a sqrt(t / (1 - t)).")
    flow_noise_std: list[float] = _f([0.08, 0.16], "flow_noise: [low, high] bounds of the noise head's std.")
    flow_noise_std_init: float = _f(0.12, "flow_noise: the noise head's std at the start of RL.")
    flow_chain_logprob: str = _f("mean", "flow_noise: sum (ReinFlow) or mean (RLinf) of the chain's K + 1 terms.")
    flow_eval_noise: str = _f("seeded", "flow: evaluation integrates the ODE from noise seeded per episode, or zeros.")
    # --- original keys this project reads with the same meaning ---
    lora_rank: int = _f(32, "Rank of the backbone LoRA adapters.")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA path.")
    weight_decay: float = _f(1e-4, "AdamW weight decay of both parameter groups.")
    grad_norm_clip_model: float = _f(1.0, "Gradient-norm clip of the backbone adapter group.")
    grad_norm_clip_header: float = _f(1.0, "Gradient-norm clip of the head group.")
    model_seed: int = _f(0, "Seed of the RL run (sampling noise, shuffling).")
    max_episode_length: int | None = _f(None, "Episode length for every task (null: the suite's per-task lengths).")
    eval_only: bool = _f(False, "Evaluate the starting policy and stop.")
    rollout_training_task_names: list[str] | None = _f(None, "Train on these tasks only (null: all suite tasks).")
    # --- original keys accepted for compatibility; no effect in this project's world ---
    num_parallel_envs: int = _f(1, "Original's parallel envs per process; here suite.num_workers x envs_per_worker.")
    rollouts_per_env: int = _f(1, "Original's rollouts per env per call; here rollouts are scheduled per context.")
    rollout_stats_path: str | None = _f(None, "Original's rollout statistics dump path; not written here.")
    frame_stack: int = _f(1, "Original's image frame stack; not implemented here (one observation a decision, "
                             "images included), must stay 1.")


@dataclass
class TrainingConfig:
    n_iterations: int = _f(15, "RIPT iterations.")
    contexts_per_iteration: int = _f(8, "Accepted contexts (RLOO groups) per iteration.")
    eval_interval: int = _f(5, "Evaluate every N iterations (and before the first update).")
    eval_subset_per_task: int = _f(0, "Evaluations between the first and the last use only the first N evaluation "
                                      "states of each task (0: all of them); the evaluation before the first update "
                                      "and the final one always use every state (LIBERO: a subset while training, "
                                      "all 50 per task at the base and the end).")
    eval_mode: str = _f("mean", "How evaluation acts. mean: each family's deterministic action (the Laplace mean, "
                                "the argmax token, the ODE), as OpenVLA-OFT is evaluated; sample: the behaviour RIPT "
                                "trains (algo.scale_factor, temperature, top_k, the flow's SDE), one episode a state "
                                "seeded by the state's id, as the original evaluates QueST (top-5 tokens sampled).")
    save_interval: int = _f(5, "Checkpoint every N iterations (and at the end).")
    output_dir: str = _f("runs", "Where run outputs (checkpoints, resolved config) go.")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N. CUDA trains with bf16 autocast.")
    precision: str = _f("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 (also on CPU) | fp32.")
    max_nonfinite: int = _f(3, "Consecutive non-finite updates tolerated before the run ends 'diverged'.")
    collective_timeout_s: float = _f(1800.0, "Under torchrun: the longest one rank waits for the others (a rollout "
                                             "round or an evaluation of the slowest) before the run ends with an error.")
    rank_split: str = _f("tasks", "Under torchrun: how the training contexts are dealt to the processes. tasks: "
                                  "whole tasks round-robin, as the original does (3 tasks on 2 ranks: 2 + 1); "
                                  "contexts: every task's contexts round-robin, so every rank carries a share of "
                                  "every task.")


@dataclass
class TrackingConfig:
    enabled: bool = _f(True, "Track the run in MLflow.")
    tracking_uri: str | None = _f(None, "MLflow URI (MLFLOW_TRACKING_URI wins; default: MLflow's sqlite default).")
    experiment: str = _f("ript-ablate", "MLflow experiment name.")
    run_name: str | None = _f(None, "MLflow run name (default: generated).")
    log_checkpoint: bool = _f(True, "Upload the final checkpoint as an artifact.")


@dataclass
class Config:
    suite: SuiteConfig = field(default_factory=SuiteConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)


def pretrain_config(cfg: Config) -> Config:
    """The run's config with the pre-training tasks as its suite: the world (and its rollout workers) built from
    it gives the pre-training demonstrations, with each task's own episode limit (`algo.max_episode_length` is
    the RL runs' limit on the target tasks)."""
    suite = dataclasses.replace(cfg.suite, tasks=list(cfg.sft.pretrain_tasks),
                                demos_per_task=cfg.sft.pretrain_demos_per_task)
    algo = dataclasses.replace(cfg.algo, rollout_training_task_names=None, max_episode_length=None)
    return dataclasses.replace(cfg, suite=suite, algo=algo)


def all_keys() -> list[str]:
    """Every dotted key of the tree, e.g. 'algo.ppo_clip_high'."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def field_help() -> dict[str, str]:
    return {f"{s}.{f.name}": f.metadata.get("help", "") for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


# ----------------------------------------------------------------------------------------------- coercion

_MISSING = object()


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is dict:
        return "a mapping of keys to values"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    names = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", type(None): "null"}
    return names.get(tp, str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """Convert a YAML value to the field type, or raise ValueError (the caller names the key)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except ValueError:
                pass
        raise ValueError
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError
        return dict(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError
        (item,) = typing.get_args(tp)
        return [_coerce(v, item) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads '1e-4' (no dot) as a string: accept numeric strings.
            if not isinstance(value, str):
                raise ValueError
            try:
                value = float(value)
            except ValueError:
                raise ValueError from None
        if not math.isfinite(float(value)):
            raise ValueError
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError
        return value
    raise ValueError


def _suggest(key: str, section: str | None) -> str:
    """' (did you mean 'x'?)' using the section's keys first, then the whole tree."""
    pool = all_keys()
    if section is not None:
        local = [k.split(".", 1)[1] for k in pool if k.startswith(section + ".")]
        match = difflib.get_close_matches(key, local, n=1, cutoff=0.6)
        if match:
            return f" (did you mean '{section}.{match[0]}'?)"
    leaf = key.rsplit(".", 1)[-1]
    match = difflib.get_close_matches(leaf, [k.split(".", 1)[1] for k in pool], n=1, cutoff=0.6)
    if match:
        full = next(k for k in pool if k.endswith("." + match[0]))
        return f" (did you mean '{full}'?)"
    return ""


def _build_section(cls: type, name: str, data: Any, problems: list[str], source: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{name}: expected a mapping of keys, got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            if name == "algo" and key in ORIGINAL_UNUSED_ALGO_KEYS:
                warnings.warn(
                    f"{source}: algo.{key} is accepted but has no effect (the original RIPT code never reads it)",
                    stacklevel=2,
                )
                continue
            problems.append(f"{name}.{key}: unknown key in {source}{_suggest(str(key), name)}")
            continue
        try:
            kwargs[key] = _coerce(value, hints[key])
        except ValueError:
            problems.append(f"{name}.{key}: got {value!r}, expected {_type_name(hints[key])}")
    return cls(**kwargs)


ExtraCheck = typing.Callable[["Config"], list[str]]


def config_from_dict(data: Any, source: str = "<dict>", extra_checks: ExtraCheck | None = None,
                     explicit: typing.Iterable[str] = ()) -> Config:
    """Build and validate a Config; raises ConfigError listing every problem. `extra_checks` adds the problems
    only the chosen world and policy can see (`ript_ablate.plugins.config_problems`), when the values are sound.
    `explicit`: the keys set explicitly (`--set`, a study factor): one that means nothing for the policy's family
    is refused (`ript_ablate.switch_table`)."""
    problems: list[str] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"top level: expected a mapping with sections {list(SECTIONS)}, got {data!r}"], source)
    sections = {}
    for key, value in data.items():
        if key not in SECTIONS:
            hint = _suggest(str(key), None)
            match = difflib.get_close_matches(str(key), list(SECTIONS), n=1, cutoff=0.6)
            if match:
                hint = f" (did you mean '{match[0]}'?)"
            problems.append(f"{key}: unknown section in {source}{hint}; sections are {', '.join(SECTIONS)}")
            continue
        sections[key] = _build_section(SECTIONS[key], key, value, problems, source)
    cfg = Config(**sections)
    problems.extend(validate(cfg))
    if not problems:
        from ript_ablate.switch_table import switch_problems

        problems.extend(switch_problems(cfg, set(explicit)))
    if not problems and extra_checks is not None:
        problems.extend(extra_checks(cfg))
    if problems:
        raise ConfigError(problems, source)
    return cfg


MAX_YAML_NODES = 100_000  # a config or study spec has hundreds; aliases can make a small file expand without bound
MAX_YAML_BYTES = 4 * 1024 * 1024
_MERGE_TAG = "tag:yaml.org,2002:merge"


def expanded_nodes(root: yaml.Node, budget: int = MAX_YAML_NODES) -> int:
    """How many nodes constructing `root` would create, aliases and `<<` merge keys expanded. Each distinct node's
    size is computed once (an alias bomb is counted in time linear in the composed graph) and counting stops past
    `budget`. Raises ValueError for a recursive anchor (a node that contains itself) and for a key given twice
    in one mapping (plain YAML keeps the last one silently, which turns a 3-value factor into a 1-value one)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise ValueError(f"a recursive alias: the node on line {node.start_mark.line + 1} contains an alias to itself")
        open_nodes.add(id(node))
        total = 1
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                total += size(child)
                if total > budget:
                    break
        elif isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:  # copies the merged mapping's pairs in, as often as it is listed
                    total += size(value_node)
                else:
                    if isinstance(key_node, yaml.ScalarNode):
                        first = seen.setdefault((key_node.tag, key_node.value), key_node.start_mark.line)
                        if first != key_node.start_mark.line:
                            raise ValueError(f"key {key_node.value!r} is given twice (first on line {first + 1}, "
                                             f"again on line {key_node.start_mark.line + 1})")
                    total += size(key_node) + size(value_node)
                if total > budget:
                    break
        open_nodes.discard(id(node))
        sizes[id(node)] = min(total, budget + 1)
        return sizes[id(node)]

    return size(root)


def parse_yaml(text: str, source: str) -> Any:
    """Safe YAML, checked before anything is constructed: duplicate keys, recursive anchors and documents whose
    aliases expand past `MAX_YAML_NODES` are refused (composing shares aliased nodes, so it is linear in the text;
    constructing expands them). Every problem is a ConfigError naming the file."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError([f"the YAML document has {len(text)} characters, more than the {MAX_YAML_BYTES} a config "
                           "or study spec may have"], source)
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        try:
            nodes = expanded_nodes(root)
        except ValueError as exc:
            raise ConfigError([f"refused: {exc}"], source) from None
        if nodes > MAX_YAML_NODES:
            raise ConfigError([f"refused: its aliases (*name) and merge keys (<<) expand to more than "
                               f"{MAX_YAML_NODES} YAML nodes; a config or study spec has a few hundred"], source)
        return loader.construct_document(root)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {' '.join(str(exc).split())}"], source) from None
    finally:
        loader.dispose()


def parse_value(text: str, source: str) -> Any:
    """A command-line or tag value as YAML (`0.28`, `true`, `[a, b]`), or the text itself when it is not valid
    YAML; an expanding or recursive value is refused (a ConfigError) as in a file."""
    if not text.strip():
        return None
    try:
        return parse_yaml(text, source)
    except ConfigError as exc:
        if any(p.startswith("refused") or "characters, more than" in p for p in exc.problems):
            raise
        return text


def load_yaml(path: str | Path, what: str = "YAML file") -> Any:
    """A YAML file's content; a missing, binary, non-UTF-8, empty or malformed file is a ConfigError."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError([f"{p} is a directory, expected a {what}"], str(p))
    if not p.is_file():
        raise ConfigError([f"file not found: {p}"], str(p))
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}): expected a {what}"],
                          str(p)) from None
    if "\x00" in text:
        raise ConfigError([f"a binary file (it holds NUL bytes): expected a {what}"], str(p))
    data = parse_yaml(text, str(p))
    if data is None:
        raise ConfigError([f"the file is empty (no YAML content): expected a {what}"], str(p))
    return data


OPTION_SECTIONS = ("suite", "policy")  # whose `options` hold a plug-in's own settings, checked by the plug-in


def is_option_key(key: str) -> bool:
    """A dotted key into a plug-in's own settings, e.g. 'policy.options.hidden' (or deeper)."""
    parts = key.split(".")
    return len(parts) >= 3 and parts[0] in OPTION_SECTIONS and parts[1] == "options" and all(parts)


def set_dotted(nested: dict[str, Any], key: str, value: Any) -> None:
    """nested['a']['b']['c'] = value for key 'a.b.c', creating the mappings on the way."""
    *path, last = key.split(".")
    for part in path:
        nested = nested.setdefault(part, {})
        if not isinstance(nested, dict):
            raise ValueError(f"{key}: {part} is given as a value and as a mapping")
    nested[last] = value


def parse_overrides(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Turn ['algo.lr=1e-3', 'policy.options.hidden=128', ...] into a nested dict; values are parsed as YAML."""
    nested: dict[str, Any] = {}
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"--set {item!r}: expected dotted.key=value")
            continue
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not (len(parts) == 2 and all(parts)) and not is_option_key(key):
            problems.append(f"--set {item!r}: expected section.key=value, e.g. algo.ppo_clip_high=0.28, or a "
                            "plug-in's own setting, e.g. policy.options.hidden=128")
            continue
        try:
            value = parse_value(raw, f"--set {key}")
            set_dotted(nested, key, value)
        except ConfigError as exc:
            problems.extend(exc.problems)
        except ValueError as exc:
            problems.append(f"--set {item!r}: {exc}")
    return nested, problems


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


STUDY_SPEC_KEYS = {"config", "mode", "factors", "search_space", "seeds", "objective"}


def looks_like_study_spec(data: Any) -> bool:
    """A study spec names a base `config` and has none of a config's sections."""
    return isinstance(data, dict) and "config" in data and not set(SECTIONS) & set(data)


def load_config(path: str | Path, overrides: list[str] | None = None,
                extra_checks: ExtraCheck | None = None) -> Config:
    """Load a YAML config, apply `--set` overrides, validate; raises ConfigError with every problem."""
    data = load_yaml(path, "config")
    if looks_like_study_spec(data):
        raise ConfigError([f"this is a study spec (it has {', '.join(sorted(STUDY_SPEC_KEYS & set(data)))}), not a "
                           f"config: run it with `ript-ablate study run {path}`; a config has the sections "
                           f"{', '.join(SECTIONS)}"], str(path))
    nested, problems = parse_overrides(overrides or [])
    if problems:
        raise ConfigError(problems, str(path))
    if isinstance(data, dict):
        data = merge(data, nested)
    explicit = {item.partition("=")[0].strip() for item in overrides or []}
    return config_from_dict(data, str(path), extra_checks, explicit)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Config) -> dict[str, Any]:
    """{'algo.lr': 1e-4, ...}: the form MLflow params and study factors use."""
    return {f"{s}.{k}": v for s, sec in to_dict(cfg).items() for k, v in sec.items()}


# ----------------------------------------------------------------------------------------------- validation


def _check(problems: list[str], ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        problems.append(f"{key}: got {value!r}, expected {expected}")


# Upper bounds: what a run allocates or generates up front grows with these, so an absurd value must fail in
# validation with its reason, not after minutes at 100% CPU (a Meta-World initial state costs one env reset, about
# 8 ms; a demonstration one scripted episode; the policy's memory grows with its sizes).
UPPER_BOUNDS: dict[str, tuple[int, str]] = {
    "suite.demos_per_task": (1000, "each is a scripted episode run before training"),
    "suite.contexts_per_task": (10_000, "each is sampled up front by an env reset (10,000 take about 80 s a task)"),
    "suite.eval_states_per_task": (10_000, "each is sampled up front and evaluated at every evaluation"),
    "suite.num_workers": (256, "one process each"),
    "suite.envs_per_worker": (1024, "one Meta-World env instance each, about 10-60 MB"),
    "policy.d_model": (4096, "the stand-in policy's width"),
    "policy.n_layers": (64, "the stand-in policy's depth"),
    "policy.n_heads": (256, "attention heads"),
    "policy.mlp_ratio": (32, "the MLP's width multiple"),
    "policy.n_obs_tokens": (256, "tokens per observation"),
    "policy.image_tokens": (256, "tokens per camera"),
    "policy.image_channels": (1024, "channels of each camera's encoder"),
    "policy.chunk_size": (256, "actions per policy call"),
    "policy.max_instruction_tokens": (1024, "instruction tokens"),
    "policy.vocab_size": (1_000_000, "rows of the word embedding"),
    "sft.steps": (10_000_000, "behaviour-cloning steps"),
    "sft.scale_steps": (10_000_000, "scale-head steps"),
    "sft.batch_size": (1_000_000, "pairs per behaviour-cloning batch"),
    "sft.pretrain_demos_per_task": (1000, "each is a scripted episode run before pre-training"),
    "sft.scale_demos_per_task": (1000, "each is a scripted episode run before the scale-head fit"),
    "sft.pretrain_steps": (10_000_000, "pre-training steps"),
    "algo.rloo_batch_size": (4096, "rollouts per context"),
    "algo.gradient_accumulation_steps": (1_000_000, "trajectories per optimizer step"),
    "algo.num_ppo_epochs": (10_000, "passes over an iteration's trajectories"),
    "algo.max_step_batch_size": (1_000_000, "policy calls per forward pass"),
    "algo.max_sampling_attempts": (1_000_000, "contexts tried per iteration"),
    "algo.lora_rank": (4096, "adapter rank"),
    "training.n_iterations": (1_000_000, "RIPT iterations"),
    "training.contexts_per_iteration": (100_000, "RLOO groups per iteration"),
}
MAX_EPISODES_PER_ITERATION = 1_000_000  # contexts_per_iteration x rloo_batch_size: each episode is held in memory


def _bounded(p: list[str], cfg: Config) -> None:
    for key, (limit, why) in UPPER_BOUNDS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _check(p, value <= limit, key, value, f"at most {limit:,} ({why})")
    episodes = cfg.training.contexts_per_iteration * cfg.algo.rloo_batch_size
    _check(p, episodes <= MAX_EPISODES_PER_ITERATION, "training.contexts_per_iteration",
           cfg.training.contexts_per_iteration, f"contexts_per_iteration x algo.rloo_batch_size ({episodes:,} episodes "
           f"an iteration) at most {MAX_EPISODES_PER_ITERATION:,}: every episode of an iteration is held in memory")


def _check_families(p: list[str], cfg: Config) -> None:
    pol, a = cfg.policy, cfg.algo
    _check(p, pol.head in FAMILIES, "policy.head", pol.head, " | ".join(FAMILIES))
    _check(p, 2 <= pol.n_bins <= 4096, "policy.n_bins", pol.n_bins, "an integer in [2, 4096]")
    _check(p, 1 <= pol.denoise_steps <= 100, "policy.denoise_steps", pol.denoise_steps, "an integer in [1, 100]")
    _check(p, a.temperature > 0, "algo.temperature", a.temperature, "> 0")
    _check(p, a.top_k >= 0, "algo.top_k", a.top_k, ">= 0 (0: every token)")
    _check(p, a.token_logprob in TOKEN_LOGPROBS, "algo.token_logprob", a.token_logprob, " | ".join(TOKEN_LOGPROBS))
    _check(p, a.flow_logprob in FLOW_LOGPROBS, "algo.flow_logprob", a.flow_logprob, " | ".join(FLOW_LOGPROBS))
    _check(p, a.flow_noise_level > 0, "algo.flow_noise_level", a.flow_noise_level, "> 0")
    bounds = a.flow_noise_std
    ok = len(bounds) == 2 and 0 < bounds[0] < bounds[1]
    _check(p, ok, "algo.flow_noise_std", bounds, "[low, high] with 0 < low < high")
    _check(p, not ok or bounds[0] < a.flow_noise_std_init < bounds[1], "algo.flow_noise_std_init",
           a.flow_noise_std_init, f"strictly inside algo.flow_noise_std {bounds}")
    _check(p, a.flow_chain_logprob in FLOW_CHAIN_LOGPROBS, "algo.flow_chain_logprob", a.flow_chain_logprob,
           " | ".join(FLOW_CHAIN_LOGPROBS))
    _check(p, a.flow_eval_noise in FLOW_EVAL_NOISE, "algo.flow_eval_noise", a.flow_eval_noise,
           " | ".join(FLOW_EVAL_NOISE))


def validate(cfg: Config) -> list[str]:
    """Value checks; returns every problem as 'key: got value, expected ...'."""
    p: list[str] = []
    _bounded(p, cfg)
    s, pol, sft, a, t = cfg.suite, cfg.policy, cfg.sft, cfg.algo, cfg.training
    _check(p, bool(s.name.strip()), "suite.name", s.name, "a world name or an import path")
    _check(p, bool(pol.name.strip()), "policy.name", pol.name, "a policy name or an import path")
    _check(p, s.inference in INFERENCE_MODES, "suite.inference", s.inference, "one of " + ", ".join(INFERENCE_MODES))
    _check(p, s.observation in OBSERVATIONS, "suite.observation", s.observation, "one of " + ", ".join(OBSERVATIONS))
    _check(p, len(set(s.cameras)) == len(s.cameras), "suite.cameras", s.cameras, "each camera once")
    _check(p, 8 <= s.image_size <= 1024, "suite.image_size", s.image_size, "an integer in [8, 1024] (pixels)")
    _check(p, len(s.tasks) > 0, "suite.tasks", s.tasks, "at least one task or preset")
    _check(p, t.eval_subset_per_task >= 0, "training.eval_subset_per_task", t.eval_subset_per_task,
           ">= 0 (0: every evaluation state)")
    _check(p, s.demos_per_task >= 1, "suite.demos_per_task", s.demos_per_task, ">= 1")
    _check(p, 0.0 <= s.demo_action_noise <= 1.0, "suite.demo_action_noise", s.demo_action_noise,
           "between 0 and 1 (actions lie in [-1, 1])")
    _check(p, s.contexts_per_task >= 0, "suite.contexts_per_task", s.contexts_per_task, ">= 0")
    _check(p, s.eval_states_per_task >= 1, "suite.eval_states_per_task", s.eval_states_per_task, ">= 1")
    _check(p, s.num_workers >= 0, "suite.num_workers", s.num_workers, ">= 0")
    _check(p, s.envs_per_worker >= 1, "suite.envs_per_worker", s.envs_per_worker, ">= 1")
    _check(p, s.max_envs_per_worker == 0 or s.max_envs_per_worker >= s.envs_per_worker, "suite.max_envs_per_worker",
           s.max_envs_per_worker,
           f"0 (no limit) or >= suite.envs_per_worker ({s.envs_per_worker}): a batch needs them all")
    for key in ("d_model", "n_layers", "n_heads", "mlp_ratio", "n_obs_tokens", "chunk_size",
                "max_instruction_tokens", "vocab_size", "image_tokens", "image_channels"):
        value = getattr(pol, key)
        _check(p, value >= 1, f"policy.{key}", value, ">= 1")
    _check(p, pol.n_heads >= 1 and pol.d_model % max(pol.n_heads, 1) == 0, "policy.n_heads", pol.n_heads,
           f"a divisor of policy.d_model ({pol.d_model})")
    _check(p, pol.obs_std_floor > 0, "policy.obs_std_floor", pol.obs_std_floor, "> 0")
    _check(p, pol.lora_alpha is None or pol.lora_alpha > 0, "policy.lora_alpha", pol.lora_alpha, "null or > 0")
    _check(p, pol.lora_init in LORA_INITS, "policy.lora_init", pol.lora_init, "one of " + ", ".join(LORA_INITS))
    _check(p, len(pol.lora_targets) > 0, "policy.lora_targets", pol.lora_targets, "at least one layer name")
    unknown_targets = sorted(set(pol.lora_targets) - {"q", "k", "v", "o", "fc1", "fc2"}) if pol.name == "reference" else []
    _check(p, not unknown_targets, "policy.lora_targets", pol.lora_targets, "names among q, k, v, o, fc1, fc2")
    _check(p, sft.steps >= 0, "sft.steps", sft.steps, ">= 0")
    _check(p, sft.scale_steps >= 0, "sft.scale_steps", sft.scale_steps, ">= 0")
    _check(p, sft.scale_demos_per_task >= 0, "sft.scale_demos_per_task", sft.scale_demos_per_task, ">= 0")
    _check(p, sft.batch_size >= 1, "sft.batch_size", sft.batch_size, ">= 1")
    _check(p, math.isfinite(sft.token_label_sigma) and sft.token_label_sigma >= 0, "sft.token_label_sigma",
           sft.token_label_sigma, "a number >= 0 (0: one-hot targets)")
    _check(p, 0 <= sft.image_shift < s.image_size // 2, "sft.image_shift", sft.image_shift,
           f"an integer in [0, {s.image_size // 2 - 1}] (pixels; below half of suite.image_size)")
    _check(p, sft.pretrain_demos_per_task >= 1, "sft.pretrain_demos_per_task", sft.pretrain_demos_per_task, ">= 1")
    _check(p, sft.pretrain_steps >= 1, "sft.pretrain_steps", sft.pretrain_steps, ">= 1")
    for key in ("lr", "scale_lr", "pretrain_lr"):
        _check(p, getattr(sft, key) > 0, f"sft.{key}", getattr(sft, key), "> 0")
    _check(p, a.rloo_batch_size >= 2, "algo.rloo_batch_size", a.rloo_batch_size, ">= 2 (RLOO needs a leave-one-out baseline)")
    _check(p, a.gradient_accumulation_steps >= 1, "algo.gradient_accumulation_steps", a.gradient_accumulation_steps, ">= 1")
    _check(p, a.num_ppo_epochs >= 1, "algo.num_ppo_epochs", a.num_ppo_epochs, ">= 1")
    _check(p, 0 < a.ppo_clip_range < 1, "algo.ppo_clip_range", a.ppo_clip_range, "a number in (0, 1)")
    _check(p, a.ppo_clip_high > 0, "algo.ppo_clip_high", a.ppo_clip_high, "> 0")
    _check(p, a.lr >= 0, "algo.lr", a.lr, ">= 0 (0: the adapters never move, a control)")
    _check(p, a.header_lr >= 0, "algo.header_lr", a.header_lr, ">= 0 (0: the heads never move, a control)")
    _check(p, a.scale_factor > 0, "algo.scale_factor", a.scale_factor, "> 0")
    clip = a.log_scale_clip
    _check(p, clip is None or (len(clip) == 2 and clip[0] < clip[1]), "algo.log_scale_clip", clip,
           "null (no clamp) or [low, high] with low < high")
    _check(p, a.log_prob_mode in LOG_PROB_MODES, "algo.log_prob_mode", a.log_prob_mode, "one of " + ", ".join(LOG_PROB_MODES))
    _check(p, 0 < a.early_stop_percentage <= 1, "algo.early_stop_percentage", a.early_stop_percentage, "a number in (0, 1]")
    _check(p, not 0 < a.early_stop_percentage <= 1 or int(a.early_stop_percentage * t.contexts_per_iteration) >= 1,
           "algo.early_stop_percentage", a.early_stop_percentage,
           f"at least 1 / training.contexts_per_iteration ({t.contexts_per_iteration}): the sampling target "
           "int(early_stop_percentage x contexts_per_iteration) must be >= 1")
    _check(p, a.max_step_batch_size >= 1, "algo.max_step_batch_size", a.max_step_batch_size, ">= 1")
    _check(p, a.max_sampling_attempts >= 0, "algo.max_sampling_attempts", a.max_sampling_attempts, ">= 0 (0 = automatic)")
    _check(p, a.lora_rank >= 1, "algo.lora_rank", a.lora_rank, ">= 1")
    _check(p, 0 <= a.lora_dropout < 1, "algo.lora_dropout", a.lora_dropout, "a number in [0, 1)")
    _check(p, a.weight_decay >= 0, "algo.weight_decay", a.weight_decay, ">= 0")
    _check(p, a.grad_norm_clip_model > 0, "algo.grad_norm_clip_model", a.grad_norm_clip_model, "> 0")
    _check(p, a.grad_norm_clip_header > 0, "algo.grad_norm_clip_header", a.grad_norm_clip_header, "> 0")
    _check(p, a.max_episode_length is None or a.max_episode_length >= 1, "algo.max_episode_length",
           a.max_episode_length, "null or >= 1")
    _check(p, a.frame_stack == 1, "algo.frame_stack", a.frame_stack, "1 (frame stacking is not implemented)")
    _check(p, not a.mix_val_init_in_rloo or a.use_val_init, "algo.mix_val_init_in_rloo", a.mix_val_init_in_rloo,
           "false unless algo.use_val_init is true")
    _check_families(p, cfg)
    _check(p, t.n_iterations >= 0, "training.n_iterations", t.n_iterations, ">= 0")
    _check(p, t.contexts_per_iteration >= 1, "training.contexts_per_iteration", t.contexts_per_iteration, ">= 1")
    _check(p, t.eval_interval >= 1, "training.eval_interval", t.eval_interval, ">= 1")
    _check(p, t.save_interval >= 1, "training.save_interval", t.save_interval, ">= 1")
    _check(p, t.max_nonfinite >= 0, "training.max_nonfinite", t.max_nonfinite, ">= 0")
    _check(p, t.collective_timeout_s > 0, "training.collective_timeout_s", t.collective_timeout_s, "> 0 seconds")
    _check(p, t.eval_mode in EVAL_MODES, "training.eval_mode", t.eval_mode, " | ".join(EVAL_MODES))
    _check(p, t.rank_split in RANK_SPLITS, "training.rank_split", t.rank_split, " | ".join(RANK_SPLITS))
    _check(p, t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"), "training.device",
           t.device, "auto, cpu, cuda or cuda:N")
    _check(p, t.precision in PRECISIONS, "training.precision", t.precision, "one of " + ", ".join(PRECISIONS))
    return p
