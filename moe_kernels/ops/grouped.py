"""Expert compute ops: ``grouped_gemm``, ``grouped_mlp`` and the whole-layer ``moe_mlp``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._validation import FLOAT_DTYPES, check, check_choice, check_same_device, check_tensor, fail
from ..backends import resolve
from ..backends.reference.grouped import ACTIVATIONS
from ..types import Routing
from ._runner import custom_op, run
from .permute import _check_routing


def _check_weight(t, op: str, arg: str) -> None:
    """An expert weight ``[E, a, b]``: contiguous, or the ``transpose(1, 2)`` of a contiguous
    ``[E, b, a]`` (how Hugging Face stores ``nn.Linear``-style expert weights), so those are used
    in place, never copied. Every backend reads either layout; weight gradients get the weight's."""
    check_tensor(t, op, arg, ndim=3, dtypes=FLOAT_DTYPES, contiguous=False)
    if not (t.is_contiguous() or t.transpose(1, 2).is_contiguous()):
        fail(op, arg, f"must be contiguous or the transpose(1, 2) of a contiguous tensor (strides {t.stride()} "
                      f"for shape {tuple(t.shape)}); call .contiguous() first")


def _empty_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty(0)


# ---------------------------------------------------------------- grouped_gemm

@custom_op("grouped_gemm", mutates_args=())
def _grouped_gemm(x: Tensor, offsets: Tensor, w: Tensor, backend: str) -> Tensor:
    return run(backend, "grouped_gemm", x, offsets, w)


@_grouped_gemm.register_fake
def _(x, offsets, w, backend):
    return x.new_empty(x.shape[0], w.shape[2])


@custom_op("grouped_gemm_backward", mutates_args=())
def _grouped_gemm_backward(grad_out: Tensor, x: Tensor, offsets: Tensor, w: Tensor, need_x: bool,
                           need_w: bool, backend: str) -> tuple[Tensor, Tensor]:
    gx, gw = run(backend, "grouped_gemm_backward", grad_out, x, offsets, w, need_x, need_w)
    return _empty_if_none(gx, x), _empty_if_none(gw, w)


@_grouped_gemm_backward.register_fake
def _(grad_out, x, offsets, w, need_x, need_w, backend):
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            torch.empty_like(w) if need_w else w.new_empty(0))


def _grouped_gemm_setup(ctx, inputs, output):
    x, offsets, w, backend = inputs
    ctx.save_for_backward(x, offsets, w)
    ctx.backend = backend


def _grouped_gemm_autograd(ctx, grad):
    x, offsets, w = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if not (need_x or need_w):
        return None, None, None, None
    gx, gw = _grouped_gemm_backward(grad.contiguous(), x, offsets, w, need_x, need_w, ctx.backend)
    return (gx if need_x else None), None, (gw if need_w else None), None


_grouped_gemm.register_autograd(_grouped_gemm_autograd, setup_context=_grouped_gemm_setup)


# ---------------------------------------------------------------- grouped_mlp

# outputs: (y [N, d_out], z [N, h1]); z, the pre-activation, is saved for backward (not differentiable)
@custom_op("grouped_mlp", mutates_args=())
def _grouped_mlp(x: Tensor, offsets: Tensor, w1: Tensor, w2: Tensor, b1: Optional[Tensor],
                 b2: Optional[Tensor], activation: str, backend: str) -> tuple[Tensor, Tensor]:
    y, z = run(backend, "grouped_mlp", x, offsets, w1, w2, b1, b2, activation)
    return y, z


@_grouped_mlp.register_fake
def _(x, offsets, w1, w2, b1, b2, activation, backend):
    return x.new_empty(x.shape[0], w2.shape[2]), x.new_empty(x.shape[0], w1.shape[2])


