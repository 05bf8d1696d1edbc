"""The device suite: every backend that serves the test device, against the reference, on that device.

The device is the CUDA GPU when torch sees one (``benchmarks/gpu/run.sh`` runs this file there, with
``TRITON_INTERPRET=0``), else the CPU, where the triton backend runs interpreted and the shapes are
small; ``MOE_KERNELS_TEST_DEVICE`` overrides the choice. The other test files run on CPU tensors
only; this one is written once for both, so CI keeps it working where no GPU is.

What it checks, per backend:

* every kernel of the contract on the conformance arguments (tests/kernel_cases.py);
* route (plans bit-exact, weights and logit gradients within fp32 rounding) over odd shapes:
  T = 1, prime E, k = 1, k = E, E = 512 with k = 16, capacity with both drop policies, pad_to;
* dispatch and combine bit-exact, their backward;
* moe_mlp and grouped_mlp forward and backward in fp32, bf16 and fp16, d and h not multiples of
  16, all tokens on one expert, empty experts, T = 1, Hugging Face's transposed weight layout;
* reconcile (with and without BatchNorm), the losses, task_route;
* an ``mk.nn.MoE`` training step: the same bits from two runs, no host synchronisation
  (``torch.cuda.set_sync_debug_mode("error")`` on a GPU, ``HostSyncCounter`` on the CPU),
  ``torch.compile(fullgraph=True)``, and on a GPU CUDA-graph capture of forward + backward whose
  replay gives the eager step's bits;
* on a GPU only (the memory is not there on the CPU): int64 addressing, with dispatch, combine,
  grouped_gemm and moe_mlp over tensors of more than 2^31 elements.

Tolerances: plans and data movement are exact. fp32 GEMMs use ``input_precision="ieee"``: the
products are exact and only the summation order differs from the reference, so rel 1e-4 of the
largest magnitude. fp16/bf16: both the backend and the reference are compared with an fp64 ground
truth, and the backend's error may be at most twice the reference's own rounding error in that
dtype (plus one ulp of the dtype at the largest magnitude, for the cases where the reference is
exact by luck).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import moe_kernels as mk
from moe_kernels.backends import BACKENDS, NAMES, contract
from moe_kernels.ops._runner import run
from moe_kernels.testing import saved_storages

from .helpers import assert_exact, tensors
from .kernel_cases import kernel_args

DEVICE = torch.device(os.environ.get("MOE_KERNELS_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
GPU = DEVICE.type == "cuda"
#: the backends under test: every available one that serves the device, the reference excepted
UNDER_TEST = [n for n in NAMES if n != "reference" and DEVICE.type in BACKENDS[n].devices and BACKENDS[n].available]
ULP = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}

pytestmark = pytest.mark.skipif(not UNDER_TEST, reason=f"no backend but the reference serves {DEVICE}")


@pytest.fixture(params=UNDER_TEST)
def backend(request):
    return request.param


def _has(backend, *ops):
    missing = [op for op in ops if op not in BACKENDS[backend].kernels]
    if missing:
        pytest.skip(f"backend '{backend}' has no kernel {missing}")


def _to(obj):
    if isinstance(obj, torch.Tensor):
        return obj.to(DEVICE)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o) for o in obj)
    return obj


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    scale = b.abs().max().clamp(min=1e-30)
    return ((a - b).abs().max() / scale).item() if b.numel() else 0.0


def _close_fp32(a, b, what, tol=1e-4, atol=0.0):
    """max |a - b| <= tol * max |b| + atol."""
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = (a.double() - b.double()).abs().max().item() if b.numel() else 0.0
    bound = tol * (b.double().abs().max().item() if b.numel() else 0.0) + atol
    assert err <= bound, f"{what}: max abs err {err:.2e} > {bound:.2e} (rel {tol}, abs {atol})"


def _close_vs_truth(got, ref, truth, dtype, what):
    """Low precision: the backend's error against the fp64 truth at most 2x the reference's + 1 ulp."""
    if dtype in (torch.float32, torch.float64):
        return _close_fp32(got, truth.to(got.dtype), what)
    e_got, e_ref = _rel(got, truth), _rel(ref, truth)
    assert e_got <= 2 * e_ref + ULP[dtype], f"{what}: error {e_got:.2e} vs the reference's {e_ref:.2e} ({dtype})"


def _logits(T, E, seed=0, dtype=torch.float32):
    """Continuous random logits: no ties, within a row or across tokens, except by a probability-zero
    accident. (Rows that are permutations of one another would make every token's scores equal up to
    the rounding of its softmax sum, and the score policy's kept set would then depend on how each
    implementation rounds: exact ties are tested in test_triton_backend.py, where they are exact in
    every implementation.)"""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, E, generator=g) * 2).to(dtype).to(DEVICE)


PLAN = ("topk_ids", "counts", "offsets", "slots", "sources", "num_dropped")


def _same_plan(a, b):
    for f in PLAN:
        assert_exact(getattr(a, f), getattr(b, f), f)


# --------------------------------------------------------------------------- every kernel

@pytest.mark.parametrize("name", sorted(contract.KERNELS))
def test_every_kernel_matches_reference_on_device(name, backend):
    """The conformance arguments on the device: integer outputs exact, float outputs within fp32 rounding
    (rel 1e-4, plus abs 1e-6: some gradients there are exactly zero in exact arithmetic, e.g. the MI
    loss at a uniform buffer, and one implementation's rounding leaves ~1e-9 where another gives 0;
    the inputs are O(1))."""
    _has(backend, name)
    args = _to(kernel_args(name))
    mine = run(backend, name, *copy.deepcopy(args))
    ref = run("reference", name, *copy.deepcopy(args))
    for i, (a, b) in enumerate(zip(tensors(mine), tensors(ref))):
        assert a.device.type == DEVICE.type, f"{name}: output {i} on {a.device}"
        if a.is_floating_point():
            _close_fp32(a, b, f"{name} output {i}", atol=1e-6)
        else:
            assert_exact(a, b, f"{name} output {i}")


# --------------------------------------------------------------------------- routing

ROUTE_SHAPES = ([(1, 7, 1), (1000, 61, 8), (4097, 64, 8), (257, 512, 16), (300, 5, 5)] if GPU
                else [(1, 7, 1), (37, 13, 3), (20, 5, 5)])
ROUTE_MODES = [dict(), dict(capacity_factor=1.0), dict(capacity_factor=1.0, drop_policy="score"),
               dict(capacity=3, pad_to=8, drop_policy="score")]


@pytest.mark.parametrize("mode", ROUTE_MODES, ids=str)
@pytest.mark.parametrize("shape", ROUTE_SHAPES, ids=str)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_route_matches_reference(shape, mode, score, backend):
    _has(backend, "route", "route_backward")
    T, E, k = shape
    logits = _logits(T, E, seed=T + E).requires_grad_()
    r = mk.route(logits, k, score=score, backend=backend, **mode)
    ref = mk.route(logits, k, score=score, backend="reference", **mode)
    _same_plan(r, ref)
    _close_fp32(r.topk_weights, ref.topk_weights, "topk_weights", tol=1e-6)
    g = torch.randn(T, k, device=DEVICE)
    ga, = torch.autograd.grad(r.topk_weights, logits, g)
    gb, = torch.autograd.grad(ref.topk_weights, logits, g)
    _close_fp32(ga, gb, "logit gradient", tol=1e-5)


def test_task_route_matches_reference(backend):
    _has(backend, "task_route", "task_route_backward")
    T, d, E, M, k = (600, 72, 13, 3, 3) if GPU else (30, 12, 7, 3, 2)
    x = torch.randn(T, d, device=DEVICE, requires_grad=True)
    W = torch.randn(M, d, E, device=DEVICE, requires_grad=True)
    tids = (torch.arange(T, device=DEVICE) * 7) % M
    r = mk.task_route(x, W, tids, k, capacity_factor=1.0, drop_policy="score", backend=backend)
    ref = mk.task_route(x, W, tids, k, capacity_factor=1.0, drop_policy="score", backend="reference")
    _same_plan(r, ref)
    g = torch.randn(T, k, device=DEVICE)
    a = torch.autograd.grad(r.topk_weights, (x, W), g)
    b = torch.autograd.grad(ref.topk_weights, (x, W), g)
    for u, v, n in zip(a, b, ("grad x", "grad W")):
        _close_fp32(u, v, n)


# --------------------------------------------------------------------------- permutes

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatch_combine_exact(dtype, backend):
    _has(backend, "dispatch", "combine", "dispatch_backward", "combine_backward")
    T, E, k, d = (3001, 61, 6, 200) if GPU else (40, 7, 3, 20)
    r = mk.route(_logits(T, E), k, capacity_factor=1.0, pad_to=4, backend="reference")
    x = torch.randn(T, d, device=DEVICE).to(dtype)
    y = torch.randn(r.sources.shape[0], d, device=DEVICE).to(dtype)
    assert_exact(mk.dispatch(x, r, backend=backend), mk.dispatch(x, r, backend="reference"), "dispatch")
    assert_exact(mk.combine(y, r, backend=backend), mk.combine(y, r, backend="reference"), "combine")
    yy = [y.clone().requires_grad_() for _ in range(2)]
    ww = [r.topk_weights.clone().requires_grad_() for _ in range(2)]
    g = torch.randn(T, d, device=DEVICE).to(dtype)
    for b, yv, wv in zip((backend, "reference"), yy, ww):
        mk.combine(yv, r._replace(topk_weights=wv), backend=b).backward(g)
    assert_exact(yy[0].grad, yy[1].grad, "combine grad y")
    _close_fp32(ww[0].grad, ww[1].grad, "combine grad weights", tol=1e-5 if dtype == torch.float32 else 1e-2)
    xx = [x.clone().requires_grad_() for _ in range(2)]
    gd = torch.randn(r.sources.shape[0], d, device=DEVICE).to(dtype)
    for b, xv in zip((backend, "reference"), xx):
        mk.dispatch(xv, r, backend=b).backward(gd)
    assert_exact(xx[0].grad, xx[1].grad, "dispatch grad x")


# --------------------------------------------------------------------------- expert MLPs

MLP_CASES = ["balanced", "one expert", "empty experts", "T=1"]
MLP_DTYPES = [(torch.float32, "swiglu"), (torch.float32, "gelu"), (torch.bfloat16, "swiglu"),
              (torch.bfloat16, "gelu"), (torch.float16, "swiglu")]
if GPU:
    MLP_DTYPES += [(torch.bfloat16, "relu"), (torch.bfloat16, "silu")]


def _mlp_routing(case, T, E, k):
    if case == "T=1":
        T = 1
    if case == "one expert":  # every token's first choice is expert 0, the others spread
        ids = torch.stack([(torch.arange(T) * 0 if j == 0 else (torch.arange(T) + j) % (E - 1) + 1)
                           for j in range(k)], 1).to(torch.int32)
    elif case == "empty experts":  # only the even experts are used
        ids = torch.stack([((torch.arange(T) + j) % ((E + 1) // 2)) * 2 for j in range(k)], 1).to(torch.int32)
    else:
        return mk.route(_logits(T, E, seed=3), k, backend="reference")
    w = torch.softmax(torch.randn(T, k, generator=torch.Generator().manual_seed(4)), -1)
    return mk.plan(ids.to(DEVICE), w.to(DEVICE), E, backend="reference")


def _mlp_params(E, d, h, dout, activation, dtype, hf_layout, seed=5):
    g = torch.Generator().manual_seed(seed)
    h1 = 2 * h if activation == "swiglu" else h
    w1 = torch.randn(E, d, h1, generator=g, dtype=torch.float64) / d ** 0.5
    w2 = torch.randn(E, h, dout, generator=g, dtype=torch.float64) / h ** 0.5
    b1 = torch.randn(E, h1, generator=g, dtype=torch.float64) * 0.1
    b2 = torch.randn(E, dout, generator=g, dtype=torch.float64) * 0.1
    ps = [w1, w2, b1, b2]
    if hf_layout:  # [E, out, in] storage, used through its transposed view
        ps[0], ps[1] = (p.transpose(1, 2).contiguous().transpose(1, 2) for p in ps[:2])
    return [p.to(DEVICE) for p in ps]


def _mlp_run(fn, x, weights, params, dtype, grad):
    xs = x.detach().to(dtype).requires_grad_()
    ws = weights.detach().clone().requires_grad_()
    ps = [p.detach().to(dtype).requires_grad_() for p in params]
    out = fn(xs, ws, ps)
    out.backward(grad.to(dtype))
    return [out] + [t.grad for t in [xs, ws] + ps]


@pytest.mark.parametrize("case", MLP_CASES)
@pytest.mark.parametrize("dtype,activation", MLP_DTYPES, ids=lambda v: str(v).replace("torch.", ""))
def test_moe_mlp_matches_reference(case, dtype, activation, backend):
    _has(backend, "moe_mlp", "moe_mlp_backward")
    T, E, k, d, h = (700, 13, 3, 100, 72) if GPU else (14, 5, 2, 12, 10)
    r = _mlp_routing(case, T, E, k)
    T = r.slots.shape[0]
    g = torch.Generator().manual_seed(6)
    x = torch.randn(T, d, generator=g, dtype=torch.float64).to(DEVICE)
    grad = torch.randn(T, d, generator=g, dtype=torch.float64).to(DEVICE)
    params = _mlp_params(E, d, h, d, activation, dtype, hf_layout=case == "balanced")

    def fn(b):
        return lambda xs, ws, ps: mk.moe_mlp(xs, r._replace(topk_weights=ws), ps[0], ps[1], activation, ps[2], ps[3],
                                             backend=b)

    w64 = r.topk_weights.double()
    truth = _mlp_run(fn("reference"), x, w64, params, torch.float64, grad)
    wdt = torch.float32
    mine = _mlp_run(fn(backend), x, w64.to(wdt), params, dtype, grad)
    ref = _mlp_run(fn("reference"), x, w64.to(wdt), params, dtype, grad)
    for name, a, b, t in zip(("out", "grad x", "grad weights", "grad w1", "grad w2", "grad b1", "grad b2"),
                             mine, ref, truth):
        _close_vs_truth(a, b, t, dtype, f"{case} {name}")


@pytest.mark.parametrize("layout", ["contiguous", "hf"])
def test_moe_mlp_weight_load_paths_agree(layout, backend, monkeypatch):
    """triton reads weight tiles through tensor descriptors (TMA on Hopper) where the layout allows
    and through pointers otherwise: with every dim 16-byte aligned, both paths, forced, must match
    the reference (bf16 SwiGLU, forward and every gradient)."""
    if backend != "triton":
        pytest.skip("the load paths are the triton backend's")
    from moe_kernels.backends.triton import grouped as tg

    T, E, k, d, h = (600, 12, 2, 256, 128) if GPU else (12, 5, 2, 32, 16)
    r = _mlp_routing("empty experts", T, E, k)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(T, d, generator=g, dtype=torch.float64).to(DEVICE)
    grad = torch.randn(T, d, generator=g, dtype=torch.float64).to(DEVICE)
    params = _mlp_params(E, d, h, d, "swiglu", torch.bfloat16, hf_layout=layout == "hf")

    def fn(b):
        return lambda xs, ws, ps: mk.moe_mlp(xs, r._replace(topk_weights=ws), ps[0], ps[1], "swiglu", ps[2], ps[3],
                                             backend=b)

    w64 = r.topk_weights.double()
    truth = _mlp_run(fn("reference"), x, w64, params, torch.float64, grad)
    ref = _mlp_run(fn("reference"), x, w64.float(), params, torch.bfloat16, grad)
    for tma in (True, False):
        monkeypatch.setattr(tg, "TMA", tma)
        for w in params[:2]:  # the forced path is the one taken
            assert (tg._weight_desc(w.to(torch.bfloat16), False, 64, 64)[0] is not None) == tma
        mine = _mlp_run(fn(backend), x, w64.float(), params, torch.bfloat16, grad)
        for name, a, b, t in zip(("out", "grad x", "grad weights", "grad w1", "grad w2", "grad b1", "grad b2"),
                                 mine, ref, truth):
            _close_vs_truth(a, b, t, torch.bfloat16, f"TMA={tma} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mlp_matches_reference(dtype, backend):
    _has(backend, "grouped_mlp", "grouped_mlp_backward")
    T, E, k, d, h, dout = (500, 11, 2, 72, 40, 56) if GPU else (12, 5, 2, 10, 6, 7)
    r = _mlp_routing("empty experts", T, E, k)
    N = r.sources.shape[0]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, d, generator=g, dtype=torch.float64).to(DEVICE)
    grad = torch.randn(N, dout, generator=g, dtype=torch.float64).to(DEVICE)
    params = _mlp_params(E, d, h, dout, "swiglu", dtype, hf_layout=True)
    ones = torch.ones(1, device=DEVICE)

    def fn(b):
        return lambda xs, ws, ps: mk.grouped_mlp(xs, r.offsets, ps[0], ps[1], "swiglu", ps[2], ps[3], backend=b)

    truth = _mlp_run(fn("reference"), x, ones, params, torch.float64, grad)
    mine = _mlp_run(fn(backend), x, ones, params, dtype, grad)
    ref = _mlp_run(fn("reference"), x, ones, params, dtype, grad)
    for name, a, b, t in zip(("out", "grad x", "-", "grad w1", "grad w2", "grad b1", "grad b2"), mine, ref, truth):
        if a is not None:
            _close_vs_truth(a, b, t, dtype, name)



@pytest.mark.skipif(not GPU, reason="TF32 exists on the tensor cores only (the interpreter multiplies exactly)")
def test_tf32_is_taken_when_asked_and_within_its_error(backend, monkeypatch):
    """FP32_PRECISION="tf32": fp32 GEMMs round their inputs to 10-bit mantissas. Each product then
    errs by at most 2 * 2^-10 of |a b| (truncating conversion; 2^-11 rounding) and the fp32 sum adds
    K * 2^-24, so |got - exact| <= 2^-8 * sum_k |a_k b_k| bounds it with room; and the result must
    differ from the exact ("ieee") product's bits, or TF32 was not used."""
    if backend != "triton":
        pytest.skip("FP32_PRECISION is the triton backend's switch")
    from moe_kernels.backends.triton import _common

    E, K, NC = 3, 256, 96
    sizes = [70, 0, 130]
    g = torch.Generator().manual_seed(11)
    x = torch.randn(sum(sizes), K, generator=g).to(DEVICE)
    w = torch.randn(E, K, NC, generator=g).to(DEVICE)
    offsets = torch.tensor([0, 70, 70, 200], dtype=torch.int32, device=DEVICE)
    exact = torch.cat([x[:70].double() @ w[0].double(), x[70:].double() @ w[2].double()])
    scale = torch.cat([x[:70].double().abs() @ w[0].double().abs(), x[70:].double().abs() @ w[2].double().abs()])
    outs = {}
    for prec in ("ieee", "tf32"):
        monkeypatch.setattr(_common, "FP32_PRECISION", prec)
        outs[prec] = mk.grouped_gemm(x, offsets, w, backend=backend)
    assert ((outs["tf32"].double() - exact).abs() <= 2.0 ** -8 * scale).all()
    assert ((outs["ieee"].double() - exact).abs() <= K * 2.0 ** -24 * scale).all()  # fp32 sums only
    assert not torch.equal(outs["tf32"], outs["ieee"]), "FP32_PRECISION='tf32' gave the exact product's bits"


