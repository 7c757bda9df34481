#!/usr/bin/env python3
"""Prefill benchmark: chunked prefill throughput vs prompt length, and the memory of a long prompt.

Two measurements, one thread each (the machine is shared; see docs/benchmarks.md):

1. **Throughput.** tiny-flash (window, window, CSA, HCA) with max_position_embeddings raised to
   128K, exported once (exporter.export.export_model(Transformer(cfg).init_random(0), dir)). A
   random prompt of L tokens (default 8K, 32K, 128K) is fed through `backend.prefill(ids,
   chunk_size=C)` (C default 512) under ONNX Runtime on the CPU and, for the lengths in
   `--eager-lengths` (default 8K), torch eager. Reported: tokens/s = L / wall time of the whole
   prefill (CPU time next to it), the time of every chunk (to see how a chunk's cost grows with
   its position), and the ratio of the largest to the smallest ONNX Runtime tokens/s (target
   <= 1.5x).

2. **Peak memory of a long prompt.** In a fresh subprocess (nothing else allocated before), a
   32K-token prompt goes through ONNX Runtime (`engines.generate.generate`: chunked prefill, then
   greedy decoding of a few tokens) on tiny-flash with max_position_embeddings 65536. The
   subprocess reports its peak RSS (VmHWM in /proc/self/status; the parent cross-checks with
   getrusage(RUSAGE_CHILDREN).ru_maxrss); target < 2.5 GB. Its greedy tokens must equal those of
   the torch reference fed the same prompt in chunks (TorchBackend via the same `generate`, which
   also runs in its own subprocess so its peak RSS is recorded too).

    python scripts/bench_prefill.py                       # full run: writes docs/bench_prefill.{json,png}
    python scripts/bench_prefill.py --quick               # smoke test: small sizes, outputs in the temp dir
    python scripts/bench_prefill.py --export-dir /tmp/a --rss-export-dir /tmp/b   # reuse exports
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (ROOT, HERE):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bench_decode as bd  # noqa: E402  (machine info, load, export reuse, session options)
from engines.backends import OnnxRuntimeBackend, TorchBackend  # noqa: E402
from exporter.model import Transformer  # noqa: E402

SEED = 0
MAX_POSITIONS = 131072
RSS_MAX_POSITIONS = 65536
TARGET_THROUGHPUT_SPREAD = 1.5  # max / min ONNX Runtime tokens/s over the lengths
TARGET_RSS_BYTES = 2.5e9  # peak RSS of the 32K-token prompt through ONNX Runtime
ORT, EAGER = "onnxruntime", "eager"

log = bd.log


def prompt(length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def read_vm_hwm() -> int:
    """Peak resident set of this process in bytes (VmHWM), or ru_maxrss when /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def read_vm_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ONNX Runtime memory configurations compared here (none changes engines/: options and run options only)
ARENA, NO_ARENA, ARENA_SHRINK = "arena", "no-arena", "arena-shrink"
ORT_MEMORY = {
    ARENA: "the CPU memory arena on (ORT's default, what OnnxRuntimeBackend gets without session_options)",
    NO_ARENA: "SessionOptions.enable_cpu_mem_arena = False (every intermediate malloc'ed and freed)",
    ARENA_SHRINK: "the arena on, and RunOptions 'memory.enable_memory_arena_shrinkage' = 'cpu:0' on every run "
                  "(the arena gives back what it grew by at the end of each step)",
}


def ort_backend(export_dir, threads: int, memory: str = ARENA) -> OnnxRuntimeBackend:
    backend = OnnxRuntimeBackend(export_dir, providers=["CPUExecutionProvider"],
                                 session_options=bd.ort_session_options(threads, cpu_arena=memory != NO_ARENA))
    if memory == ARENA_SHRINK:  # OnnxRuntimeBackend has no run options: wrap the session's call
        import functools

        import onnxruntime as ort

        ro = ort.RunOptions()
        ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        backend.session.run_with_iobinding = functools.partial(backend.session.run_with_iobinding, run_options=ro)
    return backend


