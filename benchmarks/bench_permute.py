"""mk.dispatch / mk.combine (forward and backward) vs eager torch, and the copy bandwidth achieved.

    pytest benchmarks/bench_permute.py --benchmark-only [--quick] [--backend auto|reference|cpu|...]

Shapes: configs A, B, C of benchmarks/shapes.json. Candidates (one round-robin comparison per case
holds all of them, so the bandwidth baselines see the same machine state as the ops):
  dispatch/moe_kernels   mk.dispatch(x, routing)                -> [N, d] expert-grouped rows
  dispatch/torch_eager   x.index_select(0, sources)             (autograd: index_add backward)
  combine/moe_kernels    mk.combine(y, routing, weights=w)      -> [T, d]
  combine/torch_eager    (y[slots].view(T, k, d).float() * w[..., None]).sum(1).to(dtype)
  copy/index_select_out  torch.index_select(x, 0, sources, out=buf): a memcpy-style row gather
                         into a preallocated buffer, forward only (the practical gather bound)
  copy/copy_             buf.copy_(src) of the same N*d elements, forward only (streaming bound)

Columns: GB/s = bytes an ideal kernel moves / median time; `of copy_` = that GB/s over copy_'s GB/s
measured in the same run (PLATFORM.md measured about 39 GB/s read+write on the 2-core CPU).
Bytes counted (s = element size, N = T*k rows, dropless):
  dispatch fwd: read N*d*s + write N*d*s;  dispatch bwd: read N*d*s + write T*d*s
  combine fwd:  read N*d*s + write T*d*s;  combine bwd:  read T*d*s + N*d*s (grad_out, y) + write N*d*s
The output of mk.dispatch/combine is allocated per call (the API has no out=), as is the eager
one; only the copy baselines write into a reused buffer.
"""

from __future__ import annotations

import torch

import harness
import moe_kernels as mk

SCRIPT = "bench_permute"
CANDIDATES = ("dispatch/moe_kernels", "dispatch/torch_eager", "combine/moe_kernels", "combine/torch_eager",
              "copy/index_select_out", "copy/copy_")


def make_cases(quick):
    return harness.cases(quick)


class Inputs:
    def __init__(self, case, ctx):
        c, dev, dt = case.cfg, ctx.device, case.dtype
        self.T, self.d, self.k, self.E = c.T, c.d, c.k, c.E
        logits = harness.distinct_logits(c.T, c.E, torch.float32, dev, seed=3)
        self.routing = mk.route(logits, c.k, backend=ctx.backend)
        self.N = self.routing.num_rows
        self.sources = self.routing.sources.long()          # dropless: no -1 rows
        self.slots = self.routing.slots.long()              # [T, k]
        self.x = harness.randn(c.T, c.d, dtype=dt, device=dev, seed=4, requires_grad=True)
        self.gx_out = harness.randn(self.N, c.d, dtype=dt, device=dev, seed=5)   # grad of dispatch out
        self.y = harness.randn(self.N, c.d, dtype=dt, device=dev, seed=6, requires_grad=True)
        self.w = self.routing.topk_weights.detach().clone().requires_grad_(True)
        self.gy_out = harness.randn(c.T, c.d, dtype=dt, device=dev, seed=7)      # grad of combine out
        self.buf = torch.empty(self.N, c.d, dtype=dt, device=dev)
        self.src_rows = harness.randn(self.N, c.d, dtype=dt, device=dev, seed=8)
        self.itemsize = torch.empty((), dtype=dt).element_size()


def eager_dispatch(x, sources):
    return x.index_select(0, sources)


def eager_combine(y, slots, w):
    T, k = slots.shape
    rows = y.index_select(0, slots.reshape(-1)).view(T, k, y.shape[1])
    return (rows.float() * w.float()[..., None]).sum(1).to(y.dtype)


