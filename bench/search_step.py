"""Search-step speed: the reference-style baseline against nascore's eager and fast paths (issue 4).

    python bench/search_step.py                    # on the GPU if there is one, else the CPU
    python bench/search_step.py --device cpu       # the same code paths minus CUDA graphs
    python bench/search_step.py --size tiny        # seconds; what tests/test_bench.py runs
    python bench/search_step.py --json out.json    # also write every figure as JSON

Per method × space (by default issue 4's: DARTS first order, second order, PC-DARTS, NB201
DARTS-V1, and the search's validation forward, `*_valid`: eval mode, no grad, 512 images at the
spec size; `--cases single_darts@s3,...` any method on any space, `--cases matrix` every pair the
pipeline takes, each with its params as `dvc repro` resolves them) and per variant
(`reference`: bench/reference.py; `eager`; `fused`; `fused_dense`; on CUDA also `+graph` and
`+graph+bf16` of both fused backends), one search step on random data resident on the device.
A variant is a backend (eager | fused | fused_dense) and modifiers joined by "+": graph (a CUDA
graph), bf16 (autocast and channels_last), amp (bf16 autocast alone, NCHW), cl (channels_last
alone, fp32), compile (torch.compile, cell by cell), compilenet (torch.compile of the whole network), tuned
(cuDNN autotuning: search.cudnn_benchmark); and dp, not a speed switch: RobustDARTS' regularised
search, drop-path 0.2 on the op outputs (`search.drop_path`).
- always: ms per step (median on CPU; CUDA events over a fixed number of steps on a GPU), images/s,
  and the wall time of the warm-up steps (where a compile, a graph capture or autotuning is paid);
- on CUDA: peak memory;
- with counting (default on CPU): aten ops dispatched, writing ops (≈ kernels), bytes written,
  bytes read, host syncs and the peak of the bytes live tensors hold (`live MB`: a GPU's `peak
  MB` less cuDNN's workspaces; what a CUDA graph's pool must hold) for one step
  (bench/opcount.py); not for a `compile` variant (see `countable`). And on the CPU, the kernels
  the step launches, from the profiler's record (`kernels`, `opcount.CountKernels`): what a
  `compile` variant's count is, its compiled code's fused kernels among them; over uncompiled
  code the writing ops' count again.
Then the retrain step (DARTS_V2 network) and its test pass (`retrain_eval`: 4 batches of the
stage's test batch, 256 images, per step; every retrain epoch runs one over the test set), and the
hours 600 CIFAR-10 epochs of both take at the measured speeds. A retrain variant runs `train`
itself; its ms/step is the steady step, from two epochs of different lengths, and what each
epoch adds once (a CUDA graph's warm-up steps and capture) is its `epoch_overhead_ms`, which the
estimate counts once per 520-step epoch (before 2026-12-06 both were one 50-step epoch's mean,
the overhead spread over a tenth of a real epoch's steps). The ratio table divides the
reference's figure by each variant's. nascore variants step through `EpochSteps`, the function the
search loop runs. `data` (a case of its own, on by default) measures one batch of the device data
path (`ResidentLoader`: crop, flip, normalise and the retrain's cutout on the device) at the
retrain's and the search's batch, as a step; every other case reuses batches made once, as the
reference does, and the estimates add the data path's batches to each step where it was measured.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # nascore from this checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference  # noqa: E402
from opcount import CountKernels, CountOps, OpCount  # noqa: E402

from nascore import graphs  # noqa: E402
from nascore import search as nascore_search, train as nascore_train  # noqa: E402
from nascore.genotype import DARTS_V2  # noqa: E402
from nascore import config as C  # noqa: E402
from nascore.methods import METHODS  # noqa: E402
from nascore.metrics import run_peak_memory  # noqa: E402
from nascore.networks import NetworkCIFAR  # noqa: E402
from nascore.search import EpochSteps, SearchConfig, SearchData, SearchRun  # noqa: E402
from nascore.spaces import SPACES, get_space  # noqa: E402
from nascore.graphs import cuda_graph  # noqa: E402
from nascore.train import (GraphedTestPass, NonFiniteLossError, TrainConfig, _GraphedSteps,  # noqa: E402
                           cuda_graph_problems, evaluate, train)

# the probe itself (`main` turns off, on the CPU, the refusal it decides, not the probe)
cpu_bf16_dilated_grads_ok = graphs.cpu_bf16_dilated_grads_ok
# the loops that refuse a CPU bf16 channels_last run the probe fails (`graphs.bf16_layout_problem`)
REFUSING_MODULES = (nascore_search, nascore_train)


@dataclass(frozen=True)
class Size:
    """Network and batch sizes; `batch` None keeps each case's spec batch."""

    init_channels: int
    layers: int                  # DARTS-space cells
    nb201_layers: int            # NB201 cells per stage
    image: int
    batch: int | None
    retrain_channels: int
    retrain_layers: int
    retrain_batch: int
    # the retrain's test pass (`retrain_eval`): the stage's loader batch, 256, but at the tiny size
    # (where it took 14 of the bench test's 40 s)
    eval_batch: int = 256


SIZES = {
    # the spec's search networks and batches (methods.md §2): the GPU figures of issue 4
    "full": Size(16, 8, 5, 32, None, 36, 20, 96),
    # the CPU figures of bench/RESULTS.md: the same code at a size a laptop steps in seconds
    "small": Size(8, 5, 2, 16, 16, 8, 8, 16),
    # what tests/test_bench.py runs: a few seconds in all
    "tiny": Size(4, 3, 1, 8, 4, 4, 3, 4, eval_batch=16),
}

@dataclass(frozen=True)
class Case:
    """What a case measures: `method`'s search step on `space`, its params as `dvc repro` resolves
    them on CIFAR-10 (`search_settings`), or with `validation` that supernet's per-epoch
    validation forward (eval mode, no grad, at `search.valid_batch_size`)."""

    method: str
    space: str
    validation: bool = False


CASES = {
    "darts_first": Case("darts", "darts"),
    "darts_second": Case("darts_v2", "darts"),
    "pc_darts": Case("pc_darts", "darts"),
    "nb201": Case("darts", "nb201"),
    # not in issue 4's list, so not run by default (--cases rf_darts --variants eager,fused):
    # random features' affine BNs take their own fused path; the reference has no RF variant
    "rf_darts": Case("rf_darts", "darts"),
    # a search epoch's validation forward, the reference's as its DARTS `infer` runs it
    # (F.cross_entropy, accuracy, `.item()`)
    "darts_valid": Case("darts", "darts", validation=True),
    "pc_darts_valid": Case("pc_darts", "darts", validation=True),
    "nb201_valid": Case("darts", "nb201", validation=True),
}
# besides these names, any METHOD@SPACE (`case_of`); `--cases matrix`: every pair the pipeline takes
MATRIX = "matrix"
# `--cases data`: the device data path a real run adds to each step (`data_figures`), which every
# other case leaves out (their batches are made once and reused, as the reference's are)
DATA = "data"
# its variants: (images per batch from `Size`, cutout) of the retrain recipe and of a search's
# batches (two per step: w's and α's), channels_last as the fast paths take them
DATA_VARIANTS = {"retrain": ("retrain_batch", 16), "search": ("batch", 0)}
# (method, space) pairs bench/reference.py implements
REFERENCE_PAIRS = frozenset({("darts", "darts"), ("darts_v2", "darts"), ("pc_darts", "darts"), ("darts", "nb201")})
REFERENCE_NAMES = ", ".join(f"{m}@{s}" for m, s in sorted(REFERENCE_PAIRS))
VALIDATION_CASES = tuple(name for name, c in CASES.items() if c.validation)
# a search case -> the validation case of its supernet (second order validates DARTS' supernet)
VALIDATION_OF = {"darts_first": "darts_valid", "darts_second": "darts_valid", "pc_darts": "pc_darts_valid",
                 "nb201": "nb201_valid"}
EVAL_BATCHES = 4      # a `retrain_eval` step: the retrain's test pass over this many batches
DEFAULT_CASES = ("darts_first", "darts_second", "pc_darts", "nb201", "darts_valid", "pc_darts_valid", "nb201_valid",
                 DATA)
