"""Argument checks shared by every op, and the validation policy for values.

Every public op validates its inputs before any work is done, so bad input raises one clear
error naming the op and the argument and changes nothing. Checks on *metadata* (shapes, dtypes,
devices, contiguity, option values) always run, in the Python wrappers, and are traced by
``torch.compile``. Checks on *values* (NaN/inf logits, expert ids or offsets out of range) need
the data; which of them run, and where, is the validation policy (:func:`checking_values`):

* *checking*: synchronous checks with a clear error, before the kernel runs (or inside a kernel
  that declares it makes them itself). The default for CPU tensors, where reading values costs no
  device synchronisation.
* *sync-free*: no value is read on the host, so a forward and backward never synchronise with the
  device (CUDA-graph capturable). Bad values still never pass silently: a token with non-finite
  logits gets NaN gate weights (its output is NaN), an id or offset out of range trips an
  asynchronous device-side assertion. The default for every other device.

``MOE_KERNELS_CHECK_VALUES=1`` checks on every device (today's clear errors, at the cost of host
syncs on a GPU), ``=0`` is sync-free everywhere (the CPU too); :func:`value_checks` and
:func:`set_value_checks` choose in code and take precedence over the environment.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterable, Optional, Sequence

import torch

CHECK_VALUES_ENV = "MOE_KERNELS_CHECK_VALUES"
_forced: Optional[bool] = None  # set_value_checks / value_checks; None: the environment decides

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)


class MoEKernelsError(ValueError):
    """Raised for invalid input to a moe_kernels op. Subclasses ValueError."""


def fail(op: str, arg: str, msg: str) -> None:
    raise MoEKernelsError(f"moe_kernels.{op}: argument '{arg}' {msg}")


def check(cond: bool, op: str, arg: str, msg: str) -> None:
    if not cond:
        fail(op, arg, msg)


def check_tensor(
    t,
    op: str,
    arg: str,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    contiguous: bool = True,
) -> None:
    if not isinstance(t, torch.Tensor):
        fail(op, arg, f"must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(f"{n}-D" for n in allowed)
            fail(op, arg, f"must be {want}, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            fail(op, arg, f"must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if contiguous and not t.is_contiguous():
        fail(op, arg, f"must be contiguous (strides {t.stride()} for shape {tuple(t.shape)}); "
                      "call .contiguous() first")


def check_same_device(op: str, ref_arg: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            fail(op, name, f"is on {t.device} but '{ref_arg}' is on {ref.device}; "
                           "all inputs must be on one device")


def check_int(value, op: str, arg: str, *, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        # torch.SymInt is fine under torch.compile
        if not isinstance(value, torch.SymInt):
            fail(op, arg, f"must be an int, got {type(value).__name__}")
    if lo is not None and value < lo:
        fail(op, arg, f"must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        fail(op, arg, f"must be <= {hi}, got {value}")
    return value


def check_choice(value, op: str, arg: str, choices: Sequence[str]) -> str:
    if value not in choices:
        fail(op, arg, f"must be one of {tuple(choices)}, got {value!r}")
    return value


# ---- value checks (run inside the real kernels: they read the data) ----

def check_finite(t: torch.Tensor, op: str, arg: str) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        fail(op, arg, f"contains NaN or inf (first at index {tuple(bad)})")


def check_index_range(t: torch.Tensor, hi: int, op: str, arg: str, *, allow_minus_one=False) -> None:
    """All values in [0, hi) (or -1 when allow_minus_one)."""
    if t.numel() == 0:
        return
    lo = -1 if allow_minus_one else 0
    mn, mx = int(t.min()), int(t.max())
    if mn < lo or mx >= hi:
        bad = mn if mn < lo else mx
        fail(op, arg, f"has value {bad} out of range [{lo}, {hi})")


def _duplicate_local(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[T]`` bool: the rows of ``ids`` that hold an id in ``[0, num_experts)`` twice. Other ids
    (not local) become distinct negative values per column, so they never collide."""
    k = ids.shape[1]
    local = (ids >= 0) & (ids < num_experts)
    sentinel = -2 - torch.arange(k, device=ids.device, dtype=torch.int64)
    s = torch.where(local, ids.to(torch.int64), sentinel).sort(dim=1).values
    return (s[:, 1:] == s[:, :-1]).any(1)


def check_plan_ids(ids: torch.Tensor, num_experts: int, op: str, arg: str) -> None:
    """Given top-k ids: every value >= -1 and a row's local ids distinct (see :func:`moe_kernels.plan`)."""
    if ids.numel() == 0:
        return
    mn = int(ids.min())
    if mn < -1:
        fail(op, arg, f"has value {mn}; an id is an expert in [0, {num_experts}), or -1 or >= {num_experts} for "
                      "an expert not on this rank")
    dup = _duplicate_local(ids, num_experts)
    if bool(dup.any()):
        t = int(dup.nonzero()[0])
        fail(op, arg, f"names an expert twice in token {t} (row {ids[t].tolist()}); a token's experts must be "
                      "distinct")


