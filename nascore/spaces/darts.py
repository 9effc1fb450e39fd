"""The DARTS CNN space (methods.md §1.1) and its macro search network, shared by S1-S4."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..ops import FactorizedReduce, GlobalAvgPool, ReLUConvBN
from ..supernet import SearchCell, Supernet, SupernetConfig
from . import SPACES, SearchSpace

DARTS_OPS = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
             "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
STEPS = 4                                   # intermediate nodes per cell
EDGES_PER_NODE = (2, 3, 4, 5)               # 14 edges


class DartsSupernet(Supernet):
    """Stem conv3×3(3→3C)+BN, `layers` cells (reductions at L//3 and 2L//3), GAP, linear."""

    def __init__(self, space: SearchSpace, cfg: SupernetConfig) -> None:
        super().__init__()
        self.space, self.cfg = space, cfg
        C, layers = cfg.init_channels, cfg.layers
        if layers < 3:
            raise ValueError(f"a DARTS-space network needs at least 3 cells, got layers={layers}")
        affine = cfg.cell_affine
        C_curr = 3 * C
        self.stem = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
        C_pp, C_p, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        self.preprocess = nn.ModuleList()
        self.reductions: list[bool] = []
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            ct = "reduce" if reduction else "normal"
            self.preprocess.append(nn.ModuleList([
                FactorizedReduce(C_pp, C_curr, affine) if reduction_prev
                else ReLUConvBN(C_pp, C_curr, 1, 1, 0, affine),
                ReLUConvBN(C_p, C_curr, 1, 1, 0, affine),
            ]))
            self.cells.append(SearchCell(space.edge_ops[ct], num_inputs=2, num_nodes=STEPS, C=C_curr,
                                         cfg=cfg, reduction=reduction, pool_bn=True, output="concat"))
            self.reductions.append(reduction)
            reduction_prev = reduction
            C_pp, C_p = C_p, STEPS * C_curr
        self.global_pooling = GlobalAvgPool()
        self.classifier = nn.Linear(C_p, cfg.num_classes)
        self.init_arch(dict(space.edge_ops), EDGES_PER_NODE)

    def forward_cells(self, x, weights, edge_weights, columns: Sequence[int]) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        for cell, (pre0, pre1), reduction in zip(self.cells, self.preprocess, self.reductions):
            ct = "reduce" if reduction else "normal"
            s0, s1 = s1, cell([s0, s1], weights[ct], columns, edge_weights[ct], preprocess=(pre0, pre1))
        return self.classifier(self.global_pooling(s1).flatten(1))


def darts_cell_space(name: str, description: str, normal: Sequence[Sequence[str]],
                     reduce: Sequence[Sequence[str]], progressive_start_ops: Sequence[str]) -> SearchSpace:
    """A space on the DARTS cell and macro network with the given per-edge op lists."""
    return SearchSpace(
        name=name, description=description,
        edge_ops={"normal": tuple(tuple(o) for o in normal), "reduce": tuple(tuple(o) for o in reduce)},
        genotype_kind="darts_cell", derivation_rule="darts", build_network=DartsSupernet,
        progressive_start_ops=tuple(progressive_start_ops),
    )


SPACES.register("darts", darts_cell_space(
    "darts", "DARTS CNN space: 8 ops on 14 edges, normal + reduction cell",
    normal=[DARTS_OPS] * 14, reduce=[DARTS_OPS] * 14,
    # OPP-DARTS stage 0 picks among the parametric ops (methods.md §2.5)
    progressive_start_ops=("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"),
))
