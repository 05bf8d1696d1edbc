"""Host overhead per call: ``mk.route`` + ``mk.moe_mlp`` forward+backward at decode-sized batches.

At T = 1 or 16 tokens the kernels take microseconds, so what a call costs is the Python and
dispatcher work around them: argument checks, backend resolution, the custom-op machinery, value
checks, autograd. This script measures that cost against the bare torch a user would write
without the library (``torch.topk`` on the logits, a softmax of the k values, and the expert MLP
as two matmuls over the T*k rows), in the same process, interleaved.

    python benchmarks/bench_overhead.py                       # the shapes of shapes.json: T = 1 and 16
    python benchmarks/bench_overhead.py --backend reference --tokens 1,16,256
    python benchmarks/bench_overhead.py --out benchmarks/results/overhead_cpu

Rows (all forward+backward unless noted; times are medians over ``--reps`` batches of ``--calls``
calls each, in microseconds per call):

* ``bare_torch``: topk + softmax + ``gelu(x W1[e]) W2[e]`` for one expert's weights; backward.
* ``mk_route``: ``mk.route(logits, k)`` forward only (the plan has no gradient but the weights).
* ``mk_route_moe_mlp``: ``mk.route`` + ``mk.moe_mlp``; backward through both.
* ``overhead``: ``mk_route_moe_mlp - bare_torch``: what the library adds per layer call.

Default shapes: section ``overhead`` of benchmarks/shapes.json (read through harness.shapes); every
one of them can be given on the command line instead. Only the public API of moe_kernels is used,
so the same file measures any revision of the library: ``benchmarks/compare_revisions.py`` copies
it into a checkout that lacks it and passes the shapes explicitly there (that checkout's harness
may predate shapes.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_kernels as mk  # noqa: E402

try:
    import harness  # noqa: E402
except ImportError:  # pragma: no cover - run outside the repository
    harness = None


def make_inputs(T: int, d: int, h: int, E: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, requires_grad=True)
    router = torch.randn(d, E, generator=g) / d ** 0.5
    logits = (x.detach() @ router).requires_grad_()
    w1 = (torch.randn(E, d, h, generator=g) / d ** 0.5).requires_grad_()
    w2 = (torch.randn(E, h, d, generator=g) / h ** 0.5).requires_grad_()
    return x, logits, w1, w2


def candidates(T, d, h, E, k, backend):
    x, logits, w1, w2 = make_inputs(T, d, h, E)
    params = (x, logits, w1, w2)

    def clear():
        for p in params:
            p.grad = None

    def bare_torch():
        clear()
        vals, ids = torch.topk(logits, k, dim=-1)
        w = torch.softmax(vals, dim=-1)
        rows = x.repeat_interleave(k, 0)
        y = (F.gelu(rows @ w1[0]) @ w2[0]) * w.reshape(-1, 1)
        y.sum().backward()

    def mk_route():
        with torch.no_grad():
            mk.route(logits, k, backend=backend)

    def mk_route_moe_mlp():
        clear()
        r = mk.route(logits, k, backend=backend)
        y = mk.moe_mlp(x, r, w1, w2, "gelu", backend=backend)
        y.sum().backward()

    return {"bare_torch": bare_torch, "mk_route": mk_route, "mk_route_moe_mlp": mk_route_moe_mlp}


def time_us(fns: dict, reps: int, calls: int) -> dict:
    """Round-robin: each rep runs every candidate ``calls`` times; per-call µs per rep."""
    for fn in fns.values():
        for _ in range(max(3, calls // 10)):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls * 1e6)
    return samples


def shape_defaults() -> list:
    """Section ``overhead`` of shapes.json as options (its keys are this script's option names); put
    before the command line's, which win; none where this checkout's harness predates shapes.json."""
    return harness.shape_options("overhead") if hasattr(harness, "shapes") else []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default=None, help="comma-separated T values (default: shapes.json)")
    ap.add_argument("--dim", type=int, default=None, help="d (default: shapes.json)")
    ap.add_argument("--hidden", type=int, default=None, help="h (default: shapes.json)")
    ap.add_argument("--experts", type=int, default=None, help="E (default: shapes.json)")
    ap.add_argument("--k", type=int, default=None, help="top-k (default: shapes.json)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--backend", default=None, help="force a moe_kernels backend (default: automatic)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (for compare_revisions.py)")
    ap.add_argument("--out", default=None, help="write PATH.json and PATH.md")
    args = ap.parse_args(shape_defaults() + (sys.argv[1:] if argv is None else list(argv)))
    missing = [f"--{key}" for key in ("tokens", "dim", "hidden", "experts", "k") if getattr(args, key) is None]
    if missing:
        ap.error(f"this checkout's benchmarks/harness.py has no shapes.json: pass {' '.join(missing)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    for T in [int(t) for t in args.tokens.split(",")]:
        s = time_us(candidates(T, args.dim, args.hidden, args.experts, args.k, args.backend), args.reps,
                    args.calls)
        med = {n: statistics.median(v) for n, v in s.items()}
        results.append({"T": T, "d": args.dim, "h": args.hidden, "E": args.experts, "k": args.k,
                        "median_us": med, "samples_us": s,
                        "overhead_us": med["mk_route_moe_mlp"] - med["bare_torch"]})
    backend = mk.backends.resolve("route", torch.device("cpu"), args.backend, warn=False)
    if args.json:
        print(json.dumps({"backend": backend, "results": results}))
        return 0
    lines = [f"backend {backend}; d={args.dim} h={args.hidden} E={args.experts} k={args.k}; "
             f"median over {args.reps} round-robin reps of {args.calls} calls, us per call",
             "", "| T | bare_torch fwd+bwd | mk.route fwd | mk.route + mk.moe_mlp fwd+bwd | overhead |",
             "|---:|---:|---:|---:|---:|"]
    for r in results:
        m = r["median_us"]
        lines.append(f"| {r['T']} | {m['bare_torch']:.1f} | {m['mk_route']:.1f} | {m['mk_route_moe_mlp']:.1f} "
                     f"| {r['overhead_us']:.1f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        env = harness.environment(torch.device("cpu")) if harness else {}
        with open(args.out + ".json", "w") as f:
            json.dump({"environment": env, "backend": backend, "results": results}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write("# Host overhead per call\n\n")
            if env:
                f.write(f"- command: `{env.get('command', '')}`\n- date (UTC): {env.get('date_utc', '')}\n\n")
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
