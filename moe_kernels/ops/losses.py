"""Auxiliary routing losses as custom ops (formulas: :mod:`moe_kernels.reference.losses`)."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .._validation import FLOAT_DTYPES, INT_DTYPES, check, check_int, check_same_device, check_tensor
from ..backends import resolve
from ..backends.reference._util import acc_dtype
from ..types import Routing
from ._runner import custom_op, run


def _scalar_like(t: Tensor) -> Tensor:
    return t.new_empty((), dtype=acc_dtype(t.dtype))


# ---- load balancing

@custom_op("load_balancing_loss", mutates_args=())
def _load_balancing_loss(logits: Tensor, topk_ids: Tensor, score: str, backend: str) -> Tensor:
    return run(backend, "load_balancing_loss", logits, topk_ids, score)


@custom_op("load_balancing_loss_backward", mutates_args=())
def _load_balancing_loss_backward(grad: Tensor, logits: Tensor, topk_ids: Tensor, score: str, backend: str) -> Tensor:
    return run(backend, "load_balancing_loss_backward", grad, logits, topk_ids, score)


# ---- z-loss

@custom_op("z_loss", mutates_args=())
def _z_loss(logits: Tensor, backend: str) -> Tensor:
    return run(backend, "z_loss", logits)


@custom_op("z_loss_backward", mutates_args=())
def _z_loss_backward(grad: Tensor, logits: Tensor, backend: str) -> Tensor:
    return run(backend, "z_loss_backward", grad, logits)


# ---- mutual information (batch form, Eq. 3) and EMA-buffer form (Eq. 5)

@custom_op("mutual_information_loss", mutates_args=())
def _mi_loss(probs: Tensor, task_ids: Tensor, num_tasks: int, backend: str) -> Tensor:
    return run(backend, "mutual_information_loss", probs, task_ids, num_tasks)


@custom_op("mutual_information_loss_backward", mutates_args=())
def _mi_loss_backward(grad: Tensor, probs: Tensor, task_ids: Tensor, num_tasks: int, backend: str) -> Tensor:
    return run(backend, "mutual_information_loss_backward", grad, probs, task_ids, num_tasks)


@custom_op("mutual_information_loss_ema", mutates_args=())
def _mi_loss_ema(probs: Tensor, task_ids: Tensor, buffer: Tensor, num_tasks: int, backend: str) -> Tensor:
    return run(backend, "mutual_information_loss_ema", probs, task_ids, buffer, num_tasks)


@custom_op("mutual_information_loss_ema_backward", mutates_args=())
def _mi_loss_ema_backward(grad: Tensor, probs: Tensor, task_ids: Tensor, buffer: Tensor, num_tasks: int,
                          backend: str) -> Tensor:
    return run(backend, "mutual_information_loss_ema_backward", grad, probs, task_ids, buffer, num_tasks)


@custom_op("mutual_information_ema_update", mutates_args=("buffer",))
def _mi_ema_update(buffer: Tensor, probs: Tensor, task_ids: Tensor, num_tasks: int, momentum: float,
                   backend: str) -> None:
    """In place: B(D_i,:) <- m B(D_i,:) + (1-m) P(D_i,:) for the tasks present (checked first)."""
    run(backend, "mutual_information_ema_update", buffer, probs, task_ids, num_tasks, momentum)


@_mi_ema_update.register_fake
def _(buffer, probs, task_ids, num_tasks, momentum, backend):
    return None


for _fwd in (_load_balancing_loss, _z_loss, _mi_loss, _mi_loss_ema):
    _fwd.register_fake(lambda x, *rest: _scalar_like(x))
for _bwd in (_load_balancing_loss_backward, _z_loss_backward, _mi_loss_backward, _mi_loss_ema_backward):
    _bwd.register_fake(lambda g, x, *rest: torch.empty_like(x))


def _setup_all(ctx, inputs, output):
    tensors = [t for t in inputs if isinstance(t, Tensor)]
    ctx.save_for_backward(*tensors)
    ctx.rest = [a for a in inputs if not isinstance(a, Tensor)]
    ctx.n_inputs = len(inputs)


def _autograd(fwd, bwd_op):
    def backward(ctx, grad):
        grad_x = bwd_op(grad.contiguous(), *ctx.saved_tensors, *ctx.rest)
        return (grad_x,) + (None,) * (ctx.n_inputs - 1)

    fwd.register_autograd(backward, setup_context=_setup_all)


# tensor inputs precede the non-tensor ones in every loss signature, so saved tensors + rest
# replays the forward arguments in order.
_autograd(_load_balancing_loss, _load_balancing_loss_backward)
_autograd(_z_loss, _z_loss_backward)
_autograd(_mi_loss, _mi_loss_backward)
_autograd(_mi_loss_ema, _mi_loss_ema_backward)


# ---------------------------------------------------------------- public API

def _check_logits(op, logits):
    check_tensor(logits, op, "logits", ndim=2, dtypes=FLOAT_DTYPES)
    check(logits.shape[1] >= 1, op, "logits", "must have at least one expert column")


def load_balancing_loss(logits: Tensor, routing: Routing, *, backend: Optional[str] = None) -> Tensor:
    """Switch-Transformer load-balancing loss, ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of the T*k top-k assignments that chose expert e (before capacity
    drops), ``P_e`` the mean score of e over tokens (softmax, or sigmoid normalised per token,
    following ``routing.score``). Equals 1 for perfectly uniform routing; 0 for ``T = 0``.
    Differentiable w.r.t. ``logits`` (through ``P``). Returns an fp32 scalar (fp64 for fp64).
    """
    op = "load_balancing_loss"
    _check_logits(op, logits)
    check(isinstance(routing, Routing), op, "routing", "must be a moe_kernels.Routing")
    check(routing.topk_ids.shape[0] == logits.shape[0] and routing.num_experts == logits.shape[1],
          op, "routing", f"was built for [T, E]={(routing.num_tokens, routing.num_experts)} but "
                         f"logits have shape {tuple(logits.shape)}")
    check_same_device(op, "logits", logits, **{"routing.topk_ids": routing.topk_ids})
    return _load_balancing_loss(logits, routing.topk_ids, routing.score, resolve(op, logits.device, backend))


def z_loss(logits: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Router z-loss (ST-MoE): ``mean_t logsumexp(logits_t)^2``; 0 for ``T = 0``."""
    op = "z_loss"
    _check_logits(op, logits)
    return _z_loss(logits, resolve(op, logits.device, backend))


