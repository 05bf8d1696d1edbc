"""Loader for the compiled extensions (C++/OpenMP CPU kernels and CUDA kernels from csrc/).

This version of moe_kernels ships no compiled kernels yet: the reference backend serves every op.
The probes below report that in words; ``moe-kernels info`` shows them.
"""

from __future__ import annotations


def cpu_kernels():
    return False, "not built: this version ships no C++ CPU kernels yet (csrc/ is empty)", {}


def cuda_kernels():
    return False, "not built: this version ships no CUDA kernels yet (csrc/ is empty)", {}
