"""mk.grouped_gemm / mk.grouped_mlp / mk.moe_mlp against plain torch compositions."""

import pytest
import torch
import torch.nn.functional as F

import moe_kernels as mk

from moe_kernels.ops._runner import run as kernel

from .helpers import TOL

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
ACTS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def _offsets(sizes, tail=0):
    o = torch.zeros(len(sizes) + 1, dtype=torch.int32)
    o[1:] = torch.tensor(sizes).cumsum(0)
    return o, int(o[-1]) + tail


SEGMENTS = [
    ([3, 0, 5, 1, 0, 7, 2], 0),  # empty experts, prime E
    ([0, 0, 13], 4),  # all rows to one expert, tail rows past offsets[E]
    ([1], 0),  # one row, one expert
    ([0, 0, 0], 2),  # no rows at all, only a tail
]


def _loop_gemm(x, o, w):
    out = torch.zeros(x.shape[0], w.shape[2], dtype=x.dtype)
    for e in range(w.shape[0]):
        lo, hi = int(o[e]), int(o[e + 1])
        out[lo:hi] = x[lo:hi] @ w[e]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seg", SEGMENTS, ids=str)
def test_grouped_gemm(seg, dtype, backend):
    sizes, tail = seg
    o, N = _offsets(sizes, tail)
    torch.manual_seed(0)
    x = torch.randn(N, 11).to(dtype)
    w = torch.randn(len(sizes), 11, 6).to(dtype)
    out = mk.grouped_gemm(x, o, w, backend=backend)
    torch.testing.assert_close(out, _loop_gemm(x, o, w), **TOL[dtype])
    assert (out[int(o[-1]):] == 0).all()


@pytest.mark.parametrize("seg", SEGMENTS, ids=str)
def test_grouped_gemm_gradcheck(seg, backend):
    sizes, tail = seg
    o, N = _offsets(sizes, tail)
    x = torch.randn(N, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(len(sizes), 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: mk.grouped_gemm(x, o, w, backend=backend), (x, w))


def _loop_mlp(x, o, w1, w2, act, b1, b2):
    out = torch.zeros(x.shape[0], w2.shape[2], dtype=x.dtype)
    for e in range(w1.shape[0]):
        lo, hi = int(o[e]), int(o[e + 1])
        z = x[lo:hi] @ w1[e] + (b1[e] if b1 is not None else 0)
        if act == "swiglu":
            a, b = z.chunk(2, -1)
            h = F.silu(a) * b
        else:
            h = ACTS[act](z)
        out[lo:hi] = h @ w2[e] + (b2[e] if b2 is not None else 0)
    return out


def _mlp_weights(E, d, h, act, bias, dtype, grad=False):
    h1 = 2 * h if act == "swiglu" else h
    kw = dict(dtype=dtype, requires_grad=grad)
    w1 = (torch.randn(E, d, h1) / d ** 0.5).to(dtype).requires_grad_(grad)
    w2 = (torch.randn(E, h, d) / h ** 0.5).to(dtype).requires_grad_(grad)
    b1 = torch.randn(E, h1, **kw) if bias else None
    b2 = torch.randn(E, d, **kw) if bias else None
    return w1, w2, b1, b2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["gelu", "relu", "silu", "swiglu"])
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_mlp_forward_backward(act, bias, dtype, backend):
    torch.manual_seed(1)
    sizes, tail = SEGMENTS[0]
    o, N = _offsets(sizes, 3)
    E, d, h = len(sizes), 10, 12
    x = torch.randn(N, d).to(dtype).requires_grad_()
    params = _mlp_weights(E, d, h, act, bias, dtype, grad=True)
    out = mk.grouped_mlp(x, o, params[0], params[1], act, params[2], params[3], backend=backend)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x] + [p for p in params if p is not None], g)

    x2 = x.detach().double().requires_grad_()
    p2 = [p.detach().double().requires_grad_() if p is not None else None for p in params]
    want = _loop_mlp(x2, o, p2[0], p2[1], act, p2[2], p2[3])
    grads2 = torch.autograd.grad(want, [x2] + [p for p in p2 if p is not None], g.double())
    torch.testing.assert_close(out.double(), want, **TOL[dtype])
    for a, b in zip(grads, grads2):
        # gradients sum over up to N rows: allow a little more in low precision
        tol = TOL[dtype] if dtype in (torch.float32, torch.float64) else {k: 3 * v for k, v in TOL[dtype].items()}
        torch.testing.assert_close(a.double(), b, **tol)


@pytest.mark.parametrize("act", ["gelu", "relu", "silu", "swiglu"])
def test_grouped_mlp_gradcheck(act, backend):
    torch.manual_seed(2)
    o, N = _offsets([2, 0, 3], 1)
    x = torch.randn(N, 3, dtype=torch.float64, requires_grad=True)
    w1, w2, b1, b2 = _mlp_weights(3, 3, 4, act, True, torch.float64, grad=True)
    if act == "relu":  # keep pre-activations away from the kink at 0
        with torch.no_grad():
            b1.add_(torch.sign(b1) * 0.5)
    assert torch.autograd.gradcheck(lambda *a: mk.grouped_mlp(a[0], o, a[1], a[2], act, a[3], a[4], backend=backend),
                                    (x, w1, w2, b1, b2))


