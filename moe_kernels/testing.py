"""Test utilities for code built on moe_kernels: count the host synchronisations of a step (and see
what autograd keeps for backward, :func:`saved_storages`).

    with mk.value_checks(False), HostSyncCounter() as syncs:    # the sync-free policy, as on a GPU
        out = layer(x)
        (out.output.sum() + out.aux_loss).backward()
    assert syncs.count == 0, syncs.report()

What counts as a host synchronisation: an operation whose result the host has to wait for on a
GPU, because it reads a value (``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``), produces a
shape that depends on values (``nonzero``, ``unique``, boolean-mask indexing, ``masked_select``,
``repeat_interleave`` without ``output_size``, ``bincount``), or copies to the host. On the CPU the
same operations are counted, so a CPU test proves a step would not synchronise a GPU.
``torch._assert_async`` is not counted: on a GPU it is an asynchronous device-side assertion.

The counter is a ``TorchDispatchMode``. Such a mode sees each custom op as one call, not what runs
inside; for the ``moe_kernels::*`` ops it runs their implementation itself, with the counter active,
so their bodies and Python kernels are counted too. Compiled kernels (``moe_kernels_C::*``
operators) are single calls: what they do inside is not a host synchronisation.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_VALUE_READS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose"}
_DATA_DEPENDENT_SHAPES = {"nonzero", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                          "unique_dim_consecutive", "masked_select", "bincount", "histc"}


@dataclass
class HostSync:
    """One counted operation: what it was and where in the caller's code it happened."""

    what: str
    where: str

    def __str__(self) -> str:
        return f"{self.what} at {self.where}"


def _where() -> str:
    frames = traceback.extract_stack()[:-3]
    own = [f for f in frames if "/moe_kernels/" in f.filename.replace("\\", "/")
           and not f.filename.endswith("testing.py")]
    f = (own or frames)[-1]
    return f"{f.filename}:{f.lineno} ({f.name})"


def _has_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices if i is not None)


class HostSyncCounter(TorchDispatchMode):
    """Counts host synchronisations while active (see the module docstring).

    Attributes:
        events: every counted operation (:class:`HostSync`), in order.
    """

    def __init__(self):
        super().__init__()
        self.events: list = []
        self._tolist = None
        self._depth = 0

    @property
    def count(self) -> int:
        return len(self.events)

    def report(self) -> str:
        """The counted operations, one per line."""
        return "\n".join(str(e) for e in self.events) or "no host synchronisation"

    def _record(self, what: str) -> None:
        self.events.append(HostSync(what, _where()))

    def __enter__(self):
        if self._depth == 0:  # the outermost entry patches tolist (the mode re-enters itself)
            counter, original = self, torch.Tensor.tolist
            self._tolist = original

            def tolist(t):  # reads every value on the host (and dispatches nothing on the CPU)
                counter._record("Tensor.tolist")
                return original(t)

            torch.Tensor.tolist = tolist
        self._depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::", 1)[-1]
        ns = func.namespace
        if ns == "aten":
            if name in _VALUE_READS or name in _DATA_DEPENDENT_SHAPES:
                self._record(f"aten.{name}")
            elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
                self._record("aten.repeat_interleave without output_size")
            elif name in ("index", "index_put", "index_put_") and len(args) > 1 and _has_bool_index(args[1]):
                self._record(f"aten.{name} with a boolean mask")
            elif name in ("_to_copy", "copy_"):
                src = args[1] if name == "copy_" else args[0]
                dst_dev = (args[0].device if name == "copy_" else kwargs.get("device"))
                if isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta") and \
                        dst_dev is not None and torch.device(dst_dev).type == "cpu":
                    self._record(f"aten.{name} to the host")
        elif ns == "moe_kernels":
            from .ops._runner import IMPLS

            impl = IMPLS.get(name)
            if impl is not None:
                with self:  # look inside: the op body and a Python kernel run under the counter
                    return impl(*args, **kwargs)
        return func(*args, **kwargs)


def saved_storages(fn, exclude=()):
    """Run ``fn()`` and record what autograd keeps for its backward.

    Returns ``(fn's result, {storage data_ptr: bytes})`` over the distinct storages of the tensors
    saved for backward (views of one storage count once), leaving out the storages of ``exclude``
    (parameters, which exist anyway). Keep the result alive while the dict is used: it holds the
    graph that keeps those tensors.

        out, saved = saved_storages(lambda: mk.moe_mlp(x, r, w1, w2, "swiglu"), exclude=(w1, w2))
        activation_bytes = sum(saved.values())
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


__all__ = ["HostSync", "HostSyncCounter", "saved_storages"]
