"""The baseline of bench/search_step.py: a search step written the way the public DARTS-family
reference code is written (DARTS, PC-DARTS, NAS-Bench-201's DARTS-V1), not copied from it.

What makes it the baseline, on purpose:
- one MixedOp per edge, `sum(w * op(x))` over the candidate ops, edge by edge;
- α as plain tensors beside the network; the α step backpropagates into every weight and the
  weight step into α (nothing names its inputs);
- second order rebuilds a whole new network per step to hold the unrolled weights, and moves the
  weights in place (`p.data.add_`) for the finite-difference Hessian-vector product;
- per-step logging through `.item()`, which waits for the GPU every step.

The candidate ops themselves are nascore's (`nascore.ops`): the primitives are the same
definitions in both (methods.md §1), so the comparison measures the search machinery only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nascore.ops import OPS, FactorizedReduce, ReLUConvBN
from nascore.spaces.darts import DARTS_OPS
from nascore.genotype import NB201_OPS
from nascore.spaces.nb201 import ResBlock


def shuffle_channels(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class MixedOp(nn.Module):
    def __init__(self, C: int, stride: int, k: int = 1) -> None:
        super().__init__()
        self.k = k
        self.mp = nn.MaxPool2d(2, 2)
        self._ops = nn.ModuleList()
        for name in DARTS_OPS:
            op = OPS.get(name)(C // k, stride, False)
            if "pool" in name:
                op = nn.Sequential(op, nn.BatchNorm2d(C // k, affine=False))
            self._ops.append(op)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.k == 1:
            return sum(w * op(x) for w, op in zip(weights, self._ops))
        dim = x.shape[1] // self.k
        xa, xb = x[:, :dim], x[:, dim:]
        ya = sum(w * op(xa) for w, op in zip(weights, self._ops))
        out = torch.cat([ya, xb if ya.shape[2] == x.shape[2] else self.mp(xb)], dim=1)
        return shuffle_channels(out, self.k)


class Cell(nn.Module):
    def __init__(self, steps: int, C_pp: int, C_p: int, C: int, reduction: bool, reduction_prev: bool,
                 k: int) -> None:
        super().__init__()
        self.reduction, self.steps = reduction, steps
        self.pre0 = FactorizedReduce(C_pp, C, False) if reduction_prev else ReLUConvBN(C_pp, C, 1, 1, 0, False)
        self.pre1 = ReLUConvBN(C_p, C, 1, 1, 0, False)
        self._ops = nn.ModuleList(MixedOp(C, 2 if reduction and j < 2 else 1, k)
                                  for i in range(steps) for j in range(2 + i))

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor,
                edge_weights: torch.Tensor | None) -> torch.Tensor:
        states = [self.pre0(s0), self.pre1(s1)]
        offset = 0
        for _ in range(self.steps):
            if edge_weights is None:
                s = sum(self._ops[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            else:
                s = sum(edge_weights[offset + j] * self._ops[offset + j](h, weights[offset + j])
                        for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        return torch.cat(states[2:], dim=1)


class DartsNetwork(nn.Module):
    """The DARTS search network; `k` > 1 with `edge_norm` is PC-DARTS'."""

    def __init__(self, C: int, num_classes: int, layers: int, k: int = 1, edge_norm: bool = False,
                 steps: int = 4) -> None:
        super().__init__()
        self.args = (C, num_classes, layers, k, edge_norm, steps)
        self.steps, self.edge_norm = steps, edge_norm
        C_curr = 3 * C
        self.stem = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
        C_pp, C_p, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            self.cells.append(Cell(steps, C_pp, C_p, C_curr, reduction, reduction_prev, k))
            reduction_prev = reduction
            C_pp, C_p = C_p, steps * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_p, num_classes)
        n_edges = sum(2 + i for i in range(steps))
        self.alphas_normal = (1e-3 * torch.randn(n_edges, len(DARTS_OPS))).requires_grad_(True)
        self.alphas_reduce = (1e-3 * torch.randn(n_edges, len(DARTS_OPS))).requires_grad_(True)
        self.betas_normal = (1e-3 * torch.randn(n_edges)).requires_grad_(True)
        self.betas_reduce = (1e-3 * torch.randn(n_edges)).requires_grad_(True)

    def to_device(self, device: torch.device) -> "DartsNetwork":
        self.to(device)
        for name in ("alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce"):
            setattr(self, name, getattr(self, name).detach().to(device).requires_grad_(True))
        return self

    def arch_parameters(self) -> list[torch.Tensor]:
        arch = [self.alphas_normal, self.alphas_reduce]
        return arch + [self.betas_normal, self.betas_reduce] if self.edge_norm else arch

    def new(self) -> "DartsNetwork":
        """A fresh network with this one's α (the unrolled step's container, built every step)."""
        model = DartsNetwork(*self.args).to_device(self.alphas_normal.device)
        for mine, theirs in zip(model.arch_parameters(), self.arch_parameters()):
            mine.data.copy_(theirs.data)
        return model

    def _edge_weights(self, betas: torch.Tensor) -> torch.Tensor:
        parts, start = [], 0
        for i in range(self.steps):
            parts.append(F.softmax(betas[start:start + 2 + i], dim=-1))
            start += 2 + i
        return torch.cat(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            alphas, betas = ((self.alphas_reduce, self.betas_reduce) if cell.reduction
                             else (self.alphas_normal, self.betas_normal))
            weights = F.softmax(alphas, dim=-1)
            edge_weights = self._edge_weights(betas) if self.edge_norm else None
            s0, s1 = s1, cell(s0, s1, weights, edge_weights)
        out = self.global_pooling(s1)
        return self.classifier(out.view(out.size(0), -1))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(x), y)


