"""The one build spec of the compiled operators (csrc/), shared by every build of them.

``setup.py`` (the ahead-of-time build, ``MOE_KERNELS_BUILD_OPS=1``) loads this file by its path,
before torch can be imported, and :mod:`moe_kernels.backends.compiled` (the just-in-time build)
imports it, so it uses the standard library only and imports nothing else from ``moe_kernels``.
``CMakeLists.txt`` asks it for the CUDA sources (``python moe_kernels/_build.py cuda-sources``).

It holds:

* the source sets: the registration file with every schema (``csrc/registration.cpp``) and the
  CPU source set (``csrc/cpu/*.cpp``: the launchers and their ``TORCH_LIBRARY_IMPL(..., CPU, ...)``
  file); the CUDA source set (``csrc/cuda/*.cu`` and the host ``csrc/cuda/*.cpp`` that registers
  them under the CUDA key) is empty for now and joins the build only where CUDA is available;
* the flags: ``-O3 -fopenmp -ffp-contract=off -fno-trapping-math`` (no FMA contraction, so sums
  round as the reference's do; no trapping floating-point exceptions assumed, which lets gcc
  vectorise float-to-int conversions), and the sanitizer variant (``MOE_KERNELS_SANITIZE=1``:
  AddressSanitizer + UndefinedBehaviorSanitizer, always built just in time);
* the source digest: a hash of the sources, headers and flags that names the JIT cache entry and
  stamps an AOT build (``moe_kernels/_aot_digest.txt``), so a stale AOT build is never loaded.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

#: The operator namespace (``torch.ops.moe_kernels_C``); the AOT library is ``moe_kernels/_C*.so``.
NAMESPACE = "moe_kernels_C"
AOT_NAME = "moe_kernels._C"
AOT_STAMP = "_aot_digest.txt"  # inside the package, next to the AOT library

CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]  # torch adds its own -std
LDFLAGS = ["-fopenmp"]
# nvcc: no fused multiply-add contraction either (the CUDA source set is empty for now)
NVCC_FLAGS = ["-O3", "--fmad=false"]
# MOE_KERNELS_SANITIZE=1: a separate cache entry. Python is not instrumented, so run it with the
# runtimes preloaded, as .ci/run does:
#   LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
#   ASAN_OPTIONS=detect_leaks=0
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                  "-fno-omit-frame-pointer", "-g"]

_PKG = Path(__file__).resolve().parent


def sanitize_requested() -> bool:
    return os.environ.get("MOE_KERNELS_SANITIZE") == "1"


def flags(sanitize: bool | None = None) -> tuple[list[str], list[str]]:
    """(compile flags, link flags); ``sanitize=None`` follows ``MOE_KERNELS_SANITIZE``."""
    san = SANITIZE_FLAGS if (sanitize_requested() if sanitize is None else sanitize) else []
    return CFLAGS + san, LDFLAGS + san


def source_dir(pkg: Path = _PKG) -> Path | None:
    """csrc/ of a source checkout (editable install), else the copy shipped inside the package."""
    for cand in (pkg.parent / "csrc", pkg / "_csrc"):
        if (cand / "registration.cpp").is_file():
            return cand
    return None


def cpu_sources(root: Path) -> list[Path]:
    """The registration file and the CPU source set."""
    return [root / "registration.cpp"] + sorted((root / "cpu").glob("*.cpp"))


def cuda_sources(root: Path) -> list[Path]:
    """The CUDA source set: kernels (``.cu``) and their host-side registration (``.cpp``); empty for now."""
    cuda = root / "cuda"
    return sorted(cuda.glob("*.cu")) + sorted(cuda.glob("*.cpp"))


def cuda_buildable(torch_cuda: str | None, cuda_home: str | None) -> bool:
    """Whether the CUDA source set can be built: a CUDA build of torch (``torch.version.cuda``) and a
    CUDA toolkit (``torch.utils.cpp_extension.CUDA_HOME``); passed in, as this module never imports torch."""
    return torch_cuda is not None and cuda_home is not None


def sources(root: Path, with_cuda: bool = False) -> list[Path]:
    return cpu_sources(root) + (cuda_sources(root) if with_cuda else [])


def headers(root: Path) -> list[Path]:
    return sorted(p for sub in ("cpu", "kernels", "cuda") for pat in ("*.h", "*.cuh")
                  for p in (root / sub).glob(pat))


def source_digest(root: Path, sanitize: bool | None = None, with_cuda: bool = False) -> str:
    """Hash of the sources, headers and build flags: names the JIT cache entry and stamps an AOT build."""
    h = hashlib.sha256()
    for f in sources(root, with_cuda) + headers(root):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(f.read_bytes())
    cflags, ldflags = flags(sanitize)
    h.update(" ".join(cflags + ldflags + (NVCC_FLAGS if with_cuda else [])).encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    """The per-user JIT cache: ``$MOE_KERNELS_CACHE``, else ``$XDG_CACHE_HOME/moe_kernels`` or ``~/.cache/moe_kernels``."""
    base = os.environ.get("MOE_KERNELS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moe_kernels")
    return Path(base)


def _main(argv: list[str]) -> int:
    """``python moe_kernels/_build.py cpu-sources|cuda-sources|digest``: for CMake and scripts (';'-separated)."""
    root = source_dir()
    if root is None or len(argv) != 1 or argv[0] not in ("cpu-sources", "cuda-sources", "digest"):
        print("usage: _build.py cpu-sources|cuda-sources|digest (from a checkout with csrc/)", file=sys.stderr)
        return 2
    if argv[0] == "digest":
        print(source_digest(root, sanitize=False))
    else:
        files = cpu_sources(root) if argv[0] == "cpu-sources" else cuda_sources(root)
        print(";".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
