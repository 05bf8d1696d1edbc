"""cpu detached reconciliation: oneDNN 1x1 convolutions on channels-last views (fp32) or ``at::mm``
(bf16/fp16), one fused pass for bias, BatchNorm, activation and the sum. float64 (gradcheck) runs the
reference formulas."""

import torch

from ..reference import reconcile as _reference
from ._op import call

_NATIVE = (torch.float32, torch.bfloat16, torch.float16)


def reconcile(main, aux, weights, bias, activation, batch_norm, bn_weight, bn_bias, eps):
    if (main if main is not None else aux[0]).dtype not in _NATIVE:
        return _reference.reconcile(main, aux, weights, bias, activation, batch_norm, bn_weight, bn_bias, eps)
    return call("reconcile", main, aux, weights, bias, activation, batch_norm, bn_weight, bn_bias, eps)


def reconcile_backward(grad_out, aux, weights, bias, activation, batch_norm, bn_weight, bn_bias, stats):
    if grad_out.dtype not in _NATIVE:
        return _reference.reconcile_backward(grad_out, aux, weights, bias, activation, batch_norm, bn_weight,
                                             bn_bias, stats)
    gws, gbs, ggamma, gbeta = call("reconcile_backward", grad_out, aux, weights, bias, activation, batch_norm,
                                   bn_weight, bn_bias, stats)
    return (list(gws), list(gbs), ggamma if batch_norm and bn_weight is not None else None,
            gbeta if batch_norm and bn_bias is not None else None)
