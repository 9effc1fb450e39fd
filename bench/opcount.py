"""Count what a piece of PyTorch code dispatches: aten ops, the ops that write memory, the bytes
they write and read, the host syncs they force, the peak of the bytes held by live tensors, and
the FLOPs of its convolutions and matrix products.
Device-independent, so a CPU run measures the kernel count a GPU would launch (one kernel per
writing op, give or take: see RESULTS.md), the bytes those kernels move, which bound a
memory-bound step's time from below, and the tensor memory a GPU's caching allocator would have
to hold at the step's peak (its `max_memory_allocated`, less kernels' workspaces and rounding)."""
from __future__ import annotations

import collections
import functools
import gc
import math
import os
import sys
import warnings
import weakref
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
    start_bytes: int = 0              # bytes of the live tensors' storages when counting began
    peak_bytes: int = 0               # their peak while counting: those alive at the start included
    flops: int = 0                    # of convolutions and matrix products, forward and backward (`_flops`)
    by_op: collections.Counter = field(default_factory=collections.Counter)
    writing_by_op: collections.Counter = field(default_factory=collections.Counter)  # writing ops per name
    moved_by_op: collections.Counter = field(default_factory=collections.Counter)    # bytes written + read per name
    # with `CountOps(sites=True)`: writing ops per (aten op, where the code called it, `_site`)
    writing_by_site: collections.Counter = field(default_factory=collections.Counter)
    # with `CountOps(batch=B)`: tensors written of shape (B, C, H, W), C > 1, H·W > 1 (activations
    # and their gradients), by memory format: "nhwc" (channels innermost, channels_last) or "nchw"
    activation_writes: collections.Counter = field(default_factory=collections.Counter)

    def largest(self, n: int | None = None) -> list[tuple[str, int, float]]:
        """(aten op, writing calls, MB moved) of the `n` op names that write most often (all by
        default), largest first: which kernels a step is made of."""
        return [(name, calls, self.moved_by_op[name] / 2**20) for name, calls in self.writing_by_op.most_common(n)]

    def by_site(self, n: int = 40) -> list[tuple[str, str, int]]:
        """(aten op, site, writing calls) of the `n` most frequent pairs (`CountOps(sites=True)`)."""
        return [(name, site, calls) for (name, site), calls in self.writing_by_site.most_common(n)]


PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_NOT_A_SITE = (os.path.abspath(__file__), os.path.join(PROJECT, "bench", "search_step.py"))


def _site() -> str:
    """Where the op being dispatched comes from. In a backward pass, the autograd node running
    ("backward of ConvolutionBackward0"; a gradient accumulation's add is counted under the node
    whose output it adds in). Else the innermost frame of the project's own code (nascore/,
    bench/reference.py, tests/; not a virtual environment inside the project) that called it,
    as "path:line (function)"; "elsewhere" if none."""
    node = torch._C._current_autograd_node()
    if node is not None:
        return f"backward of {node.name()}"
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(PROJECT) and path not in _NOT_A_SITE and "site-packages" not in path:
            return f"{path[len(PROJECT):]}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "elsewhere"


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


def _flops(name: str, args: tuple, out: Any) -> int:
    """Floating-point operations (2 per multiply-add) of a convolution or matrix product, 0 for any
    other op. A convolution's input and weight gradients each cost what its forward does: with
    groups, (C_in / groups)·k·k multiply-adds per output element. (torch.utils.flop_counter
    counts a grouped conv's input gradient as if ungrouped: 17× the forward at 16 groups, torch
    2.14.)"""
    if name == "convolution" and not args[6]:                         # not transposed
        return 2 * out.numel() * math.prod(args[1].shape[1:])
    if name == "convolution_backward" and not args[7]:
        grad_out, weight, mask = args[0], args[2], args[10]
        return 2 * grad_out.numel() * math.prod(weight.shape[1:]) * (int(mask[0]) + int(mask[1]))
    if name in ("mm", "bmm"):
        return 2 * out.numel() * args[0].shape[-1]
    if name in ("addmm", "baddbmm"):
        return 2 * out.numel() * args[1].shape[-1]
    return 0


