"""Build and load the torch extension that exposes the kernel launchers (GPU machines only).

    python plugins/tests/kernels_ext.py          # build (or reuse) and print the build time

The extension is plugins/tests/torch_ext.cpp + plugins/csrc/kernels/*.cu, built by
torch.utils.cpp_extension.load for the GPU in the machine (sm_90a on Hopper, else its own arch) into
build/torch_ext/. It is a test and benchmark harness only: the product is the plain C++ launcher
library (plugins/CMakeLists.txt), which needs neither torch nor TensorRT.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

PLUGINS = Path(__file__).resolve().parents[1]
ROOT = PLUGINS.parent
CSRC = PLUGINS / "csrc"
SOURCES = [PLUGINS / "tests" / "torch_ext.cpp", *sorted((CSRC / "kernels").glob("*.cu"))]

_EXT = None


def arch_list() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return "9.0a" if (major, minor) == (9, 0) else f"{major}.{minor}"


def load(verbose: bool = False):
    """The compiled extension module (built once per process, cached on disk by torch)."""
    global _EXT
    if _EXT is not None:
        return _EXT
    import torch
    from torch.utils import cpp_extension

    if not torch.cuda.is_available():
        raise RuntimeError("the kernel extension needs a CUDA device")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list()
    os.environ.setdefault("MAX_JOBS", str(min(8, os.cpu_count() or 1)))
    build = ROOT / "build" / "torch_ext"
    build.mkdir(parents=True, exist_ok=True)
    _EXT = cpp_extension.load(
        name="hatrt_kernels_ext",
        sources=[str(s) for s in SOURCES],
        extra_include_paths=[str(CSRC / "include")],
        extra_cflags=["-O2"],
        extra_cuda_cflags=["-O3", "-lineinfo"],  # torch picks the C++ standard (C++20 in 2.1x)
        build_directory=str(build),
        verbose=verbose,
    )
    return _EXT


if __name__ == "__main__":
    t0 = time.time()
    load(verbose="-v" in sys.argv)
    print(f"hatrt_kernels_ext ready for {arch_list()} in {time.time() - t0:.1f} s")