BACKEND_NAMES = ("eager", "fused", "fused_dense")
MODIFIERS = {"graph": {"cuda_graph": True}, "bf16": {"amp": "bf16", "channels_last": True},
             "amp": {"amp": "bf16"}, "cl": {"channels_last": True}, "compile": {"compile": True}, "tuned": {"cudnn_benchmark": True},
             # torch.compile'd as one network, not cell by cell (`search.compile_scope`)
             "compilenet": {"compile": True, "compile_scope": "network"},
             # fused_dense without one of its trades: convs of several kernel sizes apart; the
             # reduction cells' paired stride-2 convs grouped, not block-diagonal
             "unmerged": {"merge_kernel_sizes": False}, "grouped": {"block_diagonal": False},
             # the fused backends without one matrix product per pass for the node sums (`fused.mix`),
             # and with it where a compiled search leaves it out (`SearchConfig.mixes_by_matmul`)
             "chained": {"matmul_mix": False}, "matmul": {"matmul_mix": True},
             # ... and one BN per op kind, not one per pass (`fused.batch_norm_pass`)
             "kindbn": {"merge_batch_norms": False},
             # not a speed switch: RobustDARTS' regularised search, drop-path on every op output
             # but the identity at the study's lowest p (a step costs the same at any p > 0)
             "dp": {"drop_path": 0.2}}
# nothing to the retrain's cells (whose drop-path is the recipe's, always on: `train_config`)
SEARCH_CELL_SWITCHES = ("merge_kernel_sizes", "block_diagonal", "matmul_mix", "merge_batch_norms", "drop_path")


def speed_options(variant: str) -> dict[str, object]:
    """A nascore variant's speed settings: "fused_dense+graph+bf16" -> backend, cuda_graph, amp, ..."""
    backend, *modifiers = variant.split("+")
    unknown = [m for m in modifiers if m not in MODIFIERS]
    if backend not in BACKEND_NAMES or unknown:
        raise ValueError(f"unknown variant {variant!r}: a backend ({', '.join(BACKEND_NAMES)}) then "
                         f"modifiers among {', '.join(MODIFIERS)} joined by '+', or 'reference'")
    speed: dict[str, object] = {} if backend == "eager" else {"backend": backend}
    for m in modifiers:
        speed.update(MODIFIERS[m])
    return speed


def validation_twin(variant: str) -> str:
    """The variant whose validation pass this one's is: itself without `graph`. The search's
    validation runs in the steps' backend, precision and layout (`SearchRun.validate`), but
    outside any CUDA graph, so a `+graph` variant's figure would repeat its twin's."""
    if variant == "reference":
        return variant
    backend, *modifiers = variant.split("+")
    return "+".join([backend, *(m for m in modifiers if m != "graph")])


def has_reference(case: str) -> bool:
    """Whether bench/reference.py implements the case's search (`REFERENCE_PAIRS`)."""
    c = case_of(case)
    return (c.method, c.space) in REFERENCE_PAIRS


def runs_to_measure(cases: Sequence[str], variants: Sequence[str]) -> list[tuple[str, str]]:
    """(case, variant) in measuring order, a validation case once per validation twin (the first
    variant listed of each), the reference only where it has the case (`has_reference`)."""
    runs, twins = [], set()
    for case in cases:
        for variant in variants:
            if variant == "reference" and not has_reference(case):
                continue
            if case in VALIDATION_CASES:
                if (case, validation_twin(variant)) in twins:
                    continue
                twins.add((case, validation_twin(variant)))
            runs.append((case, variant))
    return runs


def countable(variant: str, device: str = "cpu") -> bool:
    """Whether `CountOps` counts what the variant runs. Not for a compiled variant: while a
    TorchDispatchMode is active, torch.compile's code does not run and the eager ops run in its
    place, so the counts would be the uncompiled variant's, under the compiled one's name. Not for
    a CUDA graph on a GPU: a replay dispatches no op (on a CPU the graph is off: the plain
    variant's counts)."""
    if variant == "reference":
        return True
    speed = speed_options(variant)
    return not speed.get("compile") and not (speed.get("cuda_graph") and device == "cuda")


def kernels_countable(device: str) -> bool:
    """Whether `CountKernels` counts a variant's kernels: on the CPU, compiled or not (its profiler
    sees the C++ kernels inductor compiles there, `CountKernels.compiling`; on a GPU it would see
    launches, not a replayed graph's kernels, and a profile says more: `--profile`)."""
    return device == "cpu"


@dataclass
class Figure:
    case: str
    variant: str
    batch: int
    ms_per_step: float
    images_per_s: float
    peak_memory_mb: float | None = None        # peak allocated (a CUDA graph's pool is not in it)
    peak_reserved_mb: float | None = None      # peak held by the caching allocator, graph pools included
    ops: int | None = None
    writing_ops: int | None = None
    mb_written: float | None = None
    mb_read: float | None = None               # what the writing ops read (opcount._read)
    syncs: int | None = None
    live_mb: float | None = None               # peak bytes of live tensors in the step, counted (opcount)
    gflop: float | None = None                 # convolutions' and matrix products' FLOPs, counted (opcount)
    profile: dict | None = None                # --profile: where one step's time goes (profile_step)
    by_op: list | None = None                  # counted: [(aten op, writing calls, MB moved), ...] (OpCount.largest)
    by_site: list | None = None                # --by-site: [(aten op, site, writing calls), ...] (OpCount.by_site)
    warmup_s: float | None = None              # wall time of the warm-up steps: compile, capture, autotuning
    warmup_steps: int | None = None            # how many steps `warmup_s` ran
    # retrain only: what every epoch adds once to its steps (a CUDA graph's eager warm-up steps
    # and capture, the epoch's end), from epochs of two lengths (`steady_epoch`)
    epoch_overhead_ms: float | None = None
    # counted: (batch, C, H, W) tensors written in the other memory format than the variant's
    # (NCHW ones in a channels_last variant, NHWC ones else; `opcount.OpCount.activation_writes`)
    off_layout: int | None = None
    # counted on the CPU from the profiler (`opcount.CountKernels`), a compiled variant's too:
    # kernels launched in one step, and [(aten op or "inductor", calls), ...], most first
    kernels: int | None = None
    kernels_by_op: list | None = None
    # a compiled variant: the seconds each of torch.compile's own timers (`dynamo_timed`: dynamo's
    # trace, AOTAutograd, inductor's lowering, code generation and compilation) ran during the
    # warm-up, where the compile falls (`compile_seconds`); nested timers, so not additive
    compile_s: dict | None = None


@dataclass
class Machine:
    device: str
    cpu: str
    cores: int
    threads: int
    torch: str
    gpu: str | None = None
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%d"))


def machine(device: torch.device) -> Machine:
    cpu = platform.processor() or "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return Machine(str(device), cpu, os.cpu_count() or 0, torch.get_num_threads(), torch.__version__, gpu)


# torch.compile's timers (`torch._dynamo.utils.compilation_time_metrics`, which torch 2.11 and 2.14
# both keep) printed for a compiled variant, by the names of `dynamo_timed` sections; the JSON
# keeps every timer. Where a compile's time goes says what a GPU's compile will cost: dynamo's
# trace and AOTAutograd are the same Python on any device, while inductor generates C++ for a
# CPU (compiled by the C++ compiler) and Triton for a GPU (compiled in worker processes).
COMPILE_TIMERS = (("dynamo trace", "bytecode_tracing"), ("AOT joint", "aot_trace_joint_graph"),
                  ("inductor", "compile_fx_inner"), ("codegen", "Scheduler.codegen"),
                  ("C++ compile", "compile_file"), ("Triton wait", "async_compile.wait"))


def compile_timers() -> dict[str, list[float]]:
    """torch.compile's timers so far: each `dynamo_timed` section's seconds, one per time it ran."""
    return dict(getattr(torch._dynamo.utils, "compilation_time_metrics", {}))


@contextlib.contextmanager
def compile_seconds() -> Iterator[dict[str, float]]:
    """Yields a dict that, on exit, holds the seconds each of torch.compile's timers ran inside
    the block (those that ran at all)."""
    def totals() -> dict[str, float]:
        return {name: sum(values) for name, values in compile_timers().items()}
    before, spent = totals(), {}
    try:
        yield spent
    finally:
        after = totals()
        spent.update({name: s - before.get(name, 0.0) for name, s in after.items()
                      if s - before.get(name, 0.0) > 0})


