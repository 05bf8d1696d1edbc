"""Test configuration: the ``backend`` fixtures that run the op tests on every available backend.

``MOE_KERNELS_TEST_BACKENDS`` lists the backends that must be available (comma-separated, e.g.
``cpu,triton`` in CI): a listed backend that is not available fails the run at collection instead
of skipping its tests. Backends not listed are tested where available and skipped, with the
reason, where not.

The tests run on CPU tensors, so the fixtures cover the backends that serve CPU tensors. The
``triton`` backend serves them through triton's interpreter: ``TRITON_INTERPRET=1`` is set here,
before moe_kernels (and any ``@triton.jit`` program) is imported, unless the environment sets it
already (``TRITON_INTERPRET=0`` leaves triton out of the CPU tests).

A backend that has only some kernels (``triton`` today) runs the tests of the ops it has; a test
that asks it for an op it lacks is *skipped*, with a reason naming the missing kernel (never
passed: the skip is raised where the op is requested, as a ``BaseException`` no ``pytest.raises``
catches).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first @triton.jit program is defined

import pytest  # noqa: E402
import torch  # noqa: E402

from moe_kernels import backends  # noqa: E402
from moe_kernels.backends import BACKENDS, NAMES, contract  # noqa: E402

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


def missing_kernel_reason(name: str, op: str) -> str:
    have = len(BACKENDS[name].kernels)
    return (f"backend '{name}' has no kernel '{op}' yet (it has {have} of the contract's "
            f"{len(contract.KERNELS)} kernels)")


def skip_missing_kernels(name: str, monkeypatch) -> None:
    """For this test, an op that backend ``name`` lacks skips the test (see the module docstring).

    Both ways to reach a missing kernel are covered: an explicit request (``backend=name`` on an
    op, where the resolver would raise ``BackendUnavailableError``) and a kernel lookup (the
    backward of an op it has).
    """
    b = BACKENDS[name]
    if set(contract.KERNELS) <= set(b.kernels):
        return
    requested, kernel = backends._requested, b.kernel

    @torch.compiler.assume_constant_result
    def requested_or_skip(op, device_type, req, source):
        if req == name and op not in b.kernels and device_type in b.devices:
            pytest.skip(missing_kernel_reason(name, op))
        return requested(op, device_type, req, source)

    def kernel_or_skip(op):
        if op not in b.kernels:
            pytest.skip(missing_kernel_reason(name, op))
        return kernel(op)

    monkeypatch.setattr(backends, "_requested", requested_or_skip)
    monkeypatch.setattr(b, "kernel", kernel_or_skip)


def use_backend(name: str, monkeypatch=None) -> str:
    """``name`` when it is available; otherwise skip the test with the reason (fail if it is required).

    With ``monkeypatch``, a test that asks the backend for an op it has no kernel for is skipped
    (:func:`skip_missing_kernels`).
    """
    b = BACKENDS[name]
    if not b.available:
        if name in REQUIRED:
            pytest.fail(f"backend '{name}' is required ({REQUIRED_ENV}) but not available: {b.reason}")
        pytest.skip(f"backend '{name}' not available: {b.reason}")
    if monkeypatch is not None:
        skip_missing_kernels(name, monkeypatch)
    return name


@pytest.fixture(params=HOST_BACKENDS)
def backend(request, monkeypatch) -> str:
    """Every backend serving CPU tensors, the reference included."""
    return use_backend(request.param, monkeypatch)


@pytest.fixture(params=FAST_BACKENDS or ("<none>",))
def fast_backend(request, monkeypatch) -> str:
    """Every backend serving CPU tensors except the reference (compared against it)."""
    if request.param == "<none>":
        pytest.skip("no backend besides the reference serves cpu tensors")
    return use_backend(request.param, monkeypatch)


#: a build of DeepSpeed's JIT ops that is not done after this long was killed: its lock file is stale
STALE_BUILD_LOCK_S = 15 * 60


@pytest.fixture(scope="session")
def deepspeed_ops():
    """DeepSpeed's CPU communication op, built once, before any test starts DeepSpeed processes.

    Every process that initialises ``deepspeed.comm`` on CPU JIT-builds ``deepspeed_shm_comm`` (about a
    minute on 2 cores) under one lock file in ``$TORCH_EXTENSIONS_DIR``. Two ranks racing for it make a
    test's time depend on who wins, and a build killed with its test (a timeout) leaves the lock file
    behind, on which every later process waits forever. So the tests use a directory of their own
    (beside the library's JIT cache, so it is reused between runs), drop a lock file older than any
    build, and build the op here, in the test process; the ranks inherit the directory and load it.
    """
    import time
    from pathlib import Path

    from moe_kernels import _build

    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (bash scripts/setup.sh test)")
    root = _build.cache_dir() / "torch_extensions"
    root.mkdir(parents=True, exist_ok=True)
    for lock in Path(root).glob("*/lock"):
        age = time.time() - lock.stat().st_mtime
        if age > STALE_BUILD_LOCK_S:
            print(f"conftest: removing the stale build lock {lock} ({age / 60:.0f} min old)")
            lock.unlink(missing_ok=True)
    before = os.environ.get("TORCH_EXTENSIONS_DIR")
    os.environ["TORCH_EXTENSIONS_DIR"] = str(root)
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            builder.load(verbose=False)  # as deepspeed.comm does it
        yield str(root)
    finally:
        if before is None:
            os.environ.pop("TORCH_EXTENSIONS_DIR", None)
        else:
            os.environ["TORCH_EXTENSIONS_DIR"] = before
