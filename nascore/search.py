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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .diagnostics import collapse_diagnostics, hessian_eigenvalue
from .genotype import AnyGenotype
from .io import load_checkpoint, save_checkpoint
from .op_schedules import OP_SCHEDULES, ProgressiveConfig
from .optimisation import UPDATE_RULES, StepContext
from .spaces import SearchSpace
from .supernet import Supernet, SupernetConfig


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
    partial_channels: int = 1              # K (PC-DARTS: 4)
    channel_shuffle: bool = True
    edge_normalization: bool = False
    features: str = "trained"              # trained | random
    op_schedule: str = "all"               # all | progressive
    arch_warmup_epochs: int = 0            # epochs with w-only updates (PC-DARTS: 15)
    single_level_data: str = "half"        # half | full: single level on the w half or all images
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
    hessian_eigenvalue: bool = False
    hessian_batches: int = 2
    hessian_iters: int = 20
    nonfinite: str = "stop"                # stop | skip
    rf: RandomFeaturesConfig = field(default_factory=RandomFeaturesConfig)
    opp: ProgressiveConfig = field(default_factory=ProgressiveConfig)

    def supernet_config(self, num_classes: int) -> SupernetConfig:
        return SupernetConfig(
            num_classes=num_classes, init_channels=self.init_channels, layers=self.layers,
            partial_channels=self.partial_channels, channel_shuffle=self.channel_shuffle,
            edge_normalization=self.edge_normalization, random_features=self.features == "random",
            freeze_stem_conv=self.rf.freeze_stem_conv, train_classifier=self.rf.train_classifier)


