"""Op schedules: which candidate ops take part in the search, epoch by epoch.

- `all`          every op from the first step (DARTS and most methods).
- `progressive`  OPP-DARTS (methods.md §2.5): one parametric op to start, then one op per stage,
                 the op whose addition makes the supernet's training loss LARGEST entering next,
                 and `skip_connect` last.

A schedule acts at two points of the shared search loop: `initialise` before the first epoch and
`on_epoch_start` at every epoch. It changes the supernet's active op columns and asks the loop to
reset the optimisers; it keeps what it needs to resume in `state_dict`.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
import torch.nn.functional as F

from .registry import Registry
from .supernet import Supernet

HELD_BACK = "skip_connect"     # enters last: removes its head start (OPP-DARTS)


class ScheduleHost(Protocol):
    """What a schedule may ask of the search loop."""

    model: Supernet

    def build_model(self) -> Supernet: ...
    def score_batches(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]: ...
    def reset_optimisers(self, epoch: int) -> None: ...
    def log(self, message: str) -> None: ...


@dataclass(frozen=True)
class ProgressiveConfig:
    stage_epochs: int = 2          # one op enters every 2 epochs (epochs 2, 4, ..., 12)
    skip_after_epoch: int = 12     # skip_connect enters at the first stage boundary after this (14)
    score_fraction: float = 1.0    # share of the weight split scored per candidate (1 = full pass)


class AllOps:
    name = "all"

    def initialise(self, host: ScheduleHost) -> None:
        pass

    def on_epoch_start(self, host: ScheduleHost, epoch: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def progressive_timeline(num_candidates: int, epochs: int, stage_epochs: int = 2,
                         skip_after_epoch: int = 12, has_skip: bool = True) -> dict[int, str]:
    """Epoch -> "candidate" | "skip": when the next op enters (methods.md §2.5 loop).

    A candidate enters at every stage boundary (epoch > 0, epoch % stage_epochs == 0) while any
    remain; skip_connect enters at the first boundary after `skip_after_epoch` once none remain.
    """
    timeline: dict[int, str] = {}
    remaining, skip_in = num_candidates, not has_skip
    for epoch in range(1, epochs):
        if epoch % stage_epochs:
            continue
        if remaining > 0:
            timeline[epoch] = "candidate"
            remaining -= 1
        elif not skip_in and epoch > skip_after_epoch:
            timeline[epoch] = "skip"
            skip_in = True
    return timeline


def mean_train_loss(model: Supernet, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean CE over `batches` with no gradients, BN in train mode and drop-path off.

    Scored on `model` itself, which comes back as it was: its BN running statistics (⚠ the
    reference code scores in eval mode after a validation pass, an artefact; methods.md §2.5),
    its modules' train/eval modes and its drop-path probability. Not on a copy: a deepcopy walks
    every module of the supernet: 0.47 s at the spec's DARTS size on a CPU, two per candidate. Through the
    uncompiled forward, as a copy ran: a compiled supernet would trace and compile every
    candidate's op set for these few no-grad passes.
    """
    with _left_as_it_was(model):
        model.train()
        model.set_drop_path(0.0)     # candidates are compared on the same, undropped computation
        total, count = None, 0
        with torch.no_grad():
            for x, y in batches:
                loss = F.cross_entropy(model.forward_uncompiled(x), y, reduction="sum")
                total = loss if total is None else total + loss
                count += y.numel()
    if not count:
        raise ValueError("no batches to score the candidate ops on")
    return float(total) / count


@contextmanager
def _left_as_it_was(model: Supernet) -> Iterator[None]:
    """Puts back what a no-grad train-mode pass changes: the buffers (BN statistics), the modes
    and the drop-path probability."""
    buffers = _Snapshot(model, parameters=False)
    modes = [(m, m.training) for m in model.modules()]
    drop_path = model.drop_path_probability
    try:
        yield
    finally:
        buffers.restore()
        for m, training in modes:
            m.training = training
        model.set_drop_path(drop_path)


