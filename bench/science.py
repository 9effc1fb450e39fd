"""Does a fast path change the science? Whole NB201 searches on real images, a fast variant
against the plain eager fp32 path, seed by seed (issue 4: "a fast run and a plain fp32 eager run of
the same search agree on loss curves within noise and derive the same genotype family").

    python bench/science.py --data ../shared/data/cifar10-jpeg.tar.gz \\
        --nb201-table ../shared/data/nb201-accuracy.csv --variants eager,fused,fused+bf16 \\
        --seeds 1,2,3,4 --images 5000 --epochs 8 --channels 8 --cells 1 --json science.json

Every search is the pipeline's own: params resolved as `dvc repro` resolves them (method darts,
space nb201: the spec's DARTS-V1 settings, batch 64, SGD/Adam, weights-first steps), the
pipeline's loaders (`nascore.pipeline.search_data`) over a fixed 50/50 split, `SearchRun` and its
derivation. Only what makes it fit a machine is scaled: the images (a fixed random subset of the
training set), the epochs, the network's channels and cells per stage. Variants are named as in
bench/search_step.py ("fused", "fused_dense+bf16", ...; "eager" is the baseline).

A seed fixes the supernet's initialisation, the batches' order and their augmentation, so a
variant's seed-s search differs from eager's seed-s search only in how each step is computed.
Printed per epoch and metric: every variant's mean and standard deviation over seeds, and its
mean paired difference to eager with a 95% t interval. The seeds' own spread is the noise the
issue means. A variant **agrees** on a metric when that interval holds 0 (no systematic shift
found; the interval's half-width says how large a shift could have gone unseen). The derived
cells are compared by family: parameter-free ops, collapse (at least half of the cell
`skip_connect`), and with `--nb201-table` the benchmark's CIFAR-10 accuracy.

Seed by seed the searches part after a few steps, so any perturbation, even rounding alone, gives
other cells. `--control FILE` tells a fast path's shift from that: FILE holds eager runs of the same
settings made another way (e.g. `--variants eager --threads` at another count: the same math,
rounded otherwise), reported as the variant "control", and every variant is then paired against
the control as well as against eager.

Runs are written to `--json` one by one (atomically) and a rerun with the same settings skips
those already there, so a stopped study resumes. Slow on a CPU: bf16 autocast there is several
times slower than fp32 (no bf16 convolution units), nothing like a GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from search_step import speed_options  # noqa: E402

from nascore import config as C  # noqa: E402
from nascore.benchmarks import NB201Table  # noqa: E402
from nascore.data import ImageArrays, load_image_dataset, search_split  # noqa: E402
from nascore.genotype import NB201Genotype  # noqa: E402
from nascore.io import write_json  # noqa: E402
from nascore.pipeline import search_data  # noqa: E402
from nascore.search import SearchRun, speed_option_problems  # noqa: E402
from nascore.spaces import get_space  # noqa: E402

# per-epoch figures compared (keys of a search epoch's record)
METRICS = ("train_loss", "arch_loss", "valid_loss", "valid_acc", "param_free_ops")
SUBSET_SEED = 0            # the image subset and its split: the same for every run


def search_config(variant: str, seed: int, channels: int, cells: int, epochs: int) -> C.RunConfig:
    """The pipeline's resolved params for a darts search on NB201, scaled, with a variant's speed."""
    speed = speed_options(variant)
    params = {"method": "darts", "space": "nb201", "dataset": "cifar10", "seed": seed,
              "search": {"init_channels": channels, "layers": cells, "epochs": epochs, "valid_every": 1,
                         **speed}}
    return C.resolve_stage("search", params)


def subset(train: ImageArrays, images: int) -> ImageArrays:
    """A fixed random `images` of the training set (all of it when `images` is 0 or larger)."""
    if not 0 < images < len(train):
        return train
    keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(SUBSET_SEED))[:images].sort().values
    return ImageArrays(train.name, train.images[keep], train.labels[keep], train.classes, train.mean, train.std)


def run_search(variant: str, seed: int, train: ImageArrays, args: argparse.Namespace,
               device: torch.device, table: NB201Table | None) -> dict[str, Any]:
    run = search_config(variant, seed, args.channels, args.cells, args.epochs)
    split = search_split(len(train), fraction=run.data.split_fraction, seed=SUBSET_SEED)
    data = search_data(run.search, train, split, seed, device)
    t0 = time.perf_counter()
    result = SearchRun(get_space("nb201"), run.search, data, device=device, seed=seed, log=lambda s: None).run()
    genotype = result.genotype
    out: dict[str, Any] = {
        "variant": variant, "seed": seed, "seconds": round(time.perf_counter() - t0, 1),
        "epochs": [{k: r.get(k) for k in ("epoch", *METRICS)} for r in result.history],
        "genotype": genotype.to_json(), "genotype_str": str(genotype),
        "param_free_ops": genotype.num_parameter_free(),
        "skip_share": sum(op == "skip_connect" for op in genotype.ops) / len(genotype.ops),
        # a CPU's reductions split by thread count: two runs at different counts round differently
        "threads": torch.get_num_threads(),
        "input_reaches_output": genotype.input_reaches_output(),
    }
    if table is not None:
        out["nb201_cifar10"] = table.lookup(genotype).accuracy["cifar10"]
    return out


# --- statistics ------------------------------------------------------------------------------------
def t_interval(diffs: Sequence[float]) -> tuple[float, float]:
    """Mean of `diffs` and the half-width of its two-sided 95% Student t interval (inf for one)."""
    from scipy.stats import t

    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, math.inf
    return mean, float(t.ppf(0.975, len(diffs) - 1)) * statistics.stdev(diffs) / math.sqrt(len(diffs))


def spread(values: Sequence[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.4g} ± {statistics.stdev(values):.2g}" if len(values) > 1 else f"{mean:.4g}"


def _reaches(run: dict[str, Any]) -> bool:
    """Whether the run's derived cell has a path from input to output that avoids `none` (runs
    saved before the field existed: from the cell)."""
    if "input_reaches_output" in run:
        return run["input_reaches_output"]
    return NB201Genotype.from_arch_string(run["genotype_str"]).input_reaches_output()


def compare(runs: Sequence[dict[str, Any]], metrics: Sequence[str] = METRICS,
            baseline: str = "eager") -> dict[str, Any]:
    """Per other variant, metric and epoch: the mean paired difference to `baseline` over the
    seeds both ran, its 95% half-width, and the baseline's own seed standard deviation; plus the
    cells' family."""
    by = {(r["variant"], r["seed"]): r for r in runs}
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    report: dict[str, Any] = {}
    for v in variants:
        if v == baseline:
            continue
        seeds = sorted(s for (w, s) in by if w == v and (baseline, s) in by)
        if not seeds:
            continue
        per_metric: dict[str, list[dict[str, Any]]] = {}
        for m in metrics:
            rows = []
            for e in range(min(len(by[v, s]["epochs"]) for s in seeds)):
                pairs = [(by[baseline, s]["epochs"][e].get(m), by[v, s]["epochs"][e].get(m)) for s in seeds]
                if any(a is None or b is None for a, b in pairs):
                    continue
                mean, half = t_interval([b - a for a, b in pairs])
                base = [a for a, _ in pairs]
                rows.append({"epoch": e + 1, "diff": mean, "half_width": half,
                             "baseline_sd": statistics.stdev(base) if len(base) > 1 else None,
                             "agrees": abs(mean) <= half})
            per_metric[m] = rows
        cells = {}
        for key in ("param_free_ops", "skip_share", "nb201_cifar10"):
            if all(key in by[w, s] for w in (baseline, v) for s in seeds):
                mean, half = t_interval([by[v, s][key] - by[baseline, s][key] for s in seeds])
                cells[key] = {"diff": mean, "half_width": half, "agrees": abs(mean) <= half}
        cells["same_cell"] = sum(by[v, s]["genotype_str"] == by[baseline, s]["genotype_str"] for s in seeds)
        cells["collapsed"] = {w: sum(by[w, s]["skip_share"] >= 0.5 for s in seeds) for w in (baseline, v)}
        cells["cut_off"] = {w: sum(not _reaches(by[w, s]) for s in seeds) for w in (baseline, v)}
        report[v] = {"seeds": seeds, "metrics": per_metric, "cells": cells}
    return report


