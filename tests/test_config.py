"""ModelConfig: presets against the spec table, both config.json spellings, and every error.

The figures come from the attention spec, section 1 (/work/shared/docs/attention-spec.md).
The newer spelling is produced by the real `transformers.DeepseekV4Config`, not written by hand.
"""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.config import CSA, HCA, WINDOW, ConfigError, ModelConfig, Yarn
from exporter.presets import PRESETS, preset

transformers = pytest.importorskip("transformers")
DeepseekV4Config = transformers.DeepseekV4Config

LOGGER = "exporter.config"


# ---------------------------------------------------------------------------- official configs
def official(kind: str = "flash", mtp_ratio: int = 0) -> dict:
    """A config.json in the official spelling, written from the spec table (not from presets)."""
    flash = kind == "flash"
    n = 43 if flash else 61
    head = [WINDOW, WINDOW] if flash else [HCA, HCA]
    ratios = head + [CSA if i % 2 == 0 else HCA for i in range(2, n)] + [mtp_ratio]  # + MTP block
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "torch_dtype": "bfloat16",
        "bos_token_id": 0,
        "eos_token_id": 1,
        "hidden_act": "silu",
        "topk_method": "noaux_tc",
        "vocab_size": 129280,
        "hidden_size": 4096 if flash else 7168,
        "num_hidden_layers": n,
        "num_attention_heads": 64 if flash else 128,
        "num_key_value_heads": 1,
        "head_dim": 512,
        "qk_rope_head_dim": 64,
        "q_lora_rank": 1024 if flash else 1536,
        "o_groups": 8 if flash else 16,
        "o_lora_rank": 1024,
        "sliding_window": 128,
        "compress_ratios": ratios,
        "index_n_heads": 64,
        "index_head_dim": 128,
        "index_topk": 512 if flash else 1024,
        "rope_theta": 10000,
        "compress_rope_theta": 160000,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
        "max_position_embeddings": 1048576,
        "rms_norm_eps": 1e-6,
        "hc_mult": 4,
        "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-6,
        "n_routed_experts": 256 if flash else 384,
        "n_shared_experts": 1,
        "num_experts_per_tok": 6,
        "moe_intermediate_size": 2048 if flash else 3072,
        "routed_scaling_factor": 1.5 if flash else 2.5,
        "num_hash_layers": 3,
        "scoring_func": "sqrtsoftplus",
        "norm_topk_prob": True,
        "swiglu_limit": 10.0,
        "num_nextn_predict_layers": 1,
        "tie_word_embeddings": False,
    }


def hf_spelling(d: dict) -> dict:
    """The newer spelling, made by transformers itself from an official dict."""
    return DeepseekV4Config(**copy.deepcopy(d)).to_dict()


def nested_no_ratios(kind: str = "flash") -> dict:
    """Hand-written newer spelling: layer_types + mlp_layer_types + nested rope, no legacy keys."""
    d = official(kind)
    n = d["num_hidden_layers"]
    ratios = d.pop("compress_ratios")[:n]
    scaling = d.pop("rope_scaling")
    theta, ctheta = d.pop("rope_theta"), d.pop("compress_rope_theta")
    n_hash = d.pop("num_hash_layers")
    d["layer_types"] = [{WINDOW: "sliding_attention", CSA: "compressed_sparse_attention",
                         HCA: "heavily_compressed_attention"}[r] for r in ratios]
    d["mlp_layer_types"] = ["hash_moe"] * n_hash + ["moe"] * (n - n_hash)
    d["rope_parameters"] = {
        "main": {"rope_type": "default", "rope_theta": theta},
        "compress": {"rope_type": "yarn", "rope_theta": ctheta, "attention_factor": 1.0,
                     **{k: v for k, v in scaling.items() if k != "type"}},
    }
    return d


def tiny(**changes) -> dict:
    """A small official-spelling dict (tiny-flash), with changes applied; None deletes a key."""
    d = preset("tiny-flash").to_hf_dict()
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    return d


def load(d: dict) -> ModelConfig:
    return ModelConfig.from_hf_dict(d)


def raises(match: str):
    return pytest.raises(ConfigError, match=match)


