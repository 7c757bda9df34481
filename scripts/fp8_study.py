"""What FP8 costs the bundled model, layer group by layer group, and hatrt's quantizer vs ModelOpt's.

docs/quantization.md reports the numbers this script writes. Stages (each result is kept in
WORK/results.json, so a rerun skips what is done; --redo STAGE repeats one):

  export     `hatrt export MODEL -o WORK/fp32` (fp32 ONNX, the unquantized baseline)
  quantize   engines.quantize.quantize_export(WORK/fp32, WORK/fp8) with the default policy
             (exporter/fp8.py FP8_LINEARS / KEEP_HIGH) and 4096 calibration tokens
  ort        `hatrt eval --backend onnxruntime --json` on WORK/fp32 and WORK/fp8 (the headline)
  full       the same on the whole held-out split
  check      `hatrt check WORK/fp8` (the FP8 graph against the reference under the same recipe)
  ablate     the reference's FP8 simulation (torch backend) under custom recipes: attention
             projections only, routed experts only, what hatrt quantize does today (attention +
             shared expert), the policy (attention + all experts), policy + LM head / + indexer
             projections / + router gate / + compressors, everything; calibration sizes 256 /
             4096 / 16384 tokens and activation-scale headroom for the policy; bits per byte plus
             KL(fp32 || FP8) and top-1 agreement per token; how far held-out activations exceed
             the calibrated amax
  modelopt   NVIDIA ModelOpt's ONNX PTQ (`python -m modelopt.onnx.quantization --quantize_mode
             fp8`, run by --modelopt-python from its own virtualenv) on a copy of
             WORK/fp32/step.onnx with calibration data built here (.npz: input_ids / logits_index /
             cache tensors of prefill chunks); what it quantized, whether ONNX Runtime CPU runs
             it, its bits per byte
  ortkl      KL and top-1 agreement of the ONNX Runtime graphs (hatrt, ModelOpt) vs fp32
  report     the table (stdout, --json) and the plot (--plot)

Held-out slice: the first --cap-chars characters of every held-out file of the bundled corpus
(engines/corpus.py: the 33 files the model never trained on), each as BOS + text + EOS, in path
order: 124,146 characters, 38,513 tokens at the default 5000; every configuration is scored on
exactly this text with `--context` windows (engines/evaluate.py), so the deltas are paired.

The router gate and the compressors are not hatrt `Linear` calls (they use F.linear on the
weight), so the study simulates them by swapping exporter.model's `F` for a proxy whose `linear`
applies the same FP8 round trip (exporter.fp8.fp8_linear) to the weights it is told about; the
Linear layers use exporter.fp8.apply_recipe, which is what the FP8 ONNX graph computes.

Usage (2 shared cores: one thread):
  OMP_NUM_THREADS=1 python scripts/fp8_study.py --model models/tiny-stdlib --work /tmp/fp8_study \
      --modelopt-python /tmp/modelopt-venv/bin/python --json docs/fp8_study.json --plot docs/fp8_study.png
Without a trained model (no tokenizer), `--model tiny-flash` scores seeded random token ids and
reports nats per token instead of bits per byte.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from exporter import fp8  # noqa: E402

STAGES = ("export", "quantize", "ort", "full", "check", "ablate", "modelopt", "ortkl", "report")
ATTN = ("attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_b")
EXPERTS = ("w1", "w2", "w3")
DEFAULT_CALIB = 4096


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ============================================================================ results store
class Results:
    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value) -> None:
        if self.path.is_file():  # another stage may run beside this one: merge, do not overwrite
            self.data = {**json.loads(self.path.read_text()), **self.data}
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.path)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    log("$ " + " ".join(cmd))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True, **kw)


# ============================================================================ the held-out slice
def heldout_slice(cap_chars: int) -> str:
    from engines.corpus import BOS, EOS, documents

    return "".join(BOS + text[:cap_chars] + EOS for _, text in documents("held_out"))


def has_tokenizer(source: Path) -> bool:
    return (Path(source) / "tokenizer.json").is_file()


# ============================================================================ stages
def stage_export(args, res: Results) -> None:
    out = args.work / "fp32"
    t0 = time.monotonic()
    r = run([sys.executable, "-m", "engines.cli", "export", str(args.model), "-o", str(out), "--force"])
    if r.returncode:
        raise SystemExit(f"hatrt export failed:\n{r.stdout}\n{r.stderr}")
    res.put("export", {"dir": str(out), "seconds": time.monotonic() - t0})


def calib_tokens(n: int, export_dir: Path) -> tuple[list[int], dict]:
    """Exactly the tokens `hatrt quantize --calib-tokens n` uses (the training split, or random ids)."""
    from engines.backends import load_backend
    from engines.quantize import default_calibration_tokens

    ref = load_backend(export_dir, "torch")
    return default_calibration_tokens(ref, export_dir, n)


def stage_quantize(args, res: Results) -> None:
    from engines.quantize import quantize_export

    t0 = time.monotonic()
    m = quantize_export(args.work / "fp32", args.work / "fp8", n_calib_tokens=DEFAULT_CALIB, overwrite=True,
                        progress=log)
    q = m["quantization"]
    res.put("quantize", {"dir": str(args.work / "fp8"), "seconds": time.monotonic() - t0, "linears": q["linears"],
                         "calibration": q["calibration"], "weight_error": q["weight_error"],
                         "step_onnx_bytes": (args.work / "fp8" / "step.onnx").stat().st_size,
                         "fp32_step_onnx_bytes": (args.work / "fp32" / "step.onnx").stat().st_size})


def hatrt_eval(args, source: Path, backend: str, text_file: Path | None = None) -> dict:
    text_file = text_file or args.work / "heldout_slice.txt"
    t0 = time.monotonic()
    r = run([sys.executable, "-m", "engines.cli", "eval", str(source), "--text", str(text_file), "--backend",
             backend, "--context", str(args.context), "--json"])
    if r.returncode:
        raise RuntimeError(f"hatrt eval {source} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    d = json.loads(r.stdout)
    d["wall_s"] = time.monotonic() - t0
    return d


def stage_ort(args, res: Results) -> None:
    for name in ("fp32", "fp8"):
        key = f"ort.{name}"
        if res.get(key) and key not in args.redo_keys:
            continue
        log(f"hatrt eval --backend onnxruntime {name}")
        res.put(key, hatrt_eval(args, args.work / name, "onnxruntime"))


def stage_full(args, res: Results) -> None:
    """The headline on the whole held-out split (engines/corpus.py held_out_text, 177K tokens):
    `hatrt eval --backend onnxruntime` on the fp32 and the FP8 export."""
    from engines.corpus import held_out_text

    full = args.work / "heldout_full.txt"
    if not full.is_file():
        full.write_text(held_out_text())
    for name in ("fp32", "fp8"):
        key = f"full.{name}"
        if res.get(key) and key not in args.redo_keys:
            continue
        log(f"hatrt eval --backend onnxruntime {name} on the whole held-out split")
        res.put(key, hatrt_eval(args, args.work / name, "onnxruntime", text_file=full))


def stage_check(args, res: Results) -> None:
    t0 = time.monotonic()
    js = args.work / "check_fp8.json"
    r = run([sys.executable, "-m", "engines.cli", "check", str(args.work / "fp8"), "--steps", str(args.check_steps),
             "--json", str(js)])
    out = {"exit_code": r.returncode, "seconds": time.monotonic() - t0, "steps": args.check_steps,
           "tail": (r.stdout + r.stderr)[-1500:]}
    if js.is_file():
        out["report"] = json.loads(js.read_text())
    res.put("check", out)


# ---------------------------------------------------------------------------- ablations (torch)
class FProxy:
    """Stands in for torch.nn.functional inside exporter.model: `linear` on a registered weight
    records the input's amax (calibration) or applies the FP8 round trip (simulation)."""

    def __init__(self):
        import torch.nn.functional as F

        self._F = F
        self.names: dict[int, str] = {}  # weight data_ptr -> name
        self.amax: dict[str, float] | None = None
        self.scales: dict[int, fp8.LinearScales] = {}

    def __getattr__(self, k):
        return getattr(self._F, k)

    def linear(self, x, weight, bias=None):
        p = weight.data_ptr()
        if self.amax is not None and p in self.names and x.numel():
            n = self.names[p]
            self.amax[n] = max(self.amax.get(n, 0.0), float(x.detach().float().abs().max()))
        s = self.scales.get(p)
        if s is not None and bias is None:
            return fp8.fp8_linear(x, weight, s)
        return self._F.linear(x, weight, bias)


