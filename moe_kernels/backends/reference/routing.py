"""Reference top-k routing and dispatch-plan construction (the executable spec).

Semantics (every backend reproduces the integer outputs bit-exactly):

* scores = softmax(logits) or sigmoid(logits), computed in fp32;
* top-k per token by the upcast logit (fp32; fp64 for fp64 input), ties to the lower expert id; the
  k ids of a token are ordered by descending logit (then ascending id). Both scores are monotone in
  the logit, so this is the top-k by score, with the choice independent of how a backend rounds the
  softmax (two logits that differ never tie, even where their fp32 softmax values round equal);
* weights = the k scores, divided by their sum when ``renormalize``;
* assignments are numbered a = t*k + j (token-major). Dropless keeps them all. With a capacity C,
  ``"position"`` keeps, per expert, the first C assignments in token order; ``"score"`` keeps the C
  with the highest fp32 score (before renormalisation), ties to the lower token index;
* kept assignments are grouped by expert, in token order inside an expert; each expert's segment
  is padded up to a multiple of ``pad_to``; ``offsets`` is the exclusive prefix sum of the padded
  segment sizes and ``counts`` the kept (unpadded) sizes;
* the buffer has a static number of rows ``num_rows`` (see :func:`plan_num_rows`); rows that hold no
  assignment (segment padding and the tail past ``offsets[E]``) have ``sources == -1``.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Optional

import torch

from ._util import acc_dtype, bincount, up

_EPS_DENOM = torch.finfo(torch.float32).tiny


def resolve_capacity(num_tokens: int, k: int, num_experts: int, capacity, capacity_factor,
                     min_capacity: int) -> int:
    """Capacity per expert, or -1 for dropless.

    ``capacity_factor`` is taken at its shortest decimal representation (``1.1`` means 11/10) and
    the ceiling is exact: in binary floating point 1.1 * 50 / 5 is 11.000000000000002, which would
    round up to 12 where the user means 11.
    """
    if capacity is not None:
        return int(capacity)
    if capacity_factor is not None:
        p, q = _decimal_ratio(float(capacity_factor))
        # ceil(p*T*k / (q*E)) in integers: also valid for symbolic T under torch.compile
        return max(int(min_capacity), -((-p * num_tokens * k) // (q * num_experts)))
    return -1


@torch.compiler.assume_constant_result
def _decimal_ratio(x: float) -> tuple[int, int]:
    """``x`` as the exact ratio of its shortest decimal representation (computed outside any trace)."""
    f = Fraction(repr(x))
    return f.numerator, f.denominator


def plan_num_rows(num_tokens: int, k: int, num_experts: int, capacity: int, pad_to: int) -> int:
    """Static row count of the expert-grouped buffer: an upper bound on ``offsets[E]``.

    kept <= T*k (and <= E*min(C, T) with a capacity: an expert sees a token at most once);
    padding adds at most pad_to-1 rows to each non-empty expert.
    """
    kept = num_tokens * k
    if capacity >= 0:
        per_expert = min(capacity, num_tokens)
        kept = min(kept, num_experts * per_expert)
    rows = kept + min(num_experts, kept) * (pad_to - 1)
    if capacity >= 0:
        rows = min(rows, num_experts * (-(-per_expert // pad_to) * pad_to))
    return rows


def compute_scores(logits: torch.Tensor, score: str) -> torch.Tensor:
    lf = up(logits)
    return torch.softmax(lf, dim=-1) if score == "softmax" else torch.sigmoid(lf)


def topk_stable(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k with ties to the lower index: a stable descending sort keeps equal values in id order."""
    vals, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    return vals[:, :k].contiguous(), idx[:, :k].contiguous()


