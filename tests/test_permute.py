"""mk.dispatch / mk.combine: bit-exact data movement, weighted sums, gradients."""

import pytest
import torch

import moe_kernels as mk

from .helpers import ODD_SHAPES, TOL, assert_exact

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
MODES = [dict(), dict(capacity=2), dict(pad_to=4), dict(capacity=1, pad_to=3, drop_policy="score")]


def _routing(T, E, k, seed=0, **m):
    torch.manual_seed(seed)
    return mk.route(torch.randn(T, E), k, **m)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("shape", [s for s, _ in ODD_SHAPES], ids=[n for _, n in ODD_SHAPES])
def test_dispatch_is_an_exact_gather(shape, mode, dtype, backend):
    T, E, k = shape
    r = _routing(T, E, k, **mode)
    x = torch.randn(T, 19).to(dtype)  # d=19: not a multiple of any vector width
    out = mk.dispatch(x, r, backend=backend)
    assert out.shape == (r.num_rows, 19) and out.dtype == dtype
    want = torch.zeros_like(out)
    valid = r.sources >= 0
    want[valid] = x[r.sources[valid].long()]
    assert_exact(out, want, "dispatch")
    assert (out[~valid] == 0).all(), "padding rows are zero"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("shape", [s for s, _ in ODD_SHAPES], ids=[n for _, n in ODD_SHAPES])
def test_combine_matches_loop(shape, mode, dtype, backend):
    T, E, k = shape
    r = _routing(T, E, k, seed=1, **mode)
    y = torch.randn(r.num_rows, 19).to(dtype)
    out = mk.combine(y, r, backend=backend)
    assert out.shape == (T, 19) and out.dtype == dtype
    want = torch.zeros(T, 19, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            s = int(r.slots[t, j])
            if s >= 0:  # dropped assignments contribute zero
                want[t] += float(r.topk_weights[t, j]) * y[s].double()
    # combine accumulates in fp32 and rounds once to the output dtype
    torch.testing.assert_close(out.double(), want, **TOL[dtype])


def test_dispatch_then_combine_with_unit_weights_sums_copies(backend):
    r = _routing(23, 5, 3)
    x = torch.randn(23, 8)
    back = mk.combine(mk.dispatch(x, r, backend=backend), r, weights=torch.ones(23, 3), backend=backend)
    torch.testing.assert_close(back, 3 * x, **TOL[torch.float32])


@pytest.mark.parametrize("mode", MODES, ids=str)
def test_dispatch_combine_gradcheck(mode, backend):
    r = _routing(11, 5, 2, seed=3, **mode)
    x = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mk.dispatch(x, r, backend=backend), (x,))
    y = torch.randn(r.num_rows, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(11, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, w: mk.combine(y, r, weights=w, backend=backend), (y, w))


def test_combine_grad_reaches_logits_and_skips_dropped(backend):
    torch.manual_seed(4)
    logits = torch.randn(12, 3, requires_grad=True)
    r = mk.route(logits, 2, capacity=3, backend=backend)
    assert int(r.num_dropped) > 0
    y = torch.randn(r.num_rows, 5, requires_grad=True)
    out = mk.combine(y, r, backend=backend)
    out.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # rows that no kept assignment points to get zero gradient
    used = torch.zeros(r.num_rows, dtype=torch.bool)
    used[r.slots[r.slots >= 0].long()] = True
    assert (y.grad[~used] == 0).all() and (y.grad[used].abs().sum(1) > 0).all()


def test_dispatch_backward_sums_k_copies_exactly_in_fp64(backend):
    r = _routing(9, 4, 3, seed=5)
    x = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(r.num_rows, 3, dtype=torch.float64)
    mk.dispatch(x, r, backend=backend).backward(g)
    want = torch.zeros(9, 3, dtype=torch.float64)
    for t in range(9):
        for j in range(3):
            want[t] += g[int(r.slots[t, j])]
    torch.testing.assert_close(x.grad, want, **TOL[torch.float64])


def test_empty_batch(backend):
    r = mk.route(torch.zeros(0, 4), 2, backend=backend)
    x = torch.zeros(0, 6, requires_grad=True)
    xe = mk.dispatch(x, r, backend=backend)
    assert xe.shape == (0, 6)
    out = mk.combine(xe, r, backend=backend)
    assert out.shape == (0, 6)
    out.sum().backward()
    assert x.grad.shape == (0, 6)


def test_dropped_assignments_contribute_exactly_zero_even_next_to_inf(backend):
    logits = torch.tensor([[5.0, 0.0], [4.0, 0.0], [3.0, 0.0]])
    r = mk.route(logits, 1, capacity=1, backend=backend)  # tokens 1 and 2 are dropped
    y = torch.full((r.num_rows, 3), float("inf"))
    out = mk.combine(y, r, backend=backend)
    assert torch.isinf(out[0]).all() and (out[1:] == 0).all()
    x = torch.randn(3, 3, requires_grad=True)
    mk.dispatch(x, r, backend=backend).backward(torch.full((r.num_rows, 3), float("inf")))
    assert (x.grad[1:] == 0).all()
