#!/usr/bin/env python3
"""Decode-step benchmark: ONNX Runtime vs torch eager, hybrid vs dense attention, vs context.

One run measures, side by side:

* the hybrid model (tiny-flash: window, window, CSA, HCA; max_position_embeddings raised to 128K)
  under torch eager (engines.backends.TorchBackend) and under ONNX Runtime on the CPU
  (engines.backends.OnnxRuntimeBackend: step.onnx with IO binding, the cache updated in place by
  ping-pong buffers) on an export made once by exporter.export.export_model;
* a dense-attention model of the same widths: every layer window-only with a window ring of
  N + 1 slots, i.e. full causal attention over all N cached tokens plus the new one (torch eager
  only: an export per N is not worth it);

at contexts N (default 4K, 16K, 64K), one `backend.decode(ids [B, 1], cache)` per timed call, batch
1 and 4.

The cache at context N is synthesized, not prefilled (see bench_prefill.py for long prefills): a
KVCache whose window ring holds positions N-w..N-1 in slot pos % w, whose CSA/HCA entry buffers
hold the N // ratio complete entries (unit-scale random values; entries are RMS-normalized) with a
capacity of exactly what the phase's last step needs (exporter.contract.entries_needed: no
reallocation inside the timed loop), random finite compressor tail states, and pos = N. Eager and
ONNX Runtime each get their own copy of the same tensors.

`decode` updates the cache in place, so within a phase the positions advance by one per step: the
context grows from N to N + steps (at most ~1.6% at 4K, 0.1% at 64K), and the steps see CSA/HCA
blocks complete as a real decode does. Within a phase (one N, one batch) the eager and ORT steps
alternate (order flipped every step) so both see the same machine load; the sweep over N runs
`--passes` times in alternating order (4K..64K, then 64K..4K), each phase on a freshly synthesized
cache, and the steps are pooled. Wall time (perf_counter) and process CPU time (process_time) are
both recorded: on a loaded machine the CPU time is the steadier measure of the work done.

`--profile` runs ONNX Runtime's profiler (SessionOptions.enable_profiling) on a few steps at the
smallest and the largest N and records the kernel time per node and per op type, and what grows.

    python scripts/bench_decode.py                       # the full run (writes docs/bench_decode.*)
    python scripts/bench_decode.py --quick               # smoke test: small N, few steps, /tmp outputs
    python scripts/bench_decode.py --export-dir /tmp/x   # reuse (or create) the export there
    python scripts/bench_decode.py --profile-only --export-dir /tmp/x --batches 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engines import cache_ops  # noqa: E402
from engines.backends import OnnxRuntimeBackend, TorchBackend, read_manifest  # noqa: E402
from engines.cache_ops import KVCache  # noqa: E402
from exporter.cache import cache_layout  # noqa: E402
from exporter.config import WINDOW, ModelConfig  # noqa: E402
from exporter.contract import ENTRY_DIMS, entries_needed, manifest_config  # noqa: E402
from exporter.model import Transformer  # noqa: E402
from exporter.presets import preset  # noqa: E402

PRESET = "tiny-flash"
MAX_POSITIONS = 131072
SEED = 0
# The targets (one thread, one run): ORT's step at the largest N within these factors of
# its step at the smallest N, per batch; and ORT at most this fraction of eager at every point.
TARGET_ORT_GROWTH = {1: 1.3, 4: 2.0}
TARGET_ORT_OVER_EAGER = 0.5

HYBRID_EAGER, HYBRID_ORT, DENSE_EAGER = "hybrid/eager", "hybrid/onnxruntime", "dense/eager"
SERIES = (HYBRID_EAGER, HYBRID_ORT, DENSE_EAGER)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------ machine
def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def uptime_line() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    extra = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name" and cpu in ("unknown", "x86_64", ""):
                cpu = value
            if key in ("cpu family", "model", "cpu MHz") and key not in extra:
                extra[key] = value
    except OSError:
        pass
    info = {"cpu_model": cpu, **{f"cpuinfo_{k.replace(' ', '_')}": v for k, v in extra.items()},
            "logical_cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__}
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
    except ImportError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("L2 cache", "L3 cache", "Hypervisor vendor"):
                info[key.strip().lower().replace(" ", "_")] = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        info["mem_total_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return info


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (or parallel work started)
        pass


def ort_session_options(threads: int, profile_prefix: str | None = None, cpu_arena: bool = True):
    """One intra-op thread, sequential, all graph optimizations; cpu_arena False turns ONNX Runtime's
    CPU memory arena off (every intermediate malloc'ed and freed: no arena growth over steps of
    growing shapes)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = cpu_arena
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def peak_rss_mib() -> float:
    """This process's peak resident set (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------ models
def hybrid_config(max_positions: int = MAX_POSITIONS) -> ModelConfig:
    cfg = preset(PRESET)
    return cfg if cfg.max_position_embeddings == max_positions else cfg.replace(max_position_embeddings=max_positions)


def dense_config(hybrid: ModelConfig, context: int) -> ModelConfig:
    """Same widths, every layer window-only, ring of context + 1 slots: key j is attended when
    0 <= pos - pos_j < window, so at position N a window of N + 1 covers all N cached tokens and
    the new one, i.e. full causal attention."""
    return hybrid.replace(compress_ratios=(WINDOW,) * hybrid.num_layers, window=context + 1,
                          name=f"{PRESET}-dense")


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def get_export(model: Transformer, export_dir: str | None, tmp_root: Path) -> Path:
    """The export of `model` (fp32, quant_sim off): reused from export_dir when its manifest's
    config matches, else exported there (or into tmp_root when export_dir is None)."""
    from exporter.export import export_model

    if export_dir is not None:
        path = Path(export_dir)
        if (path / "manifest.json").is_file():
            manifest = read_manifest(path)
            got = manifest_config(manifest)
            if got != model.config or manifest.get("dtype") != "float32" or manifest.get("quant_sim"):
                raise SystemExit(f"{path}: this export is not of the benchmark model ({model.config.name}, "
                                 f"max_position_embeddings={model.config.max_position_embeddings}, dtype float32, "
                                 "quant_sim off); pass another --export-dir or remove it")
            log(f"reusing the export in {path}")
            return path
    else:
        path = tmp_root / "export"
    log(f"exporting {model.config.name} (max_position_embeddings={model.config.max_position_embeddings}) "
        f"to {path} (once; takes a few minutes)")
    t0 = time.perf_counter()
    export_model(model, path, overwrite=True, progress=lambda s: log("  export: " + s.splitlines()[0][:100]))
    log(f"export done in {time.perf_counter() - t0:.0f} s")
    return path


# ------------------------------------------------------------------------------------ caches
def synth_cache(config: ModelConfig, context: int, batch: int, seed: int, headroom: int = 1) -> KVCache:
    """A KVCache at position `context` (see the module docstring) whose entry buffers can take
    `headroom` more tokens without growing."""
    layout = cache_layout(config, torch.float32)
    g = torch.Generator().manual_seed(seed)
    capacity = entries_needed(config, context + headroom - 1)  # dim name -> entries
    out = []
    for spec in layout:
        shape = [batch if d == "batch" else capacity[d] if d in ENTRY_DIMS else d for d in spec.dims]
        name = spec.name
        if name == "pos":
            t = torch.full(shape, context, dtype=torch.long)
        else:
            layer = int(name.split(".")[0].removeprefix("layer"))
            ratio = config.compress_ratios[layer]
            kind = name.split(".", 1)[1]
            if kind == "window_kv":
                t = torch.randn(shape, generator=g)
            elif kind == "window_pos":
                w = shape[1]
                pos = torch.arange(max(0, context - w), context)
                ring = torch.full((w,), -1, dtype=torch.long)
                ring[pos % w] = pos
                t = ring.expand(batch, w).clone()
            elif kind in ("entries", "index_keys"):
                t = torch.zeros(shape)
                done = context // ratio
                t[:, :done] = torch.randn(batch, done, shape[2], generator=g)
            elif kind.endswith(".kv") or kind.endswith(".score"):  # compressor tail states
                t = torch.randn(shape, generator=g)
            else:
                raise AssertionError(f"unknown cache tensor {name}")
        out.append(t.to(cache_ops.torch_dtype(spec.dtype)).contiguous())
    return KVCache(layout, out, what=f"synthesized cache at {context}")


def copy_cache(cache: KVCache) -> KVCache:
    return KVCache(cache.layout, [t.clone() for t in cache.tensors], cache.positions.copy())


# ------------------------------------------------------------------------------------ stats
def summarize(values: list[float]) -> dict:
    a = np.asarray(values) * 1e3
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)),
            "mean_ms": float(a.mean()), "min_ms": float(a.min()), "n": int(a.size)}


def steps_for(context: int, steps_min: int, largest: int) -> int:
    """More steps at small N (cheaper steps): steps_min at the largest N, x sqrt(largest / N)."""
    return max(steps_min, round(steps_min * math.sqrt(largest / context)))


def timed(fn) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


# ------------------------------------------------------------------------------------ profiling
def profile_ort(export_path: Path, cfg: ModelConfig, contexts: list[int], batch: int, steps: int,
                threads: int, tmp: Path) -> dict:
    """ORT kernel time per node and per op type (ms per step) at each context, and the growth."""
    out = {"batch": batch, "steps": steps, "contexts": contexts, "per_context": {}}
    for n in contexts:
        so = ort_session_options(threads, profile_prefix=str(tmp / f"ort_profile_{n}_{batch}"))
        backend = OnnxRuntimeBackend(export_path, providers=["CPUExecutionProvider"], session_options=so)
        cache = synth_cache(cfg, n, batch, seed=7, headroom=steps + 3)
        ids = torch.randint(0, cfg.vocab_size, (batch, 1), generator=torch.Generator().manual_seed(1))
        for _ in range(2):  # warm-up steps are profiled too; skipped below by run count
            backend.decode(ids, cache)
        t0 = time.perf_counter()
        for _ in range(steps):
            backend.decode(ids, cache)
        wall = (time.perf_counter() - t0) / steps
        trace = json.loads(Path(backend.session.end_profiling()).read_text())
        runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
        if len(runs) < 2 + steps:
            raise RuntimeError(f"profile: expected {2 + steps} model_run events, got {len(runs)}")
        first = runs[2]["ts"]  # skip the warm-up runs
        # per node the MEDIAN over the profiled steps: on a shared machine a preempted kernel
        # shows up as a random node taking a whole time slice; the median drops those.
        durs: dict[str, tuple[str, list[float]]] = {}
        for e in trace:
            if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < first:
                continue
            node = e["name"].removesuffix("_kernel_time")
            durs.setdefault(node, (e.get("args", {}).get("op_name", "?"), []))[1].append(e["dur"] / 1e3)
        by_node = {k: (op, statistics.median(v + [0.0] * (steps - len(v)))) for k, (op, v) in durs.items()}
        by_op: dict[str, float] = {}
        for op, ms in by_node.values():
            by_op[op] = by_op.get(op, 0.0) + ms
        total = sum(ms for _, ms in by_node.values())
        model_run = statistics.median(r["dur"] for r in runs[2:]) / 1e3
        out["per_context"][str(n)] = {
            "wall_ms_per_step_profiled": wall * 1e3, "model_run_ms_median": model_run,
            "kernel_ms_per_step_sum_of_node_medians": total, "nodes": len(by_node),
            "by_op_type_ms": {k: v for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
            "top_nodes_ms": [{"node": k, "op": op, "ms": ms}
                             for k, (op, ms) in sorted(by_node.items(), key=lambda kv: -kv[1][1])[:40]],
            "_all_nodes": by_node,
        }
        log(f"profile N={n} batch {batch}: {total:.2f} ms kernel time per step (sum of node medians), "
            f"model_run {model_run:.2f} ms median, wall {wall * 1e3:.2f} ms mean (profiling on)")
        del backend
    lo, hi = str(contexts[0]), str(contexts[-1])
    a, b = out["per_context"][lo].pop("_all_nodes"), out["per_context"][hi].pop("_all_nodes")
    for n in contexts[1:-1]:
        out["per_context"][str(n)].pop("_all_nodes")
    growth = [{"node": k, "op": b[k][0], f"ms_{lo}": a.get(k, ("", 0.0))[1], f"ms_{hi}": b[k][1],
               "delta_ms": b[k][1] - a.get(k, ("", 0.0))[1]} for k in b]
    growth.sort(key=lambda r: -r["delta_ms"])
    out["growth_top_nodes"] = growth[:25]
    ops_lo, ops_hi = out["per_context"][lo]["by_op_type_ms"], out["per_context"][hi]["by_op_type_ms"]
    out["growth_by_op_type"] = sorted(
        ({"op": k, f"ms_{lo}": ops_lo.get(k, 0.0), f"ms_{hi}": v, "delta_ms": v - ops_lo.get(k, 0.0)}
         for k, v in ops_hi.items()), key=lambda r: -r["delta_ms"])[:15]
    return out


# ------------------------------------------------------------------------------------ main run
def run(args) -> dict:
    threads = args.threads
    set_threads(threads)

    contexts = sorted(args.contexts)
    load_start, uptime_start = loadavg(), uptime_line()
    cpu_start = time.process_time()
    log(f"machine load at start: {uptime_start}")

    cfg = hybrid_config(args.max_positions)
    hybrid = Transformer(cfg).init_random(SEED).eval()
    tmp = tempfile.TemporaryDirectory(prefix="bench_decode.")
    export_path = get_export(hybrid, args.export_dir, Path(tmp.name))

    res = {
        "benchmark": "decode step time vs context (scripts/bench_decode.py)",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "machine": machine_info(),
        "threads": {"torch_intra_op": threads, "torch_interop": 1, "ort_intra_op": threads, "ort_inter_op": 1},
        "models": {
            "hybrid": {"preset": PRESET, "changes": {"max_position_embeddings": cfg.max_position_embeddings},
                       "compress_ratios": list(cfg.compress_ratios), "window": cfg.window,
                       "params": param_count(hybrid), "config": cfg.to_hf_dict()},
        },
        "export_dir": str(export_path) if args.export_dir else "(temporary, removed)",
        "targets": {"ort_growth_max": {str(b): v for b, v in TARGET_ORT_GROWTH.items()},
                    "ort_over_eager_max": TARGET_ORT_OVER_EAGER},
        "_tmp": tmp,
    }

    if not args.profile_only:
        res.update(time_steps(args, cfg, hybrid, export_path, contexts))
    if args.profile or args.profile_only:
        prof_ctx = sorted({contexts[0], contexts[-1]})
        res["profile"] = {f"batch{b}": profile_ort(export_path, cfg, prof_ctx, b, args.profile_steps, threads,
                                                   Path(tmp.name)) for b in args.batches}

    load_end, uptime_end = loadavg(), uptime_line()
    log(f"machine load at end: {uptime_end}")
    res["load"] = {"uptime_start": uptime_start, "uptime_end": uptime_end, "loadavg_start": load_start,
                   "loadavg_end": load_end, "per_phase": res.pop("_phase_load", []),
                   "process_cpu_s": round(time.process_time() - cpu_start, 1), "peak_rss_mib": round(peak_rss_mib())}
    return res


def time_steps(args, cfg: ModelConfig, hybrid: Transformer, export_path: Path, contexts: list[int]) -> dict:
    threads = args.threads
    t0 = time.perf_counter()
    ort_backend = OnnxRuntimeBackend(export_path, providers=["CPUExecutionProvider"],
                                     session_options=ort_session_options(threads))
    log(f"ONNX Runtime session loaded in {time.perf_counter() - t0:.1f} s "
        f"(intra_op_num_threads={threads}, inter_op_num_threads=1, sequential, ORT_ENABLE_ALL)")
    eager_backend = TorchBackend(hybrid)
    dense_models = {}
    if args.dense:
        for n in contexts:  # same seed: identical weights at every N (window size holds no parameters)
            dense_models[n] = TorchBackend(Transformer(dense_config(cfg, n)).init_random(SEED).eval())
    series = SERIES if args.dense else (HYBRID_EAGER, HYBRID_ORT)

    largest = contexts[-1]
    plan = {n: steps_for(n, args.steps, largest) for n in contexts}
    samples = {(s, b, n): {"wall": [], "cpu": []} for s in series for b in args.batches for n in contexts}
    paired = {(b, n): [] for b in args.batches for n in contexts}  # ORT/eager per alternated step pair
    paired_cpu = {(b, n): [] for b in args.batches for n in contexts}
    cache_bytes, parity, phase_load = {}, {}, []
    log(f"threads: torch {torch.get_num_threads()} (interop 1), onnxruntime intra-op {threads}; "
        f"contexts {contexts}, batches {args.batches}, steps per N {plan} over {args.passes} pass(es), "
        f"warmup {args.warmup}, dense model {'on' if args.dense else 'off'}")

    for p in range(args.passes):
        order = contexts if p % 2 == 0 else contexts[::-1]
        for n in order:
            n_steps = math.ceil(plan[n] / args.passes)
            headroom = n_steps + args.warmup + 2
            for b in args.batches:
                ids = torch.randint(0, cfg.vocab_size, (b, 1), generator=torch.Generator().manual_seed(n + b))
                base = synth_cache(cfg, n, b, seed=n * 10 + b, headroom=headroom)
                ecache, ocache = copy_cache(base), copy_cache(base)
                del base
                cache_bytes[("hybrid", b, n)] = ocache.nbytes()
                phase_load.append({"pass": p, "context": n, "batch": b, "loadavg": loadavg()})

                # hybrid: eager and ORT alternate, each on its own copy of the same cache
                le = eager_backend.decode(ids, ecache)
                lo = ort_backend.decode(ids, ocache)
                if p == 0:
                    parity[(b, n)] = {"max_abs_logit_diff": float((le - lo).abs().max()),
                                      "max_abs_logit": float(le.abs().max()),
                                      "finite": bool(torch.isfinite(le).all() and torch.isfinite(lo).all())}
                for _ in range(args.warmup):
                    eager_backend.decode(ids, ecache)
                    ort_backend.decode(ids, ocache)
                t_phase = time.perf_counter()
                for i in range(n_steps):
                    runs = [(HYBRID_EAGER, lambda: eager_backend.decode(ids, ecache)),
                            (HYBRID_ORT, lambda: ort_backend.decode(ids, ocache))]
                    if i % 2:
                        runs.reverse()
                    got = {}
                    for s, fn in runs:
                        wall, cpu = timed(fn)
                        samples[(s, b, n)]["wall"].append(wall)
                        samples[(s, b, n)]["cpu"].append(cpu)
                        got[s] = (wall, cpu)
                    paired[(b, n)].append(got[HYBRID_ORT][0] / got[HYBRID_EAGER][0])
                    paired_cpu[(b, n)].append(got[HYBRID_ORT][1] / max(got[HYBRID_EAGER][1], 1e-9))
                assert int(ocache.positions[0]) == n + 1 + args.warmup + n_steps
                e = statistics.median(samples[(HYBRID_EAGER, b, n)]["wall"][-n_steps:]) * 1e3
                o = statistics.median(samples[(HYBRID_ORT, b, n)]["wall"][-n_steps:]) * 1e3
                log(f"pass {p + 1}/{args.passes} N={n:>6} batch {b}: hybrid eager {e:8.2f} ms, ORT {o:8.2f} ms "
                    f"(median of {n_steps}; {time.perf_counter() - t_phase:.1f} s; load {loadavg()[:1]})")
                ecache = ocache = None  # free before the dense phase

                if not args.dense:
                    continue
                # dense: its own phase (its 64K ring would evict the hybrid's working set if interleaved)
                dense = dense_models[n]
                dcache = synth_cache(dense.config, n, b, seed=n * 10 + b + 1, headroom=headroom)
                cache_bytes[("dense", b, n)] = dcache.nbytes()
                for _ in range(args.warmup + 1):
                    dense.decode(ids, dcache)
                t_phase = time.perf_counter()
                for _ in range(n_steps):
                    wall, cpu = timed(lambda: dense.decode(ids, dcache))
                    samples[(DENSE_EAGER, b, n)]["wall"].append(wall)
                    samples[(DENSE_EAGER, b, n)]["cpu"].append(cpu)
                dcache = None
                d = statistics.median(samples[(DENSE_EAGER, b, n)]["wall"][-n_steps:]) * 1e3
                log(f"pass {p + 1}/{args.passes} N={n:>6} batch {b}: dense eager  {d:8.2f} ms "
                    f"(median of {n_steps}; {time.perf_counter() - t_phase:.1f} s)")

    results = []
    for (s, b, n), v in samples.items():
        model = s.split("/")[0]
        results.append({"series": s, "model": model, "backend": s.split("/")[1], "batch": b,
                        "context": n, "wall": summarize(v["wall"]), "cpu": summarize(v["cpu"]),
                        "cache_bytes": cache_bytes[(model, b, n)]})

    def med(s, b, n, kind="wall"):
        return summarize(samples[(s, b, n)][kind])["median_ms"]

    lo_n, hi_n = contexts[0], contexts[-1]
    ratios = {}
    for b in args.batches:
        rb = ratios[f"batch{b}"] = {}
        rb["ort_over_eager"] = {
            str(n): {"wall_of_medians": med(HYBRID_ORT, b, n) / med(HYBRID_EAGER, b, n),
                     "cpu_of_medians": med(HYBRID_ORT, b, n, "cpu") / med(HYBRID_EAGER, b, n, "cpu"),
                     "paired_median_wall": float(np.median(paired[(b, n)])),
                     "paired_median_cpu": float(np.median(paired_cpu[(b, n)]))} for n in contexts}
        rb["growth"] = {s: {"wall": med(s, b, hi_n) / med(s, b, lo_n),
                            "cpu": med(s, b, hi_n, "cpu") / med(s, b, lo_n, "cpu")} for s in series}
        if args.dense:
            rb["dense_over_hybrid_eager"] = {str(n): med(DENSE_EAGER, b, n) / med(HYBRID_EAGER, b, n)
                                             for n in contexts}
        target = TARGET_ORT_GROWTH.get(b)
        rb["targets"] = {
            f"ort_at_most_{TARGET_ORT_OVER_EAGER:g}x_eager": {
                str(n): rb["ort_over_eager"][str(n)]["wall_of_medians"] <= TARGET_ORT_OVER_EAGER for n in contexts},
        }
        if target is not None:
            rb["targets"][f"ort_{hi_n}_within_{target:g}x_of_{lo_n}"] = rb["growth"][HYBRID_ORT]["wall"] <= target

    out = {
        "settings": {"contexts": contexts, "batches": args.batches, "steps_per_context": plan,
                     "passes": args.passes, "warmup_per_phase": args.warmup, "seed": SEED, "dense": args.dense,
                     "entry_capacity": "entries_needed at the phase's last position (no growth while timed)"},
        "parity_on_synthetic_cache": {f"batch{b}_N{n}": v for (b, n), v in parity.items()},
        "results": sorted(results, key=lambda r: (r["batch"], SERIES.index(r["series"]), r["context"])),
        "ratios": ratios,
        "_phase_load": phase_load,
    }
    if args.dense:
        out["models_dense"] = {"from": PRESET, "changes": {"compress_ratios": [WINDOW] * cfg.num_layers,
                                                           "window": "N + 1"},
                               "params": param_count(next(iter(dense_models.values())).model)}
    return out


# ------------------------------------------------------------------------------------ output
def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def ctx_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def series_in(res: dict) -> tuple[str, ...]:
    return tuple(s for s in SERIES if any(r["series"] == s for r in res["results"]))


def markdown_tables(res: dict) -> str:
    if "results" not in res:
        return ""
    contexts = res["settings"]["contexts"]
    series = series_in(res)
    lines = []
    steps = res["settings"]["steps_per_context"]  # int keys, or str keys when read back from JSON
    for b in res["settings"]["batches"]:
        rows = {(r["series"], r["context"]): r for r in res["results"] if r["batch"] == b}
        lines += [f"**Batch {b}** — per decode step, wall ms median / p90 (CPU ms median), steps per N "
                  f"{', '.join(str(steps.get(n, steps.get(str(n)))) for n in contexts)}", "",
                  "| series | " + " | ".join(f"N = {ctx_label(n)}" for n in contexts) + " |",
                  "| --- |" + " ---: |" * len(contexts)]
        for s in series:
            cells = []
            for n in contexts:
                r = rows[(s, n)]
                cells.append(f"{r['wall']['median_ms']:.2f} / {r['wall']['p90_ms']:.2f} ({r['cpu']['median_ms']:.2f})")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        for model in ("hybrid", "dense"):
            if (f"{model}/eager", contexts[0]) in rows:
                cells = [fmt_bytes(rows[(f"{model}/eager", n)]["cache_bytes"]) for n in contexts]
                lines.append(f"| cache bytes, {model} | " + " | ".join(cells) + " |")
        rb = res["ratios"][f"batch{b}"]
        oe = rb["ort_over_eager"]
        lines.append("| ORT / eager (medians wall; CPU; paired wall) | " + " | ".join(
            f"{oe[str(n)]['wall_of_medians']:.2f}; {oe[str(n)]['cpu_of_medians']:.2f}; "
            f"{oe[str(n)]['paired_median_wall']:.2f}" for n in contexts) + " |")
        if "dense_over_hybrid_eager" in rb:
            lines.append("| dense / hybrid eager | " + " | ".join(
                f"{rb['dense_over_hybrid_eager'][str(n)]:.2f}" for n in contexts) + " |")
        lo, hi = contexts[0], contexts[-1]
        lines += ["", f"Growth {ctx_label(hi)} / {ctx_label(lo)} (wall; CPU): " + ", ".join(
            f"{s} {rb['growth'][s]['wall']:.2f}x; {rb['growth'][s]['cpu']:.2f}x" for s in series), ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    batches = res["settings"]["batches"]
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    style = {HYBRID_EAGER: ("tab:blue", "o", "-"), HYBRID_ORT: ("tab:orange", "s", "-"),
             DENSE_EAGER: ("tab:red", "^", "--")}
    labels = {HYBRID_EAGER: "hybrid, torch eager", HYBRID_ORT: "hybrid, ONNX Runtime (IO binding)",
              DENSE_EAGER: "dense attention, torch eager"}
    for ax, b in zip(axes[0], batches):
        for s in series_in(res):
            rows = sorted((r for r in res["results"] if r["batch"] == b and r["series"] == s),
                          key=lambda r: r["context"])
            x = [r["context"] for r in rows]
            color, marker, _ = style[s]
            # process CPU time: the steadier measure on a shared machine (solid); wall time (dotted)
            ax.plot(x, [r["cpu"]["median_ms"] for r in rows], color=color, marker=marker, linestyle="-",
                    label=f"{labels[s]}, CPU")
            y = [r["wall"]["median_ms"] for r in rows]
            hi = [r["wall"]["p90_ms"] - r["wall"]["median_ms"] for r in rows]
            ax.errorbar(x, y, yerr=[[0] * len(hi), hi], color=color, marker=marker, linestyle=":", alpha=0.45,
                        capsize=3, markerfacecolor="none", label=f"{labels[s]}, wall (bar to p90)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v)), 6) in (2, 5) else ""))
        ax.set_xticks(res["settings"]["contexts"])
        ax.set_xticklabels([ctx_label(n) for n in res["settings"]["contexts"]])
        ax.set_xlabel("context N (tokens in the cache)")
        ax.set_ylabel("decode step, ms (median)")
        ax.set_title(f"batch {b}, {res['threads']['torch_intra_op']} thread(s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6.5)
    save_figure(fig, path, f"{PRESET} (window, window, CSA, HCA) decode step vs context", res)


def save_figure(fig, path, title: str, res: dict) -> None:
    """Title with the machine and its load (the benchmarks run on shared cores), then save."""
    import matplotlib.pyplot as plt

    load = res["load"]
    fig.suptitle(f"{title} — {res['machine']['cpu_model']}, {res['machine']['logical_cpus']} CPUs shared, "
                 f"load avg {load['loadavg_start'][:1]}→{load['loadavg_end'][:1]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def int_list(s: str) -> list[int]:
    return [int(x) for x in s.split(",")]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int_list, default=[4096, 16384, 65536],
                    help="comma-separated contexts N (default 4096,16384,65536)")
    ap.add_argument("--batches", type=int_list, default=[1, 4], help="comma-separated batch sizes (default 1,4)")
    ap.add_argument("--steps", type=int, default=30,
                    help="timed steps at the largest N; smaller N get steps x sqrt(N_max / N) (default 30)")
    ap.add_argument("--passes", type=int, default=2, help="sweeps over N, alternating order (default 2)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per backend per phase (default 3)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads = ONNX Runtime intra_op_num_threads (default 1)")
    ap.add_argument("--no-dense", dest="dense", action="store_false", help="skip the dense-attention model")
    ap.add_argument("--profile", action="store_true",
                    help="also profile ONNX Runtime (enable_profiling) at the smallest and largest N")
    ap.add_argument("--profile-only", action="store_true", help="only the profile (no timing, no docs written "
                    "unless --out-json is given)")
    ap.add_argument("--profile-steps", type=int, default=10, help="profiled steps per context (default 10)")
    ap.add_argument("--max-positions", type=int, default=MAX_POSITIONS,
                    help=f"max_position_embeddings of the benchmark model (default {MAX_POSITIONS})")
    ap.add_argument("--export-dir", help="reuse the export in this directory, or export into it if it has none")
    ap.add_argument("--out-json", default=str(ROOT / "docs" / "bench_decode.json"))
    ap.add_argument("--out-png", default=str(ROOT / "docs" / "bench_decode.png"))
    ap.add_argument("--replot", metavar="JSON", help="only redraw --out-png from a results JSON of this script")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: tiny-flash as preset (max_position_embeddings 4096), N = 512, 2048, "
                         "batch 1 and 2, 4 steps, 1 pass, a 2-step profile; outputs in the temp dir")
    args = ap.parse_args(argv)
    tmpdir = Path(tempfile.gettempdir())
    if args.quick:
        args.contexts, args.batches, args.steps, args.passes, args.warmup = [512, 2048], [1, 2], 4, 1, 1
        args.max_positions, args.profile, args.profile_steps = preset(PRESET).max_position_embeddings, True, 2
        if args.out_json == ap.get_default("out_json"):
            args.out_json = str(tmpdir / "bench_decode.quick.json")
        if args.out_png == ap.get_default("out_png"):
            args.out_png = str(tmpdir / "bench_decode.quick.png")
    elif args.profile_only and args.out_json == ap.get_default("out_json"):
        args.out_json = str(tmpdir / "bench_decode.profile.json")
    for n in args.contexts:
        if not 128 <= n < args.max_positions - 256:
            ap.error(f"--contexts: {n} must lie in [128, {args.max_positions - 256})")
    if min(args.batches) < 1 or args.steps < 1 or args.passes < 1 or args.warmup < 0 or args.threads < 1:
        ap.error("--batches, --steps, --passes, --threads must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), Path(args.out_png))
        log(f"wrote {args.out_png}")
        return 0
    t0 = time.perf_counter()
    res = run(args)
    tmp = res.pop("_tmp")
    res["elapsed_s"] = round(time.perf_counter() - t0, 1)
    res["markdown"] = markdown_tables(res)
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(res, indent=2) + "\n")
    if "results" in res:
        plot(res, Path(args.out_png))
    tmp.cleanup()
    print()
    print(res["markdown"])
    for b in args.batches:
        if "ratios" in res:
            print(f"batch {b} targets: " + json.dumps(res["ratios"][f"batch{b}"]["targets"]))
        if "profile" in res:
            prof = res["profile"][f"batch{b}"]
            print(f"batch {b} profile, nodes that grow most {prof['contexts'][0]} -> {prof['contexts'][-1]}:")
            for r in prof["growth_top_nodes"][:10]:
                print(f"  {r['delta_ms']:+8.3f} ms  {r['op']:<22} {r['node']}")
    if "parity_on_synthetic_cache" in res:
        print(f"parity (eager vs ORT logits on the synthetic cache): {json.dumps(res['parity_on_synthetic_cache'])}")
    written = args.out_json + (f" and {args.out_png}" if "results" in res else "")
    log(f"wrote {written} ({res['elapsed_s']:.0f} s; load {res['load']['loadavg_end']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
