"""mk.adapt: new routers, pruning, top-K, added experts; the three guarantees the README states:
old datasets bit-identical after adding experts and a router, pruning keeps tokens that chose no
pruned expert, freezing leaves exactly the intended parameters trainable."""

import copy
import re

import pytest
import torch

import moe_kernels as mk
from moe_kernels import adapt
from moe_kernels._validation import MoEKernelsError
from moe_kernels.nn.usage import ExpertUsage


class Net(torch.nn.Module):
    """A small backbone: a Linear, then two residual MoE layers (one gelu, one swiglu)."""

    def __init__(self, M=1, E=5, k=2, d=8, bias=True, **kw):
        super().__init__()
        self.inp = torch.nn.Linear(d, d)
        self.blocks = torch.nn.ModuleList([
            mk.nn.MoE(d, 12, E, k, num_tasks=M, bias=bias, **kw),
            mk.nn.MoE(d, 12, E, k, num_tasks=M, bias=bias, activation="swiglu", **kw)])

    def forward(self, x, tasks=None):
        h = self.inp(x)
        aux = h.new_zeros(())
        for b in self.blocks:
            o = b(h, tasks)
            h, aux = h + o.output, aux + o.aux_loss
        return h, aux


def _raises(arg, fn, *a, **kw):
    with pytest.raises(MoEKernelsError, match=re.escape(f"argument '{arg}'")) as info:
        fn(*a, **kw)
    return str(info.value)


def _effective(net):
    """name -> effective tensor (partly trainable tensors merged), for value comparisons."""
    out = {}
    for n, p in net.named_parameters():
        if n.endswith("_trainable"):
            continue
        mod_name, _, leaf = n.rpartition(".")
        mod = net.get_submodule(mod_name) if mod_name else net
        out[n] = (mod.effective(leaf) if isinstance(mod, mk.nn.MoE) else p).detach().clone()
    return out


def _train(net, x, tasks, steps=3):
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5)  # weight decay: frozen rows must not decay
    for _ in range(steps):
        y, aux = net(x, tasks)
        (y.square().mean() + aux).backward()
        opt.step()
        opt.zero_grad()


# ---------------------------------------------------------------- guarantee 1: no forgetting

@pytest.mark.parametrize("M,d,E,T,backend", [
    (1, 12, 5, 42, None), (3, 12, 5, 42, None), (3, 12, 5, 42, "reference"), (1, 72, 13, 300, None),
    (4, 72, 13, 300, None)])
