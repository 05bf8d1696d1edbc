"""Differential property test: every fast backend against the reference over random problems.

Random T (0 and 1 included), E, k, dtype, capacity and drop policy, pad_to, score, task ids and
activations; plans and data movement must match bit for bit, floating results within the dtype
tolerance. Hypothesis runs a fixed budget of examples from a fixed seed (``derandomize``), so CI
sees the same examples every time; failures shrink to a minimal case.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moe_kernels as mk

from .helpers import TOL, assert_exact

PLAN = ("topk_ids", "counts", "offsets", "slots", "sources", "num_dropped")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def problems(draw):
    E = draw(st.integers(1, 9))
    k = draw(st.integers(1, E))
    T = draw(st.sampled_from([0, 1, 2, 3, 7, 16, 31, 64]))
    cap = draw(st.sampled_from(["dropless", "capacity", "factor"]))
    route = dict(drop_policy=draw(st.sampled_from(["position", "score"])),
                 pad_to=draw(st.sampled_from([1, 2, 4])),
                 score=draw(st.sampled_from(["softmax", "sigmoid"])),
                 renormalize=draw(st.booleans()))
    if cap == "capacity":
        route["capacity"] = draw(st.integers(1, 6))
    elif cap == "factor":
        route["capacity_factor"] = draw(st.sampled_from([0.5, 1.0, 1.25, 2.0]))
        route["min_capacity"] = draw(st.integers(0, 2))
    return dict(T=T, E=E, k=k, route=route, dtype=draw(st.sampled_from(sorted(DTYPES))),
                tasks=draw(st.sampled_from(["none", "batch", "tokens"])),
                act=draw(st.sampled_from(["gelu", "relu", "silu", "swiglu"])), bias=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


def _routing(p, backend, x, router):
    if p["tasks"] == "none":
        return mk.route((x @ router[0]).contiguous(), p["k"], backend=backend, **p["route"])
    tasks = 1 if p["tasks"] == "batch" else torch.arange(p["T"]) % router.shape[0]
    return mk.task_route(x, router, tasks, p["k"], backend=backend, **p["route"])


@settings(max_examples=60, **SETTINGS)
@given(p=problems())
def test_plans_and_data_movement_match_bit_for_bit(fast_backend, p):
    g = torch.Generator().manual_seed(p["seed"])
    dt = DTYPES[p["dtype"]]
    T, E, d = p["T"], p["E"], 5
    x = torch.randn(T, d, generator=g).to(dt)
    router = torch.randn(3, d, E, generator=g).to(dt)
    ref, got = _routing(p, "reference", x, router), _routing(p, fast_backend, x, router)
    for name in PLAN:
        assert_exact(getattr(got, name), getattr(ref, name), name)
    rows = torch.randn(ref.num_rows, d, generator=g).to(dt)
    assert_exact(mk.dispatch(x, got, backend=fast_backend), mk.dispatch(x, ref, backend="reference"), "dispatch")
    assert_exact(mk.combine(rows, got, weights=ref.topk_weights, backend=fast_backend),
                 mk.combine(rows, ref, backend="reference"), "combine")


@settings(max_examples=30, **SETTINGS)
@given(p=problems())
def test_fused_layer_matches_reference(fast_backend, p):
    g = torch.Generator().manual_seed(p["seed"])
    dt = DTYPES[p["dtype"]]
    T, E, d, h = p["T"], p["E"], 6, 5
    h1 = 2 * h if p["act"] == "swiglu" else h
    x = torch.randn(T, d, generator=g).to(dt)
    router = torch.randn(3, d, E, generator=g).to(dt)
    params = [torch.randn(E, d, h1, generator=g) / d ** 0.5, torch.randn(E, h, d, generator=g) / h ** 0.5]
    params += [torch.randn(E, h1, generator=g), torch.randn(E, d, generator=g)] if p["bias"] else [None, None]
    gout = torch.randn(T, d, generator=g).to(dt)
    r = _routing(p, "reference", x, router)

    def run(backend):
        xx = x.clone().requires_grad_()
        w = r.topk_weights.detach().clone().requires_grad_()
        ps = [q.to(dt).clone().requires_grad_() if q is not None else None for q in params]
        out = mk.moe_mlp(xx, r._replace(topk_weights=w), ps[0], ps[1], p["act"], ps[2], ps[3], backend=backend)
        out.backward(gout)
        return [out, xx.grad, w.grad] + [q.grad for q in ps if q is not None]

    # tolerances: the dtype's (helpers.TOL); gradients sum over up to T*k rows in another order
    tol = TOL[dt]
    for i, (a, b) in enumerate(zip(run(fast_backend), run("reference"))):
        scale = max(float(b.detach().abs().max()) if b.numel() else 0.0, 1.0)
        torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=f"output {i}")


@pytest.mark.parametrize("T", [0, 1])
def test_tiny_batches_on_every_backend(T, backend):
    """T = 0 and T = 1 through the whole layer, forward and backward, on every backend."""
    torch.manual_seed(T)
    layer = mk.nn.MoE(8, 12, 5, 2, num_tasks=2, capacity_factor=1.0, backend=backend)
    x = torch.randn(T, 8, requires_grad=True)
    out = layer(x, torch.zeros(T, dtype=torch.long))
    (out.output.sum() + out.aux_loss).backward()
    assert out.output.shape == (T, 8) and x.grad.shape == (T, 8)
    assert int(out.routing.offsets[-1]) == (2 * T if T else 0) - int(out.routing.num_dropped)


@st.composite
def plan_problems(draw):
    E = draw(st.integers(1, 9))
    elsewhere = draw(st.integers(0, 3))  # experts on another rank (ids -1 or >= E)
    k = draw(st.integers(1, E + elsewhere))
    opts = dict(drop_policy=draw(st.sampled_from(["position", "score"])), pad_to=draw(st.sampled_from([1, 2, 4])))
    cap = draw(st.sampled_from(["dropless", "capacity", "factor"]))
    if cap == "capacity":
        opts["capacity"] = draw(st.integers(1, 6))
    elif cap == "factor":
        opts["capacity_factor"] = draw(st.sampled_from([0.5, 1.0, 1.25]))
    return dict(E=E, elsewhere=elsewhere, k=k, T=draw(st.sampled_from([0, 1, 3, 16, 31, 64])), opts=opts,
                ties=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=60, **SETTINGS)
@given(p=plan_problems())
def test_plan_of_given_ids_matches_bit_for_bit(fast_backend, p):
    g = torch.Generator().manual_seed(p["seed"])
    T, E, k = p["T"], p["E"], p["k"]
    ids = torch.stack([torch.randperm(E + p["elsewhere"], generator=g)[:k] for _ in range(T)]) if T else \
        torch.empty(0, k, dtype=torch.int64)
    ids = torch.where((ids >= E) & (ids % 2 == 1), -1, ids)
    w = torch.rand(T, k, generator=g)
    if p["ties"]:
        w = (w * 4).round() / 4
    ref = mk.plan(ids, w, E, backend="reference", **p["opts"])
    got = mk.plan(ids, w, E, backend=fast_backend, **p["opts"])
    for name in PLAN + ("num_nonlocal",):
        assert_exact(getattr(got, name), getattr(ref, name), name)
