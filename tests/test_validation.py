"""Bad input: one clear error naming the argument, and nothing changed."""

import re

import pytest
import torch

import moe_kernels as mk
from moe_kernels import MoEKernelsError

L = torch.randn(6, 4)
X = torch.randn(6, 8)


def _r(**kw):
    return mk.route(L, 2, **kw)


def _raises(arg, fn, *a, **kw):
    with pytest.raises(MoEKernelsError, match=re.escape(f"argument '{arg}'")) as info:
        fn(*a, **kw)
    return str(info.value)


ROUTE_CASES = [
    ("logits", lambda b: mk.route(torch.randn(6), 1, backend=b)),  # 1-D
    ("logits", lambda b: mk.route(torch.randint(0, 3, (6, 4)), 1, backend=b)),  # integer dtype
    ("logits", lambda b: mk.route(torch.randn(4, 6).t(), 1, backend=b)),  # non-contiguous
    ("logits", lambda b: mk.route(torch.zeros(6, 0), 1, backend=b)),  # no experts
    ("logits", lambda b: mk.route(torch.tensor([[0.0, float("nan")]]), 1, backend=b)),
    ("logits", lambda b: mk.route(torch.tensor([[0.0, float("inf")]]), 1, backend=b)),
    ("k", lambda b: mk.route(L, 0, backend=b)),
    ("k", lambda b: mk.route(L, 5, backend=b)),  # k > E
    ("k", lambda b: mk.route(L, 2.0, backend=b)),
    ("score", lambda b: mk.route(L, 1, score="relu", backend=b)),
    ("drop_policy", lambda b: mk.route(L, 1, capacity=2, drop_policy="random", backend=b)),
    ("pad_to", lambda b: mk.route(L, 1, pad_to=0, backend=b)),
    ("capacity", lambda b: mk.route(L, 1, capacity=0, backend=b)),
    ("capacity", lambda b: mk.route(L, 1, capacity=2, capacity_factor=1.0, backend=b)),
    ("capacity_factor", lambda b: mk.route(L, 1, capacity_factor=0.0, backend=b)),
    ("capacity_factor", lambda b: mk.route(L, 1, capacity_factor=float("nan"), backend=b)),
    ("min_capacity", lambda b: mk.route(L, 1, capacity_factor=1.0, min_capacity=-1, backend=b)),
    ("renormalize", lambda b: mk.route(L, 1, renormalize="yes", backend=b)),
]


@pytest.mark.parametrize("arg,fn", ROUTE_CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(ROUTE_CASES)])
def test_route_errors(arg, fn, backend):
    msg = _raises(arg, fn, backend)
    assert msg.startswith("moe_kernels.route")


def test_nan_message_says_where():
    msg = _raises("logits", mk.route, torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), 1)
    assert "NaN" in msg and "(1, 0)" in msg


TASK_W = torch.randn(3, 8, 4)
TASK_CASES = [
    ("router_weight", lambda b: mk.task_route(X, torch.randn(3, 7, 4), 0, 1, backend=b)),
    ("router_weight", lambda b: mk.task_route(X, TASK_W.double(), 0, 1, backend=b)),
    ("router_weight", lambda b: mk.task_route(X, torch.randn(8, 4), 0, 1, backend=b)),
    ("task_ids", lambda b: mk.task_route(X, TASK_W, 3, 1, backend=b)),
    ("task_ids", lambda b: mk.task_route(X, TASK_W, -1, 1, backend=b)),
    ("task_ids", lambda b: mk.task_route(X, TASK_W, torch.tensor([0, 1, 2, 3, 0, 0]), 1, backend=b)),  # id 3 >= M
    ("task_ids", lambda b: mk.task_route(X, TASK_W, torch.tensor([0, 1]), 1, backend=b)),  # wrong length
    ("task_ids", lambda b: mk.task_route(X, TASK_W, torch.zeros(6), 1, backend=b)),  # float ids
    ("router_weight", lambda b: mk.task_route(X, torch.randn(3, 8, 4, device="meta"), 0, 1, backend=b)),  # device
    ("x", lambda b: mk.task_route(torch.full((6, 8), float("nan")), TASK_W, 0, 1, backend=b)),
]


