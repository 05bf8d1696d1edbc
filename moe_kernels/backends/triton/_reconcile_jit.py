"""The triton programs of reconcile (imported on first use: this module imports triton).

The links arrive as tuples of tensors (one launch serves every link; ``tl.static_range`` unrolls
them). Reductions over the rows (BatchNorm statistics, bias and BN-affine gradients, the weight
gradient) are fixed-order: per-tile partials into a buffer and one program per column block adding
them in tile order, or one program looping over every row in order (the weight gradient). No
atomics. Loads are masked and row offsets are int64.
"""

import triton
import triton.language as tl

from ._jit_util import cast
from ._jit_util import up as _up
from ._jit_util import zeros as _zeros

# pi as the sum of two fp32 literals (a literal is fp32): exact to about 1e-15 in fp64
_PI_HI = tl.constexpr(3.1415927410125732)
_PI_LO = tl.constexpr(-8.742278012618954e-08)


@triton.jit
def _sqrt(x, FP64: tl.constexpr):
    """The correctly rounded square root (tl.sqrt_rn is fp32 only; fp64 sqrt is exact anyway)."""
    if FP64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _gelu_consts(FP64: tl.constexpr):
    """(sqrt(2), sqrt(2 pi)) in the accumulation dtype."""
    if FP64:
        two = tl.full([1], 2.0, dtype=tl.float64)
        pi = tl.full([1], _PI_HI, dtype=tl.float64) + tl.full([1], _PI_LO, dtype=tl.float64)
    else:
        two = tl.full([1], 2.0, dtype=tl.float32)
        pi = tl.full([1], _PI_HI, dtype=tl.float32)
    return _sqrt(two, FP64), _sqrt(two * pi, FP64)


@triton.jit
def _act(z, ACT: tl.constexpr, FP64: tl.constexpr):
    """ACT 0: identity, 1: relu, 2: gelu (erf form, F.gelu's default), 3: silu."""
    if ACT == 1:
        return tl.where(z > 0, z, 0.0)
    elif ACT == 2:
        s2, _ = _gelu_consts(FP64)
        return 0.5 * z * (1.0 + tl.math.erf(z / s2))
    elif ACT == 3:
        return z / (1.0 + tl.exp(-z))
    else:
        return z


@triton.jit
def _act_bwd(z, g, ACT: tl.constexpr, FP64: tl.constexpr):
    """d loss / d z from g = d loss / d act(z) (aten's threshold/gelu/silu backward formulas)."""
    if ACT == 1:
        return tl.where(z > 0, g, 0.0)
    elif ACT == 2:
        s2, s2pi = _gelu_consts(FP64)
        cdf = 0.5 * (1.0 + tl.math.erf(z / s2))
        pdf = tl.exp(-0.5 * z * z) / s2pi
        return g * (cdf + z * pdf)
    elif ACT == 3:
        s = 1.0 / (1.0 + tl.exp(-z))
        return g * s * (1.0 + z * (1.0 - s))
    else:
        return g


@triton.jit
def _mm_tile(a_ptr, a_rs, a_ks, b_ptr, b_ks, b_cs, rows, rmask, cols, cmask, K, BM: tl.constexpr,
             BN: tl.constexpr, BK: tl.constexpr, FP64: tl.constexpr, UPCAST: tl.constexpr, F32: tl.constexpr,
             PREC: tl.constexpr):
    """sum_k a[rows, k] * b[k, cols] in fp32 (fp64), k = 0..K-1 in BK chunks, in order.

    a[r, k] is at a_ptr + r * a_rs + k * a_ks and b[k, c] at b_ptr + k * b_ks + c * b_cs (int64
    rows/columns given). fp64: an elementwise product summed over the chunk (tl.dot has no fp64);
    UPCAST: 16-bit inputs upcast to fp32 before tl.dot (the interpreter's bf16 dot is wrong).
    F32: fp32 inputs, multiplied with input_precision PREC ("ieee", or "tf32" when asked for).
    """
    acc = _zeros([BM, BN], FP64)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < K
        k64 = kk.to(tl.int64)
        a = tl.load(a_ptr + rows[:, None] * a_rs + k64[None, :] * a_ks, mask=rmask[:, None] & kmask[None, :],
                    other=0.0)
        b = tl.load(b_ptr + k64[:, None] * b_ks + cols[None, :] * b_cs, mask=kmask[:, None] & cmask[None, :],
                    other=0.0)
        if FP64:
            acc += tl.sum(a.to(tl.float64)[:, :, None] * b.to(tl.float64)[None, :, :], axis=1)
        elif F32:  # PREC: "ieee" or "tf32" (_common.fp32_precision)
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PREC)
        elif UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit(do_not_specialize=["N"])
