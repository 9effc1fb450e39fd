"""Batched image augmentation on the device: the CIFAR recipe of methods.md §1.1 without a per-image
Python loop.

Each function is deterministic given its random draws, so the draws can be made once per epoch
from a seeded generator (`draw_augmentation`) and an epoch replays exactly. The recipe, in order:
random crop (zero padding `pad`, crop back to size), horizontal flip (p = 0.5), normalisation,
then cutout (one square hole zeroed *after* normalisation, the DARTS convention).

`crop`, `flip`, `normalize` and `cutout` state the recipe one step at a time; `BatchRecipe` is
what `ResidentLoader` runs, the same numbers in fewer kernels, and the tests hold it to them.
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


class BatchRecipe:
    """The recipe above (crop, flip, normalise, cutout) for batches of a dataset held on the
    device, in about a third of the kernels: each batch's images are gathered cropped and flipped
    straight from the dataset padded once (`pad_dataset`), one gather where the composed functions
    took a gather, a pad, a flip and a select, and a cutout hole is two lookups in tables made once
    instead of clamps and comparisons (`ResidentLoader`, which also takes a batch's draws and labels
    as slices of the epoch's: 37 → 12 kernels per CIFAR batch with cutout; on a GPU each is a
    launch beside a retrain step's ~1,200). The same numbers as `crop`, `flip`, `normalize`
    and `cutout` composed (tests/test_data.py).

    A batch's draws come packed (`pack`): (B, 5) integers dy, dx, flip, cy, cx."""

    def __init__(self, height: int, width: int, pad: int, cutout: int,
                 mean: torch.Tensor, std: torch.Tensor, device: torch.device | str,
                 channels_last: bool = False) -> None:
        self.pad, self.cutout, self.mean, self.std = pad, cutout, mean, std
        self.channels_last = channels_last
        rows, cols = torch.arange(height, device=device), torch.arange(width, device=device)
        self.rows = rows
        self.cols = torch.stack([cols, cols.flip(0)])          # a flipped image reads its columns backwards
        half = cutout // 2
        # hole[c, y]: whether y is in the hole centred at c (`draw_augmentation` draws a centre
        # anywhere in the image's width, for rows too); `cutout`'s clipping to the image changes
        # no comparison with a y inside it
        centres = torch.arange(max(height, width), device=device)[:, None]
        self.hole_rows = (rows[None, :] >= centres - half) & (rows[None, :] < centres + half)
        self.hole_cols = (cols[None, :] >= centres - half) & (cols[None, :] < centres + half)

    def pad_dataset(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, C, H, W), zero-padded by `pad` once for every batch to crop from."""
        return F.pad(images, (self.pad,) * 4) if self.pad else images

    @staticmethod
    def pack(draws: AugmentDraws) -> torch.Tensor:
        """An epoch's draws as one (n, 5) tensor, so that a batch takes them in one gather."""
        return torch.cat([draws.offsets, draws.flips.long()[:, None], draws.centres], dim=1)

    def __call__(self, padded: torch.Tensor, index: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """The augmented float batch of images `index` of `padded` (`pad_dataset`), with the
        batch's packed draws (B, 5), in the memory format asked for (no copy to convert it)."""
        rows = draws[:, 0:1] + self.rows                                  # (B, H)
        cols = draws[:, 1:2] + self.cols[draws[:, 2]]                     # (B, W)
        x = padded[index[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        # the gather writes channels last; the cast to float writes the layout asked for
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = normalize(x.to(torch.float32, memory_format=fmt), self.mean, self.std)
        if not self.cutout:
            return x
        in_rows, in_cols = self.hole_rows[draws[:, 3]], self.hole_cols[draws[:, 4]]    # (B, H), (B, W)
        if self.channels_last:               # the mask in the images' layout, so is masked_fill's output
            hole = (in_rows[:, :, None, None] & in_cols[:, None, :, None]).permute(0, 3, 1, 2)
        else:
            hole = in_rows[:, None, :, None] & in_cols[:, None, None, :]
        return x.masked_fill_(hole, 0.0)       # in place: out of place, it writes NCHW whatever its input
