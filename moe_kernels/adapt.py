"""Modular adaptation of models built from :class:`moe_kernels.nn.MoE` (MTHL, "An Efficient General-Purpose
Modular Vision Model via Multi-Task Heterogeneous Training", arXiv:2306.17165:
"efficient modular adaptation" and continual learning).

Every function acts on all the ``mk.nn.MoE`` layers inside a model (``model.modules()``) and returns
an :class:`AdaptReport` with, per layer, the experts, parameters and FLOPs per token before and after.

* :func:`add_router`: one new router per layer for a new dataset; by default everything else in the
  model is frozen (optionally a few randomly chosen experts per layer stay trainable). Train only
  the new router (and a new head) on the new dataset.
* :func:`prune_experts`: remove experts by number, by fraction, below a usage threshold θ (counts
  from :class:`moe_kernels.nn.ExpertUsage`) or by id; a different amount per layer is allowed. The
  remaining experts keep their order, every router loses the columns of the removed ones.
* :func:`set_top_k`: fewer experts per token (lower compute).
* :func:`add_experts`: ``C`` new experts per layer and a new router that is the only one able to
  choose them (old routers see a prefix of the experts, see ``MoE(visible_experts=...)``); old
  experts and routers are frozen, so the outputs for the old datasets stay bit-identical.
* :func:`merge`: fold partly trainable tensors back into plain parameters.
* :func:`stats`: the numbers of the report, for a model as it is.

Freezing is exact: a tensor with only some rows trainable (a new router row, a few experts) is
frozen as a whole and its trainable rows are a separate parameter ``<name>_trainable`` (see
:meth:`moe_kernels.nn.MoE.set_trainable_rows`), so ``[p for p in model.parameters() if
p.requires_grad]`` is exactly what may change: an optimiser (weight decay included) never touches a
frozen row. Build the optimiser after calling these functions.

FLOPs per token of one MoE layer, for the tokens of task ``t`` (multiply-add = 2 FLOPs, biases and
activation ignored)::

    2·d·E_t  +  k·(2·d·h1 + 2·h·d_out)

with ``E_t`` the experts task ``t``'s router sees, ``h1 = h`` (``2h`` for swiglu). Reports give it
for the newest task (``task=-1``), the one an adaptation is for.

Example (MTHL's "Hybrid-B": new router, prune 2/3 of the experts, top-K 3, two experts tuned)::

    rep = mk.adapt.add_router(model)                  # new task id rep.new_task, only it trains
    train(model, new_dataset)                         # the new router learns which experts it likes
    with mk.nn.ExpertUsage(model) as usage:
        evaluate(model, new_dataset)
    mk.adapt.prune_experts(model, fraction=2 / 3, usage=usage, tasks=rep.new_task)
    mk.adapt.set_top_k(model, 3)
    print(mk.adapt.stats(model))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._validation import check, check_choice, check_int, fail
from .nn.losses import MutualInformationLoss
from .nn.moe import ROW_PARAMS, MoE
from .nn.usage import ExpertUsage
from .ops.routing import _check_options

__all__ = ["AdaptReport", "LayerStats", "ModelStats", "add_experts", "add_router", "flops_per_token",
           "merge", "moe_layers", "prune_experts", "set_top_k", "stats"]

INITS = ("random", "copy")


# ---------------------------------------------------------------- statistics

@dataclass
class LayerStats:
    """One MoE layer: ``experts`` E, ``k``, ``tasks`` M, ``visible_experts`` per task, ``params``
    (stored), ``trainable_params`` and ``flops_per_token`` (for the tokens of the newest task)."""

    experts: int
    k: int
    tasks: int
    visible_experts: list[int]
    params: int
    trainable_params: int
    flops_per_token: int


@dataclass
class ModelStats:
    """A model: its MoE layers by name, and totals. ``params`` / ``trainable_params`` count the
    whole model (each value once: a partly trainable tensor's separate trainable rows are not
    counted twice); ``flops_per_token`` sums the MoE layers (the rest of the model is unknown)."""

    layers: dict[str, LayerStats]
    params: int
    trainable_params: int
    flops_per_token: int

    def __str__(self) -> str:
        rows = [f"{'layer':<24} {'E':>4} {'k':>3} {'M':>3} {'params':>12} {'trainable':>12} "
                f"{'FLOPs/token':>13}"]
        for n, s in self.layers.items():
            rows.append(f"{n or '<model>':<24} {s.experts:>4} {s.k:>3} {s.tasks:>3} {s.params:>12,} "
                        f"{s.trainable_params:>12,} {s.flops_per_token:>13,}")
        rows.append(f"{'model':<24} {'':>4} {'':>3} {'':>3} {self.params:>12,} {self.trainable_params:>12,} "
                    f"{self.flops_per_token:>13,}")
        return "\n".join(rows)


@dataclass
class AdaptReport:
    """What an adaptation did: ``before`` / ``after`` (:class:`ModelStats`), ``new_tasks`` (task ids
    added, if any; ``new_task`` the first), ``removed`` / ``added`` (expert ids per layer name) and
    ``trainable_experts`` (expert ids left trainable per layer, for :func:`add_router`)."""

    action: str
    before: ModelStats
    after: ModelStats
    new_tasks: list[int] = field(default_factory=list)
    removed: dict[str, list[int]] = field(default_factory=dict)
    added: dict[str, list[int]] = field(default_factory=dict)
    trainable_experts: dict[str, list[int]] = field(default_factory=dict)

    @property
    def new_task(self) -> Optional[int]:
        return self.new_tasks[0] if self.new_tasks else None

    def __str__(self) -> str:
        def arrow(a, b):
            return f"{a:,} -> {b:,}"

        rows = [f"moe_kernels.adapt.{self.action}" +
                (f" (new task id {self.new_tasks})" if self.new_tasks else ""),
                f"{'layer':<24} {'experts':>10} {'params':>26} {'FLOPs/token':>26}"]
        for n, a in self.after.layers.items():
            b = self.before.layers[n]
            rows.append(f"{n or '<model>':<24} {arrow(b.experts, a.experts):>10} "
                        f"{arrow(b.params, a.params):>26} {arrow(b.flops_per_token, a.flops_per_token):>26}")
        b, a = self.before, self.after
        rows.append(f"{'model':<24} {'':>10} {arrow(b.params, a.params):>26} "
                    f"{arrow(b.flops_per_token, a.flops_per_token):>26}")
        rows.append(f"trainable parameters: {arrow(b.trainable_params, a.trainable_params)}")
        return "\n".join(rows)


def moe_layers(model: nn.Module) -> dict[str, MoE]:
    """Every :class:`moe_kernels.nn.MoE` in ``model`` by its name in ``model.named_modules()``."""
    check(isinstance(model, nn.Module), "adapt", "model", f"must be an nn.Module, got {type(model).__name__}")
    return {n: m for n, m in model.named_modules() if isinstance(m, MoE)}


def _layers(model, op) -> dict[str, MoE]:
    check(isinstance(model, nn.Module), op, "model", f"must be an nn.Module, got {type(model).__name__}")
    layers = moe_layers(model)
    check(bool(layers), op, "model", "contains no moe_kernels.nn.MoE layer")
    for name, layer in layers.items():
        check(layer.executor.local, op, "model",
              f"has the layer '{name}' ({type(layer).__name__}) whose experts run with "
              f"{layer.executor!r}, not all on this process; adaptation restructures every expert of a "
              "layer: apply it to a single-process moe_kernels.nn.MoE (e.g. built from "
              "ExpertParallelMoE.gather_experts()), then split the experts again")
    return layers


def flops_per_token(layer: MoE, task: int = -1) -> int:
    """``2·d·E_t + k·(2·d·h1 + 2·h·d_out)`` for the tokens of ``task`` (default: the newest)."""
    check(isinstance(layer, MoE), "adapt.flops_per_token", "layer", "must be a moe_kernels.nn.MoE")
    M = layer.num_tasks
    check_int(task, "adapt.flops_per_token", "task", lo=-M, hi=M - 1)
    h1 = layer.w1.shape[2]
    return 2 * layer.dim * layer.visible_experts[task] + layer.k * (2 * layer.dim * h1 +
                                                                    2 * layer.hidden * layer.out_dim)


def _duplicates(layer: MoE) -> int:
    return sum(getattr(layer, n + "_trainable").numel() for n in layer._partial)


def _layer_stats(layer: MoE, task: int) -> LayerStats:
    params = sum(p.numel() for p in layer.parameters()) - _duplicates(layer)
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    return LayerStats(layer.num_experts, layer.k, layer.num_tasks, list(layer.visible_experts), params,
                      trainable, flops_per_token(layer, task))


def stats(model: nn.Module, task: int = -1) -> ModelStats:
    """Experts, parameters and FLOPs per token of every MoE layer of ``model`` (for ``task``'s
    tokens; default the newest task of each layer), with model totals.

    Example:
        >>> print(mk.adapt.stats(model))
    """
    layers = _layers(model, "adapt.stats")
    per = {n: _layer_stats(m, task) for n, m in layers.items()}
    params = sum(p.numel() for p in model.parameters()) - sum(_duplicates(m) for m in layers.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ModelStats(per, params, trainable, sum(s.flops_per_token for s in per.values()))


# ---------------------------------------------------------------- helpers

def _per_layer(value, layers, op, arg, default=None) -> dict:
    """A scalar for every layer, or a dict {layer name: value} (missing layers get ``default``)."""
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in layers]
        if unknown:
            fail(op, arg, f"names unknown MoE layers {unknown}; the model's are {list(layers)}")
        return {n: value.get(n, default) for n in layers}
    return {n: value for n in layers}


def _uniform(shape, bound, like: Tensor, generator) -> Tensor:
    t = torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
    return t.to(device=like.device, dtype=like.dtype)


def _check_generator(generator, op):
    check(generator is None or isinstance(generator, torch.Generator), op, "generator",
          f"must be a torch.Generator or None, got {type(generator).__name__}")


def _masks(layer: MoE, freeze: bool) -> dict:
    """Current trainable-row masks (all False where the model is being frozen)."""
    out = {}
    for name in ROW_PARAMS:
        m = layer.trainable_rows(name)
        out[name] = [False] * len(m) if freeze else m
    return out


def _joint(layer: MoE) -> Tensor:
    """The layer's P(dataset, expert) estimate, ``[M, E]`` fp32: the EMA buffer when there is one,
    else uniform over the experts each task sees (rows sum to 1/M)."""
    if layer.mutual_information is not None:
        return layer.mutual_information.joint.detach().float().clone()
    M, E = layer.num_tasks, layer.num_experts
    J = torch.zeros(M, E, device=layer.w1.device)
    for m, v in enumerate(layer.visible_experts):
        J[m, :v] = 1.0 / (M * v)
    return J


def _set_joint(layer: MoE, J: Tensor) -> None:
    """Rebuild the EMA mutual-information module for the layer's current M and E with buffer ``J``."""
    M, E = layer.num_tasks, layer.num_experts
    if M > 1 and layer.mi_loss == "ema":
        old = layer.mutual_information
        momentum = old.momentum if old is not None else getattr(layer, "mi_momentum", 0.98)
        mi = MutualInformationLoss(M, E, momentum, device=layer.w1.device,
                                   dtype=old.joint.dtype if old is not None else torch.float32)
        with torch.no_grad():
            mi.joint.copy_(J.to(mi.joint.dtype))
        mi.train(layer.training)
        layer.mutual_information = mi
    else:
        layer.mutual_information = None


