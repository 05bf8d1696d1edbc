"""The main table: a whole MoE layer, moe_kernels vs lower bounds, a naive loop and peer libraries.

    python benchmarks/bench_moe_layer.py                      # full sweep: A,B,C x fp32,bf16
    python benchmarks/bench_moe_layer.py --quick              # CI smoke run, tiny shapes (< 1 min)
    python benchmarks/bench_moe_layer.py --configs B --dtypes bf16 --candidates moe_kernels,dense,grouped

Shapes: configs A, B, C of benchmarks/shapes.json (``--quick``: their tiny stand-ins there).
Everything runs in one process and every cell of one (config, dtype) table comes from one
round-robin timing (harness.time_candidates), so ratios within a table are comparable; numbers
from two runs are not (see benchmarks/README.md).

The computation: y = sum_{j<k} w_j(x) * MLP_{e_j}(x), router softmax(x @ Wr) in fp32 -> top-k ->
renormalised, MLP_e(x) = gelu(x @ W1[e]) @ W2[e] (exact gelu, no biases), dropless unless a
candidate says otherwise. All candidates get the same weights (copied into each library's layout)
and the same input x [T, d] and output gradient; only the output is differentiated (auxiliary
losses a layer computes in its forward are not added to the loss).

Candidates (``--candidates``; default all):
  moe_kernels          mk.nn.MoE(bias=False, activation="gelu"), dropless; the backend is reported.
  moe_kernels_cf1.25   the same with capacity_factor=1.25 (drops, like deepspeed_drop).
  dense                lower bound (a): one dense MLP (two nn.Linear-like matmuls + gelu) on T*k rows.
  grouped              lower bound (b): the T*k rows pre-grouped by expert, per-expert GEMMs in one
                       autograd graph (split / per-expert weight leaves / cat: no slicing trap).
  naive                plain torch: softmax -> topk -> for each expert: index, MLP, index_add.
  deepspeed_drop       deepspeed.moe.layer.MoE, drop_tokens=True, capacity_factor=1.25.
  deepspeed_nodrop     deepspeed.moe.layer.MoE, drop_tokens=False (capacity = the largest expert load).
  hf_mixtral           transformers MixtralSparseMoeBlock (eager expert loop). NOT the same MLP:
                       gated, 3 matrices: (gelu(x Wg) * (x Wu)) Wd -> 1.5x the expert FLOPs.
  hf_mixtral_grouped_mm  the same block with experts_implementation="grouped_mm".
  hf_nemotronh_experts   transformers NemotronHExperts (non-gated up -> gelu -> down: the same MLP)
                       behind the plain softmax-top-k router of `naive`; eager expert loop.
  hf_nemotronh_experts_grouped_mm  the same with experts_implementation="grouped_mm".
  megatron             megatron.core MoELayer, allgather dispatcher, SequentialMLP (local specs),
                       dropless, with the two CPU shims of PLATFORM.md.
A peer that is not installed or fails to build or run gets a row saying why.

Columns: times are medians [20th-80th percentile] in ms; "x LB" divides by the better (smaller)
of the two lower bounds (dense, grouped) in the same mode and run; peak MiB is the peak of live
torch-allocated bytes during one forward+backward above the level at its start (see harness.py),
"x dense" divides it by the dense bound's. "check": max error of output and input gradient vs
the naive loop with the same weights (moe_kernels must pass, or the run stops).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import socket
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

CANDIDATES = ("moe_kernels", "moe_kernels_cf1.25", "dense", "grouped", "naive", "deepspeed_drop",
              "deepspeed_nodrop", "hf_mixtral", "hf_mixtral_grouped_mm", "hf_nemotronh_experts",
              "hf_nemotronh_experts_grouped_mm", "megatron")
BOUNDS = ("dense", "grouped")
DS_CAPACITY_FACTOR = 1.25


class Skip(Exception):
    """A candidate that cannot run here; the message is the reason shown in the table."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- weights and inputs

@dataclass
class Problem:
    cfg: harness.Config
    dtype: torch.dtype
    device: torch.device
    wr: torch.Tensor   # [d, E] router
    w1: torch.Tensor   # [E, d, h]
    w2: torch.Tensor   # [E, h, d]
    x: torch.Tensor    # [T, d], requires grad (the layer input of a network)
    g: torch.Tensor    # [T, d] gradient of the output