class _Snapshot:
    """A model's tensors as they are now, put back in place by `restore` (one foreach copy: a
    captured step's static tensors stay the ones it reads, and no walk of the module tree as
    `load_state_dict` does, 0.07 s a call at the spec's DARTS size on a CPU), with its active op columns."""

    def __init__(self, model: Supernet, parameters: bool = True) -> None:
        self.model, self.columns = model, model.active_columns()
        self.tensors = [t.detach() for t in model.buffers()]
        if parameters:
            self.tensors += [p.detach() for p in model.parameters()]
        self.saved = [t.clone() for t in self.tensors]

    def restore(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.tensors, self.saved)
        self.model.set_active_columns(self.columns)


class ProgressiveOps:
    """OPP-DARTS' operation-level progressive schedule over the space's (uniform) op list."""

    name = "progressive"

    def __init__(self, cfg: ProgressiveConfig, epochs: int) -> None:
        self.cfg, self.epochs = cfg, epochs
        self.remaining: list[str] = []      # candidate ops not yet in the search (Q)

    def _ops(self, model: Supernet) -> tuple[str, ...]:
        ops = model.space.uniform_ops
        if ops is None:
            raise ValueError(f"op_schedule 'progressive' needs one op list shared by every edge; "
                             f"space {model.space.name!r} has per-edge op lists")
        return ops

    def initialise(self, host: ScheduleHost) -> None:
        """Stage 0: score one fresh supernet per parametric starter; keep the max-loss one."""
        ops = self._ops(host.model)
        starters = [p for p in host.model.space.progressive_start_ops if p in ops]
        if not starters:
            raise ValueError(f"space {host.model.space.name!r} names no parametric op to start a "
                             f"progressive search from")
        losses: dict[str, float] = {}
        nets: dict[str, Supernet] = {}
        for p in starters:
            net = host.build_model() if len(starters) > 1 else host.model
            net.set_active_columns([ops.index(p)])
            losses[p] = mean_train_loss(net, host.score_batches())
            nets[p] = net
        chosen = max(starters, key=lambda p: losses[p])   # ties -> earlier in the starter list
        if nets[chosen] is not host.model:
            host.model.load_state_dict(nets[chosen].state_dict())
        self.remaining = [o for o in ops if o not in (chosen, HELD_BACK)]
        host.log(f"progressive: start with {chosen} (train losses {_fmt(losses)})")

    def _timeline(self, model: Supernet) -> dict[int, str]:
        ops = self._ops(model)
        starters = [p for p in model.space.progressive_start_ops if p in ops]
        n_candidates = len([o for o in ops if o != HELD_BACK]) - (1 if starters else 0)
        return progressive_timeline(n_candidates, self.epochs, self.cfg.stage_epochs,
                                    self.cfg.skip_after_epoch, has_skip=HELD_BACK in ops)

    def on_epoch_start(self, host: ScheduleHost, epoch: int) -> None:
        event = self._timeline(host.model).get(epoch)
        if event is None:
            return
        ops = self._ops(host.model)
        model = host.model
        if event == "candidate":
            # Each candidate is the model as it stands plus op q: its fresh weights and α column
            # drawn on the model itself, scored, and the model put back (a snapshot, not a copy
            # of the supernet per candidate).
            losses: dict[str, float] = {}
            chosen, best = "", None
            stands = _Snapshot(model)
            for q in self.remaining:
                stands.restore()
                model.activate_column(ops.index(q))
                losses[q] = mean_train_loss(model, host.score_batches())
                if not chosen or losses[q] > losses[chosen]:     # ties -> the earlier candidate
                    chosen, best = q, _Snapshot(model)
            # The search goes on with the winning candidate itself (methods.md §2.5: net =
            # cand_argmax_q): its fresh weights and α column are the ones that were scored. Drawing
            # them again would need every RNG the init touched (CUDA's too) put back as it was.
            assert best is not None
            best.restore()
            self.remaining.remove(chosen)
            host.log(f"progressive: epoch {epoch} adds {chosen} (train losses {_fmt(losses)})")
        else:
            model.activate_column(ops.index(HELD_BACK))
            host.log(f"progressive: epoch {epoch} adds {HELD_BACK}")
        host.reset_optimisers(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"remaining": list(self.remaining)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.remaining = list(state["remaining"])


def _fmt(losses: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in losses.items())


OpSchedule = AllOps | ProgressiveOps
OP_SCHEDULES: Registry[Callable[..., OpSchedule]] = Registry("op schedule")
OP_SCHEDULES.register("all", lambda cfg, epochs: AllOps())
OP_SCHEDULES.register("progressive", ProgressiveOps)