def _grow_joint(J: Tensor, new_cols: int, new_visible: Sequence[int]) -> Tensor:
    """Add ``new_cols`` zero columns (experts the old tasks never choose), rescale the old rows from
    1/M to 1/M' each, and append one row per new task, uniform over the experts it sees."""
    M, E = J.shape
    M2, E2 = M + len(new_visible), E + new_cols
    out = torch.zeros(M2, E2, dtype=J.dtype, device=J.device)
    out[:M, :E] = J * (M / M2)
    for i, v in enumerate(new_visible):
        out[M + i, :v] = 1.0 / (M2 * v)
    return out


def _new_router_rows(layer: MoE, n: int, init: str, source: Optional[int], E_new: int, generator) -> Tensor:
    """``[n, d, E_new]`` routers: random (nn.Linear's init), or a copy of ``source``'s visible
    columns with the other columns random."""
    W = layer.effective("router_weight").detach()
    rows = _uniform((n, layer.dim, E_new), 1.0 / math.sqrt(layer.dim), W, generator)
    if init == "copy":
        v = layer.visible_experts[source]
        rows[:, :, :v] = W[source, :, :v]
    return rows


def _finish(layer: MoE, op: str) -> None:
    _check_options(op, layer.k, layer.num_experts, **layer.route_options)