def _task_tensor(op, task_ids, num_tasks, probs) -> Tensor:
    T = probs.shape[0]
    if isinstance(task_ids, Tensor):
        check_tensor(task_ids, op, "task_ids", ndim=1, dtypes=INT_DTYPES)
        check(task_ids.shape[0] == T, op, "task_ids",
              f"must have one entry per row of probs ({T}), got shape {tuple(task_ids.shape)}")
        check_same_device(op, "probs", probs, task_ids=task_ids)
        return task_ids
    check_int(task_ids, op, "task_ids", lo=0, hi=num_tasks - 1)
    return torch.full((T,), int(task_ids), dtype=torch.int64, device=probs.device)


def _check_probs(op, probs):
    check_tensor(probs, op, "probs", ndim=2, dtypes=FLOAT_DTYPES)


def mutual_information_loss(probs: Tensor, task_ids: Union[int, Tensor], num_tasks: int, *,
                            backend: Optional[str] = None) -> Tensor:
    """Mod-Squad's mutual-information loss over one batch (Eq. 3 of MTHL: "An Efficient General-Purpose
    Modular Vision Model via Multi-Task Heterogeneous Training", arXiv:2306.17165; from "Mod-Squad:
    Designing Mixtures of Experts As Modular Multi-Task Learners", arXiv:2212.08066).

    ``L = -sum P(D,E) log P(D,E) + sum P(D) log P(D) + sum P(E) log P(E) = -I(D; E)``, with
    ``P(D_i) = 1/M``, ``P(E|D_i)`` the normalised sum of ``probs`` over the tokens of task i
    (tasks absent from the batch contribute 0). Minimising it makes experts task-specific.

    Args:
        probs: ``[T, E]`` non-negative gate values per token (softmax scores, or the sparse top-k
            gates ``routing.dense_weights()`` as in MTHL's Eq. 2).
        task_ids: ``[T]`` task of each token, or one int for the whole batch.
        num_tasks: M.
    """
    op = "mutual_information_loss"
    _check_probs(op, probs)
    check_int(num_tasks, op, "num_tasks", lo=1)
    ids = _task_tensor(op, task_ids, num_tasks, probs)
    return _mi_loss(probs, ids, num_tasks, resolve(op, probs.device, backend))


def mutual_information_loss_ema(probs: Tensor, task_ids: Union[int, Tensor], buffer: Tensor,
                                num_tasks: int, *, backend: Optional[str] = None) -> Tensor:
    """MTHL's EMA-buffer mutual-information loss (Eq. 5 of arXiv:2306.17165) for a given buffer ``B``.

    ``L = -sum_ij [1 + log B_ij] P(D_i,E_j) + sum_j [1 + log sum_i B_ij] P(E_j)``; ``B`` enters
    as a constant. Use :class:`moe_kernels.nn.MutualInformationLoss`, which owns and updates the
    buffer; this functional form is for callers that manage it themselves.
    """
    op = "mutual_information_loss_ema"
    _check_probs(op, probs)
    check_int(num_tasks, op, "num_tasks", lo=1)
    check_tensor(buffer, op, "buffer", ndim=2, dtypes=FLOAT_DTYPES)
    check(tuple(buffer.shape) == (num_tasks, probs.shape[1]), op, "buffer",
          f"must have shape [M, E]={(num_tasks, probs.shape[1])}, got {tuple(buffer.shape)}")
    check_same_device(op, "probs", probs, buffer=buffer)
    ids = _task_tensor(op, task_ids, num_tasks, probs)
    # a private copy: the caller may update its buffer in place before backward runs
    return _mi_loss_ema(probs, ids, buffer.detach().clone(), num_tasks, resolve(op, probs.device, backend))


def mutual_information_ema_update(buffer: Tensor, probs: Tensor, task_ids: Union[int, Tensor],
                                  num_tasks: int, momentum: float, *,
                                  backend: Optional[str] = None) -> None:
    """Update MTHL's EMA buffer ``B`` (``[M, E]``) in place from a batch (no gradient).

    Rows of datasets present in the batch move towards this batch's ``P(D_i, E)`` with the given
    momentum; other rows are unchanged. Validates everything before touching the buffer.
    """
    op = "mutual_information_ema_update"
    _check_probs(op, probs)
    check_int(num_tasks, op, "num_tasks", lo=1)
    check_tensor(buffer, op, "buffer", ndim=2, dtypes=FLOAT_DTYPES)
    check(tuple(buffer.shape) == (num_tasks, probs.shape[1]), op, "buffer",
          f"must have shape [M, E]={(num_tasks, probs.shape[1])}, got {tuple(buffer.shape)}")
    check_same_device(op, "probs", probs, buffer=buffer)
    ids = _task_tensor(op, task_ids, num_tasks, probs)
    with torch.no_grad():
        _mi_ema_update(buffer, probs.detach(), ids, num_tasks, float(momentum),
                       resolve(op, probs.device, backend))
