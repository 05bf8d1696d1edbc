"""The backend switch: per call, by environment variable, by device; errors that say how to fix."""

import warnings

import pytest
import torch

import moe_kernels as mk
from moe_kernels import backends
from moe_kernels.backends import BACKENDS, BackendUnavailableError, resolve

L = torch.randn(5, 4)


def test_reference_always_available_and_complete():
    ref = BACKENDS["reference"]
    assert ref.available
    ns = torch.ops.moe_kernels
    ops = {n for n in dir(ns) if isinstance(getattr(ns, n), torch._ops.OpOverloadPacket)}
    assert len(ops) >= 20
    # every registered custom op has a reference kernel
    missing = ops - set(ref.kernels)
    assert not missing, f"ops without a reference kernel: {missing}"


def test_unknown_backend_names_the_choices():
    with pytest.raises(BackendUnavailableError, match="unknown backend 'fast'.*reference"):
        mk.route(L, 1, backend="fast")


@pytest.mark.parametrize("name", ["cpu", "triton", "cuda"])
def test_requested_unavailable_backend_errors_with_how_to(name, monkeypatch):
    b = BACKENDS[name]
    if b.available:
        pytest.skip(f"{name} is available on this machine")
    with pytest.raises(BackendUnavailableError) as info:
        mk.route(L, 1, backend=name)
    msg = str(info.value)
    assert f"backend '{name}'" in msg
    if "cpu" in b.devices:
        assert "not available" in msg and "To get it" in msg and b.reason in msg
    else:
        assert "does not run on cpu tensors" in msg


def test_environment_variable_is_an_explicit_request(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert resolve("route", torch.device("cpu")) == "reference"
    if not BACKENDS["cpu"].available:
        monkeypatch.setenv(backends.ENV_VAR, "cpu")
        with pytest.raises(BackendUnavailableError, match="MOE_KERNELS_BACKEND"):
            mk.route(L, 1)
    # the per-call argument wins over the environment
    monkeypatch.setenv(backends.ENV_VAR, "no-such-backend")
    assert mk.route(L, 1, backend="reference").topk_ids.shape == (5, 1)


def test_fallback_to_reference_says_so_once(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(backends, "_warned_fallback", set())
    cpu = BACKENDS["cpu"]
    # an op the cpu backend cannot serve: any op when it is unavailable, else one it lacks
    missing = [op for op in ("route", "grouped_gemm", "reconcile", "z_loss")
               if not cpu.available or op not in cpu.kernels]
    if not missing:
        pytest.skip("the cpu backend implements every op: nothing falls back")
    op = missing[0]
    calls = {
        "route": lambda: mk.route(L, 1),
        "grouped_gemm": lambda: mk.grouped_gemm(torch.randn(4, 3), torch.tensor([0, 4], dtype=torch.int32),
                                                torch.randn(1, 3, 2)),
        "reconcile": lambda: mk.reconcile(torch.randn(4, 3), [torch.randn(4, 2)], [torch.randn(2, 3)]),
        "z_loss": lambda: mk.z_loss(L),
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calls[op]()
        calls[op]()
        for other in missing[1:]:
            calls[other]()
    msgs = [str(w.message) for w in caught if "reference backend" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert f"'{op}'" in msgs[0]
    assert ("without a kernel" in msgs[0]) if cpu.available else (cpu.reason in msgs[0])


def test_backend_name_reaches_the_kernel(monkeypatch):
    """The chosen backend's kernel is the one that runs (so later backends are really exercised)."""
    calls = []
    ref = BACKENDS["reference"]
    orig = ref.kernels["dispatch"]
    monkeypatch.setitem(ref.kernels, "dispatch", lambda *a: calls.append(1) or orig(*a))
    mk.dispatch(torch.randn(5, 3), mk.route(L, 1), backend="reference")
    assert calls == [1]


def test_resolve_can_ask_without_warning(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(backends, "_warned_fallback", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        name = resolve("route", torch.device("cpu"), warn=False)
    assert name in BACKENDS and not caught
