"""The triton backend's own corners, beyond the op tests it runs through the ``backend`` fixtures.

On this machine its kernels run on triton's interpreter (``TRITON_INTERPRET=1``, set in
conftest.py), which checks no bounds: inputs are passed as views into buffers guarded with NaN, so
a read past a tensor's end shows in the results. Shapes are chosen to cross the kernels' token
blocks (several programs per launch, a plan scanned over blocks) while keeping the interpreted
programs few. Plans and data movement must equal the reference's bit for bit.
"""

import json
import math
import os

import pytest
import torch

import moe_kernels as mk
from moe_kernels.backends import BACKENDS

from .conftest import use_backend
from .helpers import assert_exact

PLAN = ("topk_ids", "counts", "offsets", "slots", "sources", "num_dropped")
MODES = [dict(), dict(capacity=3), dict(capacity=3, drop_policy="score"), dict(capacity=5, pad_to=4,
                                                                             drop_policy="score")]


@pytest.fixture
def triton_backend(monkeypatch):
    return use_backend("triton", monkeypatch)


def _guarded(t: torch.Tensor, pad: int = 7) -> torch.Tensor:
    """``t`` as a contiguous view into a buffer whose elements around it are NaN (ints: a huge value)."""
    fill = float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).max
    buf = torch.full((t.numel() + 2 * pad,), fill, dtype=t.dtype)
    buf[pad:pad + t.numel()] = t.reshape(-1)
    return buf[pad:pad + t.numel()].view(t.shape)


def _same_plan(a, b):
    for name in PLAN:
        assert_exact(getattr(a, name), getattr(b, name), name)


def test_backend_reports_its_kernels():
    b = BACKENDS["triton"]
    if not b.available:
        pytest.skip(b.reason)
    assert "cpu" in b.devices  # served interpreted under TRITON_INTERPRET=1
    assert {"route", "route_backward", "task_route", "task_route_backward", "dispatch", "dispatch_backward",
            "combine", "combine_backward", "grouped_gemm", "grouped_gemm_backward", "grouped_mlp",
            "grouped_mlp_backward", "moe_mlp", "moe_mlp_backward"} <= set(b.kernels)
    # automatic choice never lands on triton for CPU tensors
    assert mk.backends.resolve("route", torch.device("cpu"), warn=False) != "triton"


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("shape", [(5, 512, 16), (150, 6, 2), (70, 17, 1)], ids=str)
def test_plan_across_blocks(triton_backend, shape, mode):
    """E = 512 with k = 16 (two tokens per block: 3 blocks), ties across blocks (all logits equal in
    half the tokens: score priority keeps ties by token order across block boundaries)."""
    T, E, k = shape
    torch.manual_seed(T + E + k)
    logits = torch.randn(T, E)
    logits[::2] = 0.5  # identical rows: every score ties
    r = mk.route(_guarded(logits), k, backend=triton_backend, **mode)
    _same_plan(r, mk.route(logits, k, backend="reference", **mode))


def test_all_tokens_one_expert_score_priority_ties(triton_backend):
    T, E = 130, 5
    logits = torch.zeros(T, E)
    logits[:, 2] = 3.0
    logits[40:90, 2] = 4.0  # a middle run of tokens scores higher: they are kept first
    for mode in (dict(capacity=60, drop_policy="score"), dict(capacity=60), dict(capacity=7, pad_to=8)):
        r = mk.route(logits, 2, backend=triton_backend, **mode)
        _same_plan(r, mk.route(logits, 2, backend="reference", **mode))
    r = mk.route(logits, 1, capacity=60, drop_policy="score", backend=triton_backend)
    kept = (r.slots[:, 0] >= 0).nonzero().squeeze(1)
    assert kept.tolist() == list(range(10)) + list(range(40, 90))  # 50 best, then the first 10 ties


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("policy", ["position", "score"])
def test_nonfinite_tokens_under_sync_free_policy(triton_backend, dtype, policy):
    """contract.NONFINITE_TOKEN: ids 0..k-1, NaN weights, lowest score priority; the plan as the reference's."""
    torch.manual_seed(0)
    logits = torch.randn(40, 7).to(dtype)
    logits[3, 2] = float("nan")
    logits[17, 0] = float("inf")
    logits[30, 6] = float("-inf")
    with mk.value_checks(False):
        r = mk.route(logits, 3, capacity=12, drop_policy=policy, backend=triton_backend)
        ref = mk.route(logits, 3, capacity=12, drop_policy=policy, backend="reference")
    _same_plan(r, ref)
    bad = [3, 17, 30]
    assert r.topk_ids[bad].tolist() == [[0, 1, 2]] * 3
    assert torch.isnan(r.topk_weights[bad]).all()
    good = torch.ones(40, dtype=torch.bool)
    good[bad] = False
    assert torch.isfinite(r.topk_weights[good]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_permutes_read_nothing_past_their_inputs(triton_backend, dtype):
    """Inputs in NaN-guarded buffers (the interpreter would read the guard silently); the results equal
    the reference's bit for bit (combine's gate-weight gradient: fp32 tolerance, another dot order)."""
    torch.manual_seed(1)
    T, E, k, d = 90, 7, 3, 37
    r = mk.route(torch.randn(T, E), k, capacity=40, pad_to=4, backend="reference")
    x, y, g = torch.randn(T, d).to(dtype), torch.randn(r.num_rows, d).to(dtype), torch.randn(T, d).to(dtype)
    w = r.topk_weights.to(torch.float64 if dtype == torch.float64 else torch.float32)
    slots, sources = _guarded(r.slots), _guarded(r.sources)
    gx, gy, gg, gw = _guarded(x), _guarded(y), _guarded(g), _guarded(w)
    from moe_kernels.backends.reference import permute as ref
    from moe_kernels.backends.triton import permute as tri

    assert_exact(tri.dispatch(gx, slots, sources), ref.dispatch(x, r.slots, r.sources), "dispatch")
    assert_exact(tri.dispatch_backward(gy, slots), ref.dispatch_backward(y, r.slots), "dispatch_backward")
    assert_exact(tri.combine(gy, gw, slots), ref.combine(y, w, r.slots), "combine")
    a, b = tri.combine_backward(gg, gy, gw, slots, True, True), ref.combine_backward(g, y, w, r.slots, True, True)
    assert_exact(a[0], b[0], "combine_backward rows")
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-5)


