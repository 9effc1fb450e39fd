"""Evaluation networks: derived cells retrained from scratch (methods.md §1.1, §1.3).

- `NetworkCIFAR`: the DARTS CIFAR network (stem conv3×3 → L cells, reductions at L//3 and 2L//3).
- `NetworkImageNet`: the DARTS mobile ImageNet network (three stride-2 stem convs, 224 → 28).
- `NB201Network`: the NAS-Bench-201 macro skeleton with a fixed (evaluation) cell.
- `build_eval_network`: the one door in, dispatching on the genotype's type.

Every network's `forward(x)` returns `(logits, aux_logits)`; `aux_logits` is None unless the
network has an auxiliary head and is in training mode, so a training loop needs no per-network
branches. Every network also has a `drop_path_prob` that the loop sets once per epoch.

Cells are built from ops.py's registry with affine BN and no BN after pooling (evaluation form),
so any op a search space can derive — S4's `noise` included — builds here without extra code.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
from torch import nn

from . import fused
from .genotype import NB201_EDGES, AnyGenotype, Genotype, NB201Genotype
from .ops import DropProb, FactorizedReduce, GlobalAvgPool, Identity, ReLUConvBN, build_op, drop_path, drops
from .spaces.nb201 import nb201_skeleton

__all__ = [
    "drop_path", "DartsEvalCell", "AuxiliaryHead", "AuxiliaryHeadCIFAR", "AuxiliaryHeadImageNet",
    "NetworkCIFAR", "NetworkImageNet", "NB201Cell", "NB201Network", "EVAL_DEFAULTS",
    "build_eval_network",
]

Output = tuple[torch.Tensor, Optional[torch.Tensor]]


# ------------------------------------------------------------------------------------------------
class _DropPathMixin:
    """`drop_path_prob` with a range check: p = 1 would divide by zero in `drop_path`; and the
    backend (`set_backend`): eager, or fused (`nascore.fused`: the ops of a cell that read one
    state in one pass, in training and evaluation mode; fused_dense: also each separable conv as
    one dense conv)."""

    _drop_path_prob: float = 0.0
    _drop_path_tensor: torch.Tensor | None = None
    backend: str = "eager"

    def set_backend(self, backend: str) -> None:
        if backend not in fused.BACKENDS:
            raise ValueError(f"network backend {backend!r} is unknown; allowed: {', '.join(fused.BACKENDS)}")
        self.backend = backend

    def _sink(self) -> "fused.BatchNormSink | None":
        """The fused forward's scratch (its cells' one weight gather and grouped-BN buffer:
        `fused.ForwardRecord`), or None for the eager forward."""
        return fused.forward_sink(self, self.training) if self.backend != "eager" else None

    @property
    def drop_path_prob(self) -> float:
        return self._drop_path_prob

    @drop_path_prob.setter
    def drop_path_prob(self, p: float) -> None:
        p = float(p)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop_path_prob must be in [0, 1), got {p}")
        self._drop_path_prob = p
        if self._drop_path_tensor is not None:
            self._drop_path_tensor.fill_(p)

    def drop_path_on_device(self, device: torch.device | str | None) -> None:
        """Keep `drop_path_prob` in a 0-dim tensor on `device` as well (None: as a float only).
        The training forward then reads the tensor, so that a step captured once in a CUDA graph
        follows the per-epoch schedule (the setter writes it in place), and draws its masks at
        every probability, 0 included (all ones: the outputs unchanged, but random numbers
        drawn)."""
        self._drop_path_tensor = (None if device is None else
                                  torch.tensor(self._drop_path_prob, dtype=torch.float32, device=device))

    def _drop_prob(self) -> DropProb:
        """The probability the forward passes on: the tensor when kept on the device."""
        return self._drop_path_tensor if self._drop_path_tensor is not None else self._drop_path_prob


def _drop_path_masks(cells: Sequence[nn.Module], p: DropProb, sink: "fused.BatchNormSink | None",
                     like: torch.Tensor) -> list[torch.Tensor | None]:
    """The fused forward's drop-path masks, every cell's from one draw (training only); Nones for
    the eager forward, which draws per op (`drop_path`)."""
    if sink is None or not sink.training:
        return [None] * len(cells)
    return fused.drop_path_masks([cell.fused_plan.droppable for cell in cells], p, like)


# --- DARTS cells and heads -----------------------------------------------------------------------
class DartsEvalCell(nn.Module):
    """A DARTS-family evaluation cell: node = op_a(h_a) + op_b(h_b), output = concat of nodes.

    `C_prev_prev`, `C_prev`: channels of c_{k-2}, c_{k-1}; `C`: channels of every node. A cell
    following a reduction cell gets c_{k-2} at twice the resolution of c_{k-1}, so c_{k-2} is
    preprocessed by a FactorizedReduce instead of a 1×1 ReLUConvBN.
    """

    def __init__(self, genotype: Genotype, C_prev_prev: int, C_prev: int, C: int,
                 reduction: bool, reduction_prev: bool) -> None:
        super().__init__()
        self.reduction = reduction
        pairs = genotype.reduce if reduction else genotype.normal
        concat = genotype.reduce_concat if reduction else genotype.normal_concat
        if reduction and any(i < 2 for i in concat):
            # The inputs of a reduction cell are at twice the nodes' resolution: no concat possible.
            raise ValueError(f"reduce_concat {list(concat)} contains a cell input (0 or 1); a "
                             f"reduction cell can only concatenate intermediate nodes (2..)")
        if reduction_prev:
            self.preprocess0: nn.Module = FactorizedReduce(C_prev_prev, C, affine=True)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=True)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=True)
        self.inputs = tuple(j for _, j in pairs)
        self.concat = tuple(concat)
        self.multiplier = len(concat)
        # stride 2 only on edges reading the two cell inputs of a reduction cell (methods.md §1.1)
        self.ops = nn.ModuleList(
            build_op(name, C, 2 if reduction and j < 2 else 1, affine=True) for name, j in pairs)
        # Identity (skip_connect at stride 1) is never dropped: dropping it would remove the
        # residual path drop-path is meant to regularise around (DARTS ref. behaviour).
        self.droppable = tuple(not isinstance(op, Identity) for op in self.ops)
        self.C = C
        self.fused_plan = fused.build_eval_plan(self.ops, [name for name, _ in pairs], self.inputs,
                                                [k // 2 for k in range(len(pairs))], self.droppable, 2)
        self._fused_constants: dict[tuple, torch.Tensor] = {}     # the fused forward's weight gather index

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: DropProb = 0.0,
                sink: "fused.BatchNormSink | None" = None, dense: bool = False,
                drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`sink`: the fused forward, whose grouped BNs the caller flushes (training); `dense`:
        its separable convs as dense convs; `drop_mask`: with `sink`, its drop-path factors, which
        the network draws for all its cells at once (`fused.drop_path_masks`)."""
        if sink is not None:          # the preprocessing too, in the cell's gather and BN buffer
            states = fused.eval_cell_forward(self.fused_plan, self.ops, [s0, s1], self.C, drop_mask, sink,
                                             self._fused_constants, dense, (self.preprocess0, self.preprocess1))
            return torch.cat([states[i] for i in self.concat], dim=1)
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        apply_drop = self.training and drops(drop_prob)
        for node in range(len(self.ops) // 2):
            total = None
            for k in (2 * node, 2 * node + 1):
                h = self.ops[k](states[self.inputs[k]])
                if apply_drop and self.droppable[k]:
                    h = drop_path(h, drop_prob)
                total = h if total is None else total + h
            states.append(total)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """Auxiliary classifier on an intermediate cell's output (loss weight 0.4 in the recipes).

    `features` must bring the reference input size (8×8 CIFAR, 7×7 ImageNet 224) down to 1×1;
    the adaptive pooling after it is then an identity, and only lets other resolutions run
    (it averages whatever spatial extent remains, instead of failing in the linear layer).
    """

    def __init__(self, features: nn.Sequential, num_classes: int, min_size: int) -> None:
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(768, num_classes)
        self.min_size = min_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(
                f"the auxiliary head needs a feature map of at least {self.min_size}×{self.min_size} "
                f"(its AvgPool is 5×5), got {tuple(x.shape[-2:])}; use a larger input, eval mode, "
                f"or build the network with auxiliary=False")
        return self.classifier(self.pool(self.features(x)).flatten(1))


class AuxiliaryHeadCIFAR(AuxiliaryHead):
    """8×8 input: ReLU, AvgPool5 s3 (→2×2), 1×1 conv→128, BN, ReLU, 2×2 conv→768, BN, ReLU."""

    def __init__(self, C: int, num_classes: int) -> None:
        super().__init__(nn.Sequential(
            nn.ReLU(inplace=False),
            nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=False),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=False),
        ), num_classes, min_size=5)


