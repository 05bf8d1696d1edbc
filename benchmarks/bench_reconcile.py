"""mk.reconcile (detached cross-branch fusion) vs the plain torch composition with .detach().

    pytest benchmarks/bench_reconcile.py --benchmark-only [--quick] [--backend auto|reference|cpu|...]

out = main + sum_i act(aux[i].detach() @ W[i] + b[i]) over the channel (last) dim.
Candidates:
  moe_kernels  mk.reconcile(main, aux, weights, bias, activation) on the chosen backend.
  torch_eager  ``main + sum(act(a.detach() @ w + b) for a, w, b in ...)`` written plainly.
Cases (section ``reconcile`` of benchmarks/shapes.json): token features [T, C] with two gelu links
(biases), and a channels-last feature map [B, H, W, C] with three linear links of narrower branches
(no bias). Backward: main, link weights and biases get gradients; the aux inputs get none (checked:
their ``.grad`` stays None).

The X-Learner sweep (conv1x1 + BatchNorm + ReLU links at ResNet-50 stage shapes) is its own program:
``benchmarks/bench_reconcile_xlearner.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import harness
import moe_kernels as mk

SCRIPT = "bench_reconcile"
CANDIDATES = ("moe_kernels", "torch_eager")
ACT = {"none": lambda z: z, "gelu": F.gelu, "relu": F.relu, "silu": F.silu}


@dataclass(frozen=True)
class RCase:
    name: str
    lead: tuple       # leading dims of main / aux
    C: int            # channels of main
    aux_channels: tuple
    activation: str
    bias: bool
    dtype: torch.dtype

    @property
    def dtype_name(self):
        return harness.dtype_name(self.dtype)

    @property
    def id(self):
        return f"{self.name}-{self.dtype_name}"


def make_cases(quick):
    return [RCase(name, tuple(s["lead"]), s["C"], tuple(s["aux_channels"]), s["activation"], s["bias"],
                  harness.DTYPES[dt])
            for name, s in harness.shapes("reconcile", quick).items() for dt in ("fp32", "bf16")]


class Inputs:
    def __init__(self, case, ctx):
        dev, dt = ctx.device, case.dtype
        self.main = harness.randn(*case.lead, case.C, dtype=dt, device=dev, seed=21, requires_grad=True)
        self.aux = [harness.randn(*case.lead, ci, dtype=dt, device=dev, seed=22 + i, requires_grad=True)
                    for i, ci in enumerate(case.aux_channels)]
        self.weights = [harness.randn(ci, case.C, dtype=dt, device=dev, seed=32 + i, scale=ci ** -0.5,
                                      requires_grad=True) for i, ci in enumerate(case.aux_channels)]
        self.bias = ([harness.randn(case.C, dtype=dt, device=dev, seed=42 + i, scale=0.1, requires_grad=True)
                      for i in range(len(case.aux_channels))] if case.bias else None)
        self.g = harness.randn(*case.lead, case.C, dtype=dt, device=dev, seed=50)
        self.act = case.activation

    def trainable(self):
        return [self.main, *self.weights, *(self.bias or [])]


def eager_reconcile(main, aux, weights, bias, activation):
    act = ACT[activation]
    out = main
    for i, (a, w) in enumerate(zip(aux, weights)):
        z = a.detach() @ w
        if bias is not None:
            z = z + bias[i]
        out = out + act(z)
    return out


def check(case, ctx):
    s = Inputs(case, ctx)
    out = mk.reconcile(s.main, s.aux, s.weights, s.bias, s.act, backend=ctx.backend)
    ref = eager_reconcile(s.main, s.aux, s.weights, s.bias, s.act)
    harness.check_close(out, ref, "reconcile: output")
    for i, (a, b) in enumerate(zip(torch.autograd.grad(out, s.trainable(), s.g),
                                   torch.autograd.grad(ref, s.trainable(), s.g))):
        harness.check_close(a, b, f"reconcile backward: gradient #{i} (main, weights, biases)")
    out = mk.reconcile(s.main, s.aux, s.weights, s.bias, s.act, backend=ctx.backend)
    out.backward(s.g)
    assert all(a.grad is None for a in s.aux), "reconcile: a detached aux input received a gradient"
    return True


def build(case, ctx):
    ctx.cached((SCRIPT, case.id), lambda: check(case, ctx))
    s = Inputs(case, ctx)
    reset = harness.drop_grads(s.trainable())
    bwd = harness.autograd_backward(s.g)
    be = ctx.backend
    C = harness.Candidate
    return {
        "moe_kernels": C("moe_kernels",
                         lambda: mk.reconcile(s.main, s.aux, s.weights, s.bias, s.act, backend=be),
                         bwd, reset, {"backend": ctx.backend_of("reconcile")}),
        "torch_eager": C("torch_eager", lambda: eager_reconcile(s.main, s.aux, s.weights, s.bias, s.act),
                         bwd, reset, {"backend": "torch"}),
    }


def test_reconcile(benchmark, bctx, case, candidate_name, mode):
    bctx.pytest_benchmark(benchmark, build(case, bctx)[candidate_name], mode)


def test_reconcile_compare(benchmark, bctx, case):
    bctx.compare(benchmark, SCRIPT, case.id, build(case, bctx), baselines={"reconcile": "torch_eager"},
                 op_of=lambda name: "reconcile")
