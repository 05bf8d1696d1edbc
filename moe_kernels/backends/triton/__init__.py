"""The ``triton`` backend (GPU; tested on the CPU under ``TRITON_INTERPRET=1``).

This version ships no Triton kernels yet: the package exists so that the backend has its home,
with the module stems of every backend (``routing``, ``permute``, ``grouped``, ``losses``,
``reconcile``), and the probe says so. A kernel added to one of those modules under its contract
name (:mod:`moe_kernels.backends.contract`) joins the kernel table by itself; the conformance test
(``tests/test_contract.py``) then holds it to the contract and the op tests run it against the
reference. Modules must import ``triton`` lazily (inside the kernels), so that the package imports
where triton is not installed.
"""

import os

import torch

DEVICES = ("cuda",)
HOW_TO_GET = "install triton and run on a CUDA GPU (or set TRITON_INTERPRET=1 for CPU tests)"


def probe():
    try:
        import triton
    except ImportError:
        return False, "triton is not installed"
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        return False, "no CUDA device (and TRITON_INTERPRET=1 is not set)"
    from .. import contract

    if not contract.kernel_table("triton", __name__, lambda to, name: None):
        return False, f"this version of moe_kernels ships no Triton kernels yet (triton {triton.__version__})"
    return True, f"triton {triton.__version__}"
