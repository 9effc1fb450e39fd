"""Compare methods across seeds the way the papers do: finished experiments in, a report out.

`compare` reads experiments that already ran (it never re-runs anything) from two places:

- **DVC** — `dvc exp show --json` gives every finished experiment's params and metrics; the
  per-epoch series (parameter-free op count, α) and the derived cell come from the experiment's
  cached outputs (`outputs/search/history.json`, `outputs/derive/genotype.json`), read at the
  experiment's git revision through `dvc.api.DVCFileSystem`, and the resolved params from
  `outputs/<stage>/config.json`.
- **MLflow** — the pipeline's parent runs (tag `nascore.role = pipeline`, named after the DVC
  experiment) and their nested stage runs: final metrics (`final/<name>` per stage, the summary on
  the parent), resolved params, the per-epoch metric history of the search run, the derived
  genotype (artifact `genotype.json` of the derive run).

- **Plain folders** (`--from dirs --runs runs/NAME`) — workspaces where the stages ran as plain
  commands (`sweeps/plain.py`, e.g. on a GPU machine without DVC or MLflow): each folder's
  params.yaml, `metrics/<stage>.json` and `outputs/`, read the same way as DVC's.

`source="auto"` uses DVC and attaches the matching MLflow run ids; experiments whose DVC refs are
gone (`dvc exp remove`) but whose MLflow runs remain are added from MLflow; when DVC has none, the
report is rebuilt from MLflow alone, and when MLflow is unreachable, from DVC alone. Either way the
report says what was missing.

The report folder holds `report.md`, `table.csv` (one row per experiment), `summary.csv` (one row
per method × space × dataset × profile [× variant]: mean ± std over seeds), `claims.csv` (each
paper's number beside ours, from `nascore/paper_results.yaml`), `experiments.json` (what was read)
and the figures (collapse curves, α evolution per method, NB201 accuracy of each seed against the
whole space). It is logged to MLflow as a run named `compare-<name>` (tag `nascore.role = compare`).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml

from .benchmarks import COLUMNS as NB201_BENCHMARKS, BenchmarkTableError, NB201Table
from .genotype import GenotypeError, NB201Genotype, genotype_from_json
from .io import write_json, write_text
from .tracking import (ARTIFACTS_DIR, DEFAULT_EXPERIMENT, TAG_PARENT, TAG_ROLE, TAG_STAGE,
                       _check_http, flatten_params, project_root, redact_uri, resolve_tracking_uri,
                       search_all_runs)

PAPER_RESULTS = Path(__file__).with_name("paper_results.yaml")
SPEC_SEARCH_EPOCHS = 50          # every method's search length in methods.md (SearchConfig's default)
SHARED_NB201 = Path("..") / "shared" / "data" / "nb201-accuracy.csv"   # as nascore.pipeline
SOURCES = ("auto", "dvc", "mlflow", "dirs")
# The order the papers came out in; methods nascore may grow later sort after these, by name.
METHOD_ORDER = ("darts", "darts_v2", "pc_darts", "rf_darts", "rf_pcdarts", "single_darts", "opp_darts")
BASELINES = ("darts", "darts_v2")          # "plain DARTS" of the collapse studies
# RobustDARTS' collapse signature is a normal cell "dominated" by skip_connect (noise on S4); we
# read "dominated" as at least half of the cell's ops. Configurable (CompareOptions).
DOMINATED_SHARE = 0.5
STAGES_WITH_CONFIG = ("prepare", "search", "retrain", "transfer_imagenet")
SERIES_KEYS = ("param_free_ops", "param_free_ops_normal", "param_free_ops_reduce", "alpha_entropy",
               "valid_acc", "train_loss")
NB201_LABELS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet16": "ImageNet16-120"}
HOW_TO_SWEEP = ("run a sweep first, e.g.\n"
                "  dvc exp run --queue -S profile=smoke -S method=darts,rf_darts -S seed=1,2\n"
                "  dvc queue start -j 2\n"
                "(or one of the scripts in sweeps/; README, 'Sweeps and comparing methods')")


class CompareError(ValueError):
    """Nothing to compare, or a bad option: the message says what to do."""


# --- what a number means ------------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    """How a metric reads: label, unit, decimals, and which direction is better (for "best")."""

    label: str
    digits: int = 2
    better: str | None = None        # "higher" | "lower" | None (no "best")


METRICS: dict[str, Metric] = {
    "nb201_cifar10": Metric("NB201 CIFAR-10 test acc. (%)", 2, "higher"),
    "nb201_cifar100": Metric("NB201 CIFAR-100 test acc. (%)", 2, "higher"),
    "nb201_imagenet16": Metric("NB201 ImageNet16-120 test acc. (%)", 2, "higher"),
    "nb201_cifar10_valid": Metric("NB201 CIFAR-10 valid acc. (%)", 2, "higher"),
    "nb201_cifar100_valid": Metric("NB201 CIFAR-100 valid acc. (%)", 2, "higher"),
    "nb201_imagenet16_valid": Metric("NB201 ImageNet16-120 valid acc. (%)", 2, "higher"),
    "retrain_acc": Metric("retrained test acc. (%)", 2, "higher"),
    "retrain_error": Metric("retrained test error (%)", 2, "lower"),
    "retrain_epochs": Metric("retrain epochs", 0),
    "param_free_ops": Metric("parameter-free ops (final cell)", 2, "lower"),
    "param_free_ops_normal": Metric("parameter-free ops (normal cell)", 2, "lower"),
    "param_free_ops_reduce": Metric("parameter-free ops (reduction cell)", 2, "lower"),
    "collapse_share": Metric("collapse-op share (normal cell)", 2, "lower"),
    # NB201: 1 when every path from the cell's input to its output passes `none` (chance accuracy);
    # a group's mean is the share of its seeds whose cell ignores the input
    "cut_off": Metric("cell ignores its input (share of seeds)", 2, "lower"),
    "search_seconds": Metric("search wall time", 1, "lower"),
    "search_gpu_days": Metric("search cost (days, one device)", 3, "lower"),
    "search_epochs": Metric("search epochs", 0),
    "search_memory_gb": Metric("search peak GPU memory (GB)", 2, "lower"),
    "search_valid_acc": Metric("supernet valid acc. (fraction)", 3, "higher"),
    "params_m": Metric("params (M)", 3),
    "macs_m": Metric("MACs (M)", 1),
    "imagenet_top1_error": Metric("ImageNet top-1 error (%)", 2, "lower"),
    "imagenet_top5_error": Metric("ImageNet top-5 error (%)", 2, "lower"),
    "imagenet_params_m": Metric("ImageNet params (M)", 2),
    "imagenet_flops_m": Metric("ImageNet MACs (M)", 0),
}


# --- the papers' numbers ------------------------------------------------------------------------
def _names(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    return tuple(str(v) for v in (value if isinstance(value, list) else [value]))


@dataclass(frozen=True)
class PaperClaim:
    """One number a paper reports (methods.md §3), for some nascore methods, spaces and datasets."""

    methods: tuple[str, ...]
    paper_method: str
    spaces: tuple[str, ...]
    datasets: tuple[str, ...]
    metric: str
    value: float | None
    source: str
    stat: str = "mean"
    std: float | None = None
    std_unconfirmed: bool = False
    unconfirmed: bool = False
    note: str = ""

    def applies(self, method: str, space: str, dataset: str) -> bool:
        return method in self.methods and space in self.spaces and dataset in self.datasets

    def text(self) -> str:
        """`2.76 ± 0.09`, `54.30`, `3.00 ± 0.14 ⚠` (± unconfirmed), `⚠ unknown`, `not reported`."""
        if self.value is None:
            return "⚠ unknown" if self.unconfirmed else "not reported"
        digits = METRICS[self.metric].digits if self.metric in METRICS else 2
        out = f"{self.value:.{digits}f}"
        if self.std is not None:
            out += f" ± {self.std:.{digits}f}" + (" ⚠" if self.std_unconfirmed and not self.unconfirmed else "")
        if self.stat == "best":
            out += " (best run)"
        return out + (" ⚠" if self.unconfirmed else "")


@dataclass(frozen=True)
class PaperReference:
    """A reference point of a space (e.g. the NB201 optimum), not a method's claim."""

    space: str
    metric: str
    value: float
    what: str
    source: str
    unconfirmed: bool = False      # ⚠ in methods.md: not checked against the paper's own table

    def text(self) -> str:
        return f"{self.value:.2f}" + (" ⚠ unconfirmed" if self.unconfirmed else "")


@dataclass(frozen=True)
class PaperResults:
    claims: tuple[PaperClaim, ...]
    references: tuple[PaperReference, ...]
    spec: str
    path: str

    def for_group(self, method: str, space: str, dataset: str) -> list[PaperClaim]:
        return [c for c in self.claims if c.applies(method, space, dataset)]

    def headline(self, method: str, space: str, dataset: str) -> PaperClaim | None:
        """The claim a one-column summary shows: the NB201 accuracy on the search dataset's
        benchmark column for NB201, else the retrained test error; means before bests."""
        metric = f"nb201_{_benchmark_of(dataset) or 'cifar10'}" if space == "nb201" else "retrain_error"
        found = [c for c in self.for_group(method, space, dataset) if c.metric == metric]
        found.sort(key=lambda c: (c.stat != "mean", c.value is None))
        return found[0] if found else None


