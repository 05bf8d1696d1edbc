"""Hugging Face transformers experts implementations: eager, batched_mm, grouped_mm and moe_kernels.

    python benchmarks/bench_transformers.py            # the experts block and the tiny model, fp32 and bf16
    python benchmarks/bench_transformers.py --quick    # CI smoke run (tiny shapes, a few seconds)

Two computations, each timed round-robin over the four implementations in one process
(harness.time_candidates), so the ratios within a table are comparable:

1. **One experts block** at Qwen3-30B-A3B's proportions scaled to this CPU: the model has hidden
   2048, moe_intermediate 768, 128 experts, top-8; here hidden 512, intermediate 192 (the same
   2.67 ratio), 64 experts, top-8, T = 512 tokens (``shapes.json`` section ``transformers``). A
   ``Qwen3MoeExperts`` module (SwiGLU, weights ``[E, out, in]``) gets the same ids and weights
   from a softmax top-8 router over fixed logits; forward and forward+backward (input, gate
   weights and expert weights). "x D" divides by the dense lower bound measured in the same run:
   the same FLOPs as one dense SwiGLU MLP on the T*k rows (two matmuls, no routing).
2. **A whole tiny Qwen3-MoE model's training step** (forward + backward of the LM loss; the
   optimizer step is the same for every implementation and is left out).

The implementation is switched on one module between calls (``config._experts_implementation``):
every candidate computes with the same parameters. Before timing, each implementation's output
and input gradient are checked against eager (harness.check_close). Peak MiB: live torch-allocated
bytes during one forward+backward above the level at its start (harness.peak_memory).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402

IMPLS = ("eager", "batched_mm", "grouped_mm", "moe_kernels")
BATCHED_MM_LIMIT = 1 << 30  # bytes of per-assignment weight copies beyond which batched_mm is not run


def _experts(shape, dtype):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=shape["d"], moe_intermediate_size=shape["h"], num_experts=shape["E"],
                         num_experts_per_tok=shape["k"])
    torch.manual_seed(0)
    m = Qwen3MoeExperts(cfg)
    with torch.no_grad():
        m.gate_up_proj.copy_(torch.randn_like(m.gate_up_proj) / shape["d"] ** 0.5)
        m.down_proj.copy_(torch.randn_like(m.down_proj) / shape["h"] ** 0.5)
    return m.to(dtype)


def _switch(module, impl):
    module.config._experts_implementation = impl


def bench_block(shape, dtype, reps, device):
    T, d, h, E, k = (shape[n] for n in ("T", "d", "h", "E", "k"))
    m = _experts(shape, dtype)
    logits = H.distinct_logits(T, E, torch.float32, device)
    w, ids = torch.softmax(logits, -1).topk(k, dim=-1)
    w = (w / w.sum(-1, keepdim=True)).to(dtype)
    x = H.randn(T, d, dtype=dtype, seed=1).requires_grad_()
    w = w.detach().requires_grad_()
    gout = H.randn(T, d, dtype=dtype, seed=2)
    reset = H.drop_grads(m, x, w)

    def run(impl):
        def forward():
            _switch(m, impl)
            return m(x, ids, w)
        return forward

    # batched_mm gathers one copy of its expert's weights per assignment: T*k*3*d*h values
    copy_bytes = T * k * 3 * d * h * torch.finfo(dtype).bits // 8
    impls = [i for i in IMPLS if i != "batched_mm" or copy_bytes <= BATCHED_MM_LIMIT]
    cands = [H.Candidate(impl, run(impl), H.autograd_backward(gout), reset, {"impl": impl}) for impl in impls]
    # the dense lower bound: the same FLOPs without routing (T*k rows through one SwiGLU MLP)
    xr = H.randn(T * k, d, dtype=dtype, seed=3).requires_grad_()
    W1 = H.randn(d, 2 * h, dtype=dtype, seed=4, scale=d ** -0.5).requires_grad_()
    W2 = H.randn(h, d, dtype=dtype, seed=5, scale=h ** -0.5).requires_grad_()
    g_dense = H.randn(T * k, d, dtype=dtype, seed=6)

    def dense():
        a, b = (xr @ W1).chunk(2, dim=-1)
        return (torch.nn.functional.silu(a) * b) @ W2

    cands.append(H.Candidate("dense (D)", dense, H.autograd_backward(g_dense), H.drop_grads(xr, W1, W2)))
    checks = _check(cands[:len(impls)], [x, w])
    if "batched_mm" not in impls:
        checks["batched_mm"] = (f"not run: it copies the expert weights once per assignment, "
                                f"{copy_bytes / 2 ** 30:.1f} GiB here (it made every other timing in the run "
                                f"swap-bound)")
    return cands, checks


def bench_model(shape, dtype, reps, device):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(vocab_size=shape["vocab"], hidden_size=shape["d"], intermediate_size=2 * shape["h"],
                         moe_intermediate_size=shape["h"], num_hidden_layers=shape["layers"],
                         num_attention_heads=4, num_key_value_heads=2, head_dim=shape["d"] // 4,
                         num_experts=shape["E"], num_experts_per_tok=shape["k"], decoder_sparse_step=1,
                         mlp_only_layers=[], max_position_embeddings=shape["seq"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager").to(dtype)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=torch.Generator().manual_seed(0))
    reset = H.drop_grads(model)

    def run(impl):
        def forward():
            model.set_experts_implementation(impl)
            return model(ids, labels=ids).loss
        return forward

    def backward(loss):
        loss.backward()

    cands = [H.Candidate(impl, run(impl), backward, reset, {"impl": impl}) for impl in IMPLS]
    checks = {}
    ref = None
    for c in cands:
        c._reset()
        loss = c.forward()
        loss.backward()
        grads = torch.cat([p.grad.reshape(-1).float() for p in model.parameters() if p.grad is not None])
        if ref is None:
            ref = (loss.detach().float(), grads)
        checks[c.name] = max(H.check_close(loss.detach().float().reshape(1), ref[0].reshape(1), c.name, dtype=dtype),
                             H.check_close(grads, ref[1], c.name + " grads", dtype=dtype))
    return cands, checks


def _check(cands, leaves):
    """Output and input gradients of every implementation against eager's (raises on a mismatch)."""
    outs = {}
    for c in cands:
        c._reset()
        out = c.forward()
        out.float().square().sum().backward()
        outs[c.name] = [out.detach()] + [t.grad.detach().clone() for t in leaves]
    ref = outs["eager"]
    return {name: max(H.check_close(a, b, f"{name} output {i}") for i, (a, b) in enumerate(zip(got, ref)))
            for name, got in outs.items()}