# ------------------------------------------------------------------------------------ throughput
def time_prefill(backend, ids: torch.Tensor, chunk: int) -> dict:
    """One chunked prefill, timed: total wall/CPU and each chunk's wall time."""
    marks = []
    t_last = [time.perf_counter(), time.process_time()]

    def progress(done, total):
        now, cpu = time.perf_counter(), time.process_time()
        marks.append((done, now - t_last[0], cpu - t_last[1]))
        t_last[0], t_last[1] = now, cpu

    load0 = bd.loadavg()
    c0, t0 = time.process_time(), time.perf_counter()
    t_last[0], t_last[1] = t0, c0
    logits, cache = backend.prefill(ids, chunk_size=chunk, progress=progress)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = ids.shape[1]
    return {"tokens": n, "chunk": chunk, "wall_s": wall, "cpu_s": cpu, "tokens_per_s": n / wall,
            "tokens_per_cpu_s": n / max(cpu, 1e-9), "loadavg_before": load0, "loadavg_after": bd.loadavg(),
            "chunk_end": [d for d, _, _ in marks], "chunk_wall_ms": [round(w * 1e3, 3) for _, w, _ in marks],
            "chunk_cpu_ms": [round(c * 1e3, 3) for _, _, c in marks],
            "cache_bytes": cache.nbytes(), "last_logits_finite": bool(torch.isfinite(logits).all())}


def throughput(args, tmp: Path) -> dict:
    cfg = bd.hybrid_config(args.max_positions)
    model = Transformer(cfg).init_random(SEED).eval()
    export_path = bd.get_export(model, args.export_dir, tmp / "export")
    ort_b = ort_backend(export_path, args.threads, args.ort_memory)
    eager_backend = TorchBackend(model)
    warm = prompt(min(2 * args.chunk, 1024), cfg.vocab_size, 99)  # untimed: first-run allocations
    ort_b.prefill(warm, chunk_size=args.chunk)
    eager_backend.prefill(warm, chunk_size=args.chunk)
    runs = []
    for n in sorted(args.lengths):
        ids = prompt(n, cfg.vocab_size, SEED + n)
        for name, backend in ((ORT, ort_b), (EAGER, eager_backend)):
            if name == EAGER and n not in args.eager_lengths:
                continue
            r = time_prefill(backend, ids, args.chunk)
            r["backend"] = name
            runs.append(r)
            log(f"prefill {n:>7} tokens, {name:<11}: {r['tokens_per_s']:8.1f} tokens/s wall "
                f"({r['tokens_per_cpu_s']:8.1f} per CPU s; {r['wall_s']:.1f} s; chunks first/last "
                f"{r['chunk_wall_ms'][0]:.0f}/{r['chunk_wall_ms'][-1]:.0f} ms; load {r['loadavg_after'][:1]})")
    ort_tps = {r["tokens"]: r["tokens_per_s"] for r in runs if r["backend"] == ORT}
    ort_cpu = {r["tokens"]: r["tokens_per_cpu_s"] for r in runs if r["backend"] == ORT}
    spread = max(ort_tps.values()) / min(ort_tps.values())
    spread_cpu = max(ort_cpu.values()) / min(ort_cpu.values())
    eager = {r["tokens"]: r["tokens_per_s"] for r in runs if r["backend"] == EAGER}
    return {
        "model": {"preset": bd.PRESET, "changes": {"max_position_embeddings": cfg.max_position_embeddings},
                  "params": bd.param_count(model), "config": cfg.to_hf_dict()},
        "export_dir": str(export_path) if args.export_dir else "(temporary, removed)",
        "runs": runs,
        "ort_tokens_per_s": {str(k): v for k, v in ort_tps.items()},
        "eager_tokens_per_s": {str(k): v for k, v in eager.items()},
        "ort_over_eager_speed": {str(k): ort_tps[k] / v for k, v in eager.items()},
        "ort_memory": args.ort_memory,
        "ort_spread_max_over_min": {"wall": spread, "cpu": spread_cpu},
        "target_met": spread <= TARGET_THROUGHPUT_SPREAD,
    }