def load_paper_results(path: str | Path | None = None) -> PaperResults:
    """The papers' numbers from `nascore/paper_results.yaml` (or `path`), checked."""
    path = Path(path) if path is not None else PAPER_RESULTS
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise CompareError(f"cannot read the papers' results from {path}: {e}") from None
    claims = []
    for i, c in enumerate(raw.get("claims") or []):
        where = f"{path}, claim {i + 1}"
        missing = [k for k in ("methods", "paper_method", "space", "dataset", "metric", "source") if k not in c]
        if missing:
            raise CompareError(f"{where}: missing {', '.join(missing)}")
        if c["metric"] not in METRICS:
            raise CompareError(f"{where}: unknown metric {c['metric']!r}; known: {', '.join(METRICS)}")
        stat = c.get("stat", "mean")
        if stat not in ("mean", "best"):
            raise CompareError(f"{where}: stat must be mean or best, got {stat!r}")
        claims.append(PaperClaim(
            methods=_names(c["methods"]), paper_method=str(c["paper_method"]), spaces=_names(c["space"]),
            datasets=_names(c["dataset"]), metric=c["metric"],
            value=None if c.get("value") is None else float(c["value"]), source=str(c["source"]),
            stat=stat, std=None if c.get("std") is None else float(c["std"]),
            std_unconfirmed=bool(c.get("std_unconfirmed", False)),
            unconfirmed=bool(c.get("unconfirmed", False)), note=str(c.get("note", ""))))
    refs = []
    for i, r in enumerate(raw.get("references") or []):
        where = f"{path}, reference {i + 1}"
        missing = [k for k in ("space", "metric", "value", "what", "source") if k not in r]
        if missing:
            raise CompareError(f"{where}: missing {', '.join(missing)}")
        if r["metric"] not in METRICS:
            raise CompareError(f"{where}: unknown metric {r['metric']!r}; known: {', '.join(METRICS)}")
        refs.append(PaperReference(str(r["space"]), str(r["metric"]), float(r["value"]), str(r["what"]),
                                   str(r["source"]), bool(r.get("unconfirmed", False))))
    return PaperResults(tuple(claims), tuple(refs), str(raw.get("spec", "")), str(path))


# --- one experiment -----------------------------------------------------------------------------
@dataclass
class Experiment:
    """One finished pipeline run, whichever store it was read from."""

    name: str
    method: str
    space: str
    dataset: str
    seed: int
    profile: str
    source: str                                        # "dvc", "mlflow", "dvc+mlflow" or "dirs"
    rev: str | None = None                             # the experiment's git commit (DVC)
    baseline: str | None = None                        # the commit it was run from
    mlflow_run_id: str | None = None                   # the parent run
    params: dict[str, str] = field(default_factory=dict)        # flattened, resolved where known
    genotype: dict[str, Any] | None = None             # genotype JSON
    metrics: dict[str, float] = field(default_factory=dict)     # METRICS names
    series: dict[str, list[float]] = field(default_factory=dict)   # per search epoch
    alpha_history: list[dict[str, Any]] | None = None  # per epoch {"alphas": ..., "op_names": ...}
    alpha_figure: Path | None = None                   # derive's own figure (MLflow fallback)
    nb201_table: str | None = None                     # the run's evaluate.nb201_table param
    notes: list[str] = field(default_factory=list)

    @property
    def genotype_str(self) -> str:
        if self.genotype is None:
            return ""
        try:
            return str(genotype_from_json(self.genotype))
        except GenotypeError:
            return json.dumps(self.genotype)


def collapse_op(space: str) -> str:
    """The op a collapsed search piles into: noise on S4 (RobustDARTS), skip_connect elsewhere."""
    return "noise" if space == "s4" else "skip_connect"


def cell_stats(genotype: Mapping[str, Any], space: str) -> dict[str, float]:
    """Parameter-free op counts and the collapse op's share of the normal cell (NB201: the cell,
    and whether it ignores its input: `cut_off`)."""
    g = genotype_from_json(dict(genotype))
    op = collapse_op(space)
    if isinstance(g, NB201Genotype):
        ops = list(g.ops)
        return {"param_free_ops": float(g.num_parameter_free()),
                "collapse_share": ops.count(op) / len(ops),
                "cut_off": float(not g.input_reaches_output())}
    normal = [o for o, _ in g.normal]
    return {"param_free_ops": float(g.num_parameter_free()),
            "param_free_ops_normal": float(g.num_parameter_free("normal")),
            "param_free_ops_reduce": float(g.num_parameter_free("reduce")),
            "collapse_share": normal.count(op) / len(normal)}


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def normalise_metrics(stages: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The pipeline's `metrics/<stage>.json` contents (or MLflow's `final/` metrics per stage)
    in METRICS names and units (accuracies in %, as the papers report them)."""
    out: dict[str, Any] = {}
    search, derive, retrain = stages.get("search", {}), stages.get("derive", {}), stages.get("retrain", {})
    transfer, evaluate = stages.get("transfer_imagenet", {}), stages.get("evaluate", {})
    out["search_seconds"] = _num(search.get("search_seconds", evaluate.get("search_seconds")))
    if out["search_seconds"] is not None:
        out["search_gpu_days"] = out["search_seconds"] / 86400
    out["search_epochs"] = _num(search.get("epochs"))
    memory = _num(search.get("peak_memory_mb", evaluate.get("search_peak_memory_mb")))
    out["search_memory_gb"] = None if memory is None else memory / 1024
    out["search_valid_acc"] = _num(search.get("valid_acc", evaluate.get("search_valid_acc")))
    for k in ("param_free_ops", "param_free_ops_normal", "param_free_ops_reduce"):
        out[k] = _num(derive.get(k, evaluate.get(k)))
    top1 = _num(retrain.get("top1", evaluate.get("retrain_top1")))
    out["retrain_acc"] = None if top1 is None else 100 * top1
    out["retrain_error"] = _num(retrain.get("error", evaluate.get("retrain_error")))
    if out["retrain_error"] is None and top1 is not None:
        out["retrain_error"] = 100 * (1 - top1)
    out["retrain_epochs"] = _num(retrain.get("epochs"))
    out["params_m"] = _num(retrain.get("params_m", evaluate.get("params_m")))
    out["macs_m"] = _num(retrain.get("macs_m", evaluate.get("macs_m")))
    if transfer and not transfer.get("skipped"):
        for k in ("top1", "top5"):
            acc = _num(transfer.get(k, evaluate.get(f"imagenet_{k}")))
            out[f"imagenet_{k}_error"] = None if acc is None else 100 * (1 - acc)
        out["imagenet_params_m"] = _num(transfer.get("params_m"))
        out["imagenet_flops_m"] = _num(transfer.get("macs_m"))
    for bench in NB201_BENCHMARKS:
        out[f"nb201_{bench}"] = _num(evaluate.get(f"nb201_{bench}"))
    return {k: v for k, v in out.items() if v is not None}


def _benchmark_of(dataset: str) -> str | None:
    """The NB201 benchmark column of a search dataset (NB201 has no SVHN column)."""
    return {"cifar10": "cifar10", "cifar100": "cifar100", "imagenet16_120": "imagenet16"}.get(dataset)


# --- which experiments --------------------------------------------------------------------------
@dataclass(frozen=True)
class Filters:
    """Keep experiments whose value is in each non-empty list (names: DVC experiment names), and
    whose params have the given values (dotted keys, e.g. ("retrain.train.epochs", "100"))."""

    methods: tuple[str, ...] = ()
    spaces: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()
    profiles: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()
    names: tuple[str, ...] = ()
    params: tuple[tuple[str, str], ...] = ()

    def accepts(self, *, method: str, space: str, dataset: str, profile: str, seed: int,
                name: str) -> bool:
        checks = ((self.methods, method), (self.spaces, space), (self.datasets, dataset),
                  (self.profiles, profile), (self.seeds, seed), (self.names, name))
        return all(not allowed or value in allowed for allowed, value in checks)

    def accepts_params(self, params: Mapping[str, str]) -> bool:
        """Whether every --param KEY=VALUE holds (numbers compare by value: 100 matches 100.0);
        an experiment whose params lack the key, or hold "auto" for it, does not match."""
        return all(key in params and _same_value(params[key], value) for key, value in self.params)

    def describe(self) -> str:
        parts = [f"{k}={','.join(map(str, v))}" for k, v in (
            ("method", self.methods), ("space", self.spaces), ("dataset", self.datasets),
            ("profile", self.profiles), ("seed", self.seeds), ("exp", self.names)) if v]
        parts += [f"{k}={v}" for k, v in self.params]
        return " ".join(parts) or "none"


def _same_value(have: str, want: str) -> bool:
    if str(have) == want:
        return True
    try:
        return float(have) == float(want)
    except (TypeError, ValueError):
        return False


@dataclass
class SourceResult:
    """What one store gave: experiments, a one-line summary, and what it could not give."""

    experiments: list[Experiment]
    summary: str
    notes: list[str] = field(default_factory=list)
    available: bool = True
    active: set[str] = field(default_factory=set)      # queued or running now (DVC)


def _git_head(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _top_params(params: Mapping[str, Any]) -> tuple[str, str, str, int, str]:
    return (str(params.get("method", "darts")), str(params.get("space", "darts")),
            str(params.get("dataset", "cifar10")), int(params.get("seed", 0)),
            str(params.get("profile", "full")))


# --- DVC ----------------------------------------------------------------------------------------
def _dvc_exp_rows(show: Any) -> Iterable[tuple[str | None, dict[str, Any], str | None]]:
    """(baseline rev, experiment rev entry, executor state) for each experiment in
    `dvc exp show --json` output (DVC 3: a list of baselines, each with "experiments")."""
    for baseline in show if isinstance(show, list) else []:
        if not isinstance(baseline, dict) or baseline.get("rev") == "workspace":
            continue
        for exp in baseline.get("experiments") or []:
            executor = exp.get("executor") or {}
            state = executor.get("state") if isinstance(executor, dict) else None
            for rev in exp.get("revs") or []:
                yield baseline.get("rev"), rev, state


def _dvc_metrics(data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    stages = {}
    for path, entry in (data.get("metrics") or {}).items():
        m = re.fullmatch(r"metrics/(\w+)\.json", path)
        if m and isinstance(entry, dict) and isinstance(entry.get("data"), dict):
            stages[m.group(1)] = entry["data"]
    return stages


def _series_from_history(history: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    series: dict[str, list[float]] = {}
    for key in SERIES_KEYS:
        values = [_num(r.get(key)) for r in history]
        if any(v is not None for v in values):
            series[key] = [math.nan if v is None else v for v in values]
    return series


def collect_dvc(root: Path, filters: Filters, *, all_commits: bool = False) -> SourceResult:
    """Finished experiments from `dvc exp show --json`, with series and cells from their outputs."""
    if not (root / ".dvc").is_dir():
        return SourceResult([], f"no DVC project at {root}", available=False)
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json"] + (["-A"] if all_commits else [])
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        return SourceResult([], f"`dvc exp show` could not run ({e})", available=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        return SourceResult([], f"`dvc exp show` failed: {tail}", available=False)
    try:
        show = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError as e:
        return SourceResult([], f"`dvc exp show --json` printed no JSON ({e})", available=False)

    from dvc.api import DVCFileSystem   # imported here: dvc is heavy and MLflow-only runs skip it

    experiments, notes, skipped = [], [], {"queued": 0, "running": 0, "failed": 0}
    active: set[str] = set()
    for baseline, rev, state in _dvc_exp_rows(show):
        name = rev.get("name") or str(rev.get("rev", ""))[:7]
        data = rev.get("data") or {}
        if state in skipped:
            skipped[state] += 1
            if state != "failed":
                active.add(name)
            continue
        if rev.get("error") or not data or data.get("rev") in (None, "workspace"):
            skipped["failed" if rev.get("error") else "running"] += 1
            active.add(name)
            continue
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
        method, space, dataset, seed, profile = _top_params(params)
        if not filters.accepts(method=method, space=space, dataset=dataset, profile=profile, seed=seed,
                               name=name):
            continue
        stages = _dvc_metrics(data)
        exp = Experiment(name=name, method=method, space=space, dataset=dataset, seed=seed,
                         profile=profile, source="dvc", rev=rev.get("rev"), baseline=baseline,
                         metrics=normalise_metrics(stages),
                         nb201_table=str((params.get("evaluate") or {}).get("nb201_table", "auto")))
        try:
            fs = DVCFileSystem(str(root), rev=exp.rev)
            _read_outputs(exp, params, stages, fs.read_text, fs.exists)
        except Exception as e:     # not in the cache (pulled refs without data), or an old layout
            exp.notes.append(f"outputs not readable from the DVC cache ({type(e).__name__}: {e}); "
                             f"`dvc exp pull` / `dvc pull` them; series and cell taken from metrics only")
            _read_outputs(exp, params, stages, None, None)
        experiments.append(exp)
    scope = "all commits" if all_commits else "experiments of HEAD"
    summary = f"{len(experiments)} finished experiment(s) from `dvc exp show` ({scope})"
    left = [f"{n} {k}" for k, n in skipped.items() if n]
    if left:
        notes.append(f"DVC: left out {', '.join(left)} experiment(s) (not finished)")
    return SourceResult(experiments, summary, notes, active=active)


def _read_outputs(exp: Experiment, params: Mapping[str, Any], stages: Mapping[str, Mapping[str, Any]],
                  read_text: Callable[[str], str] | None, exists: Callable[[str], bool] | None) -> None:
    """Fill an experiment's series, α history, cell and resolved params from its output files
    (`read_text`/`exists` take paths relative to the workspace: DVC's cache or a plain folder)."""
    resolved: dict[str, Any] = {}
    try:
        if read_text is not None and exists is not None:
            history = json.loads(read_text("outputs/search/history.json"))
            exp.series = _series_from_history(history)
            if all("alphas" in r and "op_names" in r for r in history):
                exp.alpha_history = [{"alphas": r["alphas"], "op_names": r["op_names"]} for r in history]
            if exists("outputs/derive/genotype.json"):
                exp.genotype = json.loads(read_text("outputs/derive/genotype.json"))
            for stage in STAGES_WITH_CONFIG:
                path = f"outputs/{stage}/config.json"
                if exists(path):
                    resolved.update(json.loads(read_text(path)))
    finally:
        # raw params.yaml, overlaid with the values the stages resolved ("auto" -> the value used)
        exp.params = {**flatten_params(params), **flatten_params(resolved)}
        if exp.genotype is None and isinstance((stages.get("derive") or {}).get("arch"), str):
            exp.genotype = {"type": "nb201_cell", "arch": stages["derive"]["arch"]}


# --- plain workspace folders ----------------------------------------------------------------------
def _workspaces(paths: Sequence[Path]) -> list[Path]:
    """Each path is a workspace (holds params.yaml) or a folder of them (a plain sweep)."""
    found: list[Path] = []
    for path in paths:
        if (path / "params.yaml").is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.iterdir() if (p / "params.yaml").is_file())
    return found


