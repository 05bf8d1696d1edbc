"""The triton programs of routing (imported on first use: this module imports triton).

The plan is built from per-block expert histograms, never from atomics, so it is deterministic and
keeps token order inside an expert (see :mod:`moe_kernels.backends.triton.routing` for the passes).
Rules followed throughout: every load is masked (the interpreter checks no bounds); a mask never
combines a vector with a scalar (the interpreter rejects it): scalars are broadcast first; offsets
into [T, ...] buffers are int64.
"""

import triton
import triton.language as tl

from ._jit_util import cast
from ._jit_util import up as _up


@triton.jit(do_not_specialize=["T"])
def _topk_kernel(logits_ptr, x_ptr, w_ptr, task_ptr, batch_task, T, E, D,
                 logits_out_ptr, ids_ptr, weights_ptr, prio_ptr, hist_ptr,
                 K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, BD: tl.constexpr,
                 SOFTMAX: tl.constexpr, RENORM: tl.constexpr, FP64: tl.constexpr, TASK: tl.constexpr,
                 HIST: tl.constexpr, PRIO: tl.constexpr, TINY: tl.constexpr):
    """One block of BT tokens: (task logits,) scores, top-k, weights, priorities, expert histogram.

    TASK: 0 = logits given; 1 = logits = x @ W[batch_task]; 2 = logits[t] = x[t] @ W[task[t]].
    """
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    cols = tl.arange(0, BE)
    cmask = cols < E
    m2 = rmask[:, None] & cmask[None, :]
    if TASK == 0:
        lf = _up(tl.load(logits_ptr + r64[:, None] * E + cols[None, :], mask=m2, other=0.0), FP64)
    else:
        if TASK == 1:
            task = tl.zeros([BT], dtype=tl.int64) + batch_task
        else:
            task = tl.load(task_ptr + r64, mask=rmask, other=0).to(tl.int64)
        if FP64:
            acc = tl.zeros([BT, BE], dtype=tl.float64)
        else:
            acc = tl.zeros([BT, BE], dtype=tl.float32)
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD)
            dmask = dd < D
            xv = _up(tl.load(x_ptr + r64[:, None] * D + dd[None, :], mask=rmask[:, None] & dmask[None, :],
                             other=0.0), FP64)
            wmask = m2[:, None, :] & dmask[None, :, None]
            wv = _up(tl.load(w_ptr + (task[:, None, None] * D + dd[None, :, None]) * E + cols[None, None, :],
                             mask=wmask, other=0.0), FP64)
            acc += tl.sum(xv[:, :, None] * wv, axis=1)
        lo = cast(acc, logits_out_ptr.dtype.element_ty)  # logits are in x.dtype: route those values
        tl.store(logits_out_ptr + r64[:, None] * E + cols[None, :], lo, mask=m2)
        lf = _up(lo, FP64)

    NEG = float("-inf")
    finite = (lf == lf) & (tl.abs(lf) < float("inf"))
    bad = tl.sum(tl.where(m2, tl.where(finite, 0, 1), 0), axis=1) > 0
    lf = tl.where(finite, lf, 0.0)  # keep NaN out of the arithmetic; bad tokens are overridden below
    work = tl.where(cmask[None, :], lf, NEG)  # rows past T hold zeros: finite, never stored
    if SOFTMAX:
        mx = tl.max(work, axis=1)
        ex = tl.where(cmask[None, :], tl.exp(work - mx[:, None]), 0.0)
        s = ex / tl.sum(ex, axis=1)[:, None]
    else:
        s = 1.0 / (1.0 + tl.exp(-lf))

    kc = tl.arange(0, KP)
    if FP64:
        topw = tl.zeros([BT, KP], dtype=tl.float64)
    else:
        topw = tl.zeros([BT, KP], dtype=tl.float32)
    topi = tl.zeros([BT, KP], dtype=tl.int32)
    oh = tl.zeros([BT, BE], dtype=tl.int32)
    for j in tl.static_range(K):
        mx = tl.max(work, axis=1)
        idx = tl.min(tl.where(work == mx[:, None], cols[None, :], BE), axis=1)  # ties: lower id
        idx = tl.where(bad, j, idx)
        sel = cols[None, :] == idx[:, None]
        sj = tl.sum(tl.where(sel, s, 0.0), axis=1)
        work = tl.where(sel, NEG, work)
        oh += tl.where(sel & rmask[:, None], 1, 0)
        topw = tl.where(kc[None, :] == j, sj[:, None], topw)
        topi = tl.where(kc[None, :] == j, idx[:, None], topi)
    km = rmask[:, None] & (kc < K)[None, :]
    kaddr = r64[:, None] * K + kc[None, :]
    if PRIO:
        tl.store(prio_ptr + kaddr, tl.where(bad[:, None], NEG, topw), mask=km)
    if RENORM:
        tot = tl.maximum(tl.sum(topw, axis=1), TINY)
        topw = topw / tot[:, None]
    topw = tl.where(bad[:, None], float("nan"), topw)
    tl.store(weights_ptr + kaddr, topw, mask=km)
    tl.store(ids_ptr + kaddr, topi, mask=km)
    if HIST:
        tl.store(hist_ptr + pid.to(tl.int64) * E + cols, tl.sum(oh, axis=0), mask=cmask)


