"""triton kernels for reconcile and its backward.

Forward, plain links (one launch, ``_fwd_kernel`` PHASE 0): a program owns a ``[BM, BN]`` tile of
the output and, for every link in order (the links are passed as tuples of tensors and unrolled),
runs the GEMM ``aux_i @ W_i`` over ``C_i`` in fp32 (``tl.dot``; fp32 inputs with
``input_precision="ieee"`` unless TF32 is asked for, see ``set_fp32_precision``; fp64 by
elementwise products summed per chunk), rounds it to the dtype as a GEMM's output is, adds the bias and applies the activation in fp32 (fp64), and sums the links onto ``main`` in
the epilogue; the output is rounded once. Nothing of the output's size but the output is written.

Forward with ``batch_norm`` (three launches): PHASE 1 writes each link's rounded GEMM output into
an ``[L, N, C]`` scratch and, per row tile, the column mean and sum of squared deviations of
``z + b``; ``_bn_stats_kernel`` merges the tiles' partials in tile order (Chan's pairwise update,
no ``sum z^2 - N mean^2`` cancellation) into ``stats [L, 3, C]`` = (mean, ``1 / sqrt(var + eps)``,
biased var), as the reference defines them; PHASE 2 normalises the scratch, applies the affine
parameters and the activation and sums onto ``main``.

Backward, per link: ``_bwd_gz_kernel`` recomputes ``z = aux @ W`` per tile (not for a plain
identity link, whose ``gz`` is the incoming gradient) and writes ``gz`` (plain) or ``z`` (BN) in
the dtype into an ``[N, C]`` scratch, with per-tile column partials (the bias gradient; ``sum gu``
and ``sum gu * xhat`` for BN); ``_colsum_kernel`` adds them in tile order into ``grad_bias``,
``grad_bn_bias`` and ``grad_bn_weight``; for BN ``_bn_gz_kernel`` turns ``z`` into ``gz`` in place;
``_wgrad_kernel`` computes ``aux^T @ gz`` with one program per ``[BM, BN]`` tile of ``grad_W``
looping over every row in order (written with ``W``'s strides: a transposed conv-weight view gets a
gradient of the same layout). The bias of a BN link gets zeros (the batch mean cancels it). No
atomics anywhere: every reduction has a fixed order, so results are bitwise deterministic.
"""

from __future__ import annotations

import torch

from ._common import acc_dtype, cdiv, fp32_precision, interpreting, is_fp64, pow2

_ACTS = {"none": 0, "relu": 1, "gelu": 2, "silu": 3}


def _jit():
    from . import _reconcile_jit

    return _reconcile_jit


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _modes(dtype: torch.dtype) -> dict:
    fp64 = dtype == torch.float64
    return dict(FP64=fp64, UPCAST=interpreting() and not fp64, F32=dtype == torch.float32, PREC=fp32_precision())


def _tiles(N: int, C: int, K: int, fp64: bool) -> tuple:
    """(BM, BN, BK) of a GEMM tile: tl.dot needs 16 at least; fp64's elementwise [BM, BK, BN]
    products are kept small on a GPU; interpreted, few large programs."""
    if interpreting():
        return (max(16, min(64, pow2(N))), max(16, min(64, pow2(C))), max(16, min(16 if fp64 else 64, pow2(K))))
    if fp64:
        return 32, 32, 8
    return 64, max(16, min(64, pow2(C))), max(16, min(32, pow2(K)))


def reconcile(main, aux, weights, bias, activation, batch_norm, bn_weight, bn_bias, eps):
    ref = main if main is not None else aux[0]
    dev = ref.device
    C = weights[0].shape[1] if main is None else main.shape[-1]
    lead = tuple(ref.shape[:-1])
    adt = acc_dtype(ref.dtype)
    out_dtype = ref.dtype if main is not None else weights[0].dtype
    L = len(aux)
    stats = torch.empty(L if batch_norm else 0, 3, C, dtype=adt, device=dev)
    a2 = [_flat(a) for a in aux]
    N = a2[0].shape[0] if L else _flat(main).shape[0]
    if L == 0:
        return _flat(main).to(out_dtype, copy=True).view(*lead, C), stats
    out = torch.empty(N, C, dtype=out_dtype, device=dev)
    if N == 0 or C == 0:
        return out.view(*lead, C), stats
    m = _flat(main) if main is not None else out
    ks = tuple(int(a.shape[1]) for a in a2)
    BM, BN, BK = _tiles(N, C, max(ks), is_fp64(ref))
    grid = (cdiv(N, BM), cdiv(C, BN))
    common = dict(aux=tuple(a2), ws=tuple(weights), bs=tuple(bias) if bias else tuple(weights),
                  wks=tuple(int(w.stride(0)) for w in weights), wcs=tuple(int(w.stride(1)) for w in weights),
                  ks=ks, N=N, C=C, L=L, HAS_MAIN=main is not None, HAS_BIAS=bool(bias), ACT=_ACTS[activation],
                  HAS_GAMMA=bn_weight is not None, HAS_BETA=bn_bias is not None, BM=BM, BN=BN, BK=BK,
                  **_modes(ref.dtype))
    J = _jit()
    gamma = bn_weight if bn_weight is not None else out
    beta = bn_bias if bn_bias is not None else out
    if not batch_norm:
        J._fwd_kernel[grid](m, out, out, out, out, gamma, beta, PHASE=0, **common)
        return out.view(*lead, C), stats
    zbuf = torch.empty(L, N, C, dtype=out_dtype, device=dev)
    part = torch.empty(L, grid[0], 2, C, dtype=adt, device=dev)
    J._fwd_kernel[grid](m, out, zbuf, part, stats, gamma, beta, PHASE=1, **common)
    BC = min(pow2(C), 1024 if interpreting() else 128)
    J._bn_stats_kernel[(L, cdiv(C, BC))](part, stats, N, C, grid[0], float(eps), BMT=BM, BC=BC, FP64=is_fp64(ref))
    J._fwd_kernel[grid](m, out, zbuf, part, stats, gamma, beta, PHASE=2, **common)
    return out.view(*lead, C), stats


