"""triton kernels for grouped_gemm, grouped_mlp, moe_mlp and their backward.

Everything is built from two GEMM programs (``_grouped_jit``), launched over static bounds so that
nothing is read on the host (no ``.item()``, no ``.tolist()``: the segment ``offsets`` are read on
the device only):

* **varlen M** (``_rows_gemm_kernel``: forward, dX): a grid of (cdiv(N, BM) + E, column tiles):
  one program per (row tile, expert segment) pair, which it finds from ``offsets`` on the device (a
  prefix sum of each segment's tile count), doing one masked pass of one expert over one tile. A
  tile that straddles experts is thus split over several programs instead of looping over them, so
  the work per program is balanced however few rows the experts have (decode, small T); rows past
  ``offsets[E]`` (a last segment) are written as zeros. The prologue can
  gather rows through the plan's ``sources`` (moe_mlp: no permuted copy of x exists) or apply the
  activation to z while loading (the second GEMM reads z, never a stored act(z)); the epilogue adds
  the bias, or applies the activation's backward (d z from d act(z), swiglu's two halves), scales
  rows by their gate weight and writes the gate gradient's partial dots.
* **varlen K** (``_experts_gemm_kernel``: dW): a grid of (E, tiles of the weight): each program
  reduces over its expert's rows ``offsets[e]..offsets[e+1]`` in row order (one program per output
  tile: a fixed summation order, no atomics) and sums the bias gradient on the way.

Weights may have any strides (contiguous ``[E, a, b]`` or the transposed view of a contiguous
``[E, b, a]``, as Hugging Face stores experts): every weight's three strides go to the programs,
a transposed operand (``w^T`` for dX) is the same tensor with two strides swapped, and weight
gradients are allocated with ``torch.empty_like(w)``, in the weight's layout.

* ``grouped_mlp``: z = x w1 + b1 (stored: the op saves it), then out = act(z) w2 + b2 with act
  applied on load. Backward: d z = act'(z) (g w2^T) fused in the epilogue of the dX-type GEMM; dW2,
  db2 = act(z)^T g, sum g; dW1, db1 = x^T dz, sum dz; dx = dz w1^T.
* ``moe_mlp``: the same two GEMMs with x's rows gathered through ``sources`` (a padding row is
  zero), the expert outputs y [N, d_out] as a temporary (not saved), and the weighted gather-sum
  ``combine`` of :mod:`.permute`. Backward regathers x, reads each row's gate weight by scanning its
  token's k slots, gathers g rows the same way, computes d act(z) = w (g W2^T) and the gate
  gradient <g W2^T, act(z)> + <g, b2> per assignment (partial dots per column tile, summed in
  order), dW2 from act(z) and w g, dW1 from the gathered x, and dx as the gather-sum over each
  token's k slots of dz w1^T (no atomics).

Accumulation is fp32 (fp64 for fp64); fp32 operands are multiplied exactly (``input_precision="ieee"``)
unless TF32 is asked for (``moe_kernels.backends.triton.set_fp32_precision("tf32")``, the environment
or torch's own ``torch.set_float32_matmul_precision("high")``); outputs are in x's dtype with round-to-nearest-even (also
for bf16 under the interpreter). Block sizes: under the interpreter one configuration with big
tiles (few programs); on a GPU a small table chosen from the rows per expert (no autotuning).
"""

from __future__ import annotations

import functools
import os

import torch

from ._common import acc_dtype, cdiv, fp32_precision, interpreting, is_fp64, pow2

_ACT = {"none": 0, "gelu": 1, "relu": 2, "silu": 3, "swiglu": 4}


def _jit():
    from . import _grouped_jit

    return _grouped_jit


def _upcast(t: torch.Tensor) -> bool:
    """fp16/bf16 operands go to tl.dot as fp32 under the interpreter (its bf16 dot is wrong)."""
    return interpreting() and t.dtype in (torch.float16, torch.bfloat16)


#: fp64 GEMMs: "dot" (tl.dot, the interpreter's numpy matmul), "sum" (products and tl.sum, the path a
#: GPU takes: the GPUs have no fp64 tl.dot) or None: "dot" when interpreting, else "sum"
FP64_PATH = None


def _dot64() -> bool:
    return (FP64_PATH or ("dot" if interpreting() else "sum")) == "dot"


def _acc(t: torch.Tensor):
    """The accumulation dtype as a triton dtype (fp64 for fp64, else fp32)."""
    tl = _jit().tl
    return tl.float64 if is_fp64(t) else tl.float32