@custom_op("grouped_mlp_backward", mutates_args=())
def _grouped_mlp_backward(grad_out: Tensor, x: Tensor, z: Tensor, offsets: Tensor, w1: Tensor,
                          w2: Tensor, b1: Optional[Tensor], b2: Optional[Tensor], activation: str,
                          backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    gx, gw1, gw2, gb1, gb2 = run(backend, "grouped_mlp_backward", grad_out, x, z, offsets, w1, w2, b1, b2,
                                 activation)
    return gx, gw1, gw2, _empty_if_none(gb1, w1), _empty_if_none(gb2, w2)


@_grouped_mlp_backward.register_fake
def _(grad_out, x, z, offsets, w1, w2, b1, b2, activation, backend):
    return (torch.empty_like(x), torch.empty_like(w1), torch.empty_like(w2),
            torch.empty_like(b1) if b1 is not None else w1.new_empty(0),
            torch.empty_like(b2) if b2 is not None else w2.new_empty(0))


def _grouped_mlp_setup(ctx, inputs, output):
    x, offsets, w1, w2, b1, b2, activation, backend = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, output[1], offsets, w1, w2, b1, b2)
    ctx.opts = (activation, backend)


def _grouped_mlp_autograd(ctx, grad, _grad_z):
    x, z, offsets, w1, w2, b1, b2 = ctx.saved_tensors
    gx, gw1, gw2, gb1, gb2 = _grouped_mlp_backward(grad.contiguous(), x, z, offsets, w1, w2, b1, b2,
                                                   *ctx.opts)
    return (gx, None, gw1, gw2, gb1 if b1 is not None else None, gb2 if b2 is not None else None,
            None, None)


_grouped_mlp.register_autograd(_grouped_mlp_autograd, setup_context=_grouped_mlp_setup)


# ---------------------------------------------------------------- moe_mlp (the whole layer)

# outputs: (out [T, d_out], z [N, h1]); only z (the pre-activation) is kept for backward: the
# dispatched rows are gathered from x again and the expert outputs are never needed (the gate-weight
# gradient is <g W2^T, act(z)>), so the layer keeps one [N, h1] tensor where the three composed ops
# keep x dispatched [N, d], z and the expert outputs [N, d_out].
@custom_op("moe_mlp", mutates_args=())
def _moe_mlp(x: Tensor, weights: Tensor, slots: Tensor, sources: Tensor, offsets: Tensor, w1: Tensor,
             w2: Tensor, b1: Optional[Tensor], b2: Optional[Tensor], activation: str,
             backend: str) -> tuple[Tensor, Tensor]:
    out, z = run(backend, "moe_mlp", x, weights, slots, sources, offsets, w1, w2, b1, b2, activation)
    return out, z


@_moe_mlp.register_fake
def _(x, weights, slots, sources, offsets, w1, w2, b1, b2, activation, backend):
    return x.new_empty(x.shape[0], w2.shape[2]), x.new_empty(sources.shape[0], w1.shape[2])


@custom_op("moe_mlp_backward", mutates_args=())
def _moe_mlp_backward(grad_out: Tensor, x: Tensor, z: Tensor, weights: Tensor, slots: Tensor, sources: Tensor,
                      offsets: Tensor, w1: Tensor, w2: Tensor, b1: Optional[Tensor], b2: Optional[Tensor],
                      activation: str, need_x: bool, need_weights: bool, need_params: bool,
                      backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    gx, gwt, gw1, gw2, gb1, gb2 = run(backend, "moe_mlp_backward", grad_out, x, z, weights, slots, sources,
                                      offsets, w1, w2, b1, b2, activation, need_x, need_weights, need_params)
    return (_empty_if_none(gx, x), _empty_if_none(gwt, weights), _empty_if_none(gw1, w1),
            _empty_if_none(gw2, w2), _empty_if_none(gb1, w1), _empty_if_none(gb2, w2))


@_moe_mlp_backward.register_fake
def _(grad_out, x, z, weights, slots, sources, offsets, w1, w2, b1, b2, activation, need_x, need_weights,
      need_params, backend):
    def like(t, need):
        return torch.empty_like(t) if need and t is not None else x.new_empty(0)
    return (like(x, need_x), like(weights, need_weights), like(w1, need_params), like(w2, need_params),
            like(b1, need_params), like(b2, need_params))


def _moe_mlp_setup(ctx, inputs, output):
    x, weights, slots, sources, offsets, w1, w2, b1, b2, activation, backend = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, output[1], weights, slots, sources, offsets, w1, w2, b1, b2)
    ctx.opts = (activation,)
    ctx.backend = backend


