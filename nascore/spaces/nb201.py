"""NAS-Bench-201 space (methods.md §1.3): 5 ops on the 6 edges of a 4-node cell, one α for all
15 cells of the benchmark's macro skeleton."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..genotype import NB201_OPS
from ..ops import GlobalAvgPool, ReLUConvBN
from ..supernet import SearchCell, Supernet, SupernetConfig
from . import SPACES, SearchSpace

NUM_NODES = 3            # nodes 1..3 after the input node 0
EDGES_PER_NODE = (1, 2, 3)


class ResBlock(nn.Module):
    """The benchmark's stride-2 residual block between stages (always affine)."""

    def __init__(self, C_in: int, C_out: int) -> None:
        super().__init__()
        self.conv_a = ReLUConvBN(C_in, C_out, 3, 2, 1, affine=True)
        self.conv_b = ReLUConvBN(C_out, C_out, 3, 1, 1, affine=True)
        self.shortcut = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(C_in, C_out, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.conv_b(self.conv_a(x))


@dataclass
class NB201Skeleton:
    """The benchmark's macro network around its cells (search and evaluation alike)."""

    stem: nn.Module
    blocks: nn.ModuleList          # cells and the two ResBlocks, in order
    lastact: nn.Module
    channels: int                  # of the last stage


def nb201_skeleton(C: int, N: int, make_cell: Callable[[int], nn.Module]) -> NB201Skeleton:
    """stem conv3×3(3→C)+BN, then 3 stages of N cells (C, 2C, 4C) joined by stride-2 ResBlocks,
    then BN → ReLU (methods.md §1.3). `make_cell(channels)` builds one cell."""
    if N < 1 or C < 1:
        raise ValueError(f"NB201 needs N >= 1 cells per stage and C >= 1, got N={N}, C={C}")
    blocks: list[nn.Module] = []
    C_curr = C
    for stage in range(3):
        if stage:
            blocks.append(ResBlock(C_curr, 2 * C_curr))
            C_curr *= 2
        blocks.extend(make_cell(C_curr) for _ in range(N))
    return NB201Skeleton(stem=nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)),
                         blocks=nn.ModuleList(blocks),
                         lastact=nn.Sequential(nn.BatchNorm2d(C_curr), nn.ReLU(inplace=False)),
                         channels=C_curr)


class NB201Supernet(Supernet):
    """stem → N cells → ResBlock → N cells → ResBlock → N cells → BN → ReLU → GAP → linear."""

    def __init__(self, space: SearchSpace, cfg: SupernetConfig) -> None:
        super().__init__()
        self.space, self.cfg = space, cfg
        skeleton = nb201_skeleton(cfg.init_channels, cfg.layers, lambda C: SearchCell(
            space.edge_ops["cell"], num_inputs=1, num_nodes=NUM_NODES, C=C, cfg=cfg, pool_bn=False,
            output="last"))
        self.stem, self.blocks, self.lastact = skeleton.stem, skeleton.blocks, skeleton.lastact
        self.global_pooling = GlobalAvgPool()
        self.classifier = nn.Linear(skeleton.channels, cfg.num_classes)
        self.init_arch(dict(space.edge_ops), EDGES_PER_NODE)

    def forward_cells(self, x, weights, edge_weights, columns: Sequence[int]) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            if isinstance(block, SearchCell):
                h = block([h], weights["cell"], columns, edge_weights["cell"])
            else:
                h = block(h)
        return self.classifier(self.global_pooling(self.lastact(h)).flatten(1))


SPACES.register("nb201", SearchSpace(
    name="nb201", description="NAS-Bench-201: 5 ops on 6 edges, one cell type, 3×N cells",
    edge_ops={"cell": (NB201_OPS,) * 6},
    genotype_kind="nb201_cell", derivation_rule="nb201", build_network=NB201Supernet,
    progressive_start_ops=("nor_conv_1x1", "nor_conv_3x3"),
    # The benchmark's DARTS baselines (ref. impl. config, §1.3): Nesterov, wd 5e-4, 5 cells/stage,
    # and for first order the weight step before the α step.
    # Each weight batch meets random α samples drawn with replacement (§1.3).
    search_defaults={"nesterov": True, "weight_decay": 5e-4, "layers": 5, "init_channels": 16,
                     "first_order_step_order": "weights_first", "arch_sampling": "replacement"},
))
