#!/usr/bin/env python3
"""Benchmark `hatrt serve`: output tokens/s and latency percentiles (time to first token,
inter-token latency, end to end) at several concurrencies, against the same requests served one
at a time (concurrency 1 through the server, and engines.generate.generate called directly with
no server at all).

The server runs as a subprocess (`python -m engines.serve_cli serve SOURCE ...`, on 127.0.0.1 and
a free port); the client is one asyncio loop with httpx streaming the SSE responses, so every
token's arrival time is measured at the client. Workload: `--requests` greedy requests with
token-id prompts of mixed lengths (`--prompt-lens`, cycled; deterministic ids) and a fixed
`--max-tokens` each (ignore_eos, so every request generates exactly that many tokens). At
concurrency c, c clients each send their next request as soon as the previous one ends (a closed
loop), until all are done.

    OMP_NUM_THREADS=1 python scripts/bench_serve.py out/tiny-stdlib --backend onnxruntime \\
        --json docs/bench_serve.json --plot docs/bench_serve.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(xs: list[float]) -> dict:
    ms = [x * 1000.0 for x in xs]
    return {"p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90), "p99_ms": percentile(ms, 99),
            "mean_ms": statistics.fmean(ms) if ms else None, "n": len(ms)}


def make_prompts(n: int, lens: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(lens[i % len(lens)])] for i in range(n)]


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "loadavg": list(os.getloadavg()), "python": platform.python_version(),
            "platform": platform.platform()}


# ============================================================================ the client
async def one_request(client, url: str, prompt: list[int], max_tokens: int) -> dict:
    t0 = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", url + "/v1/completions",
                             json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                                   "ignore_eos": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            body = json.loads(line[6:])
            if "error" in body:
                raise RuntimeError(body["error"]["message"])
            now = time.perf_counter()
            for ch in body.get("choices", []):
                stamps.extend([now] * len(ch.get("token_ids", [])))
    t1 = time.perf_counter()
    return {"ttft": stamps[0] - t0 if stamps else None, "itl": [b - a for a, b in zip(stamps, stamps[1:])],
            "e2e": t1 - t0, "tokens": len(stamps)}


async def run_level(url: str, prompts: list[list[int]], max_tokens: int, concurrency: int) -> dict:
    import httpx

    todo = list(enumerate(prompts))
    results: list[dict] = [None] * len(prompts)  # type: ignore[list-item]
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker():
            while todo:
                i, p = todo.pop(0)
                results[i] = await one_request(client, url, p, max_tokens)

        load0 = os.getloadavg()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        load1 = os.getloadavg()
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(prompts), "wall_s": wall, "output_tokens": tokens,
            "tokens_per_s": tokens / wall, "requests_per_s": len(prompts) / wall,
            "ttft": summarize([r["ttft"] for r in results if r["ttft"] is not None]),
            "itl": summarize([x for r in results for x in r["itl"]]),
            "e2e": summarize([r["e2e"] for r in results]), "loadavg_before": list(load0), "loadavg_after": list(load1)}


# ============================================================================ the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "engines.serve_cli", "serve", args.source, "--backend", args.backend, "--port",
           str(port), "--max-batch", str(args.max_batch), "--max-queue", str(max(64, max(args.concurrency))),
           "--prefill-chunk", str(args.prefill_chunk), "--threads", str(args.threads), "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    import httpx

    end = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > end:
            proc.kill()
            raise SystemExit("the server did not start within 300 s")
        time.sleep(0.5)


def direct_sequential(args, prompts: list[list[int]]) -> dict:
    """The same requests one at a time through engines.generate.generate, no server."""
    import torch

    from engines.generate import generate
    from engines.server import build_state

    torch.set_num_threads(args.threads)
    backend = build_state(args.source, args.backend, threads=args.threads).engine.backend
    generate(backend, [prompts[0][:8]], max_new_tokens=2, stop_tokens=())  # warm-up
    ttft, itl, e2e, tokens = [], [], [], 0
    t0 = time.perf_counter()
    for p in prompts:
        stamps = []
        s0 = time.perf_counter()
        generate(backend, [p], max_new_tokens=args.max_tokens, stop_tokens=(),
                 prefill_chunk=args.prefill_chunk, on_token=lambda r, t: stamps.append(time.perf_counter()))
        e2e.append(time.perf_counter() - s0)
        ttft.append(stamps[0] - s0)
        itl += [b - a for a, b in zip(stamps, stamps[1:])]
        tokens += len(stamps)
    wall = time.perf_counter() - t0
    return {"concurrency": 1, "requests": len(prompts), "wall_s": wall, "output_tokens": tokens,
            "tokens_per_s": tokens / wall, "requests_per_s": len(prompts) / wall, "ttft": summarize(ttft),
            "itl": summarize(itl), "e2e": summarize(e2e)}


def markdown(result: dict) -> str:
    """The results as a Markdown table (docs/serving.md)."""
    def f(x):
        return "" if x is None else f"{x:.0f}" if x >= 100 else f"{x:.1f}"

    rows = ["| served | concurrency | output tokens/s | vs one at a time | TTFT p50 / p90 / p99 ms | "
            "inter-token p50 / p90 / p99 ms | request p50 / p90 s | load avg (1 min) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    levels = [("hatrt serve", x) for x in result["server"]]
    if "direct_sequential" in result:
        levels.append(("generate(), no server", result["direct_sequential"]))
    base = result["server"][0]["tokens_per_s"]
    for name, x in levels:
        load = x.get("loadavg_after", result["machine"].get("loadavg_end", [None]))[0]
        rows.append(f"| {name} | {x['concurrency']} | {x['tokens_per_s']:.1f} | {x['tokens_per_s'] / base:.2f}x | "
                    f"{f(x['ttft']['p50_ms'])} / {f(x['ttft']['p90_ms'])} / {f(x['ttft']['p99_ms'])} | "
                    f"{f(x['itl']['p50_ms'])} / {f(x['itl']['p90_ms'])} / {f(x['itl']['p99_ms'])} | "
                    f"{x['e2e']['p50_ms'] / 1000:.2f} / {x['e2e']['p90_ms'] / 1000:.2f} | "
                    f"{'' if load is None else f'{load:.1f}'} |")
    return "\n".join(rows)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["server"]
    cs = [x["concurrency"] for x in levels]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(cs, [x["tokens_per_s"] for x in levels], "o-", label="hatrt serve (continuous batching)")
    seq = result["server"][0]["tokens_per_s"] if cs[0] == 1 else None
    if seq is not None:
        a.axhline(seq, color="gray", ls="--", label="one at a time (server, concurrency 1)")
    a.axhline(result["direct_sequential"]["tokens_per_s"], color="k", ls=":",
              label="one at a time (generate(), no server)")
    a.set_xscale("log", base=2)
    a.set_xticks(cs, [str(c) for c in cs])
    a.set_xlabel("concurrent clients")
    a.set_ylabel("output tokens / s")
    a.set_title("Throughput")
    a.legend(fontsize=8)
    for key, style in (("ttft", "o-"), ("itl", "s-")):
        for q, ls in (("p50_ms", "-"), ("p90_ms", "--")):
            b.plot(cs, [x[key][q] for x in levels], style[0] + ls,
                   label=f"{'time to first token' if key == 'ttft' else 'inter-token'} {q[:3]}")
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xticks(cs, [str(c) for c in cs])
    b.set_xlabel("concurrent clients")
    b.set_ylabel("ms")
    b.set_title("Latency")
    b.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"hatrt serve, {result['source_name']} on {result['backend']}: {result['requests']} requests x "
                 f"{result['max_tokens']} tokens; {m['cores']} cores, load {m['loadavg'][0]:.1f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="export directory (onnxruntime), checkpoint or preset (torch)")
    ap.add_argument("--backend", default="onnxruntime", choices=["torch", "onnxruntime"])
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--prompt-lens", type=lambda s: [int(x) for x in s.split(",")], default=[32, 128, 64, 256])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--no-direct", action="store_true", help="skip the no-server sequential baseline")
    args = ap.parse_args()

    from engines.backends import load_backend

    cfg = (load_backend(args.source, "torch") if args.backend == "torch" else None)
    vocab = cfg.config.vocab_size if cfg is not None else json.loads(
        (Path(args.source) / "manifest.json").read_text())["config"]["vocab_size"]
    del cfg
    prompts = make_prompts(args.requests, args.prompt_lens, vocab)
    argv = shlex.join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    result = {"command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python {argv}",
              "source": args.source, "source_name": Path(args.source).name, "backend": args.backend,
              "requests": args.requests, "prompt_lens": args.prompt_lens, "max_tokens": args.max_tokens,
              "max_batch": args.max_batch, "prefill_chunk": args.prefill_chunk, "threads": args.threads,
              "machine": machine(), "server": []}
    port = free_port()
    proc = start_server(args, port)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(run_level(url, prompts[:2], 2, 1))  # warm-up
        for c in args.concurrency:
            level = asyncio.run(run_level(url, prompts, args.max_tokens, c))
            result["server"].append(level)
            print(f"concurrency {c:3d}: {level['tokens_per_s']:8.1f} tok/s  TTFT p50 {level['ttft']['p50_ms']:8.1f} ms"
                  f" p90 {level['ttft']['p90_ms']:8.1f}  ITL p50 {level['itl']['p50_ms']:7.1f} ms p90 "
                  f"{level['itl']['p90_ms']:7.1f}  wall {level['wall_s']:.1f} s  load {os.getloadavg()[0]:.1f}",
                  flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    if not args.no_direct:
        d = result["direct_sequential"] = direct_sequential(args, prompts)
        print(f"direct, one at a time: {d['tokens_per_s']:8.1f} tok/s  TTFT p50 {d['ttft']['p50_ms']:8.1f} ms  "
              f"ITL p50 {d['itl']['p50_ms']:7.1f} ms", flush=True)
    base = result["server"][0]["tokens_per_s"]
    for level in result["server"]:
        level["speedup_vs_one_at_a_time"] = level["tokens_per_s"] / base
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot and "direct_sequential" in result:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
