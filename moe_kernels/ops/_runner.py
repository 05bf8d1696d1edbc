"""How an op body runs a kernel: look it up, apply the validation policy to its values, call it.

The op bodies (the implementations of the ``moe_kernels::*`` custom ops) call :func:`run` with the
backend name they were given and the kernel's arguments in contract order. :func:`run` is the only
place that knows the validation policy (:func:`moe_kernels.value_checks`):

* checking: the contract's value checks of the kernel (:attr:`KernelSpec.checks`) run before it,
  synchronously, with the clear errors of :mod:`moe_kernels._validation`, except those the kernel
  makes itself (``@checks_values``), which it is asked to make with ``check_values=True``;
* sync-free: index, id and offset checks the kernel does not make become asynchronous device-side
  assertions (``torch._assert_async``); finiteness is the kernel's NaN semantics (``plan``'s gate
  weights pass through to the Routing, so a NaN among them reaches the layer's output).
"""

from __future__ import annotations

import torch

from .._validation import (assert_index_range_async, assert_offsets_async, assert_plan_ids_async, check_finite,
                           check_index_range, check_offsets, check_plan_ids, check_priority, checking_values)
from ..backends import get_kernel
from ..backends.contract import KERNELS, device_of


def _bound(check, named) -> int:
    return int(check.bound(named))


def _check(check, op: str, named: dict) -> None:
    t = named[check.arg]
    if t is None:
        return
    if check.kind == "finite":
        check_finite(t, op, check.name)
    elif check.kind == "index":
        check_index_range(t, _bound(check, named), op, check.name, allow_minus_one=check.minus_one)
    elif check.kind == "ids":
        check_plan_ids(t, _bound(check, named), op, check.name)
    elif check.kind == "priority":
        check_priority(t, named["capacity"] >= 0 and named["drop_policy"] == "score", op, check.name)
    else:
        check_offsets(t, _bound(check, named), op, check.name)


def _assert_async(check, op: str, named: dict) -> None:
    t = named[check.arg]
    if t is None or check.kind in ("finite", "priority"):
        return
    if check.kind == "index":
        assert_index_range_async(t, _bound(check, named), op, check.name, allow_minus_one=check.minus_one)
    elif check.kind == "ids":
        assert_plan_ids_async(t, _bound(check, named), op, check.name)
    else:
        assert_offsets_async(t, _bound(check, named), op, check.name)


def run(backend: str, name: str, *args):
    """Run kernel ``name`` of ``backend`` on ``args`` (contract order) under the validation policy."""
    k = get_kernel(backend, name)
    spec = k.spec
    if not spec.checks:
        return k.fn(*args)
    checking = checking_values(device_of(args))
    if k.pre_checks or k.post_checks:
        named = dict(zip(spec.params, args))
        for c in k.pre_checks:
            (_check if checking else _assert_async)(c, name, named)
    out = k.fn(*args, check_values=checking) if k.self_checks else k.fn(*args)
    if checking and k.post_checks:
        for c in k.post_checks:
            check_finite(out[c.arg], name, c.name)
    return out


#: ``{op name: implementation}`` of every ``moe_kernels::*`` custom op, as written here (what
#: :class:`moe_kernels.testing.HostSyncCounter` runs to look inside an op).
IMPLS: dict = {}
#: ``{op name: fake implementation}`` of every ``moe_kernels::*`` custom op (see :func:`kernel_fake`).
FAKES: dict = {}


def custom_op(name: str, *, mutates_args=()):
    """``torch.library.custom_op("moe_kernels::<name>")`` that also records the implementation and,
    when it is registered, the fake."""
    def define(fn):
        IMPLS[name] = fn
        op = torch.library.custom_op(f"moe_kernels::{name}", mutates_args=mutates_args)(fn)
        register = op.register_fake

        def register_fake(fake):
            FAKES[name] = fake
            return register(fake)

        op.register_fake = register_fake
        return op
    return define


def kernel_fake(name: str):
    """The fake of kernel ``name`` itself (the contract's signature, optional outputs ``None``): the
    custom op's fake, which takes the kernel's arguments and the backend name. Compiled kernels
    (``torch.ops.moe_kernels_C``) register it, so one shape function serves the op and its kernels."""
    spec, op_fake = KERNELS[name], FAKES[name]
    n = len(spec.params)

    def fake(*args):
        args = args[:n]  # a kernel that checks values itself takes check_values last
        out = op_fake(*args, "fake")
        if not spec.optional:
            return out
        named = dict(zip(spec.params, args))
        out = list(out)
        for ret, need in spec.optional.items():
            needs = need if isinstance(need, tuple) else (need,)
            if any(named[p] is None or named[p] is False for p in needs):
                out[spec.returns.index(ret)] = None
        return tuple(out)

    fake.__name__ = f"{name}_fake"
    return fake