def test_task_route_reads_nothing_past_its_inputs(triton_backend):
    torch.manual_seed(2)
    T, d, E, M = 70, 9, 6, 3
    x, W = torch.randn(T, d), torch.randn(M, d, E)
    tids = torch.randint(0, M, (T,))
    r = mk.task_route(_guarded(x), _guarded(W), _guarded(tids), 2, capacity=20, backend=triton_backend)
    want = torch.stack([x[t] @ W[int(tids[t])] for t in range(T)])
    torch.testing.assert_close(r.logits, want, rtol=1e-5, atol=1e-5)
    _same_plan(r, mk.route(r.logits, 2, capacity=20, backend="reference"))


def test_route_backward_matches_reference_in_every_dtype(triton_backend):
    from moe_kernels.backends.reference import routing as ref
    from moe_kernels.backends.triton import routing as tri

    torch.manual_seed(3)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 1e-3), (torch.float64, 1e-12)):
        logits = torch.randn(70, 9).to(dtype)
        ids = mk.route(logits, 3, backend="reference").topk_ids
        g = torch.randn(70, 3, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        for score in ("softmax", "sigmoid"):
            for renorm in (True, False):
                a = tri.route_backward(_guarded(g), _guarded(logits), _guarded(ids), score, renorm)
                b = ref.route_backward(g, logits, ids, score, renorm)
                assert a.dtype == dtype
                # one rounding to the logits' dtype at the end: a few ulp of it (fp32 inside)
                torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---- losses and reconcile: against the reference in every dtype, odd sizes, T = 1, bitwise repeatable

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _close_to(a, b, dtype, what, k=1.0, floor=1e-12):
    """Within k * TOL[dtype], relative to the largest magnitude of the expected tensor (at least
    ``floor``: the scale of the terms of a result that cancels)."""
    from .helpers import TOL

    tol = TOL[dtype]
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    scale = max(float(b.abs().max()) if b.numel() else 0.0, floor)
    err = (a - b).abs()
    assert bool((err <= k * (tol["atol"] * scale + tol["rtol"] * b.abs())).all()), \
        f"{what}: max err {float(err.max()):.3g} of max|expected| {scale:.3g} ({dtype})"


def _twice(fn, *args):
    """fn(*args), checked to give the same bits on a second call (rule 5)."""
    a, b = fn(*args), fn(*args)
    for u, v in zip(a if isinstance(a, (tuple, list)) else (a,), b if isinstance(b, (tuple, list)) else (b,)):
        if isinstance(u, list):
            for x, y in zip(u, v):
                assert torch.equal(x, y), f"{fn.__name__}: not bitwise repeatable"
        elif u is not None:
            assert torch.equal(u, v), f"{fn.__name__}: not bitwise repeatable"
    return a


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,E,k,M", [(1, 5, 2, 3), (130, 13, 3, 4), (37, 7, 7, 1)], ids=str)
def test_losses_match_reference(triton_backend, T, E, k, M, dtype):
    """T = 1, a prime E, k = E, one task and 130 tokens (three token blocks): values and gradients
    as the reference's (fp32 math inside, so 16-bit inputs give fp32-exact losses; gradients are
    rounded once to the dtype), inputs in NaN-guarded buffers, bitwise repeatable."""
    from moe_kernels.backends.reference import losses as ref
    from moe_kernels.backends.triton import losses as tri

    torch.manual_seed(T * E + k)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    logits = (torch.randn(T, E) * 2).to(dtype)
    ids = mk.route(logits, k, backend="reference").topk_ids
    probs = torch.softmax(torch.randn(T, E), -1).to(dtype)
    probs[:, 0] = 0  # exact zeros (sparse gates): the clamp inside the logarithms
    tids = torch.randint(0, M, (T,))
    buf = torch.softmax(torch.randn(M * E), 0).view(M, E).to(dtype)
    g = torch.tensor(0.7, dtype=acc)
    lg, gi, gp, gt, gb = _guarded(logits), _guarded(ids), _guarded(probs), _guarded(tids), _guarded(buf)
    tol = acc if dtype != torch.float64 else torch.float64
    for score in ("softmax", "sigmoid"):
        _close_to(_twice(tri.load_balancing_loss, lg, gi, score), ref.load_balancing_loss(logits, ids, score), tol,
                  f"load_balancing_loss {score}")
        got = _twice(tri.load_balancing_loss_backward, g, lg, gi, score)
        assert got.dtype == dtype
        # on the scale of d loss / d q = g E f / T (k = E: uniform f, a gradient 0 up to rounding)
        _close_to(got, ref.load_balancing_loss_backward(g, logits, ids, score), dtype, f"lb backward {score}",
                  floor=0.7 / T)
    _close_to(_twice(tri.z_loss, lg), ref.z_loss(logits), tol, "z_loss")
    _close_to(_twice(tri.z_loss_backward, g, lg), ref.z_loss_backward(g, logits), dtype, "z_loss backward")
    for ema in (False, True):
        fa, fb = (tri.mutual_information_loss_ema, ref.mutual_information_loss_ema) if ema else \
            (tri.mutual_information_loss, ref.mutual_information_loss)
        ba, bb = (tri.mutual_information_loss_ema_backward, ref.mutual_information_loss_ema_backward) if ema else \
            (tri.mutual_information_loss_backward, ref.mutual_information_loss_backward)
        extra_t, extra_r = ((gb,), (buf,)) if ema else ((), ())
        loss = _twice(fa, gp, gt, *extra_t, M)
        assert loss.dtype == acc and loss.shape == ()
        # a difference of entropies (terms of order 1 + log M): compared on that scale
        _close_to(loss, fb(probs, tids, *extra_r, M), tol, f"mi loss ema={ema}", floor=1.0)
        got = _twice(ba, g, gp, gt, *extra_t, M)
        assert got.dtype == dtype
        _close_to(got, bb(g, probs, tids, *extra_r, M), dtype, f"mi backward ema={ema}")


def test_losses_on_no_tokens(triton_backend):
    from moe_kernels.backends.triton import losses as tri

    logits, ids = torch.zeros(0, 5), torch.zeros(0, 2, dtype=torch.int32)
    g = torch.tensor(1.0)
    assert tri.load_balancing_loss(logits, ids, "softmax").item() == 0.0 and tri.z_loss(logits).item() == 0.0
    assert tri.load_balancing_loss_backward(g, logits, ids, "sigmoid").shape == (0, 5)
    assert tri.z_loss_backward(g, logits).shape == (0, 5)
    tids = torch.zeros(0, dtype=torch.int64)
    # no task present: every term is 0 but -log M (batch form), 0 (EMA form); no gradient rows
    torch.testing.assert_close(tri.mutual_information_loss(logits, tids, 3), torch.tensor(-math.log(3.0)))
    assert tri.mutual_information_loss_backward(g, logits, tids, 3).shape == (0, 5)
    assert tri.mutual_information_loss_ema(logits, tids, torch.full((3, 5), 1 / 15), 3).item() == 0.0


def _reconcile_case(lead, C, cins, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    main = torch.randn(*lead, C, generator=g).to(dtype)
    aux = [(torch.randn(*lead, c, generator=g) * 2 + 0.5).to(dtype) for c in cins]
    ws = [(torch.randn(c, C, generator=g) * c ** -0.5).to(dtype) for c in cins]
    bs = [(torch.randn(C, generator=g) * 0.3).to(dtype) for _ in cins] if bias else []
    pdt = torch.float32 if dtype != torch.float64 else dtype
    gamma = torch.rand(len(cins), C, generator=g, dtype=pdt) + 0.5
    beta = torch.randn(len(cins), C, generator=g, dtype=pdt) * 0.2
    gout = torch.randn(*lead, C, generator=g).to(dtype)
    return main, aux, ws, bs, gamma, beta, gout


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bn", [False, True], ids=["plain", "bn"])
@pytest.mark.parametrize("act", ["none", "gelu", "silu", "relu"])
def test_reconcile_matches_reference(triton_backend, act, bn, dtype):
    """N = 3*5*7 = 105 rows (two row tiles), C = 13, links of 5, 17 and 1 input channels (one a
    transposed conv-weight view), a bias, fp32 BN parameters with 16-bit data; NaN-guarded inputs;
    outputs, statistics and every gradient as the reference's, bitwise repeatable."""
    from moe_kernels.backends.reference import reconcile as ref
    from moe_kernels.backends.triton import reconcile as tri

    main, aux, ws, bs, gamma, beta, gout = _reconcile_case((3, 5, 7), 13, (5, 17, 1), dtype, True, seed=21)
    ws[1] = ws[1].t().contiguous().t()  # strides (1, 17): as conv.weight.view(C, C_in).t()
    gm, ga, gw, gbs, gg = _guarded(main), [_guarded(a) for a in aux], [_guarded(w) for w in ws[:1]] + ws[1:2] + \
        [_guarded(ws[2])], [_guarded(b) for b in bs], _guarded(gout)
    kw = (gamma, beta) if bn else (None, None)
    out, stats = _twice(tri.reconcile, gm, ga, gw, gbs, act, bn, *kw, 1e-5)
    want, wstats = ref.reconcile(main, aux, ws, bs, act, bn, *kw, 1e-5)
    assert out.dtype == dtype and stats.shape == wstats.shape
    _close_to(out, want, dtype, "out")
    if bn:
        _close_to(stats, wstats, torch.float64 if dtype == torch.float64 else torch.float32, "stats")
    res = _twice(tri.reconcile_backward, gg, ga, gw, gbs, act, bn, *kw, stats)
    exp = ref.reconcile_backward(gout, aux, ws, bs, act, bn, *kw, wstats)
    for i in range(3):
        assert res[0][i].stride() == ws[i].stride()
        # 16-bit: the reference rounds z + b to the dtype before the activation (the kernel adds
        # the bias in fp32): 4x the dtype tolerance, as in test_reconcile's cpu comparison
        # with BN a 1-channel link's normalised output does not depend on W: its gradient is 0
        # up to rounding noise, compared on the scale 1 (as test_reconcile's odd shapes do)
        _close_to(res[0][i], exp[0][i], dtype, f"grad_weights[{i}]", k=4, floor=1.0 if bn and i == 2 else 1e-12)
        _close_to(res[1][i], exp[1][i], dtype, f"grad_bias[{i}]", k=4)
    assert (res[2] is None) == (not bn) and (res[3] is None) == (not bn)
    if bn:
        assert torch.equal(res[1][0], torch.zeros_like(bs[0]))
        _close_to(res[2], exp[2], dtype, "grad_bn_weight", k=4)
        _close_to(res[3], exp[3], dtype, "grad_bn_bias", k=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_reconcile_bn_stats_are_the_batch_statistics(triton_backend, dtype):
    """stats [L, 3, C] = (mean, 1 / sqrt(var + eps), biased var) of z + b over all N rows, for
    rows spread over several tiles with a mean far from 0 (a one-pass sum of squares would cancel)."""
    from moe_kernels.backends.triton import reconcile as tri

    main, aux, ws, bs, gamma, beta, _ = _reconcile_case((150,), 19, (3, 8), dtype, True, seed=22)
    aux = [a + 30 for a in aux]
    _, stats = tri.reconcile(main, aux, ws, bs, "relu", True, gamma, beta, 1e-3)
    assert stats.dtype == dtype and stats.shape == (2, 3, 19)
    for i in range(2):
        z = (aux[i].double() @ ws[i].double()).to(dtype).double() + bs[i].double()
        var = z.var(0, unbiased=False)
        _close_to(stats[i, 0], z.mean(0), dtype, "mean")
        _close_to(stats[i, 2], var, dtype, "var")
        _close_to(stats[i, 1], (var + 1e-3).rsqrt(), dtype, "invstd")


def test_reconcile_single_row_and_main_none(triton_backend):
    """N = 1 (plain links), main None (the links alone), no links (a copy), N = 2 with BN."""
    from moe_kernels.backends.reference import reconcile as ref
    from moe_kernels.backends.triton import reconcile as tri

    main, aux, ws, bs, gamma, beta, gout = _reconcile_case((1,), 7, (3, 2), torch.float32, True, seed=23)
    for m in (main, None):
        out, _ = tri.reconcile(m, aux, ws, bs, "silu", False, None, None, 1e-5)
        _close_to(out, ref.reconcile(m, aux, ws, bs, "silu", False, None, None, 1e-5)[0], torch.float32, "N=1")
    gws, gbs, gg, gb = tri.reconcile_backward(gout, aux, ws, bs, "silu", False, None, None, None)
    e = ref.reconcile_backward(gout, aux, ws, bs, "silu", False, None, None, None)
    for a, b in zip(gws + gbs, e[0] + e[1]):
        _close_to(a, b, torch.float32, "N=1 grads")
    assert gg is None and gb is None
    copy, stats = tri.reconcile(main, [], [], [], "relu", True, None, None, 1e-5)
    assert torch.equal(copy, main) and copy.data_ptr() != main.data_ptr() and stats.shape == (0, 3, 7)
    main, aux, ws, bs, gamma, beta, gout = _reconcile_case((2,), 7, (3,), torch.float32, False, seed=24)
    out, stats = tri.reconcile(main, aux, ws, [], "gelu", True, gamma[:1], None, 1e-5)
    w_out, w_stats = ref.reconcile(main, aux, ws, [], "gelu", True, gamma[:1], None, 1e-5)
    _close_to(out, w_out, torch.float32, "N=2 bn")
    _close_to(stats, w_stats, torch.float32, "N=2 stats")
    res = tri.reconcile_backward(gout, aux, ws, [], "gelu", True, gamma[:1], None, stats)
    assert res[2] is not None and res[3] is None
# ---------------------------------------------------------------- grouped GEMM / expert MLP kernels

GROUPED_TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5),
               torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _kernels(backend):
    return {n: mk.backends.get_kernel(backend, n).fn for n in (
        "grouped_gemm", "grouped_gemm_backward", "grouped_mlp", "grouped_mlp_backward", "moe_mlp",
        "moe_mlp_backward")}


def _hf(E, a, b, dtype, scale=1.0):
    """[E, a, b] as Hugging Face stores expert weights: the transposed view of a contiguous [E, b, a]."""
    w = (scale * torch.randn(E, b, a)).to(dtype).transpose(1, 2)
    assert not w.is_contiguous() and w.stride() == (a * b, 1, a)
    return w


def _close(a, b, dtype, what, loose=1):
    assert (a is None) == (b is None), what
    if a is not None:
        assert a.dtype == b.dtype and a.shape == b.shape, what
        tol = {k: loose * v for k, v in GROUPED_TOL[dtype].items()}
        torch.testing.assert_close(a, b, **tol, msg=what)


def _offsets_of(sizes, tail):
    o = torch.zeros(len(sizes) + 1, dtype=torch.int32)
    o[1:] = torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(torch.int32)
    return o, int(o[-1]) + tail


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "hf"])
def test_grouped_gemm_and_mlp_kernels_any_weight_layout(triton_backend, dtype, layout):
    """Zero-row experts, a prime E, a tail past offsets[E], d/h not multiples of 16, and weights either
    contiguous or transposed views: equal to the reference (on contiguous copies); weight gradients keep
    the weight's layout; inputs in NaN-guarded buffers."""
    tri, ref = _kernels("triton"), _kernels("reference")
    torch.manual_seed(11)
    o, N = _offsets_of([3, 0, 20, 1, 0, 9, 2], 3)
    E, d, h = 7, 19, 13
    mkw = _hf if layout == "hf" else (lambda E, a, b, dt, scale=1.0: (scale * torch.randn(E, a, b)).to(dt))
    x = torch.randn(N, d).to(dtype)
    w = mkw(E, d, 6, dtype)
    g = torch.randn(N, 6).to(dtype)
    wc = w.contiguous()
    out = tri["grouped_gemm"](_guarded(x), o, w)
    _close(out, ref["grouped_gemm"](x, o, wc), dtype, "grouped_gemm")
    assert (out[int(o[-1]):] == 0).all()
    gx, gw = tri["grouped_gemm_backward"](_guarded(g), _guarded(x), o, w, True, True)
    rx, rw = ref["grouped_gemm_backward"](g, x, o, wc, True, True)
    _close(gx, rx, dtype, "grouped_gemm dx", 3)
    _close(gw, rw, dtype, "grouped_gemm dw", 3)
    assert gw.stride() == w.stride()
    assert tri["grouped_gemm_backward"](g, x, o, w, False, True)[0] is None
    assert tri["grouped_gemm_backward"](g, x, o, w, True, False)[1] is None
    for act, bias in (("gelu", True), ("swiglu", False), ("relu", True), ("silu", False)):
        h1 = 2 * h if act == "swiglu" else h
        w1, w2 = mkw(E, d, h1, dtype, d ** -0.5), mkw(E, h, d, dtype, h ** -0.5)
        b1 = torch.randn(E, h1).to(dtype) if bias else None
        b2 = torch.randn(E, d).to(dtype) if bias else None
        args = (w1, w2, b1, b2, act)
        rargs = (w1.contiguous(), w2.contiguous(), b1, b2, act)
        y, z = tri["grouped_mlp"](_guarded(x), o, *args)
        ry, rz = ref["grouped_mlp"](x, o, *rargs)
        _close(y, ry, dtype, f"grouped_mlp {act}")
        _close(z, rz, dtype, f"grouped_mlp z {act}")
        gy = torch.randn(N, d).to(dtype)
        got = tri["grouped_mlp_backward"](_guarded(gy), _guarded(x), _guarded(rz), o, *args)
        want = ref["grouped_mlp_backward"](gy, x, rz, o, *rargs)
        for name, a, b in zip(("dx", "dw1", "dw2", "db1", "db2"), got, want):
            _close(a, b, dtype, f"grouped_mlp_backward {act} {name}", 3)
        assert got[1].stride() == w1.stride() and got[2].stride() == w2.stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", [dict(T=1, E=3, k=1), dict(T=1, E=5, k=5), dict(T=41, E=7, k=2, capacity=5, pad_to=4),
                                  dict(T=30, E=5, k=3, drop_policy="score", capacity=9)], ids=str)
