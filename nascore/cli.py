"""Running a stage from the command line: params in, a clear one-line error out.

Bad input (params, data, genotypes, checkpoints, benchmark tables) and environmental failures
(disk full, non-finite training) end the stage with exit status 2 and one message saying what was
wrong and what is allowed, never a traceback from deep inside. Anything else is a bug in nascore
and keeps its traceback.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from typing import Sequence

from .benchmarks import BenchmarkTableError
from .config import STAGE_PARAMS, ConfigError, load_params, resolve, resolve_stage
from .data import DatasetError
from .genotype import GenotypeError
from .io import CheckpointError, OutputError
from .registry import UnknownNameError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DatasetError, GenotypeError, CheckpointError, OutputError, BenchmarkTableError,
    UnknownNameError)


def _late_errors() -> tuple[type[BaseException], ...]:
    # imported when needed: these modules pull in most of torch's stack
    from .pipeline import MissingInputError, ScratchBusyError
    from .search import NonFiniteError
    from .train import NonFiniteLossError
    return MissingInputError, ScratchBusyError, NonFiniteError, NonFiniteLossError


def stage_parser(stage: str) -> argparse.ArgumentParser:
    """A stage takes no arguments: params.yaml says everything. `--help` says so and where to look."""
    return argparse.ArgumentParser(
        prog=f"python -m stages.{stage}",
        description=f"Run the pipeline's {stage!r} stage with the params in ./params.yaml (run from the "
                    f"project root; `dvc repro {stage}` runs it with its upstream stages). It reads the "
                    f"params {', '.join(STAGE_PARAMS[stage])}; see README.md, Parameters.",
        epilog="Environment: NASCORE_TRACKING=off disables MLflow, MLFLOW_TRACKING_URI picks its backend, "
               "NASCORE_DEVICE picks the device.")


def run_stage(stage: str, argv: Sequence[str] | None = None) -> None:
    """Resolve params.yaml for `stage`, run it tracked, write metrics/<stage>.json; exit 2 on bad input.
    `argv`: the command line's arguments (none are taken: `--help` is answered, others refused)."""
    stage_parser(stage).parse_args(list(argv or []))
    from . import distributed as D
    from .pipeline import Paths, STAGES, finish_stage, start_tracking

    try:
        params = load_params()
        # Every section is validated before any work, so a typo in retrain.* stops the pipeline at
        # its first stage, not after the search; the stage then uses only its declared sections.
        resolve(params)
        run = resolve_stage(stage, params)
        paths = Paths.here()
        with start_tracking(stage, run) as tracker:
            metrics = STAGES[stage](run, paths, tracker)
            if D.rank() == 0:
                if metrics is not None:
                    # "final/": the per-epoch series of the same names keep their own steps
                    tracker.log_metrics({f"final/{k}": v for k, v in metrics.items()
                                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
                try:
                    finish_stage(paths, stage, metrics)
                except OutputError:
                    # metrics are written last; without them the outputs must not look finished
                    # (the checkpoints stay: the rerun resumes)
                    shutil.rmtree(paths.out(stage), ignore_errors=True)
                    raise
    except USER_ERRORS + _late_errors() as e:
        print(f"nascore {stage}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"nascore {stage}: interrupted; rerun to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)
