"""Public result types."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Routing(NamedTuple):
    """The result of :func:`moe_kernels.route` / :func:`moe_kernels.task_route` /
    :func:`moe_kernels.plan`: the top-k choice and the dispatch plan for the expert-grouped buffer.

    Attributes:
        topk_ids: ``[T, k]`` int32, chosen experts per token, by descending score (ties: lower id).
        topk_weights: ``[T, k]`` float32 (float64 for float64 logits), gate weights (differentiable w.r.t. the logits).
        counts: ``[E]`` int32, rows kept per expert (after capacity drops, before padding).
        offsets: ``[E + 1]`` int32, exclusive prefix sum of the padded segment sizes.
        slots: ``[T, k]`` int32, row of each assignment in the buffer; -1 when dropped.
        sources: ``[N]`` int32, token of each buffer row; -1 for padding rows. ``N`` is a static
            bound (see :func:`moe_kernels.reference.routing.plan_num_rows`); rows at and past
            ``offsets[E]`` are padding too.
        num_dropped: 0-dim int64 tensor, exact number of dropped assignments (never silent).
        logits: the router logits the plan was built from (``[T, E]``; for ``task_route`` the
            output of the fused router product, differentiable).
        score: ``"softmax"`` or ``"sigmoid"``, how the logits were turned into scores.
        capacity: capacity per expert, or -1 when dropless.
        num_nonlocal: :func:`moe_kernels.plan` only: 0-dim int64 tensor, the number of assignments
            to experts not on this rank (ids -1 or ``>= num_experts``; slot -1, not dropped);
            ``None`` from ``route`` and ``task_route`` (every expert is local).
    """

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    slots: torch.Tensor
    sources: torch.Tensor
    num_dropped: torch.Tensor
    logits: Optional[torch.Tensor] = None
    score: str = "softmax"
    capacity: int = -1
    num_nonlocal: Optional[torch.Tensor] = None

    @property
    def num_tokens(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def k(self) -> int:
        return self.topk_ids.shape[1]

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]

    @property
    def num_rows(self) -> int:
        """Rows ``N`` of the expert-grouped buffer (static; ``offsets[E] <= N``)."""
        return self.sources.shape[0]

    def dense_weights(self) -> torch.Tensor:
        """``[T, E]`` gate weights with zeros for unchosen experts (differentiable)."""
        dense = self.topk_weights.new_zeros(self.num_tokens, self.num_experts)
        return dense.scatter(1, self.topk_ids.long(), self.topk_weights)
