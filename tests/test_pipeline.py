"""nascore/pipeline.py: the stages' library side, called directly on hand-made inputs."""
import json
from pathlib import Path

from nascore import config as C
from nascore.genotype import NB201_EDGES, NB201_OPS
from nascore.pipeline import Paths, derive
from nascore.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]


def _search_outputs(workspace: Path, winners: list[str]) -> None:
    """outputs/search as the search stage writes it, for an NB201 cell whose α makes `winners` win."""
    alphas = [[3.0 if op == w else 0.0 for op in NB201_OPS] for w in winners]
    out = workspace / "outputs" / "search"
    out.mkdir(parents=True)
    (out / "alphas.json").write_text(json.dumps({
        "space": "nb201", "active_columns": list(range(len(NB201_OPS))), "alphas": {"cell": alphas},
        "betas": None, "op_names": {"cell": [list(NB201_OPS)] * len(NB201_EDGES)},
        "edges_per_node": [1, 2, 3]}))
    (out / "history.json").write_text(json.dumps([{
        "epoch": 1, "alphas": {"cell": alphas}, "op_names": {"cell": [list(NB201_OPS)] * len(NB201_EDGES)},
        "param_free_ops": sum(w in ("none", "skip_connect", "avg_pool_3x3") for w in winners)}]))


def test_derive_warns_when_the_derived_cell_ignores_its_input(tmp_path, capsys):
    run = C.resolve({**C.load_params(ROOT / "params.yaml"), "space": "nb201"})
    cut = ["none", "none", "nor_conv_3x3", "none", "nor_conv_3x3", "nor_conv_1x1"]   # no path from the input
    _search_outputs(tmp_path / "cut", cut)
    metrics = derive(run, Paths(tmp_path / "cut", tmp_path), Tracker.disabled())
    assert metrics["arch"] == "|none~0|+|none~0|nor_conv_3x3~1|+|none~0|nor_conv_3x3~1|nor_conv_1x1~2|"
    assert metrics["input_reaches_output"] is False
    assert "WARNING" in capsys.readouterr().err
    _search_outputs(tmp_path / "ok", ["nor_conv_3x3"] * 6)
    metrics = derive(run, Paths(tmp_path / "ok", tmp_path), Tracker.disabled())
    assert metrics["input_reaches_output"] is True and "WARNING" not in capsys.readouterr().err
