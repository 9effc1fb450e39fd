"""The speed machinery the search loop and `train` share: CUDA graphs of a whole training step,
and the trace limit of torch.compile'd calls.

A step captured once and replayed removes the host's per-kernel launch cost, which bounds the
small-kernel steps of NAS (bench/RESULTS.md: 1.8-4.1x over the fused step alone on an H100). Callers keep their own static
buffers and warm-up logic; tests replace `cuda_graph` with a plain re-run of the step.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Protocol

import torch


class StepGraph(Protocol):
    def replay(self) -> None: ...


def cuda_graph(step: Callable[[], None]) -> StepGraph:
    """Capture `step` (which must not read the host) into a CUDA graph; nothing runs yet.

    The allocator's cached blocks are returned to the driver first. A capture allocates from a
    private pool that no other allocation shares, so each epoch's capture could stack a new pool
    on blocks nothing reuses: the warm-up steps' (cached for their side stream) and the previous
    epoch's dropped graph's. The likely cause of a 2-epoch DARTS_V2 retrain on an H200 holding
    22.8 GB for a 7.3 GB allocated peak (bench/RESULTS.md, 2026-12-04); not re-measured since.
    Once per epoch: costs nothing measurable.
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
