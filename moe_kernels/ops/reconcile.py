"""Detached reconciliation fusion: ``reconcile(main, aux, weights, bias, activation, ...)``.

One custom op, ``moe_kernels::reconcile``, serves the plain links and the links with a BatchNorm
between the GEMM and the activation (``batch_norm=True``: batch statistics, running buffers updated
in place, hence ``mutates_args``). Eval-mode BatchNorm never reaches a kernel: it is folded into the
link weights here (differentiably) and runs as plain links.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .._validation import FLOAT_DTYPES, check, check_choice, check_same_device, check_tensor, fail
from ..backends import resolve
from ..backends.reference._util import acc_dtype
from ..backends.reference.reconcile import RECONCILE_ACTIVATIONS
from ._runner import custom_op, run


# Functional: the op returns the batch statistics and the wrapper below updates the running buffers
# (ATen in-place ops on [L, C]: negligible). torch.library refuses an autograd formula on a custom op
# that mutates its inputs ("Cannot register autograd formula for non-functional operator"), and
# aten's own _native_batch_norm_legit_functional is built the same way.
@custom_op("reconcile", mutates_args=())
def _reconcile(main: Optional[Tensor], aux: list[Tensor], weights: list[Tensor], bias: list[Tensor],
               activation: str, batch_norm: bool, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
               eps: float, backend: str) -> tuple[Tensor, Tensor]:
    out, stats = run(backend, "reconcile", main, aux, weights, bias, activation, batch_norm, bn_weight, bn_bias,
                     eps)
    return out, stats


def _out_like(main, aux, weights):
    if main is not None:
        return torch.empty_like(main)
    return aux[0].new_empty(*aux[0].shape[:-1], weights[0].shape[1])


@_reconcile.register_fake
def _(main, aux, weights, bias, activation, batch_norm, bn_weight, bn_bias, eps, backend):
    out = _out_like(main, aux, weights)
    C = out.shape[-1]
    return out, out.new_empty(len(aux) if batch_norm else 0, 3, C, dtype=acc_dtype(out.dtype))


@custom_op("reconcile_backward", mutates_args=())
def _reconcile_backward(grad_out: Tensor, aux: list[Tensor], weights: list[Tensor], bias: list[Tensor],
                        activation: str, batch_norm: bool, bn_weight: Optional[Tensor],
                        bn_bias: Optional[Tensor], stats: Optional[Tensor], backend: str
                        ) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
    gws, gbs, ggamma, gbeta = run(backend, "reconcile_backward", grad_out, aux, weights, bias, activation,
                                  batch_norm, bn_weight, bn_bias, stats)
    return (list(gws), list(gbs), ggamma if ggamma is not None else grad_out.new_empty(0),
            gbeta if gbeta is not None else grad_out.new_empty(0))


@_reconcile_backward.register_fake
def _(grad_out, aux, weights, bias, activation, batch_norm, bn_weight, bn_bias, stats, backend):
    L, C = len(aux), grad_out.shape[-1]
    gg = grad_out.new_empty(L, C, dtype=bn_weight.dtype) if batch_norm and bn_weight is not None \
        else grad_out.new_empty(0)
    gb = grad_out.new_empty(L, C, dtype=bn_bias.dtype) if batch_norm and bn_bias is not None \
        else grad_out.new_empty(0)
    return [torch.empty_like(w) for w in weights], [torch.empty_like(b) for b in bias], gg, gb


def _reconcile_setup(ctx, inputs, output):
    main, aux, weights, bias, activation, batch_norm, bn_weight, bn_bias, _eps, backend = inputs
    _, stats = output
    ctx.mark_non_differentiable(stats)
    # Saved: the aux inputs (the weight gradient needs them; they are alive anyway as other branches'
    # features), the parameters and, with batch_norm, the [L, 3, C] batch statistics. Not the
    # pre-activation or the normalised copy: the backward recomputes z = aux @ W.
    ctx.save_for_backward(*aux, *weights, *bias, bn_weight, bn_bias, stats if batch_norm else None)
    ctx.sizes = (len(aux), len(bias))
    ctx.opts = (activation, backend, batch_norm)
    ctx.has_main = main is not None


def _reconcile_autograd(ctx, grad, _grad_stats):
    n, nb = ctx.sizes
    saved = ctx.saved_tensors
    aux, weights, bias = list(saved[:n]), list(saved[n:2 * n]), list(saved[2 * n:2 * n + nb])
    bn_weight, bn_bias, stats = saved[2 * n + nb:]
    activation, backend, batch_norm = ctx.opts
    gws, gbs, ggamma, gbeta = _reconcile_backward(grad.contiguous(), aux, weights, bias, activation, batch_norm,
                                                  bn_weight, bn_bias, stats, backend)
    # main gets the incoming gradient unchanged; the aux inputs get none (stop-gradient)
    return ((grad if ctx.has_main else None), [None] * n, list(gws), list(gbs), None, None,
            (ggamma if bn_weight is not None else None), (gbeta if bn_bias is not None else None), None, None)


_reconcile.register_autograd(_reconcile_autograd, setup_context=_reconcile_setup)


PerLink = Union[Tensor, Sequence[Tensor], None]


def _per_link(value: PerLink, op: str, name: str, L: int, C: int, dtypes, ref_name: str, ref: Tensor, *,
              buffer: bool):
    """A per-link [C] parameter as one [L, C] tensor (stacked when given as a list); a running
    buffer as (the [L, C] tensor, None) or (None, the list), as given: it is updated in place."""
    if value is None:
        return None, None
    names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
    if isinstance(value, Tensor):
        check_tensor(value, op, name, ndim=2)
        if tuple(value.shape) != (L, C):
            fail(op, name, f"must be [L, C]=[{L}, {C}] (one row per link) or a list of L [C] tensors, "
                           f"got shape {tuple(value.shape)}")
        check(value.dtype in dtypes, op, name, f"must have dtype in ({names}), got {value.dtype}")
        check_same_device(op, ref_name, ref, **{name: value})
        if buffer:
            check(not value.requires_grad, op, name, "is a running buffer updated in place and must not "
                                                     "require grad")
        return value, None
    if not isinstance(value, (list, tuple)):
        fail(op, name, f"must be a Tensor [L, C], a list of L [C] tensors or None, "
                       f"got {type(value).__name__}")
    value = list(value)
    check(len(value) == L, op, name, f"must have one entry per aux input ({L}), got {len(value)}")
    for i, t in enumerate(value):
        check_tensor(t, op, f"{name}[{i}]", ndim=1)
        check(t.shape[0] == C, op, f"{name}[{i}]", f"must have shape [{C}], got {tuple(t.shape)}")
        check(t.dtype in dtypes, op, f"{name}[{i}]", f"must have dtype in ({names}), got {t.dtype}")
        check(t.dtype == value[0].dtype, op, f"{name}[{i}]",
              f"must have the dtype of {name}[0] ({value[0].dtype}), got {t.dtype}")
        check_same_device(op, ref_name, ref, **{f"{name}[{i}]": t})
        if buffer:
            check(not t.requires_grad, op, f"{name}[{i}]", "is a running buffer updated in place and must "
                                                           "not require grad")
    if buffer:
        return None, value
    return (torch.stack(value) if value else None), None


def reconcile(main: Optional[Tensor], aux: Sequence[Tensor], weights: Sequence[Tensor],
              bias: Optional[Sequence[Tensor]] = None, activation: Optional[str] = None, *,
              batch_norm: bool = False, bn_weight: PerLink = None, bn_bias: PerLink = None,
              running_mean: PerLink = None, running_var: PerLink = None, training: bool = True,
              momentum: float = 0.1, eps: float = 1e-5, backend: Optional[str] = None) -> Tensor:
    """Detached reconciliation: ``main + sum_i act(norm_i(stopgrad(aux[i]) @ weights[i] + bias[i]))``.

    The channel dimension is the last one: token tensors ``[N, C]`` or channels-last maps
    ``[B, H, W, C]`` (for an NCHW tensor in ``channels_last`` memory format pass
    ``t.permute(0, 2, 3, 1)``, which is contiguous). A 1x1 convolution is this matmul. All links are
    computed in one op: no concatenated copy of the aux inputs, no per-link output tensor.

    Args:
        main: ``[..., C]`` the branch being fused into; receives the incoming gradient. ``None``:
            return the sum of the links alone (a new tensor shaped ``aux[0].shape[:-1] + (C,)``).
        aux: list of ``[..., C_i]`` features of other branches (same leading dims as ``main``);
            they are treated as detached and receive no gradient.
        weights: list of ``[C_i, C]`` link weights (the transpose of a 1x1 conv weight): contiguous,
            or the transposed view ``conv.weight.view(C, C_i).t()`` itself (no copy; the gradient
            then has the same strides).
        bias: optional list of ``[C]`` link biases (before the norm, like a conv bias).
        activation: ``None``/``"none"``, ``"relu"``, ``"gelu"`` or ``"silu"`` per link.
        batch_norm: put a BatchNorm over the channels between each link's GEMM and its activation,
            ``torch.nn.BatchNorm2d`` semantics (with ``training``: statistics over every leading
            dim of the batch; the backward keeps only the per-channel mean and inv-std and
            recomputes ``aux @ W``).
        bn_weight, bn_bias: the BN affine parameters per link (``gamma``, ``beta``): a list of L
            ``[C]`` tensors or one ``[L, C]`` tensor; ``None`` for ``affine=False``. dtype: that of
            ``main`` or float32.
        running_mean, running_var: the BN running buffers per link (same forms), updated in place
            in training mode (``momentum`` * batch value + (1 - ``momentum``) * old; the variance
            unbiased, ``N / (N - 1)``); ``None`` for ``track_running_stats=False``.
        training: batch statistics (``True``) or the running ones, folded into the link weights
            (``False``: ``W' = W * s``, ``b' = (b - running_mean) * s + bn_bias`` with
            ``s = bn_weight / sqrt(running_var + eps)``; differentiable in W, b, bn_weight, bn_bias).
        momentum: the running-average factor (pass ``1 / num_batches_tracked`` for
            ``momentum=None`` BatchNorm modules, as they do).
        eps: added to the variance.

    Returns:
        A new tensor shaped like ``main``. With an empty ``aux`` list it is a copy of ``main``.
    """
    op = "reconcile"
    act = "none" if activation is None else activation
    check_choice(act, op, "activation", RECONCILE_ACTIVATIONS)
    aux, weights = list(aux), list(weights)
    bias = None if bias is None else list(bias)
    if main is None:
        check(len(aux) > 0, op, "main", "may be None only with at least one aux input (it gives the "
                                        "output's shape otherwise)")
        check_tensor(aux[0], op, "aux[0]", ndim=range(2, 9), dtypes=FLOAT_DTYPES)
        check(len(weights) == len(aux), op, "weights",
              f"must have one entry per aux input ({len(aux)}), got {len(weights)}")
        check_tensor(weights[0], op, "weights[0]", ndim=2, dtypes=FLOAT_DTYPES, contiguous=False)
        ref, ref_name = aux[0], "aux[0]"
        C, lead = weights[0].shape[1], tuple(aux[0].shape[:-1])
    else:
        check_tensor(main, op, "main", ndim=range(1, 9), dtypes=FLOAT_DTYPES)
        check(main.dim() >= 2, op, "main", f"must be [N, C] or [..., C], got shape {tuple(main.shape)}")
        ref, ref_name = main, "main"
        C, lead = main.shape[-1], tuple(main.shape[:-1])
    check(len(weights) == len(aux), op, "weights",
          f"must have one entry per aux input ({len(aux)}), got {len(weights)}")
    if bias is not None:
        check(len(bias) == len(aux), op, "bias", f"must have one entry per aux input ({len(aux)}), "
                                                  f"got {len(bias)}")
    for i, (a, w) in enumerate(zip(aux, weights)):
        check_tensor(a, op, f"aux[{i}]", dtypes=FLOAT_DTYPES)
        check_tensor(w, op, f"weights[{i}]", ndim=2, dtypes=FLOAT_DTYPES, contiguous=False)
        check(w.is_contiguous() or w.t().is_contiguous(), op, f"weights[{i}]",
              f"must be contiguous or the transpose of a contiguous tensor (e.g. a 1x1 conv weight "
              f"w.view(C_out, C_in).t()), got strides {w.stride()} for shape {tuple(w.shape)}")
        if tuple(a.shape[:-1]) != lead:
            fail(op, f"aux[{i}]", f"must have the leading dims of {ref_name} {lead}, got {tuple(a.shape)}")
        if tuple(w.shape) != (a.shape[-1], C):
            fail(op, f"weights[{i}]", f"must have shape [C_in, C_out]={(a.shape[-1], C)}, "
                                      f"got {tuple(w.shape)}")
        for name, t in ((f"aux[{i}]", a), (f"weights[{i}]", w)):
            check(t.dtype == ref.dtype, op, name, f"must have the dtype of {ref_name} ({ref.dtype}), "
                                                  f"got {t.dtype}")
        check_same_device(op, ref_name, ref, **{f"aux[{i}]": a, f"weights[{i}]": w})
        if bias is not None:
            b = bias[i]
            check_tensor(b, op, f"bias[{i}]", ndim=1, dtypes=(ref.dtype,))
            check(b.shape[0] == C, op, f"bias[{i}]", f"must have shape [{C}], got {tuple(b.shape)}")
            check_same_device(op, ref_name, ref, **{f"bias[{i}]": b})

    bn_args = {"bn_weight": bn_weight, "bn_bias": bn_bias, "running_mean": running_mean,
               "running_var": running_var}
    check(isinstance(batch_norm, bool), op, "batch_norm", f"must be a bool, got {type(batch_norm).__name__}")
    if not batch_norm:
        for name, v in bn_args.items():
            check(v is None, op, name, "is only used with batch_norm=True")
        name = resolve(op, ref.device, backend)
        # stop-gradient on the aux inputs is part of the op's contract: detach here so autograd never
        # tracks them, whatever the backend.
        return _reconcile(main, [a.detach() for a in aux], weights, bias or [], act, False, None, None, 1e-5,
                          name)[0]

    check(isinstance(training, bool), op, "training", f"must be a bool, got {type(training).__name__}")
    check(isinstance(eps, numbers.Real) and not isinstance(eps, bool) and eps > 0, op, "eps",
          f"must be a float > 0, got {eps!r}")
    check(isinstance(momentum, numbers.Real) and not isinstance(momentum, bool) and 0.0 <= momentum <= 1.0,
          op, "momentum", f"must be a float in [0, 1] (for momentum=None BatchNorm pass "
                          f"1 / num_batches_tracked), got {momentum!r}")
    check((running_mean is None) == (running_var is None), op,
          "running_var" if running_var is None else "running_mean",
          "must be given together with " + ("running_mean" if running_var is None else "running_var"))
    L = len(aux)
    dtypes = tuple(dict.fromkeys((ref.dtype, torch.float32)))
    gamma, _ = _per_link(bn_weight, op, "bn_weight", L, C, dtypes, ref_name, ref, buffer=False)
    beta, _ = _per_link(bn_bias, op, "bn_bias", L, C, dtypes, ref_name, ref, buffer=False)
    rm, rm_list = _per_link(running_mean, op, "running_mean", L, C, dtypes, ref_name, ref, buffer=True)
    rv, rv_list = _per_link(running_var, op, "running_var", L, C, dtypes, ref_name, ref, buffer=True)
    has_stats = running_mean is not None
    if has_stats and L:
        rm_dt = (rm if rm is not None else rm_list[0]).dtype
        rv_dt = (rv if rv is not None else rv_list[0]).dtype
        check(rm_dt == rv_dt, op, "running_var",
              f"must have the dtype of running_mean ({rm_dt}), got {rv_dt}")
    name = resolve(op, ref.device, backend)
    aux = [a.detach() for a in aux]

    if not training:
        check(has_stats, op, "running_mean", "is needed with training=False (the running statistics "
                                             "are folded into the link weights)")
        if L == 0:
            return _reconcile(main, aux, weights, bias or [], act, False, None, None, 1e-5, name)[0]
        if rm is None:
            rm, rv = torch.stack(rm_list), torch.stack(rv_list)
        # s = gamma / sqrt(var + eps); W' = W * s; b' = (b - mean) * s + beta, in the accumulation dtype
        adt = acc_dtype(ref.dtype)
        s = torch.rsqrt(rv.to(adt) + eps)
        if gamma is not None:
            s = s * gamma.to(adt)
        ws = [(w.to(adt) * s[i]).to(w.dtype) for i, w in enumerate(weights)]
        bs = []
        for i in range(L):
            b = -rm[i].to(adt) if bias is None else bias[i].to(adt) - rm[i].to(adt)
            b = b * s[i]
            if beta is not None:
                b = b + beta[i].to(adt)
            bs.append(b.to(ref.dtype))
        return _reconcile(main, aux, ws, bs, act, False, None, None, 1e-5, name)[0]

    n = 1
    for d in lead:
        n *= d
    if L and n <= 1:
        fail(op, ref_name, f"has {n} value(s) per channel (leading dims {lead}): batch_norm in training "
                           "mode needs more than 1 value per channel, as torch.nn.BatchNorm2d does "
                           "('Expected more than 1 value per channel when training')")
    out, stats = _reconcile(main, aux, weights, bias or [], act, True, gamma, beta, float(eps), name)
    if has_stats and L:
        # torch.nn.BatchNorm2d's update: momentum * batch + (1 - momentum) * running, the variance
        # unbiased; in place on the caller's buffers (one [L, C] update when given stacked)
        with torch.no_grad():
            m = float(momentum)
            new_mean = stats[:, 0] * m
            new_var = stats[:, 2] * (m * n / (n - 1))
            if rm_list is None:
                rm.mul_(1 - m).add_(new_mean.to(rm.dtype))
                rv.mul_(1 - m).add_(new_var.to(rv.dtype))
            else:
                for i in range(L):
                    rm_list[i].mul_(1 - m).add_(new_mean[i].to(rm_list[i].dtype))
                    rv_list[i].mul_(1 - m).add_(new_var[i].to(rv_list[i].dtype))
    return out
