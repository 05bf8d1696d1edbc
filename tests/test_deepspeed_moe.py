"""``moe_kernels.deepspeed``: the drop-in for ``deepspeed.moe.layer.MoE``.

Single process: the layer against DeepSpeed's own layer with the same weights (outputs, l_aux,
exp_counts, gradients), the converter (same loss, same parameter objects), the optimizer groups.
Two gloo processes: ``deepspeed.initialize`` with ZeRO 0, 1 and 2 and expert parallelism (ep_size 2)
or replicated experts (ep_size 1) for 20 steps, each run against a one-process reference with the same
weights and batches (the engine averages gradients over the 2 ranks, so the reference minimises
the mean of the two ranks' losses); the ranks hold 24 and 8 tokens. Then checkpoint save/resume.
"""

from __future__ import annotations

import copy
import functools
import inspect
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_kernels as mk

deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (bash scripts/setup.sh test)")
from deepspeed.moe.layer import MoE as DSMoE  # noqa: E402

import moe_kernels.deepspeed as mkds  # noqa: E402
from moe_kernels.distributed import run_processes  # noqa: E402

pytestmark = pytest.mark.peers  # needs DeepSpeed; the multi-process tests are also marked distributed

D, H, E = 8, 16, 4
W = 2
COUNTS = (24, 8)  # tokens per rank in the training runs
STEPS = 20
NO_RANDOM = dict(use_rts=False, top2_2nd_expert_sampling=False)


def mlp(d=D, h=H, act=None):
    return nn.Sequential(nn.Linear(d, h), act or nn.GELU(), nn.Linear(h, d))


