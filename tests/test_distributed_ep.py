"""Expert parallelism on 2 gloo processes against one process with the same weights and tokens.

One 2-process job (``mk.distributed.run_processes``) runs every case; the parent computes the
single-process reference with the ordinary ops and compares routing, outputs and gradients.

Equivalences (see moe_kernels/distributed/expert_parallel.py):

* dropless: routing is per token, so rank r's tokens are routed exactly as in one process over the
  concatenated batch; outputs and input gradients of rank r equal the reference's rows of rank r; an
  expert's gradient on its rank is already the sum over both ranks' tokens (the reverse all-to-all
  brings every contribution home), so it equals the reference gradient with no reduction; the router
  is replicated, so the sum of the ranks' router gradients equals the reference's.
* capacity mode: the capacity applies per source rank (each rank sends at most C rows per expert), so
  rank r's result equals a one-process ``moe_mlp`` of rank r's tokens routed with the same C, and an
  expert's gradient is the sum of the two per-rank references.
"""

from __future__ import annotations

import pytest
import torch

import moe_kernels as mk
from moe_kernels.distributed import ChildProcessFailed, run_processes
from moe_kernels.reference.routing import resolve_capacity

W = 2
TOL = dict(rtol=1e-5, atol=1e-5)

# name, token counts per rank, E, k, activation, bias, mode ("dropless" / "capacity"), skew
CASES = [
    ("dropless_24_8", (24, 8), 4, 2, "gelu", True, "dropless", None),
    ("dropless_24_0", (24, 0), 4, 2, "gelu", True, "dropless", None),
    ("dropless_0_0", (0, 0), 4, 2, "gelu", True, "dropless", None),
    ("dropless_all_to_rank0", (24, 8), 4, 2, "gelu", True, "dropless", "rank0"),
    ("dropless_all_to_rank1_top1", (24, 8), 4, 1, "relu", True, "dropless", "rank1"),
    ("dropless_E2_k1_swiglu_nobias", (24, 8), 2, 1, "swiglu", False, "dropless", None),
    ("dropless_E6_k3", (17, 5), 6, 3, "silu", True, "dropless", None),
    ("capacity_24_8", (24, 8), 4, 2, "gelu", True, "capacity", None),
    ("capacity_24_0", (24, 0), 4, 2, "gelu", True, "capacity", None),
    ("capacity_all_to_rank0", (24, 8), 4, 2, "gelu", True, "capacity", "rank0"),
]
D, H = 8, 12
CF = 0.75  # capacity factor: drops happen


def make_case(case, rank=None):
    """Deterministic tokens, router and full expert weights for a case (same in parent and children)."""
    name, counts, E, k, act, bias, mode, skew = case
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    xs = [torch.randn(n, D, generator=g) for n in counts]
    router = torch.randn(D, E, generator=g) * 0.5
    h1 = 2 * H if act == "swiglu" else H
    w1 = torch.randn(E, D, h1, generator=g) * 0.3
    w2 = torch.randn(E, H, D, generator=g) * 0.3
    b1 = torch.randn(E, h1, generator=g) * 0.1 if bias else None
    b2 = torch.randn(E, D, generator=g) * 0.1 if bias else None
    gy = [torch.randn(n, D, generator=g) for n in counts]  # upstream gradient: loss = sum(y * gy)
    if skew is not None:  # every token prefers the experts of one rank
        half = E // 2
        favoured = slice(0, half) if skew == "rank0" else slice(half, E)
        xs = [torch.cat([x[:, :1].abs() + 3.0, x[:, 1:]], 1) for x in xs]
        router[0] = -4.0
        router[0, favoured] = 4.0
    return dict(xs=xs, router=router, w1=w1, w2=w2, b1=b1, b2=b2, gy=gy, E=E, k=k, act=act, mode=mode,
                counts=counts)


def capacity_of(c):
    return max(resolve_capacity(n, c["k"], c["E"], None, CF, 0) for n in c["counts"])


