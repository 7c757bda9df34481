"""Build and load the torch extension that exposes the kernel launchers.

    python plugins/tests/kernels_ext.py            # GPU build (or reuse) and print the build time
    python plugins/tests/kernels_ext.py --emulate  # CPU build: the same kernels on the CUDA emulator

The extension is plugins/tests/torch_ext.cpp + plugins/csrc/kernels/*.cu, built by
torch.utils.cpp_extension.load into build/torch_ext/ (GPU: sm_90a on Hopper, else the card's own
arch) or build/torch_ext_emu/ (emulated: every .cu compiled by the host compiler with
plugins/emu/cuda_emu.h, CPU tensors in and out; needs only g++ and the CUDA headers). It is a test
and benchmark harness only: the product is the plain C++ launcher library (plugins/CMakeLists.txt),
which needs neither torch nor TensorRT.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PLUGINS = Path(__file__).resolve().parents[1]
ROOT = PLUGINS.parent
CSRC = PLUGINS / "csrc"
EMU = PLUGINS / "emu"
KERNELS = sorted((CSRC / "kernels").glob("*.cu"))
BINDING = PLUGINS / "tests" / "torch_ext.cpp"

_EXT: dict[tuple, object] = {}

CXX = shutil.which("g++") or shutil.which("c++")
#: host-compiler flags for a standalone program on the emulator (the self-tests, the plugin harness):
#: g++ *EMU_FLAGS -I<cuda include> -x c++ -include plugins/emu/cuda_emu.h kernel.cu plugins/emu/cuda_emu.cpp
EMU_FLAGS = ["-std=c++17", "-O2", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-DHATRT_CUDA_EMU",
             f"-I{EMU}", f"-I{CSRC / 'include'}"]


def tensorrt_include_dir() -> Path:
    """The public TensorRT headers: $TENSORRT_INCLUDE_DIR, else third_party/TensorRT/include in the
    repository (a hand-fetched copy), else the shared/ folder beside the checkout (CI has it there)."""
    env = os.environ.get("TENSORRT_INCLUDE_DIR")
    if env:
        return Path(env)
    for cand in (ROOT / "third_party" / "TensorRT" / "include", ROOT.parent / "shared" / "third_party" / "TensorRT" / "include"):
        if (cand / "NvInferRuntime.h").exists():
            return cand
    return ROOT / "third_party" / "TensorRT" / "include"


def run_checked(cmd: list, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a build or test command; fail (AssertionError, for the tests) with its output unless it exits 0."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def arch_list() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return "9.0a" if (major, minor) == (9, 0) else f"{major}.{minor}"


def cuda_include() -> Path | None:
    """The CUDA toolkit's include folder (the emulated build needs its headers, not its compiler)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(str(Path(nvcc).resolve().parents[1]))
    for home in homes:
        if home and (Path(home) / "include" / "cuda_runtime_api.h").exists():
            return Path(home) / "include"
    return None


def emulator_available() -> str | None:
    """None when the emulated extension can be built here, else why not."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        return "no C++ compiler"
    if cuda_include() is None:
        return "CUDA headers (cuda_runtime_api.h) not found; set CUDA_HOME"
    return None


def _emulated_sources(build: Path) -> list[Path]:
    """One wrapper per kernel file (each keeps its own anonymous namespace): the emulator header,
    then the unchanged .cu source."""
    out = []
    for cu in KERNELS:
        wrapper = build / f"emu_{cu.stem}.cpp"
        text = f'#include "cuda_emu.h"\n#include "{cu}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        out.append(wrapper)
    return out


SANITIZERS = {"address": "libasan.so", "thread": "libtsan.so"}


def sanitizer_runtime(kind: str) -> str | None:
    """The host compiler's runtime library of a sanitizer ("address", "thread"), to LD_PRELOAD into
    the Python that loads a sanitized build; None when the compiler has none."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None
    out = subprocess.run([cxx, f"-print-file-name={SANITIZERS[kind]}"], capture_output=True, text=True).stdout.strip()
    return out if out and os.path.isabs(out) and os.path.exists(out) else None


def load(emulate: bool = False, verbose: bool = False, sanitize: str | None = None):
    """The compiled extension module (built once per process, cached on disk by torch).

    sanitize (emulated only; default: the HATRT_EMU_SANITIZE environment variable) builds the
    kernels and the emulator with a sanitizer: "address" (AddressSanitizer: an out-of-bounds access
    to a tensor, to dynamic or static shared memory or to a thread's stack is reported) or "thread"
    (ThreadSanitizer: two threads of a block touching the same memory, one of them writing, with no
    barrier between them is reported; plugins/emu/cuda_emu.cpp says which orderings count). The
    process must start with the runtime preloaded (LD_PRELOAD=sanitizer_runtime(kind); for ASan
    also ASAN_OPTIONS=detect_leaks=0): tests/test_cuda_emu.py does that."""
    if emulate and sanitize is None:
        sanitize = os.environ.get("HATRT_EMU_SANITIZE") or None
    if sanitize not in (None, *SANITIZERS):
        raise ValueError(f"sanitize must be None, 'address' or 'thread', not {sanitize!r}")
    key = (emulate, sanitize)
    if key in _EXT:
        return _EXT[key]
    import torch
    from torch.utils import cpp_extension

    os.environ.setdefault("MAX_JOBS", str(min(8, os.cpu_count() or 1)))
    if emulate:
        why = emulator_available()
        if why:
            raise RuntimeError(f"cannot build the emulated kernels: {why}")
        if sanitize:
            # this process has the runtime preloaded already; the compiler and ninja must not (under
            # TSan they fail)
            os.environ.pop("LD_PRELOAD", None)
        suffix = {None: "", "address": "_asan", "thread": "_tsan"}[sanitize]
        flags = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g"] if sanitize else []
        build = ROOT / "build" / f"torch_ext_emu{suffix}"
        build.mkdir(parents=True, exist_ok=True)
        _EXT[key] = cpp_extension.load(
            name=f"hatrt_kernels_emu{suffix}",
            sources=[str(BINDING), str(EMU / "cuda_emu.cpp"), *map(str, _emulated_sources(build))],
            extra_include_paths=[str(CSRC / "include"), str(EMU), str(cuda_include())],
            extra_cflags=["-O2", "-DHATRT_CUDA_EMU", "-Wno-unknown-pragmas", *flags],
            extra_ldflags=flags,
            build_directory=str(build),
            verbose=verbose,
        )
        return _EXT[key]
    if sanitize:
        raise ValueError("sanitize applies to the emulated build (on a GPU: compute-sanitizer, scripts/gpu_check.sh)")
    if not torch.cuda.is_available():
        raise RuntimeError("the kernel extension needs a CUDA device (or load(emulate=True))")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list()
    build = ROOT / "build" / "torch_ext"
    build.mkdir(parents=True, exist_ok=True)
    _EXT[key] = cpp_extension.load(
        name="hatrt_kernels_ext",
        sources=[str(BINDING), *map(str, KERNELS)],
        extra_include_paths=[str(CSRC / "include")],
        extra_cflags=["-O2"],
        extra_cuda_cflags=["-O3", "-lineinfo"],  # torch picks the C++ standard (C++20 in 2.1x)
        build_directory=str(build),
        verbose=verbose,
    )
    return _EXT[key]


if __name__ == "__main__":
    emulate = "--emulate" in sys.argv
    t0 = time.time()
    load(emulate=emulate, verbose="-v" in sys.argv)
    target = "the CUDA emulator (CPU)" if emulate else arch_list()
    print(f"hatrt kernels extension ready for {target} in {time.time() - t0:.1f} s")
