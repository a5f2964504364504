"""Image augmentation for behaviour cloning: random shifts of uint8 camera images."""

from __future__ import annotations

import torch


def random_shift(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Each image of (N, H, W, C) shifted by its own random offset in [-pad, pad] pixels per axis, edges repeated
    (DrQ's augmentation, as a gather: no float copy of a uint8 batch). Behaviour cloning only: in the PPO update it
    would make the first epoch's ratio differ from 1."""
    if pad <= 0:
        return images
    n, h, w, _ = images.shape
    offsets = torch.randint(-pad, pad + 1, (n, 2), generator=generator).to(images.device)
    rows = (torch.arange(h, device=images.device)[None, :] + offsets[:, :1]).clamp(0, h - 1)  # (N, H)
    cols = (torch.arange(w, device=images.device)[None, :] + offsets[:, 1:]).clamp(0, w - 1)  # (N, W)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return images[batch, rows[:, :, None], cols[:, None, :]]


def is_image(value: torch.Tensor) -> bool:
    """A batch of camera images: (N, H, W, 3) uint8."""
    return value.dtype == torch.uint8 and value.dim() == 4 and value.shape[-1] == 3
