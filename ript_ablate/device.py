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


def uses_bf16(device: torch.device, precision: str = "auto") -> bool:
    """`auto`: bf16 autocast on CUDA, fp32 on CPU (where fp32 keeps runs bit-reproducible and bf16 is slow)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast over fp32 master weights, or nothing. `precision: bf16` on a CPU runs the same autocast code
    as a GPU does (device type the only difference), so the mixed-precision path is exercised without a GPU."""
    if uses_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
