"""mk.grouped_gemm and mk.grouped_mlp vs a per-expert torch loop and the dense bound.

    pytest benchmarks/bench_grouped.py --benchmark-only [--quick] [--backend auto|reference|cpu|...]

Rows: N = T*k rows grouped by expert with the segment sizes of a real top-k routing of T tokens
(uneven, as in training); weights [E, a, b].

Candidates, per op (gemm: x @ w[e]; mlp: gelu(x @ w1[e]) @ w2[e], exact erf gelu, no biases):
  moe_kernels  mk.grouped_gemm / mk.grouped_mlp on the chosen backend (one autograd node).
  torch_loop   per-expert matmuls written plainly and well: ``x.split(counts)`` and ``w.unbind(0)``
               are single autograd nodes, so backward does not build one zero-filled full-size
               gradient per expert (the slicing trap of PLATFORM.md), then ``torch.cat``.
  dense        the same FLOPs as one GEMM (one MLP) over all N rows with one expert's weights: a
               bound a grouped kernel may still beat when per-expert blocks fit in cache.
GFLOP/s: 2*N*a*b per GEMM (backward: twice the forward's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import harness
import moe_kernels as mk

SCRIPT = "bench_grouped"
CANDIDATES = ("moe_kernels", "torch_loop", "dense")


def make_cases(quick):
    return harness.cases(quick, variants=("gemm", "mlp"))


class Inputs:
    def __init__(self, case, ctx):
        c, dev, dt = case.cfg, ctx.device, case.dtype
        r = mk.route(harness.distinct_logits(c.T, c.E, torch.float32, dev, seed=11), c.k, backend=ctx.backend)
        self.offsets = r.offsets
        self.counts = r.counts.tolist()
        self.N = r.num_rows
        self.op = case.variant
        a, h = c.d, c.h
        self.x = harness.randn(self.N, a, dtype=dt, device=dev, seed=12, requires_grad=True)
        s1, s2 = a ** -0.5, h ** -0.5
        if self.op == "gemm":
            self.w = harness.randn(c.E, a, h, dtype=dt, device=dev, seed=13, scale=s1, requires_grad=True)
            self.w_dense = self.w[0].detach().clone().requires_grad_(True)
            self.g = harness.randn(self.N, h, dtype=dt, device=dev, seed=14)
            self.flops = 2 * self.N * a * h
        else:
            self.w1 = harness.randn(c.E, a, h, dtype=dt, device=dev, seed=13, scale=s1, requires_grad=True)
            self.w2 = harness.randn(c.E, h, a, dtype=dt, device=dev, seed=15, scale=s2, requires_grad=True)
            self.w1_dense = self.w1[0].detach().clone().requires_grad_(True)
            self.w2_dense = self.w2[0].detach().clone().requires_grad_(True)
            self.g = harness.randn(self.N, a, dtype=dt, device=dev, seed=14)
            self.flops = 2 * 2 * self.N * a * h
        assert sum(self.counts) == self.N, "dropless routing must fill the buffer"

    def leaves(self):
        if self.op == "gemm":
            return [self.x, self.w, self.w_dense]
        return [self.x, self.w1, self.w2, self.w1_dense, self.w2_dense]


def loop_gemm(x, counts, w):
    return torch.cat([xe @ we for xe, we in zip(x.split(counts), w.unbind(0))])


def loop_mlp(x, counts, w1, w2):
    return torch.cat([F.gelu(xe @ a) @ b for xe, a, b in zip(x.split(counts), w1.unbind(0), w2.unbind(0))])


def check(case, ctx):
    s = Inputs(case, ctx)
    if s.op == "gemm":
        out = mk.grouped_gemm(s.x, s.offsets, s.w, backend=ctx.backend)
        ref = loop_gemm(s.x, s.counts, s.w)
        params = (s.x, s.w)
    else:
        out = mk.grouped_mlp(s.x, s.offsets, s.w1, s.w2, "gelu", backend=ctx.backend)
        ref = loop_mlp(s.x, s.counts, s.w1, s.w2)
        params = (s.x, s.w1, s.w2)
    harness.check_close(out, ref, f"grouped_{s.op}: output")
    for name, a, b in zip(("x", "w", "w2") if s.op == "gemm" else ("x", "w1", "w2"),
                          torch.autograd.grad(out, params, s.g), torch.autograd.grad(ref, params, s.g)):
        harness.check_close(a, b, f"grouped_{s.op} backward: d {name}")
    return True


def build(case, ctx):
    ctx.cached((SCRIPT, case.id), lambda: check(case, ctx))
    s = Inputs(case, ctx)
    be = ctx.backend
    reset = harness.drop_grads(s.leaves())
    bwd = harness.autograd_backward(s.g)
    C = harness.Candidate
    if s.op == "gemm":
        fns = {"moe_kernels": lambda: mk.grouped_gemm(s.x, s.offsets, s.w, backend=be),
               "torch_loop": lambda: loop_gemm(s.x, s.counts, s.w),
               "dense": lambda: s.x @ s.w_dense}
        mk_backend = ctx.backend_of("grouped_gemm")
    else:
        fns = {"moe_kernels": lambda: mk.grouped_mlp(s.x, s.offsets, s.w1, s.w2, "gelu", backend=be),
               "torch_loop": lambda: loop_mlp(s.x, s.counts, s.w1, s.w2),
               "dense": lambda: F.gelu(s.x @ s.w1_dense) @ s.w2_dense}
        mk_backend = ctx.backend_of("grouped_mlp")
    return {n: C(n, f, bwd, reset, {"backend": mk_backend if n == "moe_kernels" else "torch"})
            for n, f in fns.items()}, s


def test_grouped(benchmark, bctx, case, candidate_name, mode):
    cands, _ = build(case, bctx)
    bctx.pytest_benchmark(benchmark, cands[candidate_name], mode)


def test_grouped_compare(benchmark, bctx, case):
    cands, s = build(case, bctx)

    def extra(name, timings):
        out = {}
        for m, mult in (("forward", 1), ("backward", 2), ("full", 3)):
            t = timings.get(m)
            if t is not None and t.samples:
                out[f"{harness.MODE_TITLES[m]} GFLOP/s"] = f"{mult * s.flops / t.median / 1e9:.0f}"
        return out

    bctx.compare(benchmark, SCRIPT, case.id, cands, baselines={f"grouped_{s.op}": "torch_loop"},
                 op_of=lambda name: f"grouped_{s.op}", extra=extra)
