"""The one search loop every method runs (methods.md §2).

    for epoch:
        op schedule may switch ops on                (OPP-DARTS; otherwise nothing)
        lr_e from the cosine schedule
        for each train batch (+ a validation batch for bi-level rules):
            update rule steps α (unless in warm-up) and w       (first/second order, single level)
        validation accuracy of the supernet, collapse diagnostics
        checkpoint (atomic) -> on_epoch_end(record)

Methods differ only in the `SearchConfig` switches they set (see `nascore.methods`). A killed run
resumes from its last epoch checkpoint and, under deterministic settings, ends exactly where an
uninterrupted run ends: loaders replay an epoch from (seed, epoch), the lr is a pure function of
the epoch, and RNG states travel in the checkpoint.
"""
from __future__ import annotations

import math
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .diagnostics import collapse_diagnostics, hessian_eigenvalue
from .genotype import AnyGenotype
from .graphs import StepGraph, bf16_layout_problem, cuda_graph, inductor_options, side_stream
from .io import CheckpointError, checkpoint_progress, load_checkpoint, save_checkpoint
from .metrics import peak_memory, reset_peak_memory
from .op_schedules import OP_SCHEDULES, ProgressiveConfig
from .optimisation import UPDATE_RULES, Batch, StepContext, StepStats
from .spaces import SearchSpace
from .supernet import BACKENDS, COMPILE_SCOPES, Supernet, SupernetConfig
from .train import evaluate


@dataclass(frozen=True)
class RandomFeaturesConfig:
    """RF-DARTS choices the paper leaves open (methods.md §2.3, ⚠ all unconfirmed)."""

    train_classifier: bool = False     # strict "only BatchNorm is trained" reading
    freeze_stem_conv: bool = True


