"""The backend switch: per call, by environment variable, by device; errors that say how to fix."""

import dataclasses
import warnings

import pytest
import torch

import moe_kernels as mk
from moe_kernels import backends
from moe_kernels.backends import BACKENDS, BackendUnavailableError, contract, resolve

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


def _force(monkeypatch, name, available, reason="forced by the test", drop=()):
    """Make backend ``name`` look (un)available, optionally without some kernels."""
    b = BACKENDS[name]
    table = {} if not available else {k: v for k, v in b.declared_kernels().items() if k not in drop}
    monkeypatch.setitem(b.__dict__, "_state", (available, reason, table))
    monkeypatch.setattr(backends, "_AUTO", {})
    monkeypatch.setattr(backends, "_warned_fallback", set())


def test_unknown_backend_names_the_choices():
    with pytest.raises(BackendUnavailableError, match="unknown backend 'fast'.*reference"):
        mk.route(L, 1, backend="fast")


@pytest.mark.parametrize("name", ["cpu", "triton", "cuda"])
def test_requested_unavailable_backend_errors_with_how_to(name, monkeypatch):
    _force(monkeypatch, name, False, "the probe says no")
    b = BACKENDS[name]
    with pytest.raises(BackendUnavailableError) as info:
        mk.route(L, 1, backend=name)
    msg = str(info.value)
    assert f"backend '{name}'" in msg
    if "cpu" in b.devices:
        assert "not available" in msg and "To get it" in msg and "the probe says no" in msg
        assert b.how_to_get in msg
    else:
        assert "does not run on cpu tensors" in msg


def test_environment_variable_is_an_explicit_request(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert resolve("route", torch.device("cpu")) == "reference"
    _force(monkeypatch, "cpu", False)
    monkeypatch.setenv(backends.ENV_VAR, "cpu")
    with pytest.raises(BackendUnavailableError, match="MOE_KERNELS_BACKEND"):
        mk.route(L, 1)
    # the per-call argument wins over the environment
    monkeypatch.setenv(backends.ENV_VAR, "no-such-backend")
    assert mk.route(L, 1, backend="reference").topk_ids.shape == (5, 1)


@pytest.mark.parametrize("why", ["unavailable", "kernel missing"])
def test_fallback_to_reference_says_so_once(monkeypatch, why):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    if why == "unavailable":
        _force(monkeypatch, "cpu", False, "no compiler here")
    else:
        _force(monkeypatch, "cpu", True, "built", drop=("grouped_gemm", "grouped_gemm_backward", "z_loss",
                                                         "z_loss_backward"))
    calls = {
        "grouped_gemm": lambda: mk.grouped_gemm(torch.randn(4, 3), torch.tensor([0, 4], dtype=torch.int32),
                                                torch.randn(1, 3, 2)),
        "z_loss": lambda: mk.z_loss(L),
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calls["grouped_gemm"]()
        calls["grouped_gemm"]()
        calls["z_loss"]()
    msgs = [str(w.message) for w in caught if "reference backend" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert "'grouped_gemm'" in msgs[0]
    assert ("no compiler here" if why == "unavailable" else "without a kernel") in msgs[0]


def test_delegated_ops_run_on_the_reference_without_a_warning(monkeypatch):
    """The cpu backend leaves the mutual-information losses to the reference by design."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    _force(monkeypatch, "cpu", True, "built")
    cpu = BACKENDS["cpu"]
    assert cpu.delegated == {n: "reference" for n in contract.KERNELS if n.startswith("mutual_information")}
    probs = torch.softmax(torch.randn(6, 4), -1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = mk.mutual_information_loss(probs, torch.tensor([0, 1, 0, 1, 0, 1]), 2)
    assert not [w for w in caught if "moe_kernels" in str(w.message)], [str(w.message) for w in caught]
    assert resolve("mutual_information_loss", torch.device("cpu")) == "cpu"
    ref = mk.mutual_information_loss(probs, torch.tensor([0, 1, 0, 1, 0, 1]), 2, backend="reference")
    assert torch.equal(loss, ref)


def test_backend_name_reaches_the_kernel(monkeypatch):
    """The chosen backend's kernel is the one that runs (so later backends are really exercised)."""
    calls = []
    ref = BACKENDS["reference"]
    orig = ref.kernels["dispatch"]
    monkeypatch.setitem(ref.kernels, "dispatch",
                        dataclasses.replace(orig, fn=lambda *a: calls.append(1) or orig.fn(*a)))
    mk.dispatch(torch.randn(5, 3), mk.route(L, 1), backend="reference")
    assert calls == [1]


def test_resolve_can_ask_without_warning(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(backends, "_warned_fallback", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        name = resolve("route", torch.device("cpu"), warn=False)
    assert name in BACKENDS and not caught
