"""OPP-DARTS' progressive op schedule (methods.md §2.5)."""
import copy

import pytest
import torch

from nascore import op_schedules
from nascore.op_schedules import ProgressiveConfig, mean_train_loss, progressive_timeline
from nascore.search import SearchConfig, SearchData, SearchRun
from nascore.spaces import get_space
from nascore.supernet import SupernetConfig
from tests._tiny import TensorLoader, learnable_images


def test_timeline_of_the_darts_space_matches_the_spec():
    # stage 0 picks one of 4 parametric ops; 6 candidates remain; skip_connect held back
    timeline = progressive_timeline(num_candidates=6, epochs=50)
    assert timeline == {2: "candidate", 4: "candidate", 6: "candidate", 8: "candidate",
                        10: "candidate", 12: "candidate", 14: "skip"}
    ops_per_epoch = [1 + sum(1 for e in timeline if e <= epoch) for epoch in range(50)]
    assert ops_per_epoch[:2] == [1, 1]
    assert ops_per_epoch[2:14] == [2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]
    assert ops_per_epoch[14:] == [8] * 36


def test_timeline_without_skip_and_with_few_candidates():
    assert progressive_timeline(1, 20, has_skip=False) == {2: "candidate"}
    # S2 = {skip, sep_conv_3x3}: nothing to add but skip, which still waits for epoch > 12
    assert progressive_timeline(0, 20) == {14: "skip"}


def fixed_losses(monkeypatch, ranking):
    """Make `mean_train_loss` score a net by its newest op: the max-loss rule then picks by `ranking`."""
    def fake(model, batches):
        cols = model.active_columns()
        newest = model.column_names("normal", 0, cols)[-1]
        return ranking[newest]
    monkeypatch.setattr(op_schedules, "mean_train_loss", fake)


def test_ops_enter_by_max_training_loss_and_skip_connect_last(monkeypatch):
    ranking = {"sep_conv_3x3": 1.0, "sep_conv_5x5": 3.0, "dil_conv_3x3": 2.0, "dil_conv_5x5": 0.5,
               "none": 0.1, "max_pool_3x3": 9.0, "avg_pool_3x3": 5.0, "skip_connect": 100.0}
    fixed_losses(monkeypatch, ranking)
    cfg = SearchConfig(op_schedule="progressive", epochs=16, batch_size=4, init_channels=4,
                       layers=3, valid_every=0)
    x, y = learnable_images(8, 4, 8)
    data = SearchData(TensorLoader(x[:4], y[:4], 4), TensorLoader(x[4:], y[4:], 4), 4)
    active_per_epoch = []
    run = SearchRun(get_space("darts"), cfg, data, log=lambda s: None,
                    on_epoch_end=lambda r: active_per_epoch.append(r["active_ops"]))
    run.run()
    model = run.model
    order = model.column_names("normal", 0, model.active_columns())
    # stage 0: the starter with the largest loss (sep_conv_5x5); then max loss among the rest
    assert order == ["sep_conv_5x5", "max_pool_3x3", "avg_pool_3x3", "dil_conv_3x3",
                     "sep_conv_3x3", "dil_conv_5x5", "none", "skip_connect"]
    assert active_per_epoch == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8]


def test_entering_op_resets_optimisers_and_restarts_the_cosine_from_the_current_lr():
    cfg = SearchConfig(op_schedule="progressive", epochs=6, batch_size=4, init_channels=4, layers=3,
                       valid_every=0, opp=ProgressiveConfig(stage_epochs=2, skip_after_epoch=12))
    x, y = learnable_images(8, 4, 8)
    data = SearchData(TensorLoader(x[:4], y[:4], 4), TensorLoader(x[4:], y[4:], 4), 4,
                      score_fraction_batches=1)
    lrs = []
    run = SearchRun(get_space("darts"), cfg, data, log=lambda s: None,
                    on_epoch_end=lambda r: lrs.append(r["lr"]))
    run.run()
    from nascore.search import cosine_lr
    lr2 = cosine_lr(2, 0.025, 0.001, 6)                      # lr when the first op enters
    assert lrs[:2] == pytest.approx([cosine_lr(e, 0.025, 0.001, 6) for e in range(2)])
    assert lrs[2] == pytest.approx(lr2)
    assert lrs[3] == pytest.approx(cosine_lr(3, lr2, 0.001, 6, start=2))
    lr4 = cosine_lr(4, lr2, 0.001, 6, start=2)
    assert lrs[5] == pytest.approx(cosine_lr(5, lr4, 0.001, 6, start=4))
    assert run.w_opt.state == {} or all("momentum_buffer" in s for s in run.w_opt.state.values())


