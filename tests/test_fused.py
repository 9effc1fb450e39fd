"""The fast search paths compute what the plain eager path computes (issue 4).

- `backend: fused` gives the eager supernet's outputs, gradients and BN buffers (float64, every
  space and method switch), the same search trajectory and genotype, and resumes eager checkpoints.
- A search step reads nothing on the host: every update rule runs on the meta device, where any
  `.item()` / `.tolist()` / `bool(tensor)` raises.
- The CUDA-graph step logic (warm-up, static buffers, in-step accounting, odd-shaped batches) gives
  the plain loop's results when "replaying" re-runs the step, as a graph replays its kernels.
"""
import collections
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.func import functional_call
from torch.utils._pytree import tree_flatten

from nascore import fused
from nascore.config import ConfigError
from nascore.genotype import PUBLISHED_GENOTYPES, NB201Genotype
from nascore.methods import get_method
from nascore.networks import NB201Network, NetworkCIFAR
from nascore.search import EpochSteps, SearchConfig, SearchData, SearchRun, search
from nascore.spaces import SPACES, get_space
from nascore.supernet import SearchCell, SupernetConfig
from tests._graph_tape import TapeGraph
from tests._tiny import (CountOps, TensorLoader, assert_paired_runs_as_one, assert_searches_identical, in_layout,
                         learnable_images, lowers_with_inductor, scramble_bn_affine, scramble_bn_statistics)


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def build(space, columns=None, **switches):
    torch.manual_seed(0)
    cfg = SupernetConfig(init_channels=4, layers=1 if space == "nb201" else 3, num_classes=3, **switches)
    net = get_space(space).build_supernet(cfg).double()
    if columns is not None:
        net.set_active_columns(columns)
    with torch.no_grad():      # α away from uniform so every op's weight differs
        for p in net.arch_parameters():
            p.normal_()
    # random features' affine BNs: γ, β away from 1, 0, so that each BN's (a trained run's)
    # must reach its own channels
    return scramble_bn_affine(net)


def forward_backward(net, backend, x, channels_last=False, **options):
    net = copy.deepcopy(net)
    net.set_backend(backend, **options)           # options: fused_dense's trades (set_backend)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(1)                          # S4's noise: the same draws on both paths
    out = net(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out, net


def assert_same(net, backend="fused", grad_rtol=1e-8, **kw):
    """The fused backend's output, gradients and BN buffers are eager's, in float64. `grad_rtol`:
    deep networks whose reduction cells see 1×1 maps normalise 3 values per BN channel, where
    rounding alone moves a gradient by more than 1e-8 (see the paired-cells test)."""
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out_e, eager = forward_backward(net, "eager", x)
    out_f, fused = forward_backward(net, backend, x, **kw)
    torch.testing.assert_close(out_f, out_e, rtol=1e-9, atol=1e-12)
    grads_f = dict(fused.named_parameters())
    for name, p in eager.named_parameters():
        g = grads_f[name].grad
        assert (p.grad is None) == (g is None), name
        if p.grad is not None:
            torch.testing.assert_close(g, p.grad, rtol=grad_rtol, atol=1e-12, msg=name)
    buffers_f = dict(fused.named_buffers())
    for name, b in eager.named_buffers():                     # BN running statistics and counts
        torch.testing.assert_close(buffers_f[name], b, rtol=1e-9, atol=1e-12, msg=name)
    assert_same_evaluation(net, backend, x, **kw)
    return eager, fused


def assert_same_evaluation(net, backend, x, channels_last=False, **options):
    """Evaluation mode (running statistics, every BN its own) gives the eager outputs."""
    outs = []
    for b in ("eager", backend):
        copy_ = copy.deepcopy(net)
        copy_.set_backend(b, **options)
        scramble_bn_statistics(copy_)
        copy_.eval()
        xb = x
        if channels_last and b != "eager":
            copy_, xb = copy_.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        torch.manual_seed(1)                      # S4's noise: drawn in evaluation mode too
        with torch.no_grad():
            outs.append(copy_(xb))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-9, atol=1e-12)


CASES = [(space, {}) for space in SPACES.names()] + [
    ("darts", {"partial_channels": 2, "edge_normalization": True}),          # PC-DARTS
    ("darts", {"partial_channels": 4, "channel_shuffle": False}),
    ("darts", {"partial_channels": 4, "edge_normalization": True}),          # 3 bypassed chunks, shuffled
    ("nb201", {"partial_channels": 2, "edge_normalization": True}),
    ("s1", {"partial_channels": 2, "edge_normalization": True}),
    ("darts", {"random_features": True}),                                    # RF-DARTS
    ("nb201", {"random_features": True}),
    ("s4", {"random_features": True, "partial_channels": 2, "edge_normalization": True}),
]


@pytest.mark.parametrize("backend", ["fused", "fused_dense"])
@pytest.mark.parametrize("space,switches", CASES, ids=[f"{s}-{'-'.join(k) or 'plain'}" for s, k in CASES])
def test_fused_forward_gradients_and_bn_buffers_equal_eager(space, switches, backend):
    eager, _ = assert_same(build(space, **switches), backend)
    if switches.get("random_features"):        # frozen convs stay frozen: no gradient reaches them
        assert all(p.grad is None for m in eager.modules() if isinstance(m, nn.Conv2d)
                   for p in m.parameters())


# the node sums the way they were before `fused.mix` (`search.matmul_mix: false`): the spaces
# and switches whose passes differ (paired, positions, noise, partial channels, affine BNs)
CHAINED = [("darts", {}), ("nb201", {}), ("s1", {"partial_channels": 2, "edge_normalization": True}),
           ("s4", {"random_features": True}), ("darts", {"random_features": True})]


def test_part_reads_an_ops_children_as_indexing_does_named_ones_too():
    """`fused.part` is `op[i]`, read where dynamo steps through no container code; a sequential
    with names of its own (a user's pooling op) is still classified, not a KeyError."""
    from nascore.ops import SepConv
    sep = SepConv(4, 4, 3, 1, 1, affine=False)
    assert all(fused.part(sep, i) is sep[i] for i in range(2))
    assert all(fused.part(fused.part(sep, 1), i) is sep[1][i] for i in range(4))
    named = nn.Sequential(collections.OrderedDict(pool=nn.MaxPool2d(3, 1, 1), bn=nn.BatchNorm2d(4, affine=False)))
    assert fused.part(named, 1) is named.bn and fused.classify(named) == "pool_bn"
    assert fused.classify(sep) == "sep"


@pytest.mark.parametrize("space,switches", CHAINED, ids=[f"{s}-{'-'.join(k) or 'plain'}" for s, k in CHAINED])
def test_the_chained_node_sums_equal_eager_too(space, switches):
    assert_same(build(space, **switches), "fused", matmul_mix=False)


# a differentiated backward: the passes whose node sums differ (a pass's one BN output with α
# columns in the darts cells; partial channels' rows; channels_last's per-pixel products; the
# affine pooling BNs of random features)
HESSIAN = [("nb201", {}, "fused_dense", False), ("darts", {}, "fused_dense", False),
           ("darts", {"partial_channels": 2, "edge_normalization": True}, "fused", True),
           ("darts", {"random_features": True}, "fused", False)]


@pytest.mark.parametrize("space,switches,backend,channels_last", HESSIAN,
                         ids=[f"{s}-{'-'.join(k) or 'plain'}-{b}{'-cl' * c}" for s, k, b, c in HESSIAN])
def test_the_hessian_eigenvalue_through_the_fused_cells_is_eager_s(space, switches, backend, channels_last):
    """RobustDARTS' dominant eigenvalue of the α Hessian (`search.hessian_eigenvalue`) differentiates
    α's gradient once more: through the fused cells, the same Hessian-vector products as through
    the eager ones (three power iterations from one start, float64). Until 2026-12-06 the node
    sums' matrix product (`fused.Mix`) held its α columns constant in its own backward and
    detached a pass's one BN output's α columns: the eigenvalue came out 0.5–4% off."""
    from nascore.diagnostics import hessian_eigenvalue
    net = build(space, **switches)
    x, y = learnable_images(6, 3, 4)
    x = x.double()
    estimates = []
    for b in ("eager", backend):
        copy_, xb = copy.deepcopy(net), x
        copy_.set_backend(b)
        if channels_last and b != "eager":
            copy_, xb = copy_.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        estimates.append(hessian_eigenvalue(copy_, [(xb, y)], iters=3, tol=0.0))
    assert estimates[1] == pytest.approx(estimates[0], rel=1e-9) and estimates[0] != 0.0


@pytest.mark.parametrize("dropped", [False, True])
@pytest.mark.parametrize("nhwc", [False, True])
@pytest.mark.parametrize("carry,split,strided,blocks", [
    (False, False, False, 1), (True, False, False, 1), (True, True, False, 1), (False, True, True, 1),
    (True, False, False, 2), (False, True, True, 2)])
def test_mix_is_the_weighted_sum_of_its_columns(nhwc, carry, split, strided, blocks, dropped, float64):
    """`fused.mix` gives carry + Σ_k m[t, k]·X_k with the gradients autograd gives that sum (α's
    only for the first k_alpha columns, the rest being constants), in either layout, for a
    strided output (a node's slice of an earlier pass's sums) and split into the complete node
    and the rest; with the columns in one block (one concatenation) or two, the second one
    tensor whose first columns hold α and the rest not (a pass's one BN output). `dropped`:
    per-sample factors of m's entries (search-time drop-path), each sample's own matrix."""
    from nascore.fused import mix
    g = torch.Generator().manual_seed(0)
    b, c, h, w, n = 2, 3, 4, 4, 3

    def act(*shape):
        t = torch.randn(*shape, generator=g)
        if nhwc:                                          # channels_last, as 4D (B, u·C, H, W) views
            t = t.flatten(1, t.dim() - 3).contiguous(memory_format=torch.channels_last).view(t.shape)
        return t.requires_grad_()
    pool = act(b, 2, 1, c, h, w)                          # a broadcast output of 2 states (paired)
    conv = act(b, 2 * n, c, h, w)                         # a merged group: 2 blocks of n units
    if strided:                                           # a node: unit 1 of a (B, 2, C, H, W) sum
        ident = act(b, 2, c, h, w)[:, 1:]
    else:
        ident = act(b, 1, c, h, w)
    outs = [ident, pool, conv]                            # columns: 1 + 2 weighted by α, 2n by 1
    if blocks == 2:                                       # pool's 2 columns and conv's 2n as one tensor
        pool = act(b, 2 + 2 * n, c, h, w)
        outs = [[ident], [pool]]
        conv = pool[:, 2:]
    else:
        outs = [outs]
    m_alpha = torch.randn(n, 3, generator=g, requires_grad=True)
    sel = torch.zeros(n, 2 * n)
    for j in range(2 * n):
        sel[j % n, j] = 1.0
    acc = act(b, n, c, h, w) if carry else None
    inputs = [t for t in (acc, m_alpha, pool, conv if blocks == 1 else None, ident) if t is not None]
    drop = (torch.bernoulli(torch.full((b, n, 3 + 2 * n), 0.5), generator=g) * 2 + 0.25 if dropped
            else torch.ones(b, n, 3 + 2 * n))          # factors that differ by sample and entry

    def run(*_):
        out = mix(acc, torch.cat([m_alpha, sel], 1), outs, 3, split=split, drop=drop if dropped else None)
        return torch.cat([t for t in out if t is not None], 1) if split else out

    def expected():
        x = torch.cat([ident, pool.flatten(1, 2), conv], 1) if blocks == 1 else torch.cat([ident, pool], 1)
        s = torch.einsum("btk,bkchw->btchw", torch.cat([m_alpha, sel], 1) * drop, x)
        return s if acc is None else acc + s
    assert expected().shape == (b, n, c, h, w) and 1 + 2 + 2 * n == sel.shape[1] + 3
    out = run()
    torch.testing.assert_close(out, expected())
    torch.autograd.gradcheck(run, inputs)
    # a differentiated backward (RobustDARTS' Hessian eigenvalue): the inputs' gradients depend
    # on α, and α's on the outputs it weighs (a BN output's α columns, copied, stay in the graph)
    torch.autograd.gradgradcheck(run, inputs, fast_mode=True)
    with torch.no_grad():                                 # evaluation: the same sums, nothing kept
        torch.testing.assert_close(run(), expected())