def _fwd_kernel(main_ptr, out_ptr, zbuf_ptr, part_ptr, stats_ptr, gamma_ptr, beta_ptr, aux, ws, bs, wks, wcs, ks,
                N, C, L: tl.constexpr, HAS_MAIN: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                PHASE: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr, FP64: tl.constexpr, UPCAST: tl.constexpr, F32: tl.constexpr,
             PREC: tl.constexpr):
    """One [BM, BN] tile of the output, every link in order.

    PHASE 0 (plain links): out = main + sum_i act(round(aux_i @ W_i) + b_i), summed in fp32 (fp64)
    and rounded once. PHASE 1 (BatchNorm, pass 1): z_i = round(aux_i @ W_i) into zbuf[i] and the
    tile's per-column count-free partials of z_i + b_i (mean, sum of squared deviations) into
    part[i, tile]. PHASE 2 (BatchNorm, pass 3): out = main + sum_i act(BN_i(zbuf[i] + b_i)) with the
    statistics of pass 2.
    """
    pm = tl.program_id(0)
    rows = (pm * BM + tl.arange(0, BM)).to(tl.int64)
    rmask = rows < N
    cols = (tl.program_id(1) * BN + tl.arange(0, BN)).to(tl.int64)
    cmask = cols < C
    m2 = rmask[:, None] & cmask[None, :]
    off = rows[:, None] * C + cols[None, :]
    dt = out_ptr.dtype.element_ty
    if PHASE != 1:
        if HAS_MAIN:
            acc = _up(tl.load(main_ptr + off, mask=m2, other=0.0), FP64)
        else:
            acc = _zeros([BM, BN], FP64)
    NT = tl.num_programs(0)
    for i in tl.static_range(L):
        zoff = off + tl.full([], i, tl.int64) * N * C
        if PHASE == 2:
            zr = _up(tl.load(zbuf_ptr + zoff, mask=m2, other=0.0), FP64)
        else:
            z = _mm_tile(aux[i], ks[i], 1, ws[i], wks[i], wcs[i], rows, rmask, cols, cmask, ks[i], BM, BN, BK,
                         FP64, UPCAST, F32, PREC)
            zr = _up(cast(z, dt), FP64)  # the GEMM's output in the dtype, as the reference's
        if PHASE == 1:
            tl.store(zbuf_ptr + zoff, cast(zr, dt), mask=m2)
        if HAS_BIAS:
            zr += _up(tl.load(bs[i] + cols, mask=cmask, other=0.0), FP64)[None, :]
        if PHASE == 0:
            acc += _act(zr, ACT, FP64)
        elif PHASE == 1:
            n = tl.sum(tl.where(rmask, 1.0, 0.0), axis=0)
            mean = tl.sum(tl.where(m2, zr, 0.0), axis=0) / n
            d = tl.where(m2, zr - mean[None, :], 0.0)
            pbase = (i * NT + pm).to(tl.int64) * 2 * C
            tl.store(part_ptr + pbase + cols, mean, mask=cmask)
            tl.store(part_ptr + pbase + C + cols, tl.sum(d * d, axis=0), mask=cmask)
        else:
            mean = tl.load(stats_ptr + i * 3 * C + cols, mask=cmask, other=0.0)
            invstd = tl.load(stats_ptr + i * 3 * C + C + cols, mask=cmask, other=0.0)
            u = (zr - mean[None, :]) * invstd[None, :]
            if HAS_GAMMA:
                u = u * _up(tl.load(gamma_ptr + i * C + cols, mask=cmask, other=0.0), FP64)[None, :]
            if HAS_BETA:
                u = u + _up(tl.load(beta_ptr + i * C + cols, mask=cmask, other=0.0), FP64)[None, :]
            acc += _act(u, ACT, FP64)
    if PHASE != 1:
        tl.store(out_ptr + off, cast(acc, dt), mask=m2)


@triton.jit(do_not_specialize=["N", "NT"])
def _bn_stats_kernel(part_ptr, stats_ptr, N, C, NT, eps, BMT: tl.constexpr, BC: tl.constexpr, FP64: tl.constexpr):
    """stats[i] = (mean, 1 / sqrt(var + eps), var) per column from the tiles' (mean, M2) partials,
    merged in tile order (Chan et al.'s pairwise update: no cancellation of sum z^2 - n mean^2).
    var is biased (M2 / N), as the normalisation uses. Grid: (links, column blocks)."""
    i = tl.program_id(0)
    cols = (tl.program_id(1) * BC + tl.arange(0, BC)).to(tl.int64)
    cmask = cols < C
    n_a = _zeros([BC], FP64)
    mean = _zeros([BC], FP64)
    m2 = _zeros([BC], FP64)
    base = part_ptr + i.to(tl.int64) * NT * 2 * C
    for t in range(0, NT):
        n_b = _zeros([BC], FP64) + (N - t * BMT)
        n_b = tl.where(n_b > BMT, BMT, n_b)  # the rows of tile t
        mb = tl.load(base + cols, mask=cmask, other=0.0)
        qb = tl.load(base + C + cols, mask=cmask, other=0.0)
        n = n_a + n_b
        delta = mb - mean
        mean += delta * (n_b / n)
        m2 += qb + delta * delta * (n_a * n_b / n)
        n_a = n
        base += 2 * C
    var = m2 / N
    invstd = 1.0 / _sqrt(var + eps, FP64)
    sb = stats_ptr + i.to(tl.int64) * 3 * C
    tl.store(sb + cols, mean, mask=cmask)
    tl.store(sb + C + cols, invstd, mask=cmask)
    tl.store(sb + 2 * C + cols, var, mask=cmask)


