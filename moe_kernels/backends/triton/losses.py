"""triton kernels for the router losses: load balancing, z-loss, mutual information (batch and EMA forms).

Every loss is a reduction over tokens done in two fixed stages, so that results are bitwise
deterministic and nothing is read on the host:

1. one program per block of tokens writes its block's partial sums into a ``[blocks, ...]`` buffer
   (``_router_partial_kernel``: the column sums of the scores, the histogram of the top-k ids and
   the sum of ``logsumexp^2``; ``_task_partial_kernel``: the ``[M, E]`` per-task sums of the probs);
2. one program adds the partials in block order and finishes the loss in fp32 (fp64 for fp64):
   ``E * sum_e f_e P_e``, ``mean lse^2``, or the joint ``P(D, E)`` and Eq. 3 / Eq. 5 of MTHL
   (``_router_finish_kernel``, ``_mi_finish_kernel``).

The backward kernels reuse stage 1-2 for what needs the whole batch (the assignment fractions
``f_e``; the ``[M, E]`` gradient w.r.t. the per-task sums) and then one elementwise program per
block of tokens writes the logits' (probs') gradient in their dtype (``_lb_grad_kernel``,
``_z_grad_kernel``, ``_task_rows_kernel``, a gather of ``gS[task(t)]``). The z-loss backward needs
no reduction: a single launch. ``mutual_information_ema_update`` is delegated to the reference (an
``[M, E]`` in-place update after the same per-task sums: nothing for a kernel to gain).
"""

from __future__ import annotations

import torch

from ..contract import delegated
from ..reference.losses import MI_EPS
from ._common import acc_dtype, cdiv, interpreting, is_fp64, pow2

_TINY = float(torch.finfo(torch.float32).tiny)  # the reference's clamp of the per-task totals
_EPS_INV = 1.0 / MI_EPS


def _jit():
    from . import _losses_jit

    return _losses_jit


def _block_t(BE: int, T: int) -> int:
    """Tokens per program: [BT, BE] tiles of at most 4096 elements on a GPU, 16384 interpreted
    (fewer programs), at most 64 tokens (so that tests of a hundred tokens cross blocks)."""
    cap = 16384 if interpreting() else 4096
    return max(1, min(64, pow2(T), cap // BE))


def _scalar(ref: torch.Tensor) -> torch.Tensor:
    return torch.empty((), dtype=acc_dtype(ref.dtype), device=ref.device)


def _router_pass(logits, topk_ids, score, mode):
    """Stage 1 and 2 over the logits. mode 0: the load-balancing loss; 1: f_e [E]; 2: the z-loss."""
    T, E = logits.shape
    J = _jit()
    acc = acc_dtype(logits.dtype)
    BE = pow2(E)
    BT = _block_t(BE, T)
    NB = cdiv(T, BT)
    k = topk_ids.shape[1] if topk_ids is not None else 1
    dev = logits.device
    psum = torch.empty(NB, E, dtype=acc, device=dev) if mode == 0 else logits
    hist = torch.empty(NB, E, dtype=torch.int32, device=dev) if mode in (0, 1) else logits
    zsum = torch.empty(NB, dtype=acc, device=dev) if mode == 2 else logits
    J._router_partial_kernel[(NB,)](logits, topk_ids if topk_ids is not None else hist, psum, hist, zsum, T, E,
                                    K=k, BT=BT, BE=BE, SOFTMAX=score == "softmax", FP64=is_fp64(logits),
                                    DO_P=mode == 0, DO_HIST=mode in (0, 1), DO_Z=mode == 2)
    out = torch.empty(E, dtype=acc, device=dev) if mode == 1 else _scalar(logits)
    BNB = max(1, min(pow2(NB), (16384 if interpreting() else 4096) // BE))
    J._router_finish_kernel[(1,)](psum, hist, zsum, out, NB, T, E, K=k, BNB=BNB, BE=BE, FP64=is_fp64(logits),
                                  MODE=mode)
    return out


def load_balancing_loss(logits, topk_ids, score):
    if logits.shape[0] == 0:
        return torch.zeros((), dtype=acc_dtype(logits.dtype), device=logits.device)
    return _router_pass(logits, topk_ids, score, 0)


def load_balancing_loss_backward(grad, logits, topk_ids, score):
    T, E = logits.shape
    out = torch.empty_like(logits)
    if T == 0:
        return out
    f = _router_pass(logits, topk_ids, score, 1)
    BE = pow2(E)
    BT = _block_t(BE, T)
    _jit()._lb_grad_kernel[(cdiv(T, BT),)](grad, logits, f, out, T, E, BT=BT, BE=BE,
                                           SOFTMAX=score == "softmax", FP64=is_fp64(logits))
    return out


def z_loss(logits):
    if logits.shape[0] == 0:
        return torch.zeros((), dtype=acc_dtype(logits.dtype), device=logits.device)
    return _router_pass(logits, None, "softmax", 2)


def z_loss_backward(grad, logits):
    T, E = logits.shape
    out = torch.empty_like(logits)
    if T == 0:
        return out
    BE = pow2(E)
    BT = _block_t(BE, T)
    _jit()._z_grad_kernel[(cdiv(T, BT),)](grad, logits, out, T, E, BT=BT, BE=BE, FP64=is_fp64(logits))
    return out


# ---- mutual information

def _mi(probs, task_ids, buffer, num_tasks, grad):
    """The loss (grad None) or the probs' gradient of the batch (buffer None) or EMA form."""
    T, E = probs.shape
    M = num_tasks
    J = _jit()
    acc = acc_dtype(probs.dtype)
    dev = probs.device
    fp64 = is_fp64(probs)
    BE = pow2(E)
    BT = _block_t(BE, T)
    NB = cdiv(T, BT)
    part = torch.empty(NB, M, E, dtype=acc, device=dev)
    if NB:
        J._task_partial_kernel[(NB,)](probs, task_ids, part, T, E, M, BT=BT, BE=BE, FP64=fp64)
    backward = grad is not None
    loss = _scalar(probs) if not backward else part
    gs = torch.empty(M, E, dtype=acc, device=dev) if backward else part
    J._mi_finish_kernel[(1,)](part, buffer if buffer is not None else part, grad if backward else part, loss, gs,
                              NB, M, E, EPS_INV=_EPS_INV, TINY=_TINY, BM=pow2(M), BE=BE, FP64=fp64,
                              EMA=buffer is not None, BACKWARD=backward)
    if not backward:
        return loss
    out = torch.empty_like(probs)
    if T:
        J._task_rows_kernel[(NB,)](gs, task_ids, out, T, E, BT=BT, BE=BE)
    return out


def mutual_information_loss(probs, task_ids, num_tasks):
    return _mi(probs, task_ids, None, num_tasks, None)


def mutual_information_loss_backward(grad, probs, task_ids, num_tasks):
    return _mi(probs, task_ids, None, num_tasks, grad)


def mutual_information_loss_ema(probs, task_ids, buffer, num_tasks):
    return _mi(probs, task_ids, buffer, num_tasks, None)


def mutual_information_loss_ema_backward(grad, probs, task_ids, buffer, num_tasks):
    return _mi(probs, task_ids, buffer, num_tasks, grad)


mutual_information_ema_update = delegated(
    "reference", "an [M, E] in-place update from the per-task sums: ATen's few [M, E] steps, nothing to fuse")
