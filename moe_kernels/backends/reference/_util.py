"""Helpers of the reference kernels: the accumulation dtype (fp32 for fp32/bf16/fp16 inputs, fp64 for fp64
inputs, so gradcheck works) and a bincount without a host synchronisation."""

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def up(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its accumulation dtype (no copy when it already is)."""
    return t.to(acc_dtype(t.dtype))


def bincount(values: torch.Tensor, length: int) -> torch.Tensor:
    """``torch.bincount(values, minlength=length)`` for values in ``[0, length)``, int64, without the
    host synchronisation ``torch.bincount`` makes on a GPU (it reads the maximum to size its output)."""
    out = torch.zeros(length, dtype=torch.int64, device=values.device)
    return out.scatter_add_(0, values.long(), torch.ones_like(values, dtype=torch.int64))