def other_gemms(model) -> dict[str, torch.Tensor]:
    """The GEMMs that are not hatrt Linear calls: router gates and compressor projections."""
    out = {}
    for name, p in model.named_parameters():
        stem = name.removesuffix(".weight")
        if not name.endswith(".weight") or p.dim() != 2:
            continue
        if stem.endswith("ffn.gate") or ".compressor.w" in stem:
            out[stem] = p
    return out


def group_of(name: str) -> str:
    if name == "head":
        return "head"
    if ".compressor." in name:
        return "compressor"
    if ".indexer." in name:
        return "indexer"
    if name.endswith("ffn.gate"):
        return "gate"
    if name.endswith("attn.wo_a"):
        return "wo_a"
    if any(name.endswith("." + s) for s in ATTN):
        return "attn"
    if ".shared_experts." in name and any(name.endswith("." + s) for s in EXPERTS):
        return "shared"
    if any(name.endswith("." + s) for s in EXPERTS):
        return "routed"
    return "other"


POLICY = ("attn", "shared", "routed")  # what FP8_LINEARS names
CONFIGS = [  # (key, label, groups)
    ("none", "fp32 (no FP8)", ()),
    ("attn", "attention projections only", ("attn",)),
    ("routed", "routed experts only", ("routed",)),
    ("quantizer", "hatrt quantize today: attention + shared expert", ("attn", "shared")),
    ("default", "policy: attention + all experts (routed + shared)", POLICY),
    ("default+head", "policy + LM head", POLICY + ("head",)),
    ("default+indexer", "policy + indexer projections", POLICY + ("indexer",)),
    ("default+gate", "policy + router gate", POLICY + ("gate",)),
    ("default+compressor", "policy + compressors", POLICY + ("compressor",)),
    ("all", "all GEMMs (policy + head + indexer + gate + compressors)",
     POLICY + ("head", "indexer", "gate", "compressor")),
]


