"""Single Iteration Multiple Tasks (SIMT, GPPF Sec. 3.2; INTERN Sec. 6.1) on ``torch.distributed``.

Each rank trains one task per iteration on a batch of that task's own size and shape; ranks run
different tasks at the same time. Three pieces make that work:

* :class:`TaskSampler`: per-rank, per-step task sampling with sampling weights (GPPF: 4.0, 2.5, 2.5,
  4.0, 4.0, 1.0, 2.0, 1.0) and per-task batch sizes (96, 8, 8, 12, 12, 8, 8, 8). Draws are a pure
  function of ``(seed, step, rank)``, so every rank knows every other rank's task without
  communicating, and resuming at step s repeats the same draws.
* :func:`task_average_gradients`: gradients of each parameter averaged over the ranks that *used* it,
  ``(1/N_p) * sum_{i uses p} g_i[p]`` (GPPF's task average; INTERN: "the other heads ... simply have
  zero gradient on that device"). Not the sample average, and not DDP's average over all ranks: a head
  used by one of eight ranks gets that rank's gradient, not an eighth of it. One all-reduce of the
  flattened gradients plus one of the per-parameter use counts.
* :class:`SyncBatchNorm`: BatchNorm whose batch statistics are reduced over all ranks (cross-task BN),
  for any input shape per rank (only the channel count must agree), on CPU/gloo and CUDA/NCCL
  (``torch.nn.SyncBatchNorm`` refuses CPU tensors). One all-reduce of ``2C + 1`` numbers in forward and
  one in backward per layer.

Train without DDP (it would average every gradient over all ranks): broadcast the initial weights
(:func:`broadcast_parameters`), then per step ``backward`` -> :func:`task_average_gradients` ->
``optimizer.step``.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._validation import check, check_int, fail
from .comm import group_rank, group_size

# GPPF's SIMT settings (appendix): task sampling weight and per-GPU batch size
GPPF_TASKS = {
    "in21k": (4.0, 96), "coco": (2.5, 8), "lvis": (2.5, 8), "objects365": (4.0, 12),
    "openimages": (4.0, 12), "ade20k": (1.0, 8), "coco_stuff": (2.0, 8), "voc": (1.0, 8),
}


class TaskSampler:
    """Per-rank task sampling for SIMT: at each step every rank draws one task with probability
    proportional to its weight and trains it on a batch of that task's size.

    Args:
        weights: sampling weight per task (a list, or a dict name -> weight), each > 0.
        batch_sizes: per-task batch size (same length/keys), or None.
        seed: shared by all ranks; the draw of rank r at step s is a function of (seed, step, r) only.
        rank / world_size: default: this process's rank and the world size (1 and 0 without
            torch.distributed).

    Example:
        >>> s = TaskSampler({n: w for n, (w, b) in GPPF_TASKS.items()},
        ...                 {n: b for n, (w, b) in GPPF_TASKS.items()}, rank=0, world_size=56)
        >>> task, batch = s.sample(step=0)
        >>> len(s.assignment(step=0))        # every rank's task at step 0, known locally
        56
    """

    def __init__(self, weights: Union[Sequence[float], dict], batch_sizes=None, *, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        op = "distributed.TaskSampler"
        if isinstance(weights, dict):
            names = list(weights)
            w = [weights[n] for n in names]
        else:
            check(isinstance(weights, (list, tuple)), op, "weights",
                  f"must be a list or a dict of task weights, got {type(weights).__name__}")
            names, w = list(range(len(weights))), list(weights)
        check(len(w) >= 1, op, "weights", "must name at least one task")
        for i, v in enumerate(w):
            check(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and v < float("inf"),
                  op, f"weights[{names[i]!r}]", f"must be a finite number > 0, got {v!r}")
        if batch_sizes is not None:
            if isinstance(batch_sizes, dict):
                check(set(batch_sizes) == set(names), op, "batch_sizes",
                      f"must have the tasks of 'weights' ({names}), got {list(batch_sizes)}")
                b = [batch_sizes[n] for n in names]
            else:
                check(isinstance(batch_sizes, (list, tuple)) and len(batch_sizes) == len(w), op,
                      "batch_sizes", f"must have one entry per task ({len(w)}), got {batch_sizes!r}")
                b = list(batch_sizes)
            for i, v in enumerate(b):
                check_int(v, op, f"batch_sizes[{names[i]!r}]", lo=1)
        else:
            b = None
        check_int(seed, op, "seed", lo=0)
        self.names, self.batch_sizes = names, b
        self.probs = torch.tensor(w, dtype=torch.float64) / float(sum(w))
        self.seed = seed
        self.world_size = (group_size() if world_size is None
                           else check_int(world_size, op, "world_size", lo=1))
        self.rank = (group_rank() if rank is None
                     else check_int(rank, op, "rank", lo=0, hi=self.world_size - 1))

    def _draw(self, step: int, rank: int) -> int:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 65_537 + rank)
        return int(torch.multinomial(self.probs, 1, generator=g))

    def sample(self, step: int):
        """``(task, batch_size)`` of this rank at ``step`` (``batch_size`` None without batch sizes)."""
        check_int(step, "distributed.TaskSampler.sample", "step", lo=0)
        i = self._draw(step, self.rank)
        return self.names[i], (None if self.batch_sizes is None else self.batch_sizes[i])

    def assignment(self, step: int) -> list:
        """The task of every rank at ``step`` (computed locally, no communication)."""
        check_int(step, "distributed.TaskSampler.assignment", "step", lo=0)
        return [self.names[self._draw(step, r)] for r in range(self.world_size)]

    def ranks_per_task(self, step: int) -> dict:
        """``{task: number of ranks training it at step}`` (tasks with no rank are absent)."""
        out: dict = {}
        for t in self.assignment(step):
            out[t] = out.get(t, 0) + 1
        return out


def broadcast_parameters(module: nn.Module, src: int = 0, group=None) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (what DDP does at construction)."""
    check(isinstance(module, nn.Module), "distributed.broadcast_parameters", "module",
          f"must be an nn.Module, got {type(module).__name__}")
    check_int(src, "distributed.broadcast_parameters", "src", lo=0)
    if group_size(group) == 1:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src, group=group)


