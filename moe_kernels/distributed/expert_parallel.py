"""Expert parallelism on ``torch.distributed``: the E experts of a layer are split over the ranks of an
expert-parallel group (rank r of W holds experts ``[r*E/W, (r+1)*E/W)``) and tokens travel to them.

The pipeline, built from the library's ops::

    route (local, over all E experts)  ->  dispatch into expert-grouped rows
      -> [dropless]  exchange per-expert counts, all-to-all with variable splits
         [capacity]  all-to-all with fixed splits (E/W * C rows per rank), no counts exchange
      -> regroup the received rows by local expert  ->  grouped expert MLP
      -> reverse regroup  ->  reverse all-to-all  ->  combine (gate-weighted sum per token)

Backward runs the same exchanges in reverse (each all-to-all is an autograd function whose backward is
the swapped exchange). Every rank of the group must run forward and backward through the layer the
same number of times, also a rank with zero tokens (it still serves its experts to the others).

Dropless mode needs the receivers to know how many rows arrive: one all-to-all of a ``[W, E/W]``
integer table and a device-to-host copy of it (the split sizes are host ints for gloo and NCCL).
Capacity mode sends ``E/W * C`` rows to every rank, empty capacity slots included (zero rows, as
DeepSpeed does), so it needs no counts exchange, but every rank must use the same capacity C:
:class:`ExpertParallelMoE` agrees on it with one tiny all-reduce (max) when C comes from a capacity
factor, and not at all when an explicit ``capacity`` is given.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check, check_int, check_tensor
from ..backends.reference.routing import resolve_capacity
from ..nn.moe import ExpertExecutor, MoE
from ..ops.grouped import _check_mlp, grouped_mlp
from ..ops.permute import combine, dispatch
from ..types import Routing
from .comm import all_reduce_max_int, all_to_all, exchange_counts, group_rank, group_size, require_initialized

# (rows grouped by local expert [R, d], offsets [E_local + 1] int32 on the rows' device) -> [R, d_out]
ExpertFn = Callable[[Tensor, Tensor], Tensor]


def local_expert_range(num_experts: int, group=None) -> range:
    """The global ids of the experts this rank holds: ``range(r * E/W, (r+1) * E/W)``.

    Example:
        >>> local_expert_range(8)  # one process: all experts
        range(0, 8)
    """
    op = "distributed.local_expert_range"
    check_int(num_experts, op, "num_experts", lo=1)
    W = group_size(group)
    check(num_experts % W == 0, op, "num_experts",
          f"must be divisible by the expert-parallel group size {W}, got {num_experts}")
    n = num_experts // W
    r = group_rank(group)
    return range(r * n, (r + 1) * n)


def fixed_capacity_routing(routing: Routing) -> Routing:
    """The same routing with every expert's segment exactly ``capacity`` rows long.

    Row ``e * C + i`` holds the i-th kept assignment of expert e (the order of ``routing``); unused
    rows are padding (``sources == -1``, zero after :func:`moe_kernels.dispatch`). ``offsets`` becomes
    ``[0, C, 2C, ..., E*C]`` and ``counts`` is unchanged. This is the layout of capacity-mode expert
    parallelism: each rank's share is a fixed ``E/W * C`` rows.

    Example:
        >>> r = fixed_capacity_routing(mk.route(torch.randn(6, 4), 2, capacity=2))  # doctest: +SKIP
        >>> r.offsets.tolist(), r.num_rows  # doctest: +SKIP
        ([0, 2, 4, 6, 8], 8)
    """
    op = "distributed.fixed_capacity_routing"
    check(isinstance(routing, Routing), op, "routing", "must be a moe_kernels.Routing")
    C = routing.capacity
    check(C >= 0, op, "routing", "must come from a capacity mode route (capacity >= 0), got a dropless one")
    E = routing.num_experts
    ids, slots = routing.topk_ids.long(), routing.slots.long()
    keep = slots >= 0
    pos = slots - routing.offsets.long()[ids]
    new_slots = torch.where(keep, ids * C + pos, torch.full_like(slots, -1))
    T, k = slots.shape
    sources = torch.full((E * C,), -1, dtype=torch.int64, device=slots.device)
    tok = torch.arange(T, device=slots.device).unsqueeze(1).expand(T, k)
    sources[new_slots[keep]] = tok[keep]
    offsets = torch.arange(E + 1, device=slots.device, dtype=torch.int64) * C
    i32 = torch.int32
    return routing._replace(slots=new_slots.to(i32), sources=sources.to(i32), offsets=offsets.to(i32))


def _regroup_index(recv: Tensor) -> Tensor:
    """``recv[s, j]`` rows arrived from rank s for local expert j, source-major. Returns the index
    that reorders them expert-major (expert j's rows from all sources, sources in rank order)."""
    W, n = recv.shape
    counts = recv.reshape(-1)
    src_start = torch.cumsum(counts, 0) - counts
    order = torch.arange(W * n, device=recv.device).view(W, n).t().reshape(-1)
    lens, starts = counts[order], src_start[order]
    tgt_start = torch.cumsum(lens, 0) - lens
    total = int(counts.sum())
    shift = torch.repeat_interleave(starts - tgt_start, lens, output_size=total)
    return shift + torch.arange(total, device=recv.device)


def _comm_device(x: Tensor, group) -> torch.device:
    """Where small control tensors (counts) must live for the group's backend."""
    import torch.distributed as dist
    try:
        backend = dist.get_backend(group)
    except Exception:
        backend = "gloo"
    return x.device if "nccl" in str(backend) else torch.device("cpu")


def run_experts(x: Tensor, routing: Routing, expert_fn: ExpertFn, *, group=None,
                weights: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """Expert parallelism with any expert computation: dispatch, exchange, ``expert_fn``, exchange back,
    combine.

    Args:
        x: ``[T, d]`` this rank's tokens (T may be 0).
        routing: the routing of ``x`` over all E experts (:func:`moe_kernels.route`). Dropless
            (``capacity == -1``) exchanges counts and uses variable splits; capacity mode uses fixed
            splits and every rank must have routed with the same ``capacity``.
        expert_fn: ``(rows [R, d], offsets [E/W + 1] int32) -> [R, d_out]``: the local experts applied
            to rows grouped by local expert (expert j owns rows ``offsets[j]:offsets[j+1]``; rows past
            ``offsets[-1]`` are padding and must map to finite values).
        group: the expert-parallel process group (default: the global group; 1 process: no
            communication).
        weights: ``[T, k]`` gate weights for the combine (default ``routing.topk_weights``).

    Returns:
        ``[T, d_out]``: ``sum_j weights[t, j] * expert_{ids[t, j]}(x[t])`` over kept assignments.
    """
    op = "distributed.run_experts"
    check_tensor(x, op, "x", ndim=2)
    check(isinstance(routing, Routing), op, "routing",
          f"must be a moe_kernels.Routing (from mk.route / mk.task_route), got {type(routing).__name__}")
    check(x.shape[0] == routing.num_tokens, op, "x",
          f"has {x.shape[0]} rows but the routing was built for {routing.num_tokens} tokens")
    check(callable(expert_fn), op, "expert_fn", "must be callable")
    require_initialized(op, group)
    W = group_size(group)
    E = routing.num_experts
    check(E % W == 0, op, "routing",
          f"has {E} experts, not divisible by the expert-parallel group size {W}")
    n_local = E // W
    if W == 1:
        xe = dispatch(x, routing, backend=backend)
        ye = expert_fn(xe, routing.offsets)
        return combine(ye, routing, weights=weights, backend=backend)

    d = x.shape[1]
    if routing.capacity >= 0:  # capacity mode: fixed splits
        C = routing.capacity
        fr = fixed_capacity_routing(routing)
        xe = dispatch(x, fr, backend=backend)  # [E*C, d], source layout [dest rank, local expert, C]
        splits = [n_local * C] * W
        xr = all_to_all(xe, splits, splits, group)  # [W * n_local * C, d]: [source, local expert, C]
        xl = xr.view(W, n_local, C, d).transpose(0, 1).reshape(W * n_local * C, d)
        offs = (torch.arange(n_local + 1, device=x.device, dtype=torch.int32) * (W * C))
        yl = expert_fn(xl, offs)
        d_out = yl.shape[1]
        yr = yl.view(n_local, W, C, d_out).transpose(0, 1).reshape(W * n_local * C, d_out)
        ye = all_to_all(yr, splits, splits, group)
        return combine(ye, fr, weights=weights, backend=backend)

    # dropless: variable splits, counts first
    seg = (routing.offsets[1:] - routing.offsets[:-1]).to(torch.int64)  # padded segment sizes
    dev = _comm_device(x, group)
    send = seg.view(W, n_local).to(dev)
    recv = exchange_counts(send, group)  # [W, n_local]: rows from rank s for my local expert j
    in_splits = send.sum(1).tolist()
    out_splits = recv.sum(1).tolist()
    n_send = int(sum(in_splits))
    xe = dispatch(x, routing, backend=backend)
    xr = all_to_all(xe[:n_send], out_splits, in_splits, group)
    recv_dev = recv.to(x.device)
    if n_local > 1:
        perm = _regroup_index(recv_dev)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        xl = xr.index_select(0, perm)
    else:
        xl = xr
    offs = F.pad(torch.cumsum(recv_dev.sum(0), 0), (1, 0)).to(torch.int32)
    yl = expert_fn(xl, offs)
    yr = yl.index_select(0, inv) if n_local > 1 else yl
    ys = all_to_all(yr, in_splits, out_splits, group)
    ye = F.pad(ys, (0, 0, 0, routing.num_rows - n_send))
    return combine(ye, routing, weights=weights, backend=backend)


def expert_parallel_mlp(x: Tensor, routing: Routing, w1: Tensor, w2: Tensor, activation: str = "gelu",
                        b1: Optional[Tensor] = None, b2: Optional[Tensor] = None, *, group=None,
                        weights: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """:func:`moe_kernels.moe_mlp` with the experts split over an expert-parallel group.

    Args:
        x: ``[T, d]`` this rank's tokens (T may differ between ranks, and may be 0).
        routing: routing of ``x`` over all E experts; dropless (variable all-to-all splits, counts
            exchanged first) or capacity mode (fixed splits; same ``capacity`` on every rank).
        w1, w2, b1, b2: this rank's experts only: ``w1 [E/W, d, h]`` (``2h`` for swiglu),
            ``w2 [E/W, h, d_out]``, global experts ``local_expert_range(E, group)``.
        activation: as in :func:`moe_kernels.grouped_mlp`.
        group: the expert-parallel group (default: global; one process: plain ``moe_mlp``).
        weights: ``[T, k]`` combine weights (default ``routing.topk_weights``).

    Returns:
        ``[T, d_out]``, equal (within fp tolerance) to ``moe_mlp`` on one process with all experts.

    Example:
        >>> # 2 ranks, 8 experts: rank r holds experts 4r..4r+3
        >>> r = mk.route(x @ router, k=2)                                    # doctest: +SKIP
        >>> y = expert_parallel_mlp(x, r, w1[4*rank:4*rank+4], w2[4*rank:4*rank+4])  # doctest: +SKIP
    """
    op = "distributed.expert_parallel_mlp"
    _check_mlp(op, x, w1, w2, b1, b2, activation)
    check(isinstance(routing, Routing), op, "routing", "must be a moe_kernels.Routing")
    W = group_size(group)
    check(routing.num_experts == W * w1.shape[0], op, "w1",
          f"holds {w1.shape[0]} experts but the routing has {routing.num_experts} over a group of {W} "
          f"ranks (each rank must hold {routing.num_experts / W:g})")

    def fn(rows, offs):
        return grouped_mlp(rows, offs, w1, w2, activation, b1, b2, backend=backend)

    return run_experts(x, routing, fn, group=group, weights=weights, backend=backend)


def mark_expert_parameter(p: Tensor, group_name: str) -> Tensor:
    """Mark ``p`` as an expert parameter the way DeepSpeed's experts are marked: ``p.allreduce = False``
    (the engine reduces it over the expert-data-parallel group, not the data-parallel group) and
    ``p.group_name`` (which expert-parallel group, e.g. ``"ep_size_2"``)."""
    check(isinstance(p, Tensor), "distributed.mark_expert_parameter", "p",
          f"must be a tensor (a parameter), got {type(p).__name__}")
    check(isinstance(group_name, str) and bool(group_name), "distributed.mark_expert_parameter", "group_name",
          f"must be a non-empty str, got {group_name!r}")
    p.allreduce = False
    p.group_name = group_name
    return p


def is_expert_parameter(p: Tensor) -> bool:
    """True for parameters marked by :func:`mark_expert_parameter` (DeepSpeed's ``is_moe_param``)."""
    return getattr(p, "allreduce", True) is False


class AllToAllExperts(ExpertExecutor):
    """The executor of :class:`ExpertParallelMoE`: the layer's experts split over an expert-parallel
    group, tokens exchanged with an all-to-all (:func:`expert_parallel_mlp`).

    Rank r of W holds experts ``[r*E/W, (r+1)*E/W)``; the layer's ``w1``, ``w2``, ``b1``, ``b2`` are
    this rank's slice, marked as expert parameters (:func:`mark_expert_parameter`). Dropless routing
    uses variable splits; with a capacity factor every rank computes its capacity from its own token
    count and the group takes the maximum (one all-reduce of one int), so ranks agree.
    """

    name = "all-to-all"
    local = False

    def __init__(self, group=None, group_name: Optional[str] = None):
        self.group = group
        self.ep_size = group_size(group)
        self.group_name = group_name or f"ep_size_{self.ep_size}"

    def num_local_experts(self, num_experts: int) -> int:
        check(num_experts % self.ep_size == 0, "distributed.ExpertParallelMoE", "num_experts",
              f"must be divisible by the expert-parallel group size {self.ep_size}, got {num_experts}")
        return num_experts // self.ep_size

    def setup(self, layer) -> None:
        op = "distributed.ExpertParallelMoE"
        check(layer.route_options["pad_to"] == 1, op, "pad_to", "must be 1: expert parallelism does not pad segments")
        check(not layer._restricted, op, "visible_experts",
              "must be None: every task sees every expert under expert parallelism")
        for p in layer.expert_parameters():
            mark_expert_parameter(p, self.group_name)

    def capacity(self, layer, num_tokens: int, device) -> Optional[int]:
        o = layer.route_options
        if o["capacity"] is not None or o["capacity_factor"] is None:
            return None  # dropless, or an explicit capacity every rank shares
        c = resolve_capacity(num_tokens, layer.k, layer.num_experts, None, o["capacity_factor"], o["min_capacity"])
        return max(1, all_reduce_max_int(c, device if device.type == "cuda" else torch.device("cpu"), self.group))

    def forward(self, layer, x, routing, weights):
        w1, w2, b1, b2 = layer.expert_weights()
        return expert_parallel_mlp(x, routing, w1, w2, layer.activation, b1, b2, group=self.group,
                                   weights=None if weights is routing.topk_weights else weights,
                                   backend=layer.backend)

    def __repr__(self) -> str:
        return f"AllToAllExperts(ep_size={self.ep_size}, group_name={self.group_name!r})"


class ExpertParallelMoE(MoE):
    """:class:`moe_kernels.nn.MoE` with its experts split over an expert-parallel group (plain
    torch.distributed): the one MoE layer with the :class:`AllToAllExperts` executor.

    Parameters: ``router_weight [M, d, E]`` (replicated: reduce it over the data-parallel group) and
    this rank's experts ``w1 [E/W, d, h]``, ``w2 [E/W, h, d_out]``, ``b1``, ``b2`` (marked with
    :func:`mark_expert_parameter`: reduce them over the expert-data-parallel group only).
    Options and outputs are those of :class:`moe_kernels.nn.MoE` (routing, per-task routers, the
    auxiliary losses, over this rank's tokens), except ``pad_to`` and ``visible_experts``, which
    expert parallelism does not take. :meth:`from_moe` takes the local slice of a full
    single-process layer, :meth:`gather_experts` reassembles it.

    Args:
        dim, hidden, num_experts, k, ...: as in ``mk.nn.MoE``; dropless by default (variable
            all-to-all splits). With ``capacity_factor`` every rank computes its capacity from its
            own token count and the group takes the maximum.
        group: the expert-parallel group (default: the global group).
        group_name: the name written on the expert parameters (``p.group_name``).

    Example:
        >>> # each of 2 processes (torch.distributed initialised):
        >>> layer = ExpertParallelMoE(64, 128, num_experts=8, k=2)   # holds 4 experts  # doctest: +SKIP
        >>> out = layer(x)                                            # doctest: +SKIP
        >>> (out.output.square().mean() + out.aux_loss).backward()    # doctest: +SKIP
    """

    _op_name = "distributed.ExpertParallelMoE"

    def __init__(self, dim: int, hidden: int, num_experts: int, k: int, *, group=None,
                 group_name: Optional[str] = None, **options):
        check("executor" not in options, self._op_name, "executor", "is fixed: AllToAllExperts(group)")
        super().__init__(dim, hidden, num_experts, k, executor=AllToAllExperts(group, group_name), **options)

    @property
    def group(self):
        return self.executor.group

    @property
    def ep_size(self) -> int:
        return self.executor.ep_size

    @property
    def group_name(self) -> str:
        return self.executor.group_name

    @property
    def num_local_experts(self) -> int:
        return self.w1.shape[0]

    @property
    def expert_offset(self) -> int:
        return group_rank(self.group) * self.num_local_experts

    @property
    def capacity(self) -> Optional[int]:
        return self.route_options["capacity"]

    @property
    def capacity_factor(self) -> Optional[float]:
        return self.route_options["capacity_factor"]

    @torch.no_grad()
    def load_full(self, router_weight: Tensor, w1: Tensor, w2: Tensor, b1: Optional[Tensor] = None,
                  b2: Optional[Tensor] = None) -> "ExpertParallelMoE":
        """Copy the router and this rank's slice of full (all-expert) weights into the layer."""
        op = "distributed.ExpertParallelMoE.load_full"
        sl = slice(self.expert_offset, self.expert_offset + self.num_local_experts)
        rw = router_weight if router_weight.dim() == 3 else router_weight.unsqueeze(0)
        for name, full, own in (("router_weight", rw, self.router_weight), ("w1", w1, self.w1),
                                ("w2", w2, self.w2), ("b1", b1, self.b1), ("b2", b2, self.b2)):
            if own is None:
                check(full is None, op, name, "was given but the layer has no bias")
                continue
            check(full is not None, op, name, "is required (the layer has this parameter)")
            part = full if name == "router_weight" else full[sl]
            check(tuple(part.shape) == tuple(own.shape), op, name,
                  f"gives a slice of shape {tuple(part.shape)} but the layer's is {tuple(own.shape)} "
                  f"(full tensors hold all {self.num_experts} experts)")
            own.copy_(part)
        return self

    @classmethod
    def from_moe(cls, moe: MoE, *, group=None, **options) -> "ExpertParallelMoE":
        """An expert-parallel copy of a single-process :class:`moe_kernels.nn.MoE` (its routing options,
        activation and loss coefficients; this rank's slice of its experts)."""
        op = "distributed.ExpertParallelMoE.from_moe"
        check(isinstance(moe, MoE) and moe.executor.local, op, "moe",
              f"must be a single-process moe_kernels.nn.MoE, got {type(moe).__name__}")
        check(moe.route_options.get("pad_to", 1) == 1, op, "moe",
              "uses pad_to > 1, which expert parallelism does not take")
        check(not moe._restricted, op, "moe", "has tasks that see only some experts (visible_experts), "
                                              "which expert parallelism does not take")
        ro = {k: v for k, v in moe.route_options.items() if k != "pad_to"}
        kw = dict(num_tasks=moe.num_tasks, activation=moe.activation, bias=moe.b1 is not None, out_dim=moe.out_dim,
                  load_balancing_coef=moe.load_balancing_coef, z_loss_coef=moe.z_loss_coef, mi_coef=moe.mi_coef,
                  mi_loss=moe.mi_loss, mi_momentum=moe.mi_momentum, router_dtype=moe.router_dtype,
                  backend=moe.backend, dtype=moe.w1.dtype, device=moe.w1.device, **ro)
        kw.update(options)
        layer = cls(moe.dim, moe.hidden, moe.num_experts, moe.k, group=group, **kw)
        eff = moe.effective
        layer.load_full(eff("router_weight").detach(), eff("w1").detach(), eff("w2").detach(),
                        None if moe.b1 is None else eff("b1").detach(),
                        None if moe.b2 is None else eff("b2").detach())
        if moe.mutual_information is not None and layer.mutual_information is not None:
            layer.mutual_information.joint.copy_(moe.mutual_information.joint)
        return layer

    def gather_experts(self) -> dict:
        """All experts' weights (``w1``, ``w2``, ``b1``, ``b2``, full E) gathered from the group (a
        collective: call on every rank)."""
        import torch.distributed as dist
        out = {}
        for name in ("w1", "w2", "b1", "b2"):
            p = self.effective(name) if getattr(self, name) is not None else None
            if p is None:
                continue
            if self.ep_size == 1:
                out[name] = p.detach().clone()
                continue
            parts = [torch.empty_like(p) for _ in range(self.ep_size)]
            dist.all_gather(parts, p.detach().contiguous(), group=self.group)
            out[name] = torch.cat(parts)
        return out

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden={self.hidden}, num_experts={self.num_experts}, k={self.k}, "
                f"ep_size={self.ep_size}, local_experts={self.num_local_experts} "
                f"(from {self.expert_offset}), num_tasks={self.num_tasks}, activation={self.activation!r}, "
                f"capacity={self.capacity}, capacity_factor={self.capacity_factor}")


def new_expert_parallel_groups(ep_size: int):
    """Create the expert-parallel and expert-data-parallel groups of the global world (collective: every
    rank calls it). Ranks ``[i*ep_size, (i+1)*ep_size)`` form expert-parallel groups; ranks with the same
    position in them form the expert-data-parallel groups (where expert gradients are reduced).

    Returns:
        ``(ep_group, ep_dp_group)`` of this rank.

    Example:
        >>> # 4 ranks: ep groups {0,1},{2,3}; ep_dp groups {0,2},{1,3}
        >>> ep, ep_dp = new_expert_parallel_groups(2)   # doctest: +SKIP
    """
    import torch.distributed as dist
    op = "distributed.new_expert_parallel_groups"
    check(dist.is_available() and dist.is_initialized(), op, "ep_size",
          "needs torch.distributed to be initialised first")
    world = dist.get_world_size()
    check_int(ep_size, op, "ep_size", lo=1)
    check(world % ep_size == 0, op, "ep_size", f"must divide the world size {world}, got {ep_size}")
    rank = dist.get_rank()
    mine_ep = mine_dp = None
    for i in range(world // ep_size):
        ranks = list(range(i * ep_size, (i + 1) * ep_size))
        g = dist.new_group(ranks)
        if rank in ranks:
            mine_ep = g
    for j in range(ep_size):
        ranks = list(range(j, world, ep_size))
        g = dist.new_group(ranks)
        if rank in ranks:
            mine_dp = g
    return mine_ep, mine_dp


def allreduce_gradients(module: nn.Module, *, dp_group=None, ep_dp_group=None,
                        params: Optional[Sequence[Tensor]] = None) -> None:
    """Average gradients for data + expert parallelism without DDP: shared parameters over ``dp_group``
    (default: global), expert parameters (:func:`is_expert_parameter`) over ``ep_dp_group`` but divided
    by the data-parallel size, as DeepSpeed does (the sum over expert-parallel ranks already happened in
    the all-to-all backward). A parameter without a gradient counts as zero."""
    import torch.distributed as dist
    check(isinstance(module, nn.Module), "distributed.allreduce_gradients", "module",
          f"must be an nn.Module, got {type(module).__name__}")
    ps = list(module.parameters()) if params is None else list(params)
    if not (dist.is_available() and dist.is_initialized()):
        return
    dp = dist.get_world_size(dp_group)
    for p in ps:
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        g = ep_dp_group if is_expert_parameter(p) else dp_group
        if dist.get_world_size(g) > 1:
            dist.all_reduce(p.grad, group=g)
        p.grad.div_(dp)


__all__ = ["AllToAllExperts", "ExpertFn", "ExpertParallelMoE", "allreduce_gradients", "expert_parallel_mlp",
           "fixed_capacity_routing", "is_expert_parameter", "local_expert_range", "mark_expert_parameter",
           "new_expert_parallel_groups", "run_experts"]
