"""FP8 E4M3 linear layers: the recipe, and its simulation in the reference.

A recipe names the linear layers that run as FP8 GEMMs and their static scales: the weight per
output channel (amax of its row / 448) and the input per tensor (calibrated amax / 448). The
quantized export (engines/quantize.py) writes exactly this as ONNX QuantizeLinear /
DequantizeLinear with float8e4m3fn; the reference applies the same round trip in `Linear.forward`
(exporter/model.py) when a recipe is attached, so an FP8 export is checked against the reference
under the same simulation at a tight tolerance, while the unquantized model measures what FP8
costs.

The round trip is ONNX's: q = saturate(round_to_nearest_even(x / scale)) in E4M3 (+-448), then
q * scale. Scales are fp32 (not powers of two: static per-channel/per-tensor FP8 needs none).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

FP8_MAX = 448.0
_AMAX_FLOOR = 1e-12
RECIPE_FORMAT = "hatrt-fp8-recipe"
RECIPE_VERSION = 1

# Which linear layers become FP8 GEMMs, by the last parts of their parameter names. Everything
# else stays in the export's precision: norms, residual adds and mHC mixes are not linears; the
# router (Gate), the compressors (fp32 by design), the grouped output projection (an einsum), the
# lightning indexer's projections and the LM head are kept on purpose (docs/quantization.md
# measures what quantizing them would cost).
FP8_LINEARS = ("attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_b", "w1", "w2", "w3")
KEEP_HIGH = ("indexer.", "head", "gate", "compressor.")


@dataclass(frozen=True)
class LinearScales:
    input_scale: float  # per tensor
    weight_scale: torch.Tensor  # [out_features] fp32, per output channel


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """ONNX QuantizeLinear to float8e4m3fn with saturation: round(x / scale) clamped to +-448."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fake_quant(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """QuantizeLinear + DequantizeLinear, in x's dtype."""
    return (quantize_fp8(x, scale).float() * scale).to(x.dtype)


def weight_scale(weight: torch.Tensor) -> torch.Tensor:
    """Per output channel: amax of each row / 448 (fp32 [out])."""
    return (weight.detach().float().abs().amax(1).clamp(min=_AMAX_FLOOR) / FP8_MAX).float()


def input_scale(amax: float) -> float:
    return max(float(amax), _AMAX_FLOOR) / FP8_MAX


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scales: LinearScales) -> torch.Tensor:
    """x @ W^T with both operands through the FP8 round trip (what the FP8 GEMM computes)."""
    w = fake_quant(weight.float(), scales.weight_scale.to(weight.device).unsqueeze(1)).to(x.dtype)
    return torch.nn.functional.linear(fake_quant(x, scales.input_scale), w)


def is_fp8_linear(name: str) -> bool:
    """Whether the linear with parameter prefix `name` (e.g. layers.0.attn.wq_a) is quantized."""
    if any(part in name for part in KEEP_HIGH):
        return False
    return any(name == s or name.endswith("." + s) for s in FP8_LINEARS)


class Fp8Recipe:
    """{linear name (parameter prefix, e.g. 'layers.0.ffn.experts.3.w1'): LinearScales}."""

    def __init__(self, scales: dict[str, LinearScales], calibration: dict | None = None):
        self.scales = dict(scales)
        self.calibration = dict(calibration or {})

    def to_dict(self) -> dict:
        return {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, "calibration": self.calibration,
                "linears": {n: {"input_scale": s.input_scale, "weight_scale": s.weight_scale.tolist()}
                            for n, s in sorted(self.scales.items())}}

    @classmethod
    def from_dict(cls, d: dict) -> "Fp8Recipe":
        if d.get("format") != RECIPE_FORMAT or d.get("version") != RECIPE_VERSION:
            raise ValueError(f"not a hatrt FP8 recipe (format {d.get('format')!r} version {d.get('version')!r})")
        return cls({n: LinearScales(float(v["input_scale"]), torch.tensor(v["weight_scale"], dtype=torch.float32))
                    for n, v in d["linears"].items()}, d.get("calibration"))

    def sha256(self) -> str:
        """Hash of the scales (and the calibration record): what the manifest records."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every hatrt Linear of the model by parameter prefix."""
    from .model import Linear

    return {name: m for name, m in model.named_modules() if isinstance(m, Linear)}


def apply_recipe(model: nn.Module, recipe: Fp8Recipe | None) -> None:
    """Attach (or with None remove) the FP8 simulation to the model's linears."""
    mods = linear_modules(model)
    if recipe is not None:
        unknown = sorted(set(recipe.scales) - set(mods))
        if unknown:
            raise ValueError(f"FP8 recipe names linears the model does not have: {unknown[:5]}")
    for name, m in mods.items():
        m.fp8 = None if recipe is None else recipe.scales.get(name)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], names: Iterable[str] | None = None,
              chunk_size: int = 512) -> dict[str, float]:
    """amax of the input of each named linear over the token batches ([1, S] each, fed to the
    reference in chunks from a fresh cache). names: default every linear `is_fp8_linear` picks."""
    mods = linear_modules(model)
    wanted = [n for n in mods if is_fp8_linear(n)] if names is None else list(names)
    amax = {n: 0.0 for n in wanted}
    hooks = []
    for n in wanted:
        def hook(module, args, n=n):
            x = args[0]
            if x.numel():
                amax[n] = max(amax[n], float(x.detach().float().abs().max()))
        hooks.append(mods[n].register_forward_pre_hook(hook))
    try:
        for ids in batches:
            cache = model.new_cache(ids.shape[0])
            for start in range(0, ids.shape[1], chunk_size):
                model(ids[:, start:start + chunk_size], cache)
    finally:
        for h in hooks:
            h.remove()
    return amax


def make_recipe(model: nn.Module, amax: dict[str, float], calibration: dict | None = None) -> Fp8Recipe:
    mods = linear_modules(model)
    return Fp8Recipe({n: LinearScales(input_scale(a), weight_scale(mods[n].weight)) for n, a in amax.items()},
                     calibration)


__all__ = ["FP8_LINEARS", "FP8_MAX", "Fp8Recipe", "KEEP_HIGH", "LinearScales", "apply_recipe", "calibrate",
           "fake_quant", "fp8_linear", "input_scale", "is_fp8_linear", "linear_modules", "make_recipe",
           "quantize_fp8", "weight_scale"]