def collect_dirs(paths: Sequence[Path], filters: Filters) -> SourceResult:
    """Finished experiments from plain workspace folders (`sweeps/plain.py`, or stage commands run
    by hand): each folder's params.yaml, metrics/<stage>.json and outputs/."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise CompareError(f"--runs: no such folder: {', '.join(missing)}")
    experiments, unfinished = [], []
    for ws in _workspaces(paths):
        name = f"{ws.parent.name}/{ws.name}"
        try:
            params = yaml.safe_load((ws / "params.yaml").read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise CompareError(f"{ws / 'params.yaml'} is unreadable ({type(e).__name__}: {e})") from None
        method, space, dataset, seed, profile = _top_params(params)
        if not filters.accepts(method=method, space=space, dataset=dataset, profile=profile, seed=seed,
                               name=name):
            continue
        stages = {}
        for f in sorted((ws / "metrics").glob("*.json")):
            try:
                stages[f.stem] = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
        if "search" not in stages:
            unfinished.append(name)
            continue
        exp = Experiment(name=name, method=method, space=space, dataset=dataset, seed=seed,
                         profile=profile, source="dirs", metrics=normalise_metrics(stages),
                         nb201_table=str((params.get("evaluate") or {}).get("nb201_table", "auto")))
        _read_outputs(exp, params, stages, lambda rel: (ws / rel).read_text(encoding="utf-8"),
                      lambda rel: (ws / rel).exists())
        experiments.append(exp)
    notes = [f"plain folders: left out {len(unfinished)} without a finished search "
             f"({', '.join(unfinished)})"] if unfinished else []
    summary = f"{len(experiments)} finished experiment(s) from {len(_workspaces(paths))} workspace folder(s) " \
              f"under {', '.join(str(p) for p in paths)}"
    return SourceResult(experiments, summary, notes)


# --- MLflow -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MlflowLocation:
    uri: str
    experiment_name: str
    artifact_location: str | None


def mlflow_location(root: Path, tracking_uri: str | None = None) -> MlflowLocation:
    """Where the pipeline tracks (nascore.tracking's rules), or `tracking_uri`."""
    uri = tracking_uri or resolve_tracking_uri(root)
    artifacts = (root / ARTIFACTS_DIR).as_uri() if uri.startswith("sqlite:") else None
    return MlflowLocation(uri, os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT, artifacts)


def mlflow_problem(loc: MlflowLocation) -> str | None:
    """Why the store cannot be read, checked cheaply (never creates a store), or None."""
    if loc.uri.startswith(("http://", "https://")):
        return _check_http(loc.uri, 5.0)
    if loc.uri.startswith("sqlite:///"):
        path = Path(loc.uri[len("sqlite:///"):])
        if not path.is_file():
            return f"no MLflow store at {path}"
    try:
        import mlflow  # noqa: F401
    except Exception as e:
        return f"MLflow is not importable ({type(e).__name__}: {e})"
    return None


def _client(loc: MlflowLocation) -> Any:
    from mlflow import MlflowClient
    # as nascore.tracking: a dead server fails in seconds, not minutes; no progress bar per file
    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30"),
                        ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")):
        os.environ.setdefault(name, value)
    return MlflowClient(tracking_uri=loc.uri)


def _metric_series(client: Any, run_id: str, key: str) -> list[float]:
    by_step: dict[int, float] = {}
    for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)):
        by_step[m.step] = m.value       # a resumed search logs an epoch again: the last one counts
    return [by_step[s] for s in sorted(by_step)]


def _download(client: Any, run_ids: Sequence[str], artifact: str, dest: Path) -> Path | None:
    """The first of `run_ids` that holds `artifact`, downloaded into `dest`; None if none does."""
    for i, run_id in enumerate(run_ids):
        target = dest / str(i)
        target.mkdir(parents=True, exist_ok=True)
        try:
            return Path(client.download_artifacts(run_id, artifact, str(target)))
        except Exception:      # absent in this run (MLflow raises its own error types per store)
            continue
    return None


