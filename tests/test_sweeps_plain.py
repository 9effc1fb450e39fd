"""sweeps/plain.py (a params grid as plain stage commands) and `compare --from dirs` reading it."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nascore.compare import CompareError, Filters, collect_dirs
from tests.test_compare import ALL_SKIP, BEST, nb201_table

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "NASCORE_TRACKING": "off", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def workspace(folder: Path, method: str, seed: int, arch: str | None, finished: bool = True) -> Path:
    """A hand-made workspace: what the stages leave behind when run as plain commands."""
    (folder / "metrics").mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(
        {"method": method, "space": "nb201", "dataset": "cifar10", "seed": seed, "profile": "full",
         "search": {"epochs": "auto"}}))
    if finished:
        (folder / "metrics" / "search.json").write_text(json.dumps(
            {"search_seconds": 60.0, "epochs": 2, "param_free_ops": 3}))
        (folder / "outputs" / "search").mkdir(parents=True)
        (folder / "outputs" / "search" / "history.json").write_text(json.dumps(
            [{"epoch": 1, "param_free_ops": 6, "train_loss": 2.0}, {"epoch": 2, "param_free_ops": 5,
                                                                    "train_loss": 1.5}]))
        (folder / "outputs" / "search" / "config.json").write_text(json.dumps({"search": {"epochs": 2}}))
    if arch is not None:
        (folder / "metrics" / "derive.json").write_text(json.dumps({"arch": arch}))
        (folder / "outputs" / "derive").mkdir(parents=True)
        (folder / "outputs" / "derive" / "genotype.json").write_text(json.dumps(
            {"type": "nb201_cell", "arch": arch}))
    return folder


def test_collect_dirs_reads_params_metrics_series_and_cells(tmp_path):
    sweep = tmp_path / "runs" / "s"
    workspace(sweep / "a", "darts", 1, ALL_SKIP)
    workspace(sweep / "b", "opp_darts", 1, BEST)
    workspace(sweep / "c", "darts", 2, None, finished=False)          # still running / failed
    got = collect_dirs([sweep], Filters())
    by_name = {e.name: e for e in got.experiments}
    assert set(by_name) == {"s/a", "s/b"}
    a = by_name["s/a"]
    assert (a.method, a.space, a.seed, a.source) == ("darts", "nb201", 1, "dirs")
    assert a.genotype == {"type": "nb201_cell", "arch": ALL_SKIP}
    assert a.series["param_free_ops"] == [6, 5]
    assert a.metrics["search_seconds"] == 60.0
    assert a.params["search.epochs"] == "2", "the resolved value overrides params.yaml's auto"
    assert any("s/c" in n for n in got.notes), got.notes
    only = collect_dirs([sweep / "b"], Filters(methods=("opp_darts",)))     # one workspace, filtered
    assert [e.name for e in only.experiments] == ["s/b"]
    with pytest.raises(CompareError, match="no such folder"):
        collect_dirs([tmp_path / "nope"], Filters())


def test_compare_from_dirs_builds_the_report_with_nb201_lookups(tmp_path):
    sweep = tmp_path / "runs" / "s"
    for seed, arch in ((1, ALL_SKIP), (2, BEST)):
        workspace(sweep / f"darts-{seed}", "darts", seed, arch)
    table = nb201_table(tmp_path / "nb201.csv")
    run("-m", "stages.compare", "--from", "dirs", "--runs", str(sweep), "--name", "plain",
        "--out", str(tmp_path / "report"), "--nb201-table", str(table), "--no-mlflow-log")
    rows = list(csv.DictReader(open(tmp_path / "report" / "table.csv")))
    assert sorted(float(r["nb201_cifar10"]) for r in rows) == [54.30, 94.37]
    assert all(r["source"] == "dirs" for r in rows)
    summary = list(csv.DictReader(open(tmp_path / "report" / "summary.csv")))
    assert len(summary) == 1 and summary[0]["seeds"] == "2" and summary[0]["seed_list"] == "1 2"
    report = (tmp_path / "report" / "report.md").read_text()
    assert "**Short searches**: some runs searched 2 epoch(s), the papers 50" in report
    assert "| search epochs |" in report and summary[0]["search_epochs_mean"] == "2.0"
    bad = run("-m", "stages.compare", "--from", "dirs", "--name", "x", "--no-mlflow-log", check=False)
    assert bad.returncode == 2 and "--from dirs needs --runs" in bad.stderr


@pytest.mark.slow
def test_plain_sweep_runs_the_grid_resumes_and_feeds_compare(tmp_path):
    runs = tmp_path / "runs"
    args = ("sweeps/plain.py", "--runs", str(runs), "--name", "g", "--set", "profile=smoke",
            "--set", "space=nb201", "--set", "method=darts,opp_darts", "--set", "seed=1", "--jobs", "2")
    out = run(*args).stdout
    assert "2 experiment(s), 2 to run" in out
    for name in ("method-darts", "method-opp_darts"):
        ws = runs / "g" / name
        params = yaml.safe_load((ws / "params.yaml").read_text())
        assert params["method"] == name.split("-")[1] and params["seed"] == 1 and params["space"] == "nb201"
        assert json.loads((ws / "metrics" / "derive.json").read_text())["arch"].startswith("|")
        assert (ws / "outputs" / "search" / "history.json").is_file()
    status = json.loads((runs / "g" / "sweep.json").read_text())
    assert [e["returncode"] for e in status["experiments"]] == [0, 0]
    again = run(*args).stdout                                   # finished experiments are skipped
    assert "0 to run" in again and again.count("done before") == 2
    run("-m", "stages.compare", "--from", "dirs", "--runs", str(runs / "g"), "--name", "g",
        "--out", str(tmp_path / "report"), "--nb201-table", "none", "--no-mlflow-log")
    rows = list(csv.DictReader(open(tmp_path / "report" / "table.csv")))
    assert sorted(r["method"] for r in rows) == ["darts", "opp_darts"]
    assert all(r["genotype"].startswith("|") for r in rows)


def test_the_short_search_threshold_is_the_search_default():
    from nascore.compare import SPEC_SEARCH_EPOCHS
    from nascore.search import SearchConfig
    assert SearchConfig.__dataclass_fields__["epochs"].default == SPEC_SEARCH_EPOCHS


def test_plain_sweep_reports_a_failed_experiment_and_exits_1(tmp_path):
    # valid params, but `search` without `prepare`'s outputs: the failure happens in the stage
    proc = run("sweeps/plain.py", "--runs", str(tmp_path), "--name", "bad", "--set", "profile=smoke",
               "--stages", "search", check=False)
    assert proc.returncode == 1
    assert "FAILED in search" in proc.stdout
    log = (tmp_path / "bad" / "run" / "log.txt").read_text()
    assert "prepare" in log and "Traceback" not in log


def test_plain_sweep_refuses_bad_params_before_any_experiment_runs(tmp_path):
    for sets, message in ((["method=darts,no_such_method"], "method=no_such_method: params.yaml: method="),
                          (["search.epoch=3"], r"unknown key\(s\) search.epoch")):
        proc = run("sweeps/plain.py", "--runs", str(tmp_path), "--name", "typo", "--set", "profile=smoke",
                   *[a for s in sets for a in ("--set", s)], check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert __import__("re").search(message, proc.stderr), proc.stderr
        assert not (tmp_path / "typo").exists(), "nothing ran, no folder was made"
    bad = run("sweeps/plain.py", "--runs", str(tmp_path), "--set", "method", check=False)
    assert bad.returncode != 0 and "--set takes key=value" in bad.stderr