@pytest.mark.parametrize("dropped", [False, True])
@pytest.mark.parametrize("nhwc", [False, True])
def test_mix_folds_the_previous_sums_in_place_of_the_identity_and_the_carry(nhwc, dropped, float64):
    """A pass over a node (`_mix_layouts`' fold): the previous pass's sums, whole (the node's row
    and the carried rows of this pass's targets, `split="fold"`), are the first block of this
    product, weighted by [the identity's α | 1]; α's columns are the first and those after the
    ones. The same sums and gradients as the node's identity term plus the carry, with the node
    also read by an op (its gradient then reaches the sums through `NodeRows`), the per-sample
    factors of search-time drop-path, and a differentiated backward."""
    from nascore.fused import mix
    g = torch.Generator().manual_seed(0)
    b, c, h, w, t = 2, 3, 4, 4, 2                          # t targets after the node

    def act(*shape):
        x = torch.randn(*shape, generator=g)
        if nhwc:
            x = x.flatten(1, x.dim() - 3).contiguous(memory_format=torch.channels_last).view(x.shape)
        return x.requires_grad_()
    x0 = act(b, 3, c, h, w)                               # the previous pass's outputs
    m0 = torch.randn(1 + t, 3, generator=g)
    pool, conv = act(b, 1, c, h, w), act(b, t, c, h, w)   # this pass's: 1 α column, t by 1
    alpha = torch.randn(t, 2, generator=g, requires_grad=True)   # the identity's and the pool's
    sel = torch.eye(t)
    drop = (torch.bernoulli(torch.full((b, t, 1 + t + 1 + t), 0.5), generator=g) * 2 + 0.25 if dropped else None)
    relu_w = torch.randn(b, c, h, w, generator=g)

    def run(x0, alpha, pool, conv):
        node, sums = mix(None, m0, [[x0]], 0, split="fold")
        assert node.shape == (b, 1, c, h, w) and sums.shape[1] == 1 + t
        node = node.squeeze(1)
        m = torch.cat([alpha[:, :1], torch.eye(t), alpha[:, 1:], sel], 1)
        out = mix(None, m.detach(), [[pool], [conv]], 2, m_alpha=alpha, drop=drop, prev=(sums, node), fold=t)
        return out, (node.relu() * relu_w).sum()         # the node read by an op too

    def expected(x0, alpha, pool, conv):
        sums = torch.einsum("tk,bkchw->btchw", m0, x0)
        node = sums[:, 0]
        m = torch.cat([alpha[:, :1], torch.eye(t), alpha[:, 1:], sel], 1)
        x = torch.cat([node.unsqueeze(1), sums[:, 1:], pool, conv], 1)
        mb = m.expand(b, -1, -1) if drop is None else m * drop
        return torch.einsum("btk,bkchw->btchw", mb, x), (node.relu() * relu_w).sum()
    inputs = (x0, alpha, pool, conv)
    out, side = run(*inputs)
    want, want_side = expected(*inputs)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(side, want_side)
    weight = torch.randn(want.shape, generator=g)

    def loss(fn):
        return lambda *xs: (lambda o, s: (o * weight).sum() + s)(*fn(*xs))
    grads = torch.autograd.grad(loss(run)(*inputs), inputs)
    for got, ref in zip(grads, torch.autograd.grad(loss(expected)(*inputs), inputs)):
        torch.testing.assert_close(got, ref)
    torch.autograd.gradcheck(loss(run), inputs)
    torch.autograd.gradgradcheck(loss(run), inputs, fast_mode=True)


def test_node_rows_are_views_whose_gradient_is_the_sum_of_both(float64):
    from nascore.fused import NodeRows
    x = torch.randn(2, 3, 5, requires_grad=True)
    w_whole, w_node = torch.randn(2, 3, 5), torch.randn(2, 1, 5)

    def run(x):
        whole, node = NodeRows.apply(x, 1)
        return (whole * w_whole).sum() + (node * w_node).sum()
    whole, node = NodeRows.apply(x, 1)
    assert whole.data_ptr() == node.data_ptr() == x.data_ptr() and node.shape == (2, 1, 5)
    (grad,) = torch.autograd.grad(run(x), x)
    torch.testing.assert_close(grad, w_whole + F.pad(w_node, (0, 0, 0, 2)))
    torch.autograd.gradcheck(run, (x,))
    torch.autograd.gradgradcheck(run, (x,))               # the out-of-place backward
    only_node = torch.autograd.grad((NodeRows.apply(x, 1)[1] * w_node).sum(), x)[0]
    torch.testing.assert_close(only_node, F.pad(w_node, (0, 0, 0, 2)))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("space,folded_per_cell", [("nb201", 2), ("darts", 3), ("s2", 3)])
def test_a_node_enters_the_next_pass_as_a_row_of_the_previous_passs_sums(space, folded_per_cell, channels_last):
    """Every pass over a node with an identity (NB201's n1, n2; a DARTS cell's n0, n1, n2) takes
    the previous pass's sums whole as a block of its product (`_mix_layouts`' fold): the node's
    identity term and the carried sums in one, so the node's gradient is the sum of its ops'
    alone, added into the product's gradient in place (`NodeRows`), and no node's gradient is
    concatenated with the carry's (a split's backward). The numbers are eager's."""
    net = build(space)
    assert_same(net, channels_last=channels_last)
    net = copy.deepcopy(net).float()
    net.set_backend("fused")
    x = torch.randn(5, 3, 4, 4)
    net, x = in_layout(net, x, channels_last)
    out = net(x)
    nodes = autograd_nodes(out)
    cells = sum(isinstance(m, SearchCell) for m in net.modules())
    assert nodes["NodeRowsBackward"] == folded_per_cell * cells, nodes

    items = {5 * side * side for side in (1, 2, 4)}     # batch items: per image, or per pixel (cl)

    class BySite(TorchDispatchMode):          # activation ops by the autograd node running them
        def __init__(self):
            super().__init__()
            self.count = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(isinstance(a, torch.Tensor) and a.dim() >= 3 and a.shape[0] in items
                   for a in tree_flatten((args, kwargs))[0]):
                node = torch._C._current_autograd_node()
                self.count[func.overloadpacket.__name__, type(node).__name__ if node else None] += 1
            return func(*args, **(kwargs or {}))
    with BySite() as site:
        out.sum().backward()
    assert site.count["cat", "SplitWithSizesBackward0"] == 0, site.count
    assert site.count["add_", "NodeRowsBackward"] == folded_per_cell * cells, site.count


@pytest.mark.parametrize("nhwc", [False, True])
@pytest.mark.parametrize("carry,split", [(False, False), (True, True), (False, True)])
def test_mix_with_k_rows_per_target_reads_only_the_ops_rows_of_later_blocks(nhwc, carry, split, float64):
    """Partial channels: K rows per target (its ops' sums, then K-1 chunks of bypassed channels).
    The first block holds the bypassed columns and feeds every row; the later ones (a pass's one
    BN output) feed only each target's first row, the only non-zero entries their columns have,
    and their products skip the others. Same sums and gradients as the whole matrix's."""
    from nascore.fused import mix
    g = torch.Generator().manual_seed(0)
    b, c, h, w, n, k = 2, 3, 4, 4, 3, 2

    def act(*shape):
        t = torch.randn(*shape, generator=g)
        if nhwc:
            t = t.flatten(1, t.dim() - 3).contiguous(memory_format=torch.channels_last).view(t.shape)
        return t.requires_grad_()
    state = act(b, k, c, h, w)                            # identity's columns and the bypassed chunk
    normed = act(b, 2 + n, c, h, w)                       # a pass's one BN: 2 α columns, n by 1
    m_first = torch.randn(n * k, k, generator=g, requires_grad=True)
    alpha = torch.randn(n, 2, generator=g, requires_grad=True)   # the BN output's α columns
    ones = torch.randn(n, n, generator=g)                 # ... and its constant ones

    def matrix(m_first, alpha):
        ops = torch.zeros(n * k, 2 + n)
        ops[::k] = torch.cat([alpha, ones], 1)            # later blocks: the ops' rows only
        return torch.cat([m_first, ops], 1)
    acc = act(b, n * k, c, h, w) if carry else None

    def run(m_first, alpha, state, normed, *acc_):
        out = mix(acc_[0] if acc_ else None, matrix(m_first, alpha), [[state], [normed]], k + 2,
                  split=split, rows=k)
        return torch.cat([t for t in out if t is not None], 1) if split else out
    expected = torch.einsum("tk,bkchw->btchw", matrix(m_first, alpha), torch.cat([state, normed], 1))
    if carry:
        expected = expected + acc
    inputs = (m_first, alpha, state, normed) + ((acc,) if carry else ())
    torch.testing.assert_close(run(*inputs), expected)
    torch.autograd.gradcheck(run, inputs)
    torch.autograd.gradgradcheck(run, inputs, fast_mode=True)


@pytest.mark.parametrize("backend", ["fused", "fused_dense"])
@pytest.mark.parametrize("space,columns", [("darts", [4]), ("darts", [5, 0, 3, 1]), ("nb201", [3, 0]),
                                           ("nb201", [3, 1, 2]),      # fused_dense: 3×3 and 1×1 merged, in that order
                                           ("s3", [2, 0])])
def test_progressive_op_sets_match_and_leave_inactive_ops_untouched(space, columns, backend):
    net = build(space, columns=columns)
    _, fused = assert_same(net, backend)
    active = set(columns)
    for edge in fused.mixed_ops():
        for c, op in enumerate(edge.ops):
            for p in op.parameters():
                assert (p.grad is not None) == (c in active and p.requires_grad)


def test_fused_is_layout_independent():
    for net in (build("darts"), build("darts", partial_channels=2, edge_normalization=True),   # paired, not
                build("darts", random_features=True)):       # affine pooling BNs, channels_last
        assert_same(net, channels_last=True)
        assert_same(net, "fused_dense", channels_last=True)
    # fused_dense without its trades (the bench's `+unmerged`, `+grouped`): the same numbers too
    assert_same(build("darts"), "fused_dense", merge_kernel_sizes=False)
    assert_same(build("nb201"), "fused_dense", channels_last=True, merge_kernel_sizes=False)
    assert_same(build("darts"), "fused_dense", channels_last=True, block_diagonal=False)
    # the node sums as one weighted add per op kind (`+chained`), not one product per pass
    assert_same(build("darts"), "fused_dense", channels_last=True, matmul_mix=False)
    # ... with partial channels: a node's ops' and bypassed channels joined and shuffled in the
    # channels_last copy (`_join_partial`), which no other case reaches (K = 4: with 2 the
    # bypassed channels are one chunk, and a shuffle that misorders chunks goes unseen)
    assert_same(build("darts", partial_channels=4, edge_normalization=True), "fused", channels_last=True,
                matmul_mix=False)
    # ... and S1's per-edge op sets, summed into their targets by an `index_add` (pixels-first)
    assert_same(build("s1"), "fused_dense", channels_last=True, matmul_mix=False)
    # one BN per op kind (`+kindbn`), not one per pass
    assert_same(build("darts"), "fused_dense", channels_last=True, merge_batch_norms=False)
    with pytest.raises(ValueError, match="allowed: eager, fused, fused_dense"):
        net.set_backend("triton")


# search-time drop-path (RobustDARTS' regularised search): the spaces and switches whose mixing
# matrices differ (paired passes and reduction cells, NB201's, partial channels' bypassed columns,
# random features' affine BNs in the scaled units, S4's noise)
DROP_CASES = [("darts", {}, False), ("darts", {}, True), ("nb201", {}, False),
              ("darts", {"partial_channels": 2, "edge_normalization": True}, True),
              ("darts", {"random_features": True}, False),
              ("s4", {"partial_channels": 2, "edge_normalization": True}, False), ("s3", {}, False)]