class AuxiliaryHeadImageNet(AuxiliaryHead):
    """7×7 input: as the CIFAR head but AvgPool5 s2 and no BN after the 768-channel conv.

    The missing BN is the DARTS reference's (a typo kept for consistency with its paper's runs);
    we keep it for fidelity to the published ImageNet numbers.
    """

    def __init__(self, C: int, num_classes: int) -> None:
        super().__init__(nn.Sequential(
            nn.ReLU(inplace=False),
            nn.AvgPool2d(5, stride=2, padding=0, count_include_pad=False),
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=False),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.ReLU(inplace=False),
        ), num_classes, min_size=5)


class _DartsEvalNetwork(_DropPathMixin, nn.Module):
    """The cell stack shared by the CIFAR and ImageNet networks; subclasses provide the stem."""

    def _build_cells(self, genotype: Genotype, C: int, C_stem: int, layers: int,
                     reduction_prev: bool, num_classes: int, auxiliary: bool,
                     aux_cls: type[AuxiliaryHead]) -> None:
        if not isinstance(genotype, Genotype):
            raise TypeError(f"{type(self).__name__} needs a DARTS-family Genotype, got "
                            f"{type(genotype).__name__} (NB201 cells build with NB201Network)")
        if layers < 1 or C < 1:
            raise ValueError(f"need layers >= 1 and C >= 1, got layers={layers}, C={C}")
        self.genotype = genotype
        self.reduction_indices = (layers // 3, 2 * layers // 3)
        self.aux_index = 2 * layers // 3
        C_prev_prev, C_prev, C_curr = C_stem, C_stem, C
        cells = []
        C_aux = 0
        for i in range(layers):
            reduction = i in self.reduction_indices
            if reduction:
                C_curr *= 2
            cell = DartsEvalCell(genotype, C_prev_prev, C_prev, C_curr, reduction, reduction_prev)
            cells.append(cell)
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
            if i == self.aux_index:
                C_aux = C_prev
        self.cells = nn.ModuleList(cells)
        self.auxiliary_head = aux_cls(C_aux, num_classes) if auxiliary else None
        self.global_pooling = GlobalAvgPool()   # = AvgPool2d(7) at 224 px, any size else
        self.classifier = nn.Linear(C_prev, num_classes)

    def _forward_cells(self, s0: torch.Tensor, s1: torch.Tensor) -> Output:
        aux_logits = None
        p = self._drop_prob()
        sink = self._sink()
        masks = _drop_path_masks(self.cells, p, sink, s1)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, p, sink, self.backend == "fused_dense", masks[i])
            if i == self.aux_index and self.auxiliary_head is not None and self.training:
                aux_logits = self.auxiliary_head(s1)
        if sink is not None:
            sink.flush()             # the grouped BNs' running statistics, one update for all cells (training)
        logits = self.classifier(self.global_pooling(s1).flatten(1))
        return logits, aux_logits


