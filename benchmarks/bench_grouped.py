"""mk.grouped_gemm, mk.grouped_mlp and mk.moe_mlp vs a per-expert torch loop and the dense bound.

    pytest benchmarks/bench_grouped.py --benchmark-only [--quick] [--backend auto|reference|cpu|...]

Rows: N = T*k rows grouped by expert with the segment sizes of a real top-k routing of T tokens
(uneven, as in training); weights [E, a, b]. T, d, h, E, k: configs A, B, C of benchmarks/shapes.json.

Candidates, per op (gemm: x @ w[e]; mlp: gelu(x @ w1[e]) @ w2[e], exact erf gelu, no biases):
  moe_kernels  mk.grouped_gemm / mk.grouped_mlp on the chosen backend (one autograd node).
  torch_loop   per-expert matmuls written plainly and well: ``x.split(counts)`` and ``w.unbind(0)``
               are single autograd nodes, so backward does not build one zero-filled full-size
               gradient per expert (the slicing trap of PLATFORM.md), then ``torch.cat``.
  dense        the same FLOPs as one GEMM (one MLP) over all N rows with one expert's weights: a
               bound a grouped kernel may still beat when per-expert blocks fit in cache.
The `moe` variant times the whole expert layer from tokens, mk.moe_mlp(x [T, d], routing, w1, w2):
  moe_kernels  mk.moe_mlp: one op that keeps only the pre-activation.
  composed     mk.dispatch -> mk.grouped_mlp -> mk.combine, three ops on the same backend.
  torch_loop   per expert: tokens by (ids == e).nonzero(), x[tok], the MLP, times the gate weight,
               index_add_ into the output (the naive loop of bench_moe_layer).
  dense        gelu(X W1) W2 on the T*k rows with one expert's weights (the rows are given, no routing).
  Gradients flow to x, the gate weights and the expert weights.
GFLOP/s: 2*N*a*b per GEMM (backward: twice the forward's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import harness
import moe_kernels as mk

SCRIPT = "bench_grouped"
CANDIDATES = ("moe_kernels", "composed", "torch_loop", "dense")


def make_cases(quick):
    return harness.cases(quick, variants=("gemm", "mlp", "moe"))


class Inputs:
    def __init__(self, case, ctx):
        c, dev, dt = case.cfg, ctx.device, case.dtype
        r = mk.route(harness.distinct_logits(c.T, c.E, torch.float32, dev, seed=11), c.k, backend=ctx.backend)
        self.routing = r
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
            if self.op == "moe":  # tokens in, tokens out; the gate weights are a leaf that needs grad
                self.x = harness.randn(c.T, a, dtype=dt, device=dev, seed=12, requires_grad=True)
                self.rows = harness.randn(self.N, a, dtype=dt, device=dev, seed=16, requires_grad=True)
                self.w = r.topk_weights.detach().clone().requires_grad_(True)
                self.routing = r._replace(topk_weights=self.w)
            self.w1 = harness.randn(c.E, a, h, dtype=dt, device=dev, seed=13, scale=s1, requires_grad=True)
            self.w2 = harness.randn(c.E, h, a, dtype=dt, device=dev, seed=15, scale=s2, requires_grad=True)
            self.w1_dense = self.w1[0].detach().clone().requires_grad_(True)
            self.w2_dense = self.w2[0].detach().clone().requires_grad_(True)
            self.g = harness.randn(self.x.shape[0], a, dtype=dt, device=dev, seed=14)
            self.flops = 2 * 2 * self.N * a * h
        assert sum(self.counts) == self.N, "dropless routing must fill the buffer"

    def leaves(self):
        if self.op == "gemm":
            return [self.x, self.w, self.w_dense]
        if self.op == "moe":
            return [self.x, self.w, self.rows, self.w1, self.w2, self.w1_dense, self.w2_dense]
        return [self.x, self.w1, self.w2, self.w1_dense, self.w2_dense]


def loop_gemm(x, counts, w):
    return torch.cat([xe @ we for xe, we in zip(x.split(counts), w.unbind(0))])


def loop_mlp(x, counts, w1, w2):
    return torch.cat([F.gelu(xe @ a) @ b for xe, a, b in zip(x.split(counts), w1.unbind(0), w2.unbind(0))])


def loop_moe(x, routing, w1, w2):
    ids, w = routing.topk_ids, routing.topk_weights
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, pos = (ids == e).nonzero(as_tuple=True)
        if tok.numel():
            y = F.gelu(x[tok] @ w1[e]) @ w2[e]
            out.index_add_(0, tok, (y.float() * w[tok, pos, None]).to(x.dtype))
    return out


def composed_moe(x, routing, w1, w2, backend):
    xe = mk.dispatch(x, routing, backend=backend)
    return mk.combine(mk.grouped_mlp(xe, routing.offsets, w1, w2, "gelu", backend=backend), routing,
                      backend=backend)


def check(case, ctx):
    s = Inputs(case, ctx)
    if s.op == "moe":
        params = (s.x, s.w, s.w1, s.w2)
        out = mk.moe_mlp(s.x, s.routing, s.w1, s.w2, "gelu", backend=ctx.backend)
        grads = torch.autograd.grad(out, params, s.g, retain_graph=True)
        for name, ref in (("composed", composed_moe(s.x, s.routing, s.w1, s.w2, ctx.backend)),
                          ("torch_loop", loop_moe(s.x, s.routing, s.w1, s.w2))):
            harness.check_close(out, ref, f"moe_mlp vs {name}: output")
            # the gate-weight gradient is fp32 but computed from data in the case's dtype: its tolerance
            for pname, a, b in zip(("x", "gate weights", "w1", "w2"), grads, torch.autograd.grad(ref, params, s.g)):
                harness.check_close(a, b, f"moe_mlp vs {name} backward: d {pname}", dtype=case.dtype)
        return True
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
    elif s.op == "moe":
        fns = {"moe_kernels": lambda: mk.moe_mlp(s.x, s.routing, s.w1, s.w2, "gelu", backend=be),
               "composed": lambda: composed_moe(s.x, s.routing, s.w1, s.w2, be),
               "torch_loop": lambda: loop_moe(s.x, s.routing, s.w1, s.w2),
               "dense": lambda: F.gelu(s.rows @ s.w1_dense) @ s.w2_dense}
        mk_backend = ctx.backend_of("moe_mlp")
    else:
        fns = {"moe_kernels": lambda: mk.grouped_mlp(s.x, s.offsets, s.w1, s.w2, "gelu", backend=be),
               "torch_loop": lambda: loop_mlp(s.x, s.counts, s.w1, s.w2),
               "dense": lambda: F.gelu(s.x @ s.w1_dense) @ s.w2_dense}
        mk_backend = ctx.backend_of("grouped_mlp")
    dense_bwd = harness.autograd_backward(harness.randn(s.N, case.cfg.d, dtype=case.dtype, device=ctx.device, seed=17))
    return {n: C(n, f, dense_bwd if (s.op == "moe" and n == "dense") else bwd, reset,
                 {"backend": mk_backend if n in ("moe_kernels", "composed") else "torch"})
            for n, f in fns.items()}, s


def test_grouped(benchmark, bctx, case, candidate_name, mode):
    cands, _ = build(case, bctx)
    if candidate_name not in cands:
        import pytest

        pytest.skip(f"{candidate_name} exists only for the moe variant")
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

    op = "moe_mlp" if s.op == "moe" else f"grouped_{s.op}"
    bctx.compare(benchmark, SCRIPT, case.id, cands, baselines={op: "torch_loop"}, op_of=lambda name: op,
                 extra=extra)
