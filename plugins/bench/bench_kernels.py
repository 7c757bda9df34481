"""Benchmark of the hatrt kernels on a GPU (through the torch extension), against the card's roofline.

    python plugins/bench/bench_kernels.py [--out bench.json] [--plot bench.png] [--quick]
    python plugins/bench/bench_kernels.py --smoke      # the script itself on the CPU emulator, no timing

Per case: the median of CUDA-event-timed launches, each after a 256 MB write that evicts L2 (in a
model of 43-61 layers a layer's data is never still in L2 when it runs again), the bytes the kernel
must move (inputs read once, outputs written once) and its FLOPs. The card's ceilings are measured
in the same run: device-to-device copy bandwidth (read + write bytes), the bf16 tensor-core matrix
rate and the fp32 CUDA-core matrix rate (TF32 off). Each case gets a floor, max(bytes / copy
bandwidth, FLOPs / rate of the math it runs), and is reported as a percentage of that floor
("roofline"), plus the plain percentages of copy bandwidth and matrix rate.

Cases (decode, one query token per sequence, unless named prefill):
* attention_tc / attention_fp32, side by side in one run: CSA layers (128-token window + top-k
  entries gathered from ctx / 4), V4-Flash (64 heads, top-512) and V4-Pro (128 heads, top-1024);
  HCA layers (window + all ctx / 128 entries); contexts 8K / 128K / 1M, batch 1 / 16 / 64. Keys
  and values come from the production 584-byte FP8 entries.
* attention_tc with the heads of V4-Flash split over 4 and 8 GPUs (16 / 8 heads): these are the
  memory-bound cases (56 and 28 FLOP per byte, below the ridge of every Hopper card); 64 heads do
  224 FLOP per byte, at the ridge.
* indexer_fp4: lightning indexer + top-k over the production 68-byte FP4 keys (tensor-core
  scoring), V4-Flash (top-512) and V4-Pro (top-1024), same contexts and batches; at the target case
  (256K candidates, top-512, batch 1) also bf16 keys on tensor cores and on CUDA cores.
* compress_kv / compress_index: compressor step (fp32 projections in) fused with the cache write
  (584-byte entry / 68-byte FP4 key): decode (one new entry per sequence) and a 128K-token prefill.
* kv_write: quantizing bf16 vectors into 584-byte entries (decode window tokens, 128K prefill).
* routed_experts: the MoE routed experts (RoutedExperts, bf16: tensor cores) at V4-Flash shapes (256 bf16
  experts, 6 picks, d 4096, I 2048), decode batches and a 1024-token prefill; bytes = the touched
  experts' weights read once.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import kernels_ext  # noqa: E402

DEV = "cuda"
SMOKE = False  # --smoke: every kind of case once on the CPU emulator, tiny shapes, no timing claims
D, ROPE, L, WINDOW = 512, 64, 128, 128  # head dim, RoPE dims, window ring, attention window
HI, DI = 64, 128  # indexer heads and head dim (both models)
MODELS = {"V4-Flash": dict(H=64, topk=512), "V4-Pro": dict(H=128, topk=1024)}
_flush: torch.Tensor | None = None


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median seconds of fn() with a cold L2 (the eviction write is outside the timed region)."""
    global _flush
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    if _flush is None:
        _flush = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)
    for _ in range(warmup):
        fn()
    events = []
    for _ in range(reps):
        _flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        events.append((a, b))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in events) * 1e-3


def ceilings() -> dict:
    """Copy bandwidth (bytes read + written per second), bf16 and fp32 (no TF32) matrix rates."""
    n = 1 << 30
    x = torch.empty(n, dtype=torch.uint8, device=DEV).random_(0, 255)
    y = torch.empty_like(x)
    copy = 2 * n / timed(lambda: y.copy_(x), reps=10)
    m = 8192
    a = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    bf16 = 2 * m**3 / timed(lambda: a @ a, reps=10)
    torch.backends.cuda.matmul.allow_tf32 = False
    a = a.float()
    fp32 = 2 * m**3 / timed(lambda: a @ a, reps=5)
    return dict(copy_Bps=copy, bf16_flops=bf16, fp32_flops=fp32)


