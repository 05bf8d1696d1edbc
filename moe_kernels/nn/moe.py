"""``MoE``: the library's one mixture-of-experts layer, with a pluggable expert executor.

The layer is written once: token flattening, task-id normalisation, the router product in the
router dtype, routing (one router per task, experts visible per task), the auxiliary losses and
their assembly. What runs the experts on the routed tokens is an :class:`ExpertExecutor`:

* :class:`LocalExperts` (the default): every expert on this process, the fused
  :func:`moe_kernels.moe_mlp`;
* :class:`moe_kernels.distributed.AllToAllExperts`: the experts split over an expert-parallel
  group, tokens exchanged with an all-to-all (:class:`moe_kernels.distributed.ExpertParallelMoE`
  is this layer with that executor);
* ``moe_kernels.deepspeed.DeepSpeedExperts``: DeepSpeed's expert modules and expert-parallel
  groups (the inner layer of the DeepSpeed drop-in ``moe_kernels.deepspeed.MoE``).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .._validation import (MoEKernelsError, assert_index_range_async, check, check_choice, check_index_range,
                           check_int, checking_values, fail)
from ..backends.reference.grouped import ACTIVATIONS
from ..ops.grouped import moe_mlp
from ..ops.losses import load_balancing_loss, mutual_information_loss, z_loss
from ..ops.routing import _check_options, route, task_route
from ..types import Routing
from .losses import MutualInformationLoss

# tensors whose leading dim is a task (router_weight) or an expert (the rest): rows can be trained apart
ROW_PARAMS = ("router_weight", "w1", "w2", "b1", "b2")


class ExpertExecutor:
    """Runs a layer's experts on its routed tokens: the pluggable part of :class:`MoE`.

    Subclasses override :meth:`forward` and, where they need to, the hooks below. An executor holds
    no parameters: the layer does (``w1``, ``w2``, ``b1``, ``b2``, one row per expert *this process*
    holds, :meth:`num_local_experts`).
    """

    #: a short name for ``repr`` and error messages
    name = "experts"
    #: whether :mod:`moe_kernels.adapt` may restructure the layer (every expert on this process)
    local = True

    def num_local_experts(self, num_experts: int) -> int:
        """How many of the layer's ``num_experts`` experts this process holds."""
        return num_experts

    def setup(self, layer: "MoE") -> None:
        """Called once the layer's parameters exist (e.g. to mark expert parameters)."""

    def capacity(self, layer: "MoE", num_tokens: int, device: torch.device) -> Optional[int]:
        """The capacity to route with, or ``None`` to let :func:`moe_kernels.route` resolve the
        layer's ``capacity`` / ``capacity_factor`` for this call's tokens."""
        return None

    def forward(self, layer: "MoE", x: Tensor, routing: Routing, weights: Tensor) -> Tensor:
        """``[T, d] -> [T, d_out]``: ``sum_j weights[t, j] * expert_{ids[t, j]}(x[t])`` over kept assignments."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LocalExperts(ExpertExecutor):
    """Every expert on this process: the fused :func:`moe_kernels.moe_mlp` on the layer's weights.

    A task that sees only a prefix of the experts (``visible_experts``) uses views of that prefix.
    """

    name = "local"

    def forward(self, layer, x, routing, weights):
        w1, w2, b1, b2 = layer.expert_weights()
        v = routing.num_experts
        if v < w1.shape[0]:  # a prefix of the experts: contiguous views, no copy
            w1, w2 = w1[:v], w2[:v]
            b1, b2 = (None if b is None else b[:v] for b in (b1, b2))
        if weights is not routing.topk_weights:
            routing = routing._replace(topk_weights=weights)
        return moe_mlp(x, routing, w1, w2, layer.activation, b1, b2, backend=layer.backend)


class MoEOutput(NamedTuple):
    """What :class:`MoE` returns.

    Attributes:
        output: shaped like the input (last dim ``out_dim``).
        aux_loss: the weighted sum of the auxiliary losses (add it to the task loss).
        losses: each auxiliary loss, unweighted, by name (``"load_balancing"``, ``"z_loss"``,
            ``"mutual_information"`` when ``num_tasks > 1``).
        routing: the :class:`moe_kernels.Routing` of this call (expert choice, counts, drops).
    """

    output: Tensor
    aux_loss: Tensor
    losses: dict
    routing: Routing


class MoE(nn.Module):
    """Mixture-of-experts MLP: top-k router(s), E expert MLPs, auxiliary losses.

    ``y = sum_j w_j(x) * MLP_{e_j}(x)`` over the k experts chosen per token. With ``num_tasks > 1``
    there is one router per task or dataset (MTHL / Mod-Squad) and a mutual-information loss.

    Args:
        dim: input (and default output) feature size d.
        hidden: expert hidden size h.
        num_experts: E.
        k: experts per token.
        num_tasks: M routers; ``forward`` then needs ``task_ids``.
        activation: ``"gelu"``, ``"relu"``, ``"silu"`` or ``"swiglu"`` (w1 is then ``[E, d, 2h]``).
        capacity_factor / capacity / min_capacity / drop_policy / pad_to / score / renormalize:
            as in :func:`moe_kernels.route` (dropless by default).
        bias: expert biases b1, b2.
        out_dim: output size (default ``dim``).
        load_balancing_coef, z_loss_coef, mi_coef: weights of the auxiliary losses in
            ``aux_loss`` (``mi_coef`` only with ``num_tasks > 1``).
        mi_loss: ``"ema"`` (MTHL Eq. 5, buffer in the state dict) or ``"batch"`` (Mod-Squad,
            Eq. 3). The MI loss is computed on the sparse top-k gates, as in MTHL's Eq. 2.
        mi_momentum: EMA momentum of the ``"ema"`` form.
        router_dtype: dtype of the router product (default fp32, as DeepSpeed and Megatron-core do:
            bf16 logits tie often and flip the expert choice); ``None`` uses the input's dtype.
        backend: force a backend for every op of the layer.
        visible_experts: per task, how many experts its router may choose: task ``m`` routes over
            the prefix ``[0, visible_experts[m])`` (non-decreasing in ``m``, each in ``[k, E]``;
            default: every task sees all E). Set by :func:`moe_kernels.adapt.add_experts`, which
            appends experts that only the new task's router can choose.
        A coefficient of 0 skips computing that loss (it is then absent from ``losses``).

    Routing: a batch of one task (``task_ids`` an int, or ``num_tasks == 1``) is routed by that
    task's router alone, ``route(x @ router_weight[t][:, :visible_experts[t]])``: its result depends
    on no other router and no expert it cannot see, so adding routers or experts
    (:mod:`moe_kernels.adapt`) leaves it bit-identical. Per-token task ids use the fused
    :func:`moe_kernels.task_route`; when the tasks see different numbers of experts, the logits of
    the experts a token's task cannot see are set far below its others (finite, ``min - 1e4``) so
    their score is exactly 0 and top-k never picks them.

    Partly trainable tensors: ``router_weight`` (rows = tasks) and ``w1``, ``w2``, ``b1``, ``b2``
    (rows = experts) can have only some rows trainable (:meth:`set_trainable_rows`; used by
    :mod:`moe_kernels.adapt` to train a new router or a few experts). The tensor itself is then
    frozen and its trainable rows live in a separate parameter ``<name>_trainable`` (index buffer
    ``<name>_trainable_index``), copied over the frozen rows in each forward
    (:meth:`effective`). An optimiser therefore never sees, decays or moves a frozen row.
    ``state_dict()`` stores the effective (up-to-date) values under ``<name>``.

    Example:
        >>> moe = MoE(dim=64, hidden=128, num_experts=8, k=2)
        >>> out = moe(torch.randn(4, 16, 64))
        >>> loss = out.output.square().mean() + out.aux_loss
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, k: int, *, num_tasks: int = 1,
                 activation: str = "gelu", capacity_factor: Optional[float] = None,
                 capacity: Optional[int] = None, min_capacity: int = 0, drop_policy: str = "position",
                 pad_to: int = 1, score: str = "softmax", renormalize: bool = True, bias: bool = True,
                 out_dim: Optional[int] = None, load_balancing_coef: float = 1e-2,
                 z_loss_coef: float = 1e-3, mi_coef: float = 1e-2, mi_loss: str = "ema",
                 mi_momentum: float = 0.98, router_dtype: Optional[torch.dtype] = torch.float32,
                 backend: Optional[str] = None, visible_experts: Optional[Sequence[int]] = None,
                 executor: Optional[ExpertExecutor] = None, device=None, dtype=None):
        super().__init__()
        op = self._op_name
        for name, v in (("dim", dim), ("num_experts", num_experts), ("num_tasks", num_tasks)):
            check_int(v, op, name, lo=1)
        check_int(k, op, "k", lo=1, hi=num_experts)
        check_choice(mi_loss, op, "mi_loss", ("ema", "batch"))
        executor = LocalExperts() if executor is None else executor
        check(isinstance(executor, ExpertExecutor), op, "executor",
              f"must be a moe_kernels.nn.ExpertExecutor, got {type(executor).__name__}")
        self.executor = executor
        self.dim, self.num_experts, self.k, self.num_tasks = dim, num_experts, k, num_tasks
        self.route_options = dict(score=score, renormalize=renormalize, capacity=capacity,
                                  capacity_factor=capacity_factor, min_capacity=min_capacity,
                                  drop_policy=drop_policy, pad_to=pad_to)
        # validate the routing options once, at construction, not at the first forward
        _check_options(op, k, num_experts, **self.route_options)
        self.load_balancing_coef, self.z_loss_coef, self.mi_coef = load_balancing_coef, z_loss_coef, mi_coef
        #: assignments per token the load-balancing loss counts (None: all k; DeepSpeed's top-2: 1)
        self.load_balancing_choices: Optional[int] = None
        self.backend = backend
        self.router_dtype = router_dtype
        self._partial: tuple = ()  # names of the tensors with only some rows trainable
        self._create_parameters(hidden, activation, bias, out_dim, device=device, dtype=dtype)
        self.mi_loss, self.mi_momentum = mi_loss, mi_momentum
        self.mutual_information = (MutualInformationLoss(num_tasks, num_experts, mi_momentum, device=device)
                                   if num_tasks > 1 and mi_loss == "ema" else None)
        self.register_buffer("_visible", torch.empty(0, dtype=torch.int64, device=device), persistent=False)
        self._set_visible(visible_experts, op)
        self.reset_parameters()
        self.executor.setup(self)

    #: how errors name the layer and its input
    _op_name = "nn.MoE"
    _input_name = "x"
    #: forward returns an :class:`MoEOutput` (what :class:`~moe_kernels.nn.ExpertUsage` reads)
    returns_moe_output = True

    def _create_parameters(self, hidden, activation, bias, out_dim, *, device, dtype) -> None:
        """The router(s) ``router_weight [M, d, E]`` and this process's experts ``w1``, ``w2``, ``b1``,
        ``b2`` (a layer keeping its weights elsewhere overrides this, :meth:`router_weights` and
        :meth:`expert_weights`)."""
        op = self._op_name
        check_int(hidden, op, "hidden", lo=1)
        check_choice(activation, op, "activation", ACTIVATIONS)
        out_dim = self.dim if out_dim is None else out_dim
        check_int(out_dim, op, "out_dim", lo=1)
        self.hidden, self.out_dim, self.activation = hidden, out_dim, activation
        fk = dict(device=device, dtype=dtype)
        n = self.executor.num_local_experts(self.num_experts)
        h1 = 2 * hidden if activation == "swiglu" else hidden
        self.router_weight = nn.Parameter(torch.empty(self.num_tasks, self.dim, self.num_experts, **fk))
        self.w1 = nn.Parameter(torch.empty(n, self.dim, h1, **fk))
        self.w2 = nn.Parameter(torch.empty(n, hidden, out_dim, **fk))
        self.b1 = nn.Parameter(torch.empty(n, h1, **fk)) if bias else None
        self.b2 = nn.Parameter(torch.empty(n, out_dim, **fk)) if bias else None

    def router_weights(self) -> Tensor:
        """``[M, d, E]``: the routers the forward uses (:meth:`effective` of ``router_weight``)."""
        return self.effective("router_weight")

    def expert_weights(self) -> tuple:
        """``(w1, w2, b1, b2)`` the forward uses (biases ``None`` without ``bias``)."""
        return tuple(self.effective(n) for n in ("w1", "w2", "b1", "b2"))

    def expert_parameters(self) -> list:
        """The parameters holding this process's experts (``w1``, ``w2`` and the biases)."""
        return [p for p in (self.w1, self.w2, self.b1, self.b2) if p is not None]

    # ------------------------------------------------------------ structure (used by mk.adapt)

    def _set_visible(self, visible, op: str = "nn.MoE", arg: str = "visible_experts") -> None:
        """Set ``visible_experts`` (validated): a non-decreasing list, one entry in [k, E] per task."""
        E, M = self.num_experts, self.num_tasks
        if visible is None:
            visible = [E] * M
        check(isinstance(visible, (list, tuple)) and len(visible) == M, op, arg,
              f"must be a list with one int per task (num_tasks={M}), got {visible!r}")
        for m, v in enumerate(visible):
            check_int(v, op, f"{arg}[{m}]", lo=self.k, hi=E)
        check(all(a <= b for a, b in zip(visible, visible[1:])), op, arg,
              f"must be non-decreasing (a later task sees at least the experts of an earlier one), "
              f"got {list(visible)}")
        self.visible_experts = [int(v) for v in visible]
        self._restricted = any(v < E for v in self.visible_experts)
        self._visible = torch.tensor(self.visible_experts, dtype=torch.int64, device=self._visible.device)

    def effective(self, name: str) -> Optional[Tensor]:
        """The tensor the forward uses for ``name`` (``"router_weight"``, ``"w1"``, ``"w2"``, ``"b1"``,
        ``"b2"``): the parameter itself, or, when only some of its rows are trainable, the frozen
        parameter with the trainable rows copied over it (differentiable w.r.t. those rows)."""
        base = getattr(self, name)
        if name not in self._partial:
            return base
        idx, rows = getattr(self, name + "_trainable_index"), getattr(self, name + "_trainable")
        return base.index_copy(0, idx, rows)

    def trainable_rows(self, name: str) -> list:
        """Per row of ``name`` (tasks for ``router_weight``, experts otherwise): is it trainable?"""
        check_choice(name, "nn.MoE.trainable_rows", "name", ROW_PARAMS)
        base = getattr(self, name)
        if base is None:
            return []
        mask = [bool(base.requires_grad)] * base.shape[0]
        if name in self._partial:
            flag = bool(getattr(self, name + "_trainable").requires_grad)
            for i in getattr(self, name + "_trainable_index").tolist():
                mask[i] = flag
        return mask

    def set_trainable_rows(self, name: str, rows) -> None:
        """Make exactly the given rows of ``name`` trainable and freeze the others.

        Args:
            name: ``"router_weight"`` (rows are tasks), ``"w1"``, ``"w2"``, ``"b1"`` or ``"b2"``
                (rows are experts).
            rows: a bool (all or none), a list of bools (one per row) or a list/set of row indices.

        Example:
            >>> layer.set_trainable_rows("router_weight", [2])   # train only task 2's router
        """
        op = "nn.MoE.set_trainable_rows"
        check_choice(name, op, "name", ROW_PARAMS)
        base = getattr(self, name)
        check(base is not None, op, "name", f"'{name}' is absent (the layer has bias=False)")
        R = base.shape[0]
        if isinstance(rows, bool):
            mask = [rows] * R
        elif isinstance(rows, (list, tuple)) and rows and all(isinstance(r, bool) for r in rows):
            check(len(rows) == R, op, "rows", f"has {len(rows)} flags for {R} rows of '{name}'")
            mask = list(rows)
        elif isinstance(rows, (list, tuple, set, frozenset, range)):
            mask = [False] * R
            for r in rows:
                check_int(r, op, "rows", lo=0, hi=R - 1)
                mask[r] = True
        else:
            fail(op, "rows", f"must be a bool, a list of bools or a list of row indices, got {rows!r}")
        self._set_rows(name, self.effective(name).detach(), mask)

    def _set_rows(self, name: str, value: Tensor, mask: Sequence[bool]) -> None:
        """Replace ``name`` by ``value`` (any number of rows) with exactly the rows in ``mask``
        trainable. Keeps the Parameter object when the shape is unchanged; a new Parameter (and the
        separate trainable rows) inherit the Python attributes of the old one (e.g. marks that a
        distributed engine reads)."""
        value = value.detach()
        if name in self._partial:
            delattr(self, name + "_trainable")
            delattr(self, name + "_trainable_index")
            self._partial = tuple(n for n in self._partial if n != name)
        base = getattr(self, name)
        attrs = dict(base.__dict__) if base is not None else {}
        if base is not None and base.shape == value.shape and base.dtype == value.dtype \
                and base.device == value.device:
            if value.data_ptr() != base.data_ptr():
                with torch.no_grad():
                    base.copy_(value)
        else:
            base = nn.Parameter(value.clone())
            base.__dict__.update(attrs)
            setattr(self, name, base)
        mask = [bool(m) for m in mask]
        if all(mask) or not any(mask):
            base.requires_grad_(bool(mask) and all(mask))
            return
        base.requires_grad_(False)
        idx = torch.tensor([i for i, m in enumerate(mask) if m], dtype=torch.int64, device=value.device)
        rows = nn.Parameter(value.index_select(0, idx).clone())
        rows.__dict__.update(attrs)
        self.register_parameter(name + "_trainable", rows)
        self.register_buffer(name + "_trainable_index", idx)
        self._partial = self._partial + (name,)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self._partial:  # the tensor itself holds stale values for its trainable rows
            eff = self.effective(name)
            destination[prefix + name] = eff if keep_vars else eff.detach()
        if self._restricted:
            destination[prefix + "visible_experts"] = torch.tensor(self.visible_experts, dtype=torch.int64)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "visible_experts"
        saved = state_dict.get(key)
        if saved is not None and saved.tolist() != self.visible_experts:
            error_msgs.append(
                f"{key}: the checkpoint's routers see {saved.tolist()} experts per task but this layer's "
                f"see {self.visible_experts}; build the layer with visible_experts={saved.tolist()} "
                "(or apply the same moe_kernels.adapt steps) before loading")
        elif saved is None and self._restricted and strict:
            missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if key in unexpected_keys:
            unexpected_keys.remove(key)

    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation, per expert and per router (router columns of experts
        a task cannot see are zero: they are never used). Which rows are trainable is kept."""
        masks = {name: self.trainable_rows(name) for name in self._partial}
        for name, mask in masks.items():  # whole tensors while initialising, re-split after
            self._set_rows(name, getattr(self, name).detach(), [False] * len(mask))
        with torch.no_grad():
            for w, fan_in in ((self.router_weight, self.dim), (self.w1, self.dim), (self.w2, self.hidden)):
                nn.init.uniform_(w, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))
            for b, fan_in in ((self.b1, self.dim), (self.b2, self.hidden)):
                if b is not None:
                    nn.init.uniform_(b, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))
            for m, v in enumerate(self.visible_experts):
                self.router_weight[m, :, v:] = 0.0
        for name, mask in masks.items():
            self._set_rows(name, getattr(self, name).detach(), mask)

    # ------------------------------------------------------------ the forward, written once

    def _tokens(self, x) -> tuple:
        """``x [..., dim]`` as contiguous ``[T, dim]`` rows (any view a torch module accepts) and its
        leading shape."""
        check(isinstance(x, Tensor) and x.dim() >= 1 and x.shape[-1] == self.dim, self._op_name, self._input_name,
              f"must be a tensor ending in dim={self.dim}, got "
              f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        lead = tuple(x.shape[:-1])
        return x.reshape(-1, self.dim).contiguous(), lead

    def _token_tasks(self, task_ids, lead_shape) -> Union[int, Tensor]:
        """``task_ids`` as an int for the whole batch or a ``[T]`` tensor: accepted are an int, a
        tensor with one id per token (any shape with T elements) or one id per sample of a
        ``[B, L, d]`` batch (``[B]``)."""
        op = self._op_name
        if self.num_tasks == 1:
            if task_ids is not None and not (isinstance(task_ids, int) and task_ids == 0):
                fail(op, "task_ids", "must be None or 0 for a single-router MoE (num_tasks=1)")
            return 0
        if task_ids is None:
            fail(op, "task_ids", f"is required with num_tasks={self.num_tasks} "
                                 "(an int for the batch or a tensor per token or per sample)")
        if isinstance(task_ids, Tensor):
            T = math.prod(lead_shape)
            if task_ids.numel() == T:
                return task_ids.reshape(T).contiguous()
            if len(lead_shape) > 1 and task_ids.dim() == 1 and task_ids.shape[0] == lead_shape[0]:
                # one task per sample of a [B, L, d] batch: every token of sample b has task_ids[b]
                return task_ids.repeat_interleave(T // lead_shape[0])
            fail(op, "task_ids", f"must have one entry per token ({T}) or per sample "
                                 f"({lead_shape[0]}), got shape {tuple(task_ids.shape)}")
        check_int(task_ids, op, "task_ids", lo=0, hi=self.num_tasks - 1)
        return int(task_ids)

    def _route_options(self, num_tokens: int, device) -> dict:
        """:func:`moe_kernels.route`'s options for this call (the executor may fix the capacity)."""
        capacity = self.executor.capacity(self, num_tokens, device)
        if capacity is None:
            return self.route_options
        return dict(self.route_options, capacity=capacity, capacity_factor=None)

    def _router_input(self, x: Tensor) -> Tensor:
        """The router's input: the tokens in the router dtype."""
        return x if self.router_dtype is None else x.to(self.router_dtype)

    def _route(self, x: Tensor, tasks: Union[int, Tensor]) -> Routing:
        """The routing of the tokens ``x [T, d]``: the router product in the router dtype, per task.

        A batch of one task is routed by that task's router over the experts it can see; per-token
        tasks use the fused :func:`moe_kernels.task_route` (or :meth:`_masked_task_route` when the
        tasks see different numbers of experts).
        """
        xr, wr = self._router_input(x), self.router_weights()
        if self.router_dtype is not None:
            wr = wr.to(self.router_dtype)
        opts = self._route_options(x.shape[0], x.device)
        if isinstance(tasks, Tensor):
            if not self._restricted:
                return task_route(xr, wr, tasks, self.k, backend=self.backend, **opts)
            return self._masked_task_route(xr, wr, tasks, opts)
        v = self.visible_experts[tasks]
        w = wr[tasks] if v == self.num_experts else wr[tasks, :, :v].contiguous()
        return self._plan(xr @ w, opts)

    def _plan(self, logits: Tensor, opts: dict) -> Routing:
        """Top-k routing and the dispatch plan of the router logits of one task's batch."""
        return route(logits, self.k, backend=self.backend, **opts)

    def _masked_task_route(self, xr: Tensor, wr: Tensor, tasks: Tensor, opts: dict) -> Routing:
        """Per-token tasks that see different numbers of experts: every router's logits in one GEMM,
        each token's row picked, and the experts its task cannot see pushed to ``min - 1e4``
        (finite; softmax and sigmoid scores exactly 0, below every visible logit, so never chosen)."""
        if not torch.compiler.is_compiling():
            if checking_values(tasks.device):
                check_index_range(tasks, self.num_tasks, self._op_name, "task_ids")
            else:
                assert_index_range_async(tasks, self.num_tasks, self._op_name, "task_ids")
        T, d = xr.shape
        M, E = self.num_tasks, self.num_experts
        t = tasks.long()
        all_logits = (xr @ wr.permute(1, 0, 2).reshape(d, M * E)).view(T, M, E)
        logits = all_logits.gather(1, t.view(T, 1, 1).expand(T, 1, E)).squeeze(1)
        visible = torch.arange(E, device=xr.device) < self._visible[t].unsqueeze(1)
        far = logits.detach().amin(1, keepdim=True) - 1e4
        logits = torch.where(visible, logits, far).contiguous()
        return route(logits, self.k, backend=self.backend, **opts)

    def _gate_weights(self, routing: Routing) -> Tensor:
        """The weights the combine uses (the routing's gate weights)."""
        return routing.topk_weights

    def _aux_losses(self, routing: Routing, tasks: Union[int, Tensor], like: Tensor) -> tuple:
        """``(aux_loss, losses)``: each auxiliary loss with a non-zero coefficient, and their weighted sum."""
        losses = {}
        aux = like.new_zeros((), dtype=torch.float32)
        if self.load_balancing_coef:
            r = routing
            c = self.load_balancing_choices
            if c is not None and c < routing.k:
                r = routing._replace(topk_ids=routing.topk_ids[:, :c].contiguous(),
                                     topk_weights=routing.topk_weights[:, :c])
            losses["load_balancing"] = load_balancing_loss(routing.logits, r, backend=self.backend)
            aux = aux + self.load_balancing_coef * losses["load_balancing"]
        if self.z_loss_coef:
            losses["z_loss"] = z_loss(routing.logits, backend=self.backend)
            aux = aux + self.z_loss_coef * losses["z_loss"]
        if self.num_tasks > 1 and self.mi_coef:
            gates = routing.dense_weights()
            v = routing.num_experts
            if v < self.num_experts:
                gates = torch.nn.functional.pad(gates, (0, self.num_experts - v))
            if self.mutual_information is not None:
                mi = self.mutual_information(gates, tasks, backend=self.backend)
            else:
                mi = mutual_information_loss(gates, tasks, self.num_tasks, backend=self.backend)
            losses["mutual_information"] = mi
            aux = aux + self.mi_coef * mi
        return aux, losses

    def _blame(self, err: MoEKernelsError, x: Tensor, lead: tuple) -> MoEKernelsError:
        """A routing error about the router logits, told in terms of the layer's own input: a NaN in
        ``x`` is the input's fault, not that of logits the user never passed."""
        msg = str(err)
        if "contains NaN or inf" not in msg or "argument 'x'" in msg and "nn." in msg:
            return err
        if not bool(torch.isfinite(x).all()):
            flat = int((~torch.isfinite(x)).reshape(-1).nonzero()[0])
            where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), lead + (self.dim,)))
            return MoEKernelsError(f"moe_kernels.{self._op_name}: argument '{self._input_name}' contains NaN or inf "
                                   f"(first at index {where})")
        return MoEKernelsError(f"moe_kernels.{self._op_name}: the router logits x @ router_weight are not finite "
                               f"although x is: the router weights hold NaN or inf, or the product "
                               f"overflows in {self.router_dtype or x.dtype} ({msg})")

    def forward(self, x: Tensor, task_ids: Union[None, int, Tensor] = None) -> MoEOutput:
        """Route the tokens of ``x`` (``[..., dim]``) through the experts.

        Args:
            x: any shape ending in ``dim``, any strides.
            task_ids: with ``num_tasks > 1``: an int (the whole batch is one task/dataset), a tensor
                with one id per token, or one id per sample (first dim of ``x``).
        """
        x2, lead = self._tokens(x)
        tasks = self._token_tasks(task_ids, lead)
        try:
            routing = self._route(x2, tasks)
        except MoEKernelsError as err:
            raise self._blame(err, x2, lead) from None
        y = self.executor.forward(self, x2, routing, self._gate_weights(routing))
        aux, losses = self._aux_losses(routing, tasks, y)
        return MoEOutput(y.reshape(*lead, y.shape[-1]), aux, losses, routing)

    def extra_repr(self) -> str:
        vis = f"visible_experts={self.visible_experts}, " if self._restricted else ""
        ex = "" if isinstance(self.executor, LocalExperts) else f", executor={self.executor!r}"
        return (f"dim={self.dim}, hidden={self.hidden}, num_experts={self.num_experts}, k={self.k}, "
                f"num_tasks={self.num_tasks}, {vis}activation={self.activation!r}, "
                f"bias={self.b1 is not None}, {self.route_options}{ex}")
