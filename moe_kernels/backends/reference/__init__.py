"""The pure-PyTorch reference backend: the executable specification of every kernel.

It is the test oracle, the benchmark baseline and the fallback for devices without a faster
backend. Kernels are plain functions named as in :mod:`moe_kernels.backends.contract`;
:mod:`moe_kernels.ops` wraps them in custom ops.

Host synchronisation: the reference follows the sync-free policy's semantics (NaN gate weights for
non-finite logits, device-side assertions for ids out of range) but is not itself sync-free: its
grouped GEMMs read the expert segment offsets on the host to loop over experts, and ``task_route``
groups tokens by task on the host. On a GPU the ``triton`` and ``cuda`` backends are the sync-free
path.
"""

DEVICES = ("cpu", "cuda", "meta", "xpu", "mps")
HOW_TO_GET = "always available"


def probe():
    return True, "pure PyTorch, always available"
