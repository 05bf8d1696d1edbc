"""DeepSpeed integration: a drop-in ``deepspeed.moe.layer.MoE`` built on the library's ops.

    import deepspeed, moe_kernels.deepspeed as mkds
    layer = mkds.MoE(hidden_size=512, expert=nn.Sequential(nn.Linear(512, 2048), nn.GELU(),
                                                          nn.Linear(2048, 512)),
                     num_experts=8, ep_size=2, k=2, drop_tokens=False)
    output, l_aux, exp_counts = layer(hidden_states)          # the same return value as DeepSpeed's

    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(mkds.param_groups(model)),
                                      config=...)              # ZeRO 0, 1, 2
    mkds.convert_deepspeed_moe(existing_model)                 # swap DeepSpeed's MoE layers in place

How the engine recognises the layer. :class:`MoE` is a subclass of ``deepspeed.moe.layer.MoE`` (the
engine looks for that type to turn on its MoE handling) with the same state-dict layout
(``deepspeed_moe.gate.wg.weight``, ``deepspeed_moe.experts.deepspeed_experts.<i>.<expert keys>``), and its
expert parameters carry ``allreduce = False`` and ``group_name = "ep_size_<ep_size>"`` exactly as
DeepSpeed's experts do. So ``deepspeed.initialize`` creates the expert-parallel groups (through the
inherited ``set_deepspeed_parallelism``), reduces expert gradients over the expert-data-parallel group,
ZeRO 1/2 partitions the expert parameter groups over that group, and ``save_checkpoint`` /
``load_checkpoint`` write and read one file per global expert, interchangeable with DeepSpeed's own
layer's checkpoints.

What is computed. Routing is ``moe_kernels.route`` on DeepSpeed's fp32 gate logits, the experts run as
one grouped MLP (``moe_kernels.grouped_mlp``) when the expert is ``nn.Sequential(nn.Linear, act,
nn.Linear)`` with act in ``nn.GELU()`` / ``nn.ReLU()`` / ``nn.SiLU()`` (any other expert module runs
once per local expert on its rows), and with ``ep_size > 1`` tokens travel with the library's expert
parallelism (:mod:`moe_kernels.distributed`): dropless all-to-all with variable splits when
``drop_tokens=False``, fixed splits when ``drop_tokens=True``, ranks with different token counts
(including zero) supported. Gate weights, ``l_aux`` and ``exp_counts`` follow DeepSpeed's definitions:
top-1 weights are the raw softmax probability, top-2/top-k weights are renormalised over the routes
that survived the capacity, top-2's ``l_aux`` counts first choices only (docs/deepspeed_parity.md).

Differences from DeepSpeed 0.19.8 (documented in docs/scale.md):

* With ``drop_tokens=True`` the capacity is computed from each rank's token count and the
  expert-parallel group takes the maximum (one all-reduce of one int). DeepSpeed uses each rank's own
  capacity, so its all-to-all fails when ranks hold different numbers of tokens (24 and 8, or 24 and 0).
* Which routes an overfull expert drops: for k = 2 all first choices before any second choice, in token
  order (DeepSpeed's rule, reproduced exactly); for k >= 3 the highest scores (DeepSpeed's ``"probs"``,
  the same except for exact ties); for k = 1 the earliest tokens (DeepSpeed: random token selection
  with ``use_rts=True``, an unspecified subset with ``use_rts=False``). ``use_rts`` is accepted and
  ignored.
* ``used_token`` and ``enable_expert_tensor_parallelism=True`` are not supported (a clear error).
"""

from __future__ import annotations

import copy
import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validation import check, check_int, fail

try:
    import deepspeed as _deepspeed  # noqa: F401
    from deepspeed.moe.layer import MoE as _DeepSpeedMoE
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer as _ds_split
except ImportError as exc:  # pragma: no cover - exercised only without DeepSpeed
    raise ImportError("moe_kernels.deepspeed needs DeepSpeed (pip install deepspeed); "
                      f"importing it failed: {exc}") from exc

