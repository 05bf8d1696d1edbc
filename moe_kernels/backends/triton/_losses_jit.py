"""The triton programs of the router losses (imported on first use: this module imports triton).

Every reduction over tokens is a fixed two-stage one: a program per block of tokens writes its
block's partial sums (column sums of the scores, an expert histogram, per-task sums), and one
program adds the blocks' partials in block order. No atomics, so results are bitwise
deterministic for a given shape. Loads are masked; offsets into [T, ...] buffers are int64.
"""

import triton
import triton.language as tl

from ._jit_util import cast
from ._jit_util import up as _up
from ._jit_util import zeros as _zeros


@triton.jit
def _const(v: tl.constexpr, FP64: tl.constexpr):
    if FP64:
        return tl.full([1], v, dtype=tl.float64)
    else:
        return tl.full([1], v, dtype=tl.float32)


@triton.jit
def _clamp_min(x, lo):
    """``max(x, lo)`` that keeps NaN (as ``torch.clamp_min`` does)."""
    return tl.where(x < lo, lo, x)


@triton.jit
def _scores(lf, cmask, SOFTMAX: tl.constexpr):
    """Softmax, or sigmoid normalised per token, of the [BT, BE] upcast logits (columns past E: 0)."""
    if SOFTMAX:
        work = tl.where(cmask[None, :], lf, float("-inf"))
        mx = tl.max(work, axis=1)
        ex = tl.where(cmask[None, :], tl.exp(work - mx[:, None]), 0.0)
        return ex / tl.sum(ex, axis=1)[:, None]
    else:
        s = tl.where(cmask[None, :], 1.0 / (1.0 + tl.exp(-lf)), 0.0)
        return s / tl.sum(s, axis=1)[:, None]


@triton.jit
def _lse(lf, cmask):
    work = tl.where(cmask[None, :], lf, float("-inf"))
    mx = tl.max(work, axis=1)
    mx = tl.where(tl.abs(mx) < float("inf"), mx, 0.0)  # all -inf rows (and inf) as torch.logsumexp
    ex = tl.where(cmask[None, :], tl.exp(work - mx[:, None]), 0.0)
    return mx + tl.log(tl.sum(ex, axis=1))


@triton.jit(do_not_specialize=["T"])
def _router_partial_kernel(logits_ptr, ids_ptr, psum_ptr, hist_ptr, zsum_ptr, T, E,
                           K: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, SOFTMAX: tl.constexpr,
                           FP64: tl.constexpr, DO_P: tl.constexpr, DO_HIST: tl.constexpr, DO_Z: tl.constexpr):
    """One block of BT tokens: column sums of the scores (DO_P, psum[pid, :E]), the histogram of the
    block's top-k ids (DO_HIST, hist[pid, :E]) and the sum of logsumexp^2 (DO_Z, zsum[pid])."""
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    cols = tl.arange(0, BE)
    cmask = cols < E
    m2 = rmask[:, None] & cmask[None, :]
    p64 = pid.to(tl.int64)
    if DO_P or DO_Z:
        lf = _up(tl.load(logits_ptr + r64[:, None] * E + cols[None, :], mask=m2, other=0.0), FP64)
        if DO_P:
            q = tl.where(m2, _scores(lf, cmask, SOFTMAX), 0.0)
            tl.store(psum_ptr + p64 * E + cols, tl.sum(q, axis=0), mask=cmask)
        if DO_Z:
            lse = _lse(lf, cmask)
            tl.store(zsum_ptr + p64, tl.sum(tl.where(rmask, lse * lse, 0.0), axis=0))
    if DO_HIST:
        h = tl.zeros([BE], dtype=tl.int32)
        for j in tl.static_range(K):
            ids = tl.load(ids_ptr + r64 * K + j, mask=rmask, other=-1)
            h += tl.sum(tl.where((ids[:, None] == cols[None, :]) & rmask[:, None], 1, 0), axis=0)
        tl.store(hist_ptr + p64 * E + cols, h, mask=cmask)


