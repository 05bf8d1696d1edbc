"""Helpers shared by the triton kernels' launchers (no triton import at module level)."""

from __future__ import annotations

import os

import torch

INTERPRET_ENV = "TRITON_INTERPRET"
FP32_PRECISION_ENV = "MOE_KERNELS_FP32_PRECISION"

#: How fp32 GEMMs feed the tensor cores: "ieee" (exact fp32 products, the contract's parity), "tf32"
#: (10-bit mantissas: several times faster on Ampere and Hopper, about 1e-3 relative error) or None:
#: the environment variable ``MOE_KERNELS_FP32_PRECISION`` if set, else torch's own switch,
#: ``torch.get_float32_matmul_precision()`` ("highest", the default: "ieee"; "high" or "medium":
#: "tf32"), so a trainer that allows TF32 for torch's matmuls gets it here too. fp16/bf16 GEMMs are
#: unaffected (their products are exact in fp32); fp64 never uses tensor cores.
FP32_PRECISION: str | None = None
_PRECISIONS = ("ieee", "tf32")


def fp32_precision() -> str:
    """The ``input_precision`` of the fp32 ``tl.dot`` calls now: "ieee" or "tf32" (see FP32_PRECISION)."""
    value = FP32_PRECISION or os.environ.get(FP32_PRECISION_ENV) or None
    if value is None:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    if value not in _PRECISIONS:
        raise ValueError(f"moe_kernels triton backend: FP32_PRECISION / {FP32_PRECISION_ENV} must be one of "
                         f"{_PRECISIONS}, got {value!r}")
    return value


def interpreting() -> bool:
    """Whether triton runs its interpreter (``TRITON_INTERPRET=1``): then CPU tensors are served and
    block sizes are chosen for few programs (each interpreted program costs about a millisecond)."""
    return os.environ.get(INTERPRET_ENV) == "1"


def pow2(n: int, lo: int = 1) -> int:
    """The smallest power of two >= max(n, lo)."""
    n = max(int(n), lo)
    return 1 << (n - 1).bit_length()


def is_fp64(t: torch.Tensor) -> bool:
    return t.dtype == torch.float64


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the contract: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
