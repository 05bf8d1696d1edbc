"""The triton programs of the grouped GEMMs and expert MLPs (imported on first use: this module imports triton).

Two GEMM programs serve every op (see :mod:`moe_kernels.backends.triton.grouped`):

* ``_rows_gemm_kernel`` (varlen M): one program per (tile of BM rows of the N static rows, tile of
  BN output columns). It finds the experts its rows belong to from ``offsets`` on the device and
  runs one masked pass per expert in its rows (a tile straddling experts runs several; rows of one
  pass only load and store that expert's rows); rows past ``offsets[E]`` get zeros. Optional
  prologue (rows gathered through ``sources``; the activation applied to z while loading) and
  epilogue (row weight, bias, activation backward, the gate-weight gradient's partial dots).
* ``_experts_gemm_kernel`` (varlen K): one program per (expert, tile of the [I, J] product);
  it loops over the expert's rows ``offsets[e]..offsets[e+1]`` in order (a fixed summation order,
  no atomics) and optionally sums the B operand's columns (a bias gradient) on the way.

Accumulation is fp32 (fp64 for fp64 data: an elementwise-product-and-sum path, ``tl.dot`` has no
fp64); fp32 operands use ``input_precision="ieee"``; under the interpreter fp16/bf16 operands are
upcast before ``tl.dot`` (its bf16 dot is wrong). All addresses are int64.
"""

import triton
import triton.language as tl

from ._jit_util import cast
from ._jit_util import up as _up

# activation codes (grouped.py's _ACT)
NONE: tl.constexpr = 0
GELU: tl.constexpr = 1
RELU: tl.constexpr = 2
SILU: tl.constexpr = 3
SWIGLU: tl.constexpr = 4


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _act(z, ACT: tl.constexpr):
    """act(z) for the elementwise activations (z upcast); swiglu is silu(gate) * up, done by the callers."""
    if ACT == GELU:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == RELU:
        return tl.where(z < 0, 0.0, z)  # NaN stays NaN, as F.relu
    elif ACT == SILU:
        return z * _sigmoid(z)
    else:
        return z


@triton.jit
def _act_grad(g, z, ACT: tl.constexpr):
    """d loss / d z from g = d loss / d act(z) (ATen's gelu_backward, threshold_backward, silu_backward)."""
    if ACT == GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        return g * (cdf + z * pdf)
    elif ACT == RELU:
        return tl.where(z <= 0, 0.0, g)
    elif ACT == SILU:
        s = _sigmoid(z)
        return g * s * (1.0 + z * (1.0 - s))
    else:
        return g