def test_moe_mlp_kernels_hf_weights(triton_backend, dtype, case):
    """The fused layer's kernels with transposed (Hugging Face) weights against the reference's
    composition on contiguous copies: T = 1, k = E, dropped assignments and padding rows."""
    tri, ref = _kernels("triton"), _kernels("reference")
    case = dict(case)
    T, E, k = case.pop("T"), case.pop("E"), case.pop("k")
    torch.manual_seed(T + E + k)
    r = mk.route(torch.randn(T, E), k, backend="reference", **case)
    d, h = 10, 7
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    wts = r.topk_weights.to(acc)
    x, g = torch.randn(T, d).to(dtype), torch.randn(T, d).to(dtype)
    for act in ("gelu", "swiglu"):
        h1 = 2 * h if act == "swiglu" else h
        w1, w2 = _hf(E, d, h1, dtype, d ** -0.5), _hf(E, h, d, dtype, h ** -0.5)
        b1, b2 = torch.randn(E, h1).to(dtype), torch.randn(E, d).to(dtype)
        plan = (r.slots, r.sources, r.offsets)
        out, z = tri["moe_mlp"](_guarded(x), _guarded(wts), *plan, w1, w2, b1, b2, act)
        rout, rz = ref["moe_mlp"](x, wts, *plan, w1.contiguous(), w2.contiguous(), b1, b2, act)
        _close(out, rout, dtype, f"moe_mlp {act}")
        _close(z, rz, dtype, f"moe_mlp z {act}")
        got = tri["moe_mlp_backward"](_guarded(g), _guarded(x), _guarded(rz), _guarded(wts), *plan, w1, w2, b1, b2,
                                      act, True, True, True)
        want = ref["moe_mlp_backward"](g, x, rz, wts, *plan, w1.contiguous(), w2.contiguous(), b1, b2, act,
                                       True, True, True)
        # reordered products (w (g W2^T) for (w g) W2^T, <g W2^T, act(z)> + <g, b2> for <g, y>)
        for name, a, b in zip(("dx", "dweights", "dw1", "dw2", "db1", "db2"), got, want):
            _close(a, b, dtype, f"moe_mlp_backward {act} {name}", 3)
        assert got[2].stride() == w1.stride() and got[3].stride() == w2.stride()
        # only what is asked for is computed, and it equals the full backward's
        for nx, nw, npar in ((True, False, False), (False, True, False), (False, False, True)):
            part = tri["moe_mlp_backward"](g, x, rz, wts, *plan, w1, w2, b1, b2, act, nx, nw, npar)
            for i, (p, full) in enumerate(zip(part, got)):
                need = (nx, nw, npar, npar, npar, npar)[i]
                assert (p is None) == (not need), i
                if need:
                    assert_exact(p, full, f"partial backward output {i}")


