"""Reference detached reconciliation fusion.

out = main + sum_i act(stopgrad(aux[i]) @ weights[i] + bias[i]) over the last (channel) dim, for
token tensors [N, C] and channels-last maps [B, H, W, C]. The link outputs are summed in fp32 in i
order and the result is cast to main.dtype. Backward: grad_main = grad_out; weights and biases get
their gradients from a recomputed pre-activation; the aux inputs get none.
"""

from __future__ import annotations

import torch

from ._util import up

from .grouped import act_bwd, act_fwd

RECONCILE_ACTIVATIONS = ("none", "relu", "gelu", "silu")


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _pre(aux_i, w_i, b_i):
    z = _flat(aux_i) @ w_i
    return z if b_i is None else z + b_i


def reconcile_fwd(main, aux, weights, bias, activation: str) -> torch.Tensor:
    acc = up(_flat(main)).clone()
    for i, (a, w) in enumerate(zip(aux, weights)):
        acc += up(act_fwd(_pre(a, w, bias[i] if bias else None), activation))
    return acc.to(main.dtype).view(main.shape)


def reconcile_bwd(grad_out, aux, weights, bias, activation: str):
    g = _flat(grad_out)
    gws, gbs = [], []
    for i, (a, w) in enumerate(zip(aux, weights)):
        b = bias[i] if bias else None
        gz = act_bwd(_pre(a, w, b), g.to(w.dtype), activation) if activation != "none" else g.to(w.dtype)
        gws.append(_flat(a).t() @ gz)
        if b is not None:
            gbs.append(up(gz).sum(0).to(b.dtype))
    return gws, gbs
