"""One configuration type for the DeepSeek-V4 family.

`ModelConfig.from_hf_dict` reads a Hugging Face `config.json` in both spellings that exist in
the wild: the official one (`compress_ratios`, flat `rope_theta` / `compress_rope_theta` /
`rope_scaling`) and the newer `transformers` one (`layer_types`, `rope_parameters` with
`main` / `compress` sub-dicts). The layer schedule is always read, never guessed: a config
that names none is an error (transformers' fallback schedule is wrong for V4-Pro).

Every inconsistent or unknown value raises `ConfigError` naming the key and the value.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Compression ratio of each attention kind; 0 = sliding window only.
WINDOW, CSA, HCA = 0, 4, 128
LAYER_TYPE_TO_RATIO = {
    "sliding_attention": WINDOW,
    "compressed_sparse_attention": CSA,
    "heavily_compressed_attention": HCA,
}
RATIO_TO_LAYER_TYPE = {v: k for k, v in LAYER_TYPE_TO_RATIO.items()}
SCORING_FUNCS = ("sqrtsoftplus", "softmax", "sigmoid")
FFN_TYPES = ("moe", "dense")


class ConfigError(ValueError):
    """A config value is missing, unknown or inconsistent. The message names the key."""


@dataclass(frozen=True)
class Yarn:
    """YaRN frequency interpolation for the compressed layers (no attention mscale in V4)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int  # nope + rope dims of one attention head (512 in V4)
    rope_dim: int  # trailing RoPE dims of every vector (64 in V4)
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    compress_ratios: tuple[int, ...]  # one per decoder layer (the MTP entry is dropped)
    window: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    yarn: Yarn | None = None
    max_position_embeddings: int = 1048576
    rms_norm_eps: float = 1e-6
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    ffn_type: str = "moe"
    n_routed_experts: int = 0
    n_shared_experts: int = 1
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    routed_scaling_factor: float = 1.0
    num_hash_layers: int = 0
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    swiglu_limit: float = 10.0
    intermediate_size: int = 0  # dense FFN width (ffn_type == "dense")
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    # Special tokens (config.json): they do not change the computation, so configs compare equal
    # without them. eos_token_id: every id that ends a sequence (HF allows an int or a list).
    bos_token_id: int | None = field(default=None, compare=False)
    eos_token_id: tuple[int, ...] | None = field(default=None, compare=False)
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived facts
    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.rope_dim

    def ratio(self, layer: int) -> int:
        return self.compress_ratios[layer]

    def layer_type(self, layer: int) -> str:
        return RATIO_TO_LAYER_TYPE[self.compress_ratios[layer]]

    def is_hash_layer(self, layer: int) -> bool:
        return self.ffn_type == "moe" and layer < self.num_hash_layers

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(key: str, value: Any, why: str) -> ConfigError:
            return ConfigError(f"config key {key!r} = {value!r}: {why}")

        positive = ["vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "q_lora_rank",
                    "o_groups", "o_lora_rank", "window", "hc_mult", "hc_sinkhorn_iters",
                    "max_position_embeddings"]
        hf_key = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                  "window": "sliding_window"}
        for key in positive:
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(hf_key.get(key, key), v, "must be a positive integer")
        for key, hf, low in _FLOAT_FIELDS:
            v = getattr(self, key)
            if not _is_real(v):
                raise bad(hf, v, "must be a finite number")
            if (low == "> 0" and v <= 0) or (low == ">= 0" and v < 0):
                raise bad(hf, v, f"must be {low}")
        if len(self.compress_ratios) != self.num_layers:
            raise bad("compress_ratios", list(self.compress_ratios),
                      f"has {len(self.compress_ratios)} entries for num_hidden_layers={self.num_layers}")
        for i, r in enumerate(self.compress_ratios):
            if r not in RATIO_TO_LAYER_TYPE:
                raise bad(f"compress_ratios[{i}]", r, f"must be one of {sorted(RATIO_TO_LAYER_TYPE)}")
        if self.rope_dim <= 0 or self.rope_dim % 2 or self.rope_dim >= self.head_dim:
            raise bad("qk_rope_head_dim", self.rope_dim, f"must be even, > 0 and < head_dim={self.head_dim}")
        if (self.num_heads * self.head_dim) % self.o_groups:
            raise bad("o_groups", self.o_groups,
                      f"must divide num_attention_heads*head_dim = {self.num_heads * self.head_dim}")
        if CSA in self.compress_ratios:
            for key in ("index_n_heads", "index_head_dim", "index_topk"):
                v = getattr(self, key)
                if not isinstance(v, int) or v <= 0:
                    raise bad(key, v, "must be a positive integer when a CSA layer exists")
            if self.rope_dim >= self.index_head_dim:
                raise bad("index_head_dim", self.index_head_dim,
                          f"must exceed qk_rope_head_dim={self.rope_dim} (RoPE acts on its last dims)")
        if self.norm_topk_prob is not True:
            raise bad("norm_topk_prob", self.norm_topk_prob, "V4 normalizes the top-k routing weights")
        if self.ffn_type not in FFN_TYPES:
            raise bad("ffn_type", self.ffn_type, f"must be one of {FFN_TYPES}")
        if self.ffn_type == "moe":
            for key in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"):
                v = getattr(self, key)
                if not isinstance(v, int) or v <= 0:
                    raise bad(key, v, "must be a positive integer for a MoE model")
            if self.num_experts_per_tok > self.n_routed_experts:
                raise bad("num_experts_per_tok", self.num_experts_per_tok,
                          f"exceeds n_routed_experts={self.n_routed_experts}")
            if self.n_shared_experts not in (0, 1):
                raise bad("n_shared_experts", self.n_shared_experts, "V4 has 0 or 1 shared expert")
            if not 0 <= self.num_hash_layers <= self.num_layers:
                raise bad("num_hash_layers", self.num_hash_layers, f"must be in [0, {self.num_layers}]")
            if self.scoring_func not in SCORING_FUNCS:
                raise bad("scoring_func", self.scoring_func, f"must be one of {SCORING_FUNCS}")
        elif self.intermediate_size <= 0:
            raise bad("intermediate_size", self.intermediate_size, "must be positive for a dense FFN")
        if self.yarn is not None:
            for key in ("factor", "beta_fast", "beta_slow"):
                v = getattr(self.yarn, key)
                if not _is_real(v):
                    raise bad(f"rope_scaling.{key}", v, "must be a finite number")
            for key in ("beta_fast", "beta_slow"):
                if getattr(self.yarn, key) <= 0:
                    raise bad(f"rope_scaling.{key}", getattr(self.yarn, key), "must be > 0")
            if not isinstance(self.yarn.original_max_position_embeddings, int) or \
                    isinstance(self.yarn.original_max_position_embeddings, bool):
                raise bad("rope_scaling.original_max_position_embeddings",
                          self.yarn.original_max_position_embeddings, "must be an integer")
            if self.yarn.factor < 1:
                raise bad("rope_scaling.factor", self.yarn.factor, "must be >= 1")
            if self.yarn.original_max_position_embeddings <= 0:
                raise bad("rope_scaling.original_max_position_embeddings",
                          self.yarn.original_max_position_embeddings, "must be positive")

    def check_quant_sim(self) -> None:
        """The quantization simulation needs FP8 blocks of 64 and FP4 blocks of 32 to tile."""
        if self.nope_dim % 64:
            raise ConfigError(
                f"config key 'head_dim' = {self.head_dim}: with quant_sim the non-RoPE part "
                f"(head_dim - qk_rope_head_dim = {self.nope_dim}) must be a multiple of 64")
        if CSA in self.compress_ratios and (self.index_head_dim % 32 or
                                           self.index_head_dim & (self.index_head_dim - 1)):
            raise ConfigError(
                f"config key 'index_head_dim' = {self.index_head_dim}: with quant_sim it must be a "
                "power of two (Hadamard) and a multiple of 32 (FP4 blocks)")

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str = "custom") -> "ModelConfig":
        return _from_hf_dict(d, name)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: top level must be a JSON object")
        try:
            return _from_hf_dict(d, name=path.parent.name or "custom")
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The official spelling (compress_ratios + flat RoPE keys), plus hatrt's FFN choice."""
        d: dict[str, Any] = {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": 1,
            "head_dim": self.head_dim,
            "qk_rope_head_dim": self.rope_dim,
            "q_lora_rank": self.q_lora_rank,
            "o_groups": self.o_groups,
            "o_lora_rank": self.o_lora_rank,
            "sliding_window": self.window,
            "compress_ratios": list(self.compress_ratios) + [0] * self.num_nextn_predict_layers,
            "index_n_heads": self.index_n_heads,
            "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk,
            "rope_theta": self.rope_theta,
            "compress_rope_theta": self.compress_rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": self.hc_sinkhorn_iters,
            "hc_eps": self.hc_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "routed_scaling_factor": self.routed_scaling_factor,
        }
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            d["eos_token_id"] = self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id)
        if self.yarn is not None:
            d["rope_scaling"] = {"type": "yarn", **dataclasses.asdict(self.yarn)}
        if self.ffn_type == "moe":
            d.update(n_routed_experts=self.n_routed_experts, n_shared_experts=self.n_shared_experts,
                     num_experts_per_tok=self.num_experts_per_tok,
                     moe_intermediate_size=self.moe_intermediate_size,
                     num_hash_layers=self.num_hash_layers, scoring_func=self.scoring_func,
                     norm_topk_prob=self.norm_topk_prob, swiglu_limit=self.swiglu_limit)
        else:
            d.update(ffn_type="dense", intermediate_size=self.intermediate_size,
                     swiglu_limit=self.swiglu_limit)
        return d

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# Keys a V4 config.json may carry that do not change the computation.
_IGNORED_KEYS = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "pad_token_id", "use_cache", "initializer_range", "hidden_act",
    "attention_bias", "attention_dropout", "mlp_bias", "quantization_config", "expert_dtype",
    "output_router_logits", "router_aux_loss_coef", "router_jitter_noise", "topk_method",
    "auto_map", "first_k_dense_replace", "n_group", "topk_group", "kv_lora_rank",
    "qk_nope_head_dim", "v_head_dim", "compress_rates", "compress_rate_csa", "compress_rate_hca",
    "partial_rotary_factor", "mlp_layer_types", "layer_types", "rope_parameters", "rope_scaling",
    "name_or_path", "_name_or_path", "tie_word_embeddings", "index_n_heads", "rope_type",
    # transformers' PreTrainedConfig bookkeeping (present in DeepseekV4Config.to_dict())
    "output_hidden_states", "output_attentions", "return_dict", "id2label", "label2id",
    "problem_type", "is_encoder_decoder", "chunk_size_feed_forward", "tokenizer_class",
    "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "finetuning_task", "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder",
    "architectures", "num_labels",
}


