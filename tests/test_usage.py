"""mk.nn.ExpertUsage: per-task expert counts collected by forward hooks, against brute force."""

import re

import pytest
import torch

import moe_kernels as mk
from moe_kernels import adapt
from moe_kernels._validation import MoEKernelsError
from moe_kernels.nn.usage import ExpertUsage


class Net(torch.nn.Module):
    def __init__(self, M=3, E=5, k=2, **kw):
        super().__init__()
        self.inp = torch.nn.Linear(8, 8)
        self.blocks = torch.nn.ModuleList([mk.nn.MoE(8, 12, E, k, num_tasks=M, **kw) for _ in range(2)])

    def forward(self, x, tasks=None):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h, tasks).output
        return h


def _brute(routing, token_tasks, M, E):
    """(kept, dropped) [M, E] counts with Python loops over the assignments."""
    kept, dropped = torch.zeros(M, E, dtype=torch.int64), torch.zeros(M, E, dtype=torch.int64)
    T, k = routing.topk_ids.shape
    for t in range(T):
        for j in range(k):
            e, m = int(routing.topk_ids[t, j]), int(token_tasks[t])
            (kept if int(routing.slots[t, j]) >= 0 else dropped)[m, e] += 1
    return kept, dropped


def _record(layer):
    """Wrap the layer's forward hooks to keep each call's routing and token tasks."""
    seen = []

    def hook(mod, args, kwargs, out):
        x = args[0]
        tasks = args[1] if len(args) > 1 else kwargs.get("task_ids")
        tt = mod._token_tasks(tasks, tuple(x.shape[:-1]))
        T = out.routing.num_tokens
        seen.append((out.routing, torch.full((T,), tt) if isinstance(tt, int) else tt.clone()))
    return seen, layer.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("capacity_factor", [None, 0.6], ids=["dropless", "capacity"])
def test_counts_match_brute_force_over_mixed_task_forms(capacity_factor):
    torch.manual_seed(0)
    M, E = 3, 5
    net = Net(M, E, capacity_factor=capacity_factor)
    seen, handle = _record(net.blocks[1])
    calls = [(torch.randn(4, 6, 8), 2), (torch.randn(4, 6, 8), torch.randint(0, M, (4, 6))),
             (torch.randn(4, 6, 8), torch.tensor([0, 2, 1, 0])), (torch.randn(7, 8), 0)]
    with ExpertUsage(net) as usage:
        assert set(usage.layers) == {"blocks.0", "blocks.1"}
        for x, t in calls:
            net(x, t)
    handle.remove()
    want_k, want_d = torch.zeros(M, E, dtype=torch.int64), torch.zeros(M, E, dtype=torch.int64)
    for r, tt in seen:
        k_, d_ = _brute(r, tt, M, E)
        want_k += k_
        want_d += d_
    assert torch.equal(usage.counts["blocks.1"], want_k)
    assert torch.equal(usage.dropped["blocks.1"], want_d)
    total_dropped = sum(int(r.num_dropped) for r, _ in seen)
    assert int(usage.dropped["blocks.1"].sum()) == total_dropped
    if capacity_factor is None:
        assert total_dropped == 0
    else:
        assert total_dropped > 0  # the capacity case must exercise drops
    # every call counted: kept + dropped = T * k per call
    assert int(want_k.sum() + want_d.sum()) == sum(r.num_tokens * 2 for r, _ in seen)
    f = usage.frequencies()["blocks.1"]
    torch.testing.assert_close(f.sum(1), torch.ones(M, dtype=torch.float64))
    torch.testing.assert_close(f[1], want_k[1].double() / want_k[1].sum())
    fc = usage.frequencies(combined=True)["blocks.1"]
    torch.testing.assert_close(fc, want_k.sum(0).double() / want_k.sum())
    assert usage.total("blocks.1") == int(want_k.sum())


def test_detached_hooks_stop_counting_and_reset_zeroes():
    torch.manual_seed(1)
    net = Net(2, 4)
    usage = ExpertUsage(net).attach()
    net(torch.randn(10, 8), 1)
    c = {n: v.clone() for n, v in usage.counts.items()}
    assert int(c["blocks.0"][1].sum()) == 20 and int(c["blocks.0"][0].sum()) == 0
    usage.detach()
    net(torch.randn(10, 8), 1)
    assert all(torch.equal(usage.counts[n], c[n]) for n in c)
    assert not net.blocks[0]._forward_hooks  # really removed
    usage.attach()
    net(torch.randn(5, 8), 0)
    assert int(usage.counts["blocks.0"][0].sum()) == 10
    usage.reset()
    assert all(int(v.abs().sum()) == 0 for v in usage.counts.values())
    usage.detach()


def test_frequencies_of_an_unseen_task_are_zero_and_single_layer_model():
    layer = mk.nn.MoE(8, 8, 4, 2)
    with ExpertUsage(layer) as usage:
        layer(torch.randn(9, 8))
    assert list(usage.counts) == [""]
    assert usage.counts[""].shape == (1, 4) and int(usage.counts[""].sum()) == 18
    layer2 = mk.nn.MoE(8, 8, 4, 2, num_tasks=3)
    with ExpertUsage(layer2) as u2:
        layer2(torch.randn(9, 8), 1)
    f = u2.frequencies()[""]
    assert torch.equal(f[0], torch.zeros(4, dtype=torch.float64)) and float(f[1].sum()) == pytest.approx(1.0)


def test_counts_after_add_experts_stay_in_old_tasks_prefix():
    torch.manual_seed(2)
    net = Net(2, 4)
    adapt.add_experts(net, 3)
    with ExpertUsage(net) as usage:
        net(torch.randn(30, 8), 0)                      # old task: sees experts 0..3
        net(torch.randn(30, 8), torch.randint(0, 3, (30,)))  # mixed, masked routing
        net(torch.randn(30, 8), 2)                      # new task: all 7
    c = usage.counts["blocks.0"]
    assert c.shape == (3, 7)
    assert int(c[:2, 4:].sum()) == 0, "an old router chose a new expert"
    assert int(c[0].sum()) > 60 and int(c[2].sum()) >= 60


def test_errors_name_the_argument():
    with pytest.raises(MoEKernelsError, match=re.escape("argument 'model'")):
        ExpertUsage(torch.nn.Linear(3, 3))
    with pytest.raises(MoEKernelsError, match=re.escape("argument 'model'")):
        ExpertUsage("not a module")
    net = Net(2, 4)
    with ExpertUsage(net) as usage:
        adapt.add_router(net)
        with pytest.raises(MoEKernelsError, match="call reset"):
            net(torch.randn(3, 8), 0)
        usage.reset()
        net(torch.randn(3, 8), 2)
    assert usage.counts["blocks.0"].shape == (3, 4) and int(usage.counts["blocks.0"][2].sum()) == 6
