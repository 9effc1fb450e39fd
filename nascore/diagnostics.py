"""Collapse diagnostics, computed every search epoch (methods.md §2, §3 "collapse signature").

Performance collapse shows in the architecture before it shows in accuracy: the derived cell fills
with parameter-free ops and the α distributions sharpen onto them. Per epoch we report the derived
genotype, its parameter-free op count, the softmax α, the mean α entropy and, optionally, the
dominant eigenvalue of ∇²_α L_val (the RobustDARTS indicator; off by default: it costs a
double-backward per power iteration).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F

from .genotype import alpha_entropy
from .supernet import Supernet
from .train import forked_rng


def collapse_diagnostics(model: Supernet) -> dict[str, Any]:
    """Derived genotype, parameter-free op counts, softmax α and mean α entropy."""
    genotype = model.derive()
    columns = model.active_columns()
    probs, names = {}, {}
    with torch.no_grad():
        for ct in model.cell_types:
            probs[ct] = model.op_weights(ct, columns).cpu().tolist()
            names[ct] = [model.column_names(ct, e, columns) for e in range(len(probs[ct]))]
    out: dict[str, Any] = {
        "genotype": genotype.to_json(),
        "genotype_str": str(genotype),
        "param_free_ops": genotype.num_parameter_free(),
        "alpha_entropy": sum(alpha_entropy(p) for p in probs.values()) / len(probs),
        "alphas": probs,
        "op_names": names,
    }
    if "normal" in model.cell_types:
        out["param_free_ops_normal"] = genotype.num_parameter_free("normal")
        out["param_free_ops_reduce"] = genotype.num_parameter_free("reduce")
    return out


def hessian_eigenvalue(model: Supernet, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       iters: int = 20, tol: float = 1e-3) -> float:
    """Dominant eigenvalue of ∇²_α L_val by power iteration on Hessian-vector products.

    L_val is averaged over `batches` (kept on the device for all iterations); BN uses batch
    statistics as during search. The model's running statistics are restored afterwards.

    Each product runs in a fork of the random streams (`forked_rng`), so its forwards' draws
    (search-time drop-path's masks, S4's noise) are the same for every product, and none is
    taken from the search: every product multiplies by one Hessian (a new draw per iteration
    would make the power iteration's operator random), and the search's trajectory is the same
    with the diagnostic on or off (until 2026-12-06 a drop-path search took another one).
    """
    arch = model.arch_parameters()
    saved = {n: b.clone() for n, b in model.named_buffers()}
    batches = list(batches)
    was_training = model.training
    device = arch[0].device
    model.train()
    try:
        def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
            total = [torch.zeros_like(a) for a in arch]
            with forked_rng(device):
                for x, y in batches:
                    # uncompiled: a `search.compile`d forward's backward cannot be differentiated
                    loss = F.cross_entropy(model.forward_uncompiled(x), y) / len(batches)
                    g = torch.autograd.grad(loss, arch, create_graph=True, allow_unused=True)
                    g = [gi if gi is not None else torch.zeros_like(a) for gi, a in zip(g, arch)]
                    dot = sum((gi * vi).sum() for gi, vi in zip(g, v))
                    hv = torch.autograd.grad(dot, arch, allow_unused=True)
                    total = [t + (h.detach() if h is not None else 0) for t, h in zip(total, hv)]
            return total

        gen = torch.Generator(device="cpu").manual_seed(0)
        v = [torch.randn(a.shape, generator=gen).to(a) for a in arch]
        norm = torch.sqrt(sum((t * t).sum() for t in v))
        v = [t / norm for t in v]
        eig = 0.0
        for _ in range(iters):
            hv = hvp(v)
            new_eig = float(sum((h * t).sum() for h, t in zip(hv, v)))   # Rayleigh quotient
            norm = torch.sqrt(sum((h * h).sum() for h in hv))
            if float(norm) == 0.0:
                return 0.0
            v = [h / norm for h in hv]
            if abs(new_eig - eig) <= tol * max(abs(new_eig), 1e-12):
                eig = new_eig
                break
            eig = new_eig
        return eig
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved[n])
        model.train(was_training)