# ---------------------------------------------------------------- add_router


def _task_count_and_source(layers, op: str, source_task):
    """The layers' common number of tasks M (a new task gets id M in every layer) and the validated
    ``source_task`` (default: the last task)."""
    Ms = {m.num_tasks for m in layers.values()}
    check(len(Ms) == 1, op, "model", f"has MoE layers with different numbers of tasks {sorted(Ms)}: "
                                     "the new task id would differ between layers")
    M = Ms.pop()
    if source_task is None:
        source_task = M - 1
    check_int(source_task, op, "source_task", lo=0, hi=M - 1)
    return M, source_task

def add_router(model: nn.Module, num_new: int = 1, *, init: str = "random", source_task: Optional[int] = None,
               unfreeze_experts: Union[int, Sequence[int], Mapping[str, Sequence[int]]] = 0,
               freeze: bool = True, generator: Optional[torch.Generator] = None) -> AdaptReport:
    """Add ``num_new`` routers (tasks) to every MoE layer, for a new dataset; train only them.

    The new tasks get ids ``M .. M+num_new-1`` (``report.new_tasks``; every layer must have the same
    number of tasks M) and see every current expert. The old routers and experts are unchanged, so
    the outputs for the old tasks are unchanged (bit-identical for a batch of one task). The
    mutual-information buffer gets one row per new task, uniform over its experts, and the old rows
    are rescaled from 1/M to 1/(M+num_new) each (every row of the joint P(D, E) sums to P(D)).

    Args:
        model: a module containing ``mk.nn.MoE`` layers.
        num_new: routers to add.
        init: ``"random"`` (nn.Linear's initialisation) or ``"copy"`` (start from ``source_task``'s
            router; columns of experts it cannot see are random).
        source_task: the router copied by ``init="copy"`` (default: the newest, M-1).
        unfreeze_experts: experts per layer that stay trainable with the new router: an int (that
            many, chosen at random per layer with ``generator``; the paper finds random as good as
            most- or least-used), a list of expert ids (every layer) or ``{layer name: ids}``.
        freeze: freeze every other parameter of ``model`` (also outside the MoE layers: create the
            new task's head afterwards, it is then the other trainable part). ``False`` leaves the
            trainability of everything else as it is.
        generator: a ``torch.Generator`` for the random initialisation and the expert choice.

    Returns:
        :class:`AdaptReport` with ``new_tasks`` and ``trainable_experts`` per layer.

    Example:
        >>> rep = mk.adapt.add_router(model, unfreeze_experts=1, generator=torch.Generator().manual_seed(0))
        >>> opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        >>> out = model(x, task_ids=rep.new_task)
    """
    op = "adapt.add_router"
    layers = _layers(model, op)
    check_int(num_new, op, "num_new", lo=1)
    check_choice(init, op, "init", INITS)
    check(isinstance(freeze, bool), op, "freeze", "must be a bool")
    _check_generator(generator, op)
    M, source_task = _task_count_and_source(layers, op, source_task)
    # expert ids to keep trainable, per layer, validated before anything changes
    chosen: dict[str, list[int]] = {}
    if isinstance(unfreeze_experts, (Mapping, list, tuple)):
        per = _per_layer(unfreeze_experts, layers, op, "unfreeze_experts", default=())
        for n, ids in per.items():
            check(isinstance(ids, (list, tuple, range)), op, "unfreeze_experts",
                  f"must give a list of expert ids for layer '{n}', got {ids!r}")
            for e in ids:
                check_int(e, op, "unfreeze_experts", lo=0, hi=layers[n].num_experts - 1)
            chosen[n] = sorted({int(e) for e in ids})
    else:
        check_int(unfreeze_experts, op, "unfreeze_experts", lo=0,
                  hi=min(m.num_experts for m in layers.values()))
        for n, layer in layers.items():
            perm = torch.randperm(layer.num_experts, generator=generator)
            chosen[n] = sorted(perm[:unfreeze_experts].tolist())

    before = stats(model)
    if freeze:
        model.requires_grad_(False)
    for n, layer in layers.items():
        E = layer.num_experts
        masks = _masks(layer, freeze)
        W = layer.effective("router_weight").detach()
        new = _new_router_rows(layer, num_new, init, source_task, E, generator)
        J = _joint(layer)
        layer._set_rows("router_weight", torch.cat([W, new]), masks["router_weight"] + [True] * num_new)
        for name in ("w1", "w2", "b1", "b2"):
            if getattr(layer, name) is not None:
                mask = list(masks[name])
                for e in chosen[n]:
                    mask[e] = True
                layer._set_rows(name, layer.effective(name).detach(), mask)
        layer.num_tasks = M + num_new
        layer._set_visible(layer.visible_experts + [E] * num_new, op)
        _set_joint(layer, _grow_joint(J, 0, [E] * num_new))
        _finish(layer, op)
    return AdaptReport("add_router", before, stats(model), new_tasks=list(range(M, M + num_new)),
                       trainable_experts=chosen)


