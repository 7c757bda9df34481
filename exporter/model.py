"""The PyTorch reference of the DeepSeek-V4 hybrid-attention model.

Everything else in hatrt is checked against this module. Parameter names are the official
checkpoint names (spec section 6). One forward serves full prefill, chunked prefill and token-by-
token decoding: every call continues the explicit `Cache` it is given.

Numerics switches:
- quant_sim=True reproduces the official inference code: FP8 e4m3 KV (non-RoPE dims, blocks of
  64), Hadamard + FP4 indexer queries/keys, bf16 indexer scores before top-k.
- quant_sim=False reproduces `transformers`' DeepseekV4ForCausalLM (no simulation).
- shared_expert_clamp: the official shared expert has no SwiGLU clamp, transformers clamps it.
  None follows quant_sim (official when on, transformers when off).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .cache import Cache, CompressorState, LayerCache
from .config import CSA, WINDOW, ModelConfig
from .fp8 import fp8_linear
from .quant import fake_quant_fp4, fake_quant_fp8, hadamard
from .rope import Rotary, apply_rope


def attention_ops():
    """The three attention operations: the plain functions of exporter.ops in eager mode, the
    `hatrt` custom ops while exporting (each becomes one ONNX node; its eager kernel is the same
    function, so the math is shared)."""
    if torch.compiler.is_exporting():
        from . import custom_ops

        return custom_ops.AS_OPS
    return ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight.to(x.dtype))


class Linear(nn.Module):
    """Bias-free linear whose parameter is named `weight`, as in the checkpoints.

    With an FP8 recipe attached (exporter/fp8.py apply_recipe), `fp8` holds its static scales and
    both operands go through the FP8 round trip, as the FP8 GEMM of a quantized export computes."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.fp8 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8 is not None:
            return fp8_linear(x, self.weight, self.fp8)
        return linear(x, self.weight)


