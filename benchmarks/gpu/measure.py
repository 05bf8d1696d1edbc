"""The GPU measurements of the triton backend against the targets of issue 12 (``../shared/GPU.md`` §9).

    python benchmarks/gpu/measure.py --out DIR            # on a GPU: what benchmarks/gpu/run.sh runs
    python benchmarks/gpu/measure.py --smoke --out DIR    # on the CPU, interpreted, tiny shapes (CI)

Everything is measured in one process, so every ratio is to baselines of the same run:

* **D**: torch's dense bf16 GEMM (cuBLAS) at ``[T*k, H] x [H, 2I]``, the same FLOPs class as the
  expert layer (GPU.md's "cuBLAS upper bound"), measured per shape; **BW**: device-to-device copy
  bandwidth (read + write bytes) of a 1 GiB tensor.
* ``moe_mlp`` (SwiGLU, bf16) forward and forward+backward on the shape suite S1-S4 (balanced
  routing), S5 (decode: forward only, against BW on the touched expert bytes), S6 (Zipf-skewed
  routing with empty experts, against the balanced run of the same shape) and the small-T floor
  (S1 weights, T=128). Peers on the same inputs and plan: torch's ``grouped_mm`` (gather, two
  grouped GEMMs, SwiGLU, gather-sum) and a naive per-expert PyTorch loop.
  Liger-Kernel's fused MoE (``LigerFusedMoEFunction``) joins them when its wheel was carried along
  (run.sh; its autotuning is off by default there, ``LIGER_FUSED_MOE_AUTOTUNE=0``, to fit the time
  budget: it then runs one configuration per kernel).
* Saved activations of ``moe_mlp`` (the tensors autograd keeps, weights excluded) against
  x + z + plan.
* ``route`` + plan at T=16384, E=64, k=8 (dropless and score capacity): time, bitwise equality of
  two runs, host synchronisations (``torch.cuda.set_sync_debug_mode("error")``) and kernel launches.
* ``dispatch`` and ``combine`` (forward and backward) bandwidth against BW.
* ``reconcile`` forward and backward against D of the same GEMM.

Timing: CUDA events around each call after warm-up, the L2 cache flushed before every call
(a 256 MiB write), candidates interleaved (A, B, A, B, ...), medians with 20th/80th percentiles.
On the CPU (``--smoke``) the same code runs with ``time.perf_counter``, to keep the script working;
its numbers mean nothing. Each section checks a time budget (``--budget-s``) and is recorded as
skipped when it would start past it; results are written after every section, so a run that is cut
short still leaves what it measured. Output: ``<out>/gpu_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness as H  # noqa: E402

import moe_kernels as mk  # noqa: E402

#: the shape suite of GPU.md §9 (H: model dim, I: expert hidden, SwiGLU so w1 is [E, H, 2I])
FULL = {
    "S1": dict(T=16384, H=2048, I=768, E=128, k=8),
    "S1-32k": dict(T=32768, H=2048, I=768, E=128, k=8),
    "S2": dict(T=16384, H=4096, I=1024, E=64, k=8),
    "S3": dict(T=32768, H=4096, I=512, E=128, k=8),
    "S4": dict(T=16384, H=4096, I=14336, E=8, k=2),
}
SMOKE = {  # CPU smoke: odd sizes, so masked tiles run; the interpreter costs ~ms per program
    "S1": dict(T=48, H=40, I=24, E=7, k=3),
    "S2": dict(T=40, H=48, I=16, E=5, k=2),
}
FULL_EXTRA = dict(decode_T=(1, 8, 64, 256), small_T=128, route=dict(T=16384, E=64, k=8),
                  permute=dict(T=16384, H=4096, E=64, k=8), reconcile=dict(T=32768, C=1024, n_aux=4, C_aux=1024),
                  bw_bytes=1 << 30, flush_bytes=256 << 20, reps=20, warmup=3)
SMOKE_EXTRA = dict(decode_T=(1, 5), small_T=9, route=dict(T=70, E=13, k=3), permute=dict(T=50, H=24, E=7, k=3),
                   reconcile=dict(T=33, C=20, n_aux=3, C_aux=12), bw_bytes=1 << 20, flush_bytes=1 << 20,
                   reps=2, warmup=1)

TARGETS = {  # issue 12's targets (ratios to D or BW of the same run)
    "moe_mlp fwd, S1-S3": ">= 0.60 D",
    "moe_mlp fwd+bwd, S1-S3": ">= 0.50 D",
    "S6 skew vs balanced": ">= 0.85 (within 15%)",
    "dispatch fwd": ">= 0.80 BW",
    "combine fwd": ">= 0.80 BW",
    "route + plan, T=16384 E=64 k=8": "<= 50 us, deterministic, 0 host syncs",
    "small-T fwd+bwd (S1 weights, T=128)": "<= 1 ms",
    "saved activations of moe_mlp": "<= x + z + plan",
    "reconcile fwd": ">= 0.65 D",
}


# --------------------------------------------------------------------------- timing

class Timer:
    """CUDA events with an L2 flush before each call (GPU), or perf_counter (CPU smoke)."""

    def __init__(self, device: torch.device, flush_bytes: int, reps: int, warmup: int):
        self.device, self.reps, self.warmup = device, reps, warmup
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(flush_bytes // 4, dtype=torch.float32, device=device)

    def _one(self, fn, reset):
        if reset is not None:
            reset()
        if self.cuda:
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            return start, end
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def time(self, cands: dict) -> dict:
        """``{name: (fn, reset)}`` -> ``{name: harness.Timing}`` (seconds), round-robin."""
        for fn, reset in cands.values():
            for _ in range(self.warmup):
                self._one(fn, reset)
        H.sync(self.device)
        raw = {n: [] for n in cands}
        for _ in range(self.reps):
            for n, (fn, reset) in cands.items():
                raw[n].append(self._one(fn, reset))
        H.sync(self.device)
        if self.cuda:
            raw = {n: [s.elapsed_time(e) / 1e3 for s, e in v] for n, v in raw.items()}
        return {n: H.Timing(v) for n, v in raw.items()}


@contextlib.contextmanager
def sync_debug_error(device):
    """``torch.cuda.set_sync_debug_mode("error")`` inside: any host synchronisation raises."""
    if device.type != "cuda":
        yield
        return
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


def host_syncs(fn, device) -> dict:
    """Host synchronisations of ``fn()``: on a GPU, whether torch's sync debug mode raised; on the
    CPU, moe_kernels.testing.HostSyncCounter (which counts the same operations)."""
    if device.type == "cuda":
        try:
            with sync_debug_error(device):
                fn()
            return {"count": 0, "how": 'torch.cuda.set_sync_debug_mode("error")'}
        except RuntimeError as exc:
            return {"count": ">= 1", "how": 'torch.cuda.set_sync_debug_mode("error")', "error": str(exc)[:300]}
    from moe_kernels.testing import HostSyncCounter

    with HostSyncCounter() as c:
        fn()
    return {"count": c.count, "how": "moe_kernels.testing.HostSyncCounter"}


def kernel_launches(fn, device):
    """GPU kernels launched by ``fn()`` (torch.profiler; None on the CPU)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    H.sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        H.sync(device)
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
             and not e.name.startswith(("Memcpy", "Memset"))]
    return {"count": len(names), "kernels": sorted(set(names))[:40]}