from .backends.reference.routing import resolve_capacity
from .distributed.comm import all_reduce_max_int
from .distributed.expert_parallel import mark_expert_parameter, run_experts
from .nn.moe import ExpertExecutor, MoE as _LayerBase
from .ops.grouped import grouped_mlp
from .ops.permute import combine, dispatch
from .ops.routing import route
from .types import Routing

_ACTIVATIONS = ((nn.GELU, "gelu"), (nn.ReLU, "relu"), (nn.SiLU, "silu"))
_NOISY = (None, "None", "Jitter", "RSample")


def mlp_expert_activation(expert: nn.Module) -> Optional[str]:
    """The activation name when ``expert`` is ``nn.Sequential(nn.Linear(d, h), act, nn.Linear(h, d'))``
    with act ``nn.GELU()`` (exact), ``nn.ReLU()`` or ``nn.SiLU()`` and both or neither Linear has a bias:
    the shape that runs as one grouped MLP. None otherwise (the expert then runs as a module)."""
    if not (isinstance(expert, nn.Sequential) and len(expert) == 3):
        return None
    l1, act, l2 = expert[0], expert[1], expert[2]
    if type(l1) is not nn.Linear or type(l2) is not nn.Linear or l1.out_features != l2.in_features:
        return None
    if (l1.bias is None) != (l2.bias is None):
        return None
    for cls, name in _ACTIVATIONS:
        if type(act) is cls:
            if cls is nn.GELU and act.approximate != "none":
                return None
            return name
    return None


class _Gate(nn.Module):
    """DeepSpeed's ``TopKGate`` parameters and options: ``wg = Linear(d, E, bias=False)``, fp32 logits."""

    def __init__(self, wg: nn.Linear, k: int, capacity_factor: float, eval_capacity_factor: float,
                 min_capacity: int, noisy_gate_policy: Optional[str], drop_tokens: bool, use_rts: bool,
                 top2_2nd_expert_sampling: bool):
        super().__init__()
        self.wg = wg
        self.k = k
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.min_capacity = min_capacity
        self.noisy_gate_policy = noisy_gate_policy
        self.drop_tokens, self.use_rts = drop_tokens, use_rts
        self.top2_2nd_expert_sampling = top2_2nd_expert_sampling

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        if self.noisy_gate_policy == "Jitter" and self.training:
            xf = xf * torch.empty_like(xf).uniform_(1.0 - 1e-2, 1.0 + 1e-2)
        return F.linear(xf, self.wg.weight.float())


class _Experts(nn.Module):
    """Holds the local experts under DeepSpeed's name (``deepspeed_experts``) so checkpoints match."""

    def __init__(self, experts: nn.ModuleList):
        super().__init__()
        self.deepspeed_experts = experts
        self.num_local_experts = len(experts)

    def stacked_mlp(self):
        """``(activation, w1 [E_l, d, h], w2 [E_l, h, d], b1, b2)`` when every local expert is an MLP of
        the grouped shape, else None. Stacking copies the weights (differentiably) once per forward."""
        acts = {mlp_expert_activation(e) for e in self.deepspeed_experts}
        if len(acts) != 1 or None in acts:
            return None
        es = self.deepspeed_experts
        w1 = torch.stack([e[0].weight.t() for e in es])
        w2 = torch.stack([e[2].weight.t() for e in es])
        b1 = torch.stack([e[0].bias for e in es]) if es[0][0].bias is not None else None
        b2 = torch.stack([e[2].bias for e in es]) if es[0][2].bias is not None else None
        return acts.pop(), w1, w2, b1, b2

    def expert_fn(self, backend: Optional[str]):
        """``(rows, offsets) -> outputs`` for :func:`moe_kernels.distributed.run_experts`."""
        mlp = self.stacked_mlp()
        if mlp is not None:
            act, w1, w2, b1, b2 = mlp

            def grouped(rows, offs):
                dt = w1.dtype
                return grouped_mlp(rows.to(dt), offs, w1, w2, act, b1, b2, backend=backend)
            return grouped

        def per_expert(rows, offs):
            o = offs.tolist()
            outs = []
            for j, expert in enumerate(self.deepspeed_experts):
                out = expert(rows[o[j]:o[j + 1]])
                outs.append(out[0] if isinstance(out, tuple) else out)
            d_out = outs[0].shape[-1]
            if rows.shape[0] > o[-1]:
                outs.append(outs[0].new_zeros(rows.shape[0] - o[-1], d_out))
            return torch.cat(outs)
        return per_expert