def make_problem(cfg: harness.Config, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Problem:
    """nn.Linear-style uniform init (as mk.nn.MoE.reset_parameters), made in fp32, cast once."""
    gen = torch.Generator().manual_seed(seed)

    def u(*shape, fan_in):
        b = 1.0 / math.sqrt(fan_in)
        return (torch.rand(*shape, generator=gen) * 2 - 1) * b

    wr = u(cfg.d, cfg.E, fan_in=cfg.d)
    w1 = u(cfg.E, cfg.d, cfg.h, fan_in=cfg.d)
    w2 = u(cfg.E, cfg.h, cfg.d, fan_in=cfg.h)
    x = torch.randn(cfg.T, cfg.d, generator=gen)
    g = torch.randn(cfg.T, cfg.d, generator=gen) / math.sqrt(cfg.T * cfg.d)
    cast = lambda t: t.to(device=device, dtype=dtype).contiguous()  # noqa: E731
    return Problem(cfg, dtype, device, cast(wr), cast(w1), cast(w2), cast(x).requires_grad_(True), cast(g))


@dataclass
class Built:
    """A constructed candidate: ``fwd()`` returns the [T, d] (or [T*k, d]) output to differentiate."""

    name: str
    fwd: Callable[[], torch.Tensor]
    grad: torch.Tensor
    leaves: list
    backend: str
    notes: str
    same_function: bool = True     # dropless, same MLP, same weights as `naive` -> compared with it
    takes_x: bool = True           # its input is p.x (the bounds build their own rows)
    tie_fraction: float = 0.0      # rows allowed to differ from naive (routing near-ties)
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- candidates

def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous())


def build_moe_kernels(p: Problem, backend: Optional[str], capacity_factor: Optional[float] = None) -> Built:
    import moe_kernels as mk

    c = p.cfg
    layer = mk.nn.MoE(c.d, c.h, c.E, c.k, activation="gelu", bias=False, capacity_factor=capacity_factor,
                      backend=backend, device=p.device, dtype=p.dtype)
    with torch.no_grad():
        layer.router_weight[0].copy_(p.wr)
        layer.w1.copy_(p.w1)
        layer.w2.copy_(p.w2)
    ops = ("route", "moe_mlp", "load_balancing_loss", "z_loss")
    names = {op: harness.resolved_backend(op, p.device, backend) for op in ops}
    label = (names["route"] if len(set(names.values())) == 1
             else ",".join(f"{o}={n}" for o, n in names.items()))
    x = p.x
    notes = ("dropless" if capacity_factor is None else f"capacity_factor={capacity_factor} (drops)")
    notes += "; computes load-balancing and z-loss in forward"
    b = Built("moe_kernels" if capacity_factor is None else f"moe_kernels_cf{capacity_factor}",
              lambda: layer(x).output, p.g, [x, *layer.parameters()], label, notes,
              same_function=capacity_factor is None)
    b.extra["module"] = layer
    return b