def _drop_path_step(net, backend, x, p, masks=None, channels_last=False):
    """A training forward and backward at drop-path `p`. Fused: returns the cells' factors it drew
    too. Eager with `masks` (the fused run's): each `MixedOp` drops its ops' outputs by those
    factors, cell by cell in call order, each op's column at its α index."""
    from nascore.supernet import MixedOp, Supernet
    from nascore.ops import Identity, bernoulli_mask
    net = copy.deepcopy(net)
    net.set_backend(backend)
    net.set_drop_path(p)
    net, x = in_layout(net, x, channels_last)
    drawn, pending, called = [], [], []
    edge_of = {id(getattr(edge, "mixed", edge)): (cell, e) for cell in net.modules() if isinstance(cell, SearchCell)
               for e, edge in enumerate(cell.edges)}
    draw, mixed_forward = Supernet._drop_path_masks, MixedOp.forward

    def spy(self, like, width):
        drawn.extend(draw(self, like, width))
        return iter(drawn)

    def replay(self, x, weights, columns):
        cell, e = edge_of[id(self)]
        if not called or called[-1] is not cell:
            called.append(cell)
        factors = masks[len(called) - 1]
        pending[:] = [factors[:, e * len(columns) + k] for k, c in enumerate(columns)
                      if not isinstance(self.ops[c], Identity)]
        out = mixed_forward(self, x, weights, columns)
        assert not pending                                # every non-identity op dropped once
        return out
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Supernet, "_drop_path_masks", spy)
        if masks is not None:
            mp.setattr(MixedOp, "forward", replay)
            mp.setattr("nascore.supernet.drop_path", lambda y, prob: y * pending.pop(0).view(-1, 1, 1, 1))
        torch.manual_seed(1)
        if masks is not None:          # the fused run's draw first, so that S4's noise sees one stream
            bernoulli_mask((x.shape[0], len(masks), masks[0].shape[1]), p, x)
        out = net(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out, net, drawn


@pytest.mark.parametrize("backend", ["fused", "fused_dense"])
@pytest.mark.parametrize("space,switches,channels_last", DROP_CASES,
                         ids=[f"{s}-{'-'.join(k) or 'plain'}{'-cl' * cl}" for s, k, cl in DROP_CASES])
def test_fused_drop_path_is_eager_drop_path_with_the_same_factors(space, switches, channels_last, backend):
    """The fused forward draws one factor per sample, cell and α index (and keeps identities):
    replayed through the eager `MixedOp`s' per-op `drop_path`, those factors give the fused
    outputs, gradients (α's too) and BN buffers. Some samples' ops are dropped, others kept."""
    net = build(space, **switches)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    p = 0.4
    out_f, fused_net, masks = _drop_path_step(net, backend, x, p, channels_last=channels_last)
    cells = sum(isinstance(m, SearchCell) for m in net.modules())
    assert len(masks) == cells and {v for m in masks for v in m[:, :-1].unique().tolist()} == {0.0, 1 / (1 - p)}
    assert all(torch.equal(m[:, -1], torch.ones(6, dtype=torch.float64)) for m in masks)
    out_e, eager, _ = _drop_path_step(net, "eager", x, p, masks)
    torch.testing.assert_close(out_f, out_e, rtol=1e-9, atol=1e-12)
    grads = dict(fused_net.named_parameters())
    for name, q in eager.named_parameters():
        assert (q.grad is None) == (grads[name].grad is None), name
        if q.grad is not None:
            torch.testing.assert_close(grads[name].grad, q.grad, rtol=1e-8, atol=1e-12, msg=name)
    buffers = dict(fused_net.named_buffers())
    for name, b in eager.named_buffers():
        torch.testing.assert_close(buffers[name], b, rtol=1e-9, atol=1e-12, msg=name)
    # the factors matter: without drop-path the same step gives another output
    undropped, _, none = _drop_path_step(net, backend, x, 0.0, channels_last=channels_last)
    assert not none and not torch.allclose(undropped, out_f)


def test_fused_drop_path_draws_once_per_forward_in_training_only():
    """One Bernoulli draw per training forward at p > 0 or at a device-kept p (0 included: all
    ones, the undropped outputs); none in evaluation mode or at a float p = 0."""
    net = build("darts")
    net.set_backend("fused_dense")
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)

    class Bernoullis(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Bernoullis.calls += func.overloadpacket.__name__.startswith("bernoulli")
            return func(*args, **(kwargs or {}))

    def draws(training, p, on_device=False):
        net.train(training)
        net.drop_path_on_device("cpu" if on_device else None)
        net.set_drop_path(p)
        Bernoullis.calls = 0
        torch.manual_seed(0)
        with Bernoullis(), torch.no_grad():
            out = net(x)
        return Bernoullis.calls, out
    assert draws(True, 0.3)[0] == 1
    assert draws(False, 0.3)[0] == 0
    calls, plain = draws(True, 0.0)
    assert calls == 0
    calls, ones = draws(True, 0.0, on_device=True)
    assert calls == 1
    torch.testing.assert_close(ones, plain, rtol=1e-12, atol=1e-12)


def test_fused_drop_path_needs_the_matrix_product_mix():
    net = build("nb201")
    net.set_backend("fused", matmul_mix=False)
    net.set_drop_path(0.2)
    with pytest.raises(ValueError, match="matmul_mix: true"):
        net(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(ConfigError, match="matmul_mix: true"):
        SearchRun(get_space("nb201"), tiny_search_config("darts", "nb201", backend="fused", matmul_mix=False,
                                                         drop_path=0.2),
                  SearchData(TensorLoader(*learnable_images(4, 4, 8), 4), None, 4), log=lambda s: None)


class NCHWWrites(TorchDispatchMode):
    """(batch, C, H, W) tensors written with their channels not innermost (C > 1, H·W > 1): in a
    channels_last network, activations or their gradients in the other layout. And (batch, ...,
    C, H, W) ones, the fused cells' units and states as dims of their own, where H = W (square
    images) and dims 1 and 2 differ: a tensor computed in (B, H, W, ..., C) order (`_pixels_first`)
    has H, W there, and is channels_last in memory (so a unit dim equal to the next one goes
    unchecked)."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch, self.found = batch, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:                     # writes nothing
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 4 and t.shape[0] == self.batch \
                    and t.shape[-3] > 1 and t.shape[-2] * t.shape[-1] > 1 and t.stride(-3) != 1 \
                    and (t.dim() == 4 or t.shape[-2] == t.shape[-1] and t.shape[1] != t.shape[2]):
                self.found.append((func.__name__, tuple(t.shape)))
        return out


@pytest.mark.parametrize("network", ["nb201", "pc_darts", "pc_darts_chained", "s1_chained", "rf_darts", "darts_dp", "s4",
                                     "retrain"])
def test_a_channels_last_network_writes_every_activation_and_gradient_channels_last(network):
    # on a GPU each NCHW tensor in a channels_last step is a layout conversion inside the cuDNN
    # calls it reaches, or an elementwise kernel reading against the grain. Found so: PC-DARTS'
    # channel shuffle wrote its nodes NCHW, and then the whole search ran so; random features'
    # pooling BNs (their γ, β applied by an addcmul) too; every network's global pooling (a
    # `mean`) handed the last cell an NCHW gradient; S4's noise was drawn NCHW; the node sums as
    # weighted adds (`matmul_mix: false`, the bench's `+chained`) summed a paired pass's two
    # inputs' terms NCHW (`SumStates`), and every state after it was NCHW, S1's per-edge op sets
    # (an `index_add` into zeros made NCHW) too
    from nascore.genotype import DARTS_V2
    from nascore.networks import NetworkCIFAR
    torch.manual_seed(0)
    if network == "retrain":             # 32 px: the auxiliary head's 5×5 pooling needs 8×8 at its cell
        net, size = NetworkCIFAR(DARTS_V2, 8, 10, 5, auxiliary=True).double(), 32
    else:
        switches = {"pc_darts": {"partial_channels": 2, "edge_normalization": True},
                    "pc_darts_chained": {"partial_channels": 2, "edge_normalization": True},
                    "rf_darts": {"random_features": True}}.get(network, {})
        space = network.removesuffix("_chained")
        net, size = build(space if space in ("nb201", "s1", "s4") else "darts", **switches), 8
        if network == "darts_dp":        # search-time drop-path: per-sample mixing matrices
            net.set_drop_path(0.3)
    net = net.to(memory_format=torch.channels_last)
    batch = 3                            # no weight has 3 output channels
    x = torch.randn(batch, 3, size, size, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    for backend in ("fused", "fused_dense"):
        model = copy.deepcopy(net)
        model.set_backend(backend, **({"matmul_mix": False} if network.endswith("_chained") else {}))
        for training in (True, False):
            model.train(training)
            with NCHWWrites(batch) as writes, torch.set_grad_enabled(training):
                out = model(x)
                out = out[0] if isinstance(out, tuple) else out
                if training:
                    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            assert writes.found == [], (backend, training, writes.found[:5])


@pytest.mark.parametrize("space,switches,paired", [
    ("darts", {}, True), ("darts", {"random_features": True}, True), ("s3", {}, True),
    ("darts", {"partial_channels": 2, "edge_normalization": True}, True),      # PC-DARTS
    ("s1", {}, False),                             # each edge its own op set
    ("s4", {}, False),                             # noise, drawn per edge
    ("nb201", {}, False),                          # one input
])
def test_a_cells_two_inputs_run_as_one_pass_where_their_ops_match(space, switches, paired):
    """In a DARTS-space cell both inputs feed every node through the same op set: the ops leaving
    both run as one pass over their concatenated channels (4 passes per cell, not 5), in normal and
    reduction cells alike; everywhere else each state is its own pass. The values are eager's
    (test_fused_forward_gradients_and_bn_buffers_equal_eager)."""
    net = build(space, **switches)
    net.set_backend("fused")
    net(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    cells = [m for m in net.modules() if isinstance(m, SearchCell)]
    plans = [plan for cell in cells for plan in cell._fused_plans.values()]
    assert len(plans) == len(cells) > 0
    assert {plan.paired for plan in plans} == {paired}
    if space == "darts":                           # normal and reduction cells
        assert {cell.fused_shape.strides[0] for cell in cells} == {1, 2}


def autograd_nodes(out: torch.Tensor) -> collections.Counter:
    """How many nodes of each type `out`'s autograd graph has."""
    nodes, stack, seen = collections.Counter(), [out.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        nodes[type(fn).__name__] += 1
        stack += [f for f, _ in fn.next_functions]
    return nodes


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_s4_noise_is_the_eager_searchs_in_either_layout(layout, float64):
    """S4's `noise` op draws N(0, 1) of its output's shape, `randn_like` its input: in a
    channels_last search in that layout, so in other positions than an NCHW draw's. The fused
    cells draw every edge's noise up front in the eager loop's order and in the activations'
    layout: the same numbers as the eager search's in either layout."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    net = build("s4")
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64).contiguous(memory_format=fmt)
    outs = []
    for backend in ("eager", "fused", "fused_dense"):
        model = copy.deepcopy(net).to(memory_format=fmt)
        model.set_backend(backend)
        torch.manual_seed(1)
        outs.append(model(x))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(outs[2], outs[0], rtol=1e-9, atol=1e-12)


def test_evaluation_runs_the_fused_cells_with_running_statistics():
    """Evaluation mode runs the training mode's grouped convs, poolings and ReLUs; a grouped BN
    normalises with its units' running statistics, and a pooling's BN, shared in training, becomes
    one `addcmul` of its units' own affine maps. Nothing is written to the BN buffers."""
    net = build("darts")
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    counts = {}
    for backend, training in (("eager", False), ("fused", True), ("fused", False)):
        net.set_backend(backend, merge_batch_norms=False)      # training: one BN per op kind, as here
        net.train(training)
        buffers = [b.clone() for b in net.buffers()]
        with torch.no_grad(), CountOps(batch=3) as c:
            net(x)
        counts[backend, training] = c.count
        if not training:
            assert all(torch.equal(a, b) for a, b in zip(buffers, net.buffers()))
    eager, train, evaluation = counts["eager", False], counts["fused", True], counts["fused", False]
    for op in ("convolution", "max_pool2d_with_indices", "avg_pool2d", "relu"):
        assert evaluation[op] == train[op] < eager[op], op
    # one BN each in training; one of the average poolings is the network's global pooling
    pool_groups = train["max_pool2d_with_indices"] + train["avg_pool2d"] - 1
    assert evaluation["native_batch_norm"] == train["native_batch_norm"] - pool_groups
    assert evaluation["addcmul"] == train["addcmul"] + pool_groups


@pytest.mark.parametrize("random_features", [False, True])
def test_a_pass_ends_in_one_batch_norm(random_features):
    """In training (`merge_batch_norms`, the default), every last BN of a pass (the poolings', each
    conv kind's) is one batch norm over their concatenated inputs (`fused.batch_norm_pass`),
    forward and backward; the numbers are the eager ones (`assert_same`). Evaluation mode, whose
    BNs are affine maps of running statistics, keeps one per op kind. With random features (affine
    BNs) the pass's BN scales by α·γ and shifts by α·β, a pooling's BNs each over its own copy."""
    # max_pool, avg_pool, sep_conv_3x3: 3 last BNs per pass
    net = build("darts", columns=[1, 2, 4], random_features=random_features)
    assert_same(net)
    if random_features:
        assert_same(net, channels_last=True)
        assert_same(net, "fused_dense")
    net = copy.deepcopy(net).float()
    x = torch.randn(3, 3, 8, 8)
    counts = {}
    for merge, training in ((True, True), (False, True), (True, False)):
        net.set_backend("fused", merge_batch_norms=merge)
        net.train(training)
        with CountOps(batch=3) as c:
            out = net(x)
            if training:
                out.sum().backward()
        counts[merge, training] = c.count
    merged, per_kind = counts[True, True], counts[False, True]
    passes = 4 * sum(isinstance(m, SearchCell) for m in net.modules())   # (c_{k-2}, c_{k-1}), n0, n1, n2
    for op in ("native_batch_norm", "native_batch_norm_backward"):
        assert per_kind[op] - merged[op] == 2 * passes, (op, merged[op], per_kind[op])
    for op in ("convolution", "convolution_backward", "max_pool2d_with_indices", "avg_pool2d"):
        assert merged[op] == per_kind[op], op
    evaluation = counts[True, False]
    assert evaluation["native_batch_norm"] == per_kind["native_batch_norm"] - 2 * passes   # the poolings' are addcmuls


class ActivationDtypes(TorchDispatchMode):
    """The dtypes of the float activations (4+ dims, first dim `batch`) that ops write."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch, self.dtypes = batch, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.dtypes |= {t.dtype for t in tree_flatten(out)[0]
                        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 4
                        and t.shape[0] == self.batch}
        return out


def test_evaluation_under_bf16_autocast_keeps_activations_in_bf16():
    net = build("darts").float()
    x = torch.randn(3, 3, 8, 8)
    outs, dtypes = {}, {}
    for backend in ("eager", "fused"):
        net.set_backend(backend)
        net.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), ActivationDtypes(3) as seen:
            outs[backend] = net(x).float()
        dtypes[backend] = seen.dtypes
    assert dtypes["fused"] == dtypes["eager"] == {torch.bfloat16}
    torch.testing.assert_close(outs["fused"], outs["eager"], rtol=0.05, atol=0.01)


@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_an_evaluation_forward_under_autocast_casts_its_bn_statistics_once(space):
    """Evaluation mode under bf16 autocast: the running statistics' affine maps (1/σ, −μ/σ) of a
    forward's one BN buffer are cast to the activations' dtype once, not per pooling BN group (the
    DARTS space's pooling BNs: 80 casts per validation forward at the bench's small size)."""
    net = build(space).float()
    net.set_backend("fused_dense")
    x = torch.randn(3, 3, 8, 8)
    net(x)                                      # training: running statistics off their init
    net.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        net(x)                                  # the first evaluation forward records the network
        with PartialCasts() as casts:
            out = net(x)
    # casts of part of a tensor: each cell's α-weighted op weights (`group_weights`), and before
    # the maps were cast whole, each pooling BN group's slice of them (51 here in the DARTS space)
    cells = sum(isinstance(m, SearchCell) for m in net.modules())
    assert len(casts.partial) <= cells, casts.partial
    assert casts.whole                          # the gathered weights, the maps: whole tensors
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


class PartialCasts(TorchDispatchMode):
    """Casts to bfloat16 of 1-D tensors, split by whether the input is a whole tensor or a view
    of part of a larger one."""

    def __init__(self) -> None:
        super().__init__()
        self.partial, self.whole = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        x = args[0] if args else None
        if func.overloadpacket is torch.ops.aten._to_copy and x.dim() == 1 and out.dtype == torch.bfloat16 \
                and x.dtype != out.dtype:
            part = x.untyped_storage().nbytes() > x.numel() * x.element_size()
            (self.partial if part else self.whole).append(tuple(x.shape))
        return out


class WeightCasts(TorchDispatchMode):
    """Casts of float tensors to bfloat16, other than a batch's (tensors whose first dim is
    `batch`): the weights autocast casts for its convs and products, forward and backward.
    `activations`: the casts of a batch's tensors, either way."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch, self.shapes, self.activations = batch, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        x = args[0] if args else None
        if (func.overloadpacket is torch.ops.aten._to_copy and x.is_floating_point() and x.dtype != out.dtype):
            if x.dim() > 1 and x.shape[0] == self.batch:
                self.activations.append((tuple(x.shape), x.dtype))
            elif out.dtype == torch.bfloat16:
                self.shapes.append(tuple(x.shape))
        return out


@pytest.mark.parametrize("network", ["darts", "rf_darts", "nb201", "evaluation"])
def test_under_autocast_a_fused_cell_casts_its_weights_once_and_computes_as_eager(network):
    # autocast casts each conv's weight on its own (a kernel per conv, and one more back in
    # backward); the fused cells cast their gathered weights once per cell instead
    from nascore.genotype import DARTS_V2
    from nascore.networks import NetworkCIFAR
    torch.manual_seed(0)
    if network == "evaluation":               # a derived network in training mode (the retrain)
        net, size = NetworkCIFAR(DARTS_V2, 8, 10, 5, auxiliary=True), 32
    elif network == "rf_darts":               # affine BNs (random features)
        net, size = build("darts", random_features=True).float(), 8
    else:
        net, size = build(network).float(), 8
    x = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(2))
    weights = [n for n, p in net.named_parameters() if p.dim() > 1 and "alphas" not in n]
    # the stem and the classifiers: a cell (search or derived) gathers its preprocessing's
    # weights with its ops'
    outside_cells = [n for n in weights if ".ops." not in n and "preprocess" not in n]
    results, activation_casts = {}, {}
    for backend, amp in (("eager", False), ("eager", True), ("fused", True), ("fused_dense", True)):
        model = copy.deepcopy(net)
        model.set_backend(backend)
        with WeightCasts(x.shape[0]) as casts:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out = model(x)
                out = out[0] if isinstance(out, tuple) else out
            (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert all(g.dtype == torch.float32 for g in grads.values())
        weight_casts = [s for s in casts.shapes if len(s) > 1]
        results[backend, amp] = out.float().detach(), grads, weight_casts
        activation_casts[backend, amp] = casts.activations
    assert len(results["eager", True][2]) == len(weights)
    for backend in ("fused", "fused_dense"):
        assert len(results[backend, True][2]) == len(outside_cells), backend
        # no activation cast inside the cells: only the image's, the logits' and their gradient's,
        # as eager (float32 values applied to bf16 activations, e.g. an affine pooling BN's γ and
        # β, would promote them and the pass's concatenation after them, both ways)
        assert activation_casts[backend, True] == activation_casts["eager", True], backend
    # bf16's error against fp32 is about the eager path's (measured: fused within 1.1× of it;
    # a wrong gather would be far off), with margin for other CPUs' bf16 kernels; tiny BN
    # batches make both large
    out32, g32, _ = results["eager", False]

    def error(key):
        out, g, _ = results[key]
        assert g.keys() == g32.keys()
        grad_err = sum(((g[n] - g32[n]) ** 2).sum() for n in g32).sqrt() / sum((g32[n] ** 2).sum() for n in g32).sqrt()
        return (out - out32).norm() / out32.norm(), grad_err
    eager_out, eager_grad = error(("eager", True))
    for backend in ("fused", "fused_dense"):
        out_err, grad_err = error((backend, True))
        assert out_err <= 1.5 * eager_out and grad_err <= 1.25 * eager_grad, backend


@pytest.mark.parametrize("eps", [(1e-5, 1e-5), (1e-5, 0.1)])
def test_evaluation_statistics_as_affine_maps_are_each_bns_own(eps, float64):
    bns = [nn.BatchNorm2d(3, eps=e) for e in eps]
    scramble_bn_statistics(nn.Sequential(*bns))
    sink = fused.BatchNormSink(training=False)
    sink.begin_eval_cell(bns)
    x = torch.randn(2, 3, 4, 4)
    for bn in bns:
        scale, shift = sink.take_affine(3)
        torch.testing.assert_close(x * scale.view(-1, 1, 1) + shift.view(-1, 1, 1), bn.eval()(x))


def test_the_fused_forward_weights_ops_inside_their_batch_norm():
    """Kernel structure, not just numbers: α scales the op outputs inside their last BN (no
    multiply over an activation, forward or backward), the node sums split the accumulator (no
    zero-filled slice gradients), and only the α weights some op uses are gathered (no zero-filled
    gradient for the rest)."""
    net = build("darts", columns=[4, 7])          # sep_conv_3x3, dil_conv_5x5: each ends in a BN
    assert_same(net)
    net = copy.deepcopy(net).float()
    net.set_backend("fused")
    x = torch.randn(7, 3, 4, 4)
    for _ in range(2):      # the first forward builds its constants (indices), the second the network's gather's
        net(x).sum().backward()
    with CountOps(batch=7) as on_activations, CountOps() as every:
        net(x).sum().backward()
    assert on_activations.count["native_batch_norm"] > 0     # it does see the cells' activations
    for name in ("mul", "addcmul", "select_backward"):
        assert on_activations.count[name] == 0, (name, on_activations.count)
    # the only zero fills: one per α gather (a cell type and channel count: the normal cells and
    # the two reduction cells here), for its mixing matrices, which autograd takes as constants
    # (their α columns are gathered again for the gradient: `FusedArch.mix_matrices`)
    assert every.count["zeros"] == 3, every.count


def test_a_network_reads_its_op_weights_with_one_gather():
    """The op weights of every cell, their preprocessing's included, are arranged (concatenated,
    interleaved, spread into the dense 1×1 conv) by one cat and one index_select per forward
    (`fused.ForwardRecord`), whatever the op and cell counts, and their gradients come back by one
    index_select: no per-cell or per-group cat / transpose copy /
    identity multiply, forward or backward. FactorizedReduce (skip_connect at stride 2, and the
    preprocessing after a reduction cell) is one 2×2 conv: no slice, no zero-filled gradient."""
    net = build("darts", columns=[3, 4, 5, 6, 7], random_features=True)   # FR, sep, dil convs; affine BNs
    assert_same(net)
    net = copy.deepcopy(net).float()
    net.set_backend("fused")
    op_storage = {p.untyped_storage().data_ptr() for cell in net.cells for p in cell.edges.parameters()}
    op_storage |= {p.untyped_storage().data_ptr() for p in net.preprocess.parameters()}
    views = {"view", "_reshape_alias", "reshape", "permute", "detach", "alias", "as_strided", "t"}

    class ParamReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = collections.Counter()
            self.small_products = 0           # forward multiplies of parameter-sized tensors

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in views and any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr()
                                         in op_storage for t in tree_flatten((args, kwargs))[0]):
                self.count[name] += 1
            out = func(*args, **(kwargs or {}))
            if name == "mul" and out.dim() <= 2 and torch._C._current_autograd_node() is None:
                self.small_products += 1
            return out

    class Clones(TorchDispatchMode):             # the elements each clone copies
        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "clone":
                self.sizes.append(args[0].numel())
            return func(*args, **(kwargs or {}))

    x = torch.randn(7, 3, 4, 4)
    for _ in range(2):    # the first forward records the cells, gathering cell by cell; the second builds the index
        net(x).sum().backward()
    with ParamReads() as reads, CountOps() as every, Clones() as clones:
        net(x).sum().backward()
    assert dict(reads.count) == {"cat": 1}, reads.count
    assert every.count["eye"] == 0, every.count
    # the one clone a paired pass may make: its broadcast α weights, (batch, 2 inputs, 1, targets),
    # for the identity's batched gradient; never an activation or a weight
    assert all(n <= 7 * 2 * 4 for n in clones.sizes), clones.sizes
    # affine BNs (random features): α·(γ, β) is one product per cell, not two per op kind
    assert reads.small_products == len(net.cells), reads.small_products
    # nothing slices: FactorizedReduce's offset branch is a tap of one 2×2 conv
    assert every.count["slice_backward"] == 0, every.count


def _darts_eval_network():
    torch.manual_seed(0)
    return scramble_bn_affine(NetworkCIFAR(PUBLISHED_GENOTYPES["DARTS_V2"], 4, 3, 3, auxiliary=False).double())


def _nb201_eval_network():
    torch.manual_seed(0)
    arch = "|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|avg_pool_3x3~0|nor_conv_3x3~1|none~2|"
    return scramble_bn_affine(NB201Network(NB201Genotype.from_arch_string(arch), 4, 1, 3).double())


REPLAYS = {
    "darts-fused": (lambda: build("darts"), "fused", False),
    "pc_darts-fused_dense-cl": (lambda: build("darts", partial_channels=2, edge_normalization=True), "fused_dense", True),
    "nb201-fused_dense": (lambda: build("nb201"), "fused_dense", False),
    "rf_darts-fused": (lambda: build("darts", random_features=True), "fused", False),
    "s4-rf-pc-fused_dense": (lambda: build("s4", random_features=True, partial_channels=2, edge_normalization=True),
                             "fused_dense", False),
    "retrain-darts_v2-fused_dense-cl": (_darts_eval_network, "fused_dense", True),
    "retrain-nb201-fused": (_nb201_eval_network, "fused", False),
}


def _loss_step(net, x):
    torch.manual_seed(1)                          # S4's noise: the same draws
    out = net(x)
    out = out[0] if isinstance(out, tuple) else out
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out


def _count_gathers(monkeypatch):
    calls = []
    apply = fused.GatherWeights.apply
    monkeypatch.setattr(fused.GatherWeights, "apply", lambda *args: (calls.append(1), apply(*args))[1])
    return calls


def _assert_same_state(a, b, out_a, out_b):
    torch.testing.assert_close(out_a, out_b, rtol=1e-12, atol=1e-14)
    grads = dict(b.named_parameters())
    for n, p in a.named_parameters():
        if p.grad is None:
            assert grads[n].grad is None, n
        else:
            torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-12, atol=1e-14, msg=n)
    buffers = dict(b.named_buffers())
    for n, t in a.named_buffers():
        torch.testing.assert_close(t, buffers[n], rtol=1e-12, atol=1e-14, msg=n)


