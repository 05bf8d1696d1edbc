"""Build script: the authoritative build of moe_kernels (CMakeLists.txt delegates here).

Default: a pure-Python install. The compiled backends are built just-in-time on first use
(moe_kernels/_ext.py), so `pip install` never needs a compiler or torch at build time.

Ahead-of-time build (opt-in): MOE_KERNELS_BUILD_OPS=1 builds the C++ sources under csrc/ into
moe_kernels._C with torch's CppExtension. That needs the installed torch in the build environment,
so use `pip install --no-build-isolation ...`: an isolated build environment would resolve torch from
the package index (several GB of CUDA wheels) and build against the wrong torch.
"""

import glob
import os
import re

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = re.search(r'__version__ = "([^"]+)"',
                    open(os.path.join(ROOT, "moe_kernels", "_version.py")).read()).group(1)


def cpp_sources():
    return sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))


def ext_modules_and_cmdclass():
    if os.environ.get("MOE_KERNELS_BUILD_OPS", "0") != "1":
        return [], {}
    sources = cpp_sources()
    if not sources:
        print("moe_kernels: MOE_KERNELS_BUILD_OPS=1 but csrc/ has no C++ sources in this version; "
              "installing the pure-Python package")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        raise SystemExit(
            "moe_kernels: MOE_KERNELS_BUILD_OPS=1 needs torch importable at build time. Install torch "
            "first (pip install torch==2.13.0) and build with `pip install --no-build-isolation .`"
        ) from exc
    ext = CppExtension("moe_kernels._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                       extra_compile_args=["-O3", "-fopenmp", "-std=c++17"], extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = ext_modules_and_cmdclass()

setup(
    name="moe_kernels",
    version=VERSION,
    description="Fused kernels for sparse mixture-of-experts and multi-task routing (PyTorch)",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["moe_kernels", "moe_kernels.*"]),
    # a lower bound only: an installed torch satisfies it, so pip never fetches one
    install_requires=["torch>=2.4"],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4"],
        "bench": ["pytest-benchmark>=4"],
    },
    entry_points={"console_scripts": ["moe-kernels=moe_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
