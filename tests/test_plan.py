"""mk.plan: the dispatch plan of ids and weights a router outside the library computed.

Plans compare bit for bit with the reference on every backend; the semantics are route's (checked
by rebuilding route's plan from its own ids), with ids of -1 or >= num_experts left out as not
local (expert parallelism); gradients reach the given weights; bad input gets one clear error.
"""

import pytest
import torch

import moe_kernels as mk

from .helpers import assert_exact

PLAN = ("topk_ids", "counts", "offsets", "slots", "sources", "num_dropped", "num_nonlocal")


def _ids(T, E, k, *, nonlocal_=0, seed=0):
    """[T, k] int64 ids, distinct per token; with nonlocal_, that many of E + nonlocal_ experts are
    on another rank (shown as -1 or as their global id >= E)."""
    g = torch.Generator().manual_seed(seed)
    if T == 0:
        return torch.empty(0, k, dtype=torch.int64)
    ids = torch.stack([torch.randperm(E + nonlocal_, generator=g)[:k] for _ in range(T)])
    return torch.where((ids >= E) & (ids % 2 == 0), -1, ids)


CASES = [  # T, E, k, nonlocal, options
    (0, 3, 2, 0, {}),
    (1, 1, 1, 0, {}),
    (1, 5, 5, 0, dict(capacity=1)),              # k = E
    (7, 13, 1, 0, dict(pad_to=4)),               # prime E, k = 1, empty experts
    (70, 5, 2, 0, dict(capacity=9, drop_policy="position")),
    (70, 5, 2, 0, dict(capacity=9, drop_policy="score", pad_to=3)),
    (70, 4, 3, 3, {}),                           # expert parallelism: 3 experts elsewhere
    (70, 4, 3, 3, dict(capacity_factor=1.25, drop_policy="score")),
    (33, 3, 5, 4, dict(capacity=6, pad_to=2)),   # k > E under expert parallelism
]


@pytest.mark.parametrize("T,E,k,nl,opts", CASES)
def test_matches_reference_bit_for_bit(T, E, k, nl, opts, backend):
    ids = _ids(T, E, k, nonlocal_=nl)
    g = torch.Generator().manual_seed(1)
    w = torch.rand(T, k, generator=g)
    w[::3, 0] = 0.25  # ties under the score policy
    ref = mk.plan(ids, w, E, backend="reference", **opts)
    got = mk.plan(ids, w, E, backend=backend, **opts)
    for name in PLAN:
        assert_exact(getattr(got, name), getattr(ref, name), name)
    assert torch.equal(got.topk_weights, w)


@pytest.mark.parametrize("opts", [{}, dict(capacity=4), dict(capacity=4, drop_policy="score", pad_to=4),
                                  dict(capacity_factor=0.5, min_capacity=2)])
def test_reproduces_routes_plan(opts, backend):
    """route = scores + top-k + plan: the plan of route's ids (score priority: the scores before
    renormalisation) is route's plan."""
    logits = torch.randn(45, 6, generator=torch.Generator().manual_seed(2))
    r = mk.route(logits, 3, backend="reference", **opts)
    scores = torch.softmax(logits, -1).gather(1, r.topk_ids.long())
    p = mk.plan(r.topk_ids, scores, 6, backend=backend, **opts)
    for name in PLAN[:-1]:
        assert_exact(getattr(p, name), getattr(r, name), name)
    assert int(p.num_nonlocal) == 0 and r.num_nonlocal is None


def test_semantics_by_hand():
    ids = torch.tensor([[0, 2], [2, 1], [5, 0], [-1, 2]])
    r = mk.plan(ids, torch.full((4, 2), 0.5), 3, capacity=2)
    assert r.counts.tolist() == [2, 1, 2]            # expert 2: tokens 0 and 1 kept, token 3 dropped
    assert r.slots.tolist() == [[0, 3], [4, 2], [-1, 1], [-1, -1]]
    assert r.sources.tolist()[:5] == [0, 2, 1, 0, 1]
    assert int(r.num_dropped) == 1 and int(r.num_nonlocal) == 2
    assert r.topk_ids.dtype == torch.int32 and r.logits is None and r.capacity == 2


def test_all_tokens_to_one_expert_and_empty_experts(backend):
    ids = torch.zeros(20, 1, dtype=torch.int64) + 3
    r = mk.plan(ids, torch.ones(20, 1), 7, pad_to=8, backend=backend)
    assert r.counts.tolist() == [0, 0, 0, 20, 0, 0, 0]
    assert r.offsets.tolist() == [0, 0, 0, 0, 24, 24, 24, 24]
    assert r.slots.view(-1).tolist() == list(range(20))


def test_ids_beyond_int32_are_not_local():
    ids = torch.tensor([[0, 2 ** 40], [1, 2]])
    r = mk.plan(ids, torch.ones(2, 2), 3)
    assert r.slots[0, 1] == -1 and int(r.num_nonlocal) == 1 and int(r.num_dropped) == 0


