"""The triton backend's own corners, beyond the op tests it runs through the ``backend`` fixtures.

On this machine its kernels run on triton's interpreter (``TRITON_INTERPRET=1``, set in
conftest.py), which checks no bounds: inputs are passed as views into buffers guarded with NaN, so
a read past a tensor's end shows in the results. Shapes are chosen to cross the kernels' token
blocks (several programs per launch, a plan scanned over blocks) while keeping the interpreted
programs few. Plans and data movement must equal the reference's bit for bit.
"""

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