class NaiveMoE(nn.Module):
    """softmax -> topk -> for each expert: index the tokens, run its MLP, index_add into the output."""

    def __init__(self, p: Problem):
        super().__init__()
        c = p.cfg
        self.k = c.k
        self.router = _param(p.wr)
        self.experts = nn.ModuleList()
        for e in range(c.E):
            mlp = nn.Sequential(nn.Linear(c.d, c.h, bias=False), nn.GELU(), nn.Linear(c.h, c.d, bias=False))
            mlp[0].weight = _param(p.w1[e].t())
            mlp[2].weight = _param(p.w2[e].t())
            self.experts.append(mlp)
        self.to(device=p.device, dtype=p.dtype)

    def route(self, x, stable: bool = False):
        # router product in fp32, as mk.nn.MoE (router_dtype default), DeepSpeed and Megatron do
        scores = torch.softmax(x.float() @ self.router.float(), dim=-1)
        if stable:  # ties to the lower expert id, as mk.route does (used only by the correctness check)
            top, ids = torch.sort(scores, dim=-1, descending=True, stable=True)
            top, ids = top[:, :self.k], ids[:, :self.k]
        else:
            top, ids = torch.topk(scores, self.k, dim=-1)
        return ids, top / top.sum(dim=-1, keepdim=True)

    def forward(self, x, stable: bool = False):
        ids, w = self.route(x, stable)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, pos = (ids == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            y = expert(x[tok]) * w[tok, pos, None]
            out.index_add_(0, tok, y.to(x.dtype))
        return out


def build_naive(p: Problem) -> Built:
    m = NaiveMoE(p)
    b = Built("naive", lambda: m(p.x), p.g, [p.x, *m.parameters()], "torch",
              "torch.topk; per-expert nn.Linear; x[tok] indexing (its backward zero-fills a [T, d] "
              "gradient per expert)")
    b.extra["module"] = m
    return b


def _grouped_rows(p: Problem):
    """The T*k rows of x in expert order (the naive routing), and the expert sizes."""
    with torch.no_grad():
        ids, _ = NaiveMoE(p).route(p.x, stable=True)
        order = torch.argsort(ids.reshape(-1), stable=True)
        rows = p.x.detach()[order // p.cfg.k].contiguous()
        counts = torch.bincount(ids.reshape(-1), minlength=p.cfg.E).tolist()
    return rows, counts


def build_dense(p: Problem, rows: torch.Tensor) -> Built:
    r = rows.clone().requires_grad_(True)
    w1, w2 = _param(p.w1[0].t()), _param(p.w2[0].t())
    g = harness.randn(*r.shape, dtype=p.dtype, device=p.device, seed=7, scale=1 / math.sqrt(r.numel()))
    return Built("dense", lambda: F.linear(F.gelu(F.linear(r, w1)), w2), g, [r, w1, w2], "torch",
                 "lower bound: gelu(X W1) W2 on all T*k rows, one expert's weights; no routing",
                 same_function=False, takes_x=False)


def build_grouped(p: Problem, rows: torch.Tensor, counts: list) -> Built:
    r = rows.clone().requires_grad_(True)
    w1 = [_param(p.w1[e].t()) for e in range(p.cfg.E)]
    w2 = [_param(p.w2[e].t()) for e in range(p.cfg.E)]
    g = harness.randn(*r.shape, dtype=p.dtype, device=p.device, seed=7, scale=1 / math.sqrt(r.numel()))

    def fwd():
        return torch.cat([F.linear(F.gelu(F.linear(xe, a)), b) for xe, a, b in zip(r.split(counts), w1, w2)])
    return Built("grouped", fwd, g, [r, *w1, *w2], "torch",
                 "lower bound: rows pre-grouped by expert, per-expert GEMMs, one graph; no routing",
                 same_function=False, takes_x=False)


# ---- peers: process-group set-up (world size 1, gloo), once per process

_DIST = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_torch_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    dist.init_process_group("gloo", rank=0, world_size=1)


def init_deepspeed():
    if "deepspeed" in _DIST:
        if isinstance(_DIST["deepspeed"], Exception):
            raise Skip(str(_DIST["deepspeed"]))
        return _DIST["deepspeed"]
    try:
        try:
            import deepspeed
            import deepspeed.comm.torch as ds_comm_torch
            from deepspeed.moe.layer import MoE as DSMoE
        except ImportError as exc:
            raise Skip(f"deepspeed not installed ({exc})")
        # Shim: DeepSpeed's CPU accelerator JIT-builds a shared-memory allreduce op when its comm
        # backend starts (about 55 s the first time on this machine). One process never uses it.
        ds_comm_torch.build_shm_op = lambda: None
        init_torch_distributed()
        with contextlib.redirect_stdout(io.StringIO()):
            deepspeed.init_distributed(dist_backend="gloo")
        _DIST["deepspeed"] = DSMoE
    except Skip as exc:
        _DIST["deepspeed"] = exc
        raise
    except Exception as exc:
        _DIST["deepspeed"] = Skip(f"deepspeed init failed: {type(exc).__name__}: {exc}")
        raise _DIST["deepspeed"]
    return _DIST["deepspeed"]


def build_deepspeed(p: Problem, drop: bool) -> Built:
    DSMoE = init_deepspeed()
    c = p.cfg
    expert = nn.Sequential(nn.Linear(c.d, c.h, bias=False), nn.GELU(), nn.Linear(c.h, c.d, bias=False))
    with contextlib.redirect_stdout(io.StringIO()):
        m = DSMoE(hidden_size=c.d, expert=expert, num_experts=c.E, ep_size=1, k=c.k,
                  capacity_factor=DS_CAPACITY_FACTOR, eval_capacity_factor=DS_CAPACITY_FACTOR,
                  drop_tokens=drop)
    moe = m.deepspeed_moe
    with torch.no_grad():
        moe.gate.wg.weight.copy_(p.wr.t().float())
        for e, ex in enumerate(moe.experts.deepspeed_experts):
            ex[0].weight.copy_(p.w1[e].t().float())
            ex[2].weight.copy_(p.w2[e].t().float())
    m.to(device=p.device, dtype=p.dtype).train()
    x = p.x
    if drop:
        notes = (f"drop_tokens=True, capacity_factor={DS_CAPACITY_FACTOR}: experts run on "
                 f"E*C ~ {DS_CAPACITY_FACTOR}*T*k padded rows; drops tokens, so not compared")
    else:
        notes = "drop_tokens=False: capacity = largest expert load, E*C padded rows; router logits in fp32"
    if c.k == 2:
        notes += "; k=2 uses top2gating (samples the 2nd expert)"
    b = Built("deepspeed_drop" if drop else "deepspeed_nodrop", lambda: m(x)[0], p.g, [x, *m.parameters()],
              "deepspeed " + harness._version("deepspeed"), notes, same_function=not drop and c.k != 2,
              tie_fraction=0.002 if p.dtype == torch.float32 else 0.1)
    b.extra["module"] = m
    return b


def _hf_imports():
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise Skip(f"transformers not installed ({exc})")
    with contextlib.redirect_stderr(io.StringIO()):
        import transformers.utils.logging as hf_logging

        hf_logging.set_verbosity_error()


def build_hf_mixtral(p: Problem, impl: str) -> Built:
    _hf_imports()
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError as exc:
        raise Skip(f"this transformers has no Mixtral sparse block ({exc})")
    c = p.cfg
    cfg = MixtralConfig(hidden_size=c.d, intermediate_size=c.h, num_local_experts=c.E,
                        num_experts_per_tok=c.k,
                        hidden_act="gelu", router_jitter_noise=0.0)
    cfg._experts_implementation = impl
    m = MixtralSparseMoeBlock(cfg)
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        m.gate.weight.copy_(p.wr.t().float())
        up = (torch.rand(c.E, c.h, c.d, generator=gen) * 2 - 1) / math.sqrt(c.d)
        m.experts.gate_up_proj.copy_(torch.cat([p.w1.float().transpose(1, 2).cpu(), up], dim=1))
        m.experts.down_proj.copy_(p.w2.float().transpose(1, 2))
    m.to(device=p.device, dtype=p.dtype).train()
    x3 = p.x.view(1, c.T, c.d)
    b = Built("hf_mixtral" if impl == "eager" else f"hf_mixtral_{impl}",
              lambda: m(x3).view(c.T, c.d), p.g, [p.x, *m.parameters()],
              f"transformers {harness._version('transformers')} ({impl})",
              "different MLP: gated (gelu(x Wg) * (x Wu)) Wd, 3 matrices, 1.5x the expert FLOPs; "
              "router as ours (softmax, top-k, renormalise)" + (
                  "; eager loop slices the 3-D expert weights (zero-filled full-size gradient per expert)"
                  if impl == "eager" else ""),
              same_function=False)
    b.extra["module"] = m
    return b


def build_hf_nemotronh(p: Problem, impl: str) -> Built:
    _hf_imports()
    try:
        from transformers import NemotronHConfig
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts
    except ImportError as exc:
        raise Skip(f"this transformers has no NemotronHExperts ({exc})")
    c = p.cfg
    cfg = NemotronHConfig(hidden_size=c.d, moe_intermediate_size=c.h, n_routed_experts=c.E,
                          num_experts_per_tok=c.k, mlp_hidden_act="gelu")
    cfg._experts_implementation = impl
    experts = NemotronHExperts(cfg)
    with torch.no_grad():
        experts.up_proj.copy_(p.w1.float().transpose(1, 2))
        experts.down_proj.copy_(p.w2.float().transpose(1, 2))
    experts.to(device=p.device, dtype=p.dtype).train()
    router = NaiveMoE(p)  # only its router parameter and routing are used
    x = p.x

    def fwd():
        ids, w = router.route(x)
        return experts(x, ids, w)
    b = Built("hf_nemotronh_experts" if impl == "eager" else f"hf_nemotronh_experts_{impl}", fwd, p.g,
              [x, router.router, *experts.parameters()],
              f"transformers {harness._version('transformers')} ({impl})",
              "NemotronHExperts (up -> gelu -> down, same MLP) behind the naive router; NemotronH's own "
              "router/shared experts not used" + (
                  "; eager loop slices the 3-D expert weights (zero-filled full-size gradient per expert)"
                  if impl == "eager" else ""),
              tie_fraction=0.0 if p.dtype == torch.float32 else 0.1)  # torch.topk vs stable ties
    b.extra["module"] = experts
    return b


def init_megatron():
    if "megatron" in _DIST:
        if isinstance(_DIST["megatron"], Exception):
            raise _DIST["megatron"]
        return _DIST["megatron"]
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from megatron.core import parallel_state
                from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
                from megatron.core.transformer import TransformerConfig
                from megatron.core.transformer.moe import moe_utils, router
                from megatron.core.transformer.moe.moe_layer import MoELayer
        except ImportError as exc:
            raise Skip(f"megatron-core not installed or not importable ({exc})")
        # Shim 1: moe_utils references te_general_gemm, which only exists with TransformerEngine.
        if not hasattr(moe_utils, "te_general_gemm"):
            moe_utils.te_general_gemm = None
        # Shim 2: Router.gating moves CPU weights to the current CUDA device. On CPU, compute the
        # router logits with megatron's own router_gating_linear and no move.
        if not torch.cuda.is_available():
            def gating_without_move(self, inp):
                dt = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype,
                                                                        inp.dtype)
                return moe_utils.router_gating_linear(inp, self.weight, self.bias, dt)
            router.Router.gating = gating_without_move
        init_torch_distributed()
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel()
        _DIST["megatron"] = (TransformerConfig, MoELayer, get_gpt_layer_local_spec)
    except Skip as exc:
        _DIST["megatron"] = exc
        raise
    except Exception as exc:
        _DIST["megatron"] = Skip(f"megatron-core init failed: {type(exc).__name__}: {exc}")
        raise _DIST["megatron"]
    return _DIST["megatron"]


def build_megatron(p: Problem) -> Built:
    TransformerConfig, MoELayer, local_spec = init_megatron()
    c = p.cfg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = TransformerConfig(num_layers=1, hidden_size=c.d, num_attention_heads=1, ffn_hidden_size=c.h,
                                moe_ffn_hidden_size=c.h, num_moe_experts=c.E, moe_router_topk=c.k,
                                moe_token_dispatcher_type="allgather", add_bias_linear=False,
                                gated_linear_unit=False, activation_func=F.gelu, use_cpu_initialization=True,
                                moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                                bf16=p.dtype == torch.bfloat16, params_dtype=torch.float32)
        spec = local_spec(num_experts=c.E, moe_grouped_gemm=False).submodules.mlp
        m = MoELayer(cfg, spec.submodules, layer_number=1)
    with torch.no_grad():
        m.router.weight.copy_(p.wr.t().float())
        for e, ex in enumerate(m.experts.local_experts):
            ex.linear_fc1.weight.copy_(p.w1[e].t().float())
            ex.linear_fc2.weight.copy_(p.w2[e].t().float())
    m.to(device=p.device, dtype=p.dtype).train()
    x3 = p.x.view(c.T, 1, c.d)
    b = Built("megatron", lambda: m(x3)[0].view(c.T, c.d), p.g, [p.x, *m.parameters()],
              f"megatron-core {harness._version('megatron-core')}",
              "MoELayer, allgather dispatcher, SequentialMLP, dropless, no aux loss; CPU shims: "
              "te_general_gemm=None, Router.gating without the CUDA move",
              tie_fraction=0.002 if p.dtype == torch.float32 else 0.1)
    b.extra["module"] = m
    return b


def build(name: str, p: Problem, backend: Optional[str], rows_counts) -> Built:
    if name == "moe_kernels":
        return build_moe_kernels(p, backend)
    if name == "moe_kernels_cf1.25":
        return build_moe_kernels(p, backend, capacity_factor=1.25)
    if name == "dense":
        return build_dense(p, rows_counts[0])
    if name == "grouped":
        return build_grouped(p, *rows_counts)
    if name == "naive":
        return build_naive(p)
    if name in ("deepspeed_drop", "deepspeed_nodrop"):
        return build_deepspeed(p, drop=name == "deepspeed_drop")
    if name.startswith("hf_mixtral"):
        return build_hf_mixtral(p, "grouped_mm" if name.endswith("grouped_mm") else "eager")
    if name.startswith("hf_nemotronh_experts"):
        return build_hf_nemotronh(p, "grouped_mm" if name.endswith("grouped_mm") else "eager")
    if name == "megatron":
        return build_megatron(p)
    raise ValueError(name)


# --------------------------------------------------------------------------- correctness

def _fwd_bwd(fwd, x, g, leaves):
    for t in leaves:
        t.grad = None
    y = fwd()
    y.backward(g)
    return y.detach(), x.grad.detach().clone()


def check_against_naive(b: Built, p: Problem, ref) -> str:
    """Compare output and d x with the naive loop (same weights); raises AssertionError on mismatch."""
    y_ref, gx_ref = ref[:2]
    y, gx = _fwd_bwd(b.fwd, p.x, p.g, b.leaves)
    e1, bad1, n = harness.check_close(y, y_ref, f"{b.name}: output vs naive", max_bad_fraction=b.tie_fraction,
                                      rows=True)
    e2, bad2, _ = harness.check_close(gx, gx_ref, f"{b.name}: d x vs naive", max_bad_fraction=b.tie_fraction,
                                      rows=True)
    bad = max(bad1, bad2)
    ties = f"; {bad}/{n} tokens routed differently (near-tie logits)" if bad else ""
    return f"ok ({max(e1, e2):.1e})" + ties


def naive_reference(p: Problem, naive: NaiveMoE) -> tuple:
    """Output, d x, d W1 [E, d, h], d W2 [E, h, d] and d router of the naive loop (stable ties)."""
    y, gx = _fwd_bwd(lambda: naive(p.x, stable=True), p.x, p.g, [p.x, *naive.parameters()])
    gw1 = torch.stack([ex[0].weight.grad.t() for ex in naive.experts])
    gw2 = torch.stack([ex[2].weight.grad.t() for ex in naive.experts])
    return y, gx, gw1, gw2, naive.router.grad.clone()


def check_moe_kernels(b: Built, p: Problem, ref: tuple) -> str:
    """moe_kernels vs naive: output, d x, d W1, d W2 and d router, with the same tie-break."""
    layer = b.extra["module"]
    y, gx = _fwd_bwd(b.fwd, p.x, p.g, b.leaves)
    gw1, gw2, gwr = layer.w1.grad.clone(), layer.w2.grad.clone(), layer.router_weight.grad[0].clone()
    y_ref, gx_ref, gw1_ref, gw2_ref, gwr_ref = ref
    errs = [harness.check_close(y, y_ref, "moe_kernels: output vs naive"),
            harness.check_close(gx, gx_ref, "moe_kernels: d x vs naive"),
            harness.check_close(gw1, gw1_ref, "moe_kernels: d W1 vs naive"),
            harness.check_close(gw2, gw2_ref, "moe_kernels: d W2 vs naive"),
            harness.check_close(gwr, gwr_ref, "moe_kernels: d router vs naive")]
    return f"ok ({max(errs):.1e})"


# --------------------------------------------------------------------------- one table

def run_table(cfg: harness.Config, dtype: torch.dtype, args, device: torch.device) -> dict:
    dname = harness.dtype_name(dtype)
    harness.empty_moe_kernels_pool()  # the previous cell's pooled buffers: freed, not carried into this cell's timings
    p = make_problem(cfg, dtype, device)
    rows_counts = _grouped_rows(p)
    built, skipped = {}, {}
    for name in args.candidates:
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                built[name] = build(name, p, args.backend, rows_counts)
            log(f"{cfg.name} {dname}: built {name} ({time.perf_counter() - t0:.1f} s)")
        except Skip as exc:
            skipped[name] = str(exc)
            log(f"{cfg.name} {dname}: SKIP {name}: {exc}")
        except Exception as exc:
            if name.startswith("moe_kernels"):  # this library failing is an error, not a skipped peer
                raise
            skipped[name] = f"failed to construct: {type(exc).__name__}: {exc}"
            log(f"{cfg.name} {dname}: SKIP {name}: construction failed\n{traceback.format_exc()}")

    # correctness before any timing: moe_kernels must match the naive loop, or nothing is timed
    checks = {}
    naive_ref = None
    if any(b.same_function and b.takes_x for b in built.values()):
        naive_ref = naive_reference(p, NaiveMoE(p))
    for name, b in list(built.items()):
        try:
            if name == "moe_kernels":
                checks[name] = check_moe_kernels(b, p, naive_ref)
            elif name == "naive":
                _fwd_bwd(b.fwd, p.x, p.g, b.leaves)
                checks[name] = "reference"
            elif b.same_function and b.takes_x:
                checks[name] = check_against_naive(b, p, naive_ref)
            else:
                _fwd_bwd(b.fwd, b.leaves[0], b.grad, b.leaves)  # must at least run
                checks[name] = "n/a"
        except AssertionError as exc:
            if name == "moe_kernels":
                raise AssertionError(f"{cfg.describe()} {dname}: moe_kernels disagrees with the naive "
                                     f"loop; refusing to time it: {exc}") from None
            checks[name] = f"MISMATCH: {exc}"
            log(f"{cfg.name} {dname}: {name} does not match naive: {exc}")
        except Exception as exc:
            if name.startswith("moe_kernels"):
                raise
            skipped[name] = f"failed to run: {type(exc).__name__}: {exc}"
            log(f"{cfg.name} {dname}: SKIP {name}: run failed\n{traceback.format_exc()}")
            del built[name]
    del naive_ref
    log(f"{cfg.name} {dname}: checks " + ", ".join(f"{k}={v.split(':')[0]}" for k, v in checks.items()))

    cands = [harness.Candidate(b.name, b.fwd, harness.autograd_backward(b.grad), harness.drop_grads(b.leaves),
                               {"backend": b.backend}) for b in built.values()]
    t0 = time.perf_counter()
    timings = harness.time_candidates(cands, reps=args.reps, warmup=args.warmup, device=device,
                                      progress=lambda m: log(f"{cfg.name} {dname}: {m}"))
    log(f"{cfg.name} {dname}: timed {len(cands)} candidates in {time.perf_counter() - t0:.1f} s")
    memory = {}
    if not args.no_memory:
        for c in cands:
            c._reset()
            # (harness.peak_memory empties moe_kernels' buffer pool first, so the pooled buffers
            # the step uses are allocated, and counted, inside it)
            memory[c.name] = harness.peak_memory(lambda c=c: c.backward(c.forward()), device)
            c._reset()

    best = {}
    for m in harness.MODES:
        meds = [timings[n][m].median for n in BOUNDS if n in timings and timings[n][m].samples]
        best[m] = min(meds) if meds else None
    # activation memory: the peak without the parameters and their gradients. The
    # weight gradients are allocated during the measured backward and stay live, so subtract them
    # (leaves[0] is the input; its gradient is an activation gradient and stays counted).
    for name, mem in memory.items():
        grads = sum(t.numel() * t.element_size() for t in built[name].leaves[1:] if t.requires_grad)
        mem["param_grad_bytes"] = grads
        mem["activation_bytes"] = mem["peak_bytes"] - grads
    dense_mem = memory.get("dense", {}).get("peak_bytes")
    dense_act = memory.get("dense", {}).get("activation_bytes")
    rows = []
    for name in args.candidates:
        if name in skipped:
            rows.append({"candidate": name, "skipped": skipped[name]})
            continue
        b, t = built[name], timings[name]
        mem = memory.get(name)
        rows.append({
            "candidate": name, "backend": b.backend, "notes": b.notes, "check": checks.get(name, "-"),
            "timings": t,
            "ratio_to_best_bound": {m: (t[m].median / best[m] if best[m] else None) for m in harness.MODES},
            "memory": mem,
            "memory_ratio_to_dense": (mem["peak_bytes"] / dense_mem if mem and dense_mem else None),
            "activation_ratio_to_dense": (mem["activation_bytes"] / dense_act if mem and dense_act else None),
        })
    for b in built.values():
        b.extra.clear()
    return {"config": cfg.name, "shape": {"T": cfg.T, "d": cfg.d, "h": cfg.h, "E": cfg.E, "k": cfg.k},
            "dtype": dname, "best_bound_s": best, "rows": rows}


def table_markdown(tab: dict) -> str:
    s = tab["shape"]
    best = tab["best_bound_s"]
    head = (f"### {tab['config']} (T={s['T']}, d={s['d']}, h={s['h']}, E={s['E']}, k={s['k']}), "
            f"{tab['dtype']}\n\n"
            "Best lower bound (ms): " + ", ".join(f"{harness.MODE_TITLES[m]} {harness.fmt_ms(best[m])}"
                                                  for m in harness.MODES) + "\n")
    headers = ["candidate", "backend", "fwd ms [p20-p80]", "x LB", "bwd ms [p20-p80]", "x LB",
               "fwd+bwd ms [p20-p80]", "x LB", "peak MiB", "x dense", "act MiB", "x dense", "check", "notes"]
    out = []
    for r in tab["rows"]:
        if "skipped" in r:
            out.append([r["candidate"], "-", "not run", "", "", "", "", "", "", "", "", "", "-",
                        f"SKIPPED: {r['skipped']}"])
            continue
        t, x = r["timings"], r["ratio_to_best_bound"]
        mem = r["memory"]["peak_bytes"] if r["memory"] else None
        act = r["memory"]["activation_bytes"] if r["memory"] else None
        out.append([r["candidate"], r["backend"],
                    harness.fmt_timing(t["forward"]), harness.fmt_ratio(x["forward"]),
                    harness.fmt_timing(t["backward"]), harness.fmt_ratio(x["backward"]),
                    harness.fmt_timing(t["full"]), harness.fmt_ratio(x["full"]),
                    harness.fmt_mib(mem), harness.fmt_ratio(r["memory_ratio_to_dense"]),
                    harness.fmt_mib(act), harness.fmt_ratio(r.get("activation_ratio_to_dense")),
                    r["check"], r["notes"]])
    return head + "\n" + harness.markdown_table(headers, out) + "\n"


LEGEND = """\
Columns: times are the median [20th-80th percentile] over round-robin repetitions, in ms.
`x LB` = median / the better (smaller) of the two lower bounds (`dense`, `grouped`) in the same
mode, measured in the same round-robin. `peak MiB` = peak live torch-allocated bytes during one
forward+backward above the level at its start (activations, temporaries and the gradients it
produces; parameters, inputs and output gradients made beforehand are excluded); `x dense` divides
by the dense bound's peak. `act MiB` = the same peak less the bytes of the parameter gradients
(activation memory: parameters and their gradients excluded; at E=64 the
expert weight gradients alone are E times the dense MLP's). moe_kernels' cpu buffer pool is emptied
before the measured step, so every pooled buffer it uses is allocated, and counted, in it. The bounds take T*k input rows, so their input gradient is k times
larger than that of the layers taking T tokens. `check`: max error (relative to the largest
reference value) of the output and of d x against the naive loop with the same weights; moe_kernels
additionally checks d W1, d W2 and d router. `n/a`: computes something else (drops tokens, other
MLP, or a bound). Compare numbers only within one table of one run.
"""


# --------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=None,
                    help="comma-separated names from benchmarks/shapes.json: A, B, C (default all)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    ap.add_argument("--candidates", default=",".join(CANDIDATES),
                    help=f"comma-separated subset of: {', '.join(CANDIDATES)}")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed round-robin repetitions (default 10; --quick 3)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed round-robin passes before timing (default 1: the correctness check "
                         "has already run every candidate once)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes with the same E and k, few reps (CI smoke run)")
    ap.add_argument("--backend", default="auto",
                    help="moe_kernels backend: auto, reference, cpu, triton, cuda")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads(N) first (0: leave)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    ap.add_argument("--out", default=None,
                    help="output path without suffix (default benchmarks/results/moe_layer[-quick]); "
                         "writes .json and .md")
    args = ap.parse_args(argv)
    args.candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    unknown = [c for c in args.candidates if c not in CANDIDATES]
    if unknown:
        ap.error(f"unknown candidates {unknown}; choose from {CANDIDATES}")
    args.reps = args.reps or (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else 1
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in args.dtypes:
        if d not in harness.DTYPES:
            ap.error(f"unknown dtype {d!r}; choose from {list(harness.DTYPES)}")
    args.backend = harness.backend_arg(args.backend)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # megatron-core 0.16 warns on every forward of a parallel linear without an explicit tp_group
    warnings.filterwarnings("ignore", message=r".*tp_group is None.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = harness.pick_device(args.device)
    t_start = time.perf_counter()
    probe = harness.memory_probe_selftest(device)
    meta = harness.environment(device, extra={
        "backend": {"requested": args.backend or "auto",
                    "moe_kernels_backends": harness.backend_report(device)},
        "timing": (f"round-robin over all candidates of a table, {args.reps} reps after {args.warmup} "
                   "warm-up; " + ("forward, backward and forward+backward from one timestamped call (CPU)"
                                  if device.type == "cpu" else "each mode in its own round-robin pass")),
        "memory": f"{probe['method']}; self-test on a known allocation pattern passed",
        "memory_selftest": probe,
        "candidates": args.candidates, "quick": args.quick,
    })
    tables = []
    for cfg in harness.configs(args.quick, args.configs):
        for dname in args.dtypes:
            log(f"== {cfg.describe()} {dname}")
            tab = run_table(cfg, harness.DTYPES[dname], args, device)
            tables.append(tab)
            print(table_markdown(tab), flush=True)
    meta["wall_time_s"] = round(time.perf_counter() - t_start, 1)
    stem = args.out or str(harness.RESULTS_DIR / ("moe_layer-quick" if args.quick else "moe_layer"))
    body = LEGEND + "\n" + "\n".join(table_markdown(t) for t in tables)
    j, m = harness.write_results(stem, meta, tables, body, title="MoE layer: moe_kernels vs bounds and peers")
    log(f"wrote {j} and {m} ({meta['wall_time_s']} s)")
    return 0


def test_moe_layer_quick(benchmark, bctx):
    """``pytest benchmarks --benchmark-only --quick`` also smoke-runs this script (config A only)."""
    import pytest

    if not bctx.quick:
        pytest.skip("the full table is run as a script: python benchmarks/bench_moe_layer.py")
    argv = ["--quick", "--configs", "A", "--dtypes", ",".join(harness.dtype_name(d) for d in bctx.dtypes),
            "--device", str(bctx.device), "--backend", bctx.backend or "auto",
            "--out", str(bctx.results_dir / "moe_layer-quick-A")]
    assert benchmark.pedantic(main, args=(argv,), rounds=1, iterations=1) == 0


if __name__ == "__main__":
    sys.exit(main())