# ---------------------------------------------------------------------------- presets vs the spec
SPEC = {
    "v4-flash": dict(hidden_size=4096, num_layers=43, num_heads=64, q_lora_rank=1024, o_groups=8,
                     index_topk=512, n_routed_experts=256, moe_intermediate_size=2048,
                     routed_scaling_factor=1.5),
    "v4-pro": dict(hidden_size=7168, num_layers=61, num_heads=128, q_lora_rank=1536, o_groups=16,
                   index_topk=1024, n_routed_experts=384, moe_intermediate_size=3072,
                   routed_scaling_factor=2.5),
}
COMMON = dict(head_dim=512, rope_dim=64, nope_dim=448, o_lora_rank=1024, window=128, index_n_heads=64,
              index_head_dim=128, rope_theta=10000.0, compress_rope_theta=160000.0,
              max_position_embeddings=1048576, vocab_size=129280, rms_norm_eps=1e-6, hc_mult=4,
              hc_sinkhorn_iters=20, hc_eps=1e-6, ffn_type="moe", n_shared_experts=1,
              num_experts_per_tok=6, num_hash_layers=3, scoring_func="sqrtsoftplus", swiglu_limit=10.0,
              num_nextn_predict_layers=1)


@pytest.mark.parametrize("name", sorted(SPEC))
def test_preset_dims_match_spec(name):
    c = preset(name)
    for key, want in {**COMMON, **SPEC[name]}.items():
        assert getattr(c, key) == want, key
    assert c.yarn == Yarn(factor=16.0, original_max_position_embeddings=65536, beta_fast=32.0,
                          beta_slow=1.0)
    assert c.name == name


def _by_kind(c: ModelConfig) -> dict[int, set[int]]:
    return {k: {i for i, r in enumerate(c.compress_ratios) if r == k} for k in (WINDOW, CSA, HCA)}


def test_flash_schedule():
    c = preset("v4-flash")
    kinds = _by_kind(c)
    assert kinds[WINDOW] == {0, 1}
    assert kinds[CSA] == set(range(2, 43, 2)) and len(kinds[CSA]) == 21
    assert kinds[HCA] == set(range(3, 42, 2)) and len(kinds[HCA]) == 20
    assert [c.layer_type(i) for i in (0, 1, 2, 3)] == [
        "sliding_attention", "sliding_attention", "compressed_sparse_attention",
        "heavily_compressed_attention"]
    assert [c.is_hash_layer(i) for i in range(5)] == [True, True, True, False, False]


def test_pro_schedule():
    kinds = _by_kind(preset("v4-pro"))
    assert kinds[WINDOW] == set()
    assert kinds[CSA] == set(range(2, 61, 2)) and len(kinds[CSA]) == 30
    assert kinds[HCA] == {0, 1} | set(range(3, 60, 2)) and len(kinds[HCA]) == 31


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips(name):
    c = preset(name)
    d = c.to_hf_dict()
    assert ModelConfig.from_hf_dict(d) == c
    assert ModelConfig.from_hf_dict(json.loads(json.dumps(d))) == c
    # the official spelling carries one extra entry per MTP block
    assert len(d["compress_ratios"]) == c.num_layers + c.num_nextn_predict_layers


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if preset(n).ffn_type == "moe"))
def test_every_preset_round_trips_through_transformers(name):  # DeepseekV4Config is MoE only
    c = preset(name)
    assert load(hf_spelling(c.to_hf_dict())) == c


def test_unknown_preset():
    with raises(r"unknown preset 'v5'.*v4-flash"):
        preset("v5")


# ---------------------------------------------------------------------------- both spellings
@pytest.mark.parametrize("kind", ["flash", "pro"])
def test_official_spelling_matches_preset(kind, caplog):
    with caplog.at_level("WARNING", logger=LOGGER):
        c = load(official(kind))
    assert c == preset(f"v4-{kind}")
    assert len(official(kind)["compress_ratios"]) == c.num_layers + 1  # MTP entry dropped
    assert not caplog.records  # every official key is known


@pytest.mark.parametrize("mtp_ratio", [WINDOW, CSA, HCA])
def test_mtp_entry_is_dropped_whatever_it_is(mtp_ratio):
    assert load(official("flash", mtp_ratio)) == preset("v4-flash")


def test_compress_ratios_without_mtp_entry():
    d = official("pro")
    d["compress_ratios"] = d["compress_ratios"][:-1]
    assert load(d) == preset("v4-pro")