@dataclass(frozen=True)
class SearchConfig:
    """Every search hyper-parameter; defaults are DARTS' on CIFAR-10 (methods.md §2.1)."""

    # method switches (a method preset sets these; any can be overridden)
    optimisation: str = "first_order"      # first_order | second_order | single_level
    step_order: str = "alpha_first"        # alpha_first | weights_first (bi-level only)
    arch_sampling: str = "cycle"           # cycle: α half reshuffled each pass | replacement (NB201)
    partial_channels: int = 1              # K (PC-DARTS: 4)
    channel_shuffle: bool = True
    edge_normalization: bool = False
    features: str = "trained"              # trained | random
    op_schedule: str = "all"               # all | progressive
    arch_warmup_epochs: int = 0            # epochs with w-only updates (PC-DARTS: 15)
    single_level_data: str = "half"        # half | full: single level on the w half or all images
    # RobustDARTS' regularised search (methods.md §1.2: drop-path {0.2,0.4,0.6} with cutout)
    drop_path: float = 0.0                 # max drop-path prob on op outputs, ramped 0 -> max like eval
    cutout: int = 0                        # cutout hole side on search batches; 0 = off
    # search network
    init_channels: int = 16
    layers: int = 8
    # optimisation
    epochs: int = 50
    batch_size: int = 64
    lr: float = 0.025
    lr_min: float = 0.001
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 3e-4
    bn_weight_decay: bool = True           # L2 on BN affine params too (DARTS applies it to all)
    grad_clip: float = 5.0                 # global norm, on w only
    arch_lr: float = 3e-4
    arch_betas: tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = 1e-3        # Adam's L2 added to the gradient, not AdamW
    arch_grad_clip: float = 0.0
    unrolled_eps: float = 0.01
    # monitoring and safety
    valid_every: int = 1                   # supernet validation accuracy every N epochs (0 = never)
    valid_batch_size: int = 512            # images per validation forward (see `SearchRun.validate`)
    hessian_eigenvalue: bool = False
    hessian_batches: int = 2
    hessian_iters: int = 20
    nonfinite: str = "stop"                # stop | skip
    # speed (issue 4, README "Speed"): how a step is computed, not what — bf16 aside, which rounds.
    # Defaults are the plain eager path; the GPU figures that would justify others are unmeasured.
    backend: str = "eager"                 # eager | fused | fused_dense: same numbers in fewer kernels
    compile: bool = False                  # torch.compile the supernet's forward
    compile_scope: str = "cells"           # fused backends: cells (one trace per cell shape) | network
    cuda_graph: bool = False               # capture the whole search step in one CUDA graph, once per run (CUDA only)
    amp: str = "none"                      # none | bf16 autocast of the forward passes
    channels_last: bool = False            # NHWC activations (tensor-core GPUs)
    optimizer_impl: str = "default"        # default (torch's choice; captured: SGD fused) | for_loop | foreach | fused
    cudnn_benchmark: bool = False          # cuDNN autotunes each conv shape once (CUDA; the shapes never change)
    # fused_dense's trades of multiply-adds for kernels (`Supernet.set_backend`): convs of several
    # kernel sizes as one; a reduction cell's paired stride-2 convs ungrouped (block-diagonal)
    merge_kernel_sizes: bool = True
    block_diagonal: bool = True
    # fused backends: a pass's node sums as one batched matrix product (`fused.mix`), or as chained
    # weighted adds; None (auto): the product, the adds when compiled (`mixes_by_matmul`)
    matmul_mix: bool | None = None
    # with matmul_mix, in training: a pass's last BNs as one batch norm (`fused.batch_norm_pass`)
    merge_batch_norms: bool = True
    rf: RandomFeaturesConfig = field(default_factory=RandomFeaturesConfig)
    opp: ProgressiveConfig = field(default_factory=ProgressiveConfig)

    def mixes_by_matmul(self) -> bool:
        """`matmul_mix`, `auto` resolved. Uncompiled, a pass's node sums as one matrix product:
        fewer kernels than a weighted add per op kind (808 against 1,039 per NB201 step, bf16,
        the bench's small size). Compiled, the chained adds, which inductor fuses into the
        kernels around them, where a product is a library call it cannot fuse: 652 kernels
        against 957 per spec-size NB201 step (CPU counts, bench/RESULTS.md, 2026-12-07). With
        drop-path always the product, whose entries its factors scale."""
        if self.matmul_mix is not None:
            return self.matmul_mix
        return not self.compile or self.drop_path > 0

    def supernet_config(self, num_classes: int) -> SupernetConfig:
        return SupernetConfig(
            num_classes=num_classes, init_channels=self.init_channels, layers=self.layers,
            partial_channels=self.partial_channels, channel_shuffle=self.channel_shuffle,
            edge_normalization=self.edge_normalization, random_features=self.features == "random",
            freeze_stem_conv=self.rf.freeze_stem_conv, train_classifier=self.rf.train_classifier)


SPEED_CHOICES: dict[str, tuple[str, ...]] = {
    "backend": BACKENDS, "amp": ("none", "bf16"), "compile_scope": COMPILE_SCOPES,
    "optimizer_impl": ("default", "for_loop", "foreach", "fused"),
}


def speed_option_problems(cfg: SearchConfig, device_type: str | None) -> list[str]:
    """What is wrong with the speed options (`device_type` None: the device is not known yet)."""
    problems = [f"search.{name}={getattr(cfg, name)!r}; allowed: {', '.join(allowed)}"
                for name, allowed in SPEED_CHOICES.items() if getattr(cfg, name) not in allowed]
    if cfg.backend != "eager" and cfg.drop_path > 0 and not cfg.mixes_by_matmul():
        problems.append("search.drop_path > 0 on a fused backend needs search.matmul_mix: true (the "
                        "drop-path factors scale the pass's matrix product), or set search.backend: eager")
    if cfg.cuda_graph:
        if cfg.nonfinite == "skip":
            problems.append("search.cuda_graph: true needs search.nonfinite: stop (skipping a bad "
                            "batch reads the loss on the host in every step, which a graph cannot)")
        if device_type is not None and device_type != "cuda":
            problems.append(f"search.cuda_graph: true needs a CUDA device; this search runs on "
                            f"{device_type} (set search.cuda_graph: false)")
    return problems