def assert_plan_ids_async(ids: torch.Tensor, num_experts: int, op: str, arg: str) -> None:
    """The sync-free form of :func:`check_plan_ids`: a device-side assertion, no host sync."""
    if ids.numel():
        torch._assert_async((ids >= -1).all() & ~_duplicate_local(ids, num_experts).any(),
                            f"moe_kernels.{op}: argument '{arg}' has an id < -1 or an expert twice in a token")


def check_priority(p: torch.Tensor, by_score: bool, op: str, arg: str) -> None:
    """Gate weights given to :func:`moe_kernels.plan`: finite, and >= 0 when they rank assignments."""
    check_finite(p, op, arg)
    if by_score and p.numel() and bool((p < 0).any()):
        bad = (p < 0).nonzero()[0].tolist()
        fail(op, arg, f"has a negative value at index {tuple(bad)}; under drop_policy='score' the weights rank "
                      "the assignments and must be >= 0")


def check_offsets(offsets: torch.Tensor, num_rows: int, op: str, arg: str = "offsets") -> None:
    """offsets[0] == 0, non-decreasing, offsets[-1] <= num_rows."""
    o = offsets.to("cpu", torch.int64)
    if int(o[0]) != 0:
        fail(op, arg, f"must start at 0, got offsets[0]={int(o[0])}")
    if o.numel() > 1 and bool((o[1:] < o[:-1]).any()):
        i = int((o[1:] < o[:-1]).nonzero()[0])
        fail(op, arg, f"must be non-decreasing, got offsets[{i}]={int(o[i])} > offsets[{i + 1}]={int(o[i + 1])}")
    if int(o[-1]) > num_rows:
        fail(op, arg, f"ends at {int(o[-1])} but the input has only {num_rows} rows")


# ---- the validation policy for values

def checking_values(device: Optional[torch.device]) -> bool:
    """Whether value checks run synchronously for tensors on ``device`` (see the module docstring)."""
    if _forced is not None:
        return _forced
    env = os.environ.get(CHECK_VALUES_ENV)
    if env:
        if env == "1":
            return True
        if env == "0":
            return False
        if env != "auto":
            raise MoEKernelsError(f"moe_kernels: environment variable {CHECK_VALUES_ENV} must be 0, 1 or auto, "
                                  f"got {env!r}")
    return device is not None and device.type == "cpu"


def set_value_checks(enabled: Optional[bool]) -> None:
    """Choose the validation policy for the whole process: ``True`` checks values synchronously on
    every device, ``False`` is sync-free everywhere, ``None`` restores the default (the
    environment variable ``MOE_KERNELS_CHECK_VALUES``, else checking on CPU tensors only)."""
    global _forced
    if enabled is not None and not isinstance(enabled, bool):
        raise MoEKernelsError(f"moe_kernels.set_value_checks: argument 'enabled' must be True, False or None, "
                              f"got {enabled!r}")
    _forced = enabled


@contextlib.contextmanager
def value_checks(enabled: Optional[bool]):
    """Within the block, :func:`set_value_checks` ``(enabled)``; the previous policy after it.

    Example:
        >>> with mk.value_checks(False):      # sync-free, as on a GPU: NaN logits give NaN outputs
        ...     out = layer(x)
    """
    global _forced
    before = _forced
    set_value_checks(enabled)
    try:
        yield
    finally:
        _forced = before


def assert_index_range_async(t: torch.Tensor, hi: int, op: str, arg: str, *, allow_minus_one=False) -> None:
    """The sync-free form of :func:`check_index_range`: a device-side assertion, no host sync."""
    if t.numel():
        lo = -1 if allow_minus_one else 0
        torch._assert_async(((t >= lo) & (t < hi)).all(),
                            f"moe_kernels.{op}: argument '{arg}' has a value out of range [{lo}, {hi})")


def assert_offsets_async(offsets: torch.Tensor, num_rows: int, op: str, arg: str = "offsets") -> None:
    """The sync-free form of :func:`check_offsets`: a device-side assertion, no host sync."""
    ok = (offsets[0] == 0) & (offsets[-1] <= num_rows)
    if offsets.numel() > 1:
        ok = ok & (offsets[1:] >= offsets[:-1]).all()
    torch._assert_async(ok, f"moe_kernels.{op}: argument '{arg}' must start at 0, be non-decreasing and end "
                            f"at most at {num_rows}")
