"""The shared search loop: every method on every space, resume, warm-up, non-finite values."""
import pytest
import torch

from nascore.genotype import Genotype, NB201Genotype
from nascore.io import CheckpointError, load_checkpoint, save_torch
from nascore.methods import METHODS, get_method
from nascore.search import NonFiniteError, SearchConfig, SearchData, SearchRun, cosine_lr, search
from nascore.spaces import SPACES, get_space
from tests._tiny import TensorLoader, assert_searches_identical, learnable_images


def tiny_config(method="darts", space="darts", **overrides) -> SearchConfig:
    settings = get_method(method).resolved_settings()
    settings.update(epochs=2, batch_size=4, init_channels=4, layers=1 if space == "nb201" else 3,
                    arch_warmup_epochs=min(settings.get("arch_warmup_epochs", 0), 1), valid_every=1)
    settings.update(overrides)
    return SearchConfig(**settings)


def tiny_data(n=8, size=8, batch=4, x=None, y=None) -> SearchData:
    if x is None:
        x, y = learnable_images(2 * n, 4, size)
    return SearchData(TensorLoader(x[:n], y[:n], batch), TensorLoader(x[n:], y[n:], batch), 4,
                      score_fraction_batches=1)


@pytest.mark.parametrize("space", SPACES.names())
@pytest.mark.parametrize("method", METHODS.names())
def test_tiny_search_returns_a_valid_genotype(method, space):
    cfg = tiny_config(method, space)
    if cfg.op_schedule == "progressive" and get_space(space).uniform_ops is None:
        pytest.skip("progressive search needs one op list on every edge (s1 has per-edge lists)")
    result = search(get_space(space), cfg, tiny_data(), log=lambda s: None)
    g = result.genotype
    assert isinstance(g, NB201Genotype if space == "nb201" else Genotype)
    assert set(g.ops if space == "nb201" else g.ops()) <= set(get_space(space).op_names())
    assert len(result.history) == 2
    record = result.history[-1]
    for key in ("train_loss", "valid_acc", "param_free_ops", "alpha_entropy", "alphas", "genotype"):
        assert key in record
    assert record["genotype"] == g.to_json()


def test_search_learns_and_alphas_move():
    x, y = learnable_images(64, 4, 8, seed=3)
    cfg = tiny_config("darts", "nb201", epochs=4, batch_size=16, lr=0.05, arch_lr=3e-3)
    data = tiny_data(n=32, batch=16, x=x, y=y)
    result = search(get_space("nb201"), cfg, data, log=lambda s: None)
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < losses[0]
    assert result.history[-1]["alpha_entropy"] < result.history[0]["alpha_entropy"] + 1e-6


def test_lr_follows_the_cosine_schedule():
    cfg = tiny_config(epochs=3)
    result = search(get_space("darts"), cfg, tiny_data(), log=lambda s: None)
    assert [r["lr"] for r in result.history] == pytest.approx(
        [cosine_lr(e, 0.025, 0.001, 3) for e in range(3)])
    assert cosine_lr(0, 0.025, 0.001, 50) == 0.025
    assert cosine_lr(50, 0.025, 0.001, 50) == pytest.approx(0.001)


def test_arch_warm_up_keeps_alpha_and_beta_fixed():
    cfg = tiny_config("pc_darts", epochs=2, arch_warmup_epochs=2, partial_channels=2)
    run = SearchRun(get_space("darts"), cfg, tiny_data(), log=lambda s: None)
    alphas = [p.detach().clone() for p in run.model.arch_parameters()]
    result = run.run()
    assert all(torch.equal(a, p) for a, p in zip(alphas, run.model.arch_parameters()))
    assert [r["update_arch"] for r in result.history] == [False, False]
    assert "arch_loss" not in result.history[0]