# --------------------------------------------------------------------------- compressor
class Compressor(nn.Module):
    """Gated pooling of every m tokens of x into one entry (CSA: overlapping, 8 slots).

    Also used, at index_head_dim width, for the lightning indexer's keys.
    """

    def __init__(self, config: ModelConfig, ratio: int, dim: int, quant: str):
        super().__init__()
        self.ratio, self.dim, self.quant = ratio, dim, quant
        self.overlap = ratio == CSA
        width = (2 if self.overlap else 1) * dim
        self.wkv = Linear(config.hidden_size, width)
        self.wgate = Linear(config.hidden_size, width)
        self.ape = nn.Parameter(torch.empty(ratio, width, dtype=torch.float32))
        self.norm = RMSNorm(dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, pos0: torch.Tensor, state: CompressorState, entries: torch.Tensor,
                rotary: Rotary, quant_sim: bool) -> tuple[CompressorState, torch.Tensor]:
        """Feed S new tokens per sequence (positions pos0[b] .. pos0[b]+S-1, each row its own start).

        Returns the new tail state and `entries` with every block completed by these tokens written
        at its index. Partial blocks are never pooled: their projections wait in the state. One
        branch-free algorithm serves prefill, chunked prefill and decoding (and exports as a graph).
        """
        m, d = self.ratio, self.dim
        b, s, _ = x.shape
        dev = x.device
        pos = pos0.unsqueeze(1) + torch.arange(s, device=dev)  # [B, S]
        kv = F.linear(x.float(), self.wkv.weight.float())  # the compressor runs in fp32
        score = F.linear(x.float(), self.wgate.weight.float()) + self.ape[pos % m]
        off = m if self.overlap else 0  # first slot of the open block in the state

        # Each row's block-aligned stream: the r tokens of its open block (from the state), then the
        # S new ones. It spans at most n_blocks blocks.
        r = (pos0 % m).unsqueeze(1)  # [B, 1]
        n_blocks = (s + m - 1) // m + 1
        v = torch.arange(n_blocks * m, device=dev)
        filled = v < r + s  # [B, n_blocks*m]
        src = torch.where(v < r, v, m + v - r).clamp(max=m + s - 1)
        src = src.unsqueeze(-1).expand(-1, -1, kv.shape[-1])
        seq_kv = torch.cat([state.kv[:, off:off + m], kv], 1).gather(1, src)
        seq_score = torch.cat([state.score[:, off:off + m], score], 1).gather(1, src)
        seq_kv = seq_kv.masked_fill(~filled.unsqueeze(-1), 0.0).unflatten(1, (n_blocks, m))
        seq_score = seq_score.masked_fill(~filled.unsqueeze(-1), float("-inf")).unflatten(1, (n_blocks, m))

        j = torch.arange(n_blocks, device=dev)
        complete = (j + 1) * m <= r + s  # [B, n_blocks]
        block_id = pos0.unsqueeze(1) // m + j
        cos, sin = rotary(block_id * m)  # RoPE at each block's first token
        prev_kv = state.kv[:, :m, :d] if self.overlap else None
        prev_score = state.score[:, :m, :d] if self.overlap else None
        # Incomplete blocks are pooled too and then dropped; finite scores keep them NaN-free.
        pool_score = torch.where(complete[..., None, None], seq_score, 0.0)
        pooled = attention_ops().compress_blocks(seq_kv, pool_score, prev_kv, prev_score, self.norm.weight,
                                                 cos, sin, eps=self.norm.eps,
                                                 quant=self.quant if quant_sim else None)
        entries = scatter_rows(entries, block_id, pooled, complete)

        # The new open block is stream block (r + S) // m; CSA keeps the block before it too.
        n = ((r + s) // m).view(b, 1, 1, 1)

        def pick(t: torch.Tensor, i: torch.Tensor) -> torch.Tensor:  # stream block i of every row
            return t.gather(1, i.expand(-1, -1, m, t.shape[-1])).squeeze(1)

        new_kv, new_score = pick(seq_kv, n), pick(seq_score, n)
        if self.overlap:
            has_prev = (n > 0).view(b, 1, 1)
            prev_i = (n - 1).clamp(min=0)
            new_kv = torch.cat([torch.where(has_prev, pick(seq_kv, prev_i), state.kv[:, :m]), new_kv], 1)
            new_score = torch.cat([torch.where(has_prev, pick(seq_score, prev_i), state.score[:, :m]),
                                   new_score], 1)
        return CompressorState(new_kv, new_score), entries


def scatter_rows(buf: torch.Tensor, index: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """buf[b, index[b, j]] = values[b, j] where mask[b, j], out of place, in one scatter.

    The indices of a row are distinct block ids, all < capacity (the capacity contract,
    exporter.contract.entries_needed), so masked-out slots simply rewrite their current value: no
    duplicate indices, and the graph copies the buffer once (not pad, scatter, slice)."""
    width = buf.shape[-1]
    index = index.unsqueeze(-1).expand(-1, -1, width)
    keep = buf.gather(1, index)
    return buf.scatter(1, index, torch.where(mask.unsqueeze(-1), values.to(buf.dtype), keep))


class Indexer(nn.Module):
    """Lightning indexer: scores compressed entries for each query and keeps the top-k."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = config.index_n_heads, config.index_head_dim, config.index_topk
        self.wq_b = Linear(config.q_lora_rank, self.n_heads * self.head_dim)
        self.weights_proj = Linear(config.hidden_size, self.n_heads)
        self.compressor = Compressor(config, CSA, self.head_dim, quant="fp4")
        self.weight_scale = self.head_dim ** -0.5 * self.n_heads ** -0.5

    def forward(self, x, cq, q_pos, cos, sin, layer: LayerCache, rotary: Rotary, quant_sim: bool) -> torch.Tensor:
        layer.index_compressor, layer.index_keys = self.compressor(
            x, q_pos[:, 0], layer.index_compressor, layer.index_keys, rotary, quant_sim)
        q = self.wq_b(cq).unflatten(-1, (self.n_heads, self.head_dim))
        q = apply_rope(q, cos, sin)
        if quant_sim:
            q = fake_quant_fp4(hadamard(q))
        w = self.weights_proj(x).float() * self.weight_scale
        return attention_ops().indexer_topk(q, w, layer.index_keys, q_pos, ratio=CSA, topk=self.topk,
                                            bf16_scores=quant_sim)


# --------------------------------------------------------------------------- attention
class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        c = config
        self.config, self.ratio = c, c.ratio(layer_id)
        self.n_heads, self.head_dim = c.num_heads, c.head_dim
        self.wq_a = Linear(c.hidden_size, c.q_lora_rank)
        self.q_norm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
        self.wq_b = Linear(c.q_lora_rank, c.num_heads * c.head_dim)
        self.wkv = Linear(c.hidden_size, c.head_dim)
        self.kv_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.wo_a = Linear(c.num_heads * c.head_dim // c.o_groups, c.o_groups * c.o_lora_rank)
        self.wo_b = Linear(c.o_groups * c.o_lora_rank, c.hidden_size)
        self.attn_sink = nn.Parameter(torch.empty(c.num_heads, dtype=torch.float32))
        self.rotary = Rotary(c, compressed=self.ratio != WINDOW)
        self.compressor = Compressor(c, self.ratio, c.head_dim, quant="fp8") if self.ratio else None
        self.indexer = Indexer(c) if self.ratio == CSA else None
        self.scale = c.head_dim ** -0.5

    def forward(self, x: torch.Tensor, q_pos: torch.Tensor, layer: LayerCache, quant_sim: bool) -> torch.Tensor:
        c = self.config
        b, s, _ = x.shape
        cos, sin = self.rotary(q_pos)  # [B, S, r/2]
        hcos, hsin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads

        cq = self.q_norm(self.wq_a(x))  # reused by the indexer
        q = self.wq_b(cq).unflatten(-1, (self.n_heads, self.head_dim))
        q = apply_rope(ops.rms_norm(q, None, c.rms_norm_eps), hcos, hsin)

        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)
        if quant_sim:
            kv = torch.cat([fake_quant_fp8(kv[..., : c.nope_dim]), kv[..., c.nope_dim:]], dim=-1)
        window_kv = torch.cat([layer.window_kv, kv.to(layer.window_kv.dtype)], dim=1)
        window_pos = torch.cat([layer.window_pos, q_pos], dim=1)

        entries = x.new_zeros(b, 0, self.head_dim)
        entry_idx = torch.full((b, s, 0), -1, dtype=torch.long, device=x.device)
        if self.ratio:
            if not torch.compiler.is_exporting():  # eager: grow to fit; exported graphs get sized buffers
                layer.reserve(int(q_pos[:, -1].max()) // self.ratio + 2)  # exporter.contract.entries_needed
            layer.compressor, layer.entries = self.compressor(x, q_pos[:, 0], layer.compressor, layer.entries,
                                                              self.rotary, quant_sim)
            entries = layer.entries  # entries not yet complete for a query are masked by the ops
            if self.indexer is not None:
                entry_idx = self.indexer(x, cq, q_pos, hcos, hsin, layer, self.rotary, quant_sim)
            else:
                entry_idx = ops.causal_entry_indices(q_pos, entries.shape[1], self.ratio)

        o = attention_ops().sparse_attention(q, q_pos, window_kv, window_pos, entries, entry_idx, self.attn_sink,
                                             window=c.window, scale=self.scale)
        self._update_window(layer, kv, q_pos)
        o = apply_rope(o, hcos, hsin, inverse=True)

        # Grouped output projection: group i of heads goes through its own slice of wo_a.
        g = c.o_groups
        o = o.reshape(b, s, g, -1)
        wo_a = self.wo_a.weight.to(o.dtype).view(g, c.o_lora_rank, -1)
        o = torch.einsum("bsgi,goi->bsgo", o, wo_a).flatten(2)
        return self.wo_b(o)

    @staticmethod
    def _update_window(layer: LayerCache, kv: torch.Tensor, q_pos: torch.Tensor) -> None:
        """Token t goes to ring slot t % window; only the last `window` tokens can survive."""
        w = layer.window_kv.shape[1]
        kv, q_pos = kv[:, -w:], q_pos[:, -w:]
        slots = q_pos % w
        layer.window_kv = layer.window_kv.scatter(1, slots.unsqueeze(-1).expand(-1, -1, kv.shape[-1]),
                                                  kv.to(layer.window_kv.dtype))
        layer.window_pos = layer.window_pos.scatter(1, slots, q_pos)


# --------------------------------------------------------------------------- FFN
class Expert(nn.Module):
    """SwiGLU FFN; the clamp (swiglu_limit) bounds the gate from above and the up branch both ways."""

    def __init__(self, dim: int, inter: int, limit: float | None):
        super().__init__()
        self.w1, self.w2, self.w3 = Linear(dim, inter), Linear(inter, dim), Linear(dim, inter)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w1(x), self.w3(x)
        if self.limit:
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        return self.w2(F.silu(gate) * up)


class Gate(nn.Module):
    """Router: scores from x; top-k by score + correction bias, or hash-routed by token id."""

    def __init__(self, config: ModelConfig, hashed: bool):
        super().__init__()
        c = config
        self.topk, self.func, self.scaling = c.num_experts_per_tok, c.scoring_func, c.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size))
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(c.vocab_size, c.num_experts_per_tok, dtype=torch.long))
            self.bias = None
        else:
            self.bias = nn.Parameter(torch.zeros(c.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())
        if self.func == "sqrtsoftplus":
            scores = F.softplus(logits).sqrt()
        elif self.func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(dim=-1)
        if self.bias is None:
            idx = self.tid2eid[input_ids].long()
        else:
            idx = torch.topk(scores + self.bias.float(), self.topk, dim=-1).indices
        w = scores.gather(-1, idx)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.scaling, idx


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, shared_clamp: bool):
        super().__init__()
        c = config
        self.gate = Gate(c, hashed=c.is_hash_layer(layer_id))
        self.experts = nn.ModuleList(Expert(c.hidden_size, c.moe_intermediate_size, c.swiglu_limit)
                                     for _ in range(c.n_routed_experts))
        self.shared_experts = (Expert(c.hidden_size, c.moe_intermediate_size, c.swiglu_limit if shared_clamp else None)
                               if c.n_shared_experts else None)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, idx = self.gate(flat, input_ids.reshape(-1))
        out = torch.zeros_like(flat, dtype=torch.float32)
        if torch.compiler.is_exporting():
            # The routed experts as ONE hatrt::RoutedExperts node (exporter/custom_ops.py,
            # docs/moe.md): the routing above stays standard ops, the expert GEMMs become one node
            # that TensorRT runs sparsely (plugins/routed_experts: a grouped GEMM over the picked
            # experts only) and ONNX Runtime through its dense function body (every expert on every
            # token, weighted by a one-hot sum of the picks, so a repeated pick adds up as here).
            from . import custom_ops

            dt = flat.dtype
            w1 = torch.stack([ex.w1.weight for ex in self.experts]).to(dt)  # [E, I, d]
            w3 = torch.stack([ex.w3.weight for ex in self.experts]).to(dt)  # [E, I, d]
            w2 = torch.stack([ex.w2.weight for ex in self.experts]).to(dt)  # [E, d, I]
            out = custom_ops.routed_experts(flat, idx, weights, w1, w3, w2,
                                            swiglu_limit=float(self.experts[0].limit or 0.0))
        else:
            for e in idx.unique().tolist():  # only the experts some token picked
                tok, slot = torch.where(idx == e)
                y = self.experts[e](flat[tok]).float() * weights[tok, slot, None]
                out.index_add_(0, tok, y)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat).float()
        return out.to(x.dtype).view(shape)


# --------------------------------------------------------------------------- mHC + block
def _hc_params(module: nn.Module, prefix: str, config: ModelConfig, n_out: int, n_scales: int) -> None:
    """Hyper-connection parameters under their official flat names (hc_attn_fn, hc_head_base, ...)."""
    hc_width = config.hc_mult * config.hidden_size
    setattr(module, f"{prefix}_fn", nn.Parameter(torch.empty(n_out, hc_width, dtype=torch.float32)))
    setattr(module, f"{prefix}_base", nn.Parameter(torch.empty(n_out, dtype=torch.float32)))
    setattr(module, f"{prefix}_scale", nn.Parameter(torch.empty(n_scales, dtype=torch.float32)))


def hc_mixes(streams: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """Linear read-out of the RMS-normalized, flattened streams [B, S, hc, d] (fp32)."""
    flat = streams.flatten(2).float()
    flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)
    return F.linear(flat, fn.float())


def hc_pre(streams: torch.Tensor, fn, base, scale, c: ModelConfig):
    """mHC weights: collapse the streams into one block input; return (input, post, comb).

    pre = sigmoid + eps, post = 2 sigmoid, comb = Sinkhorn(softmax + eps) (doubly stochastic).
    """
    hc, mix = c.hc_mult, hc_mixes(streams, fn, c.rms_norm_eps)
    base, scale, eps = base.float(), scale.float(), c.hc_eps
    pre = torch.sigmoid(mix[..., :hc] * scale[0] + base[:hc]) + eps
    post = 2 * torch.sigmoid(mix[..., hc:2 * hc] * scale[1] + base[hc:2 * hc])
    comb = (mix[..., 2 * hc:] * scale[2] + base[2 * hc:]).unflatten(-1, (hc, hc)).softmax(-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(c.hc_sinkhorn_iters - 1):  # Sinkhorn: alternate row and column normalization
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    collapsed = (pre.unsqueeze(-1) * streams.float()).sum(2).to(streams.dtype)
    return collapsed, post, comb


def hc_post(out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """New stream k = post_k * out + sum_j comb[j, k] * stream_j."""
    mixed = torch.einsum("bsjk,bsjd->bskd", comb, streams.float())
    return (post.unsqueeze(-1) * out.float().unsqueeze(2) + mixed).to(streams.dtype)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, shared_clamp: bool):
        super().__init__()
        c = self.config = config
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.ffn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = Attention(c, layer_id)
        self.ffn = MoE(c, layer_id, shared_clamp) if c.ffn_type == "moe" else \
            Expert(c.hidden_size, c.intermediate_size, c.swiglu_limit)
        n_out = (2 + c.hc_mult) * c.hc_mult
        _hc_params(self, "hc_attn", c, n_out, 3)
        _hc_params(self, "hc_ffn", c, n_out, 3)

    def forward(self, streams, input_ids, q_pos, layer: LayerCache, quant_sim: bool):
        x, post, comb = hc_pre(streams, self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale, self.config)
        out = self.attn(self.attn_norm(x), q_pos, layer, quant_sim)
        streams = hc_post(out, streams, post, comb)
        x, post, comb = hc_pre(streams, self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale, self.config)
        h = self.ffn_norm(x)
        out = self.ffn(h, input_ids) if isinstance(self.ffn, MoE) else self.ffn(h)
        return hc_post(out, streams, post, comb)


class Transformer(nn.Module):
    """forward(input_ids [B, S], cache=None) -> logits [B, S, vocab] (fp32).

    Without a cache the call is a fresh prefill. With one, it continues from cache.pos and
    updates the cache in place: one token per sequence is a decoding step, more is chunked prefill.
    """

    def __init__(self, config: ModelConfig, *, quant_sim: bool = False, shared_expert_clamp: bool | None = None):
        super().__init__()
        if quant_sim:
            config.check_quant_sim()
        self.config, self.quant_sim = config, quant_sim
        shared_clamp = (not quant_sim) if shared_expert_clamp is None else shared_expert_clamp
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c, i, shared_clamp) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.head = Linear(c.hidden_size, c.vocab_size)
        _hc_params(self, "hc_head", c, c.hc_mult, 1)

    def collapse_streams(self, streams: torch.Tensor) -> torch.Tensor:
        """Final mHC collapse (hc_head_*): sigmoid weights only, no mixing."""
        c = self.config
        mix = hc_mixes(streams, self.hc_head_fn, c.rms_norm_eps)
        pre = torch.sigmoid(mix * self.hc_head_scale.float() + self.hc_head_base.float()) + c.hc_eps
        return (pre.unsqueeze(-1) * streams.float()).sum(2).to(streams.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def new_cache(self, batch: int) -> Cache:
        return Cache(self.config, batch, dtype=self.dtype, device=self.embed.weight.device)

    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None,
                layer_outputs: list[torch.Tensor] | None = None,
                logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """layer_outputs, when given, receives each layer's output streams [B, S, hc, d].
        logits_index [n] (positions within the S new tokens): logits only there, [B, n, vocab]
        (a prefill chunk needs only its last position's; the head is the largest matmul)."""
        if cache is None:
            cache = self.new_cache(input_ids.shape[0])
        if not torch.compiler.is_exporting():
            self._check_inputs(input_ids, cache)
        s = input_ids.shape[1]
        q_pos = cache.pos.unsqueeze(1) + torch.arange(s, device=input_ids.device)
        h = self.embed(input_ids)
        streams = h.unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1).contiguous()
        for block, layer in zip(self.layers, cache.layers):
            streams = block(streams, input_ids, q_pos, layer, self.quant_sim)
            if layer_outputs is not None:
                layer_outputs.append(streams)
        cache.pos = cache.pos + s
        if logits_index is not None:
            streams = streams.index_select(1, logits_index)
        h = self.norm(self.collapse_streams(streams))
        return self.head(h).float()

    def _check_inputs(self, input_ids: torch.Tensor, cache: Cache) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if cache.batch != input_ids.shape[0]:
            raise ValueError(f"cache holds {cache.batch} sequences but input_ids has batch {input_ids.shape[0]}")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}), got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        last = int(cache.pos.max()) + input_ids.shape[1] - 1
        if last >= self.config.max_position_embeddings:
            raise ValueError(f"position {last} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")

    # -- parameters --------------------------------------------------------------------------
    def reset_buffers(self) -> None:
        """Recompute derived buffers (RoPE frequencies), e.g. after building on the meta device."""
        for module in self.modules():
            if isinstance(module, Rotary):
                module.reset_buffers()

    @torch.no_grad()
    def init_random(self, seed: int = 0) -> "Transformer":
        """Deterministic random weights with healthy activation scales (for presets and tests)."""
        g = torch.Generator().manual_seed(seed)

        def normal(p: torch.Tensor, std: float, mean: float = 0.0) -> None:
            p.copy_(torch.randn(p.shape, generator=g) * std + mean)

        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight"):
                normal(p, 0.1, 1.0)
            elif leaf == "weight" and p.dim() == 2 and "embed" not in name:
                normal(p, p.shape[1] ** -0.5)
            elif "embed" in name:
                normal(p, 1.0)
            elif leaf == "ape":
                normal(p, 0.5)
            elif leaf == "attn_sink":
                normal(p, 1.0)
            elif leaf.endswith("_fn"):
                normal(p, 0.02)
            elif leaf.endswith("_base"):
                normal(p, 0.1)
            elif leaf.endswith("_scale"):
                normal(p, 0.1, 1.0)
            elif leaf == "bias":
                normal(p, 0.01)
            else:
                raise AssertionError(f"no init rule for {name}")
        for module in self.modules():
            if isinstance(module, Gate) and module.bias is None:
                e = module.weight.shape[0]
                module.tid2eid.copy_(torch.stack([torch.randperm(e, generator=g)[: module.topk]
                                                  for _ in range(module.tid2eid.shape[0])]))
        self.reset_buffers()
        return self