def _rows_cfg(N: int, E: int, K: int, NC: int, fp64: bool) -> tuple:
    """(BM, BN, BK, num_warps) of the varlen-M GEMM."""
    if interpreting():
        return min(pow2(N, 16), 128), min(pow2(NC, 16), 128), min(pow2(K, 16), 32 if fp64 else 64), 4
    if fp64:  # products and a sum: small tiles
        return 32, 32, 8, 4
    # BM from the rows per expert, N / E (a static bound: no host read of the plan). An expert's
    # segment of c rows at an arbitrary offset touches about c / BM + 1 tiles, so a pass computes
    # c + BM rows for c useful ones: rows per expert of 1024 (S1) keep 89% at BM = 128, while at
    # decode and small T (a few rows per expert: the weight reads dominate) 16-row tiles waste least.
    rpe = N / max(E, 1)
    BM = 128 if rpe >= 256 else 64 if rpe >= 48 else 32 if rpe > 16 else 16
    BN = 128 if NC > 64 else 64
    return BM, BN, 64, 8 if BM * BN >= 128 * 128 else 4


def _experts_cfg(I: int, J: int, fp64: bool) -> tuple:
    """(BI, BJ, BR, num_warps) of the varlen-K GEMM."""
    if interpreting():
        return min(pow2(I, 16), 128), min(pow2(J, 16), 128), 32 if fp64 else 64, 4
    if fp64:
        return 32, 32, 8, 4
    return (128 if I > 64 else 64), (128 if J > 64 else 64), 32, 8 if I > 64 and J > 64 else 4


#: Tensor descriptors (TMA on Hopper) for the weight tiles of the varlen-M GEMM: None (automatic: on a
#: GPU of compute capability >= 9 and under the interpreter, where the weight's layout allows, see
#: _weight_desc), False (pointer loads always; also ``MOE_KERNELS_TRITON_TMA=0``) or True (wherever
#: the layout allows, whatever the GPU).
TMA = None

#: How the varlen-M GEMM's programs cover its (row tile, expert) pairs: None (automatic: one program
#: per pair on a GPU, one program walking them all under the interpreter), True (walk) or False (one
#: per pair: the GPU's schedule, which tests run under the interpreter too).
WALK = None


def _tma_wanted(w: torch.Tensor) -> bool:
    if TMA is not None:
        return bool(TMA)
    if os.environ.get("MOE_KERNELS_TRITON_TMA", "") == "0":
        return False
    if w.device.type != "cuda":
        return interpreting()
    return _major(w.device.index if w.device.index is not None else torch.cuda.current_device()) >= 9


@functools.lru_cache(maxsize=None)
def _major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _weight_desc(w: torch.Tensor, trans: bool, BK: int, BN: int):
    """(descriptor, B_T) for the B operand B_e = w[e] (w[e]^T when ``trans``), or (None, False) where
    a descriptor cannot serve: fp64, no triton.tools.tensor_descriptor (triton < 3.4), a weight with
    no unit-stride dim among its last two, a base or outer stride not a multiple of 16 bytes, an
    empty dim, or a tile row under 16 bytes (then pointer loads, with any strides, serve instead)."""
    if w.dtype == torch.float64 or not _tma_wanted(w) or min(w.shape) == 0:
        return None, False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None, False
    if w.stride(2) == 1:
        phys, flipped = w, False
    elif w.stride(1) == 1:  # stored transposed (Hugging Face's experts): its contiguous view
        phys, flipped = w.transpose(1, 2), True
    else:
        return None, False
    b_t = trans != flipped  # the stored matrix's rows are B's columns
    block = [1, BN, BK] if b_t else [1, BK, BN]
    elt = w.element_size()
    if (phys.data_ptr() % 16 or (phys.stride(0) * elt) % 16 or (phys.stride(1) * elt) % 16
            or block[2] * elt < 16):
        return None, False
    return TensorDescriptor.from_tensor(phys, block), b_t


def _rows(a, offsets, w, out, *, K, NC, lda, trans=False, src=None, act_in=False, act=0, half=0, bias=None,
          rw=None, act_bwd=False, z=None, part=None, b2=None, cfg=None, store=True):
    """Launch the varlen-M GEMM: out[r, :NC] = epilogue(A[r, :K] @ W[e]) (W[e]^T when ``trans``)."""
    N = out.shape[0]
    if N == 0 or NC == 0:
        return
    E = w.shape[0]
    BM, BN, BK, nw = cfg or _rows_cfg(N, E, K, NC, is_fp64(a))
    s0, s1, s2 = w.stride()
    sbk, sbn = (s2, s1) if trans else (s1, s2)
    desc, b_t = _weight_desc(w, trans, BK, BN)
    d = out  # stand-in for unused pointers
    # on a GPU one program per (row tile, expert segment) pair: at most cdiv(N, BM) + E of them (see the
    # kernel); interpreted, one program walks them all
    walk = interpreting() if WALK is None else bool(WALK)
    _jit()._rows_gemm_kernel[(1 if walk else cdiv(N, BM) + E, cdiv(NC, BN))](
        a, src if src is not None else offsets, offsets, w, desc, bias if bias is not None else d,
        rw if rw is not None else d, out, z if z is not None else d, part if part is not None else d,
        b2 if b2 is not None else d,
        N, K, NC, E, lda, out.stride(0), half, s0, sbk, sbn,
        BM=BM, BN=BN, BK=BK, BE=pow2(E + 1), GATHER=src is not None, ACT_IN=bool(act_in), ACT=act,
        HAS_BIAS=bias is not None, ROW_W=rw is not None, ACT_BWD=bool(act_bwd), GATE=part is not None,
        GATE_B2=part is not None and b2 is not None, ACC=_acc(a), UPCAST=_upcast(a), DOT64=_dot64(),
        PREC=fp32_precision(), STORE=bool(store), TMA=desc is not None, B_T=b_t, WALK=walk,
        num_warps=nw)


