"""Behaviour-cloning base for any policy and any world with demonstrations, the way its family is trained
(`ript_ablate.families.bc_loss`): backbone + action head by L1 on the action chunk (Laplace, as OpenVLA-OFT),
cross-entropy over action bins (tokens) or the flow-matching loss (flow); then the scale head alone by Laplace
negative log-likelihood (a flow policy's around its ODE mean, what laplace_ode samples from; a token policy has
none). With
`sft.pretrain_tasks`, a multi-task pre-training stage comes first (the same L1 on many tasks' demonstrations; the
paper's Meta-World protocol: ML45 pre-training, then few-shot fine-tuning on the held-out tasks). Each stage is
cached under a hash of everything that produced it, so the bases of a study's cells share one pre-trained model.
An explicit step (`ript-ablate sft`, or the study runner before its cells), never a side effect of training:
`load_start_policy` only reads the cache.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ript_ablate import cache_keys, checkpoints
from ript_ablate.augment import is_image, random_shift
from ript_ablate.cache_lock import cache_lock
from ript_ablate.config import Config, pretrain_config, to_yaml
from ript_ablate.device import autocast, resolve_device
from ript_ablate.episodes import Demonstrations
from ript_ablate.errors import CheckpointError, ConfigError
from ript_ablate.families import bc_loss, scale_outputs
from ript_ablate.interfaces.policy import Policy
from ript_ablate.plugin_check import check_plugins
from ript_ablate.plugins import build_policy
from ript_ablate.progress import console, progress

SFT_FORMAT_VERSION = 2  # 2: keys include the producing code (ript_ablate.cache_keys)


@dataclass
class BCData:
    obs: dict[str, torch.Tensor]  # each (N, ...)
    instr: torch.Tensor  # (N, ...) the instruction encoding of each row
    target: torch.Tensor  # (N, H, D) the next H expert actions
    mask: torch.Tensor  # (N, H) 1 where the chunk is inside the episode

    def __len__(self) -> int:
        return self.target.shape[0]

    def to(self, device: torch.device) -> BCData:
        return BCData({k: v.to(device) for k, v in self.obs.items()},
                      *(t.to(device) for t in (self.instr, self.target, self.mask)))


def build_bc_data(demos: Any, tasks: list[str], encodings: dict[str, torch.Tensor], horizon: int) -> BCData:
    """Every step of every demonstration with the H-step action chunk that follows it (masked past the end).
    `encodings` holds each task's instruction as the policy encodes it."""
    obs: dict[str, list[np.ndarray]] = {}
    instr, target, mask = [], [], []
    for task in tasks:
        encoding = encodings[task]
        for ep in demos.episodes[task]:
            t_len, d = ep.actions.shape
            padded = np.concatenate([ep.actions, np.zeros((horizon, d), dtype=np.float32)])
            idx = np.arange(t_len)[:, None] + np.arange(horizon)[None, :]
            for key, value in ep.obs.items():
                obs.setdefault(key, []).append(value)
            target.append(padded[idx])
            mask.append((idx < t_len).astype(np.float32))
            instr.append(encoding.unsqueeze(0).expand(t_len, *encoding.shape))
    return BCData({k: torch.from_numpy(np.concatenate(v)) for k, v in obs.items()}, torch.cat(instr),
                  torch.from_numpy(np.concatenate(target)), torch.from_numpy(np.concatenate(mask)))


PRETRAIN_KEYS = ("pretrain_tasks", "pretrain_demos_per_task", "pretrain_steps", "pretrain_lr")


def _policy_identity(cfg: Config) -> dict[str, Any]:
    from ript_ablate.plugins import resolve

    return cache_keys.policy_identity(cfg, resolve("policy", cfg.policy.name))


def sft_key(cfg: Config, demo_key: str, pretrain_key: str | None = None) -> str:
    """Hash of everything that determines the base: demonstrations, the policy's settings and code, the BC
    settings and code, and the pre-trained model it was fine-tuned from (`pretrain_key`), if any."""
    sft = asdict(cfg.sft)
    for key in ("cache_dir", *PRETRAIN_KEYS):  # the pre-training stage enters through its own key
        sft.pop(key)
    if cfg.suite.observation == "state":  # no image to shift
        sft.pop("image_shift")
    if not sft["scale_demos_per_task"]:  # the original's scale fit: the bases built before the key existed
        sft.pop("scale_demos_per_task")
    if not sft["token_label_sigma"]:  # one-hot token targets: the bases built before the key existed
        sft.pop("token_label_sigma")
    spec = {"format": SFT_FORMAT_VERSION, "demos": demo_key, **_policy_identity(cfg), "sft": sft}
    if pretrain_key is not None:
        spec["pretrain"] = pretrain_key
    return cache_keys.digest(spec)