@pytest.mark.parametrize("kind", ["flash", "pro"])
def test_transformers_spelling_matches_official(kind, tmp_path):
    off = official(kind)
    cfg = DeepseekV4Config(**copy.deepcopy(off))
    td = cfg.to_dict()
    # what transformers made of it: the newer spelling, legacy keys gone
    assert "compress_ratios" not in td and "num_hash_layers" not in td and "rope_scaling" not in td
    assert len(td["layer_types"]) == off["num_hidden_layers"]
    assert set(td["rope_parameters"]) == {"main", "compress"}
    assert td["rope_parameters"]["compress"]["rope_type"] == "yarn"
    assert td["mlp_layer_types"][:4] == ["hash_moe"] * 3 + ["moe"]

    want = load(off)
    assert want == preset(f"v4-{kind}")
    assert load(td) == want
    assert load(json.loads(json.dumps(td))) == want
    assert load(json.loads(cfg.to_json_string(use_diff=False))) == want
    assert load(json.loads(cfg.to_json_string())) == want  # the diff form save_pretrained writes

    cfg.save_pretrained(tmp_path)
    got = ModelConfig.from_json(tmp_path / "config.json")
    assert got == want and got.name == tmp_path.name


def test_transformers_fallback_schedule_is_not_pro():
    """Why hatrt never guesses: transformers' default schedule is not V4-Pro's."""
    d = official("pro")
    del d["compress_ratios"]
    guessed = load(hf_spelling(d))
    assert guessed.compress_ratios != preset("v4-pro").compress_ratios
    with raises("names no layer schedule"):
        load(d)


@pytest.mark.parametrize("kind", ["flash", "pro"])
def test_nested_rope_and_no_compress_ratios(kind):
    d = nested_no_ratios(kind)
    assert "compress_ratios" not in d and "rope_scaling" not in d and "rope_theta" not in d
    assert load(d) == preset(f"v4-{kind}")


def test_flat_rope_parameters_is_read_as_rope_scaling():
    d = official("flash")
    d["rope_parameters"] = d.pop("rope_scaling")
    assert load(d) == preset("v4-flash")


def test_compress_ratios_and_layer_types_agreeing():
    d = official("pro")
    d["layer_types"] = hf_spelling(d)["layer_types"]
    assert load(d) == preset("v4-pro")
    d["mlp_layer_types"] = ["hash_moe"] * 3 + ["moe"] * 58  # agrees with num_hash_layers
    assert load(d) == preset("v4-pro")


def test_partial_rotary_factor_instead_of_qk_rope_head_dim():
    d = official("flash")
    del d["qk_rope_head_dim"]
    d["partial_rotary_factor"] = 0.125
    assert load(d).rope_dim == 64


def test_integral_floats_are_accepted():
    c = load(tiny(hidden_size=64.0, num_hash_layers=1.0))
    assert c.hidden_size == 64 and isinstance(c.hidden_size, int) and c.num_hash_layers == 1


def test_unknown_keys_only_warn(caplog):
    d = tiny(my_new_feature=[1, 2], some_flag=True)
    with caplog.at_level("WARNING", logger=LOGGER):
        c = load(d)
    assert c == preset("tiny-flash")
    text = caplog.text
    assert "'my_new_feature'" in text and "'some_flag'" in text
    assert all(r.levelname == "WARNING" for r in caplog.records)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([WINDOW, CSA, HCA]), min_size=1, max_size=9),
       st.integers(0, 1), st.sampled_from([WINDOW, CSA, HCA]))
def test_random_schedules_read_the_same_in_both_spellings(ratios, n_mtp, mtp_ratio):
    c = preset("tiny-flash").replace(compress_ratios=tuple(ratios), num_layers=len(ratios),
                                     num_hash_layers=min(1, len(ratios)), num_nextn_predict_layers=n_mtp)
    d = c.to_hf_dict()
    d["compress_ratios"] = list(ratios) + [mtp_ratio] * n_mtp
    assert load(d) == c
    td = hf_spelling(d)
    assert load(td) == c
    assert load({**d, "layer_types": td["layer_types"]}) == c