def stage_ablate(args, res: Results) -> None:
    import exporter.model as M
    from engines import text as text_mod
    from engines.backends import load_backend
    from engines.evaluate import encode_for_eval, window_spans
    from engines.quantize import calibration_batches

    export_dir = args.work / "fp32"
    ref = load_backend(export_dir, "torch")  # the fp32 reference (the export's source checkpoint)
    model = ref.model
    proxy = FProxy()
    M.F = proxy
    others = other_gemms(model)
    proxy.names = {p.data_ptr(): n for n, p in others.items()}
    mods = fp8.linear_modules(model)
    called = [n for n in mods if group_of(n) not in ("compressor", "wo_a")]  # Linear modules that are called
    tokenizer = text_mod.load_tokenizer(export_dir) if has_tokenizer(export_dir) else None
    text = (args.work / "heldout_slice.txt").read_text() if tokenizer is not None else None
    rand_ids = torch.randint(0, model.config.vocab_size, (args.random_tokens,),
                             generator=torch.Generator().manual_seed(1)).tolist()

    base_path = args.work / "fp32_logprobs.pt"  # the fp32 reference's log-probs (fp16), for KL / top-1
    base_lp: list[torch.Tensor] | None = torch.load(base_path) if base_path.is_file() else None

    def score(is_base: bool) -> dict:
        """engines.evaluate's bits per byte (the same windows, chunks and cross entropy), plus
        KL(fp32 || this) and top-1 agreement with the fp32 reference, per predicted token."""
        nonlocal base_lp
        t0 = time.monotonic()
        if tokenizer is not None:
            ids, nbytes, _ = encode_for_eval(tokenizer, text)
        else:
            ids, nbytes = rand_ids, None
        seq = torch.tensor(ids, dtype=torch.long)
        nll, kl, agree, lps = 0.0, 0.0, 0, []
        for k, (s, e) in enumerate(window_spans(len(ids), args.context)):
            window = seq[s:e]
            logits, _ = ref.prefill(window.view(1, -1), all_logits=True)
            pred = logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(pred, window[1:], reduction="sum").double())
            lp = pred.log_softmax(-1)
            if is_base:
                lps.append(lp.half())
            elif base_lp is not None:
                b = base_lp[k].float()
                kl += float((b.exp() * (b - lp)).sum().double())
                agree += int((b.argmax(-1) == lp.argmax(-1)).sum())
        n = len(ids) - 1
        r = {"nll": nll, "tokens": n, "nll_per_token": nll / n}
        if nbytes is not None:
            r.update(bytes=nbytes, bits_per_byte=nll / math.log(2) / nbytes)
        if is_base:
            base_lp = lps
            torch.save(lps, base_path)
        elif base_lp is not None:
            r.update(kl_per_token=kl / n, top1_agreement=agree / n)
        r["wall_s"] = time.monotonic() - t0
        return r

    amaxes: dict[int, dict[str, float]] = {}

    def amax_for(n_tokens: int) -> dict[str, float]:
        if n_tokens not in amaxes:
            key = f"calib.{n_tokens}"
            cached = res.get(key)
            if cached and key not in args.redo_keys:
                amaxes[n_tokens] = cached["amax"]
            else:
                toks, info = calib_tokens(n_tokens, export_dir)
                t0 = time.monotonic()
                fp8.apply_recipe(model, None)
                proxy.scales, proxy.amax = {}, {}
                amax = fp8.calibrate(model, calibration_batches(toks), names=called)
                amax.update(proxy.amax)
                proxy.amax = None
                res.put(key, {"amax": amax, "info": info, "seconds": time.monotonic() - t0})
                amaxes[n_tokens] = amax
        return amaxes[n_tokens]

    def configure(groups, amax, headroom: float = 1.0) -> int:
        """headroom: input scale = headroom * amax / 448 (values up to headroom x the calibrated
        amax before saturation, at the price of resolution near zero)."""
        chosen = {n: a * headroom for n, a in amax.items() if group_of(n) in groups}
        lin = {n: a for n, a in chosen.items() if n in mods}
        fp8.apply_recipe(model, fp8.make_recipe(model, lin))
        proxy.scales = {others[n].data_ptr(): fp8.LinearScales(fp8.input_scale(a), fp8.weight_scale(others[n]))
                        for n, a in chosen.items() if n in others}
        return len(chosen)

    jobs = [(k, label, groups, DEFAULT_CALIB, 1.0) for k, label, groups in CONFIGS]
    jobs += [(f"default@{n}", f"policy, {n} calibration tokens", POLICY, n, 1.0)
             for n in args.calib_sizes if n != DEFAULT_CALIB]
    jobs += [(f"default-h{h:g}", f"policy, activation scale x{h:g} headroom", POLICY,
              DEFAULT_CALIB, h) for h in args.headrooms]
    for key, label, groups, n_cal, headroom in jobs:
        rkey = f"ablate.{key}"
        if res.get(rkey) and rkey not in args.redo_keys:
            continue
        if groups and base_lp is None:  # KL needs the fp32 log-probs of this slice first
            configure((), {})
            res.put("ablate.none", {**score(True), "label": CONFIGS[0][1], "groups": [], "linears": 0,
                                    "calib_tokens": 0})
        amax = amax_for(n_cal) if groups else {}
        n_lin = configure(groups, amax, headroom)
        log(f"ablation {key}: {n_lin} GEMMs in FP8, scoring")
        r = score(not groups)
        r.update(label=label, groups=list(groups), linears=n_lin, calib_tokens=n_cal if groups else 0,
                 headroom=headroom)
        log(f"  -> {r.get('bits_per_byte', r.get('nll_per_token'))}")
        res.put(rkey, r)
    fp8.apply_recipe(model, None)
    proxy.scales = {}
    if tokenizer is not None and (res.get("heldout_amax") is None or "heldout_amax" in args.redo_keys):
        # how far the held-out slice's activations go past the calibrated amax (saturation)
        ids, _, _ = encode_for_eval(tokenizer, text)
        proxy.amax = {}
        held = fp8.calibrate(model, calibration_batches(ids, args.context), names=called)
        held.update(proxy.amax)
        proxy.amax = None
        out = {}
        for n_cal in sorted({DEFAULT_CALIB, *args.calib_sizes}):
            cal = amax_for(n_cal)
            ratios: dict[str, list] = {}
            for n, a in held.items():
                if cal.get(n):
                    ratios.setdefault(group_of(n), []).append(a / cal[n])
            out[str(n_cal)] = {g: {"max": max(v), "median": float(np.median(v)), "over_1": sum(x > 1 for x in v),
                                   "n": len(v)} for g, v in sorted(ratios.items())}
        res.put("heldout_amax", out)


