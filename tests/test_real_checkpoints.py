"""Exports of real checkpoints, not presets, each passing `hatrt check`.

- checkpoints written by `transformers` (DeepseekV4ForCausalLM.save_pretrained), every parameter
  random (sinks, position biases, APE, mHC, router biases): a Flash-like schedule in transformers'
  names with transformers' own all-zero hash table (each token picks expert 0 twice), and a
  Pro-like schedule in the official names with a random hash table;
- a quant-sim export (FP8 KV, FP4 indexer, bf16 scores baked into the graph) under its policy;
- an FP8 block-scaled checkpoint (the official release's format) exported and quantized: its
  weights are requantized per channel and the manifest reports what that costs.
"""

from __future__ import annotations

import json

import pytest
import torch

from engines.check import check
from engines.quantize import quantize_export
from exporter import preset
from exporter.checkpoint import load_model, save_checkpoint
from exporter.export import export_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow  # an export each

from test_transformers_parity import randomize  # noqa: E402


@pytest.mark.parametrize("name, original_format, zero_hash", [("tiny-flash", False, True), ("tiny-pro", True, False)])
@torch.no_grad()
def test_transformers_checkpoint_exports_and_passes_check(name, original_format, zero_hash, tmp_path):
    cfg = preset(name)
    hf = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**cfg.to_hf_dict())).eval()
    randomize(hf, seed=11)
    tables = [b for n, b in hf.named_buffers() if n.endswith("tid2eid")]
    assert tables, "the preset has a hash-routed layer"
    if zero_hash:  # what transformers writes: every token picks expert 0 k times
        for t in tables:
            t.zero_()
    hf.save_pretrained(tmp_path / "ckpt", save_original_format=original_format)
    out = export_model(tmp_path / "ckpt", tmp_path / "export").out_dir
    report = check(out, steps=6, prompts=[list(range(3, 203)), list(range(7, 140))])
    assert report.passed, (report.failed_outputs, report.first_failure)
    assert report.logits.top1_agreement == 1.0
    # the reference the check rebuilt is the checkpoint (not the preset), and it is transformers'
    ids = torch.arange(1, 97).view(1, -1) % cfg.vocab_size
    ref = load_model(tmp_path / "ckpt")
    want = hf(ids, use_cache=False).logits.float()
    assert ((ref(ids) - want).abs().max() / want.abs().max()).item() < 1e-4


def test_quant_sim_export_passes_check_under_its_policy(tmp_path):
    out = export_model("tiny-flash", tmp_path / "qs", quant_sim=True).out_dir
    assert json.loads((out / "manifest.json").read_text())["quant_sim"] is True
    report = check(out, steps=6, prompts=[list(range(5, 305))])
    assert report.passed, (report.failed_outputs, report.first_failure)
    assert report.policy.startswith("quant-sim") and report.logits.top1_agreement >= 0.95


def test_fp8_block_scaled_checkpoint_is_requantized_per_channel(tmp_path):
    model = load_model("tiny-flash")
    save_checkpoint(model, model.config, tmp_path / "fp8ckpt", fp8=True)
    export = export_model(tmp_path / "fp8ckpt", tmp_path / "export").out_dir
    manifest = quantize_export(export, tmp_path / "fp8", calib_tokens=list(range(1, 400)))
    q = manifest["quantization"]
    assert "block" in q["source_weights"] and "requantized per channel" in q["source_weights"]
    assert 0 < q["weight_error"]["mean"] <= q["weight_error"]["max"] < 0.1
    assert check(tmp_path / "fp8", steps=4, prompts=[list(range(1, 150))]).passed
