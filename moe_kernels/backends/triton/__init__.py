"""The ``triton`` backend (GPU; tested on the CPU under ``TRITON_INTERPRET=1``).

Kernels in this version (each under its contract name, :mod:`moe_kernels.backends.contract`):

* ``routing``: ``route``, ``route_backward``, ``task_route``, ``task_route_backward``, ``plan`` — scores,
  top-k and the whole dispatch plan (capacity with both drop policies, exact ``num_dropped``,
  ``pad_to``) from per-block histograms and a scan, without atomics or host reads; the per-task
  router product inside ``task_route``.
* ``permute``: ``dispatch``, ``dispatch_backward``, ``combine``, ``combine_backward`` — row gathers
  and gather-sums over each token's k slots (no atomics).
* ``losses``: ``load_balancing_loss``, ``z_loss``, ``mutual_information_loss``,
  ``mutual_information_loss_ema`` (and their backward) — per-block partial sums added in block
  order by one program; ``mutual_information_ema_update`` is delegated to the reference.
* ``reconcile``: ``reconcile``, ``reconcile_backward`` — every link's GEMM with bias, BatchNorm
  (batch statistics in a fixed-order second pass), activation and the residual sum in the
  epilogue; the backward gives dW, db and the BN affine gradients only.
* ``grouped``: ``grouped_gemm``, ``grouped_gemm_backward``, ``grouped_mlp``, ``grouped_mlp_backward``,
  ``moe_mlp``, ``moe_mlp_backward`` — a varlen-M grouped GEMM (forward, dX: row tiles over the static
  N that find their experts from ``offsets`` on the device) with the gather, activation, bias and
  activation-backward fused into its loads and epilogue, and a varlen-K one for the weight gradients
  (one program per expert tile, rows reduced in order: no atomics); weights in any strides
  (contiguous or the transposed Hugging Face layout). ``moe_mlp`` gathers x through the plan inside
  the first GEMM and combines with the weighted gather-sum; its backward computes the gate-weight
  gradient as <g W2^T, act(z)> (+ <g, b2>).

Every kernel of the contract is here (``mutual_information_ema_update`` by delegation).

Numerics and loads: fp32 GEMMs use ``input_precision="ieee"`` (exact products, the contract's
parity) unless TF32 is asked for (``set_fp32_precision("tf32")``, ``MOE_KERNELS_FP32_PRECISION`` or
torch's ``set_float32_matmul_precision``); on compute capability 9+ the varlen-M GEMM reads weight
tiles through host-built tensor descriptors (TMA) where the weight's layout is 16-byte aligned,
pointer loads otherwise (``grouped.TMA``, ``MOE_KERNELS_TRITON_TMA=0``).

Compilation: every kernel is compiled once per dtype and tile configuration, not per batch size: the
arguments that count tokens or rows (``T``, ``N``, block counts) are ``do_not_specialize``, so a
new T (decode steps, the last short batch, T = 1) reuses the compiled kernel instead of compiling
another (triton would otherwise specialise an int on being 1 and on divisibility by 16). Strides
and feature sizes stay specialised: their divisibility lets loads vectorise.

Devices: CUDA tensors; CPU tensors too when ``TRITON_INTERPRET=1`` is set before moe_kernels is
imported (triton's interpreter: the way the tests run these kernels on a CPU machine). Automatic
backend choice never picks ``triton`` for CPU tensors (``backends.PREFERENCE``); only an explicit
``backend="triton"`` does. Modules import ``triton`` lazily (the ``@triton.jit`` programs live in
private modules imported on first use), so that the package imports where triton is not installed.
"""

import os

import torch

DEVICES = ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)
HOW_TO_GET = "install triton and run on a CUDA GPU (or set TRITON_INTERPRET=1 for CPU tests)"


def set_fp32_precision(value):
    """How this backend's fp32 GEMMs use the tensor cores: "ieee" (exact fp32 products: the contract's
    parity), "tf32" (inputs rounded to 10-bit mantissas: several times the fp32 throughput on
    Ampere/Hopper, about 1e-3 relative error), or None (the default: ``MOE_KERNELS_FP32_PRECISION``
    if set, else "tf32" exactly when ``torch.get_float32_matmul_precision()`` is not "highest").
    fp16/bf16 GEMMs are unaffected; fp64 never uses tensor cores. Takes effect on the next call."""
    from . import _common

    if value is not None and value not in _common._PRECISIONS:
        raise ValueError(f"set_fp32_precision: value must be one of {_common._PRECISIONS} or None, got {value!r}")
    _common.FP32_PRECISION = value


def probe():
    try:
        import triton
    except ImportError:
        return False, "triton is not installed"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not (torch.cuda.is_available() or interpret):
        return False, "no CUDA device (and TRITON_INTERPRET=1 is not set)"
    from .. import contract

    if not contract.kernel_table("triton", __name__, lambda to, name: None):
        return False, f"this version of moe_kernels ships no Triton kernels yet (triton {triton.__version__})"
    return True, f"triton {triton.__version__}" + (" (TRITON_INTERPRET=1: interpreted, CPU tensors too)"
                                                    if interpret else "")