def genotype_from_str(text: str) -> Any:
    """A genotype from its `str()` (the `genotype` tag the pipeline sets): an NB201 string, or
    `normal: (op,j) ... | reduce: (op,j) ...`."""
    text = text.strip()
    if text.startswith("|"):
        return NB201Genotype.from_arch_string(text)
    m = re.fullmatch(r"normal:\s*(.*?)\s*\|\s*reduce:\s*(.*)", text)
    if not m:
        raise GenotypeError(f"not a genotype string: {text[:80]!r}")
    pairs = [[[op, int(j)] for op, j in re.findall(r"\(([\w]+),(\d+)\)", part)] for part in m.groups()]
    return genotype_from_json({"type": "darts_cell", "normal": pairs[0], "reduce": pairs[1]})


def collect_mlflow(root: Path, filters: Filters, workdir: Path, *, all_commits: bool = False,
                   tracking_uri: str | None = None, known: Iterable[str] = (),
                   active: Iterable[str] = ()) -> SourceResult:
    """Finished pipeline runs of DVC experiments from the MLflow store. Experiments named in
    `known` (already read from DVC) get only their run id: no histories, no downloads; those in
    `active` (DVC says queued or running) are left out.

    Finished: the parent run FINISHED, its evaluate or derive run FINISHED (a sweep may stop after
    `derive`: `dvc exp run ... derive`), no stage run RUNNING. Stages DVC restored from its
    run-cache have no run; evaluate always runs and copies the cell to the parent run."""
    loc = mlflow_location(root, tracking_uri)
    problem = mlflow_problem(loc)
    if problem:
        return SourceResult([], f"MLflow store {redact_uri(loc.uri)} unavailable: {problem}",
                            available=False)
    try:
        return _collect_mlflow(root, filters, workdir, loc, all_commits, set(known), set(active))
    except Exception as e:     # a broken or foreign store: say so, the other source may still serve
        return SourceResult([], f"MLflow store {redact_uri(loc.uri)} could not be read "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                            available=False)


def _collect_mlflow(root: Path, filters: Filters, workdir: Path, loc: MlflowLocation,
                    all_commits: bool, known: set[str], active: set[str]) -> SourceResult:
    client = _client(loc)
    exp = client.get_experiment_by_name(loc.experiment_name)
    where = f"MLflow experiment {loc.experiment_name!r} at {redact_uri(loc.uri)}"
    if exp is None:
        return SourceResult([], f"no {where}")
    head = None if all_commits else _git_head(root)
    parents = search_all_runs(client, exp.experiment_id, f"tags.`{TAG_ROLE}` = 'pipeline'")
    stages: dict[str, list[Any]] = {}
    for run in search_all_runs(client, exp.experiment_id, f"tags.`{TAG_ROLE}` = 'stage'"):
        stages.setdefault(run.data.tags.get(TAG_PARENT, ""), []).append(run)

    chosen: dict[str, tuple[Any, dict[str, Any]]] = {}
    unfinished = duplicates = 0
    for parent in parents:
        tags = parent.data.tags
        name = tags.get("dvc.exp_name")
        if not name or name in active:
            continue        # not an experiment (a plain `dvc repro`, a stage by hand), or running
        if head and tags.get("dvc.baseline_rev", tags.get("git_commit")) != head:
            continue
        children = {}
        for run in stages.get(parent.info.run_id, []):
            stage = run.data.tags.get(TAG_STAGE, run.info.run_name)
            # a stage rerun under the same parent: the last one counts
            if stage not in children or run.info.start_time > children[stage].info.start_time:
                children[stage] = run
        finished = (parent.info.status == "FINISHED"
                    and any(children[s].info.status == "FINISHED" for s in ("evaluate", "derive")
                            if s in children)
                    and not any(r.info.status == "RUNNING" for r in children.values()))
        if not finished:
            unfinished += 1
            continue
        try:
            method, space, dataset = tags["method"], tags["space"], tags["dataset"]
            seed, profile = int(tags["seed"]), tags.get("profile", "full")
        except (KeyError, ValueError):
            continue
        if not filters.accepts(method=method, space=space, dataset=dataset, profile=profile, seed=seed,
                               name=name):
            continue
        if name in chosen:       # `dvc exp run -n x -f` ran x again: the latest run counts
            duplicates += 1
            if chosen[name][0].info.start_time > parent.info.start_time:
                continue
        chosen[name] = (parent, children)

    experiments = []
    for name, (parent, children) in chosen.items():
        tags = parent.data.tags
        stage_metrics: dict[str, dict[str, Any]] = {}
        for stage, run in children.items():
            stage_metrics[stage] = {k[len("final/"):]: v for k, v in run.data.metrics.items()
                                    if k.startswith("final/")}
        # the parent holds evaluate's summary even when evaluate's own run was restored from cache
        stage_metrics["evaluate"] = {**parent.data.metrics, **stage_metrics.get("evaluate", {})}
        if children.get("transfer_imagenet") is not None and "skipped" in children["transfer_imagenet"].data.tags:
            stage_metrics["transfer_imagenet"] = {"skipped": True}
        params: dict[str, str] = {}
        for run in children.values():
            params.update(run.data.params)
        e = Experiment(name=name, method=tags["method"], space=tags["space"], dataset=tags["dataset"],
                       seed=int(tags["seed"]), profile=tags.get("profile", "full"), source="mlflow",
                       baseline=tags.get("dvc.baseline_rev") or tags.get("git_commit"),
                       mlflow_run_id=parent.info.run_id, params=params,
                       metrics=normalise_metrics(stage_metrics),
                       nb201_table=params.get("evaluate.nb201_table"))
        experiments.append(e)
        if name in known:
            continue
        search = children.get("search")
        if search is not None:
            for key in SERIES_KEYS:
                values = _metric_series(client, search.info.run_id, key)
                if values:
                    e.series[key] = values
        else:
            e.notes.append("no MLflow run of its search (restored from DVC's run-cache): no per-epoch series")
        # evaluate copies the cell and derive's figures to the parent; derive's own run has them too
        holders = [parent.info.run_id] + ([children["derive"].info.run_id] if "derive" in children else [])
        dest = workdir / f"mlflow-{parent.info.run_id}"
        text = _download(client, holders, "genotype.json", dest)
        if text is not None:
            e.genotype = json.loads(text.read_text())
        else:
            try:
                e.genotype = genotype_from_str(tags.get("genotype", "")).to_json()
            except GenotypeError:
                e.notes.append("no derived genotype in MLflow (artifact genotype.json nor tag)")
        e.alpha_figure = _download(client, holders, "alpha_evolution.png", dest)
    scope = "all commits" if all_commits or not head else f"baseline {head[:7]}"
    summary = f"{len(experiments)} finished experiment(s) in {where} ({scope})"
    notes = []
    if unfinished:
        notes.append(f"MLflow: left out {unfinished} pipeline run(s) that did not finish")
    if duplicates:
        notes.append(f"MLflow: {duplicates} experiment name(s) ran more than once; the latest run counts")
    return SourceResult(experiments, summary, notes)


# --- both ---------------------------------------------------------------------------------------
@dataclass
class Collection:
    experiments: list[Experiment]
    sources: dict[str, str]                 # "dvc"/"mlflow" -> one-line summary
    notes: list[str]
    used: str                               # "dvc", "mlflow" or "dvc+mlflow"
    mlflow_ok: bool


def collect(root: Path, source: str, filters: Filters, workdir: Path, *, all_commits: bool = False,
            tracking_uri: str | None = None, runs: Sequence[Path] = ()) -> Collection:
    """Experiments from DVC and/or MLflow, or plain folders (module docstring), with notes on
    what is missing."""
    if source not in SOURCES:
        raise CompareError(f"--from must be one of {', '.join(SOURCES)}, got {source!r}")
    if source == "dirs" or runs:
        if source != "dirs":
            raise CompareError("--runs reads plain workspace folders: use it with --from dirs")
        if not runs:
            raise CompareError("--from dirs needs --runs FOLDER (a sweeps/plain.py sweep, e.g. runs/NAME)")
        got = collect_dirs(runs, filters)
        if not got.experiments:
            raise CompareError(f"no finished experiments in {', '.join(map(str, runs))}"
                               + (f" (filters: {filters.describe()})" if filters.describe() != "none" else ""))
        got.experiments.sort(key=lambda e: (e.space, e.dataset, e.profile, _method_rank(e.method), e.seed,
                                            e.name))
        return Collection(got.experiments, {"dirs": got.summary}, got.notes, "dirs", False)
    dvc = collect_dvc(root, filters, all_commits=all_commits) if source in ("auto", "dvc") else None
    ml = (collect_mlflow(root, filters, workdir, all_commits=all_commits, tracking_uri=tracking_uri,
                         known=[e.name for e in dvc.experiments] if dvc is not None else (),
                         active=dvc.active if dvc is not None else ())
          if source in ("auto", "mlflow") else None)
    sources = {k: r.summary for k, r in (("dvc", dvc), ("mlflow", ml)) if r is not None}
    notes = [n for r in (dvc, ml) if r is not None for n in r.notes]
    have_dvc = dvc is not None and bool(dvc.experiments)
    have_ml = ml is not None and bool(ml.experiments)

    if have_dvc:
        experiments = list(dvc.experiments)
        if ml is not None and ml.available:
            by_name = {e.name: e for e in ml.experiments}
            for e in experiments:
                match = by_name.pop(e.name, None)
                if match is not None:
                    e.mlflow_run_id, e.source = match.mlflow_run_id, "dvc+mlflow"
            if by_name:
                experiments += by_name.values()
                notes.append(f"{len(by_name)} experiment(s) found only in MLflow (their DVC refs are gone: "
                             f"{', '.join(sorted(by_name))}); their α per epoch is not in MLflow")
            used = "dvc+mlflow" if any(e.mlflow_run_id for e in experiments) else "dvc"
        else:
            used = "dvc"
        if ml is not None and not ml.available:
            notes.append("Rebuilt from DVC alone (MLflow unavailable): the experiments' MLflow run ids "
                         "are missing.")
        elif ml is not None and not have_ml:
            notes.append("MLflow holds none of these experiments (tracking was off or pointed elsewhere): "
                         "no MLflow run ids.")
    elif have_ml:
        experiments, used = list(ml.experiments), "mlflow"
        if source == "auto":
            notes.append("Rebuilt from the MLflow store alone (DVC found no finished experiments: their "
                          "refs were removed, or this is another clone): no git revisions; α per epoch "
                          "is not stored in MLflow, so the α evolution shows each run's own figure "
                          "(drawn by its derive stage) instead of one averaged figure per method.")
        else:
            notes.append("Read from MLflow only (--from mlflow): no git revisions; the α evolution shows "
                         "each run's own figure (drawn by its derive stage).")
    else:
        lines = [f"- {k}: {v}" for k, v in sources.items()]
        raise CompareError("no finished experiments found"
                           + (f" (filters: {filters.describe()})" if filters.describe() != "none" else "")
                           + ":\n" + "\n".join(lines) + "\n" + HOW_TO_SWEEP)
    experiments.sort(key=lambda e: (e.space, e.dataset, e.profile, _method_rank(e.method), e.seed, e.name))
    return Collection(experiments, sources, notes, used, ml is not None and ml.available)