@triton.jit(do_not_specialize=["NB", "T"])
def _router_finish_kernel(psum_ptr, hist_ptr, zsum_ptr, out_ptr, NB, T, E, K: tl.constexpr,
                          BNB: tl.constexpr, BE: tl.constexpr, FP64: tl.constexpr, MODE: tl.constexpr):
    """One program adds the blocks' partials in block order. MODE 0: the load-balancing loss
    E * sum_e f_e P_e into out[0]; 1: f_e (the backward's factor) into out[:E]; 2: the z-loss."""
    cols = tl.arange(0, BE)
    cmask = cols < E
    if MODE == 2:
        acc = _zeros([BNB], FP64)
        for b0 in range(0, NB, BNB):
            bb = b0 + tl.arange(0, BNB)
            acc += tl.load(zsum_ptr + bb, mask=bb < NB, other=0.0)
        tl.store(out_ptr, tl.sum(acc, axis=0) / T)
    else:
        cnt = tl.zeros([BE], dtype=tl.int64)
        p = _zeros([BE], FP64)
        for b0 in range(0, NB, BNB):
            bb = (b0 + tl.arange(0, BNB)).to(tl.int64)
            m = (bb < NB)[:, None] & cmask[None, :]
            cnt += tl.sum(tl.load(hist_ptr + bb[:, None] * E + cols[None, :], mask=m, other=0).to(tl.int64),
                          axis=0)
            if MODE == 0:
                p += tl.sum(tl.load(psum_ptr + bb[:, None] * E + cols[None, :], mask=m, other=0.0), axis=0)
        f = _up(cnt, FP64) / (T * K)
        if MODE == 0:
            tl.store(out_ptr, E * tl.sum(tl.where(cmask, f * (p / T), 0.0), axis=0))
        else:
            tl.store(out_ptr + cols, f, mask=cmask)


@triton.jit(do_not_specialize=["T"])
def _lb_grad_kernel(grad_ptr, logits_ptr, f_ptr, out_ptr, T, E, BT: tl.constexpr, BE: tl.constexpr,
                    SOFTMAX: tl.constexpr, FP64: tl.constexpr):
    """d loss / d logits of the load-balancing loss, given f (one program per block of tokens)."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    cols = tl.arange(0, BE)
    cmask = cols < E
    m2 = rmask[:, None] & cmask[None, :]
    lf = _up(tl.load(logits_ptr + r64[:, None] * E + cols[None, :], mask=m2, other=0.0), FP64)
    f = _up(tl.load(f_ptr + cols, mask=cmask, other=0.0), FP64)
    g = _up(tl.load(grad_ptr), FP64)
    gq = (g * E / T) * f[None, :]
    if SOFTMAX:
        q = _scores(lf, cmask, True)
        gl = q * (gq - tl.sum(tl.where(m2, gq * q, 0.0), axis=1)[:, None])
    else:
        s = tl.where(cmask[None, :], 1.0 / (1.0 + tl.exp(-lf)), 0.0)
        tot = tl.sum(s, axis=1)[:, None]
        q = s / tot
        gs = (gq - tl.sum(tl.where(m2, gq * q, 0.0), axis=1)[:, None]) / tot
        gl = gs * s * (1.0 - s)
    tl.store(out_ptr + r64[:, None] * E + cols[None, :], cast(gl, out_ptr.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=["T"])
def _z_grad_kernel(grad_ptr, logits_ptr, out_ptr, T, E, BT: tl.constexpr, BE: tl.constexpr, FP64: tl.constexpr):
    """d z-loss / d logits = grad * 2 / T * lse_t * softmax(logits_t)."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    cols = tl.arange(0, BE)
    cmask = cols < E
    m2 = rmask[:, None] & cmask[None, :]
    lf = _up(tl.load(logits_ptr + r64[:, None] * E + cols[None, :], mask=m2, other=0.0), FP64)
    g = _up(tl.load(grad_ptr), FP64)
    lse = _lse(lf, cmask)
    q = _scores(lf, cmask, True)
    gl = (g * 2.0 / T) * lse[:, None] * q
    tl.store(out_ptr + r64[:, None] * E + cols[None, :], cast(gl, out_ptr.dtype.element_ty), mask=m2)


# ---- mutual information

@triton.jit(do_not_specialize=["T"])
def _task_partial_kernel(probs_ptr, tids_ptr, part_ptr, T, E, M, BT: tl.constexpr, BE: tl.constexpr,
                         FP64: tl.constexpr):
    """part[pid, i, :] = sum of the block's probs rows of task i (i = 0..M-1, in fp32/fp64)."""
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    cols = tl.arange(0, BE)
    cmask = cols < E
    m2 = rmask[:, None] & cmask[None, :]
    p = _up(tl.load(probs_ptr + r64[:, None] * E + cols[None, :], mask=m2, other=0.0), FP64)
    task = tl.load(tids_ptr + r64, mask=rmask, other=-1).to(tl.int64)
    base = pid.to(tl.int64) * M * E
    for i in range(0, M):
        s = tl.sum(tl.where(m2 & (task == i)[:, None], p, 0.0), axis=0)
        tl.store(part_ptr + base + i * E + cols, s, mask=cmask)


