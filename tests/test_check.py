"""`hatrt check`: an export against the PyTorch reference through Polygraphy runners.

Uses the session's shared tiny-flash export (fp32, per-layer outputs); the only other artifact is
a copy with one layer-2 weight scaled in step.onnx (no second export)."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("polygraphy")

from engines.check import CheckReport, check, format_report  # noqa: E402
from engines.cli import main  # noqa: E402

CORRUPTED = "model.layers.2.attn.wo_b.weight"  # layer 2 (CSA): its attention output projection


@pytest.fixture(scope="module")
def good_report(flash_export) -> CheckReport:
    """The default scenario: random prompts of 200 and 300 tokens, 32 decode steps each."""
    t = time.perf_counter()
    report = check(flash_export, steps=32, seed=0)
    print(f"\ncheck on the good export: {time.perf_counter() - t:.1f} s\n{format_report(report)}")
    return report


@pytest.fixture(scope="module")
def corrupted_export(flash_export, tmp_path_factory):
    """A copy of the export with one layer-2 initializer of step.onnx scaled by 1.01, its manifest
    updated to the new file (an export that is consistent but computes something else)."""
    import onnx
    from onnx import numpy_helper

    from exporter.contract import file_record

    out = tmp_path_factory.mktemp("corrupted") / "tiny-flash"
    shutil.copytree(flash_export, out)
    model = onnx.load(str(out / "step.onnx"))
    hits = [t for t in model.graph.initializer if t.name == CORRUPTED]
    assert len(hits) == 1, f"step.onnx: initializer {CORRUPTED} not found"
    scaled = numpy_helper.to_array(hits[0]) * np.float32(1.01)
    hits[0].CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), CORRUPTED))
    onnx.save(model, str(out / "step.onnx"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["step.onnx"] = file_record(out / "step.onnx")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


# ---------------------------------------------------------------------------- the good export
def test_good_export_passes(good_report):
    r = good_report
    assert r.passed, format_report(r)
    assert r.per_layer and r.first_diverging_layer is None and r.first_failure is None
    assert r.prompt_lengths == [200, 300] and r.steps == 32
    assert (r.rtol, r.atol) == (1e-5, 1e-5) and r.chunk_size == 128  # fp32 defaults
    # every output of the graph was compared, on every step: prefill chunks (200 = 128 + 72,
    # 300 = 128 + 128 + 44) and 2 x 32 decode steps
    assert len(r.group("logits")) == 1 and len(r.group("layers")) == 4 and len(r.group("cache")) == 18
    for s in r.outputs.values():
        assert s.steps == 2 + 3 + 64 and s.failed_steps == 0 and s.comparator_passed and not s.nan, s
        assert s.max_rel <= 1e-5, s
    for name in ("new_cache.pos", "new_cache.layer2.window_pos"):  # integers: exact
        assert r.outputs[name].max_abs == 0
    assert r.logits.positions == 200 + 300 + 2 * 32  # every prefill position and decode step
    assert r.logits.top1_agreement == 1.0 and r.logits.top5_set_agreement == 1.0
    assert r.logits.min_cosine > 1 - 1e-9
    json.dumps(r.to_dict())  # machine-readable as it is
    print("max errors (abs / rel to max|ref|): " + ", ".join(
        f"{n} {s.max_abs:.2g}/{s.max_rel:.2g}" for n, s in r.outputs.items() if s.group != "cache"),
        f"; cache max rel {max(s.max_rel for s in r.group('cache')):.2g}")


def test_cli_good_export(flash_export, tmp_path):
    out = tmp_path / "check.json"
    ids = tmp_path / "prompt.txt"
    ids.write_text(" ".join(str(i % 500) for i in range(131)))
    result = CliRunner().invoke(main, ["check", str(flash_export), "--steps", "6", "--prompt-ids", "1 2 3 4 5",
                                       "--prompt-ids", f"@{ids}", "--chunk-size", "100", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.stdout and "logits" in result.stdout and "layer2.streams (CSA)" in result.stdout
    assert "first diverging layer: none" in result.stdout
    assert "prompt 1: prefill 131 tokens in chunks of 100" in result.stderr  # progress lines go to stderr
    data = json.loads(out.read_text())
    assert data["passed"] is True and data["prompt_lengths"] == [5, 131] and data["steps"] == 6
    assert data["chunk_size"] == 100
    # prefill: 1 chunk + 2 chunks (100 + 31), then 6 decode steps per prompt
    assert data["outputs"]["logits"]["steps"] == 1 + 2 + 2 * 6 and data["first_diverging_layer"] is None
    assert data["logits"]["positions"] == 5 + 131 + 2 * 6


# ---------------------------------------------------------------------------- a corrupted copy
def test_corrupted_export_names_the_first_diverging_layer(corrupted_export):
    result = CliRunner().invoke(main, ["check", str(corrupted_export), "--steps", "2", "--json",
                                       str(corrupted_export / "check.json")])
    assert result.exit_code == 1, result.output
    assert "first diverging layer: layer 2 (CSA)" in result.stdout
    assert "FAILED" in result.stdout
    data = json.loads((corrupted_export / "check.json").read_text())
    assert data["passed"] is False and data["first_diverging_layer_index"] == 2
    assert data["first_diverging_step"] == "prompt 0 prefill tokens 0..127"
    outs = data["outputs"]
    assert outs["layer0.streams"]["passed"] and outs["layer1.streams"]["passed"]
    for name in ("layer2.streams", "layer3.streams", "logits"):
        assert not outs[name]["passed"] and not outs[name]["comparator_passed"], name
    print(f"\ncorrupted ({CORRUPTED} x 1.01): layer2.streams max rel {outs['layer2.streams']['max_rel']:.3g}, "
          f"logits max rel {outs['logits']['max_rel']:.3g}, top-1 agreement {data['logits']['top1_agreement']:.2%}")


def test_looser_tolerance_lets_the_corruption_through(corrupted_export):
    """rtol/atol override the precision's defaults (the 1% weight change moves layer 2's streams
    by ~12% of their largest value; rtol 0.5 or atol 0.2 lets that through)."""
    r = check(corrupted_export, steps=1, prompts=[[5, 6, 7, 8, 9, 10, 11]], rtol=0.5, atol=0.2)
    assert r.passed, format_report(r)
    assert r.outputs["layer2.streams"].max_rel > 1e-4  # the corruption is there, within 10%


# ---------------------------------------------------------------------------- the rule itself
def test_step_rule_nan_never_passes_infinities_match_integers_exact():
    from engines.check import _diff_stats, _step_fails

    a = np.array([1.0, -np.inf, 0.5], dtype=np.float32)
    assert not _step_fails(a, a.copy(), 1e-5, 1e-5)  # matching -inf (empty compressor slots) is equal
    assert _step_fails(np.array([np.nan], np.float32), np.array([np.nan], np.float32), 1.0, 1.0)
    assert _step_fails(np.array([np.inf], np.float32), np.array([-np.inf], np.float32), 1.0, 1.0)
    assert _diff_stats(np.array([np.nan], np.float32), np.array([1.0], np.float32))[2]  # flagged as NaN
    assert not _step_fails(np.array([1.0 + 5e-6]), np.array([1.0]), 1e-5, 1e-5)
    assert _step_fails(np.array([1.0 + 5e-5]), np.array([1.0]), 1e-5, 1e-5)
    assert _step_fails(np.array([3, 4]), np.array([3, 5]), 1e9, 1e9)  # integers: exact, whatever the tolerance
    assert _step_fails(np.zeros((1, 2)), np.zeros((1, 3)), 1.0, 1.0)  # shapes must agree


# ---------------------------------------------------------------------------- runners and scenario
def test_backend_runner_and_scenario(flash_export):
    """A Polygraphy runner over any Backend: one step per infer on the runner's own cache; outputs
    are copies (the ONNX Runtime backend reuses its ping-pong buffers); run_scenario feeds prompts
    in chunks then decodes with the reference's tokens."""
    from collections import OrderedDict

    from engines.backends import OnnxRuntimeBackend, TorchBackend
    from engines.check import POLICIES, BackendRunner, policy_for, run_scenario
    from exporter import load_model

    ort = OnnxRuntimeBackend(flash_export, providers=["CPUExecutionProvider"])
    ref = TorchBackend(load_model("tiny-flash"))
    runner, reference = BackendRunner(ort, layers=True), BackendRunner(ref, layers=True, name="reference")

    def feed(ids, idx):
        return OrderedDict(input_ids=np.array([ids], np.int64), logits_index=np.array(idx, np.int64))

    logs = []
    with runner, reference:
        first = runner.infer(feed([1, 2, 3, 4, 5], [0, 2, 4]))
        assert list(first) == runner.output_names
        assert runner.output_names[:2] == ["logits", "new_cache.layer0.window_kv"]
        assert runner.output_names[-4:] == [f"layer{i}.streams" for i in range(4)]
        assert first["logits"].shape == (1, 3, 512) and first["layer2.streams"].shape == (1, 5, 4, 64)
        assert first["new_cache.pos"].tolist() == [5]
        snapshot = {k: v.copy() for k, v in first.items()}
        for token in (6, 7, 8):
            runner.infer(feed([token], [0]))
        for k, v in first.items():
            np.testing.assert_array_equal(v, snapshot[k], err_msg=k)
        assert runner.cache.positions.tolist() == [8]
        runner.reset(1)
        assert runner.cache.positions.tolist() == [0]
        records = run_scenario(runner, reference, [[1, 2, 3, 4, 5, 6, 7]], steps=2, chunk_size=3, log=logs.append)
    assert [(r.phase, r.label) for r in records] == [
        ("prefill", "prompt 0 prefill tokens 0..2"), ("prefill", "prompt 0 prefill tokens 3..5"),
        ("prefill", "prompt 0 prefill tokens 6..6"), ("decode", "prompt 0 decode step 0 (position 7)"),
        ("decode", "prompt 0 decode step 1 (position 8)")]
    assert [r.reference["logits"].shape[1] for r in records] == [3, 3, 1, 1, 1]  # every prefill position
    for r in records:
        np.testing.assert_allclose(r.backend["logits"], r.reference["logits"], rtol=1e-4, atol=1e-4 * np.abs(
            r.reference["logits"]).max())
    assert records[-1].reference["new_cache.pos"].tolist() == records[-1].backend["new_cache.pos"].tolist() == [9]
    assert logs[0] == "prompt 0: prefill 7 tokens in chunks of 3"
    assert policy_for("float32", False) is POLICIES["float32"] and POLICIES["float32"].quantile is None
    assert policy_for("float16", False).verdict_groups == ("logits",)
    assert policy_for("float32", True) is POLICIES["quant_sim"]