def scramble_experts(layer, seed):
    """Give every expert its own weights (DeepSpeed's constructor copies one expert E times)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.deepspeed_moe.experts.deepspeed_experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ----------------------------------------------------------------------------- single process

def test_constructor_signature_matches_deepspeed():
    ours = inspect.signature(mkds.MoE.__init__).parameters
    theirs = inspect.signature(DSMoE.__init__).parameters
    assert [n for n, p in ours.items() if p.kind is not p.KEYWORD_ONLY] == list(theirs)
    assert all(ours[n].default == theirs[n].default for n in theirs)
    assert mkds._signature_matches_deepspeed()


def test_same_init_and_state_dict_layout_as_deepspeed():
    torch.manual_seed(0)
    a = DSMoE(D, mlp(), num_experts=E, k=2, use_residual=True)
    torch.manual_seed(0)
    b = mkds.MoE(D, mlp(), num_experts=E, k=2, use_residual=True)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        assert getattr(pa, "allreduce", True) == getattr(pb, "allreduce", True), na
        assert getattr(pa, "group_name", None) == getattr(pb, "group_name", None), na
    assert isinstance(b, DSMoE)  # what deepspeed.initialize looks for


# k, drop_tokens, capacity_factor: the settings where DeepSpeed's routing is deterministic: dropless,
# or capacity with k >= 2 (k = 2: DeepSpeed's choice-major drop order, reproduced; k >= 3: drops by
# score). With k = 1 DeepSpeed picks an unspecified (use_rts=False) or random subset: no drops here.
PARITY = [(1, False, 1.0), (2, False, 1.0), (3, False, 1.0), (1, True, 4.0), (2, True, 4.0), (2, True, 0.5),
          (2, True, 0.25), (3, True, 0.5), (4, True, 0.75)]


@pytest.mark.parametrize("k,drop,cf", PARITY)
@pytest.mark.parametrize("expert", ["mlp", "generic"])
def test_layer_matches_deepspeed(k, drop, cf, expert):
    class Generic(nn.Module):  # not the grouped-MLP shape: runs one module call per expert
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(D, D)

        def forward(self, x):
            return torch.tanh(self.fc(x)), None

    make = (lambda: mlp(act=nn.SiLU())) if expert == "mlp" else Generic
    torch.manual_seed(1)
    ds = DSMoE(D, make(), num_experts=E, k=k, drop_tokens=drop, capacity_factor=cf, eval_capacity_factor=cf,
               min_capacity=0, **NO_RANDOM)
    scramble_experts(ds, 7)
    ours = mkds.MoE(D, make(), num_experts=E, k=k, drop_tokens=drop, capacity_factor=cf,
                    eval_capacity_factor=cf, min_capacity=0, **NO_RANDOM)
    ours.load_state_dict(ds.state_dict())
    assert (mkds.mlp_expert_activation(ours.deepspeed_moe.experts.deepspeed_experts[0]) is None) == (
        expert == "generic")
    x = torch.randn(3, 9, D, generator=torch.Generator().manual_seed(k))
    gy = torch.randn(3, 9, D, generator=torch.Generator().manual_seed(99))
    outs = []
    for layer in (ds, ours):
        xi = x.clone().requires_grad_(True)
        y, l_aux, counts = layer(xi)
        ((y * gy).sum() + l_aux).backward()
        outs.append((y.detach(), l_aux.detach(), counts, xi.grad,
                     {n: p.grad for n, p in layer.named_parameters()}))
    (ya, la, ca, gxa, pa), (yb, lb, cb, gxb, pb) = outs
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(yb, ya, **tol)
    torch.testing.assert_close(lb, la, **tol)
    assert torch.equal(cb, ca.to(cb.dtype)) and cb.dtype == torch.int64
    torch.testing.assert_close(gxb, gxa, **tol)
    assert set(pa) == set(pb)
    for n in pa:
        torch.testing.assert_close(pb[n], pa[n], **tol, msg=n)


def test_residual_and_eval_capacity_match_deepspeed():
    torch.manual_seed(2)
    ds = DSMoE(D, mlp(), num_experts=E, k=2, use_residual=True, capacity_factor=0.25,
               eval_capacity_factor=8.0, min_capacity=0, **NO_RANDOM).eval()
    scramble_experts(ds, 3)
    ours = mkds.convert_deepspeed_moe(copy.deepcopy(ds))
    assert isinstance(ours, mkds.MoE) and not ours.training
    x = torch.randn(20, D)
    for a, b in zip(ds(x), ours(x)):
        torch.testing.assert_close(b, a.to(b.dtype), rtol=1e-5, atol=1e-6)


def test_training_noise_options_run():
    """Gumbel second-expert sampling (DeepSpeed's default), RSample and Jitter: random, so only the
    contract is checked: valid output, k distinct experts per token, finite gradients; eval is clean."""
    torch.manual_seed(3)
    x = torch.randn(32, D)
    for kw in (dict(k=2), dict(k=1, noisy_gate_policy="RSample"), dict(k=2, noisy_gate_policy="Jitter")):
        layer = mkds.MoE(D, mlp(), num_experts=E, drop_tokens=False, **kw)
        y, l_aux, counts = layer(x)
        assert y.shape == x.shape and int(counts.sum()) == 32 * kw["k"]
        (y.sum() + l_aux).backward()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
        layer.eval()
        torch.testing.assert_close(layer(x)[0], layer(x)[0])


def _model(layer_cls, ep_size=1, *, k=2, drop_tokens=False, seed=0):
    """Linear -> tanh -> MoE -> head, with a loss: the model the engine tests train."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(D, D)
            self.moe = layer_cls(D, mlp(), num_experts=E, ep_size=ep_size, k=k, drop_tokens=drop_tokens,
                                 capacity_factor=1.0, min_capacity=0, **NO_RANDOM)
            self.head = nn.Linear(D, 1)

        def forward(self, x, y):
            h, l_aux, _ = self.moe(torch.tanh(self.inp(x)))
            return F.mse_loss(self.head(h).squeeze(-1), y) + 0.01 * l_aux

    torch.manual_seed(seed)
    net = Net()
    scramble_experts(net.moe, seed + 100)
    return net


def test_converter_keeps_weights_and_loss():
    """The worked example of docs/scale.md: convert a model holding DeepSpeed MoE layers in place."""
    ds_model = _model(DSMoE, k=2, drop_tokens=True)
    params_before = {n: p for n, p in ds_model.named_parameters()}
    x, y = torch.randn(24, D), torch.randn(24)
    loss_ds = ds_model(x, y)
    ds_model.moe.deepspeed_moe.l_aux = ds_model.moe.deepspeed_moe.exp_counts = None  # deep-copyable again
    reference = copy.deepcopy(ds_model)

    converted = mkds.convert_deepspeed_moe(ds_model)
    assert converted is ds_model and isinstance(ds_model.moe, mkds.MoE)
    assert {n: p for n, p in ds_model.named_parameters()} == params_before  # the very same tensors
    loss_mk = ds_model(x, y)
    torch.testing.assert_close(loss_mk, loss_ds, rtol=1e-6, atol=1e-7)
    assert mkds.convert_deepspeed_moe(ds_model) is ds_model  # idempotent
    # a state dict of the original loads into the converted model (and back)
    ds_model.load_state_dict(reference.state_dict())
    reference.load_state_dict(ds_model.state_dict())


def test_param_groups_split_experts():
    net = _model(mkds.MoE)
    groups = mkds.param_groups(net, lr=0.1, weight_decay=0.01)
    assert [g["name"] for g in groups] == ["dense", "ep_size_1"]
    assert [g.get("moe", False) for g in groups] == [False, True]
    experts = set(map(id, net.moe.deepspeed_moe.experts.parameters()))
    assert {id(p) for p in groups[1]["params"]} == experts
    assert not experts & {id(p) for p in groups[0]["params"]}
    assert all(g["lr"] == 0.1 and g["weight_decay"] == 0.01 for g in groups)
    torch.optim.AdamW(groups)  # torch accepts the extra keys
    user = [{"params": list(net.inp.parameters()), "lr": 1.0},
            {"params": list(net.moe.parameters()) + list(net.head.parameters()), "lr": 2.0, "name": "rest"}]
    split = mkds.param_groups(user)
    assert sorted((g["name"], g["lr"], g.get("moe", False)) for g in split) == [
        ("ep_size_1", 2.0, True), ("group0", 1.0, False), ("rest", 2.0, False)]


def test_validation_errors_name_the_argument():
    err = mk.MoEKernelsError
    with pytest.raises(err, match="argument 'num_experts'"):
        mkds.MoE(D, mlp(), num_experts=3, ep_size=2)
    with pytest.raises(err, match="argument 'k'"):
        mkds.MoE(D, mlp(), num_experts=2, k=3)
    with pytest.raises(err, match="argument 'noisy_gate_policy'"):
        mkds.MoE(D, mlp(), num_experts=2, noisy_gate_policy="Gaussian")
    with pytest.raises(err, match="argument 'enable_expert_tensor_parallelism'"):
        mkds.MoE(D, mlp(), num_experts=2, enable_expert_tensor_parallelism=True)
    with pytest.raises(err, match="argument 'expert'"):
        mkds.MoE(D, "mlp", num_experts=2)
    layer = mkds.MoE(D, mlp(), num_experts=2)
    with pytest.raises(err, match="argument 'used_token'"):
        layer(torch.randn(4, D), torch.ones(4))
    with pytest.raises(err, match="argument 'hidden_states'"):
        layer(torch.randn(4, D + 1))
    with pytest.raises(err, match="argument 'ep_size'.*no expert-parallel group"):
        mkds.MoE(D, mlp(), num_experts=2, ep_size=2)(torch.randn(4, D))
    with pytest.raises(err, match="argument 'layer'"):
        mkds.MoE.from_deepspeed(nn.Linear(2, 2))
    with pytest.raises(err, match="argument 'model'"):
        mkds.param_groups([])


def test_deepcopy_after_forward():
    layer = mkds.MoE(D, mlp(), num_experts=2, k=1)
    layer(torch.randn(5, D))
    clone = copy.deepcopy(layer)
    assert clone.deepspeed_moe.l_aux is None
    torch.testing.assert_close(clone(torch.ones(3, D))[0], layer(torch.ones(3, D))[0])


# ----------------------------------------------------------------------------- 2 processes

def batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    n = COUNTS[rank]
    return torch.randn(n, D, generator=g), torch.randn(n, generator=g)


def local_state(full: dict, ep_size: int, ep_rank: int) -> dict:
    """The state dict of rank ``ep_rank``'s model from a one-process (all experts) state dict."""
    n = E // ep_size
    out = {}
    for key, v in full.items():
        marker = "deepspeed_experts."
        if marker in key:
            head, tail = key.split(marker)
            gid, rest = tail.split(".", 1)
            gid = int(gid)
            if not (ep_rank * n <= gid < (ep_rank + 1) * n):
                continue
            key = f"{head}{marker}{gid - ep_rank * n}.{rest}"
        out[key] = v
    return out


def full_state(local_states: list, ep_size: int) -> dict:
    """Inverse of :func:`local_state` over the ranks of one expert-parallel group."""
    n = E // ep_size
    out = {}
    for rank, st in enumerate(local_states[:ep_size]):
        for key, v in st.items():
            marker = "deepspeed_experts."
            if marker in key:
                head, tail = key.split(marker)
                lid, rest = tail.split(".", 1)
                key = f"{head}{marker}{rank * n + int(lid)}.{rest}"
            out[key] = v
    return out


def ds_config(stage, clip=0.0):
    # DeepSpeed 0.19.8 clips gradients to norm 1.0 unless told otherwise: the reference clips the same
    return {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "gradient_clipping": clip, "steps_per_print": 10 ** 9}


# (ep_size, ZeRO stage, gradient clipping). With clipping only ZeRO 1/2 are compared: DeepSpeed's ZeRO-0
# clipping with expert parallelism uses the mean of the ranks' local norms (deepspeed/runtime/utils.py
# clip_grad_norm_), not the global norm, so it differs from one process by design (docs/scale.md).
ENGINE_RUNS = [(2, 0, 0.0), (2, 1, 0.0), (2, 2, 0.0), (1, 0, 0.0), (1, 2, 0.0), (2, 2, 0.5), (1, 1, 0.5)]


def _train_child(rank, world):
    deepspeed.init_distributed(dist_backend="gloo")
    from deepspeed.utils import groups
    init = _model(mkds.MoE).state_dict()
    out = {}
    for ep_size, stage, clip in ENGINE_RUNS:
        net = _model(mkds.MoE, ep_size, seed=rank + 5)  # wrong weights on purpose: loaded next
        net.load_state_dict(local_state(init, ep_size, rank % ep_size))
        opt = torch.optim.SGD(mkds.param_groups(net), lr=0.05, momentum=0.9)
        engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=ds_config(stage, clip))
        losses = []
        for step in range(STEPS):
            x, y = batch(step, rank)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        info = dict(losses=losses, state={k: v.clone() for k, v in net.state_dict().items()},
                    ep_rank=groups._get_expert_parallel_rank(f"ep_size_{ep_size}"))
        zo = engine.optimizer
        if stage > 0:
            info["partition_count"] = list(zo.partition_count)
            info["is_moe"] = list(zo.is_moe_param_group)
            info["partition_numel"] = [int(p.numel()) for p in zo.single_partition_of_fp32_groups]
            info["group_numel"] = [sum(p.numel() for p in g) for g in zo.bit16_groups]
        out[(ep_size, stage, clip)] = info
    out["uneven"] = _uneven_tokens(rank)
    return out