def _experts(a, b, offsets, out, bsum=None, *, I, J, lda, ldb, src=None, a_gather=False, a_act=False, act=0,
             half=0, b_gather=False, rw=None):
    """Launch the varlen-K GEMM: out[e] = sum over expert e's rows of A[r, :I]^T B[r, :J] (out: any strides)."""
    E = out.shape[0]
    if E == 0 or J == 0:
        if bsum is not None:
            bsum.zero_()
        return
    BI, BJ, BR, nw = _experts_cfg(I, J, is_fp64(b))
    so = out.stride()
    _jit()._experts_gemm_kernel[(E, max(cdiv(I, BI), 1), cdiv(J, BJ))](
        a, b, src if src is not None else offsets, rw if rw is not None else out, offsets, out,
        bsum if bsum is not None else out, I, J, lda, ldb, half, so[0], so[1], so[2],
        BI=BI, BJ=BJ, BR=BR, A_GATHER=bool(a_gather), A_ACT=bool(a_act), ACT=act, B_GATHER=bool(b_gather),
        ROW_W=rw is not None, BSUM=bsum is not None, ACC=_acc(b), UPCAST=_upcast(b), DOT64=_dot64(),
        PREC=fp32_precision(), num_warps=nw)


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    """``t``, or one zero row of it when it has none (a valid pointer for fully masked loads)."""
    return t if t.shape[0] > 0 else t.new_zeros(1, t.shape[1])


# ---------------------------------------------------------------- grouped GEMM

def grouped_gemm(x, offsets, w):
    N, a = x.shape
    out = torch.empty(N, w.shape[2], dtype=x.dtype, device=x.device)
    _rows(x, offsets, w, out, K=a, NC=w.shape[2], lda=a)
    return out


def grouped_gemm_backward(grad_out, x, offsets, w, need_x, need_w):
    N, a = x.shape
    b = w.shape[2]
    gx = gw = None
    if need_x:
        gx = torch.empty_like(x)
        _rows(grad_out, offsets, w, gx, K=b, NC=a, lda=b, trans=True)
    if need_w:
        gw = torch.empty_like(w)
        _experts(_nonempty(x), _nonempty(grad_out), offsets, gw, I=a, J=b, lda=a, ldb=b)
    return gx, gw


# ---------------------------------------------------------------- grouped MLP

def _dims(w1, w2, activation):
    h, dout = w2.shape[1], w2.shape[2]
    return w1.shape[2], h, dout, (h if activation == "swiglu" else 0)


def grouped_mlp(x, offsets, w1, w2, b1, b2, activation):
    N, d = x.shape
    h1, h, dout, half = _dims(w1, w2, activation)
    z = torch.empty(N, h1, dtype=x.dtype, device=x.device)
    out = torch.empty(N, dout, dtype=x.dtype, device=x.device)
    _rows(x, offsets, w1, z, K=d, NC=h1, lda=d, bias=b1)
    _rows(z, offsets, w2, out, K=h, NC=dout, lda=h1, act_in=True, act=_ACT[activation], half=half, bias=b2)
    return out, z


def grouped_mlp_backward(grad_out, x, z, offsets, w1, w2, b1, b2, activation):
    N, d = x.shape
    h1, h, dout, half = _dims(w1, w2, activation)
    act = _ACT[activation]
    gz = torch.empty_like(z)
    _rows(grad_out, offsets, w2, gz, K=dout, NC=h, lda=dout, trans=True, act=act, half=half, act_bwd=True, z=z)
    gw1, gw2 = torch.empty_like(w1), torch.empty_like(w2)
    gb1 = torch.empty_like(b1) if b1 is not None else None
    gb2 = torch.empty_like(b2) if b2 is not None else None
    zz, gg, xx, gzz = _nonempty(z), _nonempty(grad_out), _nonempty(x), _nonempty(gz)
    _experts(zz, gg, offsets, gw2, gb2, I=h, J=dout, lda=h1, ldb=dout, a_act=True, act=act, half=half)
    _experts(xx, gzz, offsets, gw1, gb1, I=d, J=h1, lda=d, ldb=h1)
    gx = torch.empty_like(x)
    _rows(gz, offsets, w1, gx, K=h1, NC=d, lda=h1, trans=True)
    return gx, gw1, gw2, gb1, gb2


