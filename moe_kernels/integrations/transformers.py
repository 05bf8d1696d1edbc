"""moe_kernels as an ``experts_implementation`` of Hugging Face transformers.

transformers 5 dispatches the expert computation of its MoE models (every experts class decorated
with ``@use_experts_implementation``: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, GPT-OSS, GLM-4
MoE, ...) through ``transformers.integrations.moe.ExpertsInterface``. Importing this module
registers ``"moe_kernels"`` there::

    import moe_kernels.integrations.transformers          # registers "moe_kernels"
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="moe_kernels")
    model.set_experts_implementation("moe_kernels")      # or switch a loaded model

The model's own router stays in charge: its ``top_k_index`` / ``top_k_weights`` become a dispatch
plan with :func:`moe_kernels.plan`, and the experts run on the module's own parameters, in the
layout the module stores them (``[E, out, in]``, or ``[E, in, out]`` with ``is_transposed``): no
weight is copied per step and the state dict is untouched, so ``save_pretrained`` /
``from_pretrained`` round-trip. Ids of ``num_experts`` and more (transformers' expert-parallel
sentinels) and -1 are not local: they get no row and add nothing.

Two paths, chosen from the module's layout flags:

* **fused** (:func:`moe_kernels.moe_mlp`, one autograd node that keeps only the pre-activation):
  the default gate ``act(gate) * up`` over concatenated ``[gate; up]`` with ``act`` = SiLU
  (``"swiglu"``), or no gate with GELU (exact), ReLU or SiLU; biases optional.
* **composed** (:func:`moe_kernels.dispatch` -> :func:`moe_kernels.grouped_gemm` -> the module's own
  ``_apply_gate`` / ``act_fn`` -> :func:`moe_kernels.grouped_gemm` -> :func:`moe_kernels.combine`):
  anything else the flags describe — a custom ``_apply_gate`` (GPT-OSS's clamped SwiGLU over
  interleaved columns), other activations, ``has_post_expert_norm``. It keeps the expert rows for
  backward like ``grouped_mm`` does.

What cannot be served raises :class:`UnsupportedExperts`, naming the model class and the feature:
expert weights that are not a float dtype moe_kernels computes in (quantized experts), weights in
another layout, and experts modules without the attributes the decorator's flags promise.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import moe_kernels as mk
from moe_kernels._validation import FLOAT_DTYPES, MoEKernelsError

#: The name under which the implementation is registered.
NAME = "moe_kernels"

#: Model families (transformers' ``models/<family>``) whose experts this integration does not serve,
#: with the reason. Empty for transformers 5.23.0: all 64 families that use
#: ``@use_experts_implementation`` there pass tests/test_transformers.py's forward+backward check
#: against eager (the quantized and FP8 experts paths are separate implementations, not families).
UNSUPPORTED: dict = {}


class UnsupportedExperts(MoEKernelsError):
    """An experts module (or a call) this integration cannot serve; the message names the model
    class and the missing feature."""


def available() -> tuple[bool, str]:
    """(whether transformers with an ``ExpertsInterface`` is importable, the reason in words)."""
    try:
        import transformers
        from transformers.integrations.moe import ExpertsInterface  # noqa: F401
    except ImportError as exc:
        return False, f"transformers with integrations.moe.ExpertsInterface is not importable ({exc})"
    return True, f"transformers {transformers.__version__}: experts_implementation=\"{NAME}\""


def register(name: str = NAME) -> str:
    """Register :func:`experts_forward` in transformers' ``ExpertsInterface`` under ``name``
    (done on import under :data:`NAME`); returns ``name``."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(name, experts_forward)
    return name


# ---------------------------------------------------------------- reading the module's layout

def _fused_activation(module: nn.Module) -> Optional[str]:
    """The fused kernels' activation equal to ``module.act_fn``, or None (then the module's own runs)."""
    act = getattr(module, "act_fn", None)
    if isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation":
        return "silu"
    if isinstance(act, nn.ReLU):
        return "relu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    if type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is nn.functional.gelu:
        return "gelu"
    return None


def _default_gate(module: nn.Module) -> bool:
    from transformers.integrations.moe import _default_apply_gate

    return getattr(type(module), "_apply_gate", None) is _default_apply_gate


def _param(module: nn.Module, name: str) -> torch.Tensor:
    t = getattr(module, name, None)
    if not isinstance(t, torch.Tensor):
        raise UnsupportedExperts(f"moe_kernels cannot serve {type(module).__name__}: its layout flags promise a "
                                 f"tensor '{name}', which it does not have")
    if t.dtype not in FLOAT_DTYPES:
        raise UnsupportedExperts(f"moe_kernels cannot serve {type(module).__name__}: expert weight '{name}' is "
                                 f"{t.dtype} (quantized experts); moe_kernels computes in fp32, bf16, fp16 or fp64")
    return t


