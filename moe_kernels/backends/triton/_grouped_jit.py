"""The triton programs of the grouped GEMMs and expert MLPs (imported on first use: this module imports triton).

Two GEMM programs serve every op (see :mod:`moe_kernels.backends.triton.grouped`):

* ``_rows_gemm_kernel`` (varlen M): one program per ((tile of BM rows of the N static rows,
  expert segment) pair, tile of BN output columns). It finds its pair from ``offsets`` on the device
  and runs one masked pass of that expert over the tile (a tile straddling experts is split over
  several programs; a pass only loads and stores its expert's rows); rows past ``offsets[E]`` get
  zeros. Optional
  prologue (rows gathered through ``sources``; the activation applied to z while loading) and
  epilogue (row weight, bias, activation backward, the gate-weight gradient's partial dots).
* ``_experts_gemm_kernel`` (varlen K): one program per (expert, tile of the [I, J] product);
  it loops over the expert's rows ``offsets[e]..offsets[e+1]`` in order (a fixed summation order,
  no atomics) and optionally sums the B operand's columns (a bias gradient) on the way.

Accumulation is fp32 (fp64 for fp64 data: an elementwise-product-and-sum path, ``tl.dot`` has no
fp64); fp32 operands use ``input_precision=PREC``: "ieee" unless TF32 is asked for
(``set_fp32_precision``); under the interpreter fp16/bf16 operands are
upcast before ``tl.dot`` (its bf16 dot is wrong). All addresses are int64.
"""

import triton
import triton.language as tl

from ._jit_util import cast

# activation codes (ACT; grouped.py's _ACT): 0 none, 1 gelu (exact, erf), 2 relu, 3 silu, 4 swiglu


# Under the interpreter every call of a @triton.jit helper re-patches triton.language (about 2 ms),
# so the GEMM programs below spell their steps out inline instead of calling helpers in their loops
# (``cast`` is called only for bf16 outputs, where the interpreter's own conversion truncates).


