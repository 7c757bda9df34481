"""Property tests: the three attention operations against naive loop implementations."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter import preset
from exporter.cache import CompressorState
from exporter.model import Compressor
from exporter.ops import causal_entry_indices, compress_blocks, indexer_topk, sparse_attention
from exporter.rope import Rotary

SETTINGS = settings(max_examples=40, deadline=None)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def naive_rope(v: list[float], pos_angles: list[float]) -> list[float]:
    """Rotate the trailing pairs of v by the given angles (one per pair)."""
    r = 2 * len(pos_angles)
    out = list(v)
    for i, ang in enumerate(pos_angles):
        a, b = v[len(v) - r + 2 * i], v[len(v) - r + 2 * i + 1]
        out[len(v) - r + 2 * i] = a * math.cos(ang) - b * math.sin(ang)
        out[len(v) - r + 2 * i + 1] = a * math.sin(ang) + b * math.cos(ang)
    return out


@SETTINGS
@given(batch=st.integers(1, 2), n_blocks=st.integers(1, 4), ratio=st.sampled_from([2, 4, 8, 16]),
       overlap=st.booleans(), dim=st.sampled_from([8, 12]), has_prev=st.booleans(),
       seed=st.integers(0, 2**16))
def test_compress_blocks_matches_naive_pooling(batch, n_blocks, ratio, overlap, dim, has_prev, seed):
    g, r2 = seeded(seed), 2  # two rotated pairs = 4 RoPE dims
    width = (2 if overlap else 1) * dim
    kv = torch.randn(batch, n_blocks, ratio, width, generator=g, dtype=torch.float64)
    score = torch.randn(batch, n_blocks, ratio, width, generator=g, dtype=torch.float64) * 2
    prev_kv = torch.randn(batch, ratio, dim, generator=g, dtype=torch.float64)
    prev_score = torch.randn(batch, ratio, dim, generator=g, dtype=torch.float64)
    if not has_prev:
        prev_kv, prev_score = torch.zeros_like(prev_kv), torch.full_like(prev_score, float("-inf"))
    weight = torch.rand(dim, generator=g, dtype=torch.float64) + 0.5
    angles = torch.rand(batch, n_blocks, r2, generator=g, dtype=torch.float64) * 6
    got = compress_blocks(kv.float(), score.float(), prev_kv.float() if overlap else None,
                          prev_score.float() if overlap else None, weight.float(), angles.cos().float(),
                          angles.sin().float(), eps=1e-6)
    assert got.shape == (batch, n_blocks, dim)

    for b in range(batch):
        for i in range(n_blocks):
            pooled = []
            for c in range(dim):
                if overlap:  # first halves of the previous block, second halves of this one
                    slots = ([(prev_kv[b, j, c], prev_score[b, j, c]) for j in range(ratio)] if i == 0 else
                             [(kv[b, i - 1, j, c], score[b, i - 1, j, c]) for j in range(ratio)])
                    slots += [(kv[b, i, j, dim + c], score[b, i, j, dim + c]) for j in range(ratio)]
                else:
                    slots = [(kv[b, i, j, c], score[b, i, j, c]) for j in range(ratio)]
                top = max(float(s) for _, s in slots)
                ws = [math.exp(float(s) - top) for _, s in slots]
                pooled.append(sum(w * float(v) for w, (v, _) in zip(ws, slots)) / sum(ws))
            rms = math.sqrt(sum(p * p for p in pooled) / dim + 1e-6)
            normed = [p / rms * float(weight[c]) for c, p in enumerate(pooled)]
            want = torch.tensor(naive_rope(normed, angles[b, i].tolist()), dtype=torch.float64)
            assert torch.allclose(got[b, i].double(), want, atol=2e-5), (b, i)


def naive_topk(scores: list[float], visible: int, k: int) -> list[int]:
    ranked = sorted(range(visible), key=lambda n: (-scores[n], n))  # ties: lower index first
    return (ranked[:k] + [-1] * k)[:k]


@SETTINGS
@given(batch=st.integers(1, 2), seq=st.integers(1, 6), n=st.integers(0, 40), heads=st.integers(1, 4),
       dim=st.sampled_from([4, 8]), topk=st.integers(1, 12), ratio=st.sampled_from([1, 4, 8]),
       start=st.integers(0, 200), seed=st.integers(0, 2**16))
def test_indexer_topk_matches_bruteforce_with_ties(batch, seq, n, heads, dim, topk, ratio, start, seed):
    g = seeded(seed)
    # Small integers keep every score exact in fp32 and make ties common: the tie rule is tested.
    q = torch.randint(-2, 3, (batch, seq, heads, dim), generator=g).float()
    keys = torch.randint(-2, 3, (batch, n, dim), generator=g).float()
    w = torch.randint(-2, 3, (batch, seq, heads), generator=g).float()
    q_pos = start + torch.arange(seq).expand(batch, seq) + torch.randint(0, 5, (batch, 1), generator=g)
    got = indexer_topk(q, w, keys, q_pos, ratio=ratio, topk=topk)
    assert got.shape == (batch, seq, topk) and got.dtype == torch.long
    for b in range(batch):
        for s in range(seq):
            visible = min(n, (int(q_pos[b, s]) + 1) // ratio)
            scores = [sum(float(w[b, s, h]) * max(0.0, float(q[b, s, h] @ keys[b, j])) for h in range(heads))
                      for j in range(n)]
            want = naive_topk(scores, visible, topk)
            assert got[b, s].tolist() == want
            chosen = [i for i in want if i >= 0]
            assert len(chosen) == min(topk, visible) and len(set(chosen)) == len(chosen)


@SETTINGS
@given(batch=st.integers(1, 2), seq=st.integers(1, 5), heads=st.integers(1, 3), window=st.integers(1, 6),
       ring=st.integers(0, 8), n=st.integers(0, 6), k=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_sparse_attention_matches_naive_softmax(batch, seq, heads, window, ring, n, k, seed):
    g, dim = seeded(seed), 8
    q = torch.randn(batch, seq, heads, dim, generator=g, dtype=torch.float64)
    t0 = 10
    q_pos = t0 + torch.arange(seq).expand(batch, seq)
    kv = torch.randn(batch, ring + seq, dim, generator=g, dtype=torch.float64)
    ring_pos = torch.randint(-1, t0, (batch, ring), generator=g)  # -1 = empty slot
    kv_pos = torch.cat([ring_pos, q_pos], dim=1)
    entries = torch.randn(batch, n, dim, generator=g, dtype=torch.float64)
    idx = torch.randint(-1, max(n, 1), (batch, seq, k), generator=g) if n else torch.full((batch, seq, k), -1)
    sink = torch.randn(heads, generator=g, dtype=torch.float64)
    scale = dim ** -0.5
    got = sparse_attention(q.float(), q_pos, kv.float(), kv_pos, entries.float(), idx, sink.float(),
                           window=window, scale=scale)
    for b in range(batch):
        for s in range(seq):
            t = int(q_pos[b, s])
            keys = [kv[b, j] for j in range(kv.shape[1]) if kv_pos[b, j] >= 0 and 0 <= t - kv_pos[b, j] < window]
            keys += [entries[b, int(i)] for i in idx[b, s] if i >= 0]
            for h in range(heads):
                logits = [float(q[b, s, h] @ key) * scale for key in keys]
                top = max(logits + [float(sink[h])])
                ws = [math.exp(x - top) for x in logits]
                den = sum(ws) + math.exp(float(sink[h]) - top)
                want = sum((w / den) * key for w, key in zip(ws, keys)) if keys else torch.zeros(dim, dtype=torch.float64)
                assert torch.allclose(got[b, s, h].double(), want, atol=1e-5)


def test_causal_entry_indices():
    idx = causal_entry_indices(torch.tensor([[0, 3, 4, 11]]), 3, 4)
    assert idx.tolist() == [[[-1, -1, -1], [0, -1, -1], [0, -1, -1], [0, 1, 2]]]


@SETTINGS
@given(ratio=st.sampled_from([4, 128]), length=st.integers(1, 300), cuts=st.lists(st.integers(1, 299), max_size=6),
       seed=st.integers(0, 2**16))
def test_compressor_streaming_matches_one_shot(ratio, length, cuts, seed):
    """Feeding tokens in any chunking gives the same entries and tail state as one call."""
    cfg = preset("tiny-csa")
    torch.manual_seed(seed)
    comp = Compressor(cfg, ratio, dim=16, quant="fp8")
    for p in comp.parameters():
        torch.nn.init.normal_(p, std=0.3)
    rot = Rotary(cfg, compressed=True)
    x = torch.randn(1, length, cfg.hidden_size, generator=seeded(seed))
    width = (2 if ratio == 4 else 1) * 16
    slots = (2 if ratio == 4 else 1) * ratio

    def run(bounds):
        state = CompressorState.empty(1, slots, width, "cpu")
        out = torch.zeros(1, (length - 1) // ratio + 2, 16)  # the capacity contract: contract.entries_needed
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b > a:
                state, out = comp(x[:, a:b], torch.tensor([a]), state, out, rot, quant_sim=False)
        return out, state

    one, state1 = run([0, length])
    bounds = sorted({0, length, *[c for c in cuts if c < length]})
    many, state2 = run(bounds)
    assert torch.allclose(one, many, atol=1e-5)
    used = length % ratio
    off = ratio if ratio == 4 else 0
    assert torch.allclose(state1.kv[:, off:off + used], state2.kv[:, off:off + used], atol=1e-6)
    if length >= ratio:
        assert one[0, length // ratio - 1].abs().sum() > 0  # the last complete block was pooled
    assert one[0, length // ratio:].abs().sum() == 0  # partial blocks are never pooled


# ----------------------------------------------------------------------------- quantization simulation
from exporter.quant import fake_quant_fp4, fake_quant_fp8, hadamard, pow2_scale, round_e2m1  # noqa: E402


@SETTINGS
@given(rows=st.integers(1, 4), blocks=st.integers(1, 3), seed=st.integers(0, 2**16),
       magnitude=st.sampled_from([1e-6, 1e-3, 1.0, 300.0, 1e5]))
def test_fp8_fake_quant_is_blockwise_e4m3_with_pow2_scales(rows, blocks, seed, magnitude):
    x = torch.randn(rows, 64 * blocks, generator=seeded(seed)) * magnitude
    y = fake_quant_fp8(x)
    xb, yb = x.view(rows, blocks, 64), y.view(rows, blocks, 64)
    scale = pow2_scale(xb.abs().amax(-1, keepdim=True), 448.0)
    assert torch.equal(torch.log2(scale), torch.log2(scale).round())  # powers of two (ue8m0)
    q = yb / scale
    assert q.abs().max() <= 448
    assert torch.equal(q, q.to(torch.float8_e4m3fn).float())  # every value is an e4m3 code
    assert torch.allclose(yb, xb, rtol=2 ** -3, atol=float(scale.max()) * 2 ** -9)
    assert torch.equal(fake_quant_fp8(y), y)  # idempotent


def test_fp4_rounding_grid_and_ties_to_even():
    x = torch.tensor([0.0, 0.2, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.5, -0.75, -5.0, 6.0])
    assert round_e2m1(x).tolist() == [0, 0, 0, 0.5, 1, 1, 2, 2, 4, 4, 6, -1, -4, 6]
    y = fake_quant_fp4(torch.randn(3, 64, generator=seeded(0)) * 10)
    scale = pow2_scale(y.view(3, 2, 32).abs().amax(-1, keepdim=True), 6.0)
    codes = (y.view(3, 2, 32) / scale).abs().unique().tolist()
    assert set(codes) <= {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}


def test_hadamard_is_orthonormal_and_symmetric():
    x = torch.randn(5, 128, generator=seeded(1), dtype=torch.float64)
    h = hadamard(torch.eye(128, dtype=torch.float64))
    assert torch.allclose(h @ h.T, torch.eye(128, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h, h.T)
    assert torch.allclose(hadamard(x) @ hadamard(x).T, x @ x.T, atol=1e-9)  # dot products kept
