"""mk.plan (the dispatch plan of given top-k ids) vs the same plan in eager torch.

    pytest benchmarks/bench_plan.py --benchmark-only [--quick] [--backend auto|reference|cpu|...]

Candidates (forward only: the plan is integer data; the weights pass through):
  moe_kernels   mk.plan(ids, weights, E) on the chosen backend (dropless).
  torch_eager   the plan as transformers' grouped_mm path and most trainers build it: bincount,
                cumsum, a stable argsort of the expert ids (token order inside each expert) and its
                inverse.
The ids are the top-k of harness.distinct_logits (no ties); both plans must be equal exactly.
Shapes: configs A, B, C of benchmarks/shapes.json.
"""

from __future__ import annotations

import torch

import harness
import moe_kernels as mk

CANDIDATES = ("moe_kernels", "torch_eager")
SCRIPT = "bench_plan"


def make_cases(quick):
    return harness.cases(quick, dtypes=("fp32",))


def eager_plan(ids: torch.Tensor, E: int):
    """counts, offsets, slots, sources of the given ids, written plainly in torch."""
    T, k = ids.shape
    flat = ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=E)
    offsets = torch.zeros(E + 1, dtype=torch.int64, device=ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    order = torch.argsort(flat, stable=True)
    slots = torch.empty_like(order)
    slots[order] = torch.arange(order.numel(), device=ids.device)
    return counts, offsets, slots.view(T, k), order // k


def _inputs(case, ctx):
    c = case.cfg
    logits = harness.distinct_logits(c.T, c.E, torch.float32, ctx.device, seed=1)
    w, ids = torch.softmax(logits, -1).topk(c.k, dim=-1)
    return ids, w


def check(case, ctx):
    ids, w = _inputs(case, ctx)
    r = mk.plan(ids, w, case.cfg.E, backend=ctx.backend)
    counts, offsets, slots, sources = eager_plan(ids, case.cfg.E)
    for name, got, want in (("counts", r.counts, counts), ("offsets", r.offsets, offsets),
                            ("slots", r.slots, slots), ("sources", r.sources, sources)):
        assert torch.equal(got.long(), want), f"plan: {name} differ"
    return True


def build(case, ctx) -> dict:
    ctx.cached((SCRIPT, case.id), lambda: check(case, ctx))
    ids, w = _inputs(case, ctx)
    E = case.cfg.E
    return {
        "moe_kernels": harness.Candidate("moe_kernels", lambda: mk.plan(ids, w, E, backend=ctx.backend).slots,
                                         meta={"backend": ctx.backend_of("plan")}),
        "torch_eager": harness.Candidate("torch_eager", lambda: eager_plan(ids, E)[2], meta={"backend": "torch"}),
    }


def test_plan(benchmark, bctx, case, candidate_name, mode):
    bctx.pytest_benchmark(benchmark, build(case, bctx)[candidate_name], mode)


def test_plan_compare(benchmark, bctx, case):
    bctx.compare(benchmark, SCRIPT, case.id, build(case, bctx), baselines={"plan": "torch_eager"},
                 op_of=lambda name: "plan")
