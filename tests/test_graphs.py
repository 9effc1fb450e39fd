"""nascore/graphs.py: the CUDA-graph capture the search loop and `train` share (GPU only), and the
check of the CPU's bf16 channels_last dilated convs."""
import pytest
import torch
from torch import nn

from nascore.graphs import (bf16_layout_problem, cpu_bf16_dilated_grads_ok, cuda_graph, inductor_options,
                            side_stream)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_an_epochs_capture_does_not_stack_on_the_last_ones_memory():
    # what the search loop and `train` do once per epoch: warm-up steps on a side stream, a
    # capture, replays, then the epoch's graph is dropped
    device = torch.device("cuda")
    w = torch.randn(2048, 2048, device=device)
    out = torch.zeros((), device=device)

    def step() -> None:
        out.copy_((w @ w).relu().sum())          # 16 MB temporaries, freed within the step

    reserved = []
    for _ in range(4):
        with side_stream(device):
            step()
        graph = cuda_graph(step)
        graph.replay()
        torch.cuda.synchronize()
        expected = (w @ w).relu().sum()
        torch.testing.assert_close(out, expected)
        del graph
        reserved.append(torch.cuda.memory_reserved(device))
    # each epoch's side-stream blocks and graph pool are new: unless the capture releases the
    # cached blocks, nothing reuses the last epoch's and the reserved memory grows per epoch
    assert reserved[-1] <= reserved[0] + 4 * 2**20, [r / 2**20 for r in reserved]


# --- the CPU's bf16 channels_last dilated convs (`bf16_layout_problem`) -----------------------
def test_the_probe_measures_a_dilated_convs_bf16_weight_gradient():
    # NCHW bf16 is right on every torch we know: the probe must say so (its channels_last answer
    # is this torch's and is what the check below uses; torch 2.14.1 on the CPU: wrong)
    assert cpu_bf16_dilated_grads_ok(torch.contiguous_format) is True
    assert isinstance(cpu_bf16_dilated_grads_ok(), bool)


def _bf16_weight_gradient_error(batch: int, channels: int, groups: int, size: int, kernel: int) -> float:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, channels, size, size, generator=g, dtype=torch.float64)
    w = torch.randn(channels, channels // groups, kernel, kernel, generator=g, dtype=torch.float64) * 0.1
    grad_out = torch.randn(batch, channels, size, size, generator=g, dtype=torch.float64)
    cl = torch.channels_last
    weight = w.to(torch.bfloat16).contiguous(memory_format=cl).requires_grad_(True)
    pad = kernel - 1                                                     # dilation 2, same size
    y = torch.nn.functional.conv2d(x.to(torch.bfloat16).contiguous(memory_format=cl), weight, padding=pad,
                                   dilation=2, groups=groups)
    (got,) = torch.autograd.grad(y, weight, grad_out.to(torch.bfloat16).contiguous(memory_format=cl))
    expected = torch.nn.grad.conv2d_weight(x, w.shape, grad_out, padding=pad, dilation=2, groups=groups)
    return float((got.double() - expected).abs().max() / expected.abs().max())


def test_the_probe_fails_wherever_a_networks_own_dilated_convs_get_wrong_gradients():
    """The dilated convs the networks run at their first stage's 32×32 px, at their batch: an
    eager search's `dil_conv` (depthwise, 16 channels, batch 64, 3×3 and 5×5), an eager
    retrain's (36 channels, batch 96) and a `fused_dense` retrain's composed one (dense, 36
    channels). Where this torch gets any of them wrong, the start-up probe must say so (a probe
    of one dense 16-channel conv passed on torch 2.14.1, whose bf16 retrain then stopped on a
    NaN); where it gets all of them right, it may say either."""
    errors = {(b, c, gr, k): _bf16_weight_gradient_error(b, c, gr, 32, k)
              for b, c, gr, k in [(64, 16, 16, 3), (64, 16, 16, 5), (96, 36, 36, 3), (96, 36, 1, 3)]}
    wrong = {shape: e for shape, e in errors.items() if not e < 0.05}        # NaN is wrong too
    if wrong:
        assert cpu_bf16_dilated_grads_ok() is False, wrong


def _dilated_network(frozen: bool = False) -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=2, dilation=2), nn.BatchNorm2d(4))
    net[0].weight.requires_grad_(not frozen)
    return net


@pytest.mark.parametrize("device,amp,channels_last,frozen,dilated,problem", [
    ("cpu", "bf16", True, False, True, True),
    ("cpu", "bf16", True, True, True, False),       # random features: no weight gradient needed
    ("cpu", "bf16", True, False, False, False),     # no dilated conv
    ("cpu", "bf16", False, False, True, False),
    ("cpu", "none", True, False, True, False),
    ("cuda", "bf16", True, False, True, False),     # cuDNN: not affected
])
def test_bf16_channels_last_on_a_cpu_that_gets_dilated_gradients_wrong_is_refused(
        device, amp, channels_last, frozen, dilated, problem):
    net = _dilated_network(frozen) if dilated else nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    probed = []
    msg = bf16_layout_problem(net, torch.device(device), amp, channels_last,
                              grads_ok=lambda: probed.append(1) or False)
    assert (msg is not None) == problem
    if problem:
        assert "channels_last: false" in msg and "amp: none" in msg and torch.__version__ in msg
    assert bf16_layout_problem(net, torch.device(device), amp, channels_last, grads_ok=lambda: True) is None
    assert len(probed) == problem        # probed only where it matters: it costs two convs at 32×32 px