# Float fields of ModelConfig: (attribute, config.json key, allowed range).
_FLOAT_FIELDS = (
    ("rope_theta", "rope_theta", "> 0"),
    ("compress_rope_theta", "compress_rope_theta", "> 0"),
    ("rms_norm_eps", "rms_norm_eps", "> 0"),
    ("hc_eps", "hc_eps", ">= 0"),
    ("routed_scaling_factor", "routed_scaling_factor", "> 0"),
    ("swiglu_limit", "swiglu_limit", ">= 0"),  # 0: no clamp
)


def _is_real(value: Any) -> bool:
    """A finite int or float, not a bool (JSON true/false), string, list or NaN/Infinity."""
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value))


def _as_float(key: str, value: Any) -> float:
    if not _is_real(value):
        raise ConfigError(f"config key {key!r} = {value!r}: must be a finite number")
    return float(value)


def _as_int(key: str, value: Any) -> int:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or int(value) != value):
        raise ConfigError(f"config key {key!r} = {value!r}: must be an integer")
    return int(value)


def _token_id(key: str, v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"config key {key!r} = {v!r}: must be a non-negative integer token id")
    return v


def _token_ids(key: str, v: Any) -> tuple[int, ...] | None:
    if v is None:
        return None
    items = v if isinstance(v, list) else [v]
    return tuple(_token_id(key, t) for t in items)  # type: ignore[misc]


