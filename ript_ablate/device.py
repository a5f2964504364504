"""Device choice and mixed precision: CUDA with bf16 autocast (fp32 master weights) when present, else CPU."""

from __future__ import annotations

import contextlib

import torch

from ript_ablate.errors import RiptAblateError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RiptAblateError(f"training.device={name!r} but this torch has no CUDA device; use 'auto' or 'cpu'")
    return device


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; a no-op on CPU (fp32 there keeps runs bit-reproducible)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
