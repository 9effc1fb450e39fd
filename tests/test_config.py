"""params.yaml: auto resolution, validation, and its agreement with dvc.yaml."""
import copy
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from nascore import config as C
from nascore.methods import METHODS
from tests._params import default_params
from nascore.spaces import SPACES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def params(tmp_path_factory):
    return default_params(tmp_path_factory.mktemp("params"))


def with_(params, **changes):
    p = copy.deepcopy(params)
    for dotted, value in changes.items():
        keys = dotted.split("__")
        node = p
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return p


def test_defaults_are_the_spec_settings(params):
    run = C.resolve(params)
    s = run.search
    assert (run.method, run.space, run.dataset, run.seed, run.profile) == ("darts", "darts", "cifar10", 2, "full")
    assert (s.epochs, s.batch_size, s.lr, s.lr_min, s.momentum, s.weight_decay, s.grad_clip) == \
           (50, 64, 0.025, 0.001, 0.9, 3e-4, 5.0)
    assert (s.arch_lr, s.arch_betas, s.arch_weight_decay) == (3e-4, (0.5, 0.999), 1e-3)
    assert (s.init_channels, s.layers, s.optimisation, s.step_order) == (16, 8, "first_order", "alpha_first")
    r = run.retrain
    assert (r.batch_size, r.init_channels, r.layers, r.auxiliary, r.cutout) == (96, 36, 20, True, 16)
    assert (r.train.epochs, r.train.lr, r.train.weight_decay, r.train.drop_path, r.train.auxiliary_weight,
            r.train.seed) == (600, 0.025, 3e-4, 0.2, 0.4, 2)
    t = run.transfer
    assert (t.data, t.init_channels, t.layers, t.batch_size, t.train.epochs, t.train.lr,
            t.train.schedule, t.train.gamma, t.train.label_smoothing) == \
           ("none", 48, 14, 128, 250, 0.1, "exponential", 0.97, 0.1)


def test_method_presets_fill_auto_values_and_explicit_values_win(params):
    pc = C.resolve(with_(params, method="pc_darts")).search
    assert (pc.batch_size, pc.lr, pc.arch_lr, pc.partial_channels, pc.arch_warmup_epochs) == (256, 0.1, 6e-4, 4, 15)
    mine = C.resolve(with_(params, method="pc_darts", search__lr=0.05)).search
    assert mine.lr == 0.05 and mine.batch_size == 256


def test_space_defaults_nb201(params):
    run = C.resolve(with_(params, space="nb201"))
    s = run.search
    assert (s.nesterov, s.weight_decay, s.layers, s.step_order) == (True, 5e-4, 5, "weights_first")
    assert C.resolve(with_(params, space="nb201", method="darts_v2")).search.step_order == "alpha_first"
    assert C.resolve(with_(params, space="nb201", search__step_order="alpha_first")).search.step_order == "alpha_first"
    r = run.retrain
    assert (r.auxiliary, r.cutout, r.init_channels, r.layers, r.train.epochs, r.train.drop_path) == \
           (False, 0, 16, 5, 200, 0.0)
    assert run.transfer.data == "none"


def test_robust_spaces_evaluate_small_on_cifar100_and_svhn(params):
    assert C.resolve(with_(params, space="s3", dataset="cifar100")).retrain.layers == 8
    assert C.resolve(with_(params, space="s3", dataset="cifar10")).retrain.layers == 20
    assert C.resolve(with_(params, space="darts", dataset="cifar100")).retrain.layers == 20


def test_the_transfer_recipe_is_the_methods_papers_and_explicit_values_win(params):
    from nascore.train import PRESETS

    darts = C.resolve(params).transfer
    assert darts.recipe == "darts" and darts.train.schedule == "exponential" and darts.train.gamma == 0.97
    assert (darts.batch_size, darts.init_channels, darts.layers, darts.train.lr) == (128, 48, 14, 0.1)
    for method in ("pc_darts", "rf_pcdarts"):      # rf_pcdarts inherits PC-DARTS' recipe
        t = C.resolve(with_(params, method=method)).transfer
        want = PRESETS["pc_darts_imagenet"]
        assert t.recipe == "pc_darts" and t.train == dataclasses.replace(want, seed=t.train.seed)
        assert (t.train.lr, t.train.schedule, t.train.warmup_epochs, t.train.lr_min) == (0.5, "warmup_linear", 5, 0.0)
        assert (t.batch_size, t.init_channels, t.layers) == (128, 48, 14)       # per GPU: 8 x 128 = 1024
    assert C.resolve(with_(params, method="rf_darts")).transfer.recipe == "darts"
    mine = C.resolve(with_(params, method="pc_darts", transfer__recipe="darts", transfer__train__lr=0.2)).transfer
    assert (mine.recipe, mine.train.schedule, mine.train.lr) == ("darts", "exponential", 0.2)
    smoke = C.resolve(with_(params, method="pc_darts", profile="smoke")).transfer
    assert (smoke.train.epochs, smoke.train.warmup_epochs) == (1, 0)      # a 1-epoch run has no warm-up room
    with pytest.raises(C.ConfigError, match="transfer.recipe='nas' is unknown; allowed: auto, darts, pc_darts"):
        C.resolve(with_(params, transfer__recipe="nas"))