# ---------------------------------------------------------------- add_experts

def add_experts(model: nn.Module, num_new: Union[int, Mapping[str, int]], *, init: str = "random",
                source_task: Optional[int] = None, freeze: bool = True,
                generator: Optional[torch.Generator] = None) -> AdaptReport:
    """Continual learning: add ``C`` experts to every MoE layer and one new router, the only router
    able to choose them; freeze the rest.

    The old tasks keep routing over their first ``E`` experts (``visible_experts``), with the same
    router weights, the same experts and the same k, so their outputs are bit-identical to before for
    a batch of one task (per-token mixed batches: the same experts are chosen and the outputs agree
    to rounding, see :class:`moe_kernels.nn.MoE`). The new task (id ``report.new_task``) sees all
    ``E + C``. In the mutual-information buffer the old tasks get zero columns for the new experts,
    rows rescaled to 1/(M+1), and the new task a row uniform over its experts.

    Args:
        model: a module containing ``mk.nn.MoE`` layers (all with the same number of tasks).
        num_new: C, experts added per layer: an int, or ``{layer name: C}`` (missing layers: 0;
            they still get the new router).
        init: the new router: ``"random"`` or ``"copy"`` (``source_task``'s columns for the old
            experts, random for the new ones). New experts always get nn.Linear's initialisation.
        source_task: router copied by ``init="copy"`` (default: the newest).
        freeze: freeze every other parameter of ``model``; ``False`` leaves the rest as it is.
        generator: a ``torch.Generator`` for the initialisation.

    Example:
        >>> rep = mk.adapt.add_experts(model, 2)           # 12 -> 14 experts per layer
        >>> out = model(x_new, task_ids=rep.new_task)      # old task ids: outputs unchanged
    """
    op = "adapt.add_experts"
    layers = _layers(model, op)
    per = _per_layer(num_new, layers, op, "num_new", default=0)
    for n, c in per.items():
        check_int(c, op, "num_new", lo=0)
    check(isinstance(num_new, Mapping) or num_new >= 1, op, "num_new", f"must be >= 1, got {num_new}")
    check_choice(init, op, "init", INITS)
    check(isinstance(freeze, bool), op, "freeze", "must be a bool")
    _check_generator(generator, op)
    M, source_task = _task_count_and_source(layers, op, source_task)

    before = stats(model)
    if freeze:
        model.requires_grad_(False)
    added = {}
    for n, layer in layers.items():
        E, C = layer.num_experts, per[n]
        masks = _masks(layer, freeze)
        W = layer.effective("router_weight").detach()
        J = _joint(layer)
        new_row = _new_router_rows(layer, 1, init, source_task, E + C, generator)
        W = torch.cat([torch.cat([W, W.new_zeros(M, layer.dim, C)], dim=2), new_row])
        bounds = {"w1": 1.0 / math.sqrt(layer.dim), "w2": 1.0 / math.sqrt(layer.hidden),
                  "b1": 1.0 / math.sqrt(layer.dim), "b2": 1.0 / math.sqrt(layer.hidden)}
        new_experts = {}
        for name, bound in bounds.items():
            t = layer.effective(name)
            if t is not None:
                fresh = _uniform((C, *t.shape[1:]), bound, t, generator)
                new_experts[name] = torch.cat([t.detach(), fresh])
        layer._set_rows("router_weight", W, masks["router_weight"] + [True])
        for name, t in new_experts.items():
            layer._set_rows(name, t, masks[name] + [True] * C)
        layer.num_experts, layer.num_tasks = E + C, M + 1
        layer._set_visible(layer.visible_experts + [E + C], op)
        _set_joint(layer, _grow_joint(J, C, [E + C]))
        _finish(layer, op)
        added[n] = list(range(E, E + C))
    return AdaptReport("add_experts", before, stats(model), new_tasks=[M], added=added)


