#!/usr/bin/env python3
"""Quality of the bundled model (models/tiny-stdlib): what each deployment stage costs, and whether
the compressed attention earns its keep. Writes docs/quality.json, docs/quality_context.png and
prints the tables of docs/quality.md.

1. Held-out bits per byte (engines/corpus.py's held-out split, engines/evaluate.py's definition)
   against `gzip -9` and `xz -9` on the same bytes.
2. Per backend and export: torch (the reference), ONNX Runtime on an fp32, an fp16 and a quant-sim
   export, and on the FP8 export of `hatrt quantize` when given; each with its difference to the
   reference.
3. The indexer ablation against context length: the shipped model (CSA keeps the indexer's top-k
   entries), the same weights with every compressed entry selected (top-k = all), and the window
   alone (CSA and HCA entries masked), at contexts 256 .. 2048.

    python scripts/eval_tiny.py --work /tmp/eval_tiny            # exports into --work, ~30 min on 2 cores
    python scripts/eval_tiny.py --quick                          # small slice, two contexts (smoke)
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import lzma
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from engines import corpus  # noqa: E402
from engines.backends import TorchBackend, load_backend  # noqa: E402
from engines.evaluate import evaluate_text  # noqa: E402
from engines.text import load_tokenizer  # noqa: E402
from exporter import ops  # noqa: E402
from exporter.checkpoint import load_model  # noqa: E402

MODEL = REPO / "models" / "tiny-stdlib"
CONTEXTS = (256, 512, 1024, 2048)
VARIANTS = ("top-k (shipped)", "all entries", "window only")


def held_out_slice(max_chars: int | None) -> str:
    """The held-out split (BOS + text + EOS per file, sorted by path): whole files until max_chars."""
    out, size = [], 0
    for _, text in corpus.documents("held_out"):
        if max_chars is not None and size >= max_chars:
            break
        out.append(corpus.BOS + text + corpus.EOS)
        size += len(text)
    return "".join(out)


def compressors(text: str) -> dict:
    raw = text.replace(corpus.BOS, "").replace(corpus.EOS, "").encode("utf-8")
    return {"bytes": len(raw), "gzip -9": 8 * len(gzip.compress(raw, 9)) / len(raw),
            "xz -9": 8 * len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)) / len(raw)}


@contextlib.contextmanager
def variant(model, name: str, context: int):
    """The same weights with the indexer's selection widened to every entry, or entries masked."""
    saved = [(a.indexer, a.indexer.topk) for a in (b.attn for b in model.layers) if a.indexer is not None]
    original = ops.sparse_attention
    try:
        if name == "all entries":
            for ix, _ in saved:
                ix.topk = context // 4 + 1  # more than the entries a window of `context` tokens has
        elif name == "window only":
            def window_only(q, q_pos, window_kv, window_pos, entries, entry_idx, sink, **kw):
                return original(q, q_pos, window_kv, window_pos, entries, entry_idx[..., :0], sink, **kw)

            ops.sparse_attention = window_only
        yield
    finally:
        ops.sparse_attention = original
        for ix, k in saved:
            ix.topk = k


def run_eval(backend, tok, text: str, context: int, label: str) -> dict:
    t0 = time.perf_counter()
    r = evaluate_text(backend, tok, text, context=context).to_dict()
    r["seconds"] = time.perf_counter() - t0
    print(f"  {label:<38} context {context:>5}: {r['bits_per_byte']:.4f} bpb ({r['tokens']} tokens, "
          f"{r['seconds']:.0f} s)", flush=True)
    return r