# --------------------------------------------------------------------------- reconcile and losses

@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reconcile_matches_reference(bn, dtype, backend):
    _has(backend, "reconcile", "reconcile_backward")
    T, C, Cs = (1001, 96, (40, 72, 24)) if GPU else (21, 12, (5, 9))

    def make(b, dt):
        gen = torch.Generator().manual_seed(8)
        main = torch.randn(T, C, generator=gen, dtype=torch.float64).to(dt).to(DEVICE).requires_grad_()
        aux = [torch.randn(T, c, generator=gen, dtype=torch.float64).to(dt).to(DEVICE) for c in Cs]
        ws = [(torch.randn(c, C, generator=gen, dtype=torch.float64) / c ** 0.5).to(dt).to(DEVICE).requires_grad_()
              for c in Cs]
        bs = [torch.randn(C, generator=gen, dtype=torch.float64).to(dt).to(DEVICE).requires_grad_() for _ in Cs]
        kw = {}
        if bn:
            kw = dict(batch_norm=True, bn_weight=[torch.ones(C, dtype=dt, device=DEVICE).requires_grad_() for _ in Cs],
                      bn_bias=[torch.zeros(C, dtype=dt, device=DEVICE).requires_grad_() for _ in Cs])
        out = mk.reconcile(main, aux, ws, bs, "gelu", backend=b, **kw)
        out.backward(torch.randn(T, C, generator=gen, dtype=torch.float64).to(dt).to(DEVICE))
        leaves = [main] + ws + bs + (kw["bn_weight"] + kw["bn_bias"] if bn else [])
        return [out] + [t.grad for t in leaves]

    truth = make("reference", torch.float64)
    mine, ref = make(backend, dtype), make("reference", dtype)
    for i, (a, b, t) in enumerate(zip(mine, ref, truth)):
        _close_vs_truth(a, b, t, dtype, f"reconcile tensor {i}")


