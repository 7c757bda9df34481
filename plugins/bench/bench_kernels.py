"""Small benchmark of the hatrt kernels on a GPU machine (through the torch extension).

    python plugins/bench/bench_kernels.py [--out bench.json] [--quick]

Per case: median time of CUDA-event-timed launches (after warm-up, rotating among several input
sets when one set would sit in L2), the bytes the kernel must move (inputs read once, outputs
written once) and the FLOPs, against the card's measured device-to-device copy bandwidth and bf16
matrix rate. Shapes: V4-Flash (H 64, top-k 512) and V4-Pro (H 128, top-k 1024) decode, contexts 8K /
128K / 1M (CSA: N = ctx / 4 entries), batch 1 / 16 / 64 where memory and time allow.
Sparse attention runs twice per shape, side by side: the tensor-core kernel (mma.sync, bf16) and
the fp32 CUDA-core kernel, so the ratio between them comes from one run. The indexer reads the
production 68-byte FP4 keys (tensor-core scoring); at its target case (256K candidates, top-512,
batch 1) it also runs with bf16 keys on tensor cores and on CUDA cores. The compressor computes in
fp32 on CUDA cores.
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
L2_BYTES = 60 << 20


SMOKE = False  # --smoke: every call once on the CPU emulator, tiny shapes, no timing claims


def timed(fn, reps=20, warmup=3):
    if SMOKE:
        t0 = time.perf_counter()
        fn(0)
        return time.perf_counter() - t0
    for _ in range(warmup):
        fn(0)
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(i)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return statistics.median(times)


def copies_for(nbytes):
    return 1 if SMOKE else max(1, min(6, math.ceil(4 * L2_BYTES / max(nbytes, 1))))


def ceilings():
    n = 1 << 30
    x = torch.empty(n, dtype=torch.uint8, device=DEV).random_(0, 255)
    y = torch.empty_like(x)
    t = timed(lambda i: y.copy_(x), reps=10)
    bw = 2 * n / t
    m = 8192
    a = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    t = timed(lambda i: a @ b, reps=10)
    return bw, 2 * m**3 / t


def fp8_entries(ext, n):
    """uint8 [n, 584]: real entries (kv_write_584 of random vectors), tiled."""
    base = 4096
    src = torch.randn(base, 512, device=DEV, dtype=torch.bfloat16)
    small = torch.empty(base, 584, dtype=torch.uint8, device=DEV)
    ext.kv_write_584(small, src)
    reps = (n + base - 1) // base
    return small.repeat(reps, 1)[:n].contiguous()


def bench_attention(ext, rows, name, H, topk, ctx, B, tensor_cores):
    D, L, window = 512, 128, 128
    N = ctx // 4
    bytes_one = B * (L + topk) * 584 + 2 * B * H * D * 2 + B * topk * 8
    sets = []
    for _ in range(copies_for(bytes_one)):
        q = torch.randn(B, 1, H, D, device=DEV, dtype=torch.bfloat16)
        q_pos = torch.full((B, 1), ctx - 1, device=DEV, dtype=torch.int64)
        win = fp8_entries(ext, B * L).view(B, L, 584)
        wpos = (ctx - L + torch.arange(L, device=DEV)).expand(B, L).contiguous()
        ent = fp8_entries(ext, B * N).view(B, N, 584)
        idx = torch.randint(0, N, (B, 1, topk), device=DEV)
        sink = torch.randn(H, device=DEV)
        sets.append((torch.empty_like(q), q, q_pos, win, wpos, ent, idx, sink))

    def run(i):
        o, q, qp, w, wp, e, ix, s = sets[i % len(sets)]
        ext.sparse_attention(o, q, qp, w, wp, e, ix, s, window, 1 / math.sqrt(D), tensor_cores=tensor_cores)

    t = timed(run)
    flops = 4.0 * B * H * (L + topk) * D
    kernel = "attention_tc" if tensor_cores else "attention_fp32"
    rows.append(dict(kernel=kernel, shape=f"{name} ctx={ctx} B={B}", time_us=t * 1e6, bytes=bytes_one, flops=flops))
    torch.cuda.empty_cache()


def fp4_keys(ext, n):
    """uint8 [n, 68]: real packed FP4 index keys (index_key_write_68 of random vectors), tiled."""
    base = 4096
    small = torch.empty(base, 68, dtype=torch.uint8, device=DEV)
    ext.index_key_write(small, torch.randn(base, 128, device=DEV))
    reps = (n + base - 1) // base
    return small.repeat(reps, 1)[:n].contiguous()


def bench_indexer(ext, rows, name, topk, ctx, B, keys="fp4", tensor_cores=True, Hi=64, Di=128):
    """keys "fp4": the production 68-byte packed keys; "bf16": plain bf16 keys."""
    N = ctx // 4
    key_bytes = 68 if keys == "fp4" else Di * 2
    bytes_one = B * N * key_bytes + B * Hi * Di * 2 + B * topk * 8
    sets = []
    for _ in range(copies_for(bytes_one)):
        q = torch.randn(B, 1, Hi, Di, device=DEV, dtype=torch.bfloat16)
        w = torch.randn(B, 1, Hi, device=DEV, dtype=torch.bfloat16)
        if keys == "fp4":
            k = fp4_keys(ext, B * N).view(B, N, 68)
        else:
            k = torch.randn(B, N, Di, device=DEV, dtype=torch.bfloat16)
        pos = torch.full((B, 1), ctx - 1, device=DEV, dtype=torch.int64)
        sets.append((torch.empty(B, 1, topk, dtype=torch.int64, device=DEV), q, w, k, pos))

    def run(i):
        o, q, w, k, p = sets[i % len(sets)]
        ext.indexer_topk(o, q, w, k, p, 4, topk, True, tensor_cores=tensor_cores)

    t = timed(run)
    kernel = f"indexer_{keys}" + ("" if tensor_cores else "_fp32")
    rows.append(dict(kernel=kernel, shape=f"{name} N={N} B={B} topk={topk}", time_us=t * 1e6,
                     bytes=bytes_one, flops=2.0 * B * N * Hi * Di))
    torch.cuda.empty_cache()


def bench_compress(ext, rows, kind, entries):
    D = 512
    m, W, overlap = (128, D, False) if kind == "HCA" else (4, 2 * D, True)
    bytes_one = 2 * entries * m * W * 4 + entries * D * 4
    sets = []
    for _ in range(copies_for(bytes_one)):
        kv = torch.randn(entries, 1, m, W, device=DEV)
        sc = torch.randn(entries, 1, m, W, device=DEV)
        pk = torch.randn(entries, m, D, device=DEV) if overlap else None
        ps = torch.randn(entries, m, D, device=DEV) if overlap else None
        nw = torch.ones(D, device=DEV)
        ang = torch.rand(entries, 1, 32, device=DEV)
        sets.append((torch.empty(entries, 1, D, device=DEV), kv, sc, pk, ps, nw, ang.cos(), ang.sin()))

    def run(i):
        o, kv, sc, pk, ps, nw, c, s = sets[i % len(sets)]
        ext.compress(o, kv, sc, pk, ps, nw, c, s, 1e-6, 1)

    t = timed(run)
    rows.append(dict(kernel="compress", shape=f"{kind} m={m} entries={entries} fp32 in", time_us=t * 1e6,
                     bytes=bytes_one, flops=6.0 * entries * m * W))
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="check the script itself: every call once, tiny shapes, on the CPU emulator (no GPU)")
    args = ap.parse_args()
    global SMOKE, DEV
    SMOKE = args.smoke
    if SMOKE:
        DEV = "cpu"
        ext = kernels_ext.load(emulate=True)
        props = type("Props", (), {"name": "CUDA emulator (CPU): times are meaningless", "multi_processor_count": 0})
        bw, mm = 1.0, 1.0
    else:
        ext = kernels_ext.load()
        props = torch.cuda.get_device_properties(0)
        bw, mm = ceilings()
    rows: list[dict] = []
    batches = (1,) if SMOKE else (1, 16) if args.quick else (1, 16, 64)
    contexts = (8192,) if SMOKE else (8192, 131072, 1 << 20)
    for name, H, topk in (("V4-Flash", 64, 512), ("V4-Pro", 128, 1024)):
        for ctx in contexts:
            for B in batches:
                if ctx == 1 << 20 and B > 16:
                    continue
                for tc in (True, False):
                    bench_attention(ext, rows, name, H, topk, ctx, B, tc)
    for ctx in contexts:
        for B in batches:
            if ctx == 1 << 20 and B > 16:
                continue
            bench_indexer(ext, rows, "V4-Flash", 512, ctx, B)
    # the target case (256K candidates, top-512, batch 1), side by side: FP4 vs bf16 keys, tensor
    # cores vs CUDA cores
    target_ctx = contexts[-1] if SMOKE else 1 << 20
    bench_indexer(ext, rows, "V4-Flash", 512, target_ctx, 1, keys="bf16")
    bench_indexer(ext, rows, "V4-Flash", 512, target_ctx, 1, keys="bf16", tensor_cores=False)
    for kind, entries in (("HCA", 4), ("CSA", 4)) if SMOKE else (("HCA", 64), ("HCA", 1024), ("CSA", 64), ("CSA", 32768)):
        bench_compress(ext, rows, kind, entries)

    for r in rows:
        r["GB_s"] = r["bytes"] / (r["time_us"] * 1e-6) / 1e9
        r["TFLOP_s"] = r["flops"] / (r["time_us"] * 1e-6) / 1e12
        r["pct_copy_bw"] = 100 * r["GB_s"] * 1e9 / bw
        r["pct_matmul"] = 100 * r["TFLOP_s"] * 1e12 / mm
    meta = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                copy_GB_s=bw / 1e9, bf16_matmul_TFLOP_s=mm / 1e12, command=" ".join(sys.argv))
    print(f"# {props.name}: copy {bw / 1e9:.0f} GB/s (read+write), bf16 matmul {mm / 1e12:.0f} TFLOP/s")
    print(f"{'kernel':18s} {'shape':40s} {'time_us':>10s} {'GB/s':>8s} {'%copy':>6s} {'TFLOP/s':>8s} {'%mm':>5s}")
    for r in rows:
        print(f"{r['kernel']:18s} {r['shape']:40s} {r['time_us']:10.1f} {r['GB_s']:8.0f} {r['pct_copy_bw']:6.1f} "
              f"{r['TFLOP_s']:8.2f} {r['pct_matmul']:5.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