def _rank_in_expert(expert: torch.Tensor, order: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rank of each assignment inside its expert, given an ordering grouped by expert."""
    n = expert.numel()
    pos = torch.empty(n, dtype=torch.int64, device=expert.device)
    pos[order] = torch.arange(n, device=expert.device)
    starts = torch.cumsum(counts, 0) - counts
    return pos - starts[expert]


def build_plan(topk_ids: torch.Tensor, topk_scores: torch.Tensor, num_experts: int, capacity: int,
               drop_policy: str, pad_to: int, num_rows: int, local: Optional[torch.Tensor] = None):
    """counts, offsets, slots, sources, num_dropped from the top-k selection (see module docstring).

    ``local`` (``[T, k]`` bool, :func:`plan` only) marks the assignments to experts of this rank;
    the others get no row (slot -1) and are not counted as dropped.
    """
    T, k = topk_ids.shape
    dev = topk_ids.device
    E = num_experts
    expert = topk_ids.reshape(-1).to(torch.int64)  # assignment a = t*k + j
    if local is not None:
        local = local.reshape(-1)
        expert = torch.where(local, expert, E)  # not local: the sentinel bucket E, never kept
    token = torch.arange(T, device=dev).repeat_interleave(k)

    if capacity < 0:
        keep = torch.ones_like(expert, dtype=torch.bool)
    else:
        all_counts = bincount(expert, E + 1)
        if drop_policy == "position":
            order = torch.sort(expert, stable=True).indices  # token order inside each expert
        else:
            # highest score first, ties by token order (stable sort on the token-ordered sequence)
            by_score = torch.sort(topk_scores.reshape(-1), descending=True, stable=True).indices
            order = by_score[torch.sort(expert[by_score], stable=True).indices]
        keep = _rank_in_expert(expert, order, all_counts) < capacity
    if local is not None:
        keep = keep & local

    key = torch.where(keep, expert, torch.full_like(expert, E))  # dropped go to a sentinel bucket E
    buckets = bincount(key, E + 1)
    counts = buckets[:E]
    padded = (counts + (pad_to - 1)) // pad_to * pad_to
    offsets = torch.zeros(E + 1, dtype=torch.int64, device=dev)
    offsets[1:] = torch.cumsum(padded, 0)
    order = torch.sort(key, stable=True).indices  # grouped by expert, token order inside
    rank = _rank_in_expert(key, order, buckets)
    slot = torch.where(keep, offsets[key] + rank, torch.full_like(expert, -1))

    # scatter the kept assignments' tokens to their rows; dropped ones write -1 to a spare row N
    sources = torch.full((num_rows + 1,), -1, dtype=torch.int32, device=dev)
    sources.scatter_(0, torch.where(keep, slot, num_rows), torch.where(keep, token, -1).to(torch.int32))
    sources = sources[:num_rows]
    dropped = ~keep if local is None else ~keep & local
    return (counts.to(torch.int32), offsets.to(torch.int32), slot.view(T, k).to(torch.int32),
            sources, dropped.sum().to(torch.int64))


def local_mask(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Which assignments go to an expert of this rank: ids in ``[0, num_experts)``; -1 and ids of
    ``num_experts`` and more are "not local" (expert parallelism's sentinels)."""
    return (topk_ids >= 0) & (topk_ids < num_experts)


def plan(topk_ids: torch.Tensor, priority: torch.Tensor, num_experts: int, capacity: int, drop_policy: str,
         pad_to: int, num_rows: int):
    """The dispatch plan of given ids: route's plan semantics, with not-local ids left out.

    ``priority`` ranks the assignments of an expert under ``drop_policy="score"`` (ties by token
    order); it is unused otherwise. Returns counts, offsets, slots, sources, num_dropped (capacity
    drops of local assignments) and num_nonlocal.
    """
    local = local_mask(topk_ids, num_experts)
    if capacity >= 0 and drop_policy == "score":  # NaN and negative priorities rank as -inf
        priority = torch.where(priority >= 0, priority, -torch.inf)
    out = build_plan(topk_ids, priority, num_experts, capacity, drop_policy, pad_to, num_rows, local=local)
    return out + ((~local).sum().to(torch.int64),)


def route(logits: torch.Tensor, k: int, score: str, renormalize: bool, capacity: int, drop_policy: str,
          pad_to: int, num_rows: int):
    lf = up(logits)
    _, top_ids = topk_stable(lf, k)
    top_scores = compute_scores(logits, score).gather(1, top_ids)
    weights = top_scores
    if renormalize:
        weights = top_scores / top_scores.sum(-1, keepdim=True).clamp_min(_EPS_DENOM)
    # A token with a non-finite logit (reachable only under the sync-free policy: the checking
    # policy rejects it before this runs) goes to experts 0..k-1 with NaN weights and the lowest
    # drop priority, so it is never routed silently (contract.NONFINITE_TOKEN).
    bad = ~torch.isfinite(lf).all(1, keepdim=True)
    top_ids = torch.where(bad, torch.arange(k, device=lf.device), top_ids)
    weights = torch.where(bad, torch.nan, weights)
    priority = torch.where(bad, -torch.inf, top_scores)
    counts, offsets, slots, sources, num_dropped = build_plan(
        top_ids, priority, logits.shape[1], capacity, drop_policy, pad_to, num_rows)
    return (weights, top_ids.to(torch.int32), counts, offsets, slots, sources, num_dropped)


def route_backward(grad_weights: torch.Tensor, logits: torch.Tensor, topk_ids: torch.Tensor,
              score: str, renormalize: bool) -> torch.Tensor:
    """d loss / d logits from d loss / d topk_weights (fp32 math, result in logits.dtype)."""
    g = up(grad_weights)
    ids = topk_ids.long()
    scores = compute_scores(logits, score)
    top = scores.gather(1, ids)
    if renormalize:
        s = top.sum(-1, keepdim=True).clamp_min(_EPS_DENOM)
        w = top / s
        g = (g - (g * w).sum(-1, keepdim=True)) / s
    dense = torch.zeros_like(scores).scatter_(1, ids, g)  # ids are distinct per token
    if score == "softmax":
        grad = scores * (dense - (dense * scores).sum(-1, keepdim=True))
    else:
        grad = dense * scores * (1.0 - scores)
    return grad.to(logits.dtype)


def task_logits(x: torch.Tensor, router_weight: torch.Tensor, task_ids, batch_task: int) -> torch.Tensor:
    """logits[t] = x[t] @ router_weight[task(t)], in x.dtype."""
    if batch_task >= 0:
        return x @ router_weight[batch_task]
    out = torch.empty(x.shape[0], router_weight.shape[2], dtype=x.dtype, device=x.device)
    for m in torch.unique(task_ids).tolist():
        rows = (task_ids == m).nonzero().squeeze(1)
        out[rows] = x[rows] @ router_weight[m]
    return out


def task_logits_bwd(grad_logits: torch.Tensor, x: torch.Tensor, router_weight: torch.Tensor, task_ids,
                    batch_task: int):
    g = grad_logits.to(x.dtype)
    if batch_task >= 0:
        gw = torch.zeros_like(router_weight)
        gw[batch_task] = x.t() @ g
        return g @ router_weight[batch_task].t(), gw
    gx = torch.empty_like(x)
    gw = torch.zeros_like(router_weight)
    for m in torch.unique(task_ids).tolist():
        rows = (task_ids == m).nonzero().squeeze(1)
        gx[rows] = g[rows] @ router_weight[m].t()
        gw[m] = x[rows].t() @ g[rows]
    return gx, gw


def task_route(x, router_weight, task_ids, batch_task, k, score, renormalize, capacity,
                   drop_policy, pad_to, num_rows):
    logits = task_logits(x, router_weight, task_ids, batch_task)
    return (logits,) + tuple(route(logits, k, score, renormalize, capacity, drop_policy, pad_to,
                                       num_rows))


def task_route_backward(grad_logits, grad_weights, x, router_weight, task_ids, batch_task, logits, topk_ids,
                   score, renormalize):
    g = torch.zeros(logits.shape, dtype=acc_dtype(logits.dtype), device=logits.device)
    if grad_logits is not None:
        g += grad_logits.to(g.dtype)
    if grad_weights is not None:
        g += route_backward(grad_weights, logits, topk_ids, score, renormalize).to(g.dtype)
    return task_logits_bwd(g, x, router_weight, task_ids, batch_task)