def _moe_mlp_autograd(ctx, grad, _grad_z):
    x, z, weights, slots, sources, offsets, w1, w2, b1, b2 = ctx.saved_tensors
    nx, nw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    npar = any(ctx.needs_input_grad[5:9])
    gx, gwt, gw1, gw2, gb1, gb2 = _moe_mlp_backward(grad.contiguous(), x, z, weights, slots, sources, offsets,
                                                    w1, w2, b1, b2, *ctx.opts, nx, nw, npar, ctx.backend)
    return (gx if nx else None, gwt if nw else None, None, None, None,
            gw1 if npar else None, gw2 if npar else None,
            gb1 if npar and b1 is not None else None, gb2 if npar and b2 is not None else None, None, None)


_moe_mlp.register_autograd(_moe_mlp_autograd, setup_context=_moe_mlp_setup)


# ---------------------------------------------------------------- public API

def _check_offsets_meta(offsets: Tensor, num_experts: int, op: str, ref: Tensor) -> None:
    check_tensor(offsets, op, "offsets", ndim=1, dtypes=(torch.int32,))
    check(offsets.shape[0] == num_experts + 1, op, "offsets",
          f"must have E+1={num_experts + 1} entries for E={num_experts} experts, got {offsets.shape[0]}")
    check_same_device(op, "x", ref, offsets=offsets)