@triton.jit(do_not_specialize=["N"])
def _bwd_gz_kernel(g_ptr, a_ptr, w_ptr, b_ptr, stats_ptr, gamma_ptr, beta_ptr, scratch_ptr, part_ptr,
                   N, C, K, wks, wcs, link, ACT: tl.constexpr, BN_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, NEED_Z: tl.constexpr, STORE: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FP64: tl.constexpr, UPCAST: tl.constexpr,
                   F32: tl.constexpr, PREC: tl.constexpr):
    """Backward pass 1 of one link on a [BM, BN] tile (z = aux @ W recomputed when NEED_Z).

    Plain: gz = act'(z + b) * g, rounded to the dtype, into scratch (STORE) and its per-tile column
    sums into part[tile, 0] (for the bias gradient). BN_MODE: gu = act'(u) * g with u the affine
    BN output; the tile's column sums of gu and gu * xhat into part[tile, 0:2] and z (rounded) into
    scratch for pass 2.
    """
    pm = tl.program_id(0)
    rows = (pm * BM + tl.arange(0, BM)).to(tl.int64)
    rmask = rows < N
    cols = (tl.program_id(1) * BN + tl.arange(0, BN)).to(tl.int64)
    cmask = cols < C
    m2 = rmask[:, None] & cmask[None, :]
    off = rows[:, None] * C + cols[None, :]
    dt = scratch_ptr.dtype.element_ty
    g = _up(tl.load(g_ptr + off, mask=m2, other=0.0), FP64)
    pbase = part_ptr + pm.to(tl.int64) * 2 * C
    if NEED_Z:
        z = _mm_tile(a_ptr, K, 1, w_ptr, wks, wcs, rows, rmask, cols, cmask, K, BM, BN, BK, FP64, UPCAST, F32, PREC)
        zr = _up(cast(z, dt), FP64)
        zf = zr
        if HAS_BIAS:
            zf += _up(tl.load(b_ptr + cols, mask=cmask, other=0.0), FP64)[None, :]
    if BN_MODE:
        sbase = stats_ptr + link * 3 * C
        mean = tl.load(sbase + cols, mask=cmask, other=0.0)
        invstd = tl.load(sbase + C + cols, mask=cmask, other=0.0)
        xhat = (zf - mean[None, :]) * invstd[None, :]
        u = xhat
        if HAS_GAMMA:
            u = u * _up(tl.load(gamma_ptr + link * C + cols, mask=cmask, other=0.0), FP64)[None, :]
        if HAS_BETA:
            u = u + _up(tl.load(beta_ptr + link * C + cols, mask=cmask, other=0.0), FP64)[None, :]
        gu = tl.where(m2, _act_bwd(u, g, ACT, FP64), 0.0)
        tl.store(pbase + cols, tl.sum(gu, axis=0), mask=cmask)
        tl.store(pbase + C + cols, tl.sum(gu * xhat, axis=0), mask=cmask)
        tl.store(scratch_ptr + off, cast(zr, dt), mask=m2)
    else:
        if NEED_Z:
            gz = _up(cast(_act_bwd(zf, g, ACT, FP64), dt), FP64)
        else:
            gz = g
        if STORE:
            tl.store(scratch_ptr + off, cast(gz, dt), mask=m2)
        if HAS_BIAS:
            tl.store(pbase + cols, tl.sum(tl.where(m2, gz, 0.0), axis=0), mask=cmask)


