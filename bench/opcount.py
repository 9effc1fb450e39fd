"""Count what a piece of PyTorch code dispatches: aten ops, the ops that write memory, the bytes
they write and read, and the host syncs they force. Device-independent, so a CPU run measures the
kernel count a GPU would launch (one kernel per writing op, give or take: see RESULTS.md) and the
bytes those kernels move, which bound a memory-bound step's time from below."""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# Ops that allocate without writing, and the op every `.item()` / `bool(tensor)` reads through.
ALLOCATING = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})
SYNC = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2"})
# Ops that take a tensor for its shape, dtype and device only, or overwrite it without reading it.
NOT_READ = frozenset({"new_zeros", "new_ones", "new_full", "zeros_like", "ones_like", "full_like",
                      "rand_like", "randn_like", "randint_like", "copy_", "fill_", "zero_", "uniform_",
                      "normal_", "bernoulli_", "random_", "exponential_"})
# Gathers read the elements they fetch (as many as they write) and their index, not the whole source.
GATHERS = frozenset({"index_select", "gather", "index", "embedding"})


@dataclass
class OpCount:
    """Totals of one counted region."""

    ops: int = 0                      # aten ops dispatched (views and metadata ops included)
    writing_ops: int = 0              # ops that write at least one tensor: ~ kernels on a GPU
    bytes_written: int = 0            # bytes of the tensors those ops write
    bytes_read: int = 0               # distinct bytes of the tensors those ops read (see `_read`)
    syncs: int = 0                    # ops whose result the host must wait for (.item(), ...)
    by_op: collections.Counter = field(default_factory=collections.Counter)


def _tensors(x: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


def _distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a (possibly broadcast) view covers: an expanded dim (stride
    0) is read once, not once per repeat."""
    return math.prod(n for n, s in zip(t.shape, t.stride()) if s != 0) * t.element_size() if t.numel() else 0


def _read(name: str, schema: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """Bytes a writing op reads, by the usual kernel's accounting: each input once (broadcast dims
    once), an in-place op's own input too; not `out=` tensors nor what `NOT_READ` ops take for
    its metadata or overwrite; a gather the elements it fetches, not the whole source."""
    if name in GATHERS:
        index = [t for t in _tensors((args, kwargs)) if not t.is_floating_point()]
        return sum(_distinct_bytes(t) for t in index + _tensors(out))
    inputs = []
    for i, arg in enumerate(schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        if value is None or arg.name == "out" or (name in NOT_READ and i == 0):
            continue
        inputs += _tensors(value)
    return sum(_distinct_bytes(t) for t in {id(t): t for t in inputs}.values())


class CountOps(TorchDispatchMode):
    """`with CountOps() as c: ...` then read `c.count`.

    A tensor counts as written when the op's schema marks it mutated (in-place and out= ops) or
    when it is a returned tensor whose storage no input shares (a fresh result). Views, and
    results that alias an input without a write annotation (`_unsafe_view`), write nothing.
    """

    def __init__(self, host_scalars: Iterable[torch.Tensor] = ()) -> None:
        """`host_scalars`: tensors whose value reads are no device sync (the optimisers' step
        counters, which torch keeps on the host even when the parameters are on a GPU)."""
        super().__init__()
        self.count = OpCount()
        self._host = {t.data_ptr() for t in host_scalars}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        c = self.count
        c.ops += 1
        c.by_op[name] += 1
        if name in SYNC and not (name == "_local_scalar_dense" and args[0].data_ptr() in self._host):
            c.syncs += 1
        written: list[torch.Tensor] = []
        schema = func._schema
        for arg, value in zip(schema.arguments, args):
            if arg.alias_info is not None and arg.alias_info.is_write:
                written += _tensors(value)
        for arg in schema.arguments[len(args):]:
            if arg.name in kwargs and arg.alias_info is not None and arg.alias_info.is_write:
                written += _tensors(kwargs[arg.name])
        if name not in ALLOCATING:
            inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))
                      if t.device.type != "meta"}
            written += [t for t in _tensors(out) if t.device.type == "meta"
                        or t.untyped_storage().data_ptr() not in inputs]
        if written:
            c.writing_ops += 1
            c.bytes_written += sum(t.numel() * t.element_size() for t in {id(t): t for t in written}.values())
            c.bytes_read += _read(name, schema, args, kwargs, out)
        return out
