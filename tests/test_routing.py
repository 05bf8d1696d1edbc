"""mk.route / mk.task_route: exact plans against an independent oracle, invariants, gradients."""

import math

import pytest
import torch

import moe_kernels as mk
from moe_kernels.reference.routing import plan_num_rows

from .helpers import ODD_SHAPES, TOL, assert_exact, brute_force_plan, check_plan_invariants

MODES = [
    dict(),  # dropless
    dict(capacity=2),
    dict(capacity=3, drop_policy="score"),
    dict(capacity_factor=1.0),
    dict(capacity_factor=0.5, min_capacity=1, drop_policy="score"),
    dict(pad_to=4),
    dict(capacity=2, pad_to=3),
]


def _mode_id(m):
    return ",".join(f"{k}={v}" for k, v in m.items()) or "dropless"


def _capacity(T, k, E, m):
    if "capacity" in m:
        return m["capacity"]
    if "capacity_factor" in m:
        return max(m.get("min_capacity", 0), math.ceil(m["capacity_factor"] * T * k / E))
    return -1


def _compare_with_oracle(logits, k, backend, **m):
    r = mk.route(logits, k, backend=backend, **m)
    T, E = logits.shape
    C = _capacity(T, k, E, m)
    pad_to = m.get("pad_to", 1)
    want = brute_force_plan(logits, k, score=m.get("score", "softmax"), capacity=C,
                            drop_policy=m.get("drop_policy", "position"), pad_to=pad_to,
                            num_rows=r.num_rows)
    for name in ("topk_ids", "counts", "offsets", "slots", "sources"):
        assert_exact(getattr(r, name), want[name], name)
    assert int(r.num_dropped) == want["num_dropped"]
    assert r.capacity == C
    assert r.num_rows == plan_num_rows(T, k, E, C, pad_to)
    check_plan_invariants(r, capacity=C, pad_to=pad_to)
    return r


@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
@pytest.mark.parametrize("shape", [s for s, _ in ODD_SHAPES], ids=[n for _, n in ODD_SHAPES])
def test_plan_matches_oracle(backend, mode, shape):
    T, E, k = shape
    torch.manual_seed(T * 100 + E * 10 + k)
    _compare_with_oracle(torch.randn(T, E), k, backend, **mode)


@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
def test_all_tokens_to_one_expert_and_empty_experts(mode, backend):
    T, E, k = 33, 6, 2
    logits = torch.randn(T, E) * 0.1
    logits[:, 3] += 20.0  # every token's first choice is expert 3
    logits[:, 5] -= 20.0  # never chosen: an empty expert
    r = _compare_with_oracle(logits, k, backend, **mode)
    assert (r.topk_ids[:, 0] == 3).all()
    assert int(r.counts[5]) == 0


def test_ties_go_to_lower_expert_id(backend):
    # all logits equal: every expert ties, so the k lowest ids win, in id order
    r = mk.route(torch.zeros(5, 6), 3, backend=backend)
    assert_exact(r.topk_ids, torch.tensor([[0, 1, 2]] * 5, dtype=torch.int32))
    # partial ties: expert 4 and 1 tie for the top score -> 1 first, then 4
    logits = torch.tensor([[0.0, 2.0, 0.5, 0.0, 2.0]])
    assert r.topk_ids.dtype == torch.int32
    assert mk.route(logits, 2, backend=backend).topk_ids.tolist() == [[1, 4]]


def test_position_drop_keeps_token_order_and_score_drop_keeps_best(backend):
    # 4 tokens all choose expert 0 first; capacity 2
    logits = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [4.0, 0.0]])
    pos = mk.route(logits, 1, capacity=2, backend=backend)
    assert pos.slots[:, 0].tolist() == [0, 1, -1, -1]
    assert pos.sources.tolist() == [0, 1, -1, -1]  # static bound E*C = 4 rows; the tail is padding
    sc = mk.route(logits, 1, capacity=2, drop_policy="score", backend=backend)
    # tokens 3 and 1 have the highest scores; rows are still in token order inside the expert
    assert sc.slots[:, 0].tolist() == [-1, 0, -1, 1]
    assert sc.sources.tolist() == [1, 3, -1, -1]
    assert int(pos.num_dropped) == int(sc.num_dropped) == 2


