"""Do the fast paths compute the same search as the plain eager fp32 path? (issue 4: "the science
unchanged").

    python bench/agreement.py                  # on the GPU if there is one
    python bench/agreement.py --device cpu --variants eager,fused --steps 5 --size tiny
    python bench/agreement.py --case darts_first --variants eager,fused,fused_dense   # separable convs

Variants are named as in bench/search_step.py (a backend, then "+"-joined modifiers).

Every variant starts from the same supernet (same seed) and steps through the same fixed batches
with the function the search loop runs (`EpochSteps`). Printed per variant: the training loss of
the first steps, the mean loss over the last quarter of the steps, and the largest relative
difference of the weights and of α from the eager fp32 run after 1 step and after all of them.
fp32 variants should agree with eager to rounding (TF32 off: `--tf32` turns it back on); bf16
rounds, so its numbers drift, but its loss curve should stay beside the eager one.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from search_step import SIZES, batches, search_settings, speed_options  # noqa: E402

from nascore.search import EpochSteps, SearchData, SearchRun  # noqa: E402
from nascore.spaces import get_space  # noqa: E402



def run_variant(case: str, variant: str, size_name: str, steps: int, device: torch.device,
                data: list) -> dict:
    space, cfg, _ = search_settings(case, SIZES[size_name], **speed_options(variant))
    run = SearchRun(get_space(space), cfg, SearchData(None, None, 10), device=device, seed=3,
                    log=lambda s: None)
    run.model.train()
    es = EpochSteps(run, run.step_context(0), update_arch=True)
    losses, after_one = [], None
    prev = 0.0
    for i in range(steps):
        es.step(data[i % len(data)], data[(i + 1) % len(data)])
        total = float(es.sums[0])            # host read: fine in a diagnostic, not in the loop
        losses.append(total - prev)
        prev = total
        if i == 0:
            after_one = snapshot(run)
    return {"losses": losses, "after_one": after_one, "after_all": snapshot(run)}


def snapshot(run: SearchRun) -> dict[str, torch.Tensor]:
    w = torch.cat([p.detach().float().flatten().cpu() for p in run.weights])
    a = torch.cat([p.detach().float().flatten().cpu() for p in run.arch])
    return {"w": w, "a": a}


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm().clamp_min(1e-12))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--case", default="nb201")
    p.add_argument("--size", default=None, help="default: full on CUDA, tiny on CPU")
    p.add_argument("--variants", default="eager,fused,fused+cl,fused+graph,eager+bf16,fused+graph+bf16")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batches", type=int, default=8, help="fixed batches cycled through")
    p.add_argument("--tf32", action="store_true", help="leave TF32 on (torch's default for convolutions)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    size_name = a.size or ("full" if device.type == "cuda" else "tiny")
    if device.type == "cuda" and not a.tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    size = SIZES[size_name]
    _, _, batch = search_settings(a.case, size)
    data = batches(a.batches, batch, size.image, 10, device)
    results = {}
    for variant in a.variants.split(","):
        try:
            results[variant] = run_variant(a.case, variant, size_name, a.steps, device, data)
        except Exception as e:
            print(f"{variant}: FAILED {type(e).__name__}: {e}", flush=True)
            continue
        r = results[variant]
        q = max(1, a.steps // 4)
        line = f"{variant:<18} first losses " + " ".join(f"{x:.5f}" for x in r["losses"][:4])
        line += f" | mean of last {q}: {sum(r['losses'][-q:]) / q:.5f}"
        if "eager" in results and variant != "eager":
            ref = results["eager"]
            line += (f" | vs eager after 1 step: w {rel(r['after_one']['w'], ref['after_one']['w']):.1e} "
                     f"a {rel(r['after_one']['a'], ref['after_one']['a']):.1e}; after {a.steps}: "
                     f"w {rel(r['after_all']['w'], ref['after_all']['w']):.1e} "
                     f"a {rel(r['after_all']['a'], ref['after_all']['a']):.1e}")
        print(line, flush=True)


if __name__ == "__main__":
    main()
