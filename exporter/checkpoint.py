"""Reading (and, for tests and tools, writing) DeepSeek-V4 checkpoints.

A checkpoint is a directory with `config.json` and `*.safetensors` shards (listed by
`model.safetensors.index.json` when present). Three tensor namings exist in the wild and are
detected once per checkpoint, never guessed per tensor:

- "official": DeepSeek's names (`embed.weight`, `layers.N.attn.wq_a.weight`, ...). The model's
  state_dict uses exactly these.
- "transformers": the module names of `transformers.DeepseekV4ForCausalLM`
  (`model.layers.N.self_attn.q_a_proj.weight`, ...), with routed experts either fused
  (`mlp.experts.gate_up_proj` [E, 2I, d], `mlp.experts.down_proj` [E, d, I]) or per expert.
  `save_pretrained(..., save_original_format=False)` writes this.
- "transformers-saved": what a plain `save_pretrained()` of transformers 5.23 writes: its weight
  conversion is reverted on save, giving official names under a `model.` prefix, except
  `model.embed_tokens.weight`, `model.hc_head.hc_{fn,base,scale}`, `head.weight` (no prefix),
  and `model.layers.N.attn.norm.weight` for the official `attn.kv_norm.weight`.

Quantized weights are dequantized while reading: FP8 e4m3 with a `.scale` (or HF
`.weight_scale_inv`) per 128x128 block, and FP4 e2m1 experts packed two per byte with one scale
per 32 inputs. Tensors are copied one at a time into an already allocated model, so memory is
never doubled. Every problem raises `CheckpointError` with a message naming file, tensor, shape.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import CSA, ConfigError, ModelConfig
from .presets import PRESETS, preset

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError", "expected_tensors", "load_checkpoint", "load_model", "save_checkpoint",
    "quantize_fp8_blockwise", "dequantize_fp8_blockwise", "pack_fp4", "dequantize_fp4",
    "to_transformers_name", "from_transformers_name", "detect_naming", "weight_bytes",
    "available_memory", "check_memory",
]

OFFICIAL, TRANSFORMERS, TRANSFORMERS_SAVED = "official", "transformers", "transformers-saved"
FLOAT, FP32, INT = "float", "fp32", "int"  # kinds: model dtype / always fp32 / integer
FP8_BLOCK, FP4_BLOCK = 128, 32
FP8_MAX, FP4_MAX = 448.0, 6.0
_LIST_LIMIT = 8  # how many names an error message spells out


class CheckpointError(ValueError):
    """A checkpoint cannot be read into the model. The message names the file/tensor/shape."""


# ============================================================================ expected tensors
def expected_tensors(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Official name -> (shape, kind) of every tensor a checkpoint of `config` holds (no MTP)."""
    c = config
    d, hc, D, H, g, q = c.hidden_size, c.hc_mult, c.head_dim, c.num_heads, c.o_groups, c.q_lora_rank
    out: dict[str, tuple[tuple[int, ...], str]] = {}

    def add(name: str, shape: Iterable[int], kind: str = FLOAT) -> None:
        out[name] = (tuple(shape), kind)

    add("embed.weight", (c.vocab_size, d))
    add("head.weight", (c.vocab_size, d))
    add("norm.weight", (d,))
    add("hc_head_fn", (hc, hc * d), FP32)
    add("hc_head_base", (hc,), FP32)
    add("hc_head_scale", (1,), FP32)
    mix = (2 + hc) * hc  # pre (hc) + post (hc) + comb (hc*hc) mixing logits
    for i in range(c.num_layers):
        p = f"layers.{i}."
        add(p + "attn_norm.weight", (d,))
        add(p + "ffn_norm.weight", (d,))
        for site in ("attn", "ffn"):
            add(f"{p}hc_{site}_fn", (mix, hc * d), FP32)
            add(f"{p}hc_{site}_base", (mix,), FP32)
            add(f"{p}hc_{site}_scale", (3,), FP32)
        a = p + "attn."
        add(a + "wq_a.weight", (q, d))
        add(a + "q_norm.weight", (q,))
        add(a + "wq_b.weight", (H * D, q))
        add(a + "wkv.weight", (D, d))
        add(a + "kv_norm.weight", (D,))
        add(a + "wo_a.weight", (g * c.o_lora_rank, H * D // g))
        add(a + "wo_b.weight", (d, g * c.o_lora_rank))
        add(a + "attn_sink", (H,), FP32)
        m = c.ratio(i)
        if m:
            width = (2 if m == CSA else 1) * D  # CSA blocks overlap: two halves per token
            _compressor(add, a + "compressor.", m, width, D, d)
        if m == CSA:
            Hi, Di = c.index_n_heads, c.index_head_dim
            add(a + "indexer.wq_b.weight", (Hi * Di, q))
            add(a + "indexer.weights_proj.weight", (Hi, d))
            _compressor(add, a + "indexer.compressor.", CSA, 2 * Di, Di, d)
        f = p + "ffn."
        if c.ffn_type == "dense":
            for w, shape in _swiglu(c.intermediate_size, d):
                add(f + w, shape)
            continue
        E, I = c.n_routed_experts, c.moe_intermediate_size
        add(f + "gate.weight", (E, d))
        if c.is_hash_layer(i):
            add(f + "gate.tid2eid", (c.vocab_size, c.num_experts_per_tok), INT)
        else:
            add(f + "gate.bias", (E,), FP32)
        for e in range(E):
            for w, shape in _swiglu(I, d):
                add(f"{f}experts.{e}.{w}", shape)
        if c.n_shared_experts == 1:
            for w, shape in _swiglu(I, d):
                add(f"{f}shared_experts.{w}", shape)
    return out


def _compressor(add: Callable, p: str, ratio: int, width: int, norm_dim: int, d: int) -> None:
    add(p + "wkv.weight", (width, d))
    add(p + "wgate.weight", (width, d))
    add(p + "ape", (ratio, width), FP32)
    add(p + "norm.weight", (norm_dim,))


def _swiglu(inter: int, d: int) -> list[tuple[str, tuple[int, int]]]:
    return [("w1.weight", (inter, d)), ("w2.weight", (d, inter)), ("w3.weight", (inter, d))]


# ============================================================================ quantization
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_E2M1_MIDPOINTS = (_E2M1[1:] + _E2M1[:-1]) / 2


def _pow2_exponent(x: torch.Tensor) -> torch.Tensor:
    """ceil(log2(x)) exactly (frexp, not log2, so exact powers of two never round up)."""
    mant, exp = torch.frexp(x)
    return torch.where(mant == 0.5, exp - 1, exp)


def _e8m0(exp: torch.Tensor) -> torch.Tensor:
    """Integer exponents -> float8_e8m0fnu bytes (2^(b-127)); built by hand, not by rounding."""
    return (exp.clamp(-127, 127) + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def _scale_float(scale: torch.Tensor) -> torch.Tensor:
    """e8m0 (or raw uint8 e8m0 bytes) -> 2^(b-127) in fp32; float scales pass through."""
    if scale.dtype in (torch.float8_e8m0fnu, torch.uint8):
        return torch.exp2(scale.view(torch.uint8).float() - 127)
    return scale.float()


def _block_scale_exp(w: torch.Tensor, rows: int, cols: int, qmax: float) -> torch.Tensor:
    """Power-of-two block scales: 2^ceil(log2(amax/qmax)) per (rows x cols) block, 0 for zero blocks."""
    o, i = w.shape
    R, C = -(-o // rows), -(-i // cols)
    padded = F.pad(w.abs(), (0, C * cols - i, 0, R * rows - o))  # zero padding leaves amax alone
    amax = padded.view(R, rows, C, cols).amax(dim=(1, 3))
    return torch.where(amax > 0, _pow2_exponent(amax / qmax), torch.zeros_like(amax, dtype=torch.int32))


def _expand(scale: torch.Tensor, o: int, i: int, rows: int, cols: int) -> torch.Tensor:
    """Block scales [R, C] -> per element [o, i] (edge blocks cropped)."""
    R, C = scale.shape
    return scale[:, None, :, None].expand(R, rows, C, cols).reshape(R * rows, C * cols)[:o, :i]


def fp8_scale_shape(shape: tuple[int, ...], block: int = FP8_BLOCK) -> tuple[int, int]:
    return (-(-shape[0] // block), -(-shape[1] // block))


def fp4_scale_shape(shape: tuple[int, ...], block: int = FP4_BLOCK) -> tuple[int, int]:
    return (shape[0], -(-shape[1] // block))


def quantize_fp8_blockwise(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[o, i] -> (float8_e4m3fn [o, i], float8_e8m0fnu scales [ceil(o/128), ceil(i/128)])."""
    w = w.detach().float()
    exp = _block_scale_exp(w, block, block, FP8_MAX).clamp(-127, 127)
    scale = _expand(torch.exp2(exp.float()), *w.shape, block, block)
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, _e8m0(exp)


def dequantize_fp8_blockwise(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                             block: int = FP8_BLOCK) -> torch.Tensor:
    if tuple(scale.shape) != fp8_scale_shape(q.shape, block):
        raise CheckpointError(f"FP8 scale has shape {list(scale.shape)}, expected "
                              f"{list(fp8_scale_shape(q.shape, block))} for a {list(q.shape)} weight")
    return (q.float() * _expand(_scale_float(scale), *q.shape, block, block)).to(dtype)


def pack_fp4(w: torch.Tensor, block: int = FP4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[o, i] -> (int8 [o, i/2]: low nibble = even element, high = odd; e8m0 scales [o, ceil(i/32)]).

    Rounds to the nearest e2m1 value (ties toward the smaller magnitude)."""
    w = w.detach().float()
    o, i = w.shape
    if i % 2:
        raise CheckpointError(f"FP4 packing needs an even input dim, got shape {list(w.shape)}")
    exp = _block_scale_exp(w, 1, block, FP4_MAX).clamp(-127, 127)
    x = w / _expand(torch.exp2(exp.float()), o, i, 1, block)
    code = (x.abs().unsqueeze(-1) > _E2M1_MIDPOINTS).sum(-1, dtype=torch.uint8)  # ties -> lower code
    code |= torch.signbit(x).to(torch.uint8) << 3
    packed = code[:, 0::2] | (code[:, 1::2] << 4)
    return packed.view(torch.int8), _e8m0(exp)


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                   block: int = FP4_BLOCK) -> torch.Tensor:
    """Inverse of `pack_fp4`; `packed` is int8/uint8 [o, i/2] (or float4_e2m1fn_x2)."""
    b = packed.view(torch.uint8)
    o, i = b.shape[0], 2 * b.shape[1]
    if tuple(scale.shape) != fp4_scale_shape((o, i), block):
        raise CheckpointError(f"FP4 scale has shape {list(scale.shape)}, expected "
                              f"{list(fp4_scale_shape((o, i), block))} for a packed {list(b.shape)} "
                              f"(= [{o}, {i}]) weight")
    codes = torch.stack([b & 15, b >> 4], dim=-1).reshape(o, i).long()
    vals = _E2M1[codes & 7] * (1 - 2 * (codes >> 3)).float()
    return (vals * _expand(_scale_float(scale), o, i, 1, block)).to(dtype)


# FP8 in the official release: attention projections, indexer queries and all expert weights;
# routed experts may instead be FP4. Norms, compressors, gate, embed and head stay unquantized.
_FP8_RE = re.compile(r"(^|\.)(attn\.(wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)|"
                     r"ffn\.(shared_experts\.)?w[123])\.weight$")
_EXPERT_RE = re.compile(r"(^|\.)ffn\.experts\.\d+\.w[123]\.weight$")


def _quant_format(name: str, fp8: bool, fp4_experts: bool) -> str | None:
    if fp4_experts and _EXPERT_RE.search(name):
        return "fp4"
    if fp8 and (_FP8_RE.search(name) or _EXPERT_RE.search(name)):
        return "fp8"
    return None


# ============================================================================ names
_GLOBALS = {  # official -> transformers module name
    "embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight", "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base", "hc_head_scale": "model.hc_head.hc_scale",
}
_W_TO_PROJ = {"1": "gate", "2": "down", "3": "up"}
# Inside `layers.N.`: (official, transformers). A trailing "." marks a module prefix (the leaf,
# e.g. "weight", is kept); otherwise the whole parameter name must match. First match wins.
_LAYER_PAIRS = [
    ("attn.attn_sink", "self_attn.sinks"),
    ("attn.compressor.ape", "self_attn.compressor.position_bias"),
    ("attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias"),
    ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"),
    *[(f"hc_{s}_{p}", f"{s}_hc.{p}") for s in ("attn", "ffn") for p in ("fn", "base", "scale")],
    ("attn_norm.", "input_layernorm."),
    ("ffn_norm.", "post_attention_layernorm."),
    ("attn.wq_a.", "self_attn.q_a_proj."),
    ("attn.q_norm.", "self_attn.q_a_norm."),
    ("attn.wq_b.", "self_attn.q_b_proj."),
    ("attn.wkv.", "self_attn.kv_proj."),
    ("attn.kv_norm.", "self_attn.kv_norm."),
    ("attn.wo_a.", "self_attn.o_a_proj."),
    ("attn.wo_b.", "self_attn.o_b_proj."),
    ("attn.compressor.wkv.", "self_attn.compressor.kv_proj."),
    ("attn.compressor.wgate.", "self_attn.compressor.gate_proj."),
    ("attn.compressor.norm.", "self_attn.compressor.kv_norm."),
    ("attn.indexer.wq_b.", "self_attn.compressor.indexer.q_b_proj."),
    ("attn.indexer.weights_proj.", "self_attn.compressor.indexer.scorer.weights_proj."),
    ("attn.indexer.compressor.wkv.", "self_attn.compressor.indexer.kv_proj."),
    ("attn.indexer.compressor.wgate.", "self_attn.compressor.indexer.gate_proj."),
    ("attn.indexer.compressor.norm.", "self_attn.compressor.indexer.kv_norm."),
    ("ffn.gate.", "mlp.gate."),
    *[(f"ffn.shared_experts.w{k}.", f"mlp.shared_experts.{h}_proj.") for k, h in _W_TO_PROJ.items()],
    *[(f"ffn.w{k}.", f"mlp.{h}_proj.") for k, h in _W_TO_PROJ.items()],  # hatrt's dense FFN
]
_LAYER_PAIRS_REV = [(hf, off) for off, hf in _LAYER_PAIRS]
_PROJ_TO_W = {v: k for k, v in _W_TO_PROJ.items()}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.*)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_OFF_EXPERT_RE = re.compile(r"^ffn\.experts\.(\d+)\.w([123])\.(.*)$")
_HF_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate|down|up)_proj\.(.*)$")
_HF_FUSED_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_HF_MODULE_RE = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp|input_layernorm|post_attention_layernorm|"
                           r"attn_hc|ffn_hc)\.")


def _rename(rest: str, pairs: Iterable[tuple[str, str]]) -> str | None:
    for src, dst in pairs:
        if rest == src or (src.endswith(".") and rest.startswith(src)):
            return dst + rest[len(src):]
    return None


def to_transformers_name(name: str) -> str:
    """Official name -> transformers module name (routed experts per expert, not fused)."""
    if name in _GLOBALS:
        return _GLOBALS[name]
    m = _LAYER_RE.match(name)
    if m:
        e = _OFF_EXPERT_RE.match(m[2])
        rest = (f"mlp.experts.{e[1]}.{_W_TO_PROJ[e[2]]}_proj.{e[3]}" if e
                else _rename(m[2], _LAYER_PAIRS))
        if rest is not None:
            return f"model.layers.{m[1]}.{rest}"
    raise CheckpointError(f"no transformers name for tensor {name!r}")


def from_transformers_name(name: str) -> str | None:
    """transformers module name -> official name; None when it names no known tensor."""
    for off, hf in _GLOBALS.items():
        if name == hf:
            return off
    m = _HF_LAYER_RE.match(name)
    if not m:
        return None
    e = _HF_EXPERT_RE.match(m[2])
    rest = (f"ffn.experts.{e[1]}.w{_PROJ_TO_W[e[2]]}.{e[3]}" if e
            else _rename(m[2], _LAYER_PAIRS_REV))
    return None if rest is None else f"layers.{m[1]}.{rest}"


_SAVED_FIXUPS = {"embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight",
                 "hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base",
                 "hc_head.hc_scale": "hc_head_scale"}
_SAVED_KV_NORM = re.compile(r"^(layers\.\d+\.attn\.)norm\.weight$")


def _from_saved_name(name: str) -> str:
    """transformers-saved -> official (see the module docstring for the quirks undone here)."""
    name = name.removeprefix("model.")
    name = _SAVED_FIXUPS.get(name, name)
    return _SAVED_KV_NORM.sub(r"\1kv_norm.weight", name)


def detect_naming(keys: Iterable[str]) -> str:
    """One naming per checkpoint: official names never carry the `model.` prefix."""
    keys = list(keys)
    if not any(k.startswith(("model.", "lm_head.")) for k in keys):
        return OFFICIAL
    if any(_HF_MODULE_RE.match(k) for k in keys):
        return TRANSFORMERS
    return TRANSFORMERS_SAVED


def _is_mtp(name: str) -> bool:
    return name.startswith(("mtp.", "model.mtp."))


# ============================================================================ scanning shards
@dataclass(frozen=True)
class _Stored:
    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string: "F8_E4M3", "BF16", "I8", ...


@dataclass(frozen=True)
class _Source:
    weight: _Stored
    shape: tuple[int, ...]  # logical (dequantized) shape
    index: tuple = ()  # slice of the stored tensor (fused experts)
    scale: _Stored | None = None
    quant: str | None = None  # None | "fp8" | "fp4"


def _scan(path: Path) -> dict[str, _Stored]:
    """Every tensor's file, shape and dtype, from the shard headers only."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (a checkpoint is a directory with config.json "
                              "and *.safetensors shards)")
    index_file = path / "model.safetensors.index.json"
    weight_map: dict[str, str] | None = None
    if index_file.exists():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index_file}: not a valid safetensors index ({e!r})") from None
        absent = [f for f in files if not (path / f).is_file()]
        if absent:
            raise CheckpointError(f"{index_file} names {len(absent)} shard file(s) that do not exist: "
                                  f"{_fmt_list(absent)}")
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors files (and no model.safetensors.index.json)")
    stored: dict[str, _Stored] = {}
    for name in files:
        file = path / name
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    if key in stored:
                        raise CheckpointError(f"tensor {key!r} is stored twice: in {stored[key].file} "
                                              f"and in {file}")
                    stored[key] = _Stored(file, key, tuple(sl.get_shape()), sl.get_dtype())
        except CheckpointError:
            raise
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({e})") from None
    if weight_map is not None:
        wrong = [k for k, f in weight_map.items() if k not in stored or stored[k].file.name != f]
        if wrong:
            raise CheckpointError(f"{index_file}: {len(wrong)} tensor(s) are not in the shard the index "
                                  f"names: {_fmt_list(f'{k} (-> {weight_map[k]})' for k in wrong)}")
    return stored


_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors$")


def _missing_shards(path: Path) -> list[str]:
    """Numbered shards (`model-00002-of-00005.safetensors`) absent from a directory without an index.

    Without `model.safetensors.index.json` nothing lists the tensors of a lost shard, but the
    numbering still shows the hole: `-of-N` with fewer than N files present."""
    if (path / "model.safetensors.index.json").exists():
        return []  # _scan checks the shards the index names
    groups: dict[tuple[str, str], set[int]] = {}
    for p in path.glob("*.safetensors"):
        m = _SHARD_RE.match(p.name)
        if m:
            groups.setdefault((m["stem"], m["n"]), set()).add(int(m["i"]))
    absent = []
    for (stem, n), present in sorted(groups.items()):
        width = len(n)
        absent += [f"{stem}-{i:0{width}d}-of-{n}.safetensors" for i in range(1, int(n) + 1) if i not in present]
    return absent


def _plan(stored: Mapping[str, _Stored]) -> tuple[str, dict[str, _Source], list[str]]:
    """(naming, official name -> source, unmapped names as stored)."""
    naming = detect_naming(stored)
    scales: dict[str, _Stored] = {}
    for key, st in stored.items():  # a scale is `<p>.scale` / `<p>.weight_scale_inv` next to `<p>.weight`
        for suffix in (".scale", ".weight_scale_inv"):
            if key.endswith(suffix) and key[: -len(suffix)] + ".weight" in stored:
                wkey = key[: -len(suffix)] + ".weight"
                if wkey in scales:
                    raise CheckpointError(f"weight {wkey!r} has two scales: {scales[wkey].key!r} and {key!r}")
                scales[wkey] = st
    scale_keys = {s.key for s in scales.values()}
    rename = {OFFICIAL: lambda k: k, TRANSFORMERS: from_transformers_name,
              TRANSFORMERS_SAVED: _from_saved_name}[naming]
    sources: dict[str, _Source] = {}
    origin: dict[str, str] = {}
    unmapped: list[str] = []

    def put(name: str, src: _Source) -> None:
        if name in sources:
            raise CheckpointError(f"tensors {origin[name]!r} and {src.weight.key!r} both map to {name!r} "
                                  f"({naming} naming)")
        sources[name], origin[name] = src, src.weight.key

    for key, st in stored.items():
        if key in scale_keys or _is_mtp(key):
            continue  # scales travel with their weight; the MTP block is not loaded
        scale = scales.get(key)
        fused = _HF_FUSED_RE.match(key) if naming == TRANSFORMERS else None
        if fused:
            for name, src in _unfuse(st, int(fused[1]), fused[2], scale):
                put(name, src)
            continue
        name = rename(key)
        if name is None:
            unmapped.append(key)
            if scale is not None:
                unmapped.append(scale.key)
            continue
        put(name, _source(st, scale))
    return naming, sources, unmapped


def _source(st: _Stored, scale: _Stored | None) -> _Source:
    if st.dtype == "F8_E4M3":
        if scale is None:
            p = st.key.removesuffix(".weight")
            raise CheckpointError(f"{st.file}: FP8 weight {st.key!r} {list(st.shape)} has no scale tensor "
                                  f"({p}.scale or {p}.weight_scale_inv)")
        return _Source(st, st.shape, scale=scale, quant="fp8")
    if scale is not None and st.dtype in ("I8", "U8", "F4"):
        if len(st.shape) != 2:
            raise CheckpointError(f"{st.file}: packed FP4 weight {st.key!r} has shape {list(st.shape)}, "
                                  "expected 2 dims")
        # int8 headers count bytes (two values each); F4 headers count values.
        shape = st.shape if st.dtype == "F4" else (st.shape[0], 2 * st.shape[1])
        return _Source(st, shape, scale=scale, quant="fp4")
    if scale is not None:
        raise CheckpointError(f"{st.file}: tensor {st.key!r} is {st.dtype}, not FP8/FP4, but has a scale "
                              f"{scale.key!r}")
    return _Source(st, st.shape)


def _unfuse(st: _Stored, layer: int, kind: str, scale: _Stored | None) -> list[tuple[str, _Source]]:
    """transformers' fused experts: gate_up_proj [E, 2I, d] (rows :I = w1, I: = w3), down_proj [E, d, I]."""
    if scale is not None or st.dtype == "F8_E4M3":
        raise CheckpointError(f"{st.file}: quantized fused expert tensor {st.key!r} is not supported; "
                              "store routed experts per expert")
    if len(st.shape) != 3 or (kind == "gate_up_proj" and st.shape[1] % 2):
        want = "[E, 2*moe_intermediate_size, hidden_size]" if kind == "gate_up_proj" else \
            "[E, hidden_size, moe_intermediate_size]"
        raise CheckpointError(f"{st.file}: fused expert tensor {st.key!r} has shape {list(st.shape)}, "
                              f"expected {want}")
    E, rows, cols = st.shape
    p = f"layers.{layer}.ffn.experts."
    out = []
    for e in range(E):
        if kind == "down_proj":
            out.append((f"{p}{e}.w2.weight", _Source(st, (rows, cols), (e,))))
        else:
            I = rows // 2
            out.append((f"{p}{e}.w1.weight", _Source(st, (I, cols), (e, slice(0, I)))))
            out.append((f"{p}{e}.w3.weight", _Source(st, (I, cols), (e, slice(I, rows)))))
    return out


# ============================================================================ validation
def _fmt_list(items: Iterable[str], limit: int = _LIST_LIMIT) -> str:
    items = list(items)
    head = ", ".join(items[:limit])
    return head + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def _where(src: _Source) -> str:
    return f"{src.weight.file.name}:{src.weight.key}"


# Which config keys set each dim of a tensor; turns shape mismatches into config/weights hints.
_SHAPE_KEYS = [
    (r"(embed|head)\.weight", ("vocab_size", "hidden_size")),
    (r"(layers\.\d+\.(attn|ffn)_)?norm\.weight", ("hidden_size",)),
    (r"hc_head_fn", ("hc_mult", "hc_mult*hidden_size")),
    (r"layers\.\d+\.hc_(attn|ffn)_fn", ("(2+hc_mult)*hc_mult", "hc_mult*hidden_size")),
    (r"layers\.\d+\.attn\.wq_a\.weight", ("q_lora_rank", "hidden_size")),
    (r"layers\.\d+\.attn\.q_norm\.weight", ("q_lora_rank",)),
    (r"layers\.\d+\.attn\.wq_b\.weight", ("num_attention_heads*head_dim", "q_lora_rank")),
    (r"layers\.\d+\.attn\.wkv\.weight", ("head_dim", "hidden_size")),
    (r"layers\.\d+\.attn\.kv_norm\.weight", ("head_dim",)),
    (r"layers\.\d+\.attn\.wo_a\.weight", ("o_groups*o_lora_rank", "num_attention_heads*head_dim/o_groups")),
    (r"layers\.\d+\.attn\.wo_b\.weight", ("hidden_size", "o_groups*o_lora_rank")),
    (r"layers\.\d+\.attn\.attn_sink", ("num_attention_heads",)),
    (r"layers\.\d+\.attn\.compressor\.(wkv|wgate)\.weight", ("head_dim (x2 on CSA layers)", "hidden_size")),
    (r"layers\.\d+\.attn\.compressor\.ape", ("compress_ratios", "head_dim (x2 on CSA layers)")),
    (r"layers\.\d+\.attn\.compressor\.norm\.weight", ("head_dim",)),
    (r"layers\.\d+\.attn\.indexer\.wq_b\.weight", ("index_n_heads*index_head_dim", "q_lora_rank")),
    (r"layers\.\d+\.attn\.indexer\.weights_proj\.weight", ("index_n_heads", "hidden_size")),
    (r"layers\.\d+\.attn\.indexer\.compressor\.(wkv|wgate)\.weight", ("2*index_head_dim", "hidden_size")),
    (r"layers\.\d+\.attn\.indexer\.compressor\.ape", ("compress_ratios", "2*index_head_dim")),
    (r"layers\.\d+\.attn\.indexer\.compressor\.norm\.weight", ("index_head_dim",)),
    (r"layers\.\d+\.ffn\.gate\.weight", ("n_routed_experts", "hidden_size")),
    (r"layers\.\d+\.ffn\.gate\.bias", ("n_routed_experts",)),
    (r"layers\.\d+\.ffn\.gate\.tid2eid", ("vocab_size", "num_experts_per_tok")),
    (r"layers\.\d+\.ffn\.(experts\.\d+|shared_experts)\.w[13]\.weight", ("moe_intermediate_size", "hidden_size")),
    (r"layers\.\d+\.ffn\.(experts\.\d+|shared_experts)\.w2\.weight", ("hidden_size", "moe_intermediate_size")),
    (r"layers\.\d+\.ffn\.w[13]\.weight", ("intermediate_size", "hidden_size")),
    (r"layers\.\d+\.ffn\.w2\.weight", ("hidden_size", "intermediate_size")),
]


def _diagnose(config: ModelConfig, present: set[str], bad_shapes: list[tuple[str, tuple, tuple]]) -> list[str]:
    """Findings that say the config and the weights describe different models."""
    notes: dict[str, str] = {}  # config key -> first finding
    seen: dict[tuple, int] = {}
    for name, want, got in bad_shapes:
        for pattern, keys in _SHAPE_KEYS:
            if re.fullmatch(pattern, name) and len(want) == len(got) == len(keys):
                for key, w, g in zip(keys, want, got):
                    seen[key, w, g] = seen.get((key, w, g), 0) + 1
                    # one odd tensor is damage, not a config; two agreeing on a key is a pattern
                    if w != g and seen[key, w, g] == 2:
                        notes[key] = (f"{key}: config gives {w}, the weights have {g} "
                                      f"(e.g. {name} is {list(got)}, expected {list(want)})")
                break
    by_layer: dict[int, set[str]] = {}
    for name in present:
        m = _LAYER_RE.match(name)
        if m:
            by_layer.setdefault(int(m[1]), set()).add(m[2])
    L, n = config.num_layers, max(by_layer, default=-1) + 1
    if by_layer and n != L:
        extra = f" (found layers.{L}.* and up)" if n > L else ""
        notes["num_hidden_layers"] = (f"num_hidden_layers: config gives {L}, the weights hold layers "
                                      f"0..{n - 1}{extra}")
    hash_layers, expert_ids = [], set()
    for i in range(min(L, n)):
        rests = by_layer.get(i, set())
        has = lambda p: any(r.startswith(p) for r in rests)  # noqa: E731
        r, comp, idx = config.ratio(i), has("attn.compressor."), has("attn.indexer.")
        if comp != bool(r) or (comp and idx != (r == CSA)):
            what = ("a compressor and an indexer (CSA)" if idx else "a compressor only (HCA)" if comp
                    else "no compressor (window only)")
            notes.setdefault(f"compress_ratios[{i}]",
                             f"compress_ratios[{i}]: config gives {r}, the weights of layer {i} have {what}")
        dense, moe = has("ffn.w1."), has("ffn.experts.") or has("ffn.gate.")
        if (config.ffn_type == "dense" and moe) or (config.ffn_type == "moe" and dense):
            notes.setdefault("ffn_type", f"ffn_type: config gives {config.ffn_type!r}, layer {i} of the "
                                         f"weights has a {'MoE' if moe else 'dense'} FFN")
        if config.ffn_type != "moe" or not moe:
            continue
        if "ffn.gate.tid2eid" in rests:
            hash_layers.append(i)
        expert_ids.update(int(m[1]) for m in map(_OFF_EXPERT_RE.match, rests) if m)
        shared = has("ffn.shared_experts.")
        if shared != (config.n_shared_experts == 1):
            notes.setdefault("n_shared_experts", f"n_shared_experts: config gives {config.n_shared_experts}, "
                                                 f"layer {i} of the weights has {'a' if shared else 'no'} "
                                                 "shared expert")
    if config.ffn_type == "moe" and by_layer:
        if hash_layers != list(range(min(config.num_hash_layers, L, n))):
            notes.setdefault("num_hash_layers", f"num_hash_layers: config gives {config.num_hash_layers}, "
                                                f"the weights have ffn.gate.tid2eid on layers {hash_layers}")
        if expert_ids and max(expert_ids) + 1 != config.n_routed_experts:
            notes.setdefault("n_routed_experts", f"n_routed_experts: config gives {config.n_routed_experts}, "
                                                 f"the weights hold experts 0..{max(expert_ids)}")
    return list(notes.values())


def _validate(path: Path, naming: str, sources: dict[str, _Source], unmapped: list[str],
              targets: Mapping[str, torch.Tensor], config: ModelConfig | None, strict: bool,
              missing_shards: list[str] = ()) -> None:
    tied = config is not None and config.tie_word_embeddings and "head.weight" not in sources
    missing = [n for n in targets if n not in sources and not (tied and n == "head.weight")]
    unexpected = [n if s.weight.key == n or s.index else f"{n} (stored as {s.weight.key})"
                  for n, s in sources.items() if n not in targets] + unmapped
    bad_shapes = [(n, tuple(targets[n].shape), s.shape) for n, s in sources.items()
                  if n in targets and tuple(targets[n].shape) != s.shape]
    if missing_shards and missing:  # a lost shard, not a config/weights mismatch: say so first
        msg = (f"{path}: {len(missing_shards)} shard file(s) missing: {_fmt_list(missing_shards)} (no "
               f"model.safetensors.index.json lists the shards, but their numbering shows the gap); {len(missing)} "
               f"tensor(s) missing from the checkpoint ({naming} naming): "
               + _fmt_list(f"{n} {list(targets[n].shape)}" for n in missing))
        if strict:
            raise CheckpointError(msg)
        log.warning("%s", msg)
        missing = []
    if bad_shapes or (strict and (missing or unexpected)):
        notes = _diagnose(config, set(sources) | set(unmapped), bad_shapes) if config is not None else []
        if notes:
            lost = ("; or a shard file is missing: there is no model.safetensors.index.json to check"
                    if missing and not bad_shapes and not unexpected
                    and not (path / "model.safetensors.index.json").exists() else "")
            raise CheckpointError(
                f"{path}: the weights do not match config.json (looks like a config/weights mismatch{lost}; "
                f"{naming} naming):\n  - " + "\n  - ".join(notes[:_LIST_LIMIT])
                + (f"\n  ... and {len(notes) - _LIST_LIMIT} more" if len(notes) > _LIST_LIMIT else "")
                + f"\n({len(missing)} missing, {len(unexpected)} unexpected, {len(bad_shapes)} mis-shaped "
                "tensors)" + (f"\nmissing: {_fmt_list(missing)}" if missing else ""))
    if bad_shapes:
        raise CheckpointError(f"{path}: {len(bad_shapes)} tensor(s) have the wrong shape: " + _fmt_list(
            f"{n} expected {list(w)}, got {list(g)} ({_where(sources[n])})" for n, w, g in bad_shapes))
    if missing:
        msg = f"{path}: {len(missing)} tensor(s) missing from the checkpoint ({naming} naming): " + _fmt_list(
            f"{n} {list(targets[n].shape)}" for n in missing)
        if strict:
            raise CheckpointError(msg)
        log.warning("%s", msg)
    if unexpected:
        msg = f"{path}: {len(unexpected)} unexpected tensor(s) in the checkpoint ({naming} naming): " + \
            _fmt_list(unexpected)
        if strict:
            raise CheckpointError(msg)
        log.warning("%s", msg)
    for name, src in sources.items():
        if name not in targets:
            continue
        t, st = targets[name], src.weight
        if src.quant == "fp8":
            want = fp8_scale_shape(src.shape)
        elif src.quant == "fp4":
            want = fp4_scale_shape(src.shape)
        else:
            is_int = st.dtype[0] in "IU" or st.dtype == "BOOL"
            if is_int != (not t.is_floating_point()):
                raise CheckpointError(f"{st.file}: tensor {st.key!r} is {st.dtype}, but {name} is "
                                      f"{str(t.dtype).removeprefix('torch.')} in the model")
            continue
        if src.scale.shape != want:
            raise CheckpointError(f"{src.scale.file}: {src.quant.upper()} scale {src.scale.key!r} has shape "
                                  f"{list(src.scale.shape)}, expected {list(want)} for weight {st.key!r} "
                                  f"of shape {list(src.shape)}")


# ============================================================================ loading
def load_checkpoint(model: nn.Module, path: str | os.PathLike, *, strict: bool = True,
                    progress: Callable[[int, int, str], None] | None = None) -> None:
    """Fill `model` (state_dict in official names) in place from the shards under `path`.

    Tensors are read one at a time (FP8 in row chunks) and dequantized/cast into the model's
    own tensors. `progress(done, total, name)` is called after each tensor. With strict=False,
    missing and unexpected tensors are logged instead of raised; wrong shapes always raise."""
    path = Path(path)
    targets = model.state_dict()
    if any(t.is_meta for t in targets.values()):
        raise CheckpointError("the model is on the meta device; call model.to_empty(device=...) first")
    config = getattr(model, "config", None)
    config = config if isinstance(config, ModelConfig) else None
    naming, sources, unmapped = _plan(_scan(path))
    log.info("%s: %d tensors, %s naming", path, len(sources), naming)
    _validate(path, naming, sources, unmapped, targets, config, strict, _missing_shards(path))
    todo = sorted((n for n in sources if n in targets), key=lambda n: (sources[n].weight.file, n))
    with contextlib.ExitStack() as stack, torch.no_grad():
        handles: dict[Path, object] = {}

        def shard(file: Path):
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(file, framework="pt"))
            return handles[file]

        for done, name in enumerate(todo, 1):
            src = sources[name]
            try:
                _read_into(targets[name], src, shard)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise CheckpointError(f"{src.weight.file}: cannot read tensor {src.weight.key!r} ({e})") from None
            if progress is not None:
                progress(done, len(todo), name)
        if config is not None and config.tie_word_embeddings and "head.weight" not in sources \
                and "head.weight" in targets and "embed.weight" in targets:
            targets["head.weight"].copy_(targets["embed.weight"])


def _read_into(target: torch.Tensor, src: _Source, shard: Callable) -> None:
    f = shard(src.weight.file)
    if src.quant == "fp8":
        scale = _scale_float(shard(src.scale.file).get_tensor(src.scale.key))
        sl, rows, step = f.get_slice(src.weight.key), src.shape[0], 8 * FP8_BLOCK
        for r0 in range(0, rows, step):  # row chunks bound the fp32 temporary
            w = sl[r0:r0 + step]
            s = scale[r0 // FP8_BLOCK: -(-(r0 + w.shape[0]) // FP8_BLOCK)]
            target[r0:r0 + w.shape[0]].copy_(dequantize_fp8_blockwise(w, s, target.dtype))
    elif src.quant == "fp4":
        scale = shard(src.scale.file).get_tensor(src.scale.key)
        target.copy_(dequantize_fp4(f.get_tensor(src.weight.key), scale, target.dtype))
    elif src.index:
        target.copy_(f.get_slice(src.weight.key)[src.index])
    else:
        target.copy_(f.get_tensor(src.weight.key))


def _cast(model: nn.Module, config: ModelConfig, dtype: torch.dtype) -> None:
    """Model-dtype tensors -> dtype; fp32-kept tensors stay fp32; integers untouched."""
    kinds = {n: k for n, (_, k) in expected_tensors(config).items()}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        want = {FLOAT: dtype, FP32: torch.float32}.get(kinds.get(name))
        if want is not None and t.dtype != want:
            t.data = t.data.to(want)


# ============================================================================ memory
SKIP_MEMORY_CHECK_ENV = "HATRT_SKIP_MEMORY_CHECK"
_GiB = 2**30


def _fmt_bytes(n: int) -> str:
    return f"{n / _GiB:.1f} GiB" if n >= _GiB else f"{n / 2**20:.1f} MiB"


def weight_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of the model's weights in `dtype`, from the shapes alone (nothing is allocated).

    Model-dtype tensors take dtype's size, the fp32-kept ones (mHC, sinks, ape, gate bias) 4 bytes,
    hash routing tables (int64) 8. Derived buffers (RoPE tables) are not counted (they are small)."""
    size = {FLOAT: dtype.itemsize, FP32: 4, INT: 8}
    return sum(math.prod(shape) * size[kind] for shape, kind in expected_tensors(config).values())


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (cgroup v2 without a limit) -> None


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == key and v.strip().isdigit():
                return int(v)
    except OSError:
        pass
    return 0


def _cgroup_available(self_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """Room left under the tightest cgroup memory limit of this process (a container's limit, which
    /proc/meminfo does not show); reclaimable file cache counts as free. None: no limit found."""
    try:
        lines = Path(self_cgroup).read_text().splitlines()
    except OSError:
        return None
    best: int | None = None

    def consider(limit: int | None, usage: int | None, stat: Path, inactive_key: str) -> None:
        nonlocal best
        if limit is None or usage is None or limit >= 1 << 60:  # v1 "no limit" is ~2^63
            return
        room = max(limit - max(usage - _stat_value(stat, inactive_key), 0), 0)
        best = room if best is None else min(best, room)

    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, rel = parts
        if hid == "0" and controllers == "":  # cgroup v2: the limit may sit on any ancestor
            base = Path(root)
            d = Path(rel)
            for anc in [d, *d.parents]:
                g = base / str(anc).lstrip("/")
                consider(_read_int(g / "memory.max"), _read_int(g / "memory.current"), g / "memory.stat",
                         "inactive_file")
        elif "memory" in controllers.split(","):  # cgroup v1
            for g in {Path(root) / "memory" / rel.lstrip("/"), Path(root) / "memory"}:
                consider(_read_int(g / "memory.limit_in_bytes"), _read_int(g / "memory.usage_in_bytes"),
                         g / "memory.stat", "total_inactive_file")
    return best


def available_memory(device: str | torch.device = "cpu") -> tuple[int, str] | None:
    """(bytes free for new allocations, where that figure comes from), or None when unknown.

    CPU: the smaller of MemAvailable (/proc/meminfo) and the room under a cgroup memory limit;
    elsewhere os.sysconf's available pages. CUDA: torch.cuda.mem_get_info. Other devices: None."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free memory on {device}"
    if device.type != "cpu":
        return None
    found = []
    mem = _meminfo_available()
    if mem is not None:
        found.append((mem, "MemAvailable in /proc/meminfo"))
    cg = _cgroup_available()
    if cg is not None:
        found.append((cg, "room under this process's cgroup memory limit"))
    if not found:
        try:
            found.append((os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available physical pages"))
        except (ValueError, OSError, AttributeError):
            return None
    return min(found)


def check_memory(config: ModelConfig, dtype: torch.dtype, *, device: str | torch.device = "cpu",
                 what: str | None = None, init_dtype: torch.dtype | None = None) -> None:
    """Raise CheckpointError, before anything is allocated, when the weights of `config` in `dtype`
    cannot fit in the memory available on `device`. `init_dtype`: a wider dtype the weights pass
    through first (presets are initialized in float32, then cast). Skipped when the environment
    sets HATRT_SKIP_MEMORY_CHECK=1, or when the available memory cannot be read."""
    if os.environ.get(SKIP_MEMORY_CHECK_ENV, "").strip() not in ("", "0"):
        return
    peak_dtype = init_dtype if init_dtype is not None and init_dtype.itemsize > dtype.itemsize else dtype
    need = weight_bytes(config, peak_dtype)
    avail = available_memory(device)
    if avail is None or need <= avail[0]:
        return
    name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
    via = f" (it is initialized in {name(peak_dtype)}, then cast to {name(dtype)})" if peak_dtype != dtype else ""
    where = "this machine has" if torch.device(device).type == "cpu" else f"{device} has"
    narrower = ""
    if init_dtype is None and dtype.itemsize > 2:
        half = weight_bytes(config, torch.bfloat16)
        narrower = f" (in bfloat16 it needs about {_fmt_bytes(half)}{'' if half <= avail[0] else ', still too much'})"
    raise CheckpointError(
        f"{what or config.name} needs about {_fmt_bytes(need)} for its weights in {name(peak_dtype)}{via}, "
        f"{where} {_fmt_bytes(avail[0])} available ({avail[1]}); loading it would be killed for lack of "
        f"memory. Use a smaller model{' or dtype' if narrower else ''}{narrower}, or set "
        f"{SKIP_MEMORY_CHECK_ENV}=1 to try anyway")


def load_model(path_or_preset: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
               quant_sim: bool = False, shared_expert_clamp: bool | None = None, seed: int = 0,
               check_memory: bool = True):
    """A `Transformer` from a checkpoint directory, or randomly initialized from a preset name.

    An existing directory wins over a preset of the same name. Checkpoint models are built on the
    meta device and filled from the shards (memory is never doubled); buffers that are not in the
    checkpoint (RoPE tables) are recomputed by `model.reset_buffers()`. Returned in eval mode.

    Before allocating, the weights' size is compared with the available memory (`check_memory`
    above): CheckpointError when they cannot fit. check_memory=False or HATRT_SKIP_MEMORY_CHECK=1
    skips that."""
    memory_check = _check_memory_fn if check_memory else None
    path = Path(path_or_preset)
    if isinstance(path_or_preset, str) and path_or_preset in PRESETS and not path.is_dir():
        from .model import Transformer  # late: model.py may import this module

        config = preset(path_or_preset)
        if memory_check is not None:
            memory_check(config, dtype, what=f"preset {path_or_preset!r}", init_dtype=torch.float32)
        model = Transformer(config, quant_sim=quant_sim, shared_expert_clamp=shared_expert_clamp)
        model.init_random(seed)  # the model's own deterministic init (its own generator)
        _cast(model, config, dtype)
        return model.eval()
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory, nor a preset name "
                              f"(presets: {', '.join(PRESETS)})")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (a checkpoint is a directory with config.json "
                              "and *.safetensors shards)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json in the checkpoint directory")
    try:
        config = ModelConfig.from_json(path / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    if memory_check is not None:
        memory_check(config, dtype, what=str(path))
    from .model import Transformer

    with torch.device("meta"):
        model = Transformer(config, quant_sim=quant_sim, shared_expert_clamp=shared_expert_clamp)
    _cast(model, config, dtype)
    model.to_empty(device="cpu")
    load_checkpoint(model, path)
    if hasattr(model, "reset_buffers"):
        model.reset_buffers()
    return model.eval()


_check_memory_fn = check_memory  # load_model's keyword shadows the function's name


# ============================================================================ saving
def save_checkpoint(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], config: ModelConfig,
                    path: str | os.PathLike, *, names: str = OFFICIAL, fp8: bool = False,
                    fp4_experts: bool = False, shard_bytes: int | None = None,
                    overwrite: bool = False) -> Path:
    """Write config.json + safetensors shards (+ index.json when sharded), atomically.

    `names`: "official" or "transformers" (module names, routed experts fused as transformers
    keeps them; FP8 scales then use the HF spelling `weight_scale_inv`, and fused experts are
    never quantized). `fp8`: FP8 e4m3 with 128x128 e8m0 block scales for the projections FP8 in
    the official release; `fp4_experts`: routed experts packed FP4 e2m1 (official naming only)."""
    if names not in (OFFICIAL, TRANSFORMERS):
        raise CheckpointError(f"names={names!r}: must be {OFFICIAL!r} or {TRANSFORMERS!r}")
    if names == TRANSFORMERS and fp4_experts:
        raise CheckpointError("fp4_experts needs official names (transformers fuses the experts)")
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) \
        else dict(model_or_state_dict)
    path = Path(path)
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise CheckpointError(f"{path}: already exists and is not empty (pass overwrite=True)")

    tensors: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[tuple[int, str], torch.Tensor]] = {}
    for name, t in state.items():
        t = t.detach().cpu()
        e = _LAYER_RE.match(name)
        ex = _OFF_EXPERT_RE.match(e[2]) if e else None
        if names == TRANSFORMERS and ex and ex[3] == "weight":
            experts.setdefault(int(e[1]), {})[(int(ex[1]), ex[2])] = t
            continue
        out = name if names == OFFICIAL else to_transformers_name(name)
        fmt = _quant_format(name, fp8, fp4_experts) if t.is_floating_point() else None
        if fmt is None:
            tensors[out] = t
            continue
        q, s = quantize_fp8_blockwise(t) if fmt == "fp8" else pack_fp4(t)
        tensors[out] = q
        tensors[out.removesuffix(".weight") + (".scale" if names == OFFICIAL else ".weight_scale_inv")] = s
    for layer, ws in sorted(experts.items()):  # transformers keeps routed experts fused
        n = max(e for e, _ in ws) + 1
        if len(ws) != 3 * n:
            raise CheckpointError(f"layer {layer}: routed experts are incomplete ({len(ws)} of {3 * n} "
                                  "w1/w2/w3 tensors); cannot fuse them")
        p = f"model.layers.{layer}.mlp.experts."
        tensors[p + "gate_up_proj"] = torch.stack([torch.cat([ws[e, "1"], ws[e, "3"]]) for e in range(n)])
        tensors[p + "down_proj"] = torch.stack([ws[e, "2"] for e in range(n)])

    hf = config.to_hf_dict()
    if fp8 or fp4_experts:
        hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                     "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
        if fp4_experts:
            hf["expert_dtype"] = "fp4"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        _write_shards(tmp, tensors, shard_bytes)
        if path.exists():  # swap in: old copy aside, new one in place, old one removed
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_shards(out: Path, tensors: dict[str, torch.Tensor], shard_bytes: int | None) -> None:
    seen: set[int] = set()
    for k, t in tensors.items():  # safetensors refuses shared or strided storage
        ptr = t.untyped_storage().data_ptr()
        tensors[k] = t.clone() if ptr in seen or not t.is_contiguous() else t
        seen.add(ptr)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shard_bytes and shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