def test_grouped_kernels_are_bitwise_deterministic(triton_backend):
    tri = _kernels("triton")
    torch.manual_seed(12)
    T, E, k, d, h = 60, 11, 3, 21, 18
    r = mk.route(torch.randn(T, E), k, capacity=20, pad_to=4, backend="reference")
    x, g = torch.randn(T, d), torch.randn(T, d)
    w1, w2 = _hf(E, d, 2 * h, torch.float32, d ** -0.5), torch.randn(E, h, d) / h ** 0.5
    b1, b2 = torch.randn(E, 2 * h), torch.randn(E, d)
    plan = (r.topk_weights, r.slots, r.sources, r.offsets)

    def once():
        out, z = tri["moe_mlp"](x, *plan, w1, w2, b1, b2, "swiglu")
        bwd = tri["moe_mlp_backward"](g, x, z, *plan, w1, w2, b1, b2, "swiglu", True, True, True)
        y2, z2 = tri["grouped_mlp"](z[:, :d].contiguous(), r.offsets, w1, w2, b1, b2, "swiglu")
        return [out, z, *bwd, y2, z2]

    for i, (a, b) in enumerate(zip(once(), once())):
        assert_exact(a, b, f"output {i}")


def test_fp64_products_and_sum_path(triton_backend, monkeypatch):
    """The fp64 path GPUs take (no fp64 tl.dot: products and a sum), run here under the interpreter."""
    from moe_kernels.backends.triton import grouped

    monkeypatch.setattr(grouped, "FP64_PATH", "sum")
    tri, ref = _kernels("triton"), _kernels("reference")
    torch.manual_seed(13)
    o, N = _offsets_of([4, 0, 17, 2], 2)
    E, d, h = 4, 9, 11
    x, gy = torch.randn(N, d, dtype=torch.float64), torch.randn(N, d, dtype=torch.float64)
    w1, w2 = _hf(E, d, h, torch.float64), torch.randn(E, h, d, dtype=torch.float64)
    b1, b2 = torch.randn(E, h, dtype=torch.float64), torch.randn(E, d, dtype=torch.float64)
    y, z = tri["grouped_mlp"](x, o, w1, w2, b1, b2, "silu")
    ry, rz = ref["grouped_mlp"](x, o, w1.contiguous(), w2, b1, b2, "silu")
    _close(y, ry, torch.float64, "out")
    _close(z, rz, torch.float64, "z")
    got = tri["grouped_mlp_backward"](gy, x, rz, o, w1, w2, b1, b2, "silu")
    want = ref["grouped_mlp_backward"](gy, x, rz, o, w1.contiguous(), w2, b1, b2, "silu")
    for name, a, b in zip(("dx", "dw1", "dw2", "db1", "db2"), got, want):
        _close(a, b, torch.float64, name)


