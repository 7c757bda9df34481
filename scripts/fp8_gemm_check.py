#!/usr/bin/env python3
"""FP8 GEMM numerics on the GPU, without TensorRT: torch._scaled_mm vs a dequantized matmul.

What an FP8 TensorRT engine relies on (an e4m3 GEMM with fp32 accumulation and per-tensor or
per-channel scales, as the Q/DQ pairs of an FP8 export describe) checked on the GPU at hand:

- both operands quantized to float8_e4m3fn (symmetric, clamp +-448): per tensor, and per row of A /
  per column of B (the per-channel weight scales of an FP8 export);
- torch._scaled_mm (cuBLASLt FP8 tensor cores) against the reference: the same FP8 values
  dequantized to fp32 and multiplied in fp32. The only differences left are the accumulation order
  and the bf16 rounding of the output, so the error must stay within ~1 bf16 ulp of max|ref|;
- the quantization error itself (vs the unquantized fp32 product), for information;
- a short timing of each GEMM and of the bf16 GEMM of the same shape.

    python scripts/fp8_gemm_check.py [--json out.json]    # exit 0 ok / skipped, 1 outside tolerance

Without CUDA, or on a GPU below compute capability 8.9 (no FP8 tensor cores), it prints
"skipped: ..." and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

E4M3_MAX = 448.0
SHAPES = [(1, 4096, 4096), (16, 7168, 2048), (128, 4096, 11264), (512, 2048, 2048)]  # decode-like .. prefill-like
TOL_MAX = 1e-2  # max |fp8 - ref| / max |ref|: bf16 output (8 bits) + fp32 accumulation order
TOL_NORM = 4e-3  # ||fp8 - ref|| / ||ref||


def quantize_rows(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric e4m3: a ~= q * scale, scale [M, 1] fp32."""
    scale = (a.abs().amax(dim=1, keepdim=True).float() / E4M3_MAX).clamp(min=1e-12)
    return (a.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def quantize_cols(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column symmetric e4m3 of b [K, N]: scale [1, N] fp32."""
    q, s = quantize_rows(b.t())
    return q.t(), s.t()


def quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (x.abs().amax().float() / E4M3_MAX).clamp(min=1e-12)
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def dequantized_matmul(qa: torch.Tensor, sa: torch.Tensor, qb: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """The reference: the FP8 values back in fp32, scaled, multiplied in fp32."""
    return (qa.float() * sa) @ (qb.float() * sb)


def _time(fn, iters: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def _errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = (out.float() - ref).abs()
    scale = float(ref.abs().max()) or 1.0
    return {"max_rel": float(diff.max()) / scale, "norm_rel": float(diff.norm() / ref.norm().clamp(min=1e-30)),
            "finite": bool(torch.isfinite(out.float()).all())}


def check_shape(m: int, k: int, n: int, seed: int = 0) -> dict:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(seed)
    a = torch.randn(m, k, device=dev, generator=g)
    a[:, :: max(1, k // 8)] *= 20  # a few outlier channels, as in LLM activations
    b = torch.randn(k, n, device=dev, generator=g) / k ** 0.5
    exact = a @ b
    result: dict = {"shape": [m, k, n]}
    flops = 2.0 * m * k * n

    for mode in ("tensorwise", "rowwise"):
        if mode == "tensorwise":
            qa, sa = quantize_tensor(a)
            qb, sb = quantize_tensor(b)
            scale_a, scale_b = sa.reshape(()), sb.reshape(())
        else:
            qa, sa = quantize_rows(a)
            qb, sb = quantize_cols(b)
            scale_a, scale_b = sa.contiguous(), sb.contiguous()
        ref = dequantized_matmul(qa, sa, qb, sb)
        qb_cm = qb.t().contiguous().t()  # _scaled_mm wants B column-major
        try:
            def run():
                return torch._scaled_mm(qa, qb_cm, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)

            out = run()
            seconds = _time(run)
        except (RuntimeError, TypeError) as e:
            result[mode] = {"error": f"{type(e).__name__}: {e}"[:300]}
            continue
        errs = _errors(out, ref)
        errs["quantization_norm_rel"] = float((ref - exact).norm() / exact.norm())
        errs["tflops"] = flops / seconds / 1e12
        errs["ok"] = errs["finite"] and errs["max_rel"] <= TOL_MAX and errs["norm_rel"] <= TOL_NORM
        result[mode] = errs
    a16, b16 = a.bfloat16(), b.bfloat16()
    result["bf16_tflops"] = flops / _time(lambda: a16 @ b16) / 1e12
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: no CUDA device (torch.cuda.is_available() is False)")
        return 0
    cc = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if cc < (8, 9):
        print(f"skipped: {name} (compute capability {cc[0]}.{cc[1]}) has no FP8 tensor cores (needs >= 8.9)")
        return 0
    print(f"{name} (sm_{cc[0]}{cc[1]}), torch {torch.__version__}, CUDA {torch.version.cuda}")
    results, ok = [], True
    for m, k, n in SHAPES:
        r = check_shape(m, k, n)
        results.append(r)
        for mode in ("tensorwise", "rowwise"):
            e = r[mode]
            if "error" in e:
                print(f"  {m}x{k}x{n} {mode:10s} not run: {e['error']}")
                ok = ok and mode == "rowwise"  # rowwise needs newer torch/cuBLASLt; tensorwise must work
                continue
            print(f"  {m}x{k}x{n} {mode:10s} max_rel {e['max_rel']:.2e} norm_rel {e['norm_rel']:.2e} "
                  f"(fp8 quantization itself {e['quantization_norm_rel']:.2e}) {e['tflops']:7.1f} TFLOP/s "
                  f"[bf16 {r['bf16_tflops']:.1f}] {'ok' if e['ok'] else 'OUTSIDE TOLERANCE'}")
            ok = ok and e["ok"]
    summary = {"device": name, "capability": list(cc), "torch": torch.__version__, "tolerance": {
        "max_rel": TOL_MAX, "norm_rel": TOL_NORM}, "results": results, "passed": ok}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    print("passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
