"""nascore/pipeline.py: the stages' library side, called directly on hand-made inputs."""
import json
from pathlib import Path

import torch

from nascore import config as C
from nascore.data import ImageArrays, SearchSplit, load_split
from nascore.genotype import NB201_EDGES, NB201_OPS
from nascore.pipeline import Paths, derive, prepare, run_tags, search_data, search_label
from nascore.tracking import Tracker
from tests._params import default_params

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
    run = C.resolve({**default_params(tmp_path), "space": "nb201"})
    cut = ["none", "none", "nor_conv_3x3", "none", "nor_conv_3x3", "nor_conv_1x1"]   # no path from the input
    _search_outputs(tmp_path / "cut", cut)
    metrics = derive(run, Paths(tmp_path / "cut", tmp_path), Tracker.disabled())
    assert metrics["arch"] == "|none~0|+|none~0|nor_conv_3x3~1|+|none~0|nor_conv_3x3~1|nor_conv_1x1~2|"
    assert metrics["input_reaches_output"] is False
    assert "WARNING" in capsys.readouterr().err
    _search_outputs(tmp_path / "ok", ["nor_conv_3x3"] * 6)
    metrics = derive(run, Paths(tmp_path / "ok", tmp_path), Tracker.disabled())
    assert metrics["input_reaches_output"] is True and "WARNING" not in capsys.readouterr().err


def test_nb201_on_cifar100_draws_alpha_batches_from_half_the_test_set(tmp_path):
    # methods.md §1.3: train = all 50k, arch-val = a fixed half of the test set (here at smoke size)
    run = C.resolve({**default_params(tmp_path), "space": "nb201", "dataset": "cifar100",
                     "profile": "smoke"})
    paths = Paths(tmp_path, tmp_path)
    prepare(run, paths, Tracker.disabled())
    summary = json.loads((tmp_path / "outputs" / "prepare" / "summary.json").read_text())
    assert (summary["split"], summary["arch_split_from"]) == ("test_half", "test")
    assert (summary["weight_split"], summary["arch_split"]) == (64, 16)
    split = load_split(tmp_path / "outputs" / "prepare" / "split.json", 64, 32)
    # train labels 0-4, test labels 5-9: every batch says which set it came from
    mean, std = (0.5,) * 3, (0.25,) * 3
    train = ImageArrays("train", torch.zeros(64, 3, 8, 8, dtype=torch.uint8), torch.arange(64) % 5,
                        tuple(map(str, range(10))), mean, std)
    test = ImageArrays("test", torch.zeros(32, 3, 8, 8, dtype=torch.uint8), 5 + torch.arange(32) % 5,
                       tuple(map(str, range(10))), mean, std)
    data = search_data(run.search, train, split, seed=0, device=torch.device("cpu"), test=test)
    w_labels = torch.cat([y for _, y in data.train])
    a_labels = torch.cat([y for _, y in data.val])
    assert len(w_labels) == 64 and bool((w_labels < 5).all())        # every training image trains w
    assert len(a_labels) == 16 and bool((a_labels >= 5).all())       # α sees test images only
    assert sorted(a_labels.tolist()) == sorted(test.labels[split.arch].tolist())


def test_the_darts_space_splits_the_training_set_in_order(tmp_path):
    run = C.resolve({**default_params(tmp_path), "profile": "smoke"})
    prepare(run, Paths(tmp_path, tmp_path), Tracker.disabled())
    split = load_split(tmp_path / "outputs" / "prepare" / "split.json", 64, 32)
    assert split.rule == "first_half" and split.weights.tolist() == list(range(32))