class Loader(Protocol):
    """Batches of (x, y) on the search device; `set_epoch` makes an epoch's order reproducible."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...


@dataclass
class SearchData:
    train: Loader                       # weight batches (the w half; all images for single_level full)
    val: Loader | None                  # the α half: validation, Hessian, and α batches unless `arch`
    num_classes: int
    score_fraction_batches: int | None = None   # OPP scoring: batches per candidate (None = all)
    arch: Loader | None = None          # α batches when drawn otherwise than `val` (with replacement)


class NonFiniteError(RuntimeError):
    """A non-finite loss or α; the last good checkpoint is kept."""


@dataclass
class SearchResult:
    genotype: AnyGenotype
    history: list[dict[str, Any]]
    model: Supernet
    resumed_from_epoch: int


def cosine_lr(epoch: int, lr0: float, lr_min: float, epochs: int, start: int = 0) -> float:
    """lr_e = lr_min + ½(lr_0 − lr_min)(1 + cos(π (e − start) / (E − start)))."""
    span = max(epochs - start, 1)
    return lr_min + 0.5 * (lr0 - lr_min) * (1 + math.cos(math.pi * (epoch - start) / span))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """Global RNG states the search consumes (noise op, op re-initialisation in OPP-DARTS)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def merged_batches(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], images: int
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive (x, y) batches concatenated into batches of at least `images` images (the last
    may be smaller); a batch already that large passes through uncopied."""
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    n = 0
    for x, y in batches:
        xs.append(x)
        ys.append(y)
        n += len(y)
        if n >= images:
            yield (torch.cat(xs), torch.cat(ys)) if len(xs) > 1 else (xs[0], ys[0])
            xs, ys, n = [], [], 0
    if xs:
        yield (torch.cat(xs), torch.cat(ys)) if len(xs) > 1 else (xs[0], ys[0])


class SearchRun:
    """One search: owns the supernet, the optimisers and the loop; hosts the op schedule."""

    def __init__(self, space: SearchSpace, cfg: SearchConfig, data: SearchData, *,
                 device: torch.device | str = "cpu", seed: int = 2,
                 checkpoint_path: str | Path | None = None, meta: Mapping[str, Any] | None = None,
                 on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
                 log: Callable[[str], None] = print,
                 capture_step: Callable[[Callable[[], None]], StepGraph] | None = None) -> None:
        self.space, self.cfg, self.data = space, cfg, data
        self.device = torch.device(device)
        self.seed = seed
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.meta = {"space": space.name, "seed": seed, **(meta or {})}
        self.on_epoch_end = on_epoch_end
        self.log = log
        problems = speed_option_problems(cfg, self.device.type)
        if problems:
            from .config import ConfigError   # here, not at the top: config imports this module
            raise ConfigError("params.yaml: " + "; ".join(problems))
        # How a captured step is made: a CUDA graph. Tests pass a CPU stand-in (a replay of the
        # step's recorded ops, or a plain re-run of it) to check the capture logic on the CPU.
        self.capture_step: Callable[[Callable[[], None]], StepGraph] | None = (
            capture_step or (cuda_graph if cfg.cuda_graph else None))
        self._optimiser_generation = 0     # +1 whenever the optimisers' state tensors are replaced
        self._steps: EpochSteps | None = None
        _seed_everything(seed)     # the random features ARE the init: seeded, recorded in meta
        self.model = self.build_model()
        problem = bf16_layout_problem(self.model, self.device, cfg.amp, cfg.channels_last)
        if problem:
            from .config import ConfigError
            raise ConfigError(f"params.yaml: search.{problem}")
        if cfg.compile:
            # inductor's own layout choices must not reach convs this CPU's torch gets wrong
            options = inductor_options(self.model, self.device, cfg.amp)
            self.model.compile(self.cfg.compile_scope, **({"options": options} if options else {}))
        if self.capture_step is not None and cfg.drop_path > 0:
            self.model.drop_path_on_device(self.device)     # one capture serves the whole ramp
        # The weight lr as a device tensor of the weights' dtype, written before each epoch: a
        # fused SGD reads it there, so a captured step serves every epoch, not one epoch's lr.
        self.lr_now = torch.tensor(cfg.lr, dtype=next(self.model.parameters()).dtype, device=self.device)
        self.rule = UPDATE_RULES.get(cfg.optimisation)()
        self.schedule = OP_SCHEDULES.get(cfg.op_schedule)(cfg.opp, cfg.epochs)
        self.lr_segment = (0, cfg.lr)          # (start epoch, start lr) of the cosine schedule
        self.history: list[dict[str, Any]] = []
        self.epoch = 0
        self.reset_optimisers(0, restart_schedule=False)

    # --- ScheduleHost ---------------------------------------------------------------------------
    def build_model(self) -> Supernet:
        model = self.space.build_supernet(self.cfg.supernet_config(self.data.num_classes))
        model.set_backend(self.cfg.backend, self.cfg.merge_kernel_sizes, self.cfg.block_diagonal,
                          self.cfg.mixes_by_matmul(), self.cfg.merge_batch_norms)
        fmt = torch.channels_last if self.cfg.channels_last else torch.preserve_format
        return model.to(self.device, memory_format=fmt)

    def score_batches(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """The weight split, in a fixed order, for scoring candidate ops (OPP-DARTS)."""
        self.data.train.set_epoch(-1)      # the same batches for every candidate
        limit = self.data.score_fraction_batches
        for i, batch in enumerate(self.data.train):
            if limit is not None and i >= limit:
                break
            yield batch

    def reset_optimisers(self, epoch: int, restart_schedule: bool = True) -> None:
        """Fresh SGD (momentum cleared) and Adam; the cosine restarts from the current lr."""
        cfg = self.cfg
        if restart_schedule:
            self.lr_segment = (epoch, self.lr_at(epoch))
        self.weights = self.model.weight_parameters()
        self.arch = self.model.arch_parameters()
        bn = {id(p) for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              for p in m.parameters(recurse=False)}
        decay = [p for p in self.weights if cfg.bn_weight_decay or id(p) not in bn]
        no_decay = [p for p in self.weights if not cfg.bn_weight_decay and id(p) in bn]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        self.w_opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
        self.a_opt = torch.optim.Adam(self.arch, lr=cfg.arch_lr, betas=tuple(cfg.arch_betas),
                                      weight_decay=cfg.arch_weight_decay)
        self._set_optimizer_kernels()

    @property
    def fused_sgd(self) -> bool:
        """Whether the weight SGD is torch's fused kernel, reading its lr from `lr_now`:
        `optimizer_impl: fused`, or `default` when steps are captured (torch's own default, a
        foreach SGD, takes its lr as a Python number, which a graph would freeze)."""
        impl = self.cfg.optimizer_impl
        return impl == "fused" or (impl == "default" and self.capture_step is not None)

    def _set_optimizer_kernels(self) -> None:
        """Optimiser kernels from `optimizer_impl`; Adam capturable under a CUDA graph.

        Set after construction and again after loading a checkpoint, whose param groups carry
        the flags of the machine that saved it. The update arithmetic is the same for all kernels.
        """
        self._optimiser_generation += 1
        impl = self.cfg.optimizer_impl
        kernels = {"default": {"foreach": None, "fused": None}, "for_loop": {"foreach": False, "fused": None},
                   "foreach": {"foreach": True, "fused": None}, "fused": {"foreach": None, "fused": True}}
        capturable = self.cfg.cuda_graph and self.device.type == "cuda"
        for opt in (self.w_opt, self.a_opt):
            flags = kernels["fused" if opt is self.w_opt and self.fused_sgd else impl]
            for group in opt.param_groups:
                group.update(flags)
                if "capturable" in group:
                    group["capturable"] = capturable
            if capturable:
                # a capturable Adam counts its steps on the device (the saved count may be on the host)
                for p, state in opt.state.items():
                    if isinstance(state.get("step"), torch.Tensor):
                        state["step"] = state["step"].to(p.device, torch.float32)

    def lr_at(self, epoch: int) -> float:
        start, lr0 = self.lr_segment
        return cosine_lr(epoch, lr0, self.cfg.lr_min, self.cfg.epochs, start)

    # --- checkpoints ----------------------------------------------------------------------------
    def _save(self) -> None:
        if self.checkpoint_path is None:
            return
        save_checkpoint(self.checkpoint_path, {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "w_opt": self.w_opt.state_dict(),
            "a_opt": self.a_opt.state_dict(),
            "lr_segment": list(self.lr_segment),
            "schedule": self.schedule.state_dict(),
            "history": self.history,
            "rng": _rng_state(),
        }, kind="search", meta=self.meta)

    def _try_resume(self) -> bool:
        if self.checkpoint_path is None or not self.checkpoint_path.exists():
            return False
        path = self.checkpoint_path
        ckpt = load_checkpoint(path, kind="search", meta=self.meta, map_location=self.device)
        epoch, history = checkpoint_progress(ckpt, path, self.cfg.epochs)
        try:
            self.model.load_state_dict(ckpt["model"])
            self.lr_segment = (int(ckpt["lr_segment"][0]), float(ckpt["lr_segment"][1]))
            self.reset_optimisers(0, restart_schedule=False)
            self.w_opt.load_state_dict(ckpt["w_opt"])
            self.a_opt.load_state_dict(ckpt["a_opt"])
            self._set_optimizer_kernels()
            self.schedule.load_state_dict(ckpt["schedule"])
            _set_rng_state(ckpt["rng"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise CheckpointError(f"{path} does not fit this search ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else 'no detail'}); delete it "
                                  f"to start afresh") from None
        self.history, self.epoch = history, epoch
        self.log(f"search: resumed from {self.checkpoint_path} at epoch {self.epoch}")
        return True

    # --- the loop -------------------------------------------------------------------------------
    def run(self) -> SearchResult:
        with cudnn_benchmark(self.cfg.cudnn_benchmark):
            return self._run()

    def _run(self) -> SearchResult:
        resumed = self._try_resume()
        start = self.epoch
        if not resumed:
            self.schedule.initialise(self)
        for epoch in range(self.epoch, self.cfg.epochs):
            self.schedule.on_epoch_start(self, epoch)
            record = self.search_epoch(epoch)
            self.history.append(record)
            self.epoch = epoch + 1
            self._save()
            if self.on_epoch_end is not None:
                self.on_epoch_end(record)
        self._steps = None          # a captured step's graph and static buffers end with the run
        return SearchResult(self.model.derive(), self.history, self.model, start)

    def _val_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The α loader as an infinite reshuffled cycle, replayable from the epoch number."""
        val = self.data.arch if self.data.arch is not None else self.data.val
        k = 0
        while True:
            val.set_epoch(epoch * 1000 + k)    # 1000 passes per epoch at most: never collide
            yield from val
            k += 1

    def step_context(self, epoch: int) -> StepContext:
        """Everything an update rule needs for the steps of `epoch` (sets the epoch's lr: in
        `lr_now`, which the context then carries as ξ, when the SGD is fused)."""
        cfg = self.cfg
        lr: float | torch.Tensor = self.lr_at(epoch)
        if self.fused_sgd:
            self.lr_now.fill_(lr)
            lr = self.lr_now
        for group in self.w_opt.param_groups:
            group["lr"] = lr
        return StepContext(model=self.model, weights=self.weights, arch=self.arch, w_opt=self.w_opt,
                           a_opt=self.a_opt, lr=lr, grad_clip=cfg.grad_clip,
                           arch_grad_clip=cfg.arch_grad_clip, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, unrolled_eps=cfg.unrolled_eps,
                           step_order=cfg.step_order,
                           amp_dtype=torch.bfloat16 if cfg.amp == "bf16" else None,
                           memory_format=torch.channels_last if cfg.channels_last
                           else torch.contiguous_format)

    def search_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, model = self.cfg, self.model
        ctx = self.step_context(epoch)
        lr = self.lr_at(epoch)
        update_arch = epoch >= cfg.arch_warmup_epochs
        need_val = self.rule.needs_val_batch and update_arch
        if need_val and self.data.val is None:
            raise ValueError(f"optimisation {cfg.optimisation!r} needs validation batches")
        val_iter = self._val_batches(epoch) if need_val else None
        model.train()
        # linear ramp 0 -> max over the search, as the evaluation recipe ramps its drop-path
        drop_prob = cfg.drop_path * epoch / cfg.epochs
        model.set_drop_path(drop_prob)
        self.data.train.set_epoch(epoch)
        steps = self._epoch_steps(ctx, update_arch, drop_prob)
        reset_peak_memory(self.device)
        t0 = time.perf_counter()
        # a step bar in a terminal; logs (CI, dvc queue) get the one line per epoch only
        bar = tqdm(self.data.train, total=len(self.data.train), desc=f"search epoch {epoch + 1}",
                   leave=False, disable=not sys.stderr.isatty())
        for train in bar:
            steps.step(train, next(val_iter) if val_iter is not None else None)
        s, bad = steps.totals()       # the epoch's host sync
        counts, skipped = steps.counts, steps.skipped
        kept = (f"the checkpoint after epoch {self.epoch} is kept" if self.epoch and self.checkpoint_path
                else "no epoch had finished, so there is no checkpoint to keep")
        if bad >= 0:
            raise NonFiniteError(
                f"search: non-finite loss or α at epoch {epoch + 1}, step {bad + 1} (lr {lr:.4g}); stopped "
                f"without saving this epoch; {kept}. "
                f"Lower search.lr / search.arch_lr, or set search.nonfinite: skip to drop such batches")
        if skipped and not counts[0]:
            # nothing was learnt and the model is the one before the epoch: a 0.0 loss would lie
            raise NonFiniteError(
                f"search: every one of epoch {epoch + 1}'s {skipped} batches gave a non-finite loss or α "
                f"and was skipped (lr {lr:.4g}); stopped; {kept}. Lower search.lr / search.arch_lr, or "
                f"check the data for NaN/inf pixels")
        seconds = time.perf_counter() - t0
        record: dict[str, Any] = {
            "epoch": epoch + 1, "lr": lr, "update_arch": update_arch,     # 1-based, like training
            "train_loss": s[0] / max(counts[0], 1), "train_acc": s[1] / max(counts[0], 1),
            "epoch_seconds": seconds, "images_per_s": counts[0] / seconds if seconds else 0.0,
            "skipped_batches": skipped,
        }
        if counts[1]:
            record.update(arch_loss=s[2] / counts[1], arch_acc=s[3] / counts[1])
        if cfg.valid_every and self.data.val is not None and (
                (epoch + 1) % cfg.valid_every == 0 or epoch + 1 == cfg.epochs):
            record.update(self.validate())
        record.update(collapse_diagnostics(model))
        record["active_ops"] = len(model.active_columns())
        if cfg.hessian_eigenvalue and self.data.val is not None:
            self.data.val.set_epoch(-2)
            batches = [b for _, b in zip(range(cfg.hessian_batches), self.data.val)]
            record["hessian_eigenvalue"] = hessian_eigenvalue(model, batches, cfg.hessian_iters)
        record.update(peak_memory(self.device))     # the epoch's steps and validation (CUDA only)
        self.log(f"search epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f} "
                 f"acc {record['train_acc']:.3f}"
                 + (f" ({skipped} non-finite batches skipped)" if skipped else "")
                 + (f" valid {record['valid_acc']:.3f}" if "valid_acc" in record else "")
                 + f" param-free {record['param_free_ops']} | {record['genotype_str']}")
        return record

    def _epoch_steps(self, ctx: StepContext, update_arch: bool, drop_prob: float) -> EpochSteps:
        """The epoch's steps: the previous epoch's, their captured step included, while nothing
        that a capture freezes has changed; otherwise new ones, which capture anew.

        A capture freezes the Python values the step read and the tensors it used: whether α
        steps (the warm-up ends once), the drop-path probability unless the supernet keeps it on
        the device (it does when steps are captured: `Supernet.drop_path_on_device`),
        the optimisers' state tensors (replaced when OPP-DARTS adds an op), the active op columns,
        and the lr unless the SGD reads it from `lr_now`. So a search with a fused SGD and no op
        schedule captures at most twice per run: once in α's warm-up, once after.
        """
        frozen = (update_arch, None if self.model.drop_prob_on_device() else drop_prob, self._optimiser_generation,
                  tuple(self.model.active_columns()), None if isinstance(ctx.lr, torch.Tensor) else ctx.lr)
        if self._steps is not None and self._steps.frozen == frozen:
            self._steps.next_epoch(ctx)
        else:
            self._steps = None           # an old graph's memory goes back before a new capture
            self._steps = EpochSteps(self, ctx, update_arch, frozen)
        return self._steps

    def validate(self) -> dict[str, float]:
        """Supernet loss/accuracy on the α half in eval mode (BN running statistics), under the
        search's `amp` and `channels_last`, through `train.evaluate`.

        The loader's batches are merged into forwards of about `valid_batch_size` images (whole
        loader batches: at least that many, the last fewer). In eval mode an image's logits do
        not depend on the rest of its batch, so the figures are those of batch-by-batch
        validation (the loss sum's rounding aside), and a pass over the α half launches several
        times fewer kernels: it runs eagerly, outside any CUDA graph, once per epoch, over as many
        images as the epoch's α steps see. At 512 images a forward is GPU-bound (the H200's NB201
        validation forward took 43.9 ms in fp32 NCHW, against 25.7 ms for a bf16 search step), so
        it runs in the steps' precision and layout: bf16 rounds the figures as it rounds the steps.
        """
        self.data.val.set_epoch(-3)
        figures = evaluate(self.model, merged_batches(self.data.val, self.cfg.valid_batch_size), self.device,
                           amp=self.cfg.amp, channels_last=self.cfg.channels_last)
        return {"valid_loss": figures["loss"], "valid_acc": figures["top1"]}

    def _snapshot(self) -> dict[str, Any]:
        return {"model": {k: v.clone() for k, v in self.model.state_dict().items()},
                "w_opt": _clone_state(self.w_opt.state_dict()),
                "a_opt": _clone_state(self.a_opt.state_dict())}

    def _restore(self, snap: dict[str, Any]) -> None:
        self.model.load_state_dict(snap["model"])
        self.w_opt.load_state_dict(snap["w_opt"])
        self.a_opt.load_state_dict(snap["a_opt"])