def test_add_experts_keeps_old_datasets_bit_identical(M, d, E, T, backend):
    """d*E*4 bytes is not a multiple of 64: the old routers' rows sit at other alignments than the
    copies the layer routes with afterwards; the larger shape takes other GEMM blockings."""
    torch.manual_seed(0)
    net = Net(M=M, E=E, d=d, backend=backend)
    x = torch.randn(2, T // 2, d)
    old = {t: net(x, t if M > 1 else None)[0] for t in range(M)}
    rep = adapt.add_experts(net, 3, generator=torch.Generator().manual_seed(0))
    assert rep.new_task == M and rep.added == {"blocks.0": [E, E + 1, E + 2], "blocks.1": [E, E + 1, E + 2]}
    for b in net.blocks:
        assert b.num_experts == E + 3 and b.num_tasks == M + 1 and b.visible_experts == [E] * M + [E + 3]
    for t in range(M):
        assert torch.equal(net(x, t)[0], old[t]), f"task {t} changed right after add_experts"
    # train the new parts on the new dataset (AdamW with weight decay), then look again
    _train(net, x, M, steps=2)
    assert not torch.equal(net(x, M)[0], old[M - 1])
    for t in range(M):
        assert torch.equal(net(x, t)[0], old[t]), f"task {t} changed after training the new task"
    # a second round of continual learning: still bit-identical for every earlier task
    adapt.add_router(net)
    adapt.add_experts(net, 2)
    for t in range(M):
        assert torch.equal(net(x, t)[0], old[t])
    assert net.blocks[0].visible_experts == [E] * M + [E + 3, E + 3, E + 5]


def test_add_experts_old_routers_never_choose_new_experts_per_token():
    """Mixed per-token tasks: masked routing. Old routers are built so that, unmasked, the new
    experts (logit 0 through the zero columns) would beat every visible expert."""
    torch.manual_seed(1)
    layer = mk.nn.MoE(8, 8, 4, 2, num_tasks=2)
    with torch.no_grad():
        layer.router_weight.copy_(-layer.router_weight.abs() - 0.5)  # x > 0 -> every logit < 0
    x = torch.rand(64, 8) + 0.1
    tasks = torch.randint(0, 2, (64,))
    before = layer(x, tasks)
    adapt.add_experts(layer, 3)
    tasks3 = torch.cat([tasks, torch.full((16,), 2)])
    x3 = torch.cat([x, torch.rand(16, 8)])
    o = layer(x3, tasks3)
    old = o.routing.topk_ids[:64]
    assert int(old.max()) < 4, "an old router chose an added expert"
    assert torch.equal(old, before.routing.topk_ids), "old tokens changed experts"
    torch.testing.assert_close(o.output[:64], before.output, rtol=1e-6, atol=1e-6)
    # and the same batch with the per-batch int path is bit-identical
    assert torch.equal(layer(x, 1).output, adapt_free_output(before, layer, x, 1))
    # the new task can choose the new experts
    with torch.no_grad():
        layer.router_weight_trainable[0, :, 4:] = 5.0
    assert int(layer(x3, tasks3).routing.topk_ids[64:].min()) >= 4


def adapt_free_output(_before, layer, x, task):
    """The output a plain MoE with only the old task's router and the old experts gives."""
    plain = mk.nn.MoE(8, 8, 4, 2)
    with torch.no_grad():
        plain.router_weight.copy_(layer.effective("router_weight")[task:task + 1, :, :4])
        for n in ("w1", "w2", "b1", "b2"):
            getattr(plain, n).copy_(layer.effective(n)[:4])
    return plain(x).output


def test_add_experts_per_layer_counts_and_mi_buffer():
    torch.manual_seed(2)
    net = Net(M=2, E=4)
    J0 = net.blocks[0].mutual_information.joint.clone()
    rep = adapt.add_experts(net, {"blocks.0": 2})  # blocks.1 gets 0 experts but the new router
    assert [b.num_experts for b in net.blocks] == [6, 4]
    assert net.blocks[1].visible_experts == [4, 4, 4] and not net.blocks[1]._restricted
    J = net.blocks[0].mutual_information.joint
    assert J.shape == (3, 6)
    torch.testing.assert_close(J[:2, :4], J0 * 2 / 3)
    assert float(J[:2, 4:].abs().sum()) == 0.0  # old tasks never choose the new experts
    torch.testing.assert_close(J.sum(1), torch.full((3,), 1 / 3))
    assert rep.after.layers["blocks.0"].experts == 6 and rep.before.layers["blocks.0"].experts == 4
    # exactly the new router rows and the new experts are trainable (none in blocks.1: C = 0)
    want = {"blocks.0.router_weight_trainable", "blocks.1.router_weight_trainable"} | {
        f"blocks.0.{n}_trainable" for n in ("w1", "w2", "b1", "b2")}
    assert {n for n, p in net.named_parameters() if p.requires_grad} == want
    assert net.blocks[0].trainable_rows("w1") == [False] * 4 + [True] * 2
    assert net.blocks[0].w1_trainable.shape[0] == 2 and net.blocks[0].router_weight_trainable.shape[0] == 1


# ---------------------------------------------------------------- guarantee 3: exact freezing

@pytest.mark.parametrize("unfreeze", [0, 2, [1, 3]], ids=["router-only", "2-random", "ids"])
def test_add_router_trains_exactly_the_new_router_and_chosen_experts(unfreeze):
    torch.manual_seed(3)
    net = Net(M=2, E=5)
    x = torch.randn(40, 8)
    old = {t: net(x, t)[0] for t in range(2)}
    before = _effective(net)
    rep = adapt.add_router(net, unfreeze_experts=unfreeze, generator=torch.Generator().manual_seed(5))
    assert rep.new_tasks == [2]
    chosen = rep.trainable_experts
    n_unfrozen = unfreeze if isinstance(unfreeze, int) else len(unfreeze)
    assert all(len(v) == n_unfrozen for v in chosen.values())
    if unfreeze == [1, 3]:
        assert chosen == {"blocks.0": [1, 3], "blocks.1": [1, 3]}
    want = {f"blocks.{i}.router_weight_trainable" for i in range(2)}
    if n_unfrozen:
        want |= {f"blocks.{i}.{n}_trainable" for i in range(2) for n in ("w1", "w2", "b1", "b2")}
    assert {n for n, p in net.named_parameters() if p.requires_grad} == want
    for i, b in enumerate(net.blocks):
        assert b.trainable_rows("router_weight") == [False, False, True]
        assert b.trainable_rows("w1") == [e in chosen[f"blocks.{i}"] for e in range(5)]
    n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert rep.after.trainable_params == n_train
    per_expert = sum(b.w1[0].numel() + b.w2[0].numel() + b.b1[0].numel() + b.b2[0].numel()
                     for b in net.blocks)
    assert per_expert == (8 * 12 + 12 * 8 + 12 + 8) + (8 * 24 + 12 * 8 + 24 + 8)
    assert n_train == 2 * 8 * 5 + n_unfrozen * per_expert
    # the old tasks are untouched by adding the router ...
    for t in range(2):
        assert torch.equal(net(x, t)[0], old[t])
    start = _effective(net)
    for name, b in before.items():  # adding the router changed no old value
        a = start[name]
        assert torch.equal(a[:2] if name.endswith("router_weight") else a, b), name
    _train(net, x, 2)
    after = _effective(net)
    for name, a in after.items():
        s = start[name]
        if name.endswith("router_weight"):
            assert torch.equal(a[:2], s[:2]), f"{name}: an old router moved"
            assert (a[2] != s[2]).all(), f"{name}: the new router did not train"
        elif not name.startswith("blocks"):
            assert torch.equal(a, s), f"{name} (outside the MoE layers) moved"
        else:
            ids = chosen[name[:len("blocks.0")]]
            frozen = [e for e in range(5) if e not in ids]
            assert torch.equal(a[frozen], s[frozen]), f"{name}: a frozen expert moved"
            for e in ids:
                assert (a[e] != s[e]).any(), f"{name}: trainable expert {e} did not move"
    # ... and stay untouched after training when no expert was unfrozen
    if n_unfrozen == 0:
        for t in range(2):
            assert torch.equal(net(x, t)[0], old[t])


def test_add_router_freeze_false_keeps_the_rest_trainable_and_copy_init():
    torch.manual_seed(4)
    net = Net(M=2, E=4)
    rep = adapt.add_router(net, num_new=2, init="copy", source_task=1, freeze=False)
    assert rep.new_tasks == [2, 3]
    b = net.blocks[0]
    assert b.trainable_rows("router_weight") == [True] * 4 and b.router_weight.requires_grad
    assert all(p.requires_grad for p in net.parameters())
    assert torch.equal(b.router_weight[2], b.router_weight[1])
    assert torch.equal(b.router_weight[3], b.router_weight[1])
    x = torch.randn(10, 8)
    assert torch.equal(net(x, 3)[0], net(x, 1)[0])  # a copied router routes like its source
    J = b.mutual_information.joint
    assert J.shape == (4, 4)
    torch.testing.assert_close(J.sum(1), torch.full((4,), 0.25))


def test_single_task_model_gets_tasks_and_mi():
    torch.manual_seed(5)
    layer = mk.nn.MoE(8, 8, 4, 2)
    x = torch.randn(20, 8)
    y = layer(x).output
    adapt.add_router(layer)
    assert layer.num_tasks == 2 and layer.mutual_information is not None
    assert torch.equal(layer(x, 0).output, y)
    o = layer(x, 1)
    assert "mutual_information" in o.losses
    _raises("task_ids", layer, x)  # two routers now: the task must be given


def test_set_trainable_rows_public_api():
    layer = mk.nn.MoE(8, 8, 4, 2, num_tasks=3)
    layer.set_trainable_rows("w1", [0, 2])
    assert layer.trainable_rows("w1") == [True, False, True, False]
    assert not layer.w1.requires_grad and layer.w1_trainable.shape == (2, 8, 8)
    layer.set_trainable_rows("w1", True)
    assert layer.w1.requires_grad and not hasattr(layer, "w1_trainable")
    layer.set_trainable_rows("router_weight", [False, True, False])
    assert layer.trainable_rows("router_weight") == [False, True, False]
    layer.reset_parameters()  # keeps which rows are trainable
    assert layer.trainable_rows("router_weight") == [False, True, False]
    # Python attributes on a parameter (marks a distributed engine reads) survive restructuring
    layer.w1.allreduce = False
    adapt.add_experts(layer, 1, freeze=False)
    assert layer.w1.shape[0] == 5 and layer.w1.allreduce is False
    layer.set_trainable_rows("w1", [4])
    assert layer.w1_trainable.allreduce is False
    _raises("rows", layer.set_trainable_rows, "w1", [5])
    _raises("rows", layer.set_trainable_rows, "w1", [True, False])
    _raises("rows", layer.set_trainable_rows, "w1", "all")
    _raises("name", layer.set_trainable_rows, "w3", True)


# ---------------------------------------------------------------- guarantee 2: pruning

@pytest.mark.parametrize("task_form", ["single", "int", "per_token"])
def test_prune_keeps_tokens_that_chose_no_pruned_expert(task_form):
    torch.manual_seed(6)
    M = 1 if task_form == "single" else 3
    layer = mk.nn.MoE(16, 24, 8, 2, num_tasks=M)
    x = torch.randn(300, 16)
    tasks = {"single": None, "int": 1, "per_token": torch.randint(0, 3, (300,))}[task_form]
    with ExpertUsage(layer) as usage:
        o = layer(x, tasks)
    rep = adapt.prune_experts(layer, num=3, usage=usage)
    gone = rep.removed[""]
    c = usage.counts[""].sum(0)
    assert len(gone) == 3 and all(c[g] <= c[e] for g in gone for e in range(8) if e not in gone)
    keep = [e for e in range(8) if e not in gone]
    o2 = layer(x, tasks)
    assert layer.num_experts == 5 and o2.routing.num_experts == 5
    ok = ~torch.isin(o.routing.topk_ids.long(), torch.tensor(gone)).any(1)
    assert 0 < int(ok.sum()) < 300
    remap = torch.tensor(keep)[o2.routing.topk_ids.long()[ok]]
    assert torch.equal(remap, o.routing.topk_ids.long()[ok]), "kept tokens changed experts"
    torch.testing.assert_close(o2.output[ok], o.output[ok], rtol=1e-6, atol=1e-6)
    # the tokens that lost an expert do change (the test can tell a change)
    assert (o2.output[~ok] - o.output[~ok]).abs().max() > 1e-3


def test_prune_modes_per_layer_and_report():
    torch.manual_seed(7)
    net = Net(M=2, E=6)
    usage = {"blocks.0": torch.tensor([[10, 0, 5, 1, 7, 3], [10, 0, 5, 1, 7, 3]]),
             "blocks.1": torch.tensor([[4, 4, 4, 4, 0, 4], [0, 0, 0, 0, 100, 0]])}
    n = copy.deepcopy(net)
    rep = adapt.prune_experts(n, num={"blocks.0": 2, "blocks.1": 1}, usage=usage)
    # pooled over tasks; blocks.1 ties at 4 among experts 0-3 and 5: the higher id goes first
    assert rep.removed == {"blocks.0": [1, 3], "blocks.1": [5]}
    assert [b.num_experts for b in n.blocks] == [4, 5]
    b0 = net.blocks[0]
    assert torch.equal(n.blocks[0].w1, b0.w1[[0, 2, 4, 5]])
    assert torch.equal(n.blocks[0].router_weight, b0.router_weight[:, :, [0, 2, 4, 5]])
    J = n.blocks[0].mutual_information.joint
    assert J.shape == (2, 4)
    torch.testing.assert_close(J.sum(1), torch.full((2,), 0.5))
    # params and FLOPs in the report follow the formulas
    d, h = 8, 12
    per_expert0 = d * h + h * d + h + d
    lost = rep.before.layers["blocks.0"].params - rep.after.layers["blocks.0"].params
    assert lost == 2 * (per_expert0 + 2 * d)  # two experts and their router column in both routers
    assert rep.after.layers["blocks.0"].flops_per_token == 2 * d * 4 + 2 * (2 * d * h + 2 * h * d)
    assert rep.after.layers["blocks.1"].flops_per_token == 2 * d * 5 + 2 * (2 * d * 2 * h + 2 * h * d)
    assert rep.after.params == sum(p.numel() for p in n.parameters())
    assert "blocks.0" in str(rep) and "->" in str(rep)
    # θ on one task's usage: 1/26 and 0/26 are below 5%, 3/26 is not
    n = copy.deepcopy(net)
    rep = adapt.prune_experts(n, threshold={"blocks.0": 0.05}, usage=usage, tasks=1)
    assert rep.removed == {"blocks.0": [1, 3], "blocks.1": []}
    # task 1 of blocks.1 used only expert 4: θ would leave 1 expert < k
    _raises("threshold", adapt.prune_experts, copy.deepcopy(net), threshold=0.05, usage=usage, tasks=1)
    n = copy.deepcopy(net)
    rep = adapt.prune_experts(n, fraction=0.5, usage=usage)
    assert rep.removed == {"blocks.0": [1, 3, 5], "blocks.1": [2, 3, 5]}
    n = copy.deepcopy(net)
    rep = adapt.prune_experts(n, experts={"blocks.1": [0, 5]})
    assert rep.removed == {"blocks.0": [], "blocks.1": [0, 5]} and n.blocks[0].num_experts == 6


def test_prune_threshold_with_expert_usage_object():
    torch.manual_seed(8)
    net = Net(M=2, E=6)
    with ExpertUsage(net) as usage:
        net(torch.randn(50, 8), 1)
    freq = usage.frequencies()
    rep = adapt.prune_experts(net, threshold=0.15, usage=usage, tasks=[1])
    for name in ("blocks.0", "blocks.1"):
        want = [e for e in range(6) if float(freq[name][1, e]) < 0.15]
        assert rep.removed[name] == want


def test_prune_remaps_visible_experts_and_keeps_trainable_rows():
    torch.manual_seed(9)
    net = Net(M=1, E=4)
    adapt.add_experts(net, 2)           # visible [4, 6], new experts 4, 5 trainable
    x = torch.randn(30, 8)
    adapt.prune_experts(net, experts=[1, 4])
    b = net.blocks[0]
    assert b.num_experts == 4 and b.visible_experts == [3, 4]
    assert b.trainable_rows("w1") == [False, False, False, True]  # old 5 -> new 3, still trainable
    assert b.trainable_rows("router_weight") == [False, True]
    net(x, 0), net(x, 1), net(x, torch.randint(0, 2, (30,)))


def test_prune_errors_change_nothing():
    net = Net(M=2, E=4, k=2)
    snapshot = copy.deepcopy(net.state_dict())
    usage = {"blocks.0": torch.ones(2, 4), "blocks.1": torch.ones(2, 4)}
    _raises("num", adapt.prune_experts, net, usage=usage)
    _raises("num", adapt.prune_experts, net, num=1, fraction=0.5, usage=usage)
    msg = _raises("num", adapt.prune_experts, net, num={"blocks.1": 3}, usage=usage)
    assert "blocks.1" in msg and "k=2" in msg
    _raises("usage", adapt.prune_experts, net, num=1)
    _raises("usage", adapt.prune_experts, net, num=1, usage={"blocks.0": torch.ones(4)})
    _raises("usage", adapt.prune_experts, net, num=1,
            usage={"blocks.0": torch.ones(3, 4), "blocks.1": torch.ones(4)})
    _raises("num", adapt.prune_experts, net, num={"blocks.9": 1}, usage=usage)
    _raises("fraction", adapt.prune_experts, net, fraction=1.0, usage=usage)
    _raises("threshold", adapt.prune_experts, net, threshold=2.0, usage=usage)
    _raises("tasks", adapt.prune_experts, net, threshold=0.1, usage=usage, tasks=5)
    _raises("experts", adapt.prune_experts, net, experts=[7])
    _raises("experts", adapt.prune_experts, net, experts={"blocks.0": [0, 1, 2]})
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), snapshot.values()))
    assert [b.num_experts for b in net.blocks] == [4, 4]