# --------------------------------------------------------------------------- baselines

def measure_bw(timer, nbytes) -> dict:
    n = nbytes // 2
    src = torch.randn(n, device=timer.device).to(torch.bfloat16)
    dst = torch.empty_like(src)
    t = timer.time({"copy": (lambda: dst.copy_(src), None)})["copy"]
    return {"bytes": 2 * n * 2, "timing": t, "bytes_per_s": 2 * n * 2 / t.median}


def measure_dense(timer, M, K, N, dtype=torch.bfloat16) -> dict:
    a = torch.randn(M, K, device=timer.device).to(dtype)
    b = torch.randn(K, N, device=timer.device).to(dtype)
    out = torch.empty(M, N, dtype=dtype, device=timer.device)
    t = timer.time({"mm": (lambda: torch.matmul(a, b, out=out), None)})["mm"]
    return {"shape": [M, K, N], "timing": t, "flops_per_s": 2.0 * M * K * N / t.median}


# --------------------------------------------------------------------------- moe_mlp and its peers

def zipf_ids(T, E, k, device, *, target=4.0, empty=None, seed=0) -> torch.Tensor:
    """Top-k ids drawn without replacement from a Zipf law over the experts (some left empty), with
    the exponent searched so that max/mean load is about ``target``."""
    g = torch.Generator().manual_seed(seed)
    empty = max(1, E // 16) if empty is None else empty
    live = E - empty
    perm = torch.randperm(E, generator=g)
    best = None
    for a in [x / 20 for x in range(0, 41)]:
        p = torch.zeros(E)
        p[perm[:live]] = 1.0 / torch.arange(1, live + 1, dtype=torch.float32) ** a
        ids = torch.multinomial(p.expand(T, E), k, replacement=False, generator=g)
        load = torch.bincount(ids.reshape(-1), minlength=E).float()
        ratio = (load.max() / load.mean()).item()
        if best is None or abs(ratio - target) < abs(best[0] - target):
            best = (ratio, ids)
    return best[1].to(torch.int32).to(device)


def routing_for(shape, device, skew=False, seed=0):
    T, E, k = shape["T"], shape["E"], shape["k"]
    if not skew:
        logits = torch.randn(T, E, generator=torch.Generator().manual_seed(seed)).to(device)
        return mk.route(logits, k)
    ids = zipf_ids(T, E, k, device, seed=seed)
    w = torch.softmax(torch.randn(T, k, generator=torch.Generator().manual_seed(seed + 1)), -1).to(device)
    return mk.plan(ids, w, E)


def moe_flops(shape, T=None):
    T = shape["T"] if T is None else T
    N = T * shape["k"]
    return 2.0 * N * shape["H"] * 2 * shape["I"] + 2.0 * N * shape["I"] * shape["H"]  # up (2I) + down


def liger_fused_moe():
    """Liger-Kernel's fused MoE autograd function, when its wheel is importable (benchmarks/gpu/run.sh
    unpacks one from benchmarks/gpu/wheels/ when it was carried along), else None."""
    try:
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction
    except Exception:  # not installed, or it does not import here: reported as absent
        return None
    return LigerFusedMoEFunction


def _grouped_mm():
    f = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    return f


@contextlib.contextmanager
def pointer_loads():
    """The triton backend's weight tiles read by pointer loads instead of tensor descriptors (TMA),
    for forward and backward alike: the A/B of the two load paths, measured in the same run."""
    from moe_kernels.backends.triton import grouped as tg

    prev, tg.TMA = tg.TMA, False
    try:
        yield
    finally:
        tg.TMA = prev


def _tma_by_default(device) -> bool:
    """Whether moe_mlp on this device takes the triton kernels' descriptor path by default."""
    if H.resolved_backend("moe_mlp", device, None) != "triton":
        return False
    from moe_kernels.backends.triton import grouped as tg

    probe = torch.empty(1, 64, 64, dtype=torch.bfloat16, device=device)
    return tg._weight_desc(probe, False, 64, 64)[0] is not None


def build_layer(shape, device, routing, dtype=torch.bfloat16, seed=0, pointer_variant=False):
    """Inputs and the candidates (moe_kernels, torch grouped_mm, naive loop, Liger when carried; with
    ``pointer_variant`` moe_kernels again with pointer loads for the weights) on one plan.
    ``contexts``: candidate -> the context manager its whole call (forward and backward) runs in."""
    T, Hd, I, E, k = (shape[n] for n in ("T", "H", "I", "E", "k"))
    g = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: S4's weights are 1.3 G values

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    x = rnd(T, Hd).requires_grad_()
    w1 = rnd(E, Hd, 2 * I, scale=Hd ** -0.5).requires_grad_()
    w2 = rnd(E, I, Hd, scale=I ** -0.5).requires_grad_()
    gw = routing.topk_weights.detach().clone().requires_grad_()
    r = routing._replace(topk_weights=gw)
    grad = rnd(T, Hd)
    # the peers' weights: the same values stored column-major ([E, out, in] contiguous), as
    # torch's grouped GEMM prefers them
    w1c = w1.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    w2c = w2.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    leaves = (x, w1, w2, gw, w1c, w2c)

    def reset():
        for t in leaves:
            t.grad = None

    def ours():
        return mk.moe_mlp(x, r, w1, w2, "swiglu")

    src = r.sources.long().clamp(min=0)
    slots = r.slots.long()
    offs = r.offsets[1:].to(torch.int32)
    gmm = _grouped_mm()

    def gather_sum(y):
        ok = (r.slots >= 0).unsqueeze(-1)
        rows = y.index_select(0, slots.clamp(min=0).reshape(-1)).view(T, k, -1)
        return (torch.where(ok, rows, 0) * gw.unsqueeze(-1).to(y.dtype)).sum(1)

    def torch_grouped():
        xs = x.index_select(0, src)
        z = gmm(xs, w1c, offs=offs)
        a = torch.nn.functional.silu(z[:, :I]) * z[:, I:]
        return gather_sum(gmm(a, w2c, offs=offs))

    def naive():
        ends = r.offsets.tolist()  # a host sync, as such loops have
        y = x.new_zeros(src.shape[0], Hd)
        parts = []
        for e in range(E):
            lo, hi = ends[e], ends[e + 1]
            if hi > lo:
                z = x.index_select(0, src[lo:hi]) @ w1c[e]
                parts.append((lo, hi, (torch.nn.functional.silu(z[:, :I]) * z[:, I:]) @ w2c[e]))
        y = torch.cat([p[2] for p in parts]) if parts else y
        y = torch.nn.functional.pad(y, (0, 0, 0, src.shape[0] - y.shape[0])) if parts else y
        return gather_sum(y)

    cands = {"moe_kernels": ours, "naive loop": naive}
    contexts = {}
    if pointer_variant and _tma_by_default(device):
        cands["moe_kernels (pointer loads)"] = ours
        contexts["moe_kernels (pointer loads)"] = pointer_loads
    if gmm is not None and device.type == "cuda":
        cands["torch grouped_mm"] = torch_grouped
    liger = liger_fused_moe()
    if liger is not None and device.type == "cuda":
        ids = r.topk_ids.contiguous()

        def liger_moe():  # its layout: gate_up [E, 2I, H], down [E, H, I] (w1c / w2c's storage)
            return liger.apply(x, w1c.transpose(1, 2), w2c.transpose(1, 2), ids, gw)
        cands["liger fused MoE"] = liger_moe
    return dict(x=x, w1=w1, w2=w2, r=r, grad=grad, reset=reset, cands=cands, contexts=contexts)


def saved_bytes(fn, exclude) -> int:
    """Bytes of the distinct storages autograd saves during ``fn()`` (``exclude``: parameters)."""
    from moe_kernels.testing import saved_storages

    out, seen = saved_storages(fn, exclude)
    del out
    return sum(seen.values())


def bench_moe(name, shape, timer, dense, *, skew=False, modes=("fwd", "fwd+bwd"), peers=True, T=None,
              pointer_variant=False):
    shape = dict(shape, T=shape["T"] if T is None else T)
    dev = timer.device
    r = routing_for(shape, dev, skew=skew)
    L = build_layer(shape, dev, r, pointer_variant=pointer_variant)
    ctx = L["contexts"]
    # correctness: every candidate's output against the reference backend on the same inputs
    cands = L["cands"] if peers else {"moe_kernels": L["cands"]["moe_kernels"]}
    with torch.no_grad():
        ref = mk.moe_mlp(L["x"], L["r"], L["w1"], L["w2"], "swiglu", backend="reference").float()
        errs = {}
        for cname, f in cands.items():
            try:
                with ctx.get(cname, contextlib.nullcontext)():
                    errs[cname] = ((f().float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()
            except Exception as exc:
                errs[cname] = f"{type(exc).__name__}: {str(exc)[:200]}"
        del ref
    err = errs["moe_kernels"]
    flops = moe_flops(shape)
    res = {"shape": shape, "skew": skew, "rows": int(r.sources.shape[0]), "max_over_mean_load":
           (r.counts.max().float() / r.counts.float().mean()).item(), "empty_experts": int((r.counts == 0).sum()),
           "rel_err_vs_reference": err, "rel_err_by_candidate": errs, "flops_fwd": flops, "D_flops_per_s": dense["flops_per_s"], "modes": {}}
    for mode in modes:
        def run(f, cname, mode=mode):
            def call():
                with ctx.get(cname, contextlib.nullcontext)():
                    o = f()
                    if mode == "fwd+bwd":
                        o.backward(L["grad"])
            return call
        failed = {}
        timed = {}
        for cname, f in cands.items():
            try:
                run(f, cname)()
                timed[cname] = (run(f, cname), L["reset"])
            except Exception as exc:  # a peer that does not run here is reported, not hidden
                failed[cname] = f"{type(exc).__name__}: {str(exc)[:200]}"
        tims = timer.time(timed)
        mf = flops * (3 if mode == "fwd+bwd" else 1)
        res["modes"][mode] = {c: {"timing": t, "flops_per_s": mf / t.median, "of_D": mf / t.median / dense["flops_per_s"]}
                              for c, t in tims.items()}
        res["modes"][mode].update({c: {"failed": why} for c, why in failed.items()})
    L["reset"]()
    res["saved_bytes"] = saved_bytes(L["cands"]["moe_kernels"], (L["w1"], L["w2"]))
    N, I = res["rows"], shape["I"]
    rb = L["r"]
    plan_bytes = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                      for t in (rb.topk_weights, rb.slots, rb.sources, rb.offsets)}.values())
    res["x_z_plan_bytes"] = L["x"].numel() * L["x"].element_size() + N * 2 * I * L["x"].element_size() + plan_bytes
    return res


def bench_decode(shape, Ts, timer, bw):
    out = {}
    for T in Ts:
        s = dict(shape, T=T)
        r = routing_for(s, timer.device)
        L = build_layer(s, timer.device, r)
        touched = int((r.counts > 0).sum())
        nbytes = touched * (s["H"] * 2 * s["I"] + s["I"] * s["H"]) * 2 + 2 * T * s["H"] * 2
        with torch.no_grad():
            t = timer.time({"moe_kernels": (L["cands"]["moe_kernels"], None)})["moe_kernels"]
        out[T] = {"timing": t, "touched_experts": touched, "bytes": nbytes, "of_BW": nbytes / t.median / bw}
    return out


# --------------------------------------------------------------------------- routing, permutes, reconcile

def bench_route(cfg, timer):
    T, E, k = cfg["T"], cfg["E"], cfg["k"]
    dev = timer.device
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(0)).to(dev)
    modes = {"dropless": {}, "capacity 1.25, score": dict(capacity_factor=1.25, drop_policy="score"),
             "capacity 1.0, position, pad_to 16": dict(capacity_factor=1.0, pad_to=16)}
    res = {}
    for name, opts in modes.items():
        def call(opts=opts):
            return mk.route(logits, k, **opts)
        with mk.value_checks(False):
            a, b = call(), call()
            same = all(torch.equal(getattr(a, f), getattr(b, f)) for f in
                       ("topk_ids", "topk_weights", "counts", "offsets", "slots", "sources", "num_dropped"))
            ref = mk.route(logits, k, backend="reference", **opts)
            plan_eq = all(torch.equal(getattr(a, f), getattr(ref, f)) for f in
                          ("topk_ids", "counts", "offsets", "slots", "sources", "num_dropped"))
            t = timer.time({name: (call, None)})[name]
            res[name] = {"timing": t, "deterministic": same, "plan_equals_reference": plan_eq,
                         "host_syncs": host_syncs(call, dev), "launches": kernel_launches(call, dev),
                         "num_dropped": int(a.num_dropped)}
    return res