def test_pc_darts_recipe_warns_when_the_global_batch_is_not_1024(params):
    t = C.resolve(with_(params, method="pc_darts")).transfer
    assert C.recipe_batch_warning(t, world_size=8) is None
    one = C.recipe_batch_warning(t, world_size=1)
    assert "global batch of 1024" in one and "this run's is 128 (1 x transfer.batch_size=128)" in one
    assert "linear rule: 0.0625" in one
    assert C.recipe_batch_warning(C.resolve(params).transfer, world_size=1) is None    # DARTS' is 1 GPU


def test_imagenet16_120_retrains_without_the_auxiliary_head(params):
    # 16-px images leave a 4×4 map after two reductions: the head's 5×5 pool does not fit
    assert C.resolve(with_(params, dataset="imagenet16_120")).retrain.auxiliary is False
    assert C.resolve(with_(params, dataset="cifar10")).retrain.auxiliary is True
    run = C.resolve(with_(params, space="nb201", dataset="imagenet16_120"))
    assert (run.retrain.auxiliary, run.retrain.train.epochs) == (False, 200)    # the NB201 protocol


def test_smoke_profile_is_small_and_explicit_values_still_win(params):
    run = C.resolve(with_(params, profile="smoke"))
    assert run.search.epochs <= 3 and run.search.init_channels <= 8 and run.retrain.train.epochs <= 3
    assert run.data.synthetic.num_train <= 256 and C.effective_dataset(run) == "synthetic"
    assert run.transfer.data == "synthetic"
    assert C.resolve(with_(params, profile="smoke", search__epochs=3)).search.epochs == 3


@pytest.mark.parametrize("method", METHODS.names())
@pytest.mark.parametrize("space", SPACES.names())
def test_every_method_and_space_resolves_or_says_why_not(params, method, space):
    p = with_(params, method=method, space=space)
    if method == "opp_darts" and space == "s1":
        with pytest.raises(C.ConfigError, match="per-edge lists"):
            C.resolve(p)
        return
    run = C.resolve(p)
    assert run.search.epochs == 50


