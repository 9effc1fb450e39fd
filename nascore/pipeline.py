"""The pipeline's stages as library functions: prepare → search → derive → retrain →
transfer_imagenet → evaluate. The entry points in `stages/` only call these.

Every stage reads its inputs from earlier stages' outputs, writes its own output folder
`outputs/<stage>/` into a temporary sibling and renames it into place at the end (a failure never
leaves a partial folder that looks finished), then writes `metrics/<stage>.json` last. Long stages
keep resumable checkpoints under `<project root>/scratch/<stage>/<key>/`, outside every DVC output
(DVC deletes a stage's outputs before running it) and keyed by the resolved parameters and inputs,
so a killed `dvc repro` picks up where it stopped. The scratch folder is removed once the stage's
outputs are published and its metrics written (`finish_stage`).
"""
from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import shutil
import sys
import contextlib
import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import torch

from . import config as C
from .benchmarks import NB201Table
from .data import (DATASETS, ImageArrays, ResidentLoader, image_files, load_prepared,
                   load_split, save_prepared, save_split, search_split, split_rule, synthetic_dataset, FolderLoader,
                   load_image_dataset, DatasetError, SearchSplit, dataset_crop_padding)
from .genotype import AnyGenotype, GenotypeError, NB201Genotype, genotype_from_json, resolve_genotype
from .io import OutputError, save_torch, write_json, write_text
from .metrics import run_peak_memory
from .tracking import Tracker, file_sha256, project_root

if TYPE_CHECKING:
    from .search import SearchConfig, SearchData

SHARED_CIFAR10 = Path("..") / "shared" / "data" / "cifar10-jpeg.tar.gz"
SHARED_NB201 = Path("..") / "shared" / "data" / "nb201-accuracy.csv"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Paths:
    """Where a run reads and writes. `workspace`: the DVC workspace (maybe a temp copy of the repo);
    `root`: the real project (holds scratch/, data caches, the MLflow store)."""

    workspace: Path
    root: Path
    # checkpoint folders of a stage whose outputs are published: removed only once its metrics
    # file is written too (`finish_stage`), so a failure in between loses no finished work
    finished_scratch: list[Path] = field(default_factory=list, compare=False)

    @classmethod
    def here(cls) -> "Paths":
        return cls(Path.cwd(), project_root())

    def out(self, stage: str) -> Path:
        return self.workspace / "outputs" / stage

    def metrics(self, stage: str) -> Path:
        return self.workspace / "metrics" / f"{stage}.json"

    def scratch(self, stage: str, key: str) -> Path:
        return self.root / "scratch" / stage / key

    def resolve_input(self, path: str | Path) -> Path:
        """A user path: absolute as is, relative to the project root (temp workspaces lack data)."""
        path = Path(path)
        return path if path.is_absolute() else self.root / path


def pick_device() -> torch.device:
    """NASCORE_DEVICE (cpu, cuda, cuda:1) or the first GPU when there is one."""
    name = os.environ.get("NASCORE_DEVICE")
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise C.ConfigError(f"NASCORE_DEVICE={name!r} is no device; allowed: cpu, cuda, cuda:<index>") from None
    if device.type not in ("cpu", "cuda"):
        raise C.ConfigError(f"NASCORE_DEVICE={name!r}: nascore runs on cpu or cuda[:<index>]")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise C.ConfigError(f"NASCORE_DEVICE={name!r} but this machine has {torch.cuda.device_count()} usable "
                            f"CUDA device(s); unset it (the first GPU or the CPU) or set cpu")
    return device


class MissingInputError(ValueError):
    """An earlier stage's output this stage reads is missing or unreadable."""


def finish_stage(paths: Paths, stage: str, metrics: dict[str, Any] | None) -> None:
    """The stage's last act: write metrics/<stage>.json, then drop its finished checkpoints.

    If the write fails (disk full, metrics/ not writable), the checkpoints stay: the rerun that
    DVC makes after deleting the outputs resumes from the last epoch instead of epoch 0.
    """
    if metrics is not None:
        write_json(paths.metrics(stage), metrics)
    for folder in paths.finished_scratch:
        shutil.rmtree(folder, ignore_errors=True)
    paths.finished_scratch.clear()


