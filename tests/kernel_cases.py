"""Small valid arguments for every kernel of the contract, in contract order (for the conformance
test, which calls kernels directly, below the ops)."""

from __future__ import annotations

import torch

import moe_kernels as mk

T, E, K, D, H = 9, 5, 2, 6, 4


def _plan(capacity=3, pad_to=2):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(T, E, generator=g)
    r = mk.route(logits, K, capacity=capacity, pad_to=pad_to, backend="reference")
    return logits, r


def kernel_args(name: str) -> tuple:
    """Arguments of kernel ``name`` (a fresh set on every call, deterministic)."""
    g = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    logits, r = _plan()
    N = r.num_rows
    x = rnd(T, D)
    w1, w2, b1, b2 = rnd(E, D, H), rnd(E, H, D), rnd(E, H), rnd(E, D)
    W = rnd(3, D, E)
    tids = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1])
    probs = torch.softmax(rnd(T, E), -1)
    buf = torch.full((3, E), 1 / 15)
    aux, lw, lb = [rnd(T, 3), rnd(T, 4)], [rnd(3, D), rnd(4, D)], [rnd(D), rnd(D)]
    gamma, beta = rnd(2, D), rnd(2, D)
    route_opts = (K, "softmax", True, 3, "position", 2, N)
    if name == "route":
        return (logits,) + route_opts
    if name == "plan":  # ids with a not-local one (-1) and one of another rank (E + 2)
        ids = r.topk_ids.clone()
        ids[1, 0], ids[4, 1] = -1, E + 2
        return (ids, r.topk_weights, E, 3, "score", 2, N)
    if name == "route_backward":
        return (rnd(T, K), logits, r.topk_ids, "softmax", True)
    if name == "task_route":
        return (x, W, tids, -1, K, "softmax", True, -1, "position", 1, T * K)
    if name == "task_route_backward":
        lg = torch.zeros(T, E)
        for t in range(T):
            lg[t] = x[t] @ W[tids[t]]
        ids = mk.route(lg, K, backend="reference").topk_ids
        return (rnd(T, E), rnd(T, K), x, W, tids, -1, lg, ids, "softmax", True)
    if name == "dispatch":
        return (x, r.slots, r.sources)
    if name == "dispatch_backward":
        return (rnd(N, D), r.slots)
    if name == "combine":
        return (rnd(N, D), r.topk_weights, r.slots)
    if name == "combine_backward":
        return (rnd(T, D), rnd(N, D), r.topk_weights, r.slots, True, True)
    if name == "grouped_gemm":
        return (rnd(N, D), r.offsets, rnd(E, D, 3))
    if name == "grouped_gemm_backward":
        return (rnd(N, 3), rnd(N, D), r.offsets, rnd(E, D, 3), True, True)
    if name == "grouped_mlp":
        return (rnd(N, D), r.offsets, w1, w2, b1, b2, "gelu")
    if name == "grouped_mlp_backward":
        xe = rnd(N, D)
        z = mk.reference.grouped.grouped_mlp(xe, r.offsets, w1, w2, b1, b2, "gelu")[1]
        return (rnd(N, D), xe, z, r.offsets, w1, w2, b1, b2, "gelu")
    if name == "moe_mlp":
        return (x, r.topk_weights, r.slots, r.sources, r.offsets, w1, w2, b1, b2, "gelu")
    if name == "moe_mlp_backward":
        z = mk.reference.grouped.moe_mlp(x, r.topk_weights, r.slots, r.sources, r.offsets, w1, w2, b1, b2,
                                         "gelu")[1]
        return (rnd(T, D), x, z, r.topk_weights, r.slots, r.sources, r.offsets, w1, w2, b1, b2, "gelu",
                True, True, True)
    if name == "load_balancing_loss":
        return (logits, r.topk_ids, "softmax")
    if name == "load_balancing_loss_backward":
        return (torch.tensor(0.7), logits, r.topk_ids, "softmax")
    if name == "z_loss":
        return (logits,)
    if name == "z_loss_backward":
        return (torch.tensor(1.3), logits)
    if name == "mutual_information_loss":
        return (probs, tids, 3)
    if name == "mutual_information_loss_backward":
        return (torch.tensor(0.5), probs, tids, 3)
    if name == "mutual_information_loss_ema":
        return (probs, tids, buf, 3)
    if name == "mutual_information_loss_ema_backward":
        return (torch.tensor(0.5), probs, tids, buf, 3)
    if name == "mutual_information_ema_update":
        return (buf, probs, tids, 3, 0.98)
    if name == "reconcile":
        return (rnd(T, D), aux, lw, lb, "relu", True, gamma, beta, 1e-5)
    if name == "reconcile_backward":
        _, stats = mk.reference.reconcile.reconcile(rnd(T, D), aux, lw, lb, "relu", True, gamma, beta, 1e-5)
        return (rnd(T, D), aux, lw, lb, "relu", True, gamma, beta, stats)
    raise KeyError(name)