def _as_in_out(module: nn.Module, name: str) -> torch.Tensor:
    """The expert weight ``name`` as ``[E, in, out]``, a view of the stored tensor (no copy)."""
    w = _param(module, name)
    if w.dim() != 3:
        raise UnsupportedExperts(f"moe_kernels cannot serve {type(module).__name__}: '{name}' has shape "
                                 f"{tuple(w.shape)}, not [num_experts, ., .]")
    w = w if getattr(module, "is_transposed", False) else w.transpose(1, 2)
    if not (w.is_contiguous() or w.transpose(1, 2).is_contiguous()):
        raise UnsupportedExperts(f"moe_kernels cannot serve {type(module).__name__}: '{name}' is stored with "
                                 f"strides {tuple(w.stride())}, neither [E, in, out] nor [E, out, in] contiguous")
    return w


class _GatherRows(torch.autograd.Function):
    """``b[e]``, whose gradient (a sum over each expert's rows) is accumulated in fp32 and rounded
    once: the backward of plain indexing accumulates in the bias's dtype, row after row, which in
    bf16 measured 2.5x eager's error on GPT-OSS's down_proj_bias gradient."""

    @staticmethod
    def forward(ctx, b, e):
        ctx.save_for_backward(e)
        ctx.shape = b.shape
        return b[e]

    @staticmethod
    def backward(ctx, g):
        e, = ctx.saved_tensors
        acc = torch.float64 if g.dtype == torch.float64 else torch.float32
        gb = torch.zeros(ctx.shape, dtype=acc, device=g.device).index_add_(0, e, g.to(acc))
        return gb.to(g.dtype), None


def _row_bias(b: torch.Tensor, offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """``[rows, n]``: each row's expert's bias (rows past ``offsets[E]`` get the last expert's; they
    are never combined), found on the device (no host sync)."""
    r = torch.arange(rows, device=offsets.device, dtype=offsets.dtype)
    e = torch.searchsorted(offsets[1:], r, right=True).clamp_(max=b.shape[0] - 1)
    return _GatherRows.apply(b, e)


# ---------------------------------------------------------------- the registered function

def experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The experts of a transformers MoE block on moe_kernels (see the module docstring).

    Args:
        self: the experts module (``@use_experts_implementation``).
        hidden_states: ``[T, hidden]``.
        top_k_index: ``[T, k]`` expert ids from the model's router.
        top_k_weights: ``[T, k]`` gate weights (differentiable).

    Returns:
        ``[T, hidden]`` in ``hidden_states.dtype``.
    """
    cls = type(self).__name__
    if args or kwargs:
        raise UnsupportedExperts(f"moe_kernels cannot serve {cls}: its forward got arguments beyond "
                                 "(hidden_states, top_k_index, top_k_weights)")
    E = getattr(self, "num_experts", None)
    if not isinstance(E, int):
        raise UnsupportedExperts(f"moe_kernels cannot serve {cls}: it has no integer 'num_experts'")
    has_gate = getattr(self, "has_gate", True)
    has_bias = getattr(self, "has_bias", False)
    w1 = _as_in_out(self, "gate_up_proj" if has_gate else "up_proj")
    w2 = _as_in_out(self, "down_proj")
    b1 = _param(self, "gate_up_proj_bias" if has_gate else "up_proj_bias") if has_bias else None
    b2 = _param(self, "down_proj_bias") if has_bias else None

    x = hidden_states.to(w1.dtype).contiguous()  # under autocast the input may be fp32 (as grouped_mm does)
    routing = mk.plan(top_k_index.contiguous(), top_k_weights.contiguous(), E)

    act = _fused_activation(self)
    if getattr(self, "has_post_expert_norm", False):
        fused = None
    elif has_gate:
        fused = "swiglu" if getattr(self, "is_concatenated", True) and _default_gate(self) and act == "silu" else None
    else:
        fused = act
    if fused is not None:
        out = mk.moe_mlp(x, routing, w1, w2, fused, b1, b2)
        return out.to(hidden_states.dtype)

    rows = mk.dispatch(x, routing)
    h = mk.grouped_gemm(rows, routing.offsets, w1)
    if b1 is not None:
        h = h + _row_bias(b1, routing.offsets, h.shape[0])
    h = self._apply_gate(h) if has_gate else self.act_fn(h)
    y = mk.grouped_gemm(h.to(w2.dtype).contiguous(), routing.offsets, w2)
    if b2 is not None:
        y = y + _row_bias(b2, routing.offsets, y.shape[0])
    if getattr(self, "has_post_expert_norm", False):
        y = self.post_expert_norm(y)
    return mk.combine(y.contiguous(), routing).to(hidden_states.dtype)


if available()[0]:
    register()