def _method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


# --- NB201 lookups ------------------------------------------------------------------------------
def resolve_table_path(value: str | None, root: Path) -> Path | None:
    """A run's `evaluate.nb201_table` (or the CLI's) as a path: auto -> the shared table if present."""
    if value is None or value in ("none", ""):
        return None
    if value == "auto":
        shared = root / SHARED_NB201
        return shared if shared.exists() else None
    path = Path(value)
    return path if path.is_absolute() else root / path


def add_nb201_accuracy(experiments: Sequence[Experiment], root: Path, table_override: str | None
                       ) -> tuple[dict[str, NB201Table], list[str]]:
    """Look each NB201 cell up (the CLI's table, else the run's configured one). Returns the
    tables by path and notes; without a table, evaluate's own lookup (in the metrics) stays."""
    tables: dict[str, NB201Table] = {}
    notes: list[str] = []
    for e in experiments:
        if e.space != "nb201" or e.genotype is None:
            continue
        path = resolve_table_path(table_override if table_override is not None else e.nb201_table, root)
        if path is None:
            continue
        key = str(path)
        if key not in tables:
            try:
                tables[key] = NB201Table.load(path)
            except BenchmarkTableError as err:
                if table_override is not None:
                    raise CompareError(f"--nb201-table: {err}") from None
                notes.append(f"NB201 table of {e.name}: {err}")
                tables[key] = None      # type: ignore[assignment]   # tried once, failed
        table = tables[key]
        if table is None:
            continue
        try:
            entry = table.lookup(genotype_from_json(e.genotype))
        except (BenchmarkTableError, GenotypeError) as err:
            notes.append(f"{e.name}: {err}")
            continue
        e.metrics.update({f"nb201_{k}": v for k, v in entry.accuracy.items()})
    return {k: v for k, v in tables.items() if v is not None}, notes


# --- aggregation --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stat:
    """A metric over seeds. `std` is the sample standard deviation (n − 1), None for one seed."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def std(self) -> float | None:
        if len(self.values) < 2:
            return None
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (len(self.values) - 1))

    def best(self, better: str | None) -> float | None:
        if better == "higher":
            return max(self.values)
        if better == "lower":
            return min(self.values)
        return None

    def text(self, digits: int = 2) -> str:
        if self.std is None:
            return f"{self.mean:.{digits}f} (n=1)"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def mean_std(values: Iterable[float | None]) -> Stat | None:
    """The Stat of the finite values, or None when there are none."""
    finite = tuple(float(v) for v in values if v is not None and math.isfinite(float(v)))
    return Stat(finite) if finite else None


@dataclass
class Group:
    """The seeds of one method on one space × dataset × profile (× variant of other params)."""

    method: str
    space: str
    dataset: str
    profile: str
    variant: str
    experiments: list[Experiment]                      # one per seed: the statistics' samples
    repeats: list[Experiment] = field(default_factory=list)   # same seed again: listed, not counted

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (self.space, self.dataset, self.profile, self.variant, self.method)

    @property
    def label(self) -> str:
        return self.method + (f" [{self.variant}]" if self.variant else "")

    @property
    def seeds(self) -> list[int]:
        return [e.seed for e in self.experiments]

    def stat(self, metric: str) -> Stat | None:
        return mean_std(e.metrics.get(metric) for e in self.experiments)

    def mean_series(self, key: str) -> list[float]:
        """The per-epoch mean over seeds (up to the shortest seed's length)."""
        runs = [e.series[key] for e in self.experiments if e.series.get(key)]
        if not runs:
            return []
        length = min(len(r) for r in runs)
        out = []
        for t in range(length):
            vals = [r[t] for r in runs if math.isfinite(r[t])]
            out.append(sum(vals) / len(vals) if vals else math.nan)
        return out


GROUP_KEYS = ("method", "space", "dataset", "profile", "seed")


def _varying_params(experiments: Sequence[Experiment]) -> list[str]:
    """Params (other than the group keys and seeds) that differ within these experiments.

    "auto" matches any value: a raw params.yaml value and a stage's resolved one (MLflow, or DVC
    without the stage's config.json) then do not split a group that ran the same settings.
    """
    if len(experiments) < 2:
        return []
    keys = set.intersection(*(set(e.params) for e in experiments))
    varying = []
    for k in sorted(keys):
        if k in GROUP_KEYS or k.rsplit(".", 1)[-1] == "seed":
            continue
        values = {e.params[k] for e in experiments} - {"auto"}
        if len(values) > 1:
            varying.append(k)
    return varying


def group_experiments(experiments: Sequence[Experiment]) -> list[Group]:
    """Group by method × space × dataset × profile; params that vary otherwise make variants.

    A seed run twice with the same settings (two experiment names, or a rerun from another commit)
    is one sample, not two: counting both would shrink the std and inflate n. The first by name
    counts; the others go to `Group.repeats` and the report names them."""
    base: dict[tuple[str, str, str, str], list[Experiment]] = {}
    for e in experiments:
        base.setdefault((e.method, e.space, e.dataset, e.profile), []).append(e)
    groups = []
    for (method, space, dataset, profile), exps in base.items():
        varying = _varying_params(exps)
        split: dict[str, list[Experiment]] = {}
        for e in exps:
            variant = ", ".join(f"{k}={e.params[k]}" for k in varying)
            split.setdefault(variant, []).append(e)
        for variant, members in split.items():
            members.sort(key=lambda e: (e.seed, e.name))
            counted: dict[int, Experiment] = {}
            repeats = [e for e in members if counted.setdefault(e.seed, e) is not e]
            groups.append(Group(method, space, dataset, profile, variant, list(counted.values()),
                                repeats))
    groups.sort(key=lambda g: (g.space, g.dataset, g.profile, g.variant, _method_rank(g.method)))
    return groups


# --- the papers beside ours ---------------------------------------------------------------------
@dataclass(frozen=True)
class ClaimRow:
    group: Group
    claim: PaperClaim
    ours: float | None          # our mean (claim.stat == mean) or best seed (== best)
    ours_text: str

    @property
    def delta(self) -> float | None:
        if self.ours is None or self.claim.value is None:
            return None
        return self.ours - self.claim.value


def claim_rows(groups: Sequence[Group], paper: PaperResults) -> list[ClaimRow]:
    rows = []
    for g in groups:
        for c in paper.for_group(g.method, g.space, g.dataset):
            st = g.stat(c.metric)
            digits = METRICS[c.metric].digits
            if st is None:
                ours, text = None, "–"
            elif c.stat == "best":
                ours = st.best(METRICS[c.metric].better)
                text = "–" if ours is None else f"{ours:.{digits}f} (best of {st.n})"
            else:
                ours, text = st.mean, st.text(digits)
            rows.append(ClaimRow(g, c, ours, text))
    return rows


# --- collapse -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CollapseRow:
    label: str
    method: str
    share: float                 # mean share of the collapse op in the normal cell
    dominated: int               # seeds whose normal cell it dominates (share >= threshold)
    seeds: int
    first: float | None          # parameter-free ops (normal cell where the space has one), epoch 1
    last: float | None           # ... at the last epoch, mean over seeds

    @property
    def drifted(self) -> bool:
        return 2 * self.dominated > self.seeds        # a majority of seeds


@dataclass(frozen=True)
class CollapseVerdict:
    space: str
    dataset: str
    profile: str
    variant: str
    op: str
    rows: tuple[CollapseRow, ...]
    sentence: str


def _collapse_share(e: Experiment) -> float | None:
    if "collapse_share" in e.metrics:
        return e.metrics["collapse_share"]
    try:
        return cell_stats(e.genotype, e.space)["collapse_share"] if e.genotype is not None else None
    except GenotypeError:
        return None


def _collapse_row(g: Group, threshold: float) -> CollapseRow | None:
    shares = [s for s in map(_collapse_share, g.experiments) if s is not None]
    if not shares:
        return None
    series = g.mean_series("param_free_ops_normal") or g.mean_series("param_free_ops")
    return CollapseRow(g.label, g.method, sum(shares) / len(shares),
                       sum(s >= threshold for s in shares), len(shares),
                       series[0] if series else None, series[-1] if series else None)


def _describe(row: CollapseRow, op: str) -> str:
    text = f"{row.label}: {op} share {row.share:.2f}, dominates the cell in {row.dominated} of {row.seeds} seeds"
    if row.first is not None and row.last is not None and math.isfinite(row.first) and math.isfinite(row.last):
        text += f", parameter-free ops {row.first:.1f} → {row.last:.1f} during the search"
    return text


def _listing(rows: Sequence[CollapseRow], op: str) -> str:
    return "; ".join(_describe(r, op) for r in rows)


def collapse_sentence(where: str, op: str, base: Sequence[CollapseRow], cures: Sequence[CollapseRow]) -> str:
    """One or two sentences that say what the numbers say, for every outcome."""
    held = [c for c in cures if not c.drifted]
    fell = [c for c in cures if c.drifted]
    if not base:
        return (f"{where}: no plain DARTS run to compare with. Drifted to {op}: "
                f"{_listing(fell, op) or 'none'}. Did not: {_listing(held, op) or 'none'}.")
    base_fell = [b for b in base if b.drifted]
    base_held = [b for b in base if not b.drifted]
    parts = []
    if base_fell:
        parts.append(f"plain DARTS drifted to {op} ({_listing(base_fell, op)})")
    if base_held:
        parts.append(f"plain DARTS did not drift to {op} ({_listing(base_held, op)})")
    text = f"{where}: " + "; ".join(parts)
    if not cures:
        return text + "."
    if base_fell and not base_held:
        if not fell:
            return text + f". The cures did not ({_listing(held, op)})."
        if not held:
            return text + f", and so did the cures ({_listing(fell, op)})."
        return (text + f". Of the cures, these did not: {_listing(held, op)}; "
                f"these drifted too: {_listing(fell, op)}.")
    if not fell:
        return text + f", and neither did the cures ({_listing(held, op)}): nothing to cure in these runs."
    return (text + f". Cures that drifted to {op}: {_listing(fell, op)}"
            + (f"; that did not: {_listing(held, op)}." if held else "."))


def collapse_verdicts(groups: Sequence[Group], threshold: float = DOMINATED_SHARE) -> list[CollapseVerdict]:
    """Per space × dataset × profile (× variant): did plain DARTS drift to the collapse op, and
    did the other methods (the cures) not? Stated from the derived cells, whatever they show."""
    by_setting: dict[tuple[str, str, str, str], list[Group]] = {}
    for g in groups:
        by_setting.setdefault((g.space, g.dataset, g.profile, g.variant), []).append(g)
    verdicts = []
    for (space, dataset, profile, variant), gs in by_setting.items():
        op = collapse_op(space)
        rows = [r for r in (_collapse_row(g, threshold) for g in gs) if r is not None]
        if not rows:
            continue
        where = (f"On {space.upper() if re.fullmatch(r's[1-4]', space) else space} / {dataset} "
                 f"(profile {profile}" + (f", {variant}" if variant else "") + ")")
        cell = "the cell" if space == "nb201" else "the normal cell"
        sentence = collapse_sentence(where, op, [r for r in rows if r.method in BASELINES],
                                     [r for r in rows if r.method not in BASELINES])
        sentence += (f" ({op} share = its share of the ops of {cell}, mean over seeds; a seed counts as "
                     f"dominated, i.e. collapsed, at ≥ {threshold:.0%}; a method drifted when most of its "
                     f"seeds did.)")
        verdicts.append(CollapseVerdict(space, dataset, profile, variant, op, tuple(rows), sentence))
    return verdicts


# --- figures ------------------------------------------------------------------------------------
FIGURE_PREFIXES = ("collapse", "alpha_", "nb201_")     # the report's own figures (make_figures)


def _slug(*parts: str) -> str:
    text = "_".join(p for p in parts if p)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:120] or "x"


