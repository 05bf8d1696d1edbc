"""Build script: the authoritative build of moe_kernels (CMakeLists.txt delegates here).

Default: a pure-Python install. The compiled backends are built just-in-time on first use
(moe_kernels/_ext.py), so `pip install` never needs a compiler or torch at build time.

Ahead-of-time build (opt-in): MOE_KERNELS_BUILD_OPS=1 builds the C++ sources under csrc/ into
moe_kernels._C with torch's CppExtension. That needs the installed torch in the build environment,
so use `pip install --no-build-isolation ...`: an isolated build environment would resolve torch from
the package index (several GB of CUDA wheels) and build against the wrong torch.
"""

import glob
import importlib.util
import os
import re
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = re.search(r'__version__ = "([^"]+)"',
                    open(os.path.join(ROOT, "moe_kernels", "_version.py")).read()).group(1)


def cpp_sources():
    # the CPU extension: the binding file and the CPU launchers (CUDA sources are built separately)
    return [os.path.join("csrc", "torch_bindings.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))


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
    sources = cpp_sources()
    # stamp the build with the digest of its sources: moe_kernels/_ext.py ignores a stale _C
    spec = importlib.util.spec_from_file_location("_moe_ext", os.path.join(ROOT, "moe_kernels", "_ext.py"))
    ext_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext_mod)  # stdlib-only module: no torch import here
    with open(os.path.join(ROOT, "moe_kernels", "_aot_digest.txt"), "w") as f:
        f.write(ext_mod.source_digest(Path(ROOT) / "csrc") + "\n")
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        raise SystemExit(
            "moe_kernels: MOE_KERNELS_BUILD_OPS=1 needs torch importable at build time. Install torch "
            "first (pip install torch==2.13.0) and build with `pip install --no-build-isolation .`"
        ) from exc
    # the same flags as the JIT build (moe_kernels/_ext.py: CFLAGS, LDFLAGS)
    ext = CppExtension("moe_kernels._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                       extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"],
                       extra_link_args=["-fopenmp"])
    return [ext], dict(cmdclass, build_ext=BuildExtension)


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
    package_data={"moe_kernels": ["_aot_digest.txt"]},
    # a lower bound only: an installed torch satisfies it, so pip never fetches one
    install_requires=["torch>=2.4", "ninja"],  # ninja: the JIT build of the C++ kernels
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4"],
        "bench": ["pytest-benchmark>=4"],
    },
    entry_points={"console_scripts": ["moe-kernels=moe_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
