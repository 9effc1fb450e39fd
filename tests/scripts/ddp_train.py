"""torchrun target for tests/test_train.py: tiny data-parallel runs on CPU (gloo).

Two runs of the same recipe: "straight" (uninterrupted) and "resumed" (every rank crashes when
epoch 2 starts, after epoch 1's checkpoint, then calls train again). Rank 1 sees a NaN batch in
epoch 2, trained with nonfinite='skip', so the ranks must also agree to skip it together. A third,
"fused": a tiny DARTS_V2 network through `fused_dense` with drop-path (the fused cells' own
autograd functions and one drop-path draw per forward), straight through.
Each rank writes rank<r>.json: per run, a checksum of its final weights and buffers, how many
checkpoints it wrote, and its history.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import nascore.train as T
from nascore.distributed import destroy_distributed, init_distributed
from nascore.genotype import PUBLISHED_GENOTYPES
from nascore.networks import NetworkCIFAR


class Crash(Exception):
    pass


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head, self.aux = nn.Linear(8, 4), nn.Linear(8, 4)
        self.drop_path_prob = 0.0

    def forward(self, x: torch.Tensor) -> Any:
        h = self.body(x)
        if self.training and self.drop_path_prob > 0:   # per-sample drop, from each rank's RNG
            h = h * (torch.rand(h.size(0), 1) >= self.drop_path_prob) / (1 - self.drop_path_prob)
        return (self.head(h), self.aux(h)) if self.training else self.head(h)


class Loader:
    """A DataLoader over a DistributedSampler that poisons one batch on rank 1 and can crash."""

    def __init__(self, data: TensorDataset, rank: int, crash_at: int | None) -> None:
        self.dl = DataLoader(data, batch_size=16, sampler=DistributedSampler(data, seed=0))
        self.rank, self.crash_at, self.epoch = rank, crash_at, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.crash_at:
            self.crash_at = None
            raise Crash
        self.epoch = epoch
        self.dl.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dl)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step, (x, y) in enumerate(self.dl):
            yield (x * math.nan if (self.rank, self.epoch, step) == (1, 1, 1) else x), y


def darts_v2() -> nn.Module:
    # 8 px through 3 cells (two reductions: 8 -> 4 -> 2)
    return NetworkCIFAR(PUBLISHED_GENOTYPES["DARTS_V2"], 4, 4, 3, auxiliary=False)


def run(out: Path, epochs: int, rank: int, device: torch.device, crash_at: int | None,
        make: Callable[[], nn.Module] = Net, backend: str = "eager") -> dict[str, Any]:
    saves = 0
    real_save = T.save_checkpoint

    def counting_save(*a: Any, **kw: Any) -> None:
        nonlocal saves
        saves += 1
        real_save(*a, **kw)

    T.save_checkpoint = counting_save
    g = torch.Generator().manual_seed(0)
    templates = torch.randn(4, 3, 8, 8, generator=g)
    y = torch.arange(128) % 4
    data = TensorDataset(templates[y] + torch.randn(128, 3, 8, 8, generator=g), y)
    # 128 samples / 2 ranks / batch 16 = 4 steps per epoch
    train_loader = Loader(data, rank, crash_at)
    eval_loader = DataLoader(data, batch_size=32, sampler=DistributedSampler(data, shuffle=False))
    cfg = T.TrainConfig(epochs=epochs, lr=0.05, drop_path=0.2, nonfinite="skip",
                        progress="none", deterministic=True, backend=backend)
    kw = dict(checkpoint_path=out / "ck.pt", device=device, meta={"test": "ddp"})
    torch.manual_seed(rank)      # different initial weights per rank: DDP must unify them
    model = make()
    try:
        result = T.train(model, train_loader, eval_loader, cfg, **kw)
    except Crash:                # a new process: other weights and random states, same call
        T.seed_all(100 + rank)
        model = make()
        result = T.train(model, train_loader, eval_loader, cfg, **kw)
    T.save_checkpoint = real_save

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    history = [{k: v for k, v in r.items() if k not in ("epoch_seconds", "images_per_s")}
               for r in result.history]
    return {"checksum": h.hexdigest(), "saves": saves, "history": history,
            "resumed_from": result.resumed_from}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    info = init_distributed(device_type="cpu")
    report = {name: run(args.out / name, args.epochs, info.rank, info.device, crash_at)
              for name, crash_at in (("straight", None), ("resumed", 1))}
    report["fused"] = run(args.out / "fused", 2, info.rank, info.device, None, darts_v2, "fused_dense")
    (args.out / f"rank{info.rank}.json").write_text(json.dumps(report))
    destroy_distributed()


if __name__ == "__main__":
    main()
