"""Interleaved rotary embeddings on the trailing `rope_dim` channels, one table per layer.

Window-only layers use plain RoPE (base rope_theta); compressed layers use compress_rope_theta with
YaRN frequency interpolation (no attention mscale). As in DeepSeek's official V4 code (YaRN whenever
original_seq_len > 0) and transformers' DeepseekV4 rotary embedding, YaRN is applied whenever the
config names it, whatever max_position_embeddings is: the ramp depends only on the original length,
rope_dim, the base and beta_fast/beta_slow.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig


def inv_freq(dim: int, base: float, yarn=None) -> torch.Tensor:
    """Per-pair inverse frequencies [dim // 2] (fp32); YaRN-interpolated whenever `yarn` is given.

    The official precompute_freqs_cis in float32 (truncated correction range, linear ramp, no
    mscale). transformers' _compute_yarn_parameters computes 1 / (factor * base^x) for the
    interpolated part: bit-identical for a power-of-two factor (V4: 16), within an ulp otherwise.
    """
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if yarn is None:
        return freqs

    def correction_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(base))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    smooth = 1 - ramp  # 1 = keep the original (high) frequency, 0 = interpolate by `factor`
    return freqs / yarn.factor * (1 - smooth) + freqs * smooth


class Rotary(nn.Module):
    """cos/sin for arbitrary integer positions; the frequencies are a recomputable buffer."""

    def __init__(self, config: ModelConfig, compressed: bool):
        super().__init__()
        self.dim = config.rope_dim
        self.base = config.compress_rope_theta if compressed else config.rope_theta
        self.yarn = config.yarn if compressed else None
        self.register_buffer("inv_freq", torch.empty(self.dim // 2), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        with torch.no_grad():
            self.inv_freq.copy_(inv_freq(self.dim, self.base, self.yarn))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float().unsqueeze(-1) * self.inv_freq.float()
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate adjacent channel pairs of the last 2*cos.shape[-1] dims of x (cos/sin broadcast).

    inverse=True rotates by -angle (the output de-rotation of V4 attention).
    """
    r = 2 * cos.shape[-1]
    pairs = x[..., -r:].float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    if inverse:
        sin = -sin
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return torch.cat([x[..., :-r], rotated.to(x.dtype)], dim=-1)
