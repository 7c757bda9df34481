"""Checkpoint reading/writing: names, shapes, dequantization, sharding, and every error path.

Most tests fill a stand-in module whose state_dict has the official names (built from
`expected_tensors`), so they do not depend on exporter/model.py. Tests of `load_model` itself
run once `exporter.model.Transformer` exists.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from exporter.checkpoint import (
    CheckpointError, _quant_format, dequantize_fp4, dequantize_fp8_blockwise, detect_naming,
    expected_tensors, from_transformers_name, load_checkpoint, load_model, pack_fp4,
    quantize_fp8_blockwise, save_checkpoint, to_transformers_name,
)
from exporter.presets import PRESETS, preset

TINY = [n for n in PRESETS if n.startswith("tiny")]
_EXPERT = re.compile(r"layers\.(\d+)\.ffn\.experts\.(\d+)\.w([123])\.weight")


# ----------------------------------------------------------------------------- helpers
def rand_state(config, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (shape, kind) in expected_tensors(config).items():
        if kind == "int":
            out[name] = torch.randint(0, 8, shape, generator=g)
        else:
            out[name] = torch.randn(shape, generator=g).to(torch.float32 if kind == "fp32" else dtype)
    return out


def module_for(config, dtype=torch.float32, with_config=True):
    """A stand-in for the model: zeros under the official names (fp32/int kinds kept)."""
    root = nn.Module()
    for name, (shape, kind) in expected_tensors(config).items():
        *path, leaf = name.split(".")
        m = root
        for p in path:
            if not hasattr(m, p):
                m.add_module(p, nn.Module())
            m = getattr(m, p)
        if kind == "int":
            m.register_buffer(leaf, torch.zeros(shape, dtype=torch.int64))
        else:
            m.register_parameter(leaf, nn.Parameter(torch.zeros(shape, dtype=torch.float32 if kind == "fp32" else dtype)))
    root.config = config if with_config else None
    return root


def assert_state_equal(got, want):
    assert set(got) == set(want)
    bad = [n for n in want if got[n].dtype != want[n].dtype or not torch.equal(got[n], want[n])]
    assert not bad, f"{len(bad)} differ, e.g. {bad[:3]}"


def rewrite(ckpt: Path, fn, file="model.safetensors"):
    """Edit the tensors of one shard in place (to damage a checkpoint on purpose)."""
    tensors = load_file(ckpt / file)
    fn(tensors)
    save_file(tensors, ckpt / file)


def hf_reference(hsd, name, I):
    """The transformers in-memory tensor for an official name (experts are fused there)."""
    m = _EXPERT.fullmatch(name)
    if not m:
        return hsd[to_transformers_name(name)]
    layer, e, w = int(m[1]), int(m[2]), m[3]
    if w == "2":
        return hsd[f"model.layers.{layer}.mlp.experts.down_proj"][e]
    gate_up = hsd[f"model.layers.{layer}.mlp.experts.gate_up_proj"][e]
    return gate_up[:I] if w == "1" else gate_up[I:]


@pytest.fixture(scope="module")
def flash():
    return preset("tiny-flash")


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory, flash):
    """A plain official-names checkpoint of tiny-flash and its state."""
    state = rand_state(flash)
    path = save_checkpoint(state, flash, tmp_path_factory.mktemp("ck") / "official")
    return path, state


@pytest.fixture
def ckpt_copy(tmp_path, official_ckpt, flash):
    """A fresh, writable copy of the official checkpoint (tests damage it)."""
    return save_checkpoint(official_ckpt[1], flash, tmp_path / "copy"), official_ckpt[1]


# ----------------------------------------------------------------------------- expected tensors
def test_expected_tensors_tiny_flash(flash):
    exp = expected_tensors(flash)
    assert exp["embed.weight"] == ((512, 64), "float")
    assert exp["hc_head_fn"] == ((4, 256), "fp32")
    assert exp["layers.0.hc_attn_fn"] == ((24, 256), "fp32")
    assert exp["layers.0.hc_ffn_scale"] == ((3,), "fp32")
    assert exp["layers.0.attn.wo_a.weight"] == ((64, 160), "float")
    assert exp["layers.0.attn.attn_sink"] == ((4,), "fp32")
    assert exp["layers.0.ffn.gate.tid2eid"] == ((512, 2), "int")
    assert "layers.0.ffn.gate.bias" not in exp and exp["layers.1.ffn.gate.bias"] == ((8,), "fp32")
    assert not any(n.startswith(("layers.0.attn.compressor", "layers.1.attn.compressor")) for n in exp)
    assert exp["layers.2.attn.compressor.wkv.weight"] == ((160, 64), "float")  # CSA: 2 x head_dim
    assert exp["layers.2.attn.compressor.ape"] == ((4, 160), "fp32")
    assert exp["layers.2.attn.indexer.compressor.ape"] == ((4, 64), "fp32")
    Hi, Di = flash.index_n_heads, flash.index_head_dim
    assert exp["layers.2.attn.indexer.wq_b.weight"] == ((Hi * Di, 48), "float")
    assert exp["layers.2.attn.indexer.weights_proj.weight"] == ((Hi, 64), "float")
    assert exp["layers.3.attn.compressor.ape"] == ((128, 80), "fp32")  # HCA: no overlap
    assert not any(n.startswith("layers.3.attn.indexer") for n in exp)
    assert exp["layers.3.ffn.experts.7.w2.weight"] == ((64, 32), "float")
    assert exp["layers.3.ffn.shared_experts.w1.weight"] == ((32, 64), "float")
    # globals + 4 x (norms, hc, attention, gate + bias/tid2eid, 8 experts, shared) + CSA/HCA extras
    assert len(exp) == 6 + 4 * (2 + 6 + 8 + 2 + 8 * 3 + 3) + (4 + 6) + 4


def test_expected_tensors_dense_and_no_shared():
    exp = expected_tensors(preset("tiny-dense"))
    assert exp["layers.0.ffn.w1.weight"] == ((96, 64), "float")
    assert exp["layers.0.ffn.w2.weight"] == ((64, 96), "float")
    assert not any(".gate." in n or "experts" in n for n in exp)
    no_shared = expected_tensors(preset("tiny-flash").replace(n_shared_experts=0))
    assert not any("shared_experts" in n for n in no_shared)


# ----------------------------------------------------------------------------- names
@pytest.mark.parametrize("name", TINY)
def test_transformers_names_round_trip(name):
    exp = expected_tensors(preset(name))
    hf = [to_transformers_name(n) for n in exp]
    assert len(set(hf)) == len(hf)
    assert [from_transformers_name(h) for h in hf] == list(exp)


def test_transformers_name_examples():
    pairs = {
        "layers.3.attn.wq_a.weight": "model.layers.3.self_attn.q_a_proj.weight",
        "layers.3.hc_attn_fn": "model.layers.3.attn_hc.fn",
        "layers.3.hc_ffn_base": "model.layers.3.ffn_hc.base",
        "hc_head_fn": "model.hc_head.hc_fn",
        "embed.weight": "model.embed_tokens.weight",
        "head.weight": "lm_head.weight",
        "norm.weight": "model.norm.weight",
        "layers.2.attn.indexer.compressor.wkv.weight": "model.layers.2.self_attn.compressor.indexer.kv_proj.weight",
        "layers.2.attn.indexer.wq_b.weight": "model.layers.2.self_attn.compressor.indexer.q_b_proj.weight",
        "layers.2.attn.indexer.weights_proj.weight":
            "model.layers.2.self_attn.compressor.indexer.scorer.weights_proj.weight",
        "layers.2.attn.compressor.ape": "model.layers.2.self_attn.compressor.position_bias",
        "layers.1.ffn.gate.bias": "model.layers.1.mlp.gate.e_score_correction_bias",
        "layers.1.ffn.experts.5.w3.weight": "model.layers.1.mlp.experts.5.up_proj.weight",
        "layers.1.ffn.shared_experts.w2.weight": "model.layers.1.mlp.shared_experts.down_proj.weight",
        "layers.0.attn.attn_sink": "model.layers.0.self_attn.sinks",
        "layers.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
    }
    for official, hf in pairs.items():
        assert to_transformers_name(official) == hf
        assert from_transformers_name(hf) == official
    assert from_transformers_name("model.layers.0.self_attn.bogus.weight") is None


def test_detect_naming():
    assert detect_naming(["embed.weight", "layers.0.attn.wq_a.weight", "mtp.0.attn.wq_a.weight"]) == "official"
    assert detect_naming(["lm_head.weight", "model.layers.0.self_attn.q_a_proj.weight"]) == "transformers"
    assert detect_naming(["head.weight", "model.embed_tokens.weight",
                          "model.layers.0.attn.wq_a.weight"]) == "transformers-saved"


# ----------------------------------------------------------------------------- quantization
def _fp8_representable(shape, seed=0):
    """Random e4m3 values times a power of two per 128x128 block: exactly representable."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    codes = torch.where(codes.isnan(), torch.zeros_like(codes), codes)
    exps = torch.randint(-12, 12, (-(-shape[0] // 128), -(-shape[1] // 128)), generator=g).float()
    return codes * torch.exp2(exps).repeat_interleave(128, 0)[:shape[0]].repeat_interleave(128, 1)[:, :shape[1]]


def test_fp8_round_trip_exact_with_edge_blocks():
    w = _fp8_representable((200, 300))
    w[:128, :128] = 0  # an all-zero block gets a finite scale
    q, s = quantize_fp8_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (200, 300)
    assert s.dtype == torch.float8_e8m0fnu and s.shape == (2, 3)  # ceil-div for the 72/44 edges
    assert torch.equal(dequantize_fp8_blockwise(q, s), w)
    assert torch.equal(dequantize_fp8_blockwise(q, s, torch.bfloat16), w.bfloat16())
    # fp32 scales (another published spelling) dequantize the same
    s32 = torch.exp2(s.view(torch.uint8).float() - 127)
    assert torch.equal(dequantize_fp8_blockwise(q, s32), w)


def test_fp8_dequant_formula():
    q = torch.tensor([[1.5, -2.0]]).to(torch.float8_e4m3fn)
    s = torch.tensor([[130]], dtype=torch.uint8).view(torch.float8_e8m0fnu)  # 2^(130-127) = 8
    assert dequantize_fp8_blockwise(q, s).tolist() == [[12.0, -16.0]]
    with pytest.raises(CheckpointError, match=r"FP8 scale has shape \[1, 2\], expected \[1, 1\]"):
        dequantize_fp8_blockwise(q, torch.ones(1, 2))


def test_fp4_nibble_order_and_codes():
    w = torch.tensor([[0.5, -6.0, 3.0, 0.0] + [0.0] * 28])  # one block of 32, amax 6 -> scale 1
    packed, s = pack_fp4(w)
    assert packed.dtype == torch.int8 and packed.shape == (1, 16) and s.shape == (1, 1)
    b = packed.view(torch.uint8)[0]
    assert b[0].item() == 0xF1  # low nibble = element 0 (0.5 = code 1), high = element 1 (-6 = 0x8|7)
    assert b[1].item() == 0x05  # 3.0 = code 5, 0.0 = code 0
    assert s.view(torch.uint8).item() == 127
    assert torch.equal(dequantize_fp4(packed, s), w)


def test_fp4_round_trip_exact_and_rounding():
    g = torch.Generator().manual_seed(1)
    table = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    vals = table[torch.randint(0, 8, (40, 96), generator=g)] * (1 - 2 * torch.randint(0, 2, (40, 96), generator=g))
    w = vals * torch.exp2(torch.randint(-8, 8, (40, 3), generator=g).float()).repeat_interleave(32, 1)
    packed, s = pack_fp4(w)
    assert packed.shape == (40, 48) and s.shape == (40, 3) and s.dtype == torch.float8_e8m0fnu
    assert torch.equal(dequantize_fp4(packed, s), w)
    # non-representable values go to the nearest code
    x = torch.tensor([[6.0, 2.4, 2.6, -0.7] + [0.0] * 28])
    assert dequantize_fp4(*pack_fp4(x))[0, :4].tolist() == [6.0, 2.0, 3.0, -0.5]


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("names", ["official", "transformers"])
@pytest.mark.parametrize("name", ["tiny-flash", "tiny-pro", "tiny-dense"])
def test_round_trip(tmp_path, names, name):
    config = preset(name)
    state = rand_state(config)
    path = save_checkpoint(state, config, tmp_path / "ck", names=names)
    keys = load_file(path / "model.safetensors").keys()
    assert detect_naming(keys) == names
    if names == "transformers" and config.ffn_type == "moe":
        assert "model.layers.1.mlp.experts.gate_up_proj" in keys  # fused, as transformers keeps them
    model = module_for(config)
    load_checkpoint(model, path)
    assert_state_equal(model.state_dict(), state)


def test_bf16_checkpoint_into_fp32_and_bf16_models(tmp_path, flash):
    state = rand_state(flash, dtype=torch.bfloat16)  # fp32 kinds stay fp32 on disk
    path = save_checkpoint(state, flash, tmp_path / "ck")
    fp32 = module_for(flash)
    load_checkpoint(fp32, path)
    assert_state_equal(fp32.state_dict(), {n: t.float() if t.is_floating_point() else t for n, t in state.items()})
    bf16 = module_for(flash, dtype=torch.bfloat16)
    load_checkpoint(bf16, path)
    assert_state_equal(bf16.state_dict(), state)


def test_int32_tid2eid_and_mtp_are_accepted(ckpt_copy, flash):
    path, state = ckpt_copy

    def edit(t):
        t["layers.0.ffn.gate.tid2eid"] = t["layers.0.ffn.gate.tid2eid"].int()  # official dtype
        t["mtp.0.attn.wq_a.weight"] = torch.zeros(3, 3)  # the MTP block is skipped
        t["mtp.0.attn.wq_a.scale"] = torch.ones(1, 1)
    rewrite(path, edit)
    model = module_for(flash)
    load_checkpoint(model, path)
    assert_state_equal(model.state_dict(), state)


def test_sharded_with_index_and_progress(tmp_path, flash):
    state = rand_state(flash)
    path = save_checkpoint(state, flash, tmp_path / "ck", shard_bytes=300_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(p.name for p in path.glob("*.safetensors"))
    assert set(index["weight_map"]) == set(state)
    calls = []
    model = module_for(flash)
    load_checkpoint(model, path, progress=lambda done, total, name: calls.append((done, total, name)))
    assert_state_equal(model.state_dict(), state)
    assert [c[0] for c in calls] == list(range(1, len(state) + 1)) and calls[-1][1] == len(state)
    # a stray shard the index does not list is ignored
    save_file({"bogus": torch.zeros(1)}, path / "stray.safetensors")
    load_checkpoint(module_for(flash), path)


def _representable(state, fp8, fp4):
    """Project each tensor onto its storage format so the quantized round trip is exact."""
    out = {}
    for n, t in state.items():
        fmt = _quant_format(n, fp8, fp4)
        out[n] = (dequantize_fp8_blockwise(*quantize_fp8_blockwise(t)) if fmt == "fp8"
                  else dequantize_fp4(*pack_fp4(t)) if fmt == "fp4" else t)
    return out


@pytest.mark.parametrize("names, fp4", [("official", False), ("official", True), ("transformers", False)])
def test_quantized_round_trip(tmp_path, flash, names, fp4):
    state = _representable(rand_state(flash), True, fp4 and names == "official")
    path = save_checkpoint(state, flash, tmp_path / "ck", names=names, fp8=True, fp4_experts=fp4)
    disk = load_file(path / "model.safetensors")
    if names == "official":
        assert disk["layers.2.attn.wq_b.weight"].dtype == torch.float8_e4m3fn
        assert disk["layers.2.attn.wq_b.scale"].shape == (3, 1)  # [320, 48]: both dims ragged
        assert disk["layers.0.attn.wo_a.scale"].shape == (1, 2)  # [64, 160]
        n_idx = flash.index_n_heads * flash.index_head_dim
        assert disk["layers.2.attn.indexer.wq_b.scale"].shape == (-(-n_idx // 128), 1)
        assert disk["layers.2.attn.compressor.wkv.weight"].dtype == torch.float32  # not quantized
        w1 = disk["layers.1.ffn.experts.3.w1.weight"]
        if fp4:
            assert w1.dtype == torch.int8 and w1.shape == (32, 32)
            assert disk["layers.1.ffn.experts.3.w1.scale"].shape == (32, 2)
            assert disk["layers.1.ffn.experts.3.w2.scale"].shape == (64, 1)
        else:
            assert w1.dtype == torch.float8_e4m3fn
        assert disk["layers.1.ffn.shared_experts.w1.weight"].dtype == torch.float8_e4m3fn
    else:
        assert disk["model.layers.2.self_attn.q_b_proj.weight_scale_inv"].shape == (3, 1)
    kinds = expected_tensors(flash)
    for dtype in (torch.float32, torch.bfloat16):
        model = module_for(flash, dtype=dtype)
        load_checkpoint(model, path)
        want = {n: t.to(dtype) if kinds[n][1] == "float" else t for n, t in state.items()}
        assert_state_equal(model.state_dict(), want)


def test_hf_scale_spelling_and_fp32_scales(tmp_path, flash):
    state = _representable(rand_state(flash), True, False)
    path = save_checkpoint(state, flash, tmp_path / "ck", fp8=True)

    def edit(t):
        for k in [k for k in t if k.endswith(".scale") and not k.endswith("hc_scale")]:
            s = t.pop(k)
            if "wq_a" in k:  # fp32 scales, HF spelling
                t[k.removesuffix(".scale") + ".weight_scale_inv"] = torch.exp2(s.view(torch.uint8).float() - 127)
            else:
                t[k] = s
    rewrite(path, edit)
    model = module_for(flash)
    load_checkpoint(model, path)
    assert_state_equal(model.state_dict(), state)


def test_fp4_as_float4_dtype(tmp_path, flash):
    """safetensors' F4 dtype (torch.float4_e2m1fn_x2) holds the same bytes as the int8 packing."""
    state = _representable(rand_state(flash), False, True)
    path = save_checkpoint(state, flash, tmp_path / "ck", fp4_experts=True)
    name = "layers.2.ffn.experts.5.w2.weight"
    rewrite(path, lambda t: t.update({name: t[name].view(torch.uint8).view(torch.float4_e2m1fn_x2)}))
    assert load_file(path / "model.safetensors")[name].dtype == torch.float4_e2m1fn_x2
    model = module_for(flash)
    load_checkpoint(model, path)
    assert_state_equal(model.state_dict(), state)


def test_unexpected_names_show_stored_spelling(tmp_path, flash):
    path = save_checkpoint(rand_state(flash), flash, tmp_path / "ck")
    rewrite(path, lambda t: t.update({"model.layers.0.attn.bogus.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=re.escape(
            "1 unexpected tensor(s) in the checkpoint (transformers-saved naming): layers.0.attn.bogus.weight "
            "(stored as model.layers.0.attn.bogus.weight)")):
        load_checkpoint(module_for(flash), path)


# ----------------------------------------------------------------------------- real transformers
@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    config = preset("tiny-pro")  # HCA-first schedule, YaRN, hash layer, CSA with indexer
    torch.manual_seed(0)
    model = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**config.to_hf_dict()))
    return model, config


@pytest.mark.parametrize("original_format", [True, False])
def test_transformers_save_pretrained(tmp_path, hf_model, original_format):
    hf, config = hf_model
    hf.save_pretrained(tmp_path, save_original_format=original_format)
    keys = set(load_file(tmp_path / "model.safetensors"))
    if original_format:  # what a plain save_pretrained() writes in transformers 5.23
        assert detect_naming(keys) == "transformers-saved"
        assert {"head.weight", "model.embed_tokens.weight", "model.hc_head.hc_fn", "model.norm.weight",
                "model.layers.0.attn.norm.weight", "model.layers.0.attn.wq_a.weight",
                "model.layers.2.attn.indexer.compressor.ape", "model.layers.1.ffn.experts.7.w3.weight",
                "model.layers.1.ffn.gate.bias", "model.layers.0.hc_attn_fn"} <= keys
    else:
        assert detect_naming(keys) == "transformers"
        assert "model.layers.1.mlp.experts.gate_up_proj" in keys
    from exporter.config import ModelConfig
    assert ModelConfig.from_json(tmp_path / "config.json") == config
    model = module_for(config)
    load_checkpoint(model, tmp_path)
    hsd, I = hf.state_dict(), config.moe_intermediate_size
    got = model.state_dict()
    assert not [n for n, t in got.items() if not torch.equal(t, hf_reference(hsd, n, I))]
    # and every tensor transformers holds is accounted for
    assert len(hsd) == len(got) - 3 * config.n_routed_experts * config.num_layers + 2 * config.num_layers


@pytest.mark.parametrize("names", ["official", "transformers"])
def test_transformers_loads_our_checkpoints(tmp_path, hf_model, names):
    transformers = pytest.importorskip("transformers")
    _, config = hf_model
    state = rand_state(config, seed=3)
    path = save_checkpoint(state, config, tmp_path / "ck", names=names)
    hsd = transformers.DeepseekV4ForCausalLM.from_pretrained(path).state_dict()
    assert not [n for n, t in state.items() if not torch.equal(t, hf_reference(hsd, n, config.moe_intermediate_size))]


# ----------------------------------------------------------------------------- errors
def test_error_path_missing(tmp_path, flash):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_checkpoint(module_for(flash), tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
        load_checkpoint(module_for(flash), tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(module_for(flash), tmp_path / "f")


def test_error_load_model_paths(tmp_path):
    with pytest.raises(CheckpointError, match="nor a preset name"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    with pytest.raises(CheckpointError, match="config.json.*num_attention_heads|config.json.*missing"):
        load_model(tmp_path)


def test_error_corrupt_shard_names_file(tmp_path, flash):
    path = save_checkpoint(rand_state(flash), flash, tmp_path / "ck", shard_bytes=300_000)
    victim = sorted(path.glob("*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=re.escape(victim.name) + ".*truncated or corrupt"):
        load_checkpoint(module_for(flash), path)


def test_error_index_names_missing_shard(tmp_path, flash):
    path = save_checkpoint(rand_state(flash), flash, tmp_path / "ck", shard_bytes=300_000)
    victim = sorted(path.glob("*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CheckpointError, match="names 1 shard file.*do not exist: " + re.escape(victim.name)):
        load_checkpoint(module_for(flash), path)


def test_error_missing_tensors(ckpt_copy, flash):
    path, _ = ckpt_copy
    gone = [f"layers.{i}.attn.{w}.weight" for i in range(4) for w in ("wq_a", "wo_b", "q_norm")]

    def edit(t):
        for n in gone:
            del t[n]
    rewrite(path, edit)
    with pytest.raises(CheckpointError, match=r"12 tensor\(s\) missing") as e:
        load_checkpoint(module_for(flash), path)
    msg = str(e.value)
    assert "layers.0.attn.wq_a.weight [48, 64]" in msg and "layers.0.attn.q_norm.weight [48]" in msg
    assert msg.endswith("... and 4 more")
    # strict=False loads the rest and logs
    model = module_for(flash)
    load_checkpoint(model, path, strict=False)
    assert torch.equal(model.state_dict()["layers.0.attn.wkv.weight"], ckpt_copy[1]["layers.0.attn.wkv.weight"])


def test_error_unexpected_tensors(ckpt_copy, flash, caplog):
    path, _ = ckpt_copy
    rewrite(path, lambda t: t.update({"layers.0.attn.bogus.weight": torch.zeros(2), "extra": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"2 unexpected tensor\(s\).*: extra, layers\.0\.attn\.bogus\.weight"):
        load_checkpoint(module_for(flash), path)
    with caplog.at_level(logging.WARNING):
        load_checkpoint(module_for(flash), path, strict=False)
    assert "unexpected" in caplog.text


def test_error_mis_shaped_tensor(ckpt_copy, flash):
    path, _ = ckpt_copy
    rewrite(path, lambda t: t.update({"layers.1.attn.wq_a.weight": torch.zeros(48, 63)}))
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) have the wrong shape: layers\.1\.attn\.wq_a\.weight "
                                              r"expected \[48, 64\], got \[48, 63\] \(model\.safetensors"):
        load_checkpoint(module_for(flash), path, strict=False)


def test_error_int_float_mix(ckpt_copy, flash):
    path, _ = ckpt_copy
    rewrite(path, lambda t: t.update({"layers.0.ffn.gate.tid2eid": t["layers.0.ffn.gate.tid2eid"].float()}))
    with pytest.raises(CheckpointError, match=r"'layers\.0\.ffn\.gate\.tid2eid' is F32, but .* is int64"):
        load_checkpoint(module_for(flash), path)


def test_error_config_mismatch_layers(official_ckpt, flash):
    path, _ = official_ckpt
    fewer = flash.replace(num_layers=3, compress_ratios=flash.compress_ratios[:3])
    with pytest.raises(CheckpointError, match="config/weights mismatch") as e:
        load_checkpoint(module_for(fewer), path)
    assert "num_hidden_layers: config gives 3, the weights hold layers 0..3 (found layers.3.* and up)" in str(e.value)


def test_error_config_mismatch_hidden_size(official_ckpt, flash):
    path, _ = official_ckpt
    with pytest.raises(CheckpointError, match="config/weights mismatch") as e:
        load_checkpoint(module_for(flash.replace(hidden_size=128)), path)
    assert re.search(r"hidden_size: config gives 128, the weights have 64 \(e\.g\. \S+ is \[", str(e.value))


def test_error_config_mismatch_schedule_and_experts(tmp_path, flash):
    pro = preset("tiny-pro")
    path = save_checkpoint(rand_state(pro), pro, tmp_path / "ck", names="transformers")
    with pytest.raises(CheckpointError, match="config/weights mismatch") as e:
        load_checkpoint(module_for(flash), path)
    assert "compress_ratios[0]: config gives 0, the weights of layer 0 have a compressor only (HCA)" in str(e.value)
    more = flash.replace(n_routed_experts=16)
    with pytest.raises(CheckpointError, match="n_routed_experts: config gives 16, the weights have 8"):
        load_checkpoint(module_for(more), save_checkpoint(rand_state(flash), flash, tmp_path / "f"))


def test_error_fp8_without_scale_and_bad_scale(tmp_path, flash):
    path = save_checkpoint(rand_state(flash), flash, tmp_path / "ck", fp8=True)
    rewrite(path, lambda t: t.pop("layers.2.attn.wq_b.scale"))
    with pytest.raises(CheckpointError, match=r"FP8 weight 'layers\.2\.attn\.wq_b\.weight' \[320, 48\] has no "
                                              r"scale tensor \(layers\.2\.attn\.wq_b\.scale or .*weight_scale_inv\)"):
        load_checkpoint(module_for(flash), path)
    rewrite(path, lambda t: t.update({"layers.2.attn.wq_b.scale": torch.ones(2, 1)}))
    with pytest.raises(CheckpointError, match=r"FP8 scale 'layers\.2\.attn\.wq_b\.scale' has shape \[2, 1\], "
                                              r"expected \[3, 1\] for weight .* of shape \[320, 48\]"):
        load_checkpoint(module_for(flash), path)


def test_error_fp4_bad_scale(tmp_path, flash):
    path = save_checkpoint(rand_state(flash), flash, tmp_path / "ck", fp4_experts=True)
    rewrite(path, lambda t: t.update({"layers.1.ffn.experts.0.w1.scale": torch.ones(32, 1)}))
    with pytest.raises(CheckpointError, match=r"FP4 scale .* has shape \[32, 1\], expected \[32, 2\]"):
        load_checkpoint(module_for(flash), path)


def test_error_meta_model_and_save_errors(tmp_path, official_ckpt, flash):
    with torch.device("meta"):
        model = module_for(flash)
    with pytest.raises(CheckpointError, match="meta device"):
        load_checkpoint(model, official_ckpt[0])
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        save_checkpoint(official_ckpt[1], flash, official_ckpt[0])
    with pytest.raises(CheckpointError, match="names="):
        save_checkpoint({}, flash, tmp_path / "x", names="gguf")
    with pytest.raises(CheckpointError, match="fp4_experts needs official names"):
        save_checkpoint({}, flash, tmp_path / "x", names="transformers", fp4_experts=True)
    # overwrite=True swaps atomically and leaves no temp dirs behind
    save_checkpoint(official_ckpt[1], flash, tmp_path / "o")
    save_checkpoint(official_ckpt[1], flash, tmp_path / "o", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


# ----------------------------------------------------------------------------- load_model
try:
    from exporter.model import Transformer  # noqa: F401
    HAVE_MODEL = True
except ImportError:
    HAVE_MODEL = False
needs_model = pytest.mark.skipif(not HAVE_MODEL, reason="exporter.model.Transformer is not written yet")


@needs_model
def test_load_model_preset_is_deterministic_and_casts_by_kind():
    a = load_model("tiny-flash", seed=1, dtype=torch.bfloat16)
    b = load_model("tiny-flash", seed=1, dtype=torch.bfloat16)
    assert not a.training
    assert_state_equal(a.state_dict(), b.state_dict())
    kinds = expected_tensors(preset("tiny-flash"))
    want = {"float": torch.bfloat16, "fp32": torch.float32, "int": torch.int64}
    for name, t in a.state_dict().items():
        if name in kinds:
            assert t.dtype == want[kinds[name][1]], name
    c = load_model("tiny-flash", seed=2, dtype=torch.bfloat16)
    assert not torch.equal(a.state_dict()["embed.weight"], c.state_dict()["embed.weight"])


@needs_model
@pytest.mark.parametrize("names, fp8", [("official", False), ("transformers", True)])
def test_load_model_round_trip(tmp_path, names, fp8):
    src = load_model("tiny-flash", seed=4)
    config = preset("tiny-flash")
    state = _representable(src.state_dict(), fp8, False)
    src.load_state_dict(state)
    path = save_checkpoint(state, config, tmp_path / "ck", names=names, fp8=fp8)
    got = load_model(path)
    assert not got.training
    assert_state_equal(got.state_dict(), src.state_dict())
    # buffers outside the checkpoint (RoPE tables) were recomputed, not left as to_empty garbage
    buffers = dict(src.named_buffers())
    assert {n: b for n, b in got.named_buffers() if not torch.equal(b, buffers[n])} == {}


@needs_model
def test_load_model_reads_transformers_save_pretrained(tmp_path, hf_model):
    hf, config = hf_model
    hf.save_pretrained(tmp_path)
    got = load_model(tmp_path, dtype=torch.bfloat16).state_dict()
    hsd = hf.state_dict()
    kinds = expected_tensors(config)
    for name, (_, kind) in kinds.items():
        want = hf_reference(hsd, name, config.moe_intermediate_size)
        assert torch.equal(got[name], want.to(torch.bfloat16) if kind == "float" else want), name


# ----------------------------------------------------------------------------- a lost shard, no index
def _sharded_without_index(tmp_path, flash, shard_bytes=300_000):
    path = save_checkpoint(rand_state(flash), flash, tmp_path / "ck", shard_bytes=shard_bytes)
    (path / "model.safetensors.index.json").unlink()
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(shards) >= 3
    return path, shards


def _tensors_of(path: Path, shard: str) -> set[str]:
    return set(load_file(path / shard))


@pytest.mark.parametrize("which", [0, 1, -1], ids=["first", "middle", "last"])
def test_error_missing_shard_without_index_names_shard_and_tensors(tmp_path, flash, which):
    path, shards = _sharded_without_index(tmp_path, flash)
    lost = _tensors_of(path, shards[which])
    (path / shards[which]).unlink()
    model = module_for(flash)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(model, path)
    msg = str(e.value)
    assert f"1 shard file(s) missing: {shards[which]}" in msg
    assert "config/weights mismatch" not in msg  # a lost file is not a config problem
    assert f"{len(lost)} tensor(s) missing from the checkpoint" in msg
    named = [n for n in lost if n in msg]
    assert len(named) == min(len(lost), 8), msg  # the first 8 names are spelled out ...
    if len(lost) > 8:
        assert f"... and {len(lost) - 8} more" in msg
    with pytest.raises(CheckpointError, match=re.escape(shards[which])):  # ... and load_model says the same
        load_model(str(path))


def test_missing_shard_without_index_non_strict_warns(tmp_path, flash, caplog):
    path, shards = _sharded_without_index(tmp_path, flash)
    (path / shards[1]).unlink()
    with caplog.at_level(logging.WARNING, logger="exporter.checkpoint"):
        load_checkpoint(module_for(flash), path, strict=False)
    assert f"shard file(s) missing: {shards[1]}" in caplog.text


def test_missing_unnumbered_shard_lists_the_missing_tensors(tmp_path, flash):
    """Shards without -of-N numbering: the gap cannot be seen, but the missing tensors are named."""
    path, shards = _sharded_without_index(tmp_path, flash)
    for i, s in enumerate(shards):
        (path / s).rename(path / f"part{i}.safetensors")
    lost = sorted(_tensors_of(path, "part1.safetensors"))
    (path / "part1.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(module_for(flash), path)
    msg = str(e.value)
    assert "tensor(s) missing" in msg or "missing: " in msg
    assert any(n in msg for n in lost), msg
    if "config/weights mismatch" in msg:
        assert "or a shard file is missing" in msg


def test_complete_shards_without_index_still_load(tmp_path, flash):
    path, _ = _sharded_without_index(tmp_path, flash)
    model = module_for(flash)
    load_checkpoint(model, path)


# ----------------------------------------------------------------------------- memory check
GiB = 2**30


@pytest.fixture
def small_machine(monkeypatch):
    """A machine with 24 GiB available, whatever this one has; nothing may build a model."""
    import exporter.checkpoint as ck

    monkeypatch.delenv("HATRT_SKIP_MEMORY_CHECK", raising=False)
    monkeypatch.setattr(ck, "available_memory", lambda device="cpu": (24 * GiB, "MemAvailable in /proc/meminfo"))


@pytest.fixture
def no_model_build(monkeypatch):
    import exporter.model

    def boom(*a, **k):
        raise AssertionError("a model was built before the memory check")

    monkeypatch.setattr(exporter.model, "Transformer", boom)


@pytest.mark.parametrize("dtype, need", [(torch.float32, 1059), (torch.bfloat16, 1059)])
def test_memory_check_v4_flash_preset(small_machine, no_model_build, dtype, need):
    import time

    t = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        load_model("v4-flash", dtype=dtype)
    assert time.monotonic() - t < 5
    msg = str(e.value)
    assert f"preset 'v4-flash' needs about {need}." in msg and "GiB for its weights in float32" in msg
    assert "this machine has 24.0 GiB available (MemAvailable in /proc/meminfo)" in msg
    assert "HATRT_SKIP_MEMORY_CHECK=1" in msg
    if dtype == torch.bfloat16:
        assert "then cast to bfloat16" in msg


def test_memory_check_checkpoint_runs_before_reading(small_machine, no_model_build, tmp_path):
    """Only config.json: the memory verdict comes before the shards are even looked at."""
    ckpt = tmp_path / "flash-ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(preset("v4-flash").to_hf_dict()))
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(ckpt))} needs about 529\.\d GiB for its "
                                              r"weights in bfloat16, this machine has 24\.0 GiB"):
        load_model(str(ckpt), dtype=torch.bfloat16)


def test_memory_check_small_preset_passes(small_machine):
    assert load_model("tiny-flash") is not None


def test_memory_check_real_machine_small_preset_and_v4_flash(monkeypatch, no_model_build):
    from exporter.checkpoint import available_memory

    monkeypatch.delenv("HATRT_SKIP_MEMORY_CHECK", raising=False)
    avail = available_memory()
    if avail is None:
        pytest.skip("available memory cannot be read here")
    assert avail[0] > 0
    if avail[0] > 1100 * GiB:
        pytest.skip("this machine could hold v4-flash in float32")
    with pytest.raises(CheckpointError, match="needs about 1059"):
        load_model("v4-flash")


def test_memory_check_escape_hatches(small_machine, monkeypatch):
    import exporter.checkpoint as ck

    monkeypatch.setattr(ck, "available_memory", lambda device="cpu": (1024, "test"))
    with pytest.raises(CheckpointError, match=r"preset .tiny-flash. needs about 2\.3 MiB .* has 0\.0 MiB available \(test\)"):
        load_model("tiny-flash")
    assert load_model("tiny-flash", check_memory=False) is not None
    monkeypatch.setenv("HATRT_SKIP_MEMORY_CHECK", "1")
    assert load_model("tiny-flash") is not None


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_bytes_matches_the_loaded_model(name, dtype):
    from exporter.checkpoint import weight_bytes

    model = load_model(name, dtype=dtype)
    got = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert weight_bytes(preset(name), dtype) == got


def test_available_memory_unknown_device_and_cuda_without_gpu():
    from exporter.checkpoint import available_memory

    assert available_memory("meta") is None
    if not torch.cuda.is_available():
        assert available_memory("cuda") is None


def test_memory_check_hint_for_a_float32_checkpoint(small_machine, no_model_build, tmp_path):
    ckpt = tmp_path / "flash-ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(preset("v4-flash").to_hf_dict()))
    with pytest.raises(CheckpointError, match=r"in float32, .* Use a smaller model or dtype \(in bfloat16 it "
                                              r"needs about 529\.\d GiB, still too much\)"):
        load_model(str(ckpt))


def test_cgroup_limits_v2_and_v1(tmp_path):
    """A container's memory limit (not visible in /proc/meminfo) counts; file cache is reclaimable."""
    from exporter.checkpoint import _cgroup_available

    v2 = tmp_path / "v2"
    (v2 / "kubepods" / "pod1").mkdir(parents=True)
    (v2 / "kubepods" / "memory.max").write_text(f"{8 * GiB}\n")
    (v2 / "kubepods" / "memory.current").write_text(f"{3 * GiB}\n")
    (v2 / "kubepods" / "memory.stat").write_text(f"anon 1\ninactive_file {1 * GiB}\n")
    (v2 / "kubepods" / "pod1" / "memory.max").write_text("max\n")  # no limit of its own: the parent's counts
    (v2 / "kubepods" / "pod1" / "memory.current").write_text("5\n")
    (tmp_path / "cg2").write_text("0::/kubepods/pod1\n")
    assert _cgroup_available(str(tmp_path / "cg2"), str(v2)) == 6 * GiB
    v1 = tmp_path / "v1"
    (v1 / "memory" / "docker" / "abc").mkdir(parents=True)
    (v1 / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text(f"{4 * GiB}\n")
    (v1 / "memory" / "docker" / "abc" / "memory.usage_in_bytes").write_text(f"{1 * GiB}\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # the root: no limit
    (v1 / "memory" / "memory.usage_in_bytes").write_text("1\n")
    (tmp_path / "cg1").write_text("12:cpu:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    assert _cgroup_available(str(tmp_path / "cg1"), str(v1)) == 3 * GiB
    (tmp_path / "cg0").write_text("0::/\n")
    assert _cgroup_available(str(tmp_path / "cg0"), str(tmp_path / "none")) is None
    assert _cgroup_available(str(tmp_path / "missing"), str(v2)) is None
