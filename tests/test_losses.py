"""Auxiliary losses: values against direct formulas, gradients, MI buffer behaviour."""

import math

import pytest
import torch

import moe_kernels as mk

from .helpers import TOL


# ---------------------------------------------------------------- load balancing / z-loss

@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_load_balancing_value(score, backend):
    torch.manual_seed(0)
    T, E, k = 50, 7, 2
    logits = torch.randn(T, E)
    r = mk.route(logits, k, score=score, capacity=3, backend=backend)  # capacity drops must not change f_e
    q = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    q = q / q.sum(-1, keepdim=True)
    f = torch.bincount(r.topk_ids.reshape(-1).long(), minlength=E).float() / (T * k)
    want = E * (f * q.mean(0)).sum()
    torch.testing.assert_close(mk.load_balancing_loss(logits, r, backend=backend), want, **TOL[torch.float32])


def test_load_balancing_is_one_when_uniform(backend):
    E = 4
    logits = torch.zeros(8, E)
    logits[torch.arange(8), torch.arange(8) % E] = 1e-3  # ids cycle over the experts
    r = mk.route(torch.zeros(8, E) + logits, 1, backend=backend)
    assert torch.allclose(mk.load_balancing_loss(torch.zeros(8, E), r, backend=backend), torch.tensor(1.0))


def test_z_loss_value(backend):
    logits = torch.randn(9, 5)
    torch.testing.assert_close(mk.z_loss(logits, backend=backend), torch.logsumexp(logits, -1).square().mean(),
                               **TOL[torch.float32])


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_lb_and_z_gradcheck(score, backend):
    torch.manual_seed(1)
    logits = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    r = mk.route(logits.detach(), 2, score=score, backend=backend)
    assert torch.autograd.gradcheck(lambda z: mk.load_balancing_loss(z, r, backend=backend), (logits,))
    assert torch.autograd.gradcheck(lambda z: mk.z_loss(z, backend=backend), (logits,))


def test_losses_on_empty_batch_are_zero(backend):
    logits = torch.zeros(0, 4, requires_grad=True)
    r = mk.route(logits, 2, backend=backend)
    lb, z = mk.load_balancing_loss(logits, r, backend=backend), mk.z_loss(logits, backend=backend)
    assert lb.item() == 0.0 and z.item() == 0.0
    (lb + z).backward()
    assert logits.grad.shape == (0, 4)


# ---------------------------------------------------------------- mutual information

def _mi_direct(probs, tids, M):
    """-I(D;E) from the definitions (P(D)=1/M, P(E|D) = normalised task sums)."""
    E = probs.shape[1]
    J = torch.zeros(M, E, dtype=torch.float64)
    for i in range(M):
        rows = probs[tids == i].double()
        J[i] = rows.sum(0) / rows.sum() / M
    PE, PD = J.sum(0), J.sum(1)
    mi = (J * (J / (PD[:, None] * PE[None, :])).log()).sum()
    return -mi


def test_mi_batch_equals_negative_mutual_information(backend):
    torch.manual_seed(2)
    T, E, M = 60, 5, 3
    probs = torch.softmax(torch.randn(T, E), -1)
    tids = torch.arange(T) % M
    got = mk.mutual_information_loss(probs, tids, M, backend=backend)
    torch.testing.assert_close(got.double(), _mi_direct(probs, tids, M), rtol=1e-5, atol=1e-6)
    assert float(got) <= 0.0


