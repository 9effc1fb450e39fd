"""The update rules: the second-order hypergradient against brute force, single-level data flow."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from nascore.optimisation import StepContext, UPDATE_RULES, unrolled_arch_gradient, virtual_weights
from nascore.spaces import get_space
from nascore.supernet import SupernetConfig


def tiny_nb201(seed=0):
    torch.manual_seed(seed)
    net = get_space("nb201").build_supernet(SupernetConfig(init_channels=2, layers=1, num_classes=3))
    return net.double()


def batches(seed=1):
    g = torch.Generator().manual_seed(seed)
    xt, xv = torch.randn(6, 3, 4, 4, generator=g).double(), torch.randn(6, 3, 4, 4, generator=g).double()
    yt, yv = torch.randint(0, 3, (6,), generator=g), torch.randint(0, 3, (6,), generator=g)
    return (xt, yt), (xv, yv)


def context(net, lr=0.05, undecayed=0, nesterov=False):
    """`undecayed`: how many leading weights sit in a group without weight decay (as BN's γ, β do
    under search.bn_weight_decay: false)."""
    weights, arch = net.weight_parameters(), net.arch_parameters()
    groups = [{"params": weights[undecayed:]}] + ([{"params": weights[:undecayed], "weight_decay": 0.0}]
                                                 if undecayed else [])
    w_opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=3e-4, nesterov=nesterov)
    a_opt = torch.optim.Adam(arch, lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    return StepContext(model=net, weights=weights, arch=arch, w_opt=w_opt, a_opt=a_opt, lr=lr,
                       grad_clip=5.0, momentum=0.9, weight_decay=3e-4)


@pytest.mark.parametrize("undecayed", [0, 5])
def test_second_order_hypergradient_matches_brute_force_finite_differences(undecayed):
    net = tiny_nb201()
    train, val = batches()
    ctx = context(net, undecayed=undecayed)
    # one real SGD step first, so the momentum buffer m the virtual step replays is non-zero
    F.cross_entropy(net(train[0]), train[1]).backward(inputs=ctx.weights)
    ctx.w_opt.step()
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    names = [n for n, p in net.named_parameters() if p.requires_grad and "alphas" not in n]
    w = [dict(net.named_parameters())[n].detach() for n in names]
    m = [ctx.w_opt.state[p]["momentum_buffer"] for p in ctx.weights]
    xi = ctx.lr

    def unrolled_val_loss(alpha: torch.Tensor) -> float:
        """L_val(w'(α), α) with w'(α) = w − ξ(μ m + ∇_w L_train(w, α) + λ w), computed exactly."""
        wr = [t.clone().requires_grad_(True) for t in w]
        params = {**buffers, **dict(zip(names, wr)), "alphas.cell": alpha}
        loss_t = F.cross_entropy(functional_call(net, params, (train[0],)), train[1])
        g = torch.autograd.grad(loss_t, wr)
        decay = [0.0 if i < undecayed else 3e-4 for i in range(len(w))]   # the virtual step's λ per weight
        w_prime = [t - xi * (0.9 * mi + gi + lam * t) for t, mi, gi, lam in zip(w, m, g, decay)]
        params = {**buffers, **dict(zip(names, w_prime)), "alphas.cell": alpha}
        return float(F.cross_entropy(functional_call(net, params, (val[0],)), val[1]))

    alpha0 = net.alphas["cell"].detach().clone()
    h = 1e-5
    brute = torch.zeros_like(alpha0)
    for idx in range(alpha0.numel()):
        e = torch.zeros_like(alpha0).view(-1)
        e[idx] = h
        e = e.view_as(alpha0)
        brute.view(-1)[idx] = (unrolled_val_loss(alpha0 + e) - unrolled_val_loss(alpha0 - e)) / (2 * h)

    # The estimator replaces the Hessian-vector product by a central difference with ε = r/‖v‖.
    # DARTS' r = 0.01 is a step of norm 0.01 in weight space: on this 2-channel net with BN over
    # 6 images the α-gradient is far from linear at that scale (the difference is off by ~2x), so
    # the algebra is checked at r = 1e-5, where the central difference has converged.
    ctx.unrolled_eps = 1e-5
    _, _, (g_alpha,) = unrolled_arch_gradient(ctx, train, val)
    torch.testing.assert_close(g_alpha, brute, rtol=1e-4, atol=1e-7)
    # and the second-order term matters here: the first-order gradient is measurably different
    first = torch.autograd.grad(F.cross_entropy(net(val[0]), val[1]), net.alphas["cell"])[0]
    assert not torch.allclose(first, brute, rtol=1e-2, atol=0)


@pytest.mark.parametrize("tensor_lr", [False, True])  # True: fused SGD, ξ a 0-dim tensor (SearchRun.lr_now)
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("steps_before", [0, 1])       # 0: no momentum buffer yet
def test_the_virtual_step_is_the_step_sgd_takes(nesterov, steps_before, tensor_lr):
    """methods.md §2.1 step 1, "replicating the SGD update": w' equals what torch's SGD does with
    the same gradients (unclipped), Nesterov (NB201's optimiser) and undecayed BN group included."""
    net = tiny_nb201()
    train, _ = batches()
    ctx = context(net, undecayed=5, nesterov=nesterov)
    if tensor_lr:
        ctx.lr = torch.tensor(0.05, dtype=torch.float32)
        for group in ctx.w_opt.param_groups:
            group.update(fused=True, foreach=False, lr=ctx.lr)
    for _ in range(steps_before):
        ctx.w_opt.zero_grad()
        F.cross_entropy(net(train[0]), train[1]).backward(inputs=ctx.weights)
        ctx.w_opt.step()
    ctx.w_opt.zero_grad()
    grads = list(torch.autograd.grad(F.cross_entropy(net(train[0]), train[1]), ctx.weights))
    grads[1] = None                                 # a weight without a gradient stays put
    before = [p.detach().clone() for p in ctx.weights]
    virtual = virtual_weights(ctx, grads)
    assert all(torch.equal(p, b) for p, b in zip(ctx.weights, before)), "w itself is untouched"
    for p, g in zip(ctx.weights, grads):
        p.grad = g
    ctx.w_opt.step()
    for k, (v, p) in enumerate(zip(virtual, ctx.weights)):
        torch.testing.assert_close(v, p.detach(), rtol=1e-12, atol=1e-14, msg=f"weight {k}")
    assert torch.equal(virtual[1], before[1])


def test_unrolled_step_leaves_weights_and_bn_statistics_untouched():
    net = tiny_nb201()
    train, val = batches()
    ctx = context(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    unrolled_arch_gradient(ctx, train, val)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_single_level_uses_one_batch_for_both_gradients():
    net = tiny_nb201()
    train, _ = batches()
    ctx = context(net)
    expected = torch.autograd.grad(F.cross_entropy(net(train[0]), train[1]), net.alphas["cell"])[0]
    UPDATE_RULES.get("single_level")().step(ctx, train, None, update_arch=True)
    # the α gradient Adam used is ∇_α L_train on the train batch, at the pre-step weights
    torch.testing.assert_close(net.alphas["cell"].grad, expected)


def test_first_order_alpha_gradient_is_the_validation_gradient_at_current_weights():
    net = tiny_nb201()
    train, val = batches()
    ctx = context(net)
    expected = torch.autograd.grad(F.cross_entropy(net(val[0]), val[1]), net.alphas["cell"])[0]
    stats = UPDATE_RULES.get("first_order")().step(ctx, train, val, update_arch=True)
    torch.testing.assert_close(net.alphas["cell"].grad, expected)
    assert stats.arch_count == 6 and stats.count == 6


def test_weights_first_order_steps_weights_before_alpha():
    net = tiny_nb201()
    train, val = batches()
    ctx = context(net)
    ctx.step_order = "weights_first"
    probe = tiny_nb201()
    probe.load_state_dict(net.state_dict())
    pctx = context(probe)
    F.cross_entropy(probe(train[0]), train[1]).backward(inputs=pctx.weights)
    torch.nn.utils.clip_grad_norm_(pctx.weights, 5.0)
    pctx.w_opt.step()
    expected = torch.autograd.grad(F.cross_entropy(probe(val[0]), val[1]), probe.alphas["cell"])[0]
    UPDATE_RULES.get("first_order")().step(ctx, train, val, update_arch=True)
    torch.testing.assert_close(net.alphas["cell"].grad, expected)


def test_no_arch_update_in_warm_up():
    net = tiny_nb201()
    train, val = batches()
    ctx = context(net)
    before = net.alphas["cell"].detach().clone()
    for name in UPDATE_RULES.names():
        UPDATE_RULES.get(name)().step(ctx, train, val, update_arch=False)
    assert torch.equal(net.alphas["cell"], before)
    assert net.alphas["cell"].grad is None


def _leaves(grad_fn) -> set[int]:
    """ids of the leaf tensors (parameters) a backward from `grad_fn` would reach."""
    seen, stack, leaves = set(), [grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.add(id(node.variable))
        stack += [n for n, _ in node.next_functions]
    return leaves


@pytest.mark.parametrize("backend", ["eager", "fused"])
@pytest.mark.parametrize("rule", ["first_order", "second_order"])
def test_passes_that_need_no_alpha_gradient_take_alpha_and_beta_as_constants(rule, backend):
    """No α gradient is computed only to be dropped: the forward graphs of the weight step and of
    the second order's virtual step do not reach α or β (the fused backend's custom functions
    would compute their gradients otherwise); the passes that differentiate α do reach them."""
    torch.manual_seed(0)
    net = get_space("nb201").build_supernet(SupernetConfig(init_channels=2, layers=1, num_classes=3,
                                                           edge_normalization=True)).double()
    net.set_backend(backend)
    ctx = context(net)
    train, val = batches()
    graphs = []
    net.register_forward_hook(lambda module, args, out: graphs.append(out.grad_fn))
    UPDATE_RULES.get(rule)().step(ctx, train, val, update_arch=True)
    arch, weights = {id(p) for p in ctx.arch}, {id(p) for p in ctx.weights}
    assert len(arch) == 2
    reached = [_leaves(g) for g in graphs]
    # first order: α step (val), weight step (train); second order: virtual step (train), unrolled
    # pass (val, at w'), the two finite-difference passes (train, at w ± εv), weight step (train)
    expected = {"first_order": [True, False], "second_order": [False, True, True, True, False]}[rule]
    assert [arch <= leaves for leaves in reached] == expected
    assert not any(arch & leaves for leaves, e in zip(reached, expected) if not e)
    assert weights & reached[-1] and (rule == "second_order" or weights & reached[0])
    assert not net._arch_constant                            # the next forward takes α as a parameter
