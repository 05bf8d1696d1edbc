"""Reference auxiliary losses with explicit backward formulas (fp32 math).

load balancing (Switch Transformer form, generalised to top-k):
    L = E * sum_e f_e * P_e,  f_e = (assignments chosen for e, before any capacity drop) / (T*k),
    P_e = mean_t q_te with q = softmax(logits) (``score="softmax"``) or sigmoid(logits) normalised
    per token (``score="sigmoid"``). L = 1 for perfectly uniform routing; T = 0 gives 0.
router z-loss:   L = mean_t logsumexp(logits_t)^2; T = 0 gives 0.
mutual information, batch form (Mod-Squad, arXiv:2212.08066; Eq. 3 of MTHL, arXiv:2306.17165):
    P(E_j|D_i) = sum_{t in D_i} p_tj / sum_{t in D_i} sum_j' p_tj'   (tasks absent from the batch: 0)
    P(D_i) = 1/M,  P(D_i,E_j) = P(E_j|D_i)/M,  P(E_j) = sum_i P(D_i,E_j)
    L = -sum_ij P(D_i,E_j) log P(D_i,E_j) + sum_i P(D_i) log P(D_i) + sum_j P(E_j) log P(E_j)
      (= -I(D;E) when every task is present; minimising it maximises the mutual information)
mutual information, EMA-buffer form (Eq. 5 of MTHL), buffer B(D,E) given (already updated):
    L = -sum_ij [1 + log B_ij] P(D_i,E_j) + sum_j [1 + log sum_i B_ij] P(E_j)
Inside logarithms values are clamped to MI_EPS so that experts no token chose (exact zeros, e.g.
sparse top-k gates) give finite gradients; with values above MI_EPS the gradient of Eq. 5 equals
the gradient of Eq. 3 when B equals the joint distribution.
"""

from __future__ import annotations

import math

import torch

from ._util import acc_dtype, bincount, up

MI_EPS = 1e-9


def _scores(logits: torch.Tensor, score: str) -> torch.Tensor:
    lf = up(logits)
    if score == "softmax":
        return torch.softmax(lf, -1)
    s = torch.sigmoid(lf)
    return s / s.sum(-1, keepdim=True)


def load_balancing_loss(logits, topk_ids, score: str) -> torch.Tensor:
    T, E = logits.shape
    if T == 0:
        return torch.zeros((), dtype=acc_dtype(logits.dtype), device=logits.device)
    k = topk_ids.shape[1]
    f = bincount(topk_ids.reshape(-1), E).to(acc_dtype(logits.dtype)) / (T * k)
    p = _scores(logits, score).mean(0)
    return E * (f * p).sum()


def load_balancing_loss_backward(grad, logits, topk_ids, score: str) -> torch.Tensor:
    T, E = logits.shape
    if T == 0:
        return torch.zeros_like(logits)
    k = topk_ids.shape[1]
    f = bincount(topk_ids.reshape(-1), E).to(acc_dtype(logits.dtype)) / (T * k)
    gq = (up(grad) * E / T) * f.expand(T, E)  # dL/dq_te
    lf = up(logits)
    if score == "softmax":
        q = torch.softmax(lf, -1)
        gl = q * (gq - (gq * q).sum(-1, keepdim=True))
    else:
        s = torch.sigmoid(lf)
        tot = s.sum(-1, keepdim=True)
        q = s / tot
        gs = (gq - (gq * q).sum(-1, keepdim=True)) / tot
        gl = gs * s * (1.0 - s)
    return gl.to(logits.dtype)


def z_loss(logits) -> torch.Tensor:
    if logits.shape[0] == 0:
        return torch.zeros((), dtype=acc_dtype(logits.dtype), device=logits.device)
    return torch.logsumexp(up(logits), -1).square().mean()


