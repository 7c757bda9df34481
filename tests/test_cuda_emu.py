"""The CUDA emulator (plugins/emu) and what runs on it without a GPU.

- The emulator's self-test (plugins/emu/emu_selftest.cu): correct kernels give exact answers in
  both thread orders, mma.sync follows the documented fragment layout; a missing __syncthreads, a
  shuffle with an exited lane, a barrier half the block cannot reach, a misaligned vector load and
  shared memory beyond the opt-in limit are all exposed.
- The emulator under AddressSanitizer (plugins/emu/asan_selftest.cu): planted out-of-bounds
  accesses to a tensor, to dynamic and static shared memory and to a thread-local array are
  reported; correct kernels and the whole self-test run clean. Then every kernel test of
  plugins/tests/test_kernels.py (target "emulated", small cases) again under ASan: the
  out-of-bounds reads and writes that a GPU run would need compute-sanitizer's memcheck for.
- The plugin harness with its GPU part on the emulator: every plugin created through its creator,
  configured, and enqueued on NaN-poisoned outputs; results equal the launchers bit for bit
  (needs the TensorRT headers, see docs/plugins.md).
The kernels themselves are compared with the PyTorch reference on the emulator by
plugins/tests/test_kernels.py (target "emulated").
Needs g++ and the CUDA headers (not nvcc, not a GPU); skipped cleanly otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
EMU = PLUGINS / "emu"
sys.path.insert(0, str(PLUGINS / "tests"))
import kernels_ext

CXX = shutil.which("g++") or shutil.which("c++")
WHY = kernels_ext.emulator_available()
TRT_INCLUDE = Path(os.environ.get("TENSORRT_INCLUDE_DIR", ROOT / "third_party" / "TensorRT" / "include"))
pytestmark = pytest.mark.skipif(WHY is not None, reason=WHY or "")

EMU_FLAGS = ["-std=c++17", "-O2", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-DHATRT_CUDA_EMU",
             f"-I{EMU}", f"-I{PLUGINS / 'csrc' / 'include'}"]


def _run(cmd: list, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


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


ASAN = kernels_ext.asan_runtime()
needs_asan = pytest.mark.skipif(ASAN is None, reason="the compiler has no AddressSanitizer runtime (libasan.so)")
ASAN_ENV = {"ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1", "LD_PRELOAD": ASAN or ""}


@pytest.fixture(scope="module")
def asan_runtime_object(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emu_asan")
    runtime = out / "cuda_emu.o"
    _run([CXX, *EMU_FLAGS, "-g", "-fsanitize=address", "-fno-omit-frame-pointer", f"-I{kernels_ext.cuda_include()}",
          "-c", EMU / "cuda_emu.cpp", "-o", runtime])
    return runtime


def _asan_program(runtime: Path, source: Path) -> Path:
    exe = runtime.parent / source.stem
    _run([CXX, *EMU_FLAGS, "-g", "-fsanitize=address", "-fno-omit-frame-pointer", f"-I{kernels_ext.cuda_include()}",
          "-x", "c++", "-include", EMU / "cuda_emu.h", source, "-x", "none", runtime, "-o", exe])
    return exe


@needs_asan
def test_emulator_under_address_sanitizer(asan_runtime_object):
    """Under ASan the emulator's fiber switches cause no false reports (the self-test, with its
    deadlocks and faults, and a clean kernel pass), and each planted overrun is reported with the
    kernel's source line."""
    env = {**os.environ, "ASAN_OPTIONS": ASAN_ENV["ASAN_OPTIONS"]}
    selftest = _asan_program(asan_runtime_object, EMU / "emu_selftest.cu")
    proc = subprocess.run([selftest], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "ERROR: AddressSanitizer" not in proc.stderr, proc.stderr[-4000:]
    assert proc.stdout.strip().endswith(" 0 failed"), proc.stdout
    exe = _asan_program(asan_runtime_object, EMU / "asan_selftest.cu")
    proc = subprocess.run([exe, "clean"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and "ERROR: AddressSanitizer" not in proc.stderr, proc.stderr[-4000:]
    for case, kind, kernel in (("global", "heap-buffer-overflow", "global_kernel"),
                               ("dynamic-smem", "heap-buffer-overflow", "dynamic_smem_kernel"),
                               ("static-smem", "global-buffer-overflow", "static_smem_kernel"),
                               ("stack", "stack-buffer-overflow", "stack_kernel")):
        proc = subprocess.run([exe, case], capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode != 0, f"{case}: not reported\n{proc.stdout}\n{proc.stderr[-2000:]}"
        assert f"ERROR: AddressSanitizer: {kind}" in proc.stderr, f"{case}\n{proc.stderr[-4000:]}"
        assert kernel in proc.stderr, f"{case}: the report does not name the kernel\n{proc.stderr[-4000:]}"


@needs_asan
def test_kernels_under_address_sanitizer(tmp_path):
    """plugins/tests/test_kernels.py (target "emulated", HATRT_KERNEL_CASES=small) with the kernels
    and the emulator built with AddressSanitizer (kernels_ext.load(sanitize="address")): every read
    and write of every kernel stays inside its tensors, its shared memory and its stack. Reports go
    to files (pytest's output capture would swallow a report that ends the process)."""
    log = tmp_path / "asan"
    env = {**os.environ, **ASAN_ENV, "HATRT_EMU_SANITIZE": "address", "HATRT_KERNEL_CASES": "small",
           "ASAN_OPTIONS": f"{ASAN_ENV['ASAN_OPTIONS']}:log_path={log}"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(PLUGINS / "tests" / "test_kernels.py"),
           "-k", "emulated"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env, cwd=ROOT)
    reports = [f.read_text() for f in sorted(tmp_path.glob("asan*"))]
    errors = [r for r in reports if "ERROR: AddressSanitizer" in r]
    assert not errors, errors[0][-6000:]
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-3000:]


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
