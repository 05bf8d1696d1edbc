"""Shared test utilities: per-dtype tolerances and an independent brute-force routing oracle."""

from __future__ import annotations

import math

import torch

# Tolerances for floating results compared with a reference composed of plain torch ops.
# fp64: only summation order differs -> ~1e-12 relative.
# fp32: summation order in GEMMs of K <= 1024 gives ~sqrt(K)*eps32 ~ 4e-6 relative.
# fp16: 10-bit mantissa (eps 9.8e-4); inputs to each GEMM are rounded once -> a few ulp.
# bf16: 7-bit mantissa (eps 7.8e-3); same reasoning -> a few ulp, so 2e-2 relative.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}

# The odd-shape matrix: (T, E, k) with a label saying what each exercises.
ODD_SHAPES = [
    ((1, 4, 1), "T=1, k=1"),
    ((1, 5, 5), "T=1, k=E"),
    ((7, 2, 2), "T below any tile, k=E=2"),
    ((37, 7, 2), "T prime, E prime"),
    ((37, 7, 7), "k=E (every token to every expert)"),
    ((64, 13, 3), "E=13 prime, T multiple of 16"),
    ((100, 1, 1), "E=1"),
    ((129, 8, 4), "T=2^7+1"),
]


def tensors(obj):
    """The tensors in ``obj`` (a tensor, or nested lists / tuples; other items skipped), in order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from tensors(o)


def assert_exact(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.equal(a, b), f"{what}: not bit-identical; first diff at {(a != b).nonzero()[:3].tolist()}"


def brute_force_plan(logits: torch.Tensor, k: int, *, score="softmax", capacity=-1,
                     drop_policy="position", pad_to=1, num_rows=None):
    """Plan built with plain Python loops from the contract's words (an oracle independent of the
    vectorised reference)."""
    T, E = logits.shape
    lf = logits.double() if logits.dtype == torch.float64 else logits.float()
    s = torch.softmax(lf, -1) if score == "softmax" else torch.sigmoid(lf)
    s = s.tolist()
    lv = lf.tolist()  # the contract ranks by the upcast logit (monotone in either score)
    ids = [sorted(range(E), key=lambda e: (-lv[t][e], e))[:k] for t in range(T)]
    # assignments a = t*k + j in token order
    per_expert = {e: [] for e in range(E)}
    for t in range(T):
        for j in range(k):
            per_expert[ids[t][j]].append((t, j))
    keep = {}
    for e, lst in per_expert.items():
        if capacity < 0:
            kept = lst
        elif drop_policy == "position":
            kept = lst[:capacity]
        else:
            kept = sorted(lst, key=lambda tj: (-s[tj[0]][e], tj[0]))[:capacity]
        for tj in lst:
            keep[tj] = tj in kept
    counts = [sum(keep[tj] for tj in per_expert[e]) for e in range(E)]
    offsets = [0]
    for e in range(E):
        offsets.append(offsets[-1] + math.ceil(counts[e] / pad_to) * pad_to)
    slots = [[-1] * k for _ in range(T)]
    for e in range(E):
        r = offsets[e]
        for (t, j) in per_expert[e]:  # token order
            if keep[(t, j)]:
                slots[t][j] = r
                r += 1
    n = offsets[-1] if num_rows is None else num_rows
    sources = [-1] * n
    for t in range(T):
        for j in range(k):
            if slots[t][j] >= 0:
                sources[slots[t][j]] = t
    dropped = sum(1 for v in keep.values() if not v)
    i32 = dict(dtype=torch.int32)
    return dict(topk_ids=torch.tensor(ids, **i32).view(T, k), counts=torch.tensor(counts, **i32),
                offsets=torch.tensor(offsets, **i32), slots=torch.tensor(slots, **i32).view(T, k),
                sources=torch.tensor(sources, **i32), num_dropped=dropped)


def check_plan_invariants(r, *, capacity=-1, pad_to=1) -> None:
    """Properties every plan satisfies, whatever the backend."""
    T, k = r.topk_ids.shape
    E = r.counts.shape[0]
    N = r.sources.shape[0]
    slots, sources = r.slots.long(), r.sources.long()
    counts, offsets = r.counts.long(), r.offsets.long()
    assert r.topk_ids.dtype == r.counts.dtype == r.offsets.dtype == r.slots.dtype == r.sources.dtype == torch.int32
    # distinct experts per token
    if T:
        assert (r.topk_ids.sort(1).values[:, 1:] != r.topk_ids.sort(1).values[:, :-1]).all()
    # offsets vs counts
    assert offsets[0] == 0
    padded = (counts + pad_to - 1) // pad_to * pad_to
    assert torch.equal(offsets[1:] - offsets[:-1], padded)
    assert int(offsets[-1]) <= N
    # counts = kept assignments per expert
    kept = slots >= 0
    assert torch.equal(counts, torch.bincount(r.topk_ids.long()[kept], minlength=E))
    # sources inverts slots
    tok = torch.arange(T).unsqueeze(1).expand(T, k)
    assert torch.equal(sources[slots[kept]], tok[kept])
    assert int((sources >= 0).sum()) == int(kept.sum())
    # each kept row lies in its expert's segment, rows in token order inside the segment
    for e in range(E):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        seg = sources[lo:lo + int(counts[e])]
        assert (seg >= 0).all()
        assert (seg[1:] > seg[:-1]).all(), "token order inside an expert"
        assert (sources[lo + int(counts[e]):hi] == -1).all(), "segment padding rows"
    assert (sources[int(offsets[-1]):] == -1).all(), "tail rows"
    # every kept assignment's row lies in the segment of the expert it chose
    seg = torch.searchsorted(offsets, slots[kept], right=True) - 1
    assert torch.equal(seg, r.topk_ids.long()[kept])
    # drops
    assert int(r.num_dropped) == int((~kept).sum())
    if capacity < 0:
        assert int(r.num_dropped) == 0
    else:
        assert (counts <= capacity).all()
        chosen = torch.bincount(r.topk_ids.long().reshape(-1), minlength=E)
        assert int(r.num_dropped) == int((chosen - capacity).clamp(min=0).sum())