@pytest.mark.parametrize("arg,fn", TASK_CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(TASK_CASES)])
def test_task_route_errors(arg, fn, backend):
    _raises(arg, fn, backend)


R = mk.route(L, 2)
PERMUTE_CASES = [
    ("x", lambda b: mk.dispatch(torch.randn(5, 8), R, backend=b)),  # T mismatch
    ("x", lambda b: mk.dispatch(torch.randn(8, 6).t(), R, backend=b)),
    ("x", lambda b: mk.dispatch(torch.randn(6, 8, 1), R, backend=b)),
    ("routing", lambda b: mk.dispatch(X, "plan", backend=b)),
    ("y", lambda b: mk.combine(torch.randn(R.num_rows + 1, 8), R, backend=b)),
    ("weights", lambda b: mk.combine(torch.randn(R.num_rows, 8), R, weights=torch.ones(6, 3), backend=b)),
    ("routing.slots", lambda b: mk.dispatch(torch.randn(6, 8, device="meta"), R, backend=b)),
    ("routing.sources", lambda b: mk.dispatch(X, R._replace(sources=R.sources + 7), backend=b)),
    ("routing.slots", lambda b: mk.combine(torch.randn(R.num_rows, 8), R._replace(slots=R.slots + 100), backend=b)),
]


@pytest.mark.parametrize("arg,fn", PERMUTE_CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(PERMUTE_CASES)])
def test_permute_errors(arg, fn, backend):
    _raises(arg, fn, backend)


OFF = torch.tensor([0, 2, 5, 6], dtype=torch.int32)
W = torch.randn(3, 8, 4)
GROUPED_CASES = [
    ("offsets", lambda b: mk.grouped_gemm(X, OFF.long(), W, backend=b)),
    ("offsets", lambda b: mk.grouped_gemm(X, OFF[:3], W, backend=b)),  # E+1 mismatch
    ("offsets", lambda b: mk.grouped_gemm(X, torch.tensor([1, 2, 5, 6], dtype=torch.int32), W, backend=b)),
    ("offsets", lambda b: mk.grouped_gemm(X, torch.tensor([0, 4, 2, 6], dtype=torch.int32), W, backend=b)),
    ("offsets", lambda b: mk.grouped_gemm(X, torch.tensor([0, 2, 5, 9], dtype=torch.int32), W, backend=b)),
    ("w", lambda b: mk.grouped_gemm(X, OFF, torch.randn(3, 7, 4), backend=b)),
    ("w", lambda b: mk.grouped_gemm(X, OFF, W.double(), backend=b)),
    ("w", lambda b: mk.grouped_gemm(X, OFF, torch.randn(3, 8, 4, device="meta"), backend=b)),
    ("w1", lambda b: mk.grouped_mlp(X, OFF, torch.randn(3, 8, 5), torch.randn(3, 4, 8), backend=b)),
    ("w1", lambda b: mk.grouped_mlp(X, OFF, torch.randn(3, 8, 4), torch.randn(3, 4, 8), "swiglu", backend=b)),
    ("w2", lambda b: mk.grouped_mlp(X, OFF, torch.randn(3, 8, 4), torch.randn(2, 4, 8), backend=b)),
    ("b1", lambda b: mk.grouped_mlp(X, OFF, torch.randn(3, 8, 4), torch.randn(3, 4, 8), b1=torch.randn(3, 5), backend=b)),
    ("activation", lambda b: mk.grouped_mlp(X, OFF, torch.randn(3, 8, 4), torch.randn(3, 4, 8), "tanh", backend=b)),
    ("w1", lambda b: mk.moe_mlp(X, R, torch.randn(3, 8, 4), torch.randn(3, 4, 8), backend=b)),  # 3 experts vs 4
    ("routing.topk_weights", lambda b: mk.moe_mlp(X, R._replace(topk_weights=R.topk_weights[:, :1].contiguous()),
                                                torch.randn(4, 8, 4), torch.randn(4, 4, 8), backend=b)),
    ("x", lambda b: mk.moe_mlp(X[:-1], R, torch.randn(4, 8, 4), torch.randn(4, 4, 8), backend=b)),  # T mismatch
    ("routing", lambda b: mk.moe_mlp(X, "not a routing", torch.randn(4, 8, 4), torch.randn(4, 4, 8), backend=b)),
]


