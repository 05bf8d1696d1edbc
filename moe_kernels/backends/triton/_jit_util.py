"""@triton.jit helpers shared by the programs (imported on first use: this module imports triton)."""

import triton
import triton.language as tl


@triton.jit
def up(x, FP64: tl.constexpr):
    """``x`` in the accumulation dtype: fp64 when FP64, else fp32."""
    if FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def cast(x, dtype: tl.constexpr):
    """``x.to(dtype)`` rounding to nearest even, also for bf16 under the interpreter (whose
    fp32 -> bf16 conversion truncates): the bf16 rounding is done on the bits, as the hardware does."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays a (quiet) NaN
        return rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def zeros(shape, FP64: tl.constexpr):
    """``tl.zeros(shape)`` in the accumulation dtype: fp64 when FP64, else fp32."""
    if FP64:
        return tl.zeros(shape, dtype=tl.float64)
    else:
        return tl.zeros(shape, dtype=tl.float32)
