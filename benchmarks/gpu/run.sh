#!/usr/bin/env bash
# The one command for a GPU machine: the device test suite, then the measurements, everything in one
# results folder (issue 12; see benchmarks/gpu/README.md).
#
#   bash benchmarks/gpu/run.sh [OUTDIR]           # on an H100/H200: about 8 minutes at most
#   bash benchmarks/gpu/run.sh --smoke [OUTDIR]   # on the CPU (CI): triton interpreted, tiny shapes
#
# OUTDIR (default benchmarks/results/gpu) receives env.txt, tests.log (tests-<i>.log/.xml per
# parallel pytest process: kernel compilation dominates a first run; an untimed pass of the
# measurements runs beside them to compile their kernels too, warm-up/), measure.log and
# gpu_<device>.json / .md. Needs only what the GPU machine has (Python, torch, triton, pytest,
# numpy): moe_kernels runs from this checkout (PYTHONPATH), nothing is installed and nothing is
# downloaded. Peers: torch's grouped_mm when this torch has it; Liger-Kernel's fused MoE when its
# wheel lies in benchmarks/gpu/wheels/ (bash benchmarks/gpu/fetch_peers.sh puts it there; carry
# that folder to the GPU machine).
set -uo pipefail
cd "$(dirname "$0")/../.."
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
OUT=${1:-benchmarks/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/moe_kernels_triton_cache}
export LIGER_FUSED_MOE_AUTOTUNE=${LIGER_FUSED_MOE_AUTOTUNE:-0}
if [ "$SMOKE" = 1 ]; then
  export TRITON_INTERPRET=1 MOE_KERNELS_TEST_DEVICE=cpu
  TESTS=(-k "every_kernel or layer_step_bitwise")
  MEASURE=(--smoke --backend triton --budget-s 120)
  T_TESTS=300 T_MEASURE=300 SHARDS=1
else
  export TRITON_INTERPRET=0  # tests/conftest.py would set 1 (the CPU default) otherwise
  TESTS=()
  MEASURE=(--budget-s 170)
  T_TESTS=200 T_MEASURE=260 SHARDS=${MK_TEST_SHARDS:-8}
fi
WHEELS=$(ls benchmarks/gpu/wheels/*.whl 2>/dev/null || true)
if [ -n "$WHEELS" ]; then  # pure-Python peer wheels: unpacked, never installed
  PEERS=/tmp/moe_kernels_peers
  rm -rf "$PEERS" && mkdir -p "$PEERS"
  for w in $WHEELS; do "$PY" -m zipfile -e "$w" "$PEERS"; done
  export PYTHONPATH="$PYTHONPATH:$PEERS"
fi

{
  echo "date: $(date -u +%FT%TZ)"; echo "git: $(git rev-parse HEAD 2>/dev/null || echo '-')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda',
torch.version.cuda, '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  "$PY" -c "import liger_kernel.ops.fused_moe as m; print('liger-kernel fused MoE:', m.__file__)" 2>&1 | tail -1
  echo "peer wheels: ${WHEELS:-none}"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== device test suite (tests/test_device_suite.py, $SHARDS processes)"
t0=$SECONDS
warm=""
if [ "$SMOKE" = 0 ]; then  # meanwhile, one untimed pass of the measurements compiles their kernels
  timeout "$T_TESTS" "$PY" benchmarks/gpu/measure.py --out "$OUT/warm-up" --reps 1 --warmup 0 --budget-s 180 \
    > "$OUT/warm-up.log" 2>&1 &
  warm=$!
fi
pids=()
for i in $(seq 0 $((SHARDS - 1))); do
  MK_SHARD="$i/$SHARDS" PYTHONPATH="$PYTHONPATH:$PWD/benchmarks/gpu" timeout "$T_TESTS" "$PY" -m pytest -q \
    -p no:cacheprovider -p shard tests/test_device_suite.py "${TESTS[@]}" --junitxml="$OUT/tests-$i.xml" -rfEs \
    > "$OUT/tests-$i.log" 2>&1 &
  pids+=($!)
done
rc_tests=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; rc=$?
  [ "$rc" = 5 ] && rc=0  # an empty shard
  echo "shard $i: rc=$rc, $(tail -1 "$OUT/tests-$i.log")"
  [ "$rc" = 0 ] || rc_tests=$rc
done
cat "$OUT"/tests-*.log > "$OUT/tests.log"
grep -hE "^(FAILED|ERROR)" "$OUT/tests.log" | head -40
echo "tests: rc=$rc_tests in $((SECONDS - t0)) s"
if [ -n "$warm" ]; then wait "$warm"; echo "warm-up pass of the measurements: rc=$? after $((SECONDS - t0)) s"; fi

echo "== measurements (benchmarks/gpu/measure.py)"
t0=$SECONDS
timeout "$T_MEASURE" "$PY" benchmarks/gpu/measure.py --out "$OUT" "${MEASURE[@]}" > "$OUT/measure.log" 2>&1
rc_measure=$?
tail -20 "$OUT/measure.log"
echo "measure: rc=$rc_measure in $((SECONDS - t0)) s"
ls "$OUT"/gpu_*.md >/dev/null 2>&1 && sed -n '/^## Targets/,/^## Baselines/p' "$OUT"/gpu_*.md
echo "results in $OUT (tests rc=$rc_tests, measure rc=$rc_measure)"
[ "$rc_tests" = 0 ] && [ "$rc_measure" = 0 ]