def _from_hf_dict(d: dict[str, Any], name: str) -> ModelConfig:
    def need(key: str) -> Any:
        if key not in d:
            raise ConfigError(f"config key {key!r} is missing")
        return d[key]

    as_int = _as_int

    n_layers = as_int("num_hidden_layers", need("num_hidden_layers"))
    n_kv = d.get("num_key_value_heads", 1)
    if n_kv != 1:
        raise ConfigError(f"config key 'num_key_value_heads' = {n_kv!r}: DeepSeek-V4 shares one KV head")
    if d.get("kv_lora_rank") not in (None, 0):
        raise ConfigError(f"config key 'kv_lora_rank' = {d['kv_lora_rank']!r}: V4 has no KV LoRA "
                          "(this looks like a DeepSeek-V3 config)")
    head_dim = as_int("head_dim", need("head_dim"))
    if "qk_rope_head_dim" in d:
        rope_dim = as_int("qk_rope_head_dim", d["qk_rope_head_dim"])
        prf = d.get("partial_rotary_factor")
        if prf is not None and round(head_dim * _as_float("partial_rotary_factor", prf)) != rope_dim:
            raise ConfigError(f"config key 'partial_rotary_factor' = {prf!r}: disagrees with "
                              f"qk_rope_head_dim={rope_dim} (head_dim={head_dim})")
    elif "partial_rotary_factor" in d:
        rope_dim = round(head_dim * _as_float("partial_rotary_factor", d["partial_rotary_factor"]))
    else:
        raise ConfigError("config key 'qk_rope_head_dim' is missing (nor is 'partial_rotary_factor' given)")

    ratios = _layer_schedule(d, n_layers)
    rope_theta, compress_theta, yarn = _rope(d)
    ffn_type = d.get("ffn_type", "moe")
    if ffn_type not in FFN_TYPES:
        raise ConfigError(f"config key 'ffn_type' = {ffn_type!r}: must be one of {FFN_TYPES}")
    num_hash = _num_hash_layers(d, n_layers) if ffn_type == "moe" else 0

    for key in d:
        if key not in _IGNORED_KEYS and key not in _USED_KEYS:
            log.warning("config key %r is not used by hatrt (value %r)", key, d[key])

    kwargs: dict[str, Any] = dict(
        vocab_size=as_int("vocab_size", need("vocab_size")),
        hidden_size=as_int("hidden_size", need("hidden_size")),
        num_layers=n_layers,
        num_heads=as_int("num_attention_heads", need("num_attention_heads")),
        head_dim=head_dim,
        rope_dim=rope_dim,
        q_lora_rank=as_int("q_lora_rank", need("q_lora_rank")),
        o_groups=as_int("o_groups", need("o_groups")),
        o_lora_rank=as_int("o_lora_rank", need("o_lora_rank")),
        compress_ratios=ratios,
        window=as_int("sliding_window", d.get("sliding_window", d.get("window_size", 128))),
        index_n_heads=as_int("index_n_heads", d.get("index_n_heads", 64)),
        index_head_dim=as_int("index_head_dim", d.get("index_head_dim", 128)),
        index_topk=as_int("index_topk", d.get("index_topk", 512)),
        rope_theta=rope_theta,
        compress_rope_theta=compress_theta,
        yarn=yarn,
        max_position_embeddings=as_int("max_position_embeddings", d.get("max_position_embeddings", 1048576)),
        rms_norm_eps=_as_float("rms_norm_eps", d.get("rms_norm_eps", 1e-6)),
        hc_mult=as_int("hc_mult", d.get("hc_mult", 4)),
        hc_sinkhorn_iters=as_int("hc_sinkhorn_iters", d.get("hc_sinkhorn_iters", 20)),
        hc_eps=_as_float("hc_eps", d.get("hc_eps", 1e-6)),
        ffn_type=ffn_type,
        swiglu_limit=_as_float("swiglu_limit", d.get("swiglu_limit", 10.0)),
        routed_scaling_factor=_as_float("routed_scaling_factor", d.get("routed_scaling_factor", 1.0)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        num_nextn_predict_layers=as_int("num_nextn_predict_layers", d.get("num_nextn_predict_layers", 0)),
        bos_token_id=_token_id("bos_token_id", d.get("bos_token_id")),
        eos_token_id=_token_ids("eos_token_id", d.get("eos_token_id")),
        name=name,
    )
    if ffn_type == "moe":
        inter = as_int("moe_intermediate_size", need("moe_intermediate_size"))
        if "intermediate_size" in d and d["intermediate_size"] != inter:
            raise ConfigError(f"config key 'intermediate_size' = {d['intermediate_size']!r}: a MoE "
                              f"model's experts are moe_intermediate_size={inter} wide")
        n_group, topk_group = d.get("n_group", 1), d.get("topk_group", 1)
        if (n_group or 1) != 1 or (topk_group or 1) != 1:
            raise ConfigError(f"config keys 'n_group'/'topk_group' = {n_group!r}/{topk_group!r}: "
                              "group-limited routing is not part of V4")
        if d.get("norm_topk_prob", True) is not True:
            raise ConfigError(f"config key 'norm_topk_prob' = {d['norm_topk_prob']!r}: V4 normalizes the "
                              "top-k weights")
        kwargs.update(
            n_routed_experts=as_int("n_routed_experts", need("n_routed_experts")),
            n_shared_experts=as_int("n_shared_experts", d.get("n_shared_experts", 1)),
            num_experts_per_tok=as_int("num_experts_per_tok", need("num_experts_per_tok")),
            moe_intermediate_size=inter,
            num_hash_layers=num_hash,
            scoring_func=d.get("scoring_func", "sqrtsoftplus"),
        )
    else:
        kwargs["intermediate_size"] = as_int("intermediate_size", need("intermediate_size"))
    return ModelConfig(**kwargs)


_USED_KEYS = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window",
    "window_size", "compress_ratios", "index_head_dim", "index_topk", "rope_theta",
    "compress_rope_theta", "max_position_embeddings", "rms_norm_eps", "hc_mult", "hc_sinkhorn_iters",
    "hc_eps", "ffn_type", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
    "moe_intermediate_size", "intermediate_size", "routed_scaling_factor", "num_hash_layers",
    "scoring_func", "norm_topk_prob", "swiglu_limit", "num_nextn_predict_layers", "bos_token_id", "eos_token_id",
}