def bench_permute(cfg, timer, bw):
    T, Hd, E, k = cfg["T"], cfg["H"], cfg["E"], cfg["k"]
    dev = timer.device
    r = mk.route(torch.randn(T, E, generator=torch.Generator().manual_seed(0)).to(dev), k)
    x = torch.randn(T, Hd, device=dev).to(torch.bfloat16)
    y = torch.randn(r.sources.shape[0], Hd, device=dev).to(torch.bfloat16)
    gy = torch.randn(T, Hd, device=dev).to(torch.bfloat16)
    N, es = r.sources.shape[0], 2
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    wg = r.topk_weights.clone().requires_grad_()
    rg = r._replace(topk_weights=wg)
    gd = torch.randn(N, Hd, device=dev).to(torch.bfloat16)

    def reset():
        xg.grad = yg.grad = wg.grad = None

    cands = {
        "dispatch fwd": ((lambda: mk.dispatch(x, r)), None, 2 * N * Hd * es),
        "combine fwd": ((lambda: mk.combine(y, r)), None, (N * Hd + T * Hd) * es),
        "dispatch fwd+bwd": ((lambda: mk.dispatch(xg, r).backward(gd)), reset, (2 * N * Hd + N * Hd + T * Hd) * es),
        "combine fwd+bwd": ((lambda: mk.combine(yg, rg).backward(gy)), reset, (N * Hd + T * Hd) * es * 2
                            + 2 * N * Hd * es),
        "torch index_select (peer of dispatch)": ((lambda: x.index_select(0, r.sources.long().clamp(min=0))), None,
                                                  2 * N * Hd * es),
    }
    ok = torch.equal(mk.dispatch(x, r), mk.dispatch(x, r, backend="reference")) and \
        torch.equal(mk.combine(y, r), mk.combine(y, r, backend="reference"))
    tims = timer.time({n: (f, rs) for n, (f, rs, _) in cands.items()})
    return {"exact_vs_reference": ok, "shape": cfg,
            "ops": {n: {"timing": tims[n], "bytes": b, "of_BW": b / tims[n].median / bw}
                    for n, (_, _, b) in cands.items()},
            "host_syncs": host_syncs(lambda: mk.combine(yg, rg).backward(gy), dev)}