def test_grouped_kernels_empty_inputs(triton_backend):
    tri = _kernels("triton")
    o = torch.zeros(4, dtype=torch.int32)
    x, w = torch.randn(0, 5), torch.randn(3, 5, 4)
    assert tri["grouped_gemm"](x, o, w).shape == (0, 4)
    gx, gw = tri["grouped_gemm_backward"](torch.randn(0, 4), x, o, w, True, True)
    assert gx.shape == (0, 5) and (gw == 0).all()
    w1, w2 = torch.randn(3, 5, 6), torch.randn(3, 6, 5)
    y, z = tri["grouped_mlp"](x, o, w1, w2, None, torch.randn(3, 5), "gelu")
    assert y.shape == (0, 5) and z.shape == (0, 6)
    r = mk.route(torch.randn(0, 3), 2, backend="reference")
    out, z = tri["moe_mlp"](x, r.topk_weights, r.slots, r.sources, r.offsets, w1, w2, None, None, "relu")
    assert out.shape == (0, 5) and z.shape == (r.num_rows, 6)
    grads = tri["moe_mlp_backward"](torch.randn(0, 5), x, z, r.topk_weights, r.slots, r.sources, r.offsets, w1, w2,
                                    None, None, "relu", True, True, True)
    assert grads[0].shape == (0, 5) and grads[1].shape == (0, 2) and (grads[2] == 0).all() and grads[4] is None