# ---------------------------------------------------------------------------- ModelOpt
def modelopt_calib_npz(export_dir: Path, path: Path, n_tokens: int, chunk: int) -> dict:
    """ModelOpt's calibration data: for each prefill chunk of `chunk` tokens of the calibration
    windows (1024 tokens, the same tokens as hatrt's calibration), the step's inputs: input_ids
    [1, chunk], logits_index [chunk - 1], and the cache before the chunk (fixed capacity)."""
    from engines.backends import load_backend
    from engines.quantize import calibration_batches
    from exporter import contract

    ref = load_backend(export_dir, "torch")
    toks, info = calib_tokens(n_tokens, export_dir)
    names = contract.step_input_names(ref.layout)
    samples = {n: [] for n in names}
    for window in calibration_batches(toks):
        if window.shape[1] % chunk:
            continue
        cache = ref.new_cache(1)
        cache.ensure_capacity(ref.config, window.shape[1] - 1)
        for start in range(0, window.shape[1], chunk):
            part = window[:, start:start + chunk]
            samples[names[0]].append(part.numpy())
            samples[names[1]].append(np.array([chunk - 1], np.int64))
            for n, t in zip(names[2:], cache.tensors):
                samples[n].append(t.clone().numpy())
            ref.step(part, cache)
    arrays = {n: np.concatenate(v, 0) for n, v in samples.items()}
    np.savez(path, **arrays)
    return {"tokens": len(toks), "samples": len(arrays[names[0]]), "chunk": chunk, "source": info["source"]}


def weight_fingerprints(path: Path) -> dict:
    """{fingerprint: linear name} of the `model.*` 2-D initializers of an unquantized graph: to name
    the weights of a graph whose tool renamed them (onnxslim folds Transposes into new constants)."""
    import onnx
    from onnx import numpy_helper

    out = {}
    for i in onnx.load(str(path)).graph.initializer:
        if i.name.startswith("model.") and len(i.dims) == 2:
            a = numpy_helper.to_array(i).astype(np.float64)
            out[_fingerprint(a)] = i.name.removeprefix("model.").removesuffix(".weight")
    return out


def _fingerprint(a: np.ndarray) -> tuple:
    return (tuple(sorted(a.shape)), round(float(np.abs(a).sum()), 3), round(float((a * a).sum()), 5))