class DeepSpeedExperts(ExpertExecutor):
    """The executor of the DeepSpeed drop-in: DeepSpeed's expert modules (``deepspeed_experts``, one
    grouped MLP when they are MLPs of one shape, else one call per expert) and DeepSpeed's
    expert-parallel group (set by the engine through ``set_deepspeed_parallelism``)."""

    name = "deepspeed"
    local = False

    def forward(self, layer, x, routing, weights):
        fn = layer.experts.expert_fn(layer.backend)
        if layer.ep_size > 1:
            if layer.ep_group is None:
                fail(layer._op_name, "ep_size",
                     f"is {layer.ep_size} but no expert-parallel group is set: run the model through "
                     "deepspeed.initialize (or call layer.set_deepspeed_parallelism() after "
                     "deepspeed.init_distributed())")
            return run_experts(x, routing, fn, group=layer.ep_group, weights=weights, backend=layer.backend)
        xe = dispatch(x, routing, backend=layer.backend)
        return combine(fn(xe, routing.offsets), routing, weights=weights, backend=layer.backend)


class _MoELayer(_LayerBase):
    """The part DeepSpeed calls ``deepspeed_moe``: the library's MoE layer configured as DeepSpeed's
    ``MOELayer``. Its router is the gate's ``wg`` Linear (fp32 logits), its gating follows
    DeepSpeed's rules (:meth:`_plan`, :meth:`_gate_weights`; the load-balancing loss counts first
    choices only for top-2), and its experts run with :class:`DeepSpeedExperts`. Keeps ``l_aux``
    and ``exp_counts`` of the last call as attributes, as DeepSpeed's ``MOELayer`` does."""

    _op_name = "deepspeed.MoE"
    _input_name = "hidden_states"
    returns_moe_output = False  # DeepSpeed's MOELayer returns the output tensor

    def __init__(self, gate: _Gate, experts: _Experts, ep_group_name: str, ep_size: int,
                 num_local_experts: int, backend: Optional[str] = None):
        self._pending_modules = (gate, experts)  # taken over by _create_parameters
        super().__init__(gate.wg.in_features, 1, gate.wg.out_features, gate.k, load_balancing_coef=1.0,
                         z_loss_coef=0.0, mi_coef=0.0, router_dtype=torch.float32, backend=backend,
                         executor=DeepSpeedExperts())
        self.load_balancing_choices = 1 if gate.k == 2 else None
        self.ep_group = None
        self.ep_group_name, self.ep_size, self.num_local_experts = ep_group_name, ep_size, num_local_experts
        self.l_aux: Optional[Tensor] = None
        self.exp_counts: Optional[Tensor] = None

    def _create_parameters(self, hidden, activation, bias, out_dim, *, device, dtype) -> None:
        self.gate, self.experts = self._pending_modules
        del self._pending_modules
        self.hidden = self.out_dim = self.activation = None  # the expert modules decide

    def reset_parameters(self) -> None:
        """Nothing: the gate and the experts are DeepSpeed's modules, initialised as DeepSpeed does."""

    def router_weights(self) -> Tensor:
        return self.gate.wg.weight.t().unsqueeze(0)

    def expert_parameters(self) -> list:
        return list(self.experts.parameters())

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group

    def __getstate__(self):
        # the last call's l_aux is a graph tensor (not deep-copyable); copies and pickles drop it
        state = self.__dict__.copy()
        state["l_aux"] = state["exp_counts"] = None
        return state

    def _router_input(self, x: Tensor) -> Tensor:
        xf = x.float()
        if self.gate.noisy_gate_policy == "Jitter" and self.training:
            xf = xf * torch.empty_like(xf).uniform_(1.0 - 1e-2, 1.0 + 1e-2)
        return xf

    def _plan(self, logits: Tensor, opts: dict) -> Routing:
        """DeepSpeed's gating on the library's routing. The returned routing's ``topk_weights`` are
        the raw softmax probabilities of the chosen experts and its ``logits`` the clean logits (the
        load-balancing loss uses those), also when noise chose the experts."""
        g = self.gate
        T, E = logits.shape
        k = g.k
        train = self.training
        select = None  # logits that choose the experts, when noise makes them differ from the weights'
        if k == 1 and g.noisy_gate_policy == "RSample" and train:
            select = logits.detach() + _gumbel(logits)
        elif k == 2 and g.top2_2nd_expert_sampling and train and T:
            # the first expert is the clean argmax; the second the argmax of noisy logits without it
            noisy = logits.detach() + _gumbel(logits)
            first = logits.detach().argmax(1, keepdim=True)
            select = noisy.scatter(1, first, noisy.amax(1, keepdim=True) + 1.0)
        capacity = None
        if g.drop_tokens:
            cf = g.capacity_factor if train else g.eval_capacity_factor
            capacity = resolve_capacity(T, k, E, None, float(cf), int(g.min_capacity))
            if self.ep_size > 1:
                dev = logits.device if logits.is_cuda else torch.device("cpu")
                capacity = all_reduce_max_int(capacity, dev, self.ep_group)
            capacity = max(1, capacity)
        policy = "score" if k >= 3 else "position"
        choice_major = k == 2 and capacity is not None
        routing = route(logits if select is None else select.contiguous(), k, renormalize=False,
                        capacity=None if choice_major else capacity, drop_policy=policy, backend=self.backend)
        if choice_major:
            routing = _choice_major_capacity(routing, capacity, self.backend)
        raw = routing.topk_weights if select is None else torch.softmax(logits, 1).gather(1, routing.topk_ids.long())
        return routing._replace(topk_weights=raw, logits=logits)

    def _gate_weights(self, routing: Routing) -> Tensor:
        """Top-1: the raw probability of kept routes; top-k: renormalised over the routes that
        survived the capacity (DeepSpeed's definitions)."""
        raw = routing.topk_weights
        kept = raw * (routing.slots >= 0).to(raw.dtype)
        if routing.k == 1:
            return kept
        return kept / kept.sum(1, keepdim=True).clamp_min(torch.finfo(kept.dtype).eps)

    def forward(self, hidden_states: Tensor, used_token: Optional[Tensor] = None) -> Tensor:
        if used_token is not None:
            fail(self._op_name, "used_token", "is not supported by moe_kernels.deepspeed.MoE (pass None)")
        out = super().forward(hidden_states)
        self.l_aux = out.losses["load_balancing"]
        self.exp_counts = torch.bincount(out.routing.topk_ids.reshape(-1).long(), minlength=self.num_experts).detach()
        return out.output.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, k={self.k}, ep_size={self.ep_size}, executor={self.executor!r}"