@triton.jit(do_not_specialize=["N"])
def _rows_gemm_kernel(
        a_ptr, src_ptr, offsets_ptr, b_ptr, b_desc, bias_ptr, rw_ptr, out_ptr, z_ptr, part_ptr, b2_ptr,
        N, K, NC, E, lda, ldo, HALF, sbe, sbk, sbn,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BE: tl.constexpr,
        GATHER: tl.constexpr, ACT_IN: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
        ROW_W: tl.constexpr, ACT_BWD: tl.constexpr, GATE: tl.constexpr, GATE_B2: tl.constexpr,
        ACC: tl.constexpr, UPCAST: tl.constexpr, DOT64: tl.constexpr, PREC: tl.constexpr,
        STORE: tl.constexpr, TMA: tl.constexpr, B_T: tl.constexpr, WALK: tl.constexpr):
    """out[r, n] = epilogue(sum_k A[r, k] B_e[k, n]) for the rows r of expert e (B_e[k, n] at
    b + e sbe + k sbk + n sbn: any weight layout), zeros for rows past offsets[E].

    A: rows of ``a`` ([*, lda]; GATHER: row sources[r], zero for -1), or with ACT_IN act(z) of
    z = ``a`` computed on load and rounded to z's dtype (swiglu: silu(z[:, k]) * z[:, k + HALF]).
    ROW_W: the product times rw[r]. HAS_BIAS: + bias[e, n]. ACT_BWD: the product is d act(z) and the
    stored value is d z (z, out: [N, ldo]; swiglu writes the gate's columns n and the up columns
    n + HALF). GATE: part[pid_n, r] = sum_n product[r, n] act(z)[r, n] (before ROW_W), plus
    sum_k A[r, k] b2[e, k] in column tile 0 (GATE_B2): the partial dots of the gate gradient.
    STORE false (with GATE): nothing is written to ``out`` (only the gate gradient is wanted).
    TMA: B's tiles come through ``b_desc``, a host-built tensor descriptor over the weight's physical
    [E, rows, cols] layout (last dim contiguous; zero fill past its bounds): block [1, BK, BN], or
    [1, BN, BK] transposed on load when B_T (B_e = the stored matrix's transpose: dX, or a weight
    stored transposed). Otherwise (and for fp64) pointer loads through the three strides.

    The work is split in (row tile, segment) pairs: the segments are the E experts' row ranges and a
    last one, [offsets[E], N), of rows past the plan (written as zeros); a segment has a pair per
    row tile it touches. There are at most cdiv(N, BM) + E pairs (each of the E inner segment
    boundaries splits at most one tile): that is the grid on a GPU, where each program finds its
    pair from ``offsets`` (a prefix sum of the segments' tile counts) and does one pass of one
    expert over one tile, so work is balanced however small the experts (no program loops over
    every expert its tile straddles); programs past the last pair do nothing. WALK (the
    interpreter, where each program and each reduction costs milliseconds): one program walks
    every pair, segment by segment, through the same loop body.
    """
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < NC
    cols64 = cols.to(tl.int64)
    if WALK:  # every segment, every tile of it
        seg_first = 0
        NSEG = E + 1
    else:  # this program's pair: its segment, and its tile within the segment (straight-line code:
        # the loops below then have one iteration and constant bounds)
        ee = tl.arange(0, BE)  # BE >= E + 1
        starts = tl.where(ee <= E, tl.load(offsets_ptr + ee, mask=ee <= E, other=0), N)
        ends = tl.where(ee < E, tl.load(offsets_ptr + 1 + ee, mask=ee < E, other=0), N)
        ntiles = tl.where(ends > starts, (ends - 1) // BM - starts // BM + 1, 0)
        upto = tl.cumsum(ntiles, axis=0)  # pairs of the segments up to each, inclusive
        seg_first = tl.sum((upto <= pid).to(tl.int32), axis=0)  # E + 1 past the last pair: nothing to do
        first_pair = tl.sum(tl.where(ee == seg_first, upto - ntiles, 0), axis=0)
        NSEG: tl.constexpr = 1
    for i in range(0, NSEG):
        seg = seg_first + i
        lo = tl.load(offsets_ptr + seg, mask=seg <= E, other=0)
        hi = tl.where(seg < E, tl.load(offsets_ptr + seg + 1, mask=seg < E, other=0), N)
        if WALK:
            tile_first = lo // BM
            NTILE = tl.where(hi > lo, (hi - 1) // BM + 1 - tile_first, 0)
        else:
            tile_first = lo // BM + (pid - first_pair)
            NTILE: tl.constexpr = 1
        for j in range(0, NTILE):
            tile = tile_first + j
            rows = tile * BM + tl.arange(0, BM)
            rows64 = rows.to(tl.int64)
            in_e = (rows >= lo) & (rows < hi)  # hi <= N
            if seg < E:  # a pass of expert e = seg over its rows of the tile
                e = seg
                if GATHER:
                    arow = tl.load(src_ptr + rows64, mask=in_e, other=-1).to(tl.int64)
                    a_ok = in_e & (arow >= 0)
                else:
                    arow = rows64
                    a_ok = in_e
                if ROW_W:
                    rw = tl.load(rw_ptr + rows64, mask=in_e, other=0.0).to(ACC)
                e64 = tl.cast(e, tl.int64)  # a python int when walked under the interpreter
                acc = tl.zeros([BM, BN], dtype=ACC)
                bdot = tl.zeros([BM], dtype=ACC)
                for k0 in range(0, K, BK):
                    kk = k0 + tl.arange(0, BK)
                    kmask = kk < K
                    kk64 = kk.to(tl.int64)
                    am = a_ok[:, None] & kmask[None, :]
                    ap = a_ptr + arow[:, None] * lda + kk64[None, :]
                    a = tl.load(ap, mask=am, other=0.0)
                    if ACT_IN:
                        zf = a.to(ACC)
                        if ACT == 4:  # swiglu, rounding silu(gate) to z's dtype first as the reference does
                            h = zf / (1.0 + tl.exp(-zf))
                            if a_ptr.dtype.element_ty == tl.bfloat16:
                                h = cast(h, tl.bfloat16).to(ACC)
                            elif a_ptr.dtype.element_ty == tl.float16:
                                h = h.to(tl.float16).to(ACC)
                            h = h * tl.load(ap + HALF, mask=am, other=0.0).to(ACC)
                        elif ACT == 1:
                            h = 0.5 * zf * (1.0 + tl.math.erf(zf * 0.7071067811865476))
                        elif ACT == 2:
                            h = tl.where(zf < 0, 0.0, zf)
                        elif ACT == 3:
                            h = zf / (1.0 + tl.exp(-zf))
                        else:
                            h = zf
                        if a_ptr.dtype.element_ty == tl.bfloat16:
                            a = cast(h, tl.bfloat16)
                        else:
                            a = h.to(a_ptr.dtype.element_ty)
                    if TMA:
                        if B_T:
                            b = tl.trans(tl.reshape(b_desc.load([e, pid_n * BN, k0]), [BN, BK]))
                        else:
                            b = tl.reshape(b_desc.load([e, k0, pid_n * BN]), [BK, BN])
                    else:
                        b = tl.load(b_ptr + e64 * sbe + kk64[:, None] * sbk + cols64[None, :] * sbn,
                                    mask=kmask[:, None] & cmask[None, :], other=0.0)
                    if ACC == tl.float64:
                        if DOT64:  # the interpreter's fp64 dot (numpy's matmul); out_dtype: 3.6/3.7 default to fp32
                            acc = tl.dot(a, b, acc, out_dtype=ACC)
                        else:  # products and a sum: no fp64 tl.dot on the GPUs
                            acc += tl.sum(a.to(ACC)[:, :, None] * b.to(ACC)[None, :, :], axis=1)
                    elif UPCAST:
                        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
                    elif a.dtype == tl.float32:  # PREC: "ieee", or "tf32" when asked for
                        acc = tl.dot(a, b, acc, input_precision=PREC)
                    else:
                        acc = tl.dot(a, b, acc)
                    if GATE_B2:
                        b2 = tl.load(b2_ptr + e64 * K + kk64, mask=kmask, other=0.0).to(ACC)
                        bdot += tl.sum(a.to(ACC) * b2[None, :], axis=1)
                m2 = in_e[:, None] & cmask[None, :]
                op = out_ptr + rows64[:, None] * ldo + cols64[None, :]
                if ACT_BWD:
                    zp = z_ptr + rows64[:, None] * ldo + cols64[None, :]
                    zg = tl.load(zp, mask=m2, other=0.0).to(ACC)
                    if ACT == 4:  # swiglu: zg the gate, zu the up projection
                        zu = tl.load(zp + HALF, mask=m2, other=0.0).to(ACC)
                        sg = 1.0 / (1.0 + tl.exp(-zg))
                        silu = zg * sg
                        hval = silu * zu
                    elif ACT == 1:
                        cdf = 0.5 * (1.0 + tl.math.erf(zg * 0.7071067811865476))
                        hval = zg * cdf
                    elif ACT == 2:
                        hval = tl.where(zg < 0, 0.0, zg)
                    elif ACT == 3:
                        sg = 1.0 / (1.0 + tl.exp(-zg))
                        hval = zg * sg
                    else:
                        hval = zg
                    if GATE:
                        part = tl.sum(tl.where(m2, acc * hval, 0.0), axis=1)
                        if GATE_B2:
                            part += tl.where(pid_n == 0, bdot, 0.0)
                        tl.store(part_ptr + pid_n.to(tl.int64) * N + rows64, part, mask=in_e)
                    if STORE:  # (not STORE: only the gate gradient's partial dots are wanted)
                        if ROW_W:
                            acc = acc * rw[:, None]
                        # d act(z) rounded to z's dtype (the reference's g @ w2^T tensor), then d z from it
                        # (ATen's gelu_backward, threshold_backward, silu_backward formulas)
                        if out_ptr.dtype.element_ty == tl.bfloat16:
                            acc = cast(acc, tl.bfloat16).to(ACC)
                        elif out_ptr.dtype.element_ty == tl.float16:
                            acc = acc.to(tl.float16).to(ACC)
                        if ACT == 4:
                            gu = acc * zu
                            if out_ptr.dtype.element_ty == tl.bfloat16:
                                gu = cast(gu, tl.bfloat16).to(ACC)
                                silu = cast(silu, tl.bfloat16).to(ACC)
                            elif out_ptr.dtype.element_ty == tl.float16:
                                gu = gu.to(tl.float16).to(ACC)
                                silu = silu.to(tl.float16).to(ACC)
                            dz = gu * sg * (1.0 + zg * (1.0 - sg))
                            du = acc * silu
                            if out_ptr.dtype.element_ty == tl.bfloat16:
                                du = cast(du, tl.bfloat16)
                            tl.store(op + HALF, du.to(out_ptr.dtype.element_ty), mask=m2)
                        elif ACT == 1:
                            dz = acc * (cdf + zg * tl.exp(-0.5 * zg * zg) * 0.3989422804014327)
                        elif ACT == 2:
                            dz = tl.where(zg <= 0, 0.0, acc)
                        elif ACT == 3:
                            dz = acc * sg * (1.0 + zg * (1.0 - sg))
                        else:
                            dz = acc
                        res = dz
                else:
                    if ROW_W:
                        acc = acc * rw[:, None]
                    if HAS_BIAS:  # the product rounded to the output dtype, then the bias added (as the reference)
                        if out_ptr.dtype.element_ty == tl.bfloat16:
                            acc = cast(acc, tl.bfloat16).to(ACC)
                        elif out_ptr.dtype.element_ty == tl.float16:
                            acc = acc.to(tl.float16).to(ACC)
                        acc += tl.load(bias_ptr + e64 * NC + cols64, mask=cmask, other=0.0).to(ACC)[None, :]
                    res = acc
                if STORE:
                    if out_ptr.dtype.element_ty == tl.bfloat16:
                        res = cast(res, tl.bfloat16)
                    tl.store(op, res.to(out_ptr.dtype.element_ty), mask=m2)
            elif seg == E:  # the rows past offsets[E]: zeros
                if STORE:
                    mt = in_e[:, None] & cmask[None, :]
                    zero = tl.zeros([BM, BN], dtype=out_ptr.dtype.element_ty)
                    op = out_ptr + rows64[:, None] * ldo + cols64[None, :]
                    tl.store(op, zero, mask=mt)
                    if ACT_BWD:
                        if ACT == 4:
                            tl.store(op + HALF, zero, mask=mt)


@triton.jit
def _experts_gemm_kernel(
        a_ptr, b_ptr, src_ptr, rw_ptr, offsets_ptr, out_ptr, bsum_ptr,
        I, J, lda, ldb, HALF, soe, soi, soj,
        BI: tl.constexpr, BJ: tl.constexpr, BR: tl.constexpr,
        A_GATHER: tl.constexpr, A_ACT: tl.constexpr, ACT: tl.constexpr, B_GATHER: tl.constexpr,
        ROW_W: tl.constexpr, BSUM: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
        DOT64: tl.constexpr, PREC: tl.constexpr):
    """out[e, i, j] = sum over the rows r of expert e, in order, of A[r, i] B[r, j] (out at
    e soe + i soi + j soj: the weight's layout); BSUM: bsum[e, j] = sum_r B[r, j] (program i = 0).

    A: rows of ``a`` (A_GATHER: through sources) or act(z) (A_ACT, as in _rows_gemm_kernel). B: rows
    of ``b`` (B_GATHER: through sources), times rw[r] and rounded to the storage dtype when ROW_W
    (the rows of the combine's gradient, w * g, as the reference stores them)."""
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
    acc = tl.zeros([BI, BJ], dtype=ACC)
    bs = tl.zeros([BJ], dtype=ACC)
    for r0 in range(lo, hi, BR):
        rows = r0 + tl.arange(0, BR)
        rmask = rows < hi
        rows64 = rows.to(tl.int64)
        if A_GATHER or B_GATHER:
            src = tl.load(src_ptr + rows64, mask=rmask, other=-1).to(tl.int64)
        if A_GATHER:
            ar = src
            a_ok = rmask & (src >= 0)
        else:
            ar = rows64
            a_ok = rmask
        am = a_ok[:, None] & imask[None, :]
        ap = a_ptr + ar[:, None] * lda + ii64[None, :]
        a = tl.load(ap, mask=am, other=0.0)
        if A_ACT:
            zf = a.to(ACC)
            if ACT == 4:  # swiglu, rounding silu(gate) to z's dtype first as the reference does
                h = zf / (1.0 + tl.exp(-zf))
                if a_ptr.dtype.element_ty == tl.bfloat16:
                    h = cast(h, tl.bfloat16).to(ACC)
                elif a_ptr.dtype.element_ty == tl.float16:
                    h = h.to(tl.float16).to(ACC)
                h = h * tl.load(ap + HALF, mask=am, other=0.0).to(ACC)
            elif ACT == 1:
                h = 0.5 * zf * (1.0 + tl.math.erf(zf * 0.7071067811865476))
            elif ACT == 2:
                h = tl.where(zf < 0, 0.0, zf)
            elif ACT == 3:
                h = zf / (1.0 + tl.exp(-zf))
            else:
                h = zf
            if a_ptr.dtype.element_ty == tl.bfloat16:
                a = cast(h, tl.bfloat16)
            else:
                a = h.to(a_ptr.dtype.element_ty)
        if B_GATHER:
            br = src
            b_ok = rmask & (src >= 0)
        else:
            br = rows64
            b_ok = rmask
        b = tl.load(b_ptr + br[:, None] * ldb + jj64[None, :], mask=b_ok[:, None] & jmask[None, :], other=0.0)
        if ROW_W:
            wb = b.to(ACC) * tl.load(rw_ptr + rows64, mask=rmask, other=0.0).to(ACC)[:, None]
            if b_ptr.dtype.element_ty == tl.bfloat16:
                b = cast(wb, tl.bfloat16)
            else:
                b = wb.to(b_ptr.dtype.element_ty)
        at = tl.trans(a)
        if ACC == tl.float64:
            if DOT64:
                acc = tl.dot(at, b, acc, out_dtype=ACC)
            else:
                acc += tl.sum(at.to(ACC)[:, :, None] * b.to(ACC)[None, :, :], axis=1)
        elif UPCAST:
            acc = tl.dot(at.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif at.dtype == tl.float32:
            acc = tl.dot(at, b, acc, input_precision=PREC)
        else:
            acc = tl.dot(at, b, acc)
        if BSUM:
            bs += tl.sum(b.to(ACC), axis=0)
    e64 = e.to(tl.int64)
    res = acc
    if out_ptr.dtype.element_ty == tl.bfloat16:
        res = cast(acc, tl.bfloat16)
    tl.store(out_ptr + e64 * soe + ii64[:, None] * soi + jj64[None, :] * soj, res.to(out_ptr.dtype.element_ty),
             mask=imask[:, None] & jmask[None, :])
    if BSUM:
        if pid_i == 0:
            rs = bs
            if bsum_ptr.dtype.element_ty == tl.bfloat16:
                rs = cast(bs, tl.bfloat16)
            tl.store(bsum_ptr + e64 * J + jj64, rs.to(bsum_ptr.dtype.element_ty), mask=jmask)


@triton.jit(do_not_specialize=["N"])
def _row_weight_kernel(src_ptr, slots_ptr, w_ptr, rw_ptr, N, K: tl.constexpr, BR: tl.constexpr):
    """rw[r] = weights[t, j] for the assignment (t, j) whose slot is r (t = sources[r], found by
    scanning the token's k slots); 0 for a padding row."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    inside = rows < N
    rows64 = rows.to(tl.int64)
    t = tl.load(src_ptr + rows64, mask=inside, other=-1).to(tl.int64)
    valid = inside & (t >= 0)
    rw = tl.zeros([BR], dtype=rw_ptr.dtype.element_ty)
    for j in tl.static_range(K):
        s = tl.load(slots_ptr + t * K + j, mask=valid, other=-1)
        w = tl.load(w_ptr + t * K + j, mask=valid, other=0.0).to(rw_ptr.dtype.element_ty)
        rw = tl.where(valid & (s == rows), w, rw)
    tl.store(rw_ptr + rows64, rw, mask=inside)


@triton.jit(do_not_specialize=["T", "N", "NCT"])
def _gate_grad_kernel(part_ptr, slots_ptr, gw_ptr, T, N, NCT, K: tl.constexpr, BT: tl.constexpr):
    """grad_w[t, j] = sum_c part[c, slots[t, j]] over the column tiles c in order; 0 for a dropped slot."""
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    tmask = tok < T
    t64 = tok.to(tl.int64)
    for j in tl.static_range(K):
        s = tl.load(slots_ptr + t64 * K + j, mask=tmask, other=-1).to(tl.int64)
        valid = tmask & (s >= 0)
        acc = tl.zeros([BT], dtype=part_ptr.dtype.element_ty)
        for c in range(0, NCT):
            acc += tl.load(part_ptr + tl.cast(c, tl.int64) * N + s, mask=valid, other=0.0)
        res = tl.where(valid, acc, 0.0)
        if gw_ptr.dtype.element_ty == tl.bfloat16:
            res = cast(res, tl.bfloat16)
        tl.store(gw_ptr + t64 * K + j, res.to(gw_ptr.dtype.element_ty), mask=tmask)
