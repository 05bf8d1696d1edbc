"""triton kernels for dispatch, combine and their backward.

``dispatch`` copies rows (bit for bit) into the expert-grouped buffer, one program per block of
rows; ``dispatch_backward`` and ``combine`` are gather-sums over each token's k slots in slot order
(fp32, fp64 for fp64 data), one program per block of tokens and columns: nothing is scattered into
with atomics, so the results are deterministic and equal the reference's sums. ``combine_backward``
writes each kept row of the row gradient once (slots are distinct) and the gate-weight gradient
as a dot product per assignment.
"""

from __future__ import annotations

import torch

from ._common import cdiv, interpreting, is_fp64, pow2


def _jit():
    from . import _permute_jit

    return _permute_jit


def _tiles(rows: int, D: int) -> tuple:
    """(rows, columns) of a program's tile: up to 16384 elements interpreted (few programs), 4096
    on a GPU, columns up to 256 (vectorised rows)."""
    BD = min(pow2(D), 256)
    cap = 16384 if interpreting() else 4096
    return max(1, min(pow2(rows), 64, cap // BD)), BD


def dispatch(x, slots, sources):
    N, D = sources.shape[0], x.shape[1]
    out = torch.empty(N, D, dtype=x.dtype, device=x.device)
    if N == 0 or D == 0:
        return out
    if x.shape[0] == 0:  # then every row is padding
        return out.zero_()
    BR, BD = _tiles(N, D)
    _jit()._dispatch_kernel[(cdiv(N, BR),)](x, sources, out, N, D, BR=BR, BD=BD)
    return out


def _gather_sum(y, weights, slots, out_dtype):
    T, k = slots.shape
    D = y.shape[1]
    out = torch.empty(T, D, dtype=out_dtype, device=y.device)
    if T == 0 or D == 0:
        return out
    BT, BD = _tiles(T, D)
    _jit()._gather_sum_kernel[(cdiv(T, BT), cdiv(D, BD))](
        y, weights if weights is not None else y, slots, out, T, D, K=k, BT=BT, BD=BD,
        WEIGHTED=weights is not None, FP64=is_fp64(y))
    return out


def dispatch_backward(grad_out, slots):
    return _gather_sum(grad_out, None, slots, grad_out.dtype)


def combine(y, weights, slots):
    return _gather_sum(y, weights, slots, y.dtype)


def combine_backward(grad_out, y, weights, slots, need_y, need_weights):
    T, k = slots.shape
    D = y.shape[1]
    gy = torch.zeros_like(y) if need_y else None
    gw = torch.empty_like(weights) if need_weights else None
    if (need_y or need_weights) and T > 0:
        if D == 0:
            if need_weights:
                gw.zero_()
            return gy, gw
        BT, BD = _tiles(T, D)
        _jit()._combine_bwd_kernel[(cdiv(T, BT),)](
            grad_out, y, weights, slots, gy if need_y else y, gw if need_weights else weights, T, D,
            K=k, BT=BT, BD=BD, NEED_Y=bool(need_y), NEED_W=bool(need_weights), FP64=is_fp64(y))
    return gy, gw
