"""KV-cache and FLOP accounting (exporter/costs.py) and `hatrt inspect` (engines/cli.py).

The figures come from the attention spec, section 7 (/work/shared/docs/attention-spec.md).
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from engines.cli import main
from exporter import ConfigError, preset
from exporter.config import CSA, HCA, WINDOW
from exporter.costs import (GIB, PUBLISHED_ACTIVE_PARAMS, V32_PUBLISHED_ACTIVE_PARAMS, ActiveParams,
                            format_report, gqa8_baseline, indexer_key_bytes, layer_params,
                            main_entry, model_active_params, model_costs, published_model,
                            v32_active_params, v32_baseline, v32_kv_entry_bytes)
from exporter.presets import PRESETS

N = 2**20
G = 1e9


@pytest.fixture(scope="module")
def flash():
    return model_costs(preset("v4-flash"), N)


@pytest.fixture(scope="module")
def pro():
    return model_costs(preset("v4-pro"), N)


# ---------------------------------------------------------------------------- entry sizes
def test_main_entry_is_584_bytes():
    e = main_entry(512, 64)
    assert (e.nope_fp8_bytes, e.rope_bf16_bytes, e.scale_bytes, e.pad_bytes, e.bytes) == (448, 128, 7, 1, 584)


def test_main_entry_general_formula_pads_to_8():
    e = main_entry(80, 16)  # tiny presets: 64 FP8 + 32 + 1 scale = 97 -> 104
    assert (e.bytes, e.pad_bytes) == (104, 7)
    assert main_entry(192, 64).bytes == 128 + 128 + 2 + 6


def test_indexer_key_sizes():
    assert indexer_key_bytes(128, "fp4") == 68
    assert indexer_key_bytes(128, "fp8") == 132
    with pytest.raises(ValueError, match="fp16"):
        indexer_key_bytes(128, "fp16")


def test_v32_entry_sizes():
    assert v32_kv_entry_bytes() == (656, 132)


# ---------------------------------------------------------------------------- KV figures
def test_v32_kv_figures():
    b = v32_baseline(N)
    assert b.kv_bytes_per_token == 48068
    assert b.bytes_at_n == 48068 * N
    assert round(b.gib_at_n, 1) == 46.9


def test_v4_pro_kv_figures(pro):
    assert pro.kv_bytes_per_token == pytest.approx(5031, abs=1)
    assert pro.kv_bytes_per_token == 30 * (584 + 68) / 4 + 31 * 584 / 128
    assert round(pro.kv_gib_at_n, 2) == 4.91
    assert round(100 * pro.kv_ratio_vs_v32, 1) == 10.5
    assert pro.layer_type("csa").layers == 30 and pro.layer_type("hca").layers == 31
    with pytest.raises(KeyError):
        pro.layer_type("window")


def test_v4_flash_kv_figures(flash):
    assert flash.kv_bytes_per_token == pytest.approx(3514, abs=1)
    assert round(flash.kv_gib_at_n, 2) == 3.43
    assert round(100 * flash.kv_ratio_vs_v32, 1) == 7.3
    assert [(r.kind, r.layers) for r in flash.layer_types] == [("window", 2), ("csa", 21), ("hca", 20)]


def test_amortized_per_layer_figures(flash):
    assert flash.layer_type("csa").kv_bytes_per_token / 21 == 163
    assert flash.layer_type("hca").kv_bytes_per_token / 20 == 4.5625
    assert flash.layer_type("window").kv_bytes_per_token == 0


def test_fixed_part(flash, pro):
    for c, layers in ((flash, 43), (pro, 61)):
        assert c.window_bytes == layers * 128 * 584
        assert c.fixed_bytes == c.window_bytes + c.state_bytes
    # fp32 tail state: CSA 2 x 8 slots x 1024 x 4 B (kv + score) + indexer 2 x 8 x 256 x 4 B;
    # HCA 2 x 128 x 512 x 4 B.
    assert flash.layer_type("csa").state_bytes == 21 * (2 * 8 * 1024 * 4 + 2 * 8 * 256 * 4)
    assert flash.layer_type("hca").state_bytes == 20 * 2 * 128 * 512 * 4
    assert flash.layer_type("window").state_bytes == 0


def test_indexer_format_fp8():
    c = model_costs(preset("v4-flash"), N, indexer_format="fp8")
    assert c.indexer_key_bytes == 132
    assert c.kv_bytes_per_token == 21 * (584 + 132) / 4 + 20 * 584 / 128
    fp4 = model_costs(preset("v4-flash"), N)
    assert c.layer_type("csa").indexer_flops == 2 * fp4.layer_type("csa").indexer_flops


@pytest.mark.parametrize("name", ["v4-flash", "v4-pro", "tiny-flash", "tiny-pro"])
def test_bytes_grow_linearly_fixed_part_constant(name):
    cfg = preset(name)
    sizes = [128 * k for k in (1, 2, 8, 64, 1024)]
    costs = [model_costs(cfg, n) for n in sizes]
    assert len({c.fixed_bytes for c in costs}) == 1
    for n, c in zip(sizes, costs):
        assert c.bytes_at_n == c.fixed_bytes + c.compressed_bytes_at_n
        assert c.compressed_bytes_at_n == pytest.approx(c.kv_bytes_per_token * n)
    assert costs[1].compressed_bytes_at_n == 2 * costs[0].compressed_bytes_at_n
    assert all(a.bytes_at_n < b.bytes_at_n for a, b in zip(costs, costs[1:]))


def test_partial_blocks_are_not_counted():
    c = model_costs(preset("v4-flash"), 131)  # 32 complete CSA entries, 1 HCA entry
    assert c.layer_type("csa").entries_at_n == 32 and c.layer_type("hca").entries_at_n == 1


# ---------------------------------------------------------------------------- FLOP figures
def test_flop_totals_within_1_percent(flash, pro):
    v32 = flash.v32
    assert v32.total_flops / G == pytest.approx(1192, rel=0.01)
    assert pro.total_flops / G == pytest.approx(316, rel=0.01)
    assert flash.total_flops / G == pytest.approx(118, rel=0.01)
    assert v32.attention_flops / G == pytest.approx(1117.56, abs=0.01)
    assert (v32.weight_flops, flash.weight_flops, pro.weight_flops) == (74e9, 26e9, 98e9)


def test_headline_ratios_match_spec_exactly(flash, pro):
    """Spec section 7, to one decimal: FLOPs 26.5% / 9.9%, KV 10.5% / 7.3% of V3.2."""
    assert round(100 * pro.flops_ratio_vs_v32, 1) == 26.5
    assert round(100 * flash.flops_ratio_vs_v32, 1) == 9.9
    assert round(100 * pro.kv_ratio_vs_v32, 1) == 10.5
    assert round(100 * flash.kv_ratio_vs_v32, 1) == 7.3


def test_published_models_use_published_weight_params(flash, pro):
    assert V32_PUBLISHED_ACTIVE_PARAMS == 37e9
    assert PUBLISHED_ACTIVE_PARAMS == {"v4-flash": 13e9, "v4-pro": 49e9}
    for c, count in ((flash, 13e9), (pro, 49e9)):
        assert (c.weight_params, c.weight_params_source) == (count, "published")
        assert c.weight_flops == 2 * count
        assert c.total_flops == c.attention_flops + 2 * count
    assert (flash.v32.weight_params, flash.v32.weight_params_source) == (37e9, "published")
    # The counted breakdown is still reported.
    assert flash.active_params == model_active_params(preset("v4-flash"))
    assert flash.active_params.total != flash.weight_params


def test_published_match_ignores_name_only():
    cfg = preset("v4-flash")
    assert published_model(cfg) == "v4-flash" and published_model(preset("v4-pro")) == "v4-pro"
    assert published_model(cfg.replace(name="DeepSeek-V4-Flash")) == "v4-flash"
    for name in sorted(set(PRESETS) - {"v4-flash", "v4-pro"}):
        assert published_model(preset(name)) is None


@pytest.mark.parametrize("changes", [dict(index_topk=1024), dict(num_experts_per_tok=8),
                                     dict(max_position_embeddings=2**21)])
def test_non_published_config_counts_from_config(changes):
    cfg = preset("v4-flash").replace(**changes)
    c = model_costs(cfg, N)
    assert (c.weight_params, c.weight_params_source) == (c.active_params.total, "config")
    assert c.total_flops == c.attention_flops + 2 * c.active_params.total
    assert c.gqa8.weight_params == c.gqa8.active_params.total
    assert c.gqa8.weight_params_source == "config"
    assert (c.v32.weight_params, c.v32.weight_params_source) == (37e9, "published")  # always
    assert "counted from config (attention" in format_report(c)


def test_active_params_match_published_counts(flash, pro):
    assert round(flash.active_params.total / G) == 13
    assert round(pro.active_params.total / G) == 49
    assert round(v32_active_params().total / G) == 37


def test_attention_flops_formula(flash):
    h, d = 64, 512
    for kind, keys in (("window", 128), ("csa", 128 + 512), ("hca", 128 + N // 128)):
        r = flash.layer_type(kind)
        assert r.keys_per_query == keys
        assert r.attention_core_flops == r.layers * 2 * h * keys * (d + d) * 2
    assert flash.layer_type("csa").indexer_flops == 21 * 2 * 64 * 128 * (N // 4) * 0.5
    assert flash.total_flops == flash.attention_flops + 2 * flash.weight_params


def test_short_context_caps_keys():
    c = model_costs(preset("v4-flash"), 100)
    assert c.layer_type("window").keys_per_query == 100
    assert c.layer_type("csa").keys_per_query == 100 + 25
    assert c.layer_type("hca").keys_per_query == 100
    assert c.v32.attention_flops == 61 * (2 * 64 * 128 * 100 + 2 * 128 * 100 * 1088 * 2)


def test_layer_params_v4_flash():
    cfg = preset("v4-flash")
    p = layer_params(cfg, CSA)
    d = 4096
    assert p.attention == d * 1024 + 1024 * 64 * 512 + d * 512 + 8 * 1024 * 4096 + 8 * 1024 * d
    assert p.compressor == 2 * 2 * 512 * d
    assert p.indexer == 1024 * 64 * 128 + d * 64 + 2 * 2 * 128 * d
    assert p.ffn == 7 * 3 * d * 2048 + 256 * d
    assert p.mhc == 2 * 24 * 4 * d
    assert layer_params(cfg, HCA).compressor == 2 * 512 * d
    assert layer_params(cfg, WINDOW).compressor == layer_params(cfg, WINDOW).indexer == 0


def test_gqa8_baseline(flash):
    b = flash.gqa8
    assert b.kv_bytes_per_token == 43 * 2 * 8 * 128 * 2
    assert b.attention_flops == 43 * 2 * 64 * N * 256 * 2
    ap = flash.active_params
    assert (b.active_params.ffn, b.active_params.mhc, b.active_params.head) == (ap.ffn, ap.mhc, ap.head)
    assert round(100 * flash.kv_ratio_vs_gqa8, 1) == 2.0
    # Weights: the model's published 13B with its counted attention side swapped for GQA's own.
    assert b.weight_params == 13e9 - (ap.attention + ap.compressor + ap.indexer) + b.active_params.attention
    assert b.weight_params_source == "published" and b.weight_flops == 2 * b.weight_params
    assert b.total_flops == b.attention_flops + b.weight_flops
    assert gqa8_baseline(preset("v4-flash"), N) == b  # defaults give the same baseline


def test_dense_ffn_params():
    cfg = preset("tiny-dense")
    assert layer_params(cfg, WINDOW).ffn == 3 * 64 * 96


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_works(name):
    c = model_costs(preset(name), 4096)
    assert sum(r.layers for r in c.layer_types) == c.layers
    assert c.total_flops > c.attention_flops > 0
    assert c.fixed_bytes > 0 and c.bytes_at_n >= c.fixed_bytes
    json.dumps(c.to_dict())


def test_bad_arguments():
    with pytest.raises(ValueError, match="context"):
        model_costs(preset("tiny-csa"), 0)
    with pytest.raises(ValueError, match="fp16"):
        model_costs(preset("tiny-csa"), 10, indexer_format="fp16")
    with pytest.raises(ConfigError):
        main_entry(64, 64)


def test_active_params_arithmetic():
    a = ActiveParams(attention=1, ffn=2)
    assert (a + a.scaled(2)).to_dict() == dict(attention=3, compressor=0, indexer=0, ffn=6, mhc=0,
                                                head=0, total=9)


# ---------------------------------------------------------------------------- CLI
def run(*args: str):
    return CliRunner().invoke(main, ["inspect", *args])


def test_cli_human_output_flash():
    r = run("--preset", "v4-flash")
    assert r.exit_code == 0, r.output
    for s in ("3,514.25", "7.3%", "3.43", "46.94", "48,068", "118.31", "1,191.56", "9.9%", "584 B",
              "68 B", "window-only", "CSA", "HCA", "summary:",
              "active params 13B published (13.27B counted from config: attention 4.60B",
              "37B  published (37.48B counted from config)"):
        assert s in r.output, s
    assert "10.0%" not in r.output


def test_cli_human_output_pro():
    r = run("--preset", "v4-pro", "--context", "1M")
    assert r.exit_code == 0, r.output
    for s in ("5,031.44", "10.5%", "4.91", "26.5%", "315.77", "active params 49B published (48.85B"):
        assert s in r.output, s


def test_cli_json_matches_costs():
    r = run("--preset", "v4-pro", "--json", "--indexer-format", "fp8", "-n", "128K")
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    want = model_costs(preset("v4-pro"), 128 * 1024, "fp8").to_dict()
    assert got == json.loads(json.dumps(want))
    assert got["context"] == 131072 and got["indexer_key_bytes"] == 132
    assert (got["weight_params"], got["weight_params_source"]) == (49_000_000_000, "published")
    assert got["weight_flops"] == 98e9 and got["active_params"]["total"] == model_active_params(preset("v4-pro")).total
    assert (got["v32"]["weight_params"], got["v32"]["weight_params_source"]) == (37_000_000_000, "published")
    assert got["v32"]["active_params"]["total"] > 37e9
    assert got["gqa8"]["weight_params_source"] == "published"


@pytest.mark.parametrize("text,n", [("1048576", N), ("1,048,576", N), ("1M", N), ("2^20", N),
                                    ("2**20", N), ("128K", 131072), ("1.5k", 1536), ("7", 7)])
def test_cli_context_spellings(text, n):
    r = run("--preset", "tiny-flash", "--json", "--context", text)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["context"] == n


def test_cli_config_file(tmp_path):
    path = tmp_path / "tiny" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(preset("tiny-pro").to_hf_dict()))
    r = run("--config", str(path), "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    assert got == json.loads(json.dumps(model_costs(preset("tiny-pro"), N).to_dict())) | {"model": "tiny"}
    assert got["weight_params_source"] == "config" and got["weight_params"] == got["active_params"]["total"]


@pytest.mark.parametrize("name", ["v4-flash", "v4-pro"])
def test_cli_v4_config_file_same_as_preset(tmp_path, name):
    """--config with the published config.json gives the same figures as --preset."""
    path = tmp_path / f"DeepSeek-{name}" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(preset(name).to_hf_dict()))
    by_file = json.loads(run("--config", str(path), "--json").output)
    by_preset = json.loads(run("--preset", name, "--json").output)
    assert by_file["weight_params_source"] == "published"
    assert by_file == by_preset | {"model": f"DeepSeek-{name}"}


@pytest.mark.parametrize("args,needle", [
    (["--preset", "v9-ultra"], "v9-ultra"),
    (["--preset", "v4-pro", "--config", "cfg.json"], "cfg.json"),
    ([], "--preset"),
    (["--config", "does-not-exist.json"], "does-not-exist.json"),
    (["--preset", "v4-pro", "--context", "0"], "'0'"),
    (["--preset", "v4-pro", "--context", "-3"], "'-3'"),
    (["--preset", "v4-pro", "--context", "lots"], "'lots'"),
    (["--preset", "v4-pro", "--context", "0.3"], "'0.3'"),
    (["--preset", "v4-pro", "--indexer-format", "fp16"], "fp16"),
])
def test_cli_errors_exit_2(args, needle):
    r = run(*args)
    assert r.exit_code == 2, r.output
    assert needle in r.output
    assert "Traceback" not in r.output


def test_cli_bad_config_files_exit_2(tmp_path):
    bad_json = tmp_path / "broken.json"
    bad_json.write_text("{not json")
    r = run("--config", str(bad_json))
    assert r.exit_code == 2 and "broken.json" in r.output and "not valid JSON" in r.output

    d = preset("tiny-flash").to_hf_dict()
    d["compress_ratios"][1] = 7
    bad_value = tmp_path / "bad_ratio.json"
    bad_value.write_text(json.dumps(d))
    r = run("--config", str(bad_value))
    assert r.exit_code == 2 and "compress_ratios[1]" in r.output and "7" in r.output


def test_cli_group_help():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0 and "inspect" in r.output


def test_gib_constant():
    assert GIB == 1 << 30