class CountOps(TorchDispatchMode):
    """`with CountOps() as c: ...` then read `c.count`.

    A tensor counts as written when the op's schema marks it mutated (in-place and out= ops) or
    when it is a returned tensor whose storage no input shares (a fresh result). Views, and
    results that alias an input without a write annotation (`_unsafe_view`), write nothing.

    Live bytes: every storage alive on entry (found through the garbage collector, after a collection: parameters,
    optimiser state, data) and every storage an op returns is held until Python frees it (a weak
    reference's callback); `peak_bytes` is the most they held together at any op's return.
    Tensors made outside any op, and ops' internal workspaces, are not seen.
    """

    def __init__(self, host_scalars: Iterable[torch.Tensor] = (), device: str | None = None,
                 sites: bool = False, batch: int | None = None) -> None:
        """`host_scalars`: tensors whose value reads are no device sync (the optimisers' step
        counters, which torch keeps on the host even when the parameters are on a GPU).
        `device`: the device type whose live bytes are counted (None: every device).
        `sites`: also count writing ops by where they come from (`OpCount.writing_by_site`; a
        stack walk per op, so a slower count).
        `batch`: also count the (batch, C, H, W) tensors written by memory format
        (`OpCount.activation_writes`): in a channels_last step every NCHW one is a layout a GPU's
        kernels convert, or read against the grain, and the other way round."""
        super().__init__()
        self.count = OpCount()
        self._sites = sites
        self._batch = batch
        self._host = {t.data_ptr() for t in host_scalars}
        self._device = device
        self._live: dict[int, int] = {}       # storage address -> bytes, while it is alive
        self._watches: dict[int, weakref.finalize] = {}
        self._live_bytes = 0

    def __enter__(self) -> "CountOps":
        gc.collect()                          # what only a collection would free is not alive
        with warnings.catch_warnings():      # isinstance() wakes deprecated modules' attributes
            warnings.simplefilter("ignore")
            alive = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
        for t in alive:
            self._hold(t)
        self.count.start_bytes = self.count.peak_bytes = self._live_bytes
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for watch in self._watches.values():  # the storages that outlive the count keep no callback
            watch.detach()
        self._watches.clear()

    def _hold(self, t: torch.Tensor) -> None:
        if t.device.type == "meta" or (self._device is not None and t.device.type != self._device) \
                or t.is_sparse or t.layout != torch.strided:
            return
        try:
            storage = t.untyped_storage()
            # a FakeTensor (left alive by a trace's caches) says "cpu" but its storage is on meta
            if storage.device.type == "meta":
                return
            address, n = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):       # a tensor without a storage (a subclass's)
            return
        if n and address not in self._live:
            self._live[address] = n
            self._live_bytes += n
            self._watches[address] = weakref.finalize(storage, self._release, address)

    def _release(self, address: int) -> None:
        self._live_bytes -= self._live.pop(address, 0)
        self._watches.pop(address, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        c = self.count
        c.ops += 1
        c.by_op[name] += 1
        c.flops += _flops(name, args, out)
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
        for t in _tensors(out):
            self._hold(t)
        c.peak_bytes = max(c.peak_bytes, self._live_bytes)
        if written:
            unique = {id(t): t for t in written}.values()
            wrote = sum(t.numel() * t.element_size() for t in unique)
            if self._batch is not None:
                for t in unique:
                    if t.dim() == 4 and t.shape[0] == self._batch and t.shape[1] > 1 and t.shape[2] * t.shape[3] > 1:
                        c.activation_writes["nhwc" if t.stride(1) == 1 else "nchw"] += 1
            read = _read(name, schema, args, kwargs, out)
            c.writing_ops += 1
            c.bytes_written += wrote
            c.bytes_read += read
            c.writing_by_op[name] += 1
            c.moved_by_op[name] += wrote + read
            if self._sites:
                c.writing_by_site[name, _site()] += 1
        return out


# Ops that compute nothing though their schema says they write or return a fresh tensor: an alias
# without annotation, metadata changes.
NO_KERNEL = ALLOCATING | frozenset({"_unsafe_view", "resize_", "resize_as_", "set_", "as_strided_", "detach_",
                                    "record_stream", "_has_compatible_shallow_copy_type"})
# A profiler record under one of these is torch.compile's own work (tracing runs every op on fake
# tensors), not the compiled code's.
COMPILING = "(dynamo_timed)"


@functools.cache
def computes(name: str) -> bool:
    """Whether the aten op `name` launches work when it runs (on a GPU, a kernel; on a CPU, a loop
    over memory): by its schema (not an `out=` overload) it writes an argument or returns a fresh
    tensor, and it is not a view, an allocation or a metadata query (`NO_KERNEL`)."""
    if name in NO_KERNEL:
        return False
    packet = getattr(torch.ops.aten, name, None)
    if packet is None:
        return True
    for overload in packet.overloads():
        if overload == "out" or overload.endswith("_out"):
            continue
        schema = getattr(packet, overload)._schema
        # an argument it writes (in-place ops, the foreach ops, which return nothing)
        if any(arg.alias_info is not None and arg.alias_info.is_write for arg in schema.arguments):
            return True
        for ret in schema.returns:
            tensor = isinstance(ret.type, torch.TensorType) or "Tensor" in str(ret.type)
            if tensor and (ret.alias_info is None or ret.alias_info.is_write):
                return True
    return False


@functools.cache
def decomposes(qualified: str) -> bool:
    """Whether an aten op ("aten::conv2d") has no kernel of its own in any overload and runs as
    the ops it calls (CompositeImplicitAutograd), as `CountOps`, below autograd, sees it."""
    name = qualified.removeprefix("aten::")
    packet = getattr(torch.ops.aten, name, None)
    implicit = []
    for o in packet.overloads() if packet is not None else []:
        if o == "out" or o.endswith("_out"):
            continue
        try:
            implicit.append(torch._C._dispatch_has_kernel_for_dispatch_key(
                f"aten::{name}" + ("" if o == "default" else f".{o}"), "CompositeImplicitAutograd"))
        except RuntimeError:          # a TorchScript-only overload (`to.prim_Device`): not dispatched
            continue
    return bool(implicit) and all(implicit)


def inductor_kernel(name: str) -> bool:
    """A record of a kernel torch.compile's inductor generated for the CPU (`cpp_fused_...`; it
    records one per call when `torch._inductor.config.cpp.enable_kernel_profile` was on as the
    kernel was compiled: `CountKernels.compiling`)."""
    return "cpp_fused" in name


@dataclass
class KernelCount:
    kernels: int = 0
    by_name: collections.Counter = field(default_factory=collections.Counter)


class CountKernels:
    """`with CountKernels() as k: ...` then read `k.count`: the kernels the code launched, from the
    profiler's record of it (CPU activity), counted as `CountOps` counts writing ops: each
    outermost aten op that computes (`computes`), an op that decomposes into others (torch's
    CompositeImplicitAutograd ops: `conv2d`, `batch_norm`, `cross_entropy_loss`) by what it calls,
    and each kernel inductor generated (`inductor_kernel`). What `CountOps` cannot count: the code
    torch.compile runs (a dispatch mode makes it run the eager ops instead). Over eager code the
    two agree to within a few ops (tests/test_bench.py). torch.compile's own tracing (under a
    `dynamo_timed` record) is left out."""

    def __enter__(self) -> "CountKernels":
        from torch.profiler import ProfilerActivity, profile
        self._profile = profile(activities=[ProfilerActivity.CPU])
        self._profile.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._profile.__exit__(*exc)
        self.count = KernelCount()

        def visit(e: Any) -> None:
            if COMPILING in e.name:
                return
            if inductor_kernel(e.name):
                self.count.kernels += 1
                self.count.by_name["inductor"] += 1
                return
            if e.name.startswith("aten::") and not decomposes(e.name) and computes(e.name[6:]):
                self.count.kernels += 1
                self.count.by_name[e.name[6:]] += 1
                return
            for child in e.cpu_children:
                visit(child)
        for e in self._profile.events():
            if e.cpu_parent is None:
                visit(e)

    @staticmethod
    def compiling() -> Any:
        """A context in which inductor compiles C++ kernels that record themselves to the profiler
        (its config is part of its cache key: kernels cached without the records are not reused)."""
        import torch._inductor.config as inductor
        return inductor.patch({"cpp.enable_kernel_profile": True})
