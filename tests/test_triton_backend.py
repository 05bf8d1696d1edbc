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
            "combine", "combine_backward"} <= set(b.kernels)
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
