"""SIMT (GPPF Sec. 3.2, INTERN Sec. 6.1) on 2 gloo processes: task sampling, task-averaged gradients
against a hand computation, cross-task SyncBatchNorm against BatchNorm over the union of the ranks'
batches (different batch sizes, spatial shapes, and an empty rank)."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

import moe_kernels as mk
import moe_kernels.distributed as mkd

W = 2
TOL = dict(rtol=1e-5, atol=1e-5)
TASKS = ["cls", "det", "seg"]
BATCH = {"cls": 12, "det": 4, "seg": 3}  # per-task batch sizes (GPPF: 96 for IN21K, 8 for COCO, ...)
IN, HID = 6, 5
OUT = {"cls": 3, "det": 2, "seg": 4}

# per step: the task of each rank (step 0: different tasks; step 1: the same task on both ranks)
ASSIGNED = [["cls", "det"], ["seg", "seg"]]
# SyncBatchNorm inputs per rank: [N, C, H, W] with different N and spatial shapes
BN_SHAPES = [[(6, 3, 5, 5), (2, 3, 3, 7)], [(4, 3, 2, 2), (0, 3, 4, 4)], [(5, 3), (7, 3)]]


class SIMTNet(nn.Module):
    """Shared backbone with a BatchNorm, one head per task (INTERN Up-E / GPPF task heads)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(IN, HID), nn.BatchNorm1d(HID), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(HID, OUT[t]) for t in TASKS})

    def forward(self, x, task):
        return self.heads[task](self.backbone(x))


def make_net():
    torch.manual_seed(0)
    return SIMTNet()


def data(step, rank, task):
    g = torch.Generator().manual_seed(100 * step + rank)
    n = BATCH[task]
    return torch.randn(n, IN, generator=g), torch.randn(n, OUT[task], generator=g)


def bn_input(case, rank):
    g = torch.Generator().manual_seed(7 * case + rank)
    shape = BN_SHAPES[case][rank]
    return torch.randn(shape, generator=g) * 2 + 0.5, torch.randn(shape, generator=g)


def _child(rank, world):
    out = {}
    # --- task-averaged gradients (the backbone BN is synchronised across tasks)
    net = mkd.convert_sync_batchnorm(make_net())
    assert isinstance(net.backbone[1], mkd.SyncBatchNorm)
    mkd.broadcast_parameters(net)
    for step, tasks in enumerate(ASSIGNED):
        net.zero_grad(set_to_none=True)
        task = tasks[rank]
        x, y = data(step, rank, task)
        loss = ((net(x, task) - y) ** 2).mean()
        loss.backward()
        counts = mkd.task_average_gradients(net)
        out[("grads", step)] = {n: (None if p.grad is None else p.grad.clone())
                                for n, p in net.named_parameters()}
        out[("counts", step)] = counts
    # --- SyncBatchNorm forward/backward and running stats
    for case in range(len(BN_SHAPES)):
        bn = mkd.SyncBatchNorm(3, momentum=0.3)
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
            bn.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
        x, gy = bn_input(case, rank)
        x.requires_grad_(True)
        yv = bn(x)
        (yv * gy).sum().backward()
        out[("bn", case)] = dict(y=yv.detach(), gx=x.grad, gw=bn.weight.grad, gb=bn.bias.grad,
                                 rm=bn.running_mean.clone(), rv=bn.running_var.clone())
    # --- sampler: what this rank draws equals what every rank computes for it
    s = mkd.TaskSampler({n: w for n, (w, b) in mkd.GPPF_TASKS.items()},
                        {n: b for n, (w, b) in mkd.GPPF_TASKS.items()}, seed=3)
    out["sampled"] = [s.sample(step) for step in range(50)]
    out["assignment"] = [s.assignment(step) for step in range(50)]
    return out


@pytest.fixture(scope="module")
def simt():
    return mkd.run_processes(_child, W, timeout=600)