def check(case, ctx):
    s = Inputs(case, ctx)
    xe = mk.dispatch(s.x, s.routing, backend=ctx.backend)
    ref = eager_dispatch(s.x, s.sources)
    assert torch.equal(xe, ref), "dispatch: rows differ from x.index_select (must be bit-exact)"
    g_mk, = torch.autograd.grad(xe, s.x, s.gx_out)
    g_ref, = torch.autograd.grad(ref, s.x, s.gx_out)
    harness.check_close(g_mk, g_ref, "dispatch backward: d x", dtype=case.dtype)
    out = mk.combine(s.y, s.routing, weights=s.w, backend=ctx.backend)
    ref = eager_combine(s.y, s.slots, s.w)
    harness.check_close(out, ref, "combine: output", dtype=case.dtype)
    gy, gw = torch.autograd.grad(out, (s.y, s.w), s.gy_out)
    gy_ref, gw_ref = torch.autograd.grad(ref, (s.y, s.w), s.gy_out)
    harness.check_close(gy, gy_ref, "combine backward: d y", dtype=case.dtype)
    harness.check_close(gw, gw_ref, "combine backward: d weights", dtype=case.dtype)
    ref_copy = torch.index_select(s.x.detach(), 0, s.sources, out=s.buf)
    assert torch.equal(ref_copy, xe), "index_select(out=) baseline gathers other rows"
    return True


def build(case, ctx) -> dict:
    ctx.cached((SCRIPT, case.id), lambda: check(case, ctx))
    s = Inputs(case, ctx)
    be = ctx.backend
    xd = s.x.detach()
    C = harness.Candidate
    return {
        "dispatch/moe_kernels": C("dispatch/moe_kernels", lambda: mk.dispatch(s.x, s.routing, backend=be),
                                  harness.autograd_backward(s.gx_out), harness.drop_grads(s.x),
                                  {"backend": ctx.backend_of("dispatch")}),
        "dispatch/torch_eager": C("dispatch/torch_eager", lambda: eager_dispatch(s.x, s.sources),
                                  harness.autograd_backward(s.gx_out), harness.drop_grads(s.x),
                                  {"backend": "torch"}),
        "combine/moe_kernels": C("combine/moe_kernels",
                                 lambda: mk.combine(s.y, s.routing, weights=s.w, backend=be),
                                 harness.autograd_backward(s.gy_out), harness.drop_grads(s.y, s.w),
                                 {"backend": ctx.backend_of("combine")}),
        "combine/torch_eager": C("combine/torch_eager", lambda: eager_combine(s.y, s.slots, s.w),
                                 harness.autograd_backward(s.gy_out), harness.drop_grads(s.y, s.w),
                                 {"backend": "torch"}),
        "copy/index_select_out": C("copy/index_select_out",
                                   lambda: torch.index_select(xd, 0, s.sources, out=s.buf), None, None,
                                   {"backend": "torch"}),
        "copy/copy_": C("copy/copy_", lambda: s.buf.copy_(s.src_rows), None, None, {"backend": "torch"}),
    }, s


def _bytes(op: str, mode: str, s: Inputs) -> int:
    nd, td = s.N * s.d * s.itemsize, s.T * s.d * s.itemsize
    table = {("dispatch", "forward"): 2 * nd, ("dispatch", "backward"): nd + td,
             ("combine", "forward"): nd + td, ("combine", "backward"): td + 2 * nd,
             ("copy", "forward"): 2 * nd}
    if mode == "full":
        return table[(op, "forward")] + table[(op, "backward")]
    return table[(op, mode)]


def test_permute(benchmark, bctx, case, candidate_name, mode):
    cands, _ = build(case, bctx)
    bctx.pytest_benchmark(benchmark, cands[candidate_name], mode)


def test_permute_compare(benchmark, bctx, case):
    cands, s = build(case, bctx)
    state = {}

    def extra(name, timings):
        op = name.split("/")[0]
        out = {}
        for m in ("forward", "backward"):
            t = timings.get(m)
            if t is None or not t.samples:
                continue
            gbs = _bytes(op, m, s) / t.median / 1e9
            out[f"{harness.MODE_TITLES[m]} GB/s"] = f"{gbs:.1f}"
            if name == "copy/copy_" and m == "forward":
                state["copy_gbs"] = gbs
            state.setdefault("rows", []).append((out, m, gbs))
        return out

    timings = bctx.compare(benchmark, SCRIPT, case.id, cands,
                           baselines={"dispatch": "dispatch/torch_eager", "combine": "combine/torch_eager",
                                      "copy": "copy/copy_"},
                           op_of=lambda name: name.split("/")[0], extra=extra)
    # fraction of the copy_ bandwidth measured in this run (copy_ is timed with the others)
    copy_gbs = _bytes("copy", "forward", s) / timings["copy/copy_"]["forward"].median / 1e9
    for out, m, gbs in state.get("rows", []):
        out[f"{harness.MODE_TITLES[m]} of copy_"] = f"{gbs / copy_gbs:.2f}"
