"""Data-movement ops: ``dispatch`` (tokens -> expert-grouped rows) and ``combine`` (rows -> tokens)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._validation import FLOAT_DTYPES, check, check_same_device, check_tensor
from ..backends import resolve
from ..types import Routing
from ._runner import custom_op, run


# ---------------------------------------------------------------- dispatch

@custom_op("dispatch", mutates_args=())
def _dispatch(x: Tensor, slots: Tensor, sources: Tensor, backend: str) -> Tensor:
    return run(backend, "dispatch", x, slots, sources)


@_dispatch.register_fake
def _(x, slots, sources, backend):
    return x.new_empty(sources.shape[0], x.shape[1])


@custom_op("dispatch_backward", mutates_args=())
def _dispatch_backward(grad_out: Tensor, slots: Tensor, backend: str) -> Tensor:
    return run(backend, "dispatch_backward", grad_out, slots)


@_dispatch_backward.register_fake
def _(grad_out, slots, backend):
    return grad_out.new_empty(slots.shape[0], grad_out.shape[1])


def _dispatch_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.backend = inputs[3]


def _dispatch_bwd(ctx, grad):
    (slots,) = ctx.saved_tensors
    return _dispatch_backward(grad.contiguous(), slots, ctx.backend), None, None, None


_dispatch.register_autograd(_dispatch_bwd, setup_context=_dispatch_setup)


# ---------------------------------------------------------------- combine

@custom_op("combine", mutates_args=())
def _combine(y: Tensor, weights: Tensor, slots: Tensor, backend: str) -> Tensor:
    return run(backend, "combine", y, weights, slots)


@_combine.register_fake
def _(y, weights, slots, backend):
    return y.new_empty(slots.shape[0], y.shape[1])


@custom_op("combine_backward", mutates_args=())
def _combine_backward(grad_out: Tensor, y: Tensor, weights: Tensor, slots: Tensor, need_y: bool,
                      need_weights: bool, backend: str) -> tuple[Tensor, Tensor]:
    gy, gw = run(backend, "combine_backward", grad_out, y, weights, slots, need_y, need_weights)
    # custom ops cannot return None: an unneeded gradient comes back as an empty tensor
    return (gy if gy is not None else y.new_empty(0)), (gw if gw is not None else weights.new_empty(0))


@_combine_backward.register_fake
def _(grad_out, y, weights, slots, need_y, need_weights, backend):
    return (torch.empty_like(y) if need_y else y.new_empty(0),
            torch.empty_like(weights) if need_weights else weights.new_empty(0))


def _combine_setup(ctx, inputs, output):
    y, weights, slots, backend = inputs
    ctx.save_for_backward(y, weights, slots)
    ctx.backend = backend


def _combine_bwd(ctx, grad):
    y, weights, slots = ctx.saved_tensors
    need_y, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_y or need_w):
        return None, None, None, None
    gy, gw = _combine_backward(grad.contiguous(), y, weights, slots, need_y, need_w, ctx.backend)
    return (gy if need_y else None), (gw if need_w else None), None, None


_combine.register_autograd(_combine_bwd, setup_context=_combine_setup)


# ---------------------------------------------------------------- public API

def _check_routing(routing, op: str, ref: Tensor, ref_name: str) -> None:
    check(isinstance(routing, Routing), op, "routing",
          f"must be a moe_kernels.Routing (from mk.route / mk.task_route), got {type(routing).__name__}")
    check_same_device(op, ref_name, ref, **{"routing.slots": routing.slots})


def dispatch(x: Tensor, routing: Routing, *, backend: Optional[str] = None) -> Tensor:
    """Gather tokens into expert-contiguous rows: ``out[r] = x[routing.sources[r]]``.

    Args:
        x: ``[T, d]`` token features, contiguous; T must equal ``routing.num_tokens``.
        routing: the plan from :func:`moe_kernels.route`.

    Returns:
        ``[N, d]`` with ``N = routing.num_rows``; padding rows (``sources == -1``) are zero. Data
        movement is exact (bit-identical copies). Backward sums the k copies of each token.
    """
    op = "dispatch"
    check_tensor(x, op, "x", ndim=2, dtypes=FLOAT_DTYPES)
    _check_routing(routing, op, x, "x")
    check(x.shape[0] == routing.num_tokens, op, "x",
          f"has {x.shape[0]} rows but the routing was built for {routing.num_tokens} tokens")
    name = resolve(op, x.device, backend)
    return _dispatch(x, routing.slots, routing.sources, name)


def combine(y: Tensor, routing: Routing, *, weights: Optional[Tensor] = None,
            backend: Optional[str] = None) -> Tensor:
    """Weighted sum of each token's expert outputs: ``out[t] = sum_j w[t,j] * y[slots[t,j]]``.

    Args:
        y: ``[N, d]`` expert outputs in the expert-grouped layout (``N = routing.num_rows``).
        routing: the plan from :func:`moe_kernels.route`.
        weights: ``[T, k]`` gate weights; default ``routing.topk_weights``.

    Returns:
        ``[T, d]`` in ``y.dtype``, summed in fp32 (fp64 for fp64) in j order. Dropped assignments
        (``slots == -1``) contribute zero. Gradients flow to ``y`` and to the weights.
    """
    op = "combine"
    check_tensor(y, op, "y", ndim=2, dtypes=FLOAT_DTYPES)
    _check_routing(routing, op, y, "y")
    w = routing.topk_weights if weights is None else weights
    check_tensor(w, op, "weights", ndim=2, dtypes=FLOAT_DTYPES)
    check(tuple(w.shape) == tuple(routing.slots.shape), op, "weights",
          f"must have shape [T, k]={tuple(routing.slots.shape)}, got {tuple(w.shape)}")
    check_same_device(op, "y", y, weights=w)
    check(y.shape[0] == routing.num_rows, op, "y",
          f"has {y.shape[0]} rows but the routing's buffer has {routing.num_rows} rows")
    name = resolve(op, y.device, backend)
    return _combine(y, w, routing.slots, name)