def _alpha_means(history: Sequence[Mapping[str, Any]]) -> list[dict[str, dict[str, float]]]:
    """Per epoch, per cell type, per op: the mean softmax(α) over the edges that offer the op."""
    out = []
    for entry in history:
        epoch: dict[str, dict[str, float]] = {}
        for cell, mat in entry["alphas"].items():
            names = entry["op_names"][cell]
            sums: dict[str, list[float]] = {}
            for e, row in enumerate(mat):
                edge_names = names[e] if isinstance(names[e], list) else names
                for k, v in enumerate(row):
                    sums.setdefault(edge_names[k], []).append(float(v))
            epoch[cell] = {op: sum(v) / len(v) for op, v in sums.items()}
        out.append(epoch)
    return out


def group_alpha_history(g: Group) -> list[dict[str, Any]]:
    """A history `plot_alpha_evolution` draws: per epoch one row per cell type holding each op's
    mean softmax(α) over edges and over seeds (ops enter late under OPP-DARTS: averaged over the
    seeds that have them)."""
    per_seed = [_alpha_means(e.alpha_history) for e in g.experiments if e.alpha_history]
    if not per_seed:
        return []
    length = min(len(s) for s in per_seed)
    history = []
    for t in range(length):
        alphas, names = {}, {}
        cells = list(dict.fromkeys(c for s in per_seed for c in s[t]))
        for cell in cells:
            ops = list(dict.fromkeys(op for s in per_seed for op in s[t].get(cell, {})))
            row = []
            for op in ops:
                vals = [s[t][cell][op] for s in per_seed if op in s[t].get(cell, {})]
                row.append(sum(vals) / len(vals))
            alphas[cell], names[cell] = [row], ops
        history.append({"alphas": alphas, "op_names": names})
    return history


def _seed_points(g: Group, metric: str) -> list[float]:
    return [e.metrics[metric] for e in g.experiments if metric in e.metrics]


def make_figures(groups: Sequence[Group], out: Path, tables: Mapping[str, NB201Table]
                 ) -> tuple[list[Path], list[str]]:
    """Collapse curves (per space × dataset × profile), α evolution per group, NB201 distributions."""
    from .plots import plot_alpha_evolution, plot_collapse_curves, plot_distribution_with_points

    figures: list[Path] = []
    notes: list[str] = []
    settings: dict[tuple[str, str, str], list[Group]] = {}
    for g in groups:
        settings.setdefault((g.space, g.dataset, g.profile), []).append(g)
    for (space, dataset, profile), gs in settings.items():
        for key, what in (("param_free_ops", "cell"), ("param_free_ops_normal", "normal cell")):
            series = {f"{g.label} ({len(g.experiments)} seeds)": g.mean_series(key) for g in gs}
            series = {k: v for k, v in series.items() if v}
            if not series:
                if key == "param_free_ops":
                    notes.append(f"no per-epoch parameter-free counts for {space}/{dataset}: collapse "
                                 f"curve not drawn")
                continue
            name = "collapse" if key == "param_free_ops" else "collapse_normal"
            figures.append(plot_collapse_curves(
                series, out / f"{_slug(name, space, dataset, profile)}.png",
                ylabel=f"parameter-free ops in the derived {what}",
                xlabel="epoch index (0 = end of search epoch 1)",
                title=f"Collapse: {space} / {dataset} ({profile}), mean over seeds"))
    for g in groups:
        history = group_alpha_history(g)
        stem = _slug("alpha", g.method, g.space, g.dataset, g.profile, g.variant)
        if history:
            figures.append(plot_alpha_evolution(
                history, [h["op_names"] for h in history], out / f"{stem}.png",
                epochs=list(range(1, len(history) + 1)),
                title=f"{g.label} on {g.space} / {g.dataset}: mean softmax(α) per op over edges and "
                      f"{len(g.experiments)} seed(s)"))
            continue
        drawn = [e for e in g.experiments if e.alpha_figure is not None and e.alpha_figure.is_file()]
        for e in drawn:
            target = out / f"{stem}_seed{e.seed}.png"
            shutil.copyfile(e.alpha_figure, target)
            figures.append(target)
        if not drawn:
            notes.append(f"no α history for {g.label} on {g.space}/{g.dataset}: α evolution not drawn")
    nb201 = [g for g in groups if g.space == "nb201"]
    if nb201 and tables:
        table = next(iter(tables.values()))
        if len(tables) > 1:
            notes.append(f"several NB201 tables configured; the distributions use {table.source}")
        for bench in NB201_BENCHMARKS:
            metric = f"nb201_{bench}"
            points = {f"{g.label} ({g.dataset}, {g.profile})" if len({(x.dataset, x.profile) for x in nb201}) > 1
                      else g.label: _seed_points(g, metric) for g in nb201}
            points = {k: v for k, v in points.items() if v}
            if not points:
                continue
            figures.append(plot_distribution_with_points(
                table.accuracies(bench), points, out / f"nb201_{bench}.png",
                xlabel=f"NB201 {NB201_LABELS[bench]} test accuracy (%)",
                title=f"Each seed's cell against all {len(table)} cells of NB201"))
    elif nb201:
        notes.append("no NB201 table configured: no accuracy lookup from the table and no distribution "
                     "plot (pass --nb201-table ../shared/data/nb201-accuracy.csv)")
    return figures, notes