# ------------------------------------------------------------------------------------ peak RSS
def rss_child(args) -> int:
    """Run in a fresh process: generate on one backend, print one JSON line."""
    bd.set_threads(args.threads)
    rss0 = read_vm_rss()
    from engines.generate import generate

    cfg = bd.hybrid_config(args.max_positions)
    if args.child == ORT:
        backend = ort_backend(args.export_dir, args.threads, args.ort_memory)
    else:
        backend = TorchBackend(Transformer(cfg).init_random(SEED).eval())
    ids = prompt(args.rss_tokens, cfg.vocab_size, SEED + 1)
    rss_loaded, hwm_loaded = read_vm_rss(), read_vm_hwm()
    c0, t0 = time.process_time(), time.perf_counter()
    out = generate(backend, [ids[0].tolist()], max_new_tokens=args.new_tokens, stop_tokens=(),
                   prefill_chunk=args.chunk)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"backend": args.child, "prompt_tokens": args.rss_tokens, "chunk": args.chunk,
                      "ort_memory": args.ort_memory if args.child == ORT else None,
                      "new_tokens": out[0].tokens, "wall_s": wall, "cpu_s": cpu,
                      "rss_after_imports_bytes": rss0, "rss_loaded_bytes": rss_loaded,
                      "hwm_loaded_bytes": hwm_loaded, "peak_rss_bytes": read_vm_hwm(),
                      "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    return 0


def run_child(args, backend: str, export_dir: Path, memory: str = ARENA, chunk: int | None = None) -> dict:
    chunk = args.chunk if chunk is None else chunk
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", backend, "--export-dir", str(export_dir),
           "--max-positions", str(args.rss_max_positions), "--rss-tokens", str(args.rss_tokens),
           "--chunk", str(chunk), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    cmd += ["--ort-memory", memory]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = bd.loadavg()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    # RUSAGE_CHILDREN's ru_maxrss is the largest of all waited-for children so far: exact for this
    # child only when it is the largest yet (it is recorded as a cross-check, not the measure).
    r["parent_ru_maxrss_children_bytes"] = after.ru_maxrss * 1024
    r["child_cpu_s_rusage"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    r["loadavg_before"], r["loadavg_after"] = load0, bd.loadavg()
    arena = f" ({memory})" if backend == ORT else ""
    log(f"{backend:<11}{arena} {args.rss_tokens}-token prompt + {args.new_tokens} tokens in chunks of {chunk}: "
        f"peak RSS {r['peak_rss_bytes'] / 1e9:.3f} GB (after loading {r['rss_loaded_bytes'] / 1e9:.3f} GB), "
        f"{r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU; tokens {r['new_tokens']}")
    return r


def peak_rss(args, tmp: Path) -> dict:
    cfg = bd.hybrid_config(args.rss_max_positions)
    model = Transformer(cfg).init_random(SEED).eval()
    export_path = bd.get_export(model, args.rss_export_dir, tmp / "export_rss")
    del model
    ort_runs = {f"{m}, chunk {c}": run_child(args, ORT, export_path, memory=m, chunk=c)
                for c in args.rss_chunks for m in args.rss_ort_memory}
    ref_r = run_child(args, EAGER, export_path, chunk=args.rss_chunks[0]) if args.rss_reference else None
    out = {"model": {"preset": bd.PRESET, "changes": {"max_position_embeddings": cfg.max_position_embeddings}},
           "export_dir": str(export_path) if args.rss_export_dir else "(temporary, removed)",
           "onnxruntime": ort_runs, "reference_eager": ref_r, "target_bytes": TARGET_RSS_BYTES,
           "greedy_tokens_equal": {}, "target_met": {}}
    for k, r in ort_runs.items():
        same = ref_r is not None and r["new_tokens"] == ref_r["new_tokens"]
        out["greedy_tokens_equal"][k] = same
        out["target_met"][k] = r["peak_rss_bytes"] < TARGET_RSS_BYTES and same
    return out


# ------------------------------------------------------------------------------------ output
def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tp = res["throughput"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11.5, 4.3))
    style = {ORT: ("tab:orange", "s"), EAGER: ("tab:blue", "o")}
    labels = {ORT: "ONNX Runtime", EAGER: "torch eager"}
    for name in (ORT, EAGER):
        rows = sorted((r for r in tp["runs"] if r["backend"] == name), key=lambda r: r["tokens"])
        if not rows:
            continue
        color, marker = style[name]
        x = [r["tokens"] for r in rows]
        ax1.plot(x, [r["tokens_per_s"] for r in rows], color=color, marker=marker, label=f"{labels[name]}, wall")
        ax1.plot(x, [r["tokens_per_cpu_s"] for r in rows], color=color, marker=marker, linestyle=":", alpha=0.6,
                 label=f"{labels[name]}, per CPU second")
        for r in rows:  # per-chunk throughput along the prompt, a running median over 9 chunks
            key = "chunk_cpu_ms" if "chunk_cpu_ms" in r else "chunk_wall_ms"
            ends = r["chunk_end"]
            starts = [0] + ends[:-1]
            tps = [(e - s) / max(ms / 1e3, 1e-9) for s, e, ms in zip(starts, ends, r[key])]
            smooth = [float(np.median(tps[max(0, i - 4):i + 5])) for i in range(len(tps))]
            last = r is rows[-1]
            ax2.plot(ends, smooth, color=color, linewidth=1.0 if last else 0.6, alpha=0.9 if last else 0.35,
                     label=f"{labels[name]}, {bd.ctx_label(r['tokens'])}-token prompt "
                           f"({'CPU' if key == 'chunk_cpu_ms' else 'wall'})" if last else None)
    lens = sorted({r["tokens"] for r in tp["runs"]})
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(lens)
    ax1.set_xticklabels([bd.ctx_label(n) for n in lens])
    ax1.set_ylim(bottom=0)
    ax1.set_xlabel("prompt tokens")
    ax1.set_ylabel("prefill tokens / s")
    spread = tp["ort_spread_max_over_min"]
    ax1.set_title(f"whole prompt, chunks of {res['settings']['chunk']}; ORT max/min {spread['wall']:.2f}x "
                  f"(target <= {TARGET_THROUGHPUT_SPREAD:g}x)", fontsize=9)
    ax1.grid(True, alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("position of the chunk's end (tokens)")
    ax2.set_ylabel("tokens / s within a chunk (running median of 9)")
    ax2.set_ylim(bottom=0)
    ax2.set_title("per chunk along the prompt", fontsize=9)
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7)
    bd.save_figure(fig, path, f"{bd.PRESET} chunked prefill, 1 thread", res)