@triton.jit
def _key(p):
    """A signed integer that orders like the non-negative priority ``p``; -1 for -inf (and NaN)."""
    if p.dtype == tl.float64:
        bits = p.to(tl.int64, bitcast=True)
    else:  # fp32, or fp16/bf16 upcast exactly (their order is kept)
        bits = p.to(tl.float32).to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(p > 0, bits, tl.where(p == 0, 0, -1))


@triton.jit
def _count(ids_ptr, prio_ptr, TK, es, v, cand, K: tl.constexpr, TIES: tl.constexpr, BA: tl.constexpr):
    """[BEP, 16] counts, per expert es[i] and candidate cand[i, q]: its assignments with key >=
    cand[i, q] (TIES=0), or with key == v[i] and token < cand[i, q] (TIES=1). One pass over the
    [T, k] assignments, vectorised over a block of experts and 16 candidates (one radix digit)."""
    n = tl.zeros(cand.shape, dtype=tl.int32)
    for a0 in range(0, TK, BA):
        offs = a0 + tl.arange(0, BA).to(tl.int64)
        m = offs < TK
        ide = tl.load(ids_ptr + offs, mask=m, other=-1)
        key = _key(tl.load(prio_ptr + offs, mask=m, other=0.0))
        mine = (ide[:, None] == es[None, :]) & m[:, None]
        if TIES:
            mine = mine & (key[:, None] == v[None, :])
            hit = mine[:, :, None] & ((offs // K)[:, None, None] < cand[None, :, :])
        else:
            hit = mine[:, :, None] & (key[:, None, None] >= cand[None, :, :])
        n += tl.sum(tl.where(hit, 1, 0), axis=0)
    return n


@triton.jit(do_not_specialize=["T"])
def _threshold_kernel(ids_ptr, prio_ptr, thr_v_ptr, thr_tau_ptr, T, E, C, TDIGITS,
                      K: tl.constexpr, BA: tl.constexpr, BEP: tl.constexpr, VDIGITS: tl.constexpr):
    """Score priority, for a block of BEP experts: expert e keeps the assignments with key > v_e and
    the ties key == v_e with token < tau_e (ties by token order): exactly its C best. v_e (the C-th
    largest key) and tau_e are found one hexadecimal digit at a time, each digit one counting pass
    (no sort, no atomics)."""
    es = tl.program_id(0) * BEP + tl.arange(0, BEP)
    emask = es < E
    es = tl.where(emask, es, -5)  # matches no id
    TK = tl.cast(T, tl.int64) * K  # also when T is a compile-time 1 (a plain int, no .to())
    zero = tl.zeros([BEP], dtype=tl.int64)
    dig = tl.arange(0, 16).to(tl.int64)
    first = tl.where(dig == 0, -2, 0)[None, :] + zero[:, None]  # count(key >= -2), count(key >= 0)
    c0 = _count(ids_ptr, prio_ptr, TK, es, zero, first, K, 0, BA)
    n_e = tl.sum(tl.where(dig[None, :] == 0, c0, 0), axis=1)
    n_pos = tl.sum(tl.where(dig[None, :] == 1, c0, 0), axis=1)
    # v: the largest key with count(key >= v) >= C (keys are >= -1; -1 when fewer than C are >= 0)
    v = tl.where(n_pos >= C, zero, zero - 1)
    for i in range(VDIGITS):
        sh = 4 * (VDIGITS - 1 - i)
        cand = v[:, None] | (dig[None, :] << sh)
        cnt = _count(ids_ptr, prio_ptr, TK, es, zero, cand, K, 0, BA)
        ok = (cnt >= C) & (cand >= 0) & (v[:, None] >= 0)  # cand < 0: the digit overflowed int64
        q = tl.max(tl.where(ok, dig[None, :], 0), axis=1)
        v = tl.where(v >= 0, v | (q << sh), v)
    gt = _count(ids_ptr, prio_ptr, TK, es, zero, v[:, None] + 1 + dig[None, :] * 0, K, 0, BA)
    need = C - tl.max(gt, axis=1)
    # m: the largest token bound <= T with fewer than `need` ties among the tokens < m; token m
    # is then the last tie kept
    m = zero
    for i in range(TDIGITS):
        sh = 4 * (TDIGITS - 1 - i)
        cand = m[:, None] | (dig[None, :] << sh)
        cnt = _count(ids_ptr, prio_ptr, TK, es, v, cand, K, 1, BA)
        ok = (cand <= T) & (cnt < need[:, None])
        q = tl.max(tl.where(ok, dig[None, :], 0), axis=1)
        m = m | (q << sh)
    keep_all = n_e <= C
    tl.store(thr_v_ptr + es, tl.where(keep_all, -2, v), mask=emask)
    tl.store(thr_tau_ptr + es, tl.where(keep_all, 0, m + 1), mask=emask)


@triton.jit
def _block_assignments(ids_ptr, prio_ptr, thr_v_ptr, thr_tau_ptr, rows, rmask, E,
                       K: tl.constexpr, KP: tl.constexpr, SCORE: tl.constexpr):
    """A block's [BT, KP] expert ids and which assignments count: they exist, go to an expert of
    this rank (ids in [0, E): ``plan`` leaves the others out) and, under score priority, are kept
    by the expert's threshold."""
    r64 = rows.to(tl.int64)
    kc = tl.arange(0, KP)
    km = rmask[:, None] & (kc < K)[None, :]
    addr = r64[:, None] * K + kc[None, :]
    ids = tl.load(ids_ptr + addr, mask=km, other=-1)
    counted = km & (ids >= 0) & (ids < E)
    if SCORE:
        key = _key(tl.load(prio_ptr + addr, mask=km, other=0.0))
        v = tl.load(thr_v_ptr + ids, mask=counted, other=0)
        tau = tl.load(thr_tau_ptr + ids, mask=counted, other=0)
        counted = counted & ((key > v) | ((key == v) & (r64[:, None] < tau)))
    return ids, counted


@triton.jit(do_not_specialize=["T"])
def _hist_kernel(ids_ptr, prio_ptr, thr_v_ptr, thr_tau_ptr, hist_ptr, T, E,
                 K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, SCORE: tl.constexpr):
    """Per-block histogram of the local assignments (SCORE: of those kept under score priority)."""
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    cols = tl.arange(0, BE)
    ids, counted = _block_assignments(ids_ptr, prio_ptr, thr_v_ptr, thr_tau_ptr, rows, rows < T, E, K, KP, SCORE)
    hit = (ids[:, :, None] == cols[None, None, :]) & counted[:, :, None]
    oh = tl.sum(tl.where(hit, 1, 0), axis=1)
    tl.store(hist_ptr + pid.to(tl.int64) * E + cols, tl.sum(oh, axis=0), mask=cols < E)


@triton.jit(do_not_specialize=["NB", "TK"])
def _scan_kernel(hist_ptr, base_ptr, counts_ptr, offsets_ptr, dropped_ptr, NB, E, C, PAD, TK,
                 BNB: tl.constexpr, BE: tl.constexpr, CAP_BY_RANK: tl.constexpr):
    """One program: per-expert exclusive prefix over blocks (base), counts, padded offsets, drops."""
    cols = tl.arange(0, BE)
    cmask = cols < E
    run = tl.zeros([BE], dtype=tl.int32)
    for b0 in range(0, NB, BNB):
        rb = b0 + tl.arange(0, BNB)
        m = (rb < NB)[:, None] & cmask[None, :]
        addr = rb.to(tl.int64)[:, None] * E + cols[None, :]
        h = tl.load(hist_ptr + addr, mask=m, other=0)
        inc = tl.cumsum(h, axis=0)
        tl.store(base_ptr + addr, inc - h + run[None, :], mask=m)
        run += tl.sum(h, axis=0)
    if CAP_BY_RANK:  # position priority: the first C in token order are kept
        counts = tl.minimum(run, C)
    else:
        counts = run
    padded = (counts + (PAD - 1)) // PAD * PAD
    tl.store(counts_ptr + cols, counts, mask=cmask)
    tl.store(offsets_ptr + 1 + cols, tl.cumsum(padded, axis=0), mask=cmask)
    tl.store(offsets_ptr + cols, tl.zeros([BE], dtype=tl.int32), mask=cols == 0)
    tl.store(dropped_ptr, TK - tl.sum(counts.to(tl.int64), axis=0))


@triton.jit(do_not_specialize=["T"])
def _slots_kernel(ids_ptr, prio_ptr, thr_v_ptr, thr_tau_ptr, base_ptr, offsets_ptr, slots_ptr, sources_ptr,
                  T, E, C, K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
                  POLICY: tl.constexpr):
    """Rows of a block's assignments: offsets[e] + (earlier blocks' count, from the scan) + (earlier
    tokens of this block): stable in token order. POLICY: 0 dropless, 1 capacity by position, 2 by score."""
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    cols = tl.arange(0, BE)
    cmask = cols < E
    kc = tl.arange(0, KP)
    ids, keep = _block_assignments(ids_ptr, prio_ptr, thr_v_ptr, thr_tau_ptr, rows, rmask, E, K, KP, POLICY == 2)
    match = ids[:, :, None] == cols[None, None, :]  # [BT, KP, BE]; a token has an expert at most once
    oh = tl.sum(tl.where(match & keep[:, :, None], 1, 0), axis=1)
    base = tl.load(base_ptr + pid.to(tl.int64) * E + cols, mask=cmask, other=0)
    excl = tl.cumsum(oh, axis=0) - oh + base[None, :]
    rank = tl.sum(tl.where(match, excl[:, None, :], 0), axis=2)  # [BT, KP]
    if POLICY == 1:
        keep = keep & (rank < C)
    km = rmask[:, None] & (kc < K)[None, :]
    off = tl.load(offsets_ptr + ids, mask=keep, other=0)
    slot = tl.where(keep, off + rank, -1)
    tl.store(slots_ptr + r64[:, None] * K + kc[None, :], slot, mask=km)
    tl.store(sources_ptr + slot.to(tl.int64), rows[:, None] + kc[None, :] * 0, mask=keep)


@triton.jit(do_not_specialize=["T"])
def _route_grad_kernel(gw_ptr, gl_ptr, logits_ptr, ids_ptr, out_ptr, T, E,
                       K: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, SOFTMAX: tl.constexpr,
                       RENORM: tl.constexpr, FP64: tl.constexpr, HAS_GW: tl.constexpr, HAS_GL: tl.constexpr,
                       TINY: tl.constexpr):
    """d loss / d logits from d loss / d topk_weights (HAS_GW), rounded to the logits' dtype, plus a
    direct gradient of the logits (HAS_GL, task_route); written in out's dtype."""
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    cols = tl.arange(0, BE)
    cmask = cols < E
    m2 = rmask[:, None] & cmask[None, :]
    addr = r64[:, None] * E + cols[None, :]
    if FP64:
        grad = tl.zeros([BT, BE], dtype=tl.float64)
    else:
        grad = tl.zeros([BT, BE], dtype=tl.float32)
    if HAS_GW:
        raw = tl.load(logits_ptr + addr, mask=m2, other=0.0)
        lf = _up(raw, FP64)
        if SOFTMAX:
            work = tl.where(cmask[None, :], lf, float("-inf"))
            mx = tl.max(work, axis=1)
            ex = tl.where(cmask[None, :], tl.exp(work - mx[:, None]), 0.0)
            s = ex / tl.sum(ex, axis=1)[:, None]
        else:
            s = 1.0 / (1.0 + tl.exp(-lf))
        if FP64:
            dense = tl.zeros([BT, BE], dtype=tl.float64)
            tot = tl.zeros([BT], dtype=tl.float64)
            gdot = tl.zeros([BT], dtype=tl.float64)
        else:
            dense = tl.zeros([BT, BE], dtype=tl.float32)
            tot = tl.zeros([BT], dtype=tl.float32)
            gdot = tl.zeros([BT], dtype=tl.float32)
        if RENORM:
            for j in tl.static_range(K):
                idj = tl.load(ids_ptr + r64 * K + j, mask=rmask, other=0)
                tot += tl.sum(tl.where(cols[None, :] == idj[:, None], s, 0.0), axis=1)
            tot = tl.maximum(tot, TINY)
            for j in tl.static_range(K):
                idj = tl.load(ids_ptr + r64 * K + j, mask=rmask, other=0)
                gj = _up(tl.load(gw_ptr + r64 * K + j, mask=rmask, other=0.0), FP64)
                gdot += gj * (tl.sum(tl.where(cols[None, :] == idj[:, None], s, 0.0), axis=1) / tot)
        for j in tl.static_range(K):
            idj = tl.load(ids_ptr + r64 * K + j, mask=rmask, other=0)
            gj = _up(tl.load(gw_ptr + r64 * K + j, mask=rmask, other=0.0), FP64)
            if RENORM:
                gj = (gj - gdot) / tot
            dense += tl.where(cols[None, :] == idj[:, None], gj[:, None], 0.0)
        if SOFTMAX:
            grad = s * (dense - tl.sum(dense * s, axis=1)[:, None])
        else:
            grad = dense * s * (1.0 - s)
        grad = _up(cast(grad, raw.dtype), FP64)  # the route gradient is in the logits' dtype
    if HAS_GL:
        grad += _up(tl.load(gl_ptr + addr, mask=m2, other=0.0), FP64)
    tl.store(out_ptr + addr, cast(grad, out_ptr.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=["T"])
def _task_grad_x_kernel(g_ptr, w_ptr, task_ptr, batch_task, out_ptr, T, E, D,
                        BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, FP64: tl.constexpr,
                        PER_TOKEN: tl.constexpr):
    """grad_x[t, d] = sum_e g[t, e] * W[task(t), d, e] for one [BT, BD] tile."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_t * BT + tl.arange(0, BT)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    dd = pid_d * BD + tl.arange(0, BD)
    dmask = dd < D
    if PER_TOKEN:
        task = tl.load(task_ptr + r64, mask=rmask, other=0).to(tl.int64)
    else:
        task = tl.zeros([BT], dtype=tl.int64) + batch_task
    if FP64:
        acc = tl.zeros([BT, BD], dtype=tl.float64)
    else:
        acc = tl.zeros([BT, BD], dtype=tl.float32)
    for e0 in range(0, E, BE):
        cols = e0 + tl.arange(0, BE)
        cmask = cols < E
        g = _up(tl.load(g_ptr + r64[:, None] * E + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                        other=0.0), FP64)
        wmask = rmask[:, None, None] & dmask[None, :, None] & cmask[None, None, :]
        w = _up(tl.load(w_ptr + (task[:, None, None] * D + dd[None, :, None]) * E + cols[None, None, :],
                        mask=wmask, other=0.0), FP64)
        acc += tl.sum(g[:, None, :] * w, axis=2)
    tl.store(out_ptr + r64[:, None] * D + dd[None, :], cast(acc, out_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


@triton.jit(do_not_specialize=["T"])
def _task_grad_w_kernel(x_ptr, g_ptr, task_ptr, batch_task, out_ptr, T, E, D,
                        BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, FP64: tl.constexpr,
                        PER_TOKEN: tl.constexpr):
    """grad_W[m, d, e] = sum over the tokens t of task m of x[t, d] * g[t, e], in token order of
    blocks (no atomics); one program per (m, d tile, e tile)."""
    m = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_e = tl.program_id(2)
    dd = pid_d * BD + tl.arange(0, BD)
    dmask = dd < D
    cols = pid_e * BE + tl.arange(0, BE)
    cmask = cols < E
    if FP64:
        acc = tl.zeros([BD, BE], dtype=tl.float64)
    else:
        acc = tl.zeros([BD, BE], dtype=tl.float32)
    for t0 in range(0, T, BT):
        rows = t0 + tl.arange(0, BT)
        r64 = rows.to(tl.int64)
        if PER_TOKEN:
            task = tl.load(task_ptr + r64, mask=rows < T, other=-1)
            mine = (rows < T) & (task == m)
        else:
            mine = (rows < T) & ((tl.zeros([BT], dtype=tl.int32) + batch_task) == m)
        x = _up(tl.load(x_ptr + r64[:, None] * D + dd[None, :], mask=mine[:, None] & dmask[None, :], other=0.0),
                FP64)
        g = _up(tl.load(g_ptr + r64[:, None] * E + cols[None, :], mask=mine[:, None] & cmask[None, :], other=0.0),
                FP64)
        acc += tl.sum(x[:, :, None] * g[:, None, :], axis=0)
    addr = (m.to(tl.int64) * D + dd[:, None]) * E + cols[None, :]
    tl.store(out_ptr + addr, cast(acc, out_ptr.dtype.element_ty), mask=dmask[:, None] & cmask[None, :])
