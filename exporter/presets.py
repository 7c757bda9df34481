"""Built-in configurations: the two published V4 models and small test models.

The tiny presets keep every structural feature (window 128, CSA with indexer, HCA, mHC, MoE
with hash layers, YaRN) at widths that run on a laptop CPU. Their head_dim is 80 = 64 + 16 so the
FP8 simulation (blocks of 64 over the non-RoPE dims) still tiles.
"""

from __future__ import annotations

from .config import CSA, HCA, WINDOW, ConfigError, ModelConfig, Yarn

_V4_YARN = Yarn(factor=16.0, original_max_position_embeddings=65536, beta_fast=32, beta_slow=1)


def _alternating(n_layers: int, head: list[int]) -> tuple[int, ...]:
    """The published schedules: `head` first, then CSA on even and HCA on odd layers."""
    return tuple(head + [CSA if i % 2 == 0 else HCA for i in range(len(head), n_layers)])


def _v4_flash() -> ModelConfig:
    return ModelConfig(
        name="v4-flash", vocab_size=129280, hidden_size=4096, num_layers=43, num_heads=64,
        head_dim=512, rope_dim=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024,
        compress_ratios=_alternating(43, [WINDOW, WINDOW]), window=128, index_n_heads=64,
        index_head_dim=128, index_topk=512, yarn=_V4_YARN, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=6, moe_intermediate_size=2048, routed_scaling_factor=1.5,
        num_hash_layers=3, num_nextn_predict_layers=1)


def _v4_pro() -> ModelConfig:
    return ModelConfig(
        name="v4-pro", vocab_size=129280, hidden_size=7168, num_layers=61, num_heads=128,
        head_dim=512, rope_dim=64, q_lora_rank=1536, o_groups=16, o_lora_rank=1024,
        compress_ratios=_alternating(61, [HCA, HCA]), window=128, index_n_heads=64,
        index_head_dim=128, index_topk=1024, yarn=_V4_YARN, n_routed_experts=384, n_shared_experts=1,
        num_experts_per_tok=6, moe_intermediate_size=3072, routed_scaling_factor=2.5,
        num_hash_layers=3, num_nextn_predict_layers=1)


def _tiny(name: str, ratios: list[int], **over) -> ModelConfig:
    base = dict(
        name=name, vocab_size=512, hidden_size=64, num_layers=len(ratios), num_heads=4, head_dim=80,
        rope_dim=16, q_lora_rank=48, o_groups=2, o_lora_rank=32, compress_ratios=tuple(ratios),
        window=128, index_n_heads=32, index_head_dim=32, index_topk=16,
        yarn=Yarn(factor=16.0, original_max_position_embeddings=256), max_position_embeddings=4096,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
        routed_scaling_factor=1.5, num_hash_layers=1)
    base.update(over)
    return ModelConfig(**base)


PRESETS = {
    "v4-flash": _v4_flash,
    "v4-pro": _v4_pro,
    # Flash-like (window-only layers first) and Pro-like (HCA first) schedules at tiny sizes.
    "tiny-flash": lambda: _tiny("tiny-flash", [WINDOW, WINDOW, CSA, HCA]),
    "tiny-pro": lambda: _tiny("tiny-pro", [HCA, HCA, CSA, HCA]),
    "tiny-window": lambda: _tiny("tiny-window", [WINDOW, WINDOW]),
    "tiny-csa": lambda: _tiny("tiny-csa", [CSA, CSA]),
    "tiny-hca": lambda: _tiny("tiny-hca", [HCA, HCA]),
    "tiny-dense": lambda: _tiny("tiny-dense", [WINDOW, CSA, HCA], ffn_type="dense",
                                intermediate_size=96, n_routed_experts=0, num_experts_per_tok=0,
                                moe_intermediate_size=0, num_hash_layers=0),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
