"""The triton programs of dispatch and combine (imported on first use: this module imports triton).

Every reduction is a gather-sum in a fixed order (j = 0..k-1 over a token's slots, in fp32 or
fp64), so results are deterministic and no program ever adds into memory another one writes.
"""

import triton
import triton.language as tl

from ._jit_util import cast
from ._jit_util import up as _up


@triton.jit(do_not_specialize=["N"])
def _dispatch_kernel(x_ptr, sources_ptr, out_ptr, N, D, BR: tl.constexpr, BD: tl.constexpr):
    """out[r] = x[sources[r]] (bit copies), zero rows where sources[r] == -1."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < N
    src = tl.load(sources_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    valid = src >= 0
    r64 = rows.to(tl.int64)
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD)
        dmask = dd < D
        v = tl.load(x_ptr + src[:, None] * D + dd[None, :], mask=valid[:, None] & dmask[None, :], other=0.0)
        tl.store(out_ptr + r64[:, None] * D + dd[None, :], v, mask=rmask[:, None] & dmask[None, :])


@triton.jit(do_not_specialize=["T"])
def _gather_sum_kernel(y_ptr, w_ptr, slots_ptr, out_ptr, T, D, K: tl.constexpr, BT: tl.constexpr,
                       BD: tl.constexpr, WEIGHTED: tl.constexpr, FP64: tl.constexpr):
    """out[t] = sum_j w[t, j] * y[slots[t, j]] (WEIGHTED) or sum_j y[slots[t, j]], over j in order,
    accumulated in fp32 (fp64) from zero exactly as the reference does: a dropped slot adds 0, or
    NaN for a non-finite weight (a token with NaN weights never vanishes)."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    dmask = dd < D
    if FP64:
        acc = tl.zeros([BT, BD], dtype=tl.float64)
    else:
        acc = tl.zeros([BT, BD], dtype=tl.float32)
    for j in tl.static_range(K):
        s = tl.load(slots_ptr + r64 * K + j, mask=rmask, other=-1).to(tl.int64)
        valid = s >= 0
        m = valid[:, None] & dmask[None, :]
        row = _up(tl.load(y_ptr + s[:, None] * D + dd[None, :], mask=m, other=0.0), FP64)
        if WEIGHTED:
            w = _up(tl.load(w_ptr + r64 * K + j, mask=rmask, other=0.0), FP64)
            finite = (w == w) & (tl.abs(w) < float("inf"))
            dropped = tl.where(finite, 0.0, float("nan"))
            acc += tl.where(m, row * w[:, None], dropped[:, None])
        else:
            acc += tl.where(m, row, 0.0)
    tl.store(out_ptr + r64[:, None] * D + dd[None, :], cast(acc, out_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


@triton.jit(do_not_specialize=["T"])
def _combine_bwd_kernel(g_ptr, y_ptr, w_ptr, slots_ptr, gy_ptr, gw_ptr, T, D, K: tl.constexpr,
                        BT: tl.constexpr, BD: tl.constexpr, NEED_Y: tl.constexpr, NEED_W: tl.constexpr,
                        FP64: tl.constexpr):
    """grad_y[slots[t, j]] = g[t] * w[t, j] (each kept row written once: slots are distinct) and
    grad_w[t, j] = <y[slots[t, j]], g[t]> (0 for a dropped slot), the dot summed in a fixed order."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    for j in tl.static_range(K):
        s = tl.load(slots_ptr + r64 * K + j, mask=rmask, other=-1).to(tl.int64)
        valid = s >= 0
        w = _up(tl.load(w_ptr + r64 * K + j, mask=rmask, other=0.0), FP64)
        if FP64:
            dot = tl.zeros([BT], dtype=tl.float64)
        else:
            dot = tl.zeros([BT], dtype=tl.float32)
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD)
            dmask = dd < D
            m = valid[:, None] & dmask[None, :]
            g = _up(tl.load(g_ptr + r64[:, None] * D + dd[None, :], mask=rmask[:, None] & dmask[None, :],
                            other=0.0), FP64)
            if NEED_Y:
                tl.store(gy_ptr + s[:, None] * D + dd[None, :], cast(g * w[:, None], gy_ptr.dtype.element_ty),
                         mask=m)
            if NEED_W:
                yv = _up(tl.load(y_ptr + s[:, None] * D + dd[None, :], mask=m, other=0.0), FP64)
                dot += tl.sum(yv * g, axis=1)
        if NEED_W:
            tl.store(gw_ptr + r64 * K + j, cast(tl.where(valid, dot, 0.0), gw_ptr.dtype.element_ty), mask=rmask)