def graph_summary(path: Path, names_from: Path | None = None) -> dict:
    """What a Q/DQ graph quantized: Q/DQ counts, GEMMs fed by a DQ (directly or through
    Transpose / Cast), per-tensor vs per-channel weight scales, Q/DQ on other ops (Add ...).
    names_from: the unquantized graph, to name renamed weights by their values."""
    import onnx
    from onnx import numpy_helper

    fingerprints = weight_fingerprints(names_from) if names_from is not None else {}
    m = onnx.load(str(path))
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    prod = {o: n for n in g.node for o in n.output}
    cons: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)

    def shape_of(name):
        if name in inits:
            return list(inits[name].dims)
        if name in consts:
            return list(numpy_helper.to_array(consts[name].attribute[0].t).shape)
        return None

    def from_dq(name, hops=("Transpose", "Cast", "Reshape")):
        """(DQ node, path of ops between it and the consumer) feeding `name`, else None."""
        path = []
        n = prod.get(name)
        while n is not None and n.op_type in hops:
            path.append(n.op_type)
            n = prod.get(n.input[0])
        if n is not None and n.op_type == "DequantizeLinear":
            return n, path
        return None

    def weight_name(src):
        """The initializer behind a DQ's input (through its Q and any Transpose), as a linear name."""
        n = prod.get(src)
        hops = 0
        while n is not None and n.op_type in ("QuantizeLinear", "Transpose", "Cast") and hops < 4:
            src, n, hops = n.input[0], prod.get(n.input[0]), hops + 1
        if src not in inits:
            return "(activation)"
        if not src.startswith("model.") and fingerprints and inits[src].data_type == onnx.TensorProto.FLOAT:
            return fingerprints.get(_fingerprint(numpy_helper.to_array(inits[src]).astype(np.float64)), src)
        return src.removeprefix("model.").removesuffix(".fp8").removesuffix(".weight")

    ops = {}
    for n in g.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    gemms = [n for n in g.node if n.op_type in ("MatMul", "Gemm")]
    q_gemms, direct, via, w_per_tensor, w_per_channel, fp8_w_init, w_names = 0, 0, {}, 0, 0, 0, []
    both = 0
    for n in gemms:
        got = [from_dq(n.input[i]) for i in range(2)]
        if not any(got):
            continue
        q_gemms += 1
        both += all(got)
        wd = got[1]
        if wd is None:
            continue
        dq, hops = wd
        if hops:
            via["+".join(hops)] = via.get("+".join(hops), 0) + 1
        else:
            direct += 1
        s = shape_of(dq.input[1])
        if s is not None and len(s) >= 1 and int(np.prod(s)) > 1:
            w_per_channel += 1
        else:
            w_per_tensor += 1
        src = dq.input[0]
        if src in inits and inits[src].data_type in (onnx.TensorProto.FLOAT8E4M3FN,):
            fp8_w_init += 1
        w_names.append(weight_name(src))
    # what else a DQ feeds
    fed = {}
    for n in g.node:
        if n.op_type != "DequantizeLinear":
            continue
        for c in cons.get(n.output[0], []):
            fed[c.op_type] = fed.get(c.op_type, 0) + 1
    groups: dict[str, int] = {}
    for w in w_names:
        grp = "mhc mixes (hc_*_fn)" if w.endswith("_fn") else ("activation x activation" if w == "(activation)"
                                                                 else group_of(w))
        groups[grp] = groups.get(grp, 0) + 1
    q_adds = sum(1 for n in g.node if n.op_type == "Add" and any(
        prod.get(i) is not None and prod[i].op_type == "DequantizeLinear" for i in n.input))
    scale_shapes: dict = {}
    for n in g.node:
        if n.op_type == "DequantizeLinear":
            shp = shape_of(n.input[1])
            k = tuple(shp) if shp is not None else ("?",)
            scale_shapes[k] = scale_shapes.get(k, 0) + 1
    q_types = {}
    for n in g.node:
        if n.op_type == "QuantizeLinear":
            zp = n.input[2] if len(n.input) > 2 else None
            t = inits[zp].data_type if zp in inits else (consts[zp].attribute[0].t.data_type if zp in consts else None)
            key = onnx.TensorProto.DataType.Name(t) if t is not None else "attr output_dtype"
            q_types[key] = q_types.get(key, 0) + 1
    return {"file_bytes": path.stat().st_size, "nodes": len(g.node), "QuantizeLinear": ops.get("QuantizeLinear", 0),
            "DequantizeLinear": ops.get("DequantizeLinear", 0), "q_dtypes": q_types,
            "gemms": len(gemms), "gemms_with_dq_input": q_gemms, "gemms_both_inputs_dq": both,
            "weight_dq_feeds_gemm_directly": direct, "weight_dq_through": via,
            "weight_scales_per_tensor": w_per_tensor, "weight_scales_per_channel": w_per_channel,
            "fp8_weight_initializers": fp8_w_init, "dq_consumers": fed,
            "functions": len(m.functions), "opset": {o.domain or "ai.onnx": o.version for o in m.opset_import},
            "quantized_gemm_groups": groups, "quantized_adds": q_adds, "quantized_gemms": sorted(w_names),
            "dq_scale_shapes": {str(k): v for k, v in scale_shapes.items()}}


def install_graph(export_dir: Path, onnx_path: Path, out_dir: Path) -> None:
    """An export directory whose step.onnx is `onnx_path` (manifest file hashes recomputed)."""
    from exporter import contract

    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(export_dir, out_dir)
    shutil.copyfile(onnx_path, out_dir / contract.STEP_FILE)
    if Path(str(onnx_path) + "_data").exists():
        shutil.copyfile(str(onnx_path) + "_data", out_dir / (Path(onnx_path).name + "_data"))
    (out_dir / contract.STEP_TRT_FILE).unlink(missing_ok=True)
    man = json.loads((out_dir / contract.MANIFEST).read_text())
    man["graphs"][contract.STEP].pop("trt_file", None)
    man["files"] = {p.name: contract.file_record(p) for p in sorted(out_dir.iterdir())
                    if p.is_file() and p.name != contract.MANIFEST}
    (out_dir / contract.MANIFEST).write_text(json.dumps(man, indent=2) + "\n")


