#!/usr/bin/env bash
# Set up moe_kernels from nothing in ./.venv (idempotent: a second run only checks).
#
#   bash scripts/setup.sh          # torch (CPU wheel) + moe_kernels, editable
#   bash scripts/setup.sh recipes  # + what the recipes (python/moe_recipes) need: tqdm, matplotlib,
#                                  #   pytorch-optimizer (LAMB on CPU), Pillow, pycocotools, DeepSpeed
#   bash scripts/setup.sh test     # + the recipes' packages, pytest, pytest-benchmark, hypothesis and triton
#                                  #   (the triton backend's tests, interpreted on the CPU)
#   bash scripts/setup.sh bench    # + the benchmark peers: DeepSpeed, transformers, megatron-core
#
# torch is pinned (scripts/constraints.txt) and moe_kernels is installed without build isolation and
# without dependency resolution, so no step can fetch a different (CUDA) torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_CONSTRAINT="$PWD/scripts/constraints.txt" PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }

pip install -q torch==2.13.0
pip install -q ninja==1.13.2 numpy==2.4.6  # ninja: JIT build of the C++ kernels; numpy: torch warns without it
pip install -q --no-build-isolation --no-deps -e .
RECIPES=("tqdm==4.70.1" "matplotlib==3.11.2" "pytorch-optimizer==4.1.0" "pillow==13.0.0" "pycocotools==2.0.11"
         "deepspeed==0.19.8")
case "${1:-}" in
  recipes) pip install -q "${RECIPES[@]}" ;;
  test)  pip install -q "pytest>=7" "pytest-benchmark>=4" "hypothesis==6.170.17" "${RECIPES[@]}" "transformers==5.23.0" \
                        "triton==3.9.0" ;;
  bench) pip install -q "pytest>=7" "pytest-benchmark>=4" "hypothesis==6.170.17" "deepspeed==0.19.8" \
                        "transformers==5.23.0" "megatron-core==0.16.1" ;;
  "") ;;
  *) echo "usage: bash scripts/setup.sh [recipes|test|bench]" >&2; exit 2 ;;
esac
.venv/bin/python -c "import torch, moe_kernels; print('moe_kernels', moe_kernels.__version__, '| torch', torch.__version__)"