# ---------------------------------------------------------------------------- errors: schedule
def test_no_schedule_is_never_guessed():
    with raises(r"no layer schedule.*'compress_ratios'.*'layer_types'.*never guesses"):
        load(tiny(compress_ratios=None))
    d = tiny(compress_ratios=None)
    d["layer_types"] = None
    with raises("no layer schedule"):
        load(d)


def test_compress_ratios_wrong_length():
    d = official("flash")
    d["compress_ratios"] = d["compress_ratios"][:42]
    with raises(r"'compress_ratios' = \[0, 0, 4, 128.*has 42 entries.*num_hidden_layers=43 "
                r"\(\+ num_nextn_predict_layers=1\)"):
        load(d)
    d["compress_ratios"] = official("flash")["compress_ratios"] + [0]
    with raises(r"'compress_ratios' = .*has 45 entries"):
        load(d)
    with raises(r"'compress_ratios' = 'x'"):
        load(tiny(compress_ratios="x"))


def test_unknown_ratio():
    d = official("flash")
    d["compress_ratios"][5] = 8
    with raises(r"'compress_ratios\[5\]' = 8: must be one of \[0, 4, 128\]"):
        load(d)
    d = official("flash")
    d["compress_ratios"][-1] = 64  # the MTP entry is checked too
    with raises(r"'compress_ratios\[43\]' = 64"):
        load(d)


def test_unknown_layer_type():
    d = nested_no_ratios()
    d["layer_types"][3] = "full_attention"
    with raises(r"'layer_types\[3\]' = 'full_attention': must be one of"):
        load(d)


def test_layer_types_wrong_length():
    d = nested_no_ratios()
    d["layer_types"] = d["layer_types"][:-1]
    with raises(r"'layer_types' has 42 entries for num_hidden_layers=43"):
        load(d)


def test_compress_ratios_and_layer_types_disagree():
    d = official("pro")
    types = hf_spelling(d)["layer_types"]
    types[2] = "heavily_compressed_attention"
    d["layer_types"] = types
    with raises(r"'compress_ratios' = \[128, 128, 4, .*'layer_types' disagree.*\[128, 128, 128, "):
        load(d)


@pytest.mark.parametrize("rates, key, value", [
    ({"compress_rates": {"compressed_sparse_attention": 8}}, "compressed_sparse_attention", 8),
    ({"compress_rates": {"heavily_compressed_attention": 64}}, "heavily_compressed_attention", 64),
    ({"compress_rate_csa": 2}, "compressed_sparse_attention", 2),
    ({"compress_rate_hca": 256}, "heavily_compressed_attention", 256),
])
@pytest.mark.parametrize("spelling", ["layer_types", "compress_ratios"])
def test_compress_rates_must_be_4_and_128(rates, key, value, spelling):
    d = nested_no_ratios() if spelling == "layer_types" else official("flash")
    d.update(rates)
    with raises(rf"'compress_rates\['{key}'\]' = {value}: hatrt implements"):
        load(d)


def test_compress_rates_agreeing_are_fine():
    d = nested_no_ratios()
    d.update(compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
             compress_rate_csa=4, compress_rate_hca=128)
    assert load(d) == preset("v4-flash")


# ---------------------------------------------------------------------------- errors: attention
def test_num_key_value_heads_must_be_one():
    with raises(r"'num_key_value_heads' = 8: .*one KV head"):
        load(tiny(num_key_value_heads=8))


def test_kv_lora_rank_means_v3():
    with raises(r"'kv_lora_rank' = 512: .*DeepSeek-V3"):
        load(tiny(kv_lora_rank=512))
    assert load(tiny(kv_lora_rank=0)) == preset("tiny-flash")
    assert load(tiny(kv_lora_rank=None)) == preset("tiny-flash")


@pytest.mark.parametrize("key", [
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
    "q_lora_rank", "o_groups", "o_lora_rank", "n_routed_experts", "num_experts_per_tok",
    "moe_intermediate_size"])
def test_missing_required_key(key):
    with raises(rf"config key '{key}' is missing"):
        load(tiny(**{key: None}))


def test_missing_rope_dim_and_hash_layers():
    with raises(r"'qk_rope_head_dim' is missing.*'partial_rotary_factor'"):
        load(tiny(qk_rope_head_dim=None))
    with raises(r"'num_hash_layers' is missing.*'mlp_layer_types'"):
        load(tiny(num_hash_layers=None))
    with raises(r"'intermediate_size' is missing"):
        load(tiny(ffn_type="dense"))


