"""mk.reconcile: detached reconciliation fusion against plain torch.nn layers with .detach()."""

import pytest
import torch
import torch.nn.functional as F

import moe_kernels as mk

from .helpers import TOL

ACTS = {None: lambda z: z, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def _plain(main, aux, weights, bias, act):
    out = main
    for i, (a, w) in enumerate(zip(aux, weights)):
        z = a.detach() @ w + (bias[i] if bias is not None else 0)
        out = out + ACTS[act](z)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("act", [None, "relu", "gelu", "silu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(13,), (2, 5, 3)], ids=["tokens[N,C]", "nhwc[B,H,W,C]"])
def test_reconcile_matches_detached_composition(lead, bias, act, dtype):
    torch.manual_seed(0)
    C, cins = 6, (4, 9, 6)
    main = torch.randn(*lead, C).to(dtype).requires_grad_()
    aux = [torch.randn(*lead, c).to(dtype).requires_grad_() for c in cins]
    weights = [torch.randn(c, C).to(dtype).requires_grad_() for c in cins]
    biases = [torch.randn(C).to(dtype).requires_grad_() for _ in cins] if bias else None
    out = mk.reconcile(main, aux, weights, biases, act)
    want = _plain(main.double(), [a.double() for a in aux], [w.double() for w in weights],
                  [b.double() for b in biases] if bias else None, act)
    torch.testing.assert_close(out.double(), want, **{k: 2 * v for k, v in TOL[dtype].items()})
    g = torch.randn_like(out)
    out.backward(g)
    for a in aux:
        assert a.grad is None, "aux inputs must receive no gradient"
    torch.testing.assert_close(main.grad, g)  # identity path: bit-exact
    params = weights + (biases or [])
    # weight/bias gradients against the double-precision composition
    wd = [w.detach().double().requires_grad_() for w in weights]
    bd = [b.detach().double().requires_grad_() for b in biases] if bias else None
    ref = _plain(main.detach().double(), [a.detach().double() for a in aux], wd, bd, act)
    ref_grads = torch.autograd.grad(ref, wd + (bd or []), g.double())
    for p, r in zip(params, ref_grads):
        torch.testing.assert_close(p.grad.double(), r, **{k: 4 * v for k, v in TOL[dtype].items()})


def test_reconcile_gradcheck():
    torch.manual_seed(1)
    main = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    aux = [torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)]
    ws = [torch.randn(2, 3, dtype=torch.float64, requires_grad=True),
          torch.randn(4, 3, dtype=torch.float64, requires_grad=True)]
    bs = [torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    fn = lambda m, w0, w1, b0, b1: mk.reconcile(m, aux, [w0, w1], [b0, b1], "silu")
    assert torch.autograd.gradcheck(fn, (main, *ws, *bs))


def test_other_branch_parameters_untouched_by_a_step():
    """A link from branch B into branch A: a step on A's loss leaves B's parameters unchanged."""
    torch.manual_seed(2)
    branch_a, branch_b = torch.nn.Linear(4, 6), torch.nn.Linear(4, 5)
    link = torch.nn.Parameter(torch.randn(5, 6))
    x = torch.randn(8, 4)
    before = [p.detach().clone() for p in branch_b.parameters()]
    opt = torch.optim.SGD(list(branch_a.parameters()) + list(branch_b.parameters()) + [link], lr=0.1)
    fa = mk.reconcile(branch_a(x), [branch_b(x)], [link], activation="relu")
    fa.square().mean().backward()
    assert all(p.grad is None for p in branch_b.parameters())
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(branch_b.parameters(), before))
    assert link.grad is not None and branch_a.weight.grad is not None


def test_empty_aux_is_a_copy():
    main = torch.randn(4, 3, requires_grad=True)
    out = mk.reconcile(main, [], [])
    assert torch.equal(out, main) and out.data_ptr() != main.data_ptr()
    out.sum().backward()
    assert torch.equal(main.grad, torch.ones(4, 3))
