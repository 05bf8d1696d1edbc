"""Loader of the compiled operators (csrc/): the ``torch.ops.moe_kernels_C`` library and its fakes.

:func:`load` makes the operators available, once per process (thread-safe), in this order:

1. the ahead-of-time build ``moe_kernels/_C*.so`` (``MOE_KERNELS_BUILD_OPS=1 pip install
   --no-build-isolation .``), loaded with ``torch.ops.load_library``; ignored, with a warning, when
   its digest stamp says csrc/ changed since it was built;
2. a just-in-time build with ninja (``torch.utils.cpp_extension.load(..., is_python_module=False)``)
   into a per-user cache reused by later processes: ``$MOE_KERNELS_CACHE`` or
   ``~/.cache/moe_kernels``, one directory per torch version, Python version and digest of the
   sources and flags (a source change builds a new one). Concurrent processes serialise on torch's
   lock file in that directory, so one builds and the others load.

``MOE_KERNELS_NO_JIT=1`` disables step 2, ``MOE_KERNELS_SANITIZE=1`` skips step 1 and builds the
ASan+UBSan variant, ``MOE_KERNELS_VERBOSE_BUILD=1`` shows the compiler output. Any failure becomes
a reason in words (``moe-kernels info`` shows it), never a crash.

After loading, a fake (meta) implementation is registered for every ``moe_kernels_C`` operator
that takes tensors, so the C++ operators trace under ``torch.compile`` / ``torch.export`` on their
own (``workspace_bytes`` / ``workspace_release`` take none: they are catch-all C++ functions that
run as they are). The build spec (sources, flags, digest) is :mod:`moe_kernels._build`, shared with
``setup.py``; the fakes are those of the ops the kernels implement (``moe_kernels.ops``, imported
when the library is loaded, not at import time).

Calling convention (the schemas are in csrc/registration.cpp): positional arguments in schema
order; several outputs come back as a tuple; an output that is not needed or has nothing to belong
to comes back as ``None``.
"""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

from moe_kernels import _build

_PKG = Path(__file__).resolve().parent.parent  # the moe_kernels package directory
_lock = threading.Lock()
_state: tuple[bool, str] | None = None
_lib = None  # the torch.library.Library that holds the fake registrations

#: Operators without tensor arguments (registered catch-all; they need no fake).
NO_TENSOR_OPS = ("workspace_bytes", "workspace_release")
#: written into a JIT cache entry after its build loaded: the entry is complete
BUILT_STAMP = "built"


def load() -> tuple[bool, str]:
    """(whether ``torch.ops.moe_kernels_C`` is usable, the reason in words); tried once per process."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _load()
    return _state


def loaded() -> bool:
    """Whether :func:`load` has run and succeeded (it does not try to load)."""
    return _state is not None and _state[0]


def workspace_bytes() -> int:
    """Bytes held by the compiled kernels' buffer pool, 0 when not loaded (the user-facing one, with
    what the pool is for, is :func:`moe_kernels.backends.cpu.workspace_bytes`)."""
    return int(torch.ops.moe_kernels_C.workspace_bytes.default()) if loaded() else 0


def empty_cache() -> int:
    """Free the pool's idle buffers (those nothing else references); returns the bytes freed."""
    return int(torch.ops.moe_kernels_C.workspace_release.default()) if loaded() else 0


# ---------------------------------------------------------------- loading

def _load() -> tuple[bool, str]:
    how, aot_note = None, ""
    try:
        how, aot_note = _load_aot()
    except Exception as exc:  # a broken AOT build (e.g. built against another torch): try JIT
        aot_note = f"the ahead-of-time build could not be loaded ({type(exc).__name__}: {exc}); "
    if how is None:
        if os.environ.get("MOE_KERNELS_NO_JIT") == "1":
            return False, aot_note + "not built ahead of time and MOE_KERNELS_NO_JIT=1"
        how, why = _jit_build()
        if how is None:
            return False, aot_note + why
    try:
        _register_fakes()
    except Exception as exc:
        return False, f"{how}, but registering its fake implementations failed: {type(exc).__name__}: {exc}"
    missing = _ops_without_fake()
    if missing:
        return False, f"{how}, but these operators have no fake implementation: {', '.join(missing)}"
    return True, how


def _aot_library() -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        cand = _PKG / f"_C{suffix}"
        if cand.is_file():
            return cand
    return None


def _load_aot() -> tuple[str | None, str]:
    """(how it was loaded, or None; a note on why the AOT build was skipped)."""
    if _build.sanitize_requested():
        return None, ""  # the sanitizer build is always JIT-built
    lib = _aot_library()
    if lib is None:
        return None, ""
    stale = _aot_is_stale()
    if stale:
        return None, stale + "; "
    torch.ops.load_library(str(lib))
    return f"ahead-of-time build ({lib.name})", ""


