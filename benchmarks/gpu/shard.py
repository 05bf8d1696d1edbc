"""A pytest plugin for benchmarks/gpu/run.sh: ``-p shard`` with ``MK_SHARD=i/n`` keeps the i-th of n
contiguous blocks of the collected tests, so n pytest processes compile the triton kernels in parallel
(compilation is serial within a process and dominates a first GPU run; neighbouring tests share
kernels, hence blocks, not round-robin). Without ``MK_SHARD`` it does nothing."""

import os

import pytest


@pytest.hookimpl(trylast=True)  # after -k / -m have deselected theirs
def pytest_collection_modifyitems(config, items):
    spec = os.environ.get("MK_SHARD")
    if not spec:
        return
    i, n = (int(v) for v in spec.split("/"))
    lo, hi = len(items) * i // n, len(items) * (i + 1) // n
    keep = items[lo:hi]
    config.hook.pytest_deselected(items=items[:lo] + items[hi:])
    items[:] = keep
