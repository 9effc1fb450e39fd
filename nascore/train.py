"""The one training loop behind "retrain" (CIFAR) and "transfer_imagenet" (methods.md §1.1).

`train` runs SGD over epochs: per epoch it sets the loader's epoch and the network's drop-path
probability, takes the steps (cross-entropy with label smoothing, plus the weighted auxiliary
loss, global-norm gradient clipping), evaluates, appends a record to the history and checkpoints
atomically. The learning rate is a pure function of the epoch (`lr_at`) and every random stream
is restored from the checkpoint, so a run killed after epoch k and restarted with the same call
continues exactly where it stopped. Under `torchrun` the same call trains data-parallel.

Speed rules the step loop: metrics stay on the device and are read once per epoch, so the host
never waits for the GPU inside an epoch.
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Protocol, Union
from typing import get_args, get_type_hints

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import distributed as D
from .fused import BACKENDS
from .graphs import StepGraph, bf16_layout_problem, cuda_graph, inductor_options, more_traces, side_stream
from .io import CheckpointError, checkpoint_progress, load_checkpoint, save_checkpoint
from .metrics import peak_memory, reset_peak_memory

Batch = tuple[torch.Tensor, torch.Tensor]
Output = Union[torch.Tensor, tuple[torch.Tensor, Optional[torch.Tensor]]]


class Network(Protocol):
    """An evaluation network: logits, or (logits, auxiliary logits or None) in training mode.

    A network with drop-path exposes `drop_path_prob`, which the loop sets every epoch.
    """

    def __call__(self, x: torch.Tensor) -> Output: ...


class Loader(Protocol):
    """Batches `(x, y)` (on the device already or not) with a length.

    Optionally `set_epoch(epoch)` makes the epoch's order and augmentation a pure function of
    (seed, epoch); the loop calls it every epoch so a resumed run replays identical batches.
    """

    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...


_SCHEDULES = ("cosine", "exponential", "warmup_linear")
_CHOICES = {"schedule": _SCHEDULES, "amp": ("none", "bf16"), "nonfinite": ("stop", "skip"),
            "progress": ("auto", "bar", "log", "none"), "backend": BACKENDS}
# Fields that change speed or reporting but not the optimisation itself: a run may resume with
# other values for these. Every other field must match the checkpoint's.
RESUMABLE_CHANGES = frozenset({"progress", "eval_every", "compile", "deterministic", "channels_last",
                                "cuda_graph", "backend"})


@dataclass(frozen=True)
class TrainConfig:
    """A retraining recipe. Defaults are the DARTS CIFAR-10 evaluation recipe (methods.md §1.1)."""

    epochs: int = 600
    lr: float = 0.025
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 3e-4
    schedule: str = "cosine"          # cosine | exponential (gamma) | warmup_linear
    lr_min: float = 0.0               # the floor every schedule decays to; DARTS: cosine to 0
    gamma: float = 0.97               # exponential: lr·gamma^e (DARTS ImageNet)
    warmup_epochs: int = 5            # warmup_linear: lr·(e+1)/W, then linear to lr_min (PC-DARTS)
    grad_clip: float | None = 5.0     # global L2 norm over all parameters; 0 or None = off
    label_smoothing: float = 0.0      # ImageNet recipes: 0.1
    auxiliary_weight: float = 0.4     # weight of the auxiliary head's loss (DARTS)
    drop_path: float = 0.2            # max drop-path prob, reached linearly: p_e = drop_path·e/epochs
    amp: str = "none"                 # bf16 autocast (no loss scaling needed: bf16 has fp32's range)
    channels_last: bool = False       # NHWC: faster convolutions on tensor-core GPUs
    seed: int = 0
    deterministic: bool = False       # deterministic kernels (slower); off = cudnn autotuning
    eval_every: int = 1               # evaluate every n epochs and always after the last
    compile: bool = False             # torch.compile the network
    cuda_graph: bool = False          # capture the training step in a CUDA graph (one GPU)
    backend: str = "eager"            # fused: a cell's ops that read one state in one pass (same numbers);
                                      # fused_dense: and each separable conv as one dense conv
    nonfinite: str = "stop"           # non-finite loss: stop with an error, or skip that batch
    progress: str = "auto"            # auto: bar on a terminal, else one log line per epoch

    def __post_init__(self) -> None:
        for f, kind in get_type_hints(TrainConfig).items():
            _check_type(f, getattr(self, f), kind)
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: choose one of "
                                 f"{', '.join(allowed)}")
        checks = (
            ("epochs", self.epochs >= 1, ">= 1"),
            ("lr", self.lr > 0, "> 0"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("nesterov", not self.nesterov or self.momentum > 0, "used with momentum > 0 only"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("lr_min", 0 <= self.lr_min <= self.lr, "in [0, lr]"),
            ("gamma", 0 < self.gamma <= 1, "in (0, 1]"),
            ("warmup_epochs", self.warmup_epochs >= 0 and (self.schedule != "warmup_linear"
                                                           or self.warmup_epochs < self.epochs),
             ">= 0, and < epochs with warmup_linear so that the decay has an epoch"),
            ("grad_clip", self.grad_clip is None or self.grad_clip >= 0, ">= 0 (0 or None: off)"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
            ("auxiliary_weight", self.auxiliary_weight >= 0, ">= 0"),
            ("drop_path", 0 <= self.drop_path < 1, "in [0, 1)"),
            ("seed", self.seed >= 0, ">= 0"),
            ("eval_every", self.eval_every >= 1, ">= 1"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: must be {rule}")


def _check_type(name: str, value: Any, kind: Any) -> None:
    allowed = get_args(kind) or (kind,)
    # bool is an int subclass and int is a fine float, but a flag is never a number
    ok = any(value is None if t is type(None) else
             (isinstance(value, (int, float)) and not isinstance(value, bool)) if t is float else
             (isinstance(value, int) and not isinstance(value, bool)) if t is int else
             isinstance(value, t) for t in allowed)
    if not ok:
        raise TypeError(f"TrainConfig.{name}={value!r}: expected "
                        f"{' or '.join(getattr(t, '__name__', str(t)) for t in allowed)}")


PRESETS: Mapping[str, TrainConfig] = MappingProxyType({
    "darts_cifar": TrainConfig(),
    "darts_imagenet": TrainConfig(epochs=250, lr=0.1, weight_decay=3e-5, schedule="exponential",
                                  gamma=0.97, label_smoothing=0.1, drop_path=0.0),
    # PC-DARTS trains ImageNet with batch 1024 on 8 GPUs, hence lr 0.5 and the warm-up
    "pc_darts_imagenet": TrainConfig(epochs=250, lr=0.5, weight_decay=3e-5, schedule="warmup_linear",
                                     warmup_epochs=5, label_smoothing=0.1, drop_path=0.0),
})
"""The evaluation recipes of methods.md §1.1 (batch sizes belong to the loaders: 96, 128, 1024)."""


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """The learning rate of 0-based `epoch`; reaches `lr_min` at `epoch == cfg.epochs`."""
    if cfg.schedule == "cosine":
        return cfg.lr_min + (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * epoch / cfg.epochs)) / 2
    if cfg.schedule == "exponential":
        return max(cfg.lr_min, cfg.lr * cfg.gamma ** epoch)
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1) / cfg.warmup_epochs
    decay = (cfg.epochs - epoch) / (cfg.epochs - cfg.warmup_epochs)
    return cfg.lr_min + (cfg.lr - cfg.lr_min) * decay


def drop_path_at(cfg: TrainConfig, epoch: int) -> float:
    """Drop-path probability of 0-based `epoch`: 0 at the start, rising linearly (DARTS)."""
    return cfg.drop_path * epoch / cfg.epochs


@dataclass
class TrainResult:
    """What `train` returns; the weights are in the model it was given."""

    history: list[dict[str, Any]]   # one record per epoch, from the first epoch of the run
    resumed_from: int               # epochs already done when this call started (0: fresh run)

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1]


class NonFiniteLossError(RuntimeError):
    """The training loss or the gradients' norm became NaN/inf; the checkpoint of the last good
    epoch was kept."""

    def __init__(self, message: str, epoch: int, step: int) -> None:
        super().__init__(message)
        self.epoch, self.step = epoch, step


def cuda_graph_problems(cfg: TrainConfig, device: torch.device, world: int = 1) -> list[str]:
    """Why `cfg.cuda_graph` cannot run here ([] if it can): a CUDA device, one process, and
    non-finite steps that stop the run (skipping one reads the loss on the host)."""
    return [why for bad, why in (
        (device.type != "cuda", f"needs a CUDA device (this run is on {device.type})"),
        (world > 1, "runs on one GPU only (not under torchrun/DDP)"),
        (cfg.nonfinite != "stop", "needs nonfinite='stop' (skipping reads the loss on the host)"))
        if bad]


def train(model: nn.Module, train_loader: Loader, eval_loader: Loader | None, cfg: TrainConfig, *,
          checkpoint_path: str | Path, device: torch.device | str,
          on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
          meta: Mapping[str, Any] | None = None,
          capture_step: Callable[[Callable[[], None]], StepGraph] | None = None,
          compile_backend: str | Callable[..., Any] = "inductor") -> TrainResult:
    """Train `model` by `cfg`, resuming from `checkpoint_path` if it exists.

    `meta` (plain data: genotype, method, dataset...) is stored in the checkpoint and must match
    on resume. `on_epoch_end(record)` runs on rank 0 after each epoch's checkpoint is written.
    Under torchrun (process group initialised) the model is trained with DDP; rank 0 alone writes.

    A record: epoch (1-based), lr, drop_path_prob, train_loss (the optimised objective, aux term
    included) and train_acc over the steps taken, eval_loss / eval_top1 / eval_top5 (None in
    epochs not evaluated), skipped_batches, epoch_seconds, images_per_s (all ranks together).
    Accuracies are fractions.

    `cfg.cuda_graph` captures the step in a CUDA graph (`capture_step`, when given, replaces the
    CUDA graph: tests pass a plain re-run to check the static-buffer logic on CPU).
    `cfg.compile` compiles with `compile_backend` (tests pass one that only traces).
    """
    device = torch.device(device)
    meta = _plain(dict(meta or {}), "meta")
    rank, world = D.rank(), D.world_size()
    if cfg.drop_path > 0 and not hasattr(model, "drop_path_prob"):
        raise ValueError(f"TrainConfig.drop_path={cfg.drop_path} but {type(model).__name__} has no "
                         f"drop_path_prob attribute; set drop_path=0 for networks without it")
    if cfg.amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("amp='bf16' needs a GPU with bfloat16 support (Ampere or newer)")
    problem = bf16_layout_problem(model, device, cfg.amp, cfg.channels_last)
    if problem:
        from .config import ConfigError   # here, as in search: the CLI reports it without a traceback
        raise ConfigError(f"train.{problem}")
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    if cfg.backend != "eager":
        if not hasattr(model, "set_backend"):
            raise ValueError(f"TrainConfig.backend={cfg.backend!r}: {type(model).__name__} has only the "
                             f"eager forward; set backend='eager'")
        model.set_backend(cfg.backend)
    if len(train_loader) == 0:
        raise ValueError("the training loader yields no batches")
    params = [p for p in model.parameters() if p.requires_grad]
    if capture_step is None and cfg.cuda_graph:
        problems = cuda_graph_problems(cfg, device, world)
        if problems:
            raise ValueError("TrainConfig.cuda_graph=True " + "; ".join(problems))
        capture_step = cuda_graph
    # Fused SGD: one kernel per step. Its lr is a tensor on the device, written in place each
    # epoch, so that a step captured once (a CUDA graph) follows the schedule: one graph per run,
    # not one per epoch. (Set again after a resume: load_state_dict restores the saved groups.)
    lr_now = torch.tensor(lr_at(cfg, 0), dtype=torch.float32, device=device)
    kernels = {"fused": True, "foreach": False, "lr": lr_now}
    optimizer = torch.optim.SGD(params, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay, **kernels)
    if cfg.momentum > 0:
        # Zero buffers up front give the first step buf = g, exactly torch's lazy clone of g, and
        # the state exists before step 1, so the skip guard and checkpoints see one layout always.
        for p in params:
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)

    path = Path(checkpoint_path)
    history: list[dict[str, Any]] = []
    start = 0
    # Every rank reads the same file. No rank can write it before all have looked: the first
    # write follows an epoch of gradient all-reduces that need every rank.
    if path.exists():
        start, history = _resume(path, model, optimizer, cfg, meta, device, rank, world)
        for group in optimizer.param_groups:
            group.update(kernels)             # the saved lr too: this run's tensor
    else:
        seed_all(_stream_seed(cfg.seed, rank))
    if start >= cfg.epochs:
        return TrainResult(history=history, resumed_from=start)

    net: Network = model
    if world > 1:
        net = DistributedDataParallel(model,
                                      device_ids=[device.index] if device.type == "cuda" else None)
    # `compile`: the run's first training call and first test pass run eagerly. They fill the
    # fused cells' lazy index caches; a trace made with those still empty is guarded on their
    # emptiness, and the next call traces the whole network again (a second compile).
    compiled: dict[str, nn.Module] = {}
    if cfg.compile:
        # inductor's own choices must not reach convs this CPU's torch gets wrong in training
        options = inductor_options(model, device, cfg.amp) if compile_backend == "inductor" else {}
        train_kwargs = {"options": options} if options else {}
        compiled = {"train": torch.compile(net, backend=compile_backend, **train_kwargs),
                    "eval": torch.compile(model, backend=compile_backend)}
    warm: set[str] = set()

    def network(kind: str) -> nn.Module:
        """The module to call for `kind` (train | eval): compiled once `kind` has run eagerly."""
        if kind in warm and kind in compiled:
            return compiled[kind]
        warm.add(kind)
        return net if kind == "train" else model
    guard = None
    if cfg.nonfinite == "skip":
        guard = _StepGuard([*params, *(optimizer.state[p]["momentum_buffer"] for p in params
                                       if "momentum_buffer" in optimizer.state[p]), *model.buffers()])
    clip = cfg.grad_clip or math.inf        # inf: the norm is still computed for the skip check
    mode = _progress_mode(cfg.progress, is_main=rank == 0)

    # The step's accounting, on the device, zeroed per epoch in place: a captured step keeps
    # writing the same tensors
    sums = torch.zeros(3, dtype=torch.float64, device=device)   # loss·n, correct, n
    n_bad = torch.zeros((), dtype=torch.int64, device=device)     # non-finite steps
    first_bad = torch.zeros((), dtype=torch.int64, device=device)  # the first one (n_steps: none)
    step_index = torch.zeros((), dtype=torch.int64, device=device)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        """One training step and its accounting, all on the device (capturable)."""
        if guard is not None:
            guard.snapshot()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
            logits, aux = _split(network("train")(x))
        loss = _loss(logits, aux, y, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # The finiteness flag stays on the device. 'stop' reads it at the epoch's end (the
        # rest of that epoch is wasted, its checkpoint never written); 'skip' undoes the
        # step through the guard. Either way no step waits for the GPU.
        ok = torch.isfinite(loss.detach())
        if cfg.grad_clip or guard is not None:
            # the norm of the all-reduced gradients: identical on every rank
            norm = nn.utils.clip_grad_norm_(params, clip, foreach=True)
            ok &= torch.isfinite(norm)
        if guard is not None and world > 1:
            # each rank saw only its own loss; all must skip together or replicas drift
            ok = D.all_reduce_(ok.to(torch.int32), "min").bool()
        optimizer.step()
        if guard is not None:
            guard.restore_unless(ok)
        n = y.size(0)
        correct = (logits.detach().argmax(1) == y).sum()
        # masked, not branched on: a NaN loss stays out of the sums without a host sync
        sums.add_(torch.stack([torch.where(ok, loss.detach().double() * n, 0.0),
                               torch.where(ok, correct.double(), 0.0), ok.double() * n]))
        n_bad.add_((~ok).long())
        first_bad.copy_(torch.where(ok, first_bad, torch.minimum(first_bad, step_index)))
        step_index.add_(1)

    # A captured step reads lr and a drop-path probability the network keeps on the device
    # (`drop_path_on_device`) at every replay: one graph serves the whole run. A network that
    # keeps its probability as a float only gets a graph per probability (per epoch). So does
    # a compiled network: AOTAutograd makes the float a constant guarded on its value, and
    # every epoch compiled it again. Compiled without a graph, it moves the probability to the
    # device once it is above 0: at 0 a float draws no mask (the plain run's random numbers).
    drop_tensor = (capture_step is not None and cfg.drop_path > 0 and hasattr(model, "drop_path_on_device"))
    drop_tensor_above_0 = (not drop_tensor and cfg.compile and cfg.drop_path > 0
                           and hasattr(model, "drop_path_on_device"))
    steps: _GraphedSteps | None = None
    graph_key: tuple = ()
    # the test passes through one graph of their own, captured in the first
    test_graph = GraphedTestPass(capture_step, device) if capture_step is not None else None
    with _backend_flags(cfg.deterministic, device), more_traces(), _drop_path_on(model, device, drop_tensor), \
            ExitStack() as later, \
            tqdm(total=cfg.epochs, initial=start, unit="epoch", disable=mode != "bar") as epoch_bar:
        for epoch in range(start, cfg.epochs):
            reset_peak_memory(device)
            t0 = time.perf_counter()
            lr = lr_at(cfg, epoch)
            lr_now.fill_(lr)
            if drop_tensor_above_0 and drop_path_at(cfg, epoch) > 0:
                later.enter_context(_drop_path_on(model, device, True))
                drop_tensor_above_0 = False
            if hasattr(model, "drop_path_prob"):
                model.drop_path_prob = drop_path_at(cfg, epoch)
            _set_epoch(train_loader, epoch)
            model.train()
            n_steps = len(train_loader)
            sums.zero_()
            n_bad.zero_()
            first_bad.fill_(n_steps)
            step_index.zero_()
            if capture_step is not None:
                key = () if drop_tensor or not hasattr(model, "drop_path_prob") else (drop_path_at(cfg, epoch),)
                if steps is None or key != graph_key:
                    steps, graph_key = None, key        # the old graph's memory goes before the new capture
                    steps = _GraphedSteps(step, capture_step, device)
            bar = tqdm(train_loader, total=n_steps, leave=False, desc=f"epoch {epoch + 1}",
                       disable=mode != "bar")
            for x, y in bar:
                x, y = _to_device(x, y, device, cfg.channels_last)
                if steps is not None:
                    steps(x, y)
                else:
                    step(x, y)

            # the epoch's host syncs: everything above was queued without waiting for the GPU
            loss_sum, correct_sum, seen = D.all_reduce_(sums, "sum").tolist()
            # max over ranks, not sum: under 'skip' all ranks count the same agreed steps, and
            # max(-first) is min(first), the earliest bad step on any rank
            bad_steps, bad_step = D.all_reduce_(torch.stack([n_bad, -first_bad]), "max").tolist()
            bad_step = -bad_step
            if bad_steps and cfg.nonfinite == "stop":
                kept = (f"the checkpoint of epoch {epoch} ({path}) is kept" if epoch else
                        "no checkpoint had been written yet")
                raise NonFiniteLossError(
                    f"non-finite training loss or gradient norm at epoch {epoch + 1}/{cfg.epochs}, step "
                    f"{bad_step + 1}/{n_steps} (lr {lr:.4g}); {kept}. Lower the lr, check the data, "
                    f"or set nonfinite='skip' to drop such batches", epoch=epoch + 1, step=bad_step + 1)
            train_seconds = time.perf_counter() - t0

            D.broadcast_buffers(model)
            evaluated = eval_loader is not None and ((epoch + 1) % cfg.eval_every == 0
                                                     or epoch + 1 == cfg.epochs)
            ev = {}
            if evaluated:
                eval_net = network("eval")
                # a compiled run's first test pass runs eagerly (it fills the lazy caches): its
                # graph is captured from the compiled network, in the pass after
                graphed = test_graph if not compiled or eval_net is compiled["eval"] else None
                ev = evaluate(eval_net, eval_loader, device, amp=cfg.amp, channels_last=cfg.channels_last,
                              graph=graphed)
            record = {
                "epoch": epoch + 1, "lr": lr, "drop_path_prob": drop_path_at(cfg, epoch),
                "train_loss": loss_sum / seen if seen else math.nan,
                "train_acc": correct_sum / seen if seen else math.nan,
                "eval_loss": ev.get("loss"), "eval_top1": ev.get("top1"), "eval_top5": ev.get("top5"),
                "skipped_batches": bad_steps,
                "epoch_seconds": time.perf_counter() - t0,
                "images_per_s": seen / train_seconds,
                **peak_memory(device),            # this rank's, evaluation included (CUDA only)
            }
            history.append(record)
            _save(path, model, optimizer, cfg, meta, history, device, rank)
            if rank == 0 and on_epoch_end is not None:
                on_epoch_end(record)
            epoch_bar.update()
            epoch_bar.set_postfix_str(_summary(record, cfg.epochs, short=True))
            if mode == "log":
                print(_summary(record, cfg.epochs), file=sys.stderr, flush=True)
    return TrainResult(history=history, resumed_from=start)


@contextmanager
def _drop_path_on(model: nn.Module, device: torch.device, on: bool) -> Iterator[None]:
    """The network keeps its drop-path probability on `device` inside (`drop_path_on_device`)."""
    if not on:
        yield
        return
    model.drop_path_on_device(device)
    try:
        yield
    finally:
        model.drop_path_on_device(None)


@contextmanager
def forked_rng(device: torch.device) -> Iterator[None]:
    """Random draws inside come from a fork of the CPU's and `device`'s streams, which are put
    back as they were after: what only observes a run (a test pass, a search's validation, its
    Hessian eigenvalue) leaves the run's own random numbers alone, so that running it more or
    less often, or not at all, does not move the run onto another trajectory. (S4's `noise` op
    draws in evaluation mode, in a supernet and in a derived cell.)"""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        yield


@torch.no_grad()
def evaluate(model: nn.Module, loader: Loader, device: torch.device | str, *,
             amp: str = "none", channels_last: bool = False,
             graph: "GraphedTestPass | None" = None) -> dict[str, float]:
    """Mean cross-entropy and top-1 / top-5 accuracy (fractions) of `model` on `loader`.

    Under torchrun the sums are all-reduced, so a loader sharded across ranks gives the global
    figures (and an unsharded one the same figures on every rank). `graph`: the batches go
    through its captured batch step (`GraphedTestPass`), the same sums. Random draws (S4's noise
    op) come from a fork (`forked_rng`): `eval_every`, `valid_every` do not change a run's
    trajectory (until 2026-12-06 they did in the S4 space).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    if graph is not None:
        graph.begin(model, amp)
    sums = graph.sums if graph is not None else torch.zeros(4, dtype=torch.float64, device=device)
    with forked_rng(device):
        for x, y in loader:
            x, y = _to_device(x, y, device, channels_last)
            if graph is not None:
                graph.steps(x, y)
            else:
                _test_batch(model, x, y, sums, amp)
    loss, top1, top5, n = D.all_reduce_(sums, "sum").tolist()
    model.train(was_training)
    if not n:
        raise ValueError("the evaluation loader yielded no samples")
    return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n}