@triton.jit
def _mma(a, b, acc, FP64: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b: fp64 by products and a sum (no fp64 tl.dot), fp32 operands exactly (ieee)."""
    if FP64:
        return acc + tl.sum(a.to(tl.float64)[:, :, None] * b.to(tl.float64)[None, :, :], axis=1)
    elif UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _load_rows(a_ptr, rows64, src64, rmask, cols, cmask, lda, HALF, GATHER: tl.constexpr,
               ACT_IN: tl.constexpr, ACT: tl.constexpr, FP64: tl.constexpr):
    """A tile [rows, cols] of the A operand: rows of ``a`` (gathered through sources when GATHER;
    a padding row is zero), or act(z) computed on load when ACT_IN (``a`` is z; swiglu reads the
    gate at ``cols`` and the up projection at ``cols + HALF``), rounded to the storage dtype as the
    reference's act(z) tensor is."""
    if GATHER:
        r = src64
        m = rmask & (src64 >= 0)
    else:
        r = rows64
        m = rmask
    mm = m[:, None] & cmask[None, :]
    ptrs = a_ptr + r[:, None] * lda + cols[None, :]
    v = tl.load(ptrs, mask=mm, other=0.0)
    if ACT_IN:
        zf = _up(v, FP64)
        if ACT == SWIGLU:
            u = _up(tl.load(ptrs + HALF, mask=mm, other=0.0), FP64)
            h = zf * _sigmoid(zf) * u
        else:
            h = _act(zf, ACT)
        v = cast(h, a_ptr.dtype.element_ty)
    return v


@triton.jit
def _rows_gemm_kernel(
        a_ptr, src_ptr, offsets_ptr, b_ptr, bias_ptr, rw_ptr, out_ptr, z_ptr, part_ptr, b2_ptr,
        N, K, NC, E, lda, ldo, HALF, sbe, sbk, sbn,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BE: tl.constexpr,
        GATHER: tl.constexpr, ACT_IN: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
        ROW_W: tl.constexpr, ACT_BWD: tl.constexpr, GATE: tl.constexpr, GATE_B2: tl.constexpr,
        FP64: tl.constexpr, UPCAST: tl.constexpr):
    """out[r, n] = epilogue(sum_k A[r, k] B_e[k, n]) for the rows r of expert e (B_e[k, n] at
    b + e sbe + k sbk + n sbn: any weight layout), zeros for rows past offsets[E].

    ROW_W: the product times rw[r]. HAS_BIAS: + bias[e, n]. ACT_BWD: the product is d act(z) and the
    stored value is d z (z, out: [N, ldo]; swiglu writes the gate's columns n and the up columns
    n + HALF). GATE: part[pid_n, r] = sum_n product[r, n] act(z)[r, n] (before ROW_W), plus
    sum_k A[r, k] b2[e, k] in column tile 0 (GATE_B2): the partial dots of the gate gradient.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    r0 = pid_m * BM
    rows = r0 + tl.arange(0, BM)
    rows64 = rows.to(tl.int64)
    inside = rows < N
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < NC
    cols64 = cols.to(tl.int64)
    if GATHER:
        src64 = tl.load(src_ptr + rows64, mask=inside, other=-1).to(tl.int64)
    else:
        src64 = rows64
    # the experts of the tile's first and last rows: e(r) = #{e : offsets[e + 1] <= r}
    ee = tl.arange(0, BE)
    ends = tl.load(offsets_ptr + 1 + ee, mask=ee < E, other=2147483647)
    r_last = tl.minimum(r0 + BM, N) - 1
    e_lo = tl.sum((ends <= r0).to(tl.int32), axis=0)
    e_end = tl.minimum(tl.sum((ends <= r_last).to(tl.int32), axis=0) + 1, E)
    total = tl.load(offsets_ptr + E)
    if ROW_W:
        rw = _up(tl.load(rw_ptr + rows64, mask=inside, other=0.0), FP64)
    for e in range(e_lo, e_end):
        lo = tl.load(offsets_ptr + e)
        hi = tl.load(offsets_ptr + e + 1)
        in_e = inside & (rows >= lo) & (rows < hi)
        e64 = tl.cast(e, tl.int64)  # a python int under the interpreter
        if FP64:
            acc = tl.zeros([BM, BN], dtype=tl.float64)
            bdot = tl.zeros([BM], dtype=tl.float64)
        else:
            acc = tl.zeros([BM, BN], dtype=tl.float32)
            bdot = tl.zeros([BM], dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            kmask = kk < K
            kk64 = kk.to(tl.int64)
            a = _load_rows(a_ptr, rows64, src64, in_e, kk64, kmask, lda, HALF, GATHER, ACT_IN, ACT, FP64)
            b = tl.load(b_ptr + e64 * sbe + kk64[:, None] * sbk + cols64[None, :] * sbn,
                        mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc = _mma(a, b, acc, FP64, UPCAST)
            if GATE_B2:
                b2 = _up(tl.load(b2_ptr + e64 * K + kk64, mask=kmask, other=0.0), FP64)
                bdot += tl.sum(_up(a, FP64) * b2[None, :], axis=1)
        m2 = in_e[:, None] & cmask[None, :]
        if ACT_BWD:
            zp = z_ptr + rows64[:, None] * ldo + cols64[None, :]
            zg = _up(tl.load(zp, mask=m2, other=0.0), FP64)
            if ACT == SWIGLU:
                zu = _up(tl.load(zp + HALF, mask=m2, other=0.0), FP64)
                sg = _sigmoid(zg)
                silu = zg * sg
                hval = silu * zu
            else:
                hval = _act(zg, ACT)
            if GATE:
                part = tl.sum(tl.where(m2, acc * hval, 0.0), axis=1)
                if GATE_B2:
                    part += tl.where(pid_n == 0, bdot, 0.0)
                tl.store(part_ptr + pid_n.to(tl.int64) * N + rows64, part, mask=in_e)
            if ROW_W:
                acc = acc * rw[:, None]
            op = out_ptr + rows64[:, None] * ldo + cols64[None, :]
            if ACT == SWIGLU:
                tl.store(op, cast(acc * zu * sg * (1.0 + zg * (1.0 - sg)), out_ptr.dtype.element_ty), mask=m2)
                tl.store(op + HALF, cast(acc * silu, out_ptr.dtype.element_ty), mask=m2)
            else:
                tl.store(op, cast(_act_grad(acc, zg, ACT), out_ptr.dtype.element_ty), mask=m2)
        else:
            if ROW_W:
                acc = acc * rw[:, None]
            if HAS_BIAS:
                bias = _up(tl.load(bias_ptr + e64 * NC + cols64, mask=cmask, other=0.0), FP64)
                acc += bias[None, :]
            tl.store(out_ptr + rows64[:, None] * ldo + cols64[None, :], cast(acc, out_ptr.dtype.element_ty),
                     mask=m2)
    # rows past offsets[E]: zeros
    tail = inside & (rows >= total)
    mt = tail[:, None] & cmask[None, :]
    zero = tl.zeros([BM, BN], dtype=out_ptr.dtype.element_ty)
    op = out_ptr + rows64[:, None] * ldo + cols64[None, :]
    tl.store(op, zero, mask=mt)
    if ACT_BWD:
        if ACT == SWIGLU:
            tl.store(op + HALF, zero, mask=mt)


@triton.jit
def _experts_gemm_kernel(
        a_ptr, b_ptr, src_ptr, rw_ptr, offsets_ptr, out_ptr, bsum_ptr,
        I, J, lda, ldb, HALF, soe, soi, soj,
        BI: tl.constexpr, BJ: tl.constexpr, BR: tl.constexpr,
        A_GATHER: tl.constexpr, A_ACT: tl.constexpr, ACT: tl.constexpr, B_GATHER: tl.constexpr,
        ROW_W: tl.constexpr, BSUM: tl.constexpr, FP64: tl.constexpr, UPCAST: tl.constexpr):
    """out[e, i, j] = sum over the rows r of expert e, in order, of A[r, i] B[r, j] (out at
    e soe + i soi + j soj: the weight's layout); BSUM: bsum[e, j] = sum_r B[r, j] (program i = 0).

    A: rows of ``a`` (A_GATHER: through sources) or act(z) (A_ACT). B: rows of ``b`` (B_GATHER:
    through sources), times rw[r] and rounded to the storage dtype when ROW_W (the rows of the
    combine's gradient, w * g, as the reference stores them)."""
    e = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_j = tl.program_id(2)
    ii = pid_i * BI + tl.arange(0, BI)
    jj = pid_j * BJ + tl.arange(0, BJ)
    imask = ii < I
    jmask = jj < J
    ii64 = ii.to(tl.int64)
    jj64 = jj.to(tl.int64)
    lo = tl.load(offsets_ptr + e)
    hi = tl.load(offsets_ptr + e + 1)
    if FP64:
        acc = tl.zeros([BI, BJ], dtype=tl.float64)
        bs = tl.zeros([BJ], dtype=tl.float64)
    else:
        acc = tl.zeros([BI, BJ], dtype=tl.float32)
        bs = tl.zeros([BJ], dtype=tl.float32)
    for r0 in range(lo, hi, BR):
        rows = r0 + tl.arange(0, BR)
        rmask = rows < hi
        rows64 = rows.to(tl.int64)
        if A_GATHER or B_GATHER:
            src64 = tl.load(src_ptr + rows64, mask=rmask, other=-1).to(tl.int64)
        else:
            src64 = rows64
        a = _load_rows(a_ptr, rows64, src64, rmask, ii64, imask, lda, HALF, A_GATHER, A_ACT, ACT, FP64)
        if B_GATHER:
            rb = src64
            mb = rmask & (src64 >= 0)
        else:
            rb = rows64
            mb = rmask
        b = tl.load(b_ptr + rb[:, None] * ldb + jj64[None, :], mask=mb[:, None] & jmask[None, :], other=0.0)
        if ROW_W:
            w = _up(tl.load(rw_ptr + rows64, mask=rmask, other=0.0), FP64)
            b = cast(_up(b, FP64) * w[:, None], b_ptr.dtype.element_ty)
        acc = _mma(tl.trans(a), b, acc, FP64, UPCAST)
        if BSUM:
            bs += tl.sum(_up(b, FP64), axis=0)
    e64 = e.to(tl.int64)
    tl.store(out_ptr + e64 * soe + ii64[:, None] * soi + jj64[None, :] * soj, cast(acc, out_ptr.dtype.element_ty),
             mask=imask[:, None] & jmask[None, :])
    if BSUM:
        if pid_i == 0:
            tl.store(bsum_ptr + e64 * J + jj64, cast(bs, bsum_ptr.dtype.element_ty), mask=jmask)


@triton.jit
def _row_weight_kernel(src_ptr, slots_ptr, w_ptr, rw_ptr, N, K: tl.constexpr, BR: tl.constexpr,
                       FP64: tl.constexpr):
    """rw[r] = weights[t, j] for the assignment (t, j) whose slot is r (t = sources[r], found by
    scanning the token's k slots); 0 for a padding row."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    inside = rows < N
    rows64 = rows.to(tl.int64)
    t = tl.load(src_ptr + rows64, mask=inside, other=-1).to(tl.int64)
    valid = inside & (t >= 0)
    if FP64:
        rw = tl.zeros([BR], dtype=tl.float64)
    else:
        rw = tl.zeros([BR], dtype=tl.float32)
    for j in tl.static_range(K):
        s = tl.load(slots_ptr + t * K + j, mask=valid, other=-1)
        w = _up(tl.load(w_ptr + t * K + j, mask=valid, other=0.0), FP64)
        rw = tl.where(valid & (s == rows), w, rw)
    tl.store(rw_ptr + rows64, rw, mask=inside)


@triton.jit
def _gate_grad_kernel(part_ptr, slots_ptr, gw_ptr, T, N, NCT, K: tl.constexpr, BT: tl.constexpr,
                      FP64: tl.constexpr):
    """grad_w[t, j] = sum_c part[c, slots[t, j]] over the column tiles c in order; 0 for a dropped slot."""
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    tmask = tok < T
    t64 = tok.to(tl.int64)
    for j in tl.static_range(K):
        s = tl.load(slots_ptr + t64 * K + j, mask=tmask, other=-1).to(tl.int64)
        valid = tmask & (s >= 0)
        if FP64:
            acc = tl.zeros([BT], dtype=tl.float64)
        else:
            acc = tl.zeros([BT], dtype=tl.float32)
        for c in range(0, NCT):
            acc += tl.load(part_ptr + c * N + s, mask=valid, other=0.0)
        tl.store(gw_ptr + t64 * K + j, cast(tl.where(valid, acc, 0.0), gw_ptr.dtype.element_ty), mask=tmask)
