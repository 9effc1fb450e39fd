"""Architecture optimisation: how one search step updates weights `w` and architecture `α`.

Three update rules (methods.md §2.1, §2.4), each a small object with one `step`:
- `first_order`  bi-level, ∇_α L_val(w, α) on a validation batch, then a weight step on a train
                 batch (order configurable: NB201's DARTS-V1 steps weights first).
- `second_order` bi-level with the unrolled step: ∇_α L_val(w', α) − ξ·(finite-difference
                 Hessian-vector product), w' one virtual SGD step ahead (ξ = current weight lr).
- `single_level` one forward/backward of L_train on one batch gives both gradients (Single-DARTS).

Every backward names its `inputs`, so a weight step never writes α's `.grad` and an α step never
computes weight gradients (fewer kernels too); the passes that differentiate only w (the weight
step, second order's virtual step) take α as a constant (`Supernet.arch_constant`). Step
statistics stay on the device, and nothing in a step reads a tensor's value on the host: a step
can be captured whole in a CUDA graph (`search.cuda_graph`), and tests run every rule on the meta
device, where any such read fails.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .registry import Registry

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class StepContext:
    """What an update rule needs for one step."""

    model: nn.Module                   # a Supernet
    weights: list[nn.Parameter]        # trainable network weights (frozen convs excluded)
    arch: list[nn.Parameter]           # α (and β)
    w_opt: torch.optim.SGD
    a_opt: torch.optim.Optimizer
    lr: float | torch.Tensor           # current weight lr (ξ of the unrolled step); a 0-dim
                                       # device tensor when the SGD is fused (`SearchRun.lr_now`)
    grad_clip: float                   # global-norm clip on w only; α is never clipped (DARTS)
    arch_grad_clip: float = 0.0        # PC-DARTS ImageNet clips α too; 0 = off
    momentum: float = 0.9
    weight_decay: float = 3e-4
    unrolled_eps: float = 0.01         # ε = 0.01 / ‖v‖ in the finite-difference HVP (DARTS)
    step_order: str = "alpha_first"
    amp_dtype: torch.dtype | None = None        # autocast dtype of the forward passes; None: off
    memory_format: torch.memory_format = torch.contiguous_format   # of the input batches


@dataclass
class StepStats:
    """Device tensors: sums over the batch, so an epoch needs one host sync."""

    loss: torch.Tensor                 # train loss × batch size
    correct: torch.Tensor              # correct train predictions
    count: int                         # train images
    arch_loss: torch.Tensor | None = None   # validation loss (× batch) seen by the α step
    arch_correct: torch.Tensor | None = None
    arch_count: int = 0


def _logits(ctx: StepContext, x: torch.Tensor, net: Callable[[torch.Tensor], torch.Tensor] | None = None
            ) -> torch.Tensor:
    """The supernet's logits under the step's autocast and memory format (float32 under bf16)."""
    x = x.contiguous(memory_format=ctx.memory_format)
    if ctx.amp_dtype is None:
        return (net or ctx.model)(x)
    with torch.autocast(x.device.type, dtype=ctx.amp_dtype):
        return (net or ctx.model)(x).float()


def _forward_loss(ctx: StepContext, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch
    logits = _logits(ctx, x)
    return F.cross_entropy(logits, y), logits


def _correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.detach().argmax(1) == y).sum()


def weight_step(ctx: StepContext, batch: Batch) -> StepStats:
    """One SGD step on w from a train batch: CE, backward into w only, clip, step."""
    ctx.w_opt.zero_grad(set_to_none=True)
    with ctx.model.arch_constant():          # no α gradient is computed only to be dropped
        loss, logits = _forward_loss(ctx, batch)
    loss.backward(inputs=ctx.weights)
    if ctx.grad_clip:
        nn.utils.clip_grad_norm_(ctx.weights, ctx.grad_clip)
    ctx.w_opt.step()
    n = batch[1].numel()
    return StepStats(loss.detach() * n, _correct(logits, batch[1]), n)


def _arch_opt_step(ctx: StepContext) -> None:
    if ctx.arch_grad_clip:
        nn.utils.clip_grad_norm_(ctx.arch, ctx.arch_grad_clip)
    with ctx.model.keep_inactive_columns():
        ctx.a_opt.step()


class FirstOrder:
    """Bi-level, first order (DARTS-V1): α from ∇_α L_val(w, α), w from ∇_w L_train."""

    needs_val_batch = True

    def step(self, ctx: StepContext, train: Batch, val: Batch | None, update_arch: bool) -> StepStats:
        if ctx.step_order == "weights_first":
            stats = weight_step(ctx, train)
            if update_arch:
                self._merge(stats, self.arch_step(ctx, val))
            return stats
        arch_stats = self.arch_step(ctx, val) if update_arch else None
        stats = weight_step(ctx, train)
        if arch_stats is not None:
            self._merge(stats, arch_stats)
        return stats

    @staticmethod
    def _merge(stats: StepStats, arch: tuple[torch.Tensor, torch.Tensor, int]) -> None:
        stats.arch_loss, stats.arch_correct, stats.arch_count = arch

    def arch_step(self, ctx: StepContext, val: Batch) -> tuple[torch.Tensor, torch.Tensor, int]:
        ctx.a_opt.zero_grad(set_to_none=True)
        loss, logits = _forward_loss(ctx, val)
        loss.backward(inputs=ctx.arch)
        _arch_opt_step(ctx)
        n = val[1].numel()
        return loss.detach() * n, _correct(logits, val[1]), n


class SecondOrder(FirstOrder):
    """Bi-level, second order (DARTS-V2): the unrolled α gradient (methods.md §2.1).

    The virtual step replicates torch's SGD update with momentum μ and L2 λ exactly:
    w' = w − ξ(μ·m + ∇_w L_train(w, α) + λ·w), m the momentum buffer (zero before the first
    step). Nesterov (NB201's baseline) is ignored in the virtual step, as in the reference code.
    Weights that receive no gradient (ops not yet switched on) stay put, as SGD leaves them.
    """

    def arch_step(self, ctx: StepContext, val: Batch) -> tuple[torch.Tensor, torch.Tensor, int]:
        loss, logits, grads = unrolled_arch_gradient(ctx, self._train_batch, val)
        ctx.a_opt.zero_grad(set_to_none=True)
        for p, g in zip(ctx.arch, grads):
            p.grad = g
        _arch_opt_step(ctx)
        n = val[1].numel()
        return loss.detach() * n, _correct(logits, val[1]), n

    def step(self, ctx: StepContext, train: Batch, val: Batch | None, update_arch: bool) -> StepStats:
        self._train_batch = train
        try:
            return super().step(ctx, train, val, update_arch)
        finally:
            self._train_batch = None


def _named_weights(ctx: StepContext) -> list[str]:
    ids = {id(p): n for n, p in ctx.model.named_parameters()}
    return [ids[id(p)] for p in ctx.weights]


@torch.no_grad()
def virtual_weights(ctx: StepContext, grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """w' = the weights after the SGD step `ctx.w_opt` would take with gradients `grads`
    (unclipped), computed without touching w or the optimiser (methods.md §2.1 step 1).

    With d = ∇_w L_train + λ·w (λ per parameter group: search.bn_weight_decay: false leaves BN's γ,
    β undecayed) and m the momentum buffer (absent before the first step), SGD moves w by
    ξ·(μ·m + d); with Nesterov (NB201's optimiser) by ξ·(d + μ·(μ·m + d)). Weights without a
    gradient stay put, as SGD leaves them.
    """
    w, xi, mu = ctx.weights, ctx.lr, ctx.momentum
    w_prime = [p.detach() for p in w]          # read only: no copy for weights that stay put
    moving = [i for i, g in enumerate(grads) if g is not None]
    if not moving:
        return w_prime
    group_of = {id(p): group for group in ctx.w_opt.param_groups for p in group["params"]}
    decay = {pid: g["weight_decay"] for pid, g in group_of.items()}
    d = [grads[i] for i in moving]
    for wd in {decay.get(id(w[i]), ctx.weight_decay) for i in moving} - {0.0}:
        ks = [k for k, i in enumerate(moving) if decay.get(id(w[i]), ctx.weight_decay) == wd]
        for k, t in zip(ks, torch._foreach_add([d[k] for k in ks], [w[moving[k]] for k in ks], alpha=wd)):
            d[k] = t
    if mu:
        # SGD's new buffer b = μ·m + d (d itself on the first step); the step is b, or d + μ·b
        bufs = [ctx.w_opt.state.get(w[i], {}).get("momentum_buffer") for i in moving]
        b = _add_where(d, [k for k, m in enumerate(bufs) if m is not None], bufs, mu)
        d = _add_where(b, [k for k, i in enumerate(moving) if group_of.get(id(w[i]), {}).get("nesterov")],
                       b, mu, base=d)
    moved = [w[i] for i in moving]
    # a tensor ξ multiplies on the device (as `alpha` it would be read on the host)
    steps = torch._foreach_sub(moved, torch._foreach_mul(d, xi)) if isinstance(xi, torch.Tensor) \
        else torch._foreach_add(moved, d, alpha=-xi)
    for i, t in zip(moving, steps):
        w_prime[i] = t
    return w_prime


def _add_where(out: list[torch.Tensor], ks: list[int], other: Sequence[torch.Tensor | None], alpha: float,
               base: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """A copy of `out` with entry k replaced by (base or out)[k] + alpha·other[k] for k in ks,
    in one foreach kernel."""
    src = out if base is None else base
    result = list(out)
    if ks:
        for k, t in zip(ks, torch._foreach_add([src[k] for k in ks], [other[k] for k in ks], alpha=alpha)):
            result[k] = t
    return result


def unrolled_arch_gradient(ctx: StepContext, train: Batch, val: Batch
                           ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(L_val(w', α), logits, ∇_α of the unrolled objective) without touching w or BN statistics.

    The per-weight arithmetic runs as `torch._foreach_*` ops: one kernel launch per list, not
    one per tensor (the DARTS supernet has ~1,400 weight tensors).
    """
    model, w, arch, xi = ctx.model, ctx.weights, ctx.arch, ctx.lr
    names = _named_weights(ctx)
    # BN running statistics must not move during virtual passes: give them throw-away copies.
    buffers = _scratch_copies(dict(model.named_buffers()))

    def call(params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return _logits(ctx, x, lambda xx: functional_call(model, {**buffers, **dict(zip(names, params))}, (xx,)))

    # 1. virtual step w' = w − ξ(μ m + ∇_w L_train + λ w); weights without a gradient stay put
    with model.arch_constant():                  # ∇_w only: no α gradient computed for nothing
        loss_t = F.cross_entropy(call(w, train[0]), train[1])
    g_train = torch.autograd.grad(loss_t, w, allow_unused=True)
    w_prime = virtual_weights(ctx, g_train)
    w_prime = [t.requires_grad_(True) for t in w_prime]
    # 2. v = ∇_{w'} L_val(w', α),  g1 = ∇_α L_val(w', α)
    logits = call(w_prime, val[0])
    loss_v = F.cross_entropy(logits, val[1])
    grads = torch.autograd.grad(loss_v, w_prime + arch, allow_unused=True)
    v = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads[:len(w)], w_prime)]
    g1 = [g if g is not None else torch.zeros_like(a) for g, a in zip(grads[len(w):], arch)]
    # 3./4. finite-difference HVP: (∇_α L_train(w+εv) − ∇_α L_train(w−εv)) / 2ε, ε = 0.01/‖v‖
    eps = ctx.unrolled_eps / torch.linalg.vector_norm(torch.stack(torch._foreach_norm(v)))
    with torch.no_grad():
        step = torch._foreach_mul(v, eps)

    def arch_grad_at(shifted: list[torch.Tensor]) -> list[torch.Tensor]:
        loss = F.cross_entropy(call(shifted, train[0]), train[1])
        gs = torch.autograd.grad(loss, arch, allow_unused=True)
        return [g if g is not None else torch.zeros_like(a) for g, a in zip(gs, arch)]

    with torch.no_grad():
        w_plus, w_minus = torch._foreach_add(w, step), torch._foreach_sub(w, step)
    g_plus, g_minus = arch_grad_at(w_plus), arch_grad_at(w_minus)
    # 5. g_α = g1 − ξ · hvp
    out = [a - xi * (gp - gm) / (2 * eps) for a, gp, gm in zip(g1, g_plus, g_minus)]
    return loss_v, logits, out


def _scratch_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of `tensors` as views of one concatenation per dtype: one copy kernel, not hundreds."""
    by_dtype: dict[tuple[torch.dtype, torch.device], list[str]] = {}
    for name, t in tensors.items():
        by_dtype.setdefault((t.dtype, t.device), []).append(name)
    out = {}
    for names in by_dtype.values():
        flat = torch.cat([tensors[n].reshape(-1) for n in names])
        for n, part in zip(names, flat.split([tensors[n].numel() for n in names])):
            out[n] = part.view(tensors[n].shape)
    return out


class SingleLevel:
    """Single-DARTS: one batch, one backward, both updates (methods.md §2.4)."""

    needs_val_batch = False

    def step(self, ctx: StepContext, train: Batch, val: Batch | None, update_arch: bool) -> StepStats:
        ctx.w_opt.zero_grad(set_to_none=True)
        ctx.a_opt.zero_grad(set_to_none=True)
        loss, logits = _forward_loss(ctx, train)
        loss.backward(inputs=ctx.weights + ctx.arch if update_arch else ctx.weights)
        if ctx.grad_clip:
            nn.utils.clip_grad_norm_(ctx.weights, ctx.grad_clip)
        ctx.w_opt.step()
        if update_arch:
            _arch_opt_step(ctx)
        n = train[1].numel()
        return StepStats(loss.detach() * n, _correct(logits, train[1]), n)


UpdateRule = FirstOrder | SingleLevel
UPDATE_RULES: Registry[Callable[[], UpdateRule]] = Registry("optimisation")
UPDATE_RULES.register("first_order", FirstOrder)
UPDATE_RULES.register("second_order", SecondOrder)
UPDATE_RULES.register("single_level", SingleLevel)
