#!/usr/bin/env bash
# One prepared GPU check of the hatrt kernels and plugins (< 8 minutes on an H100/H200):
#   1. build the kernel library + plugin library with CMake (plugin library only when the TensorRT
#      headers are present: carry third_party/TensorRT/include), sm_90a on Hopper; run the emulator
#      self-test on the GPU (it checks the mma fragment layout the kernels and the emulator assume);
#   2. build the torch extension that exposes the launchers and run the reference comparisons
#      (plugins/tests/test_kernels.py, target cuda: fresh random inputs, NaN-poisoned outputs);
#   3. run the plugin harness (creators -> plugins -> enqueue on the GPU, no TensorRT builder);
#   4. the kernel benchmark (plugins/bench/bench_kernels.py): every kernel at V4-Flash / V4-Pro shapes against
#      the card's measured copy bandwidth and matrix rates (bench.json, bench.txt, bench.png).
# Everything is logged under $OUT (the device tool's output folder) or build/gpu_check.
#
#   bash scripts/gpu_check.sh                     # full
#   QUICK=1 bash scripts/gpu_check.sh             # smaller benchmark
#   SANITIZE=1 QUICK=1 bash scripts/gpu_check.sh  # + compute-sanitizer racecheck/memcheck (slow)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-build/gpu_check}"
mkdir -p "$OUT_DIR" build
PY="${PYTHON:-python3}"
JOBS="$(nproc 2>/dev/null || echo 8)"
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$OUT_DIR/gpu.txt"
nvcc --version | tail -2
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
CC="$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 90)"
ARCH="$([ "$CC" = 90 ] && echo 90a || echo "$CC")"

step "cmake build (arch $ARCH)"
t0=$(date +%s)
if cmake -S plugins -B build/plugins_gpu -DCMAKE_BUILD_TYPE=Release -DHATRT_CUDA_ARCHS="$ARCH" >"$OUT_DIR/cmake.log" 2>&1 \
   && timeout 300 cmake --build build/plugins_gpu -j "$JOBS" >>"$OUT_DIR/cmake.log" 2>&1; then
  echo "cmake build ok in $(( $(date +%s) - t0 )) s"; ls -la build/plugins_gpu/*.so build/plugins_gpu/*.a 2>/dev/null
else
  echo "cmake build FAILED (see cmake.log)"; tail -30 "$OUT_DIR/cmake.log"; status=1
fi

step "tensor-core layout + emulator self-test on the GPU (plugins/emu/emu_selftest.cu)"
if timeout 120 nvcc -std=c++17 -O2 -gencode=arch=compute_${ARCH},code=sm_${ARCH} -Iplugins/csrc/include \
     plugins/emu/emu_selftest.cu -o build/emu_selftest_gpu >"$OUT_DIR/selftest.txt" 2>&1; then
  timeout 60 build/emu_selftest_gpu 2>&1 | tee -a "$OUT_DIR/selftest.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
else
  echo "self-test build FAILED"; tail -20 "$OUT_DIR/selftest.txt"; status=1
fi

step "torch extension"
timeout 300 "$PY" plugins/tests/kernels_ext.py 2>&1 | tail -5 | tee "$OUT_DIR/ext.txt" || status=1

step "reference comparisons"
if "$PY" -c "import pytest" 2>/dev/null; then
  timeout 300 "$PY" -m pytest -q -p no:cacheprovider plugins/tests/test_kernels.py -k cuda -rA 2>&1 | tail -25 | tee "$OUT_DIR/tests.txt"
else
  timeout 300 "$PY" plugins/tests/test_kernels.py 2>&1 | tee "$OUT_DIR/tests.txt"
fi
[ "${PIPESTATUS[0]}" = 0 ] || status=1

if [ -n "${SANITIZE:-}" ]; then
  # what the CPU emulator cannot see: shared-memory races (racecheck) and out-of-bounds or
  # misaligned accesses (memcheck), on the small cases
  step "compute-sanitizer racecheck + memcheck (small cases)"
  if command -v compute-sanitizer >/dev/null; then
    for tool in racecheck memcheck; do
      HATRT_KERNEL_CASES=small timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 1 \
        "$PY" plugins/tests/test_kernels.py 2>&1 | tail -15 | tee "$OUT_DIR/sanitizer_$tool.txt"
      [ "${PIPESTATUS[0]}" = 0 ] || status=1
    done
  else
    echo "skipped: compute-sanitizer not found"
  fi
fi

step "plugin harness (creators + enqueue, no TensorRT builder)"
if [ -x build/plugins_gpu/hatrt_plugin_harness ]; then
  timeout 120 build/plugins_gpu/hatrt_plugin_harness 2>&1 | tail -30 | tee "$OUT_DIR/harness.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
else
  echo "skipped: no TensorRT headers in the build (carry third_party/TensorRT/include)"
fi

step "FP8 GEMM numerics (torch._scaled_mm vs the dequantized matmul; what hatrt quantize's Q/DQ asks of the GPU)"
timeout 120 "$PY" scripts/fp8_gemm_check.py 2>&1 | tail -20 | tee "$OUT_DIR/fp8_gemm.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "benchmark"
# the table goes to bench.txt (and is printed), per-case progress and any error to bench_progress.txt
PYTHONUNBUFFERED=1 timeout 240 "$PY" plugins/bench/bench_kernels.py --out "$OUT_DIR/bench.json" \
  --plot "$OUT_DIR/bench.png" ${QUICK:+--quick} >"$OUT_DIR/bench.txt" 2>"$OUT_DIR/bench_progress.txt"
rc=$?
cat "$OUT_DIR/bench.txt"
if [ "$rc" != 0 ]; then echo "benchmark FAILED (rc $rc)"; tail -20 "$OUT_DIR/bench_progress.txt"; status=1; fi

step "done: status $status"
exit $status
