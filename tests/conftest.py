"""Test configuration: the ``backend`` fixtures that run the op tests on every available backend.

``MOE_KERNELS_TEST_BACKENDS`` lists the backends that must be available (comma-separated, e.g.
``cpu`` in CI, later ``cpu,triton`` with ``TRITON_INTERPRET=1``): a listed backend that is not
available fails the run at collection instead of skipping its tests. Backends not listed are
tested where available and skipped, with the reason, where not.

The tests run on CPU tensors, so the fixtures cover the backends that serve CPU tensors.
"""

from __future__ import annotations

import os

import pytest

from moe_kernels.backends import BACKENDS, NAMES

REQUIRED_ENV = "MOE_KERNELS_TEST_BACKENDS"
REQUIRED = tuple(n.strip() for n in os.environ.get(REQUIRED_ENV, "").split(",") if n.strip())
DEVICE = "cpu"

#: every backend that serves tensors on the test device, available or not
HOST_BACKENDS = tuple(n for n in NAMES if DEVICE in BACKENDS[n].devices)
#: the same without the reference: the backends the tests compare against the reference
FAST_BACKENDS = tuple(n for n in HOST_BACKENDS if n != "reference")


def pytest_configure(config):
    unknown = [n for n in REQUIRED if n not in BACKENDS]
    if unknown:
        raise pytest.UsageError(f"{REQUIRED_ENV} names unknown backends {unknown}; known: {list(BACKENDS)}")
    missing = [f"{n}: {BACKENDS[n].reason}" for n in REQUIRED if not BACKENDS[n].available]
    if missing:
        raise pytest.UsageError(f"{REQUIRED_ENV}={','.join(REQUIRED)} but not available: " + "; ".join(missing))
    not_here = [n for n in REQUIRED if DEVICE not in BACKENDS[n].devices]
    if not_here:
        raise pytest.UsageError(f"{REQUIRED_ENV} lists {not_here}, which do not serve {DEVICE} tensors")


def use_backend(name: str) -> str:
    """``name`` when it is available; otherwise skip the test with the reason (fail if it is required)."""
    b = BACKENDS[name]
    if not b.available:
        if name in REQUIRED:
            pytest.fail(f"backend '{name}' is required ({REQUIRED_ENV}) but not available: {b.reason}")
        pytest.skip(f"backend '{name}' not available: {b.reason}")
    return name


@pytest.fixture(params=HOST_BACKENDS)
def backend(request) -> str:
    """Every backend serving CPU tensors, the reference included."""
    return use_backend(request.param)


@pytest.fixture(params=FAST_BACKENDS or ("<none>",))
def fast_backend(request) -> str:
    """Every backend serving CPU tensors except the reference (compared against it)."""
    if request.param == "<none>":
        pytest.skip("no backend besides the reference serves cpu tensors")
    return use_backend(request.param)