@pytest.mark.parametrize("case", list(REPLAYS))
def test_a_replayed_forward_computes_what_a_forward_cell_by_cell_does(case, monkeypatch):
    """From its second forward on, a fused network gathers every cell's weights at once and keeps
    every cell's BN statistics in one buffer (`fused.ForwardRecord`): the outputs, gradients,
    running statistics and evaluation outputs a forward cell by cell gives (a copy's first)."""
    make, backend, channels_last = REPLAYS[case]
    net = make()
    net.set_backend(backend)
    size = 8 if case.startswith("retrain") else 4
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    _loss_step(net, x)                            # records its cells
    cells = len(net._fused_record.cells)
    assert cells > 1
    for _ in range(2):                            # training, then evaluation mode
        fresh = copy.deepcopy(net)                # a copy's record is empty: it gathers cell by cell
        assert fresh._fused_record.cells == []
        net.zero_grad(set_to_none=True)
        calls = _count_gathers(monkeypatch)
        out = _loss_step(net, x)
        assert len(calls) == 1
        calls.clear()
        out_fresh = _loss_step(fresh, x)
        assert len(calls) == cells
        _assert_same_state(net, fresh, out, out_fresh)
        monkeypatch.undo()
        scramble_bn_statistics(net)
        net.eval()


def test_a_replayed_forward_gathers_the_tensors_functional_call_swaps_in(float64):
    """The second-order step calls the network on other weights (`functional_call`): a replay makes
    its cells' requests again at its first cell, from the tensors the modules hold then."""
    net = build("darts")
    net.set_backend("fused_dense")
    x = torch.randn(3, 3, 4, 4)
    _loss_step(net, x)
    swapped = {n: (p.detach() * 1.5).requires_grad_() for n, p in net.named_parameters()}
    ref = copy.deepcopy(net)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.copy_(swapped[n])
    out = functional_call(net, swapped, (x,))
    assert len(net._fused_record.cells) == 3
    torch.testing.assert_close(out, ref(x), rtol=1e-12, atol=1e-14)
    names = list(swapped)
    grads = torch.autograd.grad(out.sum(), [swapped[n] for n in names], allow_unused=True)
    ref_grads = torch.autograd.grad(ref(x).sum(), [dict(ref.named_parameters())[n] for n in names], allow_unused=True)
    for n, g, r in zip(names, grads, ref_grads):
        assert (g is None) == (r is None), n
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-14, msg=n)


def test_a_forward_that_leaves_the_record_gathers_cell_by_cell_and_records_anew(monkeypatch, float64):
    net = build("darts")
    net.set_backend("fused")
    x = torch.randn(3, 3, 4, 4)
    _loss_step(net, x)
    record = net._fused_record
    # a record whose second cell is not the network's second: the replay ends there
    record.cells[1], record.cells[2] = record.cells[2], record.cells[1]
    net.zero_grad(set_to_none=True)
    fresh = copy.deepcopy(net)
    calls = _count_gathers(monkeypatch)
    _assert_same_state(net, fresh, _loss_step(net, x), _loss_step(fresh, x))
    assert len(calls) == 1 + 2 + 3                # the replay's and two cells' own; the copy's three
    calls.clear()
    _loss_step(net, x)                            # the record is that forward's: a whole replay
    assert len(calls) == 1
    # another op set (OPP-DARTS' stages): its first cell is another, so no replay, and a new record
    net.set_active_columns([3, 4])
    net.zero_grad(set_to_none=True)
    fresh = copy.deepcopy(net)
    calls.clear()
    _assert_same_state(net, fresh, _loss_step(net, x), _loss_step(fresh, x))
    assert len(calls) == 3 + 3
    calls.clear()
    _loss_step(net, x)
    assert len(calls) == 1


def test_a_search_cells_preprocessing_of_another_structure_runs_as_its_modules():
    # the fused cell runs a ReLUConvBN or FactorizedReduce preprocessing as its own kinds; a
    # module of any other structure (here a plain Sequential) runs as it is, with the same result
    net = build("darts", columns=[3, 4])
    conv = net.preprocess[2][1][1]
    net.preprocess[2][1] = nn.Sequential(nn.ReLU(), nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=False),
                                         nn.BatchNorm2d(conv.out_channels, affine=False)).double()
    assert [fused.classify(m) for m in net.preprocess[2]] == ["factorized_reduce", "eager"]
    assert_same(net)


def parameters(seed: int, channels_last: bool):
    """Parameter factory: random tensors that require grad; 4-d ones channels_last if asked."""
    g = torch.Generator().manual_seed(seed)

    def param(*shape):
        t = torch.randn(*shape, generator=g)
        if channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t.requires_grad_()
    return param, g


