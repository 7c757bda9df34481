"""`hatrt check`: compare an exported backend with the PyTorch reference, output by output.

The export directory's manifest says which model was exported (preset or checkpoint, dtype,
quantization simulation) and how the graphs are wired. The check rebuilds the reference from that
source and drives both sides through Polygraphy runners:

- backend: Polygraphy's `OnnxrtRunner` (ONNX Runtime, CPU) on prefill.onnx and decode.onnx
  (TensorRT runners slot in here later);
- reference: `TorchGraphRunner`, a small `BaseRunner` around exporter/graph.py's PrefillGraph /
  DecodeGraph (Polygraphy's own PytRunner needs CUDA torch).

Scenario, per prompt (batch 1): prefill, then `steps` decode steps. Each side decodes from ITS OWN
cache, so errors accumulate as in real use; the next token is the argmax of the REFERENCE logits,
so both sides see the same token stream. Entry capacities are grown before each step
(`cache_ops.ensure_capacity`), identically on both sides.

Verdict: `Comparator.compare_accuracy` with a `SimpleCompareFunc` (per-output tolerance dicts,
element-wise). Float outputs are compared relative to their scale: both sides are divided by the
largest finite |reference| value of that output in that step before Polygraphy compares them, so
`atol` means "relative to max|ref|" (for logits: relative to the largest logit of the step) and
`rtol` is the usual element-wise relative error. Integer outputs (positions) must match exactly.
NaN never passes; matching infinities (empty compressor slots hold -inf) compare equal.

Reported besides the verdict: max abs / max rel (to max|ref|) error per output, cosine similarity,
top-1 and top-5 set agreement of the logits, and in per-layer exports the first layer whose
streams leave the tolerance (the first step at which any layer fails, then its lowest layer).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

MANIFEST = "manifest.json"
INPUT_IDS, LOGITS = "input_ids", "logits"
CACHE_IN, CACHE_OUT = "cache.", "new_cache."
BACKEND_NAME, REFERENCE_NAME = "onnxruntime", "torch"
DEFAULT_PROMPT_LENGTHS = (200, 300)  # cross the CSA block (4), the window (128) and HCA blocks (128)
DEFAULT_STEPS = 32
TOP_K = 5
# (rtol, atol) per precision; atol is relative to max|ref| of the output in that step (see above).
DEFAULT_TOLERANCES = {"float32": (1e-5, 1e-5), "float16": (1e-2, 1e-2)}
# Which element errors must be within tolerance. fp32: every element. fp16: 95% of the elements of
# an output over a phase (Polygraphy's "quantile" statistic): fp16 rounding flips discrete
# decisions at near-ties (MoE routing, indexer top-k), which moves a few positions by a lot while
# the rest agree to 1e-3. A corrupted weight moves everything and still fails.
ERROR_QUANTILE = {"float32": None, "float16": 0.95}
# At reduced precision one flipped routing/top-k decision legitimately changes a compressed entry
# (it pools 4 or 128 tokens) and every later state: the verdict then rests on the logits (95% of
# elements within tolerance, no NaN); cache and per-layer outputs are reported as diagnostics.
VERDICT_GROUPS = {"float32": ("logits", "cache", "layers"), "float16": ("logits",)}
GROUPS = ("logits", "cache", "layers")


class CheckError(ValueError):
    """The check cannot run as asked (bad directory, manifest, prompt...); the message names it."""


# ============================================================================ report
@dataclass
class OutputStats:
    """One output over every compared step."""

    name: str
    group: str  # logits | cache | layers
    rtol: float
    atol: float
    passed: bool = True
    max_abs: float = 0.0  # max |backend - ref|
    max_rel: float = 0.0  # max |backend - ref| / max|ref| of the same step
    steps: int = 0  # compared steps
    failed_steps: int = 0
    first_failure: str | None = None  # the step label
    comparator_passed: bool = True  # Polygraphy's compare_accuracy verdict over all steps
    nan: bool = False  # NaN (or a non-matching infinity) somewhere
    shape_mismatch: bool = False
    diagnostic: bool = False  # reported, not part of the verdict (cache/layers at reduced precision)


@dataclass
class LogitMetrics:
    positions: int = 0
    min_cosine: float = 1.0
    top1_agreement: float = 1.0  # fraction of positions with the same argmax
    top5_set_agreement: float = 1.0  # fraction of positions with the same set of 5 best tokens
    top1_matches: int = 0
    top5_matches: int = 0


@dataclass
class CheckReport:
    passed: bool
    artifact_dir: str
    model: str
    dtype: str
    backend: str
    reference: str
    per_layer: bool
    steps: int
    prompt_lengths: list[int]
    seed: int | None
    rtol: float
    atol: float
    outputs: dict[str, OutputStats]
    logits: LogitMetrics
    first_diverging_layer: str | None = None  # "layer 2 (CSA)"
    first_diverging_layer_index: int | None = None
    first_diverging_step: str | None = None  # where that layer first failed
    first_failure: str | None = None  # "logits at prompt 0 decode step 3"
    failed_outputs: list[str] = field(default_factory=list)
    layer_kinds: list[str] = field(default_factory=list)
    seconds: float = 0.0
    backend_seconds: float = 0.0
    reference_seconds: float = 0.0

    def group(self, name: str) -> list[OutputStats]:
        return [s for s in self.outputs.values() if s.group == name]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["outputs"] = {k: _json_floats(asdict(v)) for k, v in self.outputs.items()}
        d["logits"] = _json_floats(asdict(self.logits))
        return d


def _json_floats(d: dict) -> dict:
    """NaN / inf are not JSON: write them as strings."""
    return {k: (str(v) if isinstance(v, float) and not np.isfinite(v) else v) for k, v in d.items()}


# ============================================================================ runners
def _polygraphy():
    try:
        from polygraphy.backend.base import BaseRunner
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
        from polygraphy.common import TensorMetadata
        from polygraphy.comparator import Comparator, RunResults
        from polygraphy.comparator.struct import IterationResult
        from polygraphy.logger import G_LOGGER
    except ImportError as e:
        raise CheckError(f"hatrt check needs polygraphy (pip install polygraphy): {e}") from None
    try:
        from polygraphy.comparator.compare import SimpleCompareFunc as simple_compare
    except ImportError:  # polygraphy < 0.53
        from polygraphy.comparator import CompareFunc

        simple_compare = CompareFunc.simple
    return dict(BaseRunner=BaseRunner, OnnxrtRunner=OnnxrtRunner, SessionFromOnnx=SessionFromOnnx,
                TensorMetadata=TensorMetadata, Comparator=Comparator, RunResults=RunResults,
                IterationResult=IterationResult, G_LOGGER=G_LOGGER, simple_compare=simple_compare)


@functools.lru_cache(maxsize=None)
def _torch_runner_class():
    BaseRunner = _polygraphy()["BaseRunner"]

    class TorchGraphRunner(BaseRunner):
        """A Polygraphy runner around a torch module with flat tensor I/O (PrefillGraph /
        DecodeGraph): numpy feed_dict in, OrderedDict of numpy outputs out, `inference_time` set."""

        def __init__(self, module: torch.nn.Module, inputs: Sequence[dict], outputs: Sequence[str],
                     name: str | None = None):
            super().__init__(name=name, prefix="torch-runner")
            self.module, self.inputs, self.outputs = module.eval(), list(inputs), list(outputs)

        def get_input_metadata_impl(self):
            meta = _polygraphy()["TensorMetadata"]()
            for spec in self.inputs:
                meta.add(spec["name"], np.dtype(spec["dtype"]),
                         [d if isinstance(d, int) else None for d in spec["dims"]])
            return meta

        def infer_impl(self, feed_dict):
            # copies: the reference updates its cache in place, the caller keeps its arrays
            args = [torch.from_numpy(np.array(feed_dict[s["name"]], copy=True)) for s in self.inputs]
            start = time.perf_counter()
            with torch.no_grad():
                out = self.module(*args)
            self.inference_time = time.perf_counter() - start
            if len(out) != len(self.outputs):
                raise CheckError(f"{self.name}: the reference returned {len(out)} outputs, the manifest "
                                 f"lists {len(self.outputs)}")
            return OrderedDict((n, t.detach().cpu().numpy()) for n, t in zip(self.outputs, out))

    return TorchGraphRunner


def __getattr__(name: str):  # TorchGraphRunner, importable once polygraphy is there
    if name == "TorchGraphRunner":
        return _torch_runner_class()
    raise AttributeError(name)


# ============================================================================ setup
def _read_manifest(artifact_dir: Path) -> dict:
    from exporter.export import ExportError, read_manifest

    try:
        manifest = read_manifest(artifact_dir)
    except ExportError as e:
        raise CheckError(str(e)) from None
    if "source" not in manifest:
        raise CheckError(f"{artifact_dir / MANIFEST}: missing key 'source'")
    return manifest


def _reference_model(manifest: dict, where: Path):
    from exporter.checkpoint import CheckpointError, load_model
    from exporter.export import DTYPES

    source = manifest["source"]
    kind, value = source.get("kind"), source.get("value")
    if kind not in ("preset", "checkpoint") or not value:
        raise CheckError(f"{where}: source {source!r} cannot be rebuilt (exported from an in-memory module); "
                         "pass the reference model to check(..., reference=model)")
    try:
        return load_model(value, dtype=DTYPES[manifest["dtype"]], quant_sim=bool(manifest.get("quant_sim", False)))
    except CheckpointError as e:
        raise CheckError(f"{where}: cannot load the reference ({kind} {value!r}): {e}") from None


def _layout(manifest: dict):
    from exporter.cache import TensorSpec

    return [TensorSpec(s["name"], tuple(s["dims"]), s["dtype"]) for s in manifest["cache_layout"]]


def _prompts(prompts, seed: int, vocab: int) -> list[list[int]]:
    if prompts is None:
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in DEFAULT_PROMPT_LENGTHS]
    out = []
    for i, p in enumerate(prompts):
        ids = [int(t) for t in p]
        if not ids:
            raise CheckError(f"prompt {i} is empty: a prompt needs at least one token id")
        bad = [t for t in ids if t < 0 or t >= vocab]
        if bad:
            raise CheckError(f"prompt {i}: token ids {bad[:8]} are outside the vocabulary [0, {vocab})")
        out.append(ids)
    if not out:
        raise CheckError("no prompts given")
    return out


def _ensure_capacity(cache: list[np.ndarray], layout, config, pos: int) -> list[np.ndarray]:
    """Entry capacities >= the complete blocks after feeding the token at `pos`."""
    try:
        from engines import cache_ops
    except ImportError:  # the helper module is absent: grow locally (exactly what is needed)
        cache_ops = None
    if cache_ops is not None:
        need = cache_ops.entries_needed(config, pos)
        grown = cache_ops.ensure_capacity([torch.from_numpy(np.ascontiguousarray(a)) for a in cache], layout,
                                          need.get("csa_entries", 0), need.get("hca_entries", 0))
        return [t.numpy() for t in grown]
    from exporter.cache import CSA_ENTRIES, HCA_ENTRIES
    from exporter.config import CSA, HCA

    need = {CSA_ENTRIES: (pos + 1) // CSA, HCA_ENTRIES: (pos + 1) // HCA}
    out = []
    for a, spec in zip(cache, layout):
        for axis, d in enumerate(spec.dims):
            if d in need and a.shape[axis] < need[d]:
                pad = [(0, 0)] * a.ndim
                pad[axis] = (0, need[d] - a.shape[axis])
                a = np.pad(a, pad)
        out.append(a)
    return out


# ============================================================================ comparison
def _group(name: str) -> str:
    if name == LOGITS:
        return "logits"
    if name.startswith(CACHE_OUT):
        return "cache"
    return "layers"


def _scale(ref: np.ndarray) -> float:
    finite = np.abs(ref[np.isfinite(ref)]) if ref.size else ref
    s = float(finite.max()) if finite.size else 0.0
    return s if s > 0 else 1.0


def _tolerances(names: Sequence[str], dtypes: dict[str, str], rtol: float, atol: float):
    rt, at = {}, {}
    for n in names:
        exact = np.issubdtype(np.dtype(dtypes[n]), np.integer)
        rt[n], at[n] = (0.0, 0.0) if exact else (rtol, atol)
    return rt, at


def _diff_stats(a: np.ndarray, b: np.ndarray) -> tuple[float, float, bool]:
    """(max abs error, max abs error / max|ref|, any NaN or mismatched infinity)."""
    if a.shape != b.shape:
        return float("nan"), float("nan"), True
    if not np.issubdtype(a.dtype, np.floating):
        d = np.abs(a.astype(np.int64) - b.astype(np.int64))
        m = float(d.max()) if d.size else 0.0
        return m, m / _scale(b.astype(np.float64)), False
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    with np.errstate(invalid="ignore"):
        same_inf = np.isinf(a64) & (a64 == b64)
        d = np.where(same_inf, 0.0, np.abs(a64 - b64))
    bad = bool(np.isnan(d).any())
    m = float(np.nanmax(d)) if d.size and not np.isnan(d).all() else 0.0
    if bad:
        m = float("nan")
    return m, m / _scale(b64), bad


def _step_fails(a: np.ndarray, b: np.ndarray, rtol: float, atol: float, quantile: float | None = None) -> bool:
    """Polygraphy's element-wise rule on one step (a, b already scaled): an element fails when
    (|a-b| > atol or NaN) and (|a-b| / |b| > rtol or NaN); matching infinities are equal."""
    if a.shape != b.shape:
        return True
    if not np.issubdtype(a.dtype, np.floating):
        return bool((a != b).any())
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    with np.errstate(all="ignore"):
        d = np.where(np.isinf(a64) & (a64 == b64), 0.0, np.abs(a64 - b64))
        rel = d / np.where(b64 == 0, np.finfo(np.float64).eps, np.abs(b64))
        bad = ((d > atol) | np.isnan(d)) & ((rel > rtol) | np.isnan(rel))
    if quantile is not None and not np.isnan(d).any():
        return bool(bad.mean() > 1.0 - quantile)
    return bool(bad.any())


def _logit_metrics(backend: np.ndarray, ref: np.ndarray, acc: LogitMetrics) -> None:
    a = backend.reshape(-1, backend.shape[-1]).astype(np.float64)
    b = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    cos = np.where(np.isnan(cos), -1.0, cos)
    acc.min_cosine = min(acc.min_cosine, float(cos.min()))
    acc.top1_matches += int((np.nan_to_num(a, nan=-np.inf).argmax(-1) == b.argmax(-1)).sum())
    k = min(TOP_K, a.shape[-1])
    ta = np.sort(np.argsort(-np.nan_to_num(a, nan=-np.inf), axis=-1, kind="stable")[:, :k], axis=-1)
    tb = np.sort(np.argsort(-b, axis=-1, kind="stable")[:, :k], axis=-1)
    acc.top5_matches += int((ta == tb).all(-1).sum())
    acc.positions += a.shape[0]
    acc.top1_agreement = acc.top1_matches / acc.positions
    acc.top5_set_agreement = acc.top5_matches / acc.positions


def _accuracy_result(results):
    """compare_accuracy returns an AccuracyResults list (polygraphy >= 0.53) or one AccuracyResult."""
    if hasattr(results, "lst"):
        return results[0]
    if isinstance(results, (list, tuple)):
        return results[0]
    return results


# ============================================================================ check
def check(artifact_dir: str | os.PathLike, *, steps: int = DEFAULT_STEPS, prompts: Sequence[Sequence[int]] | None = None,
          seed: int = 0, rtol: float | None = None, atol: float | None = None,
          progress: Callable[[str], None] | None = None, reference=None) -> CheckReport:
    """Run the export in `artifact_dir` (ONNX Runtime) against the PyTorch reference.

    prompts: token-id lists (default: random prompts of 200 and 300 tokens drawn with `seed`).
    steps: decode steps after each prompt. rtol / atol: override the precision's defaults
    (fp32 1e-5, fp16 1e-2) for every float output; atol is relative to max|ref| per step.
    reference: a Transformer to use instead of rebuilding the manifest's source.
    Raises CheckError for usage problems; a numerical mismatch is `report.passed == False`."""
    t_start = time.perf_counter()
    log = progress or (lambda msg: None)
    if steps < 0:
        raise CheckError(f"steps must be >= 0, got {steps}")
    artifact_dir = Path(artifact_dir)
    manifest = _read_manifest(artifact_dir)
    where = artifact_dir / MANIFEST
    pg = _polygraphy()
    dtype = manifest["dtype"]
    d_rtol, d_atol = DEFAULT_TOLERANCES[dtype]
    rtol = d_rtol if rtol is None else float(rtol)
    atol = d_atol if atol is None else float(atol)
    if rtol < 0 or atol < 0:
        raise CheckError(f"tolerances must be >= 0 (rtol={rtol}, atol={atol})")

    from exporter.config import CSA, HCA, WINDOW
    from exporter.graph import DecodeGraph, PrefillGraph

    if reference is None:
        log(f"loading the reference ({manifest['source']['kind']} {manifest['source']['value']}, {dtype})")
        model = _reference_model(manifest, where)
    else:
        model = reference.eval()
    config = model.config
    if json.loads(json.dumps(config.to_hf_dict())) != manifest["config"]:
        raise CheckError(f"{where}: the reference model's config differs from the exported one")
    per_layer = bool(manifest.get("per_layer", False))
    layout = _layout(manifest)
    from exporter.cache import cache_layout

    if list(cache_layout(config, model.dtype)) != layout:
        raise CheckError(f"{where}: the reference's cache layout ({str(model.dtype).removeprefix('torch.')}) "
                         f"differs from the exported one ({dtype})")
    prompt_ids = _prompts(prompts, seed, config.vocab_size)
    kinds = [{WINDOW: "window", CSA: "CSA", HCA: "HCA"}.get(r, f"ratio {r}") for r in config.compress_ratios]

    graphs = manifest["graphs"]
    out_names = [o["name"] for o in graphs["decode"]["outputs"]]
    prefill_out = [o["name"] for o in graphs["prefill"]["outputs"]]
    if prefill_out != out_names:
        raise CheckError(f"{where}: prefill and decode graphs have different outputs")
    dtypes = {o["name"]: o["dtype"] for o in graphs["decode"]["outputs"]}
    torch_graphs = {"prefill": PrefillGraph(model, per_layer=per_layer), "decode": DecodeGraph(model, per_layer=per_layer)}
    for g, module in torch_graphs.items():
        want = [i["name"] for i in graphs[g]["inputs"]], [o["name"] for o in graphs[g]["outputs"]]
        if (module.input_names(), module.output_names()) != want:
            raise CheckError(f"{where}: the {g} graph's inputs/outputs differ from the reference graph's "
                             "(exported by another hatrt version?)")

    TorchGraphRunner = _torch_runner_class()
    G = pg["G_LOGGER"]
    rt, at = _tolerances(out_names, dtypes, rtol, atol)
    stats = {n: OutputStats(n, _group(n), rtol=rt[n], atol=at[n]) for n in out_names}
    logit_metrics = LogitMetrics()
    labels: list[str] = []  # every step, in scenario order
    step_failures: list[set[str]] = []  # outputs outside tolerance, per step
    # Polygraphy compares one iteration per phase: each output's scaled steps flattened end to end
    # (the comparator costs ~20 ms per output and iteration, whatever the size).
    buckets = {ph: (OrderedDict((n, []) for n in out_names), OrderedDict((n, []) for n in out_names))
               for ph in ("prefill", "decode")}
    phase_time = {ph: [0.0, 0.0] for ph in buckets}
    times = {"backend": 0.0, "reference": 0.0}

    def record(phase: str, label: str, out_b: OrderedDict, out_r: OrderedDict, rt_b: float, rt_r: float) -> None:
        """Raw error stats and the step's verdict per output; floats scaled by max|ref| for the comparator."""
        labels.append(label)
        failing = set()
        phase_time[phase][0] += rt_b
        phase_time[phase][1] += rt_r
        for n in out_names:
            a, b = np.asarray(out_b[n]), np.asarray(out_r[n])
            st = stats[n]
            m_abs, m_rel, bad = _diff_stats(a, b)
            st.steps += 1
            st.nan |= bad
            st.max_abs = m_abs if np.isnan(m_abs) or np.isnan(st.max_abs) else max(st.max_abs, m_abs)
            st.max_rel = m_rel if np.isnan(m_rel) or np.isnan(st.max_rel) else max(st.max_rel, m_rel)
            if a.shape != b.shape:
                st.shape_mismatch = True
                failing.add(n)
                continue
            if np.issubdtype(a.dtype, np.floating):
                k = np.float32(_scale(b.astype(np.float64)))
                a, b = a.astype(np.float32) / k, b.astype(np.float32) / k
            if _step_fails(a, b, st.rtol, st.atol, ERROR_QUANTILE[dtype]):
                failing.add(n)
            buckets[phase][0][n].append(a.reshape(-1))
            buckets[phase][1][n].append(b.reshape(-1))
        step_failures.append(failing)
        if out_b[LOGITS].shape == out_r[LOGITS].shape:
            _logit_metrics(np.asarray(out_b[LOGITS]), np.asarray(out_r[LOGITS]), logit_metrics)

    def run_both(graph: str, runners: dict, feed_b: dict, feed_r: dict):
        rb, rr = runners[graph]
        out_b = rb.infer(feed_b)
        out_b = OrderedDict((n, np.array(out_b[n], copy=True)) for n in out_names)  # runners may reuse buffers
        out_r = rr.infer(feed_r)
        times["backend"] += rb.last_inference_time() or 0.0
        times["reference"] += rr.last_inference_time() or 0.0
        return out_b, out_r, rb.last_inference_time() or 0.0, rr.last_inference_time() or 0.0

    with G.verbosity(G.CRITICAL), contextlib.ExitStack() as stack:
        runners = {}
        for g in ("prefill", "decode"):
            path = artifact_dir / graphs[g]["file"]
            log(f"loading {path.name} in ONNX Runtime")
            try:
                rb = stack.enter_context(pg["OnnxrtRunner"](pg["SessionFromOnnx"](str(path)), name=f"{BACKEND_NAME}-{g}"))
            except Exception as e:  # a broken file: usage error naming it
                raise CheckError(f"{path}: ONNX Runtime cannot load it: {e}") from None
            rr = stack.enter_context(TorchGraphRunner(torch_graphs[g], graphs[g]["inputs"], out_names,
                                                      name=f"{REFERENCE_NAME}-{g}"))
            runners[g] = (rb, rr)

        for p, ids in enumerate(prompt_ids):
            log(f"prompt {p}: prefill {len(ids)} tokens")
            feed = OrderedDict([(INPUT_IDS, np.asarray([ids], dtype=np.int64))])
            out_b, out_r, tb, tr = run_both("prefill", runners, feed, feed)
            record("prefill", f"prompt {p} prefill ({len(ids)} tokens)", out_b, out_r, tb, tr)
            cache_b = [out_b[CACHE_OUT + s.name] for s in layout]
            cache_r = [out_r[CACHE_OUT + s.name] for s in layout]
            token = int(np.asarray(out_r[LOGITS])[0, -1].argmax())
            pos = len(ids)
            for step in range(steps):
                cache_b = _ensure_capacity(cache_b, layout, config, pos)
                cache_r = _ensure_capacity(cache_r, layout, config, pos)
                ids_in = np.asarray([[token]], dtype=np.int64)
                feed_b = OrderedDict([(INPUT_IDS, ids_in)] + [(CACHE_IN + s.name, np.ascontiguousarray(t))
                                                                for s, t in zip(layout, cache_b)])
                feed_r = OrderedDict([(INPUT_IDS, ids_in)] + [(CACHE_IN + s.name, np.ascontiguousarray(t))
                                                                for s, t in zip(layout, cache_r)])
                out_b, out_r, tb, tr = run_both("decode", runners, feed_b, feed_r)
                record("decode", f"prompt {p} decode step {step} (position {pos})", out_b, out_r, tb, tr)
                cache_b = [out_b[CACHE_OUT + s.name] for s in layout]
                cache_r = [out_r[CACHE_OUT + s.name] for s in layout]
                token = int(np.asarray(out_r[LOGITS])[0, -1].argmax())
                pos += 1
                if (step + 1) % 8 == 0 or step + 1 == steps:
                    log(f"prompt {p}: decode step {step + 1}/{steps}")

        log(f"comparing {len(labels)} steps x {len(out_names)} outputs (Polygraphy)")
        run_results = pg["RunResults"]()
        phases = [ph for ph in buckets if any(buckets[ph][1][n] for n in out_names)]
        for side, runner_name in ((0, BACKEND_NAME), (1, REFERENCE_NAME)):
            iters = []
            for ph in phases:
                arrays = OrderedDict((n, np.concatenate(parts)) for n, parts in buckets[ph][side].items() if parts)
                iters.append(pg["IterationResult"](arrays, runtime=phase_time[ph][side], runner_name=runner_name))
            run_results.append((runner_name, iters))
        quantile = ERROR_QUANTILE[dtype]
        compare = pg["simple_compare"](rtol=rt, atol=at, infinities_compare_equal=True,
                                       **({"check_error_stat": "elemwise"} if quantile is None else
                                          {"check_error_stat": "quantile", "error_quantile": quantile}))
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # statistics of empty entry buffers
            accuracy = _accuracy_result(pg["Comparator"].compare_accuracy(run_results, compare_func=compare))
    verdicts = accuracy[(BACKEND_NAME, REFERENCE_NAME)]

    # The comparator's verdict per output (over all steps of a phase) ...
    for ph, outcome in zip(phases, verdicts):
        for n in out_names:
            if n in outcome and not bool(outcome[n]):
                stats[n].passed = stats[n].comparator_passed = False
    # ... and the same rule step by step says where it first failed.
    first_failure = first_layer = first_layer_step = None
    layer_names = [f"layer{i}.streams" for i in range(config.num_layers)] if per_layer else []
    step_verdicts = ERROR_QUANTILE[dtype] is None  # reduced precision: the phase quantile decides
    for label, failing in zip(labels, step_failures):
        for n in out_names:
            if n in failing:
                st = stats[n]
                st.passed = st.passed and not step_verdicts
                st.failed_steps += 1
                st.first_failure = st.first_failure or label
                first_failure = first_failure or f"{n} at {label}"
        if first_layer is None:
            bad_layers = [i for i, n in enumerate(layer_names) if n in failing]
            if bad_layers:
                first_layer, first_layer_step = bad_layers[0], label
    for st in stats.values():
        if st.group not in VERDICT_GROUPS[dtype]:
            st.diagnostic, st.passed = True, True
        if st.nan or st.shape_mismatch:  # NaN never passes, whatever the tolerances
            st.passed = False
            st.first_failure = st.first_failure or "(NaN or shape mismatch)"
        if not st.passed and st.failed_steps == 0:  # the comparator failed it, the step rule did not
            st.first_failure = st.first_failure or "(Polygraphy comparator)"
            first_failure = first_failure or f"{st.name} (Polygraphy comparator)"

    failed = [n for n, st in stats.items() if not st.passed]
    report = CheckReport(
        passed=not failed, artifact_dir=str(artifact_dir), model=config.name, dtype=dtype, backend=BACKEND_NAME,
        reference=f"torch ({manifest['source'].get('kind')} {manifest['source'].get('value')})"
        if reference is None else "torch (given module)",
        per_layer=per_layer, steps=steps, prompt_lengths=[len(p) for p in prompt_ids],
        seed=seed if prompts is None else None, rtol=rtol, atol=atol, outputs=stats, logits=logit_metrics,
        first_diverging_layer=None if first_layer is None else f"layer {first_layer} ({kinds[first_layer]})",
        first_diverging_layer_index=first_layer, first_diverging_step=first_layer_step,
        first_failure=first_failure, failed_outputs=failed, layer_kinds=kinds,
        seconds=time.perf_counter() - t_start, backend_seconds=times["backend"], reference_seconds=times["reference"])
    log(f"check {'passed' if report.passed else 'FAILED'} in {report.seconds:.1f} s")
    return report