def bench_reconcile(cfg, timer, dense):
    T, C, n, Ca = cfg["T"], cfg["C"], cfg["n_aux"], cfg["C_aux"]
    dev = timer.device
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(torch.bfloat16)

    main = rnd(T, C).requires_grad_()
    aux = [rnd(T, Ca) for _ in range(n)]
    ws = [rnd(Ca, C, scale=Ca ** -0.5).requires_grad_() for _ in range(n)]
    bs = [torch.zeros(C, dtype=torch.bfloat16, device=dev).requires_grad_() for _ in range(n)]
    grad = rnd(T, C)

    def reset():
        for t in [main] + ws + bs:
            t.grad = None

    def fwd():
        return mk.reconcile(main, aux, ws, bs, "gelu")

    out, ref = fwd(), mk.reconcile(main, aux, ws, bs, "gelu", backend="reference")
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    flops = 2.0 * T * n * Ca * C
    tims = timer.time({"fwd": (fwd, None), "fwd+bwd": ((lambda: fwd().backward(grad)), reset)})
    return {"shape": cfg, "rel_err_vs_reference": err, "D": dense, "flops_fwd": flops,
            "fwd": {"timing": tims["fwd"], "of_D": flops / tims["fwd"].median / dense["flops_per_s"]},
            # backward: dW only (the aux inputs are detached) = the forward's FLOPs again
            "fwd+bwd": {"timing": tims["fwd+bwd"],
                        "of_D": 2 * flops / tims["fwd+bwd"].median / dense["flops_per_s"]}}


