"""KV-cache and FLOP accounting for DeepSeek-V4 hybrid-attention models (pure Python, no torch).

`model_costs(cfg, context)` answers two questions for ONE sequence of `context` = N tokens:

* How many bytes does the production KV cache hold? Split into an amortized part that grows
  with N (compressed entries and indexer keys) and a fixed part (the sliding window ring buffer
  and the fp32 compressor tail state).
* How many FLOPs does one generated token cost at context N? Attention core + lightning indexer
  ("FP8-equivalent": BF16 math counts 2x, FP8 1x, FP4 0.5x) + 2 x active parameters (the weight
  matmuls, counted as FP8, 1x). The weight term uses the PUBLISHED active-parameter count when the
  config is one of the published models (V3.2 37B; a config equal to preset "v4-flash" 13B or
  "v4-pro" 49B) and the count derived from the config otherwise; the counted breakdown is always
  reported beside it (`active_params`), and `weight_params` / `weight_params_source` say which
  number the weight FLOPs used.

Both are compared with two baselines: DeepSeek-V3.2 (MLA + DSA indexer, its published config
hard-coded below) and a dense BF16 GQA-8 version of the same model. The method, the formulas and
what is left out are documented in docs/cost-model.md; the numbers of the attention spec
(section 7) are reproduced by tests/test_costs.py.

Everything returned is a plain frozen dataclass with `to_dict()` for JSON.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .config import CSA, HCA, WINDOW, ConfigError, ModelConfig
from .presets import preset

GIB = 2**30

# FP8-equivalent weight of one multiply-add pair (2 FLOPs) at each precision.
BF16_FACTOR = 2.0
FP8_FACTOR = 1.0
FP4_FACTOR = 0.5
FP32_BYTES = 4

INDEXER_FORMATS = ("fp4", "fp8")
INDEXER_FACTOR = {"fp4": FP4_FACTOR, "fp8": FP8_FACTOR}

# FP8 KV quantization block (one ue8m0 scale per 64 non-RoPE dims) and FP4 indexer block (32).
FP8_KV_BLOCK = 64
FP4_BLOCK = 32
ENTRY_ALIGN = 8  # a production main-KV entry is padded to a multiple of 8 bytes

KIND_LABEL = {WINDOW: "window-only", CSA: "CSA", HCA: "HCA"}
KIND_KEY = {WINDOW: "window", CSA: "csa", HCA: "hca"}


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align


# ---------------------------------------------------------------------------- entry formats
@dataclass(frozen=True)
class MainEntry:
    """One production main-KV entry (window token, CSA entry or HCA entry).

    bytes = pad8(nope_dim x 1 (FP8 e4m3) + rope_dim x 2 (BF16) + ceil(nope_dim / 64) x 1 (ue8m0
    scales)); V4 (512 = 448 + 64): 448 + 128 + 7 + 1 pad = 584 B (FlashMLA "MODEL1", vLLM).
    """

    nope_fp8_bytes: int
    rope_bf16_bytes: int
    scale_bytes: int
    pad_bytes: int
    bytes: int

    def describe(self) -> str:
        return (f"{self.bytes} B = {self.nope_fp8_bytes} FP8 e4m3 + {self.rope_bf16_bytes // 2} BF16 "
                f"RoPE dims ({self.rope_bf16_bytes} B) + {self.scale_bytes} ue8m0 scales + "
                f"{self.pad_bytes} pad")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def main_entry(head_dim: int, rope_dim: int) -> MainEntry:
    nope = head_dim - rope_dim
    if nope <= 0 or rope_dim <= 0:
        raise ConfigError(f"config key 'head_dim' = {head_dim}: must exceed qk_rope_head_dim={rope_dim}")
    scales = math.ceil(nope / FP8_KV_BLOCK)
    raw = nope + 2 * rope_dim + scales
    total = _pad(raw, ENTRY_ALIGN)
    return MainEntry(nope_fp8_bytes=nope, rope_bf16_bytes=2 * rope_dim, scale_bytes=scales,
                     pad_bytes=total - raw, bytes=total)


def indexer_key_bytes(index_head_dim: int, fmt: str = "fp4") -> int:
    """One indexer key: "fp4" = MXFP4, Di/2 B of packed e2m1 + one ue8m0 scale per 32 dims
    (128 dims: 64 + 4 = 68 B); "fp8" = Di B of e4m3 + one fp32 scale (128 dims: 132 B)."""
    if fmt == "fp4":
        return math.ceil(index_head_dim / 2) + math.ceil(index_head_dim / FP4_BLOCK)
    if fmt == "fp8":
        return index_head_dim + FP32_BYTES
    raise ValueError(f"indexer format {fmt!r}: must be one of {INDEXER_FORMATS}")


# ---------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class ActiveParams:
    """Parameters touched by one token (weights of every matmul it runs through)."""

    attention: int = 0   # wq_a, wq_b, wkv, wo_a, wo_b (or the baseline's own projections)
    compressor: int = 0  # compressor wkv + wgate
    indexer: int = 0     # indexer wq_b, weights_proj, indexer compressor wkv + wgate
    ffn: int = 0         # active experts (routed + shared) + router, or the dense FFN
    mhc: int = 0         # hc_attn_fn + hc_ffn_fn
    head: int = 0        # output head (the embedding lookup is not a matmul)

    @property
    def total(self) -> int:
        return self.attention + self.compressor + self.indexer + self.ffn + self.mhc + self.head

    def __add__(self, other: "ActiveParams") -> "ActiveParams":
        return ActiveParams(*(getattr(self, f.name) + getattr(other, f.name)
                              for f in dataclasses.fields(self)))

    def scaled(self, k: int) -> "ActiveParams":
        return ActiveParams(*(getattr(self, f.name) * k for f in dataclasses.fields(self)))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total": self.total}


def _ffn_params(cfg: ModelConfig) -> int:
    d = cfg.hidden_size
    if cfg.ffn_type == "moe":
        active = cfg.num_experts_per_tok + cfg.n_shared_experts
        return active * 3 * d * cfg.moe_intermediate_size + cfg.n_routed_experts * d
    return 3 * d * cfg.intermediate_size


def _mhc_params(cfg: ModelConfig) -> int:
    hc, d = cfg.hc_mult, cfg.hidden_size
    return 2 * (2 + hc) * hc * hc * d  # hc_attn_fn and hc_ffn_fn, each [(2+hc)*hc, hc*d]


def layer_params(cfg: ModelConfig, ratio: int) -> ActiveParams:
    """Active parameters of one decoder layer with compression `ratio`."""
    d, h, dh = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    ql, g, ol = cfg.q_lora_rank, cfg.o_groups, cfg.o_lora_rank
    attention = (d * ql + ql * h * dh + d * dh
                 + g * ol * (h * dh // g)  # wo_a: one [o_lora, H*D/g] block per group
                 + g * ol * d)             # wo_b
    compressor = indexer = 0
    if ratio != WINDOW:
        coff = 2 if ratio == CSA else 1
        compressor = 2 * coff * dh * d  # wkv + wgate
    if ratio == CSA:
        hi, di = cfg.index_n_heads, cfg.index_head_dim
        indexer = ql * hi * di + d * hi + 2 * (2 * di * d)
    return ActiveParams(attention=attention, compressor=compressor, indexer=indexer,
                        ffn=_ffn_params(cfg), mhc=_mhc_params(cfg))


def head_params(cfg: ModelConfig) -> int:
    return cfg.vocab_size * cfg.hidden_size


# ---------------------------------------------------------------------------- published counts
# Published active parameters per token (model cards). The weight FLOPs use these for the
# published models so that the headline ratios match the attention spec (section 7) exactly;
# any other config uses the count derived from its fields (`ActiveParams.total`).
PUBLISHED = "published"
COUNTED = "config"
V32_PUBLISHED_ACTIVE_PARAMS = 37_000_000_000
PUBLISHED_ACTIVE_PARAMS = {"v4-flash": 13_000_000_000, "v4-pro": 49_000_000_000}


def published_model(cfg: ModelConfig) -> str | None:
    """The preset name of the published model `cfg` is (dataclass ==, which ignores `name`, so a
    config.json read with --config matches too), or None."""
    for name in PUBLISHED_ACTIVE_PARAMS:
        if cfg == preset(name):
            return name
    return None


def weight_params(cfg: ModelConfig, counted: int) -> tuple[int, str]:
    """(parameters the weight FLOPs use, "published" | "config") for `cfg`."""
    name = published_model(cfg)
    if name is None:
        return counted, COUNTED
    return PUBLISHED_ACTIVE_PARAMS[name], PUBLISHED


# ---------------------------------------------------------------------------- baselines
# DeepSeek-V3.2(-Exp) published config.json: MLA attention + DSA lightning indexer.
V32_NAME = "DeepSeek-V3.2"
V32_LAYERS = 61
V32_HIDDEN = 7168
V32_HEADS = 128
V32_Q_LORA = 1536
V32_KV_LORA = 512
V32_ROPE = 64
V32_QK_NOPE = 128
V32_V_HEAD = 128
V32_DENSE_LAYERS = 3          # first_k_dense_replace
V32_DENSE_INTERMEDIATE = 18432
V32_ROUTED_EXPERTS = 256
V32_SHARED_EXPERTS = 1
V32_ACTIVE_EXPERTS = 8
V32_MOE_INTERMEDIATE = 2048
V32_VOCAB = 129280
V32_INDEX_HEADS = 64
V32_INDEX_DIM = 128
V32_INDEX_TOPK = 2048
V32_KV_SCALE_BLOCK = 128      # FlashMLA V3.2 cache: one fp32 scale per 128 latent dims

# Dense GQA baseline built from the evaluated model.
GQA_KV_HEADS = 8
GQA_HEAD_DIM = 128


@dataclass(frozen=True)
class Baseline:
    name: str
    label: str
    description: str
    layers: int
    kv_bytes_per_token: float
    bytes_at_n: int
    gib_at_n: float
    attention_flops: float   # FP8-equivalent, all layers, one generated token at N
    active_params: ActiveParams  # counted from the config (breakdown)
    weight_params: int           # the count the weight FLOPs use (2 x weight_params)
    weight_params_source: str    # "published" | "config"
    weight_flops: float
    total_flops: float

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["active_params"] = self.active_params.to_dict()
        return d


def v32_kv_entry_bytes() -> tuple[int, int]:
    """V3.2 cache per token and layer: (MLA latent entry, indexer key).

    MLA: 512 latent dims FP8 + 4 fp32 scales (one per 128) + 64 RoPE dims BF16 = 656 B.
    Indexer key: 128 dims FP8 + one fp32 scale = 132 B.
    """
    mla = V32_KV_LORA + FP32_BYTES * (V32_KV_LORA // V32_KV_SCALE_BLOCK) + 2 * V32_ROPE
    return mla, indexer_key_bytes(V32_INDEX_DIM, "fp8")


def v32_active_params() -> ActiveParams:
    d, h, qk = V32_HIDDEN, V32_HEADS, V32_QK_NOPE + V32_ROPE
    mla = (d * V32_Q_LORA                                   # wq_a
           + V32_Q_LORA * h * qk                            # wq_b
           + d * (V32_KV_LORA + V32_ROPE)                   # wkv_a
           + V32_KV_LORA * h * (V32_QK_NOPE + V32_V_HEAD)   # wkv_b (absorbed: same work per token)
           + h * V32_V_HEAD * d)                            # wo
    indexer = (V32_Q_LORA * V32_INDEX_HEADS * V32_INDEX_DIM  # wq_b
               + d * V32_INDEX_DIM                          # wk
               + d * V32_INDEX_HEADS)                       # weights_proj
    moe_layers = V32_LAYERS - V32_DENSE_LAYERS
    moe = ((V32_ACTIVE_EXPERTS + V32_SHARED_EXPERTS) * 3 * d * V32_MOE_INTERMEDIATE
           + V32_ROUTED_EXPERTS * d)
    return ActiveParams(attention=V32_LAYERS * mla, indexer=V32_LAYERS * indexer,
                        ffn=V32_DENSE_LAYERS * 3 * d * V32_DENSE_INTERMEDIATE + moe_layers * moe,
                        head=V32_VOCAB * d)


def v32_baseline(context: int) -> Baseline:
    n = context
    mla, key = v32_kv_entry_bytes()
    per_token = V32_LAYERS * (mla + key)
    indexer = 2 * V32_INDEX_HEADS * V32_INDEX_DIM * n * FP8_FACTOR
    # Absorbed MLA decode: q.k over 576 (latent + RoPE), p.v over the 512 latent dims, BF16.
    core = (2 * V32_HEADS * min(V32_INDEX_TOPK, n)
            * ((V32_KV_LORA + V32_ROPE) + V32_KV_LORA) * BF16_FACTOR)
    attention = V32_LAYERS * (indexer + core)
    params = v32_active_params()
    weights = V32_PUBLISHED_ACTIVE_PARAMS
    return Baseline(
        name="v3.2", label=V32_NAME, description=f"{V32_NAME} (MLA {mla} B + FP8 indexer key {key} B per layer)",
        layers=V32_LAYERS, kv_bytes_per_token=float(per_token), bytes_at_n=per_token * n,
        gib_at_n=per_token * n / GIB, attention_flops=attention, active_params=params,
        weight_params=weights, weight_params_source=PUBLISHED,
        weight_flops=2.0 * weights, total_flops=attention + 2.0 * weights)


def _attention_side(p: ActiveParams) -> int:
    return p.attention + p.compressor + p.indexer


def gqa8_baseline(cfg: ModelConfig, context: int, model_params: ActiveParams | None = None,
                  model_weight_params: int | None = None,
                  model_weight_source: str | None = None) -> Baseline:
    """Same layers, query heads and non-attention weights; dense causal attention over all N
    tokens with head_dim 128, 8 KV heads and a BF16 KV cache.

    Weight params = the model's weight params (published or counted) - its counted attention-side
    params (projections, compressors, indexers) + the GQA projections; with the counted model
    params that is exactly `active_params.total`. `model_*` default to the values for `cfg`.
    """
    n, d, h = context, cfg.hidden_size, cfg.num_heads
    per_token = cfg.num_layers * 2 * GQA_KV_HEADS * GQA_HEAD_DIM * 2  # K and V, BF16
    core = 2 * h * n * (GQA_HEAD_DIM + GQA_HEAD_DIM) * BF16_FACTOR
    attention = cfg.num_layers * core
    proj = d * h * GQA_HEAD_DIM + 2 * d * GQA_KV_HEADS * GQA_HEAD_DIM + h * GQA_HEAD_DIM * d
    params = ActiveParams(attention=cfg.num_layers * proj, ffn=cfg.num_layers * _ffn_params(cfg),
                          mhc=cfg.num_layers * _mhc_params(cfg), head=head_params(cfg))
    if model_params is None:
        model_params = model_active_params(cfg)
    if model_weight_params is None:
        model_weight_params, model_weight_source = weight_params(cfg, model_params.total)
    weights = model_weight_params - _attention_side(model_params) + params.attention
    return Baseline(
        name="gqa8", label=f"dense BF16 GQA-{GQA_KV_HEADS}", description=f"dense BF16 GQA-{GQA_KV_HEADS} ({h} heads x {GQA_HEAD_DIM}, "
                                 "full causal attention)",
        layers=cfg.num_layers, kv_bytes_per_token=float(per_token), bytes_at_n=per_token * n,
        gib_at_n=per_token * n / GIB, attention_flops=attention, active_params=params,
        weight_params=weights, weight_params_source=model_weight_source or COUNTED,
        weight_flops=2.0 * weights, total_flops=attention + 2.0 * weights)


def model_active_params(cfg: ModelConfig) -> ActiveParams:
    """Counted active parameters of the whole model (all layers + output head)."""
    params = ActiveParams(head=head_params(cfg))
    for ratio in (WINDOW, CSA, HCA):
        count = sum(r == ratio for r in cfg.compress_ratios)
        if count:
            params = params + layer_params(cfg, ratio).scaled(count)
    return params


# ---------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class LayerTypeCosts:
    """One attention kind, all its layers together, one sequence, context N."""

    kind: str                      # "window" | "csa" | "hca"
    label: str
    ratio: int
    layers: int
    # KV cache (bytes)
    kv_bytes_per_token: float      # amortized: (main entry [+ indexer key]) / ratio per layer
    window_bytes: int              # fixed: window x main entry per layer
    state_bytes: int               # fixed: fp32 compressor tail state
    fixed_bytes: int
    entries_at_n: int              # complete compressed entries per layer at N (floor(N/ratio))
    compressed_bytes_at_n: int     # entries_at_n x entry bytes x layers
    bytes_at_n: int                # compressed + fixed
    # attention per generated token at N (FP8-equivalent FLOPs)
    keys_per_query: int            # min(window, N) + selected compressed entries
    attention_core_flops: float
    indexer_flops: float
    attention_flops: float
    active_params: ActiveParams
    # vs the same number of baseline layers
    kv_ratio_vs_v32: float
    kv_ratio_vs_gqa8: float
    attention_ratio_vs_v32: float
    attention_ratio_vs_gqa8: float

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["active_params"] = self.active_params.to_dict()
        return d


@dataclass(frozen=True)
class ModelCosts:
    model: str
    context: int
    indexer_format: str
    main_entry: MainEntry
    indexer_key_bytes: int
    layers: int
    max_position_embeddings: int
    layer_types: tuple[LayerTypeCosts, ...]
    # KV cache, one sequence
    kv_bytes_per_token: float      # amortized, production format (the headline figure)
    window_bytes: int
    state_bytes: int
    fixed_bytes: int
    compressed_bytes_at_n: int
    bytes_at_n: int
    kv_gib_at_n: float             # compressed part only (kv_bytes_per_token x N at N = 2^k*128)
    total_gib_at_n: float          # including the fixed part
    # FLOPs per generated token at N
    attention_flops: float
    active_params: ActiveParams    # counted from the config (breakdown)
    weight_params: int             # the count the weight FLOPs use (2 x weight_params)
    weight_params_source: str      # "published" (cfg equals preset v4-flash / v4-pro) | "config"
    weight_flops: float
    total_flops: float
    # baselines and headline ratios
    v32: Baseline
    gqa8: Baseline
    kv_ratio_vs_v32: float
    kv_ratio_vs_gqa8: float
    flops_ratio_vs_v32: float
    flops_ratio_vs_gqa8: float
    attention_ratio_vs_v32: float
    attention_ratio_vs_gqa8: float

    def layer_type(self, kind: str) -> LayerTypeCosts:
        for lt in self.layer_types:
            if lt.kind == kind:
                return lt
        raise KeyError(kind)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["main_entry"] = self.main_entry.to_dict()
        d["layer_types"] = [lt.to_dict() for lt in self.layer_types]
        d["active_params"] = self.active_params.to_dict()
        d["v32"] = self.v32.to_dict()
        d["gqa8"] = self.gqa8.to_dict()
        return d


def _state_bytes(cfg: ModelConfig, ratio: int) -> int:
    """fp32 tail state of the compressors (projections and scores of the incomplete block; CSA
    also keeps the previous block): 2 (kv + score) x coff*m slots x coff*width x 4 B."""
    if ratio == WINDOW:
        return 0
    coff = 2 if ratio == CSA else 1
    main = 2 * (coff * ratio) * (coff * cfg.head_dim) * FP32_BYTES
    if ratio != CSA:
        return main
    return main + 2 * (2 * ratio) * (2 * cfg.index_head_dim) * FP32_BYTES  # indexer compressor


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def model_costs(cfg: ModelConfig, context: int = 2**20, indexer_format: str = "fp4") -> ModelCosts:
    """KV-cache bytes and per-token FLOPs of `cfg` for one sequence at `context` tokens."""
    if isinstance(context, bool) or not isinstance(context, int) or context <= 0:
        raise ValueError(f"context = {context!r}: must be a positive number of tokens")
    if indexer_format not in INDEXER_FORMATS:
        raise ValueError(f"indexer format {indexer_format!r}: must be one of {INDEXER_FORMATS}")
    n = context
    entry = main_entry(cfg.head_dim, cfg.rope_dim)
    key = indexer_key_bytes(cfg.index_head_dim, indexer_format)
    params = model_active_params(cfg)
    weights, source = weight_params(cfg, params.total)
    v32, gqa = v32_baseline(n), gqa8_baseline(cfg, n, params, weights, source)
    v32_layer_kv, gqa_layer_kv = v32.kv_bytes_per_token / v32.layers, gqa.kv_bytes_per_token / gqa.layers
    v32_layer_attn, gqa_layer_attn = v32.attention_flops / v32.layers, gqa.attention_flops / gqa.layers

    rows = []
    for ratio in (WINDOW, CSA, HCA):
        count = sum(r == ratio for r in cfg.compress_ratios)
        if not count:
            continue
        per_entry = entry.bytes + (key if ratio == CSA else 0)
        per_token = per_entry / ratio if ratio else 0.0
        entries = n // ratio if ratio else 0
        window = cfg.window * entry.bytes
        state = _state_bytes(cfg, ratio)
        fixed = window + state
        selected = {WINDOW: 0, CSA: min(cfg.index_topk, n // CSA), HCA: n // HCA}[ratio]
        keys = min(cfg.window, n) + selected
        core = 2 * cfg.num_heads * keys * (cfg.head_dim + cfg.head_dim) * BF16_FACTOR
        indexer = (2 * cfg.index_n_heads * cfg.index_head_dim * (n // CSA)
                   * INDEXER_FACTOR[indexer_format]) if ratio == CSA else 0.0
        rows.append(LayerTypeCosts(
            kind=KIND_KEY[ratio], label=KIND_LABEL[ratio], ratio=ratio, layers=count,
            kv_bytes_per_token=count * per_token, window_bytes=count * window,
            state_bytes=count * state, fixed_bytes=count * fixed, entries_at_n=entries,
            compressed_bytes_at_n=count * entries * per_entry,
            bytes_at_n=count * (entries * per_entry + fixed), keys_per_query=keys,
            attention_core_flops=count * core, indexer_flops=count * indexer,
            attention_flops=count * (core + indexer),
            active_params=layer_params(cfg, ratio).scaled(count),
            kv_ratio_vs_v32=_ratio(count * per_token, count * v32_layer_kv),
            kv_ratio_vs_gqa8=_ratio(count * per_token, count * gqa_layer_kv),
            attention_ratio_vs_v32=_ratio(core + indexer, v32_layer_attn),
            attention_ratio_vs_gqa8=_ratio(core + indexer, gqa_layer_attn)))

    kv = sum(r.kv_bytes_per_token for r in rows)
    attention = sum(r.attention_flops for r in rows)
    compressed = sum(r.compressed_bytes_at_n for r in rows)
    fixed = sum(r.fixed_bytes for r in rows)
    total = attention + 2.0 * weights
    return ModelCosts(
        model=cfg.name, context=n, indexer_format=indexer_format, main_entry=entry,
        indexer_key_bytes=key, layers=cfg.num_layers,
        max_position_embeddings=cfg.max_position_embeddings, layer_types=tuple(rows),
        kv_bytes_per_token=kv, window_bytes=sum(r.window_bytes for r in rows),
        state_bytes=sum(r.state_bytes for r in rows), fixed_bytes=fixed,
        compressed_bytes_at_n=compressed, bytes_at_n=compressed + fixed,
        kv_gib_at_n=compressed / GIB, total_gib_at_n=(compressed + fixed) / GIB,
        attention_flops=attention, active_params=params, weight_params=weights,
        weight_params_source=source, weight_flops=2.0 * weights, total_flops=total, v32=v32, gqa8=gqa,
        kv_ratio_vs_v32=_ratio(kv, v32.kv_bytes_per_token),
        kv_ratio_vs_gqa8=_ratio(kv, gqa.kv_bytes_per_token),
        flops_ratio_vs_v32=_ratio(total, v32.total_flops),
        flops_ratio_vs_gqa8=_ratio(total, gqa.total_flops),
        attention_ratio_vs_v32=_ratio(attention, v32.attention_flops),
        attention_ratio_vs_gqa8=_ratio(attention, gqa.attention_flops))


# ---------------------------------------------------------------------------- text report
def format_context(n: int) -> str:
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if n >= size and n % size == 0:
            return f"{n:,} tokens ({n // size}{unit})"
    return f"{n:,} tokens"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _num(x: float) -> str:
    """Two decimals for ordinary magnitudes, three significant digits for small ones."""
    return f"{x:,.2f}" if x == 0 or abs(x) >= 0.995 else f"{x:#.3g}"


def _count(x: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.2f}{unit}"
    return f"{x:.0f}"


def _weights(n: int, source: str) -> str:
    """A weight-parameter count as printed: published counts as published ("13B")."""
    if source == PUBLISHED and n % 10**9 == 0:
        return f"{n // 10**9}B"
    return _count(n)


def format_report(c: ModelCosts) -> str:
    """The human-readable table printed by `hatrt inspect`."""
    g = 1e9
    lines = [
        f"{c.model}: {c.layers} layers, context N = {format_context(c.context)}, one sequence, "
        f"indexer keys {c.indexer_format}",
        f"main KV entry {c.main_entry.describe()}; indexer key {c.indexer_key_bytes} B "
        f"({c.indexer_format})",
        "KV/* columns: amortized KV B/token; attn/* columns: attention FLOPs (core + indexer), each "
        "vs the same number of baseline layers",
    ]
    if c.context > c.max_position_embeddings:
        lines.append(f"note: N exceeds the model's max_position_embeddings = "
                     f"{c.max_position_embeddings:,}; the figures extrapolate")
    lines.append("")
    head = (f"{'layer type':<12}{'layers':>7}{'KV B/token':>12}{'fixed bytes':>14}"
            f"{'bytes at N':>17}{'GiB at N':>10}{'attn GFLOP':>12}"
            f"{'KV/V3.2':>9}{'KV/GQA8':>9}{'attn/V3.2':>11}{'attn/GQA8':>11}")
    rule = "-" * len(head)

    def row(label: str, layers: int, kv: float, fixed: int, at_n: int, flops: float,
            ratios: tuple[float, float, float, float]) -> str:
        return (f"{label:<12}{layers:>7}{kv:>12,.2f}{fixed:>14,}{at_n:>17,}{_num(at_n / GIB):>10}"
                f"{_num(flops / g):>12}" + "".join(f"{_pct(x):>{w}}" for x, w in
                                                   zip(ratios, (9, 9, 11, 11))))

    lines += [head, rule]
    for r in c.layer_types:
        lines.append(row(r.label, r.layers, r.kv_bytes_per_token, r.fixed_bytes, r.bytes_at_n,
                         r.attention_flops, (r.kv_ratio_vs_v32, r.kv_ratio_vs_gqa8,
                                             r.attention_ratio_vs_v32, r.attention_ratio_vs_gqa8)))
    lines += [rule, row("total", c.layers, c.kv_bytes_per_token, c.fixed_bytes, c.bytes_at_n,
                        c.attention_flops, (c.kv_ratio_vs_v32, c.kv_ratio_vs_gqa8,
                                            c.attention_ratio_vs_v32, c.attention_ratio_vs_gqa8))]
    ap = c.active_params
    breakdown = (f"attention {_count(ap.attention)}, compressors {_count(ap.compressor)}, indexers "
                 f"{_count(ap.indexer)}, FFN {_count(ap.ffn)}, mHC {_count(ap.mhc)}, head "
                 f"{_count(ap.head)}")
    if c.weight_params_source == PUBLISHED:
        params_line = (f"active params {_weights(c.weight_params, PUBLISHED)} published "
                       f"({_count(ap.total)} counted from config: {breakdown})")
    else:
        params_line = f"active params {_count(ap.total)} counted from config ({breakdown})"
    lines += [
        "",
        f"fixed part: sliding window {c.window_bytes:,} B + fp32 compressor state "
        f"{c.state_bytes:,} B = {c.fixed_bytes:,} B per sequence",
        f"growing part at N: {c.compressed_bytes_at_n:,} B = {_num(c.kv_gib_at_n)} GiB "
        f"({c.kv_bytes_per_token:,.2f} B/token amortized)",
        params_line,
        f"GFLOP per generated token (FP8-equivalent): attention {_num(c.attention_flops / g)} + "
        f"weights {_num(c.weight_flops / g)} = {_num(c.total_flops / g)}",
        "",
        f"{'baseline at N':<20}{'KV B/token':>12}{'GiB at N':>10}{'attn GFLOP':>12}"
        f"{'weight GFLOP':>14}{'total GFLOP':>13}{'params':>9}  weight params from",
    ]
    for b in (c.v32, c.gqa8):
        if b.name == "v3.2":
            note = f"published ({_count(b.active_params.total)} counted from config)"
        elif b.weight_params_source == PUBLISHED:
            note = (f"model's published {_weights(c.weight_params, PUBLISHED)} - its attention side "
                    f"{_count(_attention_side(ap))} + GQA projections {_count(b.active_params.attention)}")
        else:
            note = "counted from config"
        lines.append(f"{b.label:<20}{b.kv_bytes_per_token:>12,.0f}{_num(b.gib_at_n):>10}"
                     f"{_num(b.attention_flops / g):>12}{_num(b.weight_flops / g):>14}"
                     f"{_num(b.total_flops / g):>13}{_weights(b.weight_params, b.weight_params_source):>9}"
                     f"  {note}")
    lines += [
        "",
        f"summary: KV cache {_pct(c.kv_ratio_vs_v32)} of V3.2 ({c.kv_bytes_per_token:,.0f} vs "
        f"{c.v32.kv_bytes_per_token:,.0f} B/token; {_num(c.kv_gib_at_n)} vs {_num(c.v32.gib_at_n)} "
        f"GiB at N), FLOPs {_pct(c.flops_ratio_vs_v32)} of V3.2 ({_num(c.total_flops / g)} vs "
        f"{_num(c.v32.total_flops / g)} GFLOP/token); vs dense GQA-8: KV "
        f"{_pct(c.kv_ratio_vs_gqa8)}, FLOPs {_pct(c.flops_ratio_vs_gqa8)}",
    ]
    return "\n".join(lines)
