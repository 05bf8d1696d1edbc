"""Top-k routing ops: ``route``, the task-conditioned ``task_route`` and ``plan`` (the dispatch plan of
ids and weights a router outside the library computed)."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .._validation import (FLOAT_DTYPES, INT_DTYPES, check, check_choice, check_int, check_same_device,
                           check_tensor, fail)
from ..backends import resolve
from ..backends.reference._util import acc_dtype
from ..backends.reference.routing import plan_num_rows, resolve_capacity

_INT32_MIN, _INT32_MAX = -(2 ** 31), 2 ** 31 - 1
from ..types import Routing
from ._runner import custom_op, run

SCORES = ("softmax", "sigmoid")
DROP_POLICIES = ("position", "score")

# (topk_weights, topk_ids, counts, offsets, slots, sources, num_dropped)
_ROUTE_OUT = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


# ---------------------------------------------------------------- route

@custom_op("route", mutates_args=())
def _route(logits: Tensor, k: int, score: str, renormalize: bool, capacity: int, drop_policy: str,
           pad_to: int, num_rows: int, backend: str) -> _ROUTE_OUT:
    return tuple(run(backend, "route", logits, k, score, renormalize, capacity, drop_policy, pad_to, num_rows))


def _route_shapes(like: Tensor, T, k, E, num_rows):
    i32 = dict(dtype=torch.int32, device=like.device)
    return (like.new_empty(T, k, dtype=acc_dtype(like.dtype)), like.new_empty(T, k, **i32),
            like.new_empty(E, **i32), like.new_empty(E + 1, **i32), like.new_empty(T, k, **i32),
            like.new_empty(num_rows, **i32), like.new_empty((), dtype=torch.int64))


@_route.register_fake
def _(logits, k, score, renormalize, capacity, drop_policy, pad_to, num_rows, backend):
    T, E = logits.shape
    return _route_shapes(logits, T, k, E, num_rows)


@custom_op("route_backward", mutates_args=())
def _route_backward(grad_weights: Tensor, logits: Tensor, topk_ids: Tensor, score: str,
                    renormalize: bool, backend: str) -> Tensor:
    return run(backend, "route_backward", grad_weights, logits, topk_ids, score, renormalize)


@_route_backward.register_fake
def _(grad_weights, logits, topk_ids, score, renormalize, backend):
    return torch.empty_like(logits)


def _route_setup(ctx, inputs, output):
    logits, k, score, renormalize, *_rest, backend = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.opts = (score, renormalize, backend)


def _route_bwd(ctx, g_weights, *unused):
    if g_weights is None:
        return (None,) * 9
    logits, ids = ctx.saved_tensors
    score, renormalize, backend = ctx.opts
    grad = _route_backward(g_weights.contiguous(), logits, ids, score, renormalize, backend)
    return (grad,) + (None,) * 8


_route.register_autograd(_route_bwd, setup_context=_route_setup)


# ---------------------------------------------------------------- task_route

@custom_op("task_route", mutates_args=())
def _task_route(x: Tensor, router_weight: Tensor, task_ids: Optional[Tensor], batch_task: int, k: int,
                score: str, renormalize: bool, capacity: int, drop_policy: str, pad_to: int,
                num_rows: int, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                      Tensor, Tensor]:
    return tuple(run(backend, "task_route", x, router_weight, task_ids, batch_task, k, score, renormalize,
                     capacity, drop_policy, pad_to, num_rows))


@_task_route.register_fake
def _(x, router_weight, task_ids, batch_task, k, score, renormalize, capacity, drop_policy, pad_to,
      num_rows, backend):
    T, E = x.shape[0], router_weight.shape[2]
    return (x.new_empty(T, E),) + _route_shapes(x, T, k, E, num_rows)


@custom_op("task_route_backward", mutates_args=())
def _task_route_backward(grad_logits: Optional[Tensor], grad_weights: Optional[Tensor], x: Tensor,
                         router_weight: Tensor, task_ids: Optional[Tensor], batch_task: int,
                         logits: Tensor, topk_ids: Tensor, score: str, renormalize: bool,
                         backend: str) -> tuple[Tensor, Tensor]:
    gx, gw = run(backend, "task_route_backward", grad_logits, grad_weights, x, router_weight, task_ids,
                 batch_task, logits, topk_ids, score, renormalize)
    return gx, gw


@_task_route_backward.register_fake
def _(grad_logits, grad_weights, x, router_weight, task_ids, batch_task, logits, topk_ids, score,
      renormalize, backend):
    return torch.empty_like(x), torch.empty_like(router_weight)


def _task_route_setup(ctx, inputs, output):
    x, router_weight, task_ids, batch_task, k, score, renormalize, *_rest, backend = inputs
    ctx.save_for_backward(x, router_weight, task_ids, output[0], output[2])
    ctx.opts = (batch_task, score, renormalize, backend)


def _task_route_bwd(ctx, g_logits, g_weights, *unused):
    if g_logits is None and g_weights is None:
        return (None,) * 12
    x, router_weight, task_ids, logits, ids = ctx.saved_tensors
    batch_task, score, renormalize, backend = ctx.opts
    gx, gw = _task_route_backward(
        None if g_logits is None else g_logits.contiguous(),
        None if g_weights is None else g_weights.contiguous(),
        x, router_weight, task_ids, batch_task, logits, ids, score, renormalize, backend)
    return (gx, gw) + (None,) * 10


_task_route.register_autograd(_task_route_bwd, setup_context=_task_route_setup)


# ---------------------------------------------------------------- plan

# (counts, offsets, slots, sources, num_dropped, num_nonlocal)
_PLAN_OUT = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


@custom_op("plan", mutates_args=())
def _plan(topk_ids: Tensor, priority: Tensor, num_experts: int, capacity: int, drop_policy: str, pad_to: int,
          num_rows: int, backend: str) -> _PLAN_OUT:
    return tuple(run(backend, "plan", topk_ids, priority, num_experts, capacity, drop_policy, pad_to, num_rows))


@_plan.register_fake
def _(topk_ids, priority, num_experts, capacity, drop_policy, pad_to, num_rows, backend):
    T, k = topk_ids.shape
    return _route_shapes(priority, T, k, num_experts, num_rows)[2:] + (topk_ids.new_empty((), dtype=torch.int64),)


# ---------------------------------------------------------------- public API

def _routing(outs, logits, score, capacity) -> Routing:
    # op output order: weights first (float), then the integer plan
    weights, ids, counts, offsets, slots, sources, num_dropped = outs
    return Routing(topk_ids=ids, topk_weights=weights, counts=counts, offsets=offsets, slots=slots,
                   sources=sources, num_dropped=num_dropped, logits=logits, score=score, capacity=capacity)


def _check_options(op, k, E, *, score, renormalize, capacity, capacity_factor, min_capacity,
                   drop_policy, pad_to):
    check_int(k, op, "k", lo=1)
    if k > E:
        fail(op, "k", f"must be <= the number of experts E={E}, got {k}")
    check_choice(score, op, "score", SCORES)
    check(isinstance(renormalize, bool), op, "renormalize", "must be a bool")
    check_choice(drop_policy, op, "drop_policy", DROP_POLICIES)
    check_int(pad_to, op, "pad_to", lo=1)
    check_int(min_capacity, op, "min_capacity", lo=0)
    if capacity is not None and capacity_factor is not None:
        fail(op, "capacity", "and 'capacity_factor' are exclusive; give at most one")
    if capacity is not None:
        check_int(capacity, op, "capacity", lo=1)
    if capacity_factor is not None:
        check(isinstance(capacity_factor, (int, float)) and not isinstance(capacity_factor, bool)
              and math.isfinite(capacity_factor) and capacity_factor > 0,
              op, "capacity_factor", f"must be a finite number > 0, got {capacity_factor!r}")


def route(logits: Tensor, k: int, *, score: str = "softmax", renormalize: bool = True,
          capacity: Optional[int] = None, capacity_factor: Optional[float] = None,
          min_capacity: int = 0, drop_policy: str = "position", pad_to: int = 1,
          backend: Optional[str] = None) -> Routing:
    """Fused top-k routing: scores, top-k choice and the dispatch plan in one op.

    Args:
        logits: ``[T, E]`` router logits (fp32, bf16, fp16 or fp64), contiguous and finite.
        k: experts per token, ``1 <= k <= E``.
        score: ``"softmax"`` (over the E experts) or ``"sigmoid"``; computed in fp32.
        renormalize: divide the k chosen scores by their sum.
        capacity: rows kept per expert; ``None`` (and no ``capacity_factor``) is dropless.
        capacity_factor: capacity ``max(min_capacity, ceil(capacity_factor * T * k / E))``.
        min_capacity: lower bound for the capacity derived from ``capacity_factor``.
        drop_policy: beyond capacity keep the first assignments in token order (``"position"``) or
            the highest-scoring ones (``"score"``, batch-prioritised routing; ties by token order).
        pad_to: pad every expert segment to a multiple of this (GEMM tile) size.
        backend: force a backend (``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"``); default:
            ``$MOE_KERNELS_BACKEND`` or the fastest available for the device.

    Returns:
        :class:`moe_kernels.Routing`. Ties in top-k go to the lower expert id. ``T = 0`` gives empty
        results. Dropped assignments have ``slots == -1`` and are counted in ``num_dropped``.

    Example:
        >>> r = route(torch.randn(6, 4), k=2)
        >>> r.topk_ids.shape, int(r.offsets[-1])
        (torch.Size([6, 2]), 12)
    """
    op = "route"
    check_tensor(logits, op, "logits", ndim=2, dtypes=FLOAT_DTYPES)
    T, E = logits.shape
    check(E >= 1, op, "logits", "must have at least one expert column (shape [T, E], E >= 1)")
    _check_options(op, k, E, score=score, renormalize=renormalize, capacity=capacity,
                   capacity_factor=capacity_factor, min_capacity=min_capacity, drop_policy=drop_policy,
                   pad_to=pad_to)
    C = resolve_capacity(T, k, E, capacity, capacity_factor, min_capacity)
    N = plan_num_rows(T, k, E, C, pad_to)
    name = resolve(op, logits.device, backend)
    outs = _route(logits, k, score, renormalize, C, drop_policy, pad_to, N, name)
    return _routing(outs, logits, score, C)


def task_route(x: Tensor, router_weight: Tensor, task_ids: Union[int, Tensor], k: int, *,
               score: str = "softmax", renormalize: bool = True, capacity: Optional[int] = None,
               capacity_factor: Optional[float] = None, min_capacity: int = 0,
               drop_policy: str = "position", pad_to: int = 1,
               backend: Optional[str] = None) -> Routing:
    """Task-conditioned routing: one router per task or dataset, the router product inside the op.

    ``logits[t] = x[t] @ router_weight[task_ids[t]]``, then exactly :func:`route` on those logits
    (same options, same semantics). The returned ``Routing.logits`` are the router logits and are
    differentiable w.r.t. ``x`` and ``router_weight`` (for auxiliary losses).

    Args:
        x: ``[T, d]`` token features.
        router_weight: ``[M, d, E]``, one ``d x E`` router per task; same dtype and device as ``x``.
        task_ids: an int in ``[0, M)`` for the whole batch, or an integer tensor ``[T]`` with the
            task of each token (mixed tasks in one batch).
        k, ...: as in :func:`route`.
    """
    op = "task_route"
    check_tensor(x, op, "x", ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(router_weight, op, "router_weight", ndim=3, dtypes=FLOAT_DTYPES)
    check_same_device(op, "x", x, router_weight=router_weight)
    T, d = x.shape
    M, d_w, E = router_weight.shape
    check(d_w == d, op, "router_weight",
          f"must have shape [M, d, E] with d={d} matching x, got {tuple(router_weight.shape)}")
    check(router_weight.dtype == x.dtype, op, "router_weight",
          f"must have the dtype of x ({x.dtype}), got {router_weight.dtype}")
    check(M >= 1 and E >= 1, op, "router_weight", f"must have M >= 1 and E >= 1, got {(M, d_w, E)}")
    if isinstance(task_ids, torch.Tensor):
        check_tensor(task_ids, op, "task_ids", ndim=1, dtypes=INT_DTYPES)
        check(task_ids.shape[0] == T, op, "task_ids",
              f"must have one entry per token ([T]={T}), got shape {tuple(task_ids.shape)}")
        check_same_device(op, "x", x, task_ids=task_ids)
        batch_task, ids = -1, task_ids
    else:
        check_int(task_ids, op, "task_ids", lo=0, hi=M - 1)
        batch_task, ids = int(task_ids), None
    _check_options(op, k, E, score=score, renormalize=renormalize, capacity=capacity,
                   capacity_factor=capacity_factor, min_capacity=min_capacity, drop_policy=drop_policy,
                   pad_to=pad_to)
    C = resolve_capacity(T, k, E, capacity, capacity_factor, min_capacity)
    N = plan_num_rows(T, k, E, C, pad_to)
    name = resolve(op, x.device, backend)
    logits, *outs = _task_route(x, router_weight, ids, batch_task, k, score, renormalize, C,
                                drop_policy, pad_to, N, name)
    return _routing(outs, logits, score, C)


def plan(topk_ids: Tensor, topk_weights: Tensor, num_experts: int, *, capacity: Optional[int] = None,
         capacity_factor: Optional[float] = None, min_capacity: int = 0, drop_policy: str = "position",
         pad_to: int = 1, backend: Optional[str] = None) -> Routing:
    """The dispatch plan of top-k ids and gate weights that the caller computed (the plan half of
    :func:`route`), for routers that live outside the library: Hugging Face's, Megatron's,
    DeepSeek's grouped top-k with bias correction, a custom one.

    The plan has :func:`route`'s semantics and guarantees: assignments ``a = t*k + j`` grouped by
    expert in token order, each segment padded to ``pad_to``, the static row bound, capacity with
    both drop policies and an exact ``num_dropped``. ``topk_weights`` pass through (upcast to fp32,
    fp64 for fp64), so the gradient of :func:`combine` / :func:`moe_mlp` flows back to them.

    Expert parallelism: an id of -1, or of ``num_experts`` and more, is *not local* (an expert on
    another rank, as transformers' EP sentinels are): the assignment gets no row (slot -1, so it
    adds nothing to this rank's output) and is counted in ``Routing.num_nonlocal``, never dropped
    and never misrouted. ``k`` may exceed ``num_experts`` for the same reason.

    Args:
        topk_ids: ``[T, k]`` integer tensor of expert ids (int32 or int64), contiguous; a token's
            local ids must be distinct.
        topk_weights: ``[T, k]`` float gate weights, same device, finite. Under
            ``drop_policy="score"`` they are the priorities (the highest are kept, ties by token
            order) and must be >= 0.
        num_experts: the experts of this rank, ``E >= 1``.
        capacity, capacity_factor, min_capacity, drop_policy, pad_to, backend: as in :func:`route`
            (``capacity_factor`` gives ``max(min_capacity, ceil(capacity_factor * T * k / E))``).

    Returns:
        :class:`moe_kernels.Routing` with ``topk_ids`` as int32 and ``logits=None``.

    Example:
        >>> ids = torch.tensor([[0, 2], [2, 1], [5, 0]])      # 5: an expert on another rank
        >>> r = plan(ids, torch.full((3, 2), 0.5), num_experts=3)
        >>> r.counts.tolist(), r.slots.tolist(), int(r.num_nonlocal)
        ([2, 1, 2], [[0, 3], [4, 2], [-1, 1]], 1)
    """
    op = "plan"
    check_tensor(topk_ids, op, "topk_ids", ndim=2, dtypes=INT_DTYPES)
    check_tensor(topk_weights, op, "topk_weights", ndim=2, dtypes=FLOAT_DTYPES)
    check_same_device(op, "topk_ids", topk_ids, topk_weights=topk_weights)
    check(tuple(topk_weights.shape) == tuple(topk_ids.shape), op, "topk_weights",
          f"must have the shape of topk_ids {tuple(topk_ids.shape)}, got {tuple(topk_weights.shape)}")
    T, k = topk_ids.shape
    check(k >= 1, op, "topk_ids", f"must have at least one column (shape [T, k], k >= 1), got {tuple(topk_ids.shape)}")
    check_int(num_experts, op, "num_experts", lo=1)
    _check_options(op, 1, num_experts, score="softmax", renormalize=True, capacity=capacity,
                   capacity_factor=capacity_factor, min_capacity=min_capacity, drop_policy=drop_policy,
                   pad_to=pad_to)
    E = num_experts
    C = resolve_capacity(T, k, E, capacity, capacity_factor, min_capacity)
    N = plan_num_rows(T, k, E, C, pad_to)
    if topk_ids.dtype != torch.int32:  # exact for every id int32 holds; beyond it, still not local
        topk_ids = topk_ids.clamp(_INT32_MIN, _INT32_MAX).to(torch.int32)
    weights = topk_weights.to(acc_dtype(topk_weights.dtype))
    name = resolve(op, topk_ids.device, backend)
    counts, offsets, slots, sources, dropped, nonlocal_ = _plan(topk_ids, weights.detach(), E, C, drop_policy,
                                                               pad_to, N, name)
    return Routing(topk_ids=topk_ids, topk_weights=weights, counts=counts, offsets=offsets, slots=slots,
                   sources=sources, num_dropped=dropped, logits=None, capacity=C, num_nonlocal=nonlocal_)
