"""Reference dispatch (gather into expert-grouped rows) and combine (weighted gather-sum back).

dispatch:  out[r] = x[sources[r]], zero where sources[r] == -1 (padding rows).
combine:   out[t] = sum_j w[t, j] * y[slots[t, j]] over kept assignments (slots >= 0), accumulated
           in fp32 in j order, returned in y.dtype; a dropped assignment adds 0 * w (nothing for a
           finite weight, NaN for a non-finite one).
Backward of dispatch is the gather-sum grad_x[t] = sum_j g[slots[t, j]] (no atomics: every row is
read, never scattered into); backward of combine writes each kept row exactly once.
"""

from __future__ import annotations

import torch

from ._util import acc_dtype, up


def dispatch(x: torch.Tensor, slots: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    if x.shape[0] == 0:  # then every row is padding
        return x.new_zeros(sources.shape[0], x.shape[1])
    out = x.index_select(0, sources.clamp(min=0).long())
    return out.masked_fill_((sources < 0).unsqueeze(1), 0)


def _gather_sum(y: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    T, k = slots.shape
    acc = torch.zeros(T, y.shape[1], dtype=acc_dtype(y.dtype), device=y.device)
    for j in range(k):  # fixed j order keeps the fp32 sum deterministic
        s = slots[:, j]
        valid = s >= 0
        rows = up(y.index_select(0, s.clamp(min=0).long()))
        if weights is None:
            # select, don't multiply by 0: a dropped slot's stand-in row may hold inf or NaN
            acc += torch.where(valid[:, None], rows, 0.0)
            continue
        w = up(weights[:, j])[:, None]
        # a dropped assignment adds 0 for a finite weight and NaN for a non-finite one (0 * w), so a
        # token with NaN weights (contract.NONFINITE_TOKEN) never vanishes silently
        acc += torch.where(valid[:, None], rows * w, torch.where(torch.isfinite(w), 0.0, torch.nan))
    return acc


def dispatch_backward(grad_out: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return _gather_sum(grad_out, slots, None).to(grad_out.dtype)


def combine(y: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return _gather_sum(y, slots, weights).to(y.dtype)


def combine_backward(grad_out: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor,
                     need_y: bool, need_weights: bool):
    T, k = slots.shape
    flat = slots.reshape(-1).long()
    valid = flat >= 0
    token = torch.arange(T, device=slots.device).repeat_interleave(k)
    gy = gw = None
    if need_y:
        # each kept row written once; dropped assignments write to a spare row N, cut off after
        gy = y.new_zeros(y.shape[0] + 1, y.shape[1])
        contrib = up(grad_out)[token] * up(weights.reshape(-1))[:, None]
        gy.index_copy_(0, torch.where(valid, flat, y.shape[0]), contrib.to(y.dtype))
        gy = gy[:y.shape[0]]
    if need_weights:
        rows = up(y.index_select(0, flat.clamp(min=0)))
        dots = (rows * up(grad_out)[token]).sum(-1)
        gw = torch.where(valid, dots, 0.0).view(T, k).to(weights.dtype)
    return gy, gw