class NetworkCIFAR(_DartsEvalNetwork):
    """DARTS CIFAR evaluation network: stem conv3×3(3→3C)+BN, `layers` cells, GAP, linear."""

    def __init__(self, genotype: Genotype, C: int = 36, num_classes: int = 10, layers: int = 20,
                 auxiliary: bool = True) -> None:
        super().__init__()
        C_stem = 3 * C   # DARTS stem multiplier
        self.stem = nn.Sequential(nn.Conv2d(3, C_stem, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(C_stem))
        self._build_cells(genotype, C, C_stem, layers, reduction_prev=False,
                          num_classes=num_classes, auxiliary=auxiliary,
                          aux_cls=AuxiliaryHeadCIFAR)

    def forward(self, x: torch.Tensor) -> Output:
        s = self.stem(x)
        return self._forward_cells(s, s)


class NetworkImageNet(_DartsEvalNetwork):
    """DARTS mobile ImageNet network: 3 stride-2 stem convs (224 → 28), `layers` cells, GAP, linear.

    Runs at any input size divisible by 32 (FactorizedReduce needs even sizes; 224 → 7×7 at the
    end); the auxiliary head additionally needs ≥ 5×5 after cell 2L//3, i.e. inputs ≥ 160 px.
    """

    def __init__(self, genotype: Genotype, C: int = 48, num_classes: int = 1000, layers: int = 14,
                 auxiliary: bool = True) -> None:
        super().__init__()
        if C % 2:
            raise ValueError(f"NetworkImageNet needs an even C (stem0 has C/2 channels), got {C}")
        self.stem0 = nn.Sequential(
            nn.Conv2d(3, C // 2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C // 2),
            nn.ReLU(inplace=False),
            nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C),
        )
        self.stem1 = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C),
        )
        # stem0's output (c_{k-2} of cell 0) is at twice stem1's resolution: FactorizedReduce it.
        self._build_cells(genotype, C, C, layers, reduction_prev=True,
                          num_classes=num_classes, auxiliary=auxiliary,
                          aux_cls=AuxiliaryHeadImageNet)

    def forward(self, x: torch.Tensor) -> Output:
        s0 = self.stem0(x)
        return self._forward_cells(s0, self.stem1(s0))


