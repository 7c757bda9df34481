"""Parity with transformers' DeepseekV4ForCausalLM, an independent implementation.

transformers builds and saves a tiny random model; hatrt loads that checkpoint and must give the
same logits (quantization simulation off, which is what transformers implements).
"""

from __future__ import annotations

import pytest
import torch

from exporter import preset
from exporter.checkpoint import load_model

transformers = pytest.importorskip("transformers")

REL_TOL = 1e-4  # fp32


@torch.no_grad()
def randomize(hf: torch.nn.Module, seed: int) -> None:
    """transformers' init zeroes sinks, position biases and mHC bases; give every tensor signal."""
    g = torch.Generator().manual_seed(seed)

    def randn(shape, std, mean=0.0):
        return torch.randn(shape, generator=g) * std + mean

    for name, p in list(hf.named_parameters()) + list(hf.named_buffers()):
        leaf = name.rsplit(".", 1)[-1]
        if "inv_freq" in name:
            continue
        if leaf == "tid2eid":
            e = hf.config.n_routed_experts
            p.copy_(torch.stack([torch.randperm(e, generator=g)[: p.shape[1]] for _ in range(p.shape[0])]))
        elif "norm" in name:
            p.copy_(randn(p.shape, 0.1, 1.0))
        elif "embed_tokens" in name:
            p.copy_(randn(p.shape, 1.0))
        elif leaf in ("sinks",):
            p.copy_(randn(p.shape, 1.0))
        elif leaf == "position_bias":
            p.copy_(randn(p.shape, 0.5))
        elif leaf in ("fn", "hc_fn"):
            p.copy_(randn(p.shape, 0.02))
        elif leaf in ("base", "hc_base"):
            p.copy_(randn(p.shape, 0.1))
        elif leaf in ("scale", "hc_scale"):
            p.copy_(randn(p.shape, 0.1, 1.0))
        elif leaf == "e_score_correction_bias":
            p.copy_(randn(p.shape, 0.01))
        elif p.dim() >= 2:
            p.copy_(randn(p.shape, p.shape[-1] ** -0.5))
        else:
            raise AssertionError(f"no rule for {name}")


@pytest.mark.parametrize("name,original_format", [("tiny-flash", True), ("tiny-pro", True), ("tiny-pro", False)])
@torch.no_grad()
def test_logits_match_transformers_after_loading_its_checkpoint(name, original_format, tmp_path):
    cfg = preset(name)
    hf_config = transformers.DeepseekV4Config(**cfg.to_hf_dict())
    assert hf_config.layer_types[:4] == [
        {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}[r]
        for r in cfg.compress_ratios]
    hf = transformers.DeepseekV4ForCausalLM(hf_config).eval()
    randomize(hf, seed=7)
    hf.save_pretrained(tmp_path, save_original_format=original_format)

    ours = load_model(tmp_path, quant_sim=False)
    assert ours.config == cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 600), generator=torch.Generator().manual_seed(5))
    want = hf(ids, use_cache=False).logits.float()
    got = ours(ids)
    assert not torch.isnan(got).any()
    rel = ((got - want).abs().max() / want.abs().max()).item()
    print(f"{name} (original_format={original_format}): max rel err {rel:.2e}")
    assert rel < REL_TOL
    assert (got.argmax(-1) == want.argmax(-1)).all()
