"""Backend registry and the one place where a backend is chosen.

A backend is a table of kernels (plain functions on tensors) keyed by op name, plus an availability
probe. The custom ops in :mod:`moe_kernels.ops` receive the *name* of the chosen backend as a string
argument and look the kernel up here, so one registered op serves every backend and the choice is
visible in the traced graph.

Choice, per call:

1. ``backend=`` on the call, else the environment variable ``MOE_KERNELS_BACKEND``: that backend is
   used or an error says why it cannot be and how to get it (never a silent fallback).
2. Otherwise the first available backend of the device's preference list that implements the op
   (CUDA tensors: cuda, triton, reference; CPU tensors: cpu, reference). Landing on ``reference``
   while a faster backend exists for the device in principle is reported once per device type.

Under ``torch.compile`` the choice is made while tracing; changing ``MOE_KERNELS_BACKEND`` later
needs a recompile (``torch._dynamo.reset()``) to take effect.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

ENV_VAR = "MOE_KERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot serve the call."""


@dataclass
class Backend:
    name: str
    devices: tuple[str, ...]  # device types it serves
    how_to_get: str  # one sentence telling a user how to make it available
    _probe: Callable[[], tuple[bool, str, dict]] = field(repr=False)

    @functools.cached_property
    def _state(self) -> tuple[bool, str, dict]:
        try:
            return self._probe()
        except Exception as exc:  # a broken optional dependency must not break import
            return False, f"probe failed: {type(exc).__name__}: {exc}", {}

    @property
    def available(self) -> bool:
        return self._state[0]

    @property
    def reason(self) -> str:
        """Why it is (not) available, in words."""
        return self._state[1]

    @property
    def kernels(self) -> dict[str, Callable]:
        return self._state[2]

    def kernel(self, op: str) -> Callable:
        try:
            return self.kernels[op]
        except KeyError:
            raise BackendUnavailableError(
                f"moe_kernels: backend '{self.name}' has no kernel for '{op}'") from None


def _reference_probe():
    from moe_kernels.reference import KERNELS

    return True, "pure PyTorch, always available", KERNELS


def _cpu_probe():
    # The C++/OpenMP extension (csrc/) registers its kernels through moe_kernels._ext.
    from moe_kernels import _ext

    return _ext.cpu_kernels()


def _triton_probe():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed", {}
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if not (torch.cuda.is_available() or interp):
        return False, "no CUDA device (and TRITON_INTERPRET=1 is not set)", {}
    try:
        mod = importlib.import_module("moe_kernels.triton")
    except ImportError:
        return False, "this version of moe_kernels ships no Triton kernels yet", {}
    return True, f"triton {triton.__version__}", mod.KERNELS


def _cuda_probe():
    if not torch.cuda.is_available():
        return False, "no CUDA device visible to torch (torch.cuda.is_available() is False)", {}
    from moe_kernels import _ext

    return _ext.cuda_kernels()


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("reference", ("cpu", "cuda", "meta", "xpu", "mps"),
                "always available", _reference_probe),
        Backend("cpu", ("cpu",),
                "install a C++ compiler (g++ >= 9) and ninja (`pip install ninja`): the extension is "
                "built on first use and cached (or build it ahead of time with MOE_KERNELS_BUILD_OPS=1)",
                _cpu_probe),
        Backend("triton", ("cuda",),
                "install triton and run on a CUDA GPU (or set TRITON_INTERPRET=1 for CPU tests)",
                _triton_probe),
        Backend("cuda", ("cuda",),
                "run on a CUDA GPU with a CUDA build of torch and a moe_kernels version that ships "
                "CUDA kernels",
                _cuda_probe),
    )
}

PREFERENCE: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}

_warned_fallback: set[str] = set()


def requested_backend(backend: str | None) -> tuple[str | None, str]:
    """The explicitly requested backend name and where the request came from."""
    if backend is not None:
        return backend, "the backend= argument"
    env = os.environ.get(ENV_VAR)
    if env:
        return env, f"the environment variable {ENV_VAR}"
    return None, ""


def resolve(op: str, device: torch.device, backend: str | None = None, *, warn: bool = True) -> str:
    """Name of the backend that runs ``op`` for tensors on ``device``.

    ``warn=False`` only asks (no one-time fallback warning). Under ``torch.compile`` this runs
    eagerly at trace time and its answer is a constant of the graph (probing a backend imports
    modules and may warn, which dynamo cannot trace).
    """
    return _resolve(op, device.type, backend, warn)


@torch.compiler.assume_constant_result
def _resolve(op: str, device_type: str, backend: str | None, warn: bool = True) -> str:
    device = torch.device(device_type)
    name, source = requested_backend(backend)
    if name is not None:
        if name not in BACKENDS:
            raise BackendUnavailableError(
                f"moe_kernels.{op}: unknown backend {name!r} (from {source}); "
                f"choose one of {tuple(BACKENDS)}")
        b = BACKENDS[name]
        if device.type not in b.devices:
            raise BackendUnavailableError(
                f"moe_kernels.{op}: backend '{name}' (from {source}) does not run on "
                f"{device.type} tensors; it serves {b.devices}")
        if not b.available:
            raise BackendUnavailableError(
                f"moe_kernels.{op}: backend '{name}' was requested by {source} but is not "
                f"available: {b.reason}. To get it: {b.how_to_get}.")
        if op not in b.kernels:
            have = [n for n, o in BACKENDS.items() if o.available and op in o.kernels]
            raise BackendUnavailableError(
                f"moe_kernels.{op}: backend '{name}' (from {source}) does not implement this op; "
                f"backends that do: {have}")
        return name

    prefs = PREFERENCE.get(device.type, ("reference",))
    for cand in prefs:
        b = BACKENDS[cand]
        if device.type in b.devices and b.available and op in b.kernels:
            if warn and cand == "reference" and len(prefs) > 1 and device.type not in _warned_fallback:
                _warned_fallback.add(device.type)
                why = "; ".join(f"{p}: " + (f"available, but without a kernel for '{op}' yet"
                                             if BACKENDS[p].available else BACKENDS[p].reason)
                                for p in prefs[:-1])
                warnings.warn(
                    f"moe_kernels: no faster backend for '{op}' on {device.type} tensors ({why}); "
                    f"using the pure-PyTorch reference backend for it and for any other op without a "
                    f"faster kernel (said once). Set {ENV_VAR}=reference to silence this.",
                    stacklevel=3)
            return cand
    raise BackendUnavailableError(f"moe_kernels.{op}: no backend serves {device.type} tensors")


def get_kernel(backend: str, op: str) -> Callable:
    return BACKENDS[backend].kernel(op)
