"""Evaluation networks and their cost (nascore.networks, nascore.metrics; methods.md §1.1-§1.3).

The parameter counts and MACs of the published cells are the acceptance bar: a count that is off
means the network is wrong, never the number.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nascore import fused
from nascore.genotype import PUBLISHED_GENOTYPES, Genotype, NB201Genotype
from nascore.metrics import FlopReport, count_flops, count_parameters, params_m
from nascore.networks import (
    AuxiliaryHeadCIFAR, DartsEvalCell, NB201Network, NetworkCIFAR, NetworkImageNet,
    build_eval_network, drop_path,
)
from nascore.ops import GlobalAvgPool, Identity
from tests._tiny import (CountOps, assert_paired_runs_as_one, in_layout, lowers_with_inductor, scramble_bn_affine,
                         scramble_bn_statistics)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny convs gain nothing from intra-op threads, and on a shared 2-core box a busy neighbour
    # makes 2-thread barriers 10-100× slower; restore the setting for other test modules.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def seeded():
    # random inputs, inits and drop-path masks: every test sees the same draws on every run
    torch.manual_seed(0)


NAMES = list(PUBLISHED_GENOTYPES)

# methods.md §1.1 table: params with the auxiliary head excluded.
CIFAR10_PARAMS = {
    "DARTS_V1": 3_169_414, "DARTS_V2": 3_349_342, "PC_DARTS_cifar": 3_634_678,
    "PC_DARTS_image": 3_721_510, "OPP_DARTS": 3_359_062,
}
IMAGENET_PARAMS = {
    "DARTS_V1": 4_510_432, "DARTS_V2": 4_718_752, "PC_DARTS_cifar": 5_270_560,
    "PC_DARTS_image": 5_342_464, "OPP_DARTS": 4_967_776,
}
# conv + linear multiply-adds at 224 px, in millions, rounded (methods.md §1.1)
IMAGENET_MACS_M = {"DARTS_V1": 506, "DARTS_V2": 530, "PC_DARTS_cifar": 571,
                   "PC_DARTS_image": 582, "OPP_DARTS": 536}

BEST_NB201 = ("|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|"
              "+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|")
ALL_NONE_NB201 = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"
ALL_CONV_NB201 = ("|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|"
                  "+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|")

# An S4 cell (ops {noise, sep_conv_3x3}): noise on stride-2 edges of the reduce cell too.
S4_GENOTYPE = Genotype(
    normal=(("noise", 0), ("sep_conv_3x3", 1), ("noise", 1), ("sep_conv_3x3", 0),
            ("noise", 2), ("sep_conv_3x3", 3), ("sep_conv_3x3", 4), ("noise", 0)),
    reduce=(("noise", 0), ("noise", 1), ("sep_conv_3x3", 0), ("noise", 2),
            ("sep_conv_3x3", 1), ("noise", 3), ("noise", 4), ("sep_conv_3x3", 0)),
)


# --- parameter counts ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_cifar10_params_match_table(name: str) -> None:
    net = NetworkCIFAR(PUBLISHED_GENOTYPES[name], C=36, num_classes=10, layers=20, auxiliary=True)
    assert count_parameters(net) == CIFAR10_PARAMS[name]


def test_cifar100_params_add_only_classifier_outputs() -> None:
    net = NetworkCIFAR(PUBLISHED_GENOTYPES["DARTS_V2"], num_classes=100)
    assert count_parameters(net) == 3_401_272
    # the difference is 90 extra outputs of a 576-input linear: 90 * (576 + 1)
    assert 3_401_272 - CIFAR10_PARAMS["DARTS_V2"] == 90 * 577


@pytest.mark.parametrize("name", NAMES)
def test_imagenet_params_match_table(name: str) -> None:
    net = NetworkImageNet(PUBLISHED_GENOTYPES[name], C=48, num_classes=1000, layers=14)
    assert count_parameters(net) == IMAGENET_PARAMS[name]


def test_auxiliary_heads_are_excluded_and_sized_as_specified() -> None:
    # CIFAR head on cell 2L//3's output: 4 nodes × 144 ch = 576 in.
    # 576·128 (1×1) + 2·128 (BN) + 128·768·4 (2×2) + 2·768 (BN) + 768·10 + 10 = 476,426
    net = NetworkCIFAR(PUBLISHED_GENOTYPES["DARTS_V2"])
    assert count_parameters(net, exclude_auxiliary=False) - count_parameters(net) == 476_426
    assert params_m(net) == pytest.approx(3.349342)
    # ImageNet head: 4 × 192 = 768 in, no BN after the 768-ch conv:
    # 768·128 + 2·128 + 128·768·4 + 768·1000 + 1000 = 1,260,776
    net = NetworkImageNet(PUBLISHED_GENOTYPES["DARTS_V2"])
    assert count_parameters(net, exclude_auxiliary=False) - count_parameters(net) == 1_260_776
    # without a head there is nothing to exclude
    net = NetworkCIFAR(PUBLISHED_GENOTYPES["DARTS_V2"], auxiliary=False)
    assert count_parameters(net, exclude_auxiliary=False) == CIFAR10_PARAMS["DARTS_V2"]


# --- FLOPs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_imagenet_macs_match_table(name: str) -> None:
    report = count_flops(NetworkImageNet(PUBLISHED_GENOTYPES[name]), input_size=(1, 3, 224, 224))
    assert isinstance(report, FlopReport)
    assert report.macs == report.flops // 2
    # the table rounds to 1M: within rounding, which is far inside the 1% the brief allows
    assert abs(report.macs / 1e6 - IMAGENET_MACS_M[name]) <= 0.5
    assert set(report.by_op) == {"convolution", "addmm"}
    assert report.by_op["addmm"] == 2 * 768 * 1000   # classifier 4 × 192 → 1000, no bias


def test_count_flops_is_side_effect_free() -> None:
    net = NetworkCIFAR(PUBLISHED_GENOTYPES["DARTS_V2"], C=8, layers=5)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = count_flops(net, input_size=(2, 3, 32, 32))
    assert net.training                            # mode restored
    for k, v in net.state_dict().items():          # eval mode: BN running stats untouched
        assert torch.equal(v, before[k]), k
    # per-sample cost scales with the batch
    assert report.flops == 2 * count_flops(net, input_size=(1, 3, 32, 32)).flops


def _capture_input(module: torch.nn.Module) -> dict:
    captured: dict = {}

    def hook(mod, inputs, output) -> None:   # returning None keeps the module's output
        captured["in"] = inputs[0].shape
    module.register_forward_hook(hook)
    return captured


# --- forward shapes ------------------------------------------------------------------------------
def test_cifar_forward_full_size_train_and_eval() -> None:
    net = NetworkCIFAR(PUBLISHED_GENOTYPES["DARTS_V2"])
    x = torch.randn(2, 3, 32, 32)
    net.train()
    logits, aux = net(x)
    assert logits.shape == (2, 10) and aux is not None and aux.shape == (2, 10)
    net.eval()
    with torch.no_grad():
        logits, aux = net(x)
    assert logits.shape == (2, 10) and aux is None


@pytest.mark.parametrize("name", NAMES)
def test_cifar_small_forward_backward(name: str) -> None:
    net = NetworkCIFAR(PUBLISHED_GENOTYPES[name], C=8, num_classes=100, layers=5)
    net.drop_path_prob = 0.2
    logits, aux = net(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 100) and aux.shape == (4, 100)
    (logits.sum() + 0.4 * aux.sum()).backward()    # drop-path must not break autograd
    assert all(p.grad is not None for p in net.parameters())


def test_no_aux_logits_without_head() -> None:
    net = NetworkCIFAR(PUBLISHED_GENOTYPES["DARTS_V1"], C=8, layers=5, auxiliary=False).train()
    logits, aux = net(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and aux is None and net.auxiliary_head is None


def test_imagenet_forward_small_input() -> None:
    # 64 px: 64 → 8 after the stem, 2×2 at the end; every size divisible by 32 runs
    net = NetworkImageNet(PUBLISHED_GENOTYPES["PC_DARTS_image"]).eval()
    with torch.no_grad():
        logits, aux = net(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1000) and aux is None
    small = NetworkImageNet(PUBLISHED_GENOTYPES["PC_DARTS_image"], C=16, num_classes=7,
                            auxiliary=False).train()
    logits, aux = small(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 7) and aux is None


def test_imagenet_aux_head_too_small_input_is_a_clear_error() -> None:
    net = NetworkImageNet(PUBLISHED_GENOTYPES["DARTS_V2"], C=16, num_classes=7).train()
    with pytest.raises(ValueError, match="auxiliary=False"):
        net(torch.randn(2, 3, 64, 64))


def test_imagenet_forward_224_with_aux() -> None:
    net = NetworkImageNet(PUBLISHED_GENOTYPES["DARTS_V2"]).train()
    captured = _capture_input(net.auxiliary_head)
    logits, aux = net(torch.randn(2, 3, 224, 224))
    assert logits.shape == (2, 1000) and aux.shape == (2, 1000)
    assert captured["in"][-2:] == (7, 7)         # the reference size the head is designed for


def test_cifar_aux_head_sees_8x8() -> None:
    net = NetworkCIFAR(PUBLISHED_GENOTYPES["DARTS_V2"], C=8, layers=8).train()
    assert isinstance(net.auxiliary_head, AuxiliaryHeadCIFAR)
    captured = _capture_input(net.auxiliary_head)
    net(torch.randn(2, 3, 32, 32))
    assert captured["in"] == (2, 4 * 32, 8, 8)   # after cell 2L//3 = 5: 4 nodes × 4C channels


def test_reduction_cells_and_preprocessing() -> None:
    net = NetworkCIFAR(PUBLISHED_GENOTYPES["DARTS_V2"], C=8, layers=20)
    assert [i for i, c in enumerate(net.cells) if c.reduction] == [6, 13]
    # FactorizedReduce preprocessing exactly after a reduction cell
    fr = [i for i, c in enumerate(net.cells) if type(c.preprocess0).__name__ == "FactorizedReduce"]
    assert fr == [7, 14]
    inet = NetworkImageNet(PUBLISHED_GENOTYPES["DARTS_V2"], C=8)
    fr = [i for i, c in enumerate(inet.cells) if type(c.preprocess0).__name__ == "FactorizedReduce"]
    assert fr == [0, 5, 10]                      # cell 0: stem0 is treated as a reduction


# --- drop-path -----------------------------------------------------------------------------------
def test_drop_path_function_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.ones(20_000, 1, 1, 1)
    y = drop_path(x, 0.3, generator=g)
    kept = y != 0
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.7))
    assert abs(1 - kept.float().mean().item() - 0.3) < 0.02      # drop rate ≈ p (σ ≈ 0.003)
    assert abs(y.mean().item() - 1.0) < 0.02                      # E[out] = x (σ ≈ 0.005)
    # reproducible from a seeded generator; p = 0 returns the input itself
    assert torch.equal(drop_path(x, 0.3, torch.Generator().manual_seed(0)), y)
    assert drop_path(x, 0.0) is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drop_path_at_a_tensor_probability_has_the_float_ones_statistics(dtype: torch.dtype) -> None:
    """A 0-dim tensor p (what a CUDA graph reads at each replay): the same drop rate and scale,
    masks in the input's dtype; at p = 0 the input's values, but drawn (the host never reads p)."""
    g = torch.Generator().manual_seed(0)
    x = torch.ones(20_000, 1, 1, 1, dtype=dtype)
    y = drop_path(x, torch.tensor(0.3), generator=g)
    assert y.dtype == dtype
    kept = y != 0
    assert torch.allclose(y[kept].float(), torch.full_like(y[kept].float(), 1 / 0.7), rtol=1e-2)
    assert abs(1 - kept.float().mean().item() - 0.3) < 0.02
    state = torch.get_rng_state()
    z = drop_path(x, torch.tensor(0.0))
    assert torch.equal(z, x) and not torch.equal(torch.get_rng_state(), state)


def test_a_network_reads_its_drop_path_tensor_while_kept_on_the_device() -> None:
    """`drop_path_on_device`: the setter writes the tensor in place, the forward follows it (the
    fused one-draw masks included), and None gives the float back."""
    torch.manual_seed(0)
    net = NetworkCIFAR(PUBLISHED_GENOTYPES["DARTS_V2"], C=4, num_classes=4, layers=3, auxiliary=False).train()
    net.set_backend("fused_dense")
    x = torch.randn(64, 3, 8, 8)
    net.drop_path_on_device("cpu")
    kept = net._drop_path_tensor
    net.drop_path_prob = 0.0
    ref = net(x)[0]
    assert torch.equal(net(x)[0], ref)                   # p = 0: all-ones masks
    net.drop_path_prob = 0.5
    assert net._drop_path_tensor is kept and kept.item() == 0.5
    assert not torch.allclose(net(x)[0], ref)            # the same tensor, now p = 0.5
    net.drop_path_on_device(None)
    net.drop_path_prob = 0.0
    rng = torch.get_rng_state()
    assert torch.equal(net(x)[0], ref) and torch.equal(torch.get_rng_state(), rng)   # a float again: no draw


def _probe_cell() -> DartsEvalCell:
    # every node = sep_conv(c_{k-1}) + none(c_{k-2}): nodes do not feed each other, so BN batch
    # statistics are the same with and without drop-path and a dropped node is exactly zero
    pairs = tuple(p for _ in range(4) for p in (("sep_conv_3x3", 1), ("none", 0)))
    return DartsEvalCell(Genotype(normal=pairs, reduce=pairs), 8, 8, 4,
                         reduction=False, reduction_prev=False).train()


def test_cell_p0_equals_plain_computation_and_draws_nothing() -> None:
    torch.manual_seed(1)
    cell = DartsEvalCell(PUBLISHED_GENOTYPES["DARTS_V2"], 8, 8, 4, False, False).train()
    s0, s1 = torch.randn(4, 8, 6, 6), torch.randn(4, 8, 6, 6)
    rng = torch.get_rng_state()
    out = cell(s0, s1, 0.0)
    assert torch.equal(torch.get_rng_state(), rng)
    # the plain DAG: node = op_a(h_a) + op_b(h_b), concat of nodes 2..5
    states = [cell.preprocess0(s0), cell.preprocess1(s1)]
    for n in range(4):
        a, b = 2 * n, 2 * n + 1
        states.append(cell.ops[a](states[cell.inputs[a]]) + cell.ops[b](states[cell.inputs[b]]))
    assert torch.equal(out, torch.cat(states[2:], dim=1))
    assert torch.equal(cell(s0, s1, 0.0), out)


def test_cell_drop_path_zeroes_samples_and_preserves_expectation() -> None:
    torch.manual_seed(0)
    cell = _probe_cell()
    s0, s1 = torch.randn(64, 8, 6, 6), torch.randn(64, 8, 6, 6)
    ref = cell(s0, s1, 0.0).view(64, 4, -1)            # (sample, node, features)
    p = 0.5
    out = cell(s0, s1, p).view(64, 4, -1)
    dropped = out.abs().amax(dim=-1) == 0
    kept = ~dropped
    assert torch.allclose(out[kept], ref[kept] / (1 - p), atol=1e-5)
    rate = dropped.float().mean().item()                # 256 Bernoulli(0.5) draws, σ ≈ 0.03
    assert 0.4 < rate < 0.6
    # the mean over many passes converges to the p = 0 output (unbiased drop-path)
    mean = torch.stack([cell(s0, s1, p) for _ in range(200)]).mean(0).view(64, 4, -1)
    rel = (mean - ref).norm() / ref.norm()
    assert rel < 0.1                                     # ≈ 1/sqrt(200) = 0.07 expected


def test_identity_is_never_dropped_but_strided_skip_is() -> None:
    skips = tuple(p for n in range(4) for p in (("skip_connect", 0), ("skip_connect", n + 1)))
    g = Genotype(normal=skips, reduce=skips)
    cell = DartsEvalCell(g, 8, 8, 8, reduction=False, reduction_prev=False).train()
    assert all(isinstance(op, Identity) for op in cell.ops) and not any(cell.droppable)
    s0, s1 = torch.randn(8, 8, 6, 6), torch.randn(8, 8, 6, 6)
    torch.manual_seed(0)
    assert torch.equal(cell(s0, s1, 0.9), cell(s0, s1, 0.0))
    # in a reduction cell skip_connect from an input is a FactorizedReduce: droppable
    red = DartsEvalCell(g, 8, 8, 8, reduction=True, reduction_prev=False)
    assert red.droppable == tuple(j < 2 for _, j in skips)


def test_network_drop_path_train_only() -> None:
    net = NetworkCIFAR(PUBLISHED_GENOTYPES["PC_DARTS_cifar"], C=8, layers=5)
    x = torch.randn(4, 3, 32, 32)
    net.eval()
    with torch.no_grad():
        ref = net(x)[0]
        net.drop_path_prob = 0.5
        rng = torch.get_rng_state()
        assert torch.equal(net(x)[0], ref)               # eval: no effect, no random draws
        assert torch.equal(torch.get_rng_state(), rng)
    net.train()
    torch.manual_seed(3)
    a = net(x)[0]
    torch.manual_seed(3)
    assert torch.equal(net(x)[0], a)                     # seeded → reproducible
    assert not torch.equal(net(x)[0], a)                 # a new draw drops other paths
    net.drop_path_prob = 0.0
    assert torch.equal(net(x)[0], net(x)[0])             # p = 0: deterministic in train mode
    with pytest.raises(ValueError, match="drop_path_prob"):
        net.drop_path_prob = 1.0


# --- NAS-Bench-201 -------------------------------------------------------------------------------
def test_nb201_param_count_from_first_principles() -> None:
    # C = 16, N = 5, 10 classes. nor_conv_3x3 (affine, no bias) at width c: 9c² + 2c (BN γ, β).
    # Cell of BEST_NB201: 5 × nor_conv_3x3 + 1 skip → 5(9c² + 2c).
    #   stage c=16: 5 cells × 5 × 2,336  =  58,400
    #   stage c=32: 5 cells × 5 × 9,280  = 232,000
    #   stage c=64: 5 cells × 5 × 36,992 = 924,800
    # stem: 3·16·9 + 32 = 464
    # ResBlock(16→32): 16·32·9 + 64 + 32·32·9 + 64 + 16·32 (shortcut 1×1) = 14,464
    # ResBlock(32→64): 32·64·9 + 128 + 64·64·9 + 128 + 32·64 = 57,600
    # final BN(64): 128; classifier 64·10 + 10 = 650
    # total = 1,288,506
    net = NB201Network(NB201Genotype.from_arch_string(BEST_NB201), C=16, N=5, num_classes=10)
    assert count_parameters(net) == 1_288_506
    # Public cross-check: the NB201 cost table's CIFAR-10 extremes are 0.073306M params (the
    # parameter-free cells: skeleton only, 464 + 14,464 + 57,600 + 128 + 650) and 1.531546M (all
    # six edges nor_conv_3x3: skeleton + 6 × 5 × (2,336 + 9,280 + 36,992)), with conv+linear
    # FLOPs 7.78305M and 220.11969M; those include the 10 classifier bias additions that
    # FlopCounterMode leaves out.
    for arch, params, macs in ((ALL_NONE_NB201, 73_306, 7_783_050),
                               (ALL_CONV_NB201, 1_531_546, 220_119_690)):
        net = NB201Network(NB201Genotype.from_arch_string(arch))
        assert count_parameters(net) == params
        assert count_flops(net, (1, 3, 32, 32)).macs + 10 == macs


def test_nb201_forward_and_all_none_cell() -> None:
    for arch in (BEST_NB201, ALL_NONE_NB201,
                 "|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|none~0|skip_connect~1|avg_pool_3x3~2|"):
        net = NB201Network(NB201Genotype.from_arch_string(arch), C=8, N=2, num_classes=100)
        for train in (True, False):
            net.train(train)
            logits, aux = net(torch.randn(2, 3, 32, 32))
            assert logits.shape == (2, 100) and aux is None
            assert torch.isfinite(logits).all()
    # ImageNet16-120 runs through the same skeleton at 16 px
    logits, _ = net.eval()(torch.randn(2, 3, 16, 16))
    assert logits.shape == (2, 100)


def test_nb201_affine_cells_have_no_conv_bias() -> None:
    net = NB201Network(NB201Genotype.from_arch_string(ALL_CONV_NB201), C=8, N=1)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(c.bias is None for c in convs) and all(b.affine for b in bns)


# --- S4 noise ------------------------------------------------------------------------------------
def test_s4_noise_genotype_builds_and_runs() -> None:
    net = NetworkCIFAR(S4_GENOTYPE, C=8, layers=5).train()
    net.drop_path_prob = 0.2
    logits, aux = net(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and aux.shape == (2, 10)
    assert torch.isfinite(logits).all()
    # noise has no parameters: swapping it for another parameter-free op changes no count
    as_none = Genotype(normal=tuple(("none" if o == "noise" else o, j) for o, j in S4_GENOTYPE.normal),
                       reduce=tuple(("none" if o == "noise" else o, j) for o, j in S4_GENOTYPE.reduce))
    assert count_parameters(net) == count_parameters(NetworkCIFAR(as_none, C=8, layers=5))
    full = NetworkCIFAR(S4_GENOTYPE)                      # the 20-cell / 36-ch evaluation size
    assert count_parameters(full) > 0


# --- builder -------------------------------------------------------------------------------------
def test_build_eval_network_dispatch_and_defaults() -> None:
    g = PUBLISHED_GENOTYPES["DARTS_V2"]
    net = build_eval_network(g, dataset_kind="cifar", num_classes=10)
    assert type(net) is NetworkCIFAR and count_parameters(net) == CIFAR10_PARAMS["DARTS_V2"]
    assert net.auxiliary_head is not None
    net = build_eval_network(g, dataset_kind="imagenet", num_classes=1000)
    assert type(net) is NetworkImageNet and count_parameters(net) == IMAGENET_PARAMS["DARTS_V2"]
    net = build_eval_network(g, dataset_kind="cifar", num_classes=100, init_channels=16, layers=8,
                             auxiliary=False)
    assert len(net.cells) == 8 and net.auxiliary_head is None
    nb = NB201Genotype.from_arch_string(BEST_NB201)
    net = build_eval_network(nb, dataset_kind="cifar", num_classes=10)
    assert type(net) is NB201Network and count_parameters(net) == 1_288_506


def test_build_eval_network_rejects_impossible_combinations() -> None:
    nb = NB201Genotype.from_arch_string(BEST_NB201)
    with pytest.raises(ValueError, match="NAS-Bench-201"):
        build_eval_network(nb, dataset_kind="imagenet", num_classes=1000)
    with pytest.raises(ValueError, match="auxiliary"):
        build_eval_network(nb, dataset_kind="cifar", num_classes=10, auxiliary=True)
    with pytest.raises(ValueError, match="allowed: cifar, imagenet"):
        build_eval_network(PUBLISHED_GENOTYPES["DARTS_V2"], dataset_kind="svhn", num_classes=10)
    with pytest.raises(TypeError, match="NB201Network"):
        NetworkCIFAR(nb)
    with pytest.raises(TypeError, match="NB201Genotype"):
        NB201Network(PUBLISHED_GENOTYPES["DARTS_V2"])
    pairs = PUBLISHED_GENOTYPES["DARTS_V2"].normal
    with pytest.raises(ValueError, match="reduce_concat"):
        NetworkCIFAR(Genotype(normal=pairs, reduce=pairs, reduce_concat=(1, 2, 3)), C=8, layers=3)


# --- the fused training forward (TrainConfig.backend: fused) --------------------------------------
NB201_ARCHS = ("|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|avg_pool_3x3~0|nor_conv_3x3~1|none~2|",
               "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_1x1~0|nor_conv_3x3~1|nor_conv_3x3~2|")


def _eval_networks():
    """Float64 networks covering every published DARTS-family genotype, ImageNet's stem and NB201,
    each BN with its own γ, β (`scramble_bn_affine`: a trained network's, not all 1 and 0)."""
    torch.manual_seed(0)
    nets = [(NetworkCIFAR(g, 4, 10, 5, auxiliary=True).double(), torch.randn(3, 3, 32, 32, dtype=torch.float64))
            for g in PUBLISHED_GENOTYPES.values()]
    nets.append((NetworkImageNet(PUBLISHED_GENOTYPES["DARTS_V2"], 4, 10, 3, auxiliary=False).double(),
                 torch.randn(2, 3, 32, 32, dtype=torch.float64)))
    nets += [(NB201Network(NB201Genotype.from_arch_string(a), 4, 1, 10).double(),
              torch.randn(3, 3, 8, 8, dtype=torch.float64)) for a in NB201_ARCHS]
    return [(scramble_bn_affine(net), x) for net, x in nets]


def _train_step(net, backend, x, drop_prob=0.0):
    net = copy.deepcopy(net)
    net.set_backend(backend)
    net.train()
    net.drop_path_prob = drop_prob
    logits, aux = net(x)
    loss = (logits * torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view_as(logits)).sum()
    if aux is not None:
        loss = loss + 0.4 * aux.square().sum()
    loss.backward()
    return (logits, aux), net


@pytest.mark.parametrize("backend", ["fused", "fused_dense"])
def test_the_fused_training_forward_equals_the_eager_one(backend: str) -> None:
    """`fused_dense` also: each separable conv of a derived cell as one dense conv."""
    for net, x in _eval_networks():
        (out_e, aux_e), eager = _train_step(net, "eager", x)
        (out_f, aux_f), fused = _train_step(net, backend, x)
        name = type(net).__name__
        torch.testing.assert_close(out_f, out_e, rtol=1e-10, atol=1e-12, msg=name)
        if aux_e is not None:
            torch.testing.assert_close(aux_f, aux_e, rtol=1e-10, atol=1e-12, msg=name)
        grads = dict(fused.named_parameters())
        for n, p in eager.named_parameters():
            torch.testing.assert_close(grads[n].grad, p.grad, rtol=1e-8, atol=1e-11, msg=f"{name} {n}")
        buffers = dict(fused.named_buffers())
        for n, b in eager.named_buffers():           # BN running statistics, batch counts
            torch.testing.assert_close(buffers[n], b, rtol=1e-10, atol=1e-12, msg=f"{name} {n}")
        # evaluation mode: the fused cells too, each BN with its own running statistics
        scramble_bn_statistics(fused), scramble_bn_statistics(eager)
        fused.eval(), eager.eval()
        with torch.no_grad():
            torch.testing.assert_close(fused(x)[0], eager(x)[0], rtol=1e-10, atol=1e-12, msg=name)
    with pytest.raises(ValueError, match="allowed: eager, fused, fused_dense"):
        net.set_backend("triton")


@lowers_with_inductor
def test_inductor_lowers_the_fused_retrain_network_to_its_uncompiled_numbers() -> None:
    """`retrain.train.compile` with the real compiler (inductor: C++ on a CPU, Triton on a GPU):
    a DARTS_V2 network through `fused_dense` (paired preprocessing, a reduction cell's fused
    max-pools), compiled whole as `train` compiles it, gives the uncompiled network's logits,
    gradients and BN buffers in a training step. The compile tests of tests/test_train.py stop
    at AOTAutograd's graph and run it as traced."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]      # `reset` keeps the counters
    torch.manual_seed(0)
    net = scramble_bn_affine(NetworkCIFAR(PUBLISHED_GENOTYPES["DARTS_V2"], 4, 10, 3, auxiliary=False).double())
    net = net.to(device).train()
    net.set_backend("fused_dense")
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)

    def step(model, owner):
        """One training forward and backward of `model` (`owner`'s parameters): its logits."""
        owner.zero_grad(set_to_none=True)
        logits, _ = model(x)
        weights = torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype, device=device).view_as(logits)
        (logits * weights).sum().backward()
        return logits.detach()
    reference = copy.deepcopy(net)
    step(reference, reference)
    expected = step(reference, reference)
    compiled = torch.compile(net)
    step(net, net)                         # `train` runs its first call eagerly: it fills the lazy caches
    torch.testing.assert_close(step(compiled, net), expected)
    for (name, p), q in zip(net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    for (name, b), c in zip(net.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, msg=name)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1    # compiled, in one piece


class _Bernoullis(TorchDispatchMode):
    """How many random draws a forward makes (aten bernoulli, in place or not)."""
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.overloadpacket.__name__.startswith("bernoulli")
        return func(*args, **(kwargs or {}))


def test_fused_drop_path_draws_one_mask_per_network_with_the_eager_semantics(monkeypatch) -> None:
    """The fused forward draws one (B, droppable ops of all cells) mask per network forward, each
    cell a column range of it. Replaying exactly those masks through the eager cells' per-op
    `drop_path` gives the fused outputs and gradients."""
    net, x = _eval_networks()[1]                        # DARTS_V2
    p = 0.3
    torch.manual_seed(5)
    with _Bernoullis() as draws:
        (out_f, _), fused = _train_step(net, "fused", x, drop_prob=p)
    assert draws.calls == 1
    # the same draw, split in the fused order
    torch.manual_seed(5)
    plans = [cell.fused_plan for cell in net.cells]
    mask = torch.full((x.shape[0], sum(plan.droppable for plan in plans)), 1 - p, dtype=x.dtype)
    mask = torch.bernoulli(mask).div_(1 - p)
    columns, offset = [], 0                              # per cell: the mask column of each op, in op order
    for cell, plan in zip(net.cells, plans):
        col = {k: offset + g.drop[0] + i for groups in plan.sources for g in groups if g.drop
               for i, k in enumerate(g.ops)}
        offset += plan.droppable
        columns += [mask[:, col[k]] for k in range(len(cell.ops)) if k in col]
    assert offset == mask.shape[1] and len(columns) == sum(map(sum, (cell.droppable for cell in net.cells)))
    replay = iter(columns)
    monkeypatch.setattr("nascore.networks.drop_path", lambda h, prob: h * next(replay).view(-1, 1, 1, 1))
    (out_e, _), eager = _train_step(net, "eager", x, drop_prob=p)
    assert next(replay, None) is None                    # every drawn column was used once
    torch.testing.assert_close(out_f, out_e, rtol=1e-10, atol=1e-12)
    grads = dict(fused.named_parameters())
    for n, q in eager.named_parameters():
        torch.testing.assert_close(grads[n].grad, q.grad, rtol=1e-8, atol=1e-11, msg=n)
    assert {round(v, 6) for c in columns for v in c.tolist()} <= {0.0, round(1 / (1 - p), 6)}
    # evaluation mode and p = 0 draw nothing
    for mode, prob in (("eval", p), ("train", 0.0)):
        getattr(fused, mode)()
        fused.drop_path_prob = prob
        with torch.no_grad(), _Bernoullis() as draws:
            fused(x)
        assert draws.calls == 0, (mode, prob)


def test_the_fused_retrain_cell_launches_fewer_kernels() -> None:
    """DARTS_V2's normal cell: 5 sep_conv_3x3 on 2 states run as 2 grouped calls, its reduction
    cell's 5 max-pools on 2 states as 2 poolings."""
    torch.manual_seed(0)
    net = NetworkCIFAR(PUBLISHED_GENOTYPES["DARTS_V2"], 4, 10, 3, auxiliary=False)   # normal, reduce, reduce
    counts = {}
    for backend in ("eager", "fused"):
        net.set_backend(backend)
        with CountOps() as c:
            net(torch.randn(2, 3, 16, 16))
        counts[backend] = c.count
    e, f = counts["eager"], counts["fused"]
    assert e["max_pool2d_with_indices"] == 10 and f["max_pool2d_with_indices"] == 4, (e, f)
    # normal cell: sep convs 5 × 4 convs -> 2 × 4, dil_conv 2 -> 2; its two ReLUConvBNs on the
    # stem's output (`fused._paired_preprocess`): 2 convs -> 1; the third cell's FactorizedReduce
    # preprocessing (after a reduction): 2 convs -> 1; the stem unchanged
    assert f["convolution"] == e["convolution"] - 14, (e["convolution"], f["convolution"])


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_derived_cells_two_relu_conv_bns_run_as_one_where_its_inputs_have_one_shape(
        channels_last, monkeypatch) -> None:
    """A derived cell whose two inputs have one shape (of DARTS_V2's 8 cells: the first, on the
    stem's output twice, and every cell but those right after a reduction cell or the stem,
    reduction cells included) preprocesses them as one group (`fused._paired_preprocess`): one
    ReLU, one grouped conv and one BN over their concatenation, forward and backward, in training
    and in evaluation mode. The same numbers as the two ReLUConvBNs apart (and as eager's:
    `test_the_fused_training_forward_equals_the_eager_one`)."""
    torch.manual_seed(0)
    net = scramble_bn_affine(NetworkCIFAR(PUBLISHED_GENOTYPES["DARTS_V2"], 4, 10, 8, auxiliary=True))
    x = torch.randn(3, 3, 32, 32)
    net, x = in_layout(net, x, channels_last)
    plain = fused._paired_preprocess
    paired: list[bool] = []

    def spy(groups, inputs):
        out = plain(groups, inputs)
        paired.append(out is not None)
        return out
    results, counts, eval_counts = {}, {}, {}
    for apart in (False, True):
        monkeypatch.setattr(fused, "_paired_preprocess", (lambda g, i: None) if apart else spy)
        model = copy.deepcopy(net)
        model.set_backend("fused_dense")
        model.drop_path_prob = 0.2
        torch.manual_seed(1)                      # the same drop-path masks either way
        for _ in range(2):                        # the second forward records the weight gather
            model(x)[0].sum().backward()
        model.zero_grad(set_to_none=True)
        with CountOps() as c:
            logits, aux = model(x)
            (logits.sum() + 0.4 * aux.square().sum()).backward()
        counts[apart] = c.count
        model.eval()
        with torch.no_grad(), CountOps() as c:
            evaluated = model(x)[0]
        eval_counts[apart] = c.count
        results[apart] = [logits, aux, evaluated] + [p.grad for p in model.parameters()] + list(model.buffers())
    # reduction cells 2 and 5; cell 1 reads the stem's 3·C channels beside cell 0's 4·C
    assert paired == [True, False, True, False, True, True, False, True] * 4, paired   # 4 forwards
    cells = 5
    assert_paired_runs_as_one(results, counts, cells)
    for op in ("relu", "convolution", "native_batch_norm"):
        assert eval_counts[True][op] - eval_counts[False][op] == cells, (op, eval_counts[True][op], eval_counts[False][op])
    # per paired cell the inputs' concatenation, and in the backward the output's split's (a cat)
    assert counts[False]["cat"] - counts[True]["cat"] == 2 * cells
    assert eval_counts[False]["cat"] - eval_counts[True]["cat"] == cells


def test_a_dropped_op_into_a_started_node_sum_adds_with_its_mask_in_one_kernel(monkeypatch) -> None:
    """DARTS_V2's normal cell adds its one dil_conv into a node that has a sum already (n3 =
    skip(c_{k-2}) + dil(n0)): with drop-path that is one `addcmul` (`fused.MaskedAdd`), not a
    product and a sum, and its backward one product (grad·mask), not addcmul's two (it also
    scales the mask). The same numbers as the product and the sum (eager's too:
    `test_fused_drop_path_draws_one_mask_per_network_with_the_eager_semantics`)."""
    torch.manual_seed(0)
    net = NetworkCIFAR(PUBLISHED_GENOTYPES["DARTS_V2"], 4, 10, 5, auxiliary=False).double()   # 3 normal cells
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ways = {"masked_add": fused.MaskedAdd.apply, "addcmul": torch.addcmul, "mul_add": lambda a, y, m: a + y * m}
    counts, grads = {}, {}
    for way, fn in ways.items():
        monkeypatch.setattr(fused.MaskedAdd, "apply", fn)
        model = copy.deepcopy(net)
        model.set_backend("fused")
        model.drop_path_prob = 0.3
        torch.manual_seed(1)
        with CountOps() as forward:
            logits, _ = model(x)
        with CountOps() as backward:
            logits.square().sum().backward()
        counts[way] = (forward.count, backward.count)
        grads[way] = [logits] + [p.grad for p in model.parameters()]
    for way in ("addcmul", "mul_add"):
        for got, want in zip(grads["masked_add"], grads[way]):
            if want is not None:
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (fwd, bwd), (_, bwd_addcmul), (fwd_mul_add, bwd_mul_add) = (counts[way] for way in ways)
    assert fwd["addcmul"] == 3 and fwd["mul"] == fwd_mul_add["mul"] - 3 and fwd["add"] == fwd_mul_add["add"] - 3
    assert bwd["mul"] == bwd_mul_add["mul"] == bwd_addcmul["mul"] - 3, (bwd["mul"], bwd_mul_add["mul"], bwd_addcmul["mul"])


def test_a_runs_peak_memory_is_its_largest_epoch_and_none_off_a_gpu():
    from nascore.metrics import peak_memory, run_peak_memory
    history = [{"peak_memory_mb": 10.0, "peak_reserved_mb": 30.0}, {"peak_memory_mb": 12.0, "peak_reserved_mb": 20.0}]
    assert run_peak_memory(history) == 12.0 and run_peak_memory(history, "peak_reserved_mb") == 30.0
    assert run_peak_memory([{"epoch": 1}]) is None          # a CPU run measured none
    assert peak_memory(torch.device("cpu")) == {}


def test_global_pooling_is_adaptive_pooling_with_its_gradient_in_the_input_layout():
    x = torch.randn(3, 5, 6, 4, dtype=torch.float64)
    g = torch.randn(3, 5, 1, 1, dtype=torch.float64)
    for fmt in (torch.contiguous_format, torch.channels_last):
        a, b = (x.contiguous(memory_format=fmt).requires_grad_() for _ in range(2))
        ya, yb = torch.nn.AdaptiveAvgPool2d(1)(a * 1), GlobalAvgPool()(b * 1)
        torch.testing.assert_close(yb, ya)
        (ga,), (gb,) = torch.autograd.grad(ya, [a], g), torch.autograd.grad(yb, [b], g)
        torch.testing.assert_close(gb, ga)
    # the gradient reaching the op before it (not a leaf: AccumulateGrad would re-lay it out)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    seen = []
    h = x * 1
    h.register_hook(lambda grad: seen.append(grad.is_contiguous(memory_format=torch.channels_last)))
    GlobalAvgPool()(h).backward(g)
    assert seen == [True]
