"""The speed machinery the search loop and `train` share: CUDA graphs of a whole training step,
the trace limit of torch.compile'd calls, and a check of the CPU's bf16 channels_last convs
(refused where this torch gets them wrong; inductor kept from choosing them there).

A step captured once and replayed removes the host's per-kernel launch cost, which bounds the
small-kernel steps of NAS (bench/RESULTS.md: 1.8-4.1x over the fused step alone on an H100). Callers keep their own static
buffers and warm-up logic; tests replace `cuda_graph` with a plain re-run of the step, or with a
replay of its recorded ops (tests/_graph_tape.py), which freezes what a graph freezes.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn


class StepGraph(Protocol):
    def replay(self) -> None: ...


def cuda_graph(step: Callable[[], None]) -> StepGraph:
    """Capture `step` (which must not read the host) into a CUDA graph; nothing runs yet.

    The allocator's cached blocks are returned to the driver first. A capture allocates from a
    private pool that no other allocation shares, so each epoch's capture could stack a new pool
    on blocks nothing reuses: the warm-up steps' (cached for their side stream) and the previous
    epoch's dropped graph's. The likely cause of a 2-epoch DARTS_V2 retrain on an H200 holding
    22.8 GB for a 7.3 GB allocated peak (bench/RESULTS.md, 2026-12-04); not re-measured since.
    Once per run, or per op stage (search; `SearchRun._epoch_steps`): costs nothing measurable.
    Tests capture with a CPU stand-in that keeps a graph's contract (tests/_graph_tape.py).
    """
    torch.cuda.empty_cache()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


@contextlib.contextmanager
def side_stream(device: torch.device) -> Iterator[None]:
    """Warm-up steps before a capture run on a side stream, so that their lazy initialisations
    stay off the stream the capture will record (the recipe of torch.cuda.graph's documentation)."""
    if device.type != "cuda":
        yield
        return
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream(device).wait_stream(side)


# Dynamo keeps at most `recompile_limit` (8) traces of one function, then runs it eagerly with a
# warning. A search needs more: a cell scope traces each kind of call (3 in a first-order search,
# 4 in a second-order one) per cell shape (DARTS: 5), and OPP-DARTS traces again per op stage. A
# retrain traces 3-4 times, but a process that trains several configurations (the bench) adds them up.
RECOMPILE_LIMIT = 256


@contextlib.contextmanager
def more_traces() -> Iterator[None]:
    """torch.compile'd calls inside may keep `RECOMPILE_LIMIT` traces of one function."""
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        yield


def compiled_call(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` for a `torch.compile`d `fn`, allowed `RECOMPILE_LIMIT` traces."""
    with more_traces():
        return fn(*args)


def cpu_bf16_dilated_grads_ok(memory_format: torch.memory_format = torch.channels_last) -> bool:
    """Whether this torch computes a bf16 channels_last dilated conv's weight gradient on the CPU
    right (`memory_format`: the probe's layout). torch 2.14.1's does not (oneDNN): at 32×32 px a
    depthwise dilated conv's (an eager `dil_conv`'s), and a dense one's whose channel count is no
    multiple of 16 (a `fused_dense` retrain's, 36 channels), are off by relative errors of 1 and
    more, at times 1e33 or NaN, from batch 4 on, while a dense 16- or 32-channel one and every
    one at 16×16 px are right (bench/RESULTS.md, 2026-12-05 and 2026-12-06). So the probe runs
    one of each of the two kinds at that size against a float64 reference (a few tens of ms)
    and is not assumed from a version number: a single dense 16-channel probe passed on a torch
    whose retrain then stopped on a NaN."""
    g = torch.Generator().manual_seed(0)
    for channels, groups in ((16, 16), (36, 1)):          # depthwise; dense, channels % 16 != 0
        x = torch.randn(4, channels, 32, 32, generator=g, dtype=torch.float64)
        w = torch.randn(channels, channels // groups, 3, 3, generator=g, dtype=torch.float64) * 0.1
        grad_out = torch.randn(4, channels, 32, 32, generator=g, dtype=torch.float64)
        weight = w.to(torch.bfloat16).contiguous(memory_format=memory_format).requires_grad_(True)
        y = F.conv2d(x.to(torch.bfloat16).contiguous(memory_format=memory_format), weight, padding=2,
                     dilation=2, groups=groups)
        (got,) = torch.autograd.grad(y, weight, grad_out.to(torch.bfloat16).contiguous(memory_format=memory_format))
        expected = torch.nn.grad.conv2d_weight(x, w.shape, grad_out, padding=2, dilation=2, groups=groups)
        error = (got.double() - expected).abs().max() / expected.abs().max()
        if not (bool(torch.isfinite(error)) and float(error) < 0.05):
            return False
    return True


def _trains_dilated_convs(model: nn.Module) -> bool:
    """Whether `model` learns a dilated conv's weights (the DARTS space's `dil_conv` ops; random
    features' frozen convs need no weight gradient)."""
    return any(isinstance(m, nn.Conv2d) and max(m.dilation) > 1 and m.weight.requires_grad
               for m in model.modules())


def _cpu_bf16_dilated_grads_wrong(model: nn.Module, device: torch.device, amp: str,
                                  grads_ok: Callable[[], bool] | None) -> bool:
    """Whether `model` trained in `amp` on `device` would reach a channels_last bf16 dilated
    conv's weight gradient that this torch gets wrong. Probes only where it matters: the probe
    costs two convs at 32×32 px."""
    if device.type != "cpu" or amp != "bf16" or not _trains_dilated_convs(model):
        return False
    return not (grads_ok or cpu_bf16_dilated_grads_ok)()


def bf16_layout_problem(model: nn.Module, device: torch.device, amp: str, channels_last: bool,
                        grads_ok: Callable[[], bool] | None = None) -> str | None:
    """What is wrong with running `model` with `amp` and `channels_last` on `device`, or None: on
    a CPU whose bf16 channels_last dilated convs get their weight gradients wrong (`grads_ok`),
    a network that trains such a conv's weights (the DARTS space's `dil_conv` ops; random
    features' frozen convs need none) would learn from garbage, silently or with a NaN."""
    if not channels_last or not _cpu_bf16_dilated_grads_wrong(model, device, amp, grads_ok):
        return None
    return ("amp: bf16 with channels_last: true on the CPU: this torch "
            f"({torch.__version__}) computes the weight gradients of bf16 channels_last dilated "
            "convolutions (dil_conv ops) wrong on the CPU (checked at start-up); on the CPU set "
            "amp: none or channels_last: false (GPUs are not affected)")


def inductor_options(model: nn.Module, device: torch.device, amp: str,
                     grads_ok: Callable[[], bool] | None = None) -> dict[str, Any]:
    """The inductor options (`torch.compile(..., options=)`) under which a compiled training
    step of `model` computes right: none, except on a CPU whose bf16 channels_last dilated convs
    get their weight gradients wrong (`bf16_layout_problem`). There inductor's layout
    optimisation, which runs an NCHW network's convs channels_last where it judges that faster,
    reaches those wrong gradients although the run asked for NCHW: a compiled bf16 retrain's
    depthwise `dil_conv` weight gradients came out 1e26 off, and at the spec's size the run
    stopped on a NaN at its first compiled step (bench/RESULTS.md, 2026-12-07). So it is off
    there, which leaves every conv in the layout the run chose."""
    if _cpu_bf16_dilated_grads_wrong(model, device, amp, grads_ok):
        return {"layout_optimization": False}
    return {}
