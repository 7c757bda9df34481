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
import sys
import time
from pathlib import Path

PLUGINS = Path(__file__).resolve().parents[1]
ROOT = PLUGINS.parent
CSRC = PLUGINS / "csrc"
EMU = PLUGINS / "emu"
KERNELS = sorted((CSRC / "kernels").glob("*.cu"))
BINDING = PLUGINS / "tests" / "torch_ext.cpp"

_EXT: dict[bool, object] = {}


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


def load(emulate: bool = False, verbose: bool = False):
    """The compiled extension module (built once per process, cached on disk by torch)."""
    if emulate in _EXT:
        return _EXT[emulate]
    import torch
    from torch.utils import cpp_extension

    os.environ.setdefault("MAX_JOBS", str(min(8, os.cpu_count() or 1)))
    if emulate:
        why = emulator_available()
        if why:
            raise RuntimeError(f"cannot build the emulated kernels: {why}")
        build = ROOT / "build" / "torch_ext_emu"
        build.mkdir(parents=True, exist_ok=True)
        _EXT[emulate] = cpp_extension.load(
            name="hatrt_kernels_emu",
            sources=[str(BINDING), str(EMU / "cuda_emu.cpp"), *map(str, _emulated_sources(build))],
            extra_include_paths=[str(CSRC / "include"), str(EMU), str(cuda_include())],
            extra_cflags=["-O2", "-DHATRT_CUDA_EMU", "-Wno-unknown-pragmas"],
            build_directory=str(build),
            verbose=verbose,
        )
        return _EXT[emulate]
    if not torch.cuda.is_available():
        raise RuntimeError("the kernel extension needs a CUDA device (or load(emulate=True))")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list()
    build = ROOT / "build" / "torch_ext"
    build.mkdir(parents=True, exist_ok=True)
    _EXT[emulate] = cpp_extension.load(
        name="hatrt_kernels_ext",
        sources=[str(BINDING), *map(str, KERNELS)],
        extra_include_paths=[str(CSRC / "include")],
        extra_cflags=["-O2"],
        extra_cuda_cflags=["-O3", "-lineinfo"],  # torch picks the C++ standard (C++20 in 2.1x)
        build_directory=str(build),
        verbose=verbose,
    )
    return _EXT[emulate]


if __name__ == "__main__":
    emulate = "--emulate" in sys.argv
    t0 = time.time()
    load(emulate=emulate, verbose="-v" in sys.argv)
    target = "the CUDA emulator (CPU)" if emulate else arch_list()
    print(f"hatrt kernels extension ready for {target} in {time.time() - t0:.1f} s")
