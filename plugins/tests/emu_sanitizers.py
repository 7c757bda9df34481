"""The checks of the CUDA emulator and the emulated kernels under a sanitizer, shared by
tests/test_emu_asan.py and tests/test_emu_tsan.py (two files, so a parallel test run can run them
side by side). kind: "address" (AddressSanitizer) or "thread" (ThreadSanitizer).

- check_emulator: plugins/emu/sanitizer_selftest.cu's planted bugs (ASan: out-of-bounds accesses
  to a tensor, to dynamic and static shared memory and to a thread-local array; TSan: a missing
  __syncthreads and a missing __syncwarp) are each reported naming the kernel; a correct kernel and
  the emulator's self-test run clean (under TSan the self-test reports only the race it plants).
- check_kernels: plugins/tests/test_kernels.py (target "emulated") with the kernels and the emulator
  built with the sanitizer (kernels_ext.load(sanitize=kind)): ASan on the small cases, TSan on one
  case per kernel path (it is about 10x slower). No report may appear.
How the emulator declares CUDA's orderings to TSan: plugins/emu/README.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import kernels_ext

PLUGINS = Path(__file__).resolve().parents[1]
ROOT = PLUGINS.parent
EMU = PLUGINS / "emu"
CXX, EMU_FLAGS = kernels_ext.CXX, kernels_ext.EMU_FLAGS


_run = kernels_ext.run_checked


def skip_reason(kind: str) -> str | None:
    """Why the checks cannot run here, or None."""
    why = kernels_ext.emulator_available()
    if why:
        return why
    return None if SANITIZER_RUNTIME[kind] else f"the compiler has no {kind} sanitizer runtime"


SANITIZER_RUNTIME = {kind: kernels_ext.sanitizer_runtime(kind) for kind in ("address", "thread")}
SANITIZER_OPTIONS = {"address": ("ASAN_OPTIONS", "detect_leaks=0:halt_on_error=1"), "thread": ("TSAN_OPTIONS", "")}
SANITIZER_REPORT = {"address": "ERROR: AddressSanitizer", "thread": "WARNING: ThreadSanitizer"}
# planted bugs of plugins/emu/sanitizer_selftest.cu: (case, the report's kind, the kernel it names)
PLANTED = {
    "address": (("global", "heap-buffer-overflow", "global_kernel"),
                ("dynamic-smem", "heap-buffer-overflow", "dynamic_smem_kernel"),
                ("static-smem", "global-buffer-overflow", "static_smem_kernel"),
                ("stack", "stack-buffer-overflow", "stack_kernel")),
    "thread": (("race", "data race", "race_kernel"),
               ("warp-race", "data race", "warp_race_kernel")),
}
def _compile(kind: str) -> list:
    """The compiler command for an emulated program built with the sanitizer."""
    return [CXX, *EMU_FLAGS, "-g", f"-fsanitize={kind}", "-fno-omit-frame-pointer", f"-I{kernels_ext.cuda_include()}"]


def _sanitized_program(out: Path, kind: str, runtime: Path, source: Path) -> Path:
    exe = out / f"{source.stem}_{kind}"
    _run([*_compile(kind), "-x", "c++", "-include", EMU / "cuda_emu.h", source, "-x", "none", runtime, "-o", exe])
    return exe


def _sanitized_run(exe: Path, kind: str, log: Path, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    """Run exe with the sanitizer's reports written to files under log (returned joined)."""
    var, options = SANITIZER_OPTIONS[kind]
    env = {**os.environ, var: f"{options}:log_path={log}".lstrip(":")}
    proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=300, env=env)
    reports = "".join(f.read_text() for f in sorted(log.parent.glob(log.name + "*")))
    for f in log.parent.glob(log.name + "*"):
        f.unlink()
    return proc, reports


def check_emulator(kind: str, tmp_path: Path) -> None:
    """The emulator built with AddressSanitizer / ThreadSanitizer: its fiber switches cause no
    false reports (a clean kernel; the self-test, with its deadlocks and faults, reports only the
    race it plants on purpose under TSan), and each planted bug is reported naming its kernel."""
    runtime = tmp_path / "cuda_emu.o"
    _run([*_compile(kind), "-c", EMU / "cuda_emu.cpp", "-o", runtime])
    log = tmp_path / "report"
    selftest = _sanitized_program(tmp_path, kind, runtime, EMU / "emu_selftest.cu")
    proc, reports = _sanitized_run(selftest, kind, log)
    assert proc.stdout.strip().endswith(" 0 failed"), proc.stdout + reports[-4000:]
    if kind == "address":
        assert proc.returncode == 0 and SANITIZER_REPORT[kind] not in reports, reports[-4000:]
    else:  # only the self-test's missing_barrier kernel races (it shows the emulator exposes that)
        frames = [r.split("#0 ", 1)[1].split()[0] for r in reports.split("WARNING: ThreadSanitizer")[1:]]
        assert frames and set(frames) == {"missing_barrier"}, reports[-4000:]
    exe = _sanitized_program(tmp_path, kind, runtime, EMU / "sanitizer_selftest.cu")
    proc, reports = _sanitized_run(exe, kind, log, "clean")
    assert proc.returncode == 0 and SANITIZER_REPORT[kind] not in reports, proc.stdout + reports[-4000:]
    for case, what, kernel in PLANTED[kind]:
        proc, reports = _sanitized_run(exe, kind, log, case)
        assert proc.returncode != 0, f"{case}: not reported\n{proc.stdout}\n{reports[-2000:]}"
        assert f"{SANITIZER_REPORT[kind]}: {what}" in reports, f"{case}\n{reports[-4000:]}"
        assert kernel in reports, f"{case}: the report does not name the kernel\n{reports[-4000:]}"


def check_kernels(kind: str, tmp_path: Path) -> None:
    """plugins/tests/test_kernels.py (target "emulated") with the kernels and the emulator built
    with a sanitizer (kernels_ext.load(sanitize=kind)). AddressSanitizer, small cases: every read
    and write of every kernel stays inside its tensors, its shared memory and its stack.
    ThreadSanitizer, one case per kernel path (HATRT_KERNEL_CASES=tiny; it is 10x slower): no two
    threads of a block touch the same memory, one writing, without a barrier between them.
    Reports go to files (pytest's capture would swallow a report that ends the process)."""
    var, options = SANITIZER_OPTIONS[kind]
    log = tmp_path / "report"
    env = {**os.environ, "LD_PRELOAD": SANITIZER_RUNTIME[kind], "HATRT_EMU_SANITIZE": kind,
           "HATRT_KERNEL_CASES": "small" if kind == "address" else "tiny", "OMP_NUM_THREADS": "1",
           var: f"{options}:log_path={log}".lstrip(":")}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(PLUGINS / "tests" / "test_kernels.py"),
           "-k", "emulated"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env, cwd=ROOT)
    reports = [f.read_text() for f in sorted(tmp_path.glob("report*"))]
    errors = [r for r in reports if SANITIZER_REPORT[kind] in r]
    assert not errors, errors[0][-6000:]
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-3000:]
