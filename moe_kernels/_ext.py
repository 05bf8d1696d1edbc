"""Loader for the compiled C++ CPU kernels (csrc/).

Order of preference:

1. an ahead-of-time build, ``moe_kernels._C`` (``MOE_KERNELS_BUILD_OPS=1 pip install
   --no-build-isolation .``);
2. a just-in-time build with ninja on first use, into a per-user cache reused by later processes:
   ``$MOE_KERNELS_CACHE`` or ``~/.cache/moe_kernels``, one directory per torch version, Python
   version and hash of the sources and flags (a source change builds a new one). Concurrent
   processes serialise on torch's lock file in that directory, so one builds and the others load.

``MOE_KERNELS_NO_JIT=1`` disables step 2. Any failure becomes a reason in words (shown by
``moe-kernels info`` and in the error when the ``cpu`` backend is requested), never a crash.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path

_PKG = Path(__file__).resolve().parent
CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]  # torch adds its own -std
LDFLAGS = ["-fopenmp"]
# MOE_KERNELS_SANITIZE=1: AddressSanitizer + UndefinedBehaviorSanitizer build (a separate cache entry).
# Python is not instrumented, so run it with the runtimes preloaded, as .ci/run does:
#   LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
#   ASAN_OPTIONS=detect_leaks=0
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                  "-fno-omit-frame-pointer", "-g"]


def _flags():
    san = SANITIZE_FLAGS if os.environ.get("MOE_KERNELS_SANITIZE") == "1" else []
    return CFLAGS + san, LDFLAGS + san
_lock = threading.Lock()
_state: dict = {}


def source_dir() -> Path | None:
    """csrc/ of a source checkout (editable install), else the copy shipped inside the package."""
    for cand in (_PKG.parent / "csrc", _PKG / "_csrc"):
        if (cand / "torch_bindings.cpp").is_file():
            return cand
    return None


def cpu_sources(root: Path) -> list[Path]:
    return [root / "torch_bindings.cpp"] + sorted((root / "cpu").glob("*.cpp"))


def source_digest(root: Path) -> str:
    """Hash of the sources and build flags: names the JIT cache entry and stamps an AOT build."""
    h = hashlib.sha256()
    files = cpu_sources(root) + sorted((root / "cpu").glob("*.h")) + sorted((root / "kernels").glob("*.h"))
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    cflags, ldflags = _flags()
    h.update(" ".join(cflags + ldflags).encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    base = os.environ.get("MOE_KERNELS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moe_kernels")
    return Path(base)


def _jit_build():
    import torch
    from torch.utils import cpp_extension

    root = source_dir()
    if root is None:
        return None, "no C++ sources found (neither csrc/ of a checkout nor moe_kernels/_csrc)"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return None, (f"no C++ compiler: '{cxx}' is not on PATH (install g++ >= 9, e.g. "
                      "`apt-get install g++`, or set CXX)")
    if not cpp_extension.is_ninja_available():
        return None, "ninja is not installed (`pip install ninja`)"
    tag = source_digest(root)
    build = cache_dir() / f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{tag}"
    build.mkdir(parents=True, exist_ok=True)
    if not any(build.glob("*.so")):
        print(f"moe_kernels: building the C++ CPU kernels (first use, about a minute; cached in {build})",
              file=sys.stderr, flush=True)
    cflags, ldflags = _flags()
    try:
        mod = cpp_extension.load(
            name=f"moe_kernels_cpu_{tag}", sources=[str(s) for s in cpu_sources(root)],
            extra_cflags=cflags, extra_ldflags=ldflags, build_directory=str(build),
            verbose=os.environ.get("MOE_KERNELS_VERBOSE_BUILD") == "1")
    except Exception as exc:  # compiler errors, missing headers: report, fall back
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower() and not ln.startswith(("c++ ", "[", "FAILED"))]
        shown = (errors or lines)[:3]
        return None, (f"the JIT build in {build} failed: {' | '.join(shown)} "
                      "(MOE_KERNELS_VERBOSE_BUILD=1 shows the compiler output)")
    return mod, f"JIT-built with ninja, cached in {build}"


def load_cpu():
    """(module or None, reason in words); built or loaded once per process."""
    with _lock:
        if "cpu" not in _state:
            try:
                if os.environ.get("MOE_KERNELS_SANITIZE") == "1":
                    raise ImportError("the sanitizer build is always JIT-built")
                from moe_kernels import _C  # ahead-of-time build

                stale = _aot_is_stale()
                if stale:
                    raise ImportError(stale)
                _state["cpu"] = (_C, "ahead-of-time build (moe_kernels._C)")
            except ImportError:
                if os.environ.get("MOE_KERNELS_NO_JIT") == "1":
                    _state["cpu"] = (None, "not built ahead of time and MOE_KERNELS_NO_JIT=1")
                else:
                    _state["cpu"] = _jit_build()
        return _state["cpu"]


def _aot_is_stale() -> str:
    """Why an AOT build must not be used (its sources changed since), or '' when it is current."""
    root, stamp = source_dir(), _PKG / "_aot_digest.txt"
    if root is None or not stamp.is_file():
        return ""
    built, now = stamp.read_text().strip(), source_digest(root)
    if built != now:
        import warnings

        warnings.warn(f"moe_kernels: ignoring the ahead-of-time build moe_kernels._C: csrc/ changed "
                      f"since it was built (digest {built} != {now}); using a JIT build instead",
                      stacklevel=3)
        return "stale ahead-of-time build"
    return ""


def cpu_kernels():
    mod, reason = load_cpu()
    if mod is None:
        return False, reason, {}
    from moe_kernels.cpu_backend import make_kernels

    return True, reason, make_kernels(mod)


def cuda_kernels():
    return False, "this version ships no CUDA kernels yet", {}
