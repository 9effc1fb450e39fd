"""The fused supernet forward (`search.backend: fused`): the same numbers in fewer, larger kernels.

The eager cell runs every candidate op of every edge on its own and sums `w · op(x)` edge by edge
(tens of kernels per edge × 14 edges × 8 cells, forward and backward, twice per step). Yet the
14 edges of a DARTS cell read only 5 states (c_{k-2}, c_{k-1}, n0, n1, n2; NB201: 6 edges, 3
states), so here every op of every edge leaving a state is computed in one pass over that state:

- a DARTS cell's two inputs feed every node through the same op set, so they run as ONE pass over
  their concatenated channels (`pairable`): one ReLU, one pooling, one BN per op kind for both, and
  each conv reading its own input's channels as one group of a grouped conv (4 passes per cell,
  not 5); the paired terms are summed with the rest (`mix`);
- one ReLU per state, shared by every op that starts with one (all convs and FactorizedReduce);
- a paired cell's two ReLUConvBN preprocessings, where its inputs have one shape, as one ReLU,
  one grouped conv and one BN over both, whose output is the paired pass's input
  (`_paired_preprocess`);
- parameter-free ops once per state: identity, and pooling (its batch statistics are then the same
  for every edge's BN, only the running buffers and, with random features, γ/β differ);
- all units of one op kind (e.g. the 4 `sep_conv_3x3` of the 4 edges leaving c_{k-1}) as one
  convolution: depthwise convs as one grouped conv, 1×1 / dense convs with their weights
  concatenated, their BNs as one batch norm over the concatenated channels;
- the α weights (the edge normalisation's β folded in) are the affine scale of an op kind's last
  batch norm, so `w·BN(y)` costs no kernel of its own and α's gradient comes out of BN's backward;
  every term of a pass (both paired inputs', identity and pooling outputs weighted by α, the
  rest by 1) goes into the node sums, one tensor of shape (B, targets, C, H, W), by ONE batched
  matrix product (`mix`; `search.matmul_mix`; off: one `addcmul` per op kind without a BN of
  its own, `WeightedAdd`, whose backward writes no full-size product, and sums per merged group
  and paired pass, `SumStates`); a pass over a node takes the previous pass's sums whole as
  columns of its product, the node's row weighted by the identity's α and the carried rows by
  1, so that the node's gradient is its ops' alone, added into the product's in place
  (`_mix_layouts`' fold, `NodeRows`);
- in training, the last BNs of a pass (every conv kind's and pooling's, their α in the matrix or
  the BN's scale; with random features' affine BNs, α·γ and α·β) run as ONE batch norm over
  their concatenated inputs (`batch_norm_pass`; `search.merge_batch_norms`): batch statistics
  are per channel, so the numbers are the same; the product then reads that output as it is,
  beside the identity (a DARTS pass: 2 BNs forward and backward, not 5);
- partial channels (PC-DARTS): the ops see the state's first C/K channels; the bypassed channels
  (max-pooled once per state on stride-2 edges) are K-1 more columns of the pass's product, β
  their weights, and a node's K rows of sums are its channels before the shuffle (one copy per
  node); a state one pass reads goes into that product whole, its identity's C/K channels and
  the bypassed rest one block, copied by nothing (`StateParts`);
- S4's `noise` is drawn per edge in the eager loop's order, so both paths see the same numbers;
- search-time drop-path (RobustDARTS): one draw per network forward, a factor per sample, cell and
  (edge, op), scales each sample's entries of each pass's mixing matrix (`Mix`'s `drop`;
  `FusedArch.drop_factors`), the identity's entries kept: the eager per-op semantics, other draws;
- `fused_dense` only: a separable conv (depthwise k×k, then 1×1) is linear, so it runs as ONE dense
  k×k conv whose weight is the two weights' product (`_compose`): more multiply-adds, on tensor
  cores, for half the conv launches, no depthwise kernel and no intermediate activation; and the
  convs of one kind leaving a state that differ only in kernel size (NB201's nor_conv_1x1 and 3×3;
  sep_conv_3x3 and 5×5; dil_conv_3x3 and 5×5) run as one conv, the smaller kernels zero-padded to
  the largest, and one BN (`merge_conv_groups`; `search.merge_kernel_sizes`); a reduction cell's
  paired stride-2 convs run ungrouped, their weight block-diagonal (`block_diagonal`;
  `search.block_diagonal`).

Nothing is re-parameterised: the fused forward gathers the eager modules' own weights at
call time, so checkpoints, `functional_call` (second order), random-feature freezing and the
progressive op set work unchanged, and gradients reach the same parameters. Running statistics of
the grouped BNs are written back to each module's buffers (one `_foreach_lerp_` per forward).
Evaluation mode runs the same grouping: a grouped BN normalises with its units' running
statistics (one `cat` per cell), and a pooling's BN, whose batch statistics a state's edges share
in training, becomes one `addcmul` of the edges' own affine maps. From a network's second forward
on, its cells' weights are gathered in one gather and their BN statistics kept in one buffer for
the whole forward (`ForwardRecord`), not one per cell.
Ops the fused forward does not recognise run their own eager module per edge ("eager" kind).

Numbers differ from the eager path only by float rounding (summation order); tests check outputs,
gradients, BN buffers and derived genotypes against the eager path in float64.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .ops import DilConv, DropProb, FactorizedReduce, Identity, Noise, ReLUConvBN, SepConv, Zero, bernoulli_mask, drops

# a network's forward (training and evaluation mode): plain, or this module's; `fused_dense` also computes every
# separable conv (depthwise k×k → 1×1) as ONE dense k×k conv whose weight is the two's product
BACKENDS = ("eager", "fused", "fused_dense")
Units = tuple[tuple[int, int], ...]           # (edge, column) pairs


# --- plans: pure data, cached per (cell type, active columns) ----------------------------------
@dataclass(frozen=True)
class GroupPlan:
    """The units of one op name among the edges leaving one state, computed together."""

    op: str
    units: Units                              # in target-node order
    positions: tuple[int, ...] | None         # target slot of each unit; None: one per target, in order
    # >1: op names computed as one group (`merge_conv_groups`): `repeats` blocks of units, each
    # one unit per target in order ("+"-joined names)
    repeats: int = 1


@dataclass(frozen=True)
class SourcePlan:
    state: int                                # inputs first, then nodes (`dag_edges` numbering)
    edges: tuple[int, ...]                    # the edge to each later node, in node order
    groups: tuple[GroupPlan, ...]


@dataclass(frozen=True, eq=False)     # compared by identity: a cheap dict key in every forward
class ArchPlan:
    """How one cell type's edges group by source state and op name, for the active columns."""

    num_inputs: int
    num_nodes: int
    sources: tuple[SourcePlan, ...]
    op_index: tuple[int, ...]                 # flat index into (edges × active columns), unit by unit
    edge_index: tuple[int, ...]               # the edge of each (source, target) slot, source by source


def build_arch_plan(edge_ops: Sequence[Sequence[str]], edges_per_node: Sequence[int],
                    columns: Sequence[int]) -> ArchPlan:
    """Group the units (edge, active column) by the state the edge reads and by op name."""
    num_inputs, num_nodes = edges_per_node[0], len(edges_per_node)
    edge_of, e = {}, 0
    for i in range(num_nodes):
        for j in range(num_inputs + i):
            edge_of[i, j] = e
            e += 1
    sources: list[SourcePlan] = []
    op_index: list[int] = []
    edge_index: list[int] = []
    for j in range(num_inputs + num_nodes - 1):              # the last node feeds no edge
        first = max(0, j - num_inputs + 1)
        edges = tuple(edge_of[i, j] for i in range(first, num_nodes))
        by_op: dict[str, list[tuple[int, int, int]]] = {}
        for pos, e in enumerate(edges):
            for k, c in enumerate(columns):
                by_op.setdefault(edge_ops[e][c], []).append((pos, e, k))
        groups = []
        for op, units in by_op.items():
            positions = tuple(u[0] for u in units)
            groups.append(GroupPlan(op, tuple((e, columns[k]) for _, e, k in units),
                                    None if positions == tuple(range(len(edges))) else positions))
            op_index += [e * len(columns) + k for _, e, k in units]
        sources.append(SourcePlan(j, edges, tuple(groups)))
        edge_index += edges
    return ArchPlan(num_inputs, num_nodes, tuple(sources), tuple(op_index), tuple(edge_index))


@dataclass(frozen=True)
class CellPlan:
    """What one cell's modules are, per group of its `ArchPlan` (same for every cell of a type)."""

    kinds: tuple[tuple[str, ...], ...]        # per source, per group: a key of KINDS
    noise: tuple[tuple[int, int, int], ...]   # (edge, column, state) in the eager loop's draw order
    bn_channels: int                          # batch-norm channels per op channel (temp statistics)
    bn_unit: tuple[int, int] | None           # a unit with a grouped BN: its buffers' dtype/device
    scaled_affine: bool = False               # every SCALED group ends in an affine BN (random features)
    paired: bool = False                      # the two inputs run as one pass (`pairable`)
    arch: ArchPlan | None = None              # the groups the cell runs: the type's, or merged (dense)

    def passes(self, plan: ArchPlan) -> list[tuple[int, ...]]:
        """The sources each pass of `cell_forward` reads side by side: ((0, 1), (2,), ...) paired."""
        n = len(plan.sources)
        return [(0, 1)] + [(i,) for i in range(2, n)] if self.paired else [(i,) for i in range(n)]


# kinds whose units can read two states side by side (channels concatenated): each op is
# channel-wise (ReLU, pooling, BN, identity) or becomes a conv with one group per state
PAIRABLE = frozenset({"zero", "identity", "pool", "pool_bn", "dil", "sep", "relu_conv_bn", "factorized_reduce"})


def pairable(plan: ArchPlan, kinds: Sequence[Sequence[str]]) -> bool:
    """Whether a cell's two inputs have the same groups (op names, unit counts, every target) of
    PAIRABLE kinds: then every op leaving either input runs in ONE pass over both, their channels
    side by side (a DARTS cell: 4 passes instead of 5, each input's convs one group of the same
    convs). Not with per-edge op sets (S1), noise (S4) or unrecognised ops."""
    if plan.num_inputs != 2 or len(plan.sources) < 2:
        return False
    a, b = plan.sources[0], plan.sources[1]
    return (len(a.edges) == len(b.edges) and tuple(kinds[0]) == tuple(kinds[1])
            and all(k in PAIRABLE for k in kinds[0])
            and [(g.op, len(g.units)) for g in a.groups] == [(g.op, len(g.units)) for g in b.groups]
            and all(g.positions is None for g in a.groups + b.groups))


