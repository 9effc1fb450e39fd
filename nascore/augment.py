"""Batched image augmentation on the device: the CIFAR recipe of methods.md §1.1 without a per-image
Python loop.

Each function is deterministic given its random draws, so the draws can be made once per epoch
from a seeded generator (`draw_augmentation`) and an epoch replays exactly. The recipe, in order:
random crop (zero padding `pad`, crop back to size), horizontal flip (p = 0.5), normalisation,
then cutout (one square hole zeroed *after* normalisation, the DARTS convention).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentDraws:
    """Random draws for n images: crop offsets (n, 2) as (dy, dx) in [0, 2·pad], flip flags (n,),
    cutout centres (n, 2) as (row, col) anywhere in the image."""

    offsets: torch.Tensor
    flips: torch.Tensor
    centres: torch.Tensor

    def to(self, device: torch.device | str) -> AugmentDraws:
        return AugmentDraws(self.offsets.to(device), self.flips.to(device), self.centres.to(device))

    def take(self, index: torch.Tensor) -> AugmentDraws:
        return AugmentDraws(self.offsets[index], self.flips[index], self.centres[index])


def draw_augmentation(n: int, image_size: int, pad: int, generator: torch.Generator) -> AugmentDraws:
    """Draw crop offsets, flips and cutout centres for n images (on the generator's device)."""
    device = generator.device
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator, device=device)
    flips = torch.rand(n, generator=generator, device=device) < 0.5
    centres = torch.randint(0, image_size, (n, 2), generator=generator, device=device)
    return AugmentDraws(offsets, flips, centres)


def crop(x: torch.Tensor, pad: int, offsets: torch.Tensor) -> torch.Tensor:
    """Zero-pad each image of x (B, C, H, W) by `pad` and cut out an H×W window at (dy, dx).

    Output pixel (i, j) of image b is padded[b, :, dy_b + i, dx_b + j]: one gather for the whole
    batch. The result has channels-last strides (the gather puts C last); callers pick the layout.
    """
    if pad == 0:
        return x
    B, _, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = offsets[:, 0, None] + torch.arange(H, device=x.device)        # (B, H)
    cols = offsets[:, 1, None] + torch.arange(W, device=x.device)        # (B, W)
    batch = torch.arange(B, device=x.device)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def flip(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Mirror (left-right) the images of x (B, C, H, W) whose flag in `flips` (B,) is set."""
    return torch.where(flips[:, None, None, None], x.flip(3), x)


def normalize(x: torch.Tensor, mean: Sequence[float] | torch.Tensor,
              std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> float32 (x / 255 - mean) / std per channel (ToTensor + Normalize)."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255 - mean) / std


def cutout(x: torch.Tensor, length: int, centres: torch.Tensor) -> torch.Tensor:
    """Zero one square hole per image of x (B, C, H, W), centred at `centres` (B, 2).

    The DARTS reference rule: rows [cy - length//2, cy + length//2) clipped to the image, columns
    likewise, so a hole near a border is cut off rather than moved inside.
    """
    if length == 0:
        return x
    _, _, H, W = x.shape
    half = length // 2
    top, bottom = (centres[:, 0] - half).clamp(0, H), (centres[:, 0] + half).clamp(0, H)
    left, right = (centres[:, 1] - half).clamp(0, W), (centres[:, 1] + half).clamp(0, W)
    ys = torch.arange(H, device=x.device)
    xs = torch.arange(W, device=x.device)
    in_rows = (ys >= top[:, None]) & (ys < bottom[:, None])              # (B, H)
    in_cols = (xs >= left[:, None]) & (xs < right[:, None])              # (B, W)
    hole = in_rows[:, None, :, None] & in_cols[:, None, None, :]          # (B, 1, H, W)
    return x.masked_fill(hole, 0.0)
