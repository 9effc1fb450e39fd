"""The retrain / transfer loop: learning, schedules, loss terms, resume, non-finite losses, DDP."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nascore.genotype import DARTS_V2, NB201Genotype
from nascore.io import CheckpointError, load_checkpoint, save_torch
from nascore.networks import NB201Network, NetworkCIFAR
from nascore.train import (PRESETS, NonFiniteLossError, TrainConfig, evaluate, lr_at, seed_all,
                           train)
from tests._graph_tape import TapeGraph

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("epoch_seconds", "images_per_s")


# --- a tiny learnable problem, a tiny network and a loader with the real loaders' protocol ------

def blobs(n: int, classes: int = 4, noise_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images = a fixed per-class template + unit noise: learnable in a few steps."""
    templates = torch.randn(classes, 3, 8, 8, generator=torch.Generator().manual_seed(1234))
    y = torch.arange(n) % classes
    return templates[y] + torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(noise_seed)), y


class EpochLoader:
    """Shuffled batches whose order is a pure function of (seed, epoch)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int = 32, seed: int = 0,
                 skip: tuple[int, int] | None = None) -> None:
        self.x, self.y, self.batch, self.seed, self.epoch = x, y, batch, seed, 0
        self.skip = skip    # (epoch, step) to leave out: the reference for a skipped batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        left_out = self.skip is not None and self.skip[0] == self.epoch
        return math.ceil(len(self.y) / self.batch) - left_out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(len(self.y), generator=g)
        for step, i in enumerate(range(0, len(order), self.batch)):
            if self.skip != (self.epoch, step):
                idx = order[i:i + self.batch]
                yield self.x[idx], self.y[idx]


class TinyNet(nn.Module):
    """conv-BN-ReLU, drop-path on the features (global RNG), a classifier and an auxiliary head."""

    def __init__(self, classes: int = 4, nan_at: int | None = None, inf_grad_at: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.head, self.aux_head = nn.Linear(8, classes), nn.Linear(8, classes)
        self.drop_path_prob = 0.0
        self.seen_drop_path: list[float] = []
        self.nan_at, self.inf_grad_at, self.steps = nan_at, inf_grad_at, 0

    def forward(self, x: torch.Tensor) -> Any:
        if self.training:
            if self.steps == self.nan_at:
                x = x * math.nan
            self.steps += 1
            self.seen_drop_path.append(self.drop_path_prob)
        h = self.conv(x)
        if self.training and self.steps - 1 == self.inf_grad_at:   # a finite loss, an infinite gradient
            h.register_hook(lambda g: g * math.inf)
        if self.training and self.drop_path_prob > 0:
            keep = (torch.rand(h.size(0), 1, 1, 1) >= self.drop_path_prob).to(h.dtype)
            h = h * keep / (1 - self.drop_path_prob)
        h = h.mean((2, 3))
        return (self.head(h), self.aux_head(h)) if self.training else self.head(h)


def cfg(**kw: Any) -> TrainConfig:
    base = dict(epochs=3, lr=0.05, drop_path=0.1, progress="none", deterministic=True)
    return TrainConfig(**{**base, **kw})


def loaders(n_train: int = 256, **kw: Any) -> tuple[EpochLoader, EpochLoader]:
    return EpochLoader(*blobs(n_train), **kw), EpochLoader(*blobs(128, noise_seed=1), batch=64)


def fresh_model(seed: int = 0, **kw: Any) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kw)


def without_timing(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


def assert_records_close(got: list[dict[str, Any]], want: list[dict[str, Any]], rel: float) -> None:
    """The same records, their floats within `rel` of each other, everything else equal."""
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    for g, w in zip(got, want):
        for k, v in w.items():
            assert g[k] == (pytest.approx(v, rel=rel) if isinstance(v, float) else v), (g["epoch"], k)


# --- learning and the recipe's numbers ----------------------------------------------------------

def test_learns_a_learnable_problem(tmp_path: Path) -> None:
    tr, ev = loaders()
    seen: list[dict[str, Any]] = []
    result = train(fresh_model(), tr, ev, cfg(), checkpoint_path=tmp_path / "ck.pt", device="cpu",
                   on_epoch_end=seen.append, meta={"genotype": "tiny"})
    h = result.history
    assert [r["epoch"] for r in h] == [1, 2, 3] and seen == h and result.resumed_from == 0
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert h[-1]["eval_top1"] > 0.6                     # chance is 0.25
    assert h[-1]["eval_top5"] == 1.0                    # 4 classes: top-5 is every class
    assert all(r["images_per_s"] > 0 and r["skipped_batches"] == 0 for r in h)
    assert not any("peak_memory_mb" in r for r in h)  # no memory statistics on the CPU
    ck = load_checkpoint(tmp_path / "ck.pt", kind="train", meta={"genotype": "tiny"})
    assert ck["epoch"] == 3 and without_timing(ck["history"]) == without_timing(h)


def test_evaluate_top1_top5_and_loss() -> None:
    # target 0 ranked 1st, 2nd, 6th and 1st among 8 classes
    logits = torch.tensor([[9., 1, 0, 0, 0, 0, 0, 0], [5., 6, 0, 0, 0, 0, 0, 0],
                           [1., 6, 5, 4, 3, 2, 0, 0], [3., 2, 1, 0, 0, 0, 0, 0]])
    y = torch.zeros(4, dtype=torch.long)
    got = evaluate(nn.Identity(), [(logits[:2], y[:2]), (logits[2:], y[2:])], "cpu")
    assert got["top1"] == 0.5 and got["top5"] == 0.75
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)


def test_lr_schedules_match_the_recipes() -> None:
    cosine = PRESETS["darts_cifar"]
    assert (cosine.epochs, cosine.lr, cosine.weight_decay, cosine.grad_clip, cosine.drop_path,
            cosine.auxiliary_weight) == (600, 0.025, 3e-4, 5.0, 0.2, 0.4)
    assert lr_at(cosine, 0) == 0.025
    assert lr_at(cosine, 300) == pytest.approx(0.0125)
    assert lr_at(cosine, 600) == pytest.approx(0.0, abs=1e-15)
    assert 0 < lr_at(cosine, 599) < 1e-6
    assert lr_at(replace(cosine, lr_min=0.001), 600) == pytest.approx(0.001)

    exp = PRESETS["darts_imagenet"]
    assert (exp.lr, exp.weight_decay, exp.label_smoothing, exp.epochs) == (0.1, 3e-5, 0.1, 250)
    for e in (0, 1, 10, 249):
        assert lr_at(exp, e) == pytest.approx(0.1 * 0.97 ** e)

    warm = PRESETS["pc_darts_imagenet"]
    assert [lr_at(warm, e) for e in range(6)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.5])
    assert lr_at(warm, 130) == pytest.approx(0.5 * 120 / 245)
    assert lr_at(warm, 250) == 0.0


def test_label_smoothing_and_auxiliary_weight_enter_the_loss(tmp_path: Path) -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.main, self.aux = nn.Linear(6, 5, bias=False), nn.Linear(6, 5, bias=False)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            return self.main(x), self.aux(x) if self.training else None

    torch.manual_seed(0)
    model = TwoHeads()
    x, y = torch.randn(8, 6), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    w_main, w_aux = model.main.weight.detach().clone(), model.aux.weight.detach().clone()
    eps, w, lr = 0.1, 0.4, 0.5

    def smoothed_ce(logits: torch.Tensor) -> torch.Tensor:   # (1-ε)·(-log p_y) + ε·mean_k(-log p_k)
        logp = logits.log_softmax(1)
        return ((1 - eps) * -logp.gather(1, y[:, None])[:, 0] - eps * logp.mean(1)).mean()

    wm, wa = w_main.clone().requires_grad_(), w_aux.clone().requires_grad_()
    expected = smoothed_ce(x @ wm.T) + w * smoothed_ce(x @ wa.T)
    expected.backward()

    c = TrainConfig(epochs=1, lr=lr, momentum=0.0, weight_decay=0.0, grad_clip=None, drop_path=0.0,
                    label_smoothing=eps, auxiliary_weight=w, progress="none")
    h = train(model, [(x, y)], None, c, checkpoint_path=tmp_path / "ck.pt", device="cpu").history
    assert h[0]["train_loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert h[0]["eval_top1"] is None
    # one plain SGD step on exactly that objective
    torch.testing.assert_close(model.main.weight, w_main - lr * wm.grad)
    torch.testing.assert_close(model.aux.weight, w_aux - lr * wa.grad)


def test_drop_path_prob_rises_linearly_per_epoch(tmp_path: Path) -> None:
    model = fresh_model()
    tr, _ = loaders(n_train=64)
    h = train(model, tr, None, cfg(epochs=4, drop_path=0.2), checkpoint_path=tmp_path / "ck.pt",
              device="cpu").history
    per_epoch = [model.seen_drop_path[i * 2] for i in range(4)]         # 2 steps per epoch
    assert per_epoch == [0.0, 0.05, 0.1, 0.15000000000000002]           # 0.2·e/4 in floats
    assert [r["drop_path_prob"] for r in h] == per_epoch
    with pytest.raises(ValueError, match="drop_path_prob"):
        train(nn.Sequential(nn.Flatten(), nn.Linear(192, 4)), tr, None, cfg(),
              checkpoint_path=tmp_path / "other.pt", device="cpu")


@pytest.mark.parametrize("bad, message", [
    (dict(epochs=0), "epochs"), (dict(lr=0.0), "lr"), (dict(drop_path=1.0), "drop_path"),
    (dict(schedule="step"), "schedule"), (dict(lr="0.1"), "lr"), (dict(epochs=True), "epochs"),
    (dict(schedule="warmup_linear", warmup_epochs=3, epochs=3), "warmup_epochs"),
    (dict(nonfinite="ignore"), "nonfinite"), (dict(label_smoothing=-0.1), "label_smoothing"),
])
def test_config_is_validated(bad: dict[str, Any], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=f"TrainConfig.{message}="):
        TrainConfig(**bad)


# --- resume -------------------------------------------------------------------------------------

class Crash(Exception):
    pass


def crash_after(epoch: int):
    def callback(record: dict[str, Any]) -> None:
        if record["epoch"] == epoch:
            raise Crash
    return callback


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path: Path) -> None:
    def run(model: TinyNet, name: str, **kw: Any):
        return train(model, *loaders(n_train=128), cfg(), checkpoint_path=tmp_path / name,
                     device="cpu", **kw)

    straight = fresh_model()
    full = run(straight, "a.pt")
    with pytest.raises(Crash):
        run(fresh_model(), "b.pt", on_epoch_end=crash_after(1))
    seed_all(999)                         # a new process starts from other random states
    resumed_model = fresh_model(seed=7)   # and other initial weights: the checkpoint rules
    resumed = run(resumed_model, "b.pt")

    assert resumed.resumed_from == 1 and [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert without_timing(resumed.history) == without_timing(full.history)
    a, b = straight.state_dict(), resumed_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # a finished run returns at once with its history and its weights loaded
    class NoBatches(EpochLoader):
        def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            raise AssertionError("a finished run must not train")

    again_model = fresh_model(seed=3)
    again = train(again_model, NoBatches(*blobs(8)), None, cfg(progress="log"),
                  checkpoint_path=tmp_path / "a.pt", device="cpu")
    assert again.resumed_from == 3 and again.history == full.history
    assert all(torch.equal(v, again_model.state_dict()[k]) for k, v in a.items())


def test_a_kill_while_writing_keeps_the_previous_checkpoint(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    class Killed(BaseException):
        pass

    real_write, calls = Path.write_bytes, []

    def dying_write(self: Path, data: bytes) -> int:
        calls.append(self)
        if len(calls) == 2:                       # the second epoch's checkpoint, half written
            real_write(self, data[: len(data) // 2])
            raise Killed
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", dying_write)
    ck = tmp_path / "ck.pt"
    with pytest.raises(Killed):
        train(fresh_model(), *loaders(n_train=64), cfg(epochs=2), checkpoint_path=ck, device="cpu")
    assert load_checkpoint(ck, kind="train")["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]        # no temporary left behind
    monkeypatch.undo()
    done = train(fresh_model(), *loaders(n_train=64), cfg(epochs=2), checkpoint_path=ck, device="cpu")
    assert done.resumed_from == 1 and len(done.history) == 2


def test_truncated_foreign_and_other_recipe_checkpoints_are_refused(tmp_path: Path) -> None:
    ck = tmp_path / "ck.pt"
    meta = {"genotype": {"normal": [("sep_conv_3x3", 0)]}, "method": "darts"}
    with pytest.raises(Crash):
        train(fresh_model(), *loaders(n_train=32), cfg(epochs=2), checkpoint_path=ck, device="cpu",
              meta=meta, on_epoch_end=crash_after(1))

    with pytest.raises(CheckpointError, match="genotype="):
        train(fresh_model(), *loaders(n_train=32), cfg(epochs=2), checkpoint_path=ck, device="cpu",
              meta={**meta, "genotype": {"normal": [("skip_connect", 0)]}})
    with pytest.raises(CheckpointError, match="epochs=2 there, 5 here"):
        train(fresh_model(), *loaders(n_train=32), cfg(epochs=5), checkpoint_path=ck, device="cpu",
              meta=meta)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        train(TinyNet(classes=3), *loaders(n_train=32), cfg(epochs=2), checkpoint_path=ck,
              device="cpu", meta=meta)
    with pytest.raises(TypeError, match=r"meta\['genotype'\] is of type object"):
        train(fresh_model(), *loaders(n_train=32), cfg(epochs=2), checkpoint_path=ck, device="cpu",
              meta={"genotype": object()})

    good = load_checkpoint(ck, kind="train")
    for damage, match in (({"epoch": "x"}, r"epoch 'x' is not a whole number in \[0, 2\]"),
                          ({"epoch": 99}, r"epoch 99 is not a whole number in \[0, 2\]"),
                          ({"history": []}, "history holds 0 records for epoch 1"),
                          ({"rng": [{"torch": "not a state"}]}, "does not fit this model")):
        save_torch(ck, {**good, **damage})        # a hand-edited or damaged file: refused, not trusted
        with pytest.raises(CheckpointError, match=match):
            train(fresh_model(), *loaders(n_train=32), cfg(epochs=2), checkpoint_path=ck, device="cpu",
                  meta=meta)

    save_torch(ck, good)
    ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        train(fresh_model(), *loaders(n_train=32), cfg(epochs=2), checkpoint_path=ck, device="cpu",
              meta=meta)


# --- non-finite losses --------------------------------------------------------------------------

def test_nonfinite_stop_names_epoch_and_step_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    ck = tmp_path / "ck.pt"
    model = fresh_model(nan_at=8 + 2)          # 8 steps per epoch: epoch 2, step 3
    with pytest.raises(NonFiniteLossError, match=r"epoch 2/2, step 3/8") as err:
        train(model, *loaders(), cfg(epochs=2), checkpoint_path=ck, device="cpu")
    assert (err.value.epoch, err.value.step) == (2, 3)
    assert str(ck) in str(err.value)
    assert load_checkpoint(ck, kind="train")["epoch"] == 1


def test_a_nonfinite_gradient_with_a_finite_loss_stops_too_and_says_so(tmp_path: Path) -> None:
    model = fresh_model(inf_grad_at=8 + 4)     # epoch 2, step 5
    with pytest.raises(NonFiniteLossError, match=r"loss or gradient norm at epoch 2/2, step 5/8"):
        train(model, *loaders(), cfg(epochs=2), checkpoint_path=tmp_path / "ck.pt", device="cpu")


def test_nonfinite_skip_drops_exactly_that_batch(tmp_path: Path) -> None:
    c = cfg(epochs=2, drop_path=0.0, nonfinite="skip")
    skipping = fresh_model(nan_at=8 + 2)
    h = train(skipping, *loaders(), c, checkpoint_path=tmp_path / "a.pt", device="cpu").history
    assert [r["skipped_batches"] for r in h] == [0, 1]
    assert all(torch.isfinite(t).all() for t in skipping.state_dict().values())

    # the same run with that batch never loaded: weights, BN statistics, momentum all equal
    reference = fresh_model()
    ref = train(reference, *loaders(skip=(1, 2)), c, checkpoint_path=tmp_path / "b.pt",
                device="cpu").history
    a, b = skipping.state_dict(), reference.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in h] == [r["train_loss"] for r in ref]
    opt_a = load_checkpoint(tmp_path / "a.pt", kind="train")["optimizer"]["state"]
    opt_b = load_checkpoint(tmp_path / "b.pt", kind="train")["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["momentum_buffer"], opt_b[i]["momentum_buffer"]) for i in opt_a)


# --- speed paths, reporting, DDP ----------------------------------------------------------------

class Rerun:
    """Stands in for a CUDA graph on the CPU: 'replaying' re-runs the captured step function."""

    captures = 0
    replays = 0

    def __init__(self, step) -> None:
        Rerun.captures += 1
        self.step = step

    def replay(self) -> None:
        Rerun.replays += 1
        self.step()


@pytest.mark.parametrize("drop_path, captures", [(0.1, 3), (0.0, 1)])
def test_the_captured_step_logic_reproduces_the_plain_loop(tmp_path: Path, drop_path: float,
                                                           captures: int) -> None:
    """cuda_graph's bookkeeping (warm-up, static buffers, a last partial batch run plainly,
    device-side sums; the test passes' own graph) gives the plain loop's weights and records
    exactly, through a stand-in that
    replays the captured ops with their captured arguments, as a CUDA graph does (`TapeGraph`).
    A network that keeps its drop-path probability as a float only (TinyNet) gets a graph per
    probability; the lr, a tensor, needs none of its own."""
    def run(name: str, **kw: Any):
        model = fresh_model()
        tr, ev = loaders(n_train=250)                   # 8 batches: 7 of 32, one of 26
        result = train(model, tr, ev, cfg(epochs=3, drop_path=drop_path), checkpoint_path=tmp_path / f"{name}.pt",
                       device="cpu", **kw)
        return model, result.history
    TapeGraph.captures = TapeGraph.replays = 0
    plain_model, plain = run("plain")
    graphed_model, graphed = run("graphed", capture_step=TapeGraph)
    assert TapeGraph.captures == captures + 1               # and one for every test pass
    # training: less the short batch every epoch and 2 warm-up steps per capture; the test
    # passes (2 batches each): less their graph's 2 warm-up batches
    assert TapeGraph.replays == 3 * (8 - 1) - 2 * captures + 3 * 2 - 2
    assert len({r["lr"] for r in plain}) == 3          # the lr changed every epoch
    assert without_timing(graphed) == without_timing(plain)
    for (k, a), b in zip(plain_model.state_dict().items(), graphed_model.state_dict().values()):
        assert torch.equal(a, b), k


def test_how_often_a_retrain_is_tested_does_not_change_what_it_trains(tmp_path: Path) -> None:
    """A derived S4 cell may hold `noise`, which draws in evaluation mode too: the test passes
    draw from a forked stream (`train.forked_rng`), so `eval_every` (a `RESUMABLE_CHANGES` field:
    what a run reports, not what it trains) leaves the weights as they were. Until 2026-12-06 it
    did not."""
    from nascore.genotype import Genotype
    noisy = Genotype(normal=(("noise", 0),) + DARTS_V2.normal[1:], reduce=DARTS_V2.reduce)
    models = []
    for every in (1, 3):
        torch.manual_seed(0)
        model = NetworkCIFAR(noisy, C=4, num_classes=4, layers=3, auxiliary=False)
        train(model, *loaders(n_train=64), cfg(epochs=3, drop_path=0.0, eval_every=every),
              checkpoint_path=tmp_path / f"every{every}.pt", device="cpu")
        models.append(model)
    for (k, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("backend", ["eager", "fused_dense"])
def test_a_graphed_darts_retrain_and_its_test_passes_equal_the_plain_loop(tmp_path: Path, backend: str) -> None:
    """The fused cells' training and evaluation forwards replayed from one capture each
    (`TapeGraph`) give the plain loop's records and weights exactly (drop-path 0: the plain loop
    draws no masks then, a graphed network with its probability on the device would): nothing
    the forward computes from the weights or BN statistics is kept from the capture."""
    def run(name: str, capture_step: Any) -> tuple[nn.Module, list[dict[str, Any]]]:
        torch.manual_seed(0)
        model = NetworkCIFAR(DARTS_V2, C=4, num_classes=4, layers=3, auxiliary=False)
        result = train(model, *loaders(n_train=160), cfg(epochs=3, drop_path=0.0, backend=backend),
                       checkpoint_path=tmp_path / f"{name}.pt", device="cpu", capture_step=capture_step)
        return model, result.history
    plain_model, plain = run("plain", None)
    TapeGraph.captures = 0
    taped_model, taped = run("taped", TapeGraph)
    assert TapeGraph.captures == 2
    assert without_timing(taped) == without_timing(plain)
    for (k, a), b in zip(plain_model.state_dict().items(), taped_model.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("space, backend, amp", [("darts", "eager", "none"), ("darts", "fused_dense", "none"),
                                                 ("darts", "fused", "bf16"), ("nb201", "fused_dense", "none")])
def test_a_retrain_network_trains_through_one_graph_per_run(tmp_path: Path, space: str, backend: str,
                                                            amp: str) -> None:
    """A retrain network keeps its drop-path probability on the device while graphed, so the
    whole run, p = 0 first and a new p and lr every epoch, is one captured step: replayed with
    its captured arguments (`TapeGraph`) it gives exactly what running the step's Python afresh
    every time gives (`Rerun`), drop-path masks (drawn from the same generator) included. The
    network is given back with its probability a float."""
    def run(name: str, capture_step: Any) -> tuple[nn.Module, list[dict[str, Any]]]:
        torch.manual_seed(0)
        model = (NetworkCIFAR(DARTS_V2, C=4, num_classes=4, layers=3, auxiliary=False) if space == "darts" else
                 NB201Network(NB201Genotype(("nor_conv_3x3", "skip_connect", "avg_pool_3x3", "nor_conv_1x1",
                                             "none", "skip_connect")), C=4, N=1, num_classes=4))
        result = train(model, *loaders(n_train=160), cfg(epochs=3, drop_path=0.3, backend=backend, amp=amp),
                       checkpoint_path=tmp_path / f"{name}.pt", device="cpu", capture_step=capture_step)
        assert model._drop_path_tensor is None
        return model, result.history
    TapeGraph.captures = 0
    rerun_model, rerun = run("rerun", Rerun)
    taped_model, taped = run("taped", TapeGraph)
    assert TapeGraph.captures == 2                          # training's and the test passes'
    assert [r["drop_path_prob"] for r in taped] == pytest.approx([0.0, 0.1, 0.2])
    assert len({r["lr"] for r in taped}) == 3
    assert without_timing(taped) == without_timing(rerun)
    for (k, a), b in zip(rerun_model.state_dict().items(), taped_model.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_graphed_run_resumes_as_if_never_stopped(tmp_path: Path) -> None:
    """A run stopped after epoch 1 and resumed captures its one graph again and continues
    exactly: the optimiser follows this run's lr tensor, not the one its checkpoint saved."""
    def run(name: str, **kw: Any) -> tuple[nn.Module, list[dict[str, Any]]]:
        torch.manual_seed(0)
        model = NetworkCIFAR(DARTS_V2, C=4, num_classes=4, layers=3, auxiliary=False)
        result = train(model, *loaders(n_train=160), cfg(epochs=3, drop_path=0.3, backend="fused_dense"),
                       checkpoint_path=tmp_path / name, device="cpu", capture_step=TapeGraph, **kw)
        return model, result.history
    straight_model, straight = run("a.pt")
    with pytest.raises(Crash):
        run("b.pt", on_epoch_end=crash_after(1))
    seed_all(999)
    TapeGraph.captures = 0
    resumed_model, resumed = run("b.pt")
    assert TapeGraph.captures == 2
    assert without_timing(resumed) == without_timing(straight)
    for (k, a), b in zip(straight_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_one_real_cuda_graph_serves_a_whole_retrain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU, what the CPU's `TapeGraph` stands in for: fused SGD with its lr tensor and the
    network's drop-path tensor captured once per run (and the test passes once), and the
    graphed run's records and weights those of the step run afresh every time (`Rerun`), to
    float tolerance (the masks' random numbers differ between the two, so that comparison runs
    at drop-path 0)."""
    import nascore.train as train_module
    captures: list[int] = []
    real = train_module.cuda_graph
    monkeypatch.setattr(train_module, "cuda_graph", lambda step: captures.append(1) or real(step))

    def run(name: str, drop_path: float, capture_step: Any = None) -> tuple[nn.Module, list[dict[str, Any]]]:
        torch.manual_seed(0)
        model = NetworkCIFAR(DARTS_V2, C=4, num_classes=4, layers=3, auxiliary=False)
        c = cfg(epochs=3, drop_path=drop_path, backend="fused_dense", deterministic=False,
                cuda_graph=capture_step is None)
        result = train(model, *loaders(n_train=160), c, checkpoint_path=tmp_path / f"{name}.pt", device="cuda",
                       capture_step=capture_step)
        return model, result.history

    graphed_model, graphed = run("graphed", 0.0)
    rerun_model, rerun = run("rerun", 0.0, Rerun)
    assert len(captures) == 2                  # training's and the test passes'
    for a, b in zip(graphed, rerun):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-4)
    for (k, a), b in zip(rerun_model.state_dict().items(), graphed_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=k)
    _, dropped = run("dropped", 0.3)
    assert len(captures) == 4 and all(math.isfinite(r["train_loss"]) for r in dropped)
    assert dropped[1]["train_loss"] != pytest.approx(graphed[1]["train_loss"], rel=1e-4)   # masks applied


def test_a_nonfinite_loss_inside_the_graph_names_its_step(tmp_path: Path) -> None:
    model = fresh_model(nan_at=8 + 5)                     # epoch 2, step 6: a replayed step
    with pytest.raises(NonFiniteLossError, match=r"epoch 2/2, step 6/8"):
        train(model, *loaders(), cfg(epochs=2), checkpoint_path=tmp_path / "ck.pt", device="cpu",
              capture_step=Rerun)


@pytest.mark.parametrize("backend, graphed", [("eager", False), ("fused_dense", False), ("fused_dense", True)])
def test_a_compiled_retrain_traces_a_fixed_number_of_times_and_follows_the_plain_loop(
        tmp_path: Path, backend: str, graphed: bool) -> None:
    """`compile`: a DARTS network whose drop-path probability changes every epoch is traced in the
    first epochs only, not once per epoch: once above 0, the probability is a device tensor
    (`drop_path_on_device`), which no trace is guarded on. As a float, AOTAutograd (which every
    real backend runs, inductor included) made it a constant guarded on its value, and each
    epoch compiled the network again: 600 compiles in a 600-epoch retrain. The run's first
    training call and first test pass run eagerly, so the fused cells' index caches are full
    when traced (else each would be traced twice). The loop keeps more than dynamo's default
    limit of traces (here lowered to 1). The compiled loop, captured in a 'graph' too, gives
    the plain loop's records and weights."""
    from torch._dynamo.backends.registry import lookup_backend
    traces: list[int] = []
    aot_eager = lookup_backend("aot_eager")       # AOTAutograd, no code generation

    def tracing_only(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        traces.append(1)
        aot_eager(gm, example_inputs)       # its passes add their guards to the trace's
        return gm.forward                   # run as traced: the plain loop's numbers exactly

    def run(name: str, compiled: bool) -> tuple[nn.Module, list[dict[str, Any]], list[int]]:
        torch.manual_seed(0)
        model = NetworkCIFAR(DARTS_V2, C=4, num_classes=4, layers=3, auxiliary=False)
        seen: list[int] = []
        result = train(model, *loaders(n_train=64), cfg(epochs=5, drop_path=0.3, backend=backend,
                                                         compile=compiled),
                       checkpoint_path=tmp_path / f"{name}.pt", device="cpu", compile_backend=tracing_only,
                       capture_step=Rerun if graphed else None,
                       on_epoch_end=lambda record: seen.append(len(traces)))
        return model, result.history, seen

    plain_model, plain, _ = run("plain", compiled=False)
    assert not traces
    torch._dynamo.reset()                   # no trace of an earlier test's network is reused
    with torch._dynamo.config.patch(recompile_limit=1):
        compiled_model, compiled, seen = run("compiled", compiled=True)
    # epoch 1: training at p = 0 (its first step eager); epoch 2: the test pass (its first one
    # eager) and training at p > 0 (a device tensor); then nothing more. A graphed run keeps p
    # in a tensor from the start: one trace draws masks at every p, 0 included
    assert seen == ([1, 2, 2, 2, 2] if graphed else [1, 3, 3, 3, 3])
    # equal on torch 2.14; torch 2.11's traces round the fused BNs' running statistics by an ulp
    # or two (float32), which moves a test loss by ~5e-8: within 1e-6, not bit for bit
    assert_records_close(without_timing(compiled), without_timing(plain), rel=1e-6)
    for (k, a), b in zip(plain_model.state_dict().items(), compiled_model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=k)


def test_a_compiled_and_graphed_retrain_captures_the_compiled_network(tmp_path: Path) -> None:
    """With `compile` and a graph, each capture (the training step's, the test pass's) records
    the compiled network, not the eager warm-up call before it: a real capture runs its step
    once, so the stand-in here does too, and counts the compiled code's calls inside."""
    compiled_calls: list[int] = []

    def counting(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        def forward(*args: Any) -> Any:
            compiled_calls.append(1)
            return gm.forward(*args)
        return forward

    inside: list[int] = []

    class RunsOnceAtCapture(Rerun):
        def __init__(self, step: Any) -> None:
            super().__init__(step)
            before = len(compiled_calls)
            step()
            inside.append(len(compiled_calls) - before)

    torch._dynamo.reset()
    model = NetworkCIFAR(DARTS_V2, C=4, num_classes=4, layers=3, auxiliary=False)
    # 4 test batches a pass: the first pass could capture (after 2 plain batches)
    train(model, loaders(n_train=64)[0], EpochLoader(*blobs(256, noise_seed=1), batch=64),
          cfg(epochs=3, backend="fused_dense", compile=True),
          checkpoint_path=tmp_path / "ck.pt", device="cpu", compile_backend=counting,
          capture_step=RunsOnceAtCapture)
    assert len(inside) == 2 and all(n > 0 for n in inside), inside


class DilatedNet(nn.Module):
    """An eager `dil_conv` at the first stage's size: ReLU, a depthwise dilated 3×3 conv over 16
    channels, a 1×1 conv and BN, on 32×32 px (where torch 2.14.1's CPU bf16 channels_last weight
    gradients of such a conv are wrong: tests/test_graphs.py)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1, bias=False)
        self.dil_conv = nn.Sequential(nn.ReLU(), nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=16, bias=False),
                                      nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dil_conv(self.stem(x)).mean((2, 3)))


def test_a_compiled_bf16_retrain_on_the_cpu_learns_what_the_uncompiled_one_does(tmp_path: Path) -> None:
    """`compile` with inductor, bf16, NCHW, on the CPU: the dilated conv learns what it learns
    uncompiled. Inductor's layout optimisation ran the NCHW network's convs channels_last, and
    on a torch whose CPU bf16 channels_last dilated-conv weight gradients are wrong (2.14.1) the
    compiled retrain's came out 1e26 off (a spec-size run stopped on a NaN); the loop now turns
    it off where the start-up probe finds them wrong (`graphs.inductor_options`)."""
    def run(name: str, compiled: bool) -> tuple[nn.Module, list[dict[str, Any]]]:
        torch.manual_seed(0)
        model = DilatedNet()
        x, y = blobs(64)
        big = x.repeat_interleave(4, -1).repeat_interleave(4, -2)             # 8 → 32 px
        result = train(model, EpochLoader(big, y, batch=16), None,
                       cfg(epochs=1, drop_path=0.0, amp="bf16", compile=compiled),
                       checkpoint_path=tmp_path / f"{name}.pt", device="cpu")
        return model, result.history

    torch.manual_seed(0)
    start = DilatedNet().dil_conv[1].weight.detach().clone()
    plain_model, plain = run("plain", compiled=False)
    torch._dynamo.reset()
    compiled_model, compiled = run("compiled", compiled=True)
    assert compiled[0]["train_loss"] == pytest.approx(plain[0]["train_loss"], rel=0.05)
    learned = plain_model.dil_conv[1].weight.detach() - start
    compiled_learned = compiled_model.dil_conv[1].weight.detach() - start
    assert torch.isfinite(compiled_learned).all()
    assert float((compiled_learned - learned).norm() / learned.norm()) < 0.1


@pytest.mark.parametrize("kw, message", [
    (dict(), "needs a CUDA device"), (dict(nonfinite="skip"), "needs nonfinite='stop'"),
])
def test_cuda_graph_says_what_it_needs(tmp_path: Path, kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"TrainConfig.cuda_graph=True .*{message}"):
        train(fresh_model(), *loaders(n_train=64), cfg(cuda_graph=True, **kw),
              checkpoint_path=tmp_path / "ck.pt", device="cpu")


def test_bf16_autocast_and_channels_last_run_on_cpu(tmp_path: Path) -> None:
    h = train(fresh_model(), *loaders(n_train=64), cfg(epochs=1, amp="bf16", channels_last=True),
              checkpoint_path=tmp_path / "ck.pt", device="cpu").history
    assert math.isfinite(h[0]["train_loss"]) and math.isfinite(h[0]["eval_loss"])


def test_progress_log_prints_one_line_per_epoch_and_none_prints_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train(fresh_model(), *loaders(n_train=32), cfg(epochs=2, progress="auto"),
          checkpoint_path=tmp_path / "a.pt", device="cpu")          # stderr is no TTY here: log
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[1].startswith("epoch 2/2 lr ") and "top1" in lines[1]
    train(fresh_model(), *loaders(n_train=32), cfg(epochs=2, progress="none"),
          checkpoint_path=tmp_path / "b.pt", device="cpu")
    assert capsys.readouterr().err == ""


def test_two_process_gloo_run_keeps_replicas_identical_and_resumes(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "scripts" / "ddp_train.py"), "--out", str(tmp_path), "--epochs", "3"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    straight, resumed = r0["straight"], r0["resumed"]
    for run in ("straight", "resumed"):
        assert r0[run]["checksum"] == r1[run]["checksum"]         # replicas agree bit for bit
        assert r0[run]["history"] == r1[run]["history"]           # metrics all-reduced
        assert load_checkpoint(tmp_path / run / "ck.pt", kind="train")["epoch"] == 3
    assert (straight["saves"], r1["straight"]["saves"]) == (3, 0)  # rank 0 alone writes
    assert [r["skipped_batches"] for r in straight["history"]] == [0, 1, 0]   # NaN on rank 1 only
    # crashed after epoch 1 on every rank, resumed: the same weights as the uninterrupted run
    assert resumed["resumed_from"] == 1 and resumed["saves"] == 3
    assert resumed["checksum"] == straight["checksum"] and resumed["history"] == straight["history"]
    # a DARTS_V2 network through the fused cells (`fused_dense`, drop-path): DDP's hooks see every
    # gradient the fused path's own autograd functions and gathered weights give (else the ranks'
    # different batches would leave different weights), and NaN skipping agrees across ranks too
    fused = r0["fused"]
    assert fused["checksum"] == r1["fused"]["checksum"] and fused["history"] == r1["fused"]["history"]
    assert fused["checksum"] != straight["checksum"] and len(fused["history"]) == 2
    assert [r["skipped_batches"] for r in fused["history"]] == [0, 1]


def test_a_dataloader_with_a_distributed_sampler_gets_its_epoch(tmp_path: Path) -> None:
    data = torch.utils.data.TensorDataset(*blobs(32))
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=16, sampler=sampler)
    train(fresh_model(), loader, None, cfg(epochs=2), checkpoint_path=tmp_path / "ck.pt", device="cpu")
    assert sampler.epoch == 1


def test_the_fused_backend_trains_a_darts_network_as_the_eager_one_does(tmp_path: Path) -> None:
    """`backend: fused` changes how a cell is computed, not what: two epochs of a DARTS_V2
    network (float64, no drop-path) end with the eager run's records and weights up to rounding."""
    from nascore.genotype import DARTS_V2, NB201Genotype
    from nascore.networks import NB201Network, NetworkCIFAR

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        def run(backend: str):
            torch.manual_seed(0)
            model = NetworkCIFAR(DARTS_V2, 4, 4, 3, auxiliary=False)
            x, y = blobs(48)
            result = train(model, EpochLoader(x, y, batch=16), EpochLoader(x[:32], y[:32], batch=32),
                           cfg(epochs=2, drop_path=0.0, backend=backend),
                           checkpoint_path=tmp_path / f"{backend}.pt", device="cpu")
            return model, result.history
        eager_model, eager = run("eager")
        fused_model, fused = run("fused")
    finally:
        torch.set_default_dtype(old)
    for a, b in zip(without_timing(eager), without_timing(fused)):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12), k
    for (k, a), b in zip(eager_model.state_dict().items(), fused_model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10, msg=k)
    with pytest.raises(ValueError, match="TinyNet has only the eager forward"):
        train(fresh_model(), *loaders(n_train=64), cfg(epochs=1, backend="fused"),
              checkpoint_path=tmp_path / "tiny.pt", device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_gpu_run_records_each_epochs_peak_memory(tmp_path: Path) -> None:
    tr, ev = loaders()
    h = train(fresh_model(), tr, ev, cfg(epochs=2), checkpoint_path=tmp_path / "ck.pt", device="cuda").history
    assert all(0 < r["peak_memory_mb"] <= r["peak_reserved_mb"] for r in h)