class NB201Cell(nn.Module):
    def __init__(self, C: int, max_nodes: int = 4) -> None:
        super().__init__()
        self.max_nodes = max_nodes
        self.edges = nn.ModuleDict({f"{i}<-{j}": nn.ModuleList(OPS.get(p)(C, 1, False) for p in NB201_OPS)
                                    for i in range(1, max_nodes) for j in range(i)})
        self.edge2index = {key: i for i, key in enumerate(sorted(self.edges))}

    def forward(self, x: torch.Tensor, weightss: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        for i in range(1, self.max_nodes):
            inter = []
            for j in range(i):
                key = f"{i}<-{j}"
                weights = weightss[self.edge2index[key]]
                inter.append(sum(layer(nodes[j]) * w for layer, w in zip(self.edges[key], weights)))
            nodes.append(sum(inter))
        return nodes[-1]


class NB201Network(nn.Module):
    def __init__(self, C: int, N: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        cells: list[nn.Module] = []
        for stage, C_curr in enumerate((C, 2 * C, 4 * C)):
            if stage:
                cells.append(ResBlock(C_curr // 2, C_curr))
            cells += [NB201Cell(C_curr) for _ in range(N)]
        self.cells = nn.ModuleList(cells)
        self.lastact = nn.Sequential(nn.BatchNorm2d(4 * C), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * C, num_classes)
        self.arch_parameters = nn.Parameter(1e-3 * torch.randn(6, len(NB201_OPS)))

    def get_weights(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if name != "arch_parameters"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alphas = F.softmax(self.arch_parameters, dim=-1)
        feature = self.stem(x)
        for cell in self.cells:
            feature = cell(feature, alphas) if isinstance(cell, NB201Cell) else cell(feature)
        out = self.global_pooling(self.lastact(feature))
        return self.classifier(out.view(out.size(0), -1))


class Architect:
    """The α update of DARTS: first order, or the unrolled second-order gradient."""

    def __init__(self, model: DartsNetwork, momentum: float, weight_decay: float, arch_lr: float,
                 arch_weight_decay: float) -> None:
        self.model, self.momentum, self.weight_decay = model, momentum, weight_decay
        self.optimizer = torch.optim.Adam(model.arch_parameters(), lr=arch_lr, betas=(0.5, 0.999),
                                          weight_decay=arch_weight_decay)

    def step(self, xt: torch.Tensor, yt: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor, eta: float,
             w_optimizer: torch.optim.Optimizer, unrolled: bool) -> None:
        self.optimizer.zero_grad()
        if unrolled:
            self._backward_unrolled(xt, yt, xv, yv, eta, w_optimizer)
        else:
            self.model.loss(xv, yv).backward()
        self.optimizer.step()

    def _backward_unrolled(self, xt, yt, xv, yv, eta: float, w_optimizer: torch.optim.Optimizer) -> None:
        unrolled = self._unrolled_model(xt, yt, eta, w_optimizer)
        unrolled.loss(xv, yv).backward()
        dalpha = [a.grad for a in unrolled.arch_parameters()]
        vector = [p.grad.data for p in unrolled.parameters()]
        implicit = self._hessian_vector_product(vector, xt, yt)
        for g, ig in zip(dalpha, implicit):
            g.data.sub_(ig.data, alpha=eta)
        for a, g in zip(self.model.arch_parameters(), dalpha):
            a.grad = g.data.clone()

    def _unrolled_model(self, xt, yt, eta: float, w_optimizer: torch.optim.Optimizer) -> DartsNetwork:
        loss = self.model.loss(xt, yt)
        params = list(self.model.parameters())
        theta = torch.cat([p.data.view(-1) for p in params])
        try:
            moment = torch.cat([w_optimizer.state[p]["momentum_buffer"].view(-1) for p in params]) * self.momentum
        except KeyError:
            moment = torch.zeros_like(theta)
        dtheta = torch.cat([g.view(-1) for g in torch.autograd.grad(loss, params)]) + self.weight_decay * theta
        return self._model_from_theta(theta - eta * (moment + dtheta))

    def _model_from_theta(self, theta: torch.Tensor) -> DartsNetwork:
        model = self.model.new()
        state = self.model.state_dict()
        offset = 0
        for name, p in self.model.named_parameters():
            state[name] = theta[offset:offset + p.numel()].view(p.size())
            offset += p.numel()
        model.load_state_dict(state)
        return model

    def _hessian_vector_product(self, vector: Sequence[torch.Tensor], x, y, r: float = 1e-2) -> list[torch.Tensor]:
        R = (r / torch.cat([v.view(-1) for v in vector]).norm()).item()
        for p, v in zip(self.model.parameters(), vector):
            p.data.add_(v, alpha=R)
        grads_p = torch.autograd.grad(self.model.loss(x, y), self.model.arch_parameters())
        for p, v in zip(self.model.parameters(), vector):
            p.data.sub_(v, alpha=2 * R)
        grads_n = torch.autograd.grad(self.model.loss(x, y), self.model.arch_parameters())
        for p, v in zip(self.model.parameters(), vector):
            p.data.add_(v, alpha=R)
        return [(gp - gn).div_(2 * R) for gp, gn in zip(grads_p, grads_n)]


@dataclass
class Meter:
    total: float = 0.0
    n: int = 0

    def update(self, value: float, n: int) -> None:
        self.total += value * n
        self.n += n


def accuracy(logits: torch.Tensor, y: torch.Tensor, topk: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    maxk = min(max(topk), logits.shape[1])
    _, pred = logits.topk(maxk, 1, True, True)
    correct = pred.t().eq(y.view(1, -1).expand_as(pred.t()))
    return [correct[:k].reshape(-1).float().sum(0).mul_(100.0 / y.size(0)) for k in topk]


class DartsSearch:
    """DARTS / PC-DARTS search step: the α step (first or second order), then the weight step."""

    def __init__(self, model: DartsNetwork, lr: float, momentum: float, weight_decay: float,
                 arch_lr: float, arch_weight_decay: float, unrolled: bool) -> None:
        self.model, self.lr, self.unrolled = model, lr, unrolled
        self.optimizer = torch.optim.SGD(model.parameters(), lr, momentum=momentum, weight_decay=weight_decay)
        self.architect = Architect(model, momentum, weight_decay, arch_lr, arch_weight_decay)
        self.objs, self.top1, self.top5 = Meter(), Meter(), Meter()

    def step(self, xt: torch.Tensor, yt: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor) -> None:
        self.model.train()
        n = xt.size(0)
        self.architect.step(xt, yt, xv, yv, self.lr, self.optimizer, self.unrolled)
        self.optimizer.zero_grad()
        logits = self.model(xt)
        loss = F.cross_entropy(logits, yt)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
        self.optimizer.step()
        prec1, prec5 = accuracy(logits, yt)
        self.objs.update(loss.item(), n)
        self.top1.update(prec1.item(), n)
        self.top5.update(prec5.item(), n)


class NB201Search:
    """NAS-Bench-201's DARTS-V1 step: the weight step first, then the α step."""

    def __init__(self, model: NB201Network, lr: float, weight_decay: float, arch_lr: float,
                 arch_weight_decay: float) -> None:
        self.model = model
        self.w_optimizer = torch.optim.SGD(model.get_weights(), lr, momentum=0.9, weight_decay=weight_decay,
                                           nesterov=True)
        self.a_optimizer = torch.optim.Adam([model.arch_parameters], lr=arch_lr, betas=(0.5, 0.999),
                                            weight_decay=arch_weight_decay)
        self.base_losses, self.base_top1, self.arch_losses, self.arch_top1 = Meter(), Meter(), Meter(), Meter()

    def step(self, xt: torch.Tensor, yt: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor) -> None:
        self.model.train()
        self.w_optimizer.zero_grad()
        logits = self.model(xt)
        base_loss = F.cross_entropy(logits, yt)
        base_loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), 5)
        self.w_optimizer.step()
        prec1, _ = accuracy(logits.data, yt.data)
        self.base_losses.update(base_loss.item(), xt.size(0))
        self.base_top1.update(prec1.item(), xt.size(0))
        self.a_optimizer.zero_grad()
        logits = self.model(xv)
        arch_loss = F.cross_entropy(logits, yv)
        arch_loss.backward()
        self.a_optimizer.step()
        prec1, _ = accuracy(logits.data, yv.data)
        self.arch_losses.update(arch_loss.item(), xv.size(0))
        self.arch_top1.update(prec1.item(), xv.size(0))


def retrain_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                 objs: Meter, top1: Meter, auxiliary_weight: float = 0.4) -> None:
    """One step of the DARTS CIFAR training script: aux loss, clip 5, per-step `.item()` logging."""
    model.train()
    optimizer.zero_grad()
    logits, aux = model(x)
    loss = F.cross_entropy(logits, y)
    if aux is not None:
        loss = loss + auxiliary_weight * F.cross_entropy(aux, y)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    optimizer.step()
    prec1, _ = accuracy(logits, y)
    objs.update(loss.item(), x.size(0))
    top1.update(prec1.item(), x.size(0))