def test_a_search_and_a_retrain_refuse_it_with_a_params_error(monkeypatch, tmp_path):
    from nascore.config import ConfigError
    from nascore.genotype import PUBLISHED_GENOTYPES
    from nascore.networks import NetworkCIFAR
    from nascore.search import SearchRun
    from nascore.spaces import get_space
    from nascore.train import TrainConfig, train
    from tests.test_fused import tiny_data, tiny_search_config
    monkeypatch.setattr("nascore.graphs.cpu_bf16_dilated_grads_ok", lambda: False)
    cfg = tiny_search_config("darts", "darts", amp="bf16", channels_last=True, epochs=1)
    with pytest.raises(ConfigError, match=r"params.yaml: search.amp: bf16 with channels_last: true on the CPU"):
        SearchRun(get_space("darts"), cfg, tiny_data(dtype=torch.float32), log=lambda s: None)
    net = NetworkCIFAR(PUBLISHED_GENOTYPES["DARTS_V2"], 4, 10, 3, auxiliary=False)   # a normal cell: dil_conv_3x3
    with pytest.raises(ConfigError, match="train.amp: bf16 with channels_last: true on the CPU"):
        train(net, [(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))], None,
              TrainConfig(epochs=1, amp="bf16", channels_last=True, progress="none"),
              checkpoint_path=tmp_path / "ckpt.pt", device="cpu")


@pytest.mark.parametrize("device,amp,frozen,dilated,turned_off", [
    ("cpu", "bf16", False, True, True),
    ("cpu", "bf16", True, True, False),             # random features: no weight gradient needed
    ("cpu", "bf16", False, False, False),           # no dilated conv
    ("cpu", "none", False, True, False),
    ("cuda", "bf16", False, True, False),           # cuDNN: not affected
])
def test_inductor_keeps_its_layout_choice_off_the_convs_a_cpu_gets_wrong(device, amp, frozen, dilated, turned_off):
    """An NCHW run (channels_last: false, which `bf16_layout_problem` lets through) compiled by
    inductor: its layout optimisation would run the convs channels_last anyway, into the wrong
    gradients. Off exactly where the run would reach them (tests/test_train.py: what a compiled
    retrain learned there without it)."""
    net = _dilated_network(frozen) if dilated else nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    probed = []
    options = inductor_options(net, torch.device(device), amp, grads_ok=lambda: probed.append(1) or False)
    assert options == ({"layout_optimization": False} if turned_off else {})
    assert inductor_options(net, torch.device(device), amp, grads_ok=lambda: True) == {}
    assert len(probed) == turned_off


def test_a_compiled_search_compiles_with_those_options(monkeypatch):
    """`search.compile` hands the supernet's compile inductor's options (compiling the supernet
    with inductor itself takes minutes on the CPU: the retrain's test compiles a small network)."""
    from nascore.search import SearchRun
    from nascore.spaces import get_space
    from nascore.supernet import Supernet
    from tests.test_fused import tiny_data, tiny_search_config
    seen = []
    monkeypatch.setattr(Supernet, "compile", lambda self, scope="cells", **kwargs: seen.append((scope, kwargs)))
    for grads_ok, expected in ((False, {"options": {"layout_optimization": False}}), (True, {})):
        monkeypatch.setattr("nascore.graphs.cpu_bf16_dilated_grads_ok", lambda ok=grads_ok: ok)
        cfg = tiny_search_config("darts", "darts", amp="bf16", compile=True, epochs=1)
        SearchRun(get_space("darts"), cfg, tiny_data(dtype=torch.float32), log=lambda s: None)
        assert seen.pop() == (cfg.compile_scope, expected)


# --- the CPU stand-in for a CUDA graph the tests capture with (tests/_graph_tape.py) -------------

def test_the_tape_stand_in_keeps_captured_numbers_and_reads_tensors_at_each_replay():
    """Like a CUDA graph: capturing performs no step and draws no random number; a replay uses
    the Python numbers of the capture and the tensors' values at the replay; an op without a
    schema mark for its write (BN's running statistics) is undone and replayed too."""
    from tests._graph_tape import TapeGraph
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3)
    w = torch.ones(3)
    lr_tensor = torch.tensor(0.5)
    lr_float = 0.5
    x = torch.randn(8, 3)

    def step() -> None:
        noise = torch.rand(3)
        w.sub_(lr_float * (bn(x).mean(0) + noise))
        w.sub_(lr_tensor * noise)

    state = torch.get_rng_state()
    graph = TapeGraph(step)
    assert torch.equal(w, torch.ones(3)) and torch.equal(bn.running_mean, torch.zeros(3))
    assert torch.equal(torch.get_rng_state(), state)
    lr_float, expected_float = 100.0, 0.5        # the capture's float, not this one
    lr_tensor.fill_(2.0)
    noise = torch.rand(3, generator=torch.Generator().set_state(state))
    graph.replay()
    with torch.no_grad():
        reference = nn.BatchNorm1d(3)
        y = reference(x).mean(0)
    torch.testing.assert_close(w, torch.ones(3) - expected_float * (y + noise) - 2.0 * noise)
    torch.testing.assert_close(bn.running_mean, reference.running_mean)
    before = w.clone()
    noise2 = torch.rand(3, generator=torch.Generator().set_state(torch.get_rng_state()))
    graph.replay()                                # a second step: the next random numbers
    assert not torch.equal(noise2, noise)
    torch.testing.assert_close(w, before - expected_float * (y + noise2) - 2.0 * noise2)


def test_the_tape_stand_in_refuses_a_host_read_as_a_capture_would():
    from tests._graph_tape import HostRead, TapeGraph
    x = torch.randn(4)
    with pytest.raises(HostRead, match="_local_scalar_dense"):
        TapeGraph(lambda: x.mul_(2.0 if x.sum().item() > 0 else 3.0))