@pytest.mark.parametrize("rope", [80, 96, 15, 0, -16])
def test_bad_qk_rope_head_dim(rope):
    with raises(rf"'qk_rope_head_dim' = {rope}: must be even, > 0 and < head_dim=80"):
        load(tiny(qk_rope_head_dim=rope))


def test_partial_rotary_factor_disagreeing_with_qk_rope_head_dim():
    d = official("flash")
    d["partial_rotary_factor"] = 0.25
    with raises(r"'partial_rotary_factor' = 0.25.*qk_rope_head_dim=64"):
        load(d)
    d["partial_rotary_factor"] = 0.125
    assert load(d) == preset("v4-flash")


def test_o_groups_must_divide():
    with raises(r"'o_groups' = 7: must divide num_attention_heads\*head_dim = 32768"):
        load(official("flash") | {"o_groups": 7})


def test_index_head_dim_must_exceed_rope_dim():
    with raises(r"'index_head_dim' = 16: must exceed qk_rope_head_dim=16"):
        load(tiny(index_head_dim=16))


# ---------------------------------------------------------------------------- errors: MoE
def test_num_experts_per_tok_exceeds_experts():
    with raises(r"'num_experts_per_tok' = 300: exceeds n_routed_experts=256"):
        load(official("flash") | {"num_experts_per_tok": 300})


def test_unknown_scoring_func():
    with raises(r"'scoring_func' = 'tanh': must be one of"):
        load(tiny(scoring_func="tanh"))


@pytest.mark.parametrize("func", ["sqrtsoftplus", "softmax", "sigmoid"])
def test_known_scoring_funcs(func):
    assert load(tiny(scoring_func=func)).scoring_func == func


def test_mlp_layer_types_hash_not_first():
    d = nested_no_ratios()
    d["mlp_layer_types"] = ["hash_moe", "moe", "hash_moe"] + ["moe"] * 40
    with raises(r"'mlp_layer_types' = \['hash_moe', 'moe', 'hash_moe'.*hash layers must come first"):
        load(d)


def test_mlp_layer_types_disagree_with_num_hash_layers():
    d = nested_no_ratios()
    d["mlp_layer_types"] = ["hash_moe"] * 2 + ["moe"] * 41
    d["num_hash_layers"] = 3
    with raises(r"'num_hash_layers' = 3 and 'mlp_layer_types' \(2 hash layers\) disagree"):
        load(d)
    del d["num_hash_layers"]
    assert load(d).num_hash_layers == 2


def test_mlp_layer_types_bad_entry_or_length():
    d = nested_no_ratios()
    d["mlp_layer_types"][4] = "dense"
    with raises(r"'mlp_layer_types\[4\]' = 'dense'"):
        load(d)
    d["mlp_layer_types"] = ["moe"] * 42
    with raises(r"'mlp_layer_types' = .*needs 43 entries"):
        load(d)


def test_num_hash_layers_out_of_range():
    with raises(r"'num_hash_layers' = 5: must be in \[0, 4\]"):
        load(tiny(num_hash_layers=5))


@pytest.mark.parametrize("changes, match", [
    ({"norm_topk_prob": False}, r"'norm_topk_prob' = False"),
    ({"n_group": 8, "topk_group": 4}, r"'n_group'/'topk_group' = 8/4"),
    ({"n_shared_experts": 2}, r"'n_shared_experts' = 2"),
    ({"intermediate_size": 999}, r"'intermediate_size' = 999: .*moe_intermediate_size=32"),
    ({"n_routed_experts": 0}, r"'n_routed_experts' = 0"),
])
def test_other_moe_errors(changes, match):
    with raises(match):
        load(tiny(**changes))


def test_unknown_ffn_type():
    with raises(r"'ffn_type' = 'mlp': must be one of \('moe', 'dense'\)"):
        load(tiny(ffn_type="mlp"))


# ---------------------------------------------------------------------------- errors: RoPE
@pytest.mark.parametrize("key, value", [("attention_factor", 1.277), ("attention_factor", 0),
                                        ("mscale", 0.707), ("mscale_all_dim", 0.5)])