def export(kind: str, work: Path) -> Path:
    from engines.quantize import quantize_export
    from exporter.export import export_model

    out = work / kind
    if (out / "manifest.json").is_file():
        return out
    print(f"exporting {kind} ...", flush=True)
    if kind == "fp8":
        quantize_export(export("fp32", work), out, overwrite=True)
    else:
        export_model(str(MODEL), out, dtype="float16" if kind == "fp16" else "float32",
                     quant_sim=kind == "quant-sim", overwrite=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/eval_tiny"), help="exports go here (reused)")
    ap.add_argument("--chars", type=int, default=150_000, help="held-out slice for the ablation and exports")
    ap.add_argument("--context", type=int, default=1025, help="context of the headline and per-export numbers")
    ap.add_argument("--exports", nargs="*", default=["fp32", "fp16", "quant-sim", "fp8"])
    ap.add_argument("--quick", action="store_true", help="smoke run: 20K characters, contexts 256 and 512")
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.chars, contexts, args.exports = 20_000, (256, 512), []
        args.out = args.work
    else:
        contexts = CONTEXTS
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(MODEL)
    model = load_model(str(MODEL))
    ref = TorchBackend(model)
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "load": os.getloadavg(), "torch": torch.__version__},
               "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}

    full = held_out_slice(None)
    part = held_out_slice(args.chars)
    results["compressors_full"] = compressors(full)
    results["compressors_slice"] = compressors(part)
    print(f"held-out: {results['compressors_full']}\nslice: {results['compressors_slice']}", flush=True)

    if not args.quick:
        print("headline: the full held-out split", flush=True)
        ort_full = load_backend(export("fp32", args.work), "onnxruntime")
        results["full"] = run_eval(ort_full, tok, full, args.context, "onnxruntime fp32, full held-out")

    print("per backend and export (slice)", flush=True)
    results["exports"] = {"torch": run_eval(ref, tok, part, args.context, "torch (reference)")}
    for kind in args.exports:
        backend = load_backend(export(kind, args.work), "onnxruntime")
        results["exports"][f"onnxruntime {kind}"] = run_eval(backend, tok, part, args.context, f"onnxruntime {kind}")

    print("indexer ablation (slice, torch)", flush=True)
    results["ablation"] = {v: {} for v in VARIANTS}
    for c in contexts:
        for v in VARIANTS:
            with variant(model, v, c):
                results["ablation"][v][c] = run_eval(ref, tok, part, c, v)
    (args.out / ("quality.json" if not args.quick else "quality_quick.json")).write_text(
        json.dumps(results, indent=2) + "\n")
    plot(results, contexts, args.out / ("quality_context.png" if not args.quick else "quality_quick.png"))
    print_tables(results, contexts)


def plot(results: dict, contexts, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for v, style in zip(VARIANTS, ("o-", "s--", "^:")):
        ax.plot(contexts, [results["ablation"][v][c]["bits_per_byte"] for c in contexts], style, label=v)
    for name, ls in (("gzip -9", "-."), ("xz -9", ":")):
        ax.axhline(results["compressors_slice"][name], color="gray", ls=ls, lw=1, label=f"{name} (same bytes)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [str(c) for c in contexts])
    ax.set_xlabel("context (tokens per window)")
    ax.set_ylabel("bits per byte (held-out slice)")
    ax.set_title("tiny-stdlib: compressed attention vs the window alone")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_tables(results: dict, contexts) -> None:
    ref = results["exports"]["torch"]["bits_per_byte"]
    print("\n| backend / export | bits per byte | vs torch |\n| --- | --- | --- |")
    for name, r in results["exports"].items():
        print(f"| {name} | {r['bits_per_byte']:.4f} | {100 * (r['bits_per_byte'] / ref - 1):+.3f}% |")
    print("\n| context | " + " | ".join(VARIANTS) + " | top-k vs all | window vs top-k |")
    print("| --- " * (len(VARIANTS) + 3) + "|")
    for c in contexts:
        b = [results["ablation"][v][c]["bits_per_byte"] for v in VARIANTS]
        print(f"| {c} | " + " | ".join(f"{x:.4f}" for x in b)
              + f" | {100 * (b[0] / b[1] - 1):+.2f}% | {100 * (b[2] / b[0] - 1):+.2f}% |")


if __name__ == "__main__":
    main()
