"""experts_implementation="moe_kernels" in Hugging Face transformers, against "eager".

Tiny random models and experts modules are built offline (tests/hf_tiny.py). Tolerances:

* fp32: the same math in another order (grouped GEMMs, the combine's fp32 sum): outputs and every
  gradient within 1e-5 of eager's, relative to the tensor's largest value (seen: about 1e-6).
* bf16: the two implementations round at different places (eager multiplies and index_adds in
  bf16, moe_kernels combines in fp32), so neither is the truth: both are compared with the fp64
  eager model, and moe_kernels' error must be at most twice eager's own bf16 error (seen: 0.8-1.35x).
"""

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (bash scripts/setup.sh test)")

import moe_kernels.integrations.transformers as mkt  # noqa: E402  (registers "moe_kernels")

from .hf_tiny import MODEL_FAMILIES, build_experts, experts_classes, tiny_model  # noqa: E402

EXPERTS = experts_classes()


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / max(float(b.double().abs().max()), 1e-12))


def _step(model, ids):
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                 if p.grad is not None}


IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))


def _router_params(grads):
    return [n for n in grads if n.endswith(("mlp.gate.weight", "mlp.router.weight"))]


def test_registered():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert ALL_EXPERTS_FUNCTIONS["moe_kernels"] is mkt.experts_forward
    assert mkt.available()[0]


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_model_matches_eager_fp32(family):
    lg_ref, g_ref = _step(tiny_model(family, "eager"), IDS)
    lg, g = _step(tiny_model(family, "moe_kernels"), IDS)
    assert set(g) == set(g_ref)
    assert _router_params(g), "no router gradient to compare"
    assert _rel(lg, lg_ref) < 1e-5
    for n in g_ref:
        assert _rel(g[n], g_ref[n]) < 1e-5, n


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_model_bf16_is_as_accurate_as_eager(family):
    """One layer: its router sees the same bf16 bits under every implementation, so both choose the
    same experts. (With two, the second router's input carries each implementation's own bf16
    rounding of the first layer's experts, a near-tie in its top-k can flip in one and not the other,
    and the comparison measures that flip, not the experts' accuracy: seen as a 113% logit error in
    one of eight weight draws.)"""
    lg64, g64 = _step(tiny_model(family, "eager", torch.float64, layers=1), IDS)
    results = {impl: _step(tiny_model(family, impl, torch.bfloat16, layers=1), IDS)
               for impl in ("eager", "moe_kernels")}
    (lg_e, g_e), (lg_m, g_m) = results["eager"], results["moe_kernels"]
    assert _rel(lg_m, lg64) <= 2 * _rel(lg_e, lg64) + 1e-3
    for n in _router_params(g64) + [n for n in g64 if "experts" in n]:
        assert _rel(g_m[n], g64[n]) <= 2 * _rel(g_e[n], g64[n]) + 1e-3, n


def test_training_steps_match_eager():
    losses = {}
    for impl in ("eager", "moe_kernels"):
        model = tiny_model("qwen3_moe", impl)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[impl] = []
        for step in range(4):
            ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(step))
            loss = model(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[impl].append(loss.item())
    assert losses["moe_kernels"] == pytest.approx(losses["eager"], rel=1e-5)
    assert losses["eager"][-1] < losses["eager"][0]


def test_set_experts_implementation_and_state_dict_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("mixtral", "eager")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model(IDS).logits
    model.set_experts_implementation("moe_kernels")
    got = model(IDS).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="moe_kernels")
    assert loaded.config._experts_implementation == "moe_kernels"
    torch.testing.assert_close(loaded(IDS).logits, got, rtol=0, atol=0)


def test_torch_compile():
    """torch.compile of the model: inductor for the forward (about 20 s on 2 cores), aot_eager
    (the fake implementations and the autograd graph, without code generation) for a training
    step's gradients."""
    model = tiny_model("olmoe", "moe_kernels")
    ref = model(IDS).logits
    torch.testing.assert_close(torch.compile(model)(IDS).logits, ref, rtol=1e-5, atol=1e-5)
    _, g_ref = _step(model, IDS)
    model.zero_grad()
    torch.compile(model, backend="aot_eager")(IDS, labels=IDS).loss.backward()
    g = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert g.keys() == g_ref.keys()
    for n in g_ref:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family,module,name", EXPERTS, ids=[e[0] for e in EXPERTS])
def test_every_experts_family(family, module, name):
    """Each decorated experts class of the installed transformers: forward and backward (input,
    gate weights, every parameter) equal eager's in fp32, or the family is listed as unsupported
    with its reason (and then raises UnsupportedExperts)."""
    experts, _ = build_experts(family, module, name)
    E = experts.num_experts
    T, k = 11, min(2, E)
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=g)
    d = getattr(experts, "hidden_dim", None) or getattr(experts, "hidden_size")
    x = torch.randn(T, d, generator=g)
    if family in mkt.UNSUPPORTED:
        experts.config._experts_implementation = "moe_kernels"
        with pytest.raises(mkt.UnsupportedExperts):
            experts(x, ids, weights)
        return
    results = {}
    for impl in ("eager", "moe_kernels"):
        experts.config._experts_implementation = impl
        experts.zero_grad()
        xx, ww = x.clone().requires_grad_(), weights.clone().requires_grad_()
        out = experts(xx, ids, ww)
        out.square().sum().backward()
        results[impl] = [out.detach(), xx.grad, ww.grad] + [p.grad.clone() for p in experts.parameters()]
    for i, (a, b) in enumerate(zip(results["moe_kernels"], results["eager"])):
        assert _rel(a, b) < 1e-5, f"{name}: output {i}"


def test_expert_parallel_sentinels():
    """Ids of num_experts and more (transformers' EP sentinels, with zero weights) add nothing and
    get no gradient: the output is the local experts' part, as eager computes it."""
    experts, _ = build_experts(*next(e for e in EXPERTS if e[0] == "mixtral"))
    experts._is_expert_parallel = True
    E, T = experts.num_experts, 10
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)])
    ids[::3, 1] = E  # the sentinel
    weights = torch.rand(T, 2, generator=g).masked_fill(ids == E, 0.0)
    x = torch.randn(T, experts.hidden_dim, generator=g)
    out = {}
    for impl in ("eager", "moe_kernels"):
        experts.config._experts_implementation = impl
        out[impl] = experts(x, ids, weights)
    torch.testing.assert_close(out["moe_kernels"], out["eager"], rtol=1e-5, atol=1e-6)


def test_what_it_cannot_serve_names_the_class_and_feature():
    experts, _ = build_experts(*next(e for e in EXPERTS if e[0] == "mixtral"))
    experts.config._experts_implementation = "moe_kernels"
    x, ids, w = torch.randn(3, experts.hidden_dim), torch.tensor([[0, 1]] * 3), torch.rand(3, 2)
    with pytest.raises(mkt.UnsupportedExperts, match="MixtralExperts: its forward got arguments"):
        experts(x, ids, w, "extra")
    experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(mkt.UnsupportedExperts, match="MixtralExperts: expert weight 'gate_up_proj' is torch.int8"):
        experts(x, ids, w)


def test_info_reports_the_integration():
    import io

    from moe_kernels.cli import info

    buf = io.StringIO()
    info(buf)
    assert 'experts_implementation="moe_kernels"' in buf.getvalue()
