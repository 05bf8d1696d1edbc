"""Reconciliation modules (X-Learner Eq. 2, INTERN Up-G) against plain torch.nn layers with .detach()."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_kernels.nn.backbone as B
import moe_kernels.nn.reconcile as R
from moe_kernels import MoEKernelsError
from moe_kernels.backends import ENV_VAR

from .models import TinyResNet


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    # These tests are about the modules; the op's backends are checked against its reference in
    # test_reconcile.py. Pinning the reference keeps them fast and independent of a C++ build.
    monkeypatch.setenv(ENV_VAR, "reference")


TOL = {"rtol": 1e-5, "atol": 1e-5}
TOL_NET = {"rtol": 1e-4, "atol": 1e-4}  # several BN layers in batch-statistics mode in a row


# ---- independent plain-torch reference pieces, built from the module's parameters ----

def _conv_like(c: nn.Conv2d) -> nn.Conv2d:
    ref = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, stride=c.stride,
                    padding=c.padding, bias=c.bias is not None)
    ref.load_state_dict(c.state_dict())
    return ref


def _bn_like(b: nn.BatchNorm2d) -> nn.BatchNorm2d:
    ref = nn.BatchNorm2d(b.num_features)
    ref.load_state_dict(b.state_dict())
    return ref


def _plain_gamma_b(g: R.GammaB) -> nn.Sequential:
    mods = [_conv_like(g.conv)]
    if g.norm is not None:
        mods.append(_bn_like(g.norm))
    if g.activation == "relu":
        mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def _plain_chain(chain) -> nn.Sequential:
    mods = []
    for s in chain.steps:
        if isinstance(s, R.GammaA):
            mods += [_conv_like(s.conv), _bn_like(s.norm), nn.ReLU()]
        else:  # gamma_c in the paper's order: up-sample, then the conv
            mods += [nn.Upsample(scale_factor=2, mode=s.mode), _conv_like(s.conv)]
    return nn.Sequential(*mods)


class PlainLinks(nn.Module):
    """A ReconciliationLayer rebuilt from nn.Conv2d / nn.BatchNorm2d / nn.ReLU / nn.Upsample."""

    def __init__(self, layer: R.ReconciliationLayer) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(
            [_plain_chain(a) if isinstance(a, R.GammaChain) else nn.Sequential() for a in layer.adapters])
        self.gb = nn.ModuleList([_plain_gamma_b(g) for g in layer.links])

    def forward(self, main, aux):  # NCHW
        out = main
        for a, ad, gb in zip(aux, self.adapters, self.gb):
            out = out + gb(ad(a.detach()))
        return out


def _nhwc(t):
    return t.permute(0, 2, 3, 1).contiguous()


def _nchw(t):
    return t.permute(0, 3, 1, 2)


def _randomize_bn_stats(module: nn.Module, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _make_layer(norm, activation, layout, adapters=True):
    # main: 8 channels at 8x8; aux: two same-resolution maps (8, 5 channels), one map one stage up
    # (4 channels, 16x16 -> gamma_a), one map one stage down (12 channels, 4x4 -> gamma_c)
    chans = [8, 5]
    ads = [None, None]
    if adapters:
        chans += [4, 12]
        ads += [R.GammaChain([4, 8], layout=layout),
                R.GammaChain([12, 8], direction="up", layout=layout)]
    return R.ReconciliationLayer(8, chans, adapters=ads, norm=norm, activation=activation,
                                 layout=layout)


def _layer_inputs(adapters=True):
    g = torch.Generator().manual_seed(3)
    main = torch.randn(2, 8, 8, 8, generator=g)
    aux = [torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 5, 8, 8, generator=g)]
    if adapters:
        aux += [torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 12, 4, 4, generator=g)]
    return main, aux


# ---- ReconciliationLayer -----------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("norm,activation", [("bn", "relu"), ("bn", None), ("none", "relu"),
                                             ("none", None)])
def test_layer_matches_plain_reference_train_then_eval(layout, norm, activation):
    torch.manual_seed(0)
    layer = _make_layer(norm, activation, layout)
    ref = PlainLinks(layer)
    main, aux = _layer_inputs()
    conv = _nhwc if layout == "nhwc" else (lambda t: t)
    back = _nchw if layout == "nhwc" else (lambda t: t)

    # training mode (BN on batch statistics), with gradients
    m = conv(main).detach().clone().requires_grad_()
    a = [conv(t).detach().clone().requires_grad_() for t in aux]
    out = layer(m, a)
    rm = main.clone().requires_grad_()
    ra = [t.clone().requires_grad_() for t in aux]
    want = ref(rm, ra)
    torch.testing.assert_close(back(out), want, **TOL)
    g = torch.randn_like(want)
    out.backward(conv(g))
    want.backward(g)
    assert all(t.grad is None for t in a), "aux inputs must receive no gradient"
    torch.testing.assert_close(back(m.grad), rm.grad, **TOL)
    ps, rps = list(layer.parameters()), list(ref.parameters())
    assert len(ps) == len(rps)
    for p, q in zip(ps, rps):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, q.grad, **TOL)
    # BN running statistics moved the same way
    for b, rb in zip([x for x in layer.modules() if isinstance(x, nn.BatchNorm2d)],
                     [x for x in ref.modules() if isinstance(x, nn.BatchNorm2d)]):
        torch.testing.assert_close(b.running_mean, rb.running_mean, **TOL)
        torch.testing.assert_close(b.running_var, rb.running_var, **TOL)

    # eval mode, with and without autograd
    layer.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(layer(conv(main), [conv(t) for t in aux])),
                                   ref(main, aux), **TOL)
    torch.testing.assert_close(back(layer(conv(main), [conv(t) for t in aux])), ref(main, aux), **TOL)


def test_fused_path_is_one_reconcile_call_and_folds_eval_bn(monkeypatch):
    torch.manual_seed(1)
    calls = []
    real = R._fused_reconcile

    def spy(*args, **kw):
        calls.append(len(args[1]))
        return real(*args, **kw)

    monkeypatch.setattr(R, "_fused_reconcile", spy)
    main, aux = _layer_inputs(adapters=False)

    # pure 1x1 conv + bias + act links: one call in training mode too
    layer = _make_layer("none", "relu", "nchw", adapters=False)
    out = layer(main, aux)
    assert calls == [2]
    torch.testing.assert_close(out, PlainLinks(layer)(main, aux), **TOL)

    # BN in training mode: batch statistics inside the op, one fused call for both links
    calls.clear()
    layer = _make_layer("bn", "relu", "nchw", adapters=False)
    layer(main, aux)
    assert calls == [2]

    # eval BN: folded into the 1x1 weights, one fused call, equal to the unfused eval output
    _randomize_bn_stats(layer)
    layer.eval()
    calls.clear()
    with torch.no_grad():
        folded = layer(main, aux)
        assert calls == [2]
        unfused = main + layer._links_with_norm([0, 1], [a.detach() for a in aux])
    torch.testing.assert_close(folded, unfused, **TOL)
    torch.testing.assert_close(folded, PlainLinks(layer).eval()(main, aux), **TOL)
    # the folded weights themselves: W' = W*s, b' = (0 - mean)*s + beta with s = gamma/sqrt(var+eps)
    gb = layer.links[1]
    w, b = gb.fused_params()
    s = gb.norm.weight / torch.sqrt(gb.norm.running_var + gb.norm.eps)
    torch.testing.assert_close(w, (gb.conv.weight[:, :, 0, 0] * s[:, None]).t())
    torch.testing.assert_close(b, -gb.norm.running_mean * s + gb.norm.bias)

    # NCHW in channels_last memory format: no copies, same numbers
    cl = [t.contiguous(memory_format=torch.channels_last) for t in [main, *aux]]
    with torch.no_grad():
        torch.testing.assert_close(layer(cl[0], cl[1:]), folded, **TOL)


def test_eval_with_autograd_trains_the_adapters_but_not_the_aux():
    """Eval mode with grad enabled: links with a gamma chain take the autograd path."""
    torch.manual_seed(2)
    layer = _make_layer("bn", "relu", "nchw").eval()
    main, aux = _layer_inputs()
    aux = [a.requires_grad_() for a in aux]
    layer(main, aux).square().mean().backward()
    assert all(a.grad is None for a in aux)
    for ad in layer.adapters[2:]:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ad.parameters())
    assert all(p.grad is not None for p in layer.links.parameters())


def test_gamma_c_conv_first_equals_upsample_first():
    torch.manual_seed(3)
    for mode in ("nearest", "bilinear"):
        c = R.GammaC(6, 4, mode=mode)
        x = torch.randn(2, 6, 5, 5)
        want = c.conv(F.interpolate(x, scale_factor=2, mode=mode))
        torch.testing.assert_close(c(x), want, **TOL)
        torch.testing.assert_close(c(x, (9, 9)), c.conv(F.interpolate(x, size=(9, 9), mode=mode)), **TOL)


def test_layer_validation():
    layer = _make_layer("bn", "relu", "nchw", adapters=False)
    main, aux = _layer_inputs(adapters=False)
    with pytest.raises(MoEKernelsError, match="main.*layout mismatch"):
        layer(torch.randn(2, 6, 6, 8), [torch.randn(2, 8, 6, 6), torch.randn(2, 5, 6, 6)])
    with pytest.raises(MoEKernelsError, match="aux\\[1\\].*5 channels"):
        layer(main, [aux[0], torch.randn(2, 6, 8, 8)])
    with pytest.raises(MoEKernelsError, match="mismatched resolutions"):
        layer(main, [aux[0], torch.randn(2, 5, 16, 16)])
    with pytest.raises(MoEKernelsError, match="one per link"):
        layer(main, aux[:1])
    with pytest.raises(MoEKernelsError, match="activation"):
        R.ReconciliationLayer(8, [8], activation="tanh")
    with pytest.raises(MoEKernelsError, match="adapters\\[0\\].*takes 4 channels"):
        R.ReconciliationLayer(8, [5], adapters=[R.GammaChain([4, 8])])
    with pytest.raises(MoEKernelsError, match="layout mismatch"):
        R.ReconciliationLayer(8, [4], adapters=[R.GammaChain([4, 8], layout="nhwc")])


# ---- ExpandedBackbone --------------------------------------------------------------------------

CH = (4, 8, 12, 16)


def _backbone(pattern="cross_level", T=2, layout="nchw", seed=0, **kw):
    torch.manual_seed(seed)
    nets = [TinyResNet(channels=CH, layout=layout) for _ in range(T)]
    return B.ExpandedBackbone(nets, pattern=pattern, layout=layout, **kw)


class PlainExpanded(nn.Module):
    """Eq. 2 rebuilt independently: deep copies of the branches + plain links with .detach()."""

    def __init__(self, ebb: B.ExpandedBackbone) -> None:
        super().__init__()
        self.branches = copy.deepcopy(ebb.branches)
        self.links = nn.ModuleDict()
        self.sources = {}
        for key, layer in ebb.fusers.items():
            self.links[key] = PlainLinks(layer)
            self.sources[key] = [(l.src_task, l.src_stage) for l in ebb._sources[key]]
        self.inline, self.T, self.D = ebb.fusion == "inline", ebb.num_tasks, ebb.num_stages

    def fuse(self, t, i, main, E):
        key = f"t{t}_s{i}"
        if key not in self.links:
            return main
        return self.links[key](main, [E[k][j] for k, j in self.sources[key]])

    def forward(self, x):
        if not self.inline:  # links on the outputs of the bare branches
            E = [list(b(x)) for b in self.branches]
            return [[self.fuse(t, i, E[t][i], E) for i in range(self.D)] for t in range(self.T)]
        h = [b.stem(x) for b in self.branches]
        E = [[None] * self.D for _ in range(self.T)]
        out = [[] for _ in range(self.T)]
        for i in range(self.D):
            for t in range(self.T):
                E[t][i] = self.branches[t].stages[i](h[t])
            for t in range(self.T):
                h[t] = self.fuse(t, i, E[t][i], E)  # F_i^t is the input of stage i+1
                out[t].append(h[t])
        return out


@pytest.mark.parametrize("pattern", ["cross_level", "same_level", "low_level", "deep_to_shallow"])
def test_backbone_matches_plain_reference_train_and_eval(pattern):
    ebb = _backbone(pattern)
    ref = PlainExpanded(ebb)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    out, want = ebb(x), ref(x)
    assert len(out) == 2 and all(len(o) == 4 for o in out)
    for o, w in zip(out, want):
        for a, b in zip(o, w):
            torch.testing.assert_close(a, b, **TOL_NET)
    # gradients: same through branches and links
    loss = sum((f * (n + 1)).mean() for n, fs in enumerate(out) for f in fs)
    rloss = sum((f * (n + 1)).mean() for n, fs in enumerate(want) for f in fs)
    loss.backward()
    rloss.backward()
    for t in range(2):
        for p, q in zip(ebb.branches[t].parameters(), ref.branches[t].parameters()):
            torch.testing.assert_close(p.grad, q.grad, **TOL_NET)
    for key in ebb.fusers:
        for p, q in zip(ebb.fusers[key].parameters(), ref.links[key].parameters()):
            torch.testing.assert_close(p.grad, q.grad, **TOL_NET)
    # eval mode (eval BN folded into the fused op for the same-level links)
    ebb.eval()
    ref.eval()
    with torch.no_grad():
        for o, w in zip(ebb(x), ref(x)):
            for a, b in zip(o, w):
                torch.testing.assert_close(a, b, **TOL_NET)


@pytest.mark.parametrize("pattern", ["cross_level", "deep_to_shallow"])
@pytest.mark.parametrize("train", [True, False])
def test_backbone_nhwc_equals_nchw(pattern, train):
    a = _backbone(pattern, layout="nchw")
    b = _backbone(pattern, layout="nhwc", seed=1)
    b.load_state_dict(a.state_dict())
    a.train(train)
    b.train(train)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        oa, ob = a(x), b(_nhwc(x))
    for fa, fb in zip(oa, ob):
        for u, v in zip(fa, fb):
            assert v.shape == (u.shape[0], u.shape[2], u.shape[3], u.shape[1])
            torch.testing.assert_close(_nchw(v), u, **TOL_NET)


@pytest.mark.parametrize("pattern", ["cross_level", "deep_to_shallow"])
def test_step_on_one_task_leaves_other_branches_untouched(pattern):
    """Task 0's loss: other branches and the links into them get grad None and are unchanged.

    None, not zero: with a zero gradient, SGD's weight decay and momentum would still move the
    parameter; a None gradient makes the optimizer skip it.
    """
    T = 3
    ebb = _backbone(pattern, T=T)
    others = [p for t in range(1, T) for p in ebb.branch_parameters(t)]
    others += [p for k, f in ebb.fusers.items() if not k.startswith("t0_") for p in f.parameters()]
    mine = list(ebb.branch_parameters(0)) + [p for k, f in ebb.fusers.items() if k.startswith("t0_")
                                            for p in f.parameters()]
    before = [p.detach().clone() for p in others]
    opt = torch.optim.SGD(ebb.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    out = ebb(x)
    sum(f.square().mean() for f in out[0]).backward()
    assert all(p.grad is None for p in others)
    assert all(p.grad is not None for p in mine)
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(others, before))


@pytest.mark.parametrize("T,D", [(2, 4), (3, 3), (4, 2)])
def test_link_counts_per_pattern(T, D):
    tt = T * (T - 1)
    low = (D + 1) // 2
    high = D - low
    want = {"same_level": tt * D, "cross_level": tt * D * (D + 1) // 2,
            "low_level": tt * low * (low + 1) // 2, "high_level": tt * high * (high + 1) // 2,
            "deep_to_shallow": tt * D * (D + 1) // 2}
    for pattern, n in want.items():
        links = B.reconciliation_links(pattern, T, D)
        assert len(links) == n, pattern
        assert all(l.src_task != l.dst_task for l in links)
    # built modules: gamma_a / gamma_c counts sum_{i} sum_{j<i} (i-j) per ordered task pair
    chans = [4 * (s + 1) for s in range(D)]
    for pattern, kind in (("cross_level", R.GammaA), ("deep_to_shallow", R.GammaC)):
        ebb = B.ExpandedBackbone([TinyResNet(channels=chans) for _ in range(T)], pattern=pattern)
        assert ebb.num_links == want[pattern]
        assert sum(l.num_links for l in ebb.fusers.values()) == want[pattern]
        assert sum(isinstance(m, kind) for m in ebb.fusers.modules()) == tt * (D - 1) * D * (D + 1) // 6
    # T^2 * D^2 growth of cross-level
    assert len(B.reconciliation_links("cross_level", 2 * T, 2 * D)) / want["cross_level"] == pytest.approx(
        (2 * T * (2 * T - 1)) * (2 * D) * (2 * D + 1) / (tt * D * (D + 1)))


def test_independent_phase_runs_no_link():
    ebb = _backbone("cross_level")
    assert ebb.phase == "joint"
    ebb.set_phase("independent")
    assert ebb.joint is False
    xs = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    bare = [copy.deepcopy(b) for b in ebb.branches]
    out = ebb(xs)  # per-task batches, as in Algorithm 1's first phase
    for t in range(2):
        for f, g in zip(out[t], bare[t](xs[t])):
            torch.testing.assert_close(f, g, rtol=0, atol=0)
    sum(f.mean() for fs in out for f in fs).backward()
    assert all(p.grad is None for p in ebb.link_parameters())
    ebb.joint = True
    joint = ebb(xs[0])
    assert not torch.allclose(joint[0][1], bare[0](xs[0])[1])


def test_custom_links_and_fusion_choice():
    links = [(1, 0, 0, 2), (0, 3, 1, 3)]
    ebb = _backbone(links)
    assert ebb.fusion == "inline" and set(ebb.fusers) == {"t0_s2", "t1_s3"}
    out = ebb(torch.randn(2, 3, 32, 32))
    assert out[1][0].shape == (2, 4, 32, 32)
    ebb_o = _backbone("cross_level", fusion="output")
    ref = PlainExpanded(ebb_o)
    x = torch.randn(2, 3, 32, 32)
    for o, w in zip(ebb_o(x), ref(x)):
        for a, b in zip(o, w):
            torch.testing.assert_close(a, b, **TOL_NET)


class _NoStages(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = TinyResNet(channels=CH)

    def forward(self, x):
        return self.net(x)


def test_backbone_validation():
    nets = [TinyResNet(channels=CH) for _ in range(2)]
    with pytest.raises(MoEKernelsError, match="at least 2"):
        B.ExpandedBackbone(nets[:1])
    with pytest.raises(MoEKernelsError, match="pattern"):
        B.ExpandedBackbone(nets, pattern="everything")
    with pytest.raises(MoEKernelsError, match="cycle"):
        B.ExpandedBackbone(nets, pattern="deep_to_shallow", fusion="inline")
    with pytest.raises(MoEKernelsError, match="itself"):
        B.ExpandedBackbone(nets, pattern=[(0, 0, 0, 1)])
    with pytest.raises(MoEKernelsError, match="stages"):
        B.ExpandedBackbone([_NoStages(), _NoStages()], stage_channels=CH)
    with pytest.raises(MoEKernelsError, match="layout mismatch"):
        B.ExpandedBackbone(nets, layout="nhwc")
    with pytest.raises(MoEKernelsError, match="phase"):
        B.ExpandedBackbone(nets).set_phase("warmup")
    # wrong channel counts: declared (4, 8, 12, 20) but stage 3 gives 16
    ebb = B.ExpandedBackbone(nets, stage_channels=(4, 8, 12, 20))
    with pytest.raises(MoEKernelsError, match="stage 3 output.*20 channels"):
        ebb(torch.randn(2, 3, 32, 32))
    # output fusion works with any branch returning its D stage features
    ebb = B.ExpandedBackbone([_NoStages(), _NoStages()], stage_channels=CH, fusion="output")
    ebb(torch.randn(2, 3, 32, 32))
    with pytest.raises(MoEKernelsError, match="x"):
        ebb([torch.randn(2, 3, 32, 32)] * 3)
    # mismatched resolutions between branches (different input sizes per branch)
    with pytest.raises(MoEKernelsError, match="mismatched resolutions"):
        ebb([torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)])
