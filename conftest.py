"""Test-suite wide rules: which tests are `slow`, so `pytest -m "not slow"` is the fast subset.

A test is slow when it needs an ONNX export (a fixture below, ~1 minute each), runs the CUDA
kernels on the emulator or under a sanitizer, compiles with nvcc, or starts a server process; all
of them still run in the default (CI) run.
"""

import pytest

# fixtures that export a model (tests/conftest.py and per-file ones)
EXPORT_FIXTURES = {"flash_export", "dense_fp16_export", "fp8_export", "stdlib_export", "text_export",
                   "export_dir", "trained_export", "server", "ort_server", "tokenizer_export", "ort_backend",
                   "moe_export", "exported"}
# tests that export or compile inline (or reach an export through request.getfixturevalue)
SLOW_TESTS = {"test_export_twins_lint_clean", "test_plugin_library_with_routed_experts_builds_and_harness_passes",
              "test_quant_sim_functions_export_and_onnxruntime_matches_bit_for_bit",
              "test_onnx_moe_with_all_zero_hash_table_matches_eager", "test_interrupted_export_leaves_no_partial_files"}
# whole files of compile / emulator / sanitizer / server work
SLOW_FILES = {"test_emu_asan.py", "test_emu_tsan.py", "test_cuda_emu.py", "test_plugins_build.py", "test_kernels.py",
              "test_triton.py", "test_server.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if (item.path.name in SLOW_FILES or EXPORT_FIXTURES & set(getattr(item, "fixturenames", ()))
                or getattr(item, "originalname", item.name) in SLOW_TESTS or "onnxruntime" in params.values()):
            item.add_marker(pytest.mark.slow)