def test_malformed_search_outputs_are_named_not_a_traceback(tmp_path):
    import pytest
    from nascore.pipeline import MissingInputError

    run = C.resolve({**default_params(tmp_path), "space": "nb201"})
    edits = {
        "a column out of range": ("alphas.json", lambda d: d.update(active_columns=[0, 1, 99])),
        "op names missing": ("alphas.json", lambda d: d.pop("op_names")),
        "a string among the alphas": ("alphas.json", lambda d: d["alphas"]["cell"][0].__setitem__(0, "x")),
        "no epochs": ("history.json", lambda d: d.clear()),
    }
    for what, (name, edit) in edits.items():
        workspace = tmp_path / what.replace(" ", "_")
        _search_outputs(workspace, ["nor_conv_3x3"] * 6)
        path = workspace / "outputs" / "search" / name
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
        with pytest.raises(MissingInputError, match="alphas.json or history.json is malformed.*rerun the 'search'"):
            derive(run, Paths(workspace, tmp_path), Tracker.disabled())
        assert not (workspace / "outputs" / "derive").exists(), what


def test_a_derived_cell_of_another_space_is_refused(tmp_path):
    import pytest
    from nascore.genotype import GenotypeError
    from nascore.pipeline import stage_genotype

    run = C.resolve({**default_params(tmp_path), "space": "nb201"})
    _search_outputs(tmp_path, ["nor_conv_3x3"] * 6)
    derive(run, Paths(tmp_path, tmp_path), Tracker.disabled())
    assert stage_genotype("derived", Paths(tmp_path, tmp_path), "nb201").to_arch_string().startswith("|nor_conv_3x3~0|")
    with pytest.raises(GenotypeError, match=r"genotype.json holds an NB201 cell but space is 'darts'"):
        stage_genotype("derived", Paths(tmp_path, tmp_path), "darts")
    with pytest.raises(GenotypeError, match="DARTS_V2 holds a DARTS cell but space is 'nb201'"):
        stage_genotype("DARTS_V2", Paths(tmp_path, tmp_path), "nb201")


def test_evaluate_names_a_damaged_metrics_file(tmp_path):
    import pytest
    from nascore.pipeline import MissingInputError, evaluate

    run = C.resolve({**default_params(tmp_path), "space": "nb201"})
    paths = Paths(tmp_path, tmp_path)
    _search_outputs(tmp_path, ["nor_conv_3x3"] * 6)
    derive(run, paths, Tracker.disabled())
    (tmp_path / "metrics").mkdir()
    for text, reason in (('{"valid_acc": ', "unreadable"), ("[1, 2]", "holds list, not a JSON object")):
        (tmp_path / "metrics" / "search.json").write_text(text)
        with pytest.raises(MissingInputError, match=f"search.json (is )?{reason}.*(re)?run the 'search' stage"):
            evaluate(run, paths, Tracker.disabled())


def test_a_bad_device_name_is_a_config_error(monkeypatch):
    import pytest
    import torch
    from nascore.pipeline import pick_device

    monkeypatch.setenv("NASCORE_DEVICE", "gpu")
    with pytest.raises(C.ConfigError, match="NASCORE_DEVICE='gpu' is no device; allowed: cpu, cuda"):
        pick_device()
    monkeypatch.setenv("NASCORE_DEVICE", "cuda:99")
    with pytest.raises(C.ConfigError, match="usable CUDA device"):
        pick_device()
    monkeypatch.setenv("NASCORE_DEVICE", "cpu")
    assert pick_device() == torch.device("cpu")


def test_derive_labels_its_plots_with_the_search_s_method_and_seed():
    assert search_label({"space": "nb201", "method": "rf_darts", "seed": 3}, "nb201") == "rf_darts, seed 3 on nb201"
    assert search_label({"space": "nb201"}, "nb201") == "nb201"      # an alphas.json from before


def test_tracking_tags_say_a_smoke_run_saw_synthetic_images(tmp_path):
    smoke = C.resolve({**default_params(tmp_path), "profile": "smoke"})
    assert run_tags(smoke, "search")["dataset"] == "cifar10"           # the param, for grouping
    assert run_tags(smoke, "search")["data_source"] == "synthetic"     # what the images were
    full = C.resolve(default_params(tmp_path))
    assert run_tags(full, "retrain")["data_source"] == "cifar10"
    assert "data_source" not in run_tags(full, "derive")               # derive reads no dataset


