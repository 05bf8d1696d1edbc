"""``ExpertUsage``: per-task expert-usage statistics of every :class:`MoE` in a model."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from .._validation import check, fail
from .moe import MoE, MoEOutput


class ExpertUsage:
    """Counts, per MoE layer, how often each task's tokens were sent to each expert.

    For every forward of every :class:`moe_kernels.nn.MoE` inside ``model``, a forward hook adds the
    layer's kept assignments (token, expert) to a ``[num_tasks, num_experts]`` int64 count tensor,
    and, when the layer has a capacity, the assignments dropped for lack of room to a second one.
    The hook costs one small ``index_add_`` (an ``add_`` of the ``counts`` vector for a batch of one
    task), on the device of the layer, and never synchronises with the host: cheap enough to leave on
    during training or evaluation. Task ids may be an int per batch, or a tensor per token or per
    sample, as :class:`~moe_kernels.nn.MoE` accepts them.

    Use it as a context manager (hooks removed on exit, the counts kept) or call :meth:`attach` /
    :meth:`detach`. The counts feed :func:`moe_kernels.adapt.prune_experts` (``usage=``).

    Args:
        model: an ``nn.Module`` containing :class:`~moe_kernels.nn.MoE` layers (or a layer itself).

    Attributes:
        counts: ``{layer name: [num_tasks, num_experts] int64}``, kept assignments.
        dropped: ``{layer name: [num_tasks, num_experts] int64}``, assignments dropped by a capacity
            (all zero for dropless layers).
        layers: ``{layer name: MoE}``; names as in ``model.named_modules()`` (``""`` for the model
            itself).

    Example:
        >>> with mk.nn.ExpertUsage(model) as usage:
        ...     for x, task in loader:
        ...         model(x, task)
        >>> usage.frequencies()["blocks.3.moe"][task]     # share of task's assignments per expert
    """

    def __init__(self, model: nn.Module):
        check(isinstance(model, nn.Module), "nn.ExpertUsage", "model",
              f"must be an nn.Module, got {type(model).__name__}")
        # every MoE layer whose forward returns an MoEOutput (the DeepSpeed drop-in's returns a tensor)
        self.layers: dict[str, MoE] = {n: m for n, m in model.named_modules()
                                       if isinstance(m, MoE) and m.returns_moe_output}
        check(bool(self.layers), "nn.ExpertUsage", "model", "contains no moe_kernels.nn.MoE layer")
        self._names = {id(m): n for n, m in self.layers.items()}
        self._handles: list = []
        self.counts: dict[str, Tensor] = {}
        self.dropped: dict[str, Tensor] = {}
        self.reset()

    # ---------------------------------------------------------------- collection

    def reset(self) -> "ExpertUsage":
        """Zero every count (sized to each layer's current number of tasks and experts)."""
        for name, layer in self.layers.items():
            shape = (layer.num_tasks, layer.num_experts)
            dev = layer.w1.device
            self.counts[name] = torch.zeros(shape, dtype=torch.int64, device=dev)
            self.dropped[name] = torch.zeros(shape, dtype=torch.int64, device=dev)
        return self

    def attach(self) -> "ExpertUsage":
        """Start counting (register the forward hooks). Idempotent."""
        if not self._handles:
            self._handles = [layer.register_forward_hook(self._hook, with_kwargs=True)
                             for layer in self.layers.values()]
        return self

    def detach(self) -> None:
        """Stop counting (remove the hooks); the counts are kept."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "ExpertUsage":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _hook(self, layer: MoE, args, kwargs, output: MoEOutput) -> None:
        name = self._names[id(layer)]
        counts, dropped = self.counts[name], self.dropped[name]
        M, E = layer.num_tasks, layer.num_experts
        if counts.shape != (M, E):
            fail("nn.ExpertUsage", "model",
                 f"layer '{name}' now has {M} tasks and {E} experts but the counts are "
                 f"{tuple(counts.shape)}: call reset() after changing the layer (moe_kernels.adapt)")
        x = args[0] if args else kwargs["x"]
        task_ids = args[1] if len(args) > 1 else kwargs.get("task_ids")
        tasks = layer._token_tasks(task_ids, tuple(x.shape[:-1]))
        r = output.routing
        if r.capacity >= 0:
            kept = r.slots >= 0
        if isinstance(tasks, Tensor):
            flat = (tasks.to(counts.device, torch.int64).unsqueeze(1) * E + r.topk_ids.long()).reshape(-1)
            if r.capacity < 0:
                counts.view(-1).index_add_(0, flat, torch.ones_like(flat))
            else:
                k64 = kept.reshape(-1).long()
                counts.view(-1).index_add_(0, flat, k64)
                dropped.view(-1).index_add_(0, flat, 1 - k64)
        else:  # one task: the routing's per-expert counts are the kept assignments
            v = r.num_experts  # the experts this task sees (a prefix)
            counts[tasks, :v] += r.counts
            if r.capacity >= 0:
                chosen = torch.zeros(v, dtype=torch.int64, device=counts.device)
                chosen.index_add_(0, r.topk_ids.reshape(-1).long(), torch.ones_like(r.topk_ids.reshape(-1),
                                                                                      dtype=torch.int64))
                dropped[tasks, :v] += chosen - r.counts

    # ---------------------------------------------------------------- results

    def frequencies(self, combined: bool = False) -> dict[str, Tensor]:
        """Share of the kept assignments that went to each expert.

        Args:
            combined: ``False``: per task, ``[num_tasks, num_experts]``, each row summing to 1 (a row
                of zeros for a task not seen). ``True``: all tasks pooled, ``[num_experts]``.
        """
        out = {}
        for name, c in self.counts.items():
            c = c.double()
            if combined:
                c = c.sum(0)
            total = c.sum(-1, keepdim=True)
            out[name] = torch.where(total > 0, c / total.clamp_min(1), 0.0)
        return out

    def total(self, name: Optional[str] = None) -> Union[int, dict[str, int]]:
        """Kept assignments counted (one layer, or every layer by name)."""
        if name is not None:
            return int(self.counts[name].sum())
        return {n: int(c.sum()) for n, c in self.counts.items()}

    def __repr__(self) -> str:
        state = "attached" if self._handles else "detached"
        return f"ExpertUsage({len(self.layers)} MoE layers, {state}, {self.total()} assignments)"