@pytest.mark.parametrize("changes, message", [
    ({"method": "enas"}, "method='enas' is unknown; allowed: darts, darts_v2"),
    ({"space": "nb301"}, "space='nb301' is unknown; allowed: darts, nb201, s1"),
    ({"dataset": "mnist"}, "dataset='mnist' is unknown; allowed: cifar10"),
    ({"profile": "fast"}, "profile='fast' is unknown; allowed: full, smoke"),
    ({"seed": -1}, r"seed=-1 must be in \[0, 2\*\*63\)"),
    ({"seed": 2**70}, "must be in"),
    ({"method": ["darts"]}, r"method=\['darts'\] is unknown; allowed: darts"),
    ({"space": {"a": 1}}, "space=.* is unknown; allowed: darts"),
    ({"search__grad_clip": -1}, "search.grad_clip=-1 must be >= 0"),
    ({"search__arch_grad_clip": -0.5}, "search.arch_grad_clip=-0.5 must be >= 0"),
    ({"search__weight_decay": -1}, "search.weight_decay=-1 must be >= 0"),
    ({"search__momentum": 5}, r"search.momentum=5 must be in \[0, 1\)"),
    ({"search__momentum": 0, "search__nesterov": True}, "nesterov=True must be used with search.momentum > 0"),
    ({"search__arch_betas": [2, 3]}, r"arch_betas=\(2, 3\) must be two numbers in \[0, 1\)"),
    ({"search__arch_weight_decay": -1}, "arch_weight_decay=-1 must be >= 0"),
    ({"search__lr": float("inf")}, "search.lr=inf must be > 0 and finite"),
    ({"search__arch_lr": float("nan")}, "search.arch_lr=nan must be > 0"),
    ({"search__unrolled_eps": 0}, "search.unrolled_eps=0 must be > 0"),
    ({"search__hessian_batches": 0}, "search.hessian_batches=0 must be >= 1"),
    ({"search__valid_every": -1}, "search.valid_every=-1 must be >= 0"),
    ({"search__opp__skip_after_epoch": -5}, "search.opp.skip_after_epoch=-5 must be >= 0"),
    ({"data__split_seed": -1}, "data.split_seed=-1 must be in"),
    ({"retrain__train__seed": 99}, "retrain.train.seed is set by the top-level seed"),
    ({"dataset": "imagenet"}, "dataset='imagenet' is not one to search and retrain on; allowed: cifar10, "
                              "cifar100, imagenet16_120, svhn, synthetic. ImageNet is the transfer stage's"),
    ({"retrain__layers": 1}, "retrain.layers=1: the darts network needs >= 3 cells"),
    ({"profile": "smoke", "retrain__batch_size": 1000}, r"retrain.batch_size=1000 is larger than the training set \(64 images\)"),
    ({"transfer__data": "synthetic", "transfer__num_classes": 1}, "transfer.num_classes=1 must be >= 2"),
    ({"transfer__data": "synthetic", "transfer__image_size": 0}, "transfer.image_size=0 must be >= 32"),
    ({"transfer__data": "synthetic", "transfer__workers": -1}, "transfer.workers=-1 must be >= 0"),
    ({"transfer__train__seed": 99}, "transfer.train.seed is set by the top-level seed"),
    ({"seed": "two"}, "seed='two': expected an integer"),
    ({"data__root": ""}, r"data.root is empty: write a value \(or `auto` where the key has a default\)"),
    ({"evaluate__nb201_table": "  "}, "evaluate.nb201_table is empty"),
    ({"searhc": {}}, "unknown key.*searhc.*known: data, dataset"),
    ({"search__epoch": 3}, r"unknown key\(s\) search.epoch; known in search: .*epochs"),
    ({"search__epochs": -5}, "search.epochs=-5 must be >= 1"),
    ({"search__epochs": "ten"}, "search.epochs='ten': expected an integer"),
    ({"search__lr": True}, "search.lr=True: expected a number"),
    ({"search__nesterov": 1}, "search.nesterov=1: expected true/false"),
    ({"search__arch_betas": [0.5]}, "search.arch_betas"),
    ({"search__partial_channels": 3}, r"partial_channels \(K=3\) must divide search.init_channels=16"),
    ({"search__batch_size": 30000}, r"larger than the search's w split \(25000 of 50000 training images, "
                                    "data.split=first_half"),
    ({"space": "nb201", "dataset": "cifar100", "search__batch_size": 6000},
     r"larger than the search's α split \(5000 of 10000 test images, data.split=test_half\)"),
    ({"data__split": "last_half"}, "data.split='last_half' is unknown; allowed: auto, first_half, random, test_half"),
    ({"search__optimisation": "zeroth_order"}, "optimisation='zeroth_order' is unknown; allowed: first_order"),
    ({"search__features": "frozen"}, "features='frozen'; allowed: trained, random"),
    ({"search__lr_min": 1.0}, "lr_min=1.0 must be in"),
    ({"derive__rule": "nb201"}, "derive.rule='nb201' cannot derive a darts cell; allowed for darts: auto, darts"),
    ({"derive__rule": "top3"}, "derive.rule='top3' is unknown"),
    ({"method": "opp_darts", "space": "s1"}, "needs one op list on every edge"),
    ({"retrain__genotype": "DARTS_V9"}, "retrain.genotype.*published name"),
    ({"retrain__genotype": "|nor_conv_3x3~0|+|none~0|none~1|+|none~0|none~1|none~2|"},
     "is a NB201 cell but space is 'darts'"),
    ({"space": "nb201", "retrain__auxiliary": True}, "auxiliary must be false for space nb201"),
    ({"dataset": "imagenet16_120", "retrain__auxiliary": True},
     "retrain.auxiliary: true needs images of >= 17 px .*imagenet16_120's are 16 px: set retrain.auxiliary: false"),
    ({"dataset": "synthetic", "data__synthetic__image_size": 16}, "synthetic's are 16 px"),
    ({"transfer__data": "/no/such/imagenet"}, "transfer.data='/no/such/imagenet' does not exist"),
    ({"data__split_fraction": 1.5}, "split_fraction=1.5 must be in"),
    ({"search__drop_path": 1.5}, r"search.drop_path=1.5 must be in \[0, 1\)"),
    ({"search__compile_scope": "layers"}, "search.compile_scope='layers'; allowed: cells, network"),
    ({"search__cutout": -4}, "search.cutout=-4 must be >= 0"),
    ({"search": [1, 2]}, "search must be a mapping"),
    ({"retrain__train__cuda_graph": True, "retrain__train__nonfinite": "skip"},
     "retrain.train.cuda_graph: true needs retrain.train.nonfinite: stop"),
])
def test_bad_params_are_rejected_naming_what_is_allowed(params, changes, message):
    with pytest.raises(C.ConfigError, match=message):
        C.resolve(with_(params, **changes))