class EpochSteps:
    """The search steps of one epoch and their device-side bookkeeping.

    A step is the update rule plus accounting that never reads a value on the host: loss and
    accuracy sums, and the first non-finite step, accumulate in device tensors read once by
    `totals`. So a step can be captured whole (`search.cuda_graph`): a few plain warm-up steps
    create the optimisers' state and let cuDNN pick its kernels, the next batch is copied into
    static buffers and the step captured, and every later batch is copied in and the graph
    replayed; a batch of another shape (a last partial batch) runs plainly. The search reuses one
    `EpochSteps` from epoch to epoch (`next_epoch`) while `frozen`, what its graph holds constant,
    is unchanged (`SearchRun._epoch_steps`): its sums are zeroed in place, so the graph that adds
    into them stays valid.
    """

    # Plain steps before a capture: the first creates the optimisers' state (momentum buffers,
    # Adam moments) that a graph must find allocated; cuDNN's autotuning also runs in it.
    WARMUP_STEPS = 2

    def __init__(self, run: SearchRun, ctx: StepContext, update_arch: bool, frozen: Any = None) -> None:
        self.run, self.ctx, self.update_arch, self.frozen = run, ctx, update_arch, frozen
        device = run.device
        self.sums = torch.zeros(4, device=device)     # loss, correct, arch loss, arch correct
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.step_index = torch.zeros((), dtype=torch.long, device=device)
        self.counts = [0, 0]
        self.skipped = 0
        self._warmup = self.WARMUP_STEPS
        self._graph: StepGraph | None = None
        self._static: list[torch.Tensor] = []
        self._graph_counts = (0, 0)

    def next_epoch(self, ctx: StepContext) -> None:
        """Start another epoch with the same steps: sums and step index zeroed in place."""
        self.ctx = ctx
        self.sums.zero_()
        self.bad_step.fill_(-1)
        self.step_index.zero_()
        self.counts = [0, 0]
        self.skipped = 0

    def _step(self, train: Batch, val: Batch | None) -> tuple[StepStats, torch.Tensor]:
        """One update-rule step and its accounting; (stats, finite flag), all on the device."""
        stats = self.run.rule.step(self.ctx, train, val, self.update_arch)
        finite = torch.isfinite(stats.loss) & torch.stack(
            [torch.isfinite(a).all() for a in self.run.arch]).all()
        if stats.arch_loss is not None:
            finite = finite & torch.isfinite(stats.arch_loss)
        if self.run.cfg.nonfinite == "stop":
            # remember the first bad step; read once per epoch
            self.bad_step.copy_(torch.where((self.bad_step < 0) & ~finite, self.step_index, self.bad_step))
        self.step_index.add_(1)
        return stats, finite

    def _add(self, stats: StepStats) -> tuple[int, int]:
        """Add the step's sums on the device; returns its (train, α) image counts."""
        zero = self.sums.new_zeros(())
        self.sums.add_(torch.stack([stats.loss, stats.correct.to(self.sums.dtype),
                                    zero if stats.arch_loss is None else stats.arch_loss,
                                    zero if stats.arch_correct is None else
                                    stats.arch_correct.to(self.sums.dtype)]))
        return stats.count, stats.arch_count if stats.arch_loss is not None else 0

    def _count(self, counts: tuple[int, int]) -> None:
        self.counts[0] += counts[0]
        self.counts[1] += counts[1]

    def step(self, train: Batch, val: Batch | None) -> None:
        run = self.run
        if run.capture_step is not None:
            self._graph_step(train, val)
            return
        snapshot = run._snapshot() if run.cfg.nonfinite == "skip" else None
        stats, finite = self._step(train, val)
        # 'skip' pays one host sync per step to undo a non-finite update before it spreads
        if snapshot is not None and not bool(finite):
            run._restore(snapshot)
            self.skipped += 1
            return
        self._count(self._add(stats))

    def _batches(self, train: Batch, val: Batch | None) -> list[torch.Tensor]:
        return [*train, *(val if val is not None else ())]

    def _graph_step(self, train: Batch, val: Batch | None) -> None:
        batches = self._batches(train, val)
        if self._graph is not None and [(t.shape, t.dtype) for t in batches] == \
                [(t.shape, t.dtype) for t in self._static]:
            for s, t in zip(self._static, batches):
                s.copy_(t)
            self._graph.replay()
            self._count(self._graph_counts)
            return
        if self._warmup > 0 or self._graph is not None:   # warm-up, or a batch the graph cannot take
            self._warmup -= 1
            with side_stream(self.run.device):
                counts = self._add(self._step(train, val)[0])
            self._count(counts)
            return
        self._static = [t.clone() for t in batches]
        n = len(train)
        s_train = tuple(self._static[:n])
        s_val = tuple(self._static[n:]) if val is not None else None

        def captured() -> None:
            self._graph_counts = self._add(self._step(s_train, s_val)[0])   # host ints: shapes

        self._graph = self.run.capture_step(captured)
        self._graph.replay()          # capturing ran nothing: this performs the step
        self._count(self._graph_counts)

    def totals(self) -> tuple[list[float], int]:
        """(loss, correct, arch loss, arch correct) sums and the first bad step (-1: none)."""
        return self.sums.tolist(), int(self.bad_step)


def _clone_state(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {k: _clone_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_clone_state(v) for v in state]
    return state


@contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """cuDNN's autotuning for the duration of a search, the caller's setting restored after. A
    search's conv shapes are fixed, so each is timed once (in the first steps, before a CUDA graph
    captures them); the chosen algorithms may differ between runs, so results are not bitwise
    repeatable across runs on a GPU with it on."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def search(space: SearchSpace, cfg: SearchConfig, data: SearchData, **kwargs: Any) -> SearchResult:
    """Run a search to completion (resuming from `checkpoint_path` if it exists)."""
    return SearchRun(space, cfg, data, **kwargs).run()


def config_dict(cfg: SearchConfig) -> dict[str, Any]:
    return asdict(cfg)