# ---------------------------------------------------------------- prune_experts

def _usage_for(usage, name: str, layer: MoE, tasks, op) -> Tensor:
    """Per-expert counts ``[E]`` (float64) of one layer, summed over ``tasks``."""
    if isinstance(usage, ExpertUsage):
        c = next((usage.counts[un] for un, ul in usage.layers.items() if ul is layer), None)
        check(c is not None, op, "usage", f"has no counts for layer '{name}' (made for another model?)")
    elif isinstance(usage, Mapping):
        c = usage.get(name)
        if c is None:
            c = next((v for key, v in usage.items() if key is layer), None)
        check(c is not None, op, "usage", f"has no entry for layer '{name}' (keys: layer names or modules)")
    else:
        fail(op, "usage", "is required to prune by num, fraction or threshold: an ExpertUsage or "
                          f"{{layer name: counts [num_tasks, E] or [E]}}, got {type(usage).__name__}")
    check(isinstance(c, Tensor), op, "usage", f"for layer '{name}' must be a tensor, got {type(c).__name__}")
    M, E = layer.num_tasks, layer.num_experts
    c = c.detach().to("cpu", torch.float64)
    if c.dim() == 1:
        check(c.shape[0] == E, op, "usage",
              f"for layer '{name}' must have E={E} entries, got {tuple(c.shape)}")
        check(tasks is None, op, "tasks", "needs per-task usage ([num_tasks, E] counts)")
        return c
    check(c.dim() == 2 and tuple(c.shape) == (M, E), op, "usage",
          f"for layer '{name}' must have shape [num_tasks={M}, E={E}] (or [E]), got {tuple(c.shape)}")
    if tasks is None:
        return c.sum(0)
    ids = [tasks] if isinstance(tasks, int) else list(tasks)
    for t in ids:
        check_int(t, op, "tasks", lo=0, hi=M - 1)
    return c[ids].sum(0)