@pytest.mark.parametrize("method", ["darts", "opp_darts", "pc_darts"])
def test_resume_after_interruption_equals_uninterrupted_run(method, tmp_path):
    torch.use_deterministic_algorithms(True)
    try:
        cfg = tiny_config(method, epochs=4, arch_warmup_epochs=1, partial_channels=2,
                          opp=SearchConfig().opp.__class__(stage_epochs=1, skip_after_epoch=1))
        full = search(get_space("darts"), cfg, tiny_data(), checkpoint_path=tmp_path / "a.pt",
                      log=lambda s: None)

        class Interrupt(Exception):
            pass

        def stop_after_two(record):
            if record["epoch"] == 2:
                raise Interrupt
        with pytest.raises(Interrupt):
            search(get_space("darts"), cfg, tiny_data(), checkpoint_path=tmp_path / "b.pt",
                   on_epoch_end=stop_after_two, log=lambda s: None)
        resumed = search(get_space("darts"), cfg, tiny_data(), checkpoint_path=tmp_path / "b.pt",
                         log=lambda s: None)
    finally:
        torch.use_deterministic_algorithms(False)
    assert resumed.resumed_from_epoch == 2
    assert resumed.genotype == full.genotype
    assert_searches_identical(full, resumed)


def test_finished_search_is_not_rerun_and_foreign_checkpoints_are_refused(tmp_path):
    path = tmp_path / "search.pt"
    cfg = tiny_config(epochs=1)
    first = search(get_space("darts"), cfg, tiny_data(), checkpoint_path=path, log=lambda s: None,
                   meta={"method": "darts"})
    again = search(get_space("darts"), cfg, tiny_data(), checkpoint_path=path, log=lambda s: None,
                   meta={"method": "darts"})
    assert again.resumed_from_epoch == 1 and again.genotype == first.genotype
    with pytest.raises(CheckpointError, match="method='darts', this run has method='pc_darts'"):
        search(get_space("darts"), cfg, tiny_data(), checkpoint_path=path, log=lambda s: None,
               meta={"method": "pc_darts"})
    good = load_checkpoint(path, kind="search")
    for damage, match in (({"epoch": "x"}, r"epoch 'x' is not a whole number in \[0, 1\]"),
                          ({"epoch": 99}, r"epoch 99 is not a whole number"),
                          ({"history": good["history"] * 2}, "history holds 2 records for epoch 1"),
                          ({"lr_segment": []}, "does not fit this search"),
                          ({"w_opt": {"state": {}}}, "does not fit this search")):
        save_torch(path, {**good, **damage})      # a hand-edited or damaged file: refused, not trusted
        with pytest.raises(CheckpointError, match=match):
            search(get_space("darts"), cfg, tiny_data(), checkpoint_path=path, log=lambda s: None,
                   meta={"method": "darts"})
    save_torch(path, good)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        search(get_space("darts"), cfg, tiny_data(), checkpoint_path=path, log=lambda s: None,
               meta={"method": "darts"})


def poisoned_data(bad_step: int) -> SearchData:
    x, y = learnable_images(16, 4, 8)
    x[bad_step * 4] = float("nan")           # the first image of train batch `bad_step` (no shuffle)
    train = TensorLoader(x[:8], y[:8], 4, shuffle=False)
    return SearchData(train, TensorLoader(x[8:], y[8:], 4), 4)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    path = tmp_path / "search.pt"
    cfg = tiny_config(epochs=1)
    search(get_space("nb201"), tiny_config(space="nb201", epochs=1), tiny_data(), checkpoint_path=path,
           log=lambda s: None)
    good = path.read_bytes()
    cfg = tiny_config(space="nb201", epochs=2)
    with pytest.raises(NonFiniteError, match="epoch 2, step 2 .* the checkpoint after epoch 1 is kept"):
        search(get_space("nb201"), cfg, poisoned_data(1), checkpoint_path=path, log=lambda s: None)
    assert path.read_bytes() == good


def test_non_finite_batches_can_be_skipped_and_counted():
    cfg = tiny_config(space="nb201", epochs=1, nonfinite="skip")
    result = search(get_space("nb201"), cfg, poisoned_data(1), log=lambda s: None)
    assert result.history[0]["skipped_batches"] == 1
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_an_epoch_with_every_batch_skipped_stops_instead_of_reporting_a_zero_loss(tmp_path):
    x, y = learnable_images(16, 4, 8)
    x[:8] = float("nan")                      # every train batch
    data = SearchData(TensorLoader(x[:8], y[:8], 4, shuffle=False), TensorLoader(x[8:], y[8:], 4), 4)
    cfg = tiny_config(space="nb201", epochs=1, nonfinite="skip")
    with pytest.raises(NonFiniteError, match="every one of epoch 1's 2 batches .* skipped"):
        search(get_space("nb201"), cfg, data, checkpoint_path=tmp_path / "s.pt", log=lambda s: None)
    assert not (tmp_path / "s.pt").exists()