def _child(rank, world):
    import moe_kernels.distributed as mkd
    out = {}
    for case in CASES:
        c = make_case(case)
        E, k = c["E"], c["k"]
        n = E // world
        sl = slice(rank * n, (rank + 1) * n)
        x = c["xs"][rank].clone().requires_grad_(True)
        router = c["router"].clone().requires_grad_(True)
        local = {name: (None if c[name] is None else c[name][sl].clone().requires_grad_(True))
                 for name in ("w1", "w2", "b1", "b2")}
        cap = capacity_of(c) if c["mode"] == "capacity" else None
        r = mk.route(x @ router, k, capacity=cap)
        y = mkd.expert_parallel_mlp(x, r, local["w1"], local["w2"], c["act"], local["b1"], local["b2"])
        (y * c["gy"][rank]).sum().backward()
        res = dict(y=y.detach(), ids=r.topk_ids, gx=x.grad, grouter=router.grad)
        for name, p in local.items():
            res["g" + name] = None if p is None else p.grad
        out[case[0]] = res
    # the module, with capacity_factor: ranks with 24 and 8 tokens agree on the capacity by all-reduce
    c = make_case(CASES[0])
    layer = mkd.ExpertParallelMoE(D, H, c["E"], c["k"], capacity_factor=CF, load_balancing_coef=0.1,
                                  z_loss_coef=0.01)
    layer.load_full(c["router"], c["w1"], c["w2"], c["b1"], c["b2"])
    o = layer(c["xs"][rank])
    out["module"] = dict(y=o.output.detach(), aux=o.aux_loss.detach(), capacity=o.routing.capacity,
                         marked=[getattr(p, "allreduce", True) is False for p in layer.parameters()],
                         local=list(mkd.local_expert_range(c["E"])))
    gathered = layer.gather_experts()
    out["module"]["gathered_w1"] = gathered["w1"]
    # per-dataset routers (MTHL): per-token task ids, the fused task_route
    c = make_case(CASES[0])
    layer = mkd.ExpertParallelMoE(D, H, c["E"], c["k"], num_tasks=2, load_balancing_coef=0, z_loss_coef=0)
    layer.load_full(task_routers(), c["w1"], c["w2"], c["b1"], c["b2"])
    x = c["xs"][rank]
    out["tasks"] = layer(x, torch.arange(x.shape[0]) % 2).output.detach()
    return out