def reconcile_backward(grad_out, aux, weights, bias, activation, batch_norm, bn_weight, bn_bias, stats):
    g = _flat(grad_out)
    N, C = g.shape
    L = len(aux)
    dev = g.device
    adt = acc_dtype(g.dtype)
    with_gamma, with_beta = batch_norm and bn_weight is not None, batch_norm and bn_bias is not None
    ggamma = torch.empty(L, C, dtype=bn_weight.dtype, device=dev) if with_gamma else None
    gbeta = torch.empty(L, C, dtype=bn_bias.dtype, device=dev) if with_beta else None
    gws = [torch.empty_like(w) for w in weights]  # dense: keeps W's strides (a transposed view's too)
    gbs = [torch.zeros_like(b) if batch_norm else torch.empty_like(b) for b in (bias or [])]
    if N == 0 or C == 0:
        for t in gws + gbs + [x for x in (ggamma, gbeta) if x is not None]:
            t.zero_()
        return gws, gbs, ggamma, gbeta
    J = _jit()
    act = _ACTS[activation]
    modes = _modes(g.dtype)
    fp64 = is_fp64(g)
    need_z = batch_norm or act != 0
    has_bias = bool(bias)
    scratch = torch.empty(N, C, dtype=weights[0].dtype if L else g.dtype, device=dev) if need_z else None
    BCS = min(pow2(C), 1024 if interpreting() else 128)
    for i, (a, w) in enumerate(zip(aux, weights)):
        a2 = _flat(a)
        K = a2.shape[1]
        BM, BN, BK = _tiles(N, C, K, fp64)
        grid = (cdiv(N, BM), cdiv(C, BN))
        b = bias[i] if has_bias else g
        if need_z or has_bias:
            part = torch.empty(grid[0], 2, C, dtype=adt, device=dev)
            sums = torch.empty(2, C, dtype=adt, device=dev)
            J._bwd_gz_kernel[grid](
                g, a2, w, b, stats if batch_norm else g, bn_weight if bn_weight is not None else g,
                bn_bias if bn_bias is not None else g, scratch if need_z else g, part, N, C, K, w.stride(0),
                w.stride(1), i, ACT=act, BN_MODE=bool(batch_norm), HAS_BIAS=has_bias, HAS_GAMMA=bn_weight is not None,
                HAS_BETA=bn_bias is not None, NEED_Z=need_z, STORE=need_z, BM=BM, BN=BN, BK=BK, **modes)
            if batch_norm or has_bias:
                J._colsum_kernel[(cdiv(C, BCS),)](
                    part, sums, gbs[i] if has_bias and not batch_norm else sums,
                    ggamma if with_gamma else sums, gbeta if with_beta else sums, C, grid[0], i,
                    NS=2 if batch_norm else 1, BC=BCS, FP64=fp64, HAS_GB=has_bias and not batch_norm,
                    HAS_GAMMA=with_gamma, HAS_BETA=with_beta)
            if batch_norm:
                J._bn_gz_kernel[grid](g, b, stats, bn_weight if bn_weight is not None else g,
                                      bn_bias if bn_bias is not None else g, sums, scratch, N, C, i, ACT=act,
                                      HAS_BIAS=has_bias, HAS_GAMMA=bn_weight is not None,
                                      HAS_BETA=bn_bias is not None, BM=BM, BN=BN, FP64=fp64)
        gz = scratch if need_z else g
        WM, WN, WK = _tiles(K, C, N, fp64)
        J._wgrad_kernel[(cdiv(K, WM), cdiv(C, WN))](a2, gz, gws[i], N, K, C, gws[i].stride(0), gws[i].stride(1),
                                                    BM=WM, BN=WN, BK=WK, **modes)
    return gws, gbs, ggamma, gbeta