def test_non_string_keys_are_named_not_crashed_on(params):
    # YAML reads `1:` as an int and `yes:` as a bool
    with pytest.raises(C.ConfigError, match="unknown key.*1, None"):
        C.resolve({**params, 1: "x", None: "y"})


def test_params_file_errors(tmp_path):
    with pytest.raises(C.ConfigError, match="not found"):
        C.load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("method: [unclosed")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("- a\n- b\n")
    with pytest.raises(C.ConfigError, match="must be a mapping"):
        C.load_params(tmp_path / "params.yaml")
    # a key given twice: YAML would keep the last silently
    (tmp_path / "params.yaml").write_text("seed: 2\nsearch:\n  epochs: 3\nseed: 3\n")
    with pytest.raises(C.ConfigError, match=r"key 'seed' appears twice \(lines 1 and 4\)"):
        C.load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("search:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(C.ConfigError, match="key 'lr' appears twice"):
        C.load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_bytes(b"method: d\xe9rts\n")
    with pytest.raises(C.ConfigError, match="is not UTF-8 text"):
        C.load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("method: [unclosed")
    with pytest.raises(C.ConfigError, match=r"params.yaml is not valid YAML: .*params.yaml\", line 1") as e:
        C.load_params(tmp_path / "params.yaml")
    assert "\n" not in str(e.value)


# --- dvc.yaml agrees with what the stages read -----------------------------------------------------
def dvc_stages():
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_stage_declares_exactly_the_params_it_reads(params):
    stages = dvc_stages()
    assert set(stages) == set(C.STAGE_PARAMS)
    for name, stage in stages.items():
        declared = set(stage["params"])
        assert declared == set(C.STAGE_PARAMS[name]), name
        # what resolving the stage actually touches, top-level names and sections alike
        touched = {key.split(".")[0] for key in C.read_keys(name, params)}
        assert touched <= declared, f"{name} reads undeclared params {touched - declared}"
        # with every method/space the stage still reads nothing undeclared
        for method in ("pc_darts", "opp_darts"):
            touched = {k.split(".")[0] for k in C.read_keys(name, with_(params, method=method, space="nb201"))}
            assert touched <= declared, (name, method)


def test_changing_a_retrain_param_does_not_touch_the_search_stage(params):
    # the -S contract: retrain.* is not among the search stage's params, and resolving the search
    # stage gives the same config whatever retrain says
    a = C.resolve_stage("search", params)
    b = C.resolve_stage("search", with_(params, retrain__train__epochs=5))
    assert a.search == b.search
    assert "retrain" not in dvc_stages()["search"]["params"]


def test_declared_code_dependencies_exist():
    for name, stage in dvc_stages().items():
        assert f"stages/{name}.py" in stage["deps"]
        for dep in stage["deps"]:
            if not dep.startswith("outputs/") and not dep.startswith("metrics/"):
                assert (ROOT / dep).exists(), f"{name}: {dep} does not exist"


def test_config_hash_is_stable_and_sensitive(params):
    a, b = C.resolve(params), C.resolve(with_(params, seed=3))
    assert C.config_hash(a) == C.config_hash(C.resolve(params))
    assert C.config_hash(a) != C.config_hash(b)


def test_every_stage_validates_the_whole_file_before_any_work(tmp_path, monkeypatch, capsys):
    """A bad retrain value stops the first stage (prepare), not the retrain after a long search."""
    from nascore.cli import run_stage
    params = default_params(tmp_path)
    params["retrain"]["train"]["epochs"] = -1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NASCORE_TRACKING", "off")
    with pytest.raises(SystemExit) as exit_:
        run_stage("prepare")
    assert exit_.value.code == 2
    assert "retrain.train: TrainConfig.epochs=-1: must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists()


def test_relative_paths_are_checked_from_the_project_root_as_the_stages_read_them(params, tmp_path, monkeypatch):
    # a `dvc exp run --temp` workspace lacks the project's ignored data/: stages read it from the root
    (tmp_path / "data" / "imnet").mkdir(parents=True)
    (tmp_path / "cells").mkdir()
    (tmp_path / "cells" / "mine.json").write_text(json.dumps(C.resolve_genotype("DARTS_V2").to_json()))
    monkeypatch.setenv("NASCORE_PROJECT_ROOT", str(tmp_path))
    run = C.resolve(with_(params, transfer__data="data/imnet", retrain__genotype="cells/mine.json"))
    assert run.transfer.data == "data/imnet"
    with pytest.raises(C.ConfigError, match="transfer.data='data/elsewhere' does not exist"):
        C.resolve(with_(params, transfer__data="data/elsewhere"))
