"""Detached reconciliation fusion: ``reconcile(main, aux, weights, bias, activation)``."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .._validation import FLOAT_DTYPES, check, check_choice, check_same_device, check_tensor, fail
from ..backends import get_kernel, resolve
from ..reference.reconcile import RECONCILE_ACTIVATIONS


@torch.library.custom_op("moe_kernels::reconcile", mutates_args=())
def _reconcile(main: Tensor, aux: list[Tensor], weights: list[Tensor], bias: list[Tensor],
               activation: str, backend: str) -> Tensor:
    return get_kernel(backend, "reconcile")(main, aux, weights, bias, activation)


@_reconcile.register_fake
def _(main, aux, weights, bias, activation, backend):
    return torch.empty_like(main)


@torch.library.custom_op("moe_kernels::reconcile_backward", mutates_args=())
def _reconcile_backward(grad_out: Tensor, aux: list[Tensor], weights: list[Tensor],
                        bias: list[Tensor], activation: str,
                        backend: str) -> tuple[list[Tensor], list[Tensor]]:
    gws, gbs = get_kernel(backend, "reconcile_backward")(grad_out, aux, weights, bias, activation)
    return list(gws), list(gbs)


@_reconcile_backward.register_fake
def _(grad_out, aux, weights, bias, activation, backend):
    return [torch.empty_like(w) for w in weights], [torch.empty_like(b) for b in bias]


def _rec_setup(ctx, inputs, output):
    main, aux, weights, bias, activation, backend = inputs
    ctx.save_for_backward(*aux, *weights, *bias)
    ctx.sizes = (len(aux), len(bias))
    ctx.opts = (activation, backend)


def _rec_bwd(ctx, grad):
    n, nb = ctx.sizes
    saved = ctx.saved_tensors
    aux, weights, bias = list(saved[:n]), list(saved[n:2 * n]), list(saved[2 * n:2 * n + nb])
    gws, gbs = _reconcile_backward(grad.contiguous(), aux, weights, bias, *ctx.opts)
    # main gets the incoming gradient unchanged; the aux inputs get none (stop-gradient)
    return grad, [None] * n, list(gws), list(gbs), None, None


_reconcile.register_autograd(_rec_bwd, setup_context=_rec_setup)


def reconcile(main: Tensor, aux: Sequence[Tensor], weights: Sequence[Tensor],
              bias: Optional[Sequence[Tensor]] = None, activation: Optional[str] = None, *,
              backend: Optional[str] = None) -> Tensor:
    """Detached reconciliation: ``main + sum_i act(stopgrad(aux[i]) @ weights[i] + bias[i])``.

    The channel dimension is the last one: token tensors ``[N, C]`` or channels-last maps
    ``[B, H, W, C]`` (for an NCHW tensor in ``channels_last`` memory format pass
    ``t.permute(0, 2, 3, 1)``, which is contiguous). A 1x1 convolution is this matmul.

    Args:
        main: ``[..., C]`` the branch being fused into; receives the incoming gradient.
        aux: list of ``[..., C_i]`` features of other branches (same leading dims as ``main``);
            they are treated as detached and receive no gradient.
        weights: list of ``[C_i, C]`` link weights (the transpose of a 1x1 conv weight).
        bias: optional list of ``[C]`` link biases.
        activation: ``None``/``"none"``, ``"relu"``, ``"gelu"`` or ``"silu"`` per link.

    Returns:
        A new tensor shaped like ``main``. With an empty ``aux`` list it is a copy of ``main``.
    """
    op = "reconcile"
    act = "none" if activation is None else activation
    check_choice(act, op, "activation", RECONCILE_ACTIVATIONS)
    check_tensor(main, op, "main", ndim=range(1, 9), dtypes=FLOAT_DTYPES)
    check(main.dim() >= 2, op, "main", f"must be [N, C] or [..., C], got shape {tuple(main.shape)}")
    aux, weights = list(aux), list(weights)
    bias = None if bias is None else list(bias)
    check(len(weights) == len(aux), op, "weights",
          f"must have one entry per aux input ({len(aux)}), got {len(weights)}")
    if bias is not None:
        check(len(bias) == len(aux), op, "bias", f"must have one entry per aux input ({len(aux)}), "
                                                  f"got {len(bias)}")
    C, lead = main.shape[-1], tuple(main.shape[:-1])
    for i, (a, w) in enumerate(zip(aux, weights)):
        check_tensor(a, op, f"aux[{i}]", dtypes=FLOAT_DTYPES)
        check_tensor(w, op, f"weights[{i}]", ndim=2, dtypes=FLOAT_DTYPES)
        if tuple(a.shape[:-1]) != lead:
            fail(op, f"aux[{i}]", f"must have the leading dims of main {lead}, got {tuple(a.shape)}")
        if tuple(w.shape) != (a.shape[-1], C):
            fail(op, f"weights[{i}]", f"must have shape [C_in, C_out]={(a.shape[-1], C)}, "
                                      f"got {tuple(w.shape)}")
        for name, t in ((f"aux[{i}]", a), (f"weights[{i}]", w)):
            check(t.dtype == main.dtype, op, name, f"must have the dtype of main ({main.dtype}), "
                                                   f"got {t.dtype}")
        check_same_device(op, "main", main, **{f"aux[{i}]": a, f"weights[{i}]": w})
        if bias is not None:
            b = bias[i]
            check_tensor(b, op, f"bias[{i}]", ndim=1, dtypes=(main.dtype,))
            check(b.shape[0] == C, op, f"bias[{i}]", f"must have shape [{C}], got {tuple(b.shape)}")
            check_same_device(op, "main", main, **{f"bias[{i}]": b})
    name = resolve(op, main.device, backend)
    # stop-gradient on the aux inputs is part of the op's contract: detach here so autograd never
    # tracks them, whatever the backend.
    return _reconcile(main, [a.detach() for a in aux], weights, bias or [], act, name)