def read_input(path: Path, producer: str) -> Any:
    """A JSON output of stage `producer`, or a clear error saying which stage to run."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        reason = "missing" if isinstance(e, FileNotFoundError) else f"unreadable ({type(e).__name__})"
        raise MissingInputError(f"{path} is {reason}: run the {producer!r} stage first "
                                f"(dvc repro {producer})") from None


class ScratchBusyError(RuntimeError):
    """Another live process runs the same stage with the same params (same scratch folder)."""


@contextmanager
def scratch_lock(folder: Path) -> Iterator[Path]:
    """Hold an exclusive lock on a scratch folder for the life of the stage.

    Two runs with identical params (a duplicated queue entry, a second terminal) would otherwise
    write the same checkpoint; the lock dies with its process, so a SIGKILLed run never blocks
    the rerun that resumes it.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / ".lock", "a+")
    except OSError as e:
        raise OutputError(e.errno or 0, f"cannot write {folder}: {e.strerror or e}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise ScratchBusyError(f"{folder} is in use by {owner} running the same stage with the same "
                                   f"params; wait for it to finish, or change a param (e.g. seed)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        yield folder


@contextmanager
def publish_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final` in one rename.

    Any failure removes the temporary folder: nothing half-written is ever published.
    """
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise OutputError(e.errno or 0, f"cannot write {final}: {e.strerror or e} "
                                        f"(is {final.parent} a writable folder?)") from None
    try:
        yield tmp
        if final.is_dir():
            shutil.rmtree(final)
        elif final.exists():
            raise OutputError(0, f"cannot write {final}: a file is in the way of the output folder")
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OutputError):
            raise
        raise OutputError(e.errno or 0, f"cannot write {final}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    write_text(path, buf.getvalue())


def run_tags(run: C.RunConfig, stage: str) -> dict[str, Any]:
    names = C.STAGE_PARAMS[stage]
    tags = {k: getattr(run, k) for k in ("method", "space", "dataset", "seed", "profile") if k in names}
    if "dataset" in tags:
        tags["data_source"] = C.effective_dataset(run)     # smoke: synthetic images, whatever `dataset` says
    return tags


def stage_params(run: C.RunConfig, stage: str) -> dict[str, Any]:
    return {k: C.to_dict(getattr(run, k)) for k in C.STAGE_PARAMS[stage]}


def start_tracking(stage: str, run: C.RunConfig) -> Tracker:
    """The stage's MLflow run; under torchrun only rank 0 tracks (one run per stage, not per GPU)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return Tracker.disabled()
    return Tracker.start_stage(stage, tags=run_tags(run, stage), params=stage_params(run, stage))


# --- prepare -------------------------------------------------------------------------------------
def data_root(run: C.RunConfig, paths: Paths) -> Path:
    """data.root, or auto: the shared CIFAR-10 copy when present, else data/raw/<dataset>."""
    if run.data.root != C.AUTO:
        return paths.resolve_input(run.data.root)
    shared = paths.resolve_input(SHARED_CIFAR10)
    if run.dataset == "cifar10" and shared.exists():
        return shared
    return paths.root / "data" / "raw" / run.dataset


def load_splits(run: C.RunConfig, paths: Paths) -> dict[str, ImageArrays]:
    """Train and test arrays of the run's dataset (synthetic under the smoke profile)."""
    dataset = C.effective_dataset(run)
    if dataset == "synthetic":
        syn = run.data.synthetic
        classes = DATASETS.get(run.dataset).num_classes if run.dataset != "synthetic" else 10
        train, test = synthetic_dataset(num_classes=classes, n_train=syn.num_train, n_test=syn.num_test,
                                        image_size=syn.image_size, seed=run.data.split_seed)
        return {"train": train, "test": test}
    root = data_root(run, paths)
    cache = paths.root / "data" / "cache"
    log(f"prepare: reading {dataset} from {root}")
    return {split: load_image_dataset(dataset, root, train=split == "train", download=run.data.download,
                                      cache_dir=cache)
            for split in ("train", "test")}


def prepare(run: C.RunConfig, paths: Paths, tracker: Tracker) -> None:
    """Decode the dataset once into uint8 arrays and fix the search split."""
    splits = load_splits(run, paths)
    split = search_split(len(splits["train"]), fraction=run.data.split_fraction, seed=run.data.split_seed,
                         rule=split_rule(run.data.split, run.space, run.dataset), num_test=len(splits["test"]))
    summary = {"dataset": splits["train"].name, "train_images": len(splits["train"]),
               "test_images": len(splits["test"]), "classes": len(splits["train"].classes),
               "split": split.rule, "weight_split": len(split.weights), "arch_split": len(split.arch),
               "arch_split_from": split.arch_from}
    with publish_dir(paths.out("prepare")) as out:
        save_prepared(out / "data", splits)
        save_split(out / "split.json", split)
        write_json(out / "summary.json", summary)
        write_json(out / "config.json", stage_params(run, "prepare"))
    tracker.log_dict(summary, "summary.json")
    log(f"prepare: {summary}")


# --- search --------------------------------------------------------------------------------------
SEARCH_LOG_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "arch_loss", "arch_acc", "valid_loss",
                      "valid_acc", "param_free_ops", "param_free_ops_normal", "param_free_ops_reduce",
                      "alpha_entropy", "active_ops", "hessian_eigenvalue", "epoch_seconds", "images_per_s",
                      "skipped_batches", "peak_memory_mb", "peak_reserved_mb")


def search_data(cfg: SearchConfig, train: ImageArrays, split: SearchSplit, seed: int,
                device: torch.device, test: ImageArrays | None = None) -> SearchData:
    """The search's loaders: w batches from the weight half of `train` (both halves for
    single-level on all images), α batches from the arch half, of `train` or, when the split
    says so (NB201 on CIFAR-100), of `test`; each seeded from `seed`."""
    from .search import SearchData

    arch_images = train if split.arch_from == "train" else test
    if arch_images is None:
        raise ValueError(f"the search split takes α batches from the {split.arch_from} set: pass it")
    # single-level on all images adds the α half, unless that half is test images (test_half:
    # the weight half already holds every training image)
    weights_only = split.arch_from == "test" or cfg.single_level_data == "half"
    w_indices = split.weights if weights_only else list(split.weights) + list(split.arch)
    # Both halves get the training augmentation (crop + flip; cutout only in RobustDARTS'
    # regularised search), as in DARTS; full batches only (drop_last), every step one shape.
    pad = dataset_crop_padding(train)
    w_loader = ResidentLoader(train, batch_size=cfg.batch_size, indices=w_indices, drop_last=True,
                              cutout=cfg.cutout, crop_padding=pad, seed=seed, device=device,
                              channels_last=cfg.channels_last)
    a_loader = ResidentLoader(arch_images, batch_size=cfg.batch_size, indices=split.arch, drop_last=True,
                              cutout=cfg.cutout, crop_padding=pad, seed=seed + 7919, device=device,
                              channels_last=cfg.channels_last)
    score_batches = max(1, round(len(w_loader) * cfg.opp.score_fraction))
    uses_val = cfg.optimisation != "single_level"
    arch = None
    if uses_val and cfg.arch_sampling == "replacement":
        # the same images on the device, drawn with replacement; validation still visits each once
        arch = copy.copy(a_loader)
        arch.replacement = True
    return SearchData(w_loader, a_loader if uses_val or cfg.valid_every else None,
                      num_classes=len(train.classes), score_fraction_batches=score_batches, arch=arch)


def search(run: C.RunConfig, paths: Paths, tracker: Tracker) -> dict[str, Any]:
    from .search import SearchRun
    from .spaces import get_space

    device = pick_device()
    train = load_prepared(paths.out("prepare") / "data", "train")
    test = load_prepared(paths.out("prepare") / "data", "test")
    split = load_split(paths.out("prepare") / "split.json", len(train), len(test))
    data = search_data(run.search, train, split, run.seed, device, test)
    key = C.config_hash({"params": stage_params(run, "search"),
                         "split": file_sha256(paths.out("prepare") / "split.json"),
                         "data": file_sha256(paths.out("prepare") / "data" / "meta.json")})
    scratch = paths.scratch("search", key)
    meta = {"method": run.method, "space": run.space, "dataset": C.effective_dataset(run), "key": key}

    def on_epoch_end(record: dict[str, Any]) -> None:
        tracker.log_metrics({k: record[k] for k in SEARCH_LOG_COLUMNS
                             if k != "epoch" and isinstance(record.get(k), (int, float))},
                            step=record["epoch"])

    log(f"search: {run.method} on {run.space}, {len(data.train)} steps/epoch on {device}, "
        f"checkpoints in {scratch}")
    with scratch_lock(scratch):
        runner = SearchRun(get_space(run.space), run.search, data, device=device, seed=run.seed,
                           checkpoint_path=scratch / "search.pt", meta=meta, on_epoch_end=on_epoch_end,
                           log=log)
        result = runner.run()
    model = result.model
    final = result.history[-1]
    with publish_dir(paths.out("search")) as out:
        write_json(out / "genotype.json", result.genotype.to_json())
        write_json(out / "alphas.json", {
            "space": run.space, "method": run.method, "seed": run.seed,   # derive's plot labels
            "active_columns": model.active_columns(),
            "alphas": {ct: a.detach().cpu().tolist() for ct, a in model.alphas.items()},
            "betas": ({ct: b.detach().cpu().tolist() for ct, b in model.betas.items()}
                      if model.betas is not None else None),
            "op_names": {ct: [list(ops) for ops in model.edge_ops[ct]] for ct in model.cell_types},
            "edges_per_node": list(model.edges_per_node),
        })
        write_json(out / "history.json", result.history)
        write_csv(out / "log.csv", result.history, SEARCH_LOG_COLUMNS)
        save_torch(out / "supernet.pt", {k: v.cpu() for k, v in model.state_dict().items()})
        write_json(out / "config.json", stage_params(run, "search"))
    metrics = {"valid_acc": final.get("valid_acc"), "train_loss": final["train_loss"],
               "param_free_ops": final["param_free_ops"], "alpha_entropy": final["alpha_entropy"],
               "epochs": len(result.history), "search_seconds": round(
                   sum(r["epoch_seconds"] for r in result.history), 3),
               "peak_memory_mb": run_peak_memory(result.history)}
    tracker.log_artifact(paths.out("search") / "genotype.json")
    tracker.log_artifact(paths.out("search") / "alphas.json")
    tracker.log_artifact(paths.out("search") / "log.csv")
    tracker.log_file_reference(paths.out("search") / "supernet.pt", "supernet")
    tracker.set_tags({"genotype": str(result.genotype)})
    paths.finished_scratch.append(scratch)
    return metrics


# --- derive --------------------------------------------------------------------------------------
def search_label(saved_alphas: Mapping[str, Any], space: str) -> str:
    """"darts, seed 2 on nb201": what a search ran, from its own alphas.json (derive's params do
    not include method and seed, and an older file has neither: then the space alone)."""
    method, seed = saved_alphas.get("method"), saved_alphas.get("seed")
    parts = [str(method)] if method is not None else []
    parts += [f"seed {seed}"] if seed is not None else []
    return f"{', '.join(parts)} on {space}" if parts else space


def derive(run: C.RunConfig, paths: Paths, tracker: Tracker) -> dict[str, Any]:
    """Derive the discrete cell from the final α (with derive.rule), draw it, plot α."""
    from .drawing import draw_genotype
    from .plots import plot_alpha_evolution, plot_alpha_heatmap, plot_collapse_curves
    from .spaces import get_space

    saved = read_input(paths.out("search") / "alphas.json", "search")
    history = read_input(paths.out("search") / "history.json", "search")
    space = get_space(run.space)
    rule = None if run.derive.rule == C.AUTO else run.derive.rule
    try:        # files a user may have edited: a malformed one is named, not a traceback
        if saved["space"] != run.space:
            raise C.ConfigError(f"outputs/search was searched on space {saved['space']!r}, params say "
                                f"{run.space!r}: rerun the search stage")
        weights = derivation_weights(saved)
        genotype = space.derive(weights, rule)
        if not isinstance(history, list) or not history:
            raise ValueError("history.json holds no epochs")
        for r in history:
            r["alphas"], r["op_names"], r["param_free_ops"], r["epoch"]
    except C.ConfigError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, GenotypeError) as e:
        detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise MissingInputError(f"{paths.out('search')}: alphas.json or history.json is malformed ({detail}); "
                                f"rerun the 'search' stage (dvc repro search)") from None
    searched = search_label(saved, run.space)
    with publish_dir(paths.out("derive")) as out:
        write_json(out / "genotype.json", genotype.to_json())
        drawings = draw_genotype(genotype, out / "cells")
        notes = {d.note for d in drawings if d.note}
        for note in notes:
            log(f"derive: {note}")
        final = history[-1]
        plot_alpha_heatmap(final["alphas"], final["op_names"], out / "alphas.png",
                           title=f"softmax(α) after {len(history)} epochs — {searched}")
        plot_alpha_evolution(history, [r["op_names"] for r in history], out / "alpha_evolution.png",
                             epochs=[r["epoch"] for r in history])
        plot_collapse_curves({searched: [r["param_free_ops"] for r in history]}, out / "collapse.png",
                             first_epoch=int(history[0]["epoch"]))
    tracker.log_artifacts(paths.out("derive"))
    metrics: dict[str, Any] = {"param_free_ops": genotype.num_parameter_free()}
    if isinstance(genotype, NB201Genotype):
        metrics["arch"] = genotype.to_arch_string()
        metrics["input_reaches_output"] = genotype.input_reaches_output()
        if not metrics["input_reaches_output"]:
            log("derive: WARNING: every path from the cell's input to its output goes through `none`, so the "
                "network ignores its input (chance accuracy); the search collapsed towards `none`")
    else:
        metrics["param_free_ops_normal"] = genotype.num_parameter_free("normal")
        metrics["param_free_ops_reduce"] = genotype.num_parameter_free("reduce")
    tracker.set_tags({"genotype": str(genotype)})
    log(f"derive: {genotype}")
    return metrics


def derivation_weights(saved: Mapping[str, Any]) -> dict[str, tuple[list[list[float]], list[list[str]]]]:
    """softmax(α) (× edge-normalisation weights) over the active columns, from alphas.json."""
    from .supernet import edge_softmax

    columns = saved["active_columns"]
    out = {}
    for ct, alpha in saved["alphas"].items():
        w = torch.tensor(alpha)[:, columns].softmax(-1)
        if saved.get("betas"):
            w = w * edge_softmax(torch.tensor(saved["betas"][ct]), saved["edges_per_node"])[:, None]
        names = [[ops[c] for c in columns] for ops in saved["op_names"][ct]]
        out[ct] = (w.tolist(), names)
    return out


# --- retrain and transfer ------------------------------------------------------------------------
TRAIN_LOG_COLUMNS = ("epoch", "lr", "drop_path_prob", "train_loss", "train_acc", "eval_loss", "eval_top1",
                     "eval_top5", "skipped_batches", "epoch_seconds", "images_per_s", "peak_memory_mb",
                     "peak_reserved_mb")


def stage_genotype(ref: str, paths: Paths, space: str) -> AnyGenotype:
    """The cell a retrain or transfer trains: the derived one or `ref`, checked against `space`."""
    if ref == "derived":
        path = paths.out("derive") / "genotype.json"
        try:
            genotype = genotype_from_json(read_input(path, "derive"))
        except GenotypeError as e:
            raise GenotypeError(f"{path}: {e}; rerun the 'derive' stage (dvc repro derive)") from None
        where = str(path)
    else:
        genotype = resolve_genotype(ref if not Path(ref).suffix else str(paths.resolve_input(ref)))
        where = ref
    if isinstance(genotype, NB201Genotype) != (space == "nb201"):
        kind = "an NB201" if isinstance(genotype, NB201Genotype) else "a DARTS"
        raise GenotypeError(f"{where} holds {kind} cell but space is {space!r}; rerun 'derive' for this "
                            f"space, or set space to the cell's")
    return genotype


def _train_network(stage: str, run: C.RunConfig, sec: C.NetworkTrainConfig, model: torch.nn.Module,
                   train_loader: Any, eval_loader: Any, genotype: AnyGenotype, paths: Paths,
                   tracker: Tracker, device: torch.device, extra_metrics: dict[str, Any]) -> dict[str, Any]:
    from . import distributed as D
    from .train import RESUMABLE_CHANGES, train

    meta = {"stage": stage, "genotype": genotype.to_json(), "init_channels": sec.init_channels,
            "layers": sec.layers}
    # the checkpoint folder is keyed by what a resume must not change: a change TrainConfig lets
    # a run resume across (progress, eval_every, the speed options) finds the same folder
    params = stage_params(run, stage)
    section = params["transfer" if stage == "transfer_imagenet" else stage]
    section["train"] = {k: v for k, v in section["train"].items() if k not in RESUMABLE_CHANGES}
    key = C.config_hash({"params": params, "genotype": genotype.to_json(), "world_size": D.world_size()})
    scratch = paths.scratch(stage, key)

    def on_epoch_end(record: dict[str, Any]) -> None:
        tracker.log_metrics({k: v for k, v in record.items() if isinstance(v, (int, float))
                             and k != "epoch"}, step=record["epoch"])

    if sec.train.cuda_graph and (device.type != "cuda" or D.world_size() > 1):
        section = "transfer" if stage == "transfer_imagenet" else stage
        raise C.ConfigError(f"params.yaml: {section}.train.cuda_graph: true needs one CUDA GPU; this run is "
                            f"on {device} with {D.world_size()} process(es) (set it to false)")
    log(f"{stage}: {len(train_loader)} steps/epoch on {device}, checkpoints in {scratch}")
    # every rank resumes from the same file; rank 0 alone holds the lock (and writes)
    lock = scratch_lock(scratch) if D.rank() == 0 else contextlib.nullcontext(scratch)
    with lock:
        result = train(model, train_loader, eval_loader, sec.train, checkpoint_path=scratch / "train.pt",
                       device=device, on_epoch_end=on_epoch_end, meta=meta)
    if result.resumed_from:
        log(f"{stage}: resumed from epoch {result.resumed_from} of the checkpoint in {scratch}")
    final = result.final
    metrics = {"top1": final["eval_top1"], "top5": final["eval_top5"], "loss": final["eval_loss"],
               "error": None if final["eval_top1"] is None else round(100 * (1 - final["eval_top1"]), 4),
               "epochs": len(result.history),
               "train_seconds": round(sum(r["epoch_seconds"] for r in result.history), 3),
               "peak_memory_mb": run_peak_memory(result.history), **extra_metrics}
    if D.rank() == 0:
        with publish_dir(paths.out(stage)) as out:
            save_torch(out / "model.pt", {k: v.cpu() for k, v in model.state_dict().items()})
            write_json(out / "genotype.json", genotype.to_json())
            write_csv(out / "log.csv", result.history, TRAIN_LOG_COLUMNS)
            write_json(out / "config.json", stage_params(run, stage))
        tracker.log_artifact(paths.out(stage) / "model.pt")
        tracker.log_artifact(paths.out(stage) / "genotype.json")
        tracker.log_artifact(paths.out(stage) / "log.csv")
        paths.finished_scratch.append(scratch)
    return metrics


def retrain(run: C.RunConfig, paths: Paths, tracker: Tracker) -> dict[str, Any]:
    """Train the cell from scratch on the full training set; test on the test set."""
    from . import distributed as D
    from .metrics import count_flops, count_parameters
    from .networks import build_eval_network

    dist = D.init_distributed()
    device = dist.device if dist.world_size > 1 else pick_device()
    sec = run.retrain
    genotype = stage_genotype(sec.genotype, paths, run.space)
    prepared = paths.out("prepare") / "data"
    train_set, test_set = load_prepared(prepared, "train"), load_prepared(prepared, "test")
    torch.manual_seed(run.seed)
    model = build_eval_network(genotype, dataset_kind="cifar", num_classes=len(train_set.classes),
                               init_channels=sec.init_channels, layers=sec.layers, auxiliary=sec.auxiliary)
    size = train_set.images.shape[-1]
    flops = count_flops(model, (1, 3, size, size))
    extra = {"params_m": round(count_parameters(model) / 1e6, 6), "macs_m": round(flops.macs / 1e6, 3)}
    shard = {"rank": dist.rank, "world_size": dist.world_size}
    train_loader = ResidentLoader(train_set, batch_size=sec.batch_size, drop_last=True, cutout=sec.cutout,
                                  crop_padding=dataset_crop_padding(train_set), seed=run.seed, device=device,
                                  channels_last=sec.train.channels_last, **shard)
    test_loader = ResidentLoader(test_set, batch_size=max(sec.batch_size, 256), shuffle=False, augment=False,
                                 device=device, channels_last=sec.train.channels_last, **shard)
    try:
        return _train_network("retrain", run, sec, model, train_loader, test_loader, genotype, paths,
                              tracker, device, extra)
    finally:
        D.destroy_distributed()


def transfer_imagenet(run: C.RunConfig, paths: Paths, tracker: Tracker) -> dict[str, Any]:
    """Train the cell's ImageNet mobile network; skipped (and said so) without ImageNet data."""
    from . import distributed as D
    from .metrics import count_flops, count_parameters
    from .networks import build_eval_network

    sec = run.transfer
    if sec.data == "none":
        reason = ("no ImageNet configured (transfer.data: none)" if run.space != "nb201"
                  else "NB201 cells have no ImageNet network")
        with publish_dir(paths.out("transfer_imagenet")) as out:
            write_json(out / "skipped.json", {"skipped": True, "reason": reason})
        log(f"transfer_imagenet: skipped: {reason}")
        tracker.set_tags({"skipped": reason})
        return {"skipped": True}
    dist = D.init_distributed()
    device = dist.device if dist.world_size > 1 else pick_device()
    genotype = stage_genotype(sec.genotype, paths, run.space)
    shard = {"rank": dist.rank, "world_size": dist.world_size}
    warning = C.recipe_batch_warning(sec, dist.world_size)
    if warning and dist.rank == 0:
        log(f"transfer_imagenet: WARNING: {warning}")
    if sec.data == "synthetic":
        train_set, test_set = synthetic_dataset(num_classes=sec.num_classes, n_train=4 * sec.batch_size,
                                                n_test=2 * sec.batch_size, image_size=sec.image_size,
                                                seed=run.seed)
        num_classes = sec.num_classes
        train_loader = ResidentLoader(train_set, batch_size=sec.batch_size, drop_last=True, seed=run.seed,
                                      device=device, **shard)
        test_loader = ResidentLoader(test_set, batch_size=sec.batch_size, shuffle=False, augment=False,
                                     device=device, **shard)
    else:
        root = paths.resolve_input(sec.data)
        cache = paths.root / "data" / "cache"
        try:
            train_files = image_files("imagenet", root, train=True, cache_dir=cache, image_size=sec.image_size)
            test_files = image_files("imagenet", root, train=False, cache_dir=cache, image_size=sec.image_size)
        except DatasetError as e:     # the data module speaks of data.root; here it is transfer.data
            raise DatasetError(str(e).replace("data.root", "transfer.data")) from None
        num_classes = len(train_files.classes)
        common = {"device": device, "channels_last": sec.train.channels_last, "workers": sec.workers, **shard}
        train_loader = FolderLoader(train_files, batch_size=sec.batch_size, drop_last=True, seed=run.seed,
                                    **common)
        test_loader = FolderLoader(test_files, batch_size=sec.batch_size, shuffle=False, augment=False,
                                   **common)
    torch.manual_seed(run.seed)
    model = build_eval_network(genotype, dataset_kind="imagenet", num_classes=num_classes,
                               init_channels=sec.init_channels, layers=sec.layers, auxiliary=sec.auxiliary)
    flops = count_flops(model, (1, 3, sec.image_size, sec.image_size))
    extra = {"params_m": round(count_parameters(model) / 1e6, 6), "macs_m": round(flops.macs / 1e6, 3)}
    try:
        return _train_network("transfer_imagenet", run, sec, model, train_loader, test_loader, genotype,
                              paths, tracker, device, extra)
    finally:
        D.destroy_distributed()


# --- evaluate ------------------------------------------------------------------------------------
def nb201_table_path(run: C.RunConfig, paths: Paths) -> Path | None:
    value = run.evaluate.nb201_table
    if value == "none":
        return None
    if value == C.AUTO:
        shared = paths.resolve_input(SHARED_NB201)
        return shared if shared.exists() else None
    return paths.resolve_input(value)


def evaluate(run: C.RunConfig, paths: Paths, tracker: Tracker) -> dict[str, Any]:
    """Gather every stage's results into one summary (and the MLflow parent run), look NB201
    cells up in the benchmark table."""
    def read(stage: str) -> dict[str, Any]:
        p = paths.metrics(stage)
        if not p.exists():
            return {}
        found = read_input(p, stage)
        if not isinstance(found, dict):
            raise MissingInputError(f"{p} holds {type(found).__name__}, not a JSON object: rerun the "
                                    f"{stage!r} stage (dvc repro {stage})")
        return found

    genotype = genotype_from_json(read_input(paths.out("derive") / "genotype.json", "derive"))
    summary: dict[str, Any] = {
        "method": run.method, "space": run.space, "dataset": run.dataset, "seed": run.seed,
        "profile": run.profile, "genotype": genotype.to_json(), "genotype_str": str(genotype),
        "search": read("search"), "derive": read("derive"), "retrain": read("retrain"),
        "transfer_imagenet": read("transfer_imagenet"),
    }
    metrics: dict[str, Any] = {
        "param_free_ops": genotype.num_parameter_free(),
        "search_valid_acc": summary["search"].get("valid_acc"),
        "search_seconds": summary["search"].get("search_seconds"),
        "search_peak_memory_mb": summary["search"].get("peak_memory_mb"),
        "retrain_top1": summary["retrain"].get("top1"),
        "retrain_error": summary["retrain"].get("error"),
        "params_m": summary["retrain"].get("params_m"),
        "macs_m": summary["retrain"].get("macs_m"),
    }
    if not summary["transfer_imagenet"].get("skipped"):
        metrics["imagenet_top1"] = summary["transfer_imagenet"].get("top1")
        metrics["imagenet_top5"] = summary["transfer_imagenet"].get("top5")
    table_path = nb201_table_path(run, paths)
    if isinstance(genotype, NB201Genotype) and table_path is not None:
        table = NB201Table.load(table_path)
        entry = table.lookup(genotype)
        # relative to the project: the summary must be identical in every checkout
        summary["nb201"] = {"table": os.path.relpath(table_path, paths.root), **entry.accuracy,
                            "best": {k: table.best(k) for k in entry.accuracy}}
        metrics.update({f"nb201_{k}": v for k, v in entry.accuracy.items()})
    metrics = {k: v for k, v in metrics.items() if v is not None}
    with publish_dir(paths.out("evaluate")) as out:
        write_json(out / "summary.json", summary)
        write_text(out / "report.md", _report(summary, metrics))
    artifacts = [paths.out("evaluate") / "summary.json", paths.out("evaluate") / "report.md",
                 paths.out("derive") / "genotype.json"]
    artifacts += sorted((paths.out("derive") / "cells").glob("*"))
    artifacts += [p for p in (paths.out("derive") / n for n in ("alphas.png", "alpha_evolution.png",
                                                               "collapse.png")) if p.exists()]
    tracker.log_summary_to_parent(metrics, artifacts, tags={"genotype": str(genotype)})
    log("evaluate: " + ", ".join(f"{k}={v}" for k, v in metrics.items()))
    return metrics


def _report(summary: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    lines = [f"# {summary['method']} on {summary['space']} / {summary['dataset']} (seed {summary['seed']}, "
             f"profile {summary['profile']})", "", f"Derived cell: `{summary['genotype_str']}`", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in metrics.items()]
    if "nb201" in summary:
        nb = summary["nb201"]
        lines += ["", f"NB201 benchmark ({nb['table']}): CIFAR-10 {nb['cifar10']:.2f} (best {nb['best']['cifar10']:.2f}), "
                      f"CIFAR-100 {nb['cifar100']:.2f}, ImageNet16-120 {nb['imagenet16']:.2f}"]
    return "\n".join(lines) + "\n"


STAGES: dict[str, Callable[..., dict[str, Any]]] = {
    "prepare": prepare, "search": search, "derive": derive, "retrain": retrain,
    "transfer_imagenet": transfer_imagenet, "evaluate": evaluate,
}