def print_report(runs: Sequence[dict[str, Any]], report: dict[str, Any], baseline: str = "eager",
                 details: bool = True) -> None:
    """The per-epoch table (`details`), each variant against `baseline`, then every run's cell
    (`details`)."""
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    if details:
        print("\nper epoch, mean ± sd over seeds:")
    for m in METRICS if details else ():
        for v in variants:
            series = [r["epochs"] for r in runs if r["variant"] == v]
            n = min(len(s) for s in series)
            cols = [spread([s[e][m] for s in series]) for e in range(n)
                    if all(s[e].get(m) is not None for s in series)]
            if cols:
                print(f"  {m:<15} {v:<18} " + "  ".join(cols))
    for v, rep in report.items():
        print(f"\n{v} - {baseline}, paired over seeds {rep['seeds']} (mean difference, 95% t interval; "
              f"{baseline}'s own seed sd):")
        for m, rows in rep["metrics"].items():
            if rows:
                last = rows[-1]
                verdict = "agrees" if last["agrees"] else "DIFFERS"
                sd = f"{last['baseline_sd']:.3g}" if last["baseline_sd"] is not None else "n/a"
                print(f"  {m:<15} last epoch {last['diff']:+.4g} ± {last['half_width']:.3g} ({baseline} sd {sd}): "
                      f"{verdict}; epochs that agree: {sum(r['agrees'] for r in rows)} of {len(rows)}")
        checks = [r["agrees"] for rows in rep["metrics"].values() for r in rows]
        # many intervals: at 95% about one in twenty misses 0 with no shift at all
        print(f"  all epochs and metrics: {checks.count(False)} of {len(checks)} intervals miss 0 "
              f"(by chance alone about {len(checks) / 20:.1f} would)")
        cells = rep["cells"]
        for key in ("param_free_ops", "skip_share", "nb201_cifar10"):
            if key in cells:
                c = cells[key]
                print(f"  cell {key:<14} {c['diff']:+.4g} ± {c['half_width']:.3g}: "
                      f"{'agrees' if c['agrees'] else 'DIFFERS'}")
        print(f"  same derived cell as {baseline}: {cells['same_cell']} of {len(rep['seeds'])} seeds; "
              f"collapsed (>= half skip_connect): {baseline} {cells['collapsed'][baseline]}, "
              f"{v} {cells['collapsed'][v]}; cut off from the input (every path through none): "
              f"{baseline} {cells['cut_off'][baseline]}, {v} {cells['cut_off'][v]}")
    for r in runs if details else ():
        acc = f", NB201 CIFAR-10 {r['nb201_cifar10']:.2f}%" if "nb201_cifar10" in r else ""
        print(f"  {r['variant']:<18} seed {r['seed']}: {r['genotype_str']} ({r['param_free_ops']} param-free{acc}; "
              f"{r['seconds']:.0f} s)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="CIFAR-10: a folder or an archive the pipeline reads "
                                                 "(e.g. ../shared/data/cifar10-jpeg.tar.gz)")
    p.add_argument("--cache", default="data/cache", help="where an archive is extracted")
    p.add_argument("--nb201-table", default=None, help="NB201 accuracy CSV: look each derived cell up")
    p.add_argument("--variants", default="eager,fused", help="comma-separated; eager is always run")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--images", type=int, default=5000, help="training images used (0: all 50,000)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--channels", type=int, default=8, help="search.init_channels (spec: 16)")
    p.add_argument("--cells", type=int, default=1, help="search.layers, cells per stage (spec: 5)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="results, written run by run; resumed from")
    p.add_argument("--control", type=Path, action="append", default=[],
                   help="a --json file of eager runs with the same settings made another way (another "
                        "--threads: a rounding-only control), reported as the variant 'control'; repeatable")
    a = p.parse_args(argv)
    variants = list(dict.fromkeys(["eager", *a.variants.split(",")]))
    device = torch.device(a.device)
    try:                                   # bad names and settings fail here, not hours later
        seeds = [int(s) for s in a.seeds.split(",")]
        for v in variants:
            problems = speed_option_problems(search_config(v, seeds[0], a.channels, a.cells, a.epochs).search,
                                             device.type)
            if problems:
                raise ValueError(f"variant {v}: " + "; ".join(problems))
    except (ValueError, C.ConfigError) as e:
        p.error(str(e))
    if a.threads:
        torch.set_num_threads(a.threads)
    settings = {"images": a.images, "epochs": a.epochs, "channels": a.channels, "cells": a.cells,
                "data": str(a.data)}
    runs: list[dict[str, Any]] = []       # every run in the file, this call's variants and seeds or not
    if a.json is not None and a.json.is_file():
        saved = json.loads(a.json.read_text())
        if saved.get("settings") != settings:
            p.error(f"{a.json} holds runs with other settings ({saved.get('settings')}); "
                    f"pass another --json or the same settings")
        runs = saved["runs"]
    control: dict[int, dict[str, Any]] = {}
    for path in a.control:
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            p.error(f"--control {path}: {e}")
        if saved.get("settings") != settings:
            p.error(f"--control {path} holds runs with other settings ({saved.get('settings')}) than this "
                    f"study ({settings})")
        control.update({r["seed"]: dict(r, variant="control") for r in saved["runs"] if r["variant"] == "eager"})
    table = NB201Table.load(a.nb201_table) if a.nb201_table else None
    train = subset(load_image_dataset("cifar10", a.data, train=True, cache_dir=a.cache), a.images)
    print(f"NB201 darts searches: {len(train)} images, {a.epochs} epochs, {a.channels} ch x {a.cells} "
          f"cells/stage, on {device} ({torch.__version__})", flush=True)
    done = {(r["variant"], r["seed"]) for r in runs}
    for seed in seeds:                     # seed by seed: a stopped study has complete pairs
        for v in variants:
            if (v, seed) in done:
                continue
            r = run_search(v, seed, train, a, device, table)
            runs.append(r)
            last = r["epochs"][-1]
            print(f"{v:<18} seed {seed}: train loss {last['train_loss']:.4f}, valid acc {last['valid_acc']:.4f}, "
                  f"{r['genotype_str']} ({r['seconds']:.0f} s)", flush=True)
            if a.json is not None:
                write_json(a.json, {"settings": settings, "device": str(device), "torch": torch.__version__,
                                    "runs": runs})
    wanted = [r for r in runs if r["variant"] in variants and r["seed"] in seeds]
    wanted += [control[s] for s in seeds if s in control]
    report = compare(wanted)
    print_report(wanted, report)
    results = {"settings": settings, "device": str(device), "torch": torch.__version__, "runs": runs,
               "report": report}
    if control:
        results["report_vs_control"] = compare([r for r in wanted if r["variant"] != "eager"], baseline="control")
        print_report(wanted, results["report_vs_control"], baseline="control", details=False)
    if a.json is not None:
        write_json(a.json, results)


if __name__ == "__main__":
    main()