def stage_modelopt(args, res: Results) -> None:
    mo = args.work / "modelopt"
    mo.mkdir(exist_ok=True)
    npz = mo / "calib.npz"
    if not npz.is_file() or "modelopt.calib" in args.redo_keys:
        log("building ModelOpt calibration data")
        res.put("modelopt.calib", modelopt_calib_npz(args.work / "fp32", npz, DEFAULT_CALIB, args.modelopt_chunk))
    if res.get("modelopt.fp32_graph") is None:
        res.put("modelopt.fp32_graph", graph_summary(args.work / "fp32" / "step.onnx"))
    if res.get("modelopt.hatrt_graph") is None and (args.work / "fp8" / "step.onnx").is_file():
        res.put("modelopt.hatrt_graph", graph_summary(args.work / "fp8" / "step.onnx"))
    for variant in args.modelopt_variants:
        key = f"modelopt.{variant}"
        if res.get(key) and key not in args.redo_keys:
            continue
        extra = {"max": ["--calibration_method", "max"], "max+simplify": ["--calibration_method", "max", "--simplify"],
                 "max+no-add": ["--calibration_method", "max", "--op_types_to_exclude", "Add"],
                 "entropy": [], "entropy+simplify": ["--simplify"]}[variant]
        out = mo / f"step.{variant}.onnx"
        # ModelOpt 0.47 rewrites its input in place (onnx.shape_inference.infer_shapes_path adds
        # value_info), which breaks the export's manifest hash: give it a copy
        src = mo / "input" / "step.onnx"
        src.parent.mkdir(exist_ok=True)
        shutil.copyfile(args.work / "fp32" / "step.onnx", src)
        cmd = [str(args.modelopt_python), "-m", "modelopt.onnx.quantization", "--onnx_path",
               str(src), "--quantize_mode", "fp8", "--calibration_data_path", str(npz),
               "--calibration_eps", "cpu", "--high_precision_dtype", "fp32", "--output_path", str(out), *extra]
        t0 = time.monotonic()
        r = subprocess.run(cmd, cwd=mo, text=True, capture_output=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=args.modelopt_timeout)
        entry = {"command": " ".join(cmd[1:]), "exit_code": r.returncode, "seconds": time.monotonic() - t0,
                 "log_tail": (r.stdout + r.stderr)[-2500:]}
        (mo / f"{variant}.log").write_text(r.stdout + r.stderr)
        if r.returncode == 0 and out.is_file():
            entry["graph"] = graph_summary(out, args.work / "fp32" / "step.onnx")
            every = set(weight_fingerprints(args.work / "fp32" / "step.onnx").values())
            policy = {n for n in every if fp8.is_fp8_linear(n)}
            done = set(entry["graph"]["quantized_gemms"])
            entry["policy_gemms_not_quantized"] = sorted(policy - done)
            entry["quantized_outside_policy"] = sorted(done - policy)
            exp = mo / f"export.{variant}"
            install_graph(args.work / "fp32", out, exp)
            try:
                entry["eval"] = hatrt_eval(args, exp, "onnxruntime")
                entry["runs_in_ort_cpu"] = True
            except RuntimeError as e:
                entry["runs_in_ort_cpu"] = False
                entry["eval_error"] = str(e)[-2500:]
        res.put(key, entry)
        log(f"ModelOpt {variant}: exit {r.returncode} in {entry['seconds']:.0f} s")


def stage_ortkl(args, res: Results) -> None:
    """KL(fp32 || quantized) and top-1 agreement per token, ONNX Runtime graphs against the fp32
    export, on the first --kl-windows windows of the slice (the same windows `hatrt eval` runs)."""
    from engines import text as text_mod
    from engines.backends import OnnxRuntimeBackend
    from engines.evaluate import encode_for_eval, window_spans

    tokenizer = text_mod.load_tokenizer(args.work / "fp32")
    ids, _, _ = encode_for_eval(tokenizer, (args.work / "heldout_slice.txt").read_text())
    seq = torch.tensor(ids)
    spans = window_spans(len(ids), args.context)[:args.kl_windows]
    graphs = {"hatrt": args.work / "fp8"}
    graphs.update({f"modelopt {v}": args.work / "modelopt" / f"export.{v}" for v in args.modelopt_variants})
    fp32 = OnnxRuntimeBackend(args.work / "fp32", verify="none")
    base = [fp32.prefill(seq[s:e].view(1, -1), all_logits=True)[0][0, :-1].log_softmax(-1) for s, e in spans]
    out = {"windows": len(spans), "tokens": sum(e - s - 1 for s, e in spans)}
    for name, d in graphs.items():
        if not (d / "step.onnx").is_file():
            continue
        be = OnnxRuntimeBackend(d, verify="none")
        kl, agree = 0.0, 0
        for (s, e), b in zip(spans, base):
            lp = be.prefill(seq[s:e].view(1, -1), all_logits=True)[0][0, :-1].log_softmax(-1)
            kl += float((b.exp() * (b - lp)).sum().double())
            agree += int((b.argmax(-1) == lp.argmax(-1)).sum())
        out[name] = {"kl_per_token": kl / out["tokens"], "top1_agreement": agree / out["tokens"]}
        log(f"{name}: KL {out[name]['kl_per_token']:.5f} top-1 {out[name]['top1_agreement']:.4f}")
    res.put("ortkl", out)


# ---------------------------------------------------------------------------- report
def bpb(d: dict | None):
    if not d:
        return None
    return d.get("bits_per_byte", d.get("nll_per_token"))


