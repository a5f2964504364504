"""The reference policy's eyes: one small convolutional encoder per camera, turning a uint8 image into tokens.

Why spatial-softmax keypoints (as in Levine et al.'s visuomotor policies and robomimic's image encoders) rather than
an average-pooled grid: what a manipulation policy needs from a 64-pixel image is *where* the gripper, the object and
the goal are, and an average over the image throws positions away, while a keypoint is an expected position.
Images arrive as uint8 and become floats only here, in the first layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SpatialSoftmax(nn.Module):
    """(B, K, h, w) feature maps -> (B, K, 2) expected (x, y) in [-1, 1] of each map's softmax, with a learned
    temperature."""

    def __init__(self) -> None:
        super().__init__()
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, k, h, w = features.shape
        weights = F.softmax(features.flatten(2) / self.log_temperature.exp(), dim=-1)  # (B, K, h*w)
        ys = torch.linspace(-1.0, 1.0, h, device=features.device, dtype=weights.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=features.device, dtype=weights.dtype)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).view(h * w, 2)  # (h*w, 2): x, y
        return weights @ grid


class ImageEncoder(nn.Module):
    """uint8 (B, S, S, 3) -> (B, n_tokens, d_model): three strided convolutions (the image at 1/8 of its side),
    `channels` keypoints, and a projection of their coordinates into tokens."""

    def __init__(self, d_model: int, n_tokens: int, channels: int):
        super().__init__()
        self.n_tokens, self.d_model = n_tokens, d_model
        self.conv = nn.Sequential(
            nn.Conv2d(3, channels, 5, stride=2, padding=2), nn.GELU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
        )
        self.keypoints = SpatialSoftmax()
        self.proj = nn.Linear(2 * channels, n_tokens * d_model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(self.proj.weight.dtype) / 255.0 - 0.5
        points = self.keypoints(self.conv(x))  # (B, channels, 2)
        return self.proj(points.flatten(1)).view(images.shape[0], self.n_tokens, self.d_model)

