"""Behaviour-cloning base: backbone + action head by L1 on the action chunk (as OpenVLA-OFT), then the scale
head alone by Laplace negative log-likelihood. Cached under a hash of everything that produced it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ript_ablate import checkpoints
from ript_ablate.config import Config, to_yaml
from ript_ablate.device import autocast, resolve_device
from ript_ablate.policy import ReferencePolicy, build_policy, tokenize
from ript_ablate.progress import console, progress

SFT_FORMAT_VERSION = 1


@dataclass
class BCData:
    obs: torch.Tensor  # (N, obs_dim)
    instr: torch.Tensor  # (N, L)
    target: torch.Tensor  # (N, H, D) the next H expert actions
    mask: torch.Tensor  # (N, H) 1 where the chunk is inside the episode

    def __len__(self) -> int:
        return self.obs.shape[0]

    def to(self, device: torch.device) -> BCData:
        return BCData(*(t.to(device) for t in (self.obs, self.instr, self.target, self.mask)))


def build_bc_data(demos: Any, tasks: list[str], instructions: dict[str, str], policy_cfg: Any) -> BCData:
    """Every step of every demonstration with the H-step action chunk that follows it (masked past the end)."""
    horizon = policy_cfg.chunk_size
    obs, instr, target, mask = [], [], [], []
    for task in tasks:
        ids = tokenize(instructions[task], policy_cfg.vocab_size, policy_cfg.max_instruction_tokens)
        for ep in demos.episodes[task]:
            t_len, d = ep.actions.shape
            padded = np.concatenate([ep.actions, np.zeros((horizon, d), dtype=np.float32)])
            idx = np.arange(t_len)[:, None] + np.arange(horizon)[None, :]
            obs.append(ep.obs)
            target.append(padded[idx])
            mask.append((idx < t_len).astype(np.float32))
            instr.append(np.tile(np.asarray(ids, dtype=np.int64), (t_len, 1)))
    return BCData(torch.from_numpy(np.concatenate(obs)), torch.from_numpy(np.concatenate(instr)),
                  torch.from_numpy(np.concatenate(target)), torch.from_numpy(np.concatenate(mask)))


def sft_key(cfg: Config, demo_key: str) -> str:
    """Hash of everything that determines the base: demonstrations, policy architecture, BC settings."""
    sft = asdict(cfg.sft)
    sft.pop("cache_dir")
    spec = {"format": SFT_FORMAT_VERSION, "demos": demo_key, "policy": asdict(cfg.policy), "sft": sft}
    if cfg.training.precision != "auto":  # keeps the keys of existing bases (auto) unchanged
        spec["precision"] = cfg.training.precision
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _batches(n: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (steps, min(batch_size, n)), generator=generator)


def train_bc(policy: ReferencePolicy, data: BCData, cfg: Config, device: torch.device) -> float:
    """L1 on valid chunk entries; AdamW with cosine decay. Returns the final smoothed loss."""
    sft = cfg.sft
    params = [p for n, p in policy.named_parameters() if not n.startswith("scale_head")]
    optimizer = torch.optim.AdamW(params, lr=sft.lr, weight_decay=sft.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, sft.steps) / max(sft.steps, 1))))
    data = data.to(device)
    index = _batches(len(data), sft.batch_size, sft.steps, sft.seed)
    smoothed = float("nan")
    policy.train()
    with progress() as bar:
        task = bar.add_task("behaviour cloning", total=sft.steps, status="")
        for step in range(sft.steps):
            b = index[step].to(device)
            with autocast(device, cfg.training.precision):
                mu, _ = policy(data.obs[b], data.instr[b])
            err = (mu.float() - data.target[b]).abs().mean(-1)
            loss = (err * data.mask[b]).sum() / data.mask[b].sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            if step % 50 == 0 or step == sft.steps - 1:
                value = float(loss.detach())
                smoothed = value if math.isnan(smoothed) else 0.8 * smoothed + 0.2 * value
                bar.update(task, completed=step + 1, status=f"L1 {smoothed:.4f}")
    policy.eval()
    return smoothed


def fit_scale_head(policy: ReferencePolicy, data: BCData, cfg: Config, device: torch.device) -> float:
    """Laplace NLL of the expert chunk under (mu fixed, log_b learned): only the scale head moves."""
    sft = cfg.sft
    optimizer = torch.optim.AdamW(policy.scale_head.parameters(), lr=sft.scale_lr, weight_decay=0.0)
    data = data.to(device)
    index = _batches(len(data), sft.batch_size, sft.scale_steps, sft.seed + 1)
    last = float("nan")
    with progress() as bar:
        task = bar.add_task("scale head (Laplace NLL)", total=sft.scale_steps, status="")
        for step in range(sft.scale_steps):
            b = index[step].to(device)
            with torch.no_grad(), autocast(device, cfg.training.precision):
                hidden = policy.backbone((data.obs[b] - policy.obs_mean) / policy.obs_std, data.instr[b])
                mu = policy.action_head(hidden)
            log_b = policy.scale_head(hidden.float())
            nll = log_b + (data.target[b] - mu.float()).abs() / log_b.exp() + math.log(2.0)
            loss = (nll.mean(-1) * data.mask[b]).sum() / data.mask[b].sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % 50 == 0 or step == sft.scale_steps - 1:
                last = float(loss.detach())
                bar.update(task, completed=step + 1, status=f"NLL {last:.3f}")
    return last


def base_dir(cfg: Config, demo_key: str) -> Path:
    return Path(cfg.sft.cache_dir) / "sft" / sft_key(cfg, demo_key)


def load_base(path: str | Path, cfg: Config, obs_dim: int, action_dim: int) -> ReferencePolicy:
    """A policy with the weights of `path` (a model.safetensors file); clear error if missing or corrupt."""
    policy = build_policy(cfg.policy, obs_dim, action_dim)
    checkpoints.load_into(policy, checkpoints.load_tensors(path, "model checkpoint"), path, "model checkpoint")
    return policy.eval()


def get_base(cfg: Config, suite: Any, pool: Any, retrain: bool = False) -> tuple[ReferencePolicy, Path, dict]:
    """The cached base for this config, trained (and cached) if absent. Returns (policy, weights file, info)."""
    out = base_dir(cfg, suite.demo_key())
    out.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(out.with_name(out.name + ".lock")):  # concurrent study cells build a base once
        return _get_base_locked(cfg, suite, pool, out, retrain)


@contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes of this machine (released if the holder dies)."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _get_base_locked(cfg: Config, suite: Any, pool: Any, out: Path, retrain: bool
                     ) -> tuple[ReferencePolicy, Path, dict]:
    demo_key = suite.demo_key()
    weights = out / "model.safetensors"
    if weights.is_file() and not retrain:
        info = json.loads((out / "info.json").read_text()) if (out / "info.json").is_file() else {}
        console.print(f"behaviour-cloning base: cache hit {out}")
        return load_base(weights, cfg, suite.obs_dim, suite.action_dim), weights, {**info, "cache_hit": True}

    start = time.perf_counter()
    with progress() as bar:
        want = cfg.suite.demos_per_task
        total = len(suite.tasks) * want
        task = bar.add_task("expert demonstrations", total=total, status="")
        kept: dict[str, int] = {}

        def count(episodes: list) -> None:  # successes beyond a task's quota are not kept: not counted either
            for ep in episodes:
                if ep.success and kept.get(ep.task, 0) < want:
                    kept[ep.task] = kept.get(ep.task, 0) + 1
                    bar.advance(task, 1)

        demos = suite.demonstrations(pool, cfg.sft.cache_dir, on_batch=count)
    demo_seconds = time.perf_counter() - start
    data = build_bc_data(demos, suite.tasks, {t: suite.instruction(t) for t in suite.tasks}, cfg.policy)
    device = resolve_device(cfg.training.device)
    torch.manual_seed(cfg.sft.seed)
    policy = build_policy(cfg.policy, suite.obs_dim, suite.action_dim)
    obs = data.obs.double()
    policy.set_obs_normalizer(obs.mean(0).float(), obs.std(0).nan_to_num(0.0).float())
    policy.to(device)
    t0 = time.perf_counter()
    bc_loss = train_bc(policy, data, cfg, device)
    nll = fit_scale_head(policy, data, cfg, device)
    policy.cpu().eval()
    info = {
        "key": out.name, "demo_key": demo_key, "bc_l1": bc_loss, "scale_nll": nll, "samples": len(data),
        "demo_steps": demos.n_steps(), "demo_seconds": round(demo_seconds, 2),
        "train_seconds": round(time.perf_counter() - t0, 2), "device": str(device),
        "log_b_bias": policy.scale_head.bias.detach().tolist(),
    }
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoints.save_tensors(policy.state_dict(), tmp / "model.safetensors", {"format": str(SFT_FORMAT_VERSION)})
    (tmp / "config.yaml").write_text(to_yaml(cfg))
    (tmp / "info.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    console.print(f"behaviour-cloning base saved to {out} (L1 {bc_loss:.4f}, scale NLL {nll:.3f}, "
                  f"{info['train_seconds']:.0f}s training)")
    return policy, weights, {**info, "cache_hit": False}
