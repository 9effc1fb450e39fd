"""Model size and cost: parameter counts and FLOPs as NAS papers report them (methods.md §1.1),
and the GPU memory a run holds (`peak_memory`).

Parameters: papers exclude the auxiliary head (it is dropped at test time), so
`count_parameters` does too by default.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode`, which counts only matrix-multiply-like
aten ops (convolutions, linear/mm/addmm, bmm, attention) at 2 FLOPs per multiply-add; we report
those FLOPs and MACs = FLOPs / 2.

Why this differs from the "FLOPs" in NAS papers (e.g. DARTS on ImageNet: 574M, while the conv +
linear count here gives ~530M multiply-adds for DARTS_V2 at 224 px):
- The papers' "FLOPs" are multiply-adds (MACs), not 2×MACs: compare their figure with `macs`,
  never with `flops` (which would be ~1060M).
- Their counters (ad-hoc per-module hooks, profilers) use conventions they do not state: some
  also charge BatchNorm, ReLU, pooling windows and the node sums, one "operation" per output
  element or more. These cheap layers cannot close the whole gap: for DARTS_V2 at 224 px
  BN + ReLU + pooling outputs total only ~11M elements, so the rest of the 44M is a convention
  of the unpublished counter behind the paper's figure, and we make no attempt to reproduce it.
- The conv + linear MAC count is the convention-free figure every counter agrees on, and the
  one methods.md tabulates (506/530/571/582/536M for the five published cells at 224 px).
  FlopCounterMode ignores element-wise layers because their cost is memory traffic, not
  arithmetic, and it leaves out bias additions (NB201's table adds them: +num_classes).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .networks import AuxiliaryHead

__all__ = ["count_parameters", "params_m", "FlopReport", "count_flops"]


def _auxiliary_parameter_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for name, module in model.named_modules():
        # isinstance for our heads; the name test catches auxiliary heads of foreign models
        # (the DARTS reference names the module `auxiliary_head`)
        if isinstance(module, AuxiliaryHead) or name.split(".")[-1].startswith("auxiliary"):
            ids.update(id(p) for p in module.parameters())
    return ids


def count_parameters(model: nn.Module, exclude_auxiliary: bool = True) -> int:
    """Number of parameters (shared tensors once); the auxiliary head excluded by default."""
    skip = _auxiliary_parameter_ids(model) if exclude_auxiliary else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def params_m(model: nn.Module, exclude_auxiliary: bool = True) -> float:
    """Parameters in millions, as papers print them (3.349342 → "3.3M")."""
    return count_parameters(model, exclude_auxiliary) / 1e6


@dataclass(frozen=True)
class FlopReport:
    """Cost of one forward pass in eval mode (no auxiliary head, no drop-path).

    `flops`: FlopCounterMode's total (2 per multiply-add); `macs`: multiply-adds, the unit papers
    call "FLOPs"; `by_op`: FLOPs per aten op (e.g. `convolution`, `addmm`).
    """

    input_size: tuple[int, ...]
    flops: int
    by_op: dict[str, int] = field(default_factory=dict)

    @property
    def macs(self) -> int:
        # Every op FlopCounterMode counts is a multiply-accumulate kernel counted at 2 FLOPs each.
        return self.flops // 2

    @property
    def macs_m(self) -> float:
        return self.macs / 1e6

    def __str__(self) -> str:
        ops = ", ".join(f"{k} {v / 2e6:.1f}M" for k, v in sorted(self.by_op.items()))
        return f"{self.macs_m:.1f}M MACs ({self.flops / 1e6:.1f}M FLOPs) at {self.input_size}: {ops}"


def count_flops(model: nn.Module, input_size: Sequence[int] = (1, 3, 32, 32)) -> FlopReport:
    """Count a forward pass of a zero input of `input_size` with FlopCounterMode.

    Runs in eval mode under no_grad (so auxiliary heads and drop-path are off, as at test time)
    on the model's device and dtype, and restores the model's train/eval state afterwards.
    """
    ref = next(iter(model.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    x = torch.zeros(tuple(input_size), device=device, dtype=dtype)
    was_training = model.training
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    by_op = {getattr(op, "__name__", str(op)).split(".")[0]: int(n)
             for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return FlopReport(input_size=tuple(input_size), flops=int(counter.get_total_flops()),
                      by_op=by_op)


# --- GPU memory of a run --------------------------------------------------------------------------
def reset_peak_memory(device: torch.device) -> None:
    """Start a new span (an epoch) for `peak_memory`; nothing off CUDA."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """The device's peak memory since `reset_peak_memory`, in MiB: `peak_memory_mb`, what tensors
    held at most (the figure papers compare: PC-DARTS' partial channels exist to lower it), and
    `peak_reserved_mb`, what the caching allocator held, CUDA graph pools included (a captured
    step's intermediates live there, out of the first figure). Empty off CUDA, where torch keeps
    no such statistics."""
    if device.type != "cuda":
        return {}
    return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20}


def run_peak_memory(history: Sequence[dict], key: str = "peak_memory_mb") -> float | None:
    """The largest `key` (a `peak_memory` figure) of a run's epochs; None where none was measured
    (CPU)."""
    return max((r[key] for r in history if r.get(key) is not None), default=None)
