"""The kernels a fused search step's batch norms, grouped convs and node sums get, and their GPU time (issue 4).

    python bench/kernels.py                 # on the GPU: --json out.json for the figures
    python bench/kernels.py --device cpu    # a smoke run of the same code (CPU times say nothing)

Two questions the H200 profiles of 2026-12-04 left open (bench/RESULTS.md), each at the shapes
of the spec's searches, forward + backward:

- **Batch norm.** A training-mode `F.batch_norm` per way of calling it: torch runs its own
  kernels unless γ and β are both given (then cuDNN's, fp32 only); channels-last inputs take
  torch's channels-last kernels. The fused cells call it without β (α folded into γ) or without
  either (pooling BNs, affine=False).
- **Grouped convs.** A DARTS reduction cell's paired pass (both inputs side by side, stride 2)
  runs each kind's composed k×k conv with groups=2; the profile of a bf16 step showed 16 calls
  of cuDNN's legacy `dgrad_engine` taking 12 ms of a 93.5 ms step, and channels-last grouped
  convs launch `nhwcSliceCKernel` per group. Each grouped conv is timed beside the same
  function as one block-diagonal dense conv (groups=1: `groups`× the multiply-adds; what
  `fused_dense` now runs in a reduction cell, `search.block_diagonal`) and as one conv per group.
- **Node sums** (added with 2026-12-04's third session, not yet run on a GPU). A pass's terms
  go into its node sums as one cat and one batched matrix product (`nascore.fused.mix`,
  `search.matmul_mix`) instead of one weighted add per op kind and sums per merged group and
  paired pass (`chained`). Fewer kernels; but channels_last makes the product one tiny matrix
  product per pixel (65,536 of them at b64, 32×32), whose speed in cuBLAS only a GPU can tell.
  `blocks`: the columns in two products, the second over one tensor that needs no cat (what a
  pass runs when its last BNs are one, `search.merge_batch_norms`).

On CUDA each case is captured in a CUDA graph and replayed `--iters` times between CUDA events, so
the figure is the kernels' time, not the host's: an eager call of a small BN costs ~200 µs of
Python and launches, more than its kernels (the first version of this script timed eager calls
on 2026-12-04 and measured mostly that).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # nascore from this checkout
from nascore.fused import SumStates, _weighted_add, block_diagonal, cached_on, mix  # noqa: E402
from nascore.graphs import cuda_graph, side_stream  # noqa: E402

# --- batch norm ---------------------------------------------------------------------------------
# (label, (batch, channels, height, width)): grouped BNs of the fused cells at the spec sizes
BN_SHAPES = [
    ("darts b64, 4 units x 16 ch", (64, 64, 32, 32)),
    ("darts b64, 2 states x 4 units x 32 ch, reduced", (64, 256, 16, 16)),
    ("pc_darts b256, 4 units x 4 ch", (256, 16, 32, 32)),
    ("pc_darts b256, 2 states x 4 units x 4 ch", (256, 32, 32, 32)),
    ("nb201 b64, 2 units x 16 ch", (64, 32, 32, 32)),
    ("retrain b96, 36 ch", (96, 36, 32, 32)),
]
BN_WAYS = ["native", "native+weight", "cudnn", "native+cl", "cudnn+cl", "native+cl+bf16", "cudnn+cl+bf16"]


def bn_case(way: str, shape: tuple[int, ...], device: torch.device) -> tuple[Callable[[], None], int]:
    """A BN forward + backward called `way`, and the fewest bytes it must move."""
    cl, bf16 = "+cl" in way, "+bf16" in way
    x = torch.randn(shape, device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    c = shape[1]
    # cuDNN's kernels need γ and β (and an fp32/fp16 input: in bf16 both ways run torch's kernels)
    affine = way.startswith("cudnn")
    weight = torch.rand(c, device=device, requires_grad=True) if affine or "+weight" in way else None
    bias = torch.zeros(c, device=device, requires_grad=True) if affine else None
    mean, var = torch.zeros(c, device=device), torch.ones(c, device=device)
    dy = torch.randn_like(x)

    def step() -> None:
        F.batch_norm(x, mean, var, weight, bias, True, 0.1, 1e-5).backward(dy)
    return step, 5 * x.numel() * x.element_size()      # fwd: read x, write y; bwd: read x, dy, write dx


# --- grouped convs ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvShape:
    label: str
    batch: int
    in_channels: int          # all groups together
    out_channels: int
    size: int                 # input height = width
    kernel: int
    stride: int
    dilation: int
    groups: int

    def flops(self) -> int:
        """The grouped conv's own multiply-adds ×2, forward + input gradient + weight gradient."""
        out = (self.size - 1) // self.stride + 1          # "same" padding
        return 3 * 2 * self.batch * self.out_channels * out * out * (self.in_channels // self.groups) * self.kernel ** 2


CONV_SHAPES = [
    # fused_dense, DARTS search (16 ch, 8 cells, b64), as it runs since 42cd9ee: a state's 3×3 and
    # 5×5 convs of one kind as one 5×5 conv (2 kinds × 4 edges per state). The first reduction
    # cell's paired pass (2 states × 32 ch in): sep stage 1 and dil, both stride 2; fused_dense
    # runs these block-diagonal (`nascore.fused.block_diagonal`), grouped before
    ConvShape("reduction pair, sep 5x5 s2", 64, 64, 512, 32, 5, 2, 1, 2),
    ConvShape("reduction pair, dil 5x5 d2 s2", 64, 64, 512, 32, 5, 2, 2, 2),
    # a normal cell's paired pass (2 states × 16 ch), stride 1: grouped
    ConvShape("normal pair, sep 5x5", 64, 32, 256, 32, 5, 1, 1, 2),
    # a sep conv's second stage: one group per unit (2 states × 2 kinds × 4 edges, 16 ch each)
    ConvShape("sep stage 2, 16 units, 5x5", 64, 256, 256, 32, 5, 1, 1, 16),
]
CONV_WAYS = ["grouped", "block_diagonal", "per_group"]
CONV_DTYPES = ["fp32", "fp32+cl", "bf16+cl"]


def conv_case(shape: ConvShape, way: str, dtype: str, device: torch.device
              ) -> tuple[Callable[[], None], Callable[[], torch.Tensor]]:
    """A conv forward + backward computed `way`, and the forward alone (the ways must agree)."""
    s = shape
    fmt = torch.channels_last if "+cl" in dtype else torch.contiguous_format
    dt = torch.bfloat16 if dtype.startswith("bf16") else torch.float32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s.batch, s.in_channels, s.size, s.size, generator=g).to(device, dt)
    w = torch.randn(s.out_channels, s.in_channels // s.groups, s.kernel, s.kernel, generator=g).to(device, dt) * 0.1
    if way == "block_diagonal":                 # what the fused cells build, made once here
        w = block_diagonal(w, s.groups, cached_on({}, w.device))
    x = x.contiguous(memory_format=fmt).requires_grad_(True)
    w = w.contiguous(memory_format=fmt).requires_grad_(True)
    pad = s.dilation * (s.kernel - 1) // 2
    o, i = s.out_channels // s.groups, s.in_channels // s.groups

    def forward() -> torch.Tensor:
        if way == "grouped":
            return F.conv2d(x, w, None, s.stride, pad, s.dilation, s.groups)
        if way == "block_diagonal":
            return F.conv2d(x, w, None, s.stride, pad, s.dilation, 1)
        return torch.cat([F.conv2d(x[:, k * i:(k + 1) * i], w[k * o:(k + 1) * o], None, s.stride, pad, s.dilation)
                          for k in range(s.groups)], 1)
    with torch.no_grad():
        dy = torch.randn_like(forward())

    def step() -> None:
        forward().backward(dy)
    return step, forward


# --- node sums ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MixShape:
    """A pass's terms: `states` inputs side by side, `broadcast` parameter-free outputs per state
    (identity, pooling: one output for all `targets`, weighted by α), `merged` conv groups per
    state of `repeats`·targets units each (α already in their BN)."""

    label: str
    batch: int
    channels: int
    size: int
    states: int
    targets: int
    broadcast: int
    merged: int
    repeats: int = 2


MIX_SHAPES = [
    # a DARTS normal cell's paired pass at stage 1 (b64, 16 ch, 32×32): max/avg pool, skip;
    # sep and dil 3×3+5×5 merged
    MixShape("darts paired pass, 16 ch", 64, 16, 32, 2, 4, 3, 2),
    MixShape("darts node pass, 3 targets", 64, 16, 32, 1, 3, 3, 2),
    # PC-DARTS (b256, 16/4 ch through the ops)
    MixShape("pc_darts paired pass, 4 ch", 256, 4, 32, 2, 4, 3, 2),
    # NB201's first state (b64, 16 ch): skip, avg pool; 1×1+3×3 merged
    MixShape("nb201 first state, 16 ch", 64, 16, 32, 1, 3, 2, 1),
]
# mix: one cat of every output, one product; blocks: the first output alone and the rest as one
# tensor (a pass's one BN output, `fused.batch_norm_pass`), one product each, no cat
MIX_WAYS = ["mix", "blocks", "chained"]
MIX_DTYPES = ["fp32", "fp32+cl", "bf16+cl"]


def mix_case(shape: MixShape, way: str, dtype: str, device: torch.device
             ) -> tuple[Callable[[], None], Callable[[], torch.Tensor]]:
    """A pass's node sums, forward + backward with α's gradient (an α step), computed `way`, and
    the forward alone (the ways must agree)."""
    s = shape
    fmt = torch.channels_last if "+cl" in dtype else torch.contiguous_format
    dt = torch.bfloat16 if dtype.startswith("bf16") else torch.float32
    g = torch.Generator().manual_seed(0)
    n, units = s.targets, s.repeats * s.targets

    def output(u: int) -> torch.Tensor:           # (B, [S,] u, C, H, W): a view of a 4D conv/BN output
        t = torch.randn(s.batch, s.states * u * s.channels, s.size, s.size, generator=g)
        t = t.to(device, dt).contiguous(memory_format=fmt).requires_grad_(True)
        return t.unflatten(1, (s.states, u, -1)) if s.states > 1 else t.unflatten(1, (u, -1))
    broadcast = [output(1) for _ in range(s.broadcast)]
    merged = [output(units) for _ in range(s.merged)]
    alpha = torch.rand(s.broadcast, s.states, n, generator=g).to(device).requires_grad_(True)
    # mix's matrix: per broadcast output and state, its α over the targets; per merged unit a 1
    ones = torch.zeros(n, s.merged * s.states * units, device=device)
    for j in range(ones.shape[1]):
        ones[j % units % n, j] = 1.0
    leaves = [t._base for t in broadcast + merged] + [alpha]
    if way == "blocks":          # the same columns, all but the first output's as one tensor
        rest = torch.cat([t.flatten(1, t.dim() - 3) for t in broadcast[1:] + merged], 1).detach().requires_grad_(True)
        leaves = [broadcast[0]._base, rest, alpha]

    def forward() -> torch.Tensor:
        a = alpha.to(dt)
        if way in ("mix", "blocks"):
            m = torch.cat([a.flatten(0, 1).t(), ones.to(dt)], 1)     # (targets, columns)
            blocks = [broadcast + merged] if way == "mix" else [broadcast[:1], [rest]]
            return mix(None, m, blocks, s.broadcast * s.states)
        acc = None
        for b, w in zip(broadcast, a):
            w = w.view(1, s.states, n, 1, 1, 1) if s.states > 1 else w.view(1, n, 1, 1, 1)
            acc = _weighted_add(acc, b, w, None, n)
        for t in merged:
            acc = _weighted_add(acc, t, None, None, n, s.repeats)
        return SumStates.apply(acc) if s.states > 1 else acc
    with torch.no_grad():
        dy = torch.randn_like(forward())

    def step() -> None:
        torch.autograd.grad(forward(), leaves, dy)
    return step, forward


# --- timing -------------------------------------------------------------------------------------
def time_us(step: Callable[[], None], device: torch.device, iters: int) -> float:
    """µs per call: on CUDA the replays of a graph holding one call (the kernels' time, no host),
    on the CPU the wall time of plain calls."""
    if device.type != "cuda":
        step()
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        return 1e6 * (time.perf_counter() - t0) / iters
    with side_stream(device):                 # warm-up off the capture stream, as the search does
        for _ in range(3):
            step()
    graph = cuda_graph(step)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / iters


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=None, help="timed calls per case (default: 50 on CUDA, 2 on CPU)")
    p.add_argument("--parts", default="bn,conv,mix", help="comma-separated: bn, conv, mix")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    iters = args.iters or (50 if device.type == "cuda" else 2)
    torch.backends.cudnn.benchmark = False      # the search's default
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
          f"{'CUDA-graph replays' if device.type == 'cuda' else 'plain calls'}, {iters} per case", flush=True)
    rows: list[dict] = []

    def save() -> None:                        # after every case: a run cut short keeps its figures
        if args.json:
            tmp = args.json.with_suffix(".tmp")
            tmp.write_text(json.dumps({"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                                       "timing": "graph" if device.type == "cuda" else "wall", "rows": rows},
                                      indent=1))
            tmp.replace(args.json)
    parts = args.parts.split(",")
    if "bn" in parts:
        print(f"{'batch norm':<48} {'way':<15} {'us fwd+bwd':>10} {'GB/s':>7}")
        for label, shape in BN_SHAPES:
            for way in BN_WAYS:
                step, least = bn_case(way, shape, device)
                us = time_us(step, device, iters)
                rows.append({"part": "bn", "shape": label, "dims": list(shape), "way": way, "us": us,
                             "gb_per_s": least / us / 1e3})
                print(f"{label:<48} {way:<15} {us:10.1f} {least / us / 1e3:7.0f}", flush=True)
                save()
    def grid(part: str, shapes: list, dtypes: list[str], ways: list[str], case: Callable, head: str,
             figure: Callable[[Any, float], dict[str, float]]) -> None:
        """Every shape × dtype × way of `part`, timed; `figure(shape, us)` adds a rate to the row."""
        print(f"{head:<32} {'dtype':<8} {'way':<15} {'us fwd+bwd':>10}")
        for shape in shapes:
            for dtype in dtypes:
                for way in ways:
                    step, _ = case(shape, way, dtype, device)
                    us = time_us(step, device, iters)
                    extra = figure(shape, us)
                    rows.append({"part": part, "shape": shape.label, "dtype": dtype, "way": way, "us": us, **extra})
                    print(f"{shape.label:<32} {dtype:<8} {way:<15} {us:10.1f}"
                          + "".join(f" {k} {v:.2f}" for k, v in extra.items()), flush=True)
                    save()
    if "conv" in parts:
        # TFLOP/s of the grouped conv's own work, whichever way computes it
        grid("conv", CONV_SHAPES, CONV_DTYPES, CONV_WAYS, conv_case, "conv",
             lambda shape, us: {"tflop_per_s": shape.flops() / us / 1e6})
    if "mix" in parts:
        grid("mix", MIX_SHAPES, MIX_DTYPES, MIX_WAYS, mix_case, "node sums", lambda shape, us: {})
    return rows


if __name__ == "__main__":
    main()
