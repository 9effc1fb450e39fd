"""The one-shot supernet: mixed ops, the cell DAG, architecture parameters (methods.md §1, §2).

Parts that the methods combine, each independent of the search space:
- `MixedOp`: Σ_o softmax(α_e)_o · o(x) over an edge's candidate ops (DARTS).
- partial channels (`SupernetConfig.partial_channels` = K > 1, PC-DARTS §2.2): the ops see the
  first C/K channels, the rest bypass them (max-pooled on stride-2 edges), then channel shuffle.
- edge normalisation (β, PC-DARTS): node i = Σ_j softmax_i(β)_j · y_{i<-j}.
- random features (RF-DARTS §2.3): convolution weights frozen at init, BatchNorm affine trained.
- a progressive op set (OPP-DARTS §2.5): columns of α switched on one at a time; `op_rank`
  records the order in which they entered (the derivation reads ops in that order).
- two forward backends over the same modules: `eager` (the per-edge loop below, the reference
  for debugging) and `fused` (`nascore.fused`: the edges leaving a state in one pass, the same
  numbers in fewer kernels, in training and evaluation mode).

A search space (``nascore.spaces``) assembles a macro network from `SearchCell`s and subclasses
`Supernet`; methods never see which space they run on.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .graphs import compiled_call
from .ops import POOLING_OPS, DropProb, Identity, bernoulli_mask, build_op, drop_path, drops

if TYPE_CHECKING:
    from .genotype import AnyGenotype
    from .spaces import SearchSpace


@dataclass(frozen=True)
class SupernetConfig:
    """How to build a supernet; the method's switches and the space's sizes."""

    num_classes: int = 10
    init_channels: int = 16          # C of the first cell (DARTS search: 16; NB201: 16)
    layers: int = 8                  # DARTS: cells; NB201: cells per stage (5)
    partial_channels: int = 1        # K; 1 = every channel goes through the ops
    channel_shuffle: bool = True     # only with K > 1 (PC-DARTS default)
    edge_normalization: bool = False
    random_features: bool = False    # frozen convs, affine BN in cells
    freeze_stem_conv: bool = True    # RF: ⚠ unconfirmed whether the stem conv is frozen too
    train_classifier: bool = False   # RF: ⚠ strict "only BatchNorm" reading freezes it
    image_size: int = 32

    @property
    def cell_affine(self) -> bool:
        # Search cells use affine=False BN; with random features BN is the only trainable part.
        return self.random_features


def edge_softmax(beta: torch.Tensor, edges_per_node: Sequence[int]) -> torch.Tensor:
    """Edge normalisation weights: softmax of β over each node's own incoming edges."""
    parts, start = [], 0
    for n in edges_per_node:
        parts.append(F.softmax(beta[start:start + n], dim=-1))
        start += n
    return torch.cat(parts)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Channel `g·C/K + i` moves to position `i·K + g` (PC-DARTS). One copy, in x's memory format
    (channels_last stays channels_last, for the convs after it)."""
    b, c, h, w = x.shape
    if fused._nhwc(x):                                   # channels_last: shuffle (B, H, W, C)
        nhwc = x.permute(0, 2, 3, 1)
        return nhwc.reshape(b, h, w, groups, c // groups).transpose(3, 4).reshape(b, h, w, c).permute(0, 3, 1, 2)
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class MixedOp(nn.Module):
    """One edge of the supernet: the weighted sum of its candidate ops."""

    def __init__(self, op_names: Sequence[str], C: int, stride: int, affine: bool,
                 pool_bn: bool) -> None:
        super().__init__()
        self.op_names = tuple(op_names)
        ops = []
        for name in self.op_names:
            op = build_op(name, C, stride, affine)
            if pool_bn and name in POOLING_OPS:
                # DARTS-space search cells follow pooling with BN (affine only with random features)
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=affine))
            ops.append(op)
        self.ops = nn.ModuleList(ops)

    # Search-time drop-path (RobustDARTS' regularised search): set per epoch by the search loop;
    # a 0-dim device tensor, written in place, when the search captures its step once
    # (`Supernet.drop_path_on_device`)
    drop_prob: DropProb = 0.0

    def forward(self, x: torch.Tensor, weights: torch.Tensor, columns: Sequence[int]) -> torch.Tensor:
        """`weights[k]` weighs op `columns[k]`; ops outside `columns` are not computed."""
        out = None
        for w, c in zip(weights, columns):
            y = self.ops[c](x)
            if self.training and drops(self.drop_prob) and not isinstance(self.ops[c], Identity):
                y = drop_path(y, self.drop_prob)      # every op output but the identity, as in eval
            y = w * y
            out = y if out is None else out + y
        return out


class PartialChannelMixedOp(nn.Module):
    """PC-DARTS connector around a `MixedOp` built for C/K channels."""

    def __init__(self, op_names: Sequence[str], C: int, stride: int, affine: bool, pool_bn: bool,
                 k: int, shuffle: bool) -> None:
        super().__init__()
        if C % k:
            raise ValueError(f"partial channels K={k} must divide the edge's {C} channels")
        self.k, self.shuffle, self.stride = k, shuffle, stride
        self.mixed = MixedOp(op_names, C // k, stride, affine, pool_bn)
        self.op_names = self.mixed.op_names
        self.ops = self.mixed.ops

    def forward(self, x: torch.Tensor, weights: torch.Tensor, columns: Sequence[int]) -> torch.Tensor:
        c = x.shape[1] // self.k
        xa, xb = x[:, :c], x[:, c:]
        ya = self.mixed(xa, weights, columns)
        if xb.shape[1]:
            yb = xb if self.stride == 1 else F.max_pool2d(xb, 2, 2)
            ya = torch.cat([ya, yb], dim=1)
        return channel_shuffle(ya, self.k) if self.shuffle and self.k > 1 else ya


def make_edge(op_names: Sequence[str], C: int, stride: int, cfg: SupernetConfig,
              pool_bn: bool) -> nn.Module:
    if cfg.partial_channels > 1:
        return PartialChannelMixedOp(op_names, C, stride, cfg.cell_affine, pool_bn,
                                     cfg.partial_channels, cfg.channel_shuffle)
    return MixedOp(op_names, C, stride, cfg.cell_affine, pool_bn)


def dag_edges(num_inputs: int, num_nodes: int) -> list[tuple[int, int]]:
    """(node, source) pairs in α row order: node i reads every state before it.

    States are numbered inputs first (0..num_inputs-1), then nodes. DARTS: 2 inputs, 4 nodes ->
    14 edges; NB201: 1 input, 3 nodes -> 6 edges (1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2).
    """
    return [(i, j) for i in range(num_nodes) for j in range(num_inputs + i)]


class SearchCell(nn.Module):
    """A DAG of mixed ops: each node sums one mixed op per earlier state.

    Output: the concatenation of the intermediate nodes (DARTS) or the last node (NB201).
    """

    def __init__(self, edge_ops: Sequence[Sequence[str]], num_inputs: int, num_nodes: int, C: int,
                 cfg: SupernetConfig, reduction: bool = False, pool_bn: bool = True,
                 output: str = "concat") -> None:
        super().__init__()
        self.num_inputs, self.num_nodes, self.output = num_inputs, num_nodes, output
        self.edge_list = dag_edges(num_inputs, num_nodes)
        if len(edge_ops) != len(self.edge_list):
            raise ValueError(f"{len(edge_ops)} op lists for {len(self.edge_list)} edges")
        strides = tuple(2 if reduction and j < num_inputs else 1 for j in range(num_inputs + num_nodes))
        self.edges = nn.ModuleList(make_edge(ops, C, strides[j], cfg, pool_bn)
                                   for ops, (_, j) in zip(edge_ops, self.edge_list))
        # the op modules by (edge, column) in plain tuples: the fused forward looks each up, and
        # dynamo traces a `ModuleList` index as Python, a tuple index not (alone, 6% off the
        # trace time of a compiled DARTS search in tests/test_fused.py: 117.9 s -> 110.3 s, one
        # run each).
        # Built once: nothing replaces an edge's ops after construction
        self._op_table = tuple(tuple(edge.ops) for edge in self.edges)
        k = cfg.partial_channels
        self.fused_shape = fused.CellShape(strides, C // k, k, cfg.channel_shuffle and k > 1, output)
        self._fused_plans: dict[tuple[fused.ArchPlan, bool, bool], fused.CellPlan] = {}   # pure data: safe to deepcopy

    def op_module(self, edge: int, column: int) -> nn.Module:
        return self._op_table[edge][column]

    def forward(self, inputs: Sequence[torch.Tensor], weights: "torch.Tensor | fused.FusedArch",
                columns: Sequence[int], edge_weights: torch.Tensor | None = None,
                preprocess: Sequence[nn.Module] = ()) -> torch.Tensor:
        """`weights`: softmax(α) over `columns` (edges × columns), or a `FusedArch` (fused backend,
        β already folded in). `preprocess`: a module per input, applied to it first (the macro
        network's, e.g. DARTS' ReLUConvBN; the fused backend runs them inside the cell)."""
        if isinstance(weights, fused.FusedArch):
            key = (weights.plan, weights.dense, weights.merge)
            plan = self._fused_plans.get(key)
            if plan is None:
                # the inputs can run as one pass when their edges are alike: both stride 1 or
                # both 2 (a reduction cell)
                pair = self.num_inputs == 2 and self.fused_shape.strides[0] == self.fused_shape.strides[1]
                plan = self._fused_plans[key] = fused.build_cell_plan(
                    self.op_module, weights.plan, columns, pair_inputs=pair, dense=weights.dense,
                    shared=weights.merged_plans, merge=weights.merge)
            # search-time drop-path: this cell's factors, from the network's one draw
            drop = next(weights.drop_masks) if weights.drop_masks is not None else None
            if weights.compiled_cell is not None:      # `search.compile_scope: cells`
                # the preprocessing outside the trace: its inputs' shapes differ from cell to
                # cell (DARTS: 8 cells, 8 traces), the preprocessed ones do not (5 traces)
                inputs = [m(x) for m, x in zip(preprocess, inputs)] if preprocess else inputs
                out, updates = compiled_call(weights.compiled_cell, self, plan, weights, inputs, drop)
                weights.sink.updates += updates
                return out
            return fused.cell_forward(self.op_module, self.fused_shape, plan, weights, inputs, preprocess, drop)
        states = [m(x) for m, x in zip(preprocess, inputs)] if preprocess else list(inputs)
        e = 0
        for _ in range(self.num_nodes):
            total = None
            for j in range(len(states)):
                y = self.edges[e](states[j], weights[e], columns)
                if edge_weights is not None:
                    y = edge_weights[e] * y
                total = y if total is None else total + y
                e += 1
            states.append(total)
        if self.output == "concat":
            return torch.cat(states[self.num_inputs:], dim=1)
        return states[-1]


def fused_cell(cell: SearchCell, plan: fused.CellPlan, arch: fused.FusedArch,
               inputs: Sequence[torch.Tensor], drop_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, list]:
    """A search cell's fused forward from its preprocessed inputs, and its BN statistics' updates
    (`BatchNormSink.updates`, for the forward's sink to flush): what `search.compile_scope:
    cells` compiles. A function of the cell, not a method bound to it, so that every cell of one
    shape runs the same compiled code: dynamo guards a bound method's module by identity, a
    module argument by its contents.

    The cell's own copy of `arch` (`FusedArch.for_one_cell`) is made here, inside the trace:
    its memos (α's gathered weights, mixing matrices) then never leave the compiled code. Made
    outside, they were writes to an argument, which the compiled code hands back as extra
    outputs; under an α gradient those need gradients of their own, and autograd filled each
    with zeros in every backward (7 zero tensors per NB201 cell)."""
    own = arch.for_one_cell()
    out = fused.cell_forward(cell.op_module, cell.fused_shape, plan, own, inputs, drop_mask=drop_mask)
    return out, own.sink.updates


BACKENDS = fused.BACKENDS
COMPILE_SCOPES = ("cells", "network")


class Supernet(nn.Module):
    """Base of every space's supernet: architecture parameters and what is read off them.

    Subclasses build their modules, call `init_arch(...)` and implement `forward_cells(x, w, ew)`.
    """

    _drop_path_tensor: torch.Tensor | None = None     # `drop_path_on_device`
    _drop_prob: DropProb = 0.0                         # every mixed op's (`set_drop_path`)

    space: "SearchSpace"
    cfg: SupernetConfig
    backend: str = "eager"           # set_backend("fused" | "fused_dense"): same modules, fewer kernels
    merge_kernel_sizes: bool = True  # fused_dense: convs of several kernel sizes as one (set_backend)
    block_diagonal: bool = True      # fused_dense: paired strided convs ungrouped (set_backend)
    matmul_mix: bool = True          # fused backends: a pass's node sums as one product (set_backend)
    merge_batch_norms: bool = True   # fused backends, matmul_mix: a pass's last BNs as one (set_backend)
    _arch_constant: bool = False     # inside `arch_constant()`: α and β enter the forward detached

    def init_arch(self, edge_ops: dict[str, Sequence[Sequence[str]]],
                  edges_per_node: Sequence[int]) -> None:
        self.cell_types = tuple(edge_ops)
        self.edge_ops = {ct: [tuple(ops) for ops in edge_ops[ct]] for ct in self.cell_types}
        self.edges_per_node = tuple(edges_per_node)
        widths = {len(ops) for ct in self.cell_types for ops in self.edge_ops[ct]}
        if len(widths) != 1:
            raise ValueError("every edge of a space must have the same number of candidate ops")
        num_ops = widths.pop()
        num_edges = sum(self.edges_per_node)
        # α initialised 1e-3·N(0,1) (DARTS); one matrix per cell type, shared by its cells.
        self.alphas = nn.ParameterDict({
            ct: nn.Parameter(1e-3 * torch.randn(num_edges, num_ops)) for ct in self.cell_types})
        self.betas = nn.ParameterDict({
            ct: nn.Parameter(1e-3 * torch.randn(num_edges)) for ct in self.cell_types
        }) if self.cfg.edge_normalization else None
        # op_rank[c] = order in which column c entered the search (-1: not yet); all on by default.
        self.register_buffer("op_rank", torch.arange(num_ops))
        # A host copy of the active columns: reading op_rank every forward would wait for the GPU.
        # Kept in step by the setters below and by load_state_dict (the buffer travels in checkpoints).
        self._columns: tuple[int, ...] = tuple(range(num_ops))
        self.register_load_state_dict_post_hook(_sync_active_columns)
        # device index tensors (fused plans, column gathers), built once: no host→device copy per step
        self._index_cache: dict[tuple, torch.Tensor] = {}
        self._plan_cache: dict[tuple, fused.ArchPlan] = {}
        self._merged_plans: dict[tuple, fused.ArchPlan] = {}     # fused_dense: one per cell type

    # --- architecture state -------------------------------------------------------------------
    @property
    def num_ops(self) -> int:
        return self.op_rank.numel()

    def active_columns(self) -> list[int]:
        return list(self._columns)

    def set_active_columns(self, columns: Sequence[int]) -> None:
        """Switch on exactly `columns`, in that order of entry (OPP-DARTS)."""
        rank = torch.full_like(self.op_rank, -1)
        for r, c in enumerate(columns):
            rank[c] = r
        self.op_rank.copy_(rank)
        self._columns = tuple(columns)

    def activate_column(self, column: int) -> None:
        """Add op column `column` to every edge: fresh α entries (1e-3·N(0,1)) and fresh op weights."""
        if column in self._columns:
            raise ValueError(f"op column {column} is already active")
        self.op_rank[column] = len(self._columns)
        self._columns += (column,)
        with torch.no_grad():
            for ct in self.cell_types:
                self.alphas[ct][:, column] = 1e-3 * torch.randn_like(self.alphas[ct][:, column])
        for edge in self.mixed_ops():
            for m in edge.ops[column].modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.reset_running_stats()

    @contextmanager
    def keep_inactive_columns(self) -> Iterator[None]:
        """Around an α optimiser step: columns not yet switched on keep their values.

        Their gradient is a zero-fill (not None), so Adam's L2 term would otherwise move them.
        A mask select, not an index assignment: no host data enters the step (CUDA-graph safe).
        """
        if len(self._columns) == self.num_ops:
            yield
            return
        alphas = [self.alphas[ct] for ct in self.cell_types]
        inactive = self._index(("inactive", self._columns), lambda: torch.tensor(
            [c not in self._columns for c in range(self.num_ops)]), alphas[0].device)
        saved = [a.detach().clone() for a in alphas]
        yield
        with torch.no_grad():
            for a, s in zip(alphas, saved):
                a.copy_(torch.where(inactive, s, a))

    @contextmanager
    def arch_constant(self) -> Iterator[None]:
        """Forwards inside take α and β as constants (the same values, detached): for the passes
        that differentiate only w (a weight step, second order's virtual step).

        `backward(inputs=weights)` already leaves α's `.grad` alone and skips autograd's own
        nodes that lead only to α, but a custom autograd function (the fused backend's
        `WeightedAdd`) computes every gradient its inputs require: α's, in a weight step, is two
        kernels per parameter-free op kind per state that nothing reads.
        """
        saved, self._arch_constant = self._arch_constant, True
        try:
            yield
        finally:
            self._arch_constant = saved

    def _index(self, key: tuple, make: Callable[[], torch.Tensor], device: torch.device) -> torch.Tensor:
        """A small constant tensor on `device`, made once (creating it per step would copy from host)."""
        return fused.cached_on(self._index_cache, device)(key, make)

    def column_names(self, cell_type: str, edge: int, columns: Sequence[int]) -> list[str]:
        return [self.edge_ops[cell_type][edge][c] for c in columns]

    def arch_parameters(self) -> list[nn.Parameter]:
        params = list(self.alphas.values())
        if self.betas is not None:
            params += list(self.betas.values())
        return params

    def weight_parameters(self) -> list[nn.Parameter]:
        """Trainable network weights: everything with requires_grad except α and β."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in arch]

    @property
    def drop_path_probability(self) -> float:
        """What `set_drop_path` last set (read from the device when it lives there: a host sync)."""
        return float(self._drop_prob)

    def set_drop_path(self, p: float) -> None:
        """Search-time drop-path probability of every mixed op (0 = off); written into the
        device tensor in place while there is one (`drop_path_on_device`). A compiled supernet
        makes that tensor itself at its first p above 0 (below)."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path probability must be in [0, 1), got {p}")
        if p > 0 and self._drop_path_tensor is None and self.is_compiled():
            # One compile for the whole ramp: as a float, the probability is a constant that
            # AOTAutograd guards on, and each new value compiled the supernet again. At 0 it
            # stays a float, which draws no mask: the uncompiled search's random numbers.
            device = next(iter(self.alphas.values())).device
            self._drop_path_tensor = torch.tensor(p, dtype=torch.float32, device=device)
        self._write_drop_path(p)

    def _write_drop_path(self, p: float) -> None:
        tensor = self._drop_path_tensor
        if tensor is not None:
            tensor.fill_(p)
        self._drop_prob = p if tensor is None else tensor
        for m in self.modules():
            if isinstance(m, MixedOp):
                m.drop_prob = p if tensor is None else tensor

    def drop_path_on_device(self, device: torch.device | str | None) -> None:
        """Every mixed op reads its drop-path probability from one 0-dim tensor on `device` (None:
        a float again), which `set_drop_path` writes in place: a step captured once in a CUDA graph
        then follows the per-epoch ramp. Masks are drawn at every probability, 0 included (all
        ones: the outputs unchanged, random numbers drawn)."""
        current = next((m.drop_prob for m in self.modules() if isinstance(m, MixedOp)), 0.0)
        value = float(current) if isinstance(current, torch.Tensor) else current
        self._drop_path_tensor = None if device is None else torch.tensor(value, dtype=torch.float32, device=device)
        self._write_drop_path(value)

    def drop_prob_on_device(self) -> bool:
        """Whether the mixed ops read their drop-path probability from a device tensor."""
        return self._drop_path_tensor is not None

    def mixed_ops(self) -> list[nn.Module]:
        """Every edge of every cell (a `MixedOp` or its partial-channel wrapper)."""
        return [edge for cell in self.modules() if isinstance(cell, SearchCell) for edge in cell.edges]

    def op_weights(self, cell_type: str, columns: Sequence[int] | None = None) -> torch.Tensor:
        """softmax(α) over the active columns: (edges, len(columns))."""
        columns = tuple(self._columns if columns is None else columns)
        alpha = self.alphas[cell_type].detach() if self._arch_constant else self.alphas[cell_type]
        if columns != tuple(range(self.num_ops)):
            alpha = alpha.index_select(1, self._index(("columns", columns), lambda: torch.tensor(
                columns, dtype=torch.long), alpha.device))
        return F.softmax(alpha, dim=-1)

    def edge_weights(self, cell_type: str) -> torch.Tensor | None:
        """Edge normalisation: softmax of β over each node's incoming edges, or None."""
        if self.betas is None:
            return None
        beta = self.betas[cell_type].detach() if self._arch_constant else self.betas[cell_type]
        return edge_softmax(beta, self.edges_per_node)

    def derivation_weights(self) -> dict[str, tuple[list[list[float]], list[list[str]]]]:
        """Per cell type: (weights, op names) over active columns, in order of entry.

        With edge normalisation W[j,:] = softmax(α_j) · softmax_i(β)_j (PC-DARTS derivation).
        """
        columns = self.active_columns()
        out = {}
        with torch.no_grad():
            for ct in self.cell_types:
                w = self.op_weights(ct, columns)
                ew = self.edge_weights(ct)
                if ew is not None:
                    w = w * ew[:, None]
                names = [self.column_names(ct, e, columns) for e in range(w.shape[0])]
                out[ct] = (w.cpu().tolist(), names)
        return out

    def derive(self) -> "AnyGenotype":
        return self.space.derive(self.derivation_weights())

    # --- forward ------------------------------------------------------------------------------
    def set_backend(self, backend: str, merge_kernel_sizes: bool = True, block_diagonal: bool = True,
                    matmul_mix: bool = True, merge_batch_norms: bool = True) -> None:
        """Two `fused_dense` trades of multiply-adds for kernels and two fused changes of how a
        pass ends, on by default; off, for measuring them (bench/search_step.py's `+unmerged`,
        `+grouped`, `+chained`, `+kindbn`):
        `merge_kernel_sizes`: a state's convs of one kind that differ only in kernel size run as
        one conv at the largest size (`fused.merge_conv_groups`);
        `block_diagonal`: a reduction cell's paired stride-2 convs run as one ungrouped conv
        (`fused.block_diagonal`), not as a grouped one;
        `matmul_mix` (`fused` and `fused_dense`): every weighted sum of a pass as one batched
        matrix product (`fused.mix`), not one weighted add per op kind;
        `merge_batch_norms` (with `matmul_mix`, in training): a pass's last BNs (every conv
        kind's and pooling's) as one BN over their concatenated inputs (`fused.batch_norm_pass`),
        not one per op kind."""
        if backend not in BACKENDS:
            raise ValueError(f"supernet backend {backend!r} is unknown; allowed: {', '.join(BACKENDS)}")
        self.backend, self.merge_kernel_sizes, self.block_diagonal = backend, merge_kernel_sizes, block_diagonal
        self.matmul_mix, self.merge_batch_norms = matmul_mix, merge_batch_norms

    def compile(self, scope: str = "cells", **kwargs: Any) -> None:
        """`torch.compile` the forward (`search.compile`); keyword arguments as for `torch.compile`.

        `scope` (`search.compile_scope`): "cells" compiles the fused backends' cell forward
        (`fused_cell`), one trace per cell shape and kind of call, shared by the cells of that
        shape: a DARTS network's 8 cells have 5 shapes, NB201's 15 cells 3; the stem, the
        preprocessing, α's softmax and the classifier run eagerly. Static shapes unless
        `dynamic` says otherwise (automatic dynamic shapes would turn the second cell shape into a
        symbolic-shape trace). "network" compiles the whole forward as one function, traced
        once per kind of call. The eager backend has no cell scope: it always compiles the network.

        Each kind of call (train or eval mode, grad on or off, α constant or not, op set,
        drop-path on or off) runs eagerly the first time. That call fills the plan and index
        caches which the forward builds lazily, so the compiled code is traced once, with the
        caches full. Traced while they were still empty, dynamo would guard on their emptiness
        and trace the whole network again on the next call: a second compile of minutes. With
        "cells" that first call runs `fused_cell` cell by cell, as the compiled code does: the
        plain forward gathers a DARTS cell's weights with its preprocessing's, other constants
        than the compiled cell's own, which the traces then made and were guarded on (until
        2026-12-07: each cell shape traced again as later shapes added theirs, 9 traces of 3
        shapes where 6 do, and a compile in the third step). A copy (`copy.deepcopy`) runs
        eagerly, as a copy of an `nn.Module.compile`d module does.
        """
        if scope not in COMPILE_SCOPES:
            raise ValueError(f"compile scope {scope!r} is unknown; allowed: {', '.join(COMPILE_SCOPES)}")
        self.__dict__.pop("_compiled_forward", None)
        self.__dict__.pop("_compiled_cell", None)
        if scope == "cells" and self.backend != "eager":
            kwargs.setdefault("dynamic", False)
            self._compiled_cell = torch.compile(fused_cell, **kwargs)
        else:
            self._compiled_forward = torch.compile(self._forward, **kwargs)
        self._warm_calls: set[tuple] = set()

    def is_compiled(self) -> bool:
        """Whether the forward runs `compile`'s code (a copy's does not)."""
        return "_compiled_forward" in self.__dict__ or "_compiled_cell" in self.__dict__

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for name in ("_compiled_forward", "_compiled_cell", "_warm_calls"):
            state.pop(name, None)                   # bound to this module, not to a copy
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        network, cell = self.__dict__.get("_compiled_forward"), self.__dict__.get("_compiled_cell")
        if network is not None or cell is not None:
            # drop-path on is a kind of its own: its first call adds the masks' constants
            call = (self.training, torch.is_grad_enabled(), self._arch_constant, self._columns,
                    self.training and drops(self._drop_prob))
            if call in self._warm_calls:
                return compiled_call(network, x) if network is not None else self._forward(x, cell)
            self._warm_calls.add(call)
            # the warm call runs the compiled code's own Python: cell by cell, `fused_cell` with
            # its inputs preprocessed before it, so it makes the constants the traces will look up
            return self._forward(x) if network is not None else self._forward(x, fused_cell)
        return self._forward(x)

    def forward_uncompiled(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` without `compile`'s code: for a backward that is differentiated again
        (RobustDARTS' Hessian eigenvalue, `diagnostics.hessian_eigenvalue`), which torch.compile's
        AOTAutograd refuses ("does not currently support double backward")."""
        return self._forward(x)

    def _forward(self, x: torch.Tensor, compiled_cell: Callable | None = None) -> torch.Tensor:
        columns = self.active_columns()
        if self.backend != "eager":
            return self._forward_fused(x, columns, compiled_cell)
        weights = {ct: self.op_weights(ct, columns) for ct in self.cell_types}
        edge_weights = {ct: self.edge_weights(ct) for ct in self.cell_types}
        return self.forward_cells(x, weights, edge_weights, columns)

    def _forward_fused(self, x: torch.Tensor, columns: list[int], compiled_cell: Callable | None = None
                       ) -> torch.Tensor:
        # one weight gather and BN buffer per forward (`fused.ForwardRecord`); a compiled network,
        # its eager first calls included, gathers cell by cell as it was traced
        sink = fused.forward_sink(self, self.training, record=not self.is_compiled())
        arch = {}
        for ct in self.cell_types:
            key = (ct, tuple(columns))
            plan = self._plan_cache.get(key)
            if plan is None:
                plan = self._plan_cache[key] = fused.build_arch_plan(
                    self.edge_ops[ct], self.edges_per_node, columns)
            device = self.alphas[ct].device
            arch[ct] = fused.prepare_arch(
                plan, self.op_weights(ct, columns), self.edge_weights(ct), self.cfg.partial_channels,
                lambda key, make: self._index(key, make, device), sink, self.backend == "fused_dense",
                self._merged_plans, self.merge_kernel_sizes, self.block_diagonal, self.matmul_mix,
                self.merge_batch_norms)
            arch[ct].compiled_cell = compiled_cell
        if self.training and drops(self._drop_prob):
            # every cell type has as many α weights (`init_arch`: one edge list, one op count)
            masks = self._drop_path_masks(x, len(arch[self.cell_types[0]].weights))
            for a in arch.values():
                a.drop_masks = masks
        out = self.forward_cells(x, arch, {ct: None for ct in self.cell_types}, columns)
        sink.flush()
        return out

    def _drop_path_masks(self, x: torch.Tensor, width: int) -> Iterator[torch.Tensor]:
        """Search-time drop-path's factors for the fused forward, one (B, width + 1) view per
        cell in call order, all from ONE draw: a Bernoulli(1 - p) factor scaled by 1/(1 - p) per
        sample and α index, and a last column of ones, the identity's factor
        (`fused.cell_forward`). Four kernels per forward, where the eager ops draw three per op."""
        cells = self.__dict__.get("_num_cells")
        if cells is None:
            cells = self._num_cells = sum(isinstance(m, SearchCell) for m in self.modules())
        mask = bernoulli_mask((x.shape[0], cells, width + 1), self._drop_prob, x)
        mask[:, :, width].fill_(1.0)
        return iter(mask.unbind(1))

    def forward_cells(self, x: torch.Tensor, weights: dict[str, torch.Tensor],
                      edge_weights: dict[str, torch.Tensor | None], columns: Sequence[int]
                      ) -> torch.Tensor:
        raise NotImplementedError

    # --- random features ----------------------------------------------------------------------
    def apply_random_features(self) -> None:
        """Freeze conv weights at their random init; only BN (and optionally the classifier) train.

        Called by the space's constructor when `cfg.random_features`; the stem conv is frozen too
        unless `freeze_stem_conv` is off, the classifier only trains with `train_classifier`.
        """
        stem = getattr(self, "stem", None)
        stem_ids = {id(m) for m in stem.modules()} if stem is not None else set()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if id(m) in stem_ids and not self.cfg.freeze_stem_conv:
                    continue
                for p in m.parameters(recurse=False):
                    p.requires_grad_(False)
            elif isinstance(m, nn.Linear) and not self.cfg.train_classifier:
                for p in m.parameters(recurse=False):
                    p.requires_grad_(False)


def _sync_active_columns(module: Supernet, incompatible_keys: object) -> None:
    """load_state_dict hook: the host copy of the active columns follows the loaded op_rank."""
    ranks = module.op_rank.tolist()
    module._columns = tuple(sorted((c for c, r in enumerate(ranks) if r >= 0), key=lambda c: ranks[c]))