def task_average_gradients(params: Union[nn.Module, Iterable[Tensor]], *, used=None, counts=None,
                           group=None) -> list:
    """Average each parameter's gradient over the ranks that used it (GPPF's task average).

    ``p.grad <- (1 / N_p) * sum_{ranks i that used p} g_i[p]`` where ``N_p`` is the number of ranks that
    used p this step. A rank "used" p when ``p.grad is not None`` after backward (zero the gradients
    with ``set_to_none=True``, the default of ``optimizer.zero_grad()``), unless ``used`` says otherwise.
    A parameter no rank used keeps ``grad = None`` (the optimizer skips it).

    Args:
        params: a module (its parameters that require grad) or parameters, in the same order on every
            rank (every rank must pass the same list).
        used: optional: the parameters this rank used (an iterable), overriding the ``grad is not None``
            rule (e.g. a head whose loss was multiplied by 0 but should count).
        counts: optional: how many devices of this rank used each parameter (a sequence of ints, one per
            parameter), for ranks that run several virtual devices one after another and sum their
            gradients (RECIPES.md 3.6 item 5): then ``N_p`` is the sum of the counts over the ranks and
            ``p.grad`` must hold the *sum* over this rank's devices. Overrides ``used``.
        group: the process group (default: global).

    Returns:
        ``[N_p for each parameter]`` (ints), for logging and tests.

    Example:
        >>> loss = heads[task](backbone(x)).mean(); loss.backward()      # doctest: +SKIP
        >>> task_average_gradients(model); optimizer.step(); optimizer.zero_grad()  # doctest: +SKIP
    """
    op = "distributed.task_average_gradients"
    if isinstance(params, nn.Module):
        ps = [p for p in params.parameters() if p.requires_grad]
    else:
        ps = list(params)
        for i, p in enumerate(ps):
            check(isinstance(p, Tensor), op, f"params[{i}]", f"must be a tensor, got {type(p).__name__}")
    if counts is not None:
        counts = list(counts)
        check(len(counts) == len(ps), op, "counts", f"must have one count per parameter ({len(ps)}), got {len(counts)}")
        for i, c in enumerate(counts):
            check_int(c, op, f"counts[{i}]", lo=0)
        flags = [c > 0 for c in counts]
        arg = "counts"
    elif used is not None:
        used_ids = {id(p) for p in used}
        flags = [id(p) in used_ids for p in ps]
        arg = "used"
    else:
        flags = [p.grad is not None for p in ps]
        arg = "used"
    for i, (p, f) in enumerate(zip(ps, flags)):
        if f and p.grad is None:
            fail(op, arg, f"counts parameter {i} (shape {tuple(p.shape)}) as used but it has no gradient")
    if not ps:
        return []
    W = group_size(group)
    dev = ps[0].device
    per_rank = counts if counts is not None else [1 if f else 0 for f in flags]
    counts = torch.tensor([float(c) for c in per_rank], dtype=torch.float64, device=dev)
    if W > 1:
        dist.all_reduce(counts, group=group)
    # one flat buffer per dtype: unused parameters contribute zeros
    by_dtype: dict = {}
    for i, p in enumerate(ps):
        by_dtype.setdefault(p.dtype, []).append(i)
    for idx in by_dtype.values():
        flat = torch.cat([(ps[i].grad if flags[i] else torch.zeros_like(ps[i])).reshape(-1) for i in idx])
        if W > 1:
            dist.all_reduce(flat, group=group)
        offset = 0
        for i in idx:
            p, n = ps[i], ps[i].numel()
            c = float(counts[i])
            if c == 0:
                p.grad = None
            else:
                g = flat[offset:offset + n].view_as(p).div_(c)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            offset += n
    return [int(c) for c in counts.tolist()]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; backward sums the incoming gradients too (every rank's loss depends on the
    global sum)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with batch statistics over all ranks of ``process_group`` (cross-task BN for SIMT).

    Works on CPU (gloo) and CUDA (NCCL); each rank may hold a different batch size and spatial shape
    (GPPF: 96 classification crops on one rank, 8 detection images on another), or no samples at
    all. Statistics are ``sum``, ``sum of squares`` (around the running mean, for precision) and the
    element count per channel, summed over the group in one all-reduce; the backward pass reduces
    the matching gradient sums with one more. Every rank of the group must call forward and backward
    on every step it trains (as with ``torch.nn.SyncBatchNorm``). In eval mode (with running stats)
    no communication happens.

    Args: as ``torch.nn.BatchNorm2d`` (any input ``[N, C, *]``), plus ``process_group`` (default:
    global; give a group per task for INTERN's task-specific BN).

    Example:
        >>> bn = SyncBatchNorm(64)                       # or: convert_sync_batchnorm(model)
        >>> y = bn(torch.randn(8, 64, 14, 14))           # statistics over every rank's 8*14*14 pixels
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None):
        check_int(num_features, "distributed.SyncBatchNorm", "num_features", lo=1)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            fail("distributed.SyncBatchNorm", "input", f"must be [N, C, ...], got shape {tuple(input.shape)}")

    def forward(self, input: Tensor) -> Tensor:
        op = "distributed.SyncBatchNorm"
        self._check_input_dim(input)
        C = self.num_features
        check(input.shape[1] == C, op, "input",
              f"must have {C} channels (dim 1), got shape {tuple(input.shape)}")
        use_batch = self.training or not self.track_running_stats
        if not use_batch:
            return nn.functional.batch_norm(input, self.running_mean, self.running_var, self.weight,
                                            self.bias, False, 0.0, self.eps)
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        momentum = self.momentum
        if momentum is None:  # cumulative moving average
            momentum = 1.0 / float(self.num_batches_tracked) if self.num_batches_tracked is not None else 0.0
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        x = input.transpose(0, 1).reshape(C, -1).to(acc)  # [C, M]
        shift = (self.running_mean.detach().to(acc) if self.running_mean is not None
                 else x.new_zeros(C))
        xs = x - shift[:, None]
        n_local = float(x.shape[1])
        stats = torch.cat([xs.sum(1), (xs * xs).sum(1), x.new_full((1,), n_local)])
        if group_size(self.process_group) > 1:
            stats = _AllReduceSum.apply(stats, self.process_group)
        n = stats[-1]
        check(float(n.detach()) > 0, op, "input", "has no elements on any rank (batch statistics need at least one)")
        mean_s = stats[:C] / n
        var = (stats[C:2 * C] / n - mean_s * mean_s).clamp_min(0.0)
        mean = mean_s + shift
        if self.training and self.track_running_stats:
            with torch.no_grad():
                unbiased = var * (n / (n - 1)) if float(n.detach()) > 1 else var
                rm, rv = self.running_mean, self.running_var
                rm.mul_(1 - momentum).add_(mean.detach().to(rm.dtype), alpha=momentum)
                rv.mul_(1 - momentum).add_(unbiased.detach().to(rv.dtype), alpha=momentum)
        inv = torch.rsqrt(var + self.eps)
        shape = [1, C] + [1] * (input.dim() - 2)
        y = (input.to(acc) - mean.view(shape)) * inv.view(shape)
        if self.affine:
            y = y * self.weight.to(acc).view(shape) + self.bias.to(acc).view(shape)
        return y.to(input.dtype)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every ``nn.BatchNorm*d`` in ``module`` by :class:`SyncBatchNorm` (weights and running
        statistics kept); returns the (possibly new) root module."""
        out = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            out = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, process_group)
            with torch.no_grad():
                if module.affine:
                    out.weight, out.bias = module.weight, module.bias
                if module.track_running_stats:
                    out.running_mean, out.running_var = module.running_mean, module.running_var
                    out.num_batches_tracked = module.num_batches_tracked
            out.train(module.training)
        for name, child in module.named_children():
            new = cls.convert_sync_batchnorm(child, process_group)
            if new is not child:
                setattr(out, name, new)
        return out


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """``SyncBatchNorm.convert_sync_batchnorm``: swap every BatchNorm for the cross-rank one."""
    check(isinstance(module, nn.Module), "distributed.convert_sync_batchnorm", "module",
          f"must be an nn.Module, got {type(module).__name__}")
    return SyncBatchNorm.convert_sync_batchnorm(module, process_group)


__all__ = ["GPPF_TASKS", "SyncBatchNorm", "TaskSampler", "broadcast_parameters", "convert_sync_batchnorm",
           "task_average_gradients"]