def _choice_major_capacity(routing, capacity: int, backend: Optional[str]):
    """DeepSpeed's top-2 capacity rule on a dropless top-2 routing: an expert takes all its first-choice
    tokens (in token order) before any second-choice token, up to ``capacity``. Built by routing the 2T
    rows "first choices, then second choices" with k = 1 (the library's plan builder keeps the first C
    rows of each expert) and mapping the rows back to tokens."""
    T, k = routing.topk_ids.shape
    E = routing.num_experts
    ids = routing.topk_ids.t().reshape(-1, 1).long()  # [2T]: all first choices, then all second
    onehot = torch.zeros(k * T, E, device=ids.device).scatter_(1, ids, 1.0)
    r1 = route(onehot, 1, capacity=capacity, backend=backend)
    slots = r1.slots.view(k, T).t().contiguous()
    sources = torch.where(r1.sources >= 0, r1.sources % max(T, 1), r1.sources)
    return routing._replace(counts=r1.counts, offsets=r1.offsets, slots=slots,
                            sources=sources.to(torch.int32), num_dropped=r1.num_dropped, capacity=capacity)


def _gumbel(like: Tensor) -> Tensor:
    u = torch.rand_like(like, dtype=torch.float32).clamp_(1e-20, 1.0)
    return -torch.log(-torch.log(u))