def test_yarn_with_attention_scaling(key, value):
    d = official("flash")
    d["rope_scaling"][key] = value
    with raises(rf"'rope_scaling.{key}' = {value}: .*no attention scaling"):
        load(d)
    d = nested_no_ratios()
    d["rope_parameters"]["compress"][key] = value
    with raises(rf"'rope_parameters.compress.{key}' = {value}"):
        load(d)


def test_yarn_without_scaling_is_fine():
    d = official("flash")
    d["rope_scaling"].update(attention_factor=1.0, mscale=1.0, mscale_all_dim=1.0)
    assert load(d) == preset("v4-flash")
    d["rope_scaling"].update(mscale=0, mscale_all_dim=0)  # DeepSeek's "no mscale"
    assert load(d) == preset("v4-flash")


@pytest.mark.parametrize("key", ["factor", "original_max_position_embeddings"])
def test_yarn_missing_key(key):
    d = official("flash")
    del d["rope_scaling"][key]
    with raises(rf"'rope_scaling.{key}' is missing for YaRN"):
        load(d)
    d = nested_no_ratios()
    del d["rope_parameters"]["compress"][key]
    with raises(rf"'rope_parameters.compress.{key}' is missing"):
        load(d)


@pytest.mark.parametrize("factor", [0.5, float("inf"), float("nan")])
def test_yarn_bad_factor(factor):
    d = official("flash")
    d["rope_scaling"]["factor"] = factor
    with raises(rf"'rope_scaling.factor' = {factor}"):
        load(d)


@pytest.mark.parametrize("kind", ["longrope", "linear", "dynamic", "llama3"])
def test_unknown_rope_type(kind):
    d = official("flash")
    d["rope_scaling"] = {"type": kind, "factor": 16.0, "original_max_position_embeddings": 65536}
    with raises(rf"'rope_scaling.rope_type' = '{kind}': V4 uses 'yarn' or 'default'"):
        load(d)
    d = nested_no_ratios()
    d["rope_parameters"]["compress"]["rope_type"] = kind
    with raises(rf"'rope_parameters.compress.rope_type' = '{kind}'"):
        load(d)


def test_main_rope_must_be_default():
    d = nested_no_ratios()
    d["rope_parameters"]["main"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 16.0,
                                    "original_max_position_embeddings": 65536}
    with raises(r"'rope_parameters.main.rope_type' = 'yarn': window-only layers use plain RoPE"):
        load(d)


def test_no_yarn_means_plain_rope():
    c = load(tiny(rope_scaling=None))
    assert c.yarn is None
    assert load(c.to_hf_dict()) == c


# ---------------------------------------------------------------------------- errors: integers
@pytest.mark.parametrize("key, value", [
    ("hidden_size", 64.5), ("hidden_size", "64"), ("hidden_size", True), ("hidden_size", None),
    ("hidden_size", float("nan")), ("hidden_size", float("inf")), ("head_dim", 80.5),
    ("num_hidden_layers", "4"), ("vocab_size", [512]), ("sliding_window", 127.9),
    ("index_topk", "16"), ("num_hash_layers", 1.5), ("num_hash_layers", "1"),
    ("num_nextn_predict_layers", 0.5), ("num_attention_heads", -4), ("hidden_size", 0),
])
def test_non_integer_sizes(key, value):
    d = tiny()
    d[key] = value
    with raises(rf"config key '{key}' = {re.escape(repr(value))}: must be"):
        load(d)


# ---------------------------------------------------------------------------- quant-sim checks
def test_check_quant_sim():
    c = preset("tiny-flash")
    assert (c.head_dim, c.rope_dim) == (80, 16)
    c.check_quant_sim()  # 64 non-RoPE dims tile one FP8 block
    preset("v4-flash").check_quant_sim()
    preset("v4-pro").check_quant_sim()
    with raises(r"'head_dim' = 96: .*head_dim - qk_rope_head_dim = 80.*multiple of 64"):
        c.replace(head_dim=96).check_quant_sim()
    with raises(r"'index_head_dim' = 96: .*power of two"):
        c.replace(index_head_dim=96).check_quant_sim()
    with raises(r"'index_head_dim' = 48"):
        c.replace(index_head_dim=48).check_quant_sim()
    # without a CSA layer there is no indexer to check
    preset("tiny-hca").replace(index_head_dim=96).check_quant_sim()