def test_losses_match_reference(backend):
    _has(backend, "load_balancing_loss", "z_loss", "mutual_information_loss")
    T, E, k, M = (2000, 61, 6, 3) if GPU else (30, 7, 2, 3)
    logits = _logits(T, E, seed=11).requires_grad_()
    r = mk.route(logits, k, backend="reference")
    tids = torch.arange(T, device=DEVICE) % M
    probs = torch.softmax(logits, -1)
    for f in (lambda b: mk.load_balancing_loss(logits, r, backend=b), lambda b: mk.z_loss(logits, backend=b),
              lambda b: mk.mutual_information_loss(probs, tids, M, backend=b)):
        a, b = f(backend), f("reference")
        _close_fp32(a, b, "loss", tol=1e-5)
        ga, = torch.autograd.grad(a, logits, retain_graph=True)
        gb, = torch.autograd.grad(b, logits, retain_graph=True)
        _close_fp32(ga, gb, "loss gradient", tol=1e-5)


# --------------------------------------------------------------------------- the layer: determinism, syncs,
# compile, CUDA graphs

def _layer(backend, **opts):
    torch.manual_seed(0)
    d, h, E, k = (256, 96, 13, 3) if GPU else (12, 10, 5, 2)
    return mk.nn.MoE(d, h, E, k, activation="swiglu", backend=backend, device=DEVICE, **opts), d