class MoE(_DeepSpeedMoE):
    """``deepspeed.moe.layer.MoE`` on the library's kernels: the same constructor arguments, return value
    ``(output, l_aux, exp_counts)``, parameter names and expert-parameter marks.

    Args (as DeepSpeed's):
        hidden_size: model dimension (input and output size).
        expert: the expert module, deep-copied once per local expert. ``nn.Sequential(nn.Linear,
            nn.GELU()/nn.ReLU()/nn.SiLU(), nn.Linear)`` runs as one grouped MLP; other modules run one
            call per local expert.
        num_experts: experts in the layer (over all expert-parallel ranks).
        ep_size: expert-parallel group size; ``num_experts`` must be divisible by it.
        k: experts per token.
        capacity_factor / eval_capacity_factor / min_capacity: capacity
            ``max(min_capacity, ceil(cf * T * k / E))`` with ``drop_tokens=True``, agreed as the maximum
            over the expert-parallel group.
        use_residual: Residual-MoE (a dense copy of ``expert`` mixed in by a learned 2-way softmax).
        noisy_gate_policy: None, ``"Jitter"`` (multiplicative input noise) or ``"RSample"`` (Gumbel noise
            on the top-1 choice), training only.
        drop_tokens: capacity mode (True) or dropless (False; variable all-to-all splits).
        use_rts: accepted for compatibility; drops keep the earliest tokens (see module docstring).
        use_tutel: accepted; ignored (the library's kernels are used).
        enable_expert_tensor_parallelism: must be False.
        top2_2nd_expert_sampling: k = 2: draw the second expert with Gumbel noise while training.
        backend: (keyword only) force a moe_kernels backend for every op.

    Returns from ``forward(hidden_states)``: ``(output shaped like hidden_states, l_aux (0-dim fp32),
    exp_counts ([E] int64, assignments per expert before the capacity))``.

    Example:
        >>> expert = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        >>> layer = MoE(16, expert, num_experts=4, k=2, drop_tokens=False)
        >>> out, l_aux, counts = layer(torch.randn(2, 5, 16))
        >>> out.shape, int(counts.sum())
        (torch.Size([2, 5, 16]), 20)
    """

    def __init__(self, hidden_size: int, expert: nn.Module, num_experts: int = 1, ep_size: int = 1,
                 k: int = 1, capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0,
                 min_capacity: int = 4, use_residual: bool = False, noisy_gate_policy: Optional[str] = None,
                 drop_tokens: bool = True, use_rts: bool = True, use_tutel: bool = False,
                 enable_expert_tensor_parallelism: bool = False, top2_2nd_expert_sampling: bool = True, *,
                 backend: Optional[str] = None) -> None:
        op = "deepspeed.MoE"
        check_int(hidden_size, op, "hidden_size", lo=1)
        check(isinstance(expert, nn.Module), op, "expert",
              f"must be an nn.Module, got {type(expert).__name__}")
        check_int(num_experts, op, "num_experts", lo=1)
        check_int(ep_size, op, "ep_size", lo=1)
        check(num_experts % ep_size == 0, op, "num_experts",
              f"({num_experts}) must be divisible by ep_size ({ep_size})")
        check_int(k, op, "k", lo=1, hi=num_experts)
        for name, v in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
            check(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, op, name,
                  f"must be a number > 0, got {v!r}")
        check_int(min_capacity, op, "min_capacity", lo=0)
        check(noisy_gate_policy in _NOISY, op, "noisy_gate_policy",
              f"must be one of {_NOISY}, got {noisy_gate_policy!r}")
        check(not enable_expert_tensor_parallelism, op, "enable_expert_tensor_parallelism",
              "is not supported by moe_kernels.deepspeed.MoE (use DeepSpeed's layer for expert tensor "
              "parallelism)")
        n_local = num_experts // ep_size
        experts = nn.ModuleList([copy.deepcopy(expert) for _ in range(n_local)])
        nn.Module.__init__(self)
        # the same order of random draws as DeepSpeed's layer: experts are copies, then the gate, then
        # the residual coefficient, so one seed gives the same initial weights in both layers
        wg = nn.Linear(hidden_size, num_experts, bias=False)
        residual = (expert, nn.Linear(hidden_size, 2)) if use_residual else None
        self._build(wg, experts, residual, num_experts=num_experts, ep_size=ep_size, k=k,
                    capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
                    min_capacity=min_capacity, noisy_gate_policy=noisy_gate_policy, drop_tokens=drop_tokens,
                    use_rts=use_rts, use_tutel=use_tutel, top2_2nd_expert_sampling=top2_2nd_expert_sampling,
                    backend=backend)

    def _build(self, wg, experts, residual, *, num_experts, ep_size, k, capacity_factor, eval_capacity_factor,
               min_capacity, noisy_gate_policy, drop_tokens, use_rts, use_tutel, top2_2nd_expert_sampling,
               backend):
        self.use_residual = residual is not None
        self.enable_expert_tensor_parallelism = False
        self.ep_size = ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep_size
        self.use_tutel = use_tutel
        for e in experts:
            for p in e.parameters():
                mark_expert_parameter(p, self.expert_group_name)
        gate = _Gate(wg, k, capacity_factor, eval_capacity_factor, min_capacity, noisy_gate_policy,
                     drop_tokens, use_rts, top2_2nd_expert_sampling)
        self.deepspeed_moe = _MoELayer(gate, _Experts(experts), self.expert_group_name, ep_size,
                                       self.num_local_experts, backend)
        if residual is not None:
            self.mlp, self.coefficient = residual

    # set_deepspeed_parallelism / _create_process_groups are inherited from DeepSpeed's layer: they create
    # the groups with deepspeed.utils.groups and hand the expert-parallel group to
    # deepspeed_moe._set_ep_group.

    def forward(self, hidden_states: Tensor, used_token: Optional[Tensor] = None):
        """``(output, l_aux, exp_counts)`` as DeepSpeed's ``MoE.forward``."""
        output = self.deepspeed_moe(hidden_states, used_token)
        if self.use_residual:
            out_mlp = self.mlp(hidden_states)
            if isinstance(out_mlp, tuple):
                out_mlp = out_mlp[0]
            coef = torch.softmax(self.coefficient(hidden_states), dim=-1)
            output = output * coef[..., 0:1] + out_mlp * coef[..., 1:]
        return output, self.deepspeed_moe.l_aux, self.deepspeed_moe.exp_counts

    @property
    def backend(self) -> Optional[str]:
        return self.deepspeed_moe.backend

    @classmethod
    def from_deepspeed(cls, layer: nn.Module, *, backend: Optional[str] = None) -> "MoE":
        """A library layer that takes over the modules (hence the very parameter objects, their values and
        marks) and the options of a ``deepspeed.moe.layer.MoE``; its expert-parallel group too, if set."""
        op = "deepspeed.MoE.from_deepspeed"
        check(isinstance(layer, _DeepSpeedMoE), op, "layer",
              f"must be a deepspeed.moe.layer.MoE, got {type(layer).__name__}")
        check(not getattr(layer, "enable_expert_tensor_parallelism", False), op, "layer",
              "uses expert tensor parallelism, which moe_kernels.deepspeed.MoE does not support")
        inner = layer.deepspeed_moe
        g = inner.gate
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        residual = (layer.mlp, layer.coefficient) if layer.use_residual else None
        new._build(g.wg, inner.experts.deepspeed_experts, residual, num_experts=layer.num_experts,
                   ep_size=layer.ep_size, k=g.k, capacity_factor=g.capacity_factor,
                   eval_capacity_factor=g.eval_capacity_factor, min_capacity=g.min_capacity,
                   noisy_gate_policy=g.noisy_gate_policy, drop_tokens=g.drop_tokens, use_rts=g.use_rts,
                   use_tutel=getattr(inner, "use_tutel", False),
                   top2_2nd_expert_sampling=g.top2_2nd_expert_sampling, backend=backend)
        new.train(layer.training)
        if inner.ep_group is not None:
            new.deepspeed_moe._set_ep_group(inner.ep_group)
        return new

    def extra_repr(self) -> str:
        g = self.deepspeed_moe.gate
        return (f"num_experts={self.num_experts}, ep_size={self.ep_size}, k={g.k}, "
                f"drop_tokens={g.drop_tokens}, "
                f"capacity_factor={g.capacity_factor}, eval_capacity_factor={g.eval_capacity_factor}, "
                f"min_capacity={g.min_capacity}, use_residual={self.use_residual}")