def task_routers():
    return torch.randn(2, D, 4, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def ep_results():
    return run_processes(_child, W, timeout=600)


def _reference_dropless(c):
    x = torch.cat(c["xs"]).requires_grad_(True)
    router = c["router"].clone().requires_grad_(True)
    ws = {n: (None if c[n] is None else c[n].clone().requires_grad_(True)) for n in ("w1", "w2", "b1", "b2")}
    r = mk.route(x @ router, c["k"])
    y = mk.moe_mlp(x, r, ws["w1"], ws["w2"], c["act"], ws["b1"], ws["b2"])
    (y * torch.cat(c["gy"])).sum().backward()
    bounds = [0, c["counts"][0], sum(c["counts"])]
    rows = [slice(bounds[i], bounds[i + 1]) for i in range(W)]
    return dict(y=[y.detach()[s] for s in rows], ids=[r.topk_ids[s] for s in rows],
                gx=[x.grad[s] for s in rows], grouter=router.grad,
                **{"g" + n: (None if p is None else p.grad) for n, p in ws.items()})


def _reference_capacity(c):
    C = capacity_of(c)
    ref = dict(y=[], ids=[], gx=[], grouter=0, gw1=0, gw2=0, gb1=0, gb2=0)
    for rank in range(W):
        x = c["xs"][rank].clone().requires_grad_(True)
        router = c["router"].clone().requires_grad_(True)
        ws = {n: c[n].clone().requires_grad_(True) for n in ("w1", "w2", "b1", "b2")}
        r = mk.route(x @ router, c["k"], capacity=C)
        y = mk.moe_mlp(x, r, ws["w1"], ws["w2"], c["act"], ws["b1"], ws["b2"])
        (y * c["gy"][rank]).sum().backward()
        ref["y"].append(y.detach())
        ref["ids"].append(r.topk_ids)
        ref["gx"].append(x.grad)
        ref["grouter"] = ref["grouter"] + router.grad
        for n, p in ws.items():
            ref["g" + n] = ref["g" + n] + p.grad
    return ref


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_expert_parallel_matches_single_process(ep_results, case):
    c = make_case(case)
    ref = _reference_capacity(c) if c["mode"] == "capacity" else _reference_dropless(c)
    n = c["E"] // W
    for rank in range(W):
        got = ep_results[rank][case[0]]
        assert torch.equal(got["ids"], ref["ids"][rank]), f"rank {rank}: routing differs"
        assert got["y"].shape == (c["counts"][rank], D)
        torch.testing.assert_close(got["y"], ref["y"][rank], **TOL, msg=f"rank {rank} output")
        torch.testing.assert_close(got["gx"], ref["gx"][rank], **TOL, msg=f"rank {rank} input grad")
        sl = slice(rank * n, (rank + 1) * n)
        for name in ("gw1", "gw2", "gb1", "gb2"):
            if ref[name] is None:
                assert got[name] is None
                continue
            torch.testing.assert_close(got[name], ref[name][sl], **TOL, msg=f"rank {rank} {name}")
    grouter = sum(ep_results[r][case[0]]["grouter"] for r in range(W))
    torch.testing.assert_close(grouter, ref["grouter"], **TOL, msg="router grad summed over ranks")


@pytest.mark.distributed
def test_all_tokens_to_one_rank_leaves_the_other_idle(ep_results):
    """The skewed cases really send every assignment to one rank's experts: the idle rank's experts get
    exactly zero gradient (and the comparison above shows the busy rank's are right)."""
    for name, idle in (("dropless_all_to_rank0", 1), ("capacity_all_to_rank0", 1),
                       ("dropless_all_to_rank1_top1", 0)):
        case = next(c for c in CASES if c[0] == name)
        c = make_case(case)
        half = c["E"] // 2
        for rank in range(W):
            ids = ep_results[rank][name]["ids"]
            assert bool(((ids < half) if idle == 1 else (ids >= half)).all()), name
        g = ep_results[idle][name]
        assert all(float(g[n].abs().max()) == 0.0 for n in ("gw1", "gw2", "gb1", "gb2")), name


@pytest.mark.distributed
def test_expert_parallel_module(ep_results):
    """ExpertParallelMoE with a capacity factor on ranks holding 24 and 8 tokens: the group agrees on
    the larger capacity; output equals a one-process moe_mlp with that capacity; aux loss is local."""
    c = make_case(CASES[0])
    C = capacity_of(c)
    assert C == resolve_capacity(24, 2, 4, None, CF, 0) > resolve_capacity(8, 2, 4, None, CF, 0)
    for rank in range(W):
        got = ep_results[rank]["module"]
        assert got["capacity"] == C
        assert got["local"] == list(range(rank * 2, rank * 2 + 2))
        assert got["marked"] == [False, True, True, True, True]  # router, then w1 w2 b1 b2
        x = c["xs"][rank]
        logits = x @ c["router"]
        r = mk.route(logits, 2, capacity=C)
        y = mk.moe_mlp(x, r, c["w1"], c["w2"], "gelu", c["b1"], c["b2"])
        torch.testing.assert_close(got["y"], y, **TOL)
        aux = 0.1 * mk.load_balancing_loss(logits, r) + 0.01 * mk.z_loss(logits)
        torch.testing.assert_close(got["aux"], aux, **TOL)
        assert torch.equal(got["gathered_w1"], c["w1"])


@pytest.mark.distributed
def test_expert_parallel_module_with_task_routers(ep_results):
    c = make_case(CASES[0])
    for rank in range(W):
        x = c["xs"][rank]
        r = mk.task_route(x, task_routers(), torch.arange(x.shape[0]) % 2, c["k"])
        y = mk.moe_mlp(x, r, c["w1"], c["w2"], "gelu", c["b1"], c["b2"])
        torch.testing.assert_close(ep_results[rank]["tasks"], y, **TOL)


@pytest.mark.distributed
def test_child_failure_is_reported_with_its_traceback():
    with pytest.raises(ChildProcessFailed, match="ValueError: boom from rank 1"):
        run_processes(_fail_on_rank1, W, timeout=60)


def _fail_on_rank1(rank, world):
    if rank == 1:
        raise ValueError("boom from rank 1")
    import torch.distributed as dist
    dist.barrier()  # rank 0 waits for a peer that is gone: the parent must not hang


def test_validation_errors_name_the_argument():
    import moe_kernels.distributed as mkd
    x = torch.randn(4, D)
    r = mk.route(torch.randn(4, 4), 2)
    with pytest.raises(mk.MoEKernelsError, match="argument 'routing'"):
        mkd.run_experts(x, "not a routing", lambda a, b: a)
    with pytest.raises(mk.MoEKernelsError, match="argument 'x' has 3 rows"):
        mkd.run_experts(x[:3], r, lambda a, b: a)
    with pytest.raises(mk.MoEKernelsError, match="argument 'w1' holds 2 experts"):
        mkd.expert_parallel_mlp(x, r, torch.randn(2, D, H), torch.randn(2, H, D))
    with pytest.raises(mk.MoEKernelsError, match="argument 'input_splits'"):
        mkd.all_to_all(x, [4], [4, 0])
    with pytest.raises(mk.MoEKernelsError, match="argument 'routing' must come from a capacity"):
        mkd.fixed_capacity_routing(r)
    with pytest.raises(mk.MoEKernelsError, match="argument 'k'"):
        mkd.ExpertParallelMoE(D, H, 4, 5)


def test_fixed_capacity_routing_layout():
    """Single process: the fixed layout gives the same moe_mlp result and E*C rows."""
    import moe_kernels.distributed as mkd
    g = torch.Generator().manual_seed(0)
    x = torch.randn(13, D, generator=g)
    r = mk.route(torch.randn(13, 4, generator=g), 2, capacity=3)
    fr = mkd.fixed_capacity_routing(r)
    assert fr.num_rows == 12 and fr.offsets.tolist() == [0, 3, 6, 9, 12]
    assert torch.equal(fr.counts, r.counts)
    w1, w2 = torch.randn(4, D, H, generator=g), torch.randn(4, H, D, generator=g)
    torch.testing.assert_close(mk.moe_mlp(x, fr, w1, w2), mk.moe_mlp(x, r, w1, w2), **TOL)
    xe = mk.dispatch(x, fr)
    for e in range(4):
        n = int(r.counts[e])
        assert torch.equal(xe[3 * e + n:3 * e + 3], torch.zeros(3 - n, D))