def bench_layer_launches(shape, device):
    """The mk.nn.MoE step's launches (forward, backward) and host syncs on the GPU."""
    layer = mk.nn.MoE(shape["H"], shape["I"], shape["E"], shape["k"], activation="swiglu",
                      device=device, dtype=torch.bfloat16)
    x = torch.randn(shape["T"], shape["H"], device=device).to(torch.bfloat16).requires_grad_()

    def step():
        o = layer(x)
        (o.output.float().square().mean() + o.aux_loss).backward()

    step()
    with mk.value_checks(False):
        return {"host_syncs": host_syncs(step, device),
                "launches_fwd": kernel_launches(lambda: layer(x), device),
                "launches_step": kernel_launches(step, device)}


# --------------------------------------------------------------------------- report

def pct(x):
    return "-" if x is None or not isinstance(x, (int, float)) or not math.isfinite(x) else f"{100 * x:.0f}%"


def us(t):
    return "-" if t is None else f"{t.median * 1e6:.1f}"


def size(nbytes):
    return f"{nbytes / 2 ** 20:.1f} MiB" if nbytes >= 2 ** 20 else f"{nbytes / 2 ** 10:.1f} KiB"


def _verdict(ok):
    return "-" if ok is None else ("pass" if ok else "**miss**")


def summarize(R: dict, judge: bool = True) -> tuple[list, str]:
    rows, md = [], []
    verdict = _verdict if judge else (lambda ok: "not judged (CPU smoke)")

    def get(*path):
        cur = R
        for p in path:
            if not isinstance(cur, dict) or p not in cur:
                return None
            cur = cur[p]
        return cur

    def of_d(sname, mode):
        return get("moe", sname, "modes", mode, "moe_kernels", "of_D")

    for mode, key, thr in (("fwd", "moe_mlp fwd, S1-S3", 0.60), ("fwd+bwd", "moe_mlp fwd+bwd, S1-S3", 0.50)):
        vals = {s: of_d(s, mode) for s in ("S1", "S1-32k", "S2", "S3") if of_d(s, mode) is not None}
        worst = min(vals.values()) if vals else None
        rows.append([key, TARGETS[key], ", ".join(f"{s} {pct(v)}" for s, v in vals.items()) or "-",
                     verdict(None if worst is None else worst >= thr)])
    sk = []
    for s in ("S1", "S2"):
        a = get("moe", f"{s} skew", "modes", "fwd+bwd", "moe_kernels", "flops_per_s")
        b = get("moe", s, "modes", "fwd+bwd", "moe_kernels", "flops_per_s")
        if a and b:
            sk.append((s, a / b))
    rows.append(["S6 skew vs balanced", TARGETS["S6 skew vs balanced"], ", ".join(f"{s} {v:.2f}" for s, v in sk) or "-",
                 verdict(min(v for _, v in sk) >= 0.85 if sk else None)])
    for op in ("dispatch fwd", "combine fwd"):
        v = get("permute", "ops", op, "of_BW")
        rows.append([op, TARGETS[op], pct(v), verdict(None if v is None else v >= 0.80)])
    rt = get("route", "dropless")
    if rt:
        worst = max(get("route", m, "timing").median for m in R["route"] if get("route", m, "timing"))
        ok = worst <= 50e-6 and all(v["deterministic"] and v["host_syncs"]["count"] == 0 for v in R["route"].values())
        rows.append(["route + plan, T=16384 E=64 k=8", TARGETS["route + plan, T=16384 E=64 k=8"],
                     ", ".join(f"{m}: {us(v['timing'])} us" for m, v in R["route"].items()), verdict(ok)])
    else:
        rows.append(["route + plan, T=16384 E=64 k=8", TARGETS["route + plan, T=16384 E=64 k=8"], "-", "-"])
    st = get("moe", "small-T", "modes", "fwd+bwd", "moe_kernels", "timing")
    rows.append(["small-T fwd+bwd (S1 weights, T=128)", TARGETS["small-T fwd+bwd (S1 weights, T=128)"],
                 "-" if st is None else f"{st.median * 1e3:.3f} ms", verdict(None if st is None else st.median <= 1e-3)])
    sv = get("moe", "S1", "saved_bytes")
    lim = get("moe", "S1", "x_z_plan_bytes")
    rows.append(["saved activations of moe_mlp", TARGETS["saved activations of moe_mlp"],
                 "-" if sv is None else f"S1: {size(sv)} vs {size(lim)}",
                 verdict(None if sv is None else sv <= lim)])
    v = get("reconcile", "fwd", "of_D")
    rows.append(["reconcile fwd", TARGETS["reconcile fwd"], pct(v), verdict(None if v is None else v >= 0.65)])
    md.append("## Targets\n\n" + H.markdown_table(["target", "goal", "measured", ""], rows))

    base = []
    if get("bw"):
        base.append(f"- BW (device copy, read+write): {R['bw']['bytes_per_s'] / 1e12:.2f} TB/s")
    for s, d in (R.get("dense") or {}).items():
        base.append(f"- D at {s} {d['shape']}: {d['flops_per_s'] / 1e12:.0f} TFLOP/s ({us(d['timing'])} us)")
    md.append("## Baselines of this run\n\n" + "\n".join(base))

    mrows = []
    for s, v in (R.get("moe") or {}).items():
        if "modes" not in v:
            mrows.append([s, "-", "-", v.get("skipped") or v.get("error", "-"), "", "", ""])
            continue
        for mode, cs in v["modes"].items():
            for c, m in cs.items():
                if "failed" in m:
                    mrows.append([s, mode, c, "failed: " + m["failed"], "", "", ""])
                else:
                    e = v.get("rel_err_by_candidate", {}).get(c, v["rel_err_vs_reference"])
                    mrows.append([s, mode, c, f"{m['timing'].median * 1e3:.3f}", f"{m['flops_per_s'] / 1e12:.0f}",
                                  pct(m["of_D"]), f"{e:.1e}" if isinstance(e, float) else e])
    md.append("## moe_mlp (SwiGLU, bf16)\n\nms = median; TF = TFLOP/s counted as 6·T·k·H·I forward, 3x that "
              "forward+backward; % of D of the same shape.\n\n"
              + H.markdown_table(["shape", "mode", "implementation", "ms", "TF", "% of D", "err vs reference"], mrows))
    dec = get("decode")
    if dec:
        md.append("## Decode (S1 weights, forward)\n\n" + H.markdown_table(
            ["T", "us", "touched experts", "% of BW on touched bytes"],
            [[T, us(v["timing"]), v["touched_experts"], pct(v["of_BW"])] for T, v in dec.items()]))
    if get("route", "dropless"):
        md.append("## route + plan\n\n" + H.markdown_table(
            ["mode", "us", "deterministic", "plan = reference", "host syncs", "launches"],
            [[m, us(v["timing"]), v["deterministic"], v["plan_equals_reference"], v["host_syncs"]["count"],
              (v["launches"] or {}).get("count", "-")] for m, v in R["route"].items()]))
    if get("permute", "ops"):
        md.append("## dispatch and combine (bf16)\n\n" + H.markdown_table(
            ["op", "us", "GB/s", "% of BW"],
            [[n, us(v["timing"]), f"{v['bytes'] / v['timing'].median / 1e9:.0f}", pct(v["of_BW"])]
             for n, v in R["permute"]["ops"].items()]) + f"\n\nexact vs reference: {R['permute']['exact_vs_reference']}")
    if get("reconcile", "fwd"):
        rc = R["reconcile"]
        md.append("## reconcile (bf16, gelu, bias)\n\n" + H.markdown_table(
            ["mode", "ms", "% of D"], [[m, f"{rc[m]['timing'].median * 1e3:.3f}", pct(rc[m]["of_D"])]
                                        for m in ("fwd", "fwd+bwd")]) + f"\n\nerr vs reference: {rc['rel_err_vs_reference']:.1e}")
    if get("layer"):
        ly = R["layer"]
        md.append("## mk.nn.MoE step (S1 shape class)\n\n"
                  f"- host syncs: {ly['host_syncs']['count']}\n"
                  f"- kernel launches: forward {(ly['launches_fwd'] or {}).get('count', '-')}, "
                  f"forward+backward {(ly['launches_step'] or {}).get('count', '-')}")
    errs = [f"- {k}: {v}" for k, v in R.get("errors", {}).items()]
    if errs:
        md.append("## Sections that failed or were skipped\n\n" + "\n".join(errs))
    return rows, "\n\n".join(md)


