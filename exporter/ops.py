"""The three attention operations of V4, as plain tensor functions.

These are the contracts the ONNX custom ops and the CUDA/TensorRT plugins implement; the model
calls them and nothing else for the attention-specific math. All arithmetic is fp32; results are
cast back to the dtype of the main input.

Shapes: B batch, S queries, N compressed entries, m compression ratio, D entry width, H heads.

Tie rule (everywhere): among equal indexer scores the LOWER entry index ranks first, as ONNX TopK
does. Selections are reported in rank order (score descending, then index ascending) and padded
with -1 to a fixed width; consumers should compare them as sets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .quant import fake_quant_fp4, fake_quant_fp8, hadamard
from .rope import apply_rope


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm in fp32 (weight optional: V4 also uses an unweighted per-head norm)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def compress_blocks(
    kv: torch.Tensor,
    score: torch.Tensor,
    prev_kv: torch.Tensor | None,
    prev_score: torch.Tensor | None,
    norm_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    eps: float,
    quant: str | None = None,
) -> torch.Tensor:
    """Pool complete blocks of m tokens into one compressed entry each.

    kv, score: [B, N, m, W] projections of the tokens of N consecutive complete blocks; `score`
        already includes the positional bias `ape[slot]`. W = D (HCA, no overlap) or 2D (CSA).
    prev_kv, prev_score: [B, m, D] first halves of the block before block 0 (CSA only; None for
        HCA). "No previous block" is kv 0 with score -inf.
    norm_weight: [D]; cos, sin: [B, N, r/2] for RoPE at each block's FIRST token (m * i).
    quant: None, "fp8" (main entries: FP8 e4m3 on dims [0, D - r) in blocks of 64) or "fp4"
        (indexer keys: Hadamard, then FP4 e2m1 in blocks of 32).

    CSA entry i pools 8 slots per channel: the first halves of block i-1 and the second halves of
    block i. Returns [B, N, D].
    """
    kv, score = kv.float(), score.float()
    if prev_kv is not None:
        d = kv.shape[-1] // 2
        prev_blocks_kv = torch.cat([prev_kv.float().unsqueeze(1), kv[:, :-1, :, :d]], dim=1)
        prev_blocks_score = torch.cat([prev_score.float().unsqueeze(1), score[:, :-1, :, :d]], dim=1)
        kv = torch.cat([prev_blocks_kv, kv[..., d:]], dim=2)
        score = torch.cat([prev_blocks_score, score[..., d:]], dim=2)
    pooled = (kv * score.softmax(dim=2)).sum(dim=2)  # softmax per channel over the slots
    entry = apply_rope(rms_norm(pooled, norm_weight, eps), cos, sin)
    if quant == "fp8":
        r = 2 * cos.shape[-1]
        entry = torch.cat([fake_quant_fp8(entry[..., :-r]), entry[..., -r:]], dim=-1)
    elif quant == "fp4":
        entry = fake_quant_fp4(hadamard(entry))
    return entry


def indexer_topk(
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: torch.Tensor,
    q_pos: torch.Tensor,
    *,
    ratio: int,
    topk: int,
    bf16_scores: bool = False,
) -> torch.Tensor:
    """Lightning indexer: pick the top-k visible compressed entries for each query.

    q: [B, S, Hi, Di] indexer queries; weights: [B, S, Hi] per-head weights (all scales folded
    in); keys: [B, N, Di]; q_pos: [B, S] absolute positions.
    Score I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s]); entries s >= (t + 1) // ratio are not
    visible. Returns int64 [B, S, topk]: entry indices in rank order, -1 where fewer than topk
    entries are visible. bf16_scores rounds scores to bf16 before ranking, as production does.
    """
    scores = torch.einsum("bshd,bnd->bshn", q.float(), keys.float()).relu()
    scores = (scores * weights.float().unsqueeze(-1)).sum(dim=2)  # [B, S, N]
    if bf16_scores:
        scores = scores.to(torch.bfloat16).float()
    n = keys.shape[1]
    visible = torch.arange(n, device=keys.device) < ((q_pos + 1) // ratio).unsqueeze(-1)
    scores = scores.masked_fill(~visible, float("-inf"))
    if n < topk:  # fixed output width: pad with never-visible candidates
        scores = F.pad(scores, (0, topk - n), value=float("-inf"))
    # A stable descending sort keeps equal scores in index order: the documented tie rule.
    order = torch.sort(scores, dim=-1, descending=True, stable=True)
    idx, best = order.indices[..., :topk], order.values[..., :topk]
    return torch.where(best == float("-inf"), torch.full_like(idx, -1), idx)


def causal_entry_indices(q_pos: torch.Tensor, n_entries: int, ratio: int) -> torch.Tensor:
    """HCA's selection: every complete entry, i.e. i < (t + 1) // ratio, else -1. [B, S, N]."""
    idx = torch.arange(n_entries, device=q_pos.device).expand(*q_pos.shape, n_entries)
    return torch.where(idx < ((q_pos + 1) // ratio).unsqueeze(-1), idx, torch.full_like(idx, -1))


def sparse_attention(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    window_kv: torch.Tensor,
    window_pos: torch.Tensor,
    entries: torch.Tensor,
    entry_idx: torch.Tensor,
    sink: torch.Tensor,
    *,
    window: int,
    scale: float,
) -> torch.Tensor:
    """One softmax over the sliding window plus selected compressed entries, with a sink.

    q: [B, S, H, D]; q_pos: [B, S]. window_kv: [B, L, D] candidate window tokens with absolute
    positions window_pos [B, L] (-1 = empty slot); key j is in query t's window when
    0 <= t - pos_j < window. entries: [B, N, D]; entry_idx: [B, S, K] entries per query (-1 =
    none). sink: [H] logit added to the denominator only. Every vector is both key and value.
    Returns [B, S, H, D] (still rotated; the caller de-rotates).
    """
    qf = q.float()
    dist = q_pos.unsqueeze(-1) - window_pos.unsqueeze(1)  # [B, S, L]
    in_window = (window_pos.unsqueeze(1) >= 0) & (dist >= 0) & (dist < window)
    logits_w = torch.einsum("bshd,bld->bshl", qf, window_kv.float()) * scale
    logits_w = logits_w.masked_fill(~in_window.unsqueeze(2), float("-inf"))

    valid = entry_idx >= 0  # [B, S, K]
    if entries.shape[1] == 0:  # no complete block yet: gather from one masked dummy entry
        entries = entries.new_zeros(entries.shape[0], 1, entries.shape[2])
    b = torch.arange(entries.shape[0], device=entries.device).view(-1, 1, 1)
    picked = entries.float()[b, entry_idx.clamp(min=0)]  # [B, S, K, D]
    logits_c = torch.einsum("bshd,bskd->bshk", qf, picked) * scale
    logits_c = logits_c.masked_fill(~valid.unsqueeze(2), float("-inf"))

    sink_logit = sink.float().view(1, 1, -1, 1).expand(*logits_w.shape[:3], 1)
    probs = torch.cat([logits_w, logits_c, sink_logit], dim=-1).softmax(dim=-1)
    n_w = logits_w.shape[-1]
    out = torch.einsum("bshl,bld->bshd", probs[..., :n_w], window_kv.float())
    out = out + torch.einsum("bshk,bskd->bshd", probs[..., n_w:-1], picked)
    return out.to(q.dtype)