def test_score_drop_ties_by_token_order(backend):
    logits = torch.zeros(5, 2)
    logits[:, 0] = 1.0  # identical scores for expert 0
    r = mk.route(logits, 1, capacity=3, drop_policy="score", backend=backend)
    assert r.slots[:, 0].tolist() == [0, 1, 2, -1, -1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_weights_and_dtypes(dtype, score, renormalize, backend):
    torch.manual_seed(1)
    logits = torch.randn(37, 7).to(dtype)
    r = mk.route(logits, 3, score=score, renormalize=renormalize, backend=backend)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert r.topk_weights.dtype == acc
    s = logits.to(acc)
    s = torch.softmax(s, -1) if score == "softmax" else torch.sigmoid(s)
    want_ids = brute_force_plan(logits, 3, score=score)["topk_ids"]
    assert_exact(r.topk_ids, want_ids, "ids (scores are computed from the same upcast values)")
    w = s.gather(1, r.topk_ids.long())
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    # scores are computed in fp32 (fp64) whatever the logits dtype: fp32 rounding only
    torch.testing.assert_close(r.topk_weights, w, rtol=1e-6, atol=1e-7)
    # ids are by descending score
    assert (r.topk_weights[:, :-1] >= r.topk_weights[:, 1:]).all()


def test_empty_batch(backend):
    r = mk.route(torch.zeros(0, 5), 2, capacity_factor=1.0, backend=backend)
    assert r.topk_ids.shape == (0, 2) and r.topk_weights.shape == (0, 2)
    assert r.counts.tolist() == [0] * 5 and r.offsets.tolist() == [0] * 6
    assert r.num_rows == 0 and int(r.num_dropped) == 0


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("capacity", [None, 2])
def test_route_gradcheck(score, renormalize, capacity, backend):
    torch.manual_seed(2)
    logits = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    fn = lambda z: mk.route(z, 3, score=score, renormalize=renormalize, capacity=capacity, backend=backend).topk_weights
    assert torch.autograd.gradcheck(fn, (logits,))


def test_route_grad_matches_autograd_of_plain_torch(backend):
    torch.manual_seed(3)
    logits = torch.randn(40, 9, requires_grad=True)
    g = torch.randn(40, 3)
    r = mk.route(logits, 3, backend=backend)
    (gl,) = torch.autograd.grad(r.topk_weights, logits, g)
    l2 = logits.detach().clone().requires_grad_()
    w = torch.softmax(l2, -1).gather(1, r.topk_ids.long())
    w = w / w.sum(-1, keepdim=True)
    (gl2,) = torch.autograd.grad(w, l2, g)
    torch.testing.assert_close(gl, gl2, **TOL[torch.float32])


# ---------------------------------------------------------------- task_route

def _task_logits(x, W, tids):
    return torch.stack([x[t] @ W[int(tids[t])] for t in range(x.shape[0])])


@pytest.mark.parametrize("mode", [dict(), dict(capacity=3), dict(pad_to=4)], ids=_mode_id)
def test_task_route_equals_route_on_task_logits(mode, backend):
    torch.manual_seed(4)
    T, d, E, M, k = 29, 6, 7, 3, 2
    x, W = torch.randn(T, d), torch.randn(M, d, E)
    tids = torch.randint(0, M, (T,))
    r = mk.task_route(x, W, tids, k, **mode, backend=backend)
    logits = _task_logits(x, W, tids)
    torch.testing.assert_close(r.logits, logits, **TOL[torch.float32])
    ref = mk.route(r.logits, k, **mode, backend=backend)  # same logits -> identical plan
    for name in ("topk_ids", "counts", "offsets", "slots", "sources"):
        assert_exact(getattr(r, name), getattr(ref, name), name)
    torch.testing.assert_close(r.topk_weights, ref.topk_weights, rtol=0, atol=0)


def test_task_route_int_equals_full_tensor(backend):
    torch.manual_seed(5)
    x, W = torch.randn(17, 4), torch.randn(3, 4, 5)
    a = mk.task_route(x, W, 2, 2, backend=backend)
    b = mk.task_route(x, W, torch.full((17,), 2), 2, backend=backend)
    for name in ("topk_ids", "slots", "sources", "counts", "offsets"):
        assert_exact(getattr(a, name), getattr(b, name), name)
    torch.testing.assert_close(a.logits, x @ W[2], **TOL[torch.float32])


@pytest.mark.parametrize("per_token", [True, False])
def test_task_route_gradcheck(per_token, backend):
    torch.manual_seed(6)
    T, d, E, M = 8, 3, 5, 3
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    W = torch.randn(M, d, E, dtype=torch.float64, requires_grad=True)
    tids = torch.tensor([0, 2, 2, 1, 0, 2, 0, 0]) if per_token else 1

    def fn(x, W):
        r = mk.task_route(x, W, tids, 2, backend=backend)
        return r.topk_weights, r.logits  # both outputs carry gradient

    assert torch.autograd.gradcheck(fn, (x, W))


def test_task_route_unused_router_gets_zero_grad(backend):
    x = torch.randn(10, 4)
    W = torch.randn(3, 4, 5, requires_grad=True)
    r = mk.task_route(x, W, torch.tensor([0, 2] * 5), 2, backend=backend)
    r.topk_weights.sum().backward()
    assert W.grad is not None and float(W.grad[1].abs().sum()) == 0.0


def test_capacity_factor_is_exact_in_decimal(backend):
    # 1.1 * 25 * 2 / 5 = 11 exactly; binary floating point gives 11.000000000000002
    assert mk.route(torch.zeros(25, 5), 2, capacity_factor=1.1, backend=backend).capacity == 11
    assert mk.route(torch.zeros(25, 5), 2, capacity_factor=1.11, backend=backend).capacity == 12
    assert mk.route(torch.zeros(10, 4), 1, capacity_factor=0.1, min_capacity=2, backend=backend).capacity == 2
