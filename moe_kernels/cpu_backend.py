"""The ``cpu`` backend's kernel table: compiled C++ kernels (csrc/cpu/) behind the op names.

Ops without a native kernel yet are absent, so automatic choice uses the reference for them (see
:mod:`moe_kernels.backends`); a backward whose forward is native is always present, here the
reference formula where it is already one ATen pass (``route_backward``).
"""

from __future__ import annotations

from .reference import routing as _ref_routing


def make_kernels(ext) -> dict:
    def route(logits, k, score, renormalize, capacity, drop_policy, pad_to, num_rows):
        return tuple(ext.route_fwd(logits, k, score, renormalize, capacity, drop_policy, pad_to, num_rows))

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

    return {
        "route": route,
        "route_backward": _ref_routing.route_bwd,
        "dispatch": ext.dispatch_fwd,
        "dispatch_backward": ext.dispatch_bwd,
        "combine": ext.combine_fwd,
        "combine_backward": combine_backward,
        "grouped_gemm": ext.grouped_gemm_fwd,
        "grouped_gemm_backward": grouped_gemm_backward,
        "grouped_mlp": grouped_mlp,
        "grouped_mlp_backward": grouped_mlp_backward,
    }
