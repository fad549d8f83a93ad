"""Counting what a GPU pays, on any device: aten operations and host-device synchronisations.

`DispatchCounter` is a `TorchDispatchMode`: inside `with DispatchCounter() as counter:` every aten call is counted
(`counter.ops`, by op name such as "aten.mm"), views included. On a GPU each counted op is (at most) one kernel
launch or one host-side view: on a CPU the count is the same, so a CPU run says how many launches a decode step
would cost. Composite ops (reshape, matmul, scaled_dot_product_attention, ...) are counted as the ops they decompose
into, which are what would launch; ops a kernel calls internally are not counted (the mode sees only the top call).

A "sync" is anything that makes the host wait for device data (`counter.syncs`, by kind). Two mechanisms catch them:

* the dispatch mode (always on) catches, at aten level:
  - `aten._local_scalar_dense`: what `t.item()`, `bool(t)`, `int(t)`, `float(t)` and `t.__index__()` go through;
  - ops whose output shape depends on data: `aten.nonzero` (also `torch.where(cond)`), `aten.masked_select`,
    `aten._unique*`/`aten.unique_*`, `aten.bincount`, `aten.index`/`aten.index_put(_)` with boolean (or uint8) index
    tensors (`t[mask]`, `t[mask] = v`; the mode sees the index op, not the `nonzero` inside its kernel) and
    `aten.repeat_interleave.Tensor` without `output_size`;
  - `aten.equal` (returns a host bool) and blocking copies from an accelerator to the host (`_to_copy`/`copy_`;
    these only happen on a device run).
* a `TorchFunctionMode` (`python_syncs=True`, the default) catches what never reaches the dispatcher for a CPU
  tensor (checked on torch 2.13): `Tensor.tolist()` and `Tensor.cpu()`/`Tensor.to("cpu")` dispatch nothing at all,
  `Tensor.numpy()`/`__array__` only an `aten.detach`. It watches `tolist`, `item`, `__bool__`, `__int__`, `__float__`,
  `__index__`, `__complex__`, `cpu`, `to(cpu)`, `numpy` and `__array__`, and counts a sync under the method's name
  (e.g. "Tensor.tolist") only when no dispatch-level sync happened inside the call: `.item()` counts once (as
  `aten._local_scalar_dense`, its site marked "[Tensor.item]"), and so does a device tensor's `.tolist()` (its
  device-to-host copy). On a CPU run `.cpu()` and `.tolist()` are counted although they cost nothing there: on a
  GPU the same code would wait for the device (code that keeps some tensors on the host on purpose is over-counted).
  `.to(device)` counts only when the device is the string "cpu": `.to(x.device)` is device-agnostic code that
  moves nothing to the host on a GPU run.

For each sync the innermost caller outside torch is counted in `counter.sync_sites`, and the first occurrence of each
kind keeps a short Python stack in `counter.first_sync_stack`: what a developer needs to find and remove them.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Syncs whatever their arguments: a host read of device data, or an output whose shape depends on device data.
_ALWAYS_SYNC = {
    aten._local_scalar_dense,
    aten.nonzero,
    aten.masked_select,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.unique_dim_consecutive,
    aten.bincount,
    aten.equal,
}
_INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
_MASK_DTYPES = (torch.bool, torch.uint8)

# Python-level calls that wait for the device; on a CPU tensor some never reach the dispatcher (see the docstring).
_PYTHON_SYNCS: dict[Callable, str] = {
    torch.Tensor.tolist: "Tensor.tolist",
    torch.Tensor.item: "Tensor.item",
    torch.Tensor.__bool__: "Tensor.__bool__",
    torch.Tensor.__int__: "Tensor.__int__",
    torch.Tensor.__float__: "Tensor.__float__",
    torch.Tensor.__index__: "Tensor.__index__",
    torch.Tensor.__complex__: "Tensor.__complex__",
    torch.Tensor.cpu: "Tensor.cpu",
    torch.Tensor.numpy: "Tensor.numpy",
    torch.Tensor.__array__: "Tensor.__array__",
}

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_THIS_FILE = os.path.abspath(__file__)


def _is_host(device) -> bool:
    return device is not None and torch.device(device).type == "cpu"


def _to_host(args: tuple, kwargs: dict) -> bool:
    """Whether a `Tensor.to(...)` call names the host as a string, `.to("cpu")`.

    A `torch.device` is not counted: it is mostly another tensor's device (`.to(x.device)`), device-agnostic code
    that moves nothing to the host on a GPU run.
    """
    targets = [kwargs.get("device"), *args[1:]]
    return any(isinstance(t, str) and _is_host(t) for t in targets)


def _frames(limit: int) -> list[str]:
    """The innermost `limit` Python frames outside torch and this module, innermost first."""
    frames, frame = [], sys._getframe(1)
    while frame is not None and len(frames) < limit:
        path = os.path.abspath(frame.f_code.co_filename)
        if path != _THIS_FILE and not path.startswith(_TORCH_DIR):
            short = os.sep.join(path.split(os.sep)[-2:])
            frames.append(f"{short}:{frame.f_lineno} in {frame.f_code.co_name}")
        frame = frame.f_back
    return frames


class _PythonSyncs(TorchFunctionMode):
    """Counts the Python-level syncs that dispatch no sync op (see the module docstring)."""

    def __init__(self, counter: DispatchCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            name = _PYTHON_SYNCS.get(func)
        except TypeError:  # an unhashable callable: not one of ours
            name = None
        if name is None and func is torch.Tensor.to and _to_host(args, kwargs):
            name = "Tensor.to(cpu)"
        if name is None:
            return func(*args, **kwargs)
        counter = self.counter
        before, outer = counter._dispatch_syncs, counter._via
        counter._via = name
        try:
            return func(*args, **kwargs)
        finally:
            counter._via = outer
            if counter._dispatch_syncs == before:
                counter._record_sync(name)


class DispatchCounter(TorchDispatchMode):
    """Counts aten ops (`ops`) and host syncs (`syncs`) run inside `with DispatchCounter() as counter:`.

    `python_syncs` also counts the Python-level syncs that dispatch nothing on a CPU tensor (`.tolist()`, `.cpu()`,
    ...); `stack_depth` is how many frames `first_sync_stack` keeps. Counts accumulate over several `with` blocks
    (the same counter may be entered again) until `reset()`.
    """

    def __init__(self, python_syncs: bool = True, stack_depth: int = 6):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self.sync_sites: Counter[tuple[str, str]] = Counter()  # (kind, innermost caller outside torch) -> count
        self.first_sync_stack: dict[str, list[str]] = {}  # kind -> frames outside torch, innermost first
        self.stack_depth = stack_depth
        self._python_mode = _PythonSyncs(self) if python_syncs else None
        self._dispatch_syncs = 0
        self._via: str | None = None
        self._names: dict[object, str] = {}

    @property
    def total_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())

    def top_ops(self, n: int = 10) -> list[tuple[str, int]]:
        return self.ops.most_common(n)

    def reset(self) -> None:
        self.ops.clear()
        self.syncs.clear()
        self.sync_sites.clear()
        self.first_sync_stack.clear()
        self._dispatch_syncs = 0

    def report(self, top: int = 10, per: int = 1) -> str:
        """Text summary: totals, the `top` ops, and each sync kind with its call sites; counts divided by `per`
        (e.g. the number of decode steps counted)."""
        unit = f" (each count divided by {per})" if per > 1 else ""
        lines = [f"{self.total_ops / per:g} ops, {self.total_syncs / per:g} syncs{unit}"]
        lines += [f"  {count / per:>10g}  {name}" for name, count in self.top_ops(top)]
        for kind, count in self.syncs.most_common():
            lines.append(f"  sync {kind}: {count / per:g}")
            sites = [(site, n) for (k, site), n in self.sync_sites.most_common() if k == kind]
            lines += [f"      {n / per:>8g}  {site}" for site, n in sites]
        return "\n".join(lines)

    def __enter__(self):
        if self._python_mode is not None:
            self._python_mode.__enter__()
        try:
            return super().__enter__()
        except BaseException:
            if self._python_mode is not None:
                self._python_mode.__exit__(*sys.exc_info())
            raise

    def __exit__(self, exc_type, exc_value, traceback):
        try:
            return super().__exit__(exc_type, exc_value, traceback)
        finally:
            if self._python_mode is not None:
                self._python_mode.__exit__(exc_type, exc_value, traceback)

    def _record_sync(self, kind: str) -> None:
        self.syncs[kind] += 1
        frames = _frames(self.stack_depth)
        site = frames[0] if frames else "?"
        if self._via is not None and self._via != kind:
            site += f" [{self._via}]"
        self.sync_sites[kind, site] += 1
        self.first_sync_stack.setdefault(kind, frames)

    def _sync_kind(self, func, packet, args: tuple, kwargs: dict) -> str | None:
        if packet in _ALWAYS_SYNC:
            return self._names[packet]
        if packet in _INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in _MASK_DTYPES for i in indices):
                return self._names[packet] + "(mask)"
        elif func is aten.repeat_interleave.Tensor:
            if kwargs.get("output_size") is None:
                return "aten.repeat_interleave"
        elif packet is aten._to_copy:
            source = args[0]
            if source.device.type != "cpu" and _is_host(kwargs.get("device")) and not kwargs.get("non_blocking"):
                return "aten._to_copy(device->host)"
        elif packet is aten.copy_:
            destination, source = args[0], args[1]
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            if destination.device.type == "cpu" and source.device.type != "cpu" and not non_blocking:
                return "aten.copy_(device->host)"
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        name = self._names.get(packet)
        if name is None:
            name = self._names[packet] = str(packet)
        self.ops[name] += 1
        kind = self._sync_kind(func, packet, args, kwargs)
        if kind is not None:
            self._dispatch_syncs += 1
            self._record_sync(kind)
        return func(*args, **kwargs)