@pytest.mark.distributed
@pytest.mark.parametrize("step", range(len(ASSIGNED)))
def test_task_averaged_gradients_match_hand_computation(simt, step):
    """GPPF: p.grad = (1/N_p) * sum over the ranks that used p. Step 0: rank 0 trains 'cls' (12
    samples), rank 1 'det' (4 samples): the backbone is averaged over 2 ranks, each used head gets its
    one rank's gradient undivided, the unused head none. Step 1: both train 'seg': its head is averaged
    over 2. The BN statistics are over both ranks' samples, so each rank's gradient also carries the
    other rank's contribution through the statistics: the hand computation sums those exactly."""
    tasks = ASSIGNED[step]
    net = make_net()  # the children take no optimizer step: the weights are the initial ones
    # the statistics are differentiable through both ranks' samples: build one graph with both
    xs = [data(step, r, tasks[r]) for r in range(W)]
    net.zero_grad(set_to_none=True)
    h_all = torch.cat([net.backbone[0](x) for x, _ in xs])
    mean, var = h_all.mean(0), h_all.var(0, unbiased=False)
    bn = net.backbone[1]
    z = torch.tanh((h_all - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias)
    zs = z.split([len(x) for x, _ in xs])
    # sum_i g_i for every parameter = gradient of sum_i loss_i (the all-reduced sum)
    losses = [((net.heads[tasks[r]](zs[r]) - xs[r][1]) ** 2).mean() for r in range(W)]
    sum(losses).backward()
    used_by = collections.Counter()
    for r in range(W):
        for n, _ in net.named_parameters():
            if not n.startswith("heads.") or n.startswith(f"heads.{tasks[r]}."):
                used_by[n] += 1
    for rank in range(W):
        got = simt[rank][("grads", step)]
        for n, p in net.named_parameters():
            if used_by[n] == 0:
                assert got[n] is None, n
                continue
            torch.testing.assert_close(got[n], p.grad / used_by[n], **TOL, msg=f"step {step} rank {rank} {n}")
        counts = simt[rank][("counts", step)]
        assert counts == [used_by[n] for n, _ in net.named_parameters()]
    if step == 0:
        assert used_by["heads.cls.weight"] == used_by["heads.det.weight"] == 1
        assert used_by["heads.seg.weight"] == 0 and used_by["backbone.0.weight"] == 2
    else:
        assert used_by["heads.seg.weight"] == 2


@pytest.mark.distributed
@pytest.mark.parametrize("case", range(len(BN_SHAPES)))
def test_sync_batchnorm_matches_batchnorm_over_all_ranks(simt, case):
    """Output, input gradient, running statistics: BatchNorm over the union of both ranks' elements
    (per channel); weight/bias gradients summed over ranks equal the union's. Cases: different batch
    and spatial sizes; a rank with zero samples; 2-D input."""
    xs, gys = zip(*(bn_input(case, r) for r in range(W)))
    xs = [x.clone().requires_grad_(True) for x in xs]
    C = 3
    flat = torch.cat([x.transpose(0, 1).reshape(C, -1) for x in xs], 1)  # [C, all elements]
    mean, var = flat.mean(1), flat.var(1, unbiased=False)
    w = torch.tensor([1.5, -0.5, 2.0], requires_grad=True)
    b = torch.tensor([0.1, 0.2, -0.3], requires_grad=True)
    ys = []
    for x in xs:
        shape = [1, C] + [1] * (x.dim() - 2)
        ys.append((x - mean.view(shape)) / torch.sqrt(var.view(shape) + 1e-5) * w.view(shape) + b.view(shape))
    sum((y * g).sum() for y, g in zip(ys, gys)).backward()
    n = flat.shape[1]
    rm = 0.7 * torch.zeros(C) + 0.3 * mean.detach()
    rv = 0.7 * torch.ones(C) + 0.3 * var.detach() * n / (n - 1)
    for rank in range(W):
        got = simt[rank][("bn", case)]
        torch.testing.assert_close(got["y"], ys[rank].detach(), **TOL)
        torch.testing.assert_close(got["gx"], xs[rank].grad, **TOL)
        torch.testing.assert_close(got["rm"], rm, **TOL)
        torch.testing.assert_close(got["rv"], rv, **TOL)
    torch.testing.assert_close(simt[0][("bn", case)]["gw"] + simt[1][("bn", case)]["gw"], w.grad, **TOL)
    torch.testing.assert_close(simt[0][("bn", case)]["gb"] + simt[1][("bn", case)]["gb"], b.grad, **TOL)


@pytest.mark.distributed
def test_task_sampler_across_ranks(simt):
    for rank in range(W):
        for step, (task, bs) in enumerate(simt[rank]["sampled"]):
            assert simt[0]["assignment"][step][rank] == task  # every rank knows every rank's task
            assert bs == mkd.GPPF_TASKS[task][1]
    assert simt[0]["assignment"] == simt[1]["assignment"]
    assert [t for t, _ in simt[0]["sampled"]] != [t for t, _ in simt[1]["sampled"]]  # ranks differ


def test_task_sampler_frequencies_follow_gppf_weights():
    """GPPF's weights 4.0/2.5/2.5/4.0/4.0/1.0/2.0/1.0 over 56 GPUs (7 x 8 V100): empirical task
    frequencies over 300 steps x 56 ranks are within 4 standard errors of weight / sum."""
    weights = {n: w for n, (w, _) in mkd.GPPF_TASKS.items()}
    s = mkd.TaskSampler(weights, seed=1, rank=0, world_size=56)
    counts = collections.Counter(t for step in range(300) for t in s.assignment(step))
    total = 300 * 56
    for name, wgt in weights.items():
        p = wgt / sum(weights.values())
        se = (p * (1 - p) / total) ** 0.5
        assert abs(counts[name] / total - p) < 4 * se, (name, counts[name] / total, p)
    assert s.sample(5) == s.sample(5)  # a pure function of (seed, step, rank): resumable
    assert s.ranks_per_task(7) == collections.Counter(s.assignment(7))


def test_simt_single_process_and_validation():
    """Without torch.distributed: the gradients are untouched (one rank used them), unused ones stay
    None; SyncBatchNorm is BatchNorm; bad arguments name themselves."""
    net = make_net()
    loss = net(torch.randn(4, IN), "cls").sum()
    loss.backward()
    before = {n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()}
    counts = mkd.task_average_gradients(net)
    for n, p in net.named_parameters():
        assert (p.grad is None) == (before[n] is None)
        if p.grad is not None:
            assert torch.equal(p.grad, before[n])
    assert counts == [0 if n.startswith(("heads.det", "heads.seg")) else 1 for n, _ in net.named_parameters()]
    x = torch.randn(5, 3, 4, 4)
    ref, ours = nn.BatchNorm2d(3), mkd.SyncBatchNorm(3)
    torch.testing.assert_close(ours(x), ref(x), **TOL)
    torch.testing.assert_close(ours.running_var, ref.running_var, **TOL)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x), **TOL)
    err = mk.MoEKernelsError
    with pytest.raises(err, match="argument 'weights\\['b'\\]'"):
        mkd.TaskSampler({"a": 1.0, "b": 0.0})
    with pytest.raises(err, match="argument 'batch_sizes'"):
        mkd.TaskSampler([1.0, 2.0], [8])
    with pytest.raises(err, match="argument 'rank'"):
        mkd.TaskSampler([1.0], rank=3, world_size=2)
    with pytest.raises(err, match="argument 'input'"):
        ours(torch.randn(5, 4, 2))
    with pytest.raises(err, match="argument 'used'"):
        mkd.task_average_gradients(net, used=list(net.heads["seg"].parameters()))


def test_task_average_with_per_rank_use_counts():
    """Virtual devices: a rank that ran several devices passes how many used each parameter; the
    summed gradient is divided by the total count (one process: by its own count)."""
    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad, b.grad = torch.full((3,), 6.0), torch.full((3,), 2.0)
    assert mk.distributed.task_average_gradients([a, b, c], counts=[3, 1, 0]) == [3, 1, 0]
    assert torch.equal(a.grad, torch.full((3,), 2.0)) and torch.equal(b.grad, torch.full((3,), 2.0))
    assert c.grad is None
    with pytest.raises(mk.MoEKernelsError, match="'counts' must have one count per parameter"):
        mk.distributed.task_average_gradients([a, b], counts=[1])
    with pytest.raises(mk.MoEKernelsError, match="argument 'counts' counts parameter 1"):
        mk.distributed.task_average_gradients([a, c], counts=[1, 1])