def _same_padding(conv: nn.Conv2d) -> int | None:
    """An odd square kernel's dilation if its padding is "same" (k//2·dilation), else None: convs
    of one dilation and stride then give one output size whatever their kernel size."""
    (kh, kw), (ph, pw), (dh, dw) = conv.kernel_size, conv.padding, conv.dilation
    if kh != kw or kh % 2 == 0 or (ph, pw) != (kh // 2 * dh, kw // 2 * dw) or dh != dw:
        return None
    return dh


def _first_max(items: Iterable, key: Callable) -> object:
    """`max(items, key=key)`, the first on ties, as a loop: torch 2.11's dynamo (the GPU machines'
    torch) cannot trace `max` with a key."""
    best = None
    for x in items:
        if best is None or key(x) > key(best):
            best = x
    return best


def _largest_kernel(convs: Iterable[nn.Module]) -> nn.Module:
    """The conv of the largest kernel height among `convs`, the first on ties."""
    return _first_max(convs, lambda c: c.kernel_size[0])


def part(op: nn.Module, i: int) -> nn.Module:
    """`op[i]` of a sequential op (`ReLUConvBN`, `DilConv`, `SepConv`, a pooling and its BN), read
    from its children's dict. Under dynamo, `nn.Sequential.__getitem__` is traced as Python (an
    islice over the children, ~110 bytecodes a call): it was 55% of the bytecodes dynamo stepped
    through to trace a DARTS search cell (bench/RESULTS.md, 2026-12-07, twenty-fifth session).
    A sequential whose children have names of their own is indexed as usual."""
    name = str(i)
    return op._modules[name] if name in op._modules else op[i]


def _bn_key(bn: nn.BatchNorm2d) -> tuple:
    return bn.affine, bn.eps, bn.momentum


def _conv_merge_key(m: nn.Module) -> tuple | None:
    """What ops of one kind must share to run as one conv (`merge_conv_groups`): all but an odd
    square kernel size, padded so that every size gives one output size ("same" padding).
    ReLU-conv-BN ops (NB201's nor_conv_1x1 and 3×3); dilated convs (dil_conv_3x3 and 5×5) and
    separable convs (sep_conv_3x3 and 5×5), whose depthwise kernels are zero-padded before the
    dense conv weight is composed (`_compose`)."""
    kind = classify(m)
    if kind == "relu_conv_bn":
        conv, bn = part(m, 1), part(m, 2)
        d = _same_padding(conv)
        return None if d is None else (kind, conv.in_channels, conv.out_channels, conv.stride, d,
                                       conv.bias is not None, *_bn_key(bn))
    if kind == "dil":
        depthwise = part(m, 1)
        d = _same_padding(depthwise)
        return None if d is None else (kind, depthwise.in_channels, part(m, 2).out_channels, depthwise.stride, d,
                                       *_bn_key(part(m, 3)))
    if kind == "sep":
        a, b = part(m, 0), part(m, 1)
        dw_a, dw_b = part(a, 1), part(b, 1)
        if (_same_padding(dw_a), _same_padding(dw_b)) != (1, 1) or dw_a.kernel_size != dw_b.kernel_size:
            return None
        return (kind, dw_a.in_channels, part(a, 2).out_channels, part(b, 2).out_channels, dw_a.stride, dw_b.stride,
                *_bn_key(part(a, 3)), *_bn_key(part(b, 3)))
    return None


def merge_conv_groups(plan: ArchPlan, op_module: Callable[[int, int], nn.Module],
                      columns: Sequence[int], shared: dict | None = None) -> ArchPlan:
    """`plan` with the conv groups of a state that differ only in kernel size (`_conv_merge_key`:
    NB201's nor_conv_1x1 and 3×3; the DARTS space's sep_conv_3x3 and 5×5, and dil_conv_3x3 and
    5×5) as ONE group: one conv whose smaller kernels are zero-padded to the largest (centred),
    one BN (a separable conv: one conv and one BN per block, one ReLU between). Fewer kernels,
    more multiply-adds (a 1×1 conv at 3×3 cost, a 3×3 at 5×5 cost): a `fused_dense` trade. Groups
    with target positions of their own (not every target) are left alone. `shared` (the
    supernet's) keeps one merged plan for every cell of a type, so that they share one α gather
    per forward (`FusedArch`)."""
    k_of = {c: k for k, c in enumerate(columns)}
    sources, op_index = [], []
    for sp in plan.sources:
        by_key: dict[tuple, list[GroupPlan]] = {}
        for g in sp.groups:
            key = _conv_merge_key(op_module(*g.units[0])) if g.positions is None and g.repeats == 1 else None
            if key is not None:
                by_key.setdefault(key, []).append(g)
        merged = {id(gs[0]): gs for gs in by_key.values() if len(gs) > 1}
        skip = {id(g) for gs in merged.values() for g in gs[1:]}
        groups = []
        for g in sp.groups:
            if id(g) in skip:
                continue
            if id(g) in merged:
                gs = merged[id(g)]
                g = GroupPlan("+".join(x.op for x in gs), tuple(u for x in gs for u in x.units), None, len(gs))
            groups.append(g)
            op_index += [e * len(columns) + k_of[c] for e, c in g.units]
        sources.append(SourcePlan(sp.state, sp.edges, tuple(groups)))
    if tuple(sources) == plan.sources:
        return plan
    merged = ArchPlan(plan.num_inputs, plan.num_nodes, tuple(sources), tuple(op_index), plan.edge_index)
    if shared is None:
        return merged
    # keyed by plain tuples, not by the new plans: a dict key hashed by value and made inside a
    # trace is hashed before its fields are set when torch 2.11's dynamo replays the insertion
    key = (plan, tuple((sp.state, tuple((g.op, g.units) for g in sp.groups)) for sp in sources))
    return shared.setdefault(key, merged)


def build_cell_plan(op_module: Callable[[int, int], nn.Module], plan: ArchPlan,
                    columns: Sequence[int], pair_inputs: bool = False, dense: bool = False,
                    shared: dict | None = None, merge: bool = True) -> CellPlan:
    """`pair_inputs`: the cell's two inputs have one shape and their edges one stride; the inputs
    then run as one pass where `pairable`. `dense` (`fused_dense`) and `merge`: convs that differ
    only in kernel size run as one (`merge_conv_groups`)."""
    if dense and merge:
        plan = merge_conv_groups(plan, op_module, columns, shared)
    kinds = tuple(tuple(classify(op_module(*g.units[0])) for g in sp.groups) for sp in plan.sources)
    noise = []
    bn, bn_unit = 0, None
    state_of = {e: sp.state for sp in plan.sources for e in sp.edges}
    for sp, ks in zip(plan.sources, kinds):
        for g, kind in zip(sp.groups, ks):
            if BN_CHANNELS[kind](1):
                # a pooling's affine BNs (random features) normalise a copy of its output each
                # (`_bn_shared`): statistics per unit, not one set for all
                affine_pools = kind == "pool_bn" and part(op_module(*g.units[0]), 1).affine
                bn += len(g.units) if affine_pools else BN_CHANNELS[kind](len(g.units))
                bn_unit = bn_unit or g.units[0]
            if kind == "noise":
                noise += [(e, c, state_of[e]) for e, c in g.units]
    order = {c: k for k, c in enumerate(columns)}
    # the eager loop visits edges in α-row order and an edge's ops in `columns` order
    noise.sort(key=lambda u: (u[0], order[u[1]]))
    last_bns = [LAST_BN[kind](op_module(*g.units[0])) for sp, ks in zip(plan.sources, kinds)
                for g, kind in zip(sp.groups, ks) if kind in SCALED]
    return CellPlan(kinds, tuple(noise), bn, bn_unit, len(last_bns) > 0 and all(b.affine for b in last_bns),
                    pair_inputs and pairable(plan, kinds), plan)


def classify(m: nn.Module) -> str:
    """The fused kind of an op module; "eager" for anything whose structure is not the expected one."""
    if isinstance(m, Zero):
        return "zero"
    if isinstance(m, Noise):
        return "noise"
    if isinstance(m, Identity):
        return "identity"
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        return "pool"
    if (isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(part(m, 0), (nn.MaxPool2d, nn.AvgPool2d))
            and _is_bn(part(m, 1))):
        return "pool_bn"
    if isinstance(m, SepConv) and len(m) == 2 and all(_is_dil_block(b) for b in m):
        return "sep"
    if isinstance(m, DilConv) and _is_dil_block(m):
        return "dil"
    if (isinstance(m, ReLUConvBN) and isinstance(part(m, 0), nn.ReLU) and _is_conv(part(m, 1))
            and part(m, 1).groups == 1 and _is_bn(part(m, 2))):
        return "relu_conv_bn"
    if (isinstance(m, FactorizedReduce) and all(_is_conv(c) and c.kernel_size == (1, 1) and c.stride == (2, 2)
                                                and c.padding == (0, 0) and c.bias is None
                                                for c in (m.conv_1, m.conv_2)) and _is_bn(m.bn)):
        return "factorized_reduce"
    return "eager"


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.momentum is not None


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and isinstance(m.padding, tuple)


def _is_dil_block(m: nn.Module) -> bool:
    """ReLU -> depthwise conv -> 1×1 conv (no bias) -> BN, as `DilConv` builds it."""
    if len(m) != 4:
        return False
    relu, dw, pw, bn = (part(m, i) for i in range(4))
    return (isinstance(relu, nn.ReLU) and _is_conv(dw) and dw.bias is None
            and dw.groups == dw.in_channels == dw.out_channels and _is_conv(pw)
            and pw.kernel_size == (1, 1) and pw.groups == 1 and pw.bias is None
            and pw.stride == (1, 1) and pw.padding == (0, 0) and _is_bn(bn))


# --- op weights: one gather per cell ----------------------------------------------------------
# Every grouped op needs its units' weights side by side (concatenated, interleaved, or spread
# into a block matrix). Built per group with torch.cat & co., that is several tiny kernels per
# group in the forward and as many in the backward: about a fifth of a search step's kernels.
# Instead each kind *requests* its tensors (a layout and the parameters it arranges); a cell
# concatenates all its parameters once and gathers every requested tensor with one index_select,
# whose gradient is one index_select back (every parameter element is used exactly once). The
# index is built once, by running the same layouts on tensors of element positions.
Request = tuple[str, list[torch.Tensor]]      # (layout, parameters)
# a SCALED kind's α: (n, C) weights, or its last BN's (weight, bias) with α folded in (_bn_blocks)
Scale = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None
ZERO = -1                                     # position of the constant 0 in an index layout


def _layout(kind: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """Arrange per-parameter tensors of element positions as a kind's op consumes the values
    (the gather index of `_gather_index`; ZERO marks a constant 0).

    - cat: along dim 0 (grouped convs, unit-major; 1×1 and dense convs; conv biases; a pooling's
      BN γ/β, `_pool_bn_requests`);
    - affine: BN γ/β, as "cat" (the one kind autocast leaves in float32, see `gather_weights`);
    - interleave: n depthwise weights (C, 1, k, k) as one conv with channel multiplier n over a
      shared input: output channel c·n + u is unit u's channel c;
    - dense: n 1×1 weights (D, C, 1, 1) as one dense 1×1 conv reading that (c, u) order, zero
      outside each unit's block (ZERO positions);
    - factorized: FactorizedReduce's two offset 1×1 stride-2 convs, per unit (conv_1, conv_2, ...),
      as one 2×2 stride-2 conv: conv_1 at tap (0, 0), conv_2 at tap (1, 1), zero elsewhere;
    - taps_last: n depthwise weights (C, 1, kh, kw) as (n, kh·kw, C), for a channels_last product
      (`_compose`; the piece comes out shaped as "cat" would and is viewed there);
    - centred: conv weights of odd square kernels of several sizes as "cat" of them, each
      zero-padded to the largest size around its centre (`merge_conv_groups`); centred_taps_last:
      padded so, then as "taps_last" (the depthwise parts of merged separable convs, `_compose`).

    A "/S" suffix ("interleave/2", "dense/2") lays out the parts of S states read side by side
    (the paired inputs of `cell_forward`): each state's n/S parts as the plain layout does, one
    state after the other, for a conv with S groups.

    ("separable" requests are not layouts of positions: `gather_weights` gathers their parts
    ("cat" or "taps_last", centred where kernel sizes differ, and "cat") and multiplies them, see `_compose`.)
    """
    kind, _, states = kind.partition("/")
    if states:
        per = len(parts) // int(states)
        return torch.cat([_layout(kind, parts[i:i + per]) for i in range(0, len(parts), per)])
    if kind.startswith("centred"):
        k = max(q.shape[-1] for q in parts)
        parts = [F.pad(q, [(k - q.shape[-1]) // 2] * 4, value=ZERO) for q in parts]
        kind = kind.removeprefix("centred").removeprefix("_") or "cat"
    if kind in ("cat", "affine"):
        return torch.cat(parts) if len(parts) > 1 else parts[0]
    n = len(parts)
    if kind == "interleave":
        return torch.cat(parts).unflatten(0, (n, -1)).transpose(0, 1).flatten(0, 1)
    if kind == "taps_last":
        return torch.cat(parts).unflatten(0, (n, -1)).flatten(2).transpose(1, 2)
    if kind == "dense":
        p = torch.stack([q.flatten(1) for q in parts])                      # (u, d, c)
        out = torch.full((*p.shape, n), ZERO, dtype=p.dtype)
        for u in range(n):
            out[u, :, :, u] = p[u]
        return out.flatten(0, 1).flatten(1)[:, :, None, None]               # (u·d, c·u', 1, 1)
    if kind == "factorized":
        blocks = []
        for a, b in zip(parts[0::2], parts[1::2]):                          # conv_1, conv_2 of a unit
            block = torch.full((a.shape[0] + b.shape[0], a.shape[1], 2, 2), ZERO, dtype=a.dtype)
            block[:a.shape[0], :, 0, 0] = a[:, :, 0, 0]
            block[a.shape[0]:, :, 1, 1] = b[:, :, 0, 0]
            blocks.append(block)
        return torch.cat(blocks)
    raise ValueError(f"unknown weight layout {kind!r}")


def _memory_order(p: torch.Tensor) -> list[int]:
    """p's dims from the outermost in memory to the innermost (channels_last: N, H, W, C)."""
    return sorted(range(p.dim()), key=lambda d: -p.stride(d))


class GatherWeights(torch.autograd.Function):
    """All of a cell's requested weight tensors from its parameters: one cat, one index_select;
    backward: one index_select, whose slices are the parameters' gradients in their own layout.

    `dtype` (autocast's, or None): the first `low` gathered values (a cell's conv weights and
    biases) in that dtype, cast once for the cell where autocast would cast every conv's weight
    on its own, forward and backward. Then two outputs, those and the rest (in the parameters'
    dtype: BN's γ and β, which autocast leaves as they are), unless the rest is empty."""

    @staticmethod
    def forward(ctx, index: torch.Tensor, inverse: torch.Tensor, zero: torch.Tensor,
                dtype: torch.dtype | None, low: int, *params: torch.Tensor):
        # (shape, memory order) per parameter; order None: plainly contiguous (the usual case)
        ctx.metas = [(p.shape, None if p.is_contiguous() else _memory_order(p)) for p in params]
        ctx.dtype, ctx.low, ctx.numel = zero.dtype, low, index.numel()
        ctx.save_for_backward(inverse)
        flat = torch.cat([p.view(-1) if o is None else p.permute(o).reshape(-1)
                          for p, (_, o) in zip(params, ctx.metas)] + [zero])
        if dtype is None:
            return flat.index_select(0, index)
        if low == index.numel():     # all cast: before the gather, which then moves narrower values
            return flat.to(dtype).index_select(0, index)
        out = flat.index_select(0, index)
        return out[:low].to(dtype), out[low:]

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        (inverse,) = ctx.saved_tensors
        if len(grads) == 1:
            grad = grads[0].index_select(0, inverse)
            if grad.dtype != ctx.dtype:
                grad = grad.to(ctx.dtype)    # the parameters' dtype, accumulated as such
        else:                                # both parts into one buffer of the parameters' dtype
            joined = inverse.new_empty(ctx.numel, dtype=ctx.dtype)
            for part, g in zip(joined.split([ctx.low, ctx.numel - ctx.low]), grads):
                if g is None:
                    part.zero_()
                else:
                    part.copy_(g)
            grad = joined.index_select(0, inverse)
        pieces = grad.split([math.prod(shape) for shape, _ in ctx.metas])
        grads_out = []
        for piece, (shape, order), needed in zip(pieces, ctx.metas, ctx.needs_input_grad[5:]):
            if not needed:
                grads_out.append(None)
            elif order is None:
                grads_out.append(piece.view(shape))
            else:              # the parameter's own layout: AccumulateGrad then copies nothing
                back = sorted(range(len(order)), key=order.__getitem__)
                grads_out.append(piece.view([shape[d] for d in order]).permute(back))
        return (None, None, None, None, None, *grads_out)


def _layout_shape(kind: str, ps: Sequence[torch.Tensor]) -> tuple[int, ...]:
    """The shape `_layout(kind, ...)` gives for parameters `ps`."""
    rows = sum(p.shape[0] for p in ps)
    kind, _, states = kind.partition("/")
    if kind == "dense":
        return (rows, ps[0].shape[1] * len(ps) // int(states or 1), 1, 1)
    if kind == "factorized":
        return (rows, ps[0].shape[1], 2, 2)
    if kind.startswith("centred"):
        return (rows, ps[0].shape[1], *_first_max((p.shape[2:] for p in ps), lambda hw: hw[0]))
    return (rows, *ps[0].shape[1:])


def _channels_last(ps: Sequence[torch.Tensor]) -> bool:
    """Hand a conv weight over in channels_last where its parameters are (no conversion per conv,
    and its gradient, channels_last like the activations', comes back without a copy). A 1×1
    weight is both layouts at once, so any of `ps` decides (a merged group's first may be 1×1)."""
    return all(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) for p in ps) and \
        any(not p.is_contiguous() for p in ps)


def _gather_index(requests: Sequence[Request]) -> tuple[torch.Tensor, torch.Tensor]:
    """The gather's index into cat(parameters in memory order, 0) and its inverse: where each
    parameter element lands (the layouts place each exactly once; tests/test_fused.py checks).
    No data-dependent step, so that it also traces under torch.compile."""
    base, parts = 0, []
    for kind, ps in requests:
        positions = []
        for p in ps:
            order = _memory_order(p)
            back = sorted(range(p.dim()), key=order.__getitem__)
            positions.append(base + torch.arange(p.numel()).view([p.shape[d] for d in order]).permute(back))
            base += p.numel()
        arranged = _layout(kind, positions)
        parts.append((arranged.permute(0, 2, 3, 1) if _channels_last(ps) else arranged).reshape(-1))
    index = torch.cat(parts)
    index = torch.where(index == ZERO, base, index)           # the constant 0 after the parameters
    # slot `base` (the 0) is written many times and dropped
    inverse = torch.empty(base + 1, dtype=torch.long).scatter_(0, index, torch.arange(index.numel()))
    inverse = inverse[:base]
    if max(index.numel(), base) < 2**31:  # int32, as index_select takes: half the memory a network's index holds
        return index.int(), inverse.int()
    return index, inverse


SEPARABLE = ("separable", "separable_nhwc")


def _compose(requests: Sequence[Request], gathered: Callable[[list[Request]], list[torch.Tensor]]
             ) -> list[torch.Tensor]:
    """The requested tensors, where some are "separable": n separable convs' weights, parts
    (dw_1..dw_n, pw_1..pw_n) with dw_u (C, 1, k, k) and pw_u (C', C, 1, 1), as ONE dense conv
    weight (n·C', C, k, k), unit-major: W_u[o, i] = pw_u[o, i] · dw_u[i] ("separable_nhwc": the
    same values laid out channels_last). A depthwise k×k conv followed by a 1×1 conv is one k×k
    conv with that weight: C× the multiply-adds, on tensor cores, in one kernel, with no
    intermediate activation to write, keep for backward and read back.

    The products of every separable request with one (taps, C', C) shape are ONE multiply (a cell
    has about two such shapes: 3×3 and 5×5), whose backward is two small reductions: gathering
    each request's parts side by side makes their weights consecutive."""
    others = [r for r in requests if r[0] not in SEPARABLE]
    by_shape: dict[tuple, list[int]] = {}
    for i, (kind, ps) in enumerate(requests):
        if kind in SEPARABLE:
            # a merged group's depthwise kernels have several sizes: all at the largest (centred)
            k, pw = max(p.shape[-1] for p in ps[:len(ps) // 2]), ps[len(ps) // 2]
            by_shape.setdefault((kind, (k, k), pw.shape[0], pw.shape[1]), []).append(i)
    expanded = list(others)
    for (kind, (k, _), *_), members in by_shape.items():
        dws = [p for i in members for p in requests[i][1][:len(requests[i][1]) // 2]]
        layout = "cat" if kind == "separable" else "taps_last"
        if any(p.shape[-1] != k for p in dws):
            layout = "centred" if kind == "separable" else "centred_taps_last"
        expanded.append((layout, dws))
        expanded.append(("cat", [p for i in members for p in requests[i][1][len(requests[i][1]) // 2:]]))
    pieces = gathered(expanded)
    out: list[torch.Tensor | None] = [None] * len(requests)
    rest = iter(pieces[:len(others)])
    for i, (kind, _) in enumerate(requests):
        if kind not in SEPARABLE:
            out[i] = next(rest)
    composed = iter(pieces[len(others):])
    for (kind, (kh, kw), c_out, c_in), members in by_shape.items():
        dw = next(composed)
        pw = next(composed).view(-1, c_out, c_in)                           # (U, C', C)
        if kind == "separable":                                             # (U, C', C, taps)
            w = pw.unsqueeze(3) * dw.view(-1, c_in, kh * kw).unsqueeze(1)
        else:                                                               # (U, C', taps, C)
            w = pw.unsqueeze(2) * dw.view(-1, kh * kw, c_in).unsqueeze(1)
        units = [len(requests[i][1]) // 2 for i in members]
        for i, part in zip(members, w.split(units)):
            if kind == "separable":
                out[i] = part.view(-1, c_in, kh, kw)
            else:
                out[i] = part.view(-1, kh, kw, c_in).permute(0, 3, 1, 2)
    return out                                                              # type: ignore[return-value]


def _autocast_casts(request: Request) -> bool:
    """Whether autocast would cast these values for their op: conv weights and biases, not BN's."""
    return len(request[1]) > 0 and request[0] != "affine"


def gather_weights(requests: Sequence[Request],
                   constant: Callable[[tuple, Callable[[], torch.Tensor]], torch.Tensor],
                   autocast: torch.dtype | None = None) -> list[torch.Tensor]:
    """The requested tensors, in request order. `constant(key, make)` caches the index on the
    parameters' device (built once per cell structure, not per forward). `autocast` (the dtype
    autocast runs convs in, or None): conv weights and biases come in that dtype, cast once by the
    gather (BN's γ and β, "affine" requests, stay in their own dtype, as autocast leaves them)."""
    if any(kind in SEPARABLE for kind, _ in requests):
        # composed in the autocast dtype: the products of weights autocast would round anyway
        return _compose(requests, lambda rs: gather_weights(rs, constant, autocast))
    if autocast is not None:
        # what autocast casts first: one slice of the gather, cast once
        order = sorted(range(len(requests)), key=lambda i: not _autocast_casts(requests[i]))
        if order != list(range(len(requests))):
            out: list[torch.Tensor | None] = [None] * len(requests)
            for i, w in zip(order, gather_weights([requests[i] for i in order], constant, autocast)):
                out[i] = w
            return out                                                      # type: ignore[return-value]
    params = [p for _, ps in requests for p in ps]
    if not params:
        return []
    signature = tuple((kind, tuple((tuple(p.shape), p.stride()) for p in ps)) for kind, ps in requests)
    built: list[torch.Tensor] = []            # index and inverse, built together on a cache miss

    def part(i: int) -> Callable[[], torch.Tensor]:
        def make() -> torch.Tensor:
            if not built:
                built.extend(_gather_index(requests))
            return built[i]
        return make
    index = constant(("gather", signature), part(0))
    inverse = constant(("gather-inverse", signature), part(1))
    dtype = params[0].dtype
    zero = constant(("zero", dtype), lambda: torch.zeros(1, dtype=dtype))
    shapes = [_layout_shape(kind, ps) for kind, ps in requests]
    sizes = [math.prod(s) for s in shapes]
    casts = sum(_autocast_casts(r) for r in requests) if autocast is not None else 0
    low = sum(sizes[:casts])
    gathered = GatherWeights.apply(index, inverse, zero, autocast if casts else None, low, *params)
    if isinstance(gathered, tuple):          # the cast conv weights, the rest
        pieces = gathered[0].split(sizes[:casts]) + gathered[1].split(sizes[casts:])
    else:
        pieces = gathered.split(sizes)
    out = []
    for (kind, ps), shape, piece in zip(requests, shapes, pieces):
        if _channels_last(ps):
            out.append(piece.view(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2))
        else:
            out.append(piece.view(shape))
    return out


def cached_on(store: dict[tuple, torch.Tensor], device: torch.device
              ) -> Callable[[tuple, Callable[[], torch.Tensor]], torch.Tensor]:
    """A `constant(key, make)`: make() moved to `device` once, kept in `store` (the supernet's and
    the evaluation cells' device constants: index tensors, made per step, would copy from host)."""
    def constant(key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        full = (*key, str(device))
        if full not in store:
            store[full] = make().to(device)
        return store[full]
    return constant


# --- batch-norm statistics ---------------------------------------------------------------------
@dataclass
class _BNUpdate:
    bns: list[nn.BatchNorm2d]
    mean: torch.Tensor
    var: torch.Tensor
    shared: bool                              # every module saw the same batch statistics


@dataclass(frozen=True)
class CellNeeds:
    """What a fused cell takes from its forward's scratch before it runs (`BatchNormSink.begin`)."""

    key: tuple                                # the cell and the layout it runs in (see `ForwardRecord`)
    requests: Callable[[], list[Request]]     # its weight requests, made from its modules' tensors now
    bn_channels: int                          # training: its grouped BNs' channels of zeroed scratch
    bn_like: nn.BatchNorm2d | None            # ... of this BN's dtype and device (None: no grouped BN)
    bns: Callable[[], list[nn.BatchNorm2d]]   # evaluation: the grouped BNs it reads, in `take` order


class ForwardRecord:
    """A network's fused cells, as its last forward met them (`CellNeeds`, in order), so that the
    next forward gathers every cell's weights at its first cell in ONE gather (`gather_weights`:
    a cat, a cast, an index_select forward and an index_select and a cast backward per forward,
    not per cell) and keeps every cell's BN statistics in ONE buffer (one zero-fill in training,
    one cat of the running statistics and one affine map in evaluation), not one per cell.

    Requests are made again at each forward's first cell from the modules' tensors of the moment,
    so parameters swapped in by `functional_call` (the second-order step) are the ones gathered.
    The replay holds while each cell's key matches its place in the record; the first cell that
    does not (another op set, layout or network) gathers on its own, as do the rest, and the
    record becomes that forward's. The whole network's gather index is kept here, not among the
    cells' constants, which a compiled cell's guards read. A copy of the network (`copy.deepcopy`,
    pickling) starts with an empty record: the cells it holds are the original's."""

    def __init__(self) -> None:
        self.cells: list[CellNeeds] = []
        self.constants: dict[tuple, torch.Tensor] = {}

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


@dataclass
class BatchNormSink:
    """Per-forward scratch. Grouped BNs compute their batch statistics into temporaries here and
    `flush` folds them into the modules' running buffers; small constants are made once here.
    With a `ForwardRecord` (`network`), the cells' weights are gathered once for the forward and
    the BN scratch of every cell is one buffer.

    `F.batch_norm` with momentum 1 on zero buffers leaves exactly the batch mean and the unbiased
    batch variance there, which each module then folds into its own running buffers as nn.BatchNorm
    does: running ← (1 − m)·running + m·batch, num_batches_tracked += 1.
    """

    training: bool = True                     # False: evaluation mode (running statistics)
    network: ForwardRecord | None = None      # the network's record of its cells: one gather per forward
    updates: list[_BNUpdate] = field(default_factory=list)
    _buffer: torch.Tensor | None = None
    _used: int = 0
    _affine: tuple[torch.Tensor, torch.Tensor] | None = None   # eval: (1/σ, −μ/σ) of the buffer
    _affine_cast: tuple[torch.Tensor, torch.Tensor] | None = None   # ... in the activations' dtype
    _eps: list[tuple[float, int]] = field(default_factory=list)  # eval: (eps, channels) per BN
    _cells: list[CellNeeds] = field(default_factory=list)       # this forward's cells so far
    _replayed: list[list[torch.Tensor]] | None = None            # the recorded cells' weights, while they match

    def begin(self, cell: CellNeeds, constant: Callable[[tuple, Callable[[], torch.Tensor]], torch.Tensor],
              autocast: torch.dtype | None) -> list[torch.Tensor]:
        """A cell starts: its requested weights (`gather_weights`), its BN statistics ready to `take`."""
        record = self.network.cells if self.network is not None else []
        i = len(self._cells)
        self._cells.append(cell)
        if i == 0 and len(record) > 1 and record[0].key == cell.key:
            # the recorded network again: every cell's weights in one gather, its BNs in one buffer
            counts, requests = [], []
            for c in record:
                rs = c.requests()
                counts.append(len(rs))
                requests += rs
            device = next((p.device for _, ps in requests for p in ps), torch.device("cpu"))
            gathered = iter(gather_weights(requests, cached_on(self.network.constants, device), autocast))
            self._replayed = [[next(gathered) for _ in range(n)] for n in counts]
            self._begin_buffer(record)
        elif self._replayed is not None and (i >= len(record) or record[i].key != cell.key):
            self._replayed = None            # not the recorded network: this cell and the rest on their own
        if self._replayed is not None:
            return list(self._replayed[i])
        self._begin_buffer([cell])
        return gather_weights(cell.requests(), constant, autocast)

    def _begin_buffer(self, cells: Sequence[CellNeeds]) -> None:
        """One buffer for `cells`' grouped BNs, taken from in order: zeroed scratch (training), or
        their running statistics side by side (evaluation: one cat)."""
        self._used, self._affine, self._affine_cast = 0, None, None
        if self.training:
            channels = sum(c.bn_channels for c in cells)
            like = next((c.bn_like for c in cells if c.bn_like is not None), None)
            self._buffer = like.running_mean.new_zeros((2, channels)) if like is not None and channels else None
            return
        bns = [b for c in cells for b in c.bns()]
        self._buffer = torch.cat([b.running_mean for b in bns] + [b.running_var for b in bns]).view(2, -1) if bns else None
        self._eps = [(b.eps, b.num_features) for b in bns]

    def begin_eval_cell(self, bns: Sequence[nn.BatchNorm2d]) -> None:
        """Evaluation mode: the running statistics of `bns` side by side, taken in this order."""
        self._begin_buffer([CellNeeds((), list, 0, None, lambda: list(bns))])

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next n channels' statistics: zeroed scratch (training) or running mean and var."""
        assert self._buffer is not None and self._used + n <= self._buffer.shape[1]
        u, self._used = self._used, self._used + n
        return self._buffer[0, u:u + n], self._buffer[1, u:u + n]

    def take_affine(self, n: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation mode: the next n channels' normalisation as an affine map, x̂ = x·s + t with
        s = 1/√(var + eps), t = −mean·s. Computed for the whole cell at its first use (a few
        kernels per cell, not per group); in `dtype` (autocast's activations) cast once for the
        whole buffer too, not per group (bf16 DARTS validation: 80 casts per forward of 16)."""
        assert not self.training and self._buffer is not None and self._used + n <= self._buffer.shape[1]
        if self._affine is None:
            mean, var = self._buffer.unbind(0)
            eps = {e for e, _ in self._eps}
            if len(eps) == 1:
                inv = torch.rsqrt(var + eps.pop())
            else:                 # BNs with other eps in one cell: one eps per channel
                inv = torch.rsqrt(var + torch.tensor([e for e, c in self._eps for _ in range(c)],
                                                     dtype=var.dtype, device=var.device))
            self._affine = (inv, torch.mul(mean, inv).neg_())
        affine = self._affine
        if dtype is not None and dtype != affine[0].dtype:
            if self._affine_cast is None or self._affine_cast[0].dtype != dtype:
                self._affine_cast = (affine[0].to(dtype), affine[1].to(dtype))
            affine = self._affine_cast
        u, self._used = self._used, self._used + n
        return affine[0][u:u + n], affine[1][u:u + n]

    def flush(self) -> None:
        by_momentum: dict[float, tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]] = {}
        for up in self.updates:
            n = len(up.bns)
            means = [up.mean] * n if up.shared else up.mean.split(up.bns[0].num_features)
            vars_ = [up.var] * n if up.shared else up.var.split(up.bns[0].num_features)
            for bn, m, v in zip(up.bns, means, vars_):
                running, batch, counters = by_momentum.setdefault(float(bn.momentum), ([], [], []))
                running += [bn.running_mean, bn.running_var]
                batch += [m, v]
                counters.append(bn.num_batches_tracked)
        with torch.no_grad():
            for momentum, (running, batch, counters) in by_momentum.items():
                # through `.data`, as BatchNorm's own kernel writes them: no version bump, so
                # buffers that are views of one tensor (the second-order step's scratch copies)
                # stay valid for the eager BNs that saved them for backward
                torch._foreach_lerp_([t.data for t in running], batch, momentum)
                torch._foreach_add_(counters, 1)
        self.updates.clear()
        record = self.network.cells if self.network is not None else None
        if record is not None and not (self._replayed is not None and len(self._cells) == len(record)):
            self.network.cells = self._cells  # type: ignore[union-attr]
        self._cells, self._replayed = [], None


def forward_sink(network: nn.Module, training: bool, record: bool = True) -> BatchNormSink:
    """A fused network forward's scratch, with the network's `ForwardRecord` (kept on it, made at
    its first forward) unless `record` is off or the forward is being traced by torch.compile
    (a compiled network gathers cell by cell, as traced: a record's identities would be guards)."""
    if not record or torch.compiler.is_compiling():
        return BatchNormSink(training=training)
    if "_fused_record" not in network.__dict__:
        network.__dict__["_fused_record"] = ForwardRecord()
    return BatchNormSink(training=training, network=network.__dict__["_fused_record"])


def _bn_requests(bns: Sequence[nn.BatchNorm2d], kind: str = "affine") -> list[Request]:
    """γ and β of n affine BNs, each (n·C,); nothing for BNs without affine parameters. `kind`
    "affine" (float32 under autocast, as BN keeps them) or "cat" (cast with the conv weights)."""
    return [(kind, [b.weight for b in bns]), (kind, [b.bias for b in bns])] if bns[0].affine else []


def _bn_blocks(y: torch.Tensor, bns: Sequence[nn.BatchNorm2d], sink: BatchNormSink,
               ws: Iterator[torch.Tensor], scale: Scale = None) -> torch.Tensor:
    """Train-mode BN of `y`'s channels, block u normalised as `bns[u]` would (one kernel); γ, β
    from `ws` (`_bn_requests`).

    `scale` (n, channels), contiguous: block u's output is multiplied by scale[u], folded into
    BN's affine transform (w·(γ·x̂ + β) = (w·γ)·x̂ + w·β): the α-weighting then launches no kernel
    over the activations, and BN's backward computes α's gradient along with γ's. A pair: the
    affine (weight, bias) with α folded in already (then γ, β are not in `ws`).
    """
    bns = list(bns)
    mean, var = sink.take(y.shape[1])
    weight = bias = None
    if isinstance(scale, tuple):
        weight, bias = scale
    elif bns[0].affine:
        weight, bias = next(ws), next(ws)
        if scale is not None:
            weight, bias = weight * scale.flatten(), bias * scale.flatten()
    elif scale is not None:
        # contiguous, not an expanded view: with one block, an expand's zero stride survives
        # flatten(), and torch's CPU batch-norm backward then gets the input's gradient wrong at
        # 1×1 spatial size (seen with torch 2.14; the tests' reduction cells run at 1×1)
        weight = scale.flatten()
    out = F.batch_norm(y, mean, var, weight, bias, sink.training, 1.0, bns[0].eps)
    if sink.training:
        sink.updates.append(_BNUpdate(bns, mean, var, shared=False))
    return out


def _bn_shared(y: torch.Tensor, bns: Sequence[nn.BatchNorm2d], sink: BatchNormSink,
               ws: Iterator[torch.Tensor], states: int = 1,
               affine: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Every module in `bns` normalises the same `y`: (B, 1, C, H, W), or (B, n, C, H, W) with γ/β
    (training: the same batch statistics for all) or in evaluation mode (each its own running
    statistics: one affine map per module, applied in one `addcmul`).

    `states` > 1: y holds that many states' channels side by side and `bns` are state-major, the
    first n/states normalising the first state's channels, ...; the result is (B, states, 1 or
    n/states, C, H, W). `affine`: the modules' (γ, β), concatenated, instead of from `ws`."""
    bns = list(bns)
    n, c = len(bns) // states, y.shape[1] // states       # per state
    gamma_beta = iter(affine) if affine is not None else ws
    # (B, [states,] units, C, H, W) shapes of y and of per-unit (C,) vectors
    y_shape = (y.shape[0], states, 1, c, *y.shape[2:]) if states > 1 else (y.shape[0], 1, c, *y.shape[2:])
    unit_shape = (1, states, n, c, 1, 1) if states > 1 else (1, n, c, 1, 1)
    if not sink.training:
        # without γ, β: the map in the activations' dtype, as BN keeps it (autocast), cast once
        scale, shift = sink.take_affine(len(bns) * c, None if bns[0].affine else y.dtype)
        if bns[0].affine:                     # γ·(x·s + t) + β
            gamma = next(gamma_beta)
            scale, shift = scale * gamma, torch.addcmul(next(gamma_beta), shift, gamma)
        if scale.dtype != y.dtype:            # autocast: the activations' dtype, as BN keeps it
            scale, shift = scale.to(y.dtype), shift.to(y.dtype)
        if len(bns) == 1:
            return torch.addcmul(shift.view(-1, 1, 1), y, scale.view(-1, 1, 1)).unsqueeze(1)
        return _unit_affine(y.view(y_shape), scale.view(unit_shape), shift.view(unit_shape))
    if bns[0].affine:
        # each module's γ, β over its own copy of y's channels, in ONE batch norm (their batch
        # statistics are y's, as `_record_shared`'s): a copy forward and a sum backward, where
        # normalising once and an `addcmul` of the units' γ, β cost a product and its backward's
        # products and sums (random features: 10–15% of a DARTS step's kernel-like ops)
        y_units = _repeat_units(y, states, n)
        mean, var = sink.take(y_units.shape[1])
        out = F.batch_norm(y_units, mean, var, next(gamma_beta), next(gamma_beta), True, 1.0, bns[0].eps)
        sink.updates.append(_BNUpdate(bns, mean, var, shared=False))
        return out.view(*y_shape[:-4], n, c, *y.shape[2:])
    mean, var = sink.take(y.shape[1])
    out = F.batch_norm(y, mean, var, None, None, True, 1.0, bns[0].eps).view(y_shape)
    _record_shared(sink, bns, mean, var, states)
    return out


def _repeat_units(y: torch.Tensor, states: int, n: int) -> torch.Tensor:
    """(B, S·C, H, W) -> (B, S·n·C, H, W): each state's C channels n times over, state-major, in
    y's memory format (one copy; its backward one sum over the n copies)."""
    b, sc, h, w = y.shape
    c = sc // states
    if _nhwc(y):
        # (B, H, W, S, n, C) copied, then viewed: the copy is channels_last memory
        t = y.permute(0, 2, 3, 1).reshape(b, h, w, states, 1, c).expand(b, h, w, states, n, c)
        return t.contiguous().view(b, h, w, states * n * c).permute(0, 3, 1, 2)
    return y.reshape(b, states, 1, c, h, w).expand(b, states, n, c, h, w).reshape(b, states * n * c, h, w)


def _unit_affine(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """shift + y·scale, y (B, [S,] 1, C, H, W) and the units' scale, shift (1, [S,] n, C, 1, 1) ->
    (B, [S,] n, C, H, W), in y's memory format. With channels innermost (channels_last), computed
    as (B, H, W, [S,] n, C): a plain `addcmul` lays its output out as the broadcast (n, C) vectors
    are (NCHW), and every op after it (the pass's cat, its backward, the next convs) then ran in
    the other layout (random features' pooling BNs: most of a step's activations)."""
    if not _nhwc(y):
        return torch.addcmul(shift, y, scale)
    order, back = _pixels_first(y.dim(), 1)                      # (B, H, W, [S,] n, C)
    return torch.addcmul(shift.permute(order), y.permute(order), scale.permute(order)).permute(back)


def _record_shared(sink: BatchNormSink, bns: Sequence[nn.BatchNorm2d], mean: torch.Tensor,
                   var: torch.Tensor, states: int) -> None:
    """Batch statistics every module of `bns` shares, `states` states' channels side by side
    (`bns` state-major): each state's modules saw its channels' statistics."""
    bns = list(bns)
    if states == 1:
        sink.updates.append(_BNUpdate(bns, mean, var, shared=True))
        return
    n, c = len(bns) // states, mean.shape[0] // states
    for s in range(states):
        sink.updates.append(_BNUpdate(bns[s * n:(s + 1) * n], mean[s * c:(s + 1) * c],
                                      var[s * c:(s + 1) * c], shared=True))


@dataclass
class Deferred:
    """A group's last BN, not applied yet: `cell_forward` normalises every such group of a pass in
    ONE batch norm over their concatenated inputs (`batch_norm_pass`; `search.merge_batch_norms`)."""

    y: torch.Tensor                           # the BN's input, (B, channels, H', W')
    bns: list[nn.BatchNorm2d]                 # one per unit (per block of channels), state-major
    shared: bool = False                      # every module normalises all of y (a pooling's BN)
    states: int = 1                           # shared: states side by side in y's channels


def batch_norm_pass(parts: Sequence[Deferred], weight: torch.Tensor | None, sink: BatchNormSink,
                    eps: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Train-mode BN of a pass's deferred groups as one: their inputs concatenated (one copy),
    one batch norm, whose per-channel affine scale `weight` holds each SCALED unit's α over its
    channels and 1 over a pooling's (whose α weights it in `mix`); with affine BNs (random
    features) those times each BN's γ, and `bias` its β as scaled. Batch statistics are per
    channel, so each block comes out as its own BN would give it; they go back to each module's
    running buffers through the sink. The (B, Σ channels, H', W') output is in `parts`' order."""
    y = torch.cat([d.y for d in parts], dim=1) if len(parts) > 1 else parts[0].y
    mean, var = sink.take(y.shape[1])
    out = F.batch_norm(y, mean, var, weight, bias, True, 1.0, eps)
    at = 0
    for d in parts:
        c = d.y.shape[1]
        m, v = mean[at:at + c], var[at:at + c]
        at += c
        if d.shared:
            _record_shared(sink, d.bns, m, v, d.states)
        else:
            sink.updates.append(_BNUpdate(list(d.bns), m, v, shared=False))
    return out


# --- op kinds: n units of one op on one state -> (B, n or 1, C, H', W') ------------------------
@dataclass
class _Source:
    """One state's input to its ops, with the ReLU they share computed at most once."""

    x: torch.Tensor
    sink: BatchNormSink
    noise: dict[tuple[int, int], torch.Tensor]
    dense: bool = False                       # separable convs as one dense conv (`fused_dense`)
    states: int = 1                           # states side by side in x's channels (paired inputs: 2)
    # dense, states > 1: makes a strided grouped conv's weight block-diagonal (`block_diagonal`)
    block_diagonal: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    # a kind with a last BN returns its input as `Deferred` instead (`batch_norm_pass`)
    defer: bool = False
    _relu: torch.Tensor | None = None

    def relu(self) -> torch.Tensor:
        if self._relu is None:
            self._relu = F.relu(self.x)
        return self._relu

    def per_state(self, y: torch.Tensor, units: int) -> torch.Tensor:
        """(B, units·C, H, W), state-major with `states` > 1, as (B, units, C, H, W), or as
        (B, states, units / states, C, H, W)."""
        if self.states == 1:
            return y.unflatten(1, (units, -1))
        return y.unflatten(1, (self.states, units // self.states, -1))


# Each kind with weights has a request function (its modules, `Dense` and how many states it reads
# side by side -> the tensors it needs, `Request`s) and takes them, in that order, from `ws`.
Dense = str | None        # separable convs: None (depthwise, then 1×1) or a SEPARABLE layout (one conv)


def _identity(mods: list[nn.Module], src: _Source, units: Units, scale: None, ws: Iterator) -> torch.Tensor:
    return src.per_state(src.x, src.states)


def _pool(mods: list[nn.Module], src: _Source, units: Units, scale: None, ws: Iterator) -> torch.Tensor:
    # parameter-free: one pooling serves every edge (and both paired inputs)
    return src.per_state(mods[0](src.x), src.states)


def _pool_bn_requests(mods: list[nn.Module], dense: Dense, states: int) -> list[Request]:
    # γ, β float32 under autocast, as BN keeps them: in training a batch norm applies them
    # (`_bn_shared`) and in evaluation they fold into each module's affine map, cast once. (Until
    # 2026-12-06 a product with the bf16 activations applied them in training too, so they came
    # cast with the conv weights: float32, they had promoted that output and the pass's
    # concatenation, an activation cast each way per pooling.)
    return _bn_requests([part(m, 1) for m in mods])


def _pool_bn(mods: list[nn.Module], src: _Source, units: Units, scale: tuple | None, ws: Iterator
             ) -> torch.Tensor | Deferred:
    """`scale`: None, or with affine BNs merged with the pass's (`batch_norm_pass`) their
    (γ, β), concatenated, which then are not in `ws`."""
    bns = [part(m, 1) for m in mods]
    if src.defer:
        if bns[0].affine:     # each edge's γ, β over its own copy (as `_bn_shared`), in the pass's BN
            return Deferred(_repeat_units(part(mods[0], 0)(src.x), src.states, len(mods) // src.states), bns)
        return Deferred(part(mods[0], 0)(src.x), bns, shared=True, states=src.states)
    return _bn_shared(part(mods[0], 0)(src.x), bns, src.sink, ws, src.states, scale)


def _dil_requests(blocks: Sequence[nn.Sequential], shared_input: bool, dense: Dense,
                  states: int = 1) -> list[Request]:
    dw, pw = [part(b, 1).weight for b in blocks], [part(b, 2).weight for b in blocks]
    per_state = f"/{states}" if states > 1 else ""
    if dense is not None:
        convs = [(dense, dw + pw)]
    elif shared_input:
        convs = [("interleave" + per_state, dw), ("dense" + per_state, pw)]
    else:
        convs = [("cat", dw), ("cat", pw)]
    return convs + _bn_requests([part(b, 3) for b in blocks])


def _dil_blocks(blocks: Sequence[nn.Sequential], r: torch.Tensor, sink: BatchNormSink,
                shared_input: bool, ws: Iterator[torch.Tensor], scale: Scale = None,
                dense: bool = False, states: int = 1,
                block_diagonal: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
                defer: bool = False) -> torch.Tensor | Deferred:
    """[depthwise conv → 1×1 conv → BN] of n `DilConv`-shaped blocks whose ReLU `r` already is.

    Shared input (every block reads the same C channels): one depthwise conv with channel
    multiplier n, whose output is ordered (channel, unit); the n 1×1 convs then run as ONE dense
    1×1 conv whose columns undo that order. It does n× the block-diagonal multiply-adds, which is
    free where the 1×1 conv is memory-bound (small C on a GPU), and saves a transpose copy of
    the activations. Separate inputs (a SepConv's second block): grouped convs, unit-major.
    `dense`: both convs as one k×k conv (`_compose`), dense over the C input channels (shared
    input) or grouped by unit. `states` > 1: r holds that many states' channels side by side,
    blocks state-major; each state's shared-input convs are one group of the same convs, or, if
    strided and `block_diagonal` is given (dense), one conv whose weight is zero off each state's
    block (`block_diagonal`). `defer`: the BN's input, to be normalised with the pass (`Deferred`).
    """
    # a merged group (`merge_conv_groups`, dense only): the largest kernel's padding
    n, d0 = len(blocks), _largest_kernel(part(b, 1) for b in blocks)
    if dense:
        w, groups = next(ws), states if shared_input else n
        if shared_input and states > 1 and block_diagonal is not None and d0.stride != (1, 1):
            w, groups = block_diagonal(w, states), 1
        y = F.conv2d(r, w, None, d0.stride, d0.padding, d0.dilation, groups)
    else:
        y = F.conv2d(r, next(ws), None, d0.stride, d0.padding, d0.dilation,
                     states * d0.in_channels if shared_input else n * d0.in_channels)
        y = F.conv2d(y, next(ws), None, 1, 0, 1, states if shared_input else n)
    if defer:
        return Deferred(y, [part(b, 3) for b in blocks])
    return _bn_blocks(y, [part(b, 3) for b in blocks], sink, ws, scale)


def block_diagonal(w: torch.Tensor, states: int,
                   constant: Callable[[tuple, Callable[[], torch.Tensor]], torch.Tensor]) -> torch.Tensor:
    """A conv weight (O, C, k, k) over `states` groups (output channels state-major) as the weight
    (O, S·C, k, k) of ONE ungrouped conv, zero off each state's block: the same output for S× the
    multiply-adds. For a paired pass's stride-2 convs (a reduction cell): there cuDNN ran the
    grouped convs' input gradient with a slow legacy kernel (bench/RESULTS.md, 2026-12-04 H200
    profile: 16 calls, 13% of a bf16 step). One broadcast multiply by a 0/1 mask (a device
    constant): its backward gives each parameter its own block's gradient."""
    o = w.shape[0]
    mask = constant(("block-diagonal", o, states, w.dtype),
                    lambda: torch.eye(states, dtype=w.dtype).repeat_interleave(o // states, 0))   # (O, S)
    if _channels_last([w]):                   # (O, k, k, C) in memory: build (O, k, k, S, C)
        wl = w.permute(0, 2, 3, 1)
        return (wl.unsqueeze(3) * mask.view(o, 1, 1, states, 1)).flatten(3).permute(0, 3, 1, 2)
    return (w.unsqueeze(1) * mask.view(o, states, 1, 1, 1)).flatten(1, 2)


def _dil(mods: list[nn.Module], src: _Source, units: Units, scale: Scale, ws: Iterator
         ) -> torch.Tensor | Deferred:
    y = _dil_blocks(mods, src.relu(), src.sink, True, ws, scale, src.dense, src.states, src.block_diagonal,
                    src.defer)
    return y if isinstance(y, Deferred) else src.per_state(y, len(mods))


def _sep_requests(mods: list[nn.Module], dense: Dense, states: int) -> list[Request]:
    return _dil_requests([part(m, 0) for m in mods], True, dense, states) + \
        _dil_requests([part(m, 1) for m in mods], False, dense)


def _sep(mods: list[nn.Module], src: _Source, units: Units, scale: Scale, ws: Iterator
         ) -> torch.Tensor | Deferred:
    y = _dil_blocks([part(m, 0) for m in mods], src.relu(), src.sink, True, ws, dense=src.dense, states=src.states,
                    block_diagonal=src.block_diagonal)
    y = _dil_blocks([part(m, 1) for m in mods], F.relu(y), src.sink, False, ws, scale, src.dense, defer=src.defer)
    return y if isinstance(y, Deferred) else src.per_state(y, len(mods))


def _relu_conv_bn_requests(mods: list[nn.Module], dense: Dense, states: int) -> list[Request]:
    convs = [part(m, 1) for m in mods]
    bias = [("cat", [c.bias for c in convs])] if convs[0].bias is not None else []
    # kernels of several sizes: a merged group (`merge_conv_groups`)
    layout = "cat" if len({c.kernel_size for c in convs}) == 1 else "centred"
    return [(layout, [c.weight for c in convs])] + bias + _bn_requests([part(m, 2) for m in mods])


def _relu_conv_bn(mods: list[nn.Module], src: _Source, units: Units, scale: Scale, ws: Iterator
                  ) -> torch.Tensor | Deferred:
    c0 = _largest_kernel(part(m, 1) for m in mods)    # a merged group: the largest kernel
    weight = next(ws)
    bias = next(ws) if c0.bias is not None else None
    if bias is not None and torch.compiler.is_compiling():
        # the bias is a slice of the gathered weights, which torch 2.11's inductor cannot lower
        # as a conv's bias ("NotImplementedError: SliceView"; a clone is optimised away):
        # compiled, it is added after the conv, in the kernel that reads the conv's output
        y = F.conv2d(src.relu(), weight, None, c0.stride, c0.padding, c0.dilation, src.states)
        y = y + bias.view(1, -1, 1, 1)
    else:
        y = F.conv2d(src.relu(), weight, bias, c0.stride, c0.padding, c0.dilation, src.states)
    if src.defer:
        return Deferred(y, [part(m, 2) for m in mods])
    return src.per_state(_bn_blocks(y, [part(m, 2) for m in mods], src.sink, ws, scale), len(mods))


def _factorized_reduce_requests(mods: list[nn.Module], dense: Dense, states: int) -> list[Request]:
    return [("factorized", [w for m in mods for w in (m.conv_1.weight, m.conv_2.weight)])] + \
        _bn_requests([m.bn for m in mods])


def _factorized_reduce(mods: list[nn.Module], src: _Source, units: Units, scale: Scale,
                       ws: Iterator) -> torch.Tensor | Deferred:
    """cat(conv_1(r), conv_2(r[:, :, 1:, 1:])) as ONE 2×2 stride-2 conv whose taps (0, 0) and (1, 1)
    are the two 1×1 convs: the output comes out concatenated (no cat copy), and the offset branch
    needs no slice, whose backward would zero-fill a full-size gradient. Four times the
    multiply-adds of two 1×1 convs at half resolution: the cheapest convs of a cell."""
    r = src.relu()
    if r.shape[2] % 2 or r.shape[3] % 2:
        raise ValueError(f"FactorizedReduce needs an even height and width, got {tuple(r.shape[2:])}")
    y = F.conv2d(r, next(ws), None, 2, groups=src.states)
    if src.defer:
        return Deferred(y, [m.bn for m in mods])
    return src.per_state(_bn_blocks(y, [m.bn for m in mods], src.sink, ws, scale), len(mods))


def _noise(mods: list[nn.Module], src: _Source, units: Units, scale: None, ws: Iterator) -> torch.Tensor:
    return torch.stack([src.noise[u] for u in units], dim=1)


def _eager(mods: list[nn.Module], src: _Source, units: Units, scale: None, ws: Iterator) -> torch.Tensor:
    return torch.stack([m(src.x) for m in mods], dim=1)




# kind(modules, source, units, scale, weights) -> (B, n or 1, C, H', W'); the kinds in SCALED
# multiply unit u's output by its α weight themselves (`Scale`: folded into their last BN), the
# others get scale None
KindFn = Callable[[list[nn.Module], _Source, Units, Scale, Iterator[torch.Tensor]], "torch.Tensor | Deferred"]
KINDS: dict[str, KindFn | None] = {
    "zero": None,                 # contributes exactly nothing: not computed
    "noise": _noise, "identity": _identity, "pool": _pool, "pool_bn": _pool_bn, "dil": _dil,
    "sep": _sep, "relu_conv_bn": _relu_conv_bn, "factorized_reduce": _factorized_reduce,
    "eager": _eager,
}
# the weight tensors a kind takes from `ws` (given its modules, `Dense` and how many states it reads
# side by side), gathered for the whole cell before it runs
REQUESTS: dict[str, Callable[[list[nn.Module], Dense, int], list[Request]]] = {
    "pool_bn": _pool_bn_requests, "dil": lambda mods, dense, states: _dil_requests(mods, True, dense, states),
    "sep": _sep_requests,
    "relu_conv_bn": _relu_conv_bn_requests, "factorized_reduce": _factorized_reduce_requests,
}
# batch-norm channels (in op channels) a group of n units normalises through the sink
BN_CHANNELS: dict[str, Callable[[int], int]] = {
    "zero": lambda n: 0, "noise": lambda n: 0, "identity": lambda n: 0, "pool": lambda n: 0,
    "pool_bn": lambda n: 1, "dil": lambda n: n, "sep": lambda n: 2 * n, "relu_conv_bn": lambda n: n,
    "factorized_reduce": lambda n: n, "eager": lambda n: 0,
}
# the BNs of a group's modules, per BN block in the order the kind takes its statistics from the
# sink (evaluation mode gathers their running statistics in that order)
BN_CALLS: dict[str, Callable[[list[nn.Module]], list[list[nn.BatchNorm2d]]]] = {
    "pool_bn": lambda mods: [[part(m, 1) for m in mods]], "dil": lambda mods: [[part(m, 3) for m in mods]],
    "sep": lambda mods: [[part(part(m, 0), 3) for m in mods], [part(part(m, 1), 3) for m in mods]],
    "relu_conv_bn": lambda mods: [[part(m, 2) for m in mods]], "factorized_reduce": lambda mods: [[m.bn for m in mods]],
}


def _grouped_bns(groups: Iterable[tuple[str, list[nn.Module]]]) -> list[nn.BatchNorm2d]:
    """The grouped BNs of `groups` (kind, modules), in the order their blocks take statistics."""
    return [bn for kind, mods in groups if kind in BN_CALLS for block in BN_CALLS[kind](mods) for bn in block]


SCALED = frozenset({"dil", "sep", "relu_conv_bn", "factorized_reduce"})
# a SCALED kind's last BN (the one α is folded into), from one of its modules
LAST_BN: dict[str, Callable[[nn.Module], nn.BatchNorm2d]] = {
    "dil": lambda m: part(m, 3), "sep": lambda m: part(part(m, 1), 3), "relu_conv_bn": lambda m: part(m, 2),
    "factorized_reduce": lambda m: m.bn,
}
# the kinds whose last BN a pass can apply for them all at once (`Deferred`, `batch_norm_pass`)
DEFERRABLE = SCALED | {"pool_bn"}


def _pass_batch_norm_eps(kinds_p: Sequence[Sequence[str]], modules: Sequence[Sequence[list[nn.Module]]]
                         ) -> float | None:
    """The eps of every last BN a cell's passes could merge (`batch_norm_pass`), if they can all
    be: all without affine parameters (α is their affine scale; a pooling's BN has none in
    training) or all with (random features: the scale is α·γ, the shift α·β, a pooling's BNs
    normalising a copy of its output each), and one eps for all. None where some cannot, or
    where no pass has three to merge.
    Merging k BNs saves k - 1 BNs forward and backward for one cat and, beside the identity, a
    second product forward and backward: a loss in kernels and bytes for k = 2 (counted on NB201
    through `fused`: +2% kernel-like ops, +6% bytes moved), a gain from k = 3 (a DARTS pass: 4-5)."""
    if not any(sum(kind in DEFERRABLE for kind in kinds) >= 3 for kinds in kinds_p):
        return None
    bns = [part(m, 1) if kind == "pool_bn" else LAST_BN[kind](m)
           for kinds, mods_s in zip(kinds_p, modules) for kind, mods in zip(kinds, mods_s)
           if kind in DEFERRABLE for m in mods]
    eps, affine = {bn.eps for bn in bns}, {bn.affine for bn in bns}
    return eps.pop() if len(eps) == 1 and len(affine) == 1 else None


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs convs and matrix products in on `device_type` now, or None."""
    # cpu and cuda have autocast; asking torch would stop torch 2.11's dynamo (it cannot trace
    # `torch._C._is_autocast_available`), and the fused cells are compiled on those two
    available = device_type in ("cpu", "cuda") or torch.amp.is_autocast_available(device_type)
    if available and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


# --- per-forward α weights ---------------------------------------------------------------------
@dataclass
class FusedArch:
    """What the cells of one type need for one fused forward (prepared once, shared by them)."""

    plan: ArchPlan
    weights: torch.Tensor                     # (edges × active columns,) α weights, β folded in (+ β: `bypass`)
    bypass_weights: list[torch.Tensor | None]  # per source: (1, targets, 1, 1, 1) β weights (PC)
    sink: BatchNormSink
    constant: Callable[[tuple, Callable[[], torch.Tensor]], torch.Tensor]
    autocast: torch.dtype | None              # the ops' output dtype under autocast
    dense: bool = False                       # separable convs as one dense conv (`fused_dense`)
    merged_plans: dict = field(default_factory=dict)   # the supernet's `merge_conv_groups` results
    merge: bool = True                        # dense: convs of several kernel sizes as one (`merge_conv_groups`)
    block_diagonal: bool = True               # dense: paired strided convs block-diagonal (`block_diagonal`)
    mix: bool = True                          # a pass's weighted sums as one matrix product (`mix`)
    merge_bn: bool = True                     # mix: a pass's last BNs as one (`batch_norm_pass`)
    # mix with partial channels (PC-DARTS): (K, where β starts in `weights`, None for no β); the
    # bypassed channels then go into each pass's matrix product as K-1 more columns per state
    bypass: tuple[int, int | None] | None = None
    _groups: dict[tuple, list[list[torch.Tensor | None]]] = field(default_factory=dict)
    _scaled: dict[tuple, torch.Tensor | None] = field(default_factory=dict)
    _mix: dict[tuple, list[tuple[torch.Tensor, int] | None]] = field(default_factory=dict)
    _bn: dict[tuple, list[torch.Tensor | None]] = field(default_factory=dict)
    _drops: dict[tuple, tuple[tuple, list[list[int] | None]]] = field(default_factory=dict)
    # search-time drop-path (training, p > 0 or on the device): each cell's (B, len(weights) + 1)
    # per-sample factors, in the order the network calls its cells (`Supernet._forward_fused`)
    drop_masks: Iterator[torch.Tensor] | None = None
    # `search.compile_scope: cells` (`Supernet.compile`): this forward runs each cell through
    # this compiled function of (cell, cell plan, arch, inputs); None: eagerly
    compiled_cell: Callable | None = None

    def for_one_cell(self) -> "FusedArch":
        """A copy for one compiled cell: its own empty sink and memos. Shared, they would differ
        from cell to cell (the first cell of a channel count fills the memos, each cell adds to
        the sink's updates), and a compiled cell, guarded on what it reads, would be traced again
        for every cell. Each cell then gathers its own α weights (a few small ops) and the
        caller hands its sink's updates back to the forward's sink, to be flushed with them."""
        return replace(self, sink=BatchNormSink(training=self.sink.training), _groups={}, _scaled={}, _mix={},
                       _bn={}, _drops={}, drop_masks=None)

    def group_weights(self, cell: CellPlan, channels: int,
                      unit_columns: tuple[tuple[bool, ...], ...] | None = None,
                      defer: bool = False) -> list[list[torch.Tensor | None]]:
        """Per pass (`CellPlan.passes`), per group of `cell`, the units' α weights as the group's
        kind takes them: SCALED kinds (n, channels), each unit's weight repeated over its channels
        as the affine scale of their last BN, in α's dtype; the others (1, n, 1, 1, 1), or (1, S,
        n/S, 1, 1, 1) for S states side by side, in the autocast dtype; `none` None. A pass over
        paired inputs has the units of both, state-major. All in one gather per kinds and channel
        count: only the weights some op uses are gathered, so the backward materialises no zero
        gradient for the rest.

        `unit_columns` (the `mix` path): per pass, per group, whether the group's output has one
        unit per α (else one output serves all its units: identity, pooling). Then the groups
        that are not SCALED get None here, and their α go into each pass's mixing matrix instead
        (`mix_matrices`), gathered by the same index_select.

        `defer` (with `unit_columns`): the DEFERRABLE groups' last BNs run as one per pass
        (`batch_norm_pass`); its affine scale, per pass, comes from the same gather
        (`pass_bn_weights`: 1 over a pooling's channels, then the SCALED units' α over theirs),
        and each SCALED group gets its (n, channels) slice of that scale (what evaluation mode,
        one BN per op kind, applies group by group)."""
        ap = cell.arch or self.plan           # the cell's groups (merged ones: `merge_conv_groups`)
        key = (id(ap), cell.kinds, cell.paired, channels, unit_columns, defer)
        if key in self._groups:
            return self._groups[key]
        passes, layout, mixes, defer, bn_scale, gather_key, gather_index = self._gather_spec(
            cell, channels, unit_columns, defer)
        source = self.weights
        if mixes is not None:        # the mixing matrices' constant entries: 0 and 1 after the α
            dtype = self.weights.dtype
            source = torch.cat([source, self.constant(("zero-one", dtype), lambda: torch.tensor([0.0, 1.0], dtype=dtype))])
        # the index is a device constant: made once, not per forward
        gathered = source.index_select(0, self.constant(gather_key, gather_index))
        n_plain = (sum(len(i) for k, i, _ in layout if k == "plain") if mixes is None
                   else sum(m.size + m.rows * m.n_alpha for m in mixes if m is not None))
        n_scaled = (sum(bn_scale) if defer
                    else sum(len(i) for k, i, _ in layout if k == "scaled") * channels)
        plain_w, scaled_w = gathered.split([n_plain, n_scaled]) if n_plain and n_scaled else (
            (gathered, None) if n_plain else (None, gathered))
        if plain_w is not None and self.autocast is not None:
            # the ops' outputs are in the autocast dtype; float32 weights would promote every sum
            plain_w = plain_w.to(self.autocast)
        if defer:
            per_pass = iter(scaled_w.split(bn_scale) if scaled_w is not None else ())
            self._bn[key] = [next(per_pass) if n else None for n in bn_scale]
            slices: list[torch.Tensor] = []
            for p, scale, pass_entries in zip(passes, self._bn[key], _per_pass(layout, passes, cell)):
                kinds = cell.kinds[p[0]]
                if scale is None:
                    continue
                pools = [_pool_bn_blocks(cell, states, len(i)) * channels
                         for kind, (_, i, states) in zip(kinds, pass_entries) if kind == "pool_bn"]
                units = [len(i) * channels for k, i, _ in pass_entries if k == "scaled"]
                slices += scale.split(pools + units)[len(pools):]
            scaled_parts: Iterator[torch.Tensor] = iter(slices)
        else:
            scaled_parts = iter(scaled_w.split([len(i) * channels for k, i, _ in layout if k == "scaled"])
                                if scaled_w is not None else ())
        if mixes is not None:
            sizes = [m.size for m in mixes if m is not None]
            alpha_sizes = [m.rows * m.n_alpha for m in mixes if m is not None]
            if plain_w is not None:
                whole, alpha = plain_w.split([sum(sizes), sum(alpha_sizes)])
                # the whole matrices detached: their α entries get their gradient as `alpha`
                matrices, alphas = iter(whole.detach().split(sizes)), iter(alpha.split(alpha_sizes))
            self._mix[key] = [None if m is None else (next(matrices).view(m.rows, -1), m.n_alpha,
                                                      next(alphas).view(m.rows, m.n_alpha), m.fold) for m in mixes]
            self._drops[key] = (gather_key, [None if m is None else m.drops for m in mixes])
            plain_parts: Iterator[torch.Tensor] = iter(())
        else:
            # one split per part, not a slice per group: its backward is one cat
            plain_parts = iter(plain_w.split([len(i) for k, i, _ in layout if k == "plain"])
                               if plain_w is not None else ())
        groups: list[list[torch.Tensor | None]] = []
        it = iter(layout)
        for p in passes:
            row: list[torch.Tensor | None] = []
            for _ in ap.sources[p[0]].groups:
                k, _i, states = next(it)
                row.append(None if k == "none" or (k == "plain" and mixes is not None)
                           else next(scaled_parts).view(-1, channels) if k == "scaled"
                           else next(plain_parts).view(1, -1, 1, 1, 1) if states == 1
                           else next(plain_parts).view(1, states, -1, 1, 1, 1))
            groups.append(row)
        self._groups[key] = groups
        self._scaled[key] = scaled_w
        return groups

    def _gather_spec(self, cell: CellPlan, channels: int, unit_columns: tuple[tuple[bool, ...], ...] | None,
                     defer: bool) -> tuple:
        """What `group_weights` gathers for these arguments: the passes, the groups' layout, the
        mixing matrices' positions, the pass BN scales' lengths, whether BNs are merged after all, and
        the gather index's cache key and maker."""
        ap = cell.arch or self.plan
        units = iter(ap.op_index)
        op_index = [[[next(units) for _ in g.units] for g in sp.groups] for sp in ap.sources]
        passes = cell.passes(ap)
        # (type, the units' flat α indices, states side by side) per group, pass by pass
        layout = [("none" if KINDS[kind] is None else "scaled" if kind in SCALED else "plain",
                   [i for s in p for i in op_index[s][gi]], len(p))
                  for p in passes for gi, kind in enumerate(cell.kinds[p[0]])]
        mixes = None if unit_columns is None else _mix_layouts(ap, cell, passes, op_index, unit_columns,
                                                                len(self.weights), defer, self.bypass)
        defer = defer and mixes is not None
        # defer: per pass, the BN scale's positions (1 = after the α and the 0): a pooling's
        # channels (per state, or per unit with affine BNs: `_pool_bn`), then the SCALED units'.
        # Their lengths now, the positions only where the index is made: lists of an entry per
        # channel, which a compiled cell's trace stepped through element by element (a sixth of
        # the bytecodes of a spec-size DARTS trace)
        pass_entries = list(zip(passes, _per_pass(layout, passes, cell))) if defer else []

        def pools(p: tuple[int, ...], entries: list) -> int:
            return sum(_pool_bn_blocks(cell, len(p), len(index))
                       for (_, index, _), kind in zip(entries, cell.kinds[p[0]]) if kind == "pool_bn")

        def scaled(p: tuple[int, ...]) -> list[int]:
            return [i for gi, kind in enumerate(cell.kinds[p[0]]) if kind in SCALED for s in p for i in op_index[s][gi]]
        bn_scale = [channels * (pools(p, entries) + len(scaled(p))) for p, entries in pass_entries]

        def gather_index() -> torch.Tensor:
            parts: dict[str, list[int]] = {"none": [], "plain": [], "scaled": []}
            for k, index, _ in layout:
                parts[k] += index
            # `mix`: every pass's whole matrix (a constant to autograd), then its α columns again
            # (the entries α's gradient goes to: `Mix` writes theirs only, no zero-padded rest)
            plain = parts["plain"] if mixes is None else (
                [i for m in mixes if m is not None for i in m.positions()]
                + [i for m in mixes if m is not None
                   for i in _alpha_entries(m.positions(), m.rows, m.n_alpha, m.fold)])
            if defer:
                return torch.tensor(plain + [i for p, entries in pass_entries
                                             for i in [len(self.weights) + 1] * channels * pools(p, entries)
                                             + [i for i in scaled(p) for _ in range(channels)]])
            return torch.tensor(plain + [i for i in parts["scaled"] for _ in range(channels)])
        key = ("gather", ap, cell.kinds, cell.paired, channels, unit_columns, defer,
               self.bypass if mixes is not None else None)
        return passes, layout, mixes, defer, bn_scale, key, gather_index

    def prefill(self, cell: CellPlan, channels: int, unit_columns: tuple[tuple[bool, ...], ...], defer: bool) -> None:
        """Make the gather index another mode's forward of `cell` will need (evaluation's columns
        in a training forward), without gathering: every cache entry then exists after a
        network's first training call, so a compiled forward (`Supernet.compile`), whose guards
        check the cache, is not traced again after the first validation."""
        *_, key, make = self._gather_spec(cell, channels, unit_columns, defer)
        self.constant(key, make)

    def scaled_weights(self, cell: CellPlan, channels: int,
                       unit_columns: tuple[tuple[bool, ...], ...] | None = None) -> torch.Tensor | None:
        """Every SCALED group's weights of `group_weights`, concatenated (one tensor)."""
        self.group_weights(cell, channels, unit_columns)
        return self._scaled[(id(cell.arch or self.plan), cell.kinds, cell.paired, channels, unit_columns, False)]

    def mix_matrices(self, cell: CellPlan, channels: int, unit_columns: tuple[tuple[bool, ...], ...],
                     defer: bool = False) -> list[tuple[torch.Tensor, int, torch.Tensor, int] | None]:
        """Per pass: its mixing matrix (targets, columns), detached, how many of its columns hold
        α, those columns (targets, that many), which α's gradient reaches (`mix`), and its fold
        (`_mix_layouts`: where they are); None where no op leaves the pass's states."""
        self.group_weights(cell, channels, unit_columns, defer)
        return self._mix[(id(cell.arch or self.plan), cell.kinds, cell.paired, channels, unit_columns, defer)]

    def drop_factors(self, cell: CellPlan, channels: int, unit_columns: tuple[tuple[bool, ...], ...],
                     defer: bool, mask: torch.Tensor) -> list[torch.Tensor | None]:
        """Per pass: the per-sample drop-path factors of its mixing matrix's entries, (B, targets,
        columns), gathered from the cell's `mask` (B, len(weights) + 1: a factor per α index, and
        1 last) at the matrix's drop-path positions (`_mix_layouts`); None where no op leaves
        the pass's states. One index_select per pass, its index a device constant."""
        self.group_weights(cell, channels, unit_columns, defer)
        key = (id(cell.arch or self.plan), cell.kinds, cell.paired, channels, unit_columns, defer)
        gather_key, entries = self._drops[key]
        out: list[torch.Tensor | None] = []
        for i, (positions, mixing) in enumerate(zip(entries, self._mix[key])):
            if positions is None:
                out.append(None)
                continue
            index = self.constant(("drop-path", *gather_key[1:], i), lambda e=positions: torch.tensor(e()))
            out.append(mask.index_select(1, index).view(mask.shape[0], *mixing[0].shape))
        return out

    def pass_bn_scale(self, cell: CellPlan, channels: int, unit_columns: tuple[tuple[bool, ...], ...]
                      ) -> torch.Tensor:
        """Every pass's `pass_bn_weights`, concatenated (one tensor)."""
        self.group_weights(cell, channels, unit_columns, True)
        return self._scaled[(id(cell.arch or self.plan), cell.kinds, cell.paired, channels, unit_columns, True)]

    def pass_bn_weights(self, cell: CellPlan, channels: int, unit_columns: tuple[tuple[bool, ...], ...]
                        ) -> list[torch.Tensor | None]:
        """Per pass: the affine scale of its one BN (`batch_norm_pass`), None where it has none."""
        self.group_weights(cell, channels, unit_columns, True)
        return self._bn[(id(cell.arch or self.plan), cell.kinds, cell.paired, channels, unit_columns, True)]


def _pool_bn_blocks(cell: CellPlan, states: int, units: int) -> int:
    """How many blocks of C channels a pooling group's deferred BN normalises (`_pool_bn`): one
    per state, shared by its units, or with affine BNs (random features: `scaled_affine`, which
    every BN of a cell then is) one per unit, each over its own copy."""
    return units if cell.scaled_affine else states


def _per_pass(layout: list, passes: Sequence[tuple[int, ...]], cell: CellPlan) -> list[list]:
    """`FusedArch._gather_spec`'s group layout, pass by pass."""
    entries = iter(layout)
    return [[next(entries) for _ in cell.kinds[p[0]]] for p in passes]


class MixLayout(NamedTuple):
    """One pass's mixing matrix (`_mix_layouts`): its shape and fold now; its positions and
    drop-path positions made on demand, when their index tensors are made. Those lists hold an
    entry per matrix element, which a compiled cell's trace would otherwise step through element
    by element in every trace (with the BN scales' positions, a fifth of a spec-size DARTS
    trace's bytecodes, 2026-12-07)."""

    rows: int                                 # targets (× K with partial channels)
    n_alpha: int                              # columns that hold α (`_alpha_columns`)
    fold: int
    size: int                                 # rows × columns
    positions: Callable[[], list[int]]        # row-major, into (α weights, 0, 1)
    drops: Callable[[], list[int]]            # row-major, into (α indices, the factor-1 position)


def _mix_layouts(ap: ArchPlan, cell: CellPlan, passes: Sequence[tuple[int, ...]],
                 op_index: list[list[list[int]]], unit_columns: tuple[tuple[bool, ...], ...],
                 n_weights: int, defer: bool = False, bypass: tuple[int, int | None] | None = None
                 ) -> list[MixLayout | None]:
    """Per pass, its mixing matrix as positions into (α weights, 0, 1), row-major, with its
    number of rows (targets) and of α columns, the matrix's drop-path positions and its `fold`
    (below): a `MixLayout`; None for a pass without outputs.

    `fold` > 0: the pass reads a node that the previous pass's product completed, whose sums
    (`prev`: that node's row, then a row per target of this pass) are this product's first
    block of columns, in place of the identity's output and of the carried partial sums: the
    identity's α in the first column, then `fold` (= targets) columns of ones, row t into target
    t. Same sums; the node's gradient then comes out of this product's, not as a term of its own
    added to its ops' (`NodeRows`). The α columns (the identity's, then the other weighted ones)
    are then not the matrix's first columns: `_alpha_entries` takes them where they are. Only
    for a pass over one node with an identity, without partial channels.

    Drop-path positions (search-time drop-path, `cell_forward`'s `drop_mask`): per entry, the α
    index of the (edge, op) whose output it weighs, whose per-sample factor it then takes, or
    `n_weights` (a factor of 1) for an identity's, a bypassed channel's or a zero entry: eager
    `MixedOp` drops every op's output but the identity's. A SCALED unit's entry is 1 in the
    matrix (its α is in its BN), its drop position still its α index.

    Columns follow the order `cell_forward` concatenates the outputs in: the groups that are not
    SCALED (their units weighted here by α), then the SCALED ones (α already in their last BN:
    weight 1 into their unit's target); within a group, state by state, unit by unit. A column
    that serves all the units of a group (an identity or pooling output) has each unit's α in
    that unit's target row; a merged group (`repeats`) has blocks of units, one per target each.
    The paired inputs' columns go to the same rows: the product sums the two states too.
    `defer` (`batch_norm_pass`): the poolings' BN outputs come out of the pass's one BN, before
    the SCALED groups': their columns after the other weighted ones.

    `bypass` (partial channels, `FusedArch.bypass`: K and where β starts in the weights, or None
    for no β): each target gets K rows, its ops' sums (the C/K channels the ops see) and then the
    K-1 chunks of C/K bypassed channels, in the order a node concatenates them; each state's
    bypassed channels are K-1 more columns, after the other weighted ones, chunk c into row c of
    every target, times that edge's β. A node's K rows are then its channels before the shuffle.
    A pass over one state puts them right after its identity's column, if it has one."""
    zero, one = n_weights, n_weights + 1
    keep = n_weights                          # drop-path: the factor-1 position
    k, beta_at = bypass if bypass is not None else (1, None)
    out: list[MixLayout | None] = []
    prev_rows = None                          # the previous pass's product's rows, if it made one
    for p, per_unit in zip(passes, unit_columns):
        targets = len(ap.sources[p[-1]].edges)
        fold = (k == 1 and len(p) == 1 and ap.sources[p[0]].state >= ap.num_inputs
                and "identity" in cell.kinds[p[0]] and prev_rows == targets + 1)
        # columns: one target row -> (matrix position, drop-path position) each
        plain, pooled, scaled = [], [], []
        identity_end = None
        for gi, kind in enumerate(cell.kinds[p[0]]):
            if KINDS[kind] is None:
                continue
            if fold and kind == "identity":   # the first column of `prev`'s block, below
                g = ap.sources[p[0]].groups[gi]
                rows = g.positions or [j % targets for j in range(len(g.units))]
                identity = {r: (a, keep) for r, a in zip(rows, op_index[p[0]][gi])}
                continue
            for s in p:
                g, alphas = ap.sources[s].groups[gi], op_index[s][gi]
                rows = g.positions or [j % targets for j in range(len(g.units))]
                weighted = pooled if defer and kind == "pool_bn" else plain
                dropped = [keep if kind == "identity" else a for a in alphas]
                if kind in SCALED:
                    scaled += [{r: (one, d)} for r, d in zip(rows, dropped)]
                elif per_unit[gi]:
                    weighted += [{r: (a, d)} for r, a, d in zip(rows, alphas, dropped)]
                else:
                    weighted.append(dict(zip(rows, zip(alphas, dropped))))
            if kind == "identity" and _reads_state_whole(cell.kinds[p[0]], p):
                identity_end = len(plain)
        bypassed = []                         # keyed by (target, row within the target)
        if k > 1:
            for s in p:
                beta = [one if beta_at is None else beta_at + e for e in ap.sources[s].edges]
                bypassed += [{(t, c): (beta[t], keep) for t in range(targets)} for c in range(1, k)]
        # one state's bypassed columns right after its identity's: the two are the state itself
        # (its first C/K channels, then the rest), one column block the product reads uncopied
        at = identity_end if identity_end is not None else len(plain)
        weighted = plain[:at] + bypassed + plain[at:] + pooled
        columns = weighted + scaled
        if fold:
            columns = [identity] + [{t: (one, keep)} for t in range(targets)] + columns
        prev_rows = targets * k if columns else None
        if not columns:
            out.append(None)
            continue

        def entries(at: int, columns: list[dict] = columns, targets: int = targets) -> list[int]:
            return [col.get(t if c == 0 else (t, c), (zero, keep))[at] for t in range(targets) for c in range(k)
                    for col in columns]
        out.append(MixLayout(targets * k, len(weighted) + fold, targets if fold else 0, targets * k * len(columns),
                             functools.partial(entries, 0), functools.partial(entries, 1)))
    return out


def _reads_state_whole(kinds: Sequence[str], p: Sequence[int]) -> bool:
    """Whether a pass with partial channels puts its state into the product whole (`StateParts`):
    one state, with an identity, whose C/K channels and the bypassed rest are then one block of
    columns. `_mix_layouts` orders the columns so and `cell_forward` passes the state so: one rule."""
    return len(p) == 1 and "identity" in kinds


def _alpha_columns(n_alpha: int, fold: int) -> list[int]:
    """Where a `_mix_layouts` matrix's n_alpha α columns are: its first ones, or with `fold` the
    first and those after the fold's columns of ones."""
    return [0, *range(1 + fold, fold + n_alpha)] if fold else list(range(n_alpha))


def _alpha_part(t: torch.Tensor, n_alpha: int, fold: int) -> torch.Tensor:
    """The α columns (`_alpha_columns`) of a matrix-shaped tensor (..., columns): a view, or
    with a fold the two runs of them concatenated."""
    if not fold:
        return t[..., :n_alpha]
    return torch.cat([t[..., :1], t[..., 1 + fold:fold + n_alpha]], dim=-1)


def _alpha_entries(entries: list[int], rows: int, n_alpha: int, fold: int = 0) -> list[int]:
    """A `_mix_layouts` matrix's α columns (`_alpha_columns`), row-major."""
    width = len(entries) // rows
    return [entries[r * width + j] for r in range(rows) for j in _alpha_columns(n_alpha, fold)]


def prepare_arch(plan: ArchPlan, op_weights: torch.Tensor,
                 edge_weights: torch.Tensor | None, partial: int,
                 constant: Callable[[tuple, Callable[[], torch.Tensor]], torch.Tensor],
                 sink: BatchNormSink, dense: bool = False, merged_plans: dict | None = None,
                 merge: bool = True, block_diagonal: bool = True, mix: bool = True,
                 merge_bn: bool = True) -> FusedArch:
    """α weights with β folded in; the β weights of PC-DARTS' bypassed channels (`partial`: K > 1):
    with `mix`, after the α·β in the weights the mixing matrices gather from (`FusedArch.bypass`),
    else per source, for `WeightedAdd`.

    `constant(key, make)` returns `make()` on the weights' device, made once per key and cached by
    the caller (an index tensor made per step would be a host→device copy per step).
    """
    def index(values: tuple[int, ...]) -> torch.Tensor:
        return constant(("index", values), lambda: torch.tensor(values))

    w = op_weights if edge_weights is None else op_weights * edge_weights[:, None]
    weights = w.reshape(-1)
    autocast = autocast_dtype(w.device.type)
    bypass_weights: list[torch.Tensor | None] = [None] * len(plan.sources)
    mixed_bypass = None
    if partial > 1 and mix:
        mixed_bypass = (partial, weights.numel() if edge_weights is not None else None)
        if edge_weights is not None:
            weights = torch.cat([weights, edge_weights])
    elif partial > 1 and edge_weights is not None:
        bypass = edge_weights.index_select(0, index(plan.edge_index))
        if autocast is not None:
            bypass = bypass.to(autocast)
        edge_parts = iter(bypass.split([len(sp.edges) for sp in plan.sources]))
        bypass_weights = [next(edge_parts).view(1, -1, 1, 1, 1) for _ in plan.sources]
    return FusedArch(plan, weights, bypass_weights, sink, constant, autocast, dense,
                     {} if merged_plans is None else merged_plans, merge, block_diagonal, mix, merge_bn,
                     mixed_bypass)


# --- the cell ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CellShape:
    """What the fused forward needs to know about a `SearchCell` besides its modules."""

    strides: tuple[int, ...]                  # stride of the edges leaving each state
    op_channels: int                          # C, or C/K with partial channels
    partial: int                              # K (1: every channel goes through the ops)
    shuffle: bool
    output: str                               # "concat" | "last"


def _dense_layout(dense: bool, x: torch.Tensor) -> Dense:
    """The separable convs' weight layout for activations like `x` (channels_last or not)."""
    if not dense:
        return None
    nhwc = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return "separable_nhwc" if nhwc else "separable"


def _flat(t: torch.Tensor) -> torch.Tensor | None:
    """(B, [S,] n, C, H, W) as a (B, [S,] n, C·H·W) view, or None where C, H, W are not laid out as
    one contiguous block (channels_last)."""
    c, h, w = t.shape[-3:]
    if t.stride()[-3:] == (h * w, w, 1) or c * h * w == 1:
        return t.view(*t.shape[:-3], c * h * w)
    return None


class WeightedAdd(torch.autograd.Function):
    """acc + w·out, as `torch.addcmul` computes it, with a leaner backward.

    `out` (B, 1 or n, C, H, W), `w` (1, n, 1, 1, 1), `acc` (B, n, C, H, W) or None; or, for states
    read side by side (paired inputs), each with an S dim after B: out (B, S, 1 or n, C, H, W), w
    (1, S, n, 1, 1, 1). Where `out` is broadcast over the n targets (identity and pooling: one
    output serves every edge leaving a state), autograd's addcmul backward writes two (B, n, C, H,
    W) products, grad·w and grad·out, and reduces each. Here out's gradient Σ_t w_t·grad_t is one
    batched matrix product and w's gradient one batched dot product: no temporary of the full
    size is written.
    """

    @staticmethod
    def forward(ctx, acc: torch.Tensor | None, out: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(out, w)
        if _nhwc(out):
            # in (B, H, W, [S,] n, C) order, so that the sums are written channels_last: over the
            # tensors as they are, with w broadcast per unit, they came out in (B, [S,] n, H, W, C)
            # order, and the gradients reshaped into the ops' outputs were copied NCHW
            order, back = _pixels_first(out.dim(), 1)
            out, w = out.permute(order), w.permute(order)
            return (out * w if acc is None else torch.addcmul(acc.permute(order), out, w)).permute(back)
        return out * w if acc is None else torch.addcmul(acc, out, w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out, w = ctx.saved_tensors
        needs_acc, needs_out, needs_w = ctx.needs_input_grad
        t = w.dim() - 4                       # the targets' dim (2 with a states dim)
        g, o = _flat(grad), _flat(out)
        flat = out.shape[t] == 1 and g is not None and o is not None
        broadcast = flat and grad.shape[t] > 1
        grad_out = grad_w = None
        if needs_out:
            if broadcast and t == 1:
                # (B, 1, n) @ (B, n, N) -> (B, 1, N); bmm, not matmul, which would fold the
                # batch into one mm and copy its transposed result
                wb = w.view(1, 1, -1).to(grad.dtype).expand(g.shape[0], 1, -1)
                grad_out = torch.bmm(wb, g).view(out.shape)
            elif broadcast:
                # (1, S, 1, n) @ (B, S, n, N) -> (B, S, 1, N): one bmm over B·S
                grad_out = torch.matmul(w.view(1, w.shape[1], 1, -1).to(grad.dtype), g).view(out.shape)
            elif out.shape[t] == 1 and grad.shape[t] > 1 and _nhwc(out):
                # a channels_last out (PC-DARTS' bypassed channels): summed in (B, H, W, [S,] n, C)
                # order, the reduction writes out's gradient channels_last too (in grad's
                # order it came out NCHW, and so did the state's gradient it is a part of)
                order, back = _pixels_first(grad.dim(), 1)
                grad_out = (grad.permute(order) * w.permute(order)).sum(t + 2, keepdim=True).permute(back)
            else:
                grad_out = grad * w
                if out.shape[t] == 1 and grad.shape[t] > 1:
                    grad_out = grad_out.sum(t, keepdim=True)
            grad_out = grad_out.to(out.dtype)
        if needs_w:
            if flat:
                # (B, [S,] n, N) @ (B, [S,] N, 1) -> (B, [S,] n, 1), summed over the batch; bmm
                # where it can (matmul dispatches a few more view ops on the way to it)
                prod = torch.bmm if t == 1 else torch.matmul
                grad_w = prod(g, o.transpose(-1, -2).to(grad.dtype)).sum(0).view(w.shape)
            else:
                grad_w = (grad * out).sum([d for d in range(grad.dim()) if w.shape[d] == 1], keepdim=True)
            grad_w = grad_w.to(w.dtype)
        return (grad if needs_acc else None), grad_out, grad_w


def weighted_add(acc: torch.Tensor | None, out: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """acc + w·out (`WeightedAdd`); acc None: w·out."""
    return WeightedAdd.apply(acc, out, w)


def _weighted_add(acc: torch.Tensor | None, out: torch.Tensor, w: torch.Tensor | None,
                  positions: torch.Tensor | None, targets: int, repeats: int = 1) -> torch.Tensor:
    """acc + w·out (w None: `out` is weighted already) into the accumulator's target slots (all,
    or the units' own; `repeats` > 1: out holds that many weighted units per target, one block of
    targets after the other, summed first; for states side by side, (B, S, repeats·targets, ...))."""
    if repeats > 1:
        assert w is None and positions is None
        t = out.dim() - 4                                 # the targets' dim: 2 with a states dim
        out = SumStates.apply(out.unflatten(t, (repeats, -1)), t)
    if positions is None:
        if w is None:
            return out if acc is None else acc + out
        return weighted_add(acc, out, w)
    # channels_last: in (B, H, W, n, C) order, so that the sums and the gradients `index_add`'s
    # backward selects are channels_last (S1's per-edge op sets: ~700 NCHW activation writes
    # per step); else as they are, (B, n, C, H, W)
    nhwc = _nhwc(out)
    order, back = _pixels_first(out.dim(), 1) if nhwc else (tuple(range(out.dim())),) * 2
    t = 3 if nhwc else 1                              # the targets' dim
    term = out.permute(order) if w is None else out.permute(order) * w.permute(order)
    if acc is None:
        acc = term.new_zeros((*term.shape[:t], targets, *term.shape[t + 1:]))
    else:
        acc = acc.permute(order)
    return acc.index_add(t, positions, term).permute(back)


class SumStates(torch.autograd.Function):
    """x.sum(dim) over the states dim of a paired pass's (B, S, targets, C, H, W) accumulator (or
    over the blocks of a merged conv group's output, `_weighted_add`).

    Every op of the pass outputs all S states' units as one tensor, so each needs the gradient of
    the node sums repeated S times, laid out as its output is. Autograd's sum backward hands on an
    expanded view (stride 0 over S), which each op's reshape would copy in turn; here it is
    written once, in x's layout, for all of them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        ctx.layout = (x.shape, x.stride(), x.dtype, dim)    # not x itself: no activation kept for this
        if _nhwc(x):
            # summed in (B, H, W, ..., C) order, so that the sum is written channels_last: a plain
            # sum writes it in logical (NCHW) order, and every state after it then ran NCHW
            # (`matmul_mix: false` with channels_last: ~1100 NCHW activation writes per step)
            order, _ = _pixels_first(x.dim(), 1)
            _, back = _pixels_first(x.dim() - 1, 1)
            return x.permute(order).sum(dim + 2).permute(back)
        return x.sum(dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, stride, dtype, dim = ctx.layout
        g = torch.empty_strided(shape, stride, dtype=dtype, device=grad.device)
        g.copy_(grad.unsqueeze(dim).expand(shape))
        return g, None


def _nhwc(x: torch.Tensor) -> bool:
    """Whether (..., C, H, W) `x` (a (B, K·C, H, W) activation, or a 5-D view of one) has its
    channels innermost (channels_last); at 1×1 both layouts are the same."""
    return x.stride(-3) == 1 and x.shape[-2] * x.shape[-1] > 1


def _pixels_first(dim: int, lead: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """For a (lead dims, units..., C, H, W) tensor of `dim` dims: the permutation that moves H, W
    right after the `lead` dims, as channels_last holds them in memory, and its inverse. An
    elementwise op or reduction over tensors so permuted writes its output channels_last; over
    the tensors as they are, it follows their logical order (NCHW) where broadcast per-unit
    vectors leave the layout open."""
    order = (*range(lead), dim - 2, dim - 1, *range(lead, dim - 2))
    return order, tuple(sorted(range(dim), key=order.__getitem__))


def _split_first(acc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n, C, H, W) node sums as the first node's (B, 1, C, H, W) and the rest's: a split
    whose backward (a cat of the two gradients) writes in acc's layout. Channels_last: split in
    (B, H, W, n, C) order, as a plain split's cat would write an NCHW gradient."""
    if not _nhwc(acc):
        return acc.split([1, acc.shape[1] - 1], dim=1)
    order, back = _pixels_first(acc.dim(), 1)
    first, rest = acc.permute(order).split([1, acc.shape[1] - 1], dim=3)
    return first.permute(back), rest.permute(back)


def _items(x: torch.Tensor, columns: int, nhwc: bool) -> torch.Tensor:
    """(B, K·C, H, W) as K columns per item, (items, K, N): per batch item over C·H·W (NCHW), or
    per pixel over C (`nhwc`). A view where x's strides allow it (a node's slice of a pass's
    sums does), else a copy."""
    b, kc, h, w = x.shape
    if nhwc:
        return x.permute(0, 2, 3, 1).reshape(b * h * w, columns, kc // columns)
    return x.reshape(b, columns, kc // columns * h * w)


class Mix(torch.autograd.Function):
    """carry + Σ_b m_b @ x_b, item by item: x_b (G, K_b, N) the blocks of columns, m_b (n, K_b)
    m's columns for block b, carry (G, n, N) or None -> (G, n, N). m is a constant here; its
    first `k_alpha` columns are also `m_alpha`, the input that gets their gradient (the rest are
    constants: `_mix_layouts`), computed from `alpha_outs`, the (B, u·C, H, W) outputs whose
    concatenation those columns are, kept as they are: no copy of x, which the backward would
    otherwise keep whole.

    `step` > 1 (partial channels: K rows per target, `_mix_layouts`): the blocks after the first
    feed only every step-th row (the targets' ops' sums; the first block holds the bypassed
    channels' columns), so their products read and write those rows alone, not K× as many rows
    of zeros.

    `drop` (search-time drop-path, `FusedArch.drop_factors`): (B, n, K) per-sample factors of m's
    entries, 0 or 1/(1-p) per (edge, op), 1 for an identity's: each batch item's matrix is then
    its own, m·drop, and α's gradient sums each item's product times its factors.

    `fold` (`_mix_layouts`): m's α columns are its first and those after `fold` more, not its
    first `k_alpha` (`_alpha_columns`)."""

    @staticmethod
    def forward(ctx, carry: torch.Tensor | None, m: torch.Tensor, m_alpha: torch.Tensor, k_alpha: int, nhwc: bool,
                blocks: int, step: int, drop: torch.Tensor | None, fold: int,
                *xs_and_alpha_outs: torch.Tensor) -> torch.Tensor:
        xs, alpha_outs = xs_and_alpha_outs[:blocks], xs_and_alpha_outs[blocks:]
        if drop is not None:
            m = m * drop                      # (B, n, K): each sample's own matrix
        # per item (G, n, K): with channels_last each sample's matrix repeated over its pixels,
        # once for all blocks
        items = m if drop is None else _per_item(m.to(xs[0].dtype), xs[0].shape[0])
        out, at = carry, 0
        for i, x in enumerate(xs):
            rows = slice(None, None, step if i else 1)
            mb = _per_item(items[..., rows, at:at + x.shape[1]].to(x.dtype), x.shape[0])
            at += x.shape[1]
            if out is None:
                out = torch.bmm(mb, x)
            elif out is carry:
                out = torch.baddbmm(carry.to(x.dtype), mb, x)
            else:                            # this forward's own sums: added to in place
                out[:, rows].baddbmm_(mb, x)
        ctx.x_dtypes, ctx.widths, ctx.k_alpha, ctx.nhwc = [x.dtype for x in xs], [x.shape[1] for x in xs], k_alpha, nhwc
        ctx.step, ctx.alpha_dtype, ctx.dropped, ctx.fold = step, m_alpha.dtype, drop is not None, fold
        # (B, n, K), not the per-item matrices (B·H·W of them with channels_last): repeated again
        ctx.save_for_backward(m, m_alpha, *([drop] if drop is not None else []), *alpha_outs)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved = ctx.saved_tensors        # indexed, not star-unpacked and popped: torch 2.11's dynamo
        m, m_alpha = saved[0], saved[1]  # traces a star-unpacked rest as a tuple
        drop = saved[2] if ctx.dropped else None
        alpha_outs = list(saved[3 if ctx.dropped else 2:])
        needs_carry, needs_m = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if needs_m and ctx.k_alpha and torch.is_grad_enabled():
            # a backward that is differentiated in turn (`create_graph`: RobustDARTS' Hessian
            # eigenvalue): the inputs' gradients depend on α through m's α columns, so those
            # come from m_alpha here, not from the constant copy (which loses that dependence)
            k, f = ctx.k_alpha, ctx.fold
            alpha = m_alpha.to(m.dtype) if drop is None else m_alpha.to(m.dtype) * _alpha_part(drop, k, f)
            # α's columns where they are (`_alpha_columns`): the first, the fold's f ones, the others
            m = torch.cat([alpha[..., :1], m[..., 1:1 + f], alpha[..., 1:], m[..., f + k:]], dim=-1)
        grad_m = None
        grad_xs: list[torch.Tensor | None] = []
        items = m if drop is None else _per_item(m.to(grad.dtype), grad.shape[0])
        at = 0
        for i, (needs_x, width, dtype) in enumerate(zip(ctx.needs_input_grad[9:], ctx.widths, ctx.x_dtypes)):
            rows = slice(None, None, ctx.step if i else 1)
            mt = _per_item(items[..., rows, at:at + width].transpose(-1, -2).to(grad.dtype), grad.shape[0])
            grad_xs.append(torch.bmm(mt, grad[:, rows]).to(dtype) if needs_x else None)
            at += width
        if needs_m:
            k = ctx.k_alpha
            if alpha_outs and k:        # (G, n, N) @ (G, N, k) summed over G: the α columns' gradient
                x_alpha = torch.cat(alpha_outs, dim=1) if len(alpha_outs) > 1 else alpha_outs[0]
                g = torch.bmm(grad, _items(x_alpha, k, ctx.nhwc).transpose(1, 2).to(grad.dtype))
                if drop is None:
                    g = g.sum(0)
                else:                   # each sample's products (over its pixels) times its factors
                    b = drop.shape[0]
                    per_sample = g if g.shape[0] == b else g.view(b, -1, *g.shape[1:]).sum(1)
                    g = (per_sample * _alpha_part(drop, k, ctx.fold).to(g.dtype)).sum(0)
                grad_m = g.to(ctx.alpha_dtype)
        return ((grad if needs_carry else None), None, grad_m, None, None, None, None, None, None, *grad_xs,
                *([None] * len(alpha_outs)))


def _per_item(m: torch.Tensor, items: int) -> torch.Tensor:
    """A mixing matrix (n, K), or one per batch item (B, n, K), as `items` matrices (G, n, K) for
    `bmm`: one expanded, no copy; per batch item each repeated over its pixels (`nhwc`: G = B·H·W
    items), a copy (one `repeat`, written as (B, pixels·n, K)), or as it is (G = B)."""
    if m.dim() == 2:
        return m.expand(items, -1, -1)
    b, n, k = m.shape
    return m if items == b else m.repeat(1, items // b, 1).view(items, n, k)


def mix(carry: torch.Tensor | None, m: torch.Tensor, blocks: Sequence[Sequence[torch.Tensor]], k_alpha: int,
        split: bool | str = False, rows: int = 1, m_alpha: torch.Tensor | None = None,
        drop: torch.Tensor | None = None, prev: tuple[torch.Tensor, torch.Tensor] | None = None,
        fold: int = 0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """A pass's node sums in matrix products: carry + Σ_k m[t, k]·X_k for every target t, where
    X is the concatenation of the pass's outputs (`blocks`, lists of (B, [S,] u, C, H, W)
    tensors: K columns in all, the first `k_alpha` weighted by α here) and `carry` (B, n, C, H,
    W) the earlier passes' partial sums. Each block is concatenated (one copy) and goes into one
    batched product: a block that is one tensor already (a pass's one BN output,
    `batch_norm_pass`) is not copied. Per block two kernels (a cat, a product) where one weighted
    add per group and a sum per merged group and per paired pass took about seven; in the
    backward a product per block and, where α needs a gradient, a product and a sum (and a cat
    of α's outputs where they are several).

    `m_alpha`: m's first k_alpha columns as the tensor α's gradient goes to, m then taken as a
    constant (`FusedArch.mix_matrices` gathers both, so that the gradient needs no zero-padding
    to m's width); None: m's own columns, m's gradient through their slice.

    `rows`: rows per target, K with partial channels (`_mix_layouts`): the first block then holds
    the bypassed channels' columns, and the others feed only each target's first row (`Mix`).

    `drop`: (B, targets·rows, K) per-sample factors of m's entries, search-time drop-path's
    (`FusedArch.drop_factors`; `Mix`).

    `split`: the first target's sums (the node complete now: its `rows` rows) and the rest apart,
    (B, rows, C, H, W) and (B, n-rows, C, H, W) or None, split in the product's own layout, so
    that the split's backward (a cat) writes the gradient in the layout the product's backward
    reads. `split="fold"`: the node and the whole sums (G, n, N), for the next pass's `prev`
    (`NodeRows`).

    `prev` (with `fold`, `_mix_layouts`): the previous pass's sums, (G, 1 + targets, N) as that
    pass's `split="fold"` gave them, and their first row as the (B, C, H, W) node this pass
    reads: m's first 1 + fold columns, in place of `carry` and of the node's identity output
    (which `blocks` then leave out), with the first block's outputs if it has any (one
    concatenation, as the identity's output was in it)."""
    flats = [[o.flatten(1, o.dim() - 3) for o in block] for block in blocks]   # (B, u·C, H, W) each
    node = None
    if prev is not None:
        sums, node = prev
        b, c, h, w = node.shape
        # the sums as (B, (1 + targets)·C, H, W) columns in their own layout (a view)
        whole = (sums.view(b, h, w, -1).permute(0, 3, 1, 2) if _nhwc(node)
                 else sums.view(b, -1, h, w))
        flats = [[whole, *flats[0]], *flats[1:]]
    flats = [f for f in flats if f]
    xs = [torch.cat(f, dim=1) if len(f) > 1 else f[0] for f in flats]
    n, k = m.shape
    b, _, h, w = xs[0].shape
    c = sum(x.shape[1] for x in xs) // k
    nhwc = _nhwc(xs[0])
    # the α columns' outputs, kept for α's gradient (not in a weight step: α is constant there)
    alpha_outs: list[torch.Tensor] = []
    if m_alpha is None:
        m, m_alpha = m.detach(), _alpha_part(m, k_alpha, fold)
    if torch.is_grad_enabled() and m_alpha.requires_grad:
        outputs = [f for fs in flats for f in fs]
        columns = 0
        if node is not None:          # the identity's column: the node (`prev`'s first row), then the rest
            alpha_outs.append(node)
            columns, outputs = 1, outputs[1:]
        for f in outputs:
            if columns >= k_alpha:
                break
            if columns + f.shape[1] // c > k_alpha:
                # an output with more than α columns (a pass's one BN): only those, copied, so
                # that the rest is not kept; not detached, so that a differentiated backward
                # (`Mix`) follows α's gradient back through them
                f = f[:, :(k_alpha - columns) * c].clone()
            alpha_outs.append(f)
            columns += f.shape[1] // c
    if carry is not None:
        carry = carry.permute(0, 3, 4, 1, 2).reshape(b * h * w, n, c) if nhwc else carry.reshape(b, n, c * h * w)
    items = [_items(x, x.shape[1] // c, nhwc) for x in xs]
    step = rows if rows > 1 and blocks[0] else 1
    out = Mix.apply(carry, m, m_alpha, k_alpha, nhwc, len(items), step, drop, fold, *items, *alpha_outs)  # (G, n, N)

    def nodes(t: torch.Tensor) -> torch.Tensor:                          # (G, n', N) -> (B, n', C, H, W)
        if nhwc:
            return t.view(b, h, w, -1, c).permute(0, 3, 4, 1, 2)
        return t.view(b, -1, c, h, w)
    if not split:
        return nodes(out)
    if n == rows:
        return nodes(out), None
    if split == "fold":
        whole, first = NodeRows.apply(out, rows)
        return nodes(first), whole
    first, rest = out.split([rows, n - rows], dim=1)
    return nodes(first), nodes(rest)


def unit_columns(kind: str, mods: Sequence[nn.Module], training: bool) -> bool:
    """Whether a group's output has one unit per module (else one output serves them all:
    identity, pooling, and a pooling's BN where its batch statistics are shared and it has no
    affine parameters)."""
    if kind in ("identity", "pool"):
        return False
    if kind == "pool_bn":
        return len(mods) > 1 and (not training or part(mods[0], 1).affine)
    return True


def _join_partial(a: torch.Tensor, b: torch.Tensor, k: int, shuffle: bool) -> torch.Tensor:
    """cat(ops' channels, bypassed channels), channel-shuffled (K groups) in the same copy."""
    if not shuffle:
        return torch.cat([a, b], dim=1)
    # shuffle: channel g·C/K + i moves to i·K + g; group 0 is `a`, groups 1..K-1 are `b`
    if _nhwc(a if a.shape[1] > 1 else b):     # the cat in (B, H, W, C/K, K) order: the output stays channels_last
        nhwc = torch.cat([a.permute(0, 2, 3, 1).unsqueeze(4),
                          b.permute(0, 2, 3, 1).unflatten(3, (k - 1, -1)).transpose(3, 4)], dim=4)
        return nhwc.flatten(3, 4).permute(0, 3, 1, 2)
    return torch.cat([a.unsqueeze(2), b.unflatten(1, (k - 1, -1)).transpose(1, 2)], dim=2).flatten(1, 2)


class StateParts(torch.autograd.Function):
    """A partial-channel state x (B, C, H, W) as a whole and as its first C/K channels (the ops'
    input), views both: the whole is a block of `mix` columns, the identity's C/K channels and
    the bypassed rest. The backward adds the ops' gradient into the first channels of the
    block's, in place: one kernel where a split (whose backward is a cat) and the sum of the
    identity's and the ops' gradients took two. Out of place where the backward is itself
    differentiated or traced. (Any tensor split so along dim 1: `NodeRows`.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.c, ctx.rest = c, x.shape[1] - c
        ctx.set_materialize_grads(False)
        return x.view_as(x), x[:, :c]

    @staticmethod
    def backward(ctx, grad_whole: torch.Tensor | None, grad_ops: torch.Tensor | None):
        if grad_ops is None or grad_whole is None:          # one of the two was not used
            return grad_whole if grad_ops is None else F.pad(grad_ops, (0, 0) * (grad_ops.dim() - 2) + (0, ctx.rest)), None
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            grad = grad_whole.clone()
        else:
            grad = grad_whole          # a slice of the product's fresh gradient, read by nothing else
        grad.narrow(1, 0, ctx.c).add_(grad_ops)
        return grad, None


class NodeRows(StateParts):
    """A pass's sums (G, n, N) as a whole and as their first `rows` rows (the node they complete),
    views both, where the next pass reads the whole as its `prev` (`mix`, `_mix_layouts`' fold):
    `StateParts`' backward adds the node's gradient into the first rows of the next product's
    fresh gradient, in place, where a split's backward was a cat of the node's gradient and the
    rest's."""


def _node_channels(rows: torch.Tensor, shuffle: bool) -> torch.Tensor:
    """A node's (B, K, C/K, H, W) rows (`mix` with partial channels: the ops' channels, then the
    bypassed ones) as its (B, C, H, W) channels, channel-shuffled (channel g·C/K + i to i·K + g)
    in one copy in the rows' layout; a view without the shuffle."""
    if not shuffle:
        return rows.flatten(1, 2)
    if _nhwc(rows):                           # copied in (B, H, W, C/K, K) order: channels_last
        return rows.permute(0, 3, 4, 2, 1).contiguous().flatten(3, 4).permute(0, 3, 1, 2)
    return rows.transpose(1, 2).contiguous().flatten(1, 2)


def _draw_noise(plan: CellPlan, shape: CellShape, inputs: Sequence[torch.Tensor],
                num_inputs: int) -> dict[tuple[int, int], torch.Tensor]:
    """S4's noise, drawn in the eager loop's order and in the activations' memory format, as the
    eager op's `randn_like` draws it, so that both paths see the same numbers. (Until 2026-12-06
    it was drawn NCHW: in a channels_last search the noise went into every node sum in the other
    layout, and the whole fused S4 step ran so: 713 NCHW activation writes per step at the
    bench's small size; and its numbers were not the eager channels_last search's.)"""
    if not plan.noise:
        return {}
    x0 = inputs[0]
    layout = torch.channels_last if _nhwc(x0) else torch.contiguous_format
    b, _, h, w = x0.shape
    node_hw = (math.ceil(h / shape.strides[0]), math.ceil(w / shape.strides[0]))
    out = {}
    for e, c, state in plan.noise:
        if state < num_inputs:
            s = shape.strides[state]
            hw = (math.ceil(inputs[state].shape[2] / s), math.ceil(inputs[state].shape[3] / s))
        else:
            hw = node_hw
        out[e, c] = torch.empty((b, shape.op_channels, *hw), dtype=x0.dtype, device=x0.device,
                                memory_format=layout).normal_()
    return out


PREPROCESS_KINDS = ("relu_conv_bn", "factorized_reduce")


def _preprocess_groups(preprocess: Sequence[nn.Module], inputs: Sequence[torch.Tensor]
                       ) -> tuple[list[tuple[str, list[nn.Module]]], Sequence[torch.Tensor]]:
    """A cell's preprocessing modules as (kind, [module]) groups, one per input, to run with the
    cell (`_run_preprocess`), and the inputs; where one of them is not of a `PREPROCESS_KINDS`
    structure, no group and the inputs run through the modules as they are."""
    kinds = [classify(m) for m in preprocess]
    if any(kind not in PREPROCESS_KINDS for kind in kinds):
        return [], [m(x) for m, x in zip(preprocess, inputs)]
    return [(kind, [m]) for kind, m in zip(kinds, preprocess)], inputs


def _paired_preprocess(groups: Sequence[tuple[str, list[nn.Module]]], inputs: Sequence[torch.Tensor]
                       ) -> list[tuple[str, list[nn.Module]]] | None:
    """A paired cell's two ReLUConvBNs as ONE group over both inputs side by side, where they
    have one structure and the inputs one shape (not after a reduction cell, whose
    FactorizedReduce differs, nor where the inputs' channels differ): one ReLU over their
    concatenation, one grouped conv (a group per input) and one BN, whose output is the paired
    pass's input as it is (`cell_forward`), where two of each and the pass's concatenation were.
    None where they cannot be."""
    if len(groups) != 2 or any(kind != "relu_conv_bn" for kind, _ in groups):
        return None
    (_, [a]), (_, [b]) = groups

    def key(m: nn.Module) -> tuple:
        c = part(m, 1)
        return (c.weight.shape, c.stride, c.padding, c.dilation, c.groups, c.bias is None, _bn_key(part(m, 2)))
    if key(a) != key(b) or inputs[0].shape != inputs[1].shape or inputs[0].dtype != inputs[1].dtype:
        return None
    return [("relu_conv_bn", [a, b])]


def _run_preprocess(groups: Sequence[tuple[str, list[nn.Module]]], inputs: Sequence[torch.Tensor],
                    sink: BatchNormSink, dense: bool, ws: Iterator[torch.Tensor]) -> list[torch.Tensor]:
    """The inputs preprocessed by `groups` (`_preprocess_groups`), their weights the first in `ws`."""
    return [KINDS[kind](mods, _Source(x, sink, {}, dense), (), None, ws).squeeze(1)
            for (kind, mods), x in zip(groups, inputs)]


def _run_paired_preprocess(paired: Sequence[tuple[str, list[nn.Module]]], inputs: Sequence[torch.Tensor],
                           sink: BatchNormSink, dense: bool, ws: Iterator[torch.Tensor]
                           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Both inputs preprocessed as one group (`_paired_preprocess`): (B, 2·C, H, W), and each
    input's C channels of it as views."""
    (kind, mods), = paired
    both = KINDS[kind](mods, _Source(torch.cat(list(inputs), dim=1), sink, {}, dense, 2), (), None, ws)
    side_by_side = both.flatten(1, 3)          # (B, 2, 1, C, H, W) -> (B, 2·C, H, W)
    return side_by_side, list(side_by_side.split(both.shape[3], dim=1))


def cell_forward(op_module: Callable[[int, int], nn.Module], shape: CellShape, plan: CellPlan,
                 arch: FusedArch, inputs: Sequence[torch.Tensor],
                 preprocess: Sequence[nn.Module] = (), drop_mask: torch.Tensor | None = None) -> torch.Tensor:
    """A search cell's output, state by state: every edge leaving a state in one pass (the two
    inputs of a paired plan in one pass over both: `pairable`).

    `drop_mask` (training only; search-time drop-path, `mix` only): (B, len(arch.weights) + 1)
    per-sample factors, one per α index (the (edge, op) it weighs) and a last 1, which scale each
    op's terms in the pass's product (`FusedArch.drop_factors`): every op output but the
    identity's dropped per sample, as eager `MixedOp` drops them, from other random numbers (one
    draw per network forward, not one per op).

    `preprocess`: one module per input (a DARTS cell's ReLUConvBN or FactorizedReduce), run first
    through the cell's kinds, weight gather and BN buffer, as `eval_cell_forward` does: under
    autocast their weights are cast with the cell's, not one by one."""
    ap, k, c_op = plan.arch or arch.plan, shape.partial, shape.op_channels
    pre_groups, inputs = _preprocess_groups(preprocess, inputs)
    # a paired plan's two ReLUConvBNs as one, its output the paired pass's input; not with partial
    # channels, whose pass concatenates the inputs' first channels anyway (PC-DARTS at spec size:
    # 0.9-1.4% fewer kernel-like ops, but 2.1-2.5% more bytes moved, 2026-12-07)
    paired_pre = _paired_preprocess(pre_groups, inputs) if plan.paired and k == 1 else None
    pre_groups = paired_pre or pre_groups
    passes = plan.passes(ap)
    # per pass, per group: the modules of its units (paired: the first input's, then the second's)
    modules = [[[op_module(e, c) for s in p for e, c in ap.sources[s].groups[gi].units]
                for gi in range(len(ap.sources[p[0]].groups))] for p in passes]
    kinds_p = [plan.kinds[p[0]] for p in passes]
    bn = (next(m for m in op_module(*plan.bn_unit).modules() if isinstance(m, nn.BatchNorm2d))
          if plan.bn_unit is not None else None)
    pre_bns = _grouped_bns(pre_groups)
    groups = pre_groups + [(kind, mods) for mods_s, kinds in zip(modules, kinds_p) for mods, kind in zip(mods_s, kinds)]
    dense = _dense_layout(arch.dense, inputs[0])
    # `merge_bn`: a pass's last BNs as one (`batch_norm_pass`) in training, where all can be.
    # Evaluation mode keeps one BN per op kind (affine maps of each module's running statistics)
    # but reads its α from the same gather and matrices: the same cached index tensors, so that
    # a compiled forward (`Supernet.compile`) is not traced again once evaluation has run
    eps = _pass_batch_norm_eps(kinds_p, modules) if arch.mix and arch.merge_bn else None
    defer = eps is not None

    def requests() -> list[Request]:
        # the preprocessing's weights first: it runs first
        rs = [r for kind, mods in pre_groups for r in REQUESTS[kind](mods, dense, len(mods))]
        last = []
        for p, mods_s, kinds in zip(passes, modules, kinds_p):
            pools, convs = [], []
            for mods, kind in zip(mods_s, kinds):
                group = REQUESTS[kind](mods, dense, len(p)) if kind in REQUESTS else []
                if plan.scaled_affine and (kind in SCALED or defer and kind == "pool_bn"):
                    *group, gamma, beta = group             # the last BN's γ, β: see below
                    (pools if kind == "pool_bn" else convs).append((gamma[1], beta[1]))
                rs += group
            last += pools + convs       # deferred: in the order of the pass's one BN's channels
        if last:
            rs.append(("affine", [g for gs, _ in last for g in gs] + [b for _, bs in last for b in bs]))
        return rs
    # which cell (the one whose modules these are) in which layout, with its BNs merged or not
    # (random features' merged γ, β come in another order); no key where no record is kept (a
    # compiled cell: dynamo would guard on the identities)
    key = ((id(getattr(op_module, "__self__", op_module)), id(plan), dense, tuple(map(id, preprocess)), defer)
           if arch.sink.network is not None else ())
    gathered = arch.sink.begin(CellNeeds(
        key, requests,
        plan.bn_channels * c_op + sum(b.num_features for b in pre_bns), bn or next(iter(pre_bns), None),
        lambda: _grouped_bns(groups)), arch.constant, arch.autocast)
    # `mix`: per pass, per group, whether its output has a column per unit (else one for all)
    columns = (tuple(tuple(unit_columns(kind, mods, arch.sink.training) for mods, kind in zip(mods_s, kinds))
                     for mods_s, kinds in zip(modules, kinds_p)) if arch.mix else None)
    weights = arch.group_weights(plan, c_op, columns, defer)
    mixes = arch.mix_matrices(plan, c_op, columns, defer) if columns is not None else [None] * len(passes)
    bn_weights = arch.pass_bn_weights(plan, c_op, columns) if defer else [None] * len(passes)
    drops: list[torch.Tensor | None] = [None] * len(passes)
    if drop_mask is not None and arch.sink.training:
        if columns is None:
            raise ValueError("search-time drop-path on a fused backend needs the matrix-product mix "
                             "(search.matmul_mix: true), or run it on search.backend: eager")
        drops = arch.drop_factors(plan, c_op, columns, defer, drop_mask)
    if columns is not None and arch.sink.training:
        # evaluation's gather (a pooling's BN has a column per unit there) made now, not at the
        # first validation: see `FusedArch.prefill`
        eval_columns = tuple(tuple(unit_columns(kind, mods, False) for mods, kind in zip(mods_s, kinds))
                             for mods_s, kinds in zip(modules, kinds_p))
        if eval_columns != columns:
            arch.prefill(plan, c_op, eval_columns, defer)
    # affine last BNs (random features): their γ and β came last (`requests`)
    if plan.scaled_affine and defer:
        # the poolings' and the SCALED groups', pass by pass: every pass's BN (scale, shift), α·γ
        # and α·β (1·γ, 1·β over a pooling's channels, its α being in `mix`), in one product
        scaled = gathered.pop().view(2, -1) * arch.pass_bn_scale(plan, c_op, columns)
        per_pass = iter(zip(*(t.split([len(b) for b in bn_weights if b is not None]) for t in scaled.unbind(0))))
        bn_weights = [None if b is None else next(per_pass) for b in bn_weights]
        if not arch.sink.training:    # evaluation applies them group by group, poolings' first
            weights = [_affine_by_group(kinds, mods_s, row, bn) for kinds, mods_s, row, bn
                       in zip(kinds_p, modules, weights, bn_weights)]
    elif plan.scaled_affine:
        # the SCALED groups': α·γ and α·β of the whole cell in one product, not two small products
        # per group (each with its own backward); a SCALED kind then gets its BN's (weight, bias)
        sizes = [sum(LAST_BN[kind](m).num_features for m in mods) for mods_s, kinds in zip(modules, kinds_p)
                 for mods, kind in zip(mods_s, kinds) if kind in SCALED]
        scaled = gathered.pop().view(2, -1) * arch.scaled_weights(plan, c_op, columns)
        pairs = iter(zip(*(t.split(sizes) for t in scaled.unbind(0))))
        weights = [[next(pairs) if kind in SCALED else w for kind, w in zip(kinds, row)]
                   for kinds, row in zip(kinds_p, weights)]
    ws = iter(gathered)
    paired_input = None                  # both inputs preprocessed side by side (`_paired_preprocess`)
    if paired_pre is not None:
        # the inputs apart as views, which the paired pass does not read
        paired_input, inputs = _run_paired_preprocess(paired_pre, inputs, arch.sink, arch.dense, ws)
    elif pre_groups:
        inputs = _run_preprocess(pre_groups, inputs, arch.sink, arch.dense, ws)
    noise = _draw_noise(plan, shape, inputs, ap.num_inputs)
    states = list(inputs)
    carry = carry_b = None           # partial sums of the nodes not complete yet
    # where the next pass folds them (`_mix_layouts`): the last pass's sums whole and its node
    prev: tuple[torch.Tensor, torch.Tensor] | None = None
    # partial channels with `mix`: the bypassed channels are columns of each pass's product and
    # a node's K rows (`_mix_layouts`), not sums of their own (`WeightedAdd`)
    rows = arch.bypass[0] if arch.bypass is not None else 1
    # paired strided convs (`_dil_blocks`) as one ungrouped conv, their weights made so here
    spread = (lambda w, n: block_diagonal(w, n, arch.constant)) if arch.block_diagonal else None
    for i, (p, mods_s, kinds, weights_s, mixing, bn_weight, drop) in enumerate(zip(
            passes, modules, kinds_p, weights, mixes, bn_weights, drops)):
        fold = mixing[3] if mixing is not None else 0
        fold_next = i + 1 < len(mixes) and mixes[i + 1] is not None and mixes[i + 1][3] > 0
        # a paired pass's two inputs have one stride and one set of targets; its last state
        # says whether the next node is complete after it
        sp = ap.sources[p[-1]]
        stride, targets = shape.strides[sp.state], len(sp.edges)
        # partial channels: the ops' channels and the bypassed ones by one split, whose backward
        # is one cat (two slices would each zero-fill a full-size gradient, then be added)
        parts = []
        whole = None                 # a partial-channel state read whole by the product (`StateParts`)
        for s in p:
            x = states[ap.sources[s].state]
            if rows > 1 and _reads_state_whole(kinds, p):
                whole, xa = StateParts.apply(x, c_op)
                parts.append((xa, None))
            else:
                parts.append(x.split([c_op, x.shape[1] - c_op], dim=1) if k > 1 else (x, None))
        if len(p) == 1:
            xa = parts[0][0]
        else:
            # paired inputs: their (ops') channels side by side (one copy), so that every op of
            # both runs once; the sums over the two come out of one reduction below
            if states[0].shape != states[1].shape:
                raise ValueError(f"a paired cell's inputs must have one shape, got {tuple(states[0].shape)} "
                                 f"and {tuple(states[1].shape)}")
            # preprocessed side by side already (`_paired_preprocess`)
            xa = paired_input if paired_input is not None else torch.cat([a for a, _ in parts], dim=1)
        src = _Source(xa, arch.sink, noise, arch.dense, len(p), spread, defer and arch.sink.training)
        # `mix`: the bypassed channels (max-pooled on stride-2 edges) as they are, no copy of their
        # own (chained, `WeightedAdd` below pools them)
        bypassed = ([xb if stride == 1 else F.max_pool2d(xb, 2, 2) for _, xb in parts if xb is not None]
                    if rows > 1 else [])
        acc = carry
        weighted, alphaless = [], []         # `mix`: the outputs to weight, those weighted already
        pooled, convs = [], []               # defer: the poolings' and SCALED groups' BN inputs
        pooled_eval = []                     # ... their BN outputs in evaluation mode
        for g, mods, kind, w in zip(ap.sources[p[0]].groups, mods_s, kinds, weights_s):
            fn = KINDS[kind]
            if fn is None:
                continue
            scaled = kind in SCALED
            # a pooling's scale: its affine BNs' (γ, β), where a merged pass BN gathered them
            out = fn(mods, src, g.units, w if scaled or isinstance(w, tuple) else None, ws)
            if isinstance(out, Deferred):
                (convs if scaled else pooled).append(out)
                continue
            if arch.mix:
                if kind == "identity" and fold:
                    continue                 # its column is in `prev`'s block
                if kind == "identity" and whole is not None:
                    # the identity's C/K channels and the bypassed rest: the state itself, as one
                    # block of columns (`_mix_layouts`)
                    out = whole
                (alphaless if scaled else pooled_eval if defer and kind == "pool_bn" else weighted).append(out)
                continue
            pos = (arch.constant(("index", g.positions), lambda: torch.tensor(g.positions))
                   if g.positions is not None else None)
            acc = _weighted_add(acc, out, None if scaled else w, pos, targets, g.repeats)
        complete = sp.state >= ap.num_inputs - 1      # every edge into the next node is summed now
        split = None
        if mixing is not None:               # every term of the pass, both paired states', at once
            blocks = [weighted + bypassed + pooled_eval + alphaless]
            if pooled or convs:              # the pass's one BN: its output a block of its own
                scale, shift = bn_weight if isinstance(bn_weight, tuple) else (bn_weight, None)
                normed = batch_norm_pass(pooled + convs, scale, arch.sink, eps, shift)
                if len(pooled) + len(convs) > 1:
                    blocks.append([normed])
                else:                        # nothing merged: one cat, one product, as without
                    blocks[0].append(normed)
            if fold and (prev is None or carry is not None or prev[0].shape[1] != targets + 1):
                raise RuntimeError("a folded pass needs the previous pass's sums (fused._mix_layouts)")
            folded = dict(prev=prev, fold=fold) if fold else {}
            if complete:
                split = mix(carry, mixing[0], blocks, mixing[1], split="fold" if fold_next else True, rows=rows,
                            m_alpha=mixing[2], drop=drop, **folded)
            else:
                acc = mix(carry, mixing[0], blocks, mixing[1], rows=rows, m_alpha=mixing[2], drop=drop, **folded)
            prev = None
        elif acc is not None and len(p) > 1:
            acc = SumStates.apply(acc)   # (B, S, targets, C, H, W): the paired inputs' terms summed
        if acc is None and split is None:    # only `none` ops leave this state
            acc = xa.new_zeros((xa.shape[0], targets, c_op, *_out_hw(xa, stride)))
        acc_b = carry_b
        for s, (_, xb) in zip(p, parts):         # PC-DARTS' bypassed channels, state by state
            if xb is None or rows > 1:
                continue
            xb, bw = (xb if stride == 1 else F.max_pool2d(xb, 2, 2)).unsqueeze(1), arch.bypass_weights[s]
            if bw is None:
                acc_b = xb.expand(-1, targets, -1, -1, -1) if acc_b is None else acc_b + xb
            else:
                acc_b = weighted_add(acc_b, xb, bw)
        if complete:
            # split, not acc[:, 0] and acc[:, 1:]: its backward is one cat, not two zero-filled
            # full-size gradients and their sum
            if split is not None:
                head, carry = split
                if fold_next:                # the whole sums go to the next pass, not as a carry
                    prev, carry = (carry, None), None
            else:
                head, carry = _split_first(acc) if targets > 1 else (acc, None)
            if k == 1:
                node, carry_b = head.squeeze(1), None
                if prev is not None:         # the node the next pass reads, one tensor for both uses
                    prev = (prev[0], node)
            elif rows > 1:
                node = _node_channels(head, shape.shuffle)
            else:
                head_b, carry_b = _split_first(acc_b) if targets > 1 else (acc_b, None)
                node = _join_partial(head.squeeze(1), head_b.squeeze(1), k, shape.shuffle)
            states.append(node)
        else:
            carry, carry_b = acc, acc_b
    nodes = states[ap.num_inputs:]
    return torch.cat(nodes, dim=1) if shape.output == "concat" else nodes[-1]


def _affine_by_group(kinds: Sequence[str], mods_s: Sequence[list[nn.Module]], row: list,
                     bn: tuple[torch.Tensor, torch.Tensor] | None) -> list:
    """A pass's groups' weights with its merged BN's (scale, shift) split group by group (the
    poolings' blocks first, then the SCALED groups', as `batch_norm_pass` lays them out): each
    deferrable group gets its own (scale, shift) pair, the others keep theirs."""
    if bn is None:
        return row
    order = [i for i, kind in enumerate(kinds) if kind == "pool_bn"] + \
        [i for i, kind in enumerate(kinds) if kind in SCALED]
    sizes = [sum((part(m, 1) if kinds[i] == "pool_bn" else LAST_BN[kinds[i]](m)).num_features for m in mods_s[i])
             for i in order]
    pairs = dict(zip(order, zip(*(t.split(sizes) for t in bn))))
    return [pairs.get(i, w) for i, w in enumerate(row)]


def _out_hw(x: torch.Tensor, stride: int) -> tuple[int, int]:
    return math.ceil(x.shape[2] / stride), math.ceil(x.shape[3] / stride)


# --- evaluation cells (retraining) ---------------------------------------------------------------
# A derived cell has one op per edge, but several edges still read one state (DARTS_V2's normal
# cell: 3 sep_conv_3x3 read c_{k-1}, 2 read c_{k-2}), so the same grouping applies: ops of one
# name on one state run as one kind call, and drop-path draws one mask per cell, not per op.
# Its two ReLUConvBN preprocessings run as one where its inputs have one shape, as a search
# cell's (`_paired_preprocess`), and a single dropped op into a node with a sum already adds
# with its mask in one kernel (`MaskedAdd`).
@dataclass(frozen=True)
class EvalGroup:
    kind: str                                 # a key of KINDS ("zero" and "noise" run eagerly)
    ops: tuple[int, ...]                      # indices into the cell's op list, in op order
    nodes: tuple[int, ...]                    # the node each op feeds
    drop: tuple[int, int] | None              # the cell's drop-path mask columns, if droppable


@dataclass(frozen=True)
class EvalCellPlan:
    sources: tuple[tuple[EvalGroup, ...], ...]  # per state (inputs first, then nodes)
    num_inputs: int
    num_nodes: int
    droppable: int                            # columns of the drop-path mask
    bn_channels: int                          # grouped-BN channels, in units of the cell's C
    bn_op: int | None                         # an op with a grouped BN: its buffers' dtype/device


def build_eval_plan(ops: Sequence[nn.Module], names: Sequence[str], inputs: Sequence[int],
                    nodes: Sequence[int], droppable: Sequence[bool], num_inputs: int) -> EvalCellPlan:
    """Group a derived cell's ops (op k reads state inputs[k] and feeds node nodes[k]) by the
    state they read and their op name."""
    num_nodes = max(nodes) + 1
    sources: list[tuple[EvalGroup, ...]] = []
    column, bn, bn_op = 0, 0, None
    for state in range(num_inputs + num_nodes - 1):
        by_name: dict[str, list[int]] = {}
        for k, j in enumerate(inputs):
            if j == state:
                by_name.setdefault(names[k], []).append(k)
        groups = []
        for members in by_name.values():
            kind = classify(ops[members[0]])
            kind = "eager" if kind in ("zero", "noise") else kind
            drop = None
            if droppable[members[0]]:
                drop, column = (column, column + len(members)), column + len(members)
            if BN_CHANNELS[kind](1):
                bn += BN_CHANNELS[kind](len(members))
                bn_op = members[0] if bn_op is None else bn_op
            groups.append(EvalGroup(kind, tuple(members), tuple(nodes[k] for k in members), drop))
        sources.append(tuple(groups))
    return EvalCellPlan(tuple(sources), num_inputs, num_nodes, column, bn, bn_op)


def drop_path_masks(columns: Sequence[int], drop_prob: DropProb, like: torch.Tensor) -> list[torch.Tensor | None]:
    """The drop-path masks of a network's derived cells, all from one draw: cell i gets a
    (batch, columns[i]) view (one column per droppable op, `EvalCellPlan.droppable`) of one
    Bernoulli(1 - p) draw scaled by 1/(1 - p), in `like`'s dtype and device; None where it has no
    droppable op, and for every cell at a float p = 0 (`ops.drops`). Three kernels per network
    forward (fill or 1 - p, draw, scale) where a draw per cell took three per cell: 57 fewer per
    spec-size DARTS_V2 retrain step."""
    total = sum(columns)
    if not drops(drop_prob) or total == 0:
        return [None] * len(columns)
    mask = bernoulli_mask((like.shape[0], total), drop_prob, like)
    return [view if n else None for n, view in zip(columns, mask.split(list(columns), dim=1))]


class MaskedAdd(torch.autograd.Function):
    """acc + y·mask for a drop-path mask (B, 1, 1, 1), which needs no gradient: `torch.addcmul`'s
    numbers, but a backward of one product (grad·mask), where addcmul's also scales the mask by
    its `value`, a kernel of its own."""

    @staticmethod
    def forward(ctx, acc: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask)
        return torch.addcmul(acc, y, mask)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mask, = ctx.saved_tensors
        needs_acc, needs_y, _ = ctx.needs_input_grad
        return grad if needs_acc else None, grad * mask if needs_y else None, None


def eval_cell_forward(plan: EvalCellPlan, ops: Sequence[nn.Module], inputs: Sequence[torch.Tensor],
                      channels: int, drop_mask: torch.Tensor | None, sink: BatchNormSink,
                      constants: dict[tuple, torch.Tensor], dense: bool = False,
                      preprocess: Sequence[nn.Module] = ()) -> list[torch.Tensor]:
    """A derived cell's states after its inputs (its nodes), state by state: every op reading a
    state in one pass (`dense`: separable convs as one dense conv each), in training or
    evaluation mode (`sink.training`). Outputs, gradients and BN buffers are the eager cell's
    (summation order aside). `drop_mask` (training only; `drop_path_masks`): drop-path's
    per-sample factors, a column per droppable op in the plan's group order, so other random
    numbers than the eager cell's per-op draws, from the same distribution.

    `preprocess`: one module per input (a DARTS cell's ReLUConvBN or FactorizedReduce), run first
    through the same kinds, weight gather and BN buffer as the ops (no cast of their own under
    autocast; FactorizedReduce as one conv); then the preprocessed inputs come first in the
    returned states."""
    pre_groups, inputs = _preprocess_groups(preprocess, inputs)
    # the two ReLUConvBNs as one where they can be (`_paired_preprocess`): most cells of a DARTS
    # network, whose inputs are the two previous cells' outputs
    paired = _paired_preprocess(pre_groups, inputs)
    pre_groups = paired or pre_groups
    op_groups = [(g.kind, [ops[k] for k in g.ops]) for groups in plan.sources for g in groups]
    groups_in_order = pre_groups + op_groups
    # any of the cell's grouped BNs: the buffer's dtype and device
    bn = next((m for kind, mods in groups_in_order if BN_CHANNELS[kind](1) for m in mods[0].modules()
               if isinstance(m, nn.BatchNorm2d)), None)
    x0 = inputs[-1]
    mask = drop_mask if sink.training else None
    layout = _dense_layout(dense, x0)

    def requests() -> list[Request]:         # a paired preprocessing's group reads its 2 states side by side
        return [r for kind, mods in pre_groups for r in REQUESTS[kind](mods, layout, len(mods))] + \
            [r for kind, mods in op_groups if kind in REQUESTS for r in REQUESTS[kind](mods, layout, 1)]
    ws = iter(sink.begin(CellNeeds(
        (id(plan), id(ops), layout, tuple(map(id, preprocess)), paired is not None) if sink.network is not None else (),
        requests, plan.bn_channels * channels + sum(b.num_features for b in _grouped_bns(pre_groups)), bn,
        lambda: _grouped_bns(groups_in_order)),
        cached_on(constants, x0.device), autocast_dtype(x0.device.type)))
    if paired:
        states = _run_paired_preprocess(paired, inputs, sink, dense, ws)[1]
    else:
        states = _run_preprocess(pre_groups, inputs, sink, dense, ws) or list(inputs)
    totals: list[torch.Tensor | None] = [None] * plan.num_nodes
    for state, groups in enumerate(plan.sources):
        if state >= plan.num_inputs:
            states.append(totals[state - plan.num_inputs])   # complete: no later state feeds it
        src = _Source(states[state], sink, {}, dense)
        for g in groups:
            out = KINDS[g.kind]([ops[k] for k in g.ops], src, (), None, ws)   # (B, n or 1, C, H, W)
            if mask is not None and g.drop is not None:
                drop = mask[:, g.drop[0]:g.drop[1], None, None, None]
                node = g.nodes[0]
                if len(g.ops) == 1 and totals[node] is not None:
                    # one op into a node with a sum already (DARTS_V2's dil_conv): its mask in the
                    # add, one kernel where a product and a sum took two
                    totals[node] = MaskedAdd.apply(totals[node], out.squeeze(1), drop.squeeze(1))
                    continue
                out = out * drop
            # unbind, not out[:, u]: its backward is one stack, not a zero-filled gradient per op
            parts = out.unbind(1) if out.shape[1] > 1 else [out.squeeze(1)] * len(g.nodes)
            for node, y in zip(g.nodes, parts):
                totals[node] = y if totals[node] is None else totals[node] + y
    # the last node feeds no state
    return states[0 if pre_groups else plan.num_inputs:] + [totals[-1]]