# ---------------------------------------------------------------- top-K, stats, merge, state dict

def test_set_top_k_lowers_flops_and_validates():
    torch.manual_seed(10)
    net = Net(M=1, E=6, k=3)
    rep = adapt.set_top_k(net, {"blocks.0": 1})
    assert [b.k for b in net.blocks] == [1, 3]
    d, h = 8, 12
    assert rep.before.layers["blocks.0"].flops_per_token - rep.after.layers["blocks.0"].flops_per_token == \
        2 * (2 * d * h + 2 * h * d)
    net(torch.randn(5, 8))
    assert net.blocks[0](torch.randn(5, 8)).routing.k == 1
    _raises("k", adapt.set_top_k, net, 7)
    _raises("k", adapt.set_top_k, net, 0)
    adapt.add_experts(net, 2)  # old task sees 6
    _raises("k", adapt.set_top_k, net, 7)
    adapt.set_top_k(net, 6)


def test_state_dict_roundtrip_merge_and_old_checkpoints():
    torch.manual_seed(11)
    plain = Net(M=2, E=4)
    keys = set(plain.state_dict())
    names = ("router_weight", "w1", "w2", "b1", "b2", "mutual_information.joint")
    assert keys == {"inp.weight", "inp.bias"} | {f"blocks.{i}.{n}" for i in range(2) for n in names}
    net = copy.deepcopy(plain)
    adapt.add_experts(net, 2, generator=torch.Generator().manual_seed(0))
    x = torch.randn(12, 8)
    _train(net, x, 2, steps=2)
    sd = net.state_dict()
    b = net.blocks[0]
    assert torch.equal(sd["blocks.0.w1"], b.effective("w1")) and not torch.equal(b.w1, b.effective("w1"))
    assert sd["blocks.0.visible_experts"].tolist() == [4, 4, 6]
    # the same adaptation applied to the pretrained model, then the checkpoint: same outputs
    twin = copy.deepcopy(plain)
    adapt.add_experts(twin, 2)
    twin.load_state_dict(sd)
    for t in (0, 2):
        assert torch.equal(twin(x, t)[0], net(x, t)[0])
    # a plain layer of the same structure loads the merged state dict strictly
    adapt.merge(net)
    assert not any(n.endswith("_trainable") for n, _ in net.named_parameters())
    rebuilt = Net(M=3, E=6, visible_experts=[4, 4, 6])
    rebuilt.load_state_dict(net.state_dict())
    assert torch.equal(rebuilt(x, 2)[0], net(x, 2)[0])
    # without the structure: a clear error
    with pytest.raises(RuntimeError, match="visible_experts=\\[4, 4, 6\\]"):
        Net(M=3, E=6).load_state_dict(net.state_dict())
    # an old (pre-adaptation) checkpoint still loads into a plain layer
    fresh = Net(M=2, E=4)
    fresh.load_state_dict(plain.state_dict())
    assert torch.equal(fresh(x, 1)[0], plain(x, 1)[0])


