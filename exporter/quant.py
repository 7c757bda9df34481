"""Quantization simulation used by the official V4 inference code (spec section 8.6).

Fake-quant rounds values to the target format and back, so the reference computes with exactly the
values production kernels see: FP8 e4m3 for the non-RoPE dims of every main KV vector (blocks of
64), FP4 e2m1 for indexer queries and keys after a Hadamard rotation (blocks of 32). Scales are
powers of two, 2^ceil(log2(amax / qmax)) with amax floored at 1e-4, as the ue8m0 cache format needs.
"""

from __future__ import annotations

import math

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
_AMAX_FLOOR = 1e-4
# E2M1 magnitudes and the rounding boundaries between neighbours. At a tie, round to the value
# with an even mantissa: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4.
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_E2M1_EDGES = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
_E2M1_TIE_UP = torch.tensor([False, True, False, True, False, True, False])


def pow2_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Smallest power of two s with max(amax, 1e-4) / qmax <= s, exactly.

    exp2(ceil(log2(y))) alone is off by one power when the rounded log2 of a ratio at (or a few
    ulp above) a power of two lands on the wrong side of an integer, and torch and ONNX Runtime
    (Log / ln 2) round differently. The two exact comparisons below correct that, so eager,
    ONNX Runtime and kernels that read the exponent bits (ue8m0) agree on every input.
    """
    y = amax.clamp(min=_AMAX_FLOOR) / qmax
    s = torch.exp2(torch.ceil(torch.log2(y)))
    s = torch.where(s * 0.5 >= y, s * 0.5, s)  # log2 rounded up across an integer
    return torch.where(s < y, s * 2.0, s)  # log2 rounded down across an integer


def round_e2m1(y: torch.Tensor) -> torch.Tensor:
    """Round fp32 values already inside [-6, 6] to the nearest FP4 e2m1 value (ties to even)."""
    a = y.abs()
    edges, values, tie_up = (t.to(a.device) for t in (_E2M1_EDGES, _E2M1, _E2M1_TIE_UP))
    idx = torch.bucketize(a, edges)  # a == edge lands in the lower bucket
    on_edge = (idx < len(edges)) & (a == edges[idx.clamp(max=len(edges) - 1)])
    idx = idx + (on_edge & tie_up[idx.clamp(max=len(edges) - 1)]).long()
    # copysign(values[idx], y) without torch.copysign, which lowers to prims.signbit (no ONNX
    # translation). 1 / y < 0 also catches -0.0 (1 / -0.0 = -inf), so the sign bit of every
    # non-NaN y is reproduced, -0.0 and tiny negatives included (they give -0.0). The sign is a
    # +-1 factor, not a Where between v and -v: ONNX Runtime's Where drops the sign of a zero.
    negative = (y < 0) | (torch.reciprocal(y) < 0)
    return values[idx] * torch.where(negative, -1.0, 1.0)


def fake_quant_fp8(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Per-block FP8 e4m3 round trip along the last dim."""
    xb = x.float().unflatten(-1, (-1, block))
    scale = pow2_scale(xb.abs().amax(-1, keepdim=True), FP8_MAX)
    q = (xb / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return (q * scale).flatten(-2).to(x.dtype)


def fake_quant_fp4(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Per-block FP4 e2m1 round trip along the last dim."""
    xb = x.float().unflatten(-1, (-1, block))
    scale = pow2_scale(xb.abs().amax(-1, keepdim=True), FP4_MAX)
    q = round_e2m1((xb / scale).clamp(-FP4_MAX, FP4_MAX))
    return (q * scale).flatten(-2).to(x.dtype)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard transform of the last dim (a power of two), in fp32.

    It leaves dot products unchanged; it matters only because it spreads outliers before FP4.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"Hadamard needs a power-of-two width, got {n}")
    y = x.float()
    h = 1
    while h < n:  # fast Walsh-Hadamard butterflies
        y = y.unflatten(-1, (-1, 2, h))
        y = torch.cat([y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]], dim=-1).flatten(-2)
        h *= 2
    return (y * (1.0 / math.sqrt(n))).to(x.dtype)
