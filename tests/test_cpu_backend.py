"""The ``cpu`` backend's own machinery: the buffer pool behind its large buffers."""

import pytest
import torch

import moe_kernels as mk

from .conftest import use_backend


@pytest.fixture(autouse=True)
def _cpu():
    use_backend("cpu")


def test_moe_mlp_pooled_buffers_are_never_shared():
    """Buffers of 1 MiB and more come from the workspace pool: what is still referenced (a kept
    .grad, a pending backward's z) must never be handed out again, and results must not change."""
    from moe_kernels import cpu_backend

    torch.manual_seed(3)
    T, E, k, d, h = 512, 4, 2, 256, 256  # z, the expert gradients and the scratch are >= 1 MiB
    w1 = (torch.randn(E, d, h) / d ** 0.5).requires_grad_()
    w2 = (torch.randn(E, h, d) / h ** 0.5).requires_grad_()
    xs = [torch.randn(T, d) for _ in range(3)]
    routes = [mk.route(torch.randn(T, E), k) for _ in range(3)]
    # two forwards alive at once, then their backwards: z of the first must survive the second forward
    outs = [mk.moe_mlp(x, r, w1, w2, backend="cpu") for x, r in zip(xs[:2], routes[:2])]
    kept = []
    for o in outs:
        kept.append(torch.autograd.grad(o.square().sum(), [w1, w2]))
    for (x, r), (g1, g2) in zip(zip(xs, routes), kept):
        ref = torch.autograd.grad(mk.moe_mlp(x, r, w1, w2, backend="reference").square().sum(), [w1, w2])
        # sums over 256-1024 rows: entries near zero are compared at the scale of the largest
        torch.testing.assert_close(g1, ref[0], rtol=1e-5, atol=1e-5 * float(ref[0].abs().max()))
        torch.testing.assert_close(g2, ref[1], rtol=1e-5, atol=1e-5 * float(ref[1].abs().max()))
    snapshot = [g.clone() for pair in kept for g in pair]
    assert cpu_backend.workspace_bytes() >= 4 * (T * k * h * 4)  # z, y and the two expert gradients
    # more steps while the old gradients are still held: they must not change
    for _ in range(2):
        torch.autograd.grad(mk.moe_mlp(xs[2], routes[2], w1, w2, backend="cpu").square().sum(), [w1, w2])
    for a, b in zip([g for pair in kept for g in pair], snapshot):
        assert torch.equal(a, b), "a pooled buffer still referenced was reused"
    held = cpu_backend.workspace_bytes()
    del kept, outs
    assert cpu_backend.empty_cache() > 0
    assert cpu_backend.workspace_bytes() < held


def test_moe_mlp_pool_under_concurrent_experts():
    """Experts run concurrently on 2+ threads and each worker takes its scratch from the pool at the
    same moment: every step must give the first step's results (a buffer handed to two workers at
    once corrupted most steps before the pool made its views under its lock)."""
    torch.manual_seed(6)
    T, E, k, d, h = 8192, 8, 2, 256, 256  # per-worker scratch ~2 MiB: pooled
    w1 = (torch.randn(E, d, h) / d ** 0.5).requires_grad_()
    w2 = (torch.randn(E, h, d) / h ** 0.5).requires_grad_()
    x, r = torch.randn(T, d, requires_grad=True), mk.route(torch.randn(T, E), k)
    before = torch.get_num_threads()

    def step():
        out = mk.moe_mlp(x, r, w1, w2, backend="cpu")
        return [out.detach()] + list(torch.autograd.grad(out.square().sum(), [x, w1, w2]))

    try:
        torch.set_num_threads(2)
        first = step()
        for i in range(6):
            for a, b in zip(step(), first):
                assert torch.equal(a, b), f"step {i}"
    finally:
        torch.set_num_threads(before)


def test_pool_does_not_pile_up_buffers_for_shrinking_shapes():
    """A shape that shrinks call after call misses every time; the idle buffers it leaves behind
    are freed once they exceed 64 MiB, so the pool stays bounded (at::empty leaves pages untouched:
    cheap even at these sizes)."""
    from moe_kernels import cpu_backend

    cpu_backend.empty_cache()
    torch.manual_seed(0)
    T, E, k = 64, 4, 2
    r = mk.route(torch.randn(T, E), k)
    rows = 48 << 20  # bytes of the first dispatch output, then 0.7x each call
    for _ in range(15):
        d = max(rows // (r.num_rows * 4), 1)
        mk.dispatch(torch.randn(T, d), r, backend="cpu")
        rows = int(rows * 0.7)
    assert cpu_backend.workspace_bytes() <= (64 << 20) + (48 << 20), cpu_backend.workspace_bytes()
