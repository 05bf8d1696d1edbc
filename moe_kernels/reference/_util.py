"""Accumulation dtype: fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 inputs (so gradcheck works)."""

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def up(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its accumulation dtype (no copy when it already is)."""
    return t.to(acc_dtype(t.dtype))
