"""Build script: the authoritative build of moe_kernels (CMakeLists.txt delegates here).

Default: a pure-Python install. The compiled operators (torch.ops.moe_kernels_C, csrc/) are built
just-in-time on first use (moe_kernels/backends/compiled.py), so `pip install` never needs a
compiler or torch at build time.

Ahead-of-time build (opt-in): MOE_KERNELS_BUILD_OPS=1 builds csrc/ into the operator library
moe_kernels/_C*.so with torch's CppExtension (loaded with torch.ops.load_library: it registers the
operators with the dispatcher and has no Python module of its own). That needs the installed torch
in the build environment, so use `pip install --no-build-isolation ...`: an isolated build
environment would resolve torch from the package index (several GB of CUDA wheels) and build
against the wrong torch.

The sources, flags and digest come from moe_kernels/_build.py, the one build spec shared with the
JIT loader (loaded here by its file path: it is stdlib-only, so torch is not imported to read it).
"""

import importlib.util
import os
import re
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = re.search(r'__version__ = "([^"]+)"',
                    open(os.path.join(ROOT, "moe_kernels", "_version.py")).read()).group(1)


def _load_build_spec():
    spec = importlib.util.spec_from_file_location("_moe_kernels_build", os.path.join(ROOT, "moe_kernels", "_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # stdlib-only module: no torch import here
    return mod


BUILD = _load_build_spec()


class build_py_with_csrc(build_py):
    """Ship csrc/ inside the package (moe_kernels/_csrc) so a non-editable install can JIT-build."""

    def run(self):
        super().run()
        dst = os.path.join(self.build_lib, "moe_kernels", "_csrc")
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        shutil.copytree(os.path.join(ROOT, "csrc"), dst,
                        ignore=shutil.ignore_patterns("*.md", "*.o", "__pycache__"))


def ext_modules_and_cmdclass():
    cmdclass = {"build_py": build_py_with_csrc}
    if os.environ.get("MOE_KERNELS_BUILD_OPS", "0") != "1":
        return [], cmdclass
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        raise SystemExit(
            "moe_kernels: MOE_KERNELS_BUILD_OPS=1 needs torch importable at build time. Install torch "
            "first (pip install torch==2.13.0) and build with `pip install --no-build-isolation .`"
        ) from exc
    root = BUILD.source_dir()
    # the CUDA source set (empty so far) joins where torch and the toolkit have CUDA
    with_cuda = bool(BUILD.cuda_sources(root)) and BUILD.cuda_buildable(torch.version.cuda, cpp_extension.CUDA_HOME)
    sources = [os.path.relpath(p, ROOT) for p in BUILD.sources(root, with_cuda)]
    # stamp the build with the digest of its sources: the loader ignores a stale _C
    with open(os.path.join(ROOT, "moe_kernels", BUILD.AOT_STAMP), "w") as f:
        f.write(BUILD.source_digest(root, sanitize=False, with_cuda=with_cuda) + "\n")
    # the same flags as the JIT build (never the sanitizer variant ahead of time)
    cflags, ldflags = BUILD.flags(sanitize=False)
    if with_cuda:
        ext = cpp_extension.CUDAExtension(BUILD.AOT_NAME, sources, include_dirs=[str(root)],
                                          extra_compile_args={"cxx": cflags, "nvcc": BUILD.NVCC_FLAGS},
                                          extra_link_args=ldflags)
    else:
        ext = cpp_extension.CppExtension(BUILD.AOT_NAME, sources, include_dirs=[str(root)],
                                         extra_compile_args=cflags, extra_link_args=ldflags)
    return [ext], dict(cmdclass, build_ext=cpp_extension.BuildExtension)


ext_modules, cmdclass = ext_modules_and_cmdclass()

setup(
    name="moe_kernels",
    version=VERSION,
    description="Fused kernels for sparse mixture-of-experts and multi-task routing (PyTorch)",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    # the recipes (python/moe_recipes) install with the library: `import moe_recipes` works wherever it is
    packages=find_packages(include=["moe_kernels", "moe_kernels.*"])
    + find_packages("python", include=["moe_recipes", "moe_recipes.*"]),
    package_dir={"moe_recipes": "python/moe_recipes"},
    package_data={"moe_kernels": [BUILD.AOT_STAMP], "moe_recipes": ["presets/*/*.toml", "presets/*/*.json"]},
    # a lower bound only: an installed torch satisfies it, so pip never fetches one
    # ninja: the JIT build of the C++ kernels; numpy: torch warns "Failed to initialize NumPy" without it
    install_requires=["torch>=2.4", "ninja", "numpy"],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6"],
        "bench": ["pytest-benchmark>=4"],
        # the recipes (python/moe_recipes): progress bars, plots, LAMB on CPU, real-data loaders, DeepSpeed
        "recipes": ["tqdm>=4.60", "matplotlib>=3.7", "pytorch-optimizer>=3.0", "pillow>=10", "pycocotools>=2.0.7",
                    "deepspeed>=0.14"],
    },
    entry_points={"console_scripts": ["moe-kernels=moe_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
