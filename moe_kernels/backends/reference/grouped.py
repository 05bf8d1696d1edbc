"""Reference grouped GEMM and grouped expert MLP over expert segments ``offsets`` (one autograd node each).

Rows [offsets[e], offsets[e+1]) belong to expert e; rows at and past offsets[E] produce zeros and
get zero gradient. GEMMs run in the input dtype (fp32 accumulation inside ATen for bf16/fp16);
activations use ATen's fused kernels (fp32 internal math for bf16/fp16).
The grouped MLP keeps its pre-activation z = x @ w1 + b1 ([N, h] or [N, 2h]) for backward, which
recomputes only the cheap elementwise act(z): 6 GEMMs like a dense MLP, and one saved [N, h] tensor
where a dense MLP under autograd keeps two (z and act(z)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._util import up

ACTIVATIONS = ("gelu", "relu", "silu", "swiglu")


def segments(offsets: torch.Tensor):
    o = offsets.tolist()
    return [(e, o[e], o[e + 1]) for e in range(len(o) - 1) if o[e + 1] > o[e]]


# ---- activations: forward and derivative ----
# ATen's fused kernels compute exactly these formulas (gelu: exact erf form, 0.5 z (1 + erf(z/√2));
# silu: z σ(z)) with fp32 internal math for bf16/fp16, in one pass over the data.

def act_fwd(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu":
        return F.gelu(z)
    if activation == "relu":
        return F.relu(z)
    if activation == "silu":
        return F.silu(z)
    if activation == "swiglu":  # silu(gate) * up, gate = first half of the columns
        a, b = z.chunk(2, dim=-1)
        return F.silu(a) * b
    if activation == "none":
        return z
    raise ValueError(f"unknown activation {activation!r}")


def act_bwd(z: torch.Tensor, grad_h: torch.Tensor, activation: str) -> torch.Tensor:
    """d loss / d z given d loss / d act(z)."""
    g = grad_h.to(z.dtype)
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(g, z)
    if activation == "relu":
        return torch.ops.aten.threshold_backward(g, z, 0)
    if activation == "silu":
        return torch.ops.aten.silu_backward(g, z)
    if activation == "swiglu":
        a, b = z.chunk(2, dim=-1)
        return torch.cat([torch.ops.aten.silu_backward(g * b, a), g * F.silu(a)], dim=-1)
    if activation == "none":
        return g
    raise ValueError(f"unknown activation {activation!r}")


# ---- grouped GEMM ----

def grouped_gemm(x: torch.Tensor, offsets: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape[0], w.shape[2], dtype=x.dtype, device=x.device)
    for e, lo, hi in segments(offsets):
        torch.matmul(x[lo:hi], w[e], out=out[lo:hi])
    return out


def grouped_gemm_backward(grad_out: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, w: torch.Tensor,
                     need_x: bool, need_w: bool):
    gx = torch.zeros_like(x) if need_x else None
    gw = torch.zeros_like(w) if need_w else None
    for e, lo, hi in segments(offsets):
        g = grad_out[lo:hi]
        if need_x:
            torch.matmul(g, w[e].t(), out=gx[lo:hi])
        if need_w:
            torch.matmul(x[lo:hi].t(), g, out=gw[e])
    return gx, gw


# ---- grouped MLP ----

def _hidden(x_e, w1_e, b1_e):
    z = x_e @ w1_e
    if b1_e is not None:
        z = z + b1_e
    return z


def grouped_mlp(x, offsets, w1, w2, b1, b2, activation: str):
    """-> (out [N, d_out], z [N, h1]: the pre-activation, kept for backward; zero past offsets[E])."""
    out = torch.zeros(x.shape[0], w2.shape[2], dtype=x.dtype, device=x.device)
    z = torch.zeros(x.shape[0], w1.shape[2], dtype=x.dtype, device=x.device)
    for e, lo, hi in segments(offsets):
        z_e = z[lo:hi]
        z_e.copy_(_hidden(x[lo:hi], w1[e], None if b1 is None else b1[e]))
        y = out[lo:hi]
        torch.matmul(act_fwd(z_e, activation), w2[e], out=y)
        if b2 is not None:
            y += b2[e]
    return out, z


def grouped_mlp_backward(grad_out, x, z, offsets, w1, w2, b1, b2, activation: str):
    gx = torch.zeros_like(x)
    gw1, gw2 = torch.zeros_like(w1), torch.zeros_like(w2)
    gb1 = torch.zeros_like(b1) if b1 is not None else None
    gb2 = torch.zeros_like(b2) if b2 is not None else None
    for e, lo, hi in segments(offsets):
        x_e, g, z_e = x[lo:hi], grad_out[lo:hi], z[lo:hi]
        h = act_fwd(z_e, activation)  # elementwise recompute from the saved pre-activation
        torch.matmul(h.t(), g, out=gw2[e])
        if gb2 is not None:
            gb2[e] = up(g).sum(0).to(gb2.dtype)
        gz = act_bwd(z_e, g @ w2[e].t(), activation)
        torch.matmul(x_e.t(), gz, out=gw1[e])
        if gb1 is not None:
            gb1[e] = up(gz).sum(0).to(gb1.dtype)
        torch.matmul(gz, w1[e].t(), out=gx[lo:hi])
    return gx, gw1, gw2, gb1, gb2


# ---- the whole expert layer: dispatch -> grouped MLP -> combine ----

def _expert_outputs(z, offsets, w2, b2, activation):
    """The grouped MLP's output rows recomputed from its pre-activation (the forward's exact ops)."""
    y = torch.zeros(z.shape[0], w2.shape[2], dtype=z.dtype, device=z.device)
    for e, lo, hi in segments(offsets):
        torch.matmul(act_fwd(z[lo:hi], activation), w2[e], out=y[lo:hi])
        if b2 is not None:
            y[lo:hi] += b2[e]
    return y


def moe_mlp(x, weights, slots, sources, offsets, w1, w2, b1, b2, activation: str):
    """-> (out [T, d_out], z [N, h1]): combine(grouped_mlp(dispatch(x))) and the pre-activation."""
    from .permute import combine, dispatch

    y, z = grouped_mlp(dispatch(x, slots, sources), offsets, w1, w2, b1, b2, activation)
    return combine(y, weights, slots), z


def moe_mlp_backward(grad_out, x, z, weights, slots, sources, offsets, w1, w2, b1, b2, activation: str,
                need_x: bool, need_weights: bool, need_params: bool):
    """The composition's backward; the dispatched rows and expert outputs are recomputed from x and z.

    -> (gx, g_weights, gw1, gw2, gb1, gb2), None where not needed or absent.
    """
    from .permute import combine_backward, dispatch_backward, dispatch

    y = _expert_outputs(z, offsets, w2, b2, activation)
    gy, gweights = combine_backward(grad_out, y, weights, slots, True, need_weights)
    gxe, gw1, gw2, gb1, gb2 = grouped_mlp_backward(gy, dispatch(x, slots, sources), z, offsets, w1, w2, b1, b2,
                                              activation)
    gx = dispatch_backward(gxe, slots) if need_x else None
    if not need_params:
        gw1 = gw2 = gb1 = gb2 = None
    return gx, gweights, gw1, gw2, gb1, gb2
