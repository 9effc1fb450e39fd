"""`python -m stages.compare`: one report comparing finished experiments (methods × seeds).

Not a pipeline stage (nothing in dvc.yaml runs it): it reads experiments that already ran, from
DVC (`dvc exp show` + their cached outputs) and/or the MLflow store, and writes
`reports/<name>/` (report.md, table.csv, summary.csv, claims.csv, figures). See
`nascore/compare.py` and README "Sweeps and comparing methods".

    python -m stages.compare --name nb201 --space nb201 --method darts,rf_darts
    python -m stages.compare --from mlflow          # DVC's experiment refs are gone
    python -m stages.compare --from dirs --runs runs/nb201   # a plain sweep (sweeps/plain.py)
    python -m stages.compare --name pick --method darts_v2 --param retrain.train.epochs=100 --select
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from nascore.compare import DOMINATED_SHARE, SOURCES, CompareError, CompareOptions, Filters, compare


def _list(values: Sequence[str] | None) -> tuple[str, ...]:
    """`--method a,b --method c` -> (a, b, c): the comma form matches `dvc exp run -S method=a,b`."""
    return tuple(v.strip() for item in values or () for v in item.split(",") if v.strip())


def parse_args(argv: Sequence[str] | None = None) -> CompareOptions:
    p = argparse.ArgumentParser(prog="python -m stages.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default="compare", help="report name: reports/NAME and MLflow run compare-NAME")
    p.add_argument("--from", dest="source", choices=SOURCES, default="auto",
                   help="where to read experiments (auto: DVC, plus MLflow for run ids and for "
                        "experiments whose DVC refs are gone; MLflow alone when DVC has none; "
                        "dirs: plain workspace folders, see --runs)")
    p.add_argument("--runs", type=Path, action="append", default=[],
                   help="with --from dirs: a workspace folder, or a folder of them (sweeps/plain.py's "
                        "runs/NAME); repeatable")
    p.add_argument("--out", type=Path, help="report folder (default reports/NAME)")
    p.add_argument("--method", action="append", help="keep these methods (comma-separated or repeated)")
    p.add_argument("--space", action="append", help="keep these search spaces")
    p.add_argument("--dataset", action="append", help="keep these datasets")
    p.add_argument("--profile", action="append", help="keep these profiles (full, smoke)")
    p.add_argument("--seed", action="append", help="keep these seeds")
    p.add_argument("--exp", action="append", help="keep these DVC experiment names")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="keep experiments whose resolved param KEY (dotted, as in dvc exp run -S) is "
                        "VALUE; repeatable")
    p.add_argument("--select", action="store_true",
                   help="DARTS' selection protocol: of the seeds of one setting, pick the cell with the "
                        "best retrained test accuracy; writes selection.md, selection.json and "
                        "selected_genotype.json (a file retrain.genotype accepts) into the report folder")
    p.add_argument("--all-commits", action="store_true",
                   help="experiments of every commit (default: those run from HEAD, as `dvc exp show`)")
    p.add_argument("--nb201-table", help="NB201 accuracy CSV for the lookups (default: each run's "
                                          "evaluate.nb201_table); 'none' to skip")
    p.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else the project's)")
    p.add_argument("--no-mlflow-log", action="store_true", help="do not log the report to MLflow")
    p.add_argument("--dominated-share", type=float, default=DOMINATED_SHARE,
                   help="share of the normal cell the collapse op must fill for a seed to count as "
                        "collapsed (default %(default)s)")
    a = p.parse_args(argv)
    try:
        seeds = tuple(int(s) for s in _list(a.seed))
    except ValueError:
        p.error(f"--seed takes integers, got {a.seed}")
    params = []
    for item in a.param:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            p.error(f"--param takes KEY=VALUE (e.g. retrain.train.epochs=100), got {item!r}")
        params.append((key.strip(), value.strip()))
    filters = Filters(methods=_list(a.method), spaces=_list(a.space), datasets=_list(a.dataset),
                      profiles=_list(a.profile), seeds=seeds, names=_list(a.exp), params=tuple(params))
    return CompareOptions(name=a.name, source=a.source, runs=tuple(a.runs), out=a.out, filters=filters,
                          all_commits=a.all_commits, nb201_table=a.nb201_table,
                          tracking_uri=a.tracking_uri, log_to_mlflow=not a.no_mlflow_log,
                          dominated_share=a.dominated_share, select=a.select)


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(argv)
    try:
        report = compare(options)
    except CompareError as e:
        print(f"nascore compare: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"nascore compare: {len(report.experiments)} experiment(s) in {len(report.groups)} group(s) "
          f"from {report.used} -> {report.markdown}", file=sys.stderr)
    for note in report.notes:
        print(f"nascore compare: note: {note}", file=sys.stderr)
    for verdict in report.verdicts:
        print(f"nascore compare: {verdict.sentence}", file=sys.stderr)
    if report.selection is not None:
        c = report.selection.chosen
        print(f"nascore compare: selected seed {c.seed} ({c.experiment}, retrained test acc. "
              f"{c.accuracy:.2f} % of {len(report.selection.ranked)} candidates) -> "
              f"{report.out_dir / 'selected_genotype.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