def _test_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sums: torch.Tensor, amp: str) -> None:
    """Add one test batch's loss sum, top-1 and top-5 hits and size to `sums`, on the device."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
        logits, _ = _split(model(x))
    logits = logits.float()
    hits = logits.topk(min(5, logits.size(1)), dim=1).indices == y[:, None]
    sums += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                         hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                         torch.full((), y.size(0), dtype=torch.float64, device=x.device)])


class GraphedTestPass:
    """`evaluate`'s batches through one captured batch step, kept for a whole run
    (TrainConfig.cuda_graph). The step reads the weights and BN statistics where training
    updates them in place, so the graph captured in the run's first test pass serves every later
    one: a test pass of eager cells is bound by the host's launches on a GPU, as a training step
    is. As `_GraphedSteps`: the first batches run plainly, and a batch of another shape (the last,
    partial one) too. The module captured is the one the capturing pass was given."""

    def __init__(self, capture: Callable[[Callable[[], None]], StepGraph], device: torch.device) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)   # loss·n, top-1, top-5, n
        self.model: nn.Module | None = None
        self.amp = "none"
        self.steps = _GraphedSteps(self._batch, capture, device)

    def begin(self, model: nn.Module, amp: str) -> None:
        """A new test pass: sums zeroed in place (the graph adds to these tensors)."""
        self.model, self.amp = model, amp
        self.sums.zero_()

    def _batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        assert self.model is not None
        _test_batch(self.model, x, y, self.sums, self.amp)


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every GPU) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- the step's parts --------------------------------------------------------------------------

def _split(out: Output) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(out, (tuple, list)):
        logits, aux = out
        return logits, aux
    return out, None


def _loss(logits: torch.Tensor, aux: torch.Tensor | None, y: torch.Tensor,
          cfg: TrainConfig) -> torch.Tensor:
    """CE(logits) + w·CE(aux), both label-smoothed (DARTS ImageNet smooths both), in fp32.

    The auxiliary term is added whenever the network returns aux logits, even with weight 0, so
    the head always receives a (zero) gradient: DDP fails on parameters that get none.
    """
    loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    if aux is not None:
        loss = loss + cfg.auxiliary_weight * F.cross_entropy(aux.float(), y,
                                                             label_smoothing=cfg.label_smoothing)
    return loss


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device,
               channels_last: bool) -> Batch:
    # non_blocking: a copy from pinned memory overlaps the previous step; already there: no-op
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def _set_epoch(loader: Loader, epoch: int) -> None:
    # the loader's own set_epoch, or that of a DataLoader's sampler (DistributedSampler)
    for owner in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        set_epoch = getattr(owner, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
            return


class _GraphedSteps:
    """Training steps through one captured graph (TrainConfig.cuda_graph): a run's, or one
    drop-path probability's where the network keeps it as a float only.

    The first `WARMUP_STEPS` run plainly on a side stream (cuDNN picks its kernels; lazy
    initialisations stay off the captured stream), the next batch is copied into static buffers
    and the step captured, and every later batch is copied in and the graph replayed. A batch of
    another shape (a last partial batch) runs plainly. The step itself never reads the host: the
    lr and the drop-path probability come from device tensors written before each epoch.
    """

    WARMUP_STEPS = 2

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], None],
                 capture: Callable[[Callable[[], None]], StepGraph], device: torch.device) -> None:
        self.step, self.capture, self.device = step, capture, device
        self.warmup = self.WARMUP_STEPS
        self.graph: StepGraph | None = None
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.graph is not None and self.static is not None and \
                (x.shape, x.dtype, x.stride(), y.shape) == (self.static[0].shape, self.static[0].dtype,
                                                            self.static[0].stride(), self.static[1].shape):
            self.static[0].copy_(x)
            self.static[1].copy_(y)
            self.graph.replay()
            return
        if self.warmup > 0 or self.graph is not None:
            self.warmup -= 1
            with side_stream(self.device):
                self.step(x, y)
            return
        self.static = (x.clone(memory_format=torch.preserve_format), y.clone())
        sx, sy = self.static
        self.graph = self.capture(lambda: self.step(sx, sy))
        self.graph.replay()           # capturing ran nothing: this performs the step


class _StepGuard:
    """Undo a training step on the device when its loss or gradient norm is not finite ('skip').

    Before the step, the state it writes (weights, momentum, BatchNorm statistics, which a NaN
    forward poisons too) is copied into one flat tensor per dtype; after it, `where(ok, new, old)`
    is written back. That is a handful of large kernels per step and no host sync. The
    alternative, `if not ok.item(): skip`, stalls the CPU until the GPU has finished every step,
    and launch-bound NAS cells then run with an empty GPU queue after each step.
    """

    def __init__(self, tensors: Iterable[torch.Tensor]) -> None:
        self.views: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            if not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
                raise ValueError(f"cannot guard a non-dense tensor of shape {tuple(t.shape)}")
            # a flat alias of the tensor's memory (dense, so any layout is one block)
            flat = t.detach().as_strided((t.numel(),), (1,), t.storage_offset())
            self.views.setdefault(t.dtype, []).append(flat)
        self.saved: dict[torch.dtype, torch.Tensor] = {}

    @torch.no_grad()
    def snapshot(self) -> None:
        self.saved = {dtype: torch.cat(views) for dtype, views in self.views.items()}

    @torch.no_grad()
    def restore_unless(self, ok: torch.Tensor) -> None:
        for dtype, views in self.views.items():
            kept = torch.where(ok, torch.cat(views), self.saved[dtype])
            torch._foreach_copy_(views, list(kept.split([v.numel() for v in views])))


# --- checkpoints and random state --------------------------------------------------------------

def _save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
          meta: dict[str, Any], history: list[dict[str, Any]], device: torch.device, rank: int) -> None:
    rng = D.all_gather_object(_rng_state(device))   # every rank's streams, restored per rank
    if rank == 0:
        save_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "epoch": history[-1]["epoch"], "history": history,
                               "rng": rng, "config": asdict(cfg)}, kind="train", meta=meta)
    D.barrier()


def _resume(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
            meta: dict[str, Any], device: torch.device, rank: int,
            world: int) -> tuple[int, list[dict[str, Any]]]:
    ckpt = load_checkpoint(path, kind="train", meta=meta)
    saved_cfg = ckpt.get("config", {})
    changed = [f"{f.name}={saved_cfg.get(f.name)!r} there, {getattr(cfg, f.name)!r} here"
               for f in fields(TrainConfig)
               if f.name not in RESUMABLE_CHANGES and saved_cfg.get(f.name) != getattr(cfg, f.name)]
    if changed:
        raise CheckpointError(f"{path} was written by another recipe ({'; '.join(changed)}); "
                              f"delete it or point the run at its own checkpoint folder")
    epoch, history = checkpoint_progress(ckpt, path, cfg.epochs)
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if len(ckpt["rng"]) == world:
            _set_rng_state(ckpt["rng"][rank], device)
        else:
            # Another world size sees other batches anyway; give each rank a fresh, distinct stream.
            seed_all(_stream_seed(cfg.seed, rank, epoch))
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{path} does not fit this model ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no detail'}); delete it to "
                              f"start afresh") from None
    return epoch, history


def _stream_seed(*key: int) -> int:
    # distinct, well-mixed streams for (seed, rank[, epoch]); seed+rank would collide across seeds
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


def _rng_state(device: torch.device) -> dict[str, Any]:
    # NumPy's and Python's states as tensors and numbers: the checkpoint loads with weights_only
    _, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
             "numpy_gauss": [int(has_gauss), float(gauss)],
             "python_version": version, "python": torch.tensor(internal, dtype=torch.int64),
             "python_gauss": gauss_next}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         *state["numpy_gauss"]))
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _plain(value: Any, where: str) -> Any:
    """`value` as plain data (tuples become lists), so it survives a weights_only load and
    compares equal after a round trip; anything else is refused with the place it sits."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(f"{where} is of type {type(value).__name__}; checkpoint metadata must be plain "
                    f"data (str, numbers, lists, dicts), e.g. genotype.to_json()")


