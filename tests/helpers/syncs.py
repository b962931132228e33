"""Count what would make the host wait for the device on a GPU, observed on any device (the CPU included).

On CUDA the host queues kernels and runs ahead of the device. It stops and waits for the queue to drain when it
needs a value that only the device holds, when it must know a size that depends on such values before it can
allocate an output, or when a copy between host and device memory is blocking (PyTorch synchronises the stream
after one). On a CPU run nothing waits, so the same events are caught where the code asks for them:

    with host_syncs() as s:
        step()
    assert s.count <= 2, s      # s.ops: Counter of op names; s.events: (op, call site) in order
    s.launches                  # aten ops other than views and allocations: about the kernels a GPU would launch

What is counted, and why each:
- reading a value: ``aten._local_scalar_dense`` (what ``.item()``, ``bool(t)`` / ``if t:``, ``float(t)``, ``int(t)``
  and formatting a tensor come down to), ``aten.equal`` and ``aten.allclose`` (they return a Python bool),
  ``aten.histc`` without a range (it reads the data's min and max); ``Tensor.tolist``, ``Tensor.numpy``,
  ``Tensor.__array__`` (``np.asarray(t)``) and ``Tensor.cpu``, which copy to host memory;
- an output whose size depends on values: ``nonzero`` (also ``torch.where(cond)``, ``argwhere``), ``masked_select``,
  the ``unique`` family, ``bincount``, ``repeat_interleave`` with tensor repeats and no ``output_size``, and
  ``index`` / ``index_put_`` with a boolean or uint8 index (``x[mask]``, ``x[mask] = v``: nonzero inside);
- a blocking copy from the host: ``Tensor.to`` / ``Tensor.cuda`` to a device without ``non_blocking=True``,
  ``torch.tensor`` / ``torch.as_tensor`` with a ``device``, ``Tensor.new_tensor`` (made on the tensor's device).
  On a CPU run a tensor's would-be device is unknown, so these count even when the tensor is already there (no
  copy, no wait on a GPU): each event names its call site, to judge by.
Not seen: explicit ``torch.cuda.synchronize()`` / event waits, and syncs inside compiled or C++ code that never
reach the dispatcher as one of these ops.

Both modes are thread-local: only the thread that enters the block is counted, backward included (on a CPU it runs
in the calling thread); loader threads are not.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
READS = {aten._local_scalar_dense.default, aten.equal.default, aten.allclose.default}
SIZED_BY_VALUES = {aten.nonzero.default, aten.masked_select.default, aten._unique.default, aten._unique2.default,
                   aten.unique_dim.default, aten.unique_consecutive.default, aten.unique_dim_consecutive.default,
                   aten.bincount.default}
MASK_INDEXED = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}
ALLOCATIONS = {aten.empty, aten.empty_like, aten.empty_strided, aten.detach, aten.lift_fresh}
HOST_COPIES = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__, torch.Tensor.cpu}
_HERE, _TORCH = __file__, os.path.dirname(torch.__file__) + os.sep  # frames to skip when naming the call site


@dataclass
class Syncs:
    events: list = field(default_factory=list)  # (op name, "file:line" of the caller outside torch)
    launches: int = 0
    origins: list = field(default_factory=list)  # per event, the torch files on the stack between it and the caller

    @property
    def count(self) -> int:
        return len(self.events)

    @property
    def ops(self) -> Counter:
        return Counter(op for op, _ in self.events)

    def add(self, op: str):
        frame, inside = sys._getframe(1), set()
        while frame is not None and (frame.f_code.co_filename.startswith(_TORCH) or frame.f_code.co_filename == _HERE):
            if frame.f_code.co_filename != _HERE:
                inside.add(frame.f_code.co_filename[len(_TORCH) - len("torch/"):])
            frame = frame.f_back
        self.origins.append(inside)
        self.events.append((op, f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame else "?"))

    def besides(self, *torch_files: str) -> "Syncs":
        """The events but those asked for inside these files of torch (e.g. "torch/optim/adamw.py"): for what a CPU
        run cannot tell from a wait, such as reading a tensor that lives on the host on a GPU run too."""
        kept = [(e, o) for e, o in zip(self.events, self.origins) if not o & set(torch_files)]
        return Syncs([e for e, _ in kept], self.launches, [o for _, o in kept])

    def __str__(self):
        return f"{self.count} host syncs: " + "; ".join(f"{op} at {site}" for op, site in self.events)


def _waits(func, args, kwargs) -> bool:
    if func in READS or func in SIZED_BY_VALUES:
        return True
    if func in MASK_INDEXED:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    if func is aten.histc.default:
        lo, hi = (list(args[2:4]) + [kwargs.get("min", 0), kwargs.get("max", 0)])[:2]
        return lo == hi
    return False


def _blocking_copy(func, args, kwargs) -> bool:
    if func in (torch.Tensor.to, torch.Tensor.cuda):
        targets = list(args[1:]) + [kwargs.get("device")]
        to_device = func is torch.Tensor.cuda or any(isinstance(a, (str, torch.device, torch.Tensor)) or
                                                     (isinstance(a, int) and not isinstance(a, bool)) for a in targets)
        non_blocking = kwargs.get("non_blocking", next((a for a in args[1:] if isinstance(a, bool)), False))
        return to_device and not non_blocking
    if func in (torch.tensor, torch.as_tensor):
        return kwargs.get("device") is not None
    return func is torch.Tensor.new_tensor


class _Recording:
    def __init__(self, syncs: Syncs):
        super().__init__()
        self.syncs = syncs


class _Dispatch(_Recording, TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _waits(func, args, kwargs):
            self.syncs.add(str(func))
        if not (func.is_view or func.overloadpacket in ALLOCATIONS):
            self.syncs.launches += 1
        return func(*args, **kwargs)


class _Function(_Recording, TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_COPIES or _blocking_copy(func, args, kwargs):
            self.syncs.add(f"Tensor.{func.__name__}" if func not in (torch.tensor, torch.as_tensor) else
                           f"torch.{func.__name__}")
        return func(*args, **kwargs)


@contextmanager
def host_syncs():
    """Counts, in this thread, the events the module docstring lists; yields the Syncs record."""
    syncs = Syncs()
    with _Function(syncs), _Dispatch(syncs):
        yield syncs
