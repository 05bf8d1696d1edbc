"""Backends and the one place where a backend is chosen.

A backend is a package ``moe_kernels/backends/<name>/`` (``reference``, ``cpu``, ``triton``, ``cuda``):

* its ``__init__`` says which devices it serves (``DEVICES``), how a user gets it (``HOW_TO_GET``)
  and whether it is usable here (``probe() -> (available, reason)``);
* its modules ``routing``, ``permute``, ``grouped``, ``losses`` and ``reconcile`` define the kernels
  of :mod:`moe_kernels.backends.contract` under their contract names. The kernel table is built
  from those modules (:func:`moe_kernels.backends.contract.kernel_table`); nothing lists the ops a
  backend has.

The custom ops in :mod:`moe_kernels.ops` receive the *name* of the chosen backend as a string
argument and look the kernel up here, so one registered op serves every backend and the choice is
visible in the traced graph.

Choice, per call:

1. ``backend=`` on the call, else the environment variable ``MOE_KERNELS_BACKEND``: that backend is
   used or an error says why it cannot be and how to get it (never a silent fallback).
2. Otherwise the first available backend of the device's preference list that implements the op
   (CUDA tensors: cuda, triton, reference; CPU tensors: cpu, reference). Landing on ``reference``
   while a faster backend exists for the device in principle is reported once per device type;
   an op a backend *delegates* to the reference by design (:func:`~.contract.delegated`) runs
   there without a warning.

Under ``torch.compile`` the choice is made while tracing; changing ``MOE_KERNELS_BACKEND`` later
needs a recompile (``torch._dynamo.reset()``) to take effect.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from typing import Optional

import torch

from . import contract
from .contract import Kernel

ENV_VAR = "MOE_KERNELS_BACKEND"

#: The backend packages, fastest last in no particular sense: the order of ``moe-kernels info``.
NAMES = ("reference", "cpu", "triton", "cuda")

PREFERENCE: dict = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot serve the call."""


class Backend:
    """One backend package: its devices, availability and kernel table (built on first use)."""

    def __init__(self, name: str):
        self.name = name
        self.package = f"{__name__}.{name}"
        self.module = importlib.import_module(self.package)
        self.devices: tuple = tuple(self.module.DEVICES)
        self.how_to_get: str = self.module.HOW_TO_GET

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, devices={self.devices})"

    @functools.cached_property
    def _state(self) -> tuple:
        try:
            ok, reason = self.module.probe()
        except Exception as exc:  # a broken optional dependency must not break import
            return False, f"probe failed: {type(exc).__name__}: {exc}", {}
        return bool(ok), reason, (self.declared_kernels() if ok else {})

    @property
    def available(self) -> bool:
        return self._state[0]

    @property
    def reason(self) -> str:
        """Why it is (not) available, in words."""
        return self._state[1]

    @property
    def kernels(self) -> dict:
        """``{kernel name: Kernel}`` when available, else empty."""
        return self._state[2]

    @functools.lru_cache(maxsize=None)  # noqa: B019 - one Backend object per name, for the process
    def declared_kernels(self) -> dict:
        """The kernel table built from the backend's modules, whether or not it is available here."""
        return contract.kernel_table(self.name, self.package, _delegate)

    @property
    def delegated(self) -> dict:
        """``{op: backend}`` of the kernels this backend leaves to another backend by design."""
        return {n: k.delegated_to for n, k in self.declared_kernels().items() if k.delegated_to}

    def kernel(self, op: str) -> Kernel:
        try:
            return self.kernels[op]
        except KeyError:
            raise BackendUnavailableError(
                f"moe_kernels: backend '{self.name}' has no kernel for '{op}'") from None


def _delegate(to: str, name: str) -> Optional[Kernel]:
    other = BACKENDS[to]
    return other.kernels.get(name) if other.available else None


BACKENDS: dict = {n: Backend(n) for n in NAMES}

_warned_fallback: set = set()


def requested_backend(backend: Optional[str]) -> tuple:
    """The explicitly requested backend name and where the request came from."""
    if backend is not None:
        return backend, "the backend= argument"
    env = os.environ.get(ENV_VAR)
    if env:
        return env, f"the environment variable {ENV_VAR}"
    return None, ""


def resolve(op: str, device: torch.device, backend: Optional[str] = None, *, warn: bool = True) -> str:
    """Name of the backend that runs ``op`` for tensors on ``device``.

    ``warn=False`` only asks (no one-time fallback warning). Under ``torch.compile`` this runs
    eagerly at trace time and its answer is a constant of the graph (probing a backend imports
    modules and may warn, which dynamo cannot trace).
    """
    name, source = requested_backend(backend)
    if name is None:
        return _auto(op, device.type, warn)
    return _requested(op, device.type, name, source)


@torch.compiler.assume_constant_result
def _requested(op: str, device_type: str, name: str, source: str) -> str:
    if name not in BACKENDS:
        raise BackendUnavailableError(
            f"moe_kernels.{op}: unknown backend {name!r} (from {source}); choose one of {tuple(BACKENDS)}")
    b = BACKENDS[name]
    if device_type not in b.devices:
        raise BackendUnavailableError(
            f"moe_kernels.{op}: backend '{name}' (from {source}) does not run on {device_type} tensors; "
            f"it serves {b.devices}")
    if not b.available:
        raise BackendUnavailableError(
            f"moe_kernels.{op}: backend '{name}' was requested by {source} but is not available: "
            f"{b.reason}. To get it: {b.how_to_get}.")
    if op not in b.kernels:
        have = [n for n, o in BACKENDS.items() if o.available and op in o.kernels]
        raise BackendUnavailableError(
            f"moe_kernels.{op}: backend '{name}' (from {source}) does not implement this op; "
            f"backends that do: {have}")
    return name


@torch.compiler.assume_constant_result
def _auto(op: str, device_type: str, warn: bool = True) -> str:
    cached = _AUTO.get((op, device_type))
    if cached is not None and (not warn or cached != "reference" or device_type in _warned_fallback):
        return cached
    prefs = PREFERENCE.get(device_type, ("reference",))
    for cand in prefs:
        b = BACKENDS[cand]
        if device_type in b.devices and b.available and op in b.kernels:
            if warn and cand == "reference" and len(prefs) > 1 and device_type not in _warned_fallback:
                _warned_fallback.add(device_type)
                why = "; ".join(f"{p}: " + (f"available, but without a kernel for '{op}' yet"
                                             if BACKENDS[p].available else BACKENDS[p].reason)
                                for p in prefs[:-1])
                warnings.warn(
                    f"moe_kernels: no faster backend for '{op}' on {device_type} tensors ({why}); "
                    f"using the pure-PyTorch reference backend for it and for any other op without a "
                    f"faster kernel (said once). Set {ENV_VAR}=reference to silence this.",
                    stacklevel=4)
            _AUTO[(op, device_type)] = cand
            return cand
    raise BackendUnavailableError(f"moe_kernels.{op}: no backend serves {device_type} tensors")


# (op, device type) -> the automatic choice; availability does not change within a process
_AUTO: dict = {}


def get_kernel(backend: str, op: str) -> Kernel:
    """The kernel table entry of ``op`` on ``backend`` (a :class:`~.contract.Kernel`)."""
    return BACKENDS[backend].kernel(op)


__all__ = ["BACKENDS", "Backend", "BackendUnavailableError", "ENV_VAR", "NAMES", "PREFERENCE", "get_kernel",
           "requested_backend", "resolve"]