# --- environment and reporting -----------------------------------------------------------------

@contextmanager
def _backend_flags(deterministic: bool, device: torch.device) -> Iterator[None]:
    """Set determinism / autotuning for the run and restore the caller's settings afterwards."""
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if deterministic and device.type == "cuda":
        # cuBLAS is deterministic only with a fixed workspace; it reads this when it initialises
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    # the evaluation networks see one input shape all run, so cuDNN's autotuning pays off at once
    torch.backends.cudnn.benchmark = not deterministic
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def _progress_mode(progress: str, is_main: bool) -> str:
    if not is_main:
        return "none"
    if progress == "auto":
        return "bar" if sys.stderr.isatty() else "log"
    return progress


def _summary(r: Mapping[str, Any], epochs: int, short: bool = False) -> str:
    parts = [f"loss {r['train_loss']:.4f}", f"acc {r['train_acc']:.2%}"]
    if r["eval_top1"] is not None:
        parts.append(f"eval {r['eval_loss']:.4f} top1 {r['eval_top1']:.2%} top5 {r['eval_top5']:.2%}")
    if r["skipped_batches"]:
        parts.append(f"skipped {r['skipped_batches']}")
    if short:
        return " ".join(parts)
    return (f"epoch {r['epoch']}/{epochs} lr {r['lr']:.4g} " + " ".join(parts)
            + f" | {r['epoch_seconds']:.1f}s {r['images_per_s']:.0f} img/s")
