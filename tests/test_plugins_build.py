"""Compile checks of the CUDA kernels and TensorRT plugins (plugins/), no GPU needed.

- Skipped cleanly when nvcc is absent.
- Every kernel (plugins/csrc/kernels/*.cu) is compiled for sm_90a (compile only, time-limited);
  HATRT_TEST_ARCHS="90a 80" adds more targets.
- When the public TensorRT headers are present (third_party/TensorRT/include, git-ignored; see
  docs/plugins.md), the plugin sources are compiled against them, linked into the plugin library
  with --no-undefined and WITHOUT libnvinfer (the plugins use only header-defined interfaces), the
  library's exports are checked (getCreators returns the four creators, setLoggerFinder exists), and
  the plugin harness runs its CPU part (creators, fields, type negotiation, serialization).
The comparisons against the PyTorch reference live in plugins/tests/test_kernels.py (on a GPU, run
by scripts/gpu_check.sh, and the same kernels on the CPU emulator in every run);
tests/test_cuda_emu.py self-tests the emulator and runs the plugin harness's enqueue part on it.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
sys.path.insert(0, str(PLUGINS / "tests"))
import kernels_ext  # noqa: E402
KERNELS = sorted((PLUGINS / "csrc" / "kernels").glob("*.cu"))
PLUGIN_SOURCES = [
    PLUGINS / "common" / "hatrtPluginCommon.cpp",
    PLUGINS / "common" / "hatrtPlugins.cpp",
    PLUGINS / "gated_compress" / "gatedCompressPlugin.cpp",
    PLUGINS / "overlap_gated_compress" / "overlapGatedCompressPlugin.cpp",
    PLUGINS / "indexer_topk" / "indexerTopKPlugin.cpp",
    PLUGINS / "hybrid_sparse_attention" / "hybridSparseAttentionPlugin.cpp",
    PLUGINS / "routed_experts" / "routedExpertsPlugin.cpp",
]
TRT_INCLUDE = kernels_ext.tensorrt_include_dir()
ARCHS = os.environ.get("HATRT_TEST_ARCHS", "90a").split()
COMPILE_TIMEOUT = 240


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _cuda_home() -> Path | None:
    """The toolkit root with the CUDA headers (nvcc may be a wrapper script outside it)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if NVCC:
        candidates.append(str(Path(NVCC).resolve().parents[1]))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime_api.h").exists():
            return Path(c)
    return None


NVCC = _nvcc()
CUDA_HOME = _cuda_home()
pytestmark = pytest.mark.skipif(NVCC is None or CUDA_HOME is None, reason="nvcc / CUDA headers not found")


def _run(cmd: list[str], timeout: int = COMPILE_TIMEOUT) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"timed out after {timeout} s: {' '.join(cmd)}")
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _cuda_include() -> list[str]:
    inc = [CUDA_HOME / "include", CUDA_HOME / "targets" / "x86_64-linux" / "include"]
    return [f"-I{p}" for p in inc if p.exists()]


def _cudart_dir() -> Path:
    for d in (CUDA_HOME / "lib64", CUDA_HOME / "lib", CUDA_HOME / "targets" / "x86_64-linux" / "lib"):
        if (d / "libcudart.so").exists():
            return d
    pytest.skip("libcudart.so not found next to nvcc")


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("plugins_build")


_objects: dict[str, Path] = {}


def _compile_kernel(src: Path, arch: str, out_dir: Path) -> Path:
    key = f"{src.name}:{arch}"
    if key not in _objects:
        obj = out_dir / f"{src.stem}.sm_{arch}.o"
        _run([NVCC, "-std=c++17", "-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xcompiler", "-fPIC",
              "-Xcompiler", "-fvisibility=hidden", f"-I{PLUGINS / 'csrc' / 'include'}", "-c", str(src), "-o", str(obj)])
        _objects[key] = obj
    return _objects[key]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", KERNELS, ids=[k.stem for k in KERNELS])
def test_kernel_compiles(src, arch, build_dir):
    obj = _compile_kernel(src, arch, build_dir)
    assert obj.stat().st_size > 0


def test_kernel_api_is_plain_cpp(build_dir):
    """The launcher header needs neither torch nor TensorRT: a plain C++ file can include it."""
    cpp = build_dir / "api.cpp"
    cpp.write_text('#include "hatrt/kernels.h"\nint main() { hatrt::SparseAttentionParams p; '
                   "return hatrt::entry584::kBytes == 584 && p.D == 0 ? 0 : 1; }\n")
    _run(["g++", "-std=c++17", "-fsyntax-only", f"-I{PLUGINS / 'csrc' / 'include'}", *_cuda_include(), str(cpp)])