# ---------------------------------------------------------------------------- from_json
def test_from_json_ok(tmp_path):
    p = tmp_path / "My-Model" / "config.json"
    p.parent.mkdir()
    p.write_text(json.dumps(official("pro")))
    c = ModelConfig.from_json(p)
    assert c == preset("v4-pro") and c.name == "My-Model"
    assert ModelConfig.from_json(str(p)) == c


def test_from_json_missing_file(tmp_path):
    p = tmp_path / "nope" / "config.json"
    with raises(re.escape(str(p)) + ": no such config file"):
        ModelConfig.from_json(p)


def test_from_json_invalid_json(tmp_path):
    p = tmp_path / "config.json"
    p.write_text('{"hidden_size": 64,')
    with raises(re.escape(str(p)) + ": not valid JSON"):
        ModelConfig.from_json(p)


@pytest.mark.parametrize("text", ["[1, 2]", '"config"', "42", "null"])
def test_from_json_not_an_object(tmp_path, text):
    p = tmp_path / "config.json"
    p.write_text(text)
    with raises(re.escape(str(p)) + ": top level must be a JSON object"):
        ModelConfig.from_json(p)


def test_from_json_bad_value_names_path_and_key(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(official("flash") | {"num_key_value_heads": 4}))
    with raises(re.escape(str(p)) + r": config key 'num_key_value_heads' = 4"):
        ModelConfig.from_json(p)


# ---------------------------------------------------------------------------- direct construction
def test_constructor_validates():
    c = preset("tiny-flash")
    with raises(r"'compress_ratios' = \[0, 0, 4\]: has 3 entries for num_hidden_layers=4"):
        c.replace(compress_ratios=(0, 0, 4))
    with raises(r"'compress_ratios\[1\]' = 16"):
        c.replace(compress_ratios=(0, 16, 4, 128))
    with raises(r"'rope_scaling.factor' = 0.5"):
        c.replace(yarn=Yarn(factor=0.5, original_max_position_embeddings=256))
    assert math.isclose(c.nope_dim, 64)


# ---------------------------------------------------------------------------- errors: float keys
# Every float-valued key, where it lives in the dict (official / nested spelling), and a value of
# the wrong type gives ConfigError naming the key, never a TypeError/ValueError traceback.
FLOAT_KEYS = ["rms_norm_eps", "hc_eps", "swiglu_limit", "routed_scaling_factor", "rope_theta",
              "compress_rope_theta", "partial_rotary_factor"]
NESTED_FLOAT_KEYS = [("rope_scaling", "factor"), ("rope_scaling", "beta_fast"), ("rope_scaling", "beta_slow")]
BAD_FLOATS = ["abc", "1e-6", [1e-6], {"value": 1.0}, True, False, None, float("nan"), float("inf")]


@pytest.mark.parametrize("bad", BAD_FLOATS, ids=repr)
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_float_key_with_wrong_type(key, bad):
    if key == "partial_rotary_factor" and bad is None:
        assert load(official("flash") | {key: None}) == preset("v4-flash")  # null: not given
        return
    with raises(rf"config key '{key}' = {re.escape(repr(bad))}: must be a finite number"):
        load(official("flash") | {key: bad})


@pytest.mark.parametrize("bad", BAD_FLOATS, ids=repr)
@pytest.mark.parametrize("where, key", NESTED_FLOAT_KEYS)
def test_nested_float_key_with_wrong_type(where, key, bad):
    d = official("flash")
    d[where][key] = bad
    with raises(rf"config key '{where}.{key}' = {re.escape(repr(bad))}: must be a finite number"):
        load(d)


@pytest.mark.parametrize("bad", BAD_FLOATS, ids=repr)
@pytest.mark.parametrize("part, key", [("main", "rope_theta"), ("compress", "rope_theta"),
                                       ("compress", "factor"), ("compress", "beta_fast"),
                                       ("compress", "beta_slow")])
def test_rope_parameters_float_with_wrong_type(part, key, bad):
    d = nested_no_ratios()
    d["rope_parameters"][part][key] = bad
    with raises(rf"config key 'rope_parameters.{part}.{key}' = {re.escape(repr(bad))}: must be a finite number"):
        load(d)