def convert_deepspeed_moe(model: nn.Module, *, backend: Optional[str] = None) -> nn.Module:
    """Swap every ``deepspeed.moe.layer.MoE`` inside ``model`` for :class:`MoE`, in place.

    The new layers take over the old layers' submodules, so parameters keep their identity, values,
    ``requires_grad`` and expert marks (an optimizer built before the swap still holds the right
    tensors), the state dict keys do not change, and a checkpoint of either loads into the other.
    Layers already converted are left alone.

    Args:
        model: any module; if it *is* a DeepSpeed MoE layer the converted layer is returned.
        backend: force a moe_kernels backend in the new layers.

    Returns:
        ``model`` (or the new layer when ``model`` itself was a DeepSpeed MoE layer).

    Example:
        >>> model = convert_deepspeed_moe(model)   # before deepspeed.initialize  # doctest: +SKIP
        >>> out, l_aux, counts = model.moe(x)                                    # doctest: +SKIP
    """
    op = "deepspeed.convert_deepspeed_moe"
    check(isinstance(model, nn.Module), op, "model", f"must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, _DeepSpeedMoE) and not isinstance(model, MoE):
        return MoE.from_deepspeed(model, backend=backend)
    todo = [(name, m) for name, m in model.named_modules()
            if isinstance(m, _DeepSpeedMoE) and not isinstance(m, MoE)]
    for name, m in todo:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MoE.from_deepspeed(m, backend=backend))
    return model