# --- tables -------------------------------------------------------------------------------------
EXPERIMENT_COLUMNS = (
    "experiment", "source", "method", "space", "dataset", "profile", "variant", "seed", "counted", "genotype",
    "param_free_ops", "param_free_ops_normal", "param_free_ops_reduce", "collapse_op", "collapse_share",
    "cut_off", "nb201_cifar10", "nb201_cifar100", "nb201_imagenet16", "retrain_acc", "retrain_error",
    "retrain_epochs", "params_m", "macs_m", "imagenet_top1_error", "imagenet_top5_error",
    "imagenet_params_m", "imagenet_flops_m", "search_seconds", "search_epochs", "search_memory_gb",
    "search_valid_acc", "paper_metric", "paper_value", "paper_std", "paper_unconfirmed", "paper_source", "rev",
    "mlflow_run_id")
SUMMARY_METRICS = ("nb201_cifar10", "nb201_cifar100", "nb201_imagenet16", "retrain_acc", "retrain_error",
                   "param_free_ops", "param_free_ops_normal", "collapse_share", "cut_off", "search_seconds",
                   "search_epochs", "search_memory_gb", "params_m", "macs_m", "imagenet_top1_error",
                   "imagenet_top5_error")
CLAIM_COLUMNS = ("method", "space", "dataset", "profile", "variant", "seeds", "metric", "stat", "ours",
                 "ours_std", "paper_method", "paper_value", "paper_std", "unconfirmed", "delta", "source",
                 "note")


def _csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return buf.getvalue()


def _paper_fields(claim: PaperClaim | None) -> dict[str, Any]:
    if claim is None:
        return {}
    return {"paper_metric": claim.metric, "paper_value": claim.value, "paper_std": claim.std,
            "paper_unconfirmed": claim.unconfirmed, "paper_source": claim.source}


def experiment_rows(groups: Sequence[Group], paper: PaperResults) -> list[dict[str, Any]]:
    rows = []
    for g in groups:
        head = paper.headline(g.method, g.space, g.dataset)
        for e in sorted([*g.experiments, *g.repeats], key=lambda e: (e.seed, e.name)):
            rows.append({"experiment": e.name, "source": e.source, "method": e.method, "space": e.space,
                         "dataset": e.dataset, "profile": e.profile, "variant": g.variant, "seed": e.seed,
                         "counted": not any(e is r for r in g.repeats),
                         "genotype": e.genotype_str, "collapse_op": collapse_op(e.space), **e.metrics,
                         **_paper_fields(head), "rev": e.rev, "mlflow_run_id": e.mlflow_run_id})
    return rows


def summary_rows(groups: Sequence[Group], paper: PaperResults) -> tuple[list[dict[str, Any]], list[str]]:
    rows = []
    for g in groups:
        row: dict[str, Any] = {"method": g.method, "space": g.space, "dataset": g.dataset,
                               "profile": g.profile, "variant": g.variant, "seeds": len(g.experiments),
                               "seed_list": " ".join(map(str, g.seeds))}
        for m in SUMMARY_METRICS:
            st = g.stat(m)
            if st is not None:
                row[f"{m}_mean"], row[f"{m}_std"] = st.mean, st.std
                if METRICS[m].better:
                    row[f"{m}_best"] = st.best(METRICS[m].better)
        row.update(_paper_fields(paper.headline(g.method, g.space, g.dataset)))
        rows.append(row)
    metric_cols = [f"{m}_{s}" for m in SUMMARY_METRICS for s in ("mean", "std", "best")
                   if any(f"{m}_{s}" in r for r in rows)]
    columns = ["method", "space", "dataset", "profile", "variant", "seeds", "seed_list", *metric_cols,
               "paper_metric", "paper_value", "paper_std", "paper_unconfirmed", "paper_source"]
    return rows, columns


