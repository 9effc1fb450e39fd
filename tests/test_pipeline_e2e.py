"""The pipeline as users run it: `dvc exp run`, `dvc exp show`, `dvc plots`, MLflow, a remote.

One smoke experiment (NB201 space, OPP-DARTS) runs once for the module through the real `dvc`
CLI in a temporary git repository; the tests read what it left behind.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from nascore.genotype import NB201Genotype
from tests.e2e import Repo, make_repo, set_params

pytestmark = pytest.mark.slow
SHARED_TABLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "nb201-accuracy.csv"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Repo:
    repo = make_repo(tmp_path_factory.mktemp("e2e") / "project")
    repo.dvc("exp", "run", "-n", "smoke-opp", "-S", "profile=smoke", "-S", "space=nb201",
             "-S", "method=opp_darts", timeout=900)
    return repo


def test_every_stage_published_its_outputs_and_metrics(project):
    root = project.root
    for stage in ("prepare", "search", "derive", "retrain", "transfer_imagenet", "evaluate"):
        assert (root / "outputs" / stage).is_dir(), stage
        assert not list((root / "outputs").glob(f".{stage}.tmp-*")), "no half-published folders"
    for stage in ("search", "derive", "retrain", "transfer_imagenet", "evaluate"):
        assert json.loads((root / "metrics" / f"{stage}.json").read_text()), stage
    genotype = json.loads((root / "outputs" / "derive" / "genotype.json").read_text())
    assert genotype["type"] == "nb201_cell"
    derived = json.loads((root / "metrics" / "derive.json").read_text())
    assert derived["input_reaches_output"] == NB201Genotype.from_arch_string(genotype["arch"]).input_reaches_output()
    # NB201 cells have no ImageNet network: the stage records that it was skipped
    skipped = json.loads((root / "outputs" / "transfer_imagenet" / "skipped.json").read_text())
    assert skipped["skipped"] is True and "NB201" in skipped["reason"]
    assert (root / "outputs" / "derive" / "cells" / "cell.dot").exists()
    assert (root / "outputs" / "search" / "log.csv").read_text().startswith("epoch,")
    assert not list((root / "scratch").glob("*/*")), "scratch checkpoints are removed after success"


def test_resolved_params_are_saved_with_the_outputs(project):
    cfg = json.loads((project.root / "outputs" / "search" / "config.json").read_text())
    assert cfg["method"] == "opp_darts" and cfg["space"] == "nb201" and cfg["profile"] == "smoke"
    assert cfg["search"]["op_schedule"] == "progressive" and cfg["search"]["nesterov"] is True
    alphas = json.loads((project.root / "outputs" / "search" / "alphas.json").read_text())
    assert (alphas["method"], alphas["space"], alphas["seed"]) == ("opp_darts", "nb201", cfg["seed"])


def test_exp_show_lists_the_experiment_with_params_and_metrics(project):
    show = json.loads(project.dvc("exp", "show", "--json").stdout)
    text = json.dumps(show)
    assert "smoke-opp" in text
    assert "param_free_ops" in text and "opp_darts" in text


def test_plots_render(project, tmp_path):
    project.dvc("plots", "show", "-o", str(tmp_path / "plots"))
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "Parameter-free ops" in html and "Search loss" in html
    assert any(p.name.endswith("alpha_evolution.png") for p in (tmp_path / "plots" / "static").iterdir())


@pytest.mark.skipif(not SHARED_TABLE.exists(), reason="../shared/data/nb201-accuracy.csv absent")
def test_evaluate_looked_the_cell_up_in_the_nb201_table(project):
    metrics = json.loads((project.root / "metrics" / "evaluate.json").read_text())
    assert 0 < metrics["nb201_cifar10"] <= 94.38
    assert {"nb201_cifar100", "nb201_imagenet16"} <= set(metrics)


def test_mlflow_holds_one_parent_run_with_a_nested_run_per_stage(project):
    mlflow = pytest.importorskip("mlflow")
    client = mlflow.MlflowClient(tracking_uri=project.tracking_uri)
    exp = client.get_experiment_by_name("nascore")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_name for p in parents] == ["smoke-opp"]
    parent = parents[0]
    assert parent.data.tags["method"] == "opp_darts" and parent.data.tags["space"] == "nb201"
    assert parent.data.tags["seed"] == "2" and parent.data.tags.get("git_commit") or \
        any("commit" in k for k in parent.data.tags)
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"prepare", "search", "derive", "retrain", "transfer_imagenet", "evaluate"}
    search = children["search"]
    assert search.data.params["search.op_schedule"] == "progressive"
    history = client.get_metric_history(search.info.run_id, "param_free_ops")
    assert [m.step for m in history] == [1, 2]
    assert {"alpha_entropy", "train_loss"} <= set(search.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(children["derive"].info.run_id)}
    assert {"genotype.json", "alphas.png", "alpha_evolution.png"} <= artifacts
    assert "model.pt" in {a.path for a in client.list_artifacts(children["retrain"].info.run_id)}
    assert "param_free_ops" in parent.data.metrics


def test_a_retrain_param_reruns_retrain_but_not_the_search(project):
    status = json.loads(project.dvc("status", "--json").stdout)
    assert set(status) <= {"evaluate"}, status          # evaluate: always changed, by design
    params = project.root / "params.yaml"
    before = params.read_text()
    try:
        set_params(project, **{"retrain.cutout": 2})
        status = json.loads(project.dvc("status", "--json").stdout)
        assert "retrain" in status and "search" not in status and "prepare" not in status
    finally:
        params.write_text(before)


def test_push_clone_pull_finds_nothing_to_recompute(project, tmp_path):
    remote = tmp_path / "remote"
    project.dvc("remote", "add", "-f", "-d", "local", str(remote))
    project.git("add", "-A")
    project.git("commit", "-q", "-m", "smoke results")
    project.dvc("push")
    clone = Repo(tmp_path / "clone", dict(project.env))
    shared = project.root.parent / "shared"          # the clone sits beside shared/ too
    if shared.exists():
        (tmp_path / "shared").symlink_to(shared.resolve())
    project.run("git", "clone", "-q", str(project.root), str(clone.root), cwd=tmp_path)
    clone.dvc("pull")
    assert (clone.root / "outputs" / "retrain" / "model.pt").read_bytes() == \
        (project.root / "outputs" / "retrain" / "model.pt").read_bytes()
    status = json.loads(clone.dvc("status", "--json").stdout)
    assert set(status) <= {"evaluate"}, status
    out = clone.dvc("repro").stdout
    for stage in ("prepare", "search", "derive", "retrain", "transfer_imagenet"):
        assert f"'{stage}' didn't change" in out, out
    assert clone.git("status", "--porcelain").stdout.strip() == "", "repro changed nothing"
    shutil.rmtree(clone.root / "scratch", ignore_errors=True)


def test_retrain_runs_under_torchrun_with_two_processes(project):
    """The same entry point with N processes: DDP over gloo on CPU, rank 0 alone writes."""
    ddp = Repo(project.root, {**project.env, "NASCORE_DEVICE": "cpu", "OMP_NUM_THREADS": "1"})
    before = (project.root / "metrics" / "retrain.json").read_text()
    mlflow = pytest.importorskip("mlflow")
    client = mlflow.MlflowClient(tracking_uri=project.tracking_uri)
    experiment = client.get_experiment_by_name("nascore").experiment_id

    def retrain_runs() -> int:
        return len(client.search_runs([experiment], "attributes.run_name = 'retrain'"))
    runs_before = retrain_runs()
    result = ddp.run(sys.executable, "-m", "torch.distributed.run", "--standalone",
                     "--nproc_per_node", "2", "-m", "stages.retrain", timeout=600)
    assert result.returncode == 0
    epochs = [line for line in result.stderr.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2, "one log line per epoch: only rank 0 reports"
    metrics = json.loads((project.root / "metrics" / "retrain.json").read_text())
    assert metrics["epochs"] == 2 and metrics["top1"] is not None
    assert (project.root / "outputs" / "retrain" / "model.pt").exists()
    assert retrain_runs() == runs_before + 1, "one MLflow run for the stage, not one per rank"
    (project.root / "metrics" / "retrain.json").write_text(before)
