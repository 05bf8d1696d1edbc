"""triton kernels for route, task_route and their backward.

The plan takes three launches for dropless and position-priority routing and five for score
priority, none of them reading anything on the host (the row bound ``num_rows`` is static):

1. ``_topk_kernel``, one program per block of tokens: (for ``task_route`` the router product
   ``x[t] @ W[task(t)]`` first, written as the logits in ``x.dtype``), fp32 (fp64) softmax or
   sigmoid scores, top-k by the upcast logit with ties to the lower id, the weights (renormalised
   when asked), and the block's expert histogram. A token with a non-finite logit gets experts
   0..k-1, NaN weights and priority -inf (``contract.NONFINITE_TOKEN``).
2. Score priority only: ``_threshold_kernel``, one program per expert, finds the kept set as a
   threshold on (score, token) found bit by bit (C-th largest score, then the token that ends the
   kept ties); ``_score_hist_kernel`` recounts the blocks' histograms of kept assignments.
3. ``_scan_kernel``, one program: exclusive prefix of the histograms over blocks, counts (capped at
   C by position), padded offsets and the exact number dropped.
4. ``_slots_kernel``, one program per block: row = offsets[e] + earlier blocks' count + earlier
   tokens' count in this block (stable in token order, no atomics), and ``sources`` its inverse.

The integer outputs are bit-identical to the reference's for the same logits.
"""

from __future__ import annotations

import torch

from ._common import acc_dtype, cdiv, interpreting, is_fp64, pow2

_TINY = float(torch.finfo(torch.float32).tiny)  # the reference's clamp of the renormalising sum


def _jit():
    from . import _routing_jit

    return _routing_jit