# --- NAS-Bench-201 -------------------------------------------------------------------------------
class NB201Cell(nn.Module):
    """A fixed NB201 cell: node i = Σ_{j<i} op_{i←j}(node j), output = node 3 (C → C channels)."""

    def __init__(self, genotype: NB201Genotype, C: int) -> None:
        super().__init__()
        self.edges = NB201_EDGES
        # affine=True: evaluation BN; ops.py then builds nor_conv without a conv bias
        self.ops = nn.ModuleList(build_op(name, C, 1, affine=True) for name in genotype.ops)
        self.droppable = tuple(not isinstance(op, Identity) for op in self.ops)
        self.num_nodes = max(i for i, _ in NB201_EDGES) + 1
        self.C = C
        self.fused_plan = fused.build_eval_plan(self.ops, genotype.ops, [j for _, j in self.edges],
                                                [i - 1 for i, _ in self.edges], self.droppable, 1)
        self._fused_constants: dict[tuple, torch.Tensor] = {}     # the fused forward's weight gather index

    def forward(self, x: torch.Tensor, drop_prob: DropProb = 0.0,
                sink: "fused.BatchNormSink | None" = None, dense: bool = False,
                drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`sink`: the fused forward, whose grouped BNs the caller flushes (training); `dense`:
        its separable convs as dense convs; `drop_mask`: as `DartsEvalCell`'s."""
        if sink is not None:
            return fused.eval_cell_forward(self.fused_plan, self.ops, [x], self.C, drop_mask, sink,
                                           self._fused_constants, dense)[-1]
        nodes: list[torch.Tensor | None] = [x] + [None] * (self.num_nodes - 1)
        apply_drop = self.training and drops(drop_prob)
        for op, droppable, (i, j) in zip(self.ops, self.droppable, self.edges):
            h = op(nodes[j])
            if apply_drop and droppable:
                h = drop_path(h, drop_prob)
            prev = nodes[i]
            nodes[i] = h if prev is None else prev + h
        return nodes[-1]


class NB201Network(_DropPathMixin, nn.Module):
    """NB201 macro skeleton: stem → N cells → ResBlock → N cells → ResBlock → N cells → BN-ReLU-GAP-linear.

    Stage widths C, 2C, 4C. No auxiliary head; returns `(logits, None)`. The benchmark trains
    without drop-path, so `drop_path_prob` stays 0 unless set (same semantics as the DARTS nets).
    """

    def __init__(self, genotype: NB201Genotype, C: int = 16, N: int = 5,
                 num_classes: int = 10) -> None:
        super().__init__()
        if not isinstance(genotype, NB201Genotype):
            raise TypeError(f"NB201Network needs an NB201Genotype, got {type(genotype).__name__}")
        self.genotype = genotype
        skeleton = nb201_skeleton(C, N, lambda channels: NB201Cell(genotype, channels))
        self.stem, self.blocks, self.lastact = skeleton.stem, skeleton.blocks, skeleton.lastact
        self.global_pooling = GlobalAvgPool()
        self.classifier = nn.Linear(skeleton.channels, num_classes)

    def forward(self, x: torch.Tensor) -> Output:
        h = self.stem(x)
        p = self._drop_prob()
        sink = self._sink()
        masks = iter(_drop_path_masks([b for b in self.blocks if isinstance(b, NB201Cell)], p, sink, h))
        for block in self.blocks:
            h = (block(h, p, sink, self.backend == "fused_dense", next(masks))
                 if isinstance(block, NB201Cell) else block(h))
        if sink is not None:
            sink.flush()
        return self.classifier(self.global_pooling(self.lastact(h)).flatten(1)), None


# --- builder -------------------------------------------------------------------------------------
DatasetKind = Literal["cifar", "imagenet"]

# (init_channels, layers, auxiliary) when the caller leaves them out: the published recipes
# (methods.md §1.1 evaluation table; §1.3 for NB201, where `layers` = cells per stage).
EVAL_DEFAULTS: dict[tuple[str, str], tuple[int, int, bool]] = {
    ("darts_cell", "cifar"): (36, 20, True),
    ("darts_cell", "imagenet"): (48, 14, True),
    ("nb201_cell", "cifar"): (16, 5, False),
}


def build_eval_network(genotype: AnyGenotype, *, dataset_kind: DatasetKind, num_classes: int,
                       init_channels: int | None = None, layers: int | None = None,
                       auxiliary: bool | None = None) -> nn.Module:
    """Build the evaluation network for `genotype` on a dataset of kind `dataset_kind`.

    `dataset_kind` is the macro network, not the dataset: 'cifar' for 32-px-style inputs (CIFAR,
    SVHN, and ImageNet16-120 for NB201 cells), 'imagenet' for the mobile 224-px setting. Omitted
    sizes take the published defaults in `EVAL_DEFAULTS`. For NB201 cells `layers` is the number
    of cells per stage.
    """
    if isinstance(genotype, Genotype):
        kind = "darts_cell"
    elif isinstance(genotype, NB201Genotype):
        kind = "nb201_cell"
    else:
        raise TypeError(f"expected a Genotype or NB201Genotype, got {type(genotype).__name__}")
    if dataset_kind not in ("cifar", "imagenet"):
        raise ValueError(f"unknown dataset_kind {dataset_kind!r}; allowed: cifar, imagenet")
    if (kind, dataset_kind) not in EVAL_DEFAULTS:
        raise ValueError(
            f"no {dataset_kind} evaluation network for a {kind} genotype: NAS-Bench-201 cells only "
            f"exist in the benchmark's 32-px macro skeleton (use dataset_kind='cifar', also for "
            f"ImageNet16-120)")
    C0, L0, aux0 = EVAL_DEFAULTS[(kind, dataset_kind)]
    C = C0 if init_channels is None else init_channels
    L = L0 if layers is None else layers
    aux = aux0 if auxiliary is None else auxiliary
    if kind == "nb201_cell":
        if aux:
            raise ValueError("the NB201 macro skeleton has no auxiliary head; set auxiliary=False "
                             "(or leave it unset) for NB201 genotypes")
        return NB201Network(genotype, C=C, N=L, num_classes=num_classes)
    net_cls = NetworkCIFAR if dataset_kind == "cifar" else NetworkImageNet
    return net_cls(genotype, C=C, num_classes=num_classes, layers=L, auxiliary=aux)