def slug(device) -> str:
    if device.type != "cuda":
        return "cpu-smoke"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(H.RESULTS_DIR / "gpu"), help="results folder")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (the CPU run in CI)")
    ap.add_argument("--budget-s", type=float, default=300.0, help="start no section after this many seconds")
    ap.add_argument("--only", default="", help="comma-separated sections to run (default: all)")
    ap.add_argument("--backend", default="auto",
                    help="moe_kernels backend of every op (auto: the library's choice, triton on a GPU; the CPU "
                         "smoke run passes triton, interpreted)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default: 20, smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 3, smoke 1)")
    args = ap.parse_args(argv)
    if args.backend != "auto":
        os.environ[mk.backends.ENV_VAR] = args.backend
    device = H.pick_device("auto")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke for the CPU check (its numbers mean nothing)")
    if device.type != "cuda" and args.backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--backend triton on the CPU needs TRITON_INTERPRET=1 (benchmarks/gpu/run.sh --smoke sets it)")
    shapes, ex = (SMOKE, SMOKE_EXTRA) if args.smoke else (FULL, FULL_EXTRA)
    ex = dict(ex, reps=ex["reps"] if args.reps is None else args.reps,
              warmup=ex["warmup"] if args.warmup is None else args.warmup)
    timer = Timer(device, ex["flush_bytes"], ex["reps"], ex["warmup"])
    t_start = time.perf_counter()
    only = {s for s in args.only.split(",") if s}
    stem = Path(args.out) / f"gpu_{slug(device)}"
    meta = H.environment(device, extra={"smoke": args.smoke, "budget_s": args.budget_s,
                                        "backend": {op: H.resolved_backend(op, device, None)
                                                    for op in ("route", "moe_mlp", "dispatch", "combine", "reconcile")},
                                        "timing": ("CUDA events, L2 flushed (256 MiB write) before each call, "
                                                   if device.type == "cuda" else
                                                   "CPU smoke: perf_counter, interpreted kernels, numbers "
                                                   "meaningless and targets not judged; ")
                                        + f"{ex['warmup']} warm-up + {ex['reps']} round-robin reps"})
    liger = liger_fused_moe()
    meta["peers"] = {"torch grouped_mm": (_grouped_mm().__module__ + "." + _grouped_mm().__name__)
                     if _grouped_mm() is not None else "absent in this torch",
                     "liger-kernel": (H._version("liger-kernel") or "importable") if liger is not None else
                     "not importable (its wheel was not carried along)",
                     "LIGER_FUSED_MOE_AUTOTUNE": os.environ.get("LIGER_FUSED_MOE_AUTOTUNE")}
    R: dict = {"targets": TARGETS, "errors": {}}

    def section(name, fn):
        if only and name.split(":")[0] not in only:
            return None
        left = args.budget_s - (time.perf_counter() - t_start)
        if left <= 0:
            R["errors"][name] = f"skipped: the time budget ({args.budget_s:.0f} s) was spent"
            return None
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as exc:
            R["errors"][name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            traceback.print_exc()
            out = None
        print(f"[{time.perf_counter() - t_start:6.1f} s] {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        rows, md = summarize(R, judge=device.type == "cuda")
        R["summary"] = rows
        H.write_results(stem, meta, R, md, f"GPU measurements of the triton backend ({meta['machine'].get('gpu', 'CPU smoke')})")
        return out

    bw = section("bw", lambda: R.__setitem__("bw", measure_bw(timer, ex["bw_bytes"])))
    bw = R.get("bw", {}).get("bytes_per_s")
    R["dense"], R["moe"] = {}, {}
    for s, shp in shapes.items():
        def dense(s=s, shp=shp):
            R["dense"][s] = measure_dense(timer, shp["T"] * shp["k"], shp["H"], 2 * shp["I"])
        section(f"dense:{s}", dense)
    order = [("S1", {}), ("S2", {}), ("S3", {}), ("S1-32k", {}), ("S4", {}),
             ("S1 skew", dict(skew=True)), ("S2 skew", dict(skew=True))]
    for key, opts in order:
        base = key.split()[0]
        if base not in shapes or base not in R["dense"]:
            continue
        section(f"moe:{key}", lambda key=key, base=base, opts=opts: R["moe"].__setitem__(
            key, bench_moe(key, shapes[base], timer, R["dense"][base], pointer_variant=key in ("S1", "S2", "S3"),
                           **opts)))
    if "S1" in shapes and "S1" in R["dense"]:
        section("moe:small-T", lambda: R["moe"].__setitem__("small-T", bench_moe(
            "small-T", shapes["S1"], timer, R["dense"]["S1"], T=ex["small_T"])))
        if bw:
            section("decode", lambda: R.__setitem__("decode", bench_decode(shapes["S1"], ex["decode_T"], timer, bw)))
    section("route", lambda: R.__setitem__("route", bench_route(ex["route"], timer)))
    if bw:
        section("permute", lambda: R.__setitem__("permute", bench_permute(ex["permute"], timer, bw)))
    rc = ex["reconcile"]

    def reconcile():
        d = measure_dense(timer, rc["T"], rc["n_aux"] * rc["C_aux"], rc["C"])
        R["reconcile"] = bench_reconcile(rc, timer, d)
    section("reconcile", reconcile)
    if "S1" in shapes:
        section("layer", lambda: R.__setitem__("layer", bench_layer_launches(dict(shapes["S1"], T=min(shapes["S1"]["T"], 4096)),
                                                                          device)))
    print(f"wrote {stem}.json and {stem}.md ({time.perf_counter() - t_start:.0f} s)")
    return 1 if R["errors"] and not all(v.startswith("skipped") for v in R["errors"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
