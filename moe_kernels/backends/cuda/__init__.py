"""The ``cuda`` backend: hand-written CUDA kernels where they beat Triton (routing, plan building,
permutes), as ``torch.ops.moe_kernels_C`` operators registered under the CUDA dispatch key.

The ``cpu`` backend's operators carry the same schemas (``csrc/registration.cpp``), so the two
backends share one operator table and differ by device key. This version ships no CUDA kernels
yet: the package is the backend's home, with the module stems of every backend, and the probe
says so.
"""

import torch

DEVICES = ("cuda",)
HOW_TO_GET = ("run on a CUDA GPU with a CUDA build of torch and a moe_kernels version that ships CUDA "
              "kernels")


def probe():
    if not torch.cuda.is_available():
        return False, "no CUDA device visible to torch (torch.cuda.is_available() is False)"
    from .. import contract

    if not contract.kernel_table("cuda", __name__, lambda to, name: None):
        return False, "this version of moe_kernels ships no CUDA kernels yet"
    return True, "CUDA kernels of moe_kernels_C"
