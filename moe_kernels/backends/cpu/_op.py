"""Calling a ``moe_kernels_C`` operator from a kernel function."""

from __future__ import annotations

import torch

from ..._validation import MoEKernelsError

OPS = torch.ops.moe_kernels_C  # the namespace; its operators exist once the library is loaded


def call(name: str, *args):
    """``torch.ops.moe_kernels_C.<name>(*args)``; a value error the kernel raises (its message names
    the op and the argument, as the op layer's checks do) becomes a :class:`MoEKernelsError`."""
    try:
        return getattr(OPS, name).default(*args)
    except ValueError as exc:
        msg = str(exc).split("\n", 1)[0]
        if msg.startswith("moe_kernels."):
            raise MoEKernelsError(msg) from None
        raise