def _layer_schedule(d: dict[str, Any], n_layers: int) -> tuple[int, ...]:
    """compress_ratios (n_layers or n_layers + MTP entries) or layer_types; both must agree."""
    from_ratios = from_types = None
    rates = dict(d.get("compress_rates") or {})
    for legacy, kind in (("compress_rate_csa", "compressed_sparse_attention"),
                         ("compress_rate_hca", "heavily_compressed_attention")):
        if legacy in d:
            rates[kind] = d[legacy]
    for kind, rate in rates.items():
        if LAYER_TYPE_TO_RATIO.get(kind) != rate:
            raise ConfigError(f"config key 'compress_rates[{kind!r}]' = {rate!r}: hatrt implements "
                              f"{LAYER_TYPE_TO_RATIO.get(kind)} for {kind}")
    if "compress_ratios" in d:
        ratios = d["compress_ratios"]
        n_mtp = d.get("num_nextn_predict_layers", 0)
        n_mtp = 0 if n_mtp is None else _as_int("num_nextn_predict_layers", n_mtp)
        if not isinstance(ratios, list) or len(ratios) not in (n_layers, n_layers + n_mtp):
            n = len(ratios) if isinstance(ratios, list) else "?"
            raise ConfigError(f"config key 'compress_ratios' = {ratios!r}: has {n} entries, expected "
                              f"num_hidden_layers={n_layers} (+ num_nextn_predict_layers={n_mtp})")
        for i, r in enumerate(ratios):
            if isinstance(r, bool) or not isinstance(r, (int, float)) or r not in RATIO_TO_LAYER_TYPE:
                raise ConfigError(f"config key 'compress_ratios[{i}]' = {r!r}: must be one of "
                                  f"{sorted(RATIO_TO_LAYER_TYPE)}")
        from_ratios = tuple(int(r) for r in ratios[:n_layers])
    if d.get("layer_types") is not None:
        types = d["layer_types"]
        if not isinstance(types, list) or len(types) != n_layers:
            n = len(types) if isinstance(types, list) else "?"
            raise ConfigError(f"config key 'layer_types' has {n} entries for num_hidden_layers={n_layers}")
        out = []
        for i, t in enumerate(types):
            if not isinstance(t, str) or t not in LAYER_TYPE_TO_RATIO:
                raise ConfigError(f"config key 'layer_types[{i}]' = {t!r}: must be one of "
                                  f"{sorted(LAYER_TYPE_TO_RATIO)}")
            out.append(LAYER_TYPE_TO_RATIO[t])
        from_types = tuple(out)
    if from_ratios is None and from_types is None:
        raise ConfigError("config names no layer schedule: give 'compress_ratios' or 'layer_types' "
                          "(hatrt never guesses one)")
    if from_ratios is not None and from_types is not None and from_ratios != from_types:
        raise ConfigError(f"config keys 'compress_ratios' = {list(from_ratios)} and 'layer_types' "
                          f"disagree (layer_types gives {list(from_types)})")
    return from_ratios if from_ratios is not None else from_types  # type: ignore[return-value]


