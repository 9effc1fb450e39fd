import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from nascore.diagnostics import collapse_diagnostics, hessian_eigenvalue
from nascore.spaces import get_space
from nascore.supernet import SupernetConfig
from tests._tiny import learnable_images


def test_collapse_diagnostics_of_a_skip_dominated_cell():
    net = get_space("darts").build_supernet(SupernetConfig(init_channels=4, layers=3))
    with torch.no_grad():
        net.alphas["normal"].zero_()
        net.alphas["normal"][:, 3] = 5.0            # skip_connect wins every normal edge
    d = collapse_diagnostics(net)
    assert d["param_free_ops_normal"] == 8
    assert d["genotype"]["normal"] == [["skip_connect", j] for j in (0, 1, 0, 1, 0, 1, 0, 1)]
    assert len(d["alphas"]["normal"]) == 14 and len(d["alphas"]["normal"][0]) == 8
    assert d["op_names"]["normal"][0][3] == "skip_connect"
    # reduce α still ~uniform: entropy close to log 8 there, low in the normal cell
    assert d["alpha_entropy"] < math.log(8)


def test_hessian_eigenvalue_matches_the_full_hessian():
    torch.manual_seed(0)
    net = get_space("nb201").build_supernet(SupernetConfig(init_channels=2, layers=1, num_classes=4)).double()
    x, y = learnable_images(8, 4, 4)
    x = x.double()
    params = dict(net.named_parameters())
    buffers = {n: b.clone() for n, b in net.named_buffers()}

    def loss_of(alpha_flat):
        p = {**params, **buffers, "alphas.cell": alpha_flat.view(6, 5)}
        return F.cross_entropy(functional_call(net, p, (x,)), y)

    H = torch.autograd.functional.hessian(loss_of, net.alphas["cell"].detach().flatten())
    eig = torch.linalg.eigvalsh(H)
    dominant = eig[eig.abs().argmax()].item()
    estimate = hessian_eigenvalue(net, [(x, y)], iters=200, tol=1e-10)
    assert abs(estimate - dominant) <= 1e-4 * abs(dominant)


def test_hessian_eigenvalue_of_a_compiled_supernet_runs_its_plain_forward():
    """torch.compile's AOTAutograd cannot differentiate a backward, which the Hessian-vector
    products need: they run the uncompiled forward (`Supernet.forward_uncompiled`). Until
    2026-12-06 `search.compile` with `hessian_eigenvalue` failed after the first epoch's steps."""
    import copy
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = get_space("nb201").build_supernet(SupernetConfig(init_channels=2, layers=1, num_classes=4))
    net.set_backend("fused")
    x, y = learnable_images(4, 4, 4)
    plain = hessian_eigenvalue(copy.deepcopy(net), [(x, y)], iters=2, tol=0.0)
    net.compile("network", backend="aot_eager")      # what inductor runs its compiler behind
    net(x)                                           # warm: this kind of call is compiled from now on
    assert hessian_eigenvalue(net, [(x, y)], iters=2, tol=0.0) == pytest.approx(plain, rel=1e-6)


def test_hessian_eigenvalue_draws_one_set_of_drop_path_masks_from_a_forked_stream(monkeypatch):
    """Search-time drop-path: every Hessian-vector product sees the same masks (one Hessian for the
    power iteration to multiply by), and the global random state is left as it was."""
    import nascore.ops as ops
    torch.manual_seed(0)
    net = get_space("nb201").build_supernet(SupernetConfig(init_channels=2, layers=1, num_classes=4)).double()
    net.set_drop_path(0.5)
    x, y = learnable_images(8, 4, 4)
    x = x.double()
    drawn = []
    draw = ops.bernoulli_mask
    monkeypatch.setattr(ops, "bernoulli_mask", lambda *a, **k: drawn.append(draw(*a, **k)) or drawn[-1])
    state = torch.get_rng_state()
    first = hessian_eigenvalue(net, [(x[:4], y[:4]), (x[4:], y[4:])], iters=3, tol=0.0)
    assert torch.equal(torch.get_rng_state(), state)
    per_product = len(drawn) // 3
    assert per_product > 0 and len(drawn) == 3 * per_product
    for i in range(1, 3):
        for a, b in zip(drawn[:per_product], drawn[i * per_product:(i + 1) * per_product]):
            assert torch.equal(a, b)
    assert any(bool((m == 0).any()) for m in drawn)                # masks that drop something
    assert hessian_eigenvalue(net, [(x[:4], y[:4]), (x[4:], y[4:])], iters=3, tol=0.0) == first
