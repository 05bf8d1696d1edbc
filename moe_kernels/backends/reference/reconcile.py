"""Reference detached reconciliation fusion, optionally with a BatchNorm per link.

out = main + sum_i act(norm_i(stopgrad(aux[i]) @ weights[i] + bias[i])) over the last (channel) dim,
for token tensors [N, C] and channels-last maps [B, H, W, C] (N = every leading dim together). The
link outputs are summed in fp32 (fp64 for fp64 inputs) in i order and the result is cast to the
output dtype. ``main`` may be None: the output is then the sum of the links alone.

norm_i is the identity, or with ``batch_norm`` a BatchNorm in training mode over the N rows of each
channel, exactly ``torch.nn.BatchNorm2d`` in training on the NCHW view of a channels-last map:

    z = aux @ W + b   (the GEMM's output in the dtype, the bias added in the accumulation dtype)
    mean = mean_N(z);  var = mean_N((z - mean)^2)   (biased: normalisation)
    u = (z - mean) * rsqrt(var + eps) * bn_weight + bn_bias

The statistics are computed in the accumulation dtype (fp32, fp64 for fp64). BN parameters are
stacked per link: ``[L, C]`` (L = number of links).

Forward returns ``(out, stats)``: ``stats`` is ``[L, 3, C]`` (per link: batch mean, inv-std and the
biased variance; fp32, fp64 for fp64 inputs) with ``batch_norm``, else empty. The op is functional:
the public wrapper (moe_kernels/ops/reconcile.py) updates the running buffers from these,
``running = momentum * batch + (1 - momentum) * running`` with the variance unbiased (N / (N - 1)),
as torch.nn.BatchNorm2d does. Mean and inv-std are all the backward keeps besides the aux inputs
and the parameters: it recomputes z = aux @ W (one GEMM) instead of saving z or the normalised
copy.

Backward: grad_main = grad_out (no kernel: the op's autograd passes it through); weights get
``aux^T @ gz``, biases ``sum_N gz`` (zero with ``batch_norm``: a bias before a batch-statistics BN
has no effect on the output), bn_weight ``sum_N gu * xhat``, bn_bias ``sum_N gu`` with
gu = d loss / d u. The aux inputs get none.
"""

from __future__ import annotations

import torch

from ._util import acc_dtype, up
from .grouped import act_bwd, act_fwd

RECONCILE_ACTIVATIONS = ("none", "relu", "gelu", "silu")


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _pre(aux_i, w_i, b_i):
    z = _flat(aux_i) @ w_i
    return z if b_i is None else z + b_i


def _like(w, g):
    """g with the strides of w (a weight may be the transposed view of a conv weight)."""
    return g if g.stride() == w.stride() else torch.empty_like(w).copy_(g)


def _pre_bn(aux_i, w_i, b_i):
    """z = aux @ W (rounded once to the dtype, as a GEMM's output is) + b, in the accumulation dtype.

    The bias is added after the upcast: rounding z + b to a 16-bit dtype before the batch statistics
    would put a rounding error of |z + b| into (z - mean), which the normalisation then scales up.
    """
    z = up(_flat(aux_i) @ w_i)
    return z if b_i is None else z + up(b_i)


def _bn_affine(i, zf, mean, invstd, bn_weight, bn_bias):
    """(xhat, u) of link i from its upcast pre-activation."""
    xhat = (zf - mean) * invstd
    u = xhat
    if bn_weight is not None:
        u = u * up(bn_weight[i]).to(zf.dtype)
    if bn_bias is not None:
        u = u + up(bn_bias[i]).to(zf.dtype)
    return xhat, u


def reconcile(main, aux, weights, bias, activation: str, batch_norm: bool = False, bn_weight=None,
                  bn_bias=None, eps: float = 1e-5):
    """-> (out, stats): see the module docstring."""
    ref = main if main is not None else aux[0]
    C = weights[0].shape[1] if main is None else main.shape[-1]
    lead = tuple(ref.shape[:-1])
    adt = acc_dtype(ref.dtype)
    if main is not None:
        acc = up(_flat(main)).clone()
    else:
        acc = torch.zeros(_flat(aux[0]).shape[0], C, dtype=adt, device=ref.device)
    L = len(aux)
    stats = torch.empty(L if batch_norm else 0, 3, C, dtype=adt, device=ref.device)
    for i, (a, w) in enumerate(zip(aux, weights)):
        if not batch_norm:
            acc += up(act_fwd(_pre(a, w, bias[i] if bias else None), activation))
            continue
        zf = _pre_bn(a, w, bias[i] if bias else None)
        mean = zf.mean(0)
        var = (zf - mean).square().mean(0)
        invstd = torch.rsqrt(var + eps)
        stats[i, 0], stats[i, 1], stats[i, 2] = mean, invstd, var
        _, u = _bn_affine(i, zf, mean, invstd, bn_weight, bn_bias)
        acc += act_fwd(u, activation)
    out_dtype = ref.dtype if main is not None else weights[0].dtype
    return acc.to(out_dtype).view(*lead, C), stats


def reconcile_backward(grad_out, aux, weights, bias, activation: str, batch_norm: bool = False,
                  bn_weight=None, bn_bias=None, stats=None):
    """-> (grad_weights, grad_bias, grad_bn_weight [L, C] or None, grad_bn_bias [L, C] or None)."""
    g = _flat(grad_out)
    gws, gbs = [], []
    L, C = len(aux), g.shape[1]
    with_gamma, with_beta = batch_norm and bn_weight is not None, batch_norm and bn_bias is not None
    ggamma = torch.empty(L, C, dtype=bn_weight.dtype, device=g.device) if with_gamma else None
    gbeta = torch.empty(L, C, dtype=bn_bias.dtype, device=g.device) if with_beta else None
    for i, (a, w) in enumerate(zip(aux, weights)):
        b = bias[i] if bias else None
        if not batch_norm:
            gz = act_bwd(_pre(a, w, b), g.to(w.dtype), activation) if activation != "none" else g.to(w.dtype)
            gws.append(_like(w, _flat(a).t() @ gz))
            if b is not None:
                gbs.append(up(gz).sum(0).to(b.dtype))
            continue
        zf = _pre_bn(a, w, b)  # recomputed: the forward kept only the batch statistics
        n = zf.shape[0]
        mean, invstd = stats[i, 0], stats[i, 1]
        xhat, u = _bn_affine(i, zf, mean, invstd, bn_weight, bn_bias)
        gu = act_bwd(u, up(g), activation)
        sg, sgx = gu.sum(0), (gu * xhat).sum(0)
        k = invstd if bn_weight is None else invstd * up(bn_weight[i]).to(zf.dtype)
        gz = k * (gu - sg / n - xhat * (sgx / n))
        gws.append(_like(w, _flat(a).t() @ gz.to(w.dtype)))
        if b is not None:
            gbs.append(torch.zeros_like(b))  # the batch mean cancels a bias before the norm exactly
        if ggamma is not None:
            ggamma[i] = sgx
        if gbeta is not None:
            gbeta[i] = sg
    return gws, gbs, ggamma, gbeta