def _num_hash_layers(d: dict[str, Any], n_layers: int) -> int:
    types = d.get("mlp_layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != n_layers:
            raise ConfigError(f"config key 'mlp_layer_types' = {types!r}: needs {n_layers} entries")
        for i, t in enumerate(types):
            if t not in ("hash_moe", "moe"):
                raise ConfigError(f"config key 'mlp_layer_types[{i}]' = {t!r}: must be 'hash_moe' or 'moe'")
        n_hash = sum(t == "hash_moe" for t in types)
        if types[:n_hash] != ["hash_moe"] * n_hash:
            raise ConfigError(f"config key 'mlp_layer_types' = {types!r}: hash layers must come first")
        if "num_hash_layers" in d and d["num_hash_layers"] != n_hash:
            raise ConfigError(f"config keys 'num_hash_layers' = {d['num_hash_layers']!r} and "
                              f"'mlp_layer_types' ({n_hash} hash layers) disagree")
        return n_hash
    if "num_hash_layers" not in d:
        raise ConfigError("config key 'num_hash_layers' is missing (nor is 'mlp_layer_types' given)")
    return _as_int("num_hash_layers", d["num_hash_layers"])


def _rope(d: dict[str, Any]) -> tuple[float, float, Yarn | None]:
    """Flat keys (rope_theta, compress_rope_theta, rope_scaling) or rope_parameters{main,compress}."""
    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        main, comp = rp["main"], rp["compress"]
        main_type = main.get("rope_type", main.get("type", "default"))
        if main_type != "default":
            raise ConfigError(f"config key 'rope_parameters.main.rope_type' = {main_type!r}: window-only "
                              "layers use plain RoPE ('default')")
        theta = (_as_float("rope_parameters.main.rope_theta", main["rope_theta"]) if "rope_theta" in main
                 else _as_float("rope_theta", d.get("rope_theta", 10000.0)))
        ctheta = (_as_float("rope_parameters.compress.rope_theta", comp["rope_theta"]) if "rope_theta" in comp
                  else _as_float("compress_rope_theta", d.get("compress_rope_theta", 160000.0)))
        return theta, ctheta, _yarn(comp, "rope_parameters.compress")
    theta = _as_float("rope_theta", d.get("rope_theta", 10000.0))
    ctheta = _as_float("compress_rope_theta", d.get("compress_rope_theta", 160000.0))
    scaling = d.get("rope_scaling")
    if scaling is None and isinstance(rp, dict):
        scaling = rp  # flat rope_parameters (transformers before nesting)
    return theta, ctheta, _yarn(scaling or {}, "rope_scaling")


def _yarn(s: dict[str, Any], where: str) -> Yarn | None:
    if not isinstance(s, dict):
        raise ConfigError(f"config key {where!r} = {s!r}: must be a JSON object")
    kind = s.get("rope_type", s.get("type", "default"))
    if kind in ("default", None):
        return None
    if kind != "yarn":
        raise ConfigError(f"config key '{where}.rope_type' = {kind!r}: V4 uses 'yarn' or 'default'")
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
        v = s.get(key)
        ok = (None, 1) if key == "attention_factor" else (None, 1, 0)  # attention_factor 0 zeroes cos/sin
        if v not in ok and not (key == "mscale_all_dim" and v == s.get("mscale")):
            raise ConfigError(f"config key '{where}.{key}' = {v!r}: V4's YaRN applies no attention "
                              "scaling (must be 1)")
    for key in ("factor", "original_max_position_embeddings"):
        if key not in s:
            raise ConfigError(f"config key '{where}.{key}' is missing for YaRN")
    factor = s["factor"]
    if not _is_real(factor) or factor < 1:
        raise ConfigError(f"config key '{where}.factor' = {factor!r}: must be a finite number >= 1")
    orig = _as_int(f"{where}.original_max_position_embeddings", s["original_max_position_embeddings"])
    beta_fast = _as_float(f"{where}.beta_fast", s.get("beta_fast", 32))
    beta_slow = _as_float(f"{where}.beta_slow", s.get("beta_slow", 1))
    for key, v in (("beta_fast", beta_fast), ("beta_slow", beta_slow)):
        if v <= 0:
            raise ConfigError(f"config key '{where}.{key}' = {s[key]!r}: must be > 0")
    if orig <= 0:
        raise ConfigError(f"config key '{where}.original_max_position_embeddings' = {orig!r}: must be positive")
    return Yarn(factor=float(factor), original_max_position_embeddings=orig, beta_fast=beta_fast,
                beta_slow=beta_slow)