# ---------------------------------------------------------------- the whole expert layer

def moe_mlp(x, weights, slots, sources, offsets, w1, w2, b1, b2, activation):
    from .permute import combine

    N, d = sources.shape[0], x.shape[1]
    h1, h, dout, half = _dims(w1, w2, activation)
    z = torch.empty(N, h1, dtype=x.dtype, device=x.device)
    y = torch.empty(N, dout, dtype=x.dtype, device=x.device)  # the expert outputs: a temporary
    _rows(_nonempty(x), offsets, w1, z, K=d, NC=h1, lda=d, src=sources, bias=b1)
    _rows(z, offsets, w2, y, K=h, NC=dout, lda=h1, act_in=True, act=_ACT[activation], half=half, bias=b2)
    return combine(y, weights, slots), z


def moe_mlp_backward(grad_out, x, z, weights, slots, sources, offsets, w1, w2, b1, b2, activation,
                     need_x, need_weights, need_params):
    from .permute import dispatch_backward

    T, k = slots.shape
    N, d = sources.shape[0], x.shape[1]
    h1, h, dout, half = _dims(w1, w2, activation)
    act = _ACT[activation]
    gx = gwt = gw1 = gw2 = gb1 = gb2 = None
    if need_params:
        gw1, gw2 = torch.empty_like(w1), torch.empty_like(w2)
        gb1 = torch.empty_like(b1) if b1 is not None else None
        gb2 = torch.empty_like(b2) if b2 is not None else None
    if need_weights:
        gwt = torch.empty_like(weights)
    if need_x:
        gx = torch.empty_like(x)
    if not (need_x or need_weights or need_params):
        return gx, gwt, gw1, gw2, gb1, gb2
    if N == 0:  # nothing was routed: every assignment is dropped
        for t in (gx, gwt, gw1, gw2, gb1, gb2):
            if t is not None:
                t.zero_()
        return gx, gwt, gw1, gw2, gb1, gb2
    J = _jit()
    g, xs = _nonempty(grad_out), _nonempty(x)
    fp64 = is_fp64(x)
    # each row's gate weight (0 for padding): its token's k slots scanned for the row
    rw = torch.empty(N, dtype=acc_dtype(x.dtype), device=x.device)
    BR = min(pow2(N), 1024 if interpreting() else 256)
    J._row_weight_kernel[(cdiv(N, BR),)](sources, slots, weights if T > 0 else rw, rw, N, K=k, BR=BR)
    # d act(z) = w (g W2^T) on the gathered rows, d z from it in the epilogue, and the gate gradient's
    # partial dots <g W2^T, act(z)> (+ <g, b2>) per column tile of h
    cfg = _rows_cfg(N, w2.shape[0], dout, h, fp64)
    part = torch.empty(cdiv(h, cfg[1]), N, dtype=acc_dtype(x.dtype), device=x.device) if need_weights else None
    # only the gate gradient wanted (frozen experts, a trained router): dz is not written (z stands in for
    # the output, whose shape and strides it has; nothing is stored to it)
    want_gz = need_x or need_params
    gz = torch.empty_like(z) if want_gz else z
    _rows(g, offsets, w2, gz, K=dout, NC=h, lda=dout, trans=True, src=sources, act=act, half=half, rw=rw,
          act_bwd=True, z=z, part=part, b2=b2, cfg=cfg, store=want_gz)
    if need_weights and T > 0:
        if h == 0:
            part = torch.zeros(1, N, dtype=acc_dtype(x.dtype), device=x.device)
        BT = min(pow2(T), 1024 if interpreting() else 256)
        J._gate_grad_kernel[(cdiv(T, BT),)](part, slots, gwt, T, N, part.shape[0], K=k, BT=BT)
    if need_params:
        _experts(z, g, offsets, gw2, gb2, I=h, J=dout, lda=h1, ldb=dout, src=sources, a_act=True, act=act,
                 half=half, b_gather=True, rw=rw)
        _experts(xs, gz, offsets, gw1, gb1, I=d, J=h1, lda=d, ldb=h1, src=sources, a_gather=True)
    if need_x:
        gxe = torch.empty(N, d, dtype=x.dtype, device=x.device)
        _rows(gz, offsets, w1, gxe, K=h1, NC=d, lda=h1, trans=True)
        gx = dispatch_backward(gxe, slots)
    return gx, gwt, gw1, gw2, gb1, gb2