def test_mean_train_loss_leaves_bn_statistics_of_the_searched_model_alone():
    net = get_space("nb201").build_supernet(SupernetConfig(init_channels=4, layers=1))
    net.eval()                                   # as after a validation pass
    net.set_drop_path(0.3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = learnable_images(8, 4, 8)
    probe = copy.deepcopy(net).train()           # what the score must be: train-mode BN, no drop-path
    probe.set_drop_path(0.0)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(probe(x), y).item()
    loss = mean_train_loss(net, [(x, y)])
    assert loss == pytest.approx(expected, rel=1e-6)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(m.training for m in net.modules())
    assert net.drop_path_probability == pytest.approx(0.3)


def test_progressive_needs_a_shared_op_list():
    cfg = SearchConfig(op_schedule="progressive", epochs=2, batch_size=4, init_channels=4, layers=3)
    x, y = learnable_images(8, 4, 8)
    data = SearchData(TensorLoader(x[:4], y[:4], 4), TensorLoader(x[4:], y[4:], 4), 4)
    run = SearchRun(get_space("s1"), cfg, data, log=lambda s: None)
    with pytest.raises(ValueError, match="per-edge op lists"):
        run.run()


class Host:
    """The least a schedule asks of the search loop (op_schedules.ScheduleHost)."""

    def __init__(self, model):
        self.model, self.messages = model, []

    def build_model(self):
        raise AssertionError("only stage 0 builds fresh supernets")

    def score_batches(self):
        return []

    def reset_optimisers(self, epoch):
        pass

    def log(self, message):
        self.messages.append(message)


def test_the_search_goes_on_with_the_scored_winner_itself(monkeypatch):
    # methods.md §2.5: net = cand_argmax_q. The op that enters keeps the fresh weights and α
    # column it was scored with, however many random numbers the scoring drew after it.
    net = get_space("darts").build_supernet(SupernetConfig(init_channels=4, layers=3))
    ops = net.space.uniform_ops
    net.set_active_columns([ops.index("sep_conv_3x3")])
    ranking = {"sep_conv_5x5": 1.0, "dil_conv_3x3": 7.0, "max_pool_3x3": 3.0}
    scored = {}

    def score(model, batches):
        newest = model.column_names("normal", 0, model.active_columns())[-1]
        scored[newest] = {k: v.clone() for k, v in model.state_dict().items()}
        torch.randn(1000)                                   # scoring moves the RNG on
        return ranking[newest]
    monkeypatch.setattr(op_schedules, "mean_train_loss", score)
    schedule = op_schedules.ProgressiveOps(ProgressiveConfig(), epochs=50)
    schedule.remaining = list(ranking)
    schedule.on_epoch_start(Host(net), 2)
    assert schedule.remaining == ["sep_conv_5x5", "max_pool_3x3"]
    assert net.column_names("normal", 0, net.active_columns()) == ["sep_conv_3x3", "dil_conv_3x3"]
    state = net.state_dict()
    assert state.keys() == scored["dil_conv_3x3"].keys()
    for k, v in scored["dil_conv_3x3"].items():
        assert torch.equal(state[k], v), k


def test_each_candidate_is_the_model_as_it_stands_plus_its_own_op(monkeypatch):
    # Candidates are scored one after another on the searched model itself: each must see the
    # model as it was before scoring began, with only its own op column switched on and drawn fresh.
    net = get_space("darts").build_supernet(SupernetConfig(init_channels=4, layers=3))
    ops = net.space.uniform_ops
    net.set_active_columns([ops.index("sep_conv_3x3"), ops.index("max_pool_3x3")])
    base = {k: v.clone() for k, v in net.state_dict().items()}
    seen = {}

    def score(model, batches):
        newest = model.active_columns()[-1]
        seen[ops[newest]] = (model.active_columns(), {k: v.clone() for k, v in model.state_dict().items()})
        return 1.0
    monkeypatch.setattr(op_schedules, "mean_train_loss", score)
    schedule = op_schedules.ProgressiveOps(ProgressiveConfig(), epochs=50)
    schedule.remaining = ["sep_conv_5x5", "dil_conv_3x3", "avg_pool_3x3"]
    schedule.on_epoch_start(Host(net), 2)
    assert list(seen) == ["sep_conv_5x5", "dil_conv_3x3", "avg_pool_3x3"]
    for name, (columns, state) in seen.items():
        col = ops.index(name)
        assert columns == [ops.index("sep_conv_3x3"), ops.index("max_pool_3x3"), col]
        changed = {k for k in base if not torch.equal(base[k], state[k])}
        own = {k for k in changed if f".ops.{col}." in k}
        assert changed - own == {"op_rank", "alphas.normal", "alphas.reduce"}, name
        if name != "avg_pool_3x3":                 # a pooling column has no weights to draw
            assert any(k.endswith("weight") for k in own), name
        for ct in ("normal", "reduce"):
            others = [c for c in range(len(ops)) if c != col]
            assert torch.equal(state[f"alphas.{ct}"][:, others], base[f"alphas.{ct}"][:, others])


def test_a_compiled_supernet_scores_its_candidates_without_tracing():
    # Each candidate is a new op set, which a compiled supernet would trace (and compile) again for
    # a few no-grad passes: scoring runs the uncompiled forward, as the copies it replaced did.
    net = get_space("nb201").build_supernet(SupernetConfig(init_channels=4, layers=1))
    net.set_backend("fused")
    traces = []

    def counting_backend(gm, example_inputs):
        traces.append(gm)
        return gm.forward
    torch._dynamo.reset()
    net.compile("cells", backend=counting_backend)
    x, y = learnable_images(8, 4, 8)
    eager = copy.deepcopy(net)
    loss = mean_train_loss(net, [(x[:4], y[:4]), (x[4:], y[4:]), (x[:4], y[:4])])
    assert traces == []
    assert loss == pytest.approx(mean_train_loss(eager, [(x[:4], y[:4]), (x[4:], y[4:]), (x[:4], y[:4])]))
    with torch.no_grad():
        net(x[:4]), net(x[:4])                     # the compiled code is in use: warm call, then a trace
    assert traces