def _table(title, timings, mem, checks):
    rows = []
    dense = timings.get("dense (D)", {})
    for name, t in timings.items():
        ratio = lambda m: (t[m].median / dense[m].median) if dense.get(m) else None  # noqa: E731
        rows.append([name, H.fmt_timing(t.get("forward")), H.fmt_ratio(ratio("forward")) if dense else "-",
                     H.fmt_timing(t.get("full")), H.fmt_ratio(ratio("full")) if dense else "-",
                     H.fmt_ratio(t["full"].median / timings["eager"]["full"].median),
                     H.fmt_mib(mem[name]["peak_bytes"]),
                     f"{checks[name]:.1e}" if name in checks else "-"])
    for name, why in checks.items():
        if isinstance(why, str):
            rows.append([name, why] + ["-"] * 6)
    head = ["implementation", "fwd ms", "x D", "fwd+bwd ms", "x D", "vs eager", "peak MiB", "check"]
    if not dense:
        head[2] = head[4] = "-"
    return f"## {title}\n\n" + H.markdown_table(head, rows) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--parts", default="block,model", help="which computations: block, model")
    p.add_argument("--out", default="bench_transformers")
    args = p.parse_args(argv)
    import moe_kernels.integrations.transformers as mkt

    if not mkt.available()[0]:
        print(f"skipped: {mkt.available()[1]}")
        return 0
    device = torch.device("cpu")
    shapes = H.shapes("transformers", args.quick)
    reps = args.reps or (2 if args.quick else 7)
    body, results = [], {}
    for dname in args.dtypes.split(","):
        dtype = H.DTYPES[dname]
        for key, build, title in (("block", bench_block, "experts block"), ("model", bench_model, "tiny model step")):
            if key not in args.parts.split(","):
                continue
            shape = shapes[key]
            cands, checks = build(shape, dtype, reps, device)
            timings = H.time_candidates(cands, ("forward", "full"), reps=reps, warmup=1, device=device)
            mem = {c.name: H.peak_memory(lambda c=c: c.backward(c.forward()) if not c._reset() else None, device)
                   for c in cands}
            desc = ", ".join(f"{k}={v}" for k, v in shape.items() if not k.startswith("_"))
            body.append(_table(f"{title}, {dname} ({desc})", timings, mem, checks))
            results[f"{key}_{dname}"] = {"shape": shape, "timings": {n: {m: t.to_dict() for m, t in ts.items()}
                                                                    for n, ts in timings.items()},
                                         "peak": mem, "check": checks}
            print(body[-1], flush=True)
    meta = H.environment(device, {"reps": reps, "quick": args.quick})
    H.write_results(args.out, meta, results, "\n".join(body), "transformers experts implementations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