# (tokens per rank, drop_tokens)
UNEVEN = [((24, 8), False), ((24, 0), False), ((24, 8), True), ((24, 0), True)]


def _uneven_layer(ep_size, drop, min_capacity=0):
    torch.manual_seed(11)
    layer = mkds.MoE(D, mlp(), num_experts=E, ep_size=ep_size, k=2, drop_tokens=drop, capacity_factor=0.5,
                     min_capacity=min_capacity, **NO_RANDOM)
    scramble_experts(layer, 12)
    return layer


def _uneven_input(counts, rank):
    g = torch.Generator().manual_seed(77 + rank)
    return torch.randn(counts[rank], D, generator=g), torch.randn(counts[rank], D, generator=g)


def _uneven_tokens(rank):
    """The setting where DeepSpeed's own layer fails (ranks with 24 and 8, or 24 and 0 tokens): the
    library's layer with ep_size 2, forward and backward, dropless and with drops."""
    res = {}
    for counts, drop in UNEVEN:
        layer = _uneven_layer(2, drop)
        layer.load_state_dict(local_state(_uneven_layer(1, drop).state_dict(), 2, rank))
        layer.set_deepspeed_parallelism()  # inherited from DeepSpeed's layer: groups via deepspeed.utils
        x, gy = _uneven_input(counts, rank)
        x.requires_grad_(True)
        y, l_aux, exp_counts = layer(x)
        ((y * gy).sum() + l_aux).backward()
        res[(counts, drop)] = dict(y=y.detach(), l_aux=float(l_aux.detach()), counts=exp_counts, gx=x.grad,
                                   grads={n: p.grad for n, p in layer.named_parameters()})
    return res