def test_compile_fullgraph_of_an_adapted_layer_matches_eager():
    torch.manual_seed(12)
    layer = mk.nn.MoE(16, 16, 4, 2, num_tasks=2)
    adapt.add_experts(layer, 2)
    adapt.add_router(layer, unfreeze_experts=1)
    twin = copy.deepcopy(layer)
    x = torch.randn(20, 16)
    tasks = torch.tensor([0, 1, 2, 3] * 5)
    torch._dynamo.reset()
    compiled = torch.compile(twin, fullgraph=True)
    for t in (1, tasks):
        a, b = layer(x, t), compiled(x, t)
        torch.testing.assert_close(b.output, a.output, rtol=1e-6, atol=1e-6)
        assert torch.equal(a.routing.topk_ids, b.routing.topk_ids)
        (b.output.square().mean() + b.aux_loss).backward()
    assert twin.router_weight_trainable.grad is not None and twin.router_weight.grad is None


def test_validation_of_add_functions():
    net = Net(M=2, E=4)
    _raises("model", adapt.add_router, torch.nn.Linear(2, 2))
    _raises("num_new", adapt.add_router, net, 0)
    _raises("init", adapt.add_router, net, init="zeros")
    _raises("source_task", adapt.add_router, net, init="copy", source_task=2)
    _raises("unfreeze_experts", adapt.add_router, net, unfreeze_experts=5)
    _raises("unfreeze_experts", adapt.add_router, net, unfreeze_experts=[4])
    _raises("unfreeze_experts", adapt.add_router, net, unfreeze_experts={"nope": [0]})
    _raises("generator", adapt.add_router, net, generator=3)
    _raises("num_new", adapt.add_experts, net, 0)
    _raises("num_new", adapt.add_experts, net, {"blocks.0": -1})
    _raises("num_new", adapt.add_experts, net, {"blocks.7": 1})
    assert [b.num_tasks for b in net.blocks] == [2, 2] and [b.num_experts for b in net.blocks] == [4, 4]
    mixed = torch.nn.ModuleList([mk.nn.MoE(8, 8, 4, 2, num_tasks=2), mk.nn.MoE(8, 8, 4, 2, num_tasks=3)])
    _raises("model", adapt.add_router, mixed)
    _raises("model", adapt.add_experts, mixed, 1)
    _raises("visible_experts", mk.nn.MoE, 8, 8, 4, 2, num_tasks=2, visible_experts=[4, 3])
    _raises("visible_experts[0]", mk.nn.MoE, 8, 8, 4, 2, num_tasks=2, visible_experts=[1, 4])
    _raises("visible_experts", mk.nn.MoE, 8, 8, 4, 2, num_tasks=2, visible_experts=[4])
    layer = mk.nn.MoE(8, 8, 4, 2, num_tasks=2)
    adapt.add_experts(layer, 1)
    _raises("task_ids", layer, torch.randn(3, 8), 3)
    _raises("task_ids", layer, torch.randn(3, 8), torch.tensor([0, 1, 3]))
    _raises("task", adapt.flops_per_token, layer, 5)