def test_token_counts_are_not_specialized():
    """A new batch size must not compile new kernels: every program's token / row count arguments
    are ``do_not_specialize`` (checked on the compiled-mode JITFunction objects, in a subprocess
    with TRITON_INTERPRET=0, where triton builds them; nothing is compiled)."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = """
import importlib, json
import triton
names = {"T", "N", "NB", "TK", "NT", "NCT"}
bad, seen = [], 0
for m in ("_grouped_jit", "_losses_jit", "_permute_jit", "_reconcile_jit", "_routing_jit"):
    mod = importlib.import_module("moe_kernels.backends.triton." + m)
    for n, f in vars(mod).items():
        if isinstance(f, triton.runtime.jit.JITFunction) and n.endswith("_kernel"):
            seen += 1
            bad += [f"{m}.{n}({p.name})" for p in f.params if p.name in names and not p.do_not_specialize]
print(json.dumps({"bad": bad, "seen": seen}))
"""
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["seen"] >= 25 and res["bad"] == [], res


class _LaunchSpy:
    """Stands in for a @triton.jit kernel: records each launch's keyword arguments, then launches it."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    @staticmethod
    def real(module, name="_rows_gemm_kernel"):
        """The module's kernel under any spies already set on it."""
        k = getattr(module, name)
        while isinstance(k, _LaunchSpy):
            k = k.kernel
        return k

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.log.append(kw)
            return self.kernel[grid](*args, **kw)

        return launch