@functools.lru_cache(maxsize=None)
def _reference_training(clip: float = 0.0):
    """One process, all experts, loss = mean over the two ranks' batches, the same SGD (and the same
    global-norm clipping)."""
    net = _model(mkds.MoE)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        per_rank = [net(*batch(step, r)) for r in range(W)]
        loss = sum(per_rank) / W
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        losses.append([float(v.detach()) for v in per_rank])
    return losses, net.state_dict()


@pytest.fixture(scope="module")
def engine_runs(deepspeed_ops):
    return run_processes(_train_child, W, backend=None, timeout=600)


@pytest.mark.distributed
@pytest.mark.parametrize("ep_size,stage,clip", ENGINE_RUNS)
def test_deepspeed_engine_training_matches_one_process(engine_runs, ep_size, stage, clip):
    ref_losses, ref_state = _reference_training(clip)
    runs = [engine_runs[r][(ep_size, stage, clip)] for r in range(W)]
    assert [r["ep_rank"] for r in runs] == [0, 1] if ep_size == 2 else [0, 0]
    for rank in range(W):
        torch.testing.assert_close(torch.tensor(runs[rank]["losses"]),
                                   torch.tensor([step[rank] for step in ref_losses]), rtol=2e-5, atol=2e-6)
    state = full_state([r["state"] for r in runs], ep_size)
    assert set(state) == set(ref_state)
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=1e-4, atol=1e-5, msg=key)
    if ep_size == 1:  # replicated experts stay identical on both ranks
        for key, v in runs[0]["state"].items():
            assert torch.equal(v, runs[1]["state"][key]), key
    if stage > 0:
        # ZeRO partitions dense groups over both ranks and expert groups over the expert-data-parallel
        # group (ranks holding the same experts): size 2 / ep_size
        info = runs[0]
        assert info["is_moe"] == [False, True]
        assert info["partition_count"] == [W, W // ep_size]
        for numel, total, count in zip(info["partition_numel"], info["group_numel"], info["partition_count"]):
            assert numel == -(-total // count) or abs(numel - total / count) < 64  # padded to alignment


@pytest.mark.distributed
def test_zero2_matches_zero0(engine_runs):
    """20 steps with ZeRO-2 give the losses of the run without ZeRO."""
    for rank in range(W):
        a = engine_runs[rank][(2, 0, 0.0)]["losses"]
        b = engine_runs[rank][(2, 2, 0.0)]["losses"]
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-6)


def _checkpoint_child(rank, world, ckpt_dir):
    deepspeed.init_distributed(dist_backend="gloo")
    init = _model(mkds.MoE).state_dict()
    ep_size = 2

    def engine_for(seed):
        net = _model(mkds.MoE, ep_size, seed=seed)
        opt = torch.optim.AdamW(mkds.param_groups(net, weight_decay=0.01), lr=3e-3)
        return deepspeed.initialize(model=net, optimizer=opt, config=ds_config(2))[0], net

    def run(engine, steps):
        losses = []
        for step in steps:
            x, y = batch(step, rank)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        return losses

    engine, net = engine_for(seed=0)
    net.load_state_dict(local_state(init, ep_size, rank))
    first = run(engine, range(10))
    engine.save_checkpoint(ckpt_dir, tag="step10", client_state={"next_step": 10})
    uninterrupted = run(engine, range(10, 20))
    resumed_engine, _ = engine_for(seed=123)  # different weights: everything must come from the checkpoint
    _, client = resumed_engine.load_checkpoint(ckpt_dir, tag="step10")
    resumed = run(resumed_engine, range(client["next_step"], 20))
    return dict(first=first, uninterrupted=uninterrupted, resumed=resumed, steps=resumed_engine.global_steps)


@pytest.mark.distributed
def test_checkpoint_resume_continues_with_the_same_losses(tmp_path, deepspeed_ops):
    out = run_processes(_checkpoint_child, W, args=(str(tmp_path),), backend=None, timeout=600)
    for rank in range(W):
        assert out[rank]["steps"] == 20
        assert out[rank]["resumed"] == out[rank]["uninterrupted"], rank  # bit-identical continuation
    files = sorted(os.listdir(tmp_path / "step10"))
    # one file per global expert (written by the rank that holds it), as DeepSpeed's own layer does
    assert [f for f in files if f.startswith("layer_0_expert_")] == [
        f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(E)]
    # the ZeRO-2 optimizer state: one shard per rank (expert states live in the shard of the rank
    # holding the experts)
    assert [f for f in files if "optim_states" in f] == [
        f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(W)]


@pytest.mark.distributed
@pytest.mark.parametrize("counts,drop", UNEVEN)
def test_expert_parallel_layer_with_uneven_and_empty_ranks(engine_runs, counts, drop):
    """ep_size 2 with 24 and 8 (or 0) tokens: each rank's output, l_aux, exp_counts and input gradient
    equal a one-process layer's on that rank's tokens; expert gradients equal the sum over both ranks'
    tokens. With drops, the group's capacity is the larger rank's: the reference gets it as
    min_capacity."""
    from moe_kernels.reference.routing import resolve_capacity
    cap = max(resolve_capacity(n, 2, E, None, 0.5, 0) for n in counts) if drop else 0
    ref_grads = {}
    for rank in range(W):
        got = engine_runs[rank]["uneven"][(counts, drop)]
        ref = _uneven_layer(1, drop, min_capacity=cap)
        x, gy = _uneven_input(counts, rank)
        x.requires_grad_(True)
        y, l_aux, exp_counts = ref(x)
        ((y * gy).sum() + l_aux).backward()
        assert got["y"].shape == (counts[rank], D)
        torch.testing.assert_close(got["y"], y.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["l_aux"], float(l_aux.detach()), rtol=1e-5, atol=1e-6)
        assert torch.equal(got["counts"], exp_counts)
        torch.testing.assert_close(got["gx"], x.grad, rtol=1e-5, atol=1e-6)
        for n, p in ref.named_parameters():
            ref_grads[n] = ref_grads.get(n, 0) + p.grad
    for rank in range(W):
        got = engine_runs[rank]["uneven"][(counts, drop)]["grads"]
        mine = local_state(ref_grads, 2, rank)
        assert set(got) == set(mine)
        for n in mine:
            if "experts" in n:  # complete on the rank that holds the expert
                torch.testing.assert_close(got[n], mine[n], rtol=1e-5, atol=1e-6, msg=n)
    gate = "deepspeed_moe.gate.wg.weight"  # replicated: the ranks' gradients sum to the reference's
    torch.testing.assert_close(sum(engine_runs[r]["uneven"][(counts, drop)]["grads"][gate] for r in range(W)),
                               ref_grads[gate], rtol=1e-5, atol=1e-6)
