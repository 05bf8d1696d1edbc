"""mk.reconcile: detached reconciliation fusion against plain torch.nn layers with .detach(): plain
links, links with a training-mode BatchNorm (conv1x1 -> BatchNorm2d -> act), eval-mode folding,
the cpu backend against the reference, and ReconciliationLayer's batch-statistics path."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_kernels as mk
from moe_kernels import MoEKernelsError
from moe_kernels.backends import BACKENDS

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


# ---- batch_norm: conv1x1 -> BatchNorm (training) -> act per link, fused ------------------------

CPU = BACKENDS["cpu"]
TRITON = BACKENDS["triton"]
BACKENDS_UNDER_TEST = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    not CPU.available, reason=f"cpu backend unavailable: {CPU.reason}")),
    pytest.param("triton", marks=pytest.mark.skipif(
        not TRITON.available, reason=f"triton backend unavailable: {TRITON.reason}"))]


def _close(actual, expected, dtype, what, k=1.0, floor=1e-12):
    """|a - e| <= k * (atol * max(max|e|, floor) + rtol * |e|), tolerances of TOL[dtype].

    Relative to the largest magnitude: BatchNorm normalises every channel to unit variance, so
    absolute errors scale with max|e| rather than with each element. ``floor``: the scale of a
    result that is zero in exact arithmetic (rounding noise only).
    """
    tol = TOL[dtype]
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    scale = max(float(e.abs().max()) if e.numel() else 0.0, floor)
    err = (a - e).abs()
    bound = k * (tol["atol"] * scale + tol["rtol"] * e.abs())
    assert bool((err <= bound).all()), (f"{what}: max err {float(err.max()):.3g} (max|expected| {scale:.3g}, "
                                        f"k={k}, {dtype})")


def _bn_problem(lead, cins, C, dtype, seed=0, affine=True):
    g = torch.Generator().manual_seed(seed)
    main = torch.randn(*lead, C, generator=g).to(dtype)
    aux = [(torch.randn(*lead, c, generator=g) * 2 + 0.5).to(dtype) for c in cins]
    ws = [(torch.randn(c, C, generator=g) * c ** -0.5).to(dtype) for c in cins]
    bns = []
    for _ in cins:
        bn = nn.BatchNorm2d(C, affine=affine, momentum=0.3)
        with torch.no_grad():
            bn.running_mean.copy_(torch.randn(C, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(C, generator=g) + 0.5)
            if affine:
                bn.weight.copy_(torch.rand(C, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(C, generator=g) * 0.2)
        bns.append(bn)
    gout = torch.randn(*lead, C, generator=g).to(dtype)
    return main, aux, ws, bns, gout


def _plain_bn_links(main, aux, ws, bns, act):
    """conv1x1 -> BatchNorm2d -> act on each detached aux input, summed into main (plain torch, NCHW).

    Channels-last maps [B, H, W, C] are viewed as NCHW; token tensors [N, C] as [N, C, 1, 1]."""
    def nchw(t):
        return t.permute(0, 3, 1, 2) if t.dim() == 4 else t[:, :, None, None]

    def back(t):
        return t.permute(0, 2, 3, 1) if main.dim() == 4 else t[:, :, 0, 0]

    out = main
    for a, w, bn in zip(aux, ws, bns):
        z = F.conv2d(nchw(a.detach()), w.t()[:, :, None, None])
        out = out + back(ACTS[act](bn(z)))
    return out


def _fused_bn_links(main, aux, ws, bns, act, backend, stacked=False):
    kw = dict(batch_norm=True, momentum=bns[0].momentum, eps=bns[0].eps, backend=backend)
    if bns[0].affine:
        kw.update(bn_weight=[b.weight for b in bns], bn_bias=[b.bias for b in bns])
    if stacked:
        rm, rv = torch.stack([b.running_mean for b in bns]), torch.stack([b.running_var for b in bns])
        kw.update(running_mean=rm, running_var=rv)
        out = mk.reconcile(main, aux, ws, None, act, **kw)
        return out, list(rm), list(rv)
    kw.update(running_mean=[b.running_mean for b in bns], running_var=[b.running_var for b in bns])
    return mk.reconcile(main, aux, ws, None, act, **kw), None, None


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("act", [None, "relu", "gelu", "silu"])
@pytest.mark.parametrize("lead", [(2, 5, 7), (37,)], ids=["nhwc[B,H,W,C]", "tokens[N,C]"])
def test_bn_train_matches_conv_bn_act(lead, act, backend):
    """fp32: outputs, running stats (two steps), gradients of W, gamma, beta and main; aux gets none."""
    dtype = torch.float32
    main, aux, ws, bns, gout = _bn_problem(lead, (6, 9, 6), 8, dtype)
    ref_bns = copy.deepcopy(bns)
    for step in range(2):
        m1, m2 = main.clone().requires_grad_(), main.clone().requires_grad_()
        a1 = [a.clone().requires_grad_() for a in aux]
        w1, w2 = [w.clone().requires_grad_() for w in ws], [w.clone().requires_grad_() for w in ws]
        for b in bns + ref_bns:
            b.zero_grad()
        out, _, _ = _fused_bn_links(m1, a1, w1, bns, act, backend)
        want = _plain_bn_links(m2, aux, w2, ref_bns, act)
        _close(out, want, dtype, "output")
        out.backward(gout)
        want.backward(gout)
        assert all(a.grad is None for a in a1), "aux inputs must receive no gradient"
        torch.testing.assert_close(m1.grad, m2.grad, rtol=0, atol=0)  # identity path
        for i in range(len(aux)):
            # gradients through the BN backward: sums over N of products, two passes -> 4x TOL
            _close(w1[i].grad, w2[i].grad, dtype, f"weights[{i}].grad", k=4)
            _close(bns[i].weight.grad, ref_bns[i].weight.grad, dtype, f"bn_weight[{i}].grad", k=4)
            _close(bns[i].bias.grad, ref_bns[i].bias.grad, dtype, f"bn_bias[{i}].grad", k=4)
            _close(bns[i].running_mean, ref_bns[i].running_mean, dtype, f"running_mean[{i}] step {step}")
            _close(bns[i].running_var, ref_bns[i].running_var, dtype, f"running_var[{i}] step {step}")


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_bn_train_bf16(act, backend):
    """bf16 op vs the fp64 composition on the same (bf16) inputs and parameters."""
    main, aux, ws, bns, gout = _bn_problem((4, 6, 6), (16, 8), 12, torch.bfloat16, seed=3)
    bns16 = [copy.deepcopy(b).to(torch.bfloat16) for b in bns]  # parameters and buffers in bf16
    bns64 = [copy.deepcopy(b).double() for b in bns16]
    m = main.clone().requires_grad_()
    w16 = [w.clone().requires_grad_() for w in ws]
    out, _, _ = _fused_bn_links(m, aux, w16, bns16, act, backend)
    assert out.dtype == torch.bfloat16
    m64 = main.double().requires_grad_()
    w64 = [w.double().requires_grad_() for w in ws]
    want = _plain_bn_links(m64, [a.double() for a in aux], w64, bns64, act)
    # z = aux @ W is rounded to bf16 before the statistics (as a bf16 conv is), the output once
    _close(out, want, torch.bfloat16, "output")
    out.backward(gout)
    want.backward(gout.double())
    for i in range(2):
        # the recomputed z and dL/dz are rounded to bf16 before the weight GEMM, and a relu mask can
        # flip where u rounds across 0: 4x the bf16 tolerance, relative to the largest entry
        _close(w16[i].grad, w64[i].grad, torch.bfloat16, f"weights[{i}].grad", k=4)
        _close(bns16[i].weight.grad, bns64[i].weight.grad, torch.bfloat16, f"bn_weight[{i}].grad", k=4)
        _close(bns16[i].bias.grad, bns64[i].bias.grad, torch.bfloat16, f"bn_bias[{i}].grad", k=4)
        _close(bns16[i].running_mean, bns64[i].running_mean, torch.bfloat16, "running_mean")
        _close(bns16[i].running_var, bns64[i].running_var, torch.bfloat16, "running_var")


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_bn_stacked_buffers_and_fp32_params_with_bf16_data(backend):
    """[L, C] parameters/buffers (updated in place, no copies) equal the per-link list form."""
    main, aux, ws, bns, _gout = _bn_problem((3, 4, 4), (5, 7), 6, torch.float32, seed=4)
    twin = copy.deepcopy(bns)
    out_list, _, _ = _fused_bn_links(main, aux, ws, bns, "relu", backend)
    out_st, rm, rv = _fused_bn_links(main, aux, ws, twin, "relu", backend, stacked=True)
    torch.testing.assert_close(out_st, out_list, rtol=0, atol=0)
    for i, b in enumerate(bns):
        torch.testing.assert_close(rm[i], b.running_mean, rtol=0, atol=0)
        torch.testing.assert_close(rv[i], b.running_var, rtol=0, atol=0)
    # bf16 data with fp32 BN parameters and buffers (mixed precision BN)
    m16, a16, w16 = main.bfloat16(), [a.bfloat16() for a in aux], [w.bfloat16() for w in ws]
    mixed = copy.deepcopy(bns)
    out16, _, _ = _fused_bn_links(m16, a16, w16, mixed, "relu", backend)
    assert out16.dtype == torch.bfloat16 and mixed[0].running_mean.dtype == torch.float32
    _close(out16, out_list, torch.bfloat16, "bf16 output with fp32 BN parameters")


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("act", [None, "relu"])
def test_bn_eval_folds_into_the_weights(act, backend):
    main, aux, ws, bns, gout = _bn_problem((2, 3, 5), (4, 6), 5, torch.float32, seed=5)
    for b in bns:
        b.eval()
    ref_bns = copy.deepcopy(bns)
    m = main.clone().requires_grad_()
    w1, w2 = [w.clone().requires_grad_() for w in ws], [w.clone().requires_grad_() for w in ws]
    before = [b.running_mean.clone() for b in bns]
    out = mk.reconcile(m, aux, w1, None, act, batch_norm=True, training=False, eps=bns[0].eps,
                       bn_weight=[b.weight for b in bns], bn_bias=[b.bias for b in bns],
                       running_mean=[b.running_mean for b in bns], running_var=[b.running_var for b in bns],
                       backend=backend)
    want = _plain_bn_links(main, aux, w2, ref_bns, act)
    _close(out, want, torch.float32, "eval output")
    out.backward(gout)
    want.backward(gout)
    for i in range(2):
        assert torch.equal(bns[i].running_mean, before[i]), "eval mode must not touch the running stats"
        _close(w1[i].grad, w2[i].grad, torch.float32, "eval weights.grad", k=2)
        _close(bns[i].weight.grad, ref_bns[i].weight.grad, torch.float32, "eval bn_weight.grad", k=2)
        _close(bns[i].bias.grad, ref_bns[i].bias.grad, torch.float32, "eval bn_bias.grad", k=2)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_bn_without_affine_or_running_stats_and_with_a_conv_bias(backend):
    main, aux, ws, _bns, gout = _bn_problem((40,), (3, 5), 4, torch.float32, seed=6, affine=False)
    bias = [torch.randn(4, requires_grad=True) for _ in range(2)]
    m = main.clone().requires_grad_()
    out = mk.reconcile(m, aux, ws, bias, "relu", batch_norm=True, backend=backend)
    # a bias before a batch-statistics BN cancels: same output, zero gradient
    plain_bn = nn.BatchNorm2d(4, affine=False, track_running_stats=False)
    want = _plain_bn_links(main, aux, ws, [plain_bn] * 2, "relu")
    _close(out, want, torch.float32, "output")
    out.backward(gout)
    for b in bias:
        assert torch.equal(b.grad, torch.zeros(4))
    # with running stats, the biased conv's mean is what the running mean tracks
    rm, rv = [torch.zeros(4), torch.zeros(4)], [torch.ones(4), torch.ones(4)]
    mk.reconcile(main, aux, ws, [b.detach() for b in bias], "relu", batch_norm=True, running_mean=rm,
                 running_var=rv, momentum=1.0, backend=backend)
    for i, a in enumerate(aux):
        z = a @ ws[i] + bias[i].detach()
        torch.testing.assert_close(rm[i], z.mean(0), **TOL[torch.float32])
        torch.testing.assert_close(rv[i], z.var(0, unbiased=True), **TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_bn_one_value_per_channel_is_an_error_like_torch(backend):
    main, aux, ws, bns, _ = _bn_problem((1, 1, 1), (3,), 4, torch.float32)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        _plain_bn_links(main, aux, ws, bns, "relu")
    with pytest.raises(MoEKernelsError, match="'main'.*more than 1 value per channel"):
        _fused_bn_links(main, aux, ws, bns, "relu", backend)
    # eval mode needs no batch statistics
    for b in bns:
        b.eval()
    out = mk.reconcile(main, aux, ws, None, "relu", batch_norm=True, training=False,
                       running_mean=[bns[0].running_mean], running_var=[bns[0].running_var], backend=backend)
    assert out.shape == main.shape


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("lead,cins,C", [((2,), (1,), 1), ((3,), (2,), 1), ((1, 1, 3), (2, 1), 3),
                                         ((3, 1, 1), (5, 5, 5, 5, 5), 2),
                                         ((65,), (17,), 33), ((1, 7, 9), (3, 4, 5), 16)],
                         ids=["N=2,C=1,Cin=1", "N=3,C=1", "B=H=1", "5 links", "N=65 C=33", "odd map"])
def test_bn_odd_shapes(lead, cins, C, backend):
    main, aux, ws, bns, gout = _bn_problem(lead, cins, C, torch.float32, seed=7)
    ref_bns = copy.deepcopy(bns)
    w1, w2 = [w.clone().requires_grad_() for w in ws], [w.clone().requires_grad_() for w in ws]
    out, _, _ = _fused_bn_links(main, aux, w1, bns, "relu", backend)
    want = _plain_bn_links(main, aux, w2, ref_bns, "relu")
    _close(out, want, torch.float32, "output")
    out.backward(gout)
    want.backward(gout)
    for i in range(len(cins)):
        # N=2 or C_in=1: the normalised values do not depend on W (+-1; the normalised aux column), so
        # d out / d W is 0 up to rounding noise: compare on the scale 1
        floor = 1.0 if lead == (2,) or cins[i] == 1 else 1e-12
        _close(w1[i].grad, w2[i].grad, torch.float32, f"weights[{i}].grad", k=4, floor=floor)
        _close(bns[i].weight.grad, ref_bns[i].weight.grad, torch.float32, f"bn_weight[{i}].grad", k=4)
        _close(bns[i].running_var, ref_bns[i].running_var, torch.float32, f"running_var[{i}]")


def test_bn_gradcheck():
    torch.manual_seed(8)
    main = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    aux = [torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)]
    ws = [torch.randn(2, 3, dtype=torch.float64, requires_grad=True),
          torch.randn(4, 3, dtype=torch.float64, requires_grad=True)]
    gamma = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)

    def fn(m, w0, w1, g, b):
        return mk.reconcile(m, aux, [w0, w1], None, "silu", batch_norm=True, bn_weight=g, bn_bias=b)
    assert torch.autograd.gradcheck(fn, (main, *ws, gamma, beta))


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_bn_backward_keeps_no_activation(backend):
    """Saved for backward: the aux inputs themselves (no copy), the [C_in, C] weights, the [L, C] BN
    parameters and the [L, 3, C] statistics -- nothing of the output's size."""
    main, aux, ws, bns, _gout = _bn_problem((4, 8, 8), (16, 16), 16, torch.float32, seed=9)
    w = [x.clone().requires_grad_() for x in ws]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _out, _, _ = _fused_bn_links(main.clone().requires_grad_(), aux, w, bns, "relu", backend)
    aux_ptrs = {a.data_ptr() for a in aux}
    for t in saved:
        if t.numel() >= main.numel():
            assert t.data_ptr() in aux_ptrs, f"saved a {tuple(t.shape)} tensor that is not an aux input"
    small = 2 * 16 * 16 + 4 * 2 * 16 + 2 * 3 * 16  # weights, 4 BN parameter rows, statistics
    assert sum(t.numel() for t in saved if t.data_ptr() not in aux_ptrs) <= small


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_main_none_gives_the_links_alone(backend):
    main, aux, ws, _bns, _gout = _bn_problem((3, 4, 5), (6, 6), 7, torch.float32, seed=10)
    for kw in (dict(), dict(batch_norm=True)):
        only = mk.reconcile(None, aux, ws, None, "relu", backend=backend, **kw)
        full = mk.reconcile(main, aux, ws, None, "relu", backend=backend, **kw)
        _close(only + main, full, torch.float32, f"main=None {kw}")


