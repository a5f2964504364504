"""Weights on disk: safetensors only, written atomically (temporary file, then rename).

Layout of a run's checkpoint directory (the same one `algo.lora_adaptor_ckpt` reads, so a run resumes
from its own output):
    model.safetensors     full policy weights (a base, or `algo.checkpoint_path`)
    adapter.safetensors   the backbone's trainable weights (LoRA) + action head + scale head (override the base)
    header.safetensors    scale-head weights alone (`algo.header_checkpoint`)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ript_ablate.errors import CheckpointError


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write atomically: a crash mid-write never leaves a truncated file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_tensors(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing or corrupt file is a CheckpointError naming it."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a directory; expected a .safetensors file")
    if not path.is_file():
        raise CheckpointError(f"{what} file not found: {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read {what} {path}: {exc} (corrupt, truncated or not safetensors?)") from None


def load_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], path: str | Path, what: str,
              strict: bool = True) -> None:
    """load_state_dict with an error that names the file and the mismatching keys or shapes."""
    own = module.state_dict()
    missing = [k for k in own if k not in tensors] if strict else []
    unexpected = [k for k in tensors if k not in own]
    wrong = [f"{k} {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}" for k in tensors
             if k in own and tensors[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        if wrong:
            parts.append(f"shape mismatch {wrong[:5]}")
        raise CheckpointError(f"{what} {path} does not fit this policy ({'; '.join(parts)}); "
                              "was it written with another policy config?")
    module.load_state_dict(tensors, strict=strict)


# ----------------------------------------------------------------------------------------------- run layout

ADAPTER_FILE = "adapter.safetensors"
HEADER_FILE = "header.safetensors"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
META_FILE = "meta.json"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state as flat tensors (safetensors holds tensors only, never pickles)."""
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            out[f"{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state_dict = optimizer.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    state_dict["state"] = state
    optimizer.load_state_dict(state_dict)


def save_run_checkpoint(directory: str | Path, policy: Any, optimizer: torch.optim.Optimizer | None,
                        meta: dict) -> Path:
    """Write a checkpoint directory atomically: fill a temporary sibling, then rename it into place. The parts
    come from the policy (`Policy.checkpoint_tensors`)."""
    import json
    import shutil

    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_tensors(policy.checkpoint_tensors("adapter"), tmp / ADAPTER_FILE)
    save_tensors(policy.checkpoint_tensors("header"), tmp / HEADER_FILE)
    save_tensors(policy.checkpoint_tensors("model"), tmp / MODEL_FILE)
    if optimizer is not None:
        save_tensors(optimizer_tensors(optimizer), tmp / OPTIMIZER_FILE)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    old = directory.with_name(f".{directory.name}.old")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def read_meta(directory: str | Path) -> dict:
    import json

    path = Path(directory) / META_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