class Loader(Protocol):
    """Batches of (x, y) on the search device; `set_epoch` makes an epoch's order reproducible."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...


@dataclass
class SearchData:
    train: Loader                       # weight batches (the w half; all images for single_level full)
    val: Loader | None                  # α batches (the α half), cycled
    num_classes: int
    score_fraction_batches: int | None = None   # OPP scoring: batches per candidate (None = all)


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


class SearchRun:
    """One search: owns the supernet, the optimisers and the loop; hosts the op schedule."""

    def __init__(self, space: SearchSpace, cfg: SearchConfig, data: SearchData, *,
                 device: torch.device | str = "cpu", seed: int = 2,
                 checkpoint_path: str | Path | None = None, meta: Mapping[str, Any] | None = None,
                 on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.space, self.cfg, self.data = space, cfg, data
        self.device = torch.device(device)
        self.seed = seed
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.meta = {"space": space.name, "seed": seed, **(meta or {})}
        self.on_epoch_end = on_epoch_end
        self.log = log
        _seed_everything(seed)     # the random features ARE the init: seeded, recorded in meta
        self.model = self.build_model()
        self.rule = UPDATE_RULES.get(cfg.optimisation)()
        self.schedule = OP_SCHEDULES.get(cfg.op_schedule)(cfg.opp, cfg.epochs)
        self.lr_segment = (0, cfg.lr)          # (start epoch, start lr) of the cosine schedule
        self.history: list[dict[str, Any]] = []
        self.epoch = 0
        self.reset_optimisers(0, restart_schedule=False)

    # --- ScheduleHost ---------------------------------------------------------------------------
    def build_model(self) -> Supernet:
        return self.space.build_supernet(self.cfg.supernet_config(self.data.num_classes)).to(self.device)

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
        ckpt = load_checkpoint(self.checkpoint_path, kind="search", meta=self.meta, map_location=self.device)
        self.model.load_state_dict(ckpt["model"])
        self.lr_segment = (int(ckpt["lr_segment"][0]), float(ckpt["lr_segment"][1]))
        self.reset_optimisers(0, restart_schedule=False)
        self.w_opt.load_state_dict(ckpt["w_opt"])
        self.a_opt.load_state_dict(ckpt["a_opt"])
        self.schedule.load_state_dict(ckpt["schedule"])
        self.history = list(ckpt["history"])
        self.epoch = int(ckpt["epoch"])
        _set_rng_state(ckpt["rng"])
        self.log(f"search: resumed from {self.checkpoint_path} at epoch {self.epoch}")
        return True

    # --- the loop -------------------------------------------------------------------------------
    def run(self) -> SearchResult:
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
        return SearchResult(self.model.derive(), self.history, self.model, start)

    def _val_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The α loader as an infinite reshuffled cycle, replayable from the epoch number."""
        val = self.data.val
        k = 0
        while True:
            val.set_epoch(epoch * 1000 + k)    # 1000 passes per epoch at most: never collide
            yield from val
            k += 1

    def search_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, model = self.cfg, self.model
        lr = self.lr_at(epoch)
        for group in self.w_opt.param_groups:
            group["lr"] = lr
        update_arch = epoch >= cfg.arch_warmup_epochs
        ctx = StepContext(model=model, weights=self.weights, arch=self.arch, w_opt=self.w_opt,
                          a_opt=self.a_opt, lr=lr, grad_clip=cfg.grad_clip,
                          arch_grad_clip=cfg.arch_grad_clip, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, unrolled_eps=cfg.unrolled_eps,
                          step_order=cfg.step_order)
        need_val = self.rule.needs_val_batch and update_arch
        if need_val and self.data.val is None:
            raise ValueError(f"optimisation {cfg.optimisation!r} needs validation batches")
        val_iter = self._val_batches(epoch) if need_val else None
        model.train()
        self.data.train.set_epoch(epoch)
        sums = torch.zeros(4, device=self.device)     # loss, correct, arch loss, arch correct
        counts = [0, 0]
        bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        skipped = 0
        t0 = time.perf_counter()
        for step, train in enumerate(self.data.train):
            val = next(val_iter) if val_iter is not None else None
            snapshot = self._snapshot() if cfg.nonfinite == "skip" else None
            stats = self.rule.step(ctx, train, val, update_arch)
            finite = torch.isfinite(stats.loss) & torch.stack(
                [torch.isfinite(a).all() for a in self.arch]).all()
            if stats.arch_loss is not None:
                finite = finite & torch.isfinite(stats.arch_loss)
            if snapshot is not None:
                # 'skip' pays one host sync per step to undo a non-finite update before it spreads
                if not bool(finite):
                    self._restore(snapshot)
                    skipped += 1
                    continue
            else:
                # 'stop': no per-step sync; remember the first bad step, checked once per epoch
                bad_step = torch.where((bad_step < 0) & ~finite, torch.tensor(step, device=self.device),
                                       bad_step)
            sums[0] += stats.loss
            sums[1] += stats.correct
            counts[0] += stats.count
            if stats.arch_loss is not None:
                sums[2] += stats.arch_loss
                sums[3] += stats.arch_correct
                counts[1] += stats.arch_count
        bad = int(bad_step)
        if bad >= 0:
            raise NonFiniteError(
                f"search: non-finite loss or α at epoch {epoch}, step {bad} (lr {lr:.4g}); stopped "
                f"without saving this epoch, the last good checkpoint (epoch {self.epoch}) is kept. "
                f"Lower search.lr / search.arch_lr, or set search.nonfinite: skip to drop such batches")
        seconds = time.perf_counter() - t0
        s = sums.tolist()
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
        self.log(f"search epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f} "
                 f"acc {record['train_acc']:.3f}"
                 + (f" valid {record['valid_acc']:.3f}" if "valid_acc" in record else "")
                 + f" param-free {record['param_free_ops']} | {record['genotype_str']}")
        return record

    def validate(self) -> dict[str, float]:
        """Supernet loss/accuracy on the α half in eval mode (BN running statistics)."""
        model = self.model
        model.eval()
        self.data.val.set_epoch(-3)
        total = torch.zeros(2, device=self.device)
        n = 0
        with torch.no_grad():
            for x, y in self.data.val:
                logits = model(x)
                total[0] += F.cross_entropy(logits, y, reduction="sum")
                total[1] += (logits.argmax(1) == y).sum()
                n += y.numel()
        model.train()
        loss, correct = total.tolist()
        return {"valid_loss": loss / max(n, 1), "valid_acc": correct / max(n, 1)}

    def _snapshot(self) -> dict[str, Any]:
        return {"model": {k: v.clone() for k, v in self.model.state_dict().items()},
                "w_opt": _clone_state(self.w_opt.state_dict()),
                "a_opt": _clone_state(self.a_opt.state_dict())}

    def _restore(self, snap: dict[str, Any]) -> None:
        self.model.load_state_dict(snap["model"])
        self.w_opt.load_state_dict(snap["w_opt"])
        self.a_opt.load_state_dict(snap["a_opt"])


def _clone_state(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {k: _clone_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_clone_state(v) for v in state]
    return state


def search(space: SearchSpace, cfg: SearchConfig, data: SearchData, **kwargs: Any) -> SearchResult:
    """Run a search to completion (resuming from `checkpoint_path` if it exists)."""
    return SearchRun(space, cfg, data, **kwargs).run()


def config_dict(cfg: SearchConfig) -> dict[str, Any]:
    return asdict(cfg)
