"""Auxiliary routing losses: mk.load_balancing_loss, mk.z_loss, mk.mutual_information_loss vs torch.

    pytest benchmarks/bench_losses.py --benchmark-only [--quick] [--backend auto|reference|cpu|...]

Inputs are the router logits [T, E] of the benchmark shapes (A, B, C); shapes and M (section
``losses``) from benchmarks/shapes.json. Candidates per loss:
  moe_kernels  the library op on the chosen backend.
  torch_eager  the formula written plainly (autograd does the backward):
    load_balancing: E * sum_e f_e * mean_t softmax(logits)_te, f_e = share of the T*k top-k picks
    z_loss:         mean_t logsumexp(logits_t)^2
    mutual_information (batch form, M tasks, probs = softmax scores):
        P(E|D_i) = per-task sums normalised; P(D_i) = 1/M; J = P(D, E) = P(E|D) / M;
        L = -sum J log J + sum P(D) log P(D) + sum P(E) log P(E)
Backward: d loss / d logits (d probs for the mutual-information loss).
"""

from __future__ import annotations

import math

import torch

import harness
import moe_kernels as mk

SCRIPT = "bench_losses"
CANDIDATES = ("moe_kernels", "torch_eager")


def make_cases(quick):
    return harness.cases(quick, variants=("load_balancing", "z_loss", "mutual_information"))


def eager_load_balancing(logits, topk_ids, E):
    T, k = topk_ids.shape
    f = torch.bincount(topk_ids.reshape(-1).long(), minlength=E).float() / (T * k)
    p = torch.softmax(logits.float(), dim=-1).mean(0)
    return E * (f * p).sum()


def eager_z_loss(logits):
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def eager_mutual_information(probs, task_ids, M):
    p = probs.float()
    sums = torch.zeros(M, p.shape[1], dtype=p.dtype, device=p.device).index_add(0, task_ids, p)
    joint = sums / sums.sum(1, keepdim=True) / M          # every task is present in the batch
    pe = joint.sum(0)
    return -(joint * joint.log()).sum() + M * (1 / M) * math.log(1 / M) + (pe * pe.log()).sum()


class Inputs:
    def __init__(self, case, ctx):
        c, dev, dt = case.cfg, ctx.device, case.dtype
        self.loss = case.variant
        self.E = c.E
        self.M = M = harness.shapes("losses", ctx.quick)["tasks"]
        self.logits = harness.randn(c.T, c.E, dtype=dt, device=dev, seed=61, requires_grad=True)
        self.routing = mk.route(self.logits.detach(), c.k, backend=ctx.backend)
        self.probs = torch.softmax(self.logits.detach().float(), -1).to(dt).requires_grad_(True)
        g = torch.Generator().manual_seed(62)
        self.task_ids = torch.randint(0, M, (c.T,), generator=g).to(dev)
        self.task_ids[:M] = torch.arange(M)  # every task present
        self.one = torch.ones((), dtype=torch.float32, device=dev)
        self.leaf = self.probs if self.loss == "mutual_information" else self.logits

    def fns(self, backend):
        if self.loss == "load_balancing":
            return (lambda: mk.load_balancing_loss(self.logits, self.routing, backend=backend),
                    lambda: eager_load_balancing(self.logits, self.routing.topk_ids, self.E))
        if self.loss == "z_loss":
            return (lambda: mk.z_loss(self.logits, backend=backend), lambda: eager_z_loss(self.logits))
        return (lambda: mk.mutual_information_loss(self.probs, self.task_ids, self.M, backend=backend),
                lambda: eager_mutual_information(self.probs, self.task_ids, self.M))


def check(case, ctx):
    s = Inputs(case, ctx)
    f_mk, f_ref = s.fns(ctx.backend)
    a, b = f_mk(), f_ref()
    # scalars in fp32; bf16 inputs -> compare at bf16 tolerance
    harness.check_close(a, b, f"{s.loss}: value", dtype=case.dtype)
    ga, = torch.autograd.grad(a, s.leaf)
    gb, = torch.autograd.grad(b, s.leaf)
    harness.check_close(ga, gb, f"{s.loss}: gradient", dtype=case.dtype)
    return True


def build(case, ctx):
    ctx.cached((SCRIPT, case.id), lambda: check(case, ctx))
    s = Inputs(case, ctx)
    f_mk, f_ref = s.fns(ctx.backend)
    reset = harness.drop_grads(s.leaf)
    bwd = harness.autograd_backward(s.one)
    op = {"load_balancing": "load_balancing_loss", "z_loss": "z_loss",
          "mutual_information": "mutual_information_loss"}[s.loss]
    return {"moe_kernels": harness.Candidate("moe_kernels", f_mk, bwd, reset,
                                             {"backend": ctx.backend_of(op)}),
            "torch_eager": harness.Candidate("torch_eager", f_ref, bwd, reset, {"backend": "torch"})}, s


def test_losses(benchmark, bctx, case, candidate_name, mode):
    cands, _ = build(case, bctx)
    bctx.pytest_benchmark(benchmark, cands[candidate_name], mode)


def test_losses_compare(benchmark, bctx, case):
    cands, s = build(case, bctx)
    bctx.compare(benchmark, SCRIPT, case.id, cands, baselines={s.loss: "torch_eager"}, op_of=lambda n: s.loss)