def test_fp32_precision_is_explicit(triton_backend, monkeypatch):
    """fp32 GEMMs multiply exactly ("ieee") unless TF32 is asked for, by FP32_PRECISION, the
    environment, or torch's own set_float32_matmul_precision; every GEMM launch gets the choice."""
    from moe_kernels.backends.triton import _common, _grouped_jit, _reconcile_jit

    monkeypatch.delenv(_common.FP32_PRECISION_ENV, raising=False)
    assert _common.fp32_precision() == "ieee"  # torch's default, "highest"
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert _common.fp32_precision() == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
    monkeypatch.setenv(_common.FP32_PRECISION_ENV, "tf32")
    assert _common.fp32_precision() == "tf32"
    monkeypatch.setattr(_common, "FP32_PRECISION", "ieee")  # the attribute wins over the environment
    assert _common.fp32_precision() == "ieee"
    monkeypatch.setattr(_common, "FP32_PRECISION", "tf32x3")
    with pytest.raises(ValueError, match="FP32_PRECISION"):
        _common.fp32_precision()
    monkeypatch.setattr(_common, "FP32_PRECISION", None)
    from moe_kernels.backends import triton as tb

    with pytest.raises(ValueError, match="set_fp32_precision: value"):
        tb.set_fp32_precision("fp16")
    assert _common.FP32_PRECISION is None  # bad input changes nothing
    tb.set_fp32_precision("ieee")
    assert _common.fp32_precision() == "ieee"  # and wins over the environment's tf32

    monkeypatch.setattr(_common, "FP32_PRECISION", "tf32")
    log = []
    for mod, names in ((_grouped_jit, ("_rows_gemm_kernel", "_experts_gemm_kernel")),
                       (_reconcile_jit, ("_fwd_kernel", "_bwd_gz_kernel", "_wgrad_kernel"))):
        for n in names:
            monkeypatch.setattr(mod, n, _LaunchSpy(getattr(mod, n), log))
    from moe_kernels.backends.triton import reconcile as rec

    tri = _kernels("triton")
    torch.manual_seed(3)
    o, N = _offsets_of([5, 0, 9], 1)
    x, w = torch.randn(N, 16), torch.randn(3, 16, 8)
    out = tri["grouped_gemm"](x, o, w)
    tri["grouped_gemm_backward"](torch.randn_like(out), x, o, w, True, True)
    main, aux, ws = torch.randn(6, 8), [torch.randn(6, 16)], [torch.randn(16, 8)]
    y, stats = rec.reconcile(main, aux, ws, [torch.randn(8)], "gelu", False, None, None, 1e-5)
    rec.reconcile_backward(torch.randn_like(y), aux, ws, [torch.randn(8)], "gelu", False, None, None, stats)
    assert len(log) >= 5 and {kw["PREC"] for kw in log} == {"tf32"}, log


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "hf"])
def test_weight_tiles_through_tensor_descriptors(triton_backend, monkeypatch, dtype, layout):
    """Weights whose layout allows it are read through tensor descriptors (TMA on Hopper), both
    orientations (forward: B = w[e]; dX: B = w[e]^T; the Hugging Face layout flips both), with zero
    fill past K and NC; the results must equal the pointer loads' bit for bit, and misaligned
    weights must fall back to pointer loads."""
    from moe_kernels.backends.triton import _grouped_jit, grouped

    tri = _kernels("triton")
    torch.manual_seed(17)
    E, d, h = 5, 32, 24  # rows of 64-128 bytes: descriptor-aligned in every dtype
    r = mk.route(torch.randn(23, E), 2, backend="reference", capacity=6, pad_to=4)
    x, g = torch.randn(23, d).to(dtype), torch.randn(23, d).to(dtype)
    wts = r.topk_weights
    plan = (r.slots, r.sources, r.offsets)
    w1 = _hf(E, d, 2 * h, dtype, d ** -0.5) if layout == "hf" else (torch.randn(E, d, 2 * h) * d ** -0.5).to(dtype)
    w2 = _hf(E, h, d, dtype, h ** -0.5) if layout == "hf" else (torch.randn(E, h, d) * h ** -0.5).to(dtype)
    b1, b2 = torch.randn(E, 2 * h).to(dtype), torch.randn(E, d).to(dtype)
    x2, gy = torch.randn(r.num_rows, d).to(dtype), torch.randn(r.num_rows, d).to(dtype)

    def run(tma):
        monkeypatch.setattr(grouped, "TMA", tma)
        log = []
        monkeypatch.setattr(_grouped_jit, "_rows_gemm_kernel", _LaunchSpy(_LaunchSpy.real(_grouped_jit), log))
        out, z = tri["moe_mlp"](x, wts, *plan, w1, w2, b1, b2, "swiglu")
        grads = tri["moe_mlp_backward"](g, x, z, wts, *plan, w1, w2, b1, b2, "swiglu", True, True, True)
        y2, z2 = tri["grouped_mlp"](x2, r.offsets, w1, w2, b1, b2, "swiglu")
        gg = tri["grouped_mlp_backward"](gy, x2, z2, r.offsets, w1, w2, b1, b2, "swiglu")
        return [out, z, *grads, y2, z2, *gg], [(kw["TMA"], kw["B_T"]) for kw in log]

    got, used = run(True)
    want, unused = run(False)
    assert {u[0] for u in used} == {True} and {u[1] for u in used} == {False, True}, used
    assert {u[0] for u in unused} == {False}
    for i, (a, b) in enumerate(zip(got, want)):
        if b is not None:
            assert_exact(a, b, f"output {i}")
    # a weight with a row of 20 or 40 bytes: no descriptor (pointer loads serve it)
    odd = torch.randn(E, 10, 6).to(dtype)
    monkeypatch.setattr(grouped, "TMA", True)
    assert grouped._weight_desc(odd, False, 16, 16) == (None, False)
    assert grouped._weight_desc(torch.randn(E, 32, 32, dtype=torch.float64), False, 16, 16) == (None, False)


