#!/usr/bin/env python3
"""Decode-step benchmark: ONNX Runtime vs torch eager, hybrid vs dense attention, vs context.

One run measures, side by side:

* the hybrid model (tiny-flash: window, window, CSA, HCA; max_position_embeddings raised to 128K)
  under torch eager (engines.backends.TorchBackend) and under ONNX Runtime on the CPU
  (engines.backends.OnnxRuntimeBackend on an export made once by exporter.export.export_model);
* a dense-attention model of the same widths: every layer window-only with a window ring of
  N + 1 slots, i.e. full causal attention over all N cached tokens plus the new one (torch eager
  only: an export per N is not worth it);

at contexts N (default 4K, 16K, 64K), one decode step per call, batch 1 (and 4 by default).

The cache at context N is synthesized, not prefilled (a reference prefill of 64K tokens is
quadratic in memory): the window ring holds positions N-w..N-1 in slot pos % w, the CSA/HCA entry
buffers have capacity (N + 1) // ratio (what cache_ops.entries_needed asks for the step at N) with
the N // ratio complete entries filled with unit-scale random values (entries are RMS-normalized),
the compressor tail states are random and finite, and pos = N. Eager and ONNX Runtime get the same
tensors. Timing does not depend on the values; a one-step eager/ORT logits comparison on the
synthesized cache is recorded as a sanity check (correctness is tested in tests/).

Every step is fed the same cache at position N (the backends do not modify their inputs), so the
context stays exactly N. Within a phase (one N, one batch) the eager and ORT steps alternate, so
both see the same machine load; the sweep over N runs `--passes` times in alternating order
(4K..64K, then 64K..4K) and the steps are pooled, so slow drifts in the load of a shared machine
hit every N alike. Wall time (perf_counter) and process CPU time (process_time) are both recorded:
on a loaded machine the CPU time is the steadier measure of the work done.

    python scripts/bench_decode.py                       # the full run (writes docs/bench_decode.*)
    python scripts/bench_decode.py --quick               # smoke test: small N, few steps, /tmp outputs
    python scripts/bench_decode.py --export-dir /tmp/x   # reuse (or create) the export there
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
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
from engines.backends import OnnxRuntimeBackend, TorchBackend, manifest_config, read_manifest  # noqa: E402
from exporter.cache import cache_layout  # noqa: E402
from exporter.config import WINDOW, ModelConfig  # noqa: E402
from exporter.model import Transformer  # noqa: E402
from exporter.presets import preset  # noqa: E402

PRESET = "tiny-flash"
MAX_POSITIONS = 131072
SEED = 0
TARGET_ORT_OVER_EAGER = 1.0  # ONNX Runtime no slower than eager
TARGET_HYBRID_GROWTH = 2.0  # hybrid step at the largest N within 2x of the smallest N

HYBRID_EAGER, HYBRID_ORT, DENSE_EAGER = "hybrid/eager", "hybrid/onnxruntime", "dense/eager"
SERIES = (HYBRID_EAGER, HYBRID_ORT, DENSE_EAGER)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------ machine
def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
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
    return info


# ------------------------------------------------------------------------------------ models
def hybrid_config() -> ModelConfig:
    return preset(PRESET).replace(max_position_embeddings=MAX_POSITIONS)


def dense_config(hybrid: ModelConfig, context: int) -> ModelConfig:
    """Same widths, every layer window-only, ring of context + 1 slots: key j is attended when
    0 <= pos - pos_j < window, so at position N a window of N + 1 covers all N cached tokens and
    the new one, i.e. full causal attention."""
    return hybrid.replace(compress_ratios=(WINDOW,) * hybrid.num_layers, window=context + 1,
                          name=f"{PRESET}-dense")


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def get_export(model: Transformer, export_dir: str | None, tmp_root: Path) -> Path:
    from exporter.export import export_model

    if export_dir is not None:
        path = Path(export_dir)
        if (path / "manifest.json").is_file():
            manifest = read_manifest(path)
            got = manifest_config(manifest)
            if got != model.config or manifest.get("dtype") != "float32" or manifest.get("quant_sim"):
                raise SystemExit(f"{path}: this export is not of the benchmark model (config, dtype float32, "
                                 "quant_sim off); pass another --export-dir or remove it")
            log(f"reusing the export in {path}")
            return path
    else:
        path = tmp_root / "export"
    log(f"exporting the hybrid model to {path} (once; takes a few minutes)")
    t0 = time.perf_counter()
    export_model(model, path, jobs=1, progress=lambda s: log("  export: " + s.splitlines()[0][:100]))
    log(f"export done in {time.perf_counter() - t0:.0f} s")
    return path


# ------------------------------------------------------------------------------------ caches
def synth_cache(config: ModelConfig, context: int, batch: int, seed: int) -> list[torch.Tensor]:
    """A valid-shaped flat cache at position `context` (see the module docstring)."""
    layout = cache_layout(config, torch.float32)
    g = torch.Generator().manual_seed(seed)
    cache = cache_ops.empty(config, layout, batch)
    cache = cache_ops.ensure_capacity_for(cache, layout, config, context)
    out = []
    for spec, t in zip(layout, cache):
        name = spec.name
        if name == "pos":
            t = torch.full_like(t, context)
        else:
            layer = int(name.split(".")[0].removeprefix("layer"))
            ratio = config.compress_ratios[layer]
            kind = name.split(".", 1)[1]
            if kind == "window_kv":
                t = torch.randn(t.shape, generator=g)
            elif kind == "window_pos":
                w = t.shape[1]
                pos = torch.arange(max(0, context - w), context)
                ring = torch.full((w,), -1, dtype=torch.long)
                ring[pos % w] = pos
                t = ring.expand(batch, w).clone()
            elif kind in ("entries", "index_keys"):
                t = torch.zeros_like(t)
                done = context // ratio
                t[:, :done] = torch.randn(batch, done, t.shape[2], generator=g)
            elif kind.endswith(".kv") or kind.endswith(".score"):  # compressor tail states
                t = torch.randn(t.shape, generator=g)
            else:
                raise AssertionError(f"unknown cache tensor {name}")
        out.append(t.contiguous())
    cache_ops.validate(out, layout, what=f"synthesized cache at {context}")
    return out


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


# ------------------------------------------------------------------------------------ main run
def run(args) -> dict:
    threads = args.threads
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    import onnxruntime as ort

    contexts = sorted(args.contexts)
    load_start, uptime_start = loadavg(), uptime_line()
    log(f"machine load at start: {uptime_start}")

    cfg = hybrid_config()
    hybrid = Transformer(cfg).init_random(SEED).eval()
    tmp = tempfile.TemporaryDirectory(prefix="bench_decode.")
    export_path = get_export(hybrid, args.export_dir, Path(tmp.name))

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    t0 = time.perf_counter()
    ort_backend = OnnxRuntimeBackend(export_path, providers=["CPUExecutionProvider"], session_options=so)
    log(f"ONNX Runtime sessions loaded in {time.perf_counter() - t0:.1f} s "
        f"(intra_op_num_threads={threads}, inter_op_num_threads=1, sequential, ORT_ENABLE_ALL)")
    eager_backend = TorchBackend(hybrid)
    dense_models = {}
    for n in contexts:  # same seed: identical weights at every N (window size holds no parameters)
        dense_models[n] = TorchBackend(Transformer(dense_config(cfg, n)).init_random(SEED).eval())
    n_dense_params = param_count(next(iter(dense_models.values())).model)

    largest = contexts[-1]
    plan = {n: steps_for(n, args.steps, largest) for n in contexts}
    samples = {(s, b, n): {"wall": [], "cpu": []} for s in SERIES for b in args.batches for n in contexts}
    paired = {(b, n): [] for b in args.batches for n in contexts}  # ORT/eager per alternated step pair
    paired_cpu = {(b, n): [] for b in args.batches for n in contexts}
    cache_bytes, parity, phase_load = {}, {}, []
    log(f"threads: torch {torch.get_num_threads()} (interop 1), onnxruntime intra-op {threads}; "
        f"contexts {contexts}, batches {args.batches}, steps per N {plan} over {args.passes} pass(es), "
        f"warmup {args.warmup}")

    for p in range(args.passes):
        order = contexts if p % 2 == 0 else contexts[::-1]
        for n in order:
            n_steps = math.ceil(plan[n] / args.passes)
            for b in args.batches:
                ids = torch.randint(0, cfg.vocab_size, (b, 1), generator=torch.Generator().manual_seed(n + b))
                cache = synth_cache(cfg, n, b, seed=n * 10 + b)
                dense = dense_models[n]
                dcache = synth_cache(dense.config, n, b, seed=n * 10 + b + 1)
                cache_bytes[("hybrid", b, n)] = cache_ops.nbytes(cache)
                cache_bytes[("dense", b, n)] = cache_ops.nbytes(dcache)
                phase_load.append({"pass": p, "context": n, "batch": b, "loadavg": loadavg()})

                # hybrid: eager and ORT alternate, same cache tensors
                for _ in range(args.warmup):
                    eager_backend.decode(ids, cache)
                    ort_backend.decode(ids, cache)
                if p == 0:
                    le, _ = eager_backend.decode(ids, cache)
                    lo, _ = ort_backend.decode(ids, cache)
                    parity[(b, n)] = {"max_abs_logit_diff": float((le - lo).abs().max()),
                                      "finite": bool(torch.isfinite(le).all() and torch.isfinite(lo).all())}
                t_phase = time.perf_counter()
                for i in range(n_steps):
                    runs = [(HYBRID_EAGER, lambda: eager_backend.decode(ids, cache)),
                            (HYBRID_ORT, lambda: ort_backend.decode(ids, cache))]
                    if i % 2:
                        runs.reverse()
                    got = {}
                    for series, fn in runs:
                        wall, cpu = timed(fn)
                        samples[(series, b, n)]["wall"].append(wall)
                        samples[(series, b, n)]["cpu"].append(cpu)
                        got[series] = (wall, cpu)
                    paired[(b, n)].append(got[HYBRID_ORT][0] / got[HYBRID_EAGER][0])
                    paired_cpu[(b, n)].append(got[HYBRID_ORT][1] / max(got[HYBRID_EAGER][1], 1e-9))
                e = statistics.median(samples[(HYBRID_EAGER, b, n)]["wall"][-n_steps:]) * 1e3
                o = statistics.median(samples[(HYBRID_ORT, b, n)]["wall"][-n_steps:]) * 1e3
                log(f"pass {p + 1}/{args.passes} N={n:>6} batch {b}: hybrid eager {e:8.2f} ms, ORT {o:8.2f} ms "
                    f"(median of {n_steps}; {time.perf_counter() - t_phase:.1f} s; load {loadavg()[:1]})")

                # dense: its own phase (its 64K ring would evict the hybrid's working set if interleaved)
                for _ in range(args.warmup):
                    dense.decode(ids, dcache)
                t_phase = time.perf_counter()
                for _ in range(n_steps):
                    wall, cpu = timed(lambda: dense.decode(ids, dcache))
                    samples[(DENSE_EAGER, b, n)]["wall"].append(wall)
                    samples[(DENSE_EAGER, b, n)]["cpu"].append(cpu)
                d = statistics.median(samples[(DENSE_EAGER, b, n)]["wall"][-n_steps:]) * 1e3
                log(f"pass {p + 1}/{args.passes} N={n:>6} batch {b}: dense eager  {d:8.2f} ms "
                    f"(median of {n_steps}; {time.perf_counter() - t_phase:.1f} s)")

    load_end, uptime_end = loadavg(), uptime_line()
    log(f"machine load at end: {uptime_end}")

    results = []
    for (series, b, n), s in samples.items():
        model = series.split("/")[0]
        results.append({"series": series, "model": model, "backend": series.split("/")[1], "batch": b,
                        "context": n, "wall": summarize(s["wall"]), "cpu": summarize(s["cpu"]),
                        "cache_bytes": cache_bytes[(model, b, n)]})

    def med(series, b, n, kind="wall"):
        return summarize(samples[(series, b, n)][kind])["median_ms"]

    lo_n, hi_n = contexts[0], contexts[-1]
    ratios = {}
    for b in args.batches:
        rb = ratios[f"batch{b}"] = {}
        rb["ort_over_eager"] = {
            str(n): {"wall_of_medians": med(HYBRID_ORT, b, n) / med(HYBRID_EAGER, b, n),
                     "cpu_of_medians": med(HYBRID_ORT, b, n, "cpu") / med(HYBRID_EAGER, b, n, "cpu"),
                     "paired_median_wall": float(np.median(paired[(b, n)])),
                     "paired_median_cpu": float(np.median(paired_cpu[(b, n)]))} for n in contexts}
        rb["growth"] = {series: {"wall": med(series, b, hi_n) / med(series, b, lo_n),
                                 "cpu": med(series, b, hi_n, "cpu") / med(series, b, lo_n, "cpu")}
                        for series in SERIES}
        rb["dense_over_hybrid_eager"] = {str(n): med(DENSE_EAGER, b, n) / med(HYBRID_EAGER, b, n) for n in contexts}
        rb["targets"] = {
            "ort_no_slower_than_eager": {str(n): rb["ort_over_eager"][str(n)]["wall_of_medians"] <= TARGET_ORT_OVER_EAGER
                                         for n in contexts},
            f"hybrid_{hi_n}_within_{TARGET_HYBRID_GROWTH:g}x_of_{lo_n}": {
                s: rb["growth"][s]["wall"] <= TARGET_HYBRID_GROWTH for s in (HYBRID_EAGER, HYBRID_ORT)},
        }

    return {
        "benchmark": "decode step time vs context (scripts/bench_decode.py)",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "load": {"uptime_start": uptime_start, "uptime_end": uptime_end, "loadavg_start": load_start,
                 "loadavg_end": load_end, "per_phase": phase_load},
        "threads": {"torch_intra_op": threads, "torch_interop": 1, "ort_intra_op": threads, "ort_inter_op": 1},
        "models": {
            "hybrid": {"preset": PRESET, "changes": {"max_position_embeddings": MAX_POSITIONS},
                       "compress_ratios": list(cfg.compress_ratios), "window": cfg.window,
                       "params": param_count(hybrid), "config": cfg.to_hf_dict()},
            "dense": {"from": PRESET, "changes": {"compress_ratios": [WINDOW] * cfg.num_layers, "window": "N + 1",
                                                  "max_position_embeddings": MAX_POSITIONS},
                      "params": n_dense_params},
        },
        "export_dir": str(export_path) if args.export_dir else "(temporary, removed)",
        "settings": {"contexts": contexts, "batches": args.batches, "steps_per_context": plan,
                     "passes": args.passes, "warmup_per_phase": args.warmup, "seed": SEED},
        "parity_on_synthetic_cache": {f"batch{b}_N{n}": v for (b, n), v in parity.items()},
        "results": sorted(results, key=lambda r: (r["batch"], SERIES.index(r["series"]), r["context"])),
        "ratios": ratios,
        "targets": {"ort_over_eager_max": TARGET_ORT_OVER_EAGER, "hybrid_growth_max": TARGET_HYBRID_GROWTH},
        "_tmp": tmp,
    }


# ------------------------------------------------------------------------------------ output
def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def ctx_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def markdown_tables(res: dict) -> str:
    contexts = res["settings"]["contexts"]
    lines = []
    for b in res["settings"]["batches"]:
        rows = {(r["series"], r["context"]): r for r in res["results"] if r["batch"] == b}
        lines += [f"**Batch {b}** — per decode step, wall ms median / p90 (CPU ms median), steps per N "
                  f"{', '.join(str(res['settings']['steps_per_context'][n]) for n in contexts)}", "",
                  "| series | " + " | ".join(f"N = {ctx_label(n)}" for n in contexts) + " |",
                  "| --- |" + " ---: |" * len(contexts)]
        for s in SERIES:
            cells = []
            for n in contexts:
                r = rows[(s, n)]
                cells.append(f"{r['wall']['median_ms']:.2f} / {r['wall']['p90_ms']:.2f} ({r['cpu']['median_ms']:.2f})")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        for model in ("hybrid", "dense"):
            cells = [fmt_bytes(rows[(f"{model}/eager", n)]["cache_bytes"]) for n in contexts]
            lines.append(f"| cache bytes, {model} | " + " | ".join(cells) + " |")
        rb = res["ratios"][f"batch{b}"]
        lines.append("| ORT / eager (medians; paired) | " + " | ".join(
            f"{rb['ort_over_eager'][str(n)]['wall_of_medians']:.2f}; {rb['ort_over_eager'][str(n)]['paired_median_wall']:.2f}"
            for n in contexts) + " |")
        lines.append("| dense / hybrid eager | " + " | ".join(
            f"{rb['dense_over_hybrid_eager'][str(n)]:.2f}" for n in contexts) + " |")
        lo, hi = contexts[0], contexts[-1]
        lines += ["", f"Growth {ctx_label(hi)} / {ctx_label(lo)} (wall; CPU): " + ", ".join(
            f"{s} {rb['growth'][s]['wall']:.2f}x; {rb['growth'][s]['cpu']:.2f}x" for s in SERIES), ""]
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
    labels = {HYBRID_EAGER: "hybrid, torch eager", HYBRID_ORT: "hybrid, ONNX Runtime",
              DENSE_EAGER: "dense attention, torch eager"}
    for ax, b in zip(axes[0], batches):
        for s in SERIES:
            rows = sorted((r for r in res["results"] if r["batch"] == b and r["series"] == s),
                          key=lambda r: r["context"])
            x = [r["context"] for r in rows]
            y = [r["wall"]["median_ms"] for r in rows]
            hi = [r["wall"]["p90_ms"] - r["wall"]["median_ms"] for r in rows]
            color, marker, ls = style[s]
            ax.errorbar(x, y, yerr=[[0] * len(hi), hi], color=color, marker=marker, linestyle=ls,
                        capsize=3, label=labels[s])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v)), 6) in (2, 5) else ""))
        ax.set_xticks(res["settings"]["contexts"])
        ax.set_xticklabels([ctx_label(n) for n in res["settings"]["contexts"]])
        ax.set_xlabel("context N (tokens in the cache)")
        ax.set_ylabel("decode step, wall ms (median; bar to p90)")
        ax.set_title(f"batch {b}, {res['threads']['torch_intra_op']} thread(s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    load = res["load"]
    fig.suptitle(f"{PRESET} (window, window, CSA, HCA) decode step vs context — {res['machine']['cpu_model']}, "
                 f"{res['machine']['logical_cpus']} CPUs, load avg {load['loadavg_start'][:1]}→{load['loadavg_end'][:1]}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 16384, 65536],
                    help="comma-separated contexts N (default 4096,16384,65536)")
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4],
                    help="comma-separated batch sizes (default 1,4)")
    ap.add_argument("--steps", type=int, default=30,
                    help="timed steps at the largest N; smaller N get steps x sqrt(N_max / N) (default 30)")
    ap.add_argument("--passes", type=int, default=2, help="sweeps over N, alternating order (default 2)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per backend per phase (default 3)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads = ONNX Runtime intra_op_num_threads (default 1)")
    ap.add_argument("--export-dir", help="reuse the export in this directory, or export into it if it has none")
    ap.add_argument("--out-json", default=str(ROOT / "docs" / "bench_decode.json"))
    ap.add_argument("--out-png", default=str(ROOT / "docs" / "bench_decode.png"))
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: N = 512, 2048, batch 1 and 2, 4 steps, 1 pass; outputs in the temp dir")
    args = ap.parse_args(argv)
    if args.quick:
        args.contexts, args.batches, args.steps, args.passes, args.warmup = [512, 2048], [1, 2], 4, 1, 1
        if args.out_json == ap.get_default("out_json"):
            args.out_json = str(Path(tempfile.gettempdir()) / "bench_decode.quick.json")
        if args.out_png == ap.get_default("out_png"):
            args.out_png = str(Path(tempfile.gettempdir()) / "bench_decode.quick.png")
    for n in args.contexts:
        if not 128 <= n < MAX_POSITIONS:
            ap.error(f"--contexts: {n} must lie in [128, {MAX_POSITIONS})")
    if min(args.batches) < 1 or args.steps < 1 or args.passes < 1 or args.warmup < 0 or args.threads < 1:
        ap.error("--batches, --steps, --passes, --threads must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    res = run(args)
    tmp = res.pop("_tmp")
    res["elapsed_s"] = round(time.perf_counter() - t0, 1)
    res["markdown"] = markdown_tables(res)
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(res, indent=2) + "\n")
    plot(res, Path(args.out_png))
    tmp.cleanup()
    print()
    print(res["markdown"])
    for b in args.batches:
        t = res["ratios"][f"batch{b}"]["targets"]
        print(f"batch {b} targets: " + json.dumps(t))
    print(f"parity (eager vs ORT logits on the synthetic cache): {json.dumps(res['parity_on_synthetic_cache'])}")
    log(f"wrote {args.out_json} and {args.out_png} ({res['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
