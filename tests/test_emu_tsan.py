"""The CUDA emulator and the kernels on it under ThreadSanitizer: accesses by two threads of a block, one writing, with no barrier between them (what compute-sanitizer's racecheck finds on a GPU), without a GPU. The checks: plugins/tests/emu_sanitizers.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "tests"))
import emu_sanitizers

KIND = "thread"
pytestmark = pytest.mark.skipif(emu_sanitizers.skip_reason(KIND) is not None,
                                reason=emu_sanitizers.skip_reason(KIND) or "")


def test_emulator_under_tsan(tmp_path):
    """Planted bugs reported naming their kernel; a clean kernel and the self-test raise nothing
    false."""
    emu_sanitizers.check_emulator(KIND, tmp_path)


def test_kernels_under_tsan(tmp_path):
    """The emulated kernel tests pass under the sanitizer with no report."""
    emu_sanitizers.check_kernels(KIND, tmp_path)