def prune_experts(model: nn.Module, *, num=None, fraction=None, threshold=None, experts=None, usage=None,
                  tasks: Union[None, int, Sequence[int]] = None) -> AdaptReport:
    """Remove experts from every MoE layer (MTHL: "remove experts rarely used" after learning a
    router for the new dataset; then fine-tune).

    Give exactly one of ``num``, ``fraction``, ``threshold`` or ``experts``; each may be a single
    value for every layer or a dict ``{layer name: value}`` (layers left out are not pruned).

    Args:
        num: remove this many of the least-used experts (ties: the higher id goes first).
        fraction: remove ``round(fraction * E)`` of the least-used experts, ``0 <= fraction < 1``.
        threshold: θ; remove the experts whose frequency, their share of the kept assignments of
            ``tasks`` (:meth:`moe_kernels.nn.ExpertUsage.frequencies`), is below θ (MTHL: 1%, 5%).
        experts: expert ids to remove (a list for every layer, or per layer).
        usage: counts for ``num`` / ``fraction`` / ``threshold``: an
            :class:`~moe_kernels.nn.ExpertUsage`, or ``{layer name: [num_tasks, E] or [E] counts}``.
        tasks: the task(s) whose usage counts (default: all tasks pooled); typically the new
            dataset's task id.

    The remaining experts keep their order; every router loses the removed columns; a task that saw
    a prefix of ``E_t`` experts then sees the ``E_t'`` remaining ones of that prefix; the
    mutual-information buffer loses the columns and its rows are renormalised. Every task must keep
    at least k experts (lower k first with :func:`set_top_k`), else nothing changes and an error
    names the argument. Which rows were trainable is kept.

    Guarantee (dropless layers, ``renormalize=True`` or ``score="sigmoid"``): a token none of whose
    chosen experts was removed chooses the same experts and gets the same output up to the rounding
    of the (narrower) router product and softmax. (With softmax scores and ``renormalize=False``
    the gates of the remaining experts grow by the removed experts' share; with a
    ``capacity_factor`` the capacity follows the new E.)

    Example:
        >>> mk.adapt.prune_experts(model, threshold=0.01, usage=usage, tasks=new_task)
        >>> mk.adapt.prune_experts(model, num={"blocks.1.moe": 4, "blocks.3.moe": 8}, usage=usage)
    """
    op = "adapt.prune_experts"
    layers = _layers(model, op)
    given = {k: v for k, v in (("num", num), ("fraction", fraction), ("threshold", threshold),
                               ("experts", experts)) if v is not None}
    if len(given) != 1:
        fail(op, "num", f"give exactly one of 'num', 'fraction', 'threshold' or 'experts', got "
                        f"{sorted(given) or 'none'}")
    (arg, value), = given.items()
    if arg == "experts" and isinstance(value, (list, tuple, range, set)):
        value = {n: value for n in layers}
    per = _per_layer(value, layers, op, arg, default=None)
    if tasks is not None and not isinstance(tasks, int):
        check(isinstance(tasks, (list, tuple)), op, "tasks",
              f"must be None, an int or a list of ints, got {tasks!r}")

    removed: dict[str, list[int]] = {}
    for n, layer in layers.items():
        v, E = per[n], layer.num_experts
        if v is None:
            removed[n] = []
            continue
        if arg == "experts":
            check(isinstance(v, (list, tuple, range, set)), op, "experts",
                  f"must be a list of expert ids for layer '{n}', got {v!r}")
            for e in v:
                check_int(e, op, "experts", lo=0, hi=E - 1)
            removed[n] = sorted({int(e) for e in v})
            continue
        c = _usage_for(usage, n, layer, tasks, op)
        if arg == "threshold":
            check(isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0, op,
                  "threshold", f"must be a frequency in [0, 1], got {v!r}")
            total = float(c.sum())
            check(total > 0, op, "usage", f"has no assignments counted for layer '{n}'"
                                          + (f" and tasks={tasks}" if tasks is not None else ""))
            removed[n] = [e for e in range(E) if float(c[e]) / total < v]
            continue
        if arg == "num":
            check_int(v, op, "num", lo=0, hi=E - 1)
            count = v
        else:
            check(isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v < 1.0, op,
                  "fraction", f"must be in [0, 1), got {v!r}")
            count = round(v * E)
        order = sorted(range(E), key=lambda e: (float(c[e]), -e))
        removed[n] = sorted(order[:count])
    # every task must keep >= k experts: check all layers before changing any
    for n, layer in layers.items():
        gone = set(removed[n])
        for m, vis in enumerate(layer.visible_experts):
            left = sum(1 for e in range(vis) if e not in gone)
            if left < layer.k:
                fail(op, arg, f"would leave task {m} of layer '{n}' with {left} experts (of {vis} it sees), "
                              f"fewer than k={layer.k}; prune fewer, or lower k first (adapt.set_top_k)")

    before = stats(model)
    for n, layer in layers.items():
        gone = set(removed[n])
        if not gone:
            continue
        keep = [e for e in range(layer.num_experts) if e not in gone]
        idx = torch.tensor(keep, dtype=torch.int64, device=layer.w1.device)
        masks = _masks(layer, freeze=False)
        J = _joint(layer)
        J = J[:, idx.to(J.device)]
        layer._set_rows("router_weight", layer.effective("router_weight").detach().index_select(2, idx),
                        masks["router_weight"])
        for name in ("w1", "w2", "b1", "b2"):
            t = layer.effective(name)
            if t is not None:
                layer._set_rows(name, t.detach().index_select(0, idx), [masks[name][e] for e in keep])
        visible = [sum(1 for e in keep if e < vis) for vis in layer.visible_experts]
        layer.num_experts = len(keep)
        layer._set_visible(visible, op)
        # renormalise each row of the joint to 1/M (a row with no mass left: uniform over its experts)
        M = layer.num_tasks
        for m, vis in enumerate(visible):
            s = float(J[m].sum())
            if s > 0:
                J[m] = J[m] / (s * M)
            else:
                J[m] = 0.0
                J[m, :vis] = 1.0 / (M * vis)
        _set_joint(layer, J)
        _finish(layer, op)
    return AdaptReport("prune_experts", before, stats(model), removed=removed)