def test_expert_parallel_halves_sum_to_the_whole(fast_backend):
    """Two ranks holding 3 experts each, their local ids and the others' as sentinels: the sum of
    their moe_mlp outputs is the one-rank output, and so are the weights' gradients."""
    T, E, k, d, h = 23, 6, 2, 5, 4
    g = torch.Generator().manual_seed(3)
    ids = _ids(T, E, k, seed=4)
    w = torch.rand(T, k, generator=g, requires_grad=True)
    x = torch.randn(T, d, generator=g)
    w1, w2 = torch.randn(E, d, h, generator=g), torch.randn(E, h, d, generator=g)
    whole = mk.moe_mlp(x, mk.plan(ids, w, E, backend=fast_backend), w1, w2, "gelu", backend=fast_backend)
    (gw_whole,) = torch.autograd.grad(whole.sum(), w)
    parts = []
    for rank in range(2):
        local = ids - 3 * rank
        local = torch.where((local >= 0) & (local < 3), local, E)  # transformers' sentinel: num_experts
        r = mk.plan(local, w, 3, backend=fast_backend)
        assert int(r.num_nonlocal) == int(((ids // 3) != rank).sum())
        parts.append(mk.moe_mlp(x, r, w1[3 * rank:3 * rank + 3], w2[3 * rank:3 * rank + 3], "gelu",
                                backend=fast_backend))
    total = parts[0] + parts[1]
    (gw_parts,) = torch.autograd.grad(total.sum(), w)
    torch.testing.assert_close(total, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw_parts, gw_whole, rtol=1e-5, atol=1e-5)


def test_gradient_reaches_the_given_weights():
    """fp64 gradcheck through plan -> combine: d out / d topk_weights."""
    ids = _ids(9, 4, 2, nonlocal_=2)
    w = torch.rand(9, 2, dtype=torch.float64, requires_grad=True)
    y = torch.randn(30, 3, dtype=torch.float64)

    def f(w):
        r = mk.plan(ids, w, 4, capacity=3)
        return mk.combine(y[:r.num_rows], r)

    assert torch.autograd.gradcheck(f, (w,))


def test_bf16_weights_are_upcast_and_differentiable():
    w = torch.rand(5, 2).to(torch.bfloat16).requires_grad_()
    r = mk.plan(_ids(5, 3, 2), w, 3)
    assert r.topk_weights.dtype == torch.float32
    r.topk_weights.sum().backward()
    assert w.grad is not None and torch.equal(w.grad, torch.ones_like(w))


def test_compiles_fullgraph():
    ids, w = _ids(16, 4, 2), torch.rand(16, 2)
    x, w1, w2 = torch.randn(16, 6), torch.randn(4, 6, 8), torch.randn(4, 8, 6)

    def layer(x, ids, w):
        return mk.moe_mlp(x, mk.plan(ids, w, 4, capacity=5), w1, w2, "silu")

    eager = layer(x, ids, w)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, ids, w)
    torch.testing.assert_close(compiled, eager)


# ---------------------------------------------------------------- bad input: one clear error

def _err(match, *args, **kw):
    with pytest.raises(mk.MoEKernelsError, match=match):
        mk.plan(*args, **kw)


def test_bad_input_names_the_argument():
    ids, w = _ids(6, 4, 2), torch.rand(6, 2)
    _err("argument 'topk_ids'.*twice in token 1", torch.tensor([[0, 1], [2, 2]]), torch.rand(2, 2), 4)
    _err("argument 'topk_ids' has value -3", torch.tensor([[0, -3]]), torch.rand(1, 2), 4)
    _err("argument 'topk_ids'", ids.float(), w, 4)
    _err("argument 'topk_ids'", ids[:, :1].expand(6, 2), w, 4)   # not contiguous
    _err("argument 'topk_weights'.*shape", ids, w[:, :1].contiguous(), 4)
    _err("argument 'topk_weights'", ids, w.to(torch.int32), 4)
    _err("argument 'topk_weights' contains NaN", ids, torch.full((6, 2), float("nan")), 4)
    _err("argument 'topk_weights' has a negative", ids, w - 1, 4, capacity=2, drop_policy="score")
    _err("argument 'num_experts'", ids, w, 0)
    _err("argument 'drop_policy'", ids, w, 4, capacity=2, drop_policy="random")
    _err("argument 'capacity'", ids, w, 4, capacity=0)
    _err("argument 'topk_ids'", torch.empty(3, 0, dtype=torch.int64), torch.empty(3, 0), 4)
    mk.plan(ids, w - 1, 4)  # negative weights are fine where they rank nothing


def test_not_local_sentinels_may_repeat():
    r = mk.plan(torch.tensor([[4, 4, 0], [-1, -1, 1]]), torch.rand(2, 3), 4)
    assert int(r.num_nonlocal) == 4


def test_sync_free_policy():
    """Sync-free: an id below -1 or a repeated expert still stops the call (a device-side assertion;
    an exception on the CPU); a NaN weight is no error and reaches the layer's output."""
    with mk.value_checks(False):
        for bad in (torch.tensor([[0, -2]]), torch.tensor([[1, 1]])):
            with pytest.raises(RuntimeError):
                mk.plan(bad, torch.rand(1, 2), 4)
        w = torch.rand(3, 2)
        w[1, 0] = float("nan")
        r = mk.plan(_ids(3, 4, 2), w, 4, capacity=2, drop_policy="score")
        out = mk.combine(torch.randn(r.num_rows, 3), r)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