def markdown(res: dict) -> str:
    lines = []
    tp = res.get("throughput")
    if tp:
        lens = sorted({r["tokens"] for r in tp["runs"]})
        lines += ["| backend | " + " | ".join(bd.ctx_label(n) for n in lens) + " |",
                  "| --- |" + " ---: |" * len(lens)]
        for name in (ORT, EAGER):
            by = {r["tokens"]: r for r in tp["runs"] if r["backend"] == name}
            cells = [f"{by[n]['tokens_per_s']:.0f} ({by[n]['tokens_per_cpu_s']:.0f}; {by[n]['wall_s']:.1f} s)"
                     if n in by else "-" for n in lens]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        s = tp["ort_spread_max_over_min"]
        lines += ["", f"ONNX Runtime tokens/s max/min: {s['wall']:.2f}x wall, {s['cpu']:.2f}x CPU "
                      f"(target <= {TARGET_THROUGHPUT_SPREAD:g}x: {'met' if tp['target_met'] else 'NOT met'})", ""]
    rs = res.get("peak_rss")
    if rs:
        e = rs["reference_eager"]
        for k, o in rs["onnxruntime"].items():
            lines.append(f"Peak RSS, {o['prompt_tokens']}-token prompt + {len(o['new_tokens'])} greedy tokens, chunks "
                         f"of {o['chunk']}, ONNX Runtime, memory {o.get('ort_memory')}: "
                         f"{o['peak_rss_bytes'] / 1e9:.3f} GB (after loading {o['rss_loaded_bytes'] / 1e9:.3f} GB; "
                         f"{o['cpu_s']:.1f} s CPU); greedy tokens equal the reference's: "
                         f"{rs['greedy_tokens_equal'][k]} "
                         f"(target < {TARGET_RSS_BYTES / 1e9:g} GB and equal: "
                         f"{'met' if rs['target_met'][k] else 'NOT met'})")
        if e:
            lines.append(f"Reference (torch eager, chunks of {e['chunk']}): peak RSS "
                         f"{e['peak_rss_bytes'] / 1e9:.3f} GB, {e['cpu_s']:.1f} s CPU, tokens {e['new_tokens']}")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=bd.int_list, default=[8192, 32768, 131072],
                    help="comma-separated prompt lengths (default 8192,32768,131072)")
    ap.add_argument("--eager-lengths", type=bd.int_list, default=[8192],
                    help="lengths also run under torch eager (default 8192)")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk size in tokens (default 512)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads = ONNX Runtime intra_op_num_threads (default 1)")
    ap.add_argument("--max-positions", type=int, default=MAX_POSITIONS,
                    help=f"max_position_embeddings of the throughput model (default {MAX_POSITIONS})")
    ap.add_argument("--rss-tokens", type=int, default=32768, help="prompt length of the RSS run (default 32768)")
    ap.add_argument("--rss-max-positions", type=int, default=RSS_MAX_POSITIONS,
                    help=f"max_position_embeddings of the RSS model (default {RSS_MAX_POSITIONS})")
    ap.add_argument("--new-tokens", type=int, default=8, help="greedy tokens generated after the RSS prompt (8)")
    ap.add_argument("--ort-memory", choices=tuple(ORT_MEMORY), default=ARENA,
                    help="ONNX Runtime memory configuration of the throughput part: " + "; ".join(
                        f"{k}: {v}" for k, v in ORT_MEMORY.items()) + " (default arena)")
    ap.add_argument("--rss-ort-memory", type=lambda s: s.split(","), default=[ARENA, NO_ARENA],
                    help="comma-separated ONNX Runtime memory configurations of the RSS run (default arena,no-arena)")
    ap.add_argument("--rss-chunks", type=bd.int_list, default=[512, 256],
                    help="chunk sizes of the RSS run (default 512,256; the reference runs with the first)")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="only combine result files of this script (e.g. a --skip-rss and a --skip-throughput run) "
                         "into --out-json / --out-png")
    ap.add_argument("--no-rss-reference", dest="rss_reference", action="store_false",
                    help="skip the torch reference run of the RSS prompt (no greedy-token comparison)")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--export-dir", help="export of the throughput model: reused, or made there")
    ap.add_argument("--rss-export-dir", help="export of the RSS model: reused, or made there")
    ap.add_argument("--out-json", default=str(ROOT / "docs" / "bench_prefill.json"))
    ap.add_argument("--out-png", default=str(ROOT / "docs" / "bench_prefill.png"))
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: tiny-flash as preset (max_position_embeddings 4096) for both parts, "
                         "lengths 512/1024/2048 in chunks of 256, a 2048-token RSS prompt; outputs in the temp dir")
    ap.add_argument("--child", choices=(ORT, EAGER), help=argparse.SUPPRESS)  # internal: the RSS subprocess
    args = ap.parse_args(argv)
    if args.child:
        return args
    if args.quick:
        n = bd.preset(bd.PRESET).max_position_embeddings
        args.lengths, args.eager_lengths, args.chunk = [512, 1024, 2048], [512, 1024, 2048], 256
        args.max_positions = args.rss_max_positions = n
        args.rss_tokens, args.new_tokens, args.rss_ort_memory, args.rss_chunks = 2048, 4, [ARENA], [256]
        if args.rss_export_dir is None:
            args.rss_export_dir = args.export_dir  # the same model: one export
        tmpdir = Path(tempfile.gettempdir())
        if args.out_json == ap.get_default("out_json"):
            args.out_json = str(tmpdir / "bench_prefill.quick.json")
        if args.out_png == ap.get_default("out_png"):
            args.out_png = str(tmpdir / "bench_prefill.quick.png")
    bad = [m for m in args.rss_ort_memory if m not in ORT_MEMORY]
    if bad:
        ap.error(f"--rss-ort-memory: unknown {bad}; choose from {', '.join(ORT_MEMORY)}")
    if args.chunk < 1 or args.threads < 1 or args.new_tokens < 1:
        ap.error("--chunk, --threads and --new-tokens must be >= 1")
    if max(args.lengths) > args.max_positions:
        ap.error(f"--lengths: {max(args.lengths)} exceeds --max-positions {args.max_positions}")
    if args.rss_tokens + args.new_tokens > args.rss_max_positions:
        ap.error(f"--rss-tokens + --new-tokens exceed --rss-max-positions {args.rss_max_positions}")
    return args