def test_bn_validation_errors():
    M = torch.randn(5, 3)
    A, W = [torch.randn(5, 2)], [torch.randn(2, 3)]
    C3 = [torch.ones(3)]
    cases = [
        ("bn_weight", dict(bn_weight=C3)),                                   # without batch_norm
        ("running_mean", dict(running_mean=C3, running_var=C3)),
        ("batch_norm", dict(batch_norm=1)),
        ("eps", dict(batch_norm=True, eps=0.0)),
        ("momentum", dict(batch_norm=True, momentum=1.5)),
        ("momentum", dict(batch_norm=True, momentum=None)),
        ("running_var", dict(batch_norm=True, running_mean=C3)),
        ("running_mean", dict(batch_norm=True, running_var=C3)),
        ("bn_weight\\[0\\]", dict(batch_norm=True, bn_weight=[torch.ones(4)])),
        ("bn_weight", dict(batch_norm=True, bn_weight=[torch.ones(3)] * 2)),
        ("bn_bias", dict(batch_norm=True, bn_bias=torch.ones(2, 3))),
        ("bn_weight\\[0\\]", dict(batch_norm=True, bn_weight=[torch.ones(3, dtype=torch.float64)])),
        ("running_mean\\[0\\]", dict(batch_norm=True, running_mean=[torch.zeros(3, requires_grad=True)],
                                    running_var=C3)),
        ("running_mean", dict(batch_norm=True, training=False)),
        ("training", dict(batch_norm=True, training="yes")),
    ]
    for arg, kw in cases:
        with pytest.raises(MoEKernelsError, match=f"argument '{arg}"):
            mk.reconcile(M, A, W, None, "relu", **kw)
    with pytest.raises(MoEKernelsError, match="argument 'main'"):
        mk.reconcile(None, [], [])


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_opcheck_batch_norm(backend):
    torch.manual_seed(11)
    ops = torch.ops.moe_kernels
    main = torch.randn(9, 6, requires_grad=True)
    aux = [torch.randn(9, 3), torch.randn(9, 4)]
    ws = [torch.randn(3, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)]
    bs = [torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)]
    gamma, beta = torch.rand(2, 6, requires_grad=True), torch.randn(2, 6, requires_grad=True)
    for act in ("relu", "none"):
        torch.library.opcheck(ops.reconcile, (main, aux, ws, bs, act, True, gamma, beta, 1e-3, backend))
        torch.library.opcheck(ops.reconcile, (main, aux, ws, [], act, True, None, None, 1e-5, backend))
        torch.library.opcheck(ops.reconcile, (None, aux, ws, bs, act, False, None, None, 1e-5, backend))
        torch.library.opcheck(ops.reconcile, (main, aux, ws, bs, act, False, None, None, 1e-5, backend))
    _out, stats = ops.reconcile(main, aux, ws, bs, "relu", True, gamma, beta, 1e-5, backend)
    g = torch.randn(9, 6)
    d = [t.detach() for t in ws], [t.detach() for t in bs]  # the backward op has no backward itself
    torch.library.opcheck(ops.reconcile_backward, (g, aux, *d, "relu", True, gamma.detach(),
                                                   beta.detach(), stats.detach(), backend))
    torch.library.opcheck(ops.reconcile_backward, (g, aux, *d, "gelu", False, None, None, None, backend))


