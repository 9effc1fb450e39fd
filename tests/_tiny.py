"""Tiny in-memory data for fast CPU tests of the search and training loops, and test helpers."""
from __future__ import annotations

import collections
import os
from typing import Iterator, Sequence

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


# Tests that lower with inductor (torch.compile's real compiler): minutes of C++ compile each on
# a CPU, so CI skips them; `.ci/torch-compat` runs them, and `bash bench/gpu.sh compile` the NB201
# one on a GPU, where inductor generates Triton.
lowers_with_inductor = pytest.mark.skipif(
    not os.environ.get("NASCORE_INDUCTOR_TESTS"),
    reason="lowers with inductor, minutes on a CPU: NASCORE_INDUCTOR_TESTS=1 runs it (.ci/torch-compat does)")


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


class CountOps(TorchDispatchMode):
    """Counts dispatched aten ops by name; `batch`: only those touching an activation (a tensor of
    4+ dims whose first dim is that batch size)."""

    def __init__(self, batch: int | None = None) -> None:
        super().__init__()
        self.batch = batch
        self.count: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        if self.batch is None or any(t.dim() >= 4 and t.shape[0] == self.batch for t in tensors):
            self.count[func.overloadpacket.__name__] += 1
        return out


def in_layout(net: nn.Module, x: torch.Tensor, channels_last: bool) -> tuple[nn.Module, torch.Tensor]:
    """The network and its input in channels_last, or as they are."""
    if not channels_last:
        return net, x
    return net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)


def assert_paired_runs_as_one(results: dict[bool, Sequence[torch.Tensor | None]],
                              counts: dict[bool, collections.Counter], pairs: int) -> None:
    """A cell's two ReLUConvBNs run as one (`fused._paired_preprocess`), key False, against
    apart, key True: the same tensors (float rounding aside), and per pair one fewer ReLU, conv
    and BN and one fewer backward of each."""
    for got, want in zip(results[False], results[True]):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for op in ("relu", "convolution", "native_batch_norm", "convolution_backward", "native_batch_norm_backward",
               "threshold_backward"):
        assert counts[True][op] - counts[False][op] == pairs, (op, counts[True][op], counts[False][op])