def fp8_entries(ext, n: int) -> torch.Tensor:
    """uint8 [n, 584]: real entries (kv_write_584 of random vectors), tiled."""
    base = min(n, 4096)
    small = torch.empty(base, 584, dtype=torch.uint8, device=DEV)
    ext.kv_write_584(small, torch.randn(base, D, device=DEV, dtype=torch.bfloat16))
    return small.repeat((n + base - 1) // base, 1)[:n].contiguous()


def fp4_keys(ext, n: int) -> torch.Tensor:
    """uint8 [n, 68]: real packed FP4 index keys (index_key_write of random vectors), tiled."""
    base = min(n, 4096)
    small = torch.empty(base, 68, dtype=torch.uint8, device=DEV)
    ext.index_key_write(small, torch.randn(base, DI, device=DEV))
    return small.repeat((n + base - 1) // base, 1)[:n].contiguous()


def row(rows, kernel, case, t, nbytes, flops, math_path):
    rows.append(dict(kernel=kernel, case=case, time_us=t * 1e6, bytes=nbytes, flops=flops, math=math_path))
    log(f"{kernel:15s} {case:44s} {t * 1e6:10.1f} us")


# ------------------------------------------------------------------------------ sparse attention
class EntryPool:
    """The compressed entries of B sequences ([B, N, 584]), kept while consecutive cases share them
    (a 1M-token CSA pool at batch 64 is 9.8 GB)."""

    def __init__(self, ext):
        self.ext, self.key, self.value = ext, None, None

    def get(self, B: int, N: int) -> torch.Tensor:
        if self.key != (B, N):
            self.value = None
            if DEV == "cuda":
                torch.cuda.empty_cache()
            self.key, self.value = (B, N), fp8_entries(self.ext, B * N).view(B, N, 584)
        return self.value


def bench_attention(ext, rows, pool, model, H, layer, ctx, B, tensor_cores, topk=0):
    """layer "CSA": the window + topk entries picked at random from ctx / 4; "HCA": the window +
    all ctx / 128 entries."""
    if layer == "CSA":
        N = ctx // 4
        K = min(topk, N)
        idx = torch.rand(B, N, device=DEV).argsort(dim=-1)[:, :K].reshape(B, 1, K)
    else:
        N = K = ctx // 128
        idx = torch.arange(K, device=DEV).expand(B, 1, K).contiguous()
    entries = pool.get(B, N)
    q = torch.randn(B, 1, H, D, device=DEV, dtype=torch.bfloat16)
    q_pos = torch.full((B, 1), ctx - 1, device=DEV, dtype=torch.int64)
    win = fp8_entries(ext, B * L).view(B, L, 584)
    wpos = (ctx - L + torch.arange(L, device=DEV)).expand(B, L).contiguous()
    sink = torch.randn(H, device=DEV)
    out = torch.empty_like(q)

    def run():
        ext.sparse_attention(out, q, q_pos, win, wpos, entries, idx, sink, WINDOW, 1 / math.sqrt(D),
                             tensor_cores=tensor_cores)

    t = timed(run)
    nbytes = B * (L + K) * 584 + 2 * B * H * D * 2 + idx.numel() * 8
    kernel = "attention_tc" if tensor_cores else "attention_fp32"
    row(rows, kernel, f"{model} {layer} ctx={ctx // 1024}K B={B}", t, nbytes, 4.0 * B * H * (L + K) * D,
        "bf16" if tensor_cores else "fp32")


# ------------------------------------------------------------------------------ indexer + top-k
def bench_indexer(ext, rows, model, topk, ctx, B, keys="fp4", tensor_cores=True):
    """keys "fp4": the production 68-byte packed keys; "bf16": plain bf16 keys."""
    N = ctx // 4
    q = torch.randn(B, 1, HI, DI, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(B, 1, HI, device=DEV, dtype=torch.bfloat16)
    k = fp4_keys(ext, B * N).view(B, N, 68) if keys == "fp4" else torch.randn(B, N, DI, device=DEV,
                                                                              dtype=torch.bfloat16)
    pos = torch.full((B, 1), ctx - 1, device=DEV, dtype=torch.int64)
    out = torch.empty(B, 1, topk, dtype=torch.int64, device=DEV)

    def run():
        ext.indexer_topk(out, q, w, k, pos, 4, topk, True, tensor_cores=tensor_cores)

    t = timed(run)
    nbytes = k.numel() * k.element_size() + q.numel() * 2 + w.numel() * 2 + out.numel() * 8
    kernel = f"indexer_{keys}" + ("" if tensor_cores else "_fp32")
    row(rows, kernel, f"{model} N={N // 1024}K B={B} top-{topk}", t, nbytes, 2.0 * B * N * HI * DI,
        "bf16" if tensor_cores else "fp32")


# ------------------------------------------------------------------------------ compressor, KV write
def bench_compress(ext, rows, target, layer, B, N, phase):
    """The compressor step with its fused cache write. target "kv": the main compressor (D 512,
    FP8 584-byte entry); "index": the CSA indexer compressor (D 128, Hadamard + FP4 68-byte key).
    B sequences, N finished entries each."""
    Dc, quant, width = (D, 1, 584) if target == "kv" else (DI, 2, 68)
    m, overlap = (128, False) if layer == "HCA" else (4, True)
    W = 2 * Dc if overlap else Dc
    kv = torch.randn(B, N, m, W, device=DEV)
    sc = torch.randn(B, N, m, W, device=DEV)
    pk = torch.randn(B, m, Dc, device=DEV) if overlap else None
    ps = torch.randn(B, m, Dc, device=DEV) if overlap else None
    nw = torch.ones(Dc, device=DEV)
    ang = torch.rand(B, N, ROPE // 2, device=DEV)
    cos, sin = ang.cos(), ang.sin()
    cache = torch.empty(B * N, width, dtype=torch.uint8, device=DEV)

    def run():
        ext.compress(None, kv, sc, pk, ps, nw, cos, sin, 1e-6, quant, cache)

    t = timed(run)
    ins = [kv, sc, nw, cos, sin] + ([pk, ps] if overlap else [])
    nbytes = sum(x.numel() * x.element_size() for x in ins) + cache.numel()
    row(rows, f"compress_{target}", f"{layer} m={m} D={Dc} {phase}", t, nbytes, 6.0 * B * N * m * W, "fp32")


def bench_kv_write(ext, rows, n, label):
    src = torch.randn(n, D, device=DEV, dtype=torch.bfloat16)
    slot = torch.randperm(n, device=DEV)
    cache = torch.empty(n, 584, dtype=torch.uint8, device=DEV)
    t = timed(lambda: ext.kv_write_584(cache, src, slot))
    row(rows, "kv_write", f"bf16 -> 584 B, {label}", t, n * (D * 2 + 584 + 8), 0.0, "fp32")


def bench_routed_experts(ext, rows, model, T, label, E, k, d, I):
    """RoutedExperts (MoE routed experts, bf16 weights) for T tokens with random picks: the bytes
    are the touched experts' weights (read once) plus activations, the FLOPs those of the k picks."""
    x = torch.randn(T, d, device=DEV, dtype=torch.bfloat16)
    idx = torch.randint(0, E, (T, k), device=DEV)
    w = torch.rand(T, k, device=DEV)
    w1 = torch.randn(E, I, d, device=DEV, dtype=torch.bfloat16)
    w3 = torch.randn(E, I, d, device=DEV, dtype=torch.bfloat16)
    w2 = torch.randn(E, d, I, device=DEV, dtype=torch.bfloat16)
    out = torch.empty(T, d, device=DEV)

    def run():
        ext.routed_experts(out, x, idx, w, w1, w3, w2, 10.0)

    t = timed(run)
    touched = int(idx.unique().numel())
    nbytes = touched * 3 * I * d * 2 + x.numel() * 2 + idx.numel() * 12 + out.numel() * 4
    row(rows, "routed_experts", f"{model} E={E} k={k} {label}", t, nbytes, 6.0 * T * k * I * d, "bf16")
    del w1, w3, w2


# ------------------------------------------------------------------------------ report
def derive(rows, ceil):
    for r in rows:
        s = r["time_us"] * 1e-6
        rate = ceil["bf16_flops"] if r["math"] == "bf16" else ceil["fp32_flops"]
        mem_floor, math_floor = r["bytes"] / ceil["copy_Bps"], r["flops"] / rate
        r["GB_s"] = r["bytes"] / s / 1e9
        r["TFLOP_s"] = r["flops"] / s / 1e12
        r["pct_copy_bw"] = 100 * r["bytes"] / s / ceil["copy_Bps"]
        r["pct_matmul"] = 100 * r["flops"] / s / rate
        r["floor_us"] = max(mem_floor, math_floor) * 1e6
        r["bound"] = "memory" if mem_floor >= math_floor else "compute"
        r["pct_roofline"] = 100 * max(mem_floor, math_floor) / s


def plot(rows, meta, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {"sparse attention": [r for r in rows if r["kernel"].startswith("attention")],
              "indexer + top-k": [r for r in rows if r["kernel"].startswith("indexer")],
              "compressor / KV write": [r for r in rows if r["kernel"].startswith(("compress", "kv_write"))],
              "routed experts (MoE)": [r for r in rows if r["kernel"].startswith("routed")]}
    groups = {k: v for k, v in groups.items() if v}
    heights = [max(2.0, 0.22 * len(v) + 0.8) for v in groups.values()]
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, sum(heights)), squeeze=False,
                             gridspec_kw=dict(height_ratios=heights))
    colors = {"bf16": "tab:blue", "fp32": "tab:orange"}
    for ax, (title, rs) in zip(axes[:, 0], groups.items()):
        y = range(len(rs))
        pct = [min(r["pct_roofline"], 110.0) for r in rs]  # clipped: a broken clock must not break the chart
        ax.barh(list(y), pct, color=[colors[r["math"]] for r in rs])
        ax.set_yticks(list(y), [f"{r['kernel']}  {r['case']}" for r in rs], fontsize=7)
        ax.invert_yaxis()
        for i, r in enumerate(rs):
            ax.text(min(pct[i], 100.0) + 0.5, i, f"{r['time_us']:.1f} us ({r['bound'][0]})", va="center", fontsize=6)
        ax.axvline(80, color="grey", lw=0.8, ls="--")
        ax.axvline(100, color="black", lw=0.8)
        ax.set_xlim(0, 115)
        ax.set_title(title, fontsize=9)
    axes[-1, 0].set_xlabel("% of the roofline floor = max(bytes / copy bandwidth, FLOPs / matrix rate); dashed: 80%\n"
                           "blue: tensor cores (bf16 rate), orange: CUDA cores (fp32 rate); (m) / (c): memory / compute bound",
                           fontsize=8)
    fig.suptitle(f"hatrt kernels on {meta['device']}: copy {meta['copy_GB_s']:.0f} GB/s, bf16 "
                 f"{meta['bf16_matmul_TFLOP_s']:.0f} TFLOP/s, fp32 {meta['fp32_matmul_TFLOP_s']:.0f} TFLOP/s", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    ap.add_argument("--plot", type=Path, help="write a bar chart (PNG, needs matplotlib)")
    ap.add_argument("--quick", action="store_true", help="contexts 8K / 128K, batches 1 / 64")
    ap.add_argument("--smoke", action="store_true",
                    help="check the script itself: every kind of case once, tiny shapes, on the CPU emulator (no GPU)")
    args = ap.parse_args()
    global SMOKE, DEV
    SMOKE = args.smoke
    if SMOKE:
        DEV = "cpu"
        ext = kernels_ext.load(emulate=True)
        device, sms = "CUDA emulator (CPU): times are meaningless", 0
        ceil = dict(copy_Bps=1.0, bf16_flops=1.0, fp32_flops=1.0)
    else:
        ext = kernels_ext.load()
        props = torch.cuda.get_device_properties(0)
        device, sms = props.name, props.multi_processor_count
        log("measuring the card's ceilings")
        ceil = ceilings()
    torch.manual_seed(0)
    rows: list[dict] = []
    if SMOKE:
        contexts, batches = (8192,), (1,)
    else:
        contexts = (8192, 131072) if args.quick else (8192, 131072, 1 << 20)
        batches = (1, 64) if args.quick else (1, 16, 64)
    pool = EntryPool(ext)
    for ctx in contexts:
        for B in batches:
            for name, m in MODELS.items():
                for tc in (True, False):
                    bench_attention(ext, rows, pool, name, m["H"], "CSA", ctx, B, tc, topk=m["topk"])
            for name, m in MODELS.items():
                for tc in (True, False) if SMOKE else (True,):
                    bench_attention(ext, rows, pool, name, m["H"], "HCA", ctx, B, tc)
    tp_ctx = contexts[-1] if SMOKE else 131072
    for tp in (4, 8):
        for B in batches:
            bench_attention(ext, rows, pool, f"V4-Flash/TP{tp}", 64 // tp, "CSA", tp_ctx, B, True, topk=512)
    pool.value = None
    for ctx in contexts:
        for B in batches:
            for name, m in MODELS.items():
                bench_indexer(ext, rows, name, m["topk"], ctx, B)
    # the target case (256K candidates, top-512, batch 1): FP4 vs bf16 keys, tensor vs CUDA cores
    target_ctx = contexts[-1] if SMOKE else 1 << 20
    bench_indexer(ext, rows, "V4-Flash", 512, target_ctx, 1, keys="bf16")
    bench_indexer(ext, rows, "V4-Flash", 512, target_ctx, 1, keys="bf16", tensor_cores=False)
    for B in batches:
        bench_compress(ext, rows, "kv", "HCA", B, 1, f"decode B={B}")
        bench_compress(ext, rows, "kv", "CSA", B, 1, f"decode B={B}")
        bench_compress(ext, rows, "index", "CSA", B, 1, f"decode B={B}")
    prefill = 256 if SMOKE else 131072  # tokens
    label = f"prefill {prefill} tokens"
    bench_compress(ext, rows, "kv", "HCA", 1, prefill // 128, label)
    bench_compress(ext, rows, "kv", "CSA", 1, prefill // 4, label)
    bench_compress(ext, rows, "index", "CSA", 1, prefill // 4, label)
    bench_kv_write(ext, rows, batches[-1], f"decode B={batches[-1]}")
    bench_kv_write(ext, rows, prefill, label)
    moe = dict(E=8, k=2, d=64, I=32) if SMOKE else dict(E=256, k=6, d=4096, I=2048)  # V4-Flash experts
    for B in batches:
        bench_routed_experts(ext, rows, "V4-Flash", B, f"decode B={B}", **moe)
    moe_prefill = 16 if SMOKE else 1024
    bench_routed_experts(ext, rows, "V4-Flash", moe_prefill, f"prefill {moe_prefill} tokens", **moe)

    derive(rows, ceil)
    meta = dict(device=device, sms=sms, torch=torch.__version__, copy_GB_s=ceil["copy_Bps"] / 1e9,
                bf16_matmul_TFLOP_s=ceil["bf16_flops"] / 1e12, fp32_matmul_TFLOP_s=ceil["fp32_flops"] / 1e12,
                l2_flushed=not SMOKE, command=" ".join(sys.argv))
    print(f"# {device}: copy {meta['copy_GB_s']:.0f} GB/s (read+write), bf16 matmul "
          f"{meta['bf16_matmul_TFLOP_s']:.0f} TFLOP/s, fp32 {meta['fp32_matmul_TFLOP_s']:.0f} TFLOP/s; L2 evicted before each launch")
    print(f"{'kernel':15s} {'case':44s} {'time_us':>9s} {'floor':>8s} {'%roof':>6s} {'bound':>7s} "
          f"{'GB/s':>7s} {'%copy':>6s} {'TFLOP/s':>8s} {'%mm':>5s}")
    for r in rows:
        print(f"{r['kernel']:15s} {r['case']:44s} {r['time_us']:9.1f} {r['floor_us']:8.1f} {r['pct_roofline']:6.1f} "
              f"{r['bound']:>7s} {r['GB_s']:7.0f} {r['pct_copy_bw']:6.1f} {r['TFLOP_s']:8.2f} {r['pct_matmul']:5.1f}")
    if args.out:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        tmp.replace(args.out)
    if args.plot:
        try:
            plot(rows, meta, args.plot)
        except ImportError:
            print("no plot: matplotlib is not installed (pip install 'hatrt[bench]')", file=sys.stderr)


if __name__ == "__main__":
    main()