def _block_t(BE: int, KP: int = 1) -> int:
    """Tokens per program: [BT, KP, BE] tiles of at most 4096 elements on a GPU (registers), 16384
    under the interpreter (each interpreted op costs about the same whatever its size, so fewer
    programs are faster; at most 64 tokens so that tests of a hundred tokens still cross blocks)."""
    cap = 16384 if interpreting() else 4096
    return max(1, min(64, cap // (BE * KP)))


def _plan_buffers(T, k, E, dev, capacity, drop_policy, num_rows):
    """The plan's outputs and scratch, and its block geometry and policy (0 dropless, 1 capacity by
    position, 2 by score): slots, counts, offsets, sources, dropped, hist, base, BE, BT, NB, policy."""
    i32 = dict(dtype=torch.int32, device=dev)
    BE = pow2(E)
    BT = _block_t(BE, pow2(k))
    NB = cdiv(T, BT)
    policy = 0 if capacity < 0 else (1 if drop_policy == "position" else 2)
    hist = torch.zeros(max(NB, 1), E, **i32)  # zeros: with T = 0 the scan reads it unwritten
    return (torch.empty(T, k, **i32), torch.empty(E, **i32), torch.empty(E + 1, **i32),
            torch.full((num_rows,), -1, **i32), torch.empty((), dtype=torch.int64, device=dev), hist,
            torch.empty_like(hist), BE, BT, NB, policy)


def _plan(T, E, k, dev, acc, score, renormalize, capacity, drop_policy, pad_to, num_rows,
          logits=None, x=None, router_weight=None, task_ids=None, batch_task=-1):
    J = _jit()
    weights = torch.empty(T, k, dtype=acc, device=dev)
    ids = torch.empty(T, k, dtype=torch.int32, device=dev)
    slots, counts, offsets, sources, dropped, hist, base, BE, BT, NB, policy = _plan_buffers(
        T, k, E, dev, capacity, drop_policy, num_rows)
    prio = torch.empty(T, k, dtype=acc, device=dev) if policy == 2 else weights
    task = 0 if x is None else (1 if batch_task >= 0 else 2)
    if task:
        D = x.shape[1]
        logits = torch.empty(T, E, dtype=x.dtype, device=dev)
        BD = max(1, min(pow2(D), (16384 if interpreting() else 4096) // (BT * BE)))
    else:
        D, BD = 0, 1
    fp64 = acc == torch.float64
    if T > 0:
        J._topk_kernel[(NB,)](
            logits, x if task else logits, router_weight if task else logits,
            task_ids if task == 2 else ids, batch_task, T, E, D, logits, ids, weights, prio, hist,
            K=k, KP=pow2(k), BT=BT, BE=BE, BD=BD, SOFTMAX=score == "softmax", RENORM=bool(renormalize),
            FP64=fp64, TASK=task, HIST=policy != 2, PRIO=policy == 2, TINY=_TINY)
    _plan_passes(ids, prio, hist, base, counts, offsets, slots, sources, dropped, T, E, k, BT, BE, NB, policy,
                 capacity, pad_to, fp64, histogram=False)
    plan = (weights, ids, counts, offsets, slots, sources, dropped)
    return (logits,) + plan if task else plan


def _plan_passes(ids, prio, hist, base, counts, offsets, slots, sources, dropped, T, E, k, BT, BE, NB, policy,
                 capacity, pad_to, fp64, histogram):
    """Passes 2-4 of the plan (the module docstring) once the ids (and, under score priority, the
    priorities) exist; ``histogram``: the blocks' histograms are not yet written (``plan``)."""
    J = _jit()
    dev = ids.device
    thr_v = thr_tau = hist
    if T > 0:
        if histogram and policy != 2:
            J._hist_kernel[(NB,)](ids, prio, hist, hist, hist, T, E, K=k, KP=pow2(k), BT=BT, BE=BE, SCORE=False)
        if policy == 2:
            thr_v = torch.empty(E, dtype=torch.int64, device=dev)
            thr_tau = torch.empty(E, dtype=torch.int64, device=dev)
            # under the interpreter one program does every expert (vectorised); on a GPU 2 per program
            BEP = BE if interpreting() else min(BE, 2)
            BA = min(pow2(T * k), max(16, (65536 if interpreting() else 4096) // (16 * BEP)))
            J._threshold_kernel[(cdiv(E, BEP),)](ids, prio, thr_v, thr_tau, T, E, capacity,
                                                 cdiv(T.bit_length(), 4), K=k, BA=BA, BEP=BEP,
                                                 VDIGITS=16 if fp64 else 8)
            J._hist_kernel[(NB,)](ids, prio, thr_v, thr_tau, hist, T, E, K=k, KP=pow2(k), BT=BT, BE=BE, SCORE=True)
    J._scan_kernel[(1,)](hist, base, counts, offsets, dropped, NB, E, capacity, pad_to, T * k,
                         BNB=max(1, min(pow2(NB), 4096 // BE)), BE=BE, CAP_BY_RANK=policy == 1)
    if T > 0:
        J._slots_kernel[(NB,)](ids, prio, thr_v, thr_tau, base, offsets, slots, sources, T, E, capacity,
                               K=k, KP=pow2(k), BT=BT, BE=BE, POLICY=policy)


def plan(topk_ids, priority, num_experts, capacity, drop_policy, pad_to, num_rows):
    T, k = topk_ids.shape
    E = num_experts
    slots, counts, offsets, sources, dropped, hist, base, BE, BT, NB, policy = _plan_buffers(
        T, k, E, topk_ids.device, capacity, drop_policy, num_rows)
    _plan_passes(topk_ids, priority, hist, base, counts, offsets, slots, sources, dropped, T, E, k, BT, BE, NB,
                 policy, capacity, pad_to, is_fp64(priority), histogram=True)
    # the scan counts every assignment without a row as dropped: the not-local ones are not
    nonlocal_ = ((topk_ids < 0) | (topk_ids >= E)).sum(dtype=torch.int64)
    return counts, offsets, slots, sources, dropped - nonlocal_, nonlocal_


def route(logits, k, score, renormalize, capacity, drop_policy, pad_to, num_rows):
    T, E = logits.shape
    return _plan(T, E, k, logits.device, acc_dtype(logits.dtype), score, renormalize, capacity, drop_policy,
                 pad_to, num_rows, logits=logits)


def _route_grad(grad_weights, grad_logits, logits, topk_ids, score, renormalize, out_dtype):
    T, E = logits.shape
    out = torch.empty(T, E, dtype=out_dtype, device=logits.device)
    if T == 0:
        return out
    BE = pow2(E)
    BT = _block_t(BE)
    k = topk_ids.shape[1]
    _jit()._route_grad_kernel[(cdiv(T, BT),)](
        grad_weights if grad_weights is not None else logits,
        grad_logits if grad_logits is not None else logits, logits, topk_ids, out, T, E,
        K=k, BT=BT, BE=BE, SOFTMAX=score == "softmax", RENORM=bool(renormalize), FP64=is_fp64(logits),
        HAS_GW=grad_weights is not None, HAS_GL=grad_logits is not None, TINY=_TINY)
    return out


def route_backward(grad_weights, logits, topk_ids, score, renormalize):
    return _route_grad(grad_weights, None, logits, topk_ids, score, renormalize, logits.dtype)


def task_route(x, router_weight, task_ids, batch_task, k, score, renormalize, capacity, drop_policy, pad_to,
               num_rows):
    T, E = x.shape[0], router_weight.shape[2]
    return _plan(T, E, k, x.device, acc_dtype(x.dtype), score, renormalize, capacity, drop_policy, pad_to,
                 num_rows, x=x, router_weight=router_weight, task_ids=task_ids, batch_task=batch_task)


def task_route_backward(grad_logits, grad_weights, x, router_weight, task_ids, batch_task, logits, topk_ids, score,
                        renormalize):
    T, D = x.shape
    M, _, E = router_weight.shape
    # the reference adds the route gradient (in the logits' dtype) to grad_logits in fp32 (fp64)
    # and rounds the sum to x.dtype before both products
    if grad_logits is None and grad_weights is None:
        g = torch.zeros(T, E, dtype=x.dtype, device=x.device)
    else:
        g = _route_grad(grad_weights, grad_logits, logits, topk_ids, score, renormalize, x.dtype)
    gx = torch.empty_like(x)
    gw = torch.empty_like(router_weight)
    fp64 = is_fp64(x)
    per_token = batch_task < 0
    tids = task_ids if per_token else g
    if T > 0:
        BT = min(16, pow2(T))
        BD = min(16, pow2(D))
        BE = min(64 if interpreting() else 32, pow2(E))
        _jit()._task_grad_x_kernel[(cdiv(T, BT), cdiv(D, BD))](
            g, router_weight, tids, batch_task, gx, T, E, D, BT=BT, BD=BD, BE=BE, FP64=fp64, PER_TOKEN=per_token)
    BT = min(32 if interpreting() else 16, pow2(T))
    BD = min(16, pow2(D))
    BE = min(16, pow2(E))
    _jit()._task_grad_w_kernel[(M, cdiv(D, BD), cdiv(E, BE))](
        x, g, tids, batch_task, gw, T, E, D, BT=BT, BD=BD, BE=BE, FP64=fp64, PER_TOKEN=per_token)
    return gx, gw