def _aot_is_stale() -> str:
    """Why an AOT build must not be used (its sources changed since), or '' when it is current."""
    root, stamp = _build.source_dir(_PKG), _PKG / _build.AOT_STAMP
    if root is None or not stamp.is_file():
        return ""
    built, now = stamp.read_text().strip(), _build.source_digest(root, sanitize=False, with_cuda=_with_cuda(root))
    if built != now:
        warnings.warn(f"moe_kernels: ignoring the ahead-of-time build moe_kernels._C: csrc/ changed "
                      f"since it was built (digest {built} != {now}); using a JIT build instead",
                      stacklevel=4)
        return "stale ahead-of-time build"
    return ""


def _with_cuda(root: Path) -> bool:
    """Whether the CUDA source set (empty so far) joins the build: it exists and CUDA is buildable."""
    if not _build.cuda_sources(root):
        return False
    from torch.utils import cpp_extension

    return _build.cuda_buildable(torch.version.cuda, cpp_extension.CUDA_HOME)


def _jit_build() -> tuple[str | None, str]:
    """(how it was loaded, or None; the reason when not)."""
    from torch.utils import cpp_extension

    root = _build.source_dir(_PKG)
    if root is None:
        return None, "no C++ sources found (neither csrc/ of a checkout nor moe_kernels/_csrc)"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return None, (f"no C++ compiler: '{cxx}' is not on PATH (install g++ >= 9, e.g. "
                      "`apt-get install g++`, or set CXX)")
    if not cpp_extension.is_ninja_available():
        return None, "ninja is not installed (`pip install ninja`)"
    with_cuda = _with_cuda(root)
    tag = _build.source_digest(root, with_cuda=with_cuda)
    build = _build.cache_dir() / f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{tag}"
    build.mkdir(parents=True, exist_ok=True)
    name = f"{_build.NAMESPACE}_{tag}"
    library, built = build / f"{name}.so", build / BUILT_STAMP
    if built.is_file() and library.is_file():
        # the entry is named by the digest of everything that goes into it, and the stamp is written only
        # after a build that loaded: load it as it is, without torch's build lock (a lock left by a build
        # killed midway would make every later process wait on it forever) or a ninja run
        try:
            torch.ops.load_library(str(library))
            return f"JIT-built with ninja, cached in {build}", ""
        except OSError:  # damaged since: build it again
            built.unlink(missing_ok=True)
    if not any(build.glob("*.so")):
        print(f"moe_kernels: building the C++ kernels (first use, about a minute; cached in {build})",
              file=sys.stderr, flush=True)
    cflags, ldflags = _build.flags()
    try:
        cpp_extension.load(
            name=name, sources=[str(s) for s in _build.sources(root, with_cuda)],
            extra_cflags=cflags, extra_ldflags=ldflags, extra_include_paths=[str(root)],
            extra_cuda_cflags=_build.NVCC_FLAGS if with_cuda else None,
            build_directory=str(build), verbose=os.environ.get("MOE_KERNELS_VERBOSE_BUILD") == "1",
            is_python_module=False)
    except Exception as exc:  # compiler errors, missing headers: report, fall back
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower() and not ln.startswith(("c++ ", "[", "FAILED"))]
        shown = (errors or lines)[:3]
        return None, (f"the JIT build in {build} failed: {' | '.join(shown)} "
                      "(MOE_KERNELS_VERBOSE_BUILD=1 shows the compiler output)")
    built.write_text(f"{name}.so\n")
    return f"JIT-built with ninja, cached in {build}", ""


def operator_names() -> list:
    """The names of the loaded ``moe_kernels_C`` operators."""
    prefix = f"{_build.NAMESPACE}::"
    return sorted({n[len(prefix):].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                   if n.startswith(prefix)})


def _ops_without_fake() -> list:
    from moe_kernels.ops._runner import FAKES

    return [n for n in operator_names() if n not in FAKES and n not in NO_TENSOR_OPS]


def _register_fakes() -> None:
    """Each operator's fake is its kernel's (:func:`moe_kernels.ops._runner.kernel_fake`: the shape
    function of the op it implements), so the shapes are written once, in moe_kernels/ops/."""
    global _lib
    from moe_kernels.ops._runner import FAKES, kernel_fake

    # a FRAGMENT library owns the registrations (and keeps them alive)
    _lib = torch.library.Library(_build.NAMESPACE, "FRAGMENT")
    for name in operator_names():
        if name in FAKES:
            torch.library.register_fake(f"{_build.NAMESPACE}::{name}", kernel_fake(name), lib=_lib)