def pretrain_key(cfg: Config, demo_key: str) -> str:
    """Hash of what determines the pre-trained model: its demonstrations, the policy, the stage's settings."""
    sft = cfg.sft
    settings = {"steps": sft.pretrain_steps, "lr": sft.pretrain_lr, "batch_size": sft.batch_size,
                "weight_decay": sft.weight_decay, "seed": sft.seed}
    if cfg.suite.observation != "state":
        settings["image_shift"] = sft.image_shift
    return cache_keys.digest({"format": SFT_FORMAT_VERSION, "stage": "pretrain", "demos": demo_key,
                              **_policy_identity(cfg), "sft": settings})


def base_key(cfg: Config, world: Any) -> str:
    """The cache key of this config's base on `world` (which builds the pre-training world when there is one)."""
    if not cfg.sft.pretrain_tasks:
        return sft_key(cfg, demo_key(world))
    from ript_ablate.plugins import build_world

    pre = pretrain_key(cfg, demo_key(build_world(pretrain_config(cfg))))
    return sft_key(cfg, demo_key(world), pre)


def key_summary(cfg: Config, world: Any) -> str:
    """What a cache hit matched, in one line: the demonstrations' and the policy's inputs."""
    demo = cache_keys.demo_identity(world, world.run_config)
    policy = _policy_identity(cfg)
    simulator = {k: v for k, v in demo["world"].items() if k in ("metaworld", "mujoco", "simulator")}
    return (f"demonstrations {demo_key(world)} (world code {demo['world_code']}, demonstration code "
            f"{demo['demo_code']}{''.join(f', {k} {v}' for k, v in simulator.items())}), policy code "
            f"{policy['policy_code']}, behaviour-cloning code {policy['bc_code']}, torch {policy['torch']}")


def _batches(n: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (steps, min(batch_size, n)), generator=generator)