@pytest.mark.parametrize("bad", ["65536", [65536], True, 65536.5, None])
def test_yarn_original_max_position_embeddings_wrong_type(bad):
    d = official("flash")
    d["rope_scaling"]["original_max_position_embeddings"] = bad
    with raises(rf"'rope_scaling.original_max_position_embeddings' = {re.escape(repr(bad))}: must be an integer"):
        load(d)


@pytest.mark.parametrize("bad", ["yarn", [1], 3])
def test_rope_scaling_not_an_object(bad):
    with raises(rf"config key 'rope_scaling' = {re.escape(repr(bad))}: must be a JSON object"):
        load(official("flash") | {"rope_scaling": bad})


@pytest.mark.parametrize("key, value, why", [
    ("rms_norm_eps", 0.0, "must be > 0"), ("rms_norm_eps", -1e-6, "must be > 0"),
    ("rope_theta", 0.0, "must be > 0"), ("compress_rope_theta", -1.0, "must be > 0"),
    ("routed_scaling_factor", 0.0, "must be > 0"), ("hc_eps", -1e-6, "must be >= 0"),
    ("swiglu_limit", -1.0, "must be >= 0")])
def test_float_key_out_of_range(key, value, why):
    with raises(rf"config key '{key}' = {re.escape(repr(value))}: {why}"):
        load(official("flash") | {key: value})


def test_float_keys_accept_ints_and_zero_where_meaningful():
    c = load(official("flash") | {"rope_theta": 10000, "swiglu_limit": 0, "hc_eps": 0, "routed_scaling_factor": 1})
    assert c.rope_theta == 10000.0 and isinstance(c.rope_theta, float) and c.swiglu_limit == 0.0


def test_constructor_checks_float_types():
    c = preset("tiny-flash")
    for key in ("rms_norm_eps", "hc_eps", "swiglu_limit", "routed_scaling_factor", "rope_theta",
                "compress_rope_theta"):
        with raises(rf"config key '{key}' = 'x': must be a finite number"):
            c.replace(**{key: "x"})
    with raises(r"'rope_scaling.beta_fast' = 'x': must be a finite number"):
        c.replace(yarn=Yarn(factor=16.0, original_max_position_embeddings=256, beta_fast="x"))


@pytest.mark.parametrize("key, value", [("num_nextn_predict_layers", "one"), ("compress_ratios", [0, 0, [4], 128]),
                                        ("compress_ratios", [0, False, 4, 128])])
def test_schedule_keys_with_wrong_type(key, value):
    with raises(rf"config key '{key}"):
        load(tiny(**{key: value}))


def test_float_key_with_wrong_type_from_the_cli_exits_2(tmp_path):
    from click.testing import CliRunner

    from engines.cli import main

    p = tmp_path / "config.json"
    p.write_text(json.dumps(official("flash") | {"rms_norm_eps": "abc"}))
    r = CliRunner().invoke(main, ["inspect", "--config", str(p)])
    assert r.exit_code == 2, r.output
    assert "'rms_norm_eps' = 'abc': must be a finite number" in r.output
    assert "Traceback" not in r.output


# ---------------------------------------------------------------------------- hatrt inspect --config DIR
def test_inspect_config_accepts_a_checkpoint_directory(tmp_path):
    from click.testing import CliRunner

    from engines.cli import main

    ckpt = tmp_path / "my-checkpoint"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(official("flash")))
    runner = CliRunner()
    by_dir = runner.invoke(main, ["inspect", "--config", str(ckpt), "--context", "128K", "--json"])
    by_file = runner.invoke(main, ["inspect", "--config", str(ckpt / "config.json"), "--context", "128K", "--json"])
    assert by_dir.exit_code == 0, by_dir.output
    assert by_dir.output == by_file.output
    assert json.loads(by_dir.output)


def test_inspect_config_directory_without_config_json(tmp_path):
    from click.testing import CliRunner

    from engines.cli import main

    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    r = CliRunner().invoke(main, ["inspect", "--config", str(empty)])
    assert r.exit_code == 2, r.output
    assert f"{empty} is a directory without a config.json" in r.output
    assert "'--config'" in r.output and "Traceback" not in r.output