# ---------------------------------------------------------------- set_top_k / merge

def set_top_k(model: nn.Module, k: Union[int, Mapping[str, int]]) -> AdaptReport:
    """Set the experts per token of every MoE layer (an int, or ``{layer name: k}``; layers left
    out keep theirs). ``1 <= k <=`` the fewest experts any task of the layer sees.

    Lower k: fewer expert FLOPs per token (MTHL learns the new router with it). It applies to every
    task of the layer.

    Example:
        >>> print(mk.adapt.set_top_k(model, 2))
    """
    op = "adapt.set_top_k"
    layers = _layers(model, op)
    per = _per_layer(k, layers, op, "k", default=None)
    for n, layer in layers.items():
        if per[n] is not None:
            check_int(per[n], op, "k", lo=1, hi=min(layer.visible_experts))
    before = stats(model)
    for n, layer in layers.items():
        if per[n] is not None:
            layer.k = int(per[n])
            _finish(layer, op)
    return AdaptReport("set_top_k", before, stats(model))


def merge(model: nn.Module, trainable: bool = False) -> AdaptReport:
    """Fold the separate trainable rows of every partly trainable MoE tensor back into it, leaving
    plain parameters (and a state dict a plain layer of the same shape loads). Each merged tensor
    gets ``requires_grad=trainable``; tensors that were not partly trainable are left as they are.

    Example:
        >>> mk.adapt.merge(model)                      # after training the new router
        >>> torch.save(model.state_dict(), path)
    """
    op = "adapt.merge"
    layers = _layers(model, op)
    check(isinstance(trainable, bool), op, "trainable", "must be a bool")
    before = stats(model)
    for layer in layers.values():
        for name in tuple(layer._partial):
            t = layer.effective(name).detach()
            layer._set_rows(name, t, [trainable] * t.shape[0])
    return AdaptReport("merge", before, stats(model))