def grouped_gemm(x: Tensor, offsets: Tensor, w: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Per-expert GEMM over row segments: ``out[offsets[e]:offsets[e+1]] = x[...] @ w[e]``.

    Args:
        x: ``[N, a]`` rows grouped by expert.
        offsets: ``[E + 1]`` int32, ``offsets[0] == 0``, non-decreasing, ``offsets[E] <= N``.
        w: ``[E, a, b]``, same dtype and device as ``x``; contiguous, or the ``transpose(1, 2)``
            of a contiguous ``[E, b, a]`` (used in place; its gradient gets the same layout).

    Returns:
        ``[N, b]`` in ``x.dtype``; rows past ``offsets[E]`` are zero.
    """
    op = "grouped_gemm"
    check_tensor(x, op, "x", ndim=2, dtypes=FLOAT_DTYPES)
    _check_weight(w, op, "w")
    check(w.dtype == x.dtype, op, "w", f"must have the dtype of x ({x.dtype}), got {w.dtype}")
    check(w.shape[1] == x.shape[1], op, "w",
          f"must have shape [E, a, b] with a={x.shape[1]} (columns of x), got {tuple(w.shape)}")
    check_same_device(op, "x", x, w=w)
    _check_offsets_meta(offsets, w.shape[0], op, x)
    return _grouped_gemm(x, offsets, w, resolve(op, x.device, backend))


def _check_mlp(op, x, w1, w2, b1, b2, activation):
    check_tensor(x, op, "x", ndim=2, dtypes=FLOAT_DTYPES)
    check_choice(activation, op, "activation", ACTIVATIONS)
    _check_weight(w1, op, "w1")
    _check_weight(w2, op, "w2")
    E, d = w1.shape[0], x.shape[1]
    h = w2.shape[1]
    h1 = 2 * h if activation == "swiglu" else h
    check(tuple(w1.shape) == (E, d, h1), op, "w1",
          f"must have shape [E, d, {'2h' if activation == 'swiglu' else 'h'}]={(E, d, h1)} "
          f"(d from x, h from w2), got {tuple(w1.shape)}")
    check(w2.shape[0] == E, op, "w2", f"must have E={E} experts like w1, got {tuple(w2.shape)}")
    for name, t, n in (("b1", b1, h1), ("b2", b2, w2.shape[2])):
        if t is not None:
            check_tensor(t, op, name, ndim=2, dtypes=FLOAT_DTYPES)
            check(tuple(t.shape) == (E, n), op, name, f"must have shape {(E, n)}, got {tuple(t.shape)}")
    for name, t in (("w1", w1), ("w2", w2), ("b1", b1), ("b2", b2)):
        if t is not None:
            check(t.dtype == x.dtype, op, name, f"must have the dtype of x ({x.dtype}), got {t.dtype}")
    check_same_device(op, "x", x, w1=w1, w2=w2, b1=b1, b2=b2)


def grouped_mlp(x: Tensor, offsets: Tensor, w1: Tensor, w2: Tensor, activation: str = "gelu",
                b1: Optional[Tensor] = None, b2: Optional[Tensor] = None, *,
                backend: Optional[str] = None) -> Tensor:
    """Per-expert MLP over row segments: ``act(x_e @ w1[e] + b1[e]) @ w2[e] + b2[e]``.

    Args:
        x: ``[N, d]`` rows grouped by expert; ``offsets`` as in :func:`grouped_gemm`.
        w1: ``[E, d, h]`` (``[E, d, 2h]`` for ``"swiglu"``: ``silu(z[:, :h]) * z[:, h:]``).
        w2: ``[E, h, d_out]``; b1 ``[E, h or 2h]`` and b2 ``[E, d_out]`` optional. ``w1`` and
            ``w2`` may also be ``transpose(1, 2)`` views of contiguous tensors (Hugging Face's
            ``[E, out, in]`` expert weights), read in place.
        activation: ``"gelu"`` (exact, erf), ``"relu"``, ``"silu"`` or ``"swiglu"``.

    Returns:
        ``[N, d_out]``. One autograd node; it keeps the pre-activation ``x @ w1 + b1`` for backward
        and recomputes only the elementwise activation there (6 GEMMs, as a dense MLP).
    """
    op = "grouped_mlp"
    _check_mlp(op, x, w1, w2, b1, b2, activation)
    _check_offsets_meta(offsets, w1.shape[0], op, x)
    return _grouped_mlp(x, offsets, w1, w2, b1, b2, activation, resolve(op, x.device, backend))[0]


def moe_mlp(x: Tensor, routing: Routing, w1: Tensor, w2: Tensor, activation: str = "gelu",
            b1: Optional[Tensor] = None, b2: Optional[Tensor] = None, *,
            backend: Optional[str] = None) -> Tensor:
    """The whole expert layer: dispatch -> grouped MLP -> combine with ``routing.topk_weights``.

    ``x`` is ``[T, d]``; returns ``[T, d_out]``. The reference composes the three ops; the ``cpu``
    backend gathers each expert's rows into per-thread scratch right before its first GEMM and
    combines from the expert outputs in one pass.

    One autograd node that keeps only the pre-activation ``z`` ``[N, h]`` (plus ``x``, the plan and
    the weights, which exist anyway): backward gathers ``x`` again per expert and computes the
    gate-weight gradient as ``<g W2^T, act(z)>``, so neither the dispatched rows nor the expert
    outputs (``[N, d]`` each) are kept. The output equals the composition ``combine(grouped_mlp(
    dispatch(x)))`` exactly; gradients agree with it to the rounding of the reordered products.
    """
    op = "moe_mlp"
    _check_mlp(op, x, w1, w2, b1, b2, activation)
    _check_routing(routing, op, x, "x")
    check(routing.num_experts == w1.shape[0], op, "w1",
          f"has {w1.shape[0]} experts but the routing has {routing.num_experts}")
    check(x.shape[0] == routing.num_tokens, op, "x",
          f"has {x.shape[0]} rows but the routing was built for {routing.num_tokens} tokens")
    w = routing.topk_weights
    check_tensor(w, op, "routing.topk_weights", ndim=2, dtypes=FLOAT_DTYPES)
    check(tuple(w.shape) == tuple(routing.slots.shape), op, "routing.topk_weights",
          f"must have shape [T, k]={tuple(routing.slots.shape)} like routing.slots, got {tuple(w.shape)}")
    check_same_device(op, "x", x, **{"routing.topk_weights": w})
    return _moe_mlp(x, w, routing.slots, routing.sources, routing.offsets, w1, w2, b1, b2, activation,
                    resolve(op, x.device, backend))[0]