# ---------------------------------------------------------------------------- usage errors
def _invoke(*args):
    return CliRunner().invoke(main, ["check", *map(str, args)])


def test_missing_directory_is_a_usage_error(tmp_path):
    missing = tmp_path / "nowhere"
    result = _invoke(missing)
    assert result.exit_code == 2 and str(missing) in result.output and "no such export directory" in result.output


def test_directory_without_manifest_is_a_usage_error(tmp_path):
    result = _invoke(tmp_path)
    assert result.exit_code == 2, result.output
    assert str(tmp_path / "manifest.json") in result.output and "no manifest" in result.output


def test_file_instead_of_directory_is_a_usage_error(tmp_path):
    f = tmp_path / "model.onnx"
    f.write_text("")
    result = _invoke(f)
    assert result.exit_code == 2 and str(f) in result.output and "not a directory" in result.output


def test_missing_graph_and_bad_prompt_are_usage_errors(flash_export, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(flash_export / "manifest.json", broken / "manifest.json")
    result = _invoke(broken)
    assert result.exit_code == 2 and f"{broken / 'step.onnx'}: graph file missing" in result.output
    shutil.copy(flash_export / "step.onnx", broken / "step.onnx")  # the twin is missing: files are checked
    result = _invoke(broken, "--steps", "1", "--prompt-ids", "1 2 3")
    assert result.exit_code == 2 and f"{broken / 'step.trt.onnx'}: file missing" in result.output

    result = _invoke(flash_export, "--prompt-ids", "1 2 99999")
    assert result.exit_code == 2 and "99999" in result.output and "vocabulary" in result.output
    result = _invoke(flash_export, "--steps", "-1")
    assert result.exit_code == 2


def test_steps_past_max_position_embeddings_fail_before_loading(flash_export, monkeypatch):
    """The scenario's length is checked against the manifest before any model is loaded."""
    import engines.backends
    import engines.check

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded a backend for a scenario that cannot run")

    monkeypatch.setattr(engines.backends, "load_backend", must_not_load)
    monkeypatch.setattr(engines.check, "_polygraphy", must_not_load)
    t = time.perf_counter()
    result = _invoke(flash_export, "--steps", "5000")  # default prompts: 300 + 5000 positions
    assert result.exit_code == 2, result.output
    assert "300 tokens) + --steps 5000 = 5300 positions exceed max_position_embeddings=4096" in result.output
    assert time.perf_counter() - t < 10
    result = _invoke(flash_export, "--steps", "4094", "--prompt-ids", "1 2 3")  # position 4096 is one too far
    assert result.exit_code == 2 and "max_position_embeddings=4096" in result.output

    def sentinel(*args, **kwargs):
        raise engines.backends.BackendError("reached the loading")

    monkeypatch.setattr(engines.backends, "load_backend", sentinel)
    monkeypatch.setattr(engines.check, "_polygraphy", lambda: {})
    result = _invoke(flash_export, "--steps", "4093", "--prompt-ids", "1 2 3")  # positions 0..4095: fits
    assert result.exit_code == 2 and "reached the loading" in result.output, result.output


def test_float16_check_passes_on_a_good_export(dense_fp16_export):
    """fp16: the verdict rests on the logits (95% of elements within 1e-2 of max|ref|, no NaN);
    cache and per-layer outputs are reported as diagnostics."""
    report = check(dense_fp16_export, steps=8)
    assert report.dtype == "float16" and report.passed, format_report(report)
    assert report.logits.top1_agreement > 0.98
    assert all(s.diagnostic for s in report.outputs.values() if s.group != "logits")