# --- one step of each implementation -------------------------------------------------------------
def batches(n: int, batch: int, image: int, classes: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, image, image, generator=g).to(device),
             torch.randint(0, classes, (batch,), generator=g).to(device)) for _ in range(n)]


def case_of(name: str) -> Case:
    """A named case (`CASES`), or "METHOD@SPACE": that method's search step on that space."""
    if name in CASES:
        return CASES[name]
    method, at, space = name.partition("@")
    if at and method in METHODS.names() and space in SPACES.names():
        return Case(method, space)
    raise ValueError(f"unknown case {name!r}: the cases are {', '.join(CASES)}, {MATRIX} (every method "
                     f"on every space), or METHOD@SPACE with a method among {', '.join(METHODS.names())} "
                     f"and a space among {', '.join(SPACES.names())}")


def matrix_cases(size: Size) -> tuple[list[str], list[str]]:
    """Every method × space as "METHOD@SPACE": those the pipeline takes, and those it refuses,
    each with its reason (OPP-DARTS needs one op list on every edge: not S1)."""
    cases, refused = [], []
    for method in METHODS.names():
        for space in SPACES.names():
            name = f"{method}@{space}"
            try:
                search_settings(name, size)
                cases.append(name)
            except C.ConfigError as e:
                refused.append(f"{name}: {e}")
    return cases, refused


def search_settings(case: str, size: Size, **speed: object) -> tuple[str, SearchConfig, int]:
    """A case's space, search settings and batch: the pipeline's params for its method and space
    on CIFAR-10 (`config.resolve_stage`, every `auto` as `dvc repro` resolves it), scaled to
    `size` (channels, cells; the batch where `size` fixes one, else the spec's), with α updated
    from the first step (no warm-up epochs) and `speed`'s settings."""
    c = case_of(case)
    search = {"init_channels": size.init_channels, "layers": size.nb201_layers if c.space == "nb201" else size.layers,
              "arch_warmup_epochs": 0, **speed}
    if size.batch:
        search["batch_size" if not c.validation else "valid_batch_size"] = size.batch

    def resolve() -> SearchConfig:
        return C.resolve_stage("search", {"method": c.method, "space": c.space, "dataset": "cifar10",
                                          "search": search}).search
    cfg = resolve()
    if cfg.partial_channels > size.init_channels:       # K channels at least: PC-DARTS at the tiny size
        search["partial_channels"] = size.init_channels
        cfg = resolve()
    return c.space, cfg, cfg.valid_batch_size if c.validation else cfg.batch_size


Step = tuple[Callable[[int], None], int, Callable[[], list[torch.Tensor]]]   # step(i), batch, host scalars


def step_counters(*optimizers: torch.optim.Optimizer) -> Callable[[], list[torch.Tensor]]:
    """The optimisers' step counters that live on the host (read with `.item()`, no device sync)."""
    return lambda: [s["step"] for opt in optimizers for s in opt.state.values()
                    if isinstance(s.get("step"), torch.Tensor) and s["step"].device.type == "cpu"]


