"""Every registered method: exactly the intended parameters get gradients and change."""
import pytest
import torch
from torch import nn

from nascore.methods import METHODS, get_method
from nascore.search import SearchConfig, SearchData, SearchRun
from nascore.spaces import get_space
from tests._tiny import TensorLoader, learnable_images


class NeverIterated(TensorLoader):
    def __iter__(self):
        raise AssertionError("single-level search must not read validation batches")


def one_step(method: str, space: str = "darts", **overrides):
    settings = get_method(method).resolved_settings()
    settings.update(epochs=1, batch_size=4, init_channels=4, layers=1 if space == "nb201" else 3,
                    arch_warmup_epochs=0, valid_every=0, **overrides)
    cfg = SearchConfig(**settings)
    x, y = learnable_images(8, 4, 8)
    val_cls = NeverIterated if cfg.optimisation == "single_level" else TensorLoader
    data = SearchData(TensorLoader(x[:4], y[:4], 4), val_cls(x[4:], y[4:], 4), num_classes=4)
    run = SearchRun(get_space(space), cfg, data, log=lambda s: None)
    run.schedule.initialise(run)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    run.search_epoch(0)
    return run, cfg, before


def inactive_op_params(run) -> set[str]:
    active = set(run.model.active_columns())
    names = set()
    for name, module in run.model.named_modules():
        if hasattr(module, "ops") and hasattr(module, "op_names"):
            for c, op in enumerate(module.ops):
                if c not in active:
                    names |= {f"{name}.ops.{c}.{n}" for n, _ in op.named_parameters()}
    return names


@pytest.mark.parametrize("method", METHODS.names())
def test_exactly_the_intended_parameters_change(method):
    run, cfg, before = one_step(method)
    model = run.model
    params = dict(model.named_parameters())
    inactive = inactive_op_params(run)
    frozen = {n for n, p in params.items() if not p.requires_grad}
    expected_changed = set(params) - frozen - inactive
    changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
    with_grad = {n for n, p in params.items() if p.grad is not None}

    assert changed == expected_changed, f"differ: {sorted(changed ^ expected_changed)[:5]}"
    assert_inactive_alpha_columns_unchanged(run, before)
    assert with_grad <= expected_changed
    assert not (with_grad & frozen) and not (with_grad & inactive)
    if cfg.features == "random":
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                assert not m.weight.requires_grad            # bit-identical convs, checked above
        assert frozen, "random features must freeze convolutions"
        assert not any(n.startswith("classifier") for n in changed)
    else:
        assert not frozen
    if cfg.edge_normalization:
        assert {"betas.normal", "betas.reduce"} <= changed
    assert {"alphas.normal", "alphas.reduce"} <= changed


def assert_inactive_alpha_columns_unchanged(run, before):
    """α moves only in its active columns (a progressive search keeps the others as they were)."""
    active = run.model.active_columns()
    for ct, a in run.model.alphas.items():
        inactive = [c for c in range(a.shape[1]) if c not in active]
        assert torch.equal(a[:, inactive], before[f"alphas.{ct}"][:, inactive])
        assert not torch.equal(a[:, active], before[f"alphas.{ct}"][:, active])


def test_progressive_search_trains_only_its_starting_op():
    run, _, before = one_step("opp_darts")
    assert len(run.model.active_columns()) == 1
    assert inactive_op_params(run), "the other ops exist but take no part"
    for n in inactive_op_params(run):
        assert torch.equal(dict(run.model.named_parameters())[n], before[n])


def test_combinations_no_paper_tried_come_from_params_alone():
    # random features + single level + partial channels: three switches on the darts preset
    run, cfg, before = one_step("darts", features="random", optimisation="single_level",
                                partial_channels=2, edge_normalization=True)
    convs = [m for m in run.model.modules() if isinstance(m, nn.Conv2d)]
    assert all(not m.weight.requires_grad for m in convs)
    assert not torch.equal(run.model.alphas["normal"], before["alphas.normal"])
    assert run.model.betas is not None


def test_method_presets_follow_the_spec():
    pc = get_method("pc_darts").resolved_settings()
    assert (pc["partial_channels"], pc["edge_normalization"], pc["arch_warmup_epochs"],
            pc["batch_size"], pc["lr"], pc["arch_lr"]) == (4, True, 15, 256, 0.1, 6e-4)
    rfpc = get_method("rf_pcdarts").resolved_settings()
    assert rfpc["features"] == "random" and rfpc["partial_channels"] == 4
    assert get_method("darts_v2").resolved_settings()["optimisation"] == "second_order"
    assert get_method("single_darts").resolved_settings()["optimisation"] == "single_level"
    assert get_method("opp_darts").resolved_settings()["op_schedule"] == "progressive"
    for name in METHODS.names():      # every preset is a valid SearchConfig
        SearchConfig(**get_method(name).resolved_settings())


def test_unknown_method_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: .*darts.*pc_darts"):
        get_method("enas")