@pytest.mark.parametrize("arg,fn", GROUPED_CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(GROUPED_CASES)])
def test_grouped_errors(arg, fn, backend):
    _raises(arg, fn, backend)


M = torch.randn(5, 3)
RECONCILE_CASES = [
    ("weights", lambda b: mk.reconcile(M, [torch.randn(5, 2)], [], backend=b)),
    ("weights[0]", lambda b: mk.reconcile(M, [torch.randn(5, 2)], [torch.randn(3, 3)], backend=b)),
    ("aux[0]", lambda b: mk.reconcile(M, [torch.randn(4, 2)], [torch.randn(2, 3)], backend=b)),
    ("aux[0]", lambda b: mk.reconcile(M, [torch.randn(5, 2).double()], [torch.randn(2, 3)], backend=b)),
    ("bias[0]", lambda b: mk.reconcile(M, [torch.randn(5, 2)], [torch.randn(2, 3)], [torch.randn(4)], backend=b)),
    ("bias", lambda b: mk.reconcile(M, [torch.randn(5, 2)], [torch.randn(2, 3)], [], backend=b)),
    ("activation", lambda b: mk.reconcile(M, [torch.randn(5, 2)], [torch.randn(2, 3)], activation="tanh", backend=b)),
    ("main", lambda b: mk.reconcile(torch.randn(3), [], [], backend=b)),
]


@pytest.mark.parametrize("arg,fn", RECONCILE_CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(RECONCILE_CASES)])
def test_reconcile_errors(arg, fn, backend):
    _raises(arg, fn, backend)


def test_loss_and_module_errors(backend):
    _raises("routing", mk.load_balancing_loss, torch.randn(6, 5), R)
    _raises("task_ids", mk.mutual_information_loss, torch.rand(6, 4), torch.tensor([0, 1, 2, 0, 1, 9]), 3)
    _raises("num_tasks", mk.mutual_information_loss, torch.rand(6, 4), 0, 0)
    _raises("buffer", mk.mutual_information_loss_ema, torch.rand(6, 4), 0, torch.rand(2, 4), 3)
    _raises("probs", mk.mutual_information_loss, torch.tensor([[float("nan"), 1.0]]), 0, 1)
    _raises("k", mk.nn.MoE, 8, 8, 4, 5)
    _raises("capacity", mk.nn.MoE, 8, 8, 4, 2, capacity=0)
    layer = mk.nn.MoE(8, 8, 4, 2, num_tasks=2, backend=backend)
    _raises("task_ids", layer, X)
    _raises("task_ids", layer, X, torch.zeros(5, dtype=torch.long))
    _raises("x", layer, torch.randn(6, 7))
    _raises("task_ids", mk.nn.MoE(8, 8, 4, 2, backend=backend), X, 1)


def test_bad_input_changes_nothing(backend):
    mi = mk.nn.MutualInformationLoss(3, 4)
    before = mi.joint.clone()
    _raises("task_ids", mi, torch.rand(6, 4), torch.tensor([0, 1, 2, 0, 1, 5]))
    _raises("probs", mi, torch.tensor([[float("nan"), 1.0, 0.0, 0.0]]), 0)
    assert torch.equal(mi.joint, before), "the EMA buffer must be untouched by a rejected call"
    layer = mk.nn.MoE(8, 8, 4, 2, num_tasks=3, backend=backend)
    params = [p.clone() for p in layer.parameters()]
    buf = layer.mutual_information.joint.clone()
    _raises("task_ids", layer, X, torch.tensor([0, 1, 2, 3, 0, 0]))
    assert all(torch.equal(a, b) for a, b in zip(params, layer.parameters()))
    assert torch.equal(layer.mutual_information.joint, buf)