def test_gpu_selftest_compiles(build_dir):
    """scripts/gpu_check.sh's first GPU step builds plugins/emu/emu_selftest.cu with nvcc (it checks
    the mma fragment layout on the hardware): a compile error there would waste the GPU time."""
    obj = build_dir / "emu_selftest.sm_90a.o"
    _run([NVCC, "-std=c++17", "-O2", "-gencode=arch=compute_90a,code=sm_90a", f"-I{PLUGINS / 'csrc' / 'include'}",
          "-c", str(PLUGINS / "emu" / "emu_selftest.cu"), "-o", str(obj)])
    assert obj.stat().st_size > 0


def test_torch_binding_gpu_branch_compiles(build_dir):
    """The GPU build of the torch binding (plugins/tests/torch_ext.cpp without HATRT_CUDA_EMU: CUDA
    guard, current stream) compiles; CI only ever builds its emulated branch. A CPU torch wheel
    ships c10/cuda but not its generated cmake-macros header, which a one-line stand-in replaces."""
    import sysconfig

    from torch.utils import cpp_extension

    stub = build_dir / "stub_include" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    torch_inc = [f"-I{p}" for p in cpp_extension.include_paths()]
    _run(["g++", "-std=c++20", "-fsyntax-only", "-w", *torch_inc, f"-I{build_dir / 'stub_include'}",
          f"-I{sysconfig.get_paths()['include']}", f"-I{PLUGINS / 'csrc' / 'include'}", *_cuda_include(),
          "-DTORCH_EXTENSION_NAME=hatrt_kernels_ext", str(PLUGINS / "tests" / "torch_ext.cpp")])


needs_trt = pytest.mark.skipif(not (TRT_INCLUDE / "NvInferRuntime.h").exists(),
                               reason=f"TensorRT headers not found in {TRT_INCLUDE}")


def _plugin_cflags() -> list[str]:
    return ["-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-deprecated-declarations",
            f"-I{TRT_INCLUDE}", f"-I{PLUGINS / 'csrc' / 'include'}", *_cuda_include()]


@needs_trt
def test_plugin_library(build_dir):
    """Plugin sources compile against the public headers; the library links with --no-undefined
    and without libnvinfer; it exports getCreators (4 creators) and setLoggerFinder."""
    objs = []
    for src in PLUGIN_SOURCES:
        obj = build_dir / f"{src.stem}.o"
        proc = _run(["g++", *_plugin_cflags(), "-c", str(src), "-o", str(obj)])
        assert "warning" not in proc.stderr, proc.stderr
        objs.append(obj)
    kernels = [_compile_kernel(k, ARCHS[0], build_dir) for k in KERNELS]
    lib = build_dir / "libhatrt_plugins.so"
    cudart = _cudart_dir()
    _run(["g++", "-shared", "-o", str(lib), *map(str, objs), *map(str, kernels), "-Wl,--no-undefined",
          f"-Wl,--version-script={PLUGINS / 'common' / 'hatrt_plugins.map'}", f"-L{cudart}", "-lcudart", f"-Wl,-rpath,{cudart}"])
    handle = ctypes.CDLL(str(lib))
    count = ctypes.c_int32(0)
    handle.getCreators.restype = ctypes.c_void_p
    assert handle.getCreators(ctypes.byref(count))
    assert count.value == 5  # one creator per hatrt op
    assert hasattr(handle, "setLoggerFinder")
    nm = shutil.which("nm")
    if nm:
        exported = subprocess.run([nm, "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout.split()
        assert sorted(s for s in exported if s in ("getCreators", "setLoggerFinder")) == ["getCreators", "setLoggerFinder"]
        assert len([line for line in exported if line in ("T", "W", "u", "D", "B")]) == 2, exported


@needs_trt
def test_plugin_harness_cpu(build_dir):
    """Creators, fields, type negotiation and serialization through the real interfaces."""
    lib = build_dir / "libhatrt_plugins.so"
    if not lib.exists():
        test_plugin_library(build_dir)
    kernels = [_compile_kernel(k, ARCHS[0], build_dir) for k in KERNELS]
    exe = build_dir / "hatrt_plugin_harness"
    cudart = _cudart_dir()
    _run(["g++", *_plugin_cflags(), str(PLUGINS / "tests" / "plugin_harness.cpp"), *map(str, kernels), str(lib),
          "-o", str(exe), f"-L{cudart}", "-lcudart", f"-Wl,-rpath,{cudart}:{build_dir}"])
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " 0 failed" in proc.stdout
