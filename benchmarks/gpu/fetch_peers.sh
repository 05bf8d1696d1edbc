#!/usr/bin/env bash
# Put the pure-Python peer wheels that benchmarks/gpu/run.sh can use into benchmarks/gpu/wheels/
# (ignored by git; carry the folder to a GPU machine that has no network). Nothing is installed.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x ../../.venv/bin/python ] && PY=../../.venv/bin/python
mkdir -p wheels
"$PY" -m pip download --no-deps --only-binary=:all: -d wheels "liger-kernel==0.8.5"
ls -l wheels
