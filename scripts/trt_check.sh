#!/usr/bin/env bash
# One prepared GPU check of the TensorRT path (docs/tensorrt.md), in the spirit of gpu_check.sh.
#
# On a GPU machine WITH TensorRT (python -c "import tensorrt" gives a real TensorRT >= 10.15):
#   1. FP8 GEMM numerics (scripts/fp8_gemm_check.py: torch._scaled_mm vs a dequantized matmul);
#   2. build the plugin library (cmake, sm_90a on Hopper);
#   3. export tiny-flash (per-layer outputs on) and build an engine folder (hatrt build);
#   4. hatrt check ENGINE --backend tensorrt (the engine vs the PyTorch reference, layer by layer);
#   5. a decode benchmark on the engine: batch 1 and 4, CUDA graphs on and off, and the graph
#      replays compared with eager steps (same tokens, same logits).
# On a GPU machine WITHOUT TensorRT (the lent H100/H200 has none): step 1 only, and says so.
# Everything is logged under $OUT (the device tool's output folder) or build/trt_check.
#
#   bash scripts/trt_check.sh
#   TENSORRT_INCLUDE_DIR=/usr/include/x86_64-linux-gnu bash scripts/trt_check.sh   # headers for the plugins
#   QUICK=1 bash scripts/trt_check.sh                                            # fewer steps
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-build/trt_check}"
WORK=build/trt_check_work
mkdir -p "$OUT_DIR" "$WORK"
PY="${PYTHON:-python3}"
JOBS="$(nproc 2>/dev/null || echo 8)"
STEPS="${QUICK:+8}"; STEPS="${STEPS:-32}"
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT_DIR/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
CC="$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 90)"
ARCH="$([ "$CC" = 90 ] && echo 90a || echo "$CC")"
TRT_VERSION="$("$PY" -c "import tensorrt as t; assert hasattr(t, 'Builder'); print(t.__version__)" 2>/dev/null || true)"
echo "TensorRT: ${TRT_VERSION:-not installed}"

step "FP8 GEMM numerics (torch._scaled_mm vs dequantized matmul)"
timeout 300 "$PY" scripts/fp8_gemm_check.py --json "$OUT_DIR/fp8_gemm.json" 2>&1 | tee "$OUT_DIR/fp8_gemm.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

if [ -z "$TRT_VERSION" ]; then
  step "TensorRT steps skipped: no TensorRT on this machine (engine build, hatrt check, decode benchmark)"
  step "done: status $status"
  exit $status
fi

step "plugin library (cmake, arch $ARCH)"
CMAKE_ARGS=(-DCMAKE_BUILD_TYPE=Release -DHATRT_CUDA_ARCHS="$ARCH")
[ -n "${TENSORRT_INCLUDE_DIR:-}" ] && CMAKE_ARGS+=(-DTENSORRT_INCLUDE_DIR="$TENSORRT_INCLUDE_DIR")
[ -z "${TENSORRT_INCLUDE_DIR:-}" ] && [ -d ../shared/third_party/TensorRT/include ] && \
  CMAKE_ARGS+=(-DTENSORRT_INCLUDE_DIR="$(cd ../shared/third_party/TensorRT/include && pwd)")
if cmake -S plugins -B build/plugins "${CMAKE_ARGS[@]}" >"$OUT_DIR/cmake.log" 2>&1 \
   && timeout 400 cmake --build build/plugins -j "$JOBS" --target hatrt_plugins >>"$OUT_DIR/cmake.log" 2>&1 \
   && [ -f build/plugins/libhatrt_plugins.so ]; then
  ls -la build/plugins/libhatrt_plugins.so
else
  echo "plugin build FAILED (see cmake.log)"; tail -30 "$OUT_DIR/cmake.log"; exit 1
fi

step "export tiny-flash"
timeout 600 hatrt export tiny-flash -o "$WORK/tiny-flash" --per-layer --force 2>&1 | tail -3 || { echo "export FAILED"; exit 1; }

step "hatrt build"
timeout 900 hatrt build "$WORK/tiny-flash" -o "$WORK/tiny-flash.engine" --plugins build/plugins/libhatrt_plugins.so \
  --max-batch 4 --max-context 4096 --prefill-chunk 512 --force 2>&1 | tee "$OUT_DIR/build.txt"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "engine build FAILED"; exit 1; }
cp "$WORK/tiny-flash.engine/engine.json" "$OUT_DIR/engine.json"

step "hatrt check --backend tensorrt"
timeout 600 hatrt check "$WORK/tiny-flash.engine" --backend tensorrt --steps "$STEPS" --json "$OUT_DIR/check.json" 2>&1 \
  | tail -40 | tee "$OUT_DIR/check.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "decode benchmark (CUDA graphs on/off; graph replays vs eager)"
timeout 600 "$PY" - "$WORK/tiny-flash.engine" "$OUT_DIR/decode_bench.json" "${QUICK:+64}" <<'EOF' 2>&1 | tee "$OUT_DIR/decode_bench.txt"
import json, sys, time
import torch
from engines.tensorrt_backend import TensorRTBackend

engine_dir, out_json = sys.argv[1], sys.argv[2]
steps = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] else 256
results, ok = [], True
for batch in (1, 4):
    runs = {}
    for graphs in (False, True):
        be = TensorRTBackend(engine_dir, cuda_graphs=graphs)
        g = torch.Generator().manual_seed(batch)
        prompt = torch.randint(0, be.config.vocab_size, (batch, 700), generator=g)
        logits, cache = be.prefill(prompt)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        seen, times = [], []
        torch.cuda.synchronize()
        for i in range(steps):
            t0 = time.perf_counter()
            logits = be.decode(tok, cache)
            tok = logits[:, -1].argmax(-1, keepdim=True)  # greedy: the same tokens when the logits agree
            if i < 16:
                seen.append(logits.cpu())
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        steady = sorted(times[8:])[len(times[8:]) // 2]
        runs[graphs] = (seen, steady, len(be._graphs))
        results.append({"batch": batch, "cuda_graphs": graphs, "median_step_ms": steady * 1e3,
                        "tokens_per_s": batch / steady, "graphs_captured": len(be._graphs)})
        print(f"batch {batch} graphs {'on ' if graphs else 'off'}: {steady * 1e3:.3f} ms/step, "
              f"{batch / steady:.0f} tokens/s, {len(be._graphs)} graphs")
    diff = max(float((a - b).abs().max()) for a, b in zip(runs[False][0], runs[True][0]))
    print(f"batch {batch}: max |graph - eager| logits over 16 steps = {diff:.3e}")
    ok = ok and diff <= 1e-4 and runs[True][2] >= 2
json.dump({"results": results, "passed": ok}, open(out_json, "w"), indent=2)
print("passed" if ok else "FAILED: graph replays differ from eager steps (or no graph was captured)")
sys.exit(0 if ok else 1)
EOF
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "done: status $status"
exit $status
