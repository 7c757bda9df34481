"""The CUDA emulator (plugins/emu) and what runs on it without a GPU.

- The emulator's self-test (plugins/emu/emu_selftest.cu): correct kernels give exact answers in
  both thread orders, mma.sync follows the documented fragment layout; a missing __syncthreads, a
  shuffle with an exited lane, a barrier half the block cannot reach, a misaligned vector load and
  shared memory beyond the opt-in limit are all exposed.
- The plugin harness with its GPU part on the emulator: every plugin created through its creator,
  configured, and enqueued on NaN-poisoned outputs; results equal the launchers bit for bit
  (needs the TensorRT headers, see docs/plugins.md).
The kernels themselves are compared with the PyTorch reference on the emulator by
plugins/tests/test_kernels.py (target "emulated"); tests/test_emu_asan.py and
tests/test_emu_tsan.py run the emulator and those tests again under AddressSanitizer and
ThreadSanitizer.
Needs g++ and the CUDA headers (not nvcc, not a GPU); skipped cleanly otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
EMU = PLUGINS / "emu"
sys.path.insert(0, str(PLUGINS / "tests"))
import kernels_ext

CXX, EMU_FLAGS = kernels_ext.CXX, kernels_ext.EMU_FLAGS
WHY = kernels_ext.emulator_available()
TRT_INCLUDE = kernels_ext.tensorrt_include_dir()
pytestmark = pytest.mark.skipif(WHY is not None, reason=WHY or "")


_run = kernels_ext.run_checked


@pytest.fixture(scope="module")
def emu_objects(tmp_path_factory) -> tuple[Path, list[Path], Path]:
    """(build dir, the kernels compiled for the emulator, the emulator runtime object)."""
    out = tmp_path_factory.mktemp("emu")
    inc = f"-I{kernels_ext.cuda_include()}"
    runtime = out / "cuda_emu.o"
    _run([CXX, *EMU_FLAGS, inc, "-c", EMU / "cuda_emu.cpp", "-o", runtime])
    kernels = []
    for cu in kernels_ext.KERNELS:
        obj = out / f"{cu.stem}.emu.o"
        proc = _run([CXX, *EMU_FLAGS, inc, "-x", "c++", "-include", EMU / "cuda_emu.h", "-c", cu, "-o", obj])
        assert "warning" not in proc.stderr, proc.stderr
        kernels.append(obj)
    return out, kernels, runtime


def test_emulator_selftest(emu_objects):
    out, _, runtime = emu_objects
    exe = out / "emu_selftest"
    _run([CXX, *EMU_FLAGS, f"-I{kernels_ext.cuda_include()}", "-x", "c++", "-include", EMU / "cuda_emu.h",
          EMU / "emu_selftest.cu", "-x", "none", runtime, "-o", exe])
    proc = _run([exe], timeout=120)
    assert proc.stdout.strip().endswith(" 0 failed"), proc.stdout


@pytest.mark.skipif(not (TRT_INCLUDE / "NvInferRuntime.h").exists(), reason=f"TensorRT headers not found in {TRT_INCLUDE}")
def test_plugin_harness_enqueue_emulated(emu_objects):
    """Creators -> plugins -> configurePlugin / getWorkspaceSize / onShapeChange / enqueue, with the
    kernels on the emulator: each plugin's output equals its launcher's, bad shapes are refused."""
    out, kernels, runtime = emu_objects
    sources = [PLUGINS / "common" / "hatrtPluginCommon.cpp", PLUGINS / "common" / "hatrtPlugins.cpp",
               *sorted(PLUGINS.glob("*/*Plugin.cpp")), PLUGINS / "tests" / "plugin_harness.cpp"]
    exe = out / "plugin_harness_emu"
    _run([CXX, *EMU_FLAGS, "-Wno-deprecated-declarations", f"-I{TRT_INCLUDE}", f"-I{kernels_ext.cuda_include()}",
          *sources, *kernels, runtime, "-o", exe])
    proc = _run([exe], timeout=300)
    assert "GPU part: on the CUDA emulator" in proc.stdout, proc.stdout
    assert proc.stdout.strip().endswith(" 0 failed"), proc.stdout


def test_kernel_benchmark_script_smoke(tmp_path):
    """plugins/bench/bench_kernels.py runs end to end (every kind of case once, tiny shapes, on the
    emulator), so GPU time is not lost to a script error. Its times mean nothing here; what is
    checked is that every kernel and case family is there and the derived columns are consistent."""
    import importlib.util
    import json

    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = _run([sys.executable, PLUGINS / "bench" / "bench_kernels.py", "--smoke", "--out", out, "--plot", png],
                timeout=900)
    assert "CUDA emulator" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    kernels = {r["kernel"] for r in rows}
    assert {"attention_tc", "attention_fp32", "indexer_fp4", "indexer_bf16", "indexer_bf16_fp32", "compress_kv",
            "compress_index", "kv_write"} <= kernels
    cases = " | ".join(r["case"] for r in rows)
    for family in ("V4-Flash CSA", "V4-Pro CSA", "V4-Flash HCA", "V4-Pro HCA", "V4-Flash/TP4", "V4-Flash/TP8",
                   "top-1024", "decode", "prefill"):
        assert family in cases, family
    for r in rows:
        assert r["time_us"] > 0 and r["bytes"] > 0, r
        assert r["bound"] in ("memory", "compute"), r
        # the floor is the larger of the two ceilings' times; with unit ceilings it is bytes or FLOPs
        assert r["floor_us"] == max(r["bytes"], r["flops"]) * 1e6, r
    assert not list(tmp_path.glob("*.tmp*")), "temporary files left behind"
    if importlib.util.find_spec("matplotlib"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