def test_mi_batch_extremes(backend):
    # each task uses its own expert: I(D;E) = log M
    M = 3
    probs = torch.eye(M).repeat(4, 1)
    tids = torch.arange(12) % M
    torch.testing.assert_close(mk.mutual_information_loss(probs, tids, M, backend=backend), torch.tensor(-math.log(M)))
    # every task uses experts identically: I = 0
    same = torch.full((12, 4), 0.25)
    torch.testing.assert_close(mk.mutual_information_loss(same, tids, M, backend=backend), torch.tensor(0.0),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("per_batch", [False, True])
def test_mi_gradchecks(per_batch, backend):
    torch.manual_seed(3)
    T, E, M = 12, 4, 3
    probs = torch.softmax(torch.randn(T, E, dtype=torch.float64), -1).requires_grad_()
    tids = 1 if per_batch else torch.tensor([0, 1, 2, 0, 1, 0, 0, 2, 1, 1, 0, 2])
    assert torch.autograd.gradcheck(lambda p: mk.mutual_information_loss(p, tids, M, backend=backend), (probs,))
    B = torch.softmax(torch.randn(M * E, dtype=torch.float64), 0).view(M, E)
    assert torch.autograd.gradcheck(lambda p: mk.mutual_information_loss_ema(p, tids, B, M, backend=backend), (probs,))


def test_eq5_gradient_equals_eq3_gradient_when_buffer_is_the_true_joint(backend):
    """MTHL's approximation (Eq. 4-5): with B = P(D, E), d Eq.5 / d probs == d Eq.3 / d probs."""
    torch.manual_seed(4)
    T, E, M = 90, 6, 3
    probs = torch.softmax(torch.randn(T, E, dtype=torch.float64), -1).requires_grad_()
    tids = torch.randint(0, M, (T,))
    from moe_kernels.reference.losses import task_joint

    B, _ = task_joint(probs.detach(), tids, M)
    (g3,) = torch.autograd.grad(mk.mutual_information_loss(probs, tids, M, backend=backend), probs)
    (g5,) = torch.autograd.grad(mk.mutual_information_loss_ema(probs, tids, B, M, backend=backend), probs)
    torch.testing.assert_close(g5, g3, **TOL[torch.float64])
    # and a different buffer gives a different gradient (the test can fail)
    (g5b,) = torch.autograd.grad(mk.mutual_information_loss_ema(probs, tids, torch.full_like(B, 1 / (M * E)), M, backend=backend), probs)
    assert not torch.allclose(g5b, g3)


def test_mi_with_sparse_topk_gates_has_finite_gradients(backend):
    torch.manual_seed(5)
    logits = torch.randn(20, 8, requires_grad=True)
    r = mk.route(logits, 2, backend=backend)
    gates = r.dense_weights()  # many exact zeros
    loss = mk.mutual_information_loss(gates, torch.arange(20) % 2, 2, backend=backend)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_mi_module_buffer_update_state_dict_and_eval(backend):
    torch.manual_seed(6)
    M, E = 3, 5
    mi = mk.nn.MutualInformationLoss(M, E, momentum=0.9)
    B0 = mi.joint.clone()
    torch.testing.assert_close(B0, torch.full((M, E), 1 / (M * E)))
    probs = torch.softmax(torch.randn(16, E), -1)
    loss = mi(probs, 1)  # whole batch from dataset 1
    from moe_kernels.reference.losses import task_joint

    J, _ = task_joint(probs, torch.full((16,), 1), M)
    torch.testing.assert_close(mi.joint[1], 0.9 * B0[1] + 0.1 * J[1])
    assert torch.equal(mi.joint[0], B0[0]) and torch.equal(mi.joint[2], B0[2]), "absent datasets unchanged"
    # the loss used the updated buffer
    torch.testing.assert_close(loss, mk.mutual_information_loss_ema(probs, 1, mi.joint, M, backend=backend))
    # state dict round trip
    other = mk.nn.MutualInformationLoss(M, E, momentum=0.9)
    other.load_state_dict(mi.state_dict())
    assert torch.equal(other.joint, mi.joint) and "joint" in mi.state_dict()
    # eval: no update
    mi.eval()
    before = mi.joint.clone()
    mi(probs, 0)
    assert torch.equal(mi.joint, before)


def test_mi_module_gradient_accumulation_over_two_forwards():
    mi = mk.nn.MutualInformationLoss(2, 3)
    p = torch.softmax(torch.randn(6, 3), -1).requires_grad_()
    l1 = mi(p, 0)
    l2 = mi(p, 1)  # updates the buffer again before l1's backward
    (l1 + l2).backward()
    assert torch.isfinite(p.grad).all()
