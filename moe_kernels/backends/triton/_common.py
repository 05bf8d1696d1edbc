"""Helpers shared by the triton kernels' launchers (no triton import at module level)."""

from __future__ import annotations

import os

import torch

INTERPRET_ENV = "TRITON_INTERPRET"


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
