"""Where the MoE layer's time goes, per cell: the whole layer, its expert part alone, and the GEMM floors.

    python benchmarks/bench_layer_profile.py [--configs A,B,C] [--dtypes fp32,bf16] [--reps 5] [--quick] [--out NAME]

Candidates, timed round-robin in one run per cell (forward, backward, forward+backward):
  layer            mk.nn.MoE(d, h, E, k) forward+backward with its aux losses (what bench_moe_layer times)
  moe_mlp          mk.moe_mlp alone on the layer's routing (gate weights a leaf that needs grad)
  gemm_grouped     the layer's 6 GEMMs per expert on its row segments, scheduled as moe_mlp schedules
                   them (the cpu backend's grouped_gemm kernels, called directly: experts concurrently
                   with one thread each when there are at least two per thread, largest first;
                   outputs from the buffer pool): the GEMM work of the expert part, nothing else
  gemm_dense       the same 6 GEMMs on all T*k rows with one weight matrix, outputs preallocated (the
                   GEMM work of bench_moe_layer's dense bound)

Derived columns: `moe_mlp - GEMMs grouped` is the expert part's time outside its GEMMs (gathers,
activation and its recompute, the gate step, the combine); `layer - moe_mlp` is the router product,
routing, the losses and autograd; `GEMMs grouped / dense` is what splitting the rows over E weight
matrices costs the GEMMs themselves. Medians of one round-robin run; the machine is noisy, compare
within a row only.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import moe_kernels as mk  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _weights(E, d, h, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*sh, generator=g) / math.sqrt(sh[-2])).to(dtype) for sh in ((E, d, h), (E, h, d))]


def gemm_dense_candidate(rows, d, h, dtype):
    """Forward: z = x W1, y = z W2; backward: dH = dY W2^T, dW2 = z^T dY, dW1 = x^T dH, dX = dH W1^T."""
    x, dy = harness.randn(rows, d, dtype=dtype, seed=3), harness.randn(rows, d, dtype=dtype, seed=4)
    z, y, dh, dx = (torch.empty(rows, n, dtype=dtype) for n in (h, d, h, d))
    w1, w2 = (w[0] for w in _weights(1, d, h, dtype))
    gw1, gw2 = torch.empty_like(w1), torch.empty_like(w2)

    def fwd():
        torch.mm(x, w1, out=z)
        torch.mm(z, w2, out=y)

    def bwd(_):
        torch.mm(dy, w2.t(), out=dh)
        torch.mm(z.t(), dy, out=gw2)
        torch.mm(x.t(), dh, out=gw1)
        torch.mm(dh, w1.t(), out=dx)

    return harness.Candidate("gemm_dense", fwd, bwd)


def gemm_grouped_candidate(offsets, rows, d, h, E, dtype):
    """The same six GEMMs per expert segment through the cpu backend's grouped GEMM kernels."""
    from moe_kernels.backends.compiled import load

    ok, reason = load()
    if not ok:
        raise RuntimeError(f"the compiled operators are unavailable: {reason}")
    ops = torch.ops.moe_kernels_C
    gg, gg_bwd = ops.grouped_gemm.default, ops.grouped_gemm_backward.default
    x, dy = harness.randn(rows, d, dtype=dtype, seed=3), harness.randn(rows, d, dtype=dtype, seed=4)
    z = harness.randn(rows, h, dtype=dtype, seed=5)
    w1, w2 = _weights(E, d, h, dtype)

    def fwd():
        return gg(gg(x, offsets, w1), offsets, w2)

    def bwd(_):
        dh, _gw2 = gg_bwd(dy, z, offsets, w2, True, True)
        gg_bwd(dh, x, offsets, w1, True, True)

    return harness.Candidate("gemm_grouped", fwd, bwd)


