"""Primitive candidate operations, looked up by name (definitions: methods.md §1.1, §1.2, §1.3).

Every op is built by `build_op(name, C, stride, affine)` and maps C channels to C channels. The
same names mean the same thing in every space (`skip_connect`, `avg_pool_3x3`, `none` are shared by
the DARTS and NB201 spaces). Search-only decorations (the BN after pooling in DARTS-space search
cells) are added by the supernet, not here, so these ops serve search and evaluation networks alike.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Registry

OpFactory = Callable[[int, int, bool], nn.Module]
OPS: Registry[OpFactory] = Registry("operation")

# Ops with no trainable weights: what "performance collapse" fills a cell with.
PARAMETER_FREE_OPS = frozenset({"none", "skip_connect", "max_pool_3x3", "avg_pool_3x3", "noise"})
POOLING_OPS = frozenset({"max_pool_3x3", "avg_pool_3x3"})


def build_op(name: str, C: int, stride: int, affine: bool) -> nn.Module:
    """Build candidate op `name` for C channels; `stride` 2 on reduction edges from cell inputs."""
    return OPS.get(name)(C, stride, affine)


# A drop-path probability: a float, or a 0-dim tensor on the device that a step captured once (a
# CUDA graph) reads at every replay, so that it follows the per-epoch schedule
DropProb = float | torch.Tensor


def drops(p: DropProb) -> bool:
    """Whether drop-path draws masks at `p`: a float above 0, or any tensor (its value is not
    read on the host: at 0 its masks are all ones, the input unchanged)."""
    return isinstance(p, torch.Tensor) or p > 0.0


def bernoulli_mask(shape: tuple[int, ...], p: DropProb, like: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Drop-path factors of `shape` in `like`'s dtype and device: 0 with probability `p`, else
    1/(1-p). For a float p the probability is a fill value, not `bernoulli_`'s argument: a
    compiled network keeps one trace while the schedule changes p (dynamo specialises on the
    latter)."""
    keep = 1.0 - p
    if isinstance(keep, torch.Tensor):
        return like.new_empty(shape).bernoulli_(keep, generator=generator).div_(keep)
    mask = torch.full(shape, keep, dtype=like.dtype, device=like.device)
    return torch.bernoulli(mask, generator=generator).div_(keep)


def drop_path(x: torch.Tensor, p: DropProb, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero each sample of `x` with probability `p`, scale survivors by 1/(1-p) (E[out] = x).

    The mask is drawn with `torch.bernoulli` on `x`'s device (seedable through `generator` or the
    global seed) and applied out of place: the op output is still needed by autograd.
    """
    if not drops(p):
        return x
    # scale the (N,1,1,1) mask rather than x: one tiny division instead of a full-size one
    return x * bernoulli_mask((x.shape[0],) + (1,) * (x.dim() - 1), p, x, generator)


class ReLUConvBN(nn.Sequential):
    """ReLU -> conv (no bias) -> BN; the DARTS preprocessing block and NB201 `nor_conv`."""

    def __init__(self, C_in: int, C_out: int, kernel: int, stride: int, padding: int,
                 affine: bool, dilation: int = 1, bias: bool = False) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel, stride=stride, padding=padding, dilation=dilation,
                      bias=bias),
            nn.BatchNorm2d(C_out, affine=affine),
        )


class DilConv(nn.Sequential):
    """ReLU -> depthwise k×k (dilated) -> 1×1 conv -> BN."""

    def __init__(self, C_in: int, C_out: int, kernel: int, stride: int, padding: int,
                 dilation: int, affine: bool) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel, stride=stride, padding=padding, dilation=dilation,
                      groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )


class SepConv(nn.Sequential):
    """Two stacked DilConv blocks with dilation 1; only the first carries the stride."""

    def __init__(self, C_in: int, C_out: int, kernel: int, stride: int, padding: int,
                 affine: bool) -> None:
        super().__init__(
            DilConv(C_in, C_in, kernel, stride, padding, 1, affine),
            DilConv(C_in, C_out, kernel, 1, padding, 1, affine),
        )


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Zero(nn.Module):
    """The `none` op: zeros of the output's shape (stride 2 subsamples first)."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class Noise(nn.Module):
    """RobustDARTS S4's `noise`: i.i.d. N(0, 1) of the output's shape, ignoring input values."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return torch.randn_like(x)


class FactorizedReduce(nn.Module):
    """Halve H and W with two offset 1×1 stride-2 convs, concatenated, then BN.

    The second branch reads `x[:, :, 1:, 1:]` (DARTS form); on the even sizes every cell sees this
    equals NB201's pad-then-shift form.
    """

    def __init__(self, C_in: int, C_out: int, affine: bool) -> None:
        super().__init__()
        if C_out % 2:
            raise ValueError(f"FactorizedReduce needs an even C_out, got {C_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        out = torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1)
        return self.bn(out)


# --- registry entries: name -> factory(C, stride, affine) -------------------------------------
OPS.register("none", lambda C, stride, affine: Zero(stride))
OPS.register("noise", lambda C, stride, affine: Noise(stride))
OPS.register("max_pool_3x3", lambda C, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1))
OPS.register(
    "avg_pool_3x3",
    lambda C, stride, affine: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
)
OPS.register(
    "skip_connect",
    lambda C, stride, affine: Identity() if stride == 1 else FactorizedReduce(C, C, affine),
)
OPS.register("sep_conv_3x3", lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine))
OPS.register("sep_conv_5x5", lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine))
OPS.register("dil_conv_3x3", lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine))
OPS.register("dil_conv_5x5", lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine))
# NB201: conv bias = not affine, so search cells (BN affine=False) have a conv bias (methods.md §1.3)
OPS.register(
    "nor_conv_1x1",
    lambda C, stride, affine: ReLUConvBN(C, C, 1, stride, 0, affine, bias=not affine),
)
OPS.register(
    "nor_conv_3x3",
    lambda C, stride, affine: ReLUConvBN(C, C, 3, stride, 1, affine, bias=not affine),
)


class GlobalAvgPool(nn.Module):
    """The mean over all pixels, (B, C, H, W) -> (B, C, 1, 1): `nn.AdaptiveAvgPool2d(1)`, with the
    gradient in the input's memory format. Adaptive pooling to 1×1 runs as `mean`, whose backward
    (an expand, then a divide) writes an NCHW gradient even for channels_last activations, so the
    last cell's backward ran in the other layout (on a GPU, a layout conversion in every cuDNN
    call it reached). One average pool over the whole map computes the same mean (up to the order
    of the sum) and its backward keeps the layout. Under torch.compile, which picks layouts itself,
    it stays a `mean`: a reduction inductor fuses with the ops before it (a pooling window this
    large is a fallback kernel there)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return x.mean((2, 3), keepdim=True)
        return F.avg_pool2d(x, x.shape[-2:])
