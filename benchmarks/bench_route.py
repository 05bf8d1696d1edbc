"""mk.route (scores + top-k + renormalise + dispatch plan in one op) vs the same in eager torch.

    pytest benchmarks/bench_route.py --benchmark-only [--quick] [--backend auto|reference|cpu|...]

Candidates:
  moe_kernels   mk.route(logits, k) on the chosen backend (dropless).
  torch_eager   softmax (fp32) -> torch.topk -> divide by the sum -> plan: bincount, cumsum, a
                stable argsort of the expert ids (token order inside each expert), its inverse.
Backward: the gradient of the gate weights back to the logits (the plan has none).
Logits come from harness.distinct_logits (no ties), so both must pick the same experts exactly.
Shapes: configs A, B, C of benchmarks/shapes.json.
"""

from __future__ import annotations

import torch

import harness
import moe_kernels as mk

CANDIDATES = ("moe_kernels", "torch_eager")
SCRIPT = "bench_route"


def make_cases(quick):
    return harness.cases(quick)


def eager_route(logits: torch.Tensor, k: int):
    """Top-k routing and its dispatch plan, written plainly in torch."""
    T, E = logits.shape
    scores = torch.softmax(logits.float(), dim=-1)
    top, ids = torch.topk(scores, k, dim=-1)
    weights = top / top.sum(dim=-1, keepdim=True)
    flat = ids.reshape(-1)                                  # assignment a = t*k + j
    counts = torch.bincount(flat, minlength=E)
    offsets = torch.zeros(E + 1, dtype=torch.int64, device=logits.device)
    offsets[1:] = torch.cumsum(counts, 0)
    order = torch.argsort(flat, stable=True)                # buffer row -> assignment
    sources = order // k                                    # buffer row -> token
    slots = torch.empty_like(order)
    slots[order] = torch.arange(order.numel(), device=logits.device)  # assignment -> buffer row
    return ids, weights, counts, offsets, slots.view(T, k), sources


def _inputs(case, ctx):
    c = case.cfg
    logits = harness.distinct_logits(c.T, c.E, case.dtype, ctx.device, seed=1).requires_grad_(True)
    grad_w = harness.randn(c.T, c.k, device=ctx.device, seed=2)
    return logits, grad_w


def check(case, ctx):
    c = case.cfg
    logits, grad_w = _inputs(case, ctx)
    r = mk.route(logits, c.k, backend=ctx.backend)
    ids, w, counts, offsets, slots, sources = eager_route(logits, c.k)
    assert torch.equal(r.topk_ids.long(), ids), "route: expert ids differ from torch.topk"
    harness.check_close(r.topk_weights, w, "route: topk_weights", dtype=torch.float32)
    assert torch.equal(r.counts.long(), counts), "route: counts differ"
    assert torch.equal(r.offsets.long(), offsets), "route: offsets differ"
    assert torch.equal(r.slots.long(), slots), "route: slots differ"
    assert torch.equal(r.sources.long(), sources), "route: sources differ"
    g_mk, = torch.autograd.grad(r.topk_weights, logits, grad_w)
    g_ref, = torch.autograd.grad(w, logits, grad_w)
    harness.check_close(g_mk, g_ref, "route: d logits", dtype=case.dtype)
    return True


def build(case, ctx) -> dict:
    ctx.cached((SCRIPT, case.id), lambda: check(case, ctx))
    c = case.cfg
    logits, grad_w = _inputs(case, ctx)
    reset = harness.drop_grads(logits)
    bwd = harness.autograd_backward(grad_w)
    backend = ctx.backend_of("route")
    return {
        "moe_kernels": harness.Candidate(
            "moe_kernels", lambda: mk.route(logits, c.k, backend=ctx.backend).topk_weights, bwd, reset,
            {"backend": backend}),
        "torch_eager": harness.Candidate(
            "torch_eager", lambda: eager_route(logits, c.k)[1], bwd, reset, {"backend": "torch"}),
    }


def test_route(benchmark, bctx, case, candidate_name, mode):
    bctx.pytest_benchmark(benchmark, build(case, bctx)[candidate_name], mode)


def test_route_compare(benchmark, bctx, case):
    bctx.compare(benchmark, SCRIPT, case.id, build(case, bctx), baselines={"route": "torch_eager"},
                 op_of=lambda name: "route")