# ---- the cpu backend against the reference -----------------------------------------------------

@pytest.mark.skipif(not CPU.available, reason=f"cpu backend unavailable: {CPU.reason}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("act", ["none", "relu", "gelu", "silu"])
@pytest.mark.parametrize("bn", [False, True], ids=["plain", "bn"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("main_none", [False, True], ids=["main", "main=None"])
def test_cpu_matches_reference(main_none, bias, bn, act, dtype):
    g = torch.Generator().manual_seed(12)
    lead, C, cins = (3, 5, 7), 10, (4, 9, 10, 3, 6)  # 5 links: several groups in fp32 and bf16
    main = None if main_none else torch.randn(*lead, C, generator=g).to(dtype)
    aux = [torch.randn(*lead, c, generator=g).to(dtype) for c in cins]
    ws0 = [(torch.randn(c, C, generator=g) * c ** -0.5).to(dtype) for c in cins]
    bs0 = [(torch.randn(C, generator=g) * 0.3).to(dtype) for _ in cins] if bias else None
    gamma0, beta0 = torch.rand(len(cins), C, generator=g) + 0.5, torch.randn(len(cins), C, generator=g) * 0.2
    gout = torch.randn(*lead, C, generator=g).to(dtype)

    def run(backend):
        m = None if main is None else main.clone().requires_grad_()
        ws = [w.clone().requires_grad_() for w in ws0]
        bs = [b.clone().requires_grad_() for b in bs0] if bias else None
        kw = {}
        if bn:
            kw = dict(batch_norm=True, bn_weight=gamma0.clone().requires_grad_(),
                      bn_bias=beta0.clone().requires_grad_(), running_mean=torch.zeros(len(cins), C),
                      running_var=torch.ones(len(cins), C))
        out = mk.reconcile(m, aux, ws, bs, act, backend=backend, **kw)
        out.backward(gout)
        res = {"out": out, **{f"w{i}": w.grad for i, w in enumerate(ws)}}
        if bias:
            res.update({f"b{i}": b.grad for i, b in enumerate(bs)})
        if m is not None:
            res["main"] = m.grad
        if bn:
            res.update(gamma=kw["bn_weight"].grad, beta=kw["bn_bias"].grad, rm=kw["running_mean"],
                       rv=kw["running_var"])
        return res

    ref, cpu = run("reference"), run("cpu")
    for name in ref:
        # 16-bit: the reference rounds z + b to the dtype before the activation and BN statistics
        # (the kernel adds the bias in fp32), and a relu mask may flip where that rounding crosses
        # 0: gradients within 4x the dtype tolerance relative to their largest entry
        k = 1 if name in ("out", "main", "rm", "rv") else 4
        _close(cpu[name], ref[name], dtype, f"{name} ({act}, bn={bn}, bias={bias})", k=k)


@pytest.mark.skipif(not CPU.available, reason=f"cpu backend unavailable: {CPU.reason}")
def test_cpu_results_do_not_depend_on_the_thread_count():
    """The kernel's own passes (statistics, fused output, BN/bias gradients) partition the rows
    independently of the thread count. The GEMMs are MKL's, whose blocking may change with it, so
    the inputs are small integers: every GEMM result is exact, and so independent of the order."""
    g = torch.Generator().manual_seed(13)
    lead, C = (2, 40, 33), 40
    main = torch.randn(*lead, C, generator=g)
    aux = [torch.randint(-3, 4, (*lead, c), generator=g).float() for c in (24, 40)]
    ws = [torch.randint(-2, 3, (c, C), generator=g).float() for c in (24, 40)]
    gout = torch.randn(*lead, C, generator=g)
    before = torch.get_num_threads()
    res = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            for bn in (False, True):
                gamma = torch.rand(2, C, generator=torch.Generator().manual_seed(1)).requires_grad_()
                beta = torch.randn(2, C, generator=torch.Generator().manual_seed(2)).requires_grad_()
                bias = [torch.randn(C, generator=torch.Generator().manual_seed(3)).requires_grad_()
                        for _ in ws]
                rm, rv = torch.zeros(2, C), torch.ones(2, C)
                kw = dict(batch_norm=True, bn_weight=gamma, bn_bias=beta, running_mean=rm, running_var=rv) \
                    if bn else {}
                out = mk.reconcile(main, aux, ws, bias, "relu", backend="cpu", **kw)
                grads = torch.autograd.grad(out, [gamma, beta] if bn else bias, gout)
                res.append((n, bn, [out, *grads] + ([rm, rv] if bn else [])))
    finally:
        torch.set_num_threads(before)
    for n, bn, r in res:
        one = next(x for m, b, x in res if m == 1 and b == bn)
        for u, v in zip(r, one):
            assert torch.equal(u, v), f"{n} threads differ from 1 thread (bn={bn})"


# ---- the module path: ReconciliationLayer's batch-statistics links go through the fused op ------

@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum=0.1", "momentum=None"])
def test_reconciliation_layer_bn_training_uses_the_fused_op(momentum, layout, backend, monkeypatch):
    import moe_kernels.nn.reconcile as R

    torch.manual_seed(14)
    calls = []
    real = R._fused_reconcile

    def spy(*args, **kw):
        calls.append(kw.get("batch_norm"))
        return real(*args, **kw)

    monkeypatch.setattr(R, "_fused_reconcile", spy)
    layer = R.ReconciliationLayer(8, [8, 5], norm="bn", activation="relu", layout=layout, backend=backend)
    for gb in layer.links:
        gb.norm.momentum = momentum
        with torch.no_grad():
            gb.norm.weight.uniform_(0.5, 1.5)
            gb.norm.bias.uniform_(-0.2, 0.2)
    plain = [nn.Sequential(copy.deepcopy(gb.conv), copy.deepcopy(gb.norm), nn.ReLU()) for gb in layer.links]
    g = torch.Generator().manual_seed(15)
    main = torch.randn(2, 8, 6, 6, generator=g)
    aux = [torch.randn(2, 8, 6, 6, generator=g), torch.randn(2, 5, 6, 6, generator=g)]
    gout = torch.randn(2, 8, 6, 6, generator=g)

    def to_layout(t):
        return t.permute(0, 2, 3, 1).contiguous() if layout == "nhwc" else t

    for step in range(3):
        m = to_layout(main).requires_grad_()
        a = [to_layout(x).clone().requires_grad_() for x in aux]
        out = layer(m, a)
        out.backward(to_layout(gout))
        m2 = main.clone().requires_grad_()
        want = m2 + sum(p(x.detach()) for p, x in zip(plain, aux))
        want.backward(gout)
        got = out.permute(0, 3, 1, 2) if layout == "nhwc" else out
        _close(got, want, torch.float32, f"layer output step {step}")
        assert all(x.grad is None for x in a)
        for gb, p in zip(layer.links, plain):
            _close(gb.conv.weight.grad, p[0].weight.grad, torch.float32, "conv weight grad", k=4)
            _close(gb.norm.weight.grad, p[1].weight.grad, torch.float32, "bn weight grad", k=4)
            _close(gb.norm.running_mean, p[1].running_mean, torch.float32, "running_mean")
            _close(gb.norm.running_var, p[1].running_var, torch.float32, "running_var")
            assert int(gb.norm.num_batches_tracked) == int(p[1].num_batches_tracked) == step + 1
        layer.zero_grad()
        for p in plain:
            p.zero_grad()
    assert calls == [True] * 3, "one fused call per forward for all the batch-statistics links"


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("bn", [False, True], ids=["plain", "bn"])
def test_transposed_conv_weight_view_is_taken_as_is(bn, backend):
    """weights[i] may be conv.weight.view(C, C_in).t() (no copy); its gradient has its strides."""
    main, aux, ws, _bns, gout = _bn_problem((3, 4, 5), (6, 7), 8, torch.float32, seed=16)
    conv_w = [w.t().contiguous().requires_grad_() for w in ws]           # [C, C_in] like a conv weight
    flat_w = [w.clone().requires_grad_() for w in ws]                    # [C_in, C] contiguous
    kw = dict(batch_norm=True) if bn else {}
    out_t = mk.reconcile(main, aux, [w.t() for w in conv_w], None, "relu", backend=backend, **kw)
    out_c = mk.reconcile(main, aux, flat_w, None, "relu", backend=backend, **kw)
    torch.testing.assert_close(out_t, out_c, **TOL[torch.float32])
    out_t.backward(gout)
    out_c.backward(gout)
    for a, b in zip(conv_w, flat_w):
        assert a.grad.is_contiguous()
        torch.testing.assert_close(a.grad.t(), b.grad, **TOL[torch.float32])
    with pytest.raises(MoEKernelsError, match="weights\\[0\\].*transpose of a contiguous"):
        mk.reconcile(main, aux, [torch.randn(12, 8)[::2], ws[1]], None, "relu", backend=backend)
    ops = torch.ops.moe_kernels
    a2 = [a.reshape(-1, a.shape[-1]) for a in aux]
    wt = [w.detach().t() for w in conv_w]
    stats = ops.reconcile(main.reshape(-1, 8), a2, wt, [], "relu", bn, None, None, 1e-5, backend)[1]
    torch.library.opcheck(ops.reconcile_backward,
                          (gout.reshape(-1, 8), a2, wt, [], "relu", bn, None, None, stats, backend))
