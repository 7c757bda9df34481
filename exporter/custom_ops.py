"""The ``hatrt`` custom-op domain: the attention operations of exporter/ops.py as opaque torch ops.

Each op is a ``torch.library.custom_op`` whose eager kernel CALLS the function in exporter/ops.py
(ops.py stays the single source of truth for the math), with a ``register_fake`` kernel so that
torch.export / torch.onnx.export(dynamo=True) trace it as one node. Signatures use only plain
tensors and scalars: they become ONNX nodes in domain ``hatrt`` (see exporter/onnx_ops.py) and
later TensorRT plugins, so the keyword-only argument names below are stable ONNX attribute and
plugin field names.

    hatrt::GatedCompress(kv, score, norm_weight, cos, sin, *, eps: float, quant: int = 0) -> entries
        HCA pooling (no overlap): ops.compress_blocks(..., prev_kv=None, prev_score=None).
        kv, score [B, N, m, D]; norm_weight [D]; cos, sin [B, N, r/2] -> float32 [B, N, D].
    hatrt::OverlapGatedCompress(kv, score, prev_kv, prev_score, norm_weight, cos, sin, *,
                                eps: float, quant: int = 0) -> entries
        CSA pooling (overlapping blocks): kv, score [B, N, m, 2D]; prev_kv, prev_score [B, m, D]
        (pass kv 0 / score -inf for "no previous block") -> float32 [B, N, D].
    hatrt::IndexerTopK(q, weights, keys, q_pos, *, ratio: int, topk: int, bf16_scores: bool = False)
        -> int64 [B, S, topk] (ops.indexer_topk: rank order, lower index first on ties, -1 padded).
    hatrt::HybridSparseAttention(q, q_pos, window_kv, window_pos, entries, entry_idx, sink, *,
                                 window: int, scale: float) -> [B, S, H, D] in q's dtype
        (ops.sparse_attention).
    hatrt::RoutedExperts(x, expert_idx, expert_weights, w1, w3, w2, *, swiglu_limit: float = 0.0)
        -> float32 [T, d]: the routed experts of a MoE layer, sum_j expert_weights[t, j] *
        FFN_{expert_idx[t, j]}(x[t]) with FFN_e(x) = w2[e] (silu(min(w1[e] x, L)) * clamp(w3[e] x,
        -L, L)) (no clamp when swiglu_limit == 0). x [T, d]; expert_idx [T, k] (int); expert_weights
        [T, k] (the router's final weights); w1, w3 [E, I, d]; w2 [E, d, I] (nn.Linear layout,
        stacked). Repeated picks add up; indices outside [0, E) contribute nothing. The routing
        itself stays in the graph (docs/moe.md). Eager kernel: routed_experts_reference below, the
        loop of exporter/model.py MoE.forward.

``quant``: 0 none, 1 FP8 e4m3 (main KV entries), 2 FP4 e2m1 after a Hadamard (indexer keys).
All ops need N >= 1 compressed blocks for the two compressors (ops.compress_blocks does too);
IndexerTopK and HybridSparseAttention accept N == 0 entries.

The names avoid every ONNX, ONNX Runtime contrib and TensorRT op name (several tools dispatch on
op_type alone; ``SparseAttention`` for instance is an ORT contrib op).
"""

from __future__ import annotations

import torch

from . import ops

NAMESPACE = "hatrt"

QUANT_NONE, QUANT_FP8, QUANT_FP4 = 0, 1, 2
_QUANT_NAMES = {QUANT_NONE: None, QUANT_FP8: "fp8", QUANT_FP4: "fp4"}
QUANT_CODES = {name: code for code, name in _QUANT_NAMES.items()}


def quant_code(quant: str | int | None) -> int:
    """Map a quant mode (None / "fp8" / "fp4", or its code) to the integer attribute value."""
    if isinstance(quant, int) and quant in _QUANT_NAMES:
        return quant
    if quant in QUANT_CODES:
        return QUANT_CODES[quant]
    raise ValueError(f"unknown quant mode {quant!r}; expected one of None, 'fp8', 'fp4' (or 0, 1, 2)")