@pytest.mark.parametrize("case", ["tiles per expert", "tiny experts", "one token", "rows past the plan"])
def test_gpu_pair_schedule_equals_the_walk(triton_backend, monkeypatch, case):
    """On a GPU the varlen-M GEMM runs one program per (row tile, expert segment) pair, found from
    ``offsets`` on the device; the interpreter normally walks every pair in one program. Here the
    GPU's schedule runs under the interpreter and must give the walk's bits: experts spanning
    several tiles, many experts inside one tile, empty experts, T = 1, rows past offsets[E] (zeros)."""
    from moe_kernels.backends.triton import grouped

    tri = _kernels("triton")
    torch.manual_seed(23)
    d, h = 12, 10
    if case in ("tiles per expert", "rows past the plan"):
        sizes = [0, 290, 0, 5, 1] if case == "tiles per expert" else [3, 0, 60, 7]
        o, N = _offsets_of(sizes, 9 if case == "rows past the plan" else 0)
        E = len(sizes)
        x, gy = torch.randn(N, d), torch.randn(N, d)
        w1, w2 = torch.randn(E, d, 2 * h) * d ** -0.5, torch.randn(E, h, d) * h ** -0.5

        def once():
            y, z = tri["grouped_mlp"](x, o, w1, w2, None, None, "swiglu")
            return [y, z, *tri["grouped_mlp_backward"](gy, x, z, o, w1, w2, None, None, "swiglu")]
    else:
        T, E, k = (40, 17, 3) if case == "tiny experts" else (1, 7, 2)
        r = mk.route(torch.randn(T, E), k, backend="reference")
        x, g = torch.randn(T, d), torch.randn(T, d)
        w1, w2 = torch.randn(E, d, h) * d ** -0.5, torch.randn(E, h, d) * h ** -0.5
        b1, b2 = torch.randn(E, h), torch.randn(E, d)
        plan = (r.slots, r.sources, r.offsets)

        def once():
            out, z = tri["moe_mlp"](x, r.topk_weights, *plan, w1, w2, b1, b2, "gelu")
            return [out, z, *tri["moe_mlp_backward"](g, x, z, r.topk_weights, *plan, w1, w2, b1, b2, "gelu",
                                                     True, True, True)]
    monkeypatch.setattr(grouped, "WALK", True)
    walked = once()
    monkeypatch.setattr(grouped, "WALK", False)
    for i, (a, b) in enumerate(zip(once(), walked)):
        if b is not None:
            assert_exact(a, b, f"output {i}")


def test_no_atomics_in_any_kernel():
    """Determinism by construction: no kernel of this backend uses an atomic operation.

    The bitwise-repeatability tests cannot catch an atomic on this machine: the interpreter runs
    programs one after another, so even a floating-point ``tl.atomic_add`` sums in a fixed order
    there. This reads every triton source of the backend for them instead (any atomic, integer ones
    included: none is needed, and an exception would have to be argued here).
    """
    import ast
    import pathlib

    import moe_kernels.backends.triton as pkg

    root = pathlib.Path(pkg.__file__).parent
    sources = sorted(root.glob("*.py"))
    assert any(p.name == "_grouped_jit.py" for p in sources)
    found = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("atomic"):
                found.append(f"{path.name}:{node.lineno} {node.attr}")
    assert not found, f"atomics in triton kernels: {found}"
