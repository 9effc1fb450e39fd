"""A methods × seeds grid run as plain stage commands: for machines without DVC (a lent GPU box,
a cluster node). The DVC queue (README "Sweeps and comparing methods") is the usual way; this is
the same pipeline, stage by stage, one workspace folder per experiment.

    python sweeps/plain.py --name nb201 --set space=nb201 --set method=darts,rf_darts \\
        --set seed=1,2,3 --stages prepare,search,derive --jobs 4
    python -m stages.compare --from dirs --runs runs/nb201 --name nb201

`--set key=a,b` takes the form of `dvc exp run -S` (dotted keys, comma-separated values; several
`--set` flags make a grid). Each experiment gets `runs/NAME/<values>/` holding its params.yaml
(the project's, with the overrides), `outputs/`, `metrics/` and `log.txt`; the stages run there
with the project on PYTHONPATH, their resumable checkpoints in the project's scratch/ as usual.
`prepare` runs one experiment at a time (the dataset archive is extracted once into a shared
cache), the later stages `--jobs` at a time. An experiment whose last stage's metrics exist is
skipped, so a rerun resumes a sweep, and a rerun with other fixed `--set` values (e.g. a slower
but safer backend) redoes only the experiments that failed. `runs/NAME/sweep.json` records each
experiment's overrides, exit status and seconds.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("prepare", "search", "derive", "retrain", "transfer_imagenet", "evaluate")


@dataclass
class Outcome:
    name: str
    overrides: dict[str, str]
    returncode: int | None = None
    failed_stage: str | None = None
    seconds: float = 0.0
    skipped: bool = False


def parse_sets(values: Sequence[str]) -> list[tuple[str, list[str]]]:
    sets = []
    for item in values:
        key, sep, rest = item.partition("=")
        if not sep or not key or not rest:
            raise SystemExit(f"plain.py: error: --set takes key=value[,value...], got {item!r}")
        sets.append((key.strip(), [v.strip() for v in rest.split(",") if v.strip()]))
    return sets


def grid(sets: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    keys = [k for k, _ in sets]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in sets))]


def experiment_name(overrides: dict[str, str], varying: Sequence[str]) -> str:
    parts = [f"{k.split('.')[-1]}-{overrides[k]}" for k in varying] or ["run"]
    return "_".join(parts).replace("/", "-")


def set_param(params: dict[str, Any], dotted: str, value: str) -> None:
    """`a.b=v` into the params mapping, typed as YAML reads it (so `seed=3` is an int)."""
    *sections, leaf = dotted.split(".")
    node = params
    for s in sections:
        node = node.setdefault(s, {})
        if not isinstance(node, dict):
            raise SystemExit(f"plain.py: error: {dotted}: {s!r} is not a section of params.yaml")
    node[leaf] = yaml.safe_load(value)


def check_params(params: dict[str, Any], overrides: dict[str, str]) -> str | None:
    """nascore's own validation of one experiment's params, as its stages will run it (paths
    relative to the project root); the error, or None. A typo in --set fails here, before any
    experiment starts, not in every experiment's log."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from nascore import config as C
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        C.resolve(params)
    except C.ConfigError as e:
        given = " ".join(f"{k}={v}" for k, v in overrides.items()) or "no --set"
        return f"{given}: {e}"
    finally:
        os.chdir(cwd)
    return None


def run_stage(stage: str, folder: Path, env: dict[str, str]) -> int:
    with open(folder / "log.txt", "a", encoding="utf-8") as logf:
        logf.write(f"\n=== {stage} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        logf.flush()
        return subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=folder, env=env,
                              stdout=logf, stderr=subprocess.STDOUT).returncode


def run_stages(outcome: Outcome, stages: Sequence[str], folder: Path, env: dict[str, str]) -> Outcome:
    t0 = time.perf_counter()
    for stage in stages:
        outcome.returncode = run_stage(stage, folder, env)
        if outcome.returncode != 0:
            outcome.failed_stage = stage
            break
    outcome.seconds += time.perf_counter() - t0
    return outcome


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default="sweep", help="runs/NAME holds the experiments")
    p.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                   help="a params.yaml override, as dvc exp run -S; several values make a grid")
    p.add_argument("--stages", default="prepare,search,derive",
                   help=f"comma-separated, in pipeline order, among {', '.join(STAGES)}")
    p.add_argument("--jobs", type=int, default=1, help="experiments at a time after prepare")
    p.add_argument("--runs", type=Path, default=ROOT / "runs", help="parent folder of the sweeps")
    a = p.parse_args(argv)
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        p.error(f"--stages: unknown {bad or 'none given'}; allowed: {', '.join(STAGES)}")
    if a.jobs < 1:
        p.error("--jobs must be at least 1")
    sets = parse_sets(a.set)
    varying = [k for k, v in sets if len(v) > 1]
    base = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    sweep = a.runs / a.name
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

    todo: list[tuple[Outcome, Path]] = []
    planned: list[tuple[dict[str, Any], Path]] = []
    outcomes: list[Outcome] = []
    for overrides in grid(sets):
        outcome = Outcome(experiment_name(overrides, varying), overrides)
        folder = sweep / outcome.name
        outcomes.append(outcome)
        if (folder / "metrics" / f"{stages[-1]}.json").is_file():
            outcome.skipped, outcome.returncode = True, 0
            continue
        params = json.loads(json.dumps(base))
        for k, v in overrides.items():
            set_param(params, k, v)
        problem = check_params(params, overrides)
        if problem:
            p.error(problem)
        planned.append((params, folder))
        todo.append((outcome, folder))
    for params, folder in planned:          # only once every experiment's params are valid
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    print(f"plain sweep {sweep}: {len(outcomes)} experiment(s), {len(todo)} to run "
          f"({', '.join(stages)}), {a.jobs} at a time", flush=True)

    first, rest = stages[:1], stages[1:]
    if first == ["prepare"]:
        for outcome, folder in todo:         # one at a time: a shared archive cache
            run_stages(outcome, first, folder, env)
    else:
        rest = stages
    ready = [(o, f) for o, f in todo if o.returncode in (None, 0)]
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        list(pool.map(lambda of: run_stages(of[0], rest, of[1], env), ready))

    for o in outcomes:
        state = ("done before" if o.skipped else "ok" if o.returncode == 0
                 else f"FAILED in {o.failed_stage} (exit {o.returncode}; see {sweep / o.name / 'log.txt'})")
        print(f"  {o.name}: {state} [{o.seconds:.0f} s]", flush=True)
    (sweep / "sweep.json").write_text(json.dumps({"stages": stages, "experiments": [asdict(o) for o in outcomes]},
                                                 indent=1), encoding="utf-8")
    return 0 if all(o.returncode == 0 for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
