"""A CUDA graph's semantics on the CPU, for tests of captured steps (`capture_step=TapeGraph`).

A CUDA graph records kernels with their arguments as they were at capture: the same tensors
(addresses), the same Python numbers. A replay runs those kernels again and reads nothing from the
host: a learning rate or drop-path probability passed as a Python float is frozen at its capture
value, and a host read inside the step (`.item()`, `bool(t)`) cannot be captured at all.

`TapeGraph` gives a CPU test the same contract. Capturing runs the step under a
`TorchDispatchMode` that records every aten op with its arguments (tensors by identity, numbers
by value), then puts back every tensor that existed before the capture and that the step wrote
(weights, momentum, BN statistics, sums) and the CPU generator's state: like a CUDA graph's, the
capture performs no step. A
replay re-runs the recorded ops in order: an op that writes a tensor in place writes it again, and
a fresh output is recomputed and copied into the tensor the capture made (which later ops
read). Random ops draw again, as a graph's philox offsets advance per replay. A host read during
capture raises `HostRead`.

Compared with re-running the step function (`Rerun` in the tests), this catches what a real graph
would get wrong: a Python value read at capture and changed later (the per-epoch lr), or a step
that branches on a tensor's value.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class HostRead(RuntimeError):
    """The captured step read a tensor's value on the host (a CUDA graph cannot capture that)."""


# ops that write arguments their schema does not mark: native_batch_norm updates the running
# statistics (arguments 3 and 4) in training
UNMARKED_WRITES = {torch.ops.aten.native_batch_norm.default: [3, 4]}


def _writes(func: Any) -> list[int]:
    """Positions of the schema arguments `func` writes in place (alias info with is_write)."""
    return UNMARKED_WRITES.get(func) or [i for i, a in enumerate(func._schema.arguments)
                                         if a.alias_info is not None and a.alias_info.is_write]


def _aliases_an_input(func: Any) -> bool:
    """Whether `func`'s outputs are views of (or are) its inputs, per its schema."""
    return any(r.alias_info is not None for r in func._schema.returns)


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.tape: list[tuple[Any, tuple, dict, Any]] = []
        self.made: set[int] = set()                   # storages the capture allocated
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # pre-capture tensors it wrote

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
                    torch.ops.aten.equal.default):
            raise HostRead(f"{func} read a tensor on the host inside a captured step")
        schema_args = func._schema.arguments
        for i in _writes(func):
            name = schema_args[i].name
            value = args[i] if i < len(args) else kwargs.get(name)
            for t in (value if isinstance(value, (list, tuple)) else [value]):
                if isinstance(t, torch.Tensor) and self._key(t) not in self.made and id(t) not in self.saved:
                    self.saved[id(t)] = (t, t.detach().clone())
        out = func(*args, **kwargs)
        flat, _ = tree_flatten(out)
        if any(isinstance(v, (bool, int, float)) for v in flat):
            raise HostRead(f"{func} returned a host value inside a captured step")
        if not _aliases_an_input(func):
            # new memory: not an input's (`_unsafe_view` returns one without saying so)
            inputs = {self._key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
            self.made.update(k for k in (self._key(t) for t in flat if isinstance(t, torch.Tensor))
                             if k not in inputs)
        self.tape.append((func, args, kwargs, out))
        return out

    @staticmethod
    def _key(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()


class TapeGraph:
    """`capture_step` for CPU tests: records `step`'s ops and undoes its writes; `replay` runs
    the recorded ops again (see the module's docstring)."""

    captures = 0
    replays = 0

    def __init__(self, step: Callable[[], None]) -> None:
        TapeGraph.captures += 1
        recorder = _Recorder()
        rng = torch.get_rng_state()
        with recorder:
            step()
        torch.set_rng_state(rng)               # nor does it draw: the replays do
        with torch.no_grad():
            # newest first: of two overlapping views, the older snapshot is the pre-capture one
            for t, before in reversed(list(recorder.saved.values())):
                t.copy_(before)
        self.tape = recorder.tape

    @torch.no_grad()
    def replay(self) -> None:
        TapeGraph.replays += 1
        for func, args, kwargs, out in self.tape:
            new = func(*args, **kwargs)
            if _aliases_an_input(func):
                continue
            for captured, fresh in zip(tree_flatten(out)[0], tree_flatten(new)[0]):
                if isinstance(captured, torch.Tensor) and captured is not fresh:
                    captured.copy_(fresh)