def test_nb201_alpha_batches_are_drawn_with_replacement_and_validation_visits_each_image_once(tmp_path):
    # methods.md §1.3: each train sample is paired with a random arch-val sample (with replacement)
    run = C.resolve({**default_params(tmp_path), "space": "nb201", "profile": "smoke"})
    assert run.search.arch_sampling == "replacement"
    assert C.resolve(default_params(tmp_path)).search.arch_sampling == "cycle"      # DARTS space
    mean, std = (0.5,) * 3, (0.25,) * 3
    train = ImageArrays("train", torch.zeros(64, 3, 8, 8, dtype=torch.uint8), torch.arange(64) % 10,
                        tuple(map(str, range(10))), mean, std)
    split = SearchSplit(torch.arange(32), torch.arange(32, 64), num_samples=64, seed=0)
    data = search_data(run.search, train, split, seed=0, device=torch.device("cpu"))
    assert data.arch is not None and data.arch.replacement and not data.val.replacement
    assert data.arch.images is data.val.images                  # no second copy on the device
    val_labels = sorted(torch.cat([y for _, y in data.val]).tolist())
    assert val_labels == sorted(train.labels[32:64].tolist())  # validation: each α image once
    cycle = C.resolve({**default_params(tmp_path), "space": "nb201", "profile": "smoke",
                       "search": {"arch_sampling": "cycle"}})
    assert search_data(cycle.search, train, split, seed=0, device=torch.device("cpu")).arch is None


def test_nb201_searches_imagenet16_120_from_its_downsampled_batches(tmp_path):
    # methods.md §1.3: ImageNet16-120's α batches come from half of its test set; 16-px crops pad 2
    from nascore.pipeline import search
    from tests.test_data import _write_imagenet16

    _write_imagenet16(tmp_path / "in16", per_batch=8, n_val=16)
    run = C.resolve({**default_params(tmp_path), "space": "nb201", "dataset": "imagenet16_120",
                     "data": {"root": str(tmp_path / "in16")},
                     "search": {"epochs": 1, "batch_size": 4, "init_channels": 4, "layers": 1}})
    paths = Paths(tmp_path, tmp_path)
    prepare(run, paths, Tracker.disabled())
    summary = json.loads((tmp_path / "outputs" / "prepare" / "summary.json").read_text())
    assert summary == {"dataset": "imagenet16_120", "train_images": 40, "test_images": 8, "classes": 120,
                       "split": "test_half", "weight_split": 40, "arch_split": 4, "arch_split_from": "test"}
    from nascore.data import load_prepared

    train = load_prepared(tmp_path / "outputs" / "prepare" / "data", "train")
    test = load_prepared(tmp_path / "outputs" / "prepare" / "data", "test")
    split = load_split(tmp_path / "outputs" / "prepare" / "split.json", len(train), len(test))
    data = search_data(run.search, train, split, seed=0, device=torch.device("cpu"), test=test)
    assert data.train.crop_padding == 2 and data.val.crop_padding == 2
    x, y = next(iter(data.train))
    assert x.shape == (4, 3, 16, 16) and int(y.max()) < 120
    metrics = search(run, paths, Tracker.disabled())
    assert metrics["epochs"] == 1
    assert (tmp_path / "outputs" / "search" / "alphas.json").is_file()


def test_transfer_says_when_pc_darts_recipe_runs_on_another_global_batch(tmp_path, capsys):
    from nascore.pipeline import transfer_imagenet

    run = C.resolve({**default_params(tmp_path), "method": "pc_darts", "profile": "smoke",
                     "transfer": {"genotype": "PC_DARTS_cifar"}})
    metrics = transfer_imagenet(run, Paths(tmp_path, tmp_path), Tracker.disabled())
    assert metrics["epochs"] == 1
    err = capsys.readouterr().err
    assert "WARNING: PC-DARTS' ImageNet recipe pairs lr 0.5 with a global batch of 1024" in err
    assert "this run's is 8 (1 x transfer.batch_size=8)" in err