def z_loss_backward(grad, logits) -> torch.Tensor:
    T = logits.shape[0]
    if T == 0:
        return torch.zeros_like(logits)
    lf = up(logits)
    lse = torch.logsumexp(lf, -1, keepdim=True)
    return (up(grad) * 2.0 / T * lse * torch.softmax(lf, -1)).to(logits.dtype)


# ---- mutual information ----

def _task_sums(probs, task_ids, num_tasks):
    p = up(probs)
    S = torch.zeros(num_tasks, p.shape[1], dtype=p.dtype, device=p.device)
    S.index_add_(0, task_ids.long(), p)
    Z = S.sum(1, keepdim=True)
    return S, Z


def task_joint(probs, task_ids, num_tasks):
    """P(D_i, E_j) for the tasks present (rows of absent tasks are 0) and the present mask."""
    S, Z = _task_sums(probs, task_ids, num_tasks)
    present = Z.squeeze(1) != 0  # absent tasks sum to exactly 0; a NaN sum stays present (and NaN)
    Q = torch.where(present[:, None], S / Z.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return Q / num_tasks, present


def _joint_grad_to_probs(gJ, probs, task_ids, num_tasks):
    """Chain d L / d P(D,E) back to the probs through P(E|D) = S / Z (S = per-task sums)."""
    S, Z = _task_sums(probs, task_ids, num_tasks)
    Zc = Z.clamp_min(torch.finfo(torch.float32).tiny)
    Q = S / Zc
    gQ = gJ / num_tasks
    gS = (gQ - (gQ * Q).sum(1, keepdim=True)) / Zc
    gS = torch.where(Z != 0, gS, 0.0)
    return gS[task_ids.long()].to(probs.dtype)


def mutual_information_loss(probs, task_ids, num_tasks: int) -> torch.Tensor:
    J, _ = task_joint(probs, task_ids, num_tasks)
    PE = J.sum(0)
    return (-(J * J.clamp_min(MI_EPS).log()).sum() + (PE * PE.clamp_min(MI_EPS).log()).sum()
            - math.log(num_tasks))


def mutual_information_loss_backward(grad, probs, task_ids, num_tasks: int) -> torch.Tensor:
    J, _ = task_joint(probs, task_ids, num_tasks)
    PE = J.sum(0, keepdim=True)
    # d/dx [x log max(x, eps)] = 1 + log x above eps, log eps below
    dJ = torch.where(J > MI_EPS, 1.0 + J.clamp_min(MI_EPS).log(), math.log(MI_EPS))
    dPE = torch.where(PE > MI_EPS, 1.0 + PE.clamp_min(MI_EPS).log(), math.log(MI_EPS))
    gJ = up(grad) * (-dJ + dPE)
    return _joint_grad_to_probs(gJ, probs, task_ids, num_tasks)


def _ema_coeffs(buffer):
    B = up(buffer).clamp_min(MI_EPS)
    return 1.0 + B.log(), 1.0 + up(buffer).sum(0, keepdim=True).clamp_min(MI_EPS).log()


def mutual_information_loss_ema(probs, task_ids, buffer, num_tasks: int) -> torch.Tensor:
    J, _ = task_joint(probs, task_ids, num_tasks)
    cB, cE = _ema_coeffs(buffer)
    return -(cB * J).sum() + (cE * J.sum(0, keepdim=True)).sum()


def mutual_information_loss_ema_backward(grad, probs, task_ids, buffer, num_tasks: int) -> torch.Tensor:
    cB, cE = _ema_coeffs(buffer)
    gJ = up(grad) * (-cB + cE)
    return _joint_grad_to_probs(gJ, probs, task_ids, num_tasks)


def mutual_information_ema_update(buffer, probs, task_ids, num_tasks: int, momentum: float) -> None:
    """B(D_i, :) <- momentum * B(D_i, :) + (1 - momentum) * P(D_i, :) for the tasks present."""
    J, present = task_joint(probs.detach(), task_ids, num_tasks)
    new = momentum * buffer + (1.0 - momentum) * J.to(buffer.dtype)
    buffer.copy_(torch.where(present[:, None], new, buffer))
