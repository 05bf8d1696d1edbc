"""The ``cpu`` backend's kernel table: compiled C++ kernels (csrc/cpu/) behind the op names.

Ops without a native kernel yet (the mutual-information losses) are absent, so automatic choice
uses the reference for them (see :mod:`moe_kernels.backends`); a backward whose forward is native is
always present. ``reconcile`` in fp64 (gradcheck) runs the reference formulas.
"""

from __future__ import annotations

import torch

from ._validation import check_finite
from .reference import reconcile as ref_reconcile

_RECONCILE_NATIVE = (torch.float32, torch.bfloat16, torch.float16)


def _ext_or_none():
    from ._ext import load_cpu

    return load_cpu()[0]


def workspace_bytes() -> int:
    """Bytes held by the cpu kernels' buffer pool, idle or in use (0 when the backend is not built).

    The fused ``moe_mlp`` takes its large buffers (the saved pre-activation, scratch and the expert
    weight gradients) from a pool that reuses a buffer once nothing else references it, so steps do
    not pay first-touch page faults on fresh memory. The pool keeps its idle buffers between steps
    (as ``zero_grad(set_to_none=False)`` keeps gradients); :func:`empty_cache` frees them and
    ``MOE_KERNELS_CPU_WORKSPACE=0`` turns the pool off.
    """
    ext = _ext_or_none()
    return int(ext.workspace_bytes()) if ext is not None else 0


def empty_cache() -> int:
    """Free the pool's idle buffers (those nothing else references); returns the bytes freed."""
    ext = _ext_or_none()
    return int(ext.workspace_release()) if ext is not None else 0


def make_kernels(ext) -> dict:
    def route(logits, k, score, renormalize, capacity, drop_policy, pad_to, num_rows):
        *outs, finite = ext.route_fwd(logits, k, score, renormalize, capacity, drop_policy, pad_to, num_rows)
        if not bool(finite):
            check_finite(logits, "route", "logits")  # raises the error naming the argument
        return tuple(outs)

    route.checks_finite = True  # the C++ pass checks the logits while reading them

    def task_route(x, router_weight, task_ids, batch_task, k, score, renormalize, capacity, drop_policy,
                   pad_to, num_rows):
        *outs, finite = ext.task_route_fwd(x, router_weight, task_ids, batch_task, k, score, renormalize,
                                           capacity, drop_policy, pad_to, num_rows)
        if not bool(finite):  # non-finite logits: name the input that made them
            check_finite(x, "task_route", "x")
            check_finite(outs[0], "task_route", "router_weight (the router logits x @ router_weight)")
        return tuple(outs)

    task_route.checks_finite = True

    def combine_backward(grad_out, y, weights, slots, need_y, need_w):
        gy, gw = ext.combine_bwd(grad_out, y, weights, slots, need_y, need_w)
        return (gy if need_y else None), (gw if need_w else None)

    def grouped_gemm_backward(grad_out, x, offsets, w, need_x, need_w):
        gx, gw = ext.grouped_gemm_bwd(grad_out, x, offsets, w, need_x, need_w)
        return (gx if need_x else None), (gw if need_w else None)

    def grouped_mlp(x, offsets, w1, w2, b1, b2, activation):
        return tuple(ext.grouped_mlp_fwd(x, offsets, w1, w2, b1, b2, activation))

    def grouped_mlp_backward(grad_out, x, z, offsets, w1, w2, b1, b2, activation):
        gx, gw1, gw2, gb1, gb2 = ext.grouped_mlp_bwd(grad_out, x, z, offsets, w1, w2, b1, b2, activation)
        return gx, gw1, gw2, (gb1 if b1 is not None else None), (gb2 if b2 is not None else None)

    def moe_mlp(x, weights, slots, sources, offsets, w1, w2, b1, b2, activation):
        return tuple(ext.moe_mlp_fwd(x, weights, slots, sources, offsets, w1, w2, b1, b2, activation))

    def moe_mlp_backward(grad_out, x, z, weights, slots, sources, offsets, w1, w2, b1, b2, activation, need_x,
                         need_weights, need_params):
        return tuple(ext.moe_mlp_bwd(grad_out, x, z, weights, slots, sources, offsets, w1, w2, b1, b2, activation,
                                     need_x, need_weights, need_params))  # undefined -> None

    def reconcile(main, aux, weights, bias, activation, batch_norm=False, bn_weight=None, bn_bias=None,
                  eps=1e-5):
        if (main if main is not None else aux[0]).dtype not in _RECONCILE_NATIVE:
            return ref_reconcile.reconcile_fwd(main, aux, weights, bias, activation, batch_norm, bn_weight,
                                               bn_bias, eps)
        return tuple(ext.reconcile_fwd(main, aux, weights, bias, activation, batch_norm, bn_weight, bn_bias,
                                       eps))

    def reconcile_backward(grad_out, aux, weights, bias, activation, batch_norm=False, bn_weight=None,
                           bn_bias=None, stats=None):
        if grad_out.dtype not in _RECONCILE_NATIVE:
            return ref_reconcile.reconcile_bwd(grad_out, aux, weights, bias, activation, batch_norm,
                                               bn_weight, bn_bias, stats)
        return tuple(ext.reconcile_bwd(grad_out, aux, weights, bias, activation, batch_norm, bn_weight,
                                       bn_bias, stats))

    return {
        "route": route,
        "route_backward": ext.route_bwd,
        "task_route": task_route,
        "task_route_backward": lambda *a: tuple(ext.task_route_bwd(*a)),
        "load_balancing_loss": ext.load_balancing_fwd,
        "load_balancing_loss_backward": ext.load_balancing_bwd,
        "z_loss": ext.z_loss_fwd,
        "z_loss_backward": ext.z_loss_bwd,
        "dispatch": ext.dispatch_fwd,
        "dispatch_backward": ext.dispatch_bwd,
        "combine": ext.combine_fwd,
        "combine_backward": combine_backward,
        "grouped_gemm": ext.grouped_gemm_fwd,
        "grouped_gemm_backward": grouped_gemm_backward,
        "grouped_mlp": grouped_mlp,
        "grouped_mlp_backward": grouped_mlp_backward,
        "moe_mlp": moe_mlp,
        "moe_mlp_backward": moe_mlp_backward,
        "reconcile": reconcile,
        "reconcile_backward": reconcile_backward,
    }