def claims_csv_rows(rows: Sequence[ClaimRow]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        st = r.group.stat(r.claim.metric)
        out.append({"method": r.group.method, "space": r.group.space, "dataset": r.group.dataset,
                    "profile": r.group.profile, "variant": r.group.variant,
                    "seeds": len(r.group.experiments), "metric": r.claim.metric, "stat": r.claim.stat,
                    "ours": r.ours, "ours_std": st.std if st is not None and r.claim.stat == "mean" else None,
                    "paper_method": r.claim.paper_method, "paper_value": r.claim.value,
                    "paper_std": r.claim.std, "unconfirmed": r.claim.unconfirmed, "delta": r.delta,
                    "source": r.claim.source, "note": r.claim.note})
    return out


# --- Markdown -----------------------------------------------------------------------------------
def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _human_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _fmt_stat(g: Group, metric: str) -> str:
    st = g.stat(metric)
    if st is None:
        return "–"
    if metric == "search_seconds":
        return _human_seconds(st.mean) + ("" if st.std is None else f" ± {_human_seconds(st.std)}")
    return st.text(METRICS[metric].digits)


def render_markdown(report: "Report") -> str:
    groups, paper = report.groups, report.paper
    lines = [f"# Comparing methods: {report.name}", "",
             f"{len(report.experiments)} finished experiment(s), {len(groups)} group(s) "
             f"(method × space × dataset × profile), read from **{report.used}** on "
             f"{report.created}. Nothing was re-run.", ""]
    not_full = sorted({g.profile for g in groups} - {"full"})
    if not_full:
        lines += [f"> **Profile {', '.join(not_full)}**: these runs use small synthetic data and tiny "
                  f"networks for one or two epochs — they check the machinery, not the science. The "
                  f"papers' numbers beside them are for orientation only.", ""]
    short = sorted({int(e.metrics["search_epochs"]) for g in groups if g.profile == "full"
                    for e in g.experiments if e.metrics.get("search_epochs", SPEC_SEARCH_EPOCHS) < SPEC_SEARCH_EPOCHS})
    if short:
        lines += [f"> **Short searches**: some runs searched {', '.join(map(str, short))} epoch(s), the "
                  f"papers {SPEC_SEARCH_EPOCHS}: their cells and the papers' numbers are not like for like.", ""]
    lines += ["## Data sources", ""]
    lines += [f"- **{k}**: {v}" for k, v in report.sources.items()]
    if report.mlflow_run_id:
        lines.append(f"- this report is logged to MLflow as run `{report.mlflow_run_id}` "
                     f"(`compare-{report.name}`)")
    for note in report.notes:
        lines.append(f"- ⚠ {note}")
    lines.append("")

    lines += ["## Summary (mean ± std over seeds)", "",
              "std is the sample standard deviation (n − 1). The paper column is the number each paper "
              "reports for the same method, space and search dataset (`nascore/paper_results.yaml`, "
              "from methods.md §3); ⚠ = unconfirmed.", ""]
    cols = [m for m in ("nb201_cifar10", "nb201_cifar100", "nb201_imagenet16", "retrain_acc",
                        "retrain_error", "retrain_epochs", "param_free_ops", "collapse_share", "search_seconds",
                        "search_epochs", "params_m", "macs_m", "imagenet_top1_error")
            if any(g.stat(m) is not None for g in groups)]
    header = ["method", "space", "dataset", "profile", "seeds", *[METRICS[m].label for m in cols], "paper"]
    rows = []
    for g in groups:
        head = paper.headline(g.method, g.space, g.dataset)
        ptext = "–" if head is None else f"{METRICS[head.metric].label}: {head.text()} ({head.source})"
        dataset = g.dataset + (" (synthetic stand-in)" if g.profile == "smoke" else "")
        rows.append([g.label, g.space, dataset, g.profile, " ".join(map(str, g.seeds)),
                     *[_fmt_stat(g, m) for m in cols], ptext])
    lines += _md_table(header, rows) + [""]

    lines += ["## The papers' numbers beside ours", ""]
    if report.claims:
        rows = []
        for r in report.claims:
            delta = "" if r.delta is None else f"{r.delta:+.{METRICS[r.claim.metric].digits}f}"
            rows.append([r.group.label, r.group.space, r.group.dataset, r.group.profile,
                         METRICS[r.claim.metric].label, r.ours_text, r.claim.text(), delta,
                         f"{r.claim.paper_method}: {r.claim.source}"
                         + (f" — {r.claim.note}" if r.claim.note else "")])
        lines += _md_table(["method", "space", "dataset", "profile", "metric", "ours", "paper", "ours − paper",
                            "source"], rows)
    else:
        lines.append("No paper reports a number for these method × space × dataset combinations.")
    refs = [r for r in paper.references if r.space in {g.space for g in groups}]
    if refs:
        lines += ["", "Reference points: " + "; ".join(
            f"{r.what}, {METRICS[r.metric].label}: {r.text()} ({r.source})" for r in refs) + "."]
    lines.append("")

    lines += ["## Collapse", ""]
    if report.verdicts:
        lines += [v.sentence + "\n" for v in report.verdicts]
    else:
        lines += ["No derived cells to judge.", ""]

    lines += ["## Derived cells, per seed", ""]
    rows = []
    for g in groups:
        for e in g.experiments:
            acc = e.metrics.get(f"nb201_{_benchmark_of(e.dataset) or 'cifar10'}")
            rows.append([g.label, e.space, e.dataset, e.seed, e.name, f"`{e.genotype_str}`",
                         _fmt(e.metrics.get("param_free_ops"), 0), _fmt(e.metrics.get("collapse_share"), 2),
                         _fmt(acc, 2), _fmt(e.metrics.get("retrain_acc"), 2),
                         _human_seconds(e.metrics["search_seconds"]) if "search_seconds" in e.metrics else "–"])
    lines += _md_table(["method", "space", "dataset", "seed", "experiment", "genotype", "param-free",
                        "collapse share", "NB201 acc.", "retrained acc.", "search time"], rows) + [""]
    exp_notes = [f"{e.name}: {n}" for e in report.experiments for n in e.notes]
    if exp_notes:
        lines += ["Notes on single experiments:", ""] + [f"- {n}" for n in exp_notes] + [""]

    lines += ["## Figures", ""]
    for fig in report.figures:
        lines += [f"![{fig.stem}]({fig.name})", ""]
    if not report.figures:
        lines += ["None could be drawn (see the notes above).", ""]
    lines += ["## Files", "",
              "- `table.csv`: one row per experiment (genotype, every metric, the paper's headline number)",
              "- `summary.csv`: one row per group (mean, std, best over seeds)",
              "- `claims.csv`: every applicable paper number beside ours",
              "- `experiments.json`: what was read, per experiment (params, metrics, per-epoch series)", ""]
    return "\n".join(lines)


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


# --- the report ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompareOptions:
    name: str = "compare"
    source: str = "auto"                      # auto | dvc | mlflow | dirs
    runs: tuple[Path, ...] = ()               # --from dirs: workspace folders or sweeps of them
    out: Path | None = None                   # default <root>/reports/<name>
    filters: Filters = Filters()
    all_commits: bool = False                 # default: experiments of HEAD (as `dvc exp show`)
    nb201_table: str | None = None            # a path, or "none"; default: each run's own param
    tracking_uri: str | None = None           # default: nascore.tracking's rules
    log_to_mlflow: bool = True
    dominated_share: float = DOMINATED_SHARE
    paper_results: Path | None = None
    select: bool = False                      # DARTS' selection protocol (nascore.selection)


@dataclass
class Report:
    name: str
    out_dir: Path
    created: str
    used: str
    experiments: list[Experiment]
    groups: list[Group]
    paper: PaperResults
    claims: list[ClaimRow]
    verdicts: list[CollapseVerdict]
    figures: list[Path]
    sources: dict[str, str]
    notes: list[str]
    mlflow_run_id: str | None = None
    selection: Any = None                     # nascore.selection.Selection, with --select

    @property
    def markdown(self) -> Path:
        return self.out_dir / "report.md"


def build_report(experiments: list[Experiment], out_dir: Path, *, name: str, root: Path,
                 paper: PaperResults, sources: Mapping[str, str] | None = None,
                 notes: Sequence[str] = (), used: str = "hand-made input", nb201_table: str | None = None,
                 dominated_share: float = DOMINATED_SHARE) -> Report:
    """Everything but the reading and the MLflow logging: usable on hand-made experiments."""
    notes = list(notes)
    for e in experiments:
        if e.genotype is not None:
            try:
                e.metrics.update(cell_stats(e.genotype, e.space))
            except GenotypeError as err:
                e.notes.append(f"genotype unreadable: {err}")
    tables, table_notes = add_nb201_accuracy(experiments, root, nb201_table)
    notes += table_notes
    commits = {e.baseline for e in experiments if e.baseline}
    if len(commits) > 1:
        notes.append(f"the experiments were run from {len(commits)} different commits and are grouped "
                     f"regardless of code changes; see the rev column of table.csv")
    groups = group_experiments(experiments)
    for g in groups:
        for seed in sorted({e.seed for e in g.repeats}):
            kept = next(e for e in g.experiments if e.seed == seed)
            again = [e.name for e in g.repeats if e.seed == seed]
            notes.append(f"{g.label} on {g.space}/{g.dataset} ({g.profile}): seed {seed} ran "
                         f"{len(again) + 1} times ({', '.join([kept.name, *again])}); the statistics "
                         f"count it once, from {kept.name} (a repeat is not a new sample; drop the "
                         f"others with `dvc exp remove`, or run a new seed)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):      # a rebuilt report must not show a previous run's figures
        if old.name.startswith(FIGURE_PREFIXES):
            old.unlink()
    figures, fig_notes = make_figures(groups, out_dir, tables)
    report = Report(name=name, out_dir=out_dir, created=time.strftime("%Y-%m-%d %H:%M %Z"), used=used,
                    experiments=experiments, groups=groups, paper=paper,
                    claims=claim_rows(groups, paper), verdicts=collapse_verdicts(groups, dominated_share),
                    figures=figures, sources=dict(sources or {}), notes=notes + fig_notes)
    write_files(report)
    return report


def write_files(report: Report) -> None:
    out = report.out_dir
    write_text(out / "table.csv", _csv(experiment_rows(report.groups, report.paper), EXPERIMENT_COLUMNS))
    rows, columns = summary_rows(report.groups, report.paper)
    write_text(out / "summary.csv", _csv(rows, columns))
    write_text(out / "claims.csv", _csv(claims_csv_rows(report.claims), CLAIM_COLUMNS))
    write_json(out / "experiments.json", [{
        "name": e.name, "source": e.source, "rev": e.rev, "baseline": e.baseline,
        "mlflow_run_id": e.mlflow_run_id, "method": e.method, "space": e.space, "dataset": e.dataset,
        "seed": e.seed, "profile": e.profile, "genotype": e.genotype, "metrics": e.metrics,
        "series": {k: [None if not math.isfinite(v) else v for v in vs] for k, vs in e.series.items()},
        "params": e.params, "notes": e.notes} for e in report.experiments])
    write_text(report.markdown, render_markdown(report))


def _log_to_mlflow(report: Report, root: Path, options: CompareOptions) -> str | None:
    """Log the report folder as run `compare-<name>`; returns its id, or None (with a note)."""
    loc = mlflow_location(root, options.tracking_uri)
    problem = mlflow_problem(loc)
    if problem:
        report.notes.append(f"this report is not logged to MLflow: {problem}")
        write_text(report.markdown, render_markdown(report))
        return None
    try:
        client = _client(loc)
        exp = client.get_experiment_by_name(loc.experiment_name)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(
            loc.experiment_name, artifact_location=loc.artifact_location)
        run = client.create_run(exp_id, run_name=f"compare-{report.name}", tags={
            TAG_ROLE: "compare", "nascore.report": report.name, "nascore.source": report.used,
            "mlflow.source.type": "LOCAL"})
        run_id = run.info.run_id
        client.log_param(run_id, "experiments", len(report.experiments))
        client.log_param(run_id, "filters", options.filters.describe())
        for g in report.groups:
            for m in ("nb201_cifar10", "retrain_acc", "param_free_ops", "collapse_share"):
                st = g.stat(m)
                if st is not None:
                    key = re.sub(r"[^\w./ -]", "_", f"{g.space}/{g.dataset}/{g.profile}/{g.label}/{m}")
                    client.log_metric(run_id, key[:250], st.mean)
        report.mlflow_run_id = run_id
        write_text(report.markdown, render_markdown(report))      # now naming its run
        client.log_artifacts(run_id, str(report.out_dir))
        client.set_terminated(run_id, "FINISHED")
        return run_id
    except Exception as e:      # the report on disk stands; MLflow is a copy
        first = str(e).splitlines()[0] if str(e) else ""
        report.notes.append(f"this report is not logged to MLflow ({type(e).__name__}: {first})")
        report.mlflow_run_id = None
        write_text(report.markdown, render_markdown(report))
        return None


def compare(options: CompareOptions, root: Path | None = None) -> Report:
    """Read the finished experiments, write the report folder, log it to MLflow (when reachable)."""
    root = Path(root) if root is not None else project_root()
    if not re.fullmatch(r"[\w.-]+", options.name):
        raise CompareError(f"--name {options.name!r}: use letters, digits, '.', '_' or '-'")
    if not 0 < options.dominated_share <= 1:
        raise CompareError(f"--dominated-share must be in (0, 1], got {options.dominated_share}")
    paper = load_paper_results(options.paper_results)
    out = Path(options.out) if options.out is not None else root / "reports" / options.name
    if not out.is_absolute():
        out = root / out
    with tempfile.TemporaryDirectory(prefix="nascore-compare-") as tmp:
        found = collect(root, options.source, options.filters, Path(tmp), all_commits=options.all_commits,
                        tracking_uri=options.tracking_uri,
                        runs=tuple(p if Path(p).is_absolute() else root / p for p in options.runs))
        if options.filters.params:
            found.experiments = [e for e in found.experiments if options.filters.accepts_params(e.params)]
            if not found.experiments:
                raise CompareError(f"no finished experiment has {options.filters.describe()}; the params "
                                   f"compare by their resolved values (a stage's config.json)")
        report = build_report(found.experiments, out, name=options.name, root=root, paper=paper,
                              sources=found.sources, notes=found.notes, used=found.used,
                              nb201_table=options.nb201_table, dominated_share=options.dominated_share)
    if options.select:
        from .selection import select_cell, write_selection

        report.selection = select_cell(report.groups)
        write_selection(report.selection, out)
    if options.log_to_mlflow:
        _log_to_mlflow(report, root, options)       # notes in the report why, when it cannot
    return report


__all__ = ["CompareError", "CompareOptions", "Filters", "Experiment", "Group", "Stat", "PaperClaim",
           "PaperResults", "Report", "build_report", "cell_stats", "claim_rows", "collapse_verdicts",
           "collect", "collect_dirs", "collect_dvc", "collect_mlflow", "compare", "group_experiments",
           "load_paper_results", "mean_std", "normalise_metrics"]