@triton.jit(do_not_specialize=["NT"])
def _colsum_kernel(part_ptr, sums_ptr, gb_ptr, ggamma_ptr, gbeta_ptr, C, NT, link, NS: tl.constexpr,
                   BC: tl.constexpr, FP64: tl.constexpr, HAS_GB: tl.constexpr, HAS_GAMMA: tl.constexpr,
                   HAS_BETA: tl.constexpr):
    """The tiles' column partials part[t, s] (s < NS) added in tile order into sums[s] (fp32/fp64),
    and into the gradients they are: the bias's (plain links), bn_bias's (s = 0: sum gu) and
    bn_weight's (s = 1: sum gu * xhat), in those parameters' dtypes. Grid: column blocks."""
    cols = (tl.program_id(0) * BC + tl.arange(0, BC)).to(tl.int64)
    cmask = cols < C
    s0 = _zeros([BC], FP64)
    s1 = _zeros([BC], FP64)
    p = part_ptr + cols
    for _t in range(0, NT):
        s0 += tl.load(p, mask=cmask, other=0.0)
        if NS == 2:
            s1 += tl.load(p + C, mask=cmask, other=0.0)
        p += 2 * C
    tl.store(sums_ptr + cols, s0, mask=cmask)
    if NS == 2:
        tl.store(sums_ptr + C + cols, s1, mask=cmask)
    if HAS_GB:
        tl.store(gb_ptr + cols, cast(s0, gb_ptr.dtype.element_ty), mask=cmask)
    if HAS_BETA:
        tl.store(gbeta_ptr + link * C + cols, cast(s0, gbeta_ptr.dtype.element_ty), mask=cmask)
    if HAS_GAMMA:
        tl.store(ggamma_ptr + link * C + cols, cast(s1, ggamma_ptr.dtype.element_ty), mask=cmask)


@triton.jit(do_not_specialize=["N"])
def _bn_gz_kernel(g_ptr, b_ptr, stats_ptr, gamma_ptr, beta_ptr, sums_ptr, scratch_ptr, N, C, link, ACT: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, FP64: tl.constexpr):
    """Backward pass 2 of a BN link, elementwise, in place on scratch (z -> gz, each element read
    and written by the same program): gz = k (gu - sum gu / N - xhat sum(gu xhat) / N) with
    k = invstd * gamma, rounded to the dtype for the weight GEMM."""
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    rmask = rows < N
    cols = (tl.program_id(1) * BN + tl.arange(0, BN)).to(tl.int64)
    cmask = cols < C
    m2 = rmask[:, None] & cmask[None, :]
    off = rows[:, None] * C + cols[None, :]
    dt = scratch_ptr.dtype.element_ty
    g = _up(tl.load(g_ptr + off, mask=m2, other=0.0), FP64)
    zf = _up(tl.load(scratch_ptr + off, mask=m2, other=0.0), FP64)
    if HAS_BIAS:
        zf += _up(tl.load(b_ptr + cols, mask=cmask, other=0.0), FP64)[None, :]
    sbase = stats_ptr + link * 3 * C
    mean = tl.load(sbase + cols, mask=cmask, other=0.0)
    invstd = tl.load(sbase + C + cols, mask=cmask, other=0.0)
    xhat = (zf - mean[None, :]) * invstd[None, :]
    u = xhat
    k = invstd
    if HAS_GAMMA:
        gam = _up(tl.load(gamma_ptr + link * C + cols, mask=cmask, other=0.0), FP64)
        u = u * gam[None, :]
        k = k * gam
    if HAS_BETA:
        u = u + _up(tl.load(beta_ptr + link * C + cols, mask=cmask, other=0.0), FP64)[None, :]
    gu = _act_bwd(u, g, ACT, FP64)
    sg = tl.load(sums_ptr + cols, mask=cmask, other=0.0)
    sgx = tl.load(sums_ptr + C + cols, mask=cmask, other=0.0)
    gz = k[None, :] * (gu - (sg / N)[None, :] - xhat * (sgx / N)[None, :])
    tl.store(scratch_ptr + off, cast(gz, dt), mask=m2)


@triton.jit(do_not_specialize=["N"])
def _wgrad_kernel(a_ptr, gz_ptr, gw_ptr, N, K, C, gks, gcs, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  FP64: tl.constexpr, UPCAST: tl.constexpr, F32: tl.constexpr,
             PREC: tl.constexpr):
    """grad_W[kk, c] = sum_n aux[n, kk] * gz[n, c]: one program per [BM, BN] tile of grad_W looping
    over every row in order (no split over rows, so no cross-program reduction)."""
    kk = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    kmask = kk < K
    cols = (tl.program_id(1) * BN + tl.arange(0, BN)).to(tl.int64)
    cmask = cols < C
    # aux^T [K, N]: element (kk, n) at kk + n * K
    acc = _mm_tile(a_ptr, 1, K, gz_ptr, C, 1, kk, kmask, cols, cmask, N, BM, BN, BK, FP64, UPCAST, F32, PREC)
    tl.store(gw_ptr + kk[:, None] * gks + cols[None, :] * gcs, cast(acc, gw_ptr.dtype.element_ty),
             mask=kmask[:, None] & cmask[None, :])
