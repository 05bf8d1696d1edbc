"""``moe-kernels demo``: a short MoE training run on built-in synthetic multi-source data.

Three procedurally generated "datasets" (sources) share one model: each has its own input
distribution and its own target function (a random teacher MLP). As in MTHL, every step samples one
dataset by weight, then a batch from it; the MoE layer has one router per dataset and a
mutual-information loss that pushes experts to specialise per dataset. The run prints progress, the
loss per dataset, how many assignments were dropped, the expert usage per dataset, and a compact
benchmark table (forward+backward of the layer against lower bounds, measured in the same run).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

import moe_kernels as mk


class SyntheticSources:
    """M sources: x ~ N(mu_i, sigma_i^2 I) in `in_dim`, y = teacher_i(x) in `out_dim`."""

    def __init__(self, num_sources=3, in_dim=32, out_dim=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.M, self.in_dim = num_sources, in_dim
        self.mu = 2.0 * torch.randn(num_sources, in_dim, generator=g)
        self.sigma = 0.5 + torch.rand(num_sources, generator=g)
        self.t1 = torch.randn(num_sources, in_dim, 64, generator=g) / in_dim ** 0.5
        self.t2 = torch.randn(num_sources, 64, out_dim, generator=g) / 8.0
        self.g = g

    def batch(self, source: int, n: int):
        x = self.mu[source] + self.sigma[source] * torch.randn(n, self.in_dim, generator=self.g)
        y = torch.tanh(x @ self.t1[source]) @ self.t2[source]
        return x, y


class TinyMoENet(nn.Module):
    def __init__(self, in_dim, out_dim, dim=64, hidden=128, num_experts=8, k=2, num_tasks=3,
                 backend=None):
        super().__init__()
        self.inp = nn.Linear(in_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.moe = mk.nn.MoE(dim, hidden, num_experts, k, num_tasks=num_tasks, capacity_factor=1.5,
                             min_capacity=4, backend=backend)
        self.out = nn.Linear(dim, out_dim)

    def forward(self, x, task):
        h = self.inp(x)
        o = self.moe(self.norm(h), task)
        return self.out(h + o.output), o


def _median_ms(fns: dict, reps: int) -> dict:
    """Round-robin timing: every candidate sees the same machine noise."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def bench_table(backend=None, T=4096, d=256, h=512, E=8, k=2, reps=5) -> str:
    torch.manual_seed(0)
    layer = mk.nn.MoE(d, h, E, k, bias=False, z_loss_coef=0.0, backend=backend)
    x = torch.randn(T, d, requires_grad=True)
    w1 = torch.randn(d, h, requires_grad=True)
    w2 = torch.randn(h, d, requires_grad=True)
    xd = torch.randn(T * k, d, requires_grad=True)

    def ours():
        o = layer(x)
        (o.output.sum() + o.aux_loss).backward()

    def dense():  # lower bound: one MLP over all T*k assigned rows
        torch.nn.functional.gelu(xd @ w1).matmul(w2).sum().backward()

    def naive():  # the plain PyTorch loop most codebases start from
        logits = x @ layer.router_weight[0]
        w, ids = torch.softmax(logits, -1).topk(k, -1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(E):
            t, j = (ids == e).nonzero(as_tuple=True)
            he = torch.nn.functional.gelu(x[t] @ layer.w1[e]) @ layer.w2[e]
            out = out.index_add(0, t, he * w[t, j, None])
        out.sum().backward()

    ms = _median_ms({"moe_kernels MoE": ours, "dense MLP on T*k rows": dense, "naive torch loop": naive}, reps)
    base = ms["dense MLP on T*k rows"]
    lines = [f"forward+backward, T={T} d={d} h={h} E={E} k={k} fp32, median of {reps} interleaved runs",
             "| candidate | ms | vs dense bound |", "|---|---:|---:|"]
    lines += [f"| {n} | {v:.1f} | {v / base:.2f}x |" for n, v in ms.items()]
    return "\n".join(lines)


def run(steps=300, seed=0, backend=None, bench=True, batch=256, log_every=25) -> int:
    torch.manual_seed(seed)
    data = SyntheticSources(seed=seed)
    model = TinyMoENet(data.in_dim, 8, backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sample_w = torch.tensor([2.0, 1.5, 1.0])  # two-step sampling: dataset by weight, then a batch
    g = torch.Generator().manual_seed(seed + 1)
    name = mk.backends.resolve("route", torch.device("cpu"), backend)
    print(f"moe_kernels {mk.__version__} demo: {data.M} synthetic datasets, MoE with "
          f"{model.moe.num_experts} experts (top-{model.moe.k}), one router per dataset, "
          f"backend '{name}'")
    print(f"{'step':>5} {'dataset':>7} {'loss':>8} {'aux':>7} {'MI':>7} {'dropped':>7} {'tok/s':>8}")
    run_loss = [None] * data.M
    first_loss = [None] * data.M
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        src = int(torch.multinomial(sample_w, 1, generator=g))
        x, y = data.batch(src, batch)
        pred, o = model(x, src)
        task_loss = torch.nn.functional.mse_loss(pred, y)
        loss = task_loss + o.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        v = task_loss.item()
        run_loss[src] = v if run_loss[src] is None else 0.9 * run_loss[src] + 0.1 * v
        if first_loss[src] is None:
            first_loss[src] = v
        if step % log_every == 0 or step == 1:
            dt = time.perf_counter() - t0
            print(f"{step:>5} {src:>7} {v:>8.4f} {o.aux_loss.item():>7.4f} "
                  f"{o.losses['mutual_information'].item():>7.3f} {int(o.routing.num_dropped):>7} "
                  f"{step * batch / dt:>8.0f}")

    # expert usage per dataset on fresh batches
    model.eval()
    E = model.moe.num_experts
    print("\nexpert usage per dataset (share of top-k assignments, eval batches of 1024):")
    print("dataset " + " ".join(f"{'e' + str(e):>5}" for e in range(E)) + "  final loss (first)")
    with torch.no_grad():
        for src in range(data.M):
            x, y = data.batch(src, 1024)
            pred, o = model(x, src)
            counts = torch.bincount(o.routing.topk_ids.reshape(-1).long(), minlength=E).float()
            share = counts / counts.sum()
            loss = float(torch.nn.functional.mse_loss(pred, y))
            print(f"{src:>7} " + " ".join(f"{float(s):>5.2f}" for s in share)
                  + f"  {loss:.4f} ({first_loss[src] if first_loss[src] is not None else float('nan'):.4f})")
    if bench:
        print("\n" + bench_table(backend=backend))
    return 0