def _step(layer, x):
    out = layer(x)
    (out.output.square().mean() + out.aux_loss).backward()
    return out.output


def _grads(layer, x):
    return [x.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("opts", [dict(), dict(capacity_factor=1.0, drop_policy="score", pad_to=8)], ids=str)
def test_layer_step_bitwise_identical_twice(opts, backend):
    layer, d = _layer(backend, **opts)
    T = 2000 if GPU else 24
    x = torch.randn(T, d, device=DEVICE, requires_grad=True)
    runs = []
    for _ in range(2):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        runs.append([_step(layer, x)] + _grads(layer, x))
    for i, (a, b) in enumerate(zip(*runs)):
        assert_exact(a, b, f"tensor {i}")


def test_layer_step_makes_no_host_sync(backend):
    layer, d = _layer(backend, capacity_factor=1.0, pad_to=4)
    x = torch.randn(300 if GPU else 20, d, device=DEVICE, requires_grad=True)
    _step(layer, x)  # warm-up: compiles and loads outside the check
    with mk.value_checks(False):
        if GPU:
            old = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                _step(layer, x)
            finally:
                torch.cuda.set_sync_debug_mode(old)
        else:
            from moe_kernels.testing import HostSyncCounter

            with HostSyncCounter() as syncs:
                _step(layer, x)
            assert syncs.count == 0, syncs.report()


def test_layer_compiles_fullgraph(backend):
    """The layer's forward traces as one graph (a host sync would be a graph break); its backward
    runs through the compiled graph; both give the eager step's values."""
    layer, d = _layer(backend, capacity_factor=1.0)
    twin = copy.deepcopy(layer)
    x = torch.randn(200 if GPU else 16, d, device=DEVICE)
    with mk.value_checks(False):
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        eager = [_step(layer, x1)] + _grads(layer, x1)
        torch._dynamo.reset()
        compiled = torch.compile(twin, fullgraph=True, backend="inductor" if GPU else "aot_eager")
        got = [_step(compiled, x2)] + _grads(twin, x2)
    for i, (a, b) in enumerate(zip(got, eager)):
        _close_fp32(a, b, f"compiled tensor {i}", tol=1e-5)


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("opts", [dict(), dict(capacity_factor=1.0, drop_policy="score")], ids=str)
def test_layer_step_cuda_graph_replays_the_eager_bits(opts, backend):
    """Capture forward + backward of an mk.nn.MoE step in one CUDA graph (the sync-free policy: the
    plan is built on the device, nothing is read back), replay it on new input, and get exactly the
    bits of the eager step on that input."""
    layer, d = _layer(backend, **opts)
    T = 512
    static_x = torch.randn(T, d, device=DEVICE, requires_grad=True)
    with mk.value_checks(False):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks
            for _ in range(3):
                layer.zero_grad(set_to_none=True)
                static_x.grad = None
                _step(layer, static_x)
        torch.cuda.current_stream().wait_stream(side)
        layer.zero_grad(set_to_none=True)
        static_x.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = _step(layer, static_x)
        new_x = torch.randn(T, d, device=DEVICE)
        with torch.no_grad():
            static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        replayed = [static_out.clone()] + [t.clone() for t in _grads(layer, static_x)]
        layer.zero_grad(set_to_none=True)
        x = new_x.clone().requires_grad_()
        eager = [_step(layer, x)] + _grads(layer, x)
    for i, (a, b) in enumerate(zip(replayed, eager)):
        assert_exact(a, b, f"tensor {i}")


# --------------------------------------------------------------------------- int64 addressing

@pytest.mark.skipif(not GPU, reason="tensors of more than 2^31 elements: needs a GPU's memory")
def test_int64_addressing_past_2_pow_31(backend):
    """Row offsets times the row length pass 2^31 elements in dispatch, combine, grouped_gemm and
    moe_mlp (the gathered x rows, z, the expert outputs and the combine reads)."""
    _has(backend, "dispatch", "combine", "grouped_gemm", "moe_mlp")
    d, E, k = 4096, 4, 2
    T = (1 << 31) // (d * k) + 77  # N = T*k rows of d: past 2^31 elements
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    logits = torch.randn(T, E, device=DEVICE, generator=gen)
    r = mk.route(logits, k, backend=backend)
    x = torch.randn(T, d, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    xs = mk.dispatch(x, r, backend=backend)
    assert xs.numel() > 2 ** 31
    assert_exact(xs, x.index_select(0, r.sources.long().clamp(min=0)), "dispatch past 2^31")
    yc = mk.combine(xs, r, backend=backend)
    assert_exact(yc, mk.combine(xs, r, backend="reference"), "combine past 2^31")
    del yc
    w = (torch.randn(E, d, 16, device=DEVICE, generator=gen) / 64).to(torch.bfloat16)
    out = mk.grouped_gemm(xs, r.offsets, w, backend=backend)
    tail = torch.arange(xs.shape[0] - 3000, xs.shape[0], device=DEVICE)
    e_of = torch.searchsorted(r.offsets[1:].long(), tail, right=True)
    want = torch.einsum("nd,ndo->no", xs[tail].float(), w[e_of].float())
    _close_fp32(out[tail].float(), want, "grouped_gemm rows past 2^31", tol=1e-2)
    del out, xs
    w1 = (torch.randn(E, d, 32, device=DEVICE, generator=gen) / 64).to(torch.bfloat16)
    w2 = (torch.randn(E, 16, d, device=DEVICE, generator=gen) / 4).to(torch.bfloat16)
    y = mk.moe_mlp(x, r, w1, w2, "swiglu", backend=backend)
    toks = torch.arange(T - 500, T, device=DEVICE)
    sub = mk.plan(r.topk_ids[toks], r.topk_weights[toks], E, backend="reference")
    want = mk.moe_mlp(x[toks], sub, w1, w2, "swiglu", backend="reference")
    _close_fp32(y[toks].float(), want.float(), "moe_mlp tokens past 2^31", tol=2e-2)


# --------------------------------------------------------------------------- what moe_mlp keeps for backward

def test_moe_mlp_saves_only_x_z_and_the_plan(backend):
    """The tensors autograd keeps for moe_mlp's backward, parameters aside, are x, z and the plan
    (gate weights, slots, sources, offsets): nothing of size [T*k, d] (no dispatched copy of x, no
    expert outputs)."""
    _has(backend, "moe_mlp")
    T, E, k, d, h = (1000, 13, 4, 256, 96) if GPU else (20, 5, 2, 24, 8)
    r = mk.route(_logits(T, E), k, backend="reference")
    x = torch.randn(T, d, device=DEVICE, requires_grad=True)
    w = r.topk_weights.clone().requires_grad_()
    w1 = torch.randn(E, d, 2 * h, device=DEVICE, requires_grad=True)
    w2 = torch.randn(E, h, d, device=DEVICE, requires_grad=True)
    out, saved = saved_storages(lambda: mk.moe_mlp(x, r._replace(topk_weights=w), w1, w2, "swiglu", backend=backend),
                                exclude=(w1, w2))
    N = r.sources.shape[0]
    z_bytes = N * 2 * h * x.element_size()
    # the plan's storages as the op received them (route may allocate a tensor with spare room)
    plan = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in (w, r.slots, r.sources, r.offsets)}.values())
    assert sum(saved.values()) == x.numel() * x.element_size() + z_bytes + plan, saved
    assert max(saved.values()) < N * d * x.element_size() or z_bytes >= N * d * x.element_size()
    out.sum().backward()  # and the backward runs from what was kept
    assert x.grad is not None and w.grad is not None and w1.grad is not None
