"""Every fast backend (``fast_backend``: each one serving CPU tensors except the reference) against
the reference: plans and data movement bit-exact, floating results within per-dtype tolerances,
gradients, and identical results for 1, 2 and 3 threads."""

import pytest
import torch

import moe_kernels as mk

from .helpers import ODD_SHAPES, TOL, assert_exact

PLAN = ("topk_ids", "counts", "offsets", "slots", "sources", "num_dropped")
MODES = [dict(), dict(capacity=2), dict(capacity=3, drop_policy="score"), dict(capacity_factor=1.0),
         dict(pad_to=4), dict(capacity=2, pad_to=3, drop_policy="score"), dict(score="sigmoid"),
         dict(renormalize=False, capacity=1)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _both(backend, fn):
    return fn("reference"), fn(backend)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("shape", [s for s, _ in ODD_SHAPES], ids=[n for _, n in ODD_SHAPES])
def test_route_matches_reference(fast_backend, shape, mode, dtype):
    T, E, k = shape
    torch.manual_seed(T + 7 * E + k)
    logits = torch.randn(T, E).to(dtype)
    ref, fast = _both(fast_backend, lambda b: mk.route(logits, k, backend=b, **mode))
    for name in PLAN:
        assert_exact(getattr(fast, name), getattr(ref, name), name)
    # The C++ pass computes its own softmax: each exp may differ from ATen's by up to 2 ulp, the
    # softmax denominator sums E positive terms in another order (up to E-1 ulp apart), the
    # quotient rounds once, and renormalisation divides by a sum of k such values (k more): the
    # weights agree to (E + k + 4) ulp relative. Sigmoid has no sum over E.
    eps = torch.finfo(ref.topk_weights.dtype).eps
    torch.testing.assert_close(fast.topk_weights, ref.topk_weights, rtol=(E + k + 4) * eps, atol=0)


@pytest.mark.parametrize("policy", ["position", "score"])
def test_route_ties_and_one_expert(fast_backend, policy):
    logits = torch.zeros(50, 6)
    logits[:, 2] = 1.0  # every token: expert 2 first, then ties among the rest -> lowest ids
    logits[::3, 4] = 1.0  # ties for the top score too
    ref, fast = _both(fast_backend, lambda b: mk.route(logits, 3, capacity=7, drop_policy=policy, backend=b))
    for name in PLAN:
        assert_exact(getattr(fast, name), getattr(ref, name), name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", [dict(), dict(capacity=2, pad_to=4)], ids=str)
@pytest.mark.parametrize("shape", [(1, 4, 1), (37, 7, 2), (129, 8, 4), (64, 13, 13)], ids=str)
def test_dispatch_combine_forward_backward_match_reference(fast_backend, shape, mode, dtype):
    T, E, k = shape
    torch.manual_seed(3)
    r = mk.route(torch.randn(T, E), k, **mode)
    x = torch.randn(T, 19).to(dtype)
    y = torch.randn(r.num_rows, 19).to(dtype)
    g_rows, g_tok = torch.randn(r.num_rows, 19).to(dtype), torch.randn(T, 19).to(dtype)

    def run(b):
        xx, yy = x.clone().requires_grad_(), y.clone().requires_grad_()
        w = r.topk_weights.detach().clone().requires_grad_()
        xe = mk.dispatch(xx, r, backend=b)
        out = mk.combine(yy, r, weights=w, backend=b)
        xe.backward(g_rows)
        out.backward(g_tok)
        return xe, out, xx.grad, yy.grad, w.grad

    ref, fast = _both(fast_backend, run)
    assert_exact(fast[0], ref[0], "dispatch")
    # built with -ffp-contract=off, the C++ sums perform the reference's roundings in its order
    assert_exact(fast[1], ref[1], "combine")
    assert_exact(fast[2], ref[2], "dispatch backward")
    assert_exact(fast[3], ref[3], "combine backward (rows)")
    torch.testing.assert_close(fast[4], ref[4], **TOL[torch.float32 if dtype != torch.float64 else dtype])


def test_thread_count_does_not_change_results(fast_backend):
    torch.manual_seed(4)
    logits = torch.randn(1000, 13)
    x = torch.randn(1000, 33)
    w1_all, w2_all = torch.randn(13, 33, 2 * 17), torch.randn(13, 17, 33)
    outs = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            for mode in (dict(), dict(capacity=100, drop_policy="score"), dict(capacity_factor=0.9, pad_to=8)):
                r = mk.route(logits, 3, backend=fast_backend, **mode)
                y = mk.dispatch(x, r, backend=fast_backend)
                w1 = w1_all.requires_grad_()
                h = mk.grouped_mlp(y, r.offsets, w1, w2_all, "swiglu", backend=fast_backend)
                (gw1,) = torch.autograd.grad(h.square().sum(), w1)
                outs.append((n, [getattr(r, f) for f in PLAN] + [r.topk_weights, y, h, gw1,
                                                                 mk.combine(y, r, backend=fast_backend)]))
    finally:
        torch.set_num_threads(before)
    per_thread = {}
    for n, o in outs:
        per_thread.setdefault(n, []).append(o)
    for n in (2, 3):
        for a, b in zip(per_thread[1], per_thread[n]):
            for u, v in zip(a, b):
                assert torch.equal(u, v), f"{n} threads differ from 1 thread"


def test_moe_layer_matches_reference(fast_backend):
    """The whole layer (routing, fused experts, losses) on the backend against the reference."""
    torch.manual_seed(5)
    layer = mk.nn.MoE(16, 24, 7, 2, capacity_factor=1.25, pad_to=4)
    x = torch.randn(3, 11, 16)
    outs = {}
    for b in ("reference", fast_backend):
        layer.backend = b
        layer.zero_grad()
        o = layer(x)
        (o.output.square().mean() + o.aux_loss).backward()
        outs[b] = (o.output.detach(), [p.grad.clone() for p in layer.parameters()], o.routing)
    for name in PLAN:  # the same tokens moved to the same rows
        assert_exact(getattr(outs[fast_backend][2], name), getattr(outs["reference"][2], name), name)
    # the gate weights come from each backend's own softmax (a few ulp apart): floating results
    # are compared within the fp32 tolerance
    torch.testing.assert_close(outs[fast_backend][0], outs["reference"][0], **TOL[torch.float32])
    for a, b in zip(outs[fast_backend][1], outs["reference"][1]):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


SEGMENTS = [([3, 0, 5, 1, 0, 7, 2], 2), ([0, 0, 13], 4), ([1], 0), ([0, 0, 0], 2)]


def _offsets(sizes, tail):
    o = torch.zeros(len(sizes) + 1, dtype=torch.int32)
    o[1:] = torch.tensor(sizes).cumsum(0)
    return o, int(o[-1]) + tail


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seg", SEGMENTS, ids=str)
def test_grouped_gemm_matches_reference(fast_backend, seg, dtype):
    o, N = _offsets(*seg)
    torch.manual_seed(6)
    x = torch.randn(N, 11).to(dtype)
    w = torch.randn(len(seg[0]), 11, 6).to(dtype)
    g = torch.randn(N, 6).to(dtype)

    def run(b):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = mk.grouped_gemm(xx, o, ww, backend=b)
        out.backward(g)
        return out, xx.grad, ww.grad

    ref, fast = _both(fast_backend, run)
    for a, b, name in zip(fast, ref, ("out", "grad x", "grad w")):
        if fast_backend == "cpu":
            assert_exact(a, b, name)  # the same ATen GEMM calls on the same views
        else:  # own GEMM kernels (triton): another summation order, so the dtype's tolerance (contract rule 6)
            scale = max(float(b.abs().max()) if b.numel() else 0.0, 1.0)
            torch.testing.assert_close(a, b, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * scale, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("act", ["gelu", "relu", "silu", "swiglu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("seg", SEGMENTS[:2], ids=str)
def test_grouped_mlp_matches_reference(fast_backend, seg, bias, act, dtype):
    o, N = _offsets(*seg)
    E, d, h = len(seg[0]), 10, 12
    h1 = 2 * h if act == "swiglu" else h
    torch.manual_seed(7)
    x = torch.randn(N, d).to(dtype)
    params = [torch.randn(E, d, h1).to(dtype) / d ** 0.5, torch.randn(E, h, d).to(dtype) / h ** 0.5]
    params += [torch.randn(E, h1).to(dtype), torch.randn(E, d).to(dtype)] if bias else [None, None]
    g = torch.randn(N, d).to(dtype)

    def run(b):
        xx = x.clone().requires_grad_()
        ps = [p.clone().requires_grad_() if p is not None else None for p in params]
        out = mk.grouped_mlp(xx, o, ps[0], ps[1], act, ps[2], ps[3], backend=b)
        out.backward(g)
        return [out, xx.grad] + [p.grad for p in ps if p is not None]

    ref, fast = _both(fast_backend, run)
    # The same ATen calls as the reference, but experts may run concurrently with one thread each:
    # ATen's elementwise activations then split their work differently, and where a vector-width
    # remainder falls decides whether an element takes the vector or the scalar exp (an ulp apart).
    for i, (a, b) in enumerate(zip(fast, ref)):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=f"output {i}")


# ---------------------------------------------------------------- auxiliary losses

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("shape", [(1, 4, 1), (37, 7, 2), (129, 64, 8), (0, 5, 2)], ids=str)
def test_router_losses_match_reference(fast_backend, shape, score, dtype):
    T, E, k = shape
    torch.manual_seed(T + E)
    logits = (3 * torch.randn(T, E)).to(dtype)
    r = mk.route(logits, k, score=score, backend="reference")
    outs = {}
    for b in ("reference", fast_backend):
        lg = logits.clone().requires_grad_()
        lb = mk.load_balancing_loss(lg, r, backend=b)
        z = mk.z_loss(lg, backend=b)
        (glb,) = torch.autograd.grad(lb, lg, torch.tensor(0.7, dtype=lb.dtype), retain_graph=True)
        (gz,) = torch.autograd.grad(z, lg, torch.tensor(1.3, dtype=z.dtype))
        outs[b] = (lb, z, glb, gz)
    # The losses are fp32 (fp64) sums over T*E values that the C++ pass adds in blocks and its own
    # exp/softmax (a few ulp from ATen's): the fp32 test tolerance covers both. The logit gradients
    # are rounded to the logits' dtype at the end: that dtype's tolerance.
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for i, name in enumerate(("load_balancing", "z_loss")):
        assert outs[fast_backend][i].dtype == outs["reference"][i].dtype
        torch.testing.assert_close(outs[fast_backend][i], outs["reference"][i], **TOL[acc], msg=name)
    for i, name in ((2, "d load_balancing"), (3, "d z_loss")):
        torch.testing.assert_close(outs[fast_backend][i], outs["reference"][i], **TOL[dtype], msg=name)


def test_router_losses_thread_invariant(fast_backend):
    torch.manual_seed(11)
    logits = torch.randn(999, 13)
    r = mk.route(logits, 3, backend=fast_backend)
    before, res = torch.get_num_threads(), []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            lg = logits.clone().requires_grad_()
            lb, z = mk.load_balancing_loss(lg, r, backend=fast_backend), mk.z_loss(lg, backend=fast_backend)
            res.append((lb, z, *torch.autograd.grad(lb + z, lg)))
    finally:
        torch.set_num_threads(before)
    for other in res[1:]:
        for u, v in zip(res[0], other):
            assert torch.equal(u, v)


# ---------------------------------------------------------------- the fused expert layer (moe_mlp)

def _rel_err(a, truth):
    return float((a.double() - truth).norm() / truth.norm().clamp_min(1e-300))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", [dict(), dict(capacity=2, pad_to=4), dict(capacity=3, drop_policy="score")],
                         ids=str)
@pytest.mark.parametrize("act", ["gelu", "swiglu"])
@pytest.mark.parametrize("shape", [s for s, _ in ODD_SHAPES], ids=[n for _, n in ODD_SHAPES])
def test_moe_mlp_matches_composition_and_reference(fast_backend, shape, act, mode, dtype):
    T, E, k = shape
    d, h = 12, 10
    h1 = 2 * h if act == "swiglu" else h
    torch.manual_seed(T + E + k)
    r = mk.route(torch.randn(T, E), k, **mode)
    x = torch.randn(T, d).to(dtype)
    params = [torch.randn(E, d, h1) / d ** 0.5, torch.randn(E, h, d) / h ** 0.5, torch.randn(E, h1),
              torch.randn(E, d)]
    g = torch.randn(T, d).to(dtype)

    def run(b, dt=dtype, fused=True):
        xx = x.to(dt).clone().requires_grad_()
        w = r.topk_weights.detach().to(torch.float64 if dt == torch.float64 else torch.float32).clone()
        w.requires_grad_()
        ps = [p.to(dt).clone().requires_grad_() for p in params]
        rr = r._replace(topk_weights=w)
        if fused:
            out = mk.moe_mlp(xx, rr, *ps[:2], act, *ps[2:], backend=b)
        else:
            xe = mk.dispatch(xx, rr, backend=b)
            out = mk.combine(mk.grouped_mlp(xe, rr.offsets, *ps[:2], act, *ps[2:], backend=b), rr, backend=b)
        out.backward(g.to(dt))
        return [out, xx.grad, w.grad] + [p.grad for p in ps]

    fast, comp, ref = run(fast_backend), run(fast_backend, fused=False), run("reference")
    truth = run("reference", torch.float64)
    # forward: the same GEMMs on the same rows as the composition on this backend, and the same combine
    assert_exact(fast[0], comp[0], "moe_mlp forward vs dispatch -> grouped_mlp -> combine")
    torch.testing.assert_close(fast[0], ref[0], **TOL[dtype])
    # backward: the gate gradient is <g W2^T, act(z)> (+ <g, b2>) instead of <g, y>, and d act(z) is
    # w * (g W2^T) instead of (w * g) W2^T: reordered products, so each gradient is compared with the
    # fp64 result and must be as accurate as the composition's (2x its error, or a few eps)
    eps = torch.finfo(dtype).eps
    names = ["out", "x", "weights", "w1", "w2", "b1", "b2"]
    for i in range(1, 7):
        e_fast, e_ref = _rel_err(fast[i], truth[i]), _rel_err(ref[i], truth[i])
        assert e_fast <= 2 * e_ref + 8 * eps, f"grad {names[i]}: {e_fast:.3g} vs composition {e_ref:.3g}"
        if dtype in (torch.float32, torch.float64):
            torch.testing.assert_close(fast[i], ref[i], **TOL[dtype], msg=f"grad {names[i]}")


def test_moe_mlp_keeps_only_z_and_skips_unneeded_gradients(fast_backend):
    torch.manual_seed(1)
    T, E, k, d, h = 40, 5, 2, 16, 24
    r = mk.route(torch.randn(T, E), k)
    x = torch.randn(T, d, requires_grad=True)
    w1, w2 = torch.randn(E, d, h, requires_grad=True), torch.randn(E, h, d, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = mk.moe_mlp(x, r, w1, w2, backend=fast_backend)
    N = r.num_rows
    shapes = sorted(tuple(t.shape) for t in saved if t.dim() >= 2)
    # x, the gate weights, the slots, the weights, and z [N, h]: no dispatched copy [N, d] and no
    # expert outputs [N, d]; the only saved tensor that is not an input is z
    assert shapes == sorted([(T, d), (T, k), (T, k), (E, d, h), (E, h, d), (N, h)]), shapes
    inputs = {id(t) for t in (x, r.topk_weights, r.slots, r.sources, r.offsets, w1, w2)}
    assert [tuple(t.shape) for t in saved if t is not None and id(t) not in inputs] == [(N, h)]
    full = torch.autograd.grad(out.square().sum(), [x, w1, w2])
    # frozen experts and a constant input: only the wanted gradients, equal to the full backward's
    w1.requires_grad_(False)
    w2.requires_grad_(False)
    (gx,) = torch.autograd.grad(mk.moe_mlp(x, r, w1, w2, backend=fast_backend).square().sum(), [x])
    assert_exact(gx, full[0], "x gradient with frozen experts")
    x2 = x.detach()
    w1.requires_grad_(True)
    gw1 = torch.autograd.grad(mk.moe_mlp(x2, r, w1, w2, backend=fast_backend).square().sum(), [w1])[0]
    assert_exact(gw1, full[1], "w1 gradient with a constant input")


def test_moe_mlp_thread_count_does_not_change_results(fast_backend):
    torch.manual_seed(2)
    T, E, k, d, h = 300, 13, 3, 24, 20
    r0 = mk.route(torch.randn(T, E), k, capacity_factor=1.1, pad_to=4)
    x0, w10, w20 = torch.randn(T, d), torch.randn(E, d, h), torch.randn(E, h, d)
    before = torch.get_num_threads()
    res = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            x, w1, w2 = (t.clone().requires_grad_() for t in (x0, w10, w20))
            w = r0.topk_weights.clone().requires_grad_()
            out = mk.moe_mlp(x, r0._replace(topk_weights=w), w1, w2, "silu", backend=fast_backend)
            res.append([out] + list(torch.autograd.grad(out.square().sum(), [x, w, w1, w2])))
    finally:
        torch.set_num_threads(before)
    for n, other in zip((2, 3), res[1:]):
        for a, b in zip(res[0], other):
            assert torch.equal(a, b), f"{n} threads differ from 1 thread"