def _quant_name(quant: int) -> str | None:
    try:
        return _QUANT_NAMES[quant]
    except KeyError:
        raise ValueError(f"quant must be 0 (none), 1 (fp8) or 2 (fp4), got {quant}") from None


# --------------------------------------------------------------------------- compressors
@torch.library.custom_op(f"{NAMESPACE}::GatedCompress", mutates_args=())
def gated_compress(kv: torch.Tensor, score: torch.Tensor, norm_weight: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, *, eps: float, quant: int = 0) -> torch.Tensor:
    return ops.compress_blocks(kv, score, None, None, norm_weight, cos, sin, eps=eps, quant=_quant_name(quant))


@gated_compress.register_fake
def _(kv, score, norm_weight, cos, sin, *, eps, quant=0):
    _quant_name(quant)
    torch._check(kv.dim() == 4, lambda: "kv must be [B, N, m, D]")
    return kv.new_empty(kv.shape[0], kv.shape[1], kv.shape[3], dtype=torch.float32)


@torch.library.custom_op(f"{NAMESPACE}::OverlapGatedCompress", mutates_args=())
def overlap_gated_compress(kv: torch.Tensor, score: torch.Tensor, prev_kv: torch.Tensor, prev_score: torch.Tensor,
                           norm_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, eps: float,
                           quant: int = 0) -> torch.Tensor:
    return ops.compress_blocks(kv, score, prev_kv, prev_score, norm_weight, cos, sin, eps=eps,
                               quant=_quant_name(quant))


@overlap_gated_compress.register_fake
def _(kv, score, prev_kv, prev_score, norm_weight, cos, sin, *, eps, quant=0):
    _quant_name(quant)
    torch._check(kv.dim() == 4, lambda: "kv must be [B, N, m, 2D]")
    return kv.new_empty(kv.shape[0], kv.shape[1], prev_kv.shape[-1], dtype=torch.float32)


# --------------------------------------------------------------------------- indexer
@torch.library.custom_op(f"{NAMESPACE}::IndexerTopK", mutates_args=())
def indexer_topk(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, q_pos: torch.Tensor, *, ratio: int,
                 topk: int, bf16_scores: bool = False) -> torch.Tensor:
    return ops.indexer_topk(q, weights, keys, q_pos, ratio=ratio, topk=topk, bf16_scores=bf16_scores)


@indexer_topk.register_fake
def _(q, weights, keys, q_pos, *, ratio, topk, bf16_scores=False):
    return q.new_empty(q.shape[0], q.shape[1], topk, dtype=torch.int64)


# --------------------------------------------------------------------------- attention
@torch.library.custom_op(f"{NAMESPACE}::HybridSparseAttention", mutates_args=())
def hybrid_sparse_attention(q: torch.Tensor, q_pos: torch.Tensor, window_kv: torch.Tensor, window_pos: torch.Tensor,
                            entries: torch.Tensor, entry_idx: torch.Tensor, sink: torch.Tensor, *, window: int,
                            scale: float) -> torch.Tensor:
    return ops.sparse_attention(q, q_pos, window_kv, window_pos, entries, entry_idx, sink, window=window, scale=scale)


@hybrid_sparse_attention.register_fake
def _(q, q_pos, window_kv, window_pos, entries, entry_idx, sink, *, window, scale):
    return torch.empty_like(q)


# --------------------------------------------------------------------------- routed experts
def routed_experts_reference(x: torch.Tensor, expert_idx: torch.Tensor, expert_weights: torch.Tensor,
                             w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, swiglu_limit: float = 0.0
                             ) -> torch.Tensor:
    """The eager MoE loop of exporter/model.py (MoE.forward, Expert.forward) on stacked weights.

    Only the experts some token picked run, each on its tokens; outputs are weighted in fp32 and
    index_add-ed in the order of the sorted expert ids, so this equals the reference loop bit for
    bit (weights are cast to x's dtype as Linear does). Picks outside [0, E) are skipped."""
    out = torch.zeros(x.shape[0], x.shape[-1], dtype=torch.float32, device=x.device)
    idx = expert_idx.long()
    n_experts = w1.shape[0]
    for e in idx.unique().tolist():
        if not 0 <= e < n_experts:
            continue
        tok, slot = torch.where(idx == e)
        xe = x[tok]
        gate = torch.nn.functional.linear(xe, w1[e].to(x.dtype))
        up = torch.nn.functional.linear(xe, w3[e].to(x.dtype))
        if swiglu_limit:
            gate, up = gate.clamp(max=swiglu_limit), up.clamp(-swiglu_limit, swiglu_limit)
        y = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w2[e].to(x.dtype))
        out.index_add_(0, tok, y.float() * expert_weights[tok, slot, None])
    return out