@pytest.mark.parametrize("mode", [dict(), dict(capacity=2), dict(pad_to=4)], ids=str)
def test_moe_mlp_equals_dense_top_k_mixture(mode, backend):
    torch.manual_seed(3)
    T, d, h, E, k = 21, 8, 16, 5, 2
    x = torch.randn(T, d, requires_grad=True)
    logits = torch.randn(T, E, requires_grad=True)
    w1, w2, b1, b2 = _mlp_weights(E, d, h, "gelu", True, torch.float32, grad=True)
    r = mk.route(logits, k, **mode, backend=backend)
    out = mk.moe_mlp(x, r, w1, w2, "gelu", b1, b2, backend=backend)
    # y[t] = sum over kept assignments of w * MLP_e(x_t), computed token by token
    want = torch.zeros(T, d)
    for t in range(T):
        for j in range(k):
            if int(r.slots[t, j]) >= 0:
                e = int(r.topk_ids[t, j])
                want[t] += r.topk_weights[t, j] * (F.gelu(x[t] @ w1[e] + b1[e]) @ w2[e] + b2[e])
    torch.testing.assert_close(out, want, **TOL[torch.float32])
    g = torch.randn_like(out)
    ga = torch.autograd.grad(out, [x, logits, w1, w2, b1, b2], g, retain_graph=True)  # want shares the route node
    gb = torch.autograd.grad(want, [x, logits, w1, w2, b1, b2], g)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # fp32, different summation orders


# ---------------------------------------------------------------- weights stored transposed

def _transposed(w):
    """``w``'s values in the layout Hugging Face stores expert weights: the transpose(1, 2) view of
    a contiguous [E, out, in] tensor."""
    return w.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_transposed_weights_are_read_in_place(act, dtype, backend):
    """w1 and w2 as transpose(1, 2) views: the same outputs and gradients as the contiguous
    weights (bit for bit: the same values through the same GEMMs on either layout is not promised,
    so the dtype's tolerance), and weight gradients in the weight's own layout (no copy anywhere)."""
    g = torch.Generator().manual_seed(0)
    T, E, k, d, h = 29, 5, 2, 7, 6
    h1 = 2 * h if act == "swiglu" else h
    x = torch.randn(T, d, generator=g).to(dtype)
    r = mk.route(torch.randn(T, E, generator=g), k, capacity=9, pad_to=2)
    base = [torch.randn(E, d, h1, generator=g).to(dtype) / d ** 0.5, torch.randn(E, h, d, generator=g).to(dtype),
            torch.randn(E, h1, generator=g).to(dtype), torch.randn(E, d, generator=g).to(dtype)]
    gout = torch.randn(T, d, generator=g).to(dtype)

    def run(transposed, backend):
        ps = [(_transposed(p) if transposed and p.dim() == 3 else p.clone()).requires_grad_() for p in base]
        xx = x.clone().requires_grad_()
        out = mk.moe_mlp(xx, r, ps[0], ps[1], act, ps[2], ps[3], backend=backend)
        out.backward(gout)
        xe = mk.dispatch(x, r)
        gemm = mk.grouped_gemm(xe, r.offsets, ps[0].detach(), backend=backend)
        mlp = mk.grouped_mlp(xe, r.offsets, ps[0], ps[1], act, ps[2], ps[3], backend=backend)
        return ps, [out, xx.grad, gemm, mlp] + [p.grad for p in ps]

    ps, got = run(True, backend)
    _, want = run(False, "reference")
    # the kernels' own weight gradients (autograd would re-layout a mismatched one: a copy)
    w1, w2, b1, b2 = (p.detach() for p in ps)
    xe = mk.dispatch(x, r)
    gw = kernel(backend, "grouped_gemm_backward", mk.grouped_gemm(xe, r.offsets, w1), xe, r.offsets, w1,
                True, True)[1]
    z = kernel(backend, "grouped_mlp", xe, r.offsets, w1, w2, b1, b2, act)[1]
    mlp = kernel(backend, "grouped_mlp_backward", xe[:, :d], xe, z, r.offsets, w1, w2, b1, b2, act)
    z = kernel(backend, "moe_mlp", x, r.topk_weights, r.slots, r.sources, r.offsets, w1, w2, b1, b2, act)[1]
    layer = kernel(backend, "moe_mlp_backward", gout, x, z, r.topk_weights, r.slots, r.sources, r.offsets, w1,
                   w2, b1, b2, act, True, True, True)
    for name, g, w in (("grouped_gemm", gw, w1), ("grouped_mlp w1", mlp[1], w1), ("grouped_mlp w2", mlp[2], w2),
                       ("moe_mlp w1", layer[2], w1), ("moe_mlp w2", layer[3], w2)):
        assert g.stride() == w.stride(), f"{name}: the weight gradient is not in the weight's layout"
    tol = TOL[dtype]
    for i, (a, b) in enumerate(zip(got, want)):
        scale = max(float(b.detach().abs().max()), 1.0)
        torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=f"output {i}")


def test_weights_in_another_layout_are_refused():
    x, o = torch.randn(4, 6), torch.tensor([0, 2, 4], dtype=torch.int32)
    w = torch.randn(2, 12, 6)[:, ::2]  # [2, 6, 6], strided
    with pytest.raises(mk.MoEKernelsError, match="argument 'w' must be contiguous or the transpose"):
        mk.grouped_gemm(x, o, w)
