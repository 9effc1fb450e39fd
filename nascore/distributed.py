"""Process-group setup for `torchrun`, and the few collectives the training loop needs.

One entry point serves 1 and N processes: without torchrun's variables (RANK, WORLD_SIZE,
LOCAL_RANK) `init_distributed` returns world size 1 and every collective here is a no-op, so the
loop has no `if distributed:` branches beyond wrapping the model in DistributedDataParallel.
The process group itself is torch's (process-wide); nothing is cached in this module.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, number of processes, GPU index on its node."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and tracks; the other ranks only compute."""
        return self.rank == 0


def init_distributed(device_type: str | None = None) -> DistInfo:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU), or describe a lone process.

    `device_type` ("cuda" / "cpu") overrides the default: CUDA when a GPU is visible. Under
    torchrun each process takes GPU `LOCAL_RANK`; a lone process takes the current GPU.
    """
    use_cuda = torch.cuda.is_available() if device_type is None else device_type == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device_type='cuda' was asked for but no CUDA device is visible")
    present = [v for v in _TORCHRUN_VARS if v in os.environ]
    if not present:
        device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        return DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    if len(present) != len(_TORCHRUN_VARS):
        missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
        raise RuntimeError(f"found {', '.join(present)} but not {', '.join(missing)} in the "
                           f"environment; launch with torchrun, or set none of them")
    rank, world_size, local_rank = (int(os.environ[v]) for v in _TORCHRUN_VARS)
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA "
                               f"devices are visible; use --nproc_per_node <= the GPU count")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        # device_id binds NCCL to this process's GPU at init, so collectives and barriers never
        # guess a device (and never touch GPU 0 from every rank).
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                device_id=device if use_cuda else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def destroy_distributed() -> None:
    """Leave the process group (call at the end of a torchrun entry point); no-op when alone."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    return dist.get_rank() if _active() else 0


def barrier() -> None:
    if _active():
        dist.barrier()


_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def all_reduce_(tensor: torch.Tensor, op: Literal["sum", "min", "max"] = "sum") -> torch.Tensor:
    """Reduce `tensor` in place across ranks (queued on the GPU stream: no host sync)."""
    if _active():
        dist.all_reduce(tensor, op=_OPS[op])
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, indexed by rank (`[obj]` when alone)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank.

    DDP syncs buffers at the start of each forward, so after an epoch's last step every rank still
    holds statistics from its own shard; this makes the replicas identical before they are
    evaluated and saved. Once per epoch, so a plain loop over buffers costs nothing that matters.
    """
    if _active():
        for buf in module.buffers():
            dist.broadcast(buf, src=0)
