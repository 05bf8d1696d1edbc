"""Differentiable collectives for expert parallelism, on any ``torch.distributed`` backend.

What works where (measured on torch 2.13, gloo, CPU; NCCL supports the same calls):

* ``dist.all_to_all_single(out, inp, output_split_sizes, input_split_sizes)`` with *unequal* and
  *zero* splits works on gloo and NCCL. This module uses only that call.
* ``dist.all_to_all`` with lists of tensors of unequal sizes fails on gloo ("ProcessGroupGloo::alltoall:
  invalid tensor size"), so it is not used.

Split sizes are host-side Python ints (NCCL and gloo both need them before the call), so the dropless
exchange costs one small blocking collective of the per-expert counts plus a device-to-host copy of
``world_size * local_experts`` integers.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .._validation import check, check_tensor, fail


def group_size(group=None) -> int:
    """World size of ``group`` (default: the global group); 1 when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group=None) -> int:
    """This process's rank inside ``group``; 0 when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def _a2a(x: Tensor, output_splits: Sequence[int], input_splits: Sequence[int], group) -> Tensor:
    x = x.contiguous()
    out = x.new_empty((int(sum(output_splits)),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, list(output_splits), list(input_splits), group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Forward: rows ``x[sum(input_splits[:r]) : ...]`` go to rank r; rank r's rows for us arrive in
    ``output_splits[r]``. Backward: the reverse exchange (splits swapped)."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.splits = (list(output_splits), list(input_splits))
        ctx.group = group
        return _a2a(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return _a2a(grad, input_splits, output_splits, ctx.group), None, None, None


def all_to_all(x: Tensor, output_splits: Sequence[int], input_splits: Sequence[int], group=None) -> Tensor:
    """Differentiable all-to-all of rows with variable (possibly zero) split sizes.

    Args:
        x: ``[sum(input_splits), ...]``; the first ``input_splits[0]`` rows go to rank 0 of ``group``,
            the next ``input_splits[1]`` to rank 1, and so on.
        output_splits: rows this rank receives from each rank (learn them first, e.g. with
            :func:`exchange_counts`).
        input_splits: rows this rank sends to each rank.
        group: a process group (default: the global group).

    Returns:
        ``[sum(output_splits), ...]``, ordered by source rank. Backward runs the reverse exchange, so
        every rank of the group must run backward through it (as with DDP).

    Example:
        >>> # on each of 2 ranks: send 3 rows to rank 0 and 1 row to rank 1
        >>> y = all_to_all(x, output_splits=recv, input_splits=[3, 1])  # doctest: +SKIP
    """
    op = "distributed.all_to_all"
    check_tensor(x, op, "x", contiguous=False)
    W = group_size(group)
    for name, s in (("output_splits", output_splits), ("input_splits", input_splits)):
        check(isinstance(s, (list, tuple)) and len(s) == W, op, name,
              f"must be a list with one int per rank of the group ({W}), got {s!r}")
        check(all(isinstance(v, int) and v >= 0 for v in s), op, name,
              f"must hold non-negative ints, got {s!r}")
    check(x.dim() >= 1 and x.shape[0] == sum(input_splits), op, "x",
          f"has {x.shape[0] if x.dim() else 0} rows but input_splits sum to {sum(input_splits)}")
    if W == 1:
        return x
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


def exchange_counts(send_counts: Tensor, group=None) -> Tensor:
    """Tell every rank how many rows it will receive: an all-to-all of a ``[W, n]`` integer table.

    Args:
        send_counts: ``[W, n]`` integer tensor; row r holds what this rank sends to rank r (for example
            rows per local expert of rank r). Must be on the device the backend communicates from
            (CUDA for NCCL, CPU for gloo).

    Returns:
        ``[W, n]`` int64: row r is what rank r sends to this rank.

    Example:
        >>> recv = exchange_counts(torch.tensor([[3], [1]]))  # doctest: +SKIP
    """
    op = "distributed.exchange_counts"
    check_tensor(send_counts, op, "send_counts", ndim=2, contiguous=False)
    check(not send_counts.dtype.is_floating_point, op, "send_counts",
          f"must be an integer tensor, got {send_counts.dtype}")
    W = group_size(group)
    check(send_counts.shape[0] == W, op, "send_counts",
          f"must have one row per rank of the group ({W}), got shape {tuple(send_counts.shape)}")
    send = send_counts.to(torch.int64).contiguous()
    if W == 1:
        return send.clone()
    out = torch.empty_like(send)
    dist.all_to_all_single(out, send, group=group)
    return out


def all_reduce_max_int(value: int, device: torch.device, group=None) -> int:
    """The maximum of an int over the ranks of ``group`` (one tiny collective)."""
    if isinstance(value, torch.Tensor):
        value = int(value)
    check(isinstance(value, int) and not isinstance(value, bool), "distributed.all_reduce_max_int", "value",
          f"must be an int, got {type(value).__name__}")
    if group_size(group) == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def require_initialized(op: str, group=None) -> None:
    """Raise a clear error when a collective is needed but torch.distributed is not initialised."""
    if group is not None and not (dist.is_available() and dist.is_initialized()):
        fail(op, "group", "was given but torch.distributed is not initialised; call "
                          "torch.distributed.init_process_group (or deepspeed.init_distributed) first")


__all__ = ["all_reduce_max_int", "all_to_all", "exchange_counts", "group_rank", "group_size",
           "require_initialized"]
