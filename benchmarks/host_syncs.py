"""Count the host-device synchronisations a piece of code forces, on any device, a CPU included.

    with HostSyncCounter() as syncs:
        unlearning_backward(...)
    syncs.count, syncs.ops          # how many, and which op forced each (in order)

On an accelerator the host queues kernels and runs ahead of them; an op whose *result* the host must read (a Python
number, or a shape that depends on the data) makes the host wait until the device has caught up, and the queue runs
dry. Which ops do that is a property of the op, not of the device it runs on, so a TorchDispatchMode that watches
every aten op can count them on a CPU as well (where nothing waits), and a CPU test can hold a training step to its
count. The ops, at the level a dispatch mode sees them:

    aten._local_scalar_dense     .item(), int(t), float(t), bool(t), if t: (is_nonzero decomposes into it)
    aten.equal                   torch.equal: a Python bool
    aten.nonzero, aten.masked_select, aten.unique*, aten.repeat_interleave (no output_size), aten.bincount:
                                 outputs whose size depends on the data: the host needs it to allocate them
    aten.index / index_put_      with a bool (or uint8) index, t[mask]: a nonzero inside
    a copy between the CPU and another device
                                 device -> host always; host -> device unless non_blocking (then, from pinned memory,
                                 it is queued); never seen on a CPU-only run

`.tolist()` and `.numpy()` of a CPU tensor read its memory without any aten op, so a TorchFunctionMode counts those two
(on an accelerator they start with a device -> host copy, which then is not counted again). On a CUDA device
`torch.cuda.set_sync_debug_mode` counts the same events from the driver's side (benchmarks/gpu_check.py does both).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# ops that always return something the host must read (a number, or a data-dependent size)
ALWAYS = {aten._local_scalar_dense, aten.equal, aten.nonzero, aten.masked_select,
          aten._unique, aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.unique_dim_consecutive,
          aten.bincount}
# indexing ops: they synchronise when an index is a mask (bool or uint8), which they turn into positions first
INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
COPIES = {aten._to_copy, aten.copy_}


def is_mask(index) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def crosses_to_or_from_host(func, args, kwargs, out) -> bool:
    """A copy between the CPU and another device that the host waits for (see the module docstring)."""
    if func.overloadpacket not in COPIES:
        return False
    source = args[1] if func.overloadpacket is aten.copy_ else args[0]
    target = out if isinstance(out, torch.Tensor) else args[0]
    devices = {source.device.type, target.device.type}
    if len(devices) == 1 or "cpu" not in devices or "meta" in devices:
        return False
    queued = kwargs.get("non_blocking", False) or (func.overloadpacket is aten.copy_ and len(args) > 2 and args[2])
    return target.device.type == "cpu" or not (queued and source.is_pinned())


def forces_sync(func, args, kwargs, out) -> bool:
    """Whether this aten call makes the host wait for an accelerator (the module docstring's list)."""
    packet = func.overloadpacket
    if packet in ALWAYS:
        return True
    if packet is aten.repeat_interleave and isinstance(args[0], torch.Tensor) and kwargs.get("output_size") is None:
        return len(args) < 2 or isinstance(args[1], torch.Tensor)  # repeats as a tensor: the total is data
    if packet in INDEXING:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(is_mask(i) for i in indices)
    return crosses_to_or_from_host(func, args, kwargs, out)


class HostSyncCounter:
    """A context manager that records every op run under it that forces a host-device synchronisation: the aten ops
    of `forces_sync` (a TorchDispatchMode, which sees autograd's backward ops as well) and `Tensor.tolist` /
    `Tensor.numpy` (a TorchFunctionMode: on a CPU they reach no aten op)."""

    def __init__(self):
        self.ops: list[str] = []  # the op of each synchronisation, in order
        self.reading = False  # inside tolist / numpy: its own device -> host copy is that read, not another one
        self._modes = (WholeReads(self), SyncingOps(self))

    @property
    def count(self) -> int:
        return len(self.ops)

    def __enter__(self) -> HostSyncCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


class SyncingOps(TorchDispatchMode):
    """HostSyncCounter's aten-level half."""

    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.counter.reading and forces_sync(func, args, kwargs, out):
            self.counter.ops.append(str(func))
        return out


WHOLE_READS = {torch.Tensor.tolist, torch.Tensor.numpy}


class WholeReads(TorchFunctionMode):
    """HostSyncCounter's half for the reads that bypass aten on a CPU (tolist, numpy)."""

    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in WHOLE_READS or self.counter.reading:
            return func(*args, **kwargs)
        self.counter.ops.append(f"Tensor.{func.__name__}")
        self.counter.reading = True
        try:
            return func(*args, **kwargs)
        finally:
            self.counter.reading = False