def param_groups(model, **group_options) -> list:
    """Optimizer parameter groups split the way DeepSpeed's engine needs them for MoE.

    Expert parameters (``allreduce == False``) go into groups marked ``moe=True`` and named by their
    ``group_name``; the rest into a ``"dense"`` group (one such split per input group). Pass the result to
    a ``torch.optim`` optimizer given to ``deepspeed.initialize`` (ZeRO 1/2 assert that MoE groups exist;
    without a client optimizer the engine splits by itself).

    Args:
        model: an ``nn.Module`` (its trainable parameters), an iterable of parameters, or a list of
            parameter-group dicts (each may carry options; a ``name`` is added where missing).
        group_options: options for every group (``lr``, ``weight_decay``, ...).

    Example:
        >>> opt = torch.optim.AdamW(param_groups(model, lr=1e-3, weight_decay=0.01))  # doctest: +SKIP
    """
    op = "deepspeed.param_groups"
    if isinstance(model, nn.Module):
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "name": "dense"}]
    else:
        items = list(model) if not isinstance(model, (dict, Tensor)) else None
        check(items is not None and len(items) > 0, op, "model",
              "must be an nn.Module, a non-empty iterable of parameters or a list of parameter-group dicts")
        if all(isinstance(i, dict) for i in items):
            groups = []
            for n, gr in enumerate(items):
                check("params" in gr, op, f"model[{n}]", "must have a 'params' entry")
                groups.append({**gr, "params": list(gr["params"]), "name": gr.get("name", f"group{n}")})
        elif all(isinstance(i, Tensor) for i in items):
            groups = [{"params": items, "name": "dense"}]
        else:
            fail(op, "model", "mixes parameter-group dicts and tensors")
    groups = [{**group_options, **gr} for gr in groups]
    for n, gr in enumerate(groups):
        for p in gr["params"]:
            if getattr(p, "allreduce", True) is False and not hasattr(p, "group_name"):
                fail(op, "model", f"group {n} has an expert parameter (allreduce=False) without group_name")
    out = _ds_split(groups)
    return [gr for gr in out if gr["params"]]


def _signature_matches_deepspeed() -> bool:
    """True when the constructor's DeepSpeed arguments and defaults equal deepspeed.moe.layer.MoE's."""
    ours = {k: v.default for k, v in inspect.signature(MoE.__init__).parameters.items()
            if v.kind is not inspect.Parameter.KEYWORD_ONLY}
    theirs = {k: v.default for k, v in inspect.signature(_DeepSpeedMoE.__init__).parameters.items()}
    return ours == theirs


__all__ = ["DeepSpeedExperts", "MoE", "convert_deepspeed_moe", "mlp_expert_activation", "param_groups"]
