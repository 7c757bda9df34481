"""The hatrt CUDA kernels against the PyTorch reference (exporter/ops.py), on two targets:

- ``cuda``: the kernels built for the GPU in the machine (skipped without CUDA);
- ``emulated``: the SAME kernel source compiled for the CPU emulator (plugins/emu: a fiber per
  CUDA thread, strict barriers and warp-synchronous ops, NaN-poisoned shared memory), so the
  kernels' logic (indexing, tie rule, splits, the FP8 layout) is checked on every CI run. It says
  nothing about speed, and cannot see races the fiber schedule hides (docs/plugins.md).

The launchers are built into a torch extension (plugins/tests/kernels_ext.py) and each check draws
FRESH random inputs (the seed is printed on failure), fills the outputs with NaN (or a byte pattern)
first, and checks that every element was written and matches the reference:

    python -m pytest -q plugins/tests/test_kernels.py            # both targets, where available
    python plugins/tests/test_kernels.py [--emulate]             # without pytest

Tolerances follow docs/plugins.md: fp32 paths 1e-5 relative (norm), bf16/fp16 outputs 1e-2,
quantized outputs (FP8/FP4 fake quant) may differ at a few elements that sit on a rounding
boundary; the indexer must match the reference EXACTLY on integer-valued inputs (exact scores,
many ties: the tie rule is checked bit for bit) and as sets within tolerance on random inputs.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
import types
from pathlib import Path

import torch

try:
    import pytest
except ImportError:  # runnable as a plain script where pytest is missing
    pytest = None

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
QUANT_NAMES = {0: None, 1: "fp8", 2: "fp4"}


# ----------------------------------------------------------------------------- targets
class Target:
    """The kernels built for one target: `ext` (the launchers), `dev` (where tensors live)."""

    def __init__(self, name: str):
        import kernels_ext

        self.name = name
        self.emulated = name == "emulated"
        self.dev = "cpu" if self.emulated else "cuda"
        self.ext = kernels_ext.load(emulate=self.emulated)

    def sync(self):
        """Wait for the kernels (launches are asynchronous on a GPU; the emulator runs them inline)."""
        if not self.emulated:
            torch.cuda.synchronize()


def _skip_reason(name: str) -> str | None:
    import kernels_ext

    if name == "cuda":
        return None if torch.cuda.is_available() else "needs a CUDA GPU"
    return kernels_ext.emulator_available()


_TARGETS: dict[str, Target] = {}


def _target(name: str) -> Target:
    if name not in _TARGETS:
        _TARGETS[name] = Target(name)
    return _TARGETS[name]


if pytest is not None:

    @pytest.fixture(scope="module", params=["cuda", "emulated"])
    def kern(request) -> Target:
        why = _skip_reason(request.param)
        if why:
            pytest.skip(why)
        return _target(request.param)


def test_cuda_target_waits_for_the_gpu(monkeypatch):
    """Target.sync on the cuda target waits for the device. That branch never runs without a GPU,
    so it is checked here with a stand-in for torch.cuda.synchronize (it once called itself by a
    wrong name and would have failed every GPU test)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: calls.append(args))
    target = object.__new__(Target)
    target.emulated = False
    target.sync()
    assert calls == [()]


# ----------------------------------------------------------------------------- helpers


def _ref():
    """exporter.ops / exporter.quant without running the package __init__ (its loader imports are
    not needed here and a GPU image may lack one of them)."""
    if "exporter.ops" not in sys.modules:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        try:
            importlib.import_module("exporter.ops")
        except ImportError:
            pkg = types.ModuleType("exporter")
            pkg.__path__ = [str(ROOT / "exporter")]
            sys.modules["exporter"] = pkg
            importlib.import_module("exporter.ops")
    return sys.modules["exporter.ops"], sys.modules["exporter.quant"]


def _gen(kern):
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator(device=kern.dev)
    g.manual_seed(seed)
    return g, seed


