"""mk.task_route (per-task router product + scores + top-k + plan in one op) vs a Python loop over
the tasks.

    pytest benchmarks/bench_task_route.py --benchmark-only [--quick] [--backend auto|reference|cpu]

Cases: the project's shapes A, B, C (T tokens of width d, E experts, top-k) with M routers
([M, d, E]; both from benchmarks/shapes.json, sections ``configs`` and ``task_route``), in two
variants: ``batch`` (one task for the whole batch, as on a SIMT rank) and ``mixed`` (a task id per
token, drawn uniformly).

Candidates:
  moe_kernels    mk.task_route(x, router_weight, task_ids, k) on the chosen backend (dropless).
  loop_mk_route  for each task: logits[rows] = x[rows] @ W[m] (index_put), then mk.route(logits, k).
  loop_eager     the same loop, then bench_route's eager routing (softmax, torch.topk, renormalise,
                 bincount / cumsum / stable argsort plan).
Backward: the gradient of the gate weights back to x and the router weights.
"""

from __future__ import annotations

import torch

import harness
import moe_kernels as mk
from bench_route import eager_route

CANDIDATES = ("moe_kernels", "loop_mk_route", "loop_eager")
SCRIPT = "bench_task_route"

def make_cases(quick):
    return harness.cases(quick, variants=("batch", "mixed"))


def _inputs(case, ctx):
    c = case.cfg
    M = harness.shapes("task_route", ctx.quick)["routers"]
    x = harness.randn(c.T, c.d, dtype=case.dtype, device=ctx.device, seed=1, requires_grad=True)
    w = harness.randn(M, c.d, c.E, dtype=case.dtype, device=ctx.device, seed=2, scale=c.d ** -0.5,
                      requires_grad=True)
    if case.variant == "batch":
        tids = 1
    else:
        g = torch.Generator().manual_seed(3)
        tids = torch.randint(0, M, (c.T,), generator=g).to(ctx.device)
    grad_w = harness.randn(c.T, c.k, device=ctx.device, seed=4)
    return x, w, tids, grad_w


def loop_logits(x, w, tids):
    """The router product written as a loop over the tasks present in the batch."""
    if isinstance(tids, int):
        return x @ w[tids]
    logits = x.new_empty(x.shape[0], w.shape[2])
    for m in range(w.shape[0]):
        rows = (tids == m).nonzero().squeeze(1)
        if rows.numel():
            logits = logits.index_put((rows,), x[rows] @ w[m])
    return logits


def check(case, ctx):
    c = case.cfg
    x, w, tids, grad_w = _inputs(case, ctx)
    r = mk.task_route(x, w, tids, c.k, backend=ctx.backend)
    logits = loop_logits(x, w, tids)
    harness.check_close(r.logits, logits, "task_route: logits", dtype=case.dtype)
    ref = mk.route(logits.detach(), c.k, backend=ctx.backend)
    assert torch.equal(r.topk_ids, ref.topk_ids), "task_route: expert ids differ from route on the loop's logits"
    harness.check_close(r.topk_weights, ref.topk_weights, "task_route: topk_weights", dtype=torch.float32)
    gx, gw = torch.autograd.grad(r.topk_weights, (x, w), grad_w)
    # the gradient written plainly for the same experts (bf16 logits can tie, and torch.topk may
    # then pick another expert than the contract's lower id)
    top = torch.softmax(logits.float(), -1).gather(1, r.topk_ids.long())
    gx2, gw2 = torch.autograd.grad(top / top.sum(-1, keepdim=True), (x, w), grad_w)
    harness.check_close(gx, gx2, "task_route: d x", dtype=case.dtype)
    harness.check_close(gw, gw2, "task_route: d router_weight", dtype=case.dtype)
    return True


def build(case, ctx) -> dict:
    ctx.cached((SCRIPT, case.id), lambda: check(case, ctx))
    c = case.cfg
    x, w, tids, grad_w = _inputs(case, ctx)
    reset = harness.drop_grads(x, w)
    bwd = harness.autograd_backward(grad_w)
    backend = ctx.backend_of("task_route")
    return {
        "moe_kernels": harness.Candidate(
            "moe_kernels", lambda: mk.task_route(x, w, tids, c.k, backend=ctx.backend).topk_weights, bwd,
            reset, {"backend": backend}),
        "loop_mk_route": harness.Candidate(
            "loop_mk_route", lambda: mk.route(loop_logits(x, w, tids), c.k, backend=ctx.backend).topk_weights,
            bwd, reset, {"backend": ctx.backend_of("route")}),
        "loop_eager": harness.Candidate(
            "loop_eager", lambda: eager_route(loop_logits(x, w, tids), c.k)[1], bwd, reset,
            {"backend": "torch"}),
    }


def test_task_route(benchmark, bctx, case, candidate_name, mode):
    bctx.pytest_benchmark(benchmark, build(case, bctx)[candidate_name], mode)


def test_task_route_compare(benchmark, bctx, case):
    bctx.compare(benchmark, SCRIPT, case.id, build(case, bctx), baselines={"task_route": "loop_eager"},
                 op_of=lambda name: "task_route")
