"""nascore/selection.py: DARTS' selection protocol over finished experiments, and
`compare --select` / `--param` that run it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from nascore import config as C
from nascore.compare import CompareError, CompareOptions, Filters, compare, group_experiments
from nascore.genotype import resolve_genotype
from nascore.selection import select_cell, write_selection
from tests._params import default_params
from tests.test_compare import darts_cell, experiment
from tests.test_sweeps_plain import run

CELLS = {1: darts_cell("sep_conv_3x3"), 2: darts_cell("dil_conv_5x5"), 3: darts_cell("skip_connect"),
         4: darts_cell("sep_conv_5x5")}


def candidate(seed: int, acc: float | None, epochs: int = 100, method: str = "darts_v2", **kw):
    metrics = {} if acc is None else {"retrain_acc": acc, "retrain_epochs": epochs}
    return experiment(method, seed, space="darts", genotype=CELLS[seed], metrics=metrics, **kw)


def test_the_best_retrained_cell_wins_ties_to_the_lower_seed(tmp_path):
    exps = [candidate(1, 96.1), candidate(2, 96.9), candidate(3, None), candidate(4, 96.9)]
    sel = select_cell(group_experiments(exps))
    assert [c.seed for c in sel.ranked] == [2, 4, 1]          # 2 and 4 tie: the lower seed first
    assert sel.chosen.seed == 2 and sel.chosen.genotype == CELLS[2]
    assert sel.unfinished == ("darts_v2-darts-3",)
    json_path, genotype_path, md_path = write_selection(sel, tmp_path)
    data = json.loads(json_path.read_text())
    assert data["chosen"]["seed"] == 2 and [c["seed"] for c in data["candidates"]] == [2, 4, 1]
    assert data["unfinished"] == ["darts_v2-darts-3"]
    # the chosen cell as a file retrain.genotype takes, checked by the config as a run would
    assert resolve_genotype(str(genotype_path)).to_json() == CELLS[2]
    run_ = C.resolve({**default_params(tmp_path), "retrain": {"genotype": str(genotype_path)}})
    assert run_.retrain.genotype == str(genotype_path)
    text = md_path.read_text()
    assert "**Chosen: seed 2**" in text and "| 1 | 2 | darts_v2-darts-2 | 96.90 | 100 |" in text
    assert "Not ranked (no retrained accuracy or genotype): darts_v2-darts-3" in text


def test_selection_refuses_what_is_not_one_setting_of_seeds():
    with pytest.raises(CompareError, match="(?s)no experiment has a retrained accuracy.*retrain.train.epochs=100"):
        select_cell(group_experiments([candidate(1, None), candidate(2, None)]))
    two_methods = [candidate(1, 96.0), candidate(2, 97.0, method="darts")]
    with pytest.raises(CompareError, match=r"these experiments form 2: darts .*; darts_v2 .*--param KEY=VALUE"):
        select_cell(group_experiments(two_methods))
    # epochs that the params do not tell apart (e.g. read from MLflow without them) are caught too
    mixed = [candidate(1, 96.0, epochs=100), candidate(2, 97.0, epochs=600)]
    with pytest.raises(CompareError, match=r"retrained for different numbers of epochs \(100, 600\)"):
        select_cell(group_experiments(mixed))


def test_param_filter_compares_resolved_values_by_value():
    f = Filters(params=(("retrain.train.epochs", "100"),))
    assert f.accepts_params({"retrain.train.epochs": "100"})
    assert f.accepts_params({"retrain.train.epochs": "100.0"})
    assert not f.accepts_params({"retrain.train.epochs": "600"})
    assert not f.accepts_params({"retrain.train.epochs": "auto"})
    assert not f.accepts_params({})
    assert Filters(params=(("method", "darts"),)).accepts_params({"method": "darts"})
    assert f.describe() == "retrain.train.epochs=100"


def _workspace(folder: Path, seed: int, top1: float, epochs: int) -> None:
    """A plain workspace whose search, derive and retrain stages have finished."""
    (folder / "metrics").mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(
        {"method": "darts_v2", "space": "darts", "dataset": "cifar10", "seed": seed, "profile": "full",
         "retrain": {"train": {"epochs": epochs}}}))
    (folder / "metrics" / "search.json").write_text(json.dumps({"search_seconds": 60.0, "epochs": 50}))
    (folder / "metrics" / "retrain.json").write_text(json.dumps({"top1": top1, "epochs": epochs}))
    for stage, name, data in (("search", "history.json", [{"epoch": 1, "param_free_ops": 2}]),
                              ("derive", "genotype.json", CELLS[seed])):
        (folder / "outputs" / stage).mkdir(parents=True)
        (folder / "outputs" / stage / name).write_text(json.dumps(data))


def test_compare_select_picks_among_the_short_retrains(tmp_path):
    sweep = tmp_path / "runs" / "pick"
    for seed, top1 in ((1, 0.961), (2, 0.958), (3, 0.966), (4, 0.949)):
        _workspace(sweep / f"short-{seed}", seed, top1, 100)
    _workspace(sweep / "final-3", 3, 0.972, 600)          # the chosen cell's full training, done before
    base = ["-m", "stages.compare", "--from", "dirs", "--runs", str(sweep), "--no-mlflow-log", "--select"]
    mixed = run(*base, "--name", "x", "--out", str(tmp_path / "x"), check=False)
    assert mixed.returncode == 2 and "these experiments form 2" in mixed.stderr
    assert "retrain.train.epochs=100" in mixed.stderr and "retrain.train.epochs=600" in mixed.stderr
    ok = run(*base, "--name", "pick", "--out", str(tmp_path / "pick"), "--param", "retrain.train.epochs=100")
    assert "selected seed 3 (pick/short-3, retrained test acc. 96.60 % of 4 candidates)" in ok.stderr
    chosen = json.loads((tmp_path / "pick" / "selected_genotype.json").read_text())
    assert chosen == CELLS[3]
    ranking = json.loads((tmp_path / "pick" / "selection.json").read_text())
    assert [c["seed"] for c in ranking["candidates"]] == [3, 1, 2, 4]
    none = run(*base, "--name", "n", "--out", str(tmp_path / "n"), "--param", "retrain.train.epochs=7",
               check=False)
    assert none.returncode == 2 and "no finished experiment has retrain.train.epochs=7" in none.stderr
    bad = run(*base, "--name", "b", "--param", "epochs", check=False)
    assert bad.returncode == 2 and "--param takes KEY=VALUE" in bad.stderr


def test_compare_without_select_writes_no_selection(tmp_path):
    sweep = tmp_path / "runs" / "s"
    _workspace(sweep / "a", 1, 0.96, 100)
    report = compare(CompareOptions(name="s", source="dirs", runs=(sweep,), out=tmp_path / "r",
                                    log_to_mlflow=False), root=tmp_path)
    assert report.selection is None and not (tmp_path / "r" / "selection.json").exists()


@pytest.mark.slow
def test_selection_sweep_ranks_the_seeds_then_trains_the_chosen_cell_from_the_run_cache(tmp_path):
    """sweeps/darts_selection.sh at smoke size through DVC's real queue: two candidates, the
    selection, and the chosen seed rerun with a longer retrain whose search is not run again."""
    import subprocess

    from tests.e2e import make_repo

    repo = make_repo(tmp_path / "project")
    env = dict(repo.env, PROFILE="smoke", METHOD="darts", SEEDS="1,2", SHORT_EPOCHS="1", FINAL_EPOCHS="2",
               UNTIL="retrain", NAME="pick", JOBS="2")
    proc = subprocess.run(["bash", "sweeps/darts_selection.sh"], cwd=repo.root, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    ranking = json.loads((repo.root / "reports" / "pick" / "selection.json").read_text())
    assert sorted(c["seed"] for c in ranking["candidates"]) == [1, 2]
    assert all(c["epochs"] == 1 for c in ranking["candidates"])
    best = ranking["chosen"]
    assert best["accuracy"] == max(c["accuracy"] for c in ranking["candidates"])
    show = json.loads(repo.dvc("exp", "show", "--json").stdout)
    exps = [rev["data"] for base in show if base.get("experiments") for e in base["experiments"]
            for rev in e["revs"]]
    assert len(exps) == 3, [e.get("name") for e in exps]
    final = [e for e in exps if e["params"]["params.yaml"]["data"]["retrain"]["train"]["epochs"] == 2]
    assert len(final) == 1 and final[0]["params"]["params.yaml"]["data"]["seed"] == best["seed"]
    metrics = final[0]["metrics"]
    assert metrics["metrics/retrain.json"]["data"]["epochs"] == 2
    chosen = next(e for e in exps if e["params"]["params.yaml"]["data"]["seed"] == best["seed"]
                  and e is not final[0])
    # the final run's search is the candidate's, restored by DVC's run cache (a rerun would time anew)
    assert metrics["metrics/search.json"]["data"] == chosen["metrics"]["metrics/search.json"]["data"]
    derived = json.loads((repo.root / "reports" / "pick" / "selected_genotype.json").read_text())
    assert derived["type"] == "darts_cell"