@triton.jit(do_not_specialize=["NB"])
def _mi_finish_kernel(part_ptr, buf_ptr, grad_ptr, loss_ptr, gs_ptr, NB, M, E, EPS_INV: tl.constexpr,
                      TINY: tl.constexpr, BM: tl.constexpr, BE: tl.constexpr,
                      FP64: tl.constexpr, EMA: tl.constexpr, BACKWARD: tl.constexpr):
    """One program: S = the blocks' per-task sums added in block order, P(E|D) = S / Z, the joint
    J = P(E|D) / M, then the loss (batch form, or EMA form with the buffer) into loss[0], or with
    BACKWARD the gradient w.r.t. the per-task sums, gS [M, E], into gs."""
    ti = tl.arange(0, BM)
    cols = tl.arange(0, BE)
    m2 = (ti < M)[:, None] & (cols < E)[None, :]
    off = ti.to(tl.int64)[:, None] * E + cols[None, :]
    # the clamp MI_EPS = 1 / EPS_INV and log(M) in the accumulation dtype (a float literal is fp32)
    MI_EPS = 1.0 / _const(EPS_INV, FP64)
    LOG_EPS = tl.log(MI_EPS)
    S = _zeros([BM, BE], FP64)
    ptrs = part_ptr + off
    for _b in range(0, NB):
        S += tl.load(ptrs, mask=m2, other=0.0)
        ptrs += M * E
    Z = tl.sum(S, axis=1)[:, None]
    present = Z != 0  # an absent task sums to exactly 0; a NaN sum stays present (and NaN)
    Zc = _clamp_min(Z, TINY)
    Q = tl.where(present & m2, S / Zc, 0.0)
    J = Q / M
    PE = tl.sum(J, axis=0)[None, :]
    if EMA:
        B = _up(tl.load(buf_ptr + off, mask=m2, other=0.0), FP64)
        cB = 1.0 + tl.log(_clamp_min(B, MI_EPS))
        cE = 1.0 + tl.log(_clamp_min(tl.sum(B, axis=0)[None, :], MI_EPS))
    if not BACKWARD:
        if EMA:
            loss = -tl.sum(tl.sum(tl.where(m2, cB * J, 0.0), axis=1), axis=0) \
                + tl.sum(tl.sum(tl.where((ti == 0)[:, None] & m2, cE * PE, 0.0), axis=1), axis=0)
        else:
            hJ = tl.where(m2, J * tl.log(_clamp_min(J, MI_EPS)), 0.0)
            hE = tl.where((ti == 0)[:, None] & m2, PE * tl.log(_clamp_min(PE, MI_EPS)), 0.0)
            log_m = tl.sum(tl.log(_const(0.0, FP64) + M), axis=0)  # log M in the accumulation dtype
            loss = -tl.sum(tl.sum(hJ, axis=1), axis=0) + tl.sum(tl.sum(hE, axis=1), axis=0) - log_m
        tl.store(loss_ptr, loss)
    else:
        g = _up(tl.load(grad_ptr), FP64)
        if EMA:
            gJ = g * (cE - cB)
        else:
            dJ = tl.where(J > MI_EPS, 1.0 + tl.log(_clamp_min(J, MI_EPS)), LOG_EPS)
            dPE = tl.where(PE > MI_EPS, 1.0 + tl.log(_clamp_min(PE, MI_EPS)), LOG_EPS)
            gJ = g * (dPE - dJ)
        gQ = tl.where(m2, gJ / M, 0.0)
        Qa = S / Zc
        Zd = tl.where(Z != 0, Zc, 1.0)  # absent tasks get 0 (and no inf on the way)
        gS = tl.where(Z != 0, (gQ - tl.sum(tl.where(m2, gQ * Qa, 0.0), axis=1)[:, None]) / Zd, 0.0)
        tl.store(gs_ptr + off, gS, mask=m2)


@triton.jit(do_not_specialize=["T"])
def _task_rows_kernel(gs_ptr, tids_ptr, out_ptr, T, E, BT: tl.constexpr, BE: tl.constexpr):
    """out[t] = gS[task[t]] in the probs' dtype (one program per block of tokens)."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    cols = tl.arange(0, BE)
    m2 = rmask[:, None] & (cols < E)[None, :]
    task = tl.load(tids_ptr + r64, mask=rmask, other=0).to(tl.int64)
    v = tl.load(gs_ptr + task[:, None] * E + cols[None, :], mask=m2, other=0.0)
    tl.store(out_ptr + r64[:, None] * E + cols[None, :], cast(v, out_ptr.dtype.element_ty), mask=m2)
