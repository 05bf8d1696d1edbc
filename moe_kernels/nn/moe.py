"""``MoE``: a drop-in mixture-of-experts MLP built on the library's ops."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from .._validation import check, check_choice, check_int, fail
from ..ops.grouped import moe_mlp
from ..ops.losses import load_balancing_loss, mutual_information_loss, z_loss
from ..ops.routing import _check_options, route, task_route
from ..reference.grouped import ACTIVATIONS
from ..types import Routing
from .losses import MutualInformationLoss


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
        A coefficient of 0 skips computing that loss (it is then absent from ``losses``).

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
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        op = "nn.MoE"
        for name, v in (("dim", dim), ("hidden", hidden), ("num_experts", num_experts),
                        ("num_tasks", num_tasks)):
            check_int(v, op, name, lo=1)
        check_int(k, op, "k", lo=1, hi=num_experts)
        check_choice(activation, op, "activation", ACTIVATIONS)
        check_choice(mi_loss, op, "mi_loss", ("ema", "batch"))
        out_dim = dim if out_dim is None else out_dim
        check_int(out_dim, op, "out_dim", lo=1)
        self.dim, self.hidden, self.out_dim = dim, hidden, out_dim
        self.num_experts, self.k, self.num_tasks = num_experts, k, num_tasks
        self.activation = activation
        self.route_options = dict(score=score, renormalize=renormalize, capacity=capacity,
                                  capacity_factor=capacity_factor, min_capacity=min_capacity,
                                  drop_policy=drop_policy, pad_to=pad_to)
        self.load_balancing_coef, self.z_loss_coef, self.mi_coef = load_balancing_coef, z_loss_coef, mi_coef
        self.backend = backend
        self.router_dtype = router_dtype
        fk = dict(device=device, dtype=dtype)
        h1 = 2 * hidden if activation == "swiglu" else hidden
        self.router_weight = nn.Parameter(torch.empty(num_tasks, dim, num_experts, **fk))
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, h1, **fk))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, out_dim, **fk))
        self.b1 = nn.Parameter(torch.empty(num_experts, h1, **fk)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, out_dim, **fk)) if bias else None
        self.mi_loss = mi_loss
        self.mutual_information = (MutualInformationLoss(num_tasks, num_experts, mi_momentum, device=device)
                                   if num_tasks > 1 and mi_loss == "ema" else None)
        self.reset_parameters()
        # validate the routing options once, at construction, not at the first forward
        _check_options("nn.MoE", k, num_experts, **self.route_options)

    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation, per expert and per router."""
        for w, fan_in in ((self.router_weight, self.dim), (self.w1, self.dim), (self.w2, self.hidden)):
            nn.init.uniform_(w, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))
        for b, fan_in in ((self.b1, self.dim), (self.b2, self.hidden)):
            if b is not None:
                nn.init.uniform_(b, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))

    def _token_tasks(self, task_ids, lead_shape) -> Union[int, Tensor]:
        if self.num_tasks == 1:
            if task_ids is not None and not (isinstance(task_ids, int) and task_ids == 0):
                fail("nn.MoE", "task_ids", "must be None or 0 for a single-router MoE (num_tasks=1)")
            return 0
        if task_ids is None:
            fail("nn.MoE", "task_ids", f"is required with num_tasks={self.num_tasks} "
                                       "(an int for the batch or a tensor per token or per sample)")
        if isinstance(task_ids, Tensor):
            T = math.prod(lead_shape)
            if task_ids.numel() == T:
                return task_ids.reshape(T)
            if len(lead_shape) > 1 and task_ids.dim() == 1 and task_ids.shape[0] == lead_shape[0]:
                # one task per sample of a [B, L, d] batch: every token of sample b has task_ids[b]
                return task_ids.repeat_interleave(T // lead_shape[0])
            fail("nn.MoE", "task_ids", f"must have one entry per token ({T}) or per sample "
                                       f"({lead_shape[0]}), got shape {tuple(task_ids.shape)}")
        return task_ids

    def forward(self, x: Tensor, task_ids: Union[None, int, Tensor] = None) -> MoEOutput:
        """Route the tokens of ``x`` (``[..., dim]``) through the experts.

        Args:
            x: any shape ending in ``dim``.
            task_ids: with ``num_tasks > 1``: an int (the whole batch is one task/dataset), a tensor
                with one id per token, or one id per sample (first dim of ``x``).
        """
        check(x.shape[-1] == self.dim, "nn.MoE", "x",
              f"must end in dim={self.dim}, got shape {tuple(x.shape)}")
        lead = tuple(x.shape[:-1])
        x2 = x.reshape(-1, self.dim)
        tasks = self._token_tasks(task_ids, lead)
        xr, wr = x2, self.router_weight
        if self.router_dtype is not None:
            xr, wr = x2.to(self.router_dtype), wr.to(self.router_dtype)
        if self.num_tasks == 1:
            routing = route(xr @ wr[0], self.k, backend=self.backend, **self.route_options)
        else:
            routing = task_route(xr, wr, tasks, self.k, backend=self.backend, **self.route_options)
        y = moe_mlp(x2, routing, self.w1, self.w2, self.activation, self.b1, self.b2,
                    backend=self.backend)

        losses = {}
        aux = y.new_zeros((), dtype=torch.float32)
        if self.load_balancing_coef:
            losses["load_balancing"] = load_balancing_loss(routing.logits, routing, backend=self.backend)
            aux = aux + self.load_balancing_coef * losses["load_balancing"]
        if self.z_loss_coef:
            losses["z_loss"] = z_loss(routing.logits, backend=self.backend)
            aux = aux + self.z_loss_coef * losses["z_loss"]
        if self.num_tasks > 1 and self.mi_coef:
            gates = routing.dense_weights()
            if self.mutual_information is not None:
                mi = self.mutual_information(gates, tasks, backend=self.backend)
            else:
                mi = mutual_information_loss(gates, tasks, self.num_tasks, backend=self.backend)
            losses["mutual_information"] = mi
            aux = aux + self.mi_coef * mi
        return MoEOutput(y.reshape(*lead, self.out_dim), aux, losses, routing)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden={self.hidden}, num_experts={self.num_experts}, k={self.k}, "
                f"num_tasks={self.num_tasks}, activation={self.activation!r}, "
                f"bias={self.b1 is not None}, {self.route_options}")