def _batch_obs(data: BCData, b: torch.Tensor, shift: int = 0,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The batch's observations; camera images randomly shifted by up to `shift` pixels (`generator` given)."""
    obs = {k: v[b] for k, v in data.obs.items()}
    if shift and generator is not None:
        obs = {k: random_shift(v, shift, generator) if is_image(v) else v for k, v in obs.items()}
    return obs


def train_bc(policy: Policy, data: BCData, cfg: Config, device: torch.device, pretraining: bool = False) -> float:
    """The family's loss on valid chunk entries (L1 for a Laplace head); AdamW with cosine decay (the pre-training
    stage's steps and lr when `pretraining`, else the fine-tuning's). Returns the final smoothed loss."""
    sft = cfg.sft
    steps, lr = (sft.pretrain_steps, sft.pretrain_lr) if pretraining else (sft.steps, sft.lr)
    scale_prefix = policy.role_prefixes().get("scale_head")
    params = [p for n, p in policy.named_parameters() if scale_prefix is None or not n.startswith(scale_prefix)]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=sft.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    data = data.to(device)
    index = _batches(len(data), sft.batch_size, steps, sft.seed)
    noise = torch.Generator().manual_seed(sft.seed + 2)  # a flow policy's times and noises
    shifts = torch.Generator().manual_seed(sft.seed + 3)  # the images' random shifts
    smoothed = float("nan")
    policy.train()
    with progress() as bar:
        task = bar.add_task("pre-training (behaviour cloning)" if pretraining else "behaviour cloning", total=steps,
                            status="")
        for step in range(steps):
            b = index[step].to(device)
            obs = _batch_obs(data, b, sft.image_shift, shifts)
            loss = bc_loss(policy, obs, data.instr[b], data.target[b], data.mask[b], cfg.training.precision, noise,
                           token_label_sigma=sft.token_label_sigma)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            if step % 50 == 0 or step == steps - 1:
                value = float(loss.detach())
                smoothed = value if math.isnan(smoothed) else 0.8 * smoothed + 0.2 * value
                bar.update(task, completed=step + 1, status=f"loss {smoothed:.4f}")
    policy.eval()
    return smoothed


def fit_scale_head(policy: Policy, data: BCData, cfg: Config, device: torch.device) -> float:
    """Laplace NLL of the expert chunk under (mu fixed, log_b learned): only the scale head moves. NaN for a policy
    without one (a token policy)."""
    sft = cfg.sft
    scale_head = policy.modules_by_role().get("scale_head")
    if scale_head is None:
        return float("nan")
    trainable = {p: p.requires_grad for p in policy.parameters()}
    for p in policy.parameters():
        p.requires_grad = False
    for p in scale_head.parameters():
        p.requires_grad = True
    optimizer = torch.optim.AdamW(scale_head.parameters(), lr=sft.scale_lr, weight_decay=0.0)
    data = data.to(device)
    index = _batches(len(data), sft.batch_size, sft.scale_steps, sft.seed + 1)
    last = float("nan")
    with progress() as bar:
        task = bar.add_task("scale head (Laplace NLL)", total=sft.scale_steps, status="")
        for step in range(sft.scale_steps):
            b = index[step].to(device)
            with autocast(device, cfg.training.precision):
                mu, log_b = scale_outputs(policy, _batch_obs(data, b), data.instr[b])
            mu, log_b = mu.detach().float(), log_b.float()
            nll = log_b + (data.target[b] - mu).abs() / log_b.exp() + math.log(2.0)
            loss = (nll.mean(-1) * data.mask[b]).sum() / data.mask[b].sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % 50 == 0 or step == sft.scale_steps - 1:
                last = float(loss.detach())
                bar.update(task, completed=step + 1, status=f"NLL {last:.3f}")
    for p, flag in trainable.items():
        p.requires_grad = flag
    return last


def base_dir(cfg: Config, world: Any) -> Path:
    return Path(cfg.sft.cache_dir) / "sft" / base_key(cfg, world)


def load_base(path: str | Path, cfg: Config, world: Any) -> Policy:
    """A policy with the weights of `path` (a model.safetensors file); clear error if missing or corrupt."""
    policy = build_policy(cfg, world)
    try:
        checkpoints.load_into(policy, checkpoints.load_tensors(path, "model checkpoint"), path, "model checkpoint")
    except CheckpointError as exc:
        if Path(cfg.sft.cache_dir) not in Path(path).parents:
            raise
        raise CheckpointError(f"{exc} The cached base no longer fits the policy: rebuild it with "
                              "`ript-ablate sft CONFIG --retrain`.") from None
    return policy.eval()


def demo_key(world: Any) -> str:
    """The key of the world's demonstrations: its description, settings and code (`ript_ablate.cache_keys`)."""
    return cache_keys.demo_key(world, world.run_config)


def cached_base(cfg: Config, world: Any) -> Path:
    """The weights file of this config's base; a clear error when it was never built."""
    weights = base_dir(cfg, world) / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"no behaviour-cloning base for this config in {cfg.sft.cache_dir} (expected "
                              f"{weights}): build it first with `ript-ablate sft CONFIG`, or start from "
                              "algo.checkpoint_path")
    return weights


def get_base(cfg: Config, world: Any, engine: Any, retrain: bool = False,
             checked: bool = False) -> tuple[Policy, Path, dict]:
    """The cached base for this config, trained (and cached) if absent, after the plug-ins pass their contract
    check (`checked`: done already). Returns (policy, weights file, info)."""
    out = base_dir(cfg, world)
    if not checked and (retrain or not (out / "model.safetensors").is_file()):
        check_plugins(cfg, world)
    out.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(out.with_name(out.name + ".lock"), f"the behaviour-cloning base {out.name}"):  # built once
        return _get_base_locked(cfg, world, engine, out, retrain)


def _collect_demonstrations(cfg: Config, world: Any, engine: Any, label: str) -> tuple[Any, float]:
    """The world's demonstrations (from its cache or its expert) with a progress bar; (demos, seconds)."""
    start = time.perf_counter()
    with progress() as bar:
        want = cfg.suite.demos_per_task
        task = bar.add_task(label, total=len(world.tasks) * want, status="")
        kept: dict[str, int] = {}

        def count(episodes: list) -> None:  # successes beyond a task's quota are not kept: not counted either
            for ep in episodes:
                if ep.success and kept.get(ep.task, 0) < want:
                    kept[ep.task] = kept.get(ep.task, 0) + 1
                    bar.advance(task, 1)

        demos = world.demonstrations(engine, cfg.sft.cache_dir, on_batch=count)
    if demos is not None and demos.expert_record:
        console.print(f"{label}: {sum(len(e) for e in demos.episodes.values())} kept; {demos.expert_summary()}")
    if demos is None:
        raise ConfigError([f"suite.name: the world {cfg.suite.name!r} gives no demonstrations, so no behaviour-"
                           "cloning base can be built; set algo.checkpoint_path to a model.safetensors"])
    return demos, time.perf_counter() - start