def test_hessian_eigenvalue_is_reported_when_asked():
    cfg = tiny_config(space="nb201", epochs=1, hessian_eigenvalue=True, hessian_iters=5)
    result = search(get_space("nb201"), cfg, tiny_data(), log=lambda s: None)
    assert isinstance(result.history[0]["hessian_eigenvalue"], float)
    assert "hessian_eigenvalue" not in search(get_space("nb201"), tiny_config(space="nb201", epochs=1),
                                              tiny_data(), log=lambda s: None).history[0]


@pytest.mark.parametrize("space,common,on,off", [
    ("nb201", {"drop_path": 0.4}, {"hessian_eigenvalue": True, "hessian_iters": 2}, {}),
    ("s4", {}, {"valid_every": 1}, {"valid_every": 0})], ids=["hessian-drop_path", "validation-s4_noise"])
def test_a_monitoring_option_leaves_the_search_s_trajectory_as_it_was(space, common, on, off):
    """What only observes a search draws its random numbers from a forked stream
    (`diagnostics.forked_rng`): the Hessian eigenvalue's drop-path masks, S4's noise in
    validation. The same α, weights and losses with it on as off; until 2026-12-06 either moved
    the search onto another trajectory."""
    runs = []
    for options in (off, on):
        torch.manual_seed(0)
        runs.append(search(get_space(space), tiny_config(space=space, epochs=3, **common, **options), tiny_data(),
                           log=lambda s: None))
    assert set(runs[1].history[-1]) > set(runs[0].history[-1])
    for (name, a), b in zip(runs[0].model.state_dict().items(), runs[1].model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [r["train_loss"] for r in runs[0].history] == [r["train_loss"] for r in runs[1].history]


def test_regularised_search_ramps_drop_path_and_takes_cutout():
    cfg = tiny_config(space="nb201", epochs=2, drop_path=0.4)
    run = SearchRun(get_space("nb201"), cfg, tiny_data(), log=lambda s: None)
    probs = []
    run.on_epoch_end = lambda r: probs.append(run.model.cells_drop_prob())
    from nascore.supernet import MixedOp
    run.model.cells_drop_prob = lambda: {m.drop_prob for m in run.model.modules() if isinstance(m, MixedOp)}
    run.run()
    assert probs == [{0.0}, {0.2}]                  # p_e = 0.4 * e / 2
    # the fused backends drop too (tests/test_fused.py: the same factors give eager's numbers)
    fused = SearchRun(get_space("nb201"), tiny_config(space="nb201", epochs=2, drop_path=0.4, backend="fused_dense"),
                      tiny_data(), log=lambda s: None)
    fused_probs = []
    fused.on_epoch_end = lambda r: fused_probs.append(fused.model._drop_prob)
    fused.run()
    assert fused_probs == [0.0, 0.2]


@pytest.mark.parametrize("compiled,drop_path,matmul_mix,by_matmul", [
    (False, 0.0, None, True),       # auto, uncompiled: one product per pass (fewer kernels)
    (True, 0.0, None, False),       # auto, compiled: chained adds, which inductor fuses
    (True, 0.4, None, True),        # drop-path's factors scale the product's entries
    (True, 0.0, True, True), (False, 0.0, False, False)])       # what params.yaml says
def test_a_compiled_search_sums_its_nodes_by_chained_adds_unless_told(compiled, drop_path, matmul_mix, by_matmul):
    cfg = tiny_config(space="nb201", backend="fused_dense", compile=compiled, drop_path=drop_path,
                      matmul_mix=matmul_mix)
    assert cfg.mixes_by_matmul() is by_matmul
    run = SearchRun(get_space("nb201"), cfg, tiny_data(), log=lambda s: None)    # compiles lazily
    assert run.model.matmul_mix is by_matmul


def test_merged_batches_concatenate_consecutive_batches_in_order():
    from nascore.search import merged_batches
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    batches = [(x[i:i + 3], y[i:i + 3]) for i in range(0, 10, 3)]       # 3, 3, 3, 1 images
    merged = list(merged_batches(batches, 5))
    assert [len(b[1]) for b in merged] == [6, 4]
    assert torch.equal(torch.cat([b[0] for b in merged]), x) and torch.equal(torch.cat([b[1] for b in merged]), y)
    assert all(m[0] is b[0] for m, b in zip(merged_batches(batches, 3), batches))   # large enough: no copy


def test_validation_in_merged_batches_gives_the_batch_by_batch_figures_in_fewer_forwards():
    x, y = learnable_images(2 * 24, 4, 8)
    figures, forwards = [], []
    for valid_batch in (4, 512):
        run = SearchRun(get_space("darts"), tiny_config(valid_batch_size=valid_batch),
                        tiny_data(n=24, x=x, y=y), log=lambda s: None)
        calls = []
        run.model.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
        figures.append(run.validate())
        forwards.append(calls)
    assert forwards == [[4] * 6, [24]]
    assert figures[0]["valid_acc"] == figures[1]["valid_acc"]
    assert figures[0]["valid_loss"] == pytest.approx(figures[1]["valid_loss"], rel=1e-5)


@pytest.mark.parametrize("backend", ["eager", "fused_dense"])
@pytest.mark.parametrize("amp,channels_last", [("none", False), ("none", True), ("bf16", True)])
def test_validation_runs_in_the_searchs_precision_and_layout(amp, channels_last, backend):
    """The per-epoch validation forwards take the steps' autocast and memory format (at 512
    images they are GPU-bound: fp32 NCHW would cost more than the steps' settings)."""
    x, y = learnable_images(2 * 24, 4, 8)
    cfg = tiny_config(space="nb201", amp=amp, channels_last=channels_last, backend=backend)
    run = SearchRun(get_space("nb201"), cfg, tiny_data(n=24, x=x, y=y), log=lambda s: None)
    seen = []
    run.model.register_forward_hook(lambda m, args, out: seen.append(
        (args[0].is_contiguous(memory_format=torch.channels_last), out.dtype, m.training, torch.is_grad_enabled())))
    figures = run.validate()
    assert seen == [(channels_last, torch.bfloat16 if amp == "bf16" else torch.float32, False, False)]
    assert run.model.training
    fp32 = SearchRun(get_space("nb201"), tiny_config(space="nb201", backend=backend), tiny_data(n=24, x=x, y=y),
                     log=lambda s: None).validate()
    assert figures["valid_loss"] == pytest.approx(fp32["valid_loss"], rel=0.02 if amp == "bf16" else 1e-5)


def test_a_cpu_search_records_no_gpu_memory():
    history = search(get_space("nb201"), tiny_config(space="nb201", epochs=1), tiny_data(), log=lambda s: None).history
    assert "peak_memory_mb" not in history[0] and "peak_reserved_mb" not in history[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_gpu_search_records_each_epochs_peak_memory():
    x, y = learnable_images(16, 4, 8)
    data = SearchData(TensorLoader(x.cuda(), y.cuda(), 4), TensorLoader(x.cuda(), y.cuda(), 4), 4)
    small = search(get_space("nb201"), tiny_config(space="nb201", epochs=2), data, device="cuda",
                   log=lambda s: None).history
    wide = search(get_space("nb201"), tiny_config(space="nb201", epochs=1, init_channels=32), data,
                  device="cuda", log=lambda s: None).history
    for r in small + wide:
        assert 0 < r["peak_memory_mb"] <= r["peak_reserved_mb"]
    assert wide[0]["peak_memory_mb"] > small[-1]["peak_memory_mb"]     # 4x the channels: more memory


class CountingLoader(TensorLoader):
    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.batches = 0

    def __iter__(self):
        for batch in super().__iter__():
            self.batches += 1
            yield batch


def test_alpha_steps_take_the_arch_loader_and_validation_the_alpha_half():
    x, y = learnable_images(24, 4, 8)
    train, val, arch = (CountingLoader(x[:8], y[:8], 4), CountingLoader(x[8:16], y[8:16], 4),
                        CountingLoader(x[16:], y[16:], 4))
    cfg = tiny_config(space="nb201", epochs=1, valid_every=1)
    search(get_space("nb201"), cfg, SearchData(train, val, 4, score_fraction_batches=1, arch=arch),
           log=lambda s: None)
    assert arch.batches == len(train) == 2        # one α batch per weight step, from `arch`
    assert val.batches == 2                       # the epoch's validation pass over the α half
