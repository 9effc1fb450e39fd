"""How long dynamo takes to trace a compiled search, and through which Python (issue 4).

    python bench/tracing.py                                  # DARTS first order and NB201, the spec's networks
    python bench/tracing.py --cases darts_second --json out.json

A compiled search (`search.compile`) pays its compile once per run, before its first steps: on
a GPU that is part of the issue's 20-minute DARTS search. Inductor's share (code generation, the
C++/Triton compiles) is cached between runs; dynamo's trace of the fused cells' Python is not,
and it is paid per cell shape and kind of call (a DARTS network: 5 shapes × 3 kinds). This
script measures that share alone, on any machine: each case's supernet compiled cell by cell
with a backend that runs the trace as traced (no AOTAutograd, no inductor), one α step, one
weight step and one validation forward, each kind's first call eager as in a real search.
Tracing depends on the network's structure, not its tensors' sizes: the spec's channels and
cells (`--size full`), on 8-pixel images in batches of 2.

Printed per case: traces, dynamo's seconds (its `_compile.compile_inner`, summed), the
bytecodes its tracer stepped through, and the functions where most were stepped (where to cut).
The step counts come from wrapping a private method of dynamo's tracer; on a torch without it
they are left out and the seconds still come.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # nascore from this checkout
from search_step import SIZES, OneBatch, batches, compile_timers, search_settings  # noqa: E402

from nascore.search import EpochSteps, SearchData, SearchRun  # noqa: E402
from nascore.spaces import get_space  # noqa: E402

TRACE_CASES = ("darts_first", "darts_second", "pc_darts", "nb201")
DEFAULT_CASES = ("darts_first", "nb201")
IMAGE, BATCH = 8, 2          # what tracing does not depend on, as small as the networks take


@contextlib.contextmanager
def counting_steps(counts: collections.Counter) -> Iterator[bool]:
    """Count the bytecodes dynamo's tracer steps through, by (file, function, first line). Yields
    whether it could (the tracer's `step` is private: absent on some torch, nothing counted)."""
    try:
        from torch._dynamo import symbolic_convert
        tracer = symbolic_convert.InstructionTranslatorBase
        original = tracer.step
    except (ImportError, AttributeError):
        yield False
        return

    def step(self: Any) -> Any:
        code = self.f_code
        counts[(Path(code.co_filename).name, code.co_name, code.co_firstlineno)] += 1
        return original(self)
    tracer.step = step
    try:
        yield True
    finally:
        tracer.step = original


def dynamo_seconds() -> list[float]:
    """The seconds of each dynamo compile so far (torch.compile's own timer, `compile_timers`)."""
    return list(compile_timers().get("_compile.compile_inner", []))


def trace_case(case: str, size: str, backend: str, top: int) -> dict[str, Any]:
    """Trace `case` (one of `TRACE_CASES`: each traces its validation forward too) at `size`'s
    channels and cells (see the module's docstring)."""
    space, cfg, _ = search_settings(case, SIZES[size], backend=backend)
    traces: list[int] = []

    def run_as_traced(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        traces.append(len(gm.graph.nodes))
        return gm.forward
    torch.manual_seed(0)
    run = SearchRun(get_space(space), cfg, SearchData(None, None, 10), log=lambda s: None)
    run.model.compile("cells", backend=run_as_traced)
    data = batches(2, BATCH, IMAGE, 10, torch.device("cpu"))
    run.data.val = OneBatch(data[0])
    torch._dynamo.reset()
    before = len(dynamo_seconds())
    counts: collections.Counter = collections.Counter()
    start = time.perf_counter()
    with counting_steps(counts) as counted:
        run.model.train()
        steps = EpochSteps(run, run.step_context(0), update_arch=True)
        for _ in range(2):                 # each kind's first call eager, the second traced
            steps.step(data[0], data[1])
        for _ in range(2):
            run.validate()
    wall = time.perf_counter() - start
    seconds = dynamo_seconds()[before:]
    by_function = [{"file": f, "function": n, "line": line, "bytecodes": c}
                   for (f, n, line), c in counts.most_common(top)]
    by_file: collections.Counter = collections.Counter()
    for (f, _, _), c in counts.items():
        by_file[f] += c
    return {"case": case, "size": size, "backend": backend, "traces": len(traces),
            "graph_nodes": sum(traces), "dynamo_s": round(sum(seconds), 2),
            "per_trace_s": round(sum(seconds) / max(len(seconds), 1), 2), "wall_s": round(wall, 2),
            "bytecodes": sum(counts.values()) if counted else None, "top": by_function,
            "by_file": dict(by_file.most_common())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES),
                        help=f"comma-separated, among {', '.join(TRACE_CASES)} (default: %(default)s)")
    parser.add_argument("--size", default="full", choices=sorted(SIZES),
                        help="the channels and cells of bench/search_step.py's sizes (default: %(default)s)")
    parser.add_argument("--backend", default="fused_dense", choices=("fused", "fused_dense"),
                        help="the fused backend traced (default: %(default)s)")
    parser.add_argument("--top", type=int, default=12, help="functions listed per case (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in TRACE_CASES]
    if unknown or not cases:
        parser.error(f"unknown case(s) {', '.join(unknown) or '(none)'}; the cases are {', '.join(TRACE_CASES)}")
    results = [trace_case(c, args.size, args.backend, args.top) for c in cases]
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, size {args.size}, "
          f"backend {args.backend}: dynamo's trace of a compiled search (no inductor)")
    print(f"{'case':<14}{'traces':>7}{'graph nodes':>13}{'dynamo s':>10}{'s/trace':>9}{'bytecodes':>12}")
    for r in results:
        codes = f"{r['bytecodes']:,}" if r["bytecodes"] is not None else "n/a"
        print(f"{r['case']:<14}{r['traces']:>7}{r['graph_nodes']:>13,}{r['dynamo_s']:>10}{r['per_trace_s']:>9}{codes:>12}")
    for r in results:
        if r["top"]:
            print(f"\n{r['case']}: where the tracer stepped most")
            for t in r["top"]:
                print(f"  {t['bytecodes']:>9,}  {t['file']}:{t['line']} {t['function']}")
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