def _check_routed_experts(x, expert_idx, expert_weights, w1, w3, w2, swiglu_limit):
    torch._check(x.dim() == 2, lambda: "x must be [T, d]")
    torch._check(expert_idx.dim() == 2 and expert_weights.dim() == 2, lambda: "expert_idx / expert_weights: [T, k]")
    torch._check(w1.dim() == 3 and w3.dim() == 3 and w2.dim() == 3, lambda: "w1, w3 [E, I, d], w2 [E, d, I]")
    torch._check(not expert_idx.is_floating_point(), lambda: "expert_idx must be an integer tensor")
    if not swiglu_limit >= 0:
        raise ValueError(f"swiglu_limit must be >= 0 (0: no clamp), got {swiglu_limit}")


@torch.library.custom_op(f"{NAMESPACE}::RoutedExperts", mutates_args=())
def routed_experts(x: torch.Tensor, expert_idx: torch.Tensor, expert_weights: torch.Tensor, w1: torch.Tensor,
                   w3: torch.Tensor, w2: torch.Tensor, *, swiglu_limit: float = 0.0) -> torch.Tensor:
    _check_routed_experts(x, expert_idx, expert_weights, w1, w3, w2, swiglu_limit)
    return routed_experts_reference(x, expert_idx, expert_weights, w1, w3, w2, swiglu_limit)


@routed_experts.register_fake
def _(x, expert_idx, expert_weights, w1, w3, w2, *, swiglu_limit=0.0):
    _check_routed_experts(x, expert_idx, expert_weights, w1, w3, w2, swiglu_limit)
    return x.new_empty(x.shape[0], x.shape[1], dtype=torch.float32)


# --------------------------------------------------------------------------- conveniences
def compress(kv: torch.Tensor, score: torch.Tensor, prev_kv: torch.Tensor | None, prev_score: torch.Tensor | None,
             norm_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, eps: float,
             quant: str | int | None = None) -> torch.Tensor:
    """ops.compress_blocks's calling convention, routed to the matching custom op."""
    if (prev_kv is None) != (prev_score is None):
        raise ValueError("pass both prev_kv and prev_score (CSA) or neither (HCA)")
    if prev_kv is None:
        return torch.ops.hatrt.GatedCompress(kv, score, norm_weight, cos, sin, eps=eps, quant=quant_code(quant))
    return torch.ops.hatrt.OverlapGatedCompress(kv, score, prev_kv, prev_score, norm_weight, cos, sin, eps=eps,
                                                quant=quant_code(quant))


OPS = {
    "GatedCompress": torch.ops.hatrt.GatedCompress.default,
    "OverlapGatedCompress": torch.ops.hatrt.OverlapGatedCompress.default,
    "IndexerTopK": torch.ops.hatrt.IndexerTopK.default,
    "HybridSparseAttention": torch.ops.hatrt.HybridSparseAttention.default,
    "RoutedExperts": torch.ops.hatrt.RoutedExperts.default,
}
"""ONNX op_type -> torch OpOverload, for every op of the domain."""


class AS_OPS:  # noqa: N801 - a namespace with exporter.ops' calling conventions
    """Drop-in for the `exporter.ops` module while exporting (see model.attention_ops)."""

    compress_blocks = staticmethod(compress)
    indexer_topk = staticmethod(indexer_topk)
    sparse_attention = staticmethod(hybrid_sparse_attention)