def stage_report(args, res: Results) -> dict:
    rows = []
    base_t = bpb(res.get("ablate.none"))
    for key, label, groups in CONFIGS:
        d = res.get(f"ablate.{key}")
        if d:
            rows.append({"config": key, "label": label, "backend": "torch (reference simulation)",
                         "linears": d["linears"], "calib_tokens": d["calib_tokens"], "bpb": bpb(d),
                         "delta_pct": 100 * (bpb(d) / base_t - 1) if base_t else None,
                         "kl": d.get("kl_per_token"), "top1": d.get("top1_agreement")})
    for n in args.calib_sizes:
        d = res.get(f"ablate.default@{n}") if n != DEFAULT_CALIB else res.get("ablate.default")
        if d:
            rows.append({"config": f"calib {n}", "label": f"policy, {n} calibration tokens",
                         "backend": "torch (reference simulation)", "linears": d["linears"], "calib_tokens": n,
                         "bpb": bpb(d), "delta_pct": 100 * (bpb(d) / base_t - 1) if base_t else None,
                         "kl": d.get("kl_per_token"), "top1": d.get("top1_agreement")})
    for h in args.headrooms:
        d = res.get(f"ablate.default-h{h:g}")
        if d:
            rows.append({"config": f"headroom x{h:g}", "label": d["label"], "backend": "torch (reference simulation)",
                         "linears": d["linears"], "calib_tokens": d["calib_tokens"], "bpb": bpb(d),
                         "delta_pct": 100 * (bpb(d) / base_t - 1) if base_t else None,
                         "kl": d.get("kl_per_token"), "top1": d.get("top1_agreement")})
    base_o = bpb(res.get("ort.fp32"))
    q = res.get("quantize") or {}
    okl = res.get("ortkl") or {}
    for key, label, lin in [("ort.fp32", "fp32 export (ONNX Runtime)", 0),
                            ("ort.fp8", "hatrt quantize, default policy (ONNX Runtime)", q.get("linears"))]:
        d = res.get(key)
        if d:
            k = okl.get("hatrt", {}) if key == "ort.fp8" else {}
            rows.append({"config": key, "label": label, "backend": "onnxruntime CPU", "linears": lin,
                         "calib_tokens": DEFAULT_CALIB if lin else 0, "bpb": bpb(d),
                         "delta_pct": 100 * (bpb(d) / base_o - 1) if base_o else None,
                         "kl": k.get("kl_per_token"), "top1": k.get("top1_agreement")})
    f32, f8 = bpb(res.get("full.fp32")), bpb(res.get("full.fp8"))
    if f32 and f8:
        rows.append({"config": "full held-out", "label": "hatrt quantize vs fp32, whole held-out split (ONNX Runtime)",
                     "backend": "onnxruntime CPU", "linears": q.get("linears"), "calib_tokens": DEFAULT_CALIB,
                     "bpb": f8, "delta_pct": 100 * (f8 / f32 - 1), "fp32_bpb": f32})
    for v in args.modelopt_variants:
        d = res.get(f"modelopt.{v}")
        if d and d.get("eval"):
            g = d["graph"]
            rows.append({"config": f"modelopt {v}", "label": f"ModelOpt ONNX PTQ fp8 ({v})",
                         "backend": "onnxruntime CPU", "linears": g["gemms_with_dq_input"],
                         "calib_tokens": (res.get("modelopt.calib") or {}).get("tokens"), "bpb": bpb(d["eval"]),
                         "delta_pct": 100 * (bpb(d["eval"]) / base_o - 1) if base_o else None,
                         "kl": okl.get(f"modelopt {v}", {}).get("kl_per_token"),
                         "top1": okl.get(f"modelopt {v}", {}).get("top1_agreement")})
    unit = "bits/byte" if base_t is None or (res.get("ablate.none") or {}).get("bits_per_byte") else "nats/token"
    print(f"{'config':<22} {'backend':<28} {'GEMMs':>6} {'calib':>6} {unit:>10} {'delta %':>8} {'KL/token':>9} "
          f"{'top-1':>7}")
    for r in rows:
        kl = f"{r['kl']:9.5f}" if r.get("kl") is not None else f"{'':9}"
        t1 = f"{r['top1']:7.4f}" if r.get("top1") is not None else f"{'':7}"
        print(f"{r['config']:<22} {r['backend']:<28} {r['linears'] or 0:>6} {r['calib_tokens'] or 0:>6} "
              f"{r['bpb']:>10.5f} {r['delta_pct'] if r['delta_pct'] is not None else float('nan'):>+8.3f} {kl} {t1}")
    summary = {"rows": rows, "unit": unit, "model": str(args.model), "context": args.context,
               "cap_chars": args.cap_chars, "slice": res.get("slice"), "machine": res.get("machine"),
               "results": res.data}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    if args.plot:
        plot(rows, unit, Path(args.plot), res)
    return summary