def run_cell(cfg, dname, reps):
    dtype = DTYPES[dname]
    T, d, h, E, k = cfg.T, cfg.d, cfg.h, cfg.E, cfg.k
    torch.manual_seed(0)
    layer = mk.nn.MoE(d, h, E, k, activation="gelu", bias=False, dtype=dtype)
    x = harness.randn(T, d, dtype=dtype, seed=1).requires_grad_(True)
    g = harness.randn(T, d, dtype=dtype, seed=2, scale=1 / math.sqrt(T * d))

    def layer_fwd():
        o = layer(x)
        return (o.output, o.aux_loss)

    one = torch.ones((), dtype=torch.float32)
    cands = [harness.Candidate("layer", layer_fwd, harness.autograd_backward((g, one)),
                               harness.drop_grads(x, layer))]
    with torch.no_grad():
        routing = mk.route(x.float() @ layer.router_weight[0].float(), k)
    w = routing.topk_weights.clone().requires_grad_(True)
    r = routing._replace(topk_weights=w)
    cands.append(harness.Candidate("moe_mlp", lambda: mk.moe_mlp(x, r, layer.w1, layer.w2, "gelu"),
                                   harness.autograd_backward(g), harness.drop_grads(x, w, layer)))
    cands.append(gemm_grouped_candidate(routing.offsets, routing.num_rows, d, h, E, dtype))
    cands.append(gemm_dense_candidate(T * k, d, h, dtype))
    harness.empty_moe_kernels_pool()
    timings = harness.time_candidates(cands, reps=reps, warmup=1, device=torch.device("cpu"))
    med = {c.name: {m: timings[c.name][m].median * 1e3 for m in harness.MODES} for c in cands}
    return {"config": cfg.name, "shape": f"T={T} d={d} h={h} E={E} k={k}", "dtype": dname,
            "timings": {n: {m: timings[n][m].to_dict() for m in harness.MODES} for n in med}, "median_ms": med}


def markdown(results):
    head = ["config", "dtype", "mode", "layer ms", "moe_mlp ms", "GEMMs grouped ms", "GEMMs dense ms",
            "moe_mlp - GEMMs grouped", "layer - moe_mlp", "GEMMs grouped / dense", "layer / GEMMs dense"]
    rows = []
    for res in results:
        m = res["median_ms"]
        for mode in harness.MODES:
            L, M, P, D = (m[n][mode] for n in ("layer", "moe_mlp", "gemm_grouped", "gemm_dense"))
            rows.append([res["config"], res["dtype"], harness.MODE_TITLES[mode], f"{L:.1f}", f"{M:.1f}",
                         f"{P:.1f}", f"{D:.1f}", f"{M - P:.1f} ({(M - P) / L:.0%} of layer)",
                         f"{L - M:.1f} ({(L - M) / L:.0%})", f"{P / D:.2f}x", f"{L / D:.2f}x"])
    return harness.markdown_table(head, rows) + "\n\n" + __doc__.split("\n\n", 1)[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=None, help="comma-separated names from shapes.json (default all)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny shapes with the same E and k (CI smoke run)")
    ap.add_argument("--out", default="moe_layer_cpu_profile")
    args = ap.parse_args(argv)
    results = []
    for cfg in harness.configs(args.quick, args.configs):
        for dname in args.dtypes.split(","):
            results.append(run_cell(cfg, dname, args.reps))
            print(f"{cfg.name} {dname}: " + ", ".join(f"{n} {v['full']:.1f} ms" for n, v in results[-1]["median_ms"].items()),
                  flush=True)
    meta = harness.environment(torch.device("cpu"))
    paths = harness.write_results(args.out, meta, results, markdown(results),
                                  "MoE layer on the cpu backend: where the time goes")
    print("wrote", *paths)
    return 0


def test_layer_profile_quick(benchmark, bctx):
    """``pytest benchmarks --benchmark-only --quick`` also smoke-runs this script (config C only)."""
    import pytest

    if not bctx.quick:
        pytest.skip("run as a script: python benchmarks/bench_layer_profile.py")
    if bctx.device.type != "cpu":
        pytest.skip("profiles the cpu backend")
    argv = ["--quick", "--configs", "C", "--reps", "2", "--out", str(bctx.results_dir / "layer_profile-quick-C")]
    assert benchmark.pedantic(main, args=(argv,), rounds=1, iterations=1) == 0


if __name__ == "__main__":
    sys.exit(main())