class OneBatch:
    """A validation loader of one fixed batch (what `SearchRun.validate` iterates)."""

    def __init__(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.batch = batch

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        return iter([self.batch])


def nascore_step(case: str, size: Size, device: torch.device, **speed: object) -> Step:
    if device.type == "cpu":
        speed = {"optimizer_impl": "foreach", **speed}      # what torch picks on CUDA (see cuda_like)
    space, cfg, batch = search_settings(case, size, **speed)
    # what SearchRun.run() holds for a whole search (`free` puts it back after the variant)
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    run = SearchRun(get_space(space), cfg, SearchData(None, None, 10), device=device, log=lambda s: None)
    if case in VALIDATION_CASES:           # the search's own validation pass over one batch
        run.data.val = OneBatch(batches(1, batch, size.image, 10, device)[0])
        return (lambda i: run.validate()), batch, list
    run.model.train()
    run.model.set_drop_path(cfg.drop_path)       # the search loop's ramp at its end (`dp`)
    steps = EpochSteps(run, run.step_context(0), update_arch=True)
    data = batches(4, batch, size.image, 10, device)

    def step(i: int) -> None:
        steps.step(data[i % 4], data[(i + 1) % 4])
    return step, batch, lambda: step_counters(run.w_opt, run.a_opt)()


def reference_step(case: str, size: Size, device: torch.device) -> Step:
    space, cfg, batch = search_settings(case, size)
    if not has_reference(case):
        raise ValueError(f"bench/reference.py has no {case} search (it has {REFERENCE_NAMES}); measure it "
                         f"against `eager`, nascore's plain path")
    torch.manual_seed(2)
    if space == "nb201":
        model = reference.NB201Network(cfg.init_channels, cfg.layers, 10).to(device)
        search = reference.NB201Search(model, cfg.lr, cfg.weight_decay, cfg.arch_lr, cfg.arch_weight_decay)
        counters = step_counters(search.w_optimizer, search.a_optimizer)
    else:
        model = reference.DartsNetwork(cfg.init_channels, 10, cfg.layers, cfg.partial_channels,
                                       cfg.edge_normalization).to_device(device)
        search = reference.DartsSearch(model, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.arch_lr,
                                       cfg.arch_weight_decay, unrolled=cfg.optimisation == "second_order")
        counters = step_counters(search.optimizer, search.architect.optimizer)
    data = batches(4, batch, size.image, 10, device)
    if case in VALIDATION_CASES:
        def infer(i: int) -> None:         # DARTS' `infer`: eval mode, no grad, host reads per batch
            x, y = data[i % 4]
            model.eval()
            with torch.no_grad():
                logits = model(x)
                loss = torch.nn.functional.cross_entropy(logits, y)
                correct = (logits.argmax(1) == y).float().sum()
                loss.item(), correct.item()
            model.train()
        return infer, batch, list
    optimizers = ((search.w_optimizer, search.a_optimizer) if space == "nb201"
                  else (search.optimizer, search.architect.optimizer))
    cuda_like(device, *optimizers)

    def step(i: int) -> None:
        (xt, yt), (xv, yv) = data[i % 4], data[(i + 1) % 4]
        search.step(xt, yt, xv, yv)
    return step, batch, counters


def cuda_like(device: torch.device, *optimizers: torch.optim.Optimizer) -> None:
    """On CPU, optimisers take the multi-tensor (foreach) kernels torch picks by default on CUDA,
    so that CPU op counts are the kernel counts a GPU run would launch."""
    if device.type == "cpu":
        for opt in optimizers:
            for group in opt.param_groups:
                group["foreach"] = True


# --- measuring ------------------------------------------------------------------------------------
def profile_step(run: Callable[[], None], device: torch.device, top: int = 30) -> dict:
    """One step under torch.profiler: on CUDA the GPU time per kernel name (what the step's GPU
    time is made of: e.g. depthwise weight gradients vs launch-bound small kernels), on the CPU
    the self time per aten op. {"total_ms", "kernels" (calls), "top": [(name, ms, calls), ...]},
    largest first."""
    return _largest_first(_profile_rows(run, device), top)


def profile_difference(run_one: Callable[[], None], run_more: Callable[[], None], steps: int,
                       device: torch.device, top: int = 30) -> dict:
    """Per step, what `run_more` (a run of 1 + `steps` steps) spends beyond `run_one` (the same
    run of 1 step), kernel name by kernel name, as `profile_step` reports it: a whole run's
    per-run and per-epoch work (building, the first step's warm-up, a checkpoint's copies) cancels
    out, as in the retrain's counts. Only names called more often in the longer run: a name the
    two runs call as often is per-run work, whatever its timing noise."""
    one = {name: (ms, calls) for name, ms, calls in _profile_rows(run_one, device)}
    rows = []
    for name, ms, calls in _profile_rows(run_more, device):
        ms0, calls0 = one.get(name, (0.0, 0))
        if calls > calls0:
            rows.append((name, max(ms - ms0, 0.0) / steps, round((calls - calls0) / steps)))
    return _largest_first(rows, top)


def _largest_first(rows: list[tuple[str, float, int]], top: int) -> dict:
    rows = sorted(rows, key=lambda r: -r[1])
    # every name's calls too: a name whose time is noise (clamped at 0) falls out of the top
    return {"total_ms": sum(r[1] for r in rows), "kernels": sum(r[2] for r in rows), "top": rows[:top],
            "calls": {name: calls for name, _, calls in rows}}


def _profile_rows(run: Callable[[], None], device: torch.device) -> list[tuple[str, float, int]]:
    """(name, ms, calls) of what `run` dispatches: GPU kernels on CUDA, aten ops' self time on the
    CPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        run()
        if cuda:
            torch.cuda.synchronize(device)
    rows = []
    for e in prof.key_averages():
        if cuda:
            # a user annotation's GPU span (torch's optimisers mark `Optimizer.step#SGD.step`)
            # covers kernels listed on their own: counting it too counted them twice (the
            # 2026-12-04 H200 profiles did: 7-12 ms of each DARTS step)
            if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False):
                continue
            us = getattr(e, "self_device_time_total", None)
            us = e.self_cuda_time_total if us is None else us
        elif e.key.startswith("aten::"):
            us = e.self_cpu_time_total
        else:
            continue
        rows.append((e.key, us / 1000, e.count))
    return rows


def channels_last_variant(variant: str) -> bool:
    """Whether a search or retrain variant runs its activations channels_last (the data path's
    batches: as the fast paths take them)."""
    if variant == "reference":
        return False
    if variant in DATA_VARIANTS:
        return True
    return bool(speed_options(retrain_speed(variant) if variant.startswith("nascore") else variant)
                .get("channels_last", False))


def off_layout(count: OpCount, variant: str) -> int:
    """The (batch, C, H, W) tensors a counted step wrote in the other memory format than the variant's."""
    return count.activation_writes["nchw" if channels_last_variant(variant) else "nhwc"]


def measure(case: str, variant: str, make: Callable[[], Step], device: torch.device, warmup: int,
            steps: int, count: bool, profile: bool = False, sites: bool = False,
            activation_batch: int | None = None, kernels: bool = False) -> Figure:
    """`activation_batch`: the batch of the step's activations, where `make`'s batch (the images
    per step, for images/s) is not it. `kernels`: also count one step's kernels from the
    profiler (`CountKernels`), the one count a compiled variant has."""
    step, batch, host_scalars = make()
    t0 = time.perf_counter()
    with compile_seconds() as compiling:
        for i in range(warmup):
            step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    warmup_s = time.perf_counter() - t0      # what a run pays before its first timed step
    if device.type == "cuda":
        # reserved after the reset = what is held from here on, the warm-up's blocks and the
        # graph's private pool included: the figure to compare with the reference's
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(steps):
            step(warmup + i)
        end.record()
        torch.cuda.synchronize(device)
        ms = start.elapsed_time(end) / steps
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        reserved = torch.cuda.max_memory_reserved(device) / 2**20
    else:
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            step(warmup + i)
            times.append(time.perf_counter() - t0)
        ms, peak, reserved = 1000 * statistics.median(times), None, None
    fig = Figure(case, variant, batch, ms, 1000 * batch / ms, peak, reserved, warmup_s=warmup_s,
                 warmup_steps=warmup, compile_s=compiling or None)
    if count:
        with CountOps(host_scalars(), device=device.type, sites=sites, batch=activation_batch or batch) as counter:
            step(warmup + steps)
        c = counter.count
        fig.off_layout = off_layout(c, variant)
        fig.ops, fig.writing_ops, fig.mb_written, fig.syncs = c.ops, c.writing_ops, c.bytes_written / 2**20, c.syncs
        fig.mb_read, fig.live_mb, fig.gflop = c.bytes_read / 2**20, c.peak_bytes / 2**20, c.flops / 1e9
        fig.by_op = c.largest()
        fig.by_site = c.by_site() if sites else None
    if kernels:
        with CountKernels() as k:
            step(warmup + steps + 1)
        fig.kernels, fig.kernels_by_op = k.count.kernels, k.count.by_name.most_common()
    if profile:
        # a replayed CUDA graph is one opaque launch to the profiler: profile the variant without
        # the graph for its kernels (they are the same kernels)
        fig.profile = profile_step(lambda: step(warmup + steps + 1), device)
    return fig


def data_figures(size: Size, device: torch.device, warmup: int, steps: int, count: bool,
                 failures: list[str]) -> list[Figure]:
    """One batch of the device data path (`nascore.data.ResidentLoader`: uint8 CIFAR-size images on
    the device, crop, flip, normalise, cutout there) per timed "step", at the retrain's and a
    search's batch: what a real run's step adds to the figures of the other cases, whose batches
    are made once. A search step takes two such batches."""
    from nascore.data import ImageArrays, ResidentLoader
    n = 50_000 if device.type == "cuda" else 2_000      # CIFAR-10's training set on a GPU
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size.image, size.image), dtype=torch.uint8, generator=g)
    arrays = ImageArrays("cifar10", images, torch.randint(0, 10, (n,), generator=g),
                         tuple(str(k) for k in range(10)), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    figures = []
    for variant, (batch_field, cutout) in DATA_VARIANTS.items():
        # the full size leaves a search's batch to its params: DARTS' and NB201's 64
        batch = getattr(size, batch_field) or 64
        # `make` returns the batch as the step: `measure` needs no host scalars here
        def make(batch: int = batch, cutout: int = cutout) -> Step:
            loader = ResidentLoader(arrays, batch_size=batch, cutout=cutout, drop_last=True, seed=0,
                                    device=device, channels_last=True)
            batches = loader.forever()
            return (lambda i: next(batches)), batch, list
        try:
            fig = measure(DATA, variant, make, device, warmup, steps, count,
                          kernels=count and kernels_countable(device.type))
            # its (B, H, W, C) gather and (B, H, W, 1) mask look NCHW-shaped to the count, and its
            # output is the layout asked for (tests/test_data.py)
            fig.off_layout = None
            figures.append(fig)
        except Exception as e:           # as a search variant's: the other figures still come
            failures.append(f"{DATA} {variant}: {type(e).__name__}: {e}")
            traceback.print_exc()
        finally:
            free(device)
    return figures


def free(device: torch.device) -> None:
    """Drop the last variant's model, graphs and cached blocks before the next one is measured."""
    gc.collect()
    torch.backends.cudnn.benchmark = False
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def retrain_speed(variant: str) -> str:
    """A retrain variant "nascore[+backend][+modifiers]" as a search variant: "nascore+graph" is
    "eager+graph" (the eager backend in a CUDA graph)."""
    tokens = variant.split("+")[1:]
    backend = tokens.pop(0) if tokens and tokens[0] in BACKEND_NAMES else "eager"
    return "+".join([backend] + tokens)


# The recipe's drop-path (methods.md: p = 0.2·e/epochs, on every op output but identities): every
# epoch after the first pays its masks, so the retrain figures time a step with it. What it costs
# does not depend on p > 0; the reference runs at the schedule's middle value.
RETRAIN_DROP_PATH = 0.2


def why_nonfinite(error: Exception, variant: str, device: torch.device, model: torch.nn.Module) -> str:
    """The likely cause of a retrain variant's non-finite loss, or "": what nascore refuses in a
    real run (`graphs.bf16_layout_problem`: the CPU's wrong bf16 channels_last dilated-conv weight
    gradients, from about 32×32 px, so the full size hits them) and the bench lets through for
    its counts (`main`)."""
    if not isinstance(error, NonFiniteLossError) or variant == "reference":
        return ""
    cfg = train_config(variant)
    problem = graphs.bf16_layout_problem(model, device, cfg.amp, cfg.channels_last,
                                         grads_ok=lambda: cpu_bf16_dilated_grads_ok())
    return (f" (likely the CPU's wrong bf16 channels_last dilated-conv weight gradients, which nascore "
            f"refuses outside the bench: {problem}; measure the +amp variant, bf16 in NCHW)" if problem else "")


def train_config(variant: str) -> TrainConfig:
    """The `train` config a retrain variant measures with ("nascore+fused_dense+graph+bf16"): the
    recipe's drop-path, which `train` applies from the second epoch on (epoch e of E at
    `RETRAIN_DROP_PATH`·e/E); 2 epochs: the first warms up."""
    speed = speed_options(retrain_speed(variant))
    return TrainConfig(epochs=2, drop_path=RETRAIN_DROP_PATH, amp=str(speed.get("amp", "none")),
                       channels_last=bool(speed.get("channels_last", False)), progress="none",
                       cuda_graph=bool(speed.get("cuda_graph", False)), compile=bool(speed.get("compile", False)),
                       backend=str(speed.get("backend", "eager")))


def retrain_figures(size: Size, device: torch.device, warmup: int, steps: int, count: bool,
                    variants: list[str], profile: bool = False,
                    failures: list[str] | None = None, sites: bool = False) -> Iterator[Figure]:
    """The DARTS_V2 network's training step and test pass: the reference-style loop and nascore's
    `train`, each figure as soon as it is measured (a run cut short keeps the ones before). A
    figure that raises is appended to `failures` and the others are still measured (without
    `failures`, it raises)."""
    data = batches(4, size.retrain_batch, 32, 10, device)

    def attempt(case: str, variant: str, figure: Callable[[], Figure]) -> Figure | None:
        try:
            return figure()
        except Exception as e:          # one broken variant must not cost the others' figures
            if failures is None:
                raise
            failures.append(f"{case} {variant}: {type(e).__name__}: {e}{why_nonfinite(e, variant, device, network())}")
            print(f"  {case} {variant}: FAILED {failures[-1]}", flush=True)
            traceback.print_exc()
            return None
        finally:
            free(device)

    count_kernels = count and kernels_countable(device.type)     # every figure here, compiled or not

    def network() -> NetworkCIFAR:
        torch.manual_seed(0)
        return NetworkCIFAR(DARTS_V2, size.retrain_channels, 10, size.retrain_layers, auxiliary=True).to(device)

    def make_reference() -> Step:
        model = network()
        model.drop_path_prob = RETRAIN_DROP_PATH / 2
        opt = torch.optim.SGD(model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
        cuda_like(device, opt)
        objs, top1 = reference.Meter(), reference.Meter()
        return (lambda i: reference.retrain_step(model, opt, *data[i % 4], objs, top1)), size.retrain_batch, list
    if fig := attempt("retrain", "reference",
                      lambda: measure("retrain", "reference", make_reference, device, warmup, steps, count, profile,
                                      kernels=count_kernels)):
        yield fig

    # the test pass every retrain epoch runs (eval_every 1): 4 batches a step
    eval_batch = size.eval_batch
    eval_data = batches(EVAL_BATCHES, eval_batch, 32, 10, device)

    def make_reference_eval() -> Step:
        model, objs, top1, top5 = network(), reference.Meter(), reference.Meter(), reference.Meter()

        def infer(i: int) -> None:              # DARTS' `infer`: host reads of every batch's figures
            model.eval()
            with torch.no_grad():
                for x, y in eval_data:
                    logits, _ = model(x)
                    prec1, prec5 = reference.accuracy(logits, y)
                    objs.update(F.cross_entropy(logits, y).item(), y.size(0))
                    top1.update(prec1.item(), y.size(0))
                    top5.update(prec5.item(), y.size(0))
        return infer, EVAL_BATCHES * eval_batch, list
    if fig := attempt("retrain_eval", "reference",
                      lambda: measure("retrain_eval", "reference", make_reference_eval, device, warmup, steps, count,
                                      activation_batch=eval_batch, kernels=count_kernels)):
        yield fig

    class Batches:
        """`lengths[e]` batches in epoch e (the last length for later epochs)."""
        def __init__(self, *lengths: int) -> None:
            self.lengths, self.n = lengths, lengths[0]

        def set_epoch(self, epoch: int) -> None:        # `train` calls it before each epoch
            self.n = self.lengths[min(epoch, len(self.lengths) - 1)]

        def __len__(self) -> int:
            return self.n

        def __iter__(self):
            return (data[i % 4] for i in range(self.n))

    def train_figure(variant: str) -> Figure:
        cfg = train_config(variant)
        # Three epochs: one to warm up (no drop-path, as a real run's first), then `short` steps
        # and `short + extra` (drop-path on: `RETRAIN_DROP_PATH`). A graphed run's first steps
        # run eagerly and capture (`train._GraphedSteps`), in the first epoch since one graph
        # serves the run (before 2026-12-06's twelfth session: in every epoch); whatever work an
        # epoch still adds once is measured apart (`steady_epoch`), not averaged in. A compiled
        # network without a graph traces again in its first epoch with drop-path on (p becomes
        # a device tensor: `train`), so it warms up over two epochs.
        short = max(warmup, 2) + (_GraphedSteps.WARMUP_STEPS + 1 if cfg.cuda_graph else 0)
        extra = steps * (5 if cfg.cuda_graph else 1)
        lead = 2 if cfg.compile and not cfg.cuda_graph else 1
        with tempfile.TemporaryDirectory() as tmp, compile_seconds() as compiling:
            result = train(network(), Batches(*[short] * (lead + 1), short + extra), None,
                           dataclasses.replace(cfg, epochs=lead + 2),
                           checkpoint_path=Path(tmp) / "ckpt.pt", device=device)
        # an epoch's training time: its images over its images/s (test pass and checkpoint excluded)
        seconds = [size.retrain_batch * n / r["images_per_s"]
                   for r, n in zip(result.history[lead:], (short, short + extra))]
        ms, overhead = steady_epoch(seconds[0], short, seconds[1], short + extra)
        # `train` records each epoch's peak itself (resetting the statistics per epoch): the run's
        # is the largest
        peak = run_peak_memory(result.history)
        reserved = run_peak_memory(result.history, "peak_reserved_mb")
        # the warm-up epochs' time: what the run pays once beyond its steps (`start_up_s`)
        warm_s = sum(size.retrain_batch * short / r["images_per_s"] for r in result.history[:lead])
        # the compile falls in the warm-up epochs (and the first test pass's), all in this run
        fig = Figure("retrain", variant, size.retrain_batch, ms, 1000 * size.retrain_batch / ms, peak, reserved,
                     epoch_overhead_ms=overhead, warmup_s=warm_s, warmup_steps=lead * short,
                     compile_s=compiling or None)
        ops, kernels = count and countable(retrain_speed(variant), device.type), count_kernels
        counts: list[OpCount] = []
        if ops or kernels:
            # `train` runs whole epochs: the difference between a run whose second epoch has
            # 2 + `steps` steps and one whose second has 2 is `steps` steps without the per-run and
            # per-epoch work around them (a fused network's first step records its cells, its
            # second builds their one gather index: `nascore.fused.ForwardRecord`; a compiled one's
            # compile, which `CountKernels` leaves out); the second epoch, as every epoch but a
            # real run's first, with drop-path. Both counts of an uncompiled variant from the same
            # runs (the profiler records what the dispatch mode lets through).
            kernel_counts = []
            for n in (2, 2 + steps):
                with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
                    counter = stack.enter_context(CountOps(device=device.type, batch=size.retrain_batch, sites=sites)) \
                        if ops else None
                    kernel_counter = stack.enter_context(CountKernels()) if kernels else None
                    train(network(), Batches(1, n), None, dataclasses.replace(cfg, epochs=2),
                          checkpoint_path=Path(tmp) / "ckpt.pt", device=device)
                if kernel_counter is not None:
                    kernel_counts.append(kernel_counter.count)
                if counter is not None:
                    counts.append(counter.count)
            if kernel_counts:
                one_k, more_k = kernel_counts
                fig.kernels = (more_k.kernels - one_k.kernels) // steps
                fig.kernels_by_op = [(name, calls // steps) for name, calls in
                                     (more_k.by_name - one_k.by_name).most_common()]
        if counts:
            one, more = counts
            fig.ops = (more.ops - one.ops) // steps
            fig.writing_ops = (more.writing_ops - one.writing_ops) // steps
            fig.mb_written = (more.bytes_written - one.bytes_written) / 2**20 / steps
            fig.mb_read = (more.bytes_read - one.bytes_read) / 2**20 / steps
            fig.syncs = (more.syncs - one.syncs) // steps
            fig.gflop = (more.flops - one.flops) / 1e9 / steps
            fig.live_mb = more.peak_bytes / 2**20        # the peak of a run: the network built in it included
            fig.off_layout = (off_layout(more, variant) - off_layout(one, variant)) // steps
            per_step = OpCount(writing_by_op=more.writing_by_op - one.writing_by_op,
                               moved_by_op=more.moved_by_op - one.moved_by_op,
                               writing_by_site=more.writing_by_site - one.writing_by_site)
            fig.by_op = [(name, calls // steps, mb / steps) for name, calls, mb in per_step.largest()]
            if sites:
                fig.by_site = [(name, site, calls // steps) for name, site, calls in per_step.by_site()]
        if profile:
            # as the counts: a second epoch (drop-path on) of 1 + `steps` steps less one of 1 step,
            # kernel by kernel; without the CUDA graph, a replay being one opaque launch to the
            # profiler (its kernels are the plain step's)
            plain, model = dataclasses.replace(cfg, epochs=2, cuda_graph=False), network()

            def epoch(n: int) -> None:
                with tempfile.TemporaryDirectory() as tmp:
                    train(model, Batches(1, n), None, plain, checkpoint_path=Path(tmp) / "ckpt.pt", device=device)
            epoch(1 + steps)            # unprofiled: cuDNN's autotuning and the allocator's first blocks
            fig.profile = profile_difference(lambda: epoch(1), lambda: epoch(1 + steps), steps, device)
        return fig

    def eval_figure(variant: str) -> Figure:
        """`train`'s `evaluate`, as the variant's network runs it."""
        cfg = train_config(variant)

        def make_eval() -> Step:
            model = network().to(memory_format=torch.channels_last if cfg.channels_last
                                 else torch.preserve_format)
            model.set_backend(cfg.backend)
            net = torch.compile(model) if cfg.compile else model
            # as `train` with a CUDA graph: the test passes through one captured batch step
            if cfg.cuda_graph and (problems := cuda_graph_problems(cfg, device)):
                raise ValueError("TrainConfig.cuda_graph=True " + "; ".join(problems))
            graph = GraphedTestPass(cuda_graph, device) if cfg.cuda_graph else None

            def test_pass(i: int) -> None:
                # as `train`: the first pass runs eagerly, filling the fused cells' caches before a trace
                evaluate(net if i else model, eval_data, device, amp=cfg.amp, channels_last=cfg.channels_last,
                         graph=graph)
            return test_pass, EVAL_BATCHES * eval_batch, list
        return measure("retrain_eval", variant, make_eval, device, warmup, steps,
                       count and countable(retrain_speed(variant), device.type), activation_batch=eval_batch,
                       kernels=count_kernels)

    evaluated: set[tuple] = set()
    for variant in variants:
        if fig := attempt("retrain", variant, lambda: train_figure(variant)):
            yield fig
        if eval_settings(variant) not in evaluated:
            # `train`'s `evaluate`, as the variant's network runs it (through a graph of its own
            # with a CUDA graph, since 2026-12-06's twelfth session)
            evaluated.add(eval_settings(variant))
            if fig := attempt("retrain_eval", variant, lambda: eval_figure(variant)):
                yield fig


def eval_settings(variant: str) -> tuple:
    """What a retrain variant's test pass depends on: its speed options (the CUDA graph too,
    since `train` runs the test passes through one: `GraphedTestPass`)."""
    if variant == "reference":
        return (variant,)
    return tuple(sorted(speed_options(retrain_speed(variant)).items()))


def steady_epoch(short_s: float, short_steps: int, long_s: float, long_steps: int) -> tuple[float, float]:
    """(ms per step, ms per epoch) from the training times of two epochs of `short_steps` and
    `long_steps` steps: the steps' time is their difference's, and what the shorter epoch took
    beyond its steps is what each epoch adds once (never below 0: timing noise)."""
    if long_steps <= short_steps:
        raise ValueError(f"the longer epoch needs more steps: {long_steps} <= {short_steps}")
    ms = 1000 * (long_s - short_s) / (long_steps - short_steps)
    if ms <= 0:      # noise larger than the extra steps: the longer epoch's mean, overhead in it
        return 1000 * long_s / long_steps, 0.0
    return ms, max(0.0, 1000 * short_s - short_steps * ms)


def retrain_estimate(figures: list[Figure], epochs: int = 600, train_images: int = 50_000,
                     test_images: int = 10_000) -> list[tuple[str, float, float, float]]:
    """Per retrain variant: hours of `epochs` epochs of training steps, of test passes (CIFAR-10,
    evaluated every epoch; the stage drops the last partial batch) and of what the run pays once
    (`start_up_s` of both: a compiled network's compile), from its `retrain` and `retrain_eval`
    figures; an epoch's overhead (graph warm-up and capture) counted once per epoch; each step's
    batch from the device data path where it was measured (`--cases data`), else none."""
    evals = {eval_settings(x.variant): x for x in figures if x.case == "retrain_eval"}
    data = {x.batch: x.ms_per_step for x in figures if (x.case, x.variant) == (DATA, "retrain")}
    rows = []
    for x in figures:
        if x.case != "retrain":
            continue
        ev = evals.get(eval_settings(x.variant))
        step_ms = x.ms_per_step + data.get(x.batch, 0.0)      # measured at another batch: left out
        train_h = epochs * ((train_images // x.batch) * step_ms + (x.epoch_overhead_ms or 0.0)) / 3.6e6
        test_h = epochs * test_images / ev.images_per_s / 3600 if ev else math.nan
        rows.append((x.variant, train_h, test_h, (start_up_s(x) + start_up_s(ev)) / 3600))
    return rows


def start_up_s(x: Figure | None) -> float:
    """Seconds a run pays once before its steady steps: its warm-up beyond that many steady steps
    (torch.compile's traces and compile, with inductor's on-disk cache as the run found it; a
    CUDA graph's capture; cuDNN's autotuning). 0 where the figure has no warm-up measured."""
    if x is None or x.warmup_s is None or x.warmup_steps is None:
        return 0.0
    return max(0.0, x.warmup_s - x.warmup_steps * x.ms_per_step / 1000)


def search_estimate(figures: list[Figure], epochs: int = 50, train_images: int = 25_000,
                    valid_images: int = 25_000) -> list[tuple[str, str, float, float, float]]:
    """Per search case and variant: minutes of `epochs` epochs of steps, of the per-epoch
    validation (CIFAR-10's halves of 25,000 images; `search.valid_every: 1`, as DARTS validates),
    and of what the run pays once (`start_up_s` of the step and of its validation: a compiled
    search's compile), from the step's figure and that of its validation twin on the case's
    supernet (NaN: not measured). A graphed search's second capture (after α's warm-up) is left
    out; its two batches per step from the device data path are in where they were measured at
    its batch (`--cases data`)."""
    valid = {(x.case, validation_twin(x.variant)): x for x in figures if x.case in VALIDATION_CASES}
    data = {x.batch: x.ms_per_step for x in figures if (x.case, x.variant) == (DATA, "search")}
    rows = []
    for x in figures:
        if x.case not in VALIDATION_OF:
            continue
        data_ms = data.get(x.batch, 0.0)    # measured at another batch (PC-DARTS' 256): left out
        steps_min = epochs * (train_images // x.batch) * (x.ms_per_step + 2 * data_ms) / 6e4
        v = valid.get((VALIDATION_OF[x.case], validation_twin(x.variant)))
        valid_min = epochs * valid_images / v.images_per_s / 60 if v else math.nan
        rows.append((x.case, x.variant, steps_min, valid_min, (start_up_s(x) + start_up_s(v)) / 60))
    return rows


def check(cases: list[str], variants: list[str], retrain_variants: list[str], size: Size,
          data: bool = False) -> int:
    """What a run would measure, with every search setting and retrain config built (and so
    validated) without a network or a device: a refused combination shows here, in a second, not
    minutes into a lent GPU's call. Returns the exit status."""
    problems: list[str] = []
    plan: list[str] = []
    for case, variant in runs_to_measure(cases, variants):
        try:
            if variant == "reference":
                search_settings(case, size)
            else:
                search_settings(case, size, **speed_options(variant))
            plan.append(f"{case} {variant}")
        except (ValueError, TypeError) as e:
            problems.append(f"{case} {variant}: {e}")
    for variant in retrain_variants:
        try:
            train_config(variant)
            plan.append(f"retrain {variant}")
        except (ValueError, TypeError) as e:
            problems.append(f"retrain {variant}: {e}")
    if data:
        plan += [f"{DATA} {variant}" for variant in DATA_VARIANTS]
    print(f"check: {len(plan)} to measure: {', '.join(plan) or 'nothing'}")
    for problem in problems:
        print(f"check: REFUSED {problem}")
    return 1 if problems else 0


# --- report ---------------------------------------------------------------------------------------
def table(figures: list[Figure]) -> str:
    c = max([14] + [len(x.case) for x in figures])
    v = max([17] + [len(x.variant) for x in figures])
    head = f"{'case':<{c}} {'variant':<{v}} {'batch':>5} {'ms/step':>9} {'img/s':>8} {'peak MB':>8} {'rsrvd MB':>8} {'live MB':>8} " \
           f"{'ops':>7} {'writing':>7} {'kernels':>7} {'MB written':>10} {'MB read':>9} {'GFLOP':>8} {'syncs':>5} {'warm-up s':>9} " \
           f"{'off-layout':>10}"
    rows = [head, "-" * len(head)]

    def f(v: float | int | None, spec: str) -> str:
        return "-".rjust(len(format(0, spec))) if v is None else format(v, spec)
    for x in figures:
        rows.append(f"{x.case:<{c}} {x.variant:<{v}} {x.batch:>5} {f(x.ms_per_step, '9.1f')} "
                    f"{f(x.images_per_s, '8.1f')} {f(x.peak_memory_mb, '8.0f')} {f(x.peak_reserved_mb, '8.0f')} "
                    f"{f(x.live_mb, '8.0f')} "
                    f"{f(x.ops, '7d')} "
                    f"{f(x.writing_ops, '7d')} {f(x.kernels, '7d')} {f(x.mb_written, '10.1f')} {f(x.mb_read, '9.1f')} "
                    f"{f(x.gflop, '8.2f')} {f(x.syncs, '5d')} {f(x.warmup_s, '9.1f')} {f(x.off_layout, '10d')}")
    return "\n".join(rows)


def compile_table(figures: list[Figure]) -> str:
    """Where each compiled variant's warm-up went, by torch.compile's own timers ('' if none
    compiled)."""
    compiled = [x for x in figures if x.compile_s]
    if not compiled:
        return ""
    c = max([14] + [len(x.case) for x in compiled])
    v = max([17] + [len(x.variant) for x in compiled])
    head = f"{'case':<{c}} {'variant':<{v}} {'warm-up s':>9} " + " ".join(f"{label:>12}" for label, _ in COMPILE_TIMERS)
    rows = ["compile: seconds of torch.compile's timers in the warm-up (nested: inductor holds codegen "
            "and the C++ compile; not additive)", head, "-" * len(head)]
    for x in compiled:
        cells = " ".join("-".rjust(12) if name not in x.compile_s else f"{x.compile_s[name]:12.1f}"
                         for _, name in COMPILE_TIMERS)
        rows.append(f"{x.case:<{c}} {x.variant:<{v}} {x.warmup_s or 0:9.1f} {cells}")
    return "\n".join(rows)


def ratio_table(figures: list[Figure]) -> str:
    """reference figure / variant figure: > 1 means the variant needs less. A case the reference
    does not have (`has_reference`) is divided into nascore's `eager` figure instead."""
    c = max([14] + [len(x.case) for x in figures])
    v = max([17] + [len(x.variant) for x in figures])
    head = (f"{'case':<{c}} {'variant':<{v}} {'base':<9} {'time':>6} {'writing ops':>11} {'kernels':>7} {'bytes':>6} {'moved':>6} "
            f"{'reserved':>8} {'live':>6}")
    rows = ["ratio base / variant (higher is better); base: the reference, or eager where it has no such search",
            head, "-" * len(head)]
    bases = {x.case: x for x in figures if x.variant == "eager"}
    bases.update({x.case: x for x in figures if x.variant == "reference"})

    def r(a: float | int | None, b: float | int | None) -> str:
        return "-" if a is None or b is None or not b else f"{a / b:.2f}x"

    def moved(x: Figure) -> float | None:
        return None if x.mb_written is None or x.mb_read is None else x.mb_written + x.mb_read
    for x in figures:
        base = bases.get(x.case)
        if base is None or base is x:
            continue
        rows.append(f"{x.case:<{c}} {x.variant:<{v}} {base.variant:<9} {r(base.ms_per_step, x.ms_per_step):>6} "
                    f"{r(base.writing_ops, x.writing_ops):>11} {r(base.kernels, x.kernels):>7} {r(base.mb_written, x.mb_written):>6} "
                    f"{r(moved(base), moved(x)):>6} "
                    f"{r(base.peak_reserved_mb, x.peak_reserved_mb):>8} {r(base.live_mb, x.live_mb):>6}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    refusals = {module: module.bf16_layout_problem for module in REFUSING_MODULES}
    try:
        _main(argv)
    finally:
        for module, refusal in refusals.items():       # in-process callers (the tests) get them back
            module.bf16_layout_problem = refusal


def _main(argv: list[str] | None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", choices=SIZES, default=None, help="default: full on CUDA, small on CPU")
    p.add_argument("--cases", default=",".join(DEFAULT_CASES),
                   help=f"comma-separated among {', '.join(CASES)}, any METHOD@SPACE (e.g. single_darts@s3: "
                        f"that search's step, its params as `dvc repro` resolves them) and {MATRIX} (every "
                        f"method on every space the pipeline takes; the reference only where it has the "
                        f"search) and {DATA} (the device data path's batches) "
                        f"(default: {', '.join(DEFAULT_CASES)}; '' for none: the retrain step alone)")
    p.add_argument("--variants", default=None,
                   help="comma-separated; default: reference,eager,fused,fused_dense (+ fused+graph, "
                        "fused+graph+bf16, fused+graph+tuned and the same of fused_dense on CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 10 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3: graph capture)")
    p.add_argument("--count", action=argparse.BooleanOptionalAction, default=None,
                   help="count ops/bytes/syncs of one step (default: on CPU only)")
    p.add_argument("--no-retrain", action="store_true")
    p.add_argument("--retrain-variants", default=None,
                   help="comma-separated, each 'nascore' then modifiers as for --variants (nascore+fused+graph+amp); "
                        "default: nascore, nascore+fused, nascore+fused_dense (+ graph and bf16 ones on CUDA)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one step of each variant without a CUDA graph (search variants "
                        "with one are skipped; a retrain variant's graph is turned off: the same "
                        "kernels): GPU time per kernel on CUDA, self time per aten op on the CPU")
    p.add_argument("--by-op", action="store_true",
                   help="also print each counted variant's writing ops and bytes moved by aten op, "
                        "the most frequent first (the JSON holds them either way)")
    p.add_argument("--by-site", action="store_true",
                   help="also count each search case's writing ops by where they come from (the "
                        "nascore or reference line in a forward, the autograd node in a backward) and "
                        "print the most frequent (slower counts, on CUDA too unless --no-count; for "
                        "nascore's retrain variants, per step: `train`'s runs of two lengths, differenced)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--check", action="store_true",
                   help="build every case's and variant's settings, print the plan and stop, measuring "
                        "nothing (`CHECK=1 bash bench/gpu.sh ...` runs this for every command of a GPU call)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        # the CPU counts ops and bytes: torch's wrong CPU bf16 channels_last dilated-conv weight
        # gradients, for which nascore refuses a real run (`graphs.bf16_layout_problem`), change
        # no count, so the bench's own runs skip that refusal. Not the probe: it also keeps
        # inductor's layout choice off those convs in a compiled NCHW run (`graphs.inductor_options`;
        # without it, the spec-size `nascore+fused_dense+amp+compile` retrain stopped on a NaN)
        for module in REFUSING_MODULES:
            module.bf16_layout_problem = lambda *args, **kwargs: None
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    size = SIZES[args.size or ("full" if cuda else "small")]
    steps = args.steps or (10 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else 3
    count = (not cuda or args.by_site) if args.count is None else args.count
    variants = (args.variants.split(",") if args.variants else
                ["reference", "eager", "fused", "fused_dense"] + (
                    ["fused+graph", "fused+graph+bf16", "fused+graph+tuned", "fused_dense+graph",
                     "fused_dense+graph+bf16", "fused_dense+graph+tuned"]
                    if cuda else []))
    cases: list[str] = []
    data = False
    for c in (c for c in args.cases.split(",") if c):     # a typo fails here, not after minutes of other cases
        if c == DATA:
            data = True
            continue
        if c == MATRIX:
            matrix, refused = matrix_cases(size)
            cases += matrix
            for why in refused:
                print(f"# {MATRIX}: not a search the pipeline runs, {why}")
            continue
        try:
            case_of(c)
        except ValueError as e:
            p.error(str(e))
        cases.append(c)
    unreferenced = [c for c in cases if not has_reference(c)] if "reference" in variants else []
    if unreferenced:
        named = ", ".join(unreferenced) if len(unreferenced) <= 6 else f"{len(unreferenced)} of the {len(cases)} cases"
        print(f"# no reference for {named} (bench/reference.py has {REFERENCE_NAMES}): their ratios are to eager")
    retrain_variants = (args.retrain_variants.split(",") if args.retrain_variants else
                        ["nascore", "nascore+fused", "nascore+fused_dense"] + (
                            ["nascore+graph", "nascore+fused+graph", "nascore+fused+graph+bf16",
                             "nascore+fused_dense+graph", "nascore+fused_dense+graph+bf16"] if cuda else []))
    # a typo fails here, not after minutes of other variants
    for v in variants:
        try:
            if v != "reference":
                speed_options(v)
        except ValueError as e:
            p.error(str(e))
    for v in retrain_variants:
        try:
            if v.split("+")[0] != "nascore":
                raise ValueError(f"unknown retrain variant {v!r}: 'nascore', then a backend and modifiers "
                                 f"joined by '+'")
            if set(SEARCH_CELL_SWITCHES) & set(speed_options(retrain_speed(v))):
                raise ValueError(f"retrain variant {v!r}: 'unmerged', 'grouped', 'chained', 'matmul', 'kindbn' "
                                 f"and 'dp' are search-cell switches; the retrain's evaluation cells have one op "
                                 f"per edge and the recipe's drop-path")
        except ValueError as e:
            p.error(str(e))
    if args.check:
        sys.exit(check(cases, variants, [] if args.no_retrain else retrain_variants, size, data))
    info = machine(device)
    # inductor's C++ kernels record themselves to the profiler (`CountKernels`) when compiled so
    # (its cache keys on the setting)
    with CountKernels.compiling() if count and kernels_countable(device.type) else contextlib.nullcontext():
        _measure_all(args, device, size, steps, warmup, count, cases, variants, retrain_variants, data, info)


def _measure_all(args: argparse.Namespace, device: torch.device, size: Size, steps: int, warmup: int, count: bool,
                 cases: list[str], variants: list[str], retrain_variants: list[str], data: bool,
                 info: Machine) -> None:
    cuda = device.type == "cuda"
    print(f"# search step on {info.device} ({info.gpu or info.cpu}, {info.cores} cores, {info.threads} threads, "
          f"torch {info.torch}), "
          f"{info.date}; size {args.size or ('full' if cuda else 'small')}: {asdict(size)}", flush=True)
    figures: list[Figure] = []
    failures: list[str] = []

    def save() -> None:
        if args.json:                  # atomically: a reader never sees half a file
            tmp = args.json.with_suffix(args.json.suffix + ".tmp")
            tmp.write_text(json.dumps({"machine": asdict(info), "size": asdict(size),
                                       "steps": steps, "warmup": warmup, "failures": failures,
                                       "figures": [asdict(f) for f in figures]}, indent=1))
            tmp.replace(args.json)
    for case, variant in runs_to_measure(cases, variants):
        if variant == "reference":
            make = lambda: reference_step(case, size, device)  # noqa: E731
        else:
            make = lambda: nascore_step(case, size, device, **speed_options(variant))  # noqa: E731
        try:
            fig = measure(case, variant, make, device, warmup, steps, count and countable(variant, device.type),
                          args.profile and "graph" not in variant, sites=args.by_site,
                          kernels=count and kernels_countable(device.type))
        except Exception as e:     # one broken variant must not cost the others' figures
            failures.append(f"{case} {variant}: {type(e).__name__}: {e}")
            print(f"  {case} {variant}: FAILED {failures[-1]}", flush=True)
            traceback.print_exc()
            continue
        finally:
            free(device)
        figures.append(fig)
        save()               # a run cut short by a time limit keeps what it measured
        print(f"  {case} {variant}: {fig.ms_per_step:.1f} ms/step", flush=True)
    if data:
        for fig in data_figures(size, device, warmup, steps, count, failures):
            figures.append(fig)
            save()
            print(f"  {fig.case} {fig.variant}: {fig.ms_per_step:.2f} ms/batch", flush=True)
    if not args.no_retrain:
        for fig in retrain_figures(size, device, warmup, steps, count, retrain_variants, args.profile, failures,
                                   args.by_site):
            figures.append(fig)
            save()
            print(f"  {fig.case} {fig.variant}: {fig.ms_per_step:.1f} ms/step", flush=True)
    print()
    print(table(figures))
    print()
    print(ratio_table(figures))
    searches = search_estimate(figures)
    if searches:
        print(f"\nsearch, 50 CIFAR-10 epochs at these figures (size {args.size or ('full' if cuda else 'small')}; "
              f"validation every epoch; the issue's targets at the full size, steps: DARTS 20 min, NB201 5):")
        for case, variant, steps_min, valid_min, once_min in searches:
            print(f"  {case:<13} {variant:<32} {steps_min + valid_min + once_min:8.1f} min = {steps_min:.1f} min "
                  f"of steps + {valid_min:.1f} min of validation + {once_min:.1f} min once (compile, capture)")
    estimates = retrain_estimate(figures)
    if estimates:
        print(f"\nretrain, 600 CIFAR-10 epochs at these figures (size {args.size or ('full' if cuda else 'small')}; "
              f"the issue's target: 1.5 h in all at the full size):")
        overheads = {x.variant: x.epoch_overhead_ms for x in figures if x.case == "retrain"}
        for variant, train_h, test_h, once_h in estimates:
            extra = overheads.get(variant)
            print(f"  {variant:<40} {train_h + test_h + once_h:7.2f} h = {train_h:.2f} h of training steps "
                  f"+ {test_h:.2f} h of test passes + {once_h:.2f} h once (compile, capture)"
                  + ("" if extra is None else f" (each epoch {extra:.0f} ms besides its steps: graph warm-up, capture)"))
    compiled = compile_table(figures)
    if compiled:
        print(f"\n{compiled}")
    for x in figures:
        if x.profile:
            print(f"\nprofile {x.case} {x.variant}: {x.profile['total_ms']:.1f} ms "
                  f"{'of kernels' if device.type == 'cuda' else 'in aten ops'} in one step; the largest:")
            for name, ms, calls in x.profile["top"][:10]:
                print(f"  {ms:8.2f} ms {ms / x.profile['total_ms']:6.1%} {calls:6d} calls  {name[:90]}")
    if args.by_op:
        for x in figures:
            if x.by_op:
                print(f"\nwriting ops of {x.case} {x.variant} by aten op ({x.writing_ops} in all):")
                for name, calls, mb in x.by_op[:15]:
                    print(f"  {calls:6d} {calls / x.writing_ops:6.1%} {mb:10.1f} MB moved  {name}")
        for x in figures:
            if x.kernels_by_op and not x.by_op:      # a compiled variant: the profiler's count alone
                print(f"\nkernels of {x.case} {x.variant} by aten op ({x.kernels} in all; 'inductor': the C++ "
                      f"kernels its compiled code runs):")
                for name, calls in x.kernels_by_op[:15]:
                    print(f"  {calls:6d} {calls / x.kernels:6.1%}  {name}")
    for x in figures:
        if x.by_site:
            print(f"\nwriting ops of {x.case} {x.variant} by site ({x.writing_ops} in all):")
            for name, site, calls in x.by_site[:25]:
                print(f"  {calls:6d} {calls / x.writing_ops:6.1%}  {name:<28} {site}")
    for failure in failures:
        print(f"FAILED {failure}")
    save()
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