def _bc_data(policy: Policy, world: Any, demos: Any) -> BCData:
    encodings = {t: policy.encode_instruction(world.instruction(t)) for t in world.tasks}
    return build_bc_data(demos, world.tasks, encodings, policy.chunk_size)


def _save(policy: Policy, cfg: Config, out: Path, info: dict) -> None:
    """Weights, config and info into `out`, atomically (a directory rename)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoints.save_tensors(policy.state_dict(), tmp / "model.safetensors", {"format": str(SFT_FORMAT_VERSION)})
    (tmp / "config.yaml").write_text(to_yaml(cfg))
    (tmp / "info.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)


def _read_info(out: Path) -> dict:
    return json.loads((out / "info.json").read_text()) if (out / "info.json").is_file() else {}


def _held_out_data(cfg: Config, world: Any, policy: Policy, demos: Any, engine: Any) -> BCData:
    """`sft.scale_demos_per_task` further expert demonstrations per task, none of them a behaviour-cloning one:
    the world asked for demos_per_task + N takes its candidates in the same order, so its first demos_per_task
    per task are the behaviour-cloning ones and the rest are new (checked by initial state). They run on the
    base's own engine (its workers' world differs only in demos_per_task, which rollouts never read): a second
    engine would hold a second set of environments for every task (on LIBERO, gigabytes a worker)."""
    from ript_ablate.plugins import build_world

    n, extra = cfg.suite.demos_per_task, cfg.sft.scale_demos_per_task
    wide_cfg = replace(cfg, suite=replace(cfg.suite, demos_per_task=n + extra))
    wide_world = build_world(wide_cfg)
    wide, _ = _collect_demonstrations(wide_cfg, wide_world, engine, "held-out demonstrations (scale head)")
    held_out = {}
    for task in world.tasks:
        used = {s.state_id for s in demos.states[task]}
        fresh = [(s, ep) for s, ep in zip(wide.states[task], wide.episodes[task]) if s.state_id not in used]
        if len(fresh) < extra:
            raise RuntimeError(f"{task}: the world gave {len(fresh)} demonstrations outside the behaviour-cloning "
                               f"ones, {extra} wanted (sft.scale_demos_per_task)")
        held_out[task] = fresh[:extra]
    calibration = Demonstrations({t: [ep for _, ep in v] for t, v in held_out.items()},
                                 {t: [s for s, _ in v] for t, v in held_out.items()})
    return _bc_data(policy, world, calibration)


def pretrained_model(cfg: Config, world: Any) -> tuple[Policy, dict]:
    """The pre-training stage: behaviour cloning on `sft.pretrain_tasks` (observation statistics from their
    demonstrations), cached under `pretrain-<key>`; built with its own rollout engine when absent."""
    from ript_ablate.engine import RolloutEngine
    from ript_ablate.plugins import build_world

    pre_cfg = pretrain_config(cfg)
    pre_world = build_world(pre_cfg)
    out = Path(cfg.sft.cache_dir) / "sft" / f"pretrain-{pretrain_key(cfg, demo_key(pre_world))}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(out.with_name(out.name + ".lock"), f"the pre-trained model {out.name}"):
        weights = out / "model.safetensors"
        if weights.is_file():
            console.print(f"pre-trained model: cache hit {out}: {key_summary(cfg, pre_world)}")
            return load_base(weights, cfg, world), {**_read_info(out), "cache_hit": True}
        with RolloutEngine(pre_cfg, pre_world) as engine:
            demos, demo_seconds = _collect_demonstrations(
                pre_cfg, pre_world, engine, f"pre-training demonstrations ({len(pre_world.tasks)} tasks)")
        device = resolve_device(cfg.training.device)
        torch.manual_seed(cfg.sft.seed)
        policy = build_policy(cfg, world)
        data = _bc_data(policy, pre_world, demos)
        policy.observe_demonstrations(data.obs)
        policy.to(device)
        t0 = time.perf_counter()
        loss = train_bc(policy, data, cfg, device, pretraining=True)
        policy.cpu().eval()
        info = {"key": out.name, "demo_key": demo_key(pre_world), "tasks": pre_world.tasks, "bc_l1": loss,
                "samples": len(data), "demo_steps": demos.n_steps(), "demo_seconds": round(demo_seconds, 2),
                "train_seconds": round(time.perf_counter() - t0, 2), "device": str(device)}
        _save(policy, pre_cfg, out, info)
        console.print(f"pre-trained model saved to {out} (L1 {loss:.4f} on {len(pre_world.tasks)} tasks, "
                      f"{info['train_seconds']:.0f}s training)")
        return policy, {**info, "cache_hit": False}


def _get_base_locked(cfg: Config, world: Any, engine: Any, out: Path, retrain: bool) -> tuple[Policy, Path, dict]:
    weights = out / "model.safetensors"
    if weights.is_file() and not retrain:
        console.print(f"behaviour-cloning base: cache hit {out}: {key_summary(cfg, world)}")
        return load_base(weights, cfg, world), weights, {**_read_info(out), "cache_hit": True}

    pretrained, pretrain_info = pretrained_model(cfg, world) if cfg.sft.pretrain_tasks else (None, None)
    demos, demo_seconds = _collect_demonstrations(cfg, world, engine, "expert demonstrations")
    device = resolve_device(cfg.training.device)
    torch.manual_seed(cfg.sft.seed)
    policy = pretrained if pretrained is not None else build_policy(cfg, world)
    data = _bc_data(policy, world, demos)
    if pretrained is None:  # a pre-trained model keeps the observation statistics it was trained with
        policy.observe_demonstrations(data.obs)
    policy.to(device)
    t0 = time.perf_counter()
    bc_final = train_bc(policy, data, cfg, device)
    held_out = cfg.sft.scale_demos_per_task and policy.modules_by_role().get("scale_head") is not None
    scale_data = _held_out_data(cfg, world, policy, demos, engine) if held_out else data  # none to fit: none run
    nll = fit_scale_head(policy, scale_data, cfg, device)
    policy.cpu().eval()
    info = {
        "key": out.name, "demo_key": demo_key(world),
        "inputs": {"demonstrations": cache_keys.demo_identity(world, world.run_config), **_policy_identity(cfg)},
        "bc_l1": bc_final, "scale_nll": nll, "samples": len(data), "scale_samples": len(scale_data),
        "demo_steps": demos.n_steps(), "demo_seconds": round(demo_seconds, 2),
        "expert_record": {t: list(v) for t, v in demos.expert_record.items()},  # (successes, episodes) per task
        "train_seconds": round(time.perf_counter() - t0, 2), "device": str(device),
        "family": getattr(policy, "family", "laplace"),
        "log_b_bias": [float(v) for v in policy.checkpoint_tensors("header").get(
            policy.role_prefixes().get("scale_head", "") + "bias", torch.zeros(0)).tolist()],
    }
    if pretrain_info is not None:
        info["pretrain"] = {k: v for k, v in pretrain_info.items() if k != "cache_hit"}
    _save(policy, cfg, out, info)
    stage = "fine-tuned base" if pretrained is not None else "behaviour-cloning base"
    scale = f"scale NLL {nll:.3f}, " if math.isfinite(nll) else ""  # a token policy has no scale head
    console.print(f"{stage} saved to {out} (loss {bc_final:.4f}, {scale}{info['train_seconds']:.0f}s training)")
    return policy, weights, {**info, "cache_hit": False, "pretrain_cache_hit": (pretrain_info or {}).get("cache_hit")}


def ensure_base(cfg: Config, world: Any = None, check_cached: bool = True) -> Path:
    """The explicit behaviour-cloning step: the plug-ins' contract check, then this config's base, built with its
    own rollout engine when absent (nothing to build when the run starts from `algo.checkpoint_path`). Returns the
    weights file.

    `check_cached=False` skips the check when the base is already cached: a study's cells pass it, since the runner
    checked the plug-ins when it prepared the bases (the check builds an environment: 2-3 s on LIBERO, per cell);
    a cell that must build its base itself still checks first."""
    from ript_ablate.engine import RolloutEngine
    from ript_ablate.plugins import build_world

    world = world or build_world(cfg)
    weights = None if cfg.algo.checkpoint_path else base_dir(cfg, world) / "model.safetensors"
    if check_cached or weights is None or not weights.is_file():
        check_plugins(cfg, world)  # a policy or world off its contract is named now, not after a base is cached
    if weights is None:
        return Path(cfg.algo.checkpoint_path)
    if weights.is_file():
        return weights
    with RolloutEngine(cfg, world) as engine:
        return get_base(cfg, world, engine, checked=True)[1]