def gatherer(requests):
    """`gather_weights` over `requests` as a function of their flattened parameters (gradcheck's
    form), with the index cache of one cell; and those parameters."""
    from nascore.fused import gather_weights
    store = {}

    def gather(*flat):
        it = iter(flat)
        rebuilt = [(kind, [next(it) for _ in ps]) for kind, ps in requests]
        return tuple(gather_weights(rebuilt, lambda key, make: store.setdefault(key, make())))
    return gather, [p for _, ps in requests for p in ps]


@pytest.mark.parametrize("channels_last", [False, True])
def test_gathered_weights_are_the_layouts_and_their_gradients(channels_last, float64):
    """`gather_weights` gives what torch.cat & co. would build, for every layout, with parameters
    in either memory format; gradcheck on its backward; each element is gathered exactly once."""
    from nascore.fused import _gather_index
    param, g = parameters(0, channels_last)
    dw = [param(4, 1, 3, 3) for _ in range(3)]
    pw = [param(5, 4, 1, 1) for _ in range(3)]
    dense_conv = [param(2, 4, 3, 3) for _ in range(2)]
    bn = [param(5) for _ in range(3)]
    fr = [param(3, 4, 1, 1) for _ in range(4)]               # conv_1, conv_2 of two units
    sizes = [param(2, 4, 1, 1), param(3, 4, 5, 5), param(2, 4, 3, 3)]   # merged convs' kernels
    requests = [("interleave", dw), ("dense", pw), ("cat", dense_conv), ("cat", bn), ("factorized", fr),
                ("interleave/2", dw[:2] + dw[:2]), ("dense/2", pw[:2] + pw[1:]),       # two states' units
                ("centred", sizes)]
    gather, flat = gatherer(requests)
    interleaved, dense, cat, bn_cat, factorized, interleaved2, dense2, centred = gather(*flat)
    # each kernel zero-padded around its centre to the largest: a "same"-padded conv of each
    x5 = torch.randn(2, 4, 5, 5, generator=g)
    torch.testing.assert_close(torch.nn.functional.conv2d(x5, centred, padding=2), torch.cat(
        [torch.nn.functional.conv2d(x5, w, padding=w.shape[-1] // 2) for w in sizes], 1))
    assert centred.shape == (7, 4, 5, 5) and centred[:2, :, 2, 2].equal(sizes[0][:, :, 0, 0])
    # "/2": each state's units laid out on their own, one state after the other (a conv with 2 groups)
    torch.testing.assert_close(interleaved2, torch.stack(dw[:2], 1).flatten(0, 1).repeat(2, 1, 1, 1), rtol=0, atol=0)
    expected_dense2 = torch.zeros(20, 8, 1, 1)
    for u, w in enumerate(pw[:2] + pw[1:]):        # a state's unit u reads its own columns c·2 + u
        expected_dense2[5 * u:5 * u + 5, u % 2::2] = w
    torch.testing.assert_close(dense2, expected_dense2, rtol=0, atol=0)
    x = torch.randn(2, 4, 6, 6, generator=g)
    torch.testing.assert_close(torch.nn.functional.conv2d(x, factorized, stride=2), torch.cat(
        [torch.nn.functional.conv2d(x if k % 2 == 0 else x[:, :, 1:, 1:], w, stride=2) for k, w in enumerate(fr)], 1))
    torch.testing.assert_close(interleaved, torch.stack(dw, 1).flatten(0, 1), rtol=0, atol=0)
    expected_dense = torch.zeros(15, 12, 1, 1)
    for u, w in enumerate(pw):        # unit u's rows read columns c·3 + u
        expected_dense[5 * u:5 * u + 5, u::3] = w
    torch.testing.assert_close(dense, expected_dense, rtol=0, atol=0)
    torch.testing.assert_close(cat, torch.cat(dense_conv), rtol=0, atol=0)
    assert cat.is_contiguous(memory_format=torch.channels_last) == channels_last
    # a merged group whose first kernel is 1×1 (contiguous in both formats) too: handed over in
    # NCHW, its channels_last gradient would be copied back per conv
    assert centred.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(bn_cat, torch.cat(bn), rtol=0, atol=0)
    torch.autograd.gradcheck(gather, flat)
    index, inverse = _gather_index(requests)
    assert index.dtype == inverse.dtype == torch.int32            # half a long index's memory
    total = sum(p.numel() for p in flat)
    assert torch.bincount(index[index < total], minlength=total).eq(1).all()
    assert torch.equal(index[inverse], torch.arange(total))


@pytest.mark.parametrize("affine", [False, True])
def test_under_autocast_the_gather_casts_a_cells_conv_values_once_and_bn_affines_never(affine):
    # what autocast would cast conv by conv (weights and biases) is cast once, in the gather, and
    # its gradient once back; BN's γ, β ("affine") stay float32, as autocast leaves them
    from nascore.fused import gather_weights
    param, _ = parameters(0, False)
    requests = [("cat", [param(4, 3, 3, 3), param(2, 3, 3, 3)]), ("cat", [param(6)]),     # conv, bias
                ("centred", [param(2, 4, 1, 1), param(3, 4, 3, 3)])]
    if affine:
        requests.insert(1, ("affine", [param(6), param(6)]))
    params = [q for _, ps in requests for q in ps]
    store = {}

    def gather(dtype):
        return gather_weights(requests, lambda key, make: store[key] if key in store else store.setdefault(key, make()),
                              dtype)
    plain = gather(None)

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func.overloadpacket is torch.ops.aten._to_copy
            return func(*args, **(kwargs or {}))
    gather(torch.bfloat16)                        # the index: a constant, made once
    with Casts() as forward:
        low = gather(torch.bfloat16)
    assert forward.n == 1
    for (kind, _), a, b in zip(requests, low, plain):
        assert a.dtype == (torch.float32 if kind == "affine" else torch.bfloat16), kind
        torch.testing.assert_close(a, b.to(a.dtype), rtol=0, atol=0)      # the same values, rounded once
    # backward: float32 gradients, each the bf16 gradient's values; one cast back (and, with a
    # float32 rest, one copy of each part into one buffer)
    grads_out = [torch.randn(w.shape, generator=torch.Generator().manual_seed(i)).to(w.dtype)
                 for i, w in enumerate(low)]
    with Casts() as backward:
        expected = torch.autograd.grad(plain, params, [g.float() for g in grads_out])
        casts_plain = backward.n
        got = torch.autograd.grad(low, params, grads_out)
    assert backward.n - casts_plain == (0 if affine else 1)   # with a rest, copy_ casts in place
    for e, g in zip(expected, got):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("nhwc", [False, True])
def test_separable_weights_compose_into_one_dense_conv(nhwc, float64):
    """`fused_dense`: the weights of n separable convs (depthwise k×k, then 1×1) gather into ONE
    dense k×k conv weight whose conv is the two convs, over a shared input (groups 1) and over each
    unit's own input (groups n), with dilation and stride; channels_last in, channels_last out;
    all requests of one shape in a cell take one multiply; gradcheck on the parameters."""
    F = torch.nn.functional
    param, g = parameters(0, nhwc)
    c_in, c_out = 3, 4
    layout = "separable_nhwc" if nhwc else "separable"
    shared3 = [param(c_in, 1, 3, 3) for _ in range(2)] + [param(c_out, c_in, 1, 1) for _ in range(2)]
    other = [param(5) for _ in range(2)]
    own3 = [param(c_in, 1, 3, 3) for _ in range(3)] + [param(c_out, c_in, 1, 1) for _ in range(3)]
    shared5 = [param(c_in, 1, 5, 5)] + [param(c_out, c_in, 1, 1)]
    gather, flat = gatherer([(layout, shared3), ("cat", other), (layout, own3), (layout, shared5)])
    gather(*flat)                                            # builds the gather index
    with CountOps() as counted:
        w_shared3, cat, w_own3, w_shared5 = gather(*flat)
    assert counted.count["mul"] == 2, counted.count          # one per (taps, C', C): 3×3 and 5×5
    torch.testing.assert_close(cat, torch.cat(other), rtol=0, atol=0)
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    x = torch.randn(2, 3 * c_in, 9, 9, generator=g).contiguous(memory_format=fmt)
    xs = x[:, :c_in]

    def separable(x, dw, pw, **conv):
        return F.conv2d(F.conv2d(x, dw, groups=c_in, **conv), pw)
    for w, ps, conv in [(w_shared3, shared3, dict(padding=2, dilation=2)),
                        (w_shared5, shared5, dict(padding=2, stride=2))]:
        assert w.shape == (len(ps) // 2 * c_out, c_in, *ps[0].shape[2:])
        assert w.is_contiguous(memory_format=fmt)
        n = len(ps) // 2
        expected = torch.cat([separable(xs, ps[u], ps[n + u], **conv) for u in range(n)], 1)
        torch.testing.assert_close(F.conv2d(xs, w, **conv), expected)
    expected = torch.cat([separable(x[:, c_in * u:c_in * (u + 1)], own3[u], own3[3 + u], padding=1)
                          for u in range(3)], 1)
    torch.testing.assert_close(F.conv2d(x, w_own3, padding=1, groups=3), expected)
    assert w_own3.is_contiguous(memory_format=fmt)
    torch.autograd.gradcheck(gather, flat)


class ConvCalls(TorchDispatchMode):
    """Records each dispatched convolution as (kernel size, depthwise?) in `calls`, and each strided
    one as (kernel size, groups, the weight's input channels) in `strided`."""

    def __init__(self):
        super().__init__()
        self.calls, self.strided = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "convolution":
            groups, x, w = args[-1], args[0], args[1]
            self.calls.append((w.shape[-1], groups > 1 and groups == x.shape[1]))
            if tuple(args[3]) != (1, 1):
                self.strided.append((w.shape[-1], groups, w.shape[1]))
        return func(*args, **(kwargs or {}))


def conv_calls(net, x, backends=("fused", "fused_dense")):
    """Per backend, the convolutions of one forward (after a first one has filled the caches)."""
    out = {}
    for backend in backends:
        m = copy.deepcopy(net)
        m.set_backend(backend)
        m(x)
        with ConvCalls() as c:
            m(x)
        out[backend] = c.calls
    return out


def test_the_dense_backend_runs_no_depthwise_conv():
    """`fused_dense` computes every separable conv of a search cell as one dense conv: no depthwise
    conv is dispatched (`fused` runs them), and a state's 3×3 and 5×5 convs of one kind run as one
    5×5 conv (`merge_conv_groups`): per pass, 3 convs where `fused` runs 12."""
    net = build("darts", columns=[4, 5, 6, 7])               # sep 3×3, 5×5, dil 3×3, 5×5
    calls = conv_calls(net, torch.randn(5, 3, 4, 4, dtype=torch.float64))
    depthwise = {b: sum(dw for _, dw in c) for b, c in calls.items()}
    assert depthwise["fused"] > 0 and depthwise["fused_dense"] == 0
    # per pass, `fused`: sep 3×3 and 5×5 (two blocks of depthwise + 1×1 each) and dil 3×3 and 5×5
    # (one block) = 12 convs; `fused_dense`: sep's two blocks and dil, each one 5×5 conv = 3. A
    # pass per state but the last node (it feeds no edge), the two inputs read side by side in one
    passes = sum(len(cell.fused_shape.strides) - 2 for cell in net.cells)
    assert len(calls["fused"]) - len(calls["fused_dense"]) == 9 * passes
    sizes = collections.Counter(k for k, _ in calls["fused_dense"])
    assert sizes[5] == 3 * passes                              # outside the cells: stem, preprocessing
    # an op without a partner of another size is not merged (sep 3×3 and dil 5×5 here)
    alone = conv_calls(build("darts", columns=[4, 7]), torch.randn(5, 3, 4, 4, dtype=torch.float64))["fused_dense"]
    assert collections.Counter(k for k, _ in alone) == sizes - collections.Counter({5: 2 * passes}) + \
        collections.Counter({3: 2 * passes})


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_dense_backend_runs_a_reduction_cells_paired_strided_convs_ungrouped(channels_last):
    """A reduction cell's two inputs run side by side with stride 2: `fused_dense` computes their
    sep and dil convs as one ungrouped conv, its weight zero off each input's block
    (`fused.block_diagonal`), not as a grouped conv (`block_diagonal=False`)."""
    net = build("darts", columns=[4, 5, 6, 7])
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    calls = {}
    for bd in (True, False):
        m = copy.deepcopy(net)
        m.set_backend("fused_dense", block_diagonal=bd)
        xb = x
        if channels_last:
            m, xb = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        m(xb)
        with ConvCalls() as rec:
            m(xb)
        calls[bd] = [call for call in rec.strided if call[0] == 5]   # sep's first block and dil, merged
    reductions = sum(cell.fused_shape.strides[0] == 2 for cell in net.cells)
    assert reductions > 0 and len(calls[True]) == len(calls[False]) == 2 * reductions
    assert [g for _, g, _ in calls[True]] == [1] * len(calls[True])
    assert [g for _, g, _ in calls[False]] == [2] * len(calls[False])
    # ungrouped, a weight reads both inputs' channels (zero on the other input's)
    assert [cin for *_, cin in calls[True]] == [2 * cin for *_, cin in calls[False]]


def test_block_diagonal_weights_compute_the_grouped_conv():
    from nascore.fused import block_diagonal
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 3, 5, 5, generator=g, dtype=torch.float64)
    x = torch.randn(2, 6, 8, 8, generator=g, dtype=torch.float64)
    expected = F.conv2d(x, w, stride=2, padding=2, groups=2)
    store = {}
    constant = fused.cached_on(store, x.device)
    for fmt in (torch.contiguous_format, torch.channels_last):
        wf = w.contiguous(memory_format=fmt).requires_grad_()
        wb = block_diagonal(wf, 2, constant)
        assert wb.shape == (6, 6, 5, 5) and wb.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(F.conv2d(x.contiguous(memory_format=fmt), wb, stride=2, padding=2), expected)
        assert wb[:3, 3:].abs().sum() == 0 and wb[3:, :3].abs().sum() == 0
        torch.autograd.gradcheck(lambda v: block_diagonal(v, 2, constant), (wf,))
    assert len(store) == 1                              # the mask: one device constant


def test_the_dense_backend_runs_a_states_convs_of_several_kernel_sizes_as_one():
    """`fused_dense` on NB201: nor_conv_1x1 and nor_conv_3x3 leaving a state are one 3×3 conv (the
    1×1 kernel zero-padded) and one BN; convs that would not give the same output are not merged.
    (The numbers: `test_fused_forward_gradients_and_bn_buffers_equal_eager`, nb201 cases.)"""
    from nascore.fused import _conv_merge_key
    from nascore.ops import ReLUConvBN
    net = build("nb201")
    counts = {b: [k for k, _ in c] for b, c in conv_calls(net, torch.randn(5, 3, 4, 4, dtype=torch.float64)).items()}
    cells = [b for b in net.blocks if isinstance(b, SearchCell)]
    passes = sum(len(c.fused_shape.strides) - 1 for c in cells)     # the last node feeds no edge
    assert len(counts["fused"]) - len(counts["fused_dense"]) == passes
    # what is left at 1×1: the residual blocks' shortcuts, no cell conv
    assert counts["fused_dense"].count(1) == counts["fused"].count(1) - passes
    dense = copy.deepcopy(net)
    dense.set_backend("fused_dense")
    dense(torch.randn(5, 3, 4, 4, dtype=torch.float64))
    # every cell runs the same merged plan: one α gather per forward, as unmerged cells share theirs
    merged = {id(plan.arch) for b in dense.blocks if isinstance(b, SearchCell) for plan in b._fused_plans.values()}
    assert len(merged) == 1
    conv = {k: ReLUConvBN(4, 4, k, 1, k // 2, affine=False) for k in (1, 3, 5)}
    assert _conv_merge_key(conv[1]) == _conv_merge_key(conv[3]) == _conv_merge_key(conv[5]) is not None
    assert _conv_merge_key(ReLUConvBN(4, 4, 3, 1, 0, affine=False)) is None          # "valid" padding
    assert _conv_merge_key(ReLUConvBN(4, 4, 3, 2, 1, affine=False)) != _conv_merge_key(conv[3])   # stride
    assert _conv_merge_key(ReLUConvBN(4, 4, 3, 1, 1, affine=True)) != _conv_merge_key(conv[3])    # BN affine


@pytest.mark.parametrize("n_out,with_acc,channels_last,states", [
    (1, True, False, 0), (1, False, False, 0), (3, True, False, 0), (1, True, True, 0), (1, True, None, 0),
    (1, True, False, 2), (1, False, False, 2), (3, True, False, 2), (1, True, None, 2)])
def test_weighted_add_is_addcmul_with_a_leaner_backward(n_out, with_acc, channels_last, states, float64):
    """`WeightedAdd` computes addcmul's value and gradients (gradcheck), for a broadcast `out`
    (identity, pooling), a per-target `out`, no accumulator, and layouts that cannot be flattened
    (channels_last; a sliced-channel view, as PC-DARTS' bypass is); and with a states dim (paired
    inputs: each state its own weights)."""
    from nascore.fused import WeightedAdd
    g = torch.Generator().manual_seed(0)
    s = (states,) if states else ()
    acc = torch.randn(2, *s, 3, 4, 3, 3, generator=g, requires_grad=True) if with_acc else None
    out = torch.randn(2, *s, n_out, 6 if channels_last is None else 4, 3, 3, generator=g)
    if channels_last is None:
        out = out[..., 2:, :, :]                  # channels 2..5 of 6: a strided view
    elif channels_last:
        out = out[:, 0].contiguous(memory_format=torch.channels_last).unsqueeze(1)
    out.requires_grad_()
    w = torch.randn(1, *s, 3, 1, 1, 1, generator=g, requires_grad=True)
    inputs = (acc, out, w)
    torch.autograd.gradcheck(WeightedAdd.apply, inputs)
    expected = out * w if acc is None else torch.addcmul(acc, out, w)
    torch.testing.assert_close(WeightedAdd.apply(*inputs), expected)


@pytest.mark.parametrize("matmul_mix", [True, False])
def test_parameter_free_ops_are_weighted_without_full_size_products(matmul_mix):
    """Identity and pooling outputs serve every edge leaving a state. Chained (one weighted add per
    op kind), their α weighting's backward is a batched product (bmm), not autograd's addcmul
    backward, which multiplies the full (B, targets, C, H, W) gradient twice and reduces each
    product; with `fused.mix` (the default) every term of a pass is one batched product, forward
    and backward, and no full-size multiply is left at all."""
    net = build("darts", columns=[1, 2, 3])      # max_pool, avg_pool, skip_connect
    assert_same(net)
    net = copy.deepcopy(net).float()
    net.set_backend("fused", matmul_mix=matmul_mix)
    x = torch.randn(7, 3, 4, 4)

    class Products(TorchDispatchMode):         # multiplies writing a (B, targets > 1, C, H, W) tensor
        def __init__(self):
            super().__init__()
            self.count = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in ("mul", "addcmul") and out.dim() == 5 and out.shape[1] > 1:
                self.count[name, "backward" if torch._C._current_autograd_node() else "forward"] += 1
            return out

    with Products() as products, CountOps() as every:
        net(x).sum().backward()
    if matmul_mix:
        assert not products.count, products.count
        assert every.count["baddbmm"] + every.count["baddbmm_"] > 0 and every.count["addcmul"] == 0, every.count
        # α's gradient is written for α's columns of each matrix only, not zero-padded to its width
        assert every.count["constant_pad_nd"] == 0, every.count
    else:
        assert products.count["addcmul", "forward"] > 0          # the weighting is there
        assert products.count["mul", "backward"] == 0, products.count
    assert every.count["bmm"] > 0


@pytest.mark.parametrize("channels_last", [False, True])
def test_random_features_pooling_bns_are_one_batch_norm_each_without_products(channels_last, float64):
    """A pooling's affine BNs (random features: γ, β trained) normalise the one pooled output
    with each edge's own γ, β: one batch norm over a copy of it per edge, whose backward is the
    batch norm's and one sum over the copies, not a normalisation and an `addcmul` of the
    units' γ, β (a product forward, products and sums backward). The same outputs, gradients and
    running statistics as each edge's own BN (eager), in either layout."""
    net = build("darts", columns=[1, 2, 3], random_features=True)     # max_pool, avg_pool, skip_connect
    assert_same(net, channels_last=channels_last)
    net = copy.deepcopy(net)
    net.set_backend("fused")
    x = torch.randn(7, 3, 4, 4, dtype=torch.float64)
    net, x = in_layout(net, x, channels_last)
    with CountOps(batch=7) as on_activations:
        net(x).sum().backward()
    assert on_activations.count["addcmul"] == on_activations.count["mul"] == 0, on_activations.count
    assert on_activations.count["native_batch_norm_backward"] == on_activations.count["native_batch_norm"] > 0


def test_partial_channels_bypass_through_each_passs_product():
    """PC-DARTS' bypassed channels (C - C/K of each state) are K-1 more columns of each pass's
    matrix product and a node's K rows are its channels (`_mix_layouts`): no weighted add of
    their own (an addcmul forward, products and reductions backward). A state one pass reads is
    split by no op: its identity's C/K channels and the bypassed rest are the state itself
    (`StateParts`), whose backward adds the ops' gradient in place."""
    net = copy.deepcopy(build("darts", partial_channels=4, edge_normalization=True)).float()
    net.set_backend("fused")
    x = torch.randn(7, 3, 4, 4)
    with CountOps() as every:
        out = net(x)
    nodes = autograd_nodes(out)
    assert every.count["addcmul"] == 0 and nodes["WeightedAddBackward"] == 0, (every.count, nodes)
    # 3 cells, each with 3 passes over one state that has an identity (n0, n1, n2; the inputs paired)
    assert nodes["StatePartsBackward"] == 9, nodes
    with CountOps() as backward:
        out.sum().backward()
    assert backward.count["add_"] >= 9, backward.count              # StateParts: in place


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_paired_cells_two_relu_conv_bns_run_as_one_whose_output_is_the_paired_passs_input(
        channels_last, monkeypatch):
    """A paired cell whose inputs have one shape (of 6 cells: the first, on the stem's output twice,
    and the two reduction cells, on two cells' outputs) preprocesses them as one group
    (`_paired_preprocess`): one ReLU, one grouped conv and one BN over both, forward and backward,
    whose output the paired pass reads as it is. The same numbers as running the two ReLUConvBNs
    apart (and eager's, `assert_same`); with partial channels they stay apart."""
    torch.manual_seed(0)
    net = get_space("darts").build_supernet(SupernetConfig(init_channels=4, layers=6, num_classes=3)).double()
    with torch.no_grad():
        for p in net.arch_parameters():
            p.normal_()
    net = scramble_bn_affine(net)
    # 6 cells on 4×4 images: the second reduction's BNs normalise 3 values per channel, and
    # rounding alone moves gradients by up to 1.5e-7 (eager NCHW against eager channels_last,
    # float64, on an Intel Xeon); there the fused path is within 6.5e-8 of eager, which a 1e-8
    # tolerance failed, while the AMD EPYC machines' rounding passed it
    assert_same(net, channels_last=channels_last, grad_rtol=1e-6)
    net = copy.deepcopy(net).float()
    net.set_backend("fused")
    x = torch.randn(5, 3, 4, 4)
    net, x = in_layout(net, x, channels_last)
    merged, results, counts = [], {}, {}
    plain = fused._paired_preprocess

    def spy(groups, inputs):
        out = plain(groups, inputs)
        merged.append(out is not None)
        return out
    for apart in (False, True):
        monkeypatch.setattr(fused, "_paired_preprocess", (lambda g, i: None) if apart else spy)
        model = copy.deepcopy(net)
        with CountOps(batch=5) as c:
            out = model(x)
            out.sum().backward()
        results[apart] = [out] + [p.grad for p in model.parameters()]
        counts[apart] = c.count
    assert merged == [True, False, True, False, True, False], merged   # after a cell: FactorizedReduce or other channels
    assert_paired_runs_as_one(results, counts, sum(merged))
    assert counts[True]["cat"] == counts[False]["cat"], "the inputs' concatenation replaces the pass's"

    pc = copy.deepcopy(build("darts", partial_channels=2, edge_normalization=True)).float()
    pc.set_backend("fused")
    merged.clear()
    monkeypatch.setattr(fused, "_paired_preprocess", spy)
    pc(torch.randn(5, 3, 4, 4))
    assert merged == [], merged                               # not asked: partial channels


def test_partial_channels_pool_each_strided_states_bypass_once_either_way():
    """The bypassed channels of a stride-2 state are max-pooled once per state, whether they go
    into the pass's product or into weighted adds of their own (`search.matmul_mix: false`)."""
    counts = {}
    for matmul_mix in (True, False):
        net = copy.deepcopy(build("darts", columns=[4], partial_channels=2, edge_normalization=True)).float()
        net.set_backend("fused", matmul_mix=matmul_mix)     # sep_conv_3x3 only: no pooling op
        with CountOps() as c:
            net(torch.randn(3, 3, 8, 8))
        counts[matmul_mix] = c.count["max_pool2d_with_indices"]
    assert counts[True] == counts[False] == 4, counts     # 2 reduction cells × 2 strided inputs


def test_state_parts_are_views_whose_gradient_is_the_sum_of_both(float64):
    from nascore.fused import StateParts
    x = torch.randn(2, 6, 3, 3, requires_grad=True)
    w_whole, w_ops = torch.randn(2, 6, 3, 3), torch.randn(2, 2, 3, 3)

    def run(x):
        whole, ops = StateParts.apply(x, 2)
        return (whole * w_whole).sum() + (ops * w_ops).sum()
    whole, ops = StateParts.apply(x, 2)
    assert whole.data_ptr() == ops.data_ptr() == x.data_ptr() and ops.shape == (2, 2, 3, 3)
    (g,) = torch.autograd.grad(run(x), x)
    torch.testing.assert_close(g, w_whole + F.pad(w_ops, (0, 0, 0, 0, 0, 4)))
    torch.autograd.gradcheck(run, (x,))
    torch.autograd.gradgradcheck(run, (x,))               # the out-of-place backward
    only_ops = torch.autograd.grad((StateParts.apply(x, 2)[1] * w_ops).sum(), x)[0]
    torch.testing.assert_close(only_ops, F.pad(w_ops, (0, 0, 0, 0, 0, 4)))


@pytest.mark.parametrize("space,switches,backend", [
    # nor_conv_1x1 and 3×3 as one conv
    ("nb201", {"partial_channels": 2, "edge_normalization": True}, "fused_dense"),
    ("darts", {"columns": [1, 3, 4]}, "fused"),     # paired inputs: pooling + BN, skip (FactorizedReduce), sep conv
    # sep 3×3 and 5×5 as one conv; the reduction cell's paired strided convs block-diagonal; and
    # search-time drop-path: one draw, each cell's factors (the same draws from the same seed)
    ("darts", {"columns": [3, 4, 5], "drop_path": 0.3}, "fused_dense"),
])
def test_fused_forward_traces_under_torch_compile(space, switches, backend):
    switches = dict(switches)
    drop = switches.pop("drop_path", 0.0)
    net = build(space, **switches)
    net.set_backend(backend)
    net.set_drop_path(drop)
    # fullgraph: no graph break in the cells
    reference = assert_compiled_like_plain(net, lambda: torch.compile(net, backend="eager", fullgraph=True))
    plans = [plan for m in reference.modules() if isinstance(m, SearchCell) for plan in m._fused_plans.values()]
    assert {plan.paired for plan in plans} == {space == "darts"}
    merged = {g.repeats > 1 for plan in plans for sp in plan.arch.sources for g in sp.groups}
    assert (True in merged) == (backend == "fused_dense")


@lowers_with_inductor
@pytest.mark.parametrize("space,columns", [("nb201", None), ("darts", [1, 3, 4, 5])])
def test_inductor_lowers_the_fused_cells_to_their_uncompiled_numbers(space, columns):
    """`search.compile` with the real compiler (inductor: C++ on a CPU, Triton on a GPU), cell by
    cell, through `fused_dense` (merged kernel sizes, block-diagonal reduction convs, NB201's conv
    biases): the α step's training forward and backward give the uncompiled cells' output,
    gradients and BN buffers. The other compile tests stop at dynamo's or AOTAutograd's graph,
    which run as traced; torch 2.11's inductor could not lower a conv bias sliced from the
    gathered weights, and no test reached that far."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]      # `reset` keeps the counters
    net = build(space, columns).to(device)
    net.set_backend("fused_dense")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).to(device)

    def step(model):
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.sum().backward()
        return out
    reference = copy.deepcopy(net)
    step(reference)
    expected = step(reference)
    net.compile("cells")                   # inductor, torch.compile's default
    step(net)                              # the first call of its kind runs eagerly (`Supernet.compile`)
    torch.testing.assert_close(step(net), expected)
    for (name, p), q in zip(net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    # BN running statistics too: a conv bias before a training-mode BN moves only those
    for (name, b), c in zip(net.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, msg=name)
    # compiled, not run eagerly: a trace per cell shape (NB201: a cell per stage; DARTS: a normal
    # cell, a reduction cell, a reduction cell after one)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 3


def test_fused_drop_path_traces_cell_by_cell_under_torch_compile():
    """`compile_scope: cells`: the cell's drop-path factors are an argument of the compiled cell;
    the same numbers as the uncompiled forward from the same seed (the network scope: above)."""
    torch._dynamo.reset()
    net = build("nb201", partial_channels=2, edge_normalization=True)
    net.set_backend("fused_dense")
    net.set_drop_path(0.3)

    def compiled():
        net.compile("cells", backend="eager", fullgraph=True)
        net(torch.randn(2, 3, 8, 8, dtype=torch.float64))     # each kind's first call runs eagerly
        return net
    assert_compiled_like_plain(net, compiled)


@pytest.mark.parametrize("space,columns", [("nb201", None), ("darts", [1, 3, 4])])
def test_a_compiled_cells_backward_takes_one_gradient_its_outputs(space, columns):
    """`compile_scope: cells` under an α gradient (the α step): the compiled cell hands back its
    output and its BN updates, nothing else that needs a gradient, so its backward takes one
    incoming gradient. Its memos of α's gathered weights and mixing matrices, written to an
    argument, used to leave the compiled code as extra outputs; no loss reached them, and
    autograd filled each one's gradient with zeros before every compiled backward (7 per NB201
    cell: 21 zero fills per tiny NB201 step, 138 per spec-size DARTS step)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    tangents = []

    def backward_compiler(gm, example_inputs):
        tangents.append(sum(n.op == "placeholder" and n.name.startswith("tangents") for n in gm.graph.nodes))
        return make_boxed_func(gm.forward)
    torch._dynamo.reset()
    net = build(space, columns)
    net.set_backend("fused_dense")
    net.compile("cells", backend=aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                                              bw_compiler=backward_compiler))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for _ in range(2):                  # the first call of its kind runs eagerly
        net(x).sum().backward()
    assert tangents and tangents == [1] * len(tangents)


def assert_compiled_like_plain(net, compiled):
    """`compiled()` (net compiled, a callable) gives an uncompiled copy's output and gradients
    from the same seed (drop-path's draws included); returns that copy."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    reference = copy.deepcopy(net)
    torch.manual_seed(3)
    expected = reference(x)
    expected.sum().backward()
    run = compiled()
    torch.manual_seed(3)
    out = run(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    for (name, p), q in zip(net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    return reference


# --- whole searches ------------------------------------------------------------------------------
def tiny_search_config(method, space, **overrides):
    settings = get_method(method).resolved_settings()
    settings.update(epochs=2, batch_size=4, init_channels=4, layers=1 if space == "nb201" else 3,
                    arch_warmup_epochs=0, valid_every=1, partial_channels=min(
                        settings.get("partial_channels", 1), 2),
                    opp=SearchConfig().opp.__class__(stage_epochs=1, skip_after_epoch=0))
    settings.update(overrides)
    return SearchConfig(**settings)


def tiny_data(n=4, batch=4, dtype=torch.float64):
    x, y = learnable_images(2 * n, 4, 4)
    x = x.to(dtype)
    return SearchData(TensorLoader(x[:n], y[:n], batch), TensorLoader(x[n:], y[n:], batch), 4,
                      score_fraction_batches=1)


def assert_same_search(a, b, rtol=1e-7, atol=1e-9):
    assert a.genotype == b.genotype
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(vb, va, rtol=rtol, atol=atol, msg=k)
    for ra, rb in zip(a.history, b.history):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=rtol)
        assert rb["genotype"] == ra["genotype"]


@pytest.mark.parametrize("method,space,backend", [
    ("darts", "darts", "fused"), ("darts_v2", "nb201", "fused"), ("pc_darts", "darts", "fused"),
    ("rf_darts", "darts", "fused"), ("opp_darts", "s3", "fused"), ("single_darts", "s3", "fused"),
    ("darts_v2", "darts", "fused_dense"), ("pc_darts", "darts", "fused_dense")])
def test_a_fused_search_follows_the_eager_search(method, space, backend, float64):
    cfg = tiny_search_config(method, space)
    runs = [search(get_space(space), tiny_search_config(method, space, backend=b), tiny_data(n=4),
                   log=lambda s: None) for b in ("eager", backend)]
    assert_same_search(*runs)
    assert cfg.backend == "eager"


def test_fused_dense_trades_are_search_params_that_change_no_number(float64):
    """`search.merge_kernel_sizes`, `search.block_diagonal`, `search.matmul_mix` and
    `search.merge_batch_norms` reach the supernet; off, the search runs the unmerged, grouped
    convs, the chained node sums and one BN per op kind, and
    every number stays the same."""
    runs = []
    for on in (True, False):
        cfg = tiny_search_config("darts", "darts", backend="fused_dense", merge_kernel_sizes=on, block_diagonal=on,
                                 matmul_mix=on, merge_batch_norms=on)
        runs.append(search(get_space("darts"), cfg, tiny_data(n=4), log=lambda s: None))
        model = runs[-1].model
        assert (model.merge_kernel_sizes, model.block_diagonal, model.matmul_mix, model.merge_batch_norms) == (on,) * 4
        merged = {g.repeats > 1 for m in runs[-1].model.modules() if isinstance(m, SearchCell)
                  for plan in m._fused_plans.values() for sp in plan.arch.sources for g in sp.groups}
        assert merged == {True, False} if on else merged == {False}
    assert_same_search(*runs)


@pytest.mark.parametrize("space,scope,layers,traces_per_kind,cells_per_call,matmul_mix", [
    ("nb201", "network", 1, 1, 1, True),
    # 6 cells in 3 shapes: a trace per shape, shared by its 2 cells; 3 kinds × 3 shapes = 9
    # traces, more than dynamo's default limit of 8 (`graphs.RECOMPILE_LIMIT`)
    ("nb201", "cells", 2, 3, 6, True),
    # the node sums as chained weighted adds: what a compiled search runs by default
    ("nb201", "cells", 2, 3, 6, False),
    # 3 cells in 3 shapes (a normal, a reduction, a reduction after one), whose preprocessing runs
    # before the compiled cell
    ("darts", "cells", 3, 3, 3, False)])
def test_a_compiled_search_traces_each_kind_of_call_once_and_follows_the_plain_search(
        space, scope, layers, traces_per_kind, cells_per_call, matmul_mix, float64):
    """`search.compile`: the supernet's first call of each kind (the α step's train forward, the
    weight step's with α constant, eval without grad) runs eagerly and fills the lazy plan and
    index caches, so dynamo traces each kind once (per cell shape with `compile_scope: cells`). A
    trace with the caches still empty would be guarded on their emptiness and traced again. With
    `cells`, that first call runs the compiled code's Python cell by cell: the plain forward
    gathers a DARTS cell's weights with its preprocessing's, so the traces made the compiled
    cell's own constants and were guarded on them (DARTS: 12 traces here, not 9)."""
    traces, calls = [], []

    def backend(gm, example_inputs):          # dynamo's trace, run as traced (no inductor: fast)
        traces.append(gm)

        def run(*args):
            calls.append(len(traces))
            return gm.forward(*args)
        return run
    torch._dynamo.reset()             # no trace left over from another test of this worker
    cfg = tiny_search_config("darts", space, backend="fused", epochs=2, layers=layers, matmul_mix=matmul_mix)
    space = get_space(space)
    plain = search(space, cfg, tiny_data(n=8), log=lambda s: None)
    run = SearchRun(space, cfg, tiny_data(n=8), log=lambda s: None)
    run.model.compile(scope, backend=backend)
    compiled = run.run()
    assert len(traces) == 3 * traces_per_kind               # train (α step, w step), eval
    # the compiled code ran: 2 epochs × 2 batches × (α, w) training calls and 2 validation
    # forwards (one merged batch per epoch), less the first of each kind, which runs eagerly
    assert len(calls) == ((2 * 2 * 2 - 2) + (2 - 1)) * cells_per_call
    assert_same_search(plain, compiled)
    copy.deepcopy(run.model)(torch.randn(2, 3, 4, 4))         # a copy runs eagerly: no new trace
    assert len(traces) == 3 * traces_per_kind


def test_a_compiled_search_with_drop_path_compiles_in_its_first_epochs_only():
    """`search.drop_path` ramps its probability every epoch. Compiled, the supernet takes it as a
    device tensor once it is above 0 (`drop_path_on_device`), which no trace is guarded on: the
    traces of the first two epochs serve the rest. As a float, AOTAutograd (which every real
    backend runs, inductor included) made it a constant guarded on its value, and each epoch
    compiled the supernet again. At 0 it stays a float, which draws no mask: the plain search's
    numbers. (In float32: in float64 the CPU's Bernoulli kernels draw other masks for a tensor
    probability than for a float one.)"""
    from torch._dynamo.backends.registry import lookup_backend
    aot_eager, traces, seen = lookup_backend("aot_eager"), [], []

    def backend(gm, example_inputs):
        traces.append(1)
        aot_eager(gm, example_inputs)       # its passes add their guards to the trace's
        return gm.forward                   # run as traced: the plain search's numbers
    torch._dynamo.reset()
    space = get_space("nb201")
    cfg = tiny_search_config("darts", "nb201", backend="fused", epochs=4, drop_path=0.3)
    plain = search(space, cfg, tiny_data(n=8, dtype=torch.float32), log=lambda s: None)
    run = SearchRun(space, cfg, tiny_data(n=8, dtype=torch.float32),
                    on_epoch_end=lambda record: seen.append(len(traces)),
                    log=lambda s: None)
    run.model.compile("network", backend=backend)
    compiled = run.run()
    # epoch 1 (p = 0): the α step's and the weight step's training forwards (validation's
    # first call runs eagerly); epoch 2: validation, and both training forwards with drop-path
    # on, p a tensor (the first call of each runs eagerly: the trace sees full caches); then
    # nothing more
    assert seen == [2, 5, 5, 5]
    # float32 rounding apart: a compiled cell adds NB201's conv biases after the conv (see
    # `_relu_conv_bn`), and torch 2.11's traces round BN running statistics by an ulp or two;
    # over 4 epochs that moves a loss by 5e-7 and a weight by 2.3e-7 (other masks: another genotype)
    assert_same_search(plain, compiled, rtol=1e-5, atol=1e-6)
    run.model.drop_path_on_device(None)           # asked for, a float again: not moved back
    assert not run.model.drop_prob_on_device() and isinstance(run.model._drop_prob, float)


@pytest.mark.parametrize("backend", ["fused", "fused_dense"])
@pytest.mark.parametrize("space,switches", [("darts", {}), ("nb201", {}), ("s1", {}),
                                            ("darts", {"partial_channels": 2, "edge_normalization": True})])
def test_a_training_forward_makes_every_constant_an_evaluation_forward_needs(space, switches, backend):
    """The fused forward's index constants (`Supernet._index_cache`) all exist after the first
    training forward: a compiled forward is guarded on that cache, so an entry the first
    validation added would retrace every compiled training graph (a DARTS search traced 5 graphs,
    not 3, until the evaluation gathers were made in training, `FusedArch.prefill`)."""
    net = build(space, **switches)
    net.set_backend(backend)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    net(x).sum().backward()
    with net.arch_constant():                   # the weight step's call
        net(x).sum().backward()
    made = set(net._index_cache)
    net.eval()
    with torch.no_grad():
        net(x)
    assert set(net._index_cache) == made


def test_a_fused_search_resumes_an_eager_checkpoint(tmp_path, float64):
    space = get_space("darts")
    full = search(space, tiny_search_config("pc_darts", "darts"), tiny_data(), log=lambda s: None)

    class Interrupt(Exception):
        pass

    def stop(record):
        raise Interrupt
    with pytest.raises(Interrupt):
        search(space, tiny_search_config("pc_darts", "darts"), tiny_data(), on_epoch_end=stop,
               checkpoint_path=tmp_path / "s.pt", log=lambda s: None)
    resumed = search(space, tiny_search_config("pc_darts", "darts", backend="fused"), tiny_data(),
                     checkpoint_path=tmp_path / "s.pt", log=lambda s: None)
    assert resumed.resumed_from_epoch == 1
    assert_same_search(full, resumed)


# --- no host sync in a step ----------------------------------------------------------------------
@pytest.mark.parametrize("method,space,overrides", [
    ("darts", "nb201", {"backend": "eager"}), ("darts", "nb201", {}), ("darts_v2", "nb201", {}),
    ("single_darts", "nb201", {}), ("rf_pcdarts", "nb201", {"arch_grad_clip": 5.0}), ("opp_darts", "nb201", {}),
    ("darts", "nb201", {"channels_last": True, "optimizer_impl": "foreach"}),
    ("darts_v2", "darts", {"backend": "fused_dense"}), ("pc_darts", "darts", {"backend": "fused_dense"}),
])
def test_a_search_step_reads_nothing_on_the_host(method, space, overrides):
    """On the meta device tensors have no values: `.item()`, `.tolist()`, `bool()` would raise."""
    cfg = tiny_search_config(method, space, **{"backend": "fused", **overrides})
    x = torch.empty(4, 3, 8, 8, device="meta")
    y = torch.empty(4, dtype=torch.long, device="meta")
    run = SearchRun(get_space(space), cfg, SearchData(None, None, 4), device="meta", log=lambda s: None)
    if cfg.op_schedule == "progressive":
        run.model.set_active_columns([3, 0])       # a progressive search's op set mid-way
        run.reset_optimisers(0, restart_schedule=False)
    steps = EpochSteps(run, run.step_context(0), update_arch=True)
    for _ in range(2):                             # the second step meets optimiser state
        steps.step((x, y), (x, y))
    assert steps.counts == [8, 8 if run.rule.needs_val_batch else 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_a_gpu_search_step_does_not_synchronise(backend):
    cfg = tiny_search_config("pc_darts", "darts", backend=backend, epochs=1)
    x, y = learnable_images(8, 4, 8)
    data = SearchData(TensorLoader(x.cuda(), y.cuda(), 4), TensorLoader(x.cuda(), y.cuda(), 4), 4)
    run = SearchRun(get_space("darts"), cfg, data, device="cuda", log=lambda s: None)
    steps = EpochSteps(run, run.step_context(0), update_arch=True)
    batch = (x[:4].cuda(), y[:4].cuda())
    steps.step(batch, batch)                       # first step: index tensors, optimiser state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps.step(batch, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_one_real_cuda_graph_serves_a_whole_search(monkeypatch):
    """On a GPU, what the CPU's `TapeGraph` stands in for: a 3-epoch search with the default
    optimisers captures its step once (fused SGD reading `lr_now`, capturable Adam), and its
    records and weights are those of the same steps run afresh every time (`Rerun`), to float
    tolerance."""
    import nascore.search as search_module
    captures: list[int] = []
    real = search_module.cuda_graph
    monkeypatch.setattr(search_module, "cuda_graph", lambda step: captures.append(1) or real(step))
    x, y = learnable_images(32, 4, 8)

    def run(**kw):
        torch.manual_seed(0)
        data = SearchData(TensorLoader(x[:16].cuda(), y[:16].cuda(), 4), TensorLoader(x[16:].cuda(), y[16:].cuda(), 4), 4)
        cfg = tiny_search_config("darts", "darts", backend="fused_dense", epochs=3, **kw)
        return SearchRun(get_space("darts"), cfg, data, device="cuda", log=lambda s: None,
                         capture_step=None if cfg.cuda_graph else Rerun).run()
    graphed = run(cuda_graph=True)
    assert len(captures) == 1
    rerun = run(optimizer_impl="fused")
    assert len({r["lr"] for r in graphed.history}) == 3
    for a, b in zip(graphed.history, rerun.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["arch_loss"] == pytest.approx(b["arch_loss"], rel=1e-4)
    for (k, a), b in zip(rerun.model.state_dict().items(), graphed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_observing_a_graphed_drop_path_search_leaves_its_trajectory_as_it_was(device):
    """Validation and the Hessian eigenvalue draw from a fork of the generators (`train.forked_rng`)
    between the replays of a captured step that draws drop-path masks (its probability on the
    device): put back, the replays draw the same masks as without them. A real CUDA graph on a
    GPU, its CPU stand-in (`TapeGraph`) here."""
    x, y = learnable_images(32, 4, 8)

    def run(**kw):
        torch.manual_seed(0)
        data = SearchData(TensorLoader(x[:16].to(device), y[:16].to(device), 4),
                          TensorLoader(x[16:].to(device), y[16:].to(device), 4), 4)
        cfg = tiny_search_config("darts", "darts", backend="fused_dense", epochs=3, drop_path=0.3,
                                 cuda_graph=device == "cuda", optimizer_impl="default" if device == "cuda" else "fused",
                                 **kw)
        return SearchRun(get_space("darts"), cfg, data, device=device, log=lambda s: None,
                         capture_step=None if device == "cuda" else TapeGraph).run()
    TapeGraph.captures = 0
    observed = run(valid_every=1, hessian_eigenvalue=True, hessian_iters=2)
    plain = run(valid_every=0)
    assert "hessian_eigenvalue" in observed.history[-1] and TapeGraph.captures == (0 if device == "cuda" else 2)
    for (k, a), b in zip(plain.model.state_dict().items(), observed.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=k)   # other masks: far apart


# --- the captured step --------------------------------------------------------------------------
class Rerun:
    """A stand-in for a captured graph on CPU: `replay` re-runs the step on the static buffers."""

    def __init__(self, step):
        self.step = step

    def replay(self):
        self.step()


class UnevenLoader(TensorLoader):
    """Full batches, then one short batch (the graph cannot take it: it runs plainly)."""

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def __iter__(self):
        for i in range(len(self)):
            yield self.x[i * self.batch_size:(i + 1) * self.batch_size], \
                self.y[i * self.batch_size:(i + 1) * self.batch_size]


def test_the_captured_step_logic_reproduces_the_plain_loop(float64):
    x, y = learnable_images(28, 4, 8)
    x = x.double()

    def data():
        return SearchData(UnevenLoader(x[:14], y[:14], 4), TensorLoader(x[14:], y[14:], 4), 4)
    # `fused`: a captured search's default SGD is fused (see `SearchRun.fused_sgd`), so the
    # plain run's must be too for the two to compute bit for bit the same
    cfg = tiny_search_config("pc_darts", "darts", backend="fused", arch_warmup_epochs=1, optimizer_impl="fused")
    plain = SearchRun(get_space("darts"), cfg, data(), log=lambda s: None).run()
    result = SearchRun(get_space("darts"), cfg, data(), log=lambda s: None, capture_step=Rerun).run()
    assert_searches_identical(plain, result)


@pytest.mark.parametrize("method,space,overrides,captures", [
    # α's warm-up ends after epoch 1: one capture in it, one after; the lr changes every epoch
    ("pc_darts", "darts", {"arch_warmup_epochs": 1}, 2),
    # second order: ξ, the epoch's lr, is read on the device as well
    ("darts_v2", "nb201", {}, 1),
    # OPP-DARTS adds an op every epoch here (another op set, fresh optimisers): a capture each
    ("opp_darts", "nb201", {}, 3),
    # a foreach SGD takes its lr as a number, which a graph freezes: a capture per epoch (α stays
    # in warm-up throughout, as a CPU Adam outside `fused` is not capturable)
    ("darts", "nb201", {"optimizer_impl": "foreach", "arch_warmup_epochs": 3}, 3),
])
def test_a_captured_search_step_serves_every_epoch_that_froze_nothing_new(method, space, overrides, captures,
                                                                          float64):
    """Through `TapeGraph` (a CUDA graph's contract on the CPU: Python values frozen at capture),
    a search captures anew only when something its step froze changes, and computes exactly what
    the plain loop computes: per-epoch lr, validation between epochs and the short last batch
    included."""
    x, y = learnable_images(28, 4, 8)
    x = x.double()

    def data():
        return SearchData(UnevenLoader(x[:14], y[:14], 4), TensorLoader(x[14:], y[14:], 4), 4,
                          score_fraction_batches=1)
    cfg = tiny_search_config(method, space, **{"backend": "fused", "optimizer_impl": "fused", "epochs": 3,
                                               **overrides})
    plain = SearchRun(get_space(space), cfg, data(), log=lambda s: None).run()
    TapeGraph.captures = TapeGraph.replays = 0
    graphed = SearchRun(get_space(space), cfg, data(), log=lambda s: None, capture_step=TapeGraph).run()
    assert TapeGraph.captures == captures
    # 4 batches an epoch, the last short (plain); 2 plain warm-up steps before each capture
    assert TapeGraph.replays == 3 * 3 - 2 * captures
    assert len({r["lr"] for r in plain.history}) == 3
    assert_searches_identical(plain, graphed)


@pytest.mark.parametrize("backend", ["eager", "fused_dense"])
def test_a_captured_search_step_follows_the_drop_path_ramp(backend, float64):
    """Search-time drop-path under a capture: the supernet keeps p in a device tensor that each
    epoch writes, so one capture serves the whole ramp, and its replays draw and compute what
    running the step afresh does (`Rerun`, which freezes nothing)."""
    x, y = learnable_images(28, 4, 8)
    x = x.double()

    def run(capture, drop_path=0.4):
        data = SearchData(UnevenLoader(x[:14], y[:14], 4), TensorLoader(x[14:], y[14:], 4), 4)
        cfg = tiny_search_config("darts", "nb201", backend=backend, optimizer_impl="fused", epochs=3,
                                 drop_path=drop_path)
        return SearchRun(get_space("nb201"), cfg, data, log=lambda s: None, capture_step=capture).run()
    TapeGraph.captures = 0
    taped = run(TapeGraph)
    assert TapeGraph.captures == 1
    assert taped.model.drop_prob_on_device()
    rerun = run(Rerun)
    for (k, a), b in zip(rerun.model.state_dict().items(), taped.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert [r["train_loss"] for r in taped.history] == [r["train_loss"] for r in rerun.history]
    # and the masks did drop: without drop-path the same search differs after its first epoch
    undropped = run(Rerun, drop_path=0.0)
    assert undropped.history[2]["train_loss"] != taped.history[2]["train_loss"]


def test_a_fused_sgd_steps_with_each_epochs_lr(float64):
    """The fused SGD reads the lr from `lr_now`, written before each epoch: the same search as
    with torch's per-parameter loop, which takes the lr as a number (second order: ξ too)."""
    runs = [search(get_space("nb201"), tiny_search_config("darts_v2", "nb201", epochs=3, optimizer_impl=impl),
                   tiny_data(), log=lambda s: None) for impl in ("for_loop", "fused")]
    assert len({r["lr"] for r in runs[0].history}) == 3
    assert_same_search(*runs, rtol=1e-10)


def test_a_search_that_reuses_its_steps_resumes_exactly(tmp_path, float64):
    """With a fused SGD nothing a capture freezes changes between epochs, so one `EpochSteps`
    serves them all, its sums zeroed in place. Its records and weights equal those of a search
    interrupted after every epoch and resumed, whose steps are new each epoch (and whose
    checkpoint's lr tensor gives way to the run's own `lr_now`)."""
    cfg = tiny_search_config("darts_v2", "nb201", epochs=3, optimizer_impl="fused")
    full = search(get_space("nb201"), cfg, tiny_data(), log=lambda s: None)

    class Interrupt(Exception):
        pass

    def stop(record):
        raise Interrupt
    for _ in range(2):
        with pytest.raises(Interrupt):
            search(get_space("nb201"), cfg, tiny_data(), on_epoch_end=stop, checkpoint_path=tmp_path / "s.pt",
                   log=lambda s: None)
    resumed = search(get_space("nb201"), cfg, tiny_data(), checkpoint_path=tmp_path / "s.pt", log=lambda s: None)
    assert resumed.resumed_from_epoch == 2
    assert_same_search(full, resumed, rtol=1e-12)


def test_captured_steps_make_the_default_sgd_fused():
    """`optimizer_impl: default` is torch's choice, but a captured search's SGD is fused: its lr
    a device tensor that the epoch's lr is written into, not a number a graph would freeze."""
    cfg = tiny_search_config("darts", "nb201", epochs=3)
    run = SearchRun(get_space("nb201"), cfg, tiny_data(), log=lambda s: None, capture_step=TapeGraph)
    ctx = run.step_context(1)
    assert ctx.lr is run.lr_now and float(run.lr_now) == pytest.approx(run.lr_at(1))
    assert all(g["fused"] and g["lr"] is run.lr_now for g in run.w_opt.param_groups)
    plain = SearchRun(get_space("nb201"), cfg, tiny_data(), log=lambda s: None)
    assert plain.step_context(1).lr == run.lr_at(1)
    assert not any(g["fused"] for g in plain.w_opt.param_groups)


def test_speed_options_are_checked():
    with pytest.raises(ConfigError, match="cuda_graph: true needs a CUDA device"):
        SearchRun(get_space("nb201"), tiny_search_config("darts", "nb201", cuda_graph=True), tiny_data(),
                  log=lambda s: None)
    with pytest.raises(ConfigError, match="nonfinite: stop"):
        SearchRun(get_space("nb201"), tiny_search_config("darts", "nb201", cuda_graph=True, nonfinite="skip"),
                  tiny_data(), device="cuda", log=lambda s: None)
    with pytest.raises(ConfigError, match=r"search.amp='fp16'; allowed: none, bf16"):
        SearchRun(get_space("nb201"), tiny_search_config("darts", "nb201", amp="fp16"), tiny_data(),
                  log=lambda s: None)


@pytest.mark.parametrize("enabled", [False, True])
def test_cudnn_benchmark_holds_for_the_search_and_is_restored(enabled, float64):
    seen = []
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = not enabled                 # the caller's setting
    try:
        search(get_space("nb201"), tiny_search_config("darts", "nb201", cudnn_benchmark=enabled), tiny_data(),
               log=lambda s: seen.append(torch.backends.cudnn.benchmark))
        assert seen and set(seen) == {enabled}
        assert torch.backends.cudnn.benchmark == (not enabled)
    finally:
        torch.backends.cudnn.benchmark = before


def test_bf16_and_fused_optimisers_run_on_cpu():
    cfg = tiny_search_config("darts", "nb201", backend="fused", amp="bf16", optimizer_impl="fused",
                             channels_last=True, epochs=1)
    result = search(get_space("nb201"), cfg, tiny_data(dtype=torch.float32), log=lambda s: None)
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))
    assert all(torch.isfinite(a).all() for a in result.model.arch_parameters())