# ============================================================================ text
def _fmt(x: float) -> str:
    return "nan" if np.isnan(x) else f"{x:.3g}"


def format_report(report: CheckReport) -> str:
    """A readable table: per output group (logits, cache, layers) max errors and verdicts."""
    lines = [
        f"hatrt check: {report.backend} vs {report.reference}",
        f"  export {report.artifact_dir} ({report.model}, {report.dtype}{', per-layer' if report.per_layer else ''})",
        f"  prompts of {', '.join(map(str, report.prompt_lengths))} tokens, {report.steps} decode steps each"
        + (f", seed {report.seed}" if report.seed is not None else ""),
        f"  tolerance: rtol {report.rtol:g}, atol {report.atol:g} x max|ref| per step (integers exact)",
        "",
    ]
    width = max([len(n) for n in report.outputs] + [20])
    header = f"  {'output':<{width}}  {'max abs':>9}  {'max rel':>9}  {'failed':>9}  result"
    for group in GROUPS:
        rows = report.group(group)
        if not rows:
            continue
        lines += [f"{group}:", header]
        for s in rows:
            result = "ok" if s.passed else ("NaN" if s.nan else "shape" if s.shape_mismatch else "FAIL")
            if s.diagnostic and s.passed:
                result = "differs (diagnostic)" if s.failed_steps or not s.comparator_passed else "ok (diagnostic)"
            name = s.name
            if group == "layers" and name.split(".")[0].removeprefix("layer").isdigit():
                i = int(name.split(".")[0].removeprefix("layer"))
                if i < len(report.layer_kinds):
                    name = f"{name} ({report.layer_kinds[i]})"
            lines.append(f"  {name:<{width}}  {_fmt(s.max_abs):>9}  {_fmt(s.max_rel):>9}  "
                         f"{s.failed_steps:>4}/{s.steps:<4}  {result}")
        if group == "logits":
            m = report.logits
            lines.append(f"  cosine similarity >= {m.min_cosine:.6f}; top-1 agreement {m.top1_agreement:.2%}, "
                         f"top-5 set agreement {m.top5_set_agreement:.2%} over {m.positions} positions")
        lines.append("")
    if report.per_layer:
        if report.first_diverging_layer:
            lines.append(f"first diverging layer: {report.first_diverging_layer} at {report.first_diverging_step}")
        else:
            lines.append("first diverging layer: none (every layer within tolerance)")
    if report.passed:
        lines.append(f"PASSED: all {len(report.outputs)} outputs within tolerance "
                     f"({report.seconds:.1f} s; backend {report.backend_seconds:.1f} s, "
                     f"reference {report.reference_seconds:.1f} s)")
    else:
        lines.append(f"FAILED: {len(report.failed_outputs)} of {len(report.outputs)} outputs outside tolerance; "
                     f"first: {report.first_failure}")
    return "\n".join(lines)


def write_json(report: CheckReport, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(report.to_dict(), indent=2) + "\n")


__all__ = ["CheckError", "CheckReport", "LogitMetrics", "OutputStats", "check", "format_report", "write_json",
           "DEFAULT_TOLERANCES"]  # TorchGraphRunner too, resolved lazily (it subclasses a Polygraphy class)