def merge(paths: list[str]) -> dict:
    """One result from several runs: metadata of the first, each part from the run that has it."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    res = {k: v for k, v in parts[0].items() if k not in ("throughput", "peak_rss", "markdown")}
    res["command"] = [p["command"] for p in parts]
    res["settings"] = {"runs": [p["settings"] for p in parts]}
    for p in parts:
        for key in ("throughput", "peak_rss"):
            if key in p:
                if key in res:
                    raise SystemExit(f"--merge: more than one file has a {key!r} part")
                res[key] = p[key]
                res["settings"][key] = p["settings"]
    if "throughput" in res:
        res["settings"]["chunk"] = res["settings"]["throughput"]["chunk"]
    res["load"] = {"loadavg_start": min((p["load"]["loadavg_start"] for p in parts), key=lambda x: x[:1]),
                   "loadavg_end": parts[-1]["load"]["loadavg_end"], "runs": [p["load"] for p in parts]}
    res["elapsed_s"] = sum(p.get("elapsed_s", 0) for p in parts)
    res["markdown"] = markdown(res)
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return rss_child(args)
    if args.merge:
        res = merge(args.merge)
        Path(args.out_json).write_text(json.dumps(res, indent=2) + "\n")
        if "throughput" in res:
            plot(res, Path(args.out_png))
        print(res["markdown"])
        log(f"wrote {args.out_json}{' and ' + args.out_png if 'throughput' in res else ''}")
        return 0
    bd.set_threads(args.threads)
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    load_start, uptime_start = bd.loadavg(), bd.uptime_line()
    log(f"machine load at start: {uptime_start}")
    res = {"benchmark": "chunked prefill throughput and peak RSS (scripts/bench_prefill.py)",
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(["python", *sys.argv]), "machine": bd.machine_info(),
           "threads": {"torch_intra_op": args.threads, "torch_interop": 1, "ort_intra_op": args.threads,
                       "ort_inter_op": 1},
           "settings": {"lengths": sorted(args.lengths), "eager_lengths": sorted(args.eager_lengths),
                        "chunk": args.chunk, "rss_chunks": args.rss_chunks, "rss_ort_memory": args.rss_ort_memory,
                        "rss_tokens": args.rss_tokens, "new_tokens": args.new_tokens,
                        "ort_memory": args.ort_memory, "ort_memory_configs": ORT_MEMORY, "seed": SEED},
           "targets": {"ort_tokens_per_s_max_over_min": TARGET_THROUGHPUT_SPREAD, "peak_rss_bytes": TARGET_RSS_BYTES}}
    with tempfile.TemporaryDirectory(prefix="bench_prefill.") as tmp:
        if not args.skip_rss:  # first: the exports and children run before this process grows
            res["peak_rss"] = peak_rss(args, Path(tmp))
        if not args.skip_throughput:
            res["throughput"] = throughput(args, Path(tmp))
    load_end, uptime_end = bd.loadavg(), bd.uptime_line()
    log(f"machine load at end: {uptime_end}")
    res["load"] = {"uptime_start": uptime_start, "uptime_end": uptime_end, "loadavg_start": load_start,
                   "loadavg_end": load_end, "process_cpu_s": round(time.process_time() - cpu0, 1),
                   "peak_rss_mib": round(bd.peak_rss_mib())}
    res["elapsed_s"] = round(time.perf_counter() - t0, 1)
    res["markdown"] = markdown(res)
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(res, indent=2) + "\n")
    if "throughput" in res:
        plot(res, Path(args.out_png))
    print()
    print(res["markdown"])
    log(f"wrote {args.out_json}{' and ' + args.out_png if 'throughput' in res else ''} ({res['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
