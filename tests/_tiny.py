"""Tiny in-memory data for fast CPU tests of the search and training loops, and test helpers."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn


def learnable_images(n: int, num_classes: int = 4, size: int = 16, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-dependent mean images + noise: a network can learn them in a few steps."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, 3, size, size, generator=g)
    y = torch.arange(n) % num_classes
    x = means[y] + 0.5 * torch.randn(n, 3, size, size, generator=g)
    return x, y


class TensorLoader:
    """Shuffled batches whose order is a pure function of (seed, epoch), like the real loaders."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0,
                 shuffle: bool = True) -> None:
        self.x, self.y, self.batch_size, self.seed, self.shuffle = x, y, batch_size, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.x) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch + 7)
            order = torch.randperm(len(self.x), generator=g)
        else:
            order = torch.arange(len(self.x))
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]


def scramble_bn_affine(net: nn.Module, seed: int = 0) -> nn.Module:
    """Give every affine BatchNorm its own γ ∈ [0.5, 1.5] and β ~ N(0, 1), as training would:
    PyTorch initialises all to 1 and 0, so tests comparing two paths would not see a γ or β
    applied to another module's channels. Returns `net`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d) and m.affine:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return net


def scramble_bn_statistics(net: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm its own running statistics (N(0, 1) means, variances in [0.5, 2]), the
    same for copies of one network: evaluation-mode tests then catch statistics read from the
    wrong module, which one training step would leave hidden (a state's pooling units all see the
    same batch statistics)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(m.running_var.shape, generator=g))


SEARCH_TIMING = {"epoch_seconds", "images_per_s"}


def assert_searches_identical(expected, got) -> None:
    """Two `SearchResult`s bit for bit: every state-dict tensor, and every epoch record but its
    wall-clock figures."""
    for (k, a), b in zip(expected.model.state_dict().items(), got.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert [{k: v for k, v in r.items() if k not in SEARCH_TIMING} for r in got.history] == \
           [{k: v for k, v in r.items() if k not in SEARCH_TIMING} for r in expected.history]
