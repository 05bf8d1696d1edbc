"""torch.library.opcheck on every custom op on every available backend: schema, fake implementation,
autograd registration and AOT dispatch with dynamic shapes (what torch.compile relies on)."""

import pytest
import torch

import moe_kernels  # noqa: F401  (registers the ops)

ops = torch.ops.moe_kernels


def _plan():
    torch.manual_seed(0)
    logits = torch.randn(9, 5)
    r = moe_kernels.route(logits, 2, capacity=3, pad_to=2)
    return logits, r


def _cases(B):
    logits, r = _plan()
    lg = logits.clone().requires_grad_()
    x = torch.randn(9, 6, requires_grad=True)
    y = torch.randn(r.num_rows, 6, requires_grad=True)
    w = r.topk_weights.detach().clone().requires_grad_()
    W = torch.randn(3, 6, 5, requires_grad=True)
    tids = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1])
    w1, w2 = torch.randn(5, 6, 8, requires_grad=True), torch.randn(5, 4, 6, requires_grad=True)
    b1, b2 = torch.randn(5, 8, requires_grad=True), torch.randn(5, 6, requires_grad=True)
    xe = torch.randn(r.num_rows, 6, requires_grad=True)
    probs = torch.softmax(torch.randn(9, 5), -1).requires_grad_()
    buf = torch.full((3, 5), 1 / 15)
    return {
        "route": (ops.route, (lg, 2, "softmax", True, 3, "position", 2, r.num_rows, B)),
        "plan": (ops.plan, (torch.tensor([[0, 4], [4, 2], [-1, 1], [7, 3]], dtype=torch.int32),
                            torch.rand(4, 2), 5, 1, "score", 2, 10, B)),
        "route_backward": (ops.route_backward, (torch.randn(9, 2), logits, r.topk_ids, "softmax", True, B)),
        "task_route": (ops.task_route, (x, W, tids, -1, 2, "softmax", True, -1, "position", 1, 18, B)),
        "task_route_batch": (ops.task_route, (x, W, None, 1, 2, "sigmoid", False, 3, "score", 1, 15, B)),
        "dispatch": (ops.dispatch, (x, r.slots, r.sources, B)),
        "combine": (ops.combine, (y, w, r.slots, B)),
        "grouped_gemm": (ops.grouped_gemm, (xe, r.offsets, torch.randn(5, 6, 3, requires_grad=True), B)),
        "grouped_mlp": (ops.grouped_mlp, (xe, r.offsets, w1, torch.randn(5, 8, 6, requires_grad=True), b1, b2, "gelu", B)),
        "grouped_mlp_swiglu": (ops.grouped_mlp, (xe, r.offsets, w1, w2, None, None, "swiglu", B)),
        "moe_mlp": (ops.moe_mlp, (x, w, r.slots, r.sources, r.offsets, w1, torch.randn(5, 8, 6, requires_grad=True),
                                  b1, b2, "gelu", B)),
        "moe_mlp_swiglu": (ops.moe_mlp, (x, w, r.slots, r.sources, r.offsets, w1, w2, None, None, "swiglu", B)),
        "reconcile": (ops.reconcile, (torch.randn(9, 6, requires_grad=True), [torch.randn(9, 3), torch.randn(9, 4)],
                                      [torch.randn(3, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)],
                                      [torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)], "relu",
                                      False, None, None, 1e-5, B)),
        "reconcile_batch_norm": (ops.reconcile, (torch.randn(9, 6, requires_grad=True), [torch.randn(9, 3)],
                                                 [torch.randn(3, 6, requires_grad=True)], [], "gelu", True,
                                                 torch.randn(1, 6, requires_grad=True),
                                                 torch.randn(1, 6, requires_grad=True), 1e-5, B)),
        "load_balancing_loss": (ops.load_balancing_loss, (lg, r.topk_ids, "softmax", B)),
        "z_loss": (ops.z_loss, (lg, B)),
        "mutual_information_loss": (ops.mutual_information_loss, (probs, tids, 3, B)),
        "mutual_information_loss_ema": (ops.mutual_information_loss_ema, (probs, tids, buf, 3, B)),
        "mutual_information_ema_update": (ops.mutual_information_ema_update, (buf.clone(), probs.detach(), tids, 3, 0.98, B)),
    }


CASES = _cases("reference")


@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck(name, backend):
    op, args = _cases(backend)[name]
    torch.library.opcheck(op, args)


def test_every_op_is_opchecked():
    forward_ops = {n for n in dir(ops) if isinstance(getattr(ops, n), torch._ops.OpOverloadPacket)
                   and not n.endswith("_backward")}
    covered = {op._name.split("::")[1] if hasattr(op, "_name") else str(op).split(".")[-1]
               for op, _ in CASES.values()}
    assert forward_ops <= covered, forward_ops - covered