def _rel(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def _randn(shape, g, dtype=F32):
    return torch.randn(shape, generator=g, device=g.device).to(dtype)


def _randint(lo, hi, shape, g, dtype=torch.int64):
    return torch.randint(lo, hi, shape, generator=g, device=g.device).to(dtype)


def _mismatch_fraction(out, ref, rtol=1e-5, atol=1e-6) -> float:
    bad = (out.double() - ref.double()).abs() > atol + rtol * ref.double().abs()
    return bad.float().mean().item()


def _assert_untouched(cache, slot, fill, msg):
    """A cache write changed only the rows it was given (negative slots are skipped)."""
    untouched = torch.ones(cache.shape[0], dtype=torch.bool, device=cache.device)
    untouched[slot[slot >= 0]] = False
    assert (cache[untouched] == fill).all(), msg


# ----------------------------------------------------------------------------- KV entry (584 B)
def test_kv_write_read_584(kern):
    ext, (_, quant) = kern.ext, _ref()
    for dtype in (F32, BF16, F16):
        g, seed = _gen(kern)
        n, rows = 67, 96
        # magnitudes spread over many binades, block by block, so the scales vary
        mag = torch.exp2(_randint(-12, 12, (n, 8, 1), g).float()).expand(n, 8, 64).reshape(n, 512)
        src = (_randn((n, 512), g) * mag).to(dtype)
        slot = torch.randperm(rows, generator=g, device=kern.dev)[:n]
        slot[5] = -1  # skipped
        cache = torch.full((rows, 584), 0xAB, dtype=torch.uint8, device=kern.dev)
        ext.kv_write_584(cache, src, slot)
        out = torch.full((n, 512), float("nan"), device=kern.dev)
        ext.kv_read_584(out, cache, slot)
        kern.sync()
        ref = torch.cat([quant.fake_quant_fp8(src.float()[:, :448]), src.float()[:, 448:].to(BF16).float()], -1)
        ref[5] = 0.0  # kv_read of a negative slot gives zeros
        msg = f"dtype={dtype} seed={seed}"
        assert torch.isfinite(out).all(), msg
        assert _mismatch_fraction(out, ref, rtol=0, atol=0) <= 1e-3, msg  # bit-exact but for log2 edge cases
        assert _rel(out, ref) < 1e-2, msg
        assert (cache[slot[slot >= 0], 583] == 0).all(), msg
        _assert_untouched(cache, slot, 0xAB, msg)


# ----------------------------------------------------------------------------- compressor
COMPRESS_CASES = [
    # overlap, B, N, m, D, r, quant, dtype
    (False, 2, 3, 128, 512, 64, 0, F32),   # HCA
    (False, 2, 3, 128, 512, 64, 1, BF16),
    (True, 3, 5, 4, 512, 64, 0, F32),      # CSA main entries
    (True, 3, 5, 4, 512, 64, 1, F32),
    (True, 2, 4, 4, 512, 64, 1, F16),
    (True, 2, 6, 4, 128, 64, 2, F32),      # CSA indexer keys: Hadamard + FP4
    (False, 2, 2, 16, 80, 16, 1, F32),     # tiny config: D = 80, 16 RoPE dims
]


def _compress_inputs(overlap, B, N, m, D, r, dtype, g):
    W = 2 * D if overlap else D
    kv = _randn((B, N, m, W), g, dtype)
    score = (_randn((B, N, m, W), g) * 2).to(dtype)
    prev_kv = prev_score = None
    if overlap:
        prev_kv = _randn((B, m, D), g, dtype)
        prev_score = _randn((B, m, D), g, dtype)
        prev_kv[0] = 0  # batch 0: no previous block
        prev_score[0] = float("-inf")
    nw = (1 + 0.1 * _randn((D,), g)).to(dtype)
    ang = torch.rand((B, N, r // 2), generator=g, device=g.device) * 20
    return kv, score, prev_kv, prev_score, nw, ang.cos().to(dtype), ang.sin().to(dtype)


def test_compress(kern):
    ext, (ops, _) = kern.ext, _ref()
    for overlap, B, N, m, D, r, qt, dtype in COMPRESS_CASES:
        g, seed = _gen(kern)
        kv, score, pk, ps, nw, cos, sin = _compress_inputs(overlap, B, N, m, D, r, dtype, g)
        out = torch.full((B, N, D), float("nan"), device=kern.dev)
        ext.compress(out, kv, score, pk, ps, nw, cos, sin, 1e-6, qt)
        kern.sync()
        ref = ops.compress_blocks(kv, score, pk, ps, nw, cos, sin, eps=1e-6, quant=QUANT_NAMES[qt]).float()
        msg = f"overlap={overlap} m={m} D={D} quant={qt} dtype={dtype} seed={seed}"
        assert torch.isfinite(out).all(), msg
        if qt == 0:
            assert _rel(out, ref) < 1e-5, msg
        else:  # a value on a rounding boundary may round the other way after fp32 reordering
            assert _mismatch_fraction(out, ref) <= 0.01, msg
            assert _rel(out, ref) < 5e-2, msg


def test_compress_fused_cache_write(kern):
    """The compressor writes each finished entry in its cache form, which dequantizes exactly to
    the fp32 output: the 584-byte FP8 KV entry (main compressor, D 512, FP8; the RoPE dims as bf16)
    and the 68-byte FP4 index key (indexer compressor, D 128, Hadamard + FP4)."""
    ext = kern.ext
    for D, quant, width, dtype in ((512, 1, 584, BF16), (128, 2, 68, F32)):
        g, seed = _gen(kern)
        B, N, m, r = 3, 4, 4, 64
        kv, score, pk, ps, nw, cos, sin = _compress_inputs(True, B, N, m, D, r, dtype, g)
        rows = B * N + 7
        cache = torch.full((rows, width), 0xCD, dtype=torch.uint8, device=kern.dev)
        slot = torch.randperm(rows, generator=g, device=kern.dev)[: B * N].view(B, N)
        out = torch.full((B, N, D), float("nan"), device=kern.dev)
        ext.compress(out, kv, score, pk, ps, nw, cos, sin, 1e-6, quant, cache, slot)
        back = torch.full((B * N, D), float("nan"), device=kern.dev)
        read = ext.kv_read_584 if width == 584 else ext.index_key_read
        read(back, cache, slot.reshape(-1))
        kern.sync()
        expect = out.reshape(B * N, D).clone()
        if width == 584:
            expect[:, 448:] = expect[:, 448:].to(BF16).float()
        msg = f"width={width} seed={seed}"
        assert torch.isfinite(back).all(), msg
        assert torch.equal(back, expect), msg


# ----------------------------------------------------------------------------- indexer + top-k
INDEXER_CASES = [
    # B, S, Hi, Di, N, topk, ratio, bf16, in dtype, keys ("same", "fp4": 68-byte, "fp8": 132-byte), pos dtype,
    # num_sms, workspace_bytes (-1 default). bf16/fp16 cases with Di % 16 == 0 score on tensor cores
    # and run again on CUDA cores (_indexer_runs).
    (2, 5, 64, 128, 0, 16, 4, False, F32, "same", torch.int64, 0, -1),       # nothing visible
    (2, 5, 8, 32, 10, 16, 4, False, F32, "same", torch.int64, 0, -1),        # fewer than topk
    (2, 7, 64, 128, 900, 64, 4, False, BF16, "same", torch.int32, 0, -1),    # fused, scores in shared memory
    (1, 3, 64, 128, 5000, 512, 4, True, F32, "same", torch.int64, 0, -1),    # bf16 scores: many ties
    (1, 2, 100, 64, 3000, 128, 4, False, F16, "same", torch.int64, 0, -1),   # two head blocks
    (2, 3, 64, 128, 20000, 512, 4, False, BF16, "same", torch.int64, 100000, -1),  # split path (few rows)
    (2, 4, 16, 64, 70000, 256, 4, False, F32, "same", torch.int64, 1, 3 * 70000 * 4),  # fused, workspace, batches
    (2, 6, 64, 128, 1500, 128, 4, True, BF16, "fp4", torch.int64, 0, -1),    # production: FP4 keys, bf16 scores
    (1, 2, 64, 128, 9000, 512, 4, False, BF16, "fp4", torch.int32, 100000, -1),  # FP4 keys, split path
    (2, 3, 64, 128, 2500, 256, 4, False, F16, "fp8", torch.int64, 0, -1),    # FP8 (132-byte) keys, fp16 q
]


# HATRT_KERNEL_CASES=small keeps the cheap cases only (compute-sanitizer and AddressSanitizer runs);
# =tiny one case per kernel path (ThreadSanitizer runs, 10x slower again): the indexer with the
# production FP4 keys on tensor and CUDA cores (test_indexer_topk_exact_ties; the random-input
# test runs the same code on other values and is skipped) and its split selection
# (test_indexer_topk_all_equal, always whole); 16-head and 64-head tensor-core attention with
# splits and FP8 entries, each also on the CUDA-core kernel.
CASES = os.environ.get("HATRT_KERNEL_CASES", "all")
SMALL = CASES in ("small", "tiny")
TINY_INDEXER, TINY_ATTN = (7,), (3, 4)


def _indexer_runs():
    for i, case in enumerate(INDEXER_CASES):
        if (SMALL and case[4] > 3000) or (CASES == "tiny" and i not in TINY_INDEXER):
            continue
        yield case, True
        if case[8] != F32 and case[3] % 16 == 0:
            yield case, False  # the same case on CUDA cores


def _visible(q_pos, ratio, N):
    return torch.div(q_pos + 1, ratio, rounding_mode="floor").clamp(min=0, max=N)


def _index_keys(ext, keys, packing):
    """(the tensor the kernel reads, the float keys it means): packed keys go through
    index_key_write_68 and come back through index_key_read_68."""
    if packing == "same":
        return keys, keys.float()
    B, N, Di = keys.shape
    packed = torch.full((B * N, 68 if packing == "fp4" else 132), 0xEE, dtype=torch.uint8, device=keys.device)
    ext.index_key_write(packed, keys.reshape(B * N, Di).contiguous())
    back = torch.empty((B * N, Di), device=keys.device)
    ext.index_key_read(back, packed)
    return packed.view(B, N, -1), back.view(B, N, Di)


def test_index_key_write_read(kern):
    """Both packed index-key formats: 68-byte FP4 (== fake_quant_fp4) and 132-byte FP8
    (== fake_quant_fp8 with one block of 128)."""
    ext, (_, quant) = kern.ext, _ref()
    for width, dtype in ((68, F32), (68, BF16), (68, F16), (132, F32), (132, BF16)):
        g, seed = _gen(kern)
        n, rows = 77, 100
        mag = torch.exp2(_randint(-10, 10, (n, 4, 1), g).float()).expand(n, 4, 32).reshape(n, 128)
        src = (_randn((n, 128), g) * mag).to(dtype)
        slot = torch.randperm(rows, generator=g, device=kern.dev)[:n]
        slot[3] = -1  # skipped
        cache = torch.full((rows, width), 0xAB, dtype=torch.uint8, device=kern.dev)
        ext.index_key_write(cache, src, slot)
        out = torch.full((n, 128), float("nan"), device=kern.dev)
        ext.index_key_read(out, cache, slot)
        kern.sync()
        ref = quant.fake_quant_fp4(src.float()) if width == 68 else quant.fake_quant_fp8(src.float(), block=128)
        ref[3] = 0.0  # a negative slot reads as zeros
        msg = f"width={width} dtype={dtype} seed={seed}"
        assert torch.isfinite(out).all(), msg
        assert _mismatch_fraction(out, ref, rtol=0, atol=0) <= 1e-3, msg  # bit-exact but for log2 edge cases
        _assert_untouched(cache, slot, 0xAB, msg)


def test_indexer_topk_exact_ties(kern):
    """Integer-valued inputs: every score is exact in fp32 (and in the 16-bit tensor-core inputs,
    and through the FP4 key format), so the kernel must equal the reference bit for bit, including
    the order among the many equal scores (lower index first)."""
    ext, (ops, _) = kern.ext, _ref()
    for (B, S, Hi, Di, N, topk, ratio, bf16, dt, packing, pdt, sms, ws), tc in _indexer_runs():
        g, seed = _gen(kern)
        q = _randint(-2, 3, (B, S, Hi, Di), g).to(dt)
        w = _randint(-1, 3, (B, S, Hi), g).to(dt)
        keys_in, keys = _index_keys(ext, _randint(-2, 3, (B, N, Di), g).to(dt), packing)
        q_pos = _randint(-1, ratio * N + 8, (B, S), g)
        out = torch.full((B, S, topk), -7, dtype=torch.int64, device=kern.dev)
        ext.indexer_topk(out, q, w, keys_in, q_pos.to(pdt), ratio, topk, bf16, sms, ws, tc)
        kern.sync()
        ref = ops.indexer_topk(q.float(), w.float(), keys, q_pos, ratio=ratio, topk=topk, bf16_scores=bf16)
        tc = ext.indexer_uses_tensor_cores(q, keys_in, tc)
        msg = f"case={(B, S, Hi, Di, N, topk, bf16, packing, sms, ws)} tensor_cores={tc} seed={seed}"
        assert not (out == -7).any(), msg
        assert torch.equal(out, ref), msg


def test_indexer_topk_all_equal(kern):
    """Every score equal: the top-k is the k lowest visible indices, both when the threshold bin
    fits the split selection's candidate list (3000 keys) and when it overflows it (6000 keys,
    the fallback to one block per row)."""
    ext = kern.ext
    for N, tc in ((3000, True), (6000, True), (6000, False)):
        g, seed = _gen(kern)
        B, S, Hi, Di, topk = 1, 2, 64, 128, 32
        q = _randn((B, S, Hi, Di), g, BF16)
        w = _randn((B, S, Hi), g, BF16)
        keys = torch.zeros((B, N, Di), dtype=BF16, device=kern.dev)
        q_pos = torch.tensor([[4 * N - 1, 4 * 1000 - 1]], device=kern.dev)
        out = torch.full((B, S, topk), -7, dtype=torch.int64, device=kern.dev)
        ext.indexer_topk(out, q, w, keys, q_pos, 4, topk, False, 100000, -1, tc)
        kern.sync()
        expect = torch.arange(topk, device=kern.dev).expand(B, S, topk)
        assert torch.equal(out, expect), f"N={N} tensor_cores={tc} seed={seed}"


def test_indexer_topk_random(kern):
    """Random inputs: same selection as the reference up to fp32 reordering (as sets, within a
    score tolerance), rank order, -1 padding exactly where fewer than topk entries are visible."""
    if CASES == "tiny":  # the exact-ties test runs the same code paths
        if pytest is not None:
            pytest.skip("HATRT_KERNEL_CASES=tiny")
        return
    ext = kern.ext
    for (B, S, Hi, Di, N, topk, ratio, bf16, dt, packing, pdt, sms, ws), tc in _indexer_runs():
        if bf16:
            continue
        g, seed = _gen(kern)
        q, w = _randn((B, S, Hi, Di), g, dt), _randn((B, S, Hi), g, dt)
        keys_in, keys = _index_keys(ext, _randn((B, N, Di), g, dt), packing)
        q_pos = _randint(-1, ratio * N + 8, (B, S), g)
        out = torch.full((B, S, topk), -7, dtype=torch.int64, device=kern.dev)
        ext.indexer_topk(out, q, w, keys_in, q_pos.to(pdt), ratio, topk, bf16, sms, ws, tc)
        kern.sync()
        scores = torch.einsum("bshd,bnd->bshn", q.double(), keys.double()).relu()
        scores = (scores * w.double().unsqueeze(-1)).sum(2)  # [B, S, N]
        vis = _visible(q_pos, ratio, N)
        tc = ext.indexer_uses_tensor_cores(q, keys_in, tc)
        msg = f"case={(B, S, Hi, Di, N, topk, packing, sms, ws)} tensor_cores={tc} seed={seed}"
        for b in range(B):
            for s in range(S):
                n = int(vis[b, s])
                k = min(n, topk)
                row = out[b, s]
                assert (row[k:] == -1).all() and (row[:k] >= 0).all() and (row[:k] < n).all(), msg
                sel = row[:k]
                assert sel.unique().numel() == k, msg
                if k == 0:
                    continue
                sc = scores[b, s, :n]
                tol = 1e-4 * sc.abs().max().item() + 1e-6
                picked = sc[sel]
                assert (picked[1:] <= picked[:-1] + tol).all(), msg  # rank order
                if k < n:
                    rest = torch.ones(n, dtype=torch.bool, device=kern.dev)
                    rest[sel] = False
                    assert picked.min() >= sc[rest].max() - tol, msg


# ----------------------------------------------------------------------------- sparse attention
ATTN_CASES = [
    # B, S, H, D, L, N, K, window, q dtype, kv ("f32"/"bf16"/"f16"/"fp8"), int dtype, num_sms, workspace
    # (bf16/fp16 q with D == 512 run on the tensor-core kernel; test_sparse_attention also runs them
    # on the CUDA-core kernel)
    (3, 1, 64, 512, 128, 300, 64, 128, F32, "f32", torch.int64, 0, True),     # decode, key splits
    (3, 1, 64, 512, 128, 300, 64, 128, F32, "f32", torch.int64, 0, False),    # decode, no workspace
    (2, 6, 20, 80, 150, 40, 16, 128, BF16, "bf16", torch.int32, 0, True),      # prefill, H % 16 != 0
    (2, 4, 16, 512, 140, 100, 32, 128, F16, "f16", torch.int64, 10000, True),  # max splits
    (2, 3, 64, 512, 128, 200, 48, 128, BF16, "fp8", torch.int64, 0, True),     # production FP8 entries
    (1, 1, 128, 512, 128, 1000, 512, 128, BF16, "fp8", torch.int64, 0, True),  # V4-Pro-like decode
    (2, 5, 20, 512, 150, 90, 24, 128, BF16, "fp8", torch.int32, 0, False),     # prefill, H % 16 != 0, unsplit
    (1, 2, 100, 512, 64, 50, 16, 128, BF16, "fp8", torch.int64, 0, True),      # 64-head blocks, H % 64 != 0
    (2, 2, 16, 512, 40, 0, 8, 16, BF16, "bf16", torch.int64, 0, True),         # window only, all idx -1
    (2, 2, 16, 64, 0, 0, 0, 128, F32, "f32", torch.int64, 0, True),            # nothing to attend: 0
    (2, 2, 16, 64, 32, 0, 8, 16, F32, "f32", torch.int64, 0, True),            # no entries, all idx -1
]
KV_DTYPES = {"f32": F32, "bf16": BF16, "f16": F16, "fp8": F32}


def _attn_inputs(B, S, H, D, L, N, K, window, qdt, kv, g):
    q = _randn((B, S, H, D), g, qdt)
    t0 = _randint(0, 400, (B, 1), g)
    q_pos = t0 + torch.arange(S, device=g.device)
    last = q_pos[:, -1:]
    window_pos = (last - L + 1 + torch.arange(L, device=g.device)).expand(B, L).clone()
    window_pos = torch.where(torch.rand((B, L), generator=g, device=g.device) < 0.1, -1, window_pos)
    perm = torch.argsort(torch.rand((B, L), generator=g, device=g.device), dim=1)
    window_pos = torch.gather(window_pos, 1, perm)
    kvdt = KV_DTYPES[kv]
    window_kv = _randn((B, L, D), g, kvdt)
    entries = _randn((B, N, D), g, kvdt)
    entry_idx = _randint(-1, max(N, 1), (B, S, K), g) if N > 0 else torch.full((B, S, K), -1, device=g.device)
    sink = _randn((H,), g)
    return q, q_pos, window_kv, window_pos, entries, entry_idx, sink


def _pack_fp8(ext, x):
    """float [B, R, 512] -> (uint8 [B, R, 584], the dequantized float the kernel sees)."""
    B, R, D = x.shape
    cache = torch.full((B * R, 584), 0xEE, dtype=torch.uint8, device=x.device)
    ext.kv_write_584(cache, x.reshape(B * R, D).contiguous())
    deq = torch.empty((B * R, D), device=x.device)
    ext.kv_read_584(deq, cache)
    return cache.view(B, R, 584), deq.view(B, R, D)


def _attn_runs():
    for i, case in enumerate(ATTN_CASES):
        if (SMALL and case[5] > 300) or (CASES == "tiny" and i not in TINY_ATTN):
            continue
        yield case, True
        if case[8] != F32 and case[3] == 512:
            yield case, False  # the same case on the CUDA-core kernel


def test_sparse_attention(kern):
    ext, (ops, _) = kern.ext, _ref()
    for (B, S, H, D, L, N, K, window, qdt, kv, idt, sms, use_ws), tc in _attn_runs():
        g, seed = _gen(kern)
        q, q_pos, wkv, wpos, ent, idx, sink = _attn_inputs(B, S, H, D, L, N, K, window, qdt, kv, g)
        scale = 1.0 / math.sqrt(D)
        if kv == "fp8":
            wkv_in, wkv = _pack_fp8(ext, wkv)
            ent_in, ent = _pack_fp8(ext, ent)
        else:
            wkv_in, ent_in = wkv, ent
        out = torch.full_like(q, float("nan"))
        ext.sparse_attention(out, q, q_pos.to(idt), wkv_in, wpos.to(idt), ent_in, idx.to(idt), sink, window, scale,
                             sms, use_ws, tc)
        kern.sync()
        ref = ops.sparse_attention(q.float(), q_pos, wkv.float(), wpos, ent.float(), idx, sink, window=window,
                                   scale=scale)
        tc = ext.uses_tensor_cores(q, D, tc)
        msg = f"case={(B, S, H, D, L, N, K, qdt, kv, sms, use_ws)} tensor_cores={tc} seed={seed}"
        assert torch.isfinite(out).all(), msg
        if ref.abs().max() == 0:
            assert (out == 0).all(), msg
            continue
        tol = 1e-5 if qdt == F32 else 1e-2
        assert _rel(out, ref) < tol, f"{msg} rel={_rel(out, ref):.2e}"



# ----------------------------------------------------------------------------- routed experts
def _routed_ref():
    """exporter.custom_ops.routed_experts_reference: the eager kernel of hatrt::RoutedExperts."""
    _ref()
    return importlib.import_module("exporter.custom_ops").routed_experts_reference


# (T, k, E, d, I, dtype, swiglu_limit, picks): picks "random", "repeated" (a token picks one expert
# twice), "invalid" (-1 and E among the picks: skipped), "one" (every pick expert 0, as an all-zero
# tid2eid does: several tiles of one expert)
ROUTED_CASES = [
    (13, 2, 8, 64, 32, F32, 10.0, "random"),
    (1, 6, 16, 64, 96, F32, 10.0, "random"),          # decode; I not a multiple of the tile
    (37, 6, 16, 72, 40, F32, 0.0, "repeated"),         # d not a multiple of 16; no clamp
    (21, 3, 5, 48, 24, F32, 0.5, "invalid"),           # the clamp active almost everywhere
    (40, 2, 8, 64, 32, F32, 10.0, "one"),              # 80 rows of one expert: 3 tiles
    (70, 2, 4, 64, 32, BF16, 10.0, "random"),
    (29, 6, 8, 64, 48, F16, 10.0, "repeated"),
    (9, 4, 6, 32, 16, BF16, 0.0, "invalid"),
]


TINY_ROUTED = (2, 4, 5)  # HATRT_KERNEL_CASES=tiny: edge shapes + repeats, several tiles of one expert, bf16


def test_routed_experts(kern):
    ext, reference = kern.ext, _routed_ref()
    for i, (T, k, E, d, I, dtype, limit, picks) in enumerate(ROUTED_CASES):
        if CASES == "tiny" and i not in TINY_ROUTED:
            continue
        g, seed = _gen(kern)
        x = _randn((T, d), g, dtype)
        idx = _randint(0, E, (T, k), g)
        if picks == "repeated":
            idx[::2, 1] = idx[::2, 0]
        elif picks == "invalid":
            idx[1, 0], idx[-1, -1] = -1, E
        elif picks == "one":
            idx.zero_()
        w = torch.rand((T, k), generator=g, device=g.device)
        w1 = (_randn((E, I, d), g) * d ** -0.5).to(dtype)
        w3 = (_randn((E, I, d), g) * d ** -0.5).to(dtype)
        w2 = (_randn((E, d, I), g) * I ** -0.5).to(dtype)
        if limit and limit < 1:  # push gate / up beyond the limit
            x = (x.float() * 4).to(dtype)
        ref = reference(x, idx, w, w1, w3, w2, limit)
        # 16-bit inputs: the tensor-core kernels, and the same case on CUDA cores
        for tc in ((True, False) if dtype != F32 else (True,)):
            assert ext.routed_experts_uses_tensor_cores(x, w1, tc) == (tc and dtype != F32)
            for idx_t in ((idx, idx.int()) if picks == "invalid" else (idx,)):
                out = torch.full((T, d), float("nan"), device=kern.dev)
                ext.routed_experts(out, x, idx_t, w, w1, w3, w2, limit, tensor_cores=tc)
                kern.sync()
                msg = (f"T={T} k={k} E={E} d={d} I={I} dtype={dtype} limit={limit} picks={picks} "
                       f"tensor_cores={tc} seed={seed}")
                assert torch.isfinite(out).all(), msg
                tol = 1e-5 if dtype == F32 else 1e-2
                assert _rel(out, ref) < tol, f"{msg} rel={_rel(out, ref):.2e}"
    # no picks: zero; no tokens: nothing written
    out = torch.full((3, 16), float("nan"), device=kern.dev)
    z = torch.zeros((3, 0), device=kern.dev)
    ext.routed_experts(out, _randn((3, 16), g), z.long(), z, _randn((2, 8, 16), g), _randn((2, 8, 16), g),
                       _randn((2, 16, 8), g), 10.0)
    kern.sync()
    assert (out == 0).all()


if __name__ == "__main__":
    name = "emulated" if "--emulate" in sys.argv else "cuda"
    if _skip_reason(name):
        print(f"{name}: skipped ({_skip_reason(name)})")
        sys.exit(0)
    target = _target(name)
    failed = 0
    for test_name, fn in list(globals().items()):
        if test_name.startswith("test_") and callable(fn) and list(inspect.signature(fn).parameters) == ["kern"]:
            try:
                fn(target)
                print(f"PASS {test_name} [{name}]")
            except Exception as e:  # noqa: BLE001 - report every failure
                failed += 1
                print(f"FAIL {test_name} [{name}]: {type(e).__name__}: {e}")
    sys.exit(1 if failed else 0)