def plot(rows, unit, path: Path, res: Results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    abl = [r for r in rows if r["backend"].startswith("torch") and not r["config"].startswith("calib")
           and r["config"] != "none"]
    ort = [r for r in rows if r["backend"] == "onnxruntime CPU" and r["config"] != "ort.fp32"]
    cal = [r for r in rows if r["config"].startswith("calib")]
    bars = abl + ort
    labels = [r["label"].replace(" (ONNX Runtime)", ", ORT") + f"  [{r['linears']}]" for r in bars]
    colors = ["#4c72b0" if r["backend"].startswith("torch") else ("#55a868" if "hatrt" in r["label"] else "#c44e52")
              for r in bars]
    y = np.arange(len(bars))
    fig, axes = plt.subplots(1, 3, figsize=(16, 6.2), gridspec_kw={"width_ratios": [1.6, 1, 1]})
    ax = axes[0]
    vals = [r["delta_pct"] for r in bars]
    ax.barh(y, vals, color=colors)
    for yi, v in zip(y, vals):
        ax.text(max(v, 0), yi, f" {v:+.3f}%", va="center", fontsize=7.5)
    ax.set_yticks(y, labels, fontsize=7.5)
    ax.invert_yaxis()
    ax.set_xlim(min(0.0, min(vals) * 1.3), max(vals) * 1.35)
    ax.set_xlabel(f"held-out {unit} vs fp32, % (target: < 3%)", fontsize=8)
    ax.set_title("Cost of FP8 by the GEMMs quantized [count]\nblue: reference simulation; green: hatrt FP8 "
                 "ONNX; red: ModelOpt ONNX", fontsize=9)
    ax = axes[1]
    kl = [r.get("kl") for r in bars]
    ax.barh(y, [k or 0 for k in kl], color=colors)
    for yi, k in zip(y, kl):
        ax.text(k or 0, yi, f" {k:.4f}" if k is not None else " n/a", va="center", fontsize=7.5)
    ax.set_yticks(y, [""] * len(y))
    ax.invert_yaxis()
    ax.set_xlim(0, max(k or 0 for k in kl) * 1.3)
    ax.set_xlabel("KL(fp32 || FP8) per token, nats (ORT rows: first 8 windows)", fontsize=8)
    ax.set_title("Distribution shift vs fp32", fontsize=9)
    ax = axes[2]
    if cal:
        xs = [r["calib_tokens"] for r in cal]
        ax.plot(xs, [r["delta_pct"] for r in cal], "o-", color="#4c72b0", label=f"{unit} vs fp32, %")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("calibration tokens (training split)", fontsize=8)
        ax.set_ylabel(f"{unit} vs fp32, %", color="#4c72b0", fontsize=8)
        ax2 = ax.twinx()
        ax2.plot(xs, [r.get("kl") for r in cal], "s--", color="#dd8452")
        ax2.set_ylabel("KL per token", color="#dd8452", fontsize=8)
        ax.set_title("Policy (124 GEMMs): calibration size", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")


# ============================================================================ main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(REPO / "models" / "tiny-stdlib"),
                    help="checkpoint directory (or a preset: random tokens, nats/token)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fp8_study"))
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--redo", default="", help="comma-separated result keys to recompute (e.g. ablate.all)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--cap-chars", type=int, default=5000, help="characters of each held-out file in the slice")
    ap.add_argument("--random-tokens", type=int, default=8192, help="tokens scored without a tokenizer")
    ap.add_argument("--calib-sizes", default="256,4096,16384")
    ap.add_argument("--headrooms", default="4,12.44", help="activation-scale headroom factors to try")
    ap.add_argument("--kl-windows", type=int, default=8, help="windows of the slice for the ONNX Runtime KL stage")
    ap.add_argument("--check-steps", type=int, default=8)
    ap.add_argument("--modelopt-python", type=Path, default=Path("/tmp/modelopt-venv/bin/python"))
    ap.add_argument("--modelopt-variants", default="max,max+simplify")
    ap.add_argument("--modelopt-chunk", type=int, default=256)
    ap.add_argument("--modelopt-timeout", type=int, default=3600)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    args.model = Path(args.model) if Path(args.model).exists() else args.model
    args.work.mkdir(parents=True, exist_ok=True)
    args.calib_sizes = [int(x) for x in args.calib_sizes.split(",") if x]
    args.headrooms = [float(x) for x in args.headrooms.split(",") if x]
    args.modelopt_variants = [v for v in args.modelopt_variants.split(",") if v]
    args.redo_keys = {k for k in args.redo.split(",") if k}
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    res = Results(args.work / "results.json")
    if res.get("model") and res.get("model") != str(args.model):
        raise SystemExit(f"{args.work} holds results for {res.get('model')}; use another --work")
    res.put("model", str(args.model))
    res.put("machine", {"cpus": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS"),
                        "loadavg_at_start": os.getloadavg(), "torch": torch.__version__})
    slice_file = args.work / "heldout_slice.txt"
    if isinstance(args.model, Path) and has_tokenizer(args.model) and not slice_file.is_file():
        text = heldout_slice(args.cap_chars)
        slice_file.write_text(text)
        res.put("slice", {"cap_chars": args.cap_chars, "chars": len(text), "utf8_bytes": len(text.encode())})
    stages = [s for s in args.stages.split(",") if s]
    for s in stages:
        if s not in STAGES:
            raise SystemExit(f"unknown stage {s!r}; choose from {', '.join(STAGES)}")
        done = res.get(s) is not None and s in ("export", "quantize", "check") and s not in args.redo_keys
        if done:
            continue
        if s in ("ort", "full", "ortkl") and not slice_file.is_file():
            log("no tokenizer: skipping the ONNX Runtime bits-per-byte stage")
            continue
        log(f"stage {s}")
        t0 = time.monotonic()
        {"export": stage_export, "quantize": stage_quantize, "ort": stage_ort, "full": stage_full,
         "check": stage_check,
         "ablate": stage_ablate, "modelopt": stage_modelopt, "ortkl": stage_ortkl,
         "report": stage_report}[s](args, res)
        log(f"stage {s} done in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
