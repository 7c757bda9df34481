"""`hatrt check`: compare a backend with the PyTorch reference, output by output.

Two `Backend`s (engines/backends.py) are driven through one adapter, `BackendRunner`, a Polygraphy
runner over the backend interface: the backend under test (ONNX Runtime by default, on the export
directory) and the reference (the torch backend, rebuilt from the manifest's source: preset or
checkpoint, dtype, quantization simulation). Running the scenario and judging it are separate:
`run_scenario` collects both sides' outputs step by step, the verdict uses Polygraphy's comparator
and knows nothing of backends.

Scenario, per prompt (batch 1): the prompt in prefill chunks of `chunk_size` tokens (logits at
every position of every chunk), then `steps` decode steps. Each side runs from ITS OWN cache, so
errors accumulate as in real use; the next token is the argmax of the REFERENCE logits, so both
sides see the same token stream. Compared after every step: the logits, every cache tensor
(`new_cache.*`) and, for per-layer exports, every layer's output streams.

Verdict: `Comparator.compare_accuracy` with a `SimpleCompareFunc` (per-output tolerance dicts,
element-wise). Float outputs are compared relative to their scale: both sides are divided by the
largest finite |reference| value of that output in that step before Polygraphy compares them, so
`atol` means "relative to max|ref|" (for logits: relative to the largest logit of the step) and
`rtol` is the usual element-wise relative error. Integer outputs (positions) must match exactly.
NaN never passes; matching infinities (empty compressor slots hold -inf) compare equal.

Tolerance policy (`policy_for`): fp32 exports 1e-5 on every element of every output; fp16 1e-2 on
95% of the logit elements, and quant-sim exports likewise on the logits (FP8/FP4 rounding and
fp16 arithmetic flip discrete decisions at near-ties: MoE routing, indexer top-k, a value on a
rounding edge), with cache and layer outputs reported as diagnostics; FP8 exports (fp32) 1e-2 on
99% of the logit elements against the reference running the same FP8 recipe.

Reported besides the verdict: max abs / max rel (to max|ref|) error per output, cosine similarity,
top-1 and top-5 set agreement of the logits, and in per-layer exports the first layer whose
streams leave the tolerance (the first step at which any layer fails, then its lowest layer).
"""

from __future__ import annotations

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

from exporter.contract import CACHE_OUT, INPUT_IDS, LOGITS, LOGITS_INDEX, MANIFEST, layer_output_name

DEFAULT_PROMPT_LENGTHS = (200, 300)  # cross the CSA block (4), the window (128) and HCA blocks (128)
DEFAULT_STEPS = 32
DEFAULT_CHUNK = 128  # the default prompts are fed in 2-3 prefill chunks, so chunking is checked too
TOP_K = 5
GROUPS = ("logits", "cache", "layers")


@dataclass(frozen=True)
class TolerancePolicy:
    """How an export is judged. atol is relative to max|ref| of the output in that step.

    quantile: None = every element must be within tolerance; q = q of the elements of an output
    over a phase (Polygraphy's "quantile" statistic). At reduced precision (fp16, or FP8/FP4
    simulation) rounding flips discrete decisions at near-ties (MoE routing, indexer top-k, a value
    on a rounding edge), which moves a few positions by a lot while the rest agree; a corrupted
    weight moves everything and still fails. One flipped decision legitimately changes a compressed
    entry (it pools 4 or 128 tokens) and every later state, so the verdict then rests on the
    logits and the cache and layer outputs are reported as diagnostics."""

    rtol: float
    atol: float
    quantile: float | None
    verdict_groups: tuple[str, ...]
    name: str


POLICIES = {
    "float32": TolerancePolicy(1e-5, 1e-5, None, GROUPS, "fp32: every element of every output"),
    "float16": TolerancePolicy(1e-2, 1e-2, 0.95, ("logits",), "fp16: 95% of logit elements"),
    "quant_sim": TolerancePolicy(1e-2, 1e-2, 0.95, ("logits",), "quant-sim: 95% of logit elements"),
    # An fp32 FP8 export against the reference under the same FP8 recipe: the GEMM operands are
    # rounded identically, except an activation sitting on an E4M3 rounding edge (where fp32
    # arithmetic order moves it by an ulp), which moves by a whole FP8 step (6-12%) and nudges the
    # layers after it; measured on tiny-flash: max 5e-5 to 1.2e-2 of max|ref| depending on the
    # prompt, cosine >= 0.9998, top-1 100%, while the unquantized reference is ~10x further off.
    "fp8": TolerancePolicy(1e-2, 1e-2, 0.99, ("logits",), "fp8 (same recipe in the reference): 99% of logit elements"),
}
DEFAULT_TOLERANCES = {k: (p.rtol, p.atol) for k, p in POLICIES.items()}


def policy_for(dtype: str, quant_sim: bool, fp8: bool = False) -> TolerancePolicy:
    if quant_sim or dtype == "float16":
        return POLICIES["quant_sim" if quant_sim else "float16"]
    return POLICIES["fp8"] if fp8 else POLICIES[dtype]


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
    quant_sim: bool = False
    policy: str = ""
    chunk_size: int = DEFAULT_CHUNK
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
    return dict(BaseRunner=BaseRunner, TensorMetadata=TensorMetadata, Comparator=Comparator, RunResults=RunResults,
                IterationResult=IterationResult, G_LOGGER=G_LOGGER, simple_compare=simple_compare)


@functools.lru_cache(maxsize=None)
def _backend_runner_class():
    BaseRunner = _polygraphy()["BaseRunner"]

    class BackendRunner(BaseRunner):
        """A Polygraphy runner over any `Backend`: each `infer` is one step on the runner's own
        cache (`reset` starts a sequence). feed_dict: input_ids [B, S], logits_index [n] (numpy);
        outputs: logits, every cache tensor (new_cache.<name>) and, when `layers`, the layer streams."""

        def __init__(self, backend, layers: bool = False, name: str | None = None):
            super().__init__(name=name or backend.name, prefix="hatrt-runner")
            self.backend, self.layers = backend, layers
            self.cache = None
            self.output_names = [LOGITS] + [CACHE_OUT + s.name for s in backend.layout] + (
                [layer_output_name(i) for i in range(backend.config.num_layers)] if layers else [])

        def reset(self, batch: int = 1) -> None:
            self.cache = self.backend.new_cache(batch)

        def get_input_metadata_impl(self):
            meta = _polygraphy()["TensorMetadata"]()
            meta.add(INPUT_IDS, np.dtype(np.int64), [None, None])
            meta.add(LOGITS_INDEX, np.dtype(np.int64), [None])
            return meta

        def infer_impl(self, feed_dict):
            if self.cache is None:
                self.reset(np.asarray(feed_dict[INPUT_IDS]).shape[0])
            ids = torch.from_numpy(np.asarray(feed_dict[INPUT_IDS], dtype=np.int64))
            idx = torch.from_numpy(np.asarray(feed_dict[LOGITS_INDEX], dtype=np.int64))
            layers: list[torch.Tensor] | None = [] if self.layers else None
            start = time.perf_counter()
            logits = self.backend.step(ids, self.cache, logits_index=idx, layer_outputs=layers)
            if self.cache.device.type == "cuda":
                torch.cuda.synchronize()
            self.inference_time = time.perf_counter() - start
            out = OrderedDict([(LOGITS, logits)])
            out.update((CACHE_OUT + s.name, t) for s, t in zip(self.backend.layout, self.cache.tensors))
            if layers is not None:
                if len(layers) != self.backend.config.num_layers:
                    raise CheckError(f"{self.name}: the backend gave {len(layers)} layer outputs for "
                                     f"{self.backend.config.num_layers} layers")
                out.update((layer_output_name(i), t) for i, t in enumerate(layers))
            # copies: the backend reuses its buffers on the next step
            return OrderedDict((n, t.detach().float().cpu().numpy().copy() if t.dtype in (torch.float16, torch.bfloat16)
                                else t.detach().cpu().numpy().copy()) for n, t in out.items())

    return BackendRunner


def __getattr__(name: str):  # BackendRunner, importable once polygraphy is there
    if name == "BackendRunner":
        return _backend_runner_class()
    raise AttributeError(name)


# ============================================================================ setup
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


def _tolerances(names: Sequence[str], integer: set[str], rtol: float, atol: float):
    rt, at = {}, {}
    for n in names:
        rt[n], at[n] = (0.0, 0.0) if n in integer else (rtol, atol)
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


# ============================================================================ scenario
@dataclass
class StepRecord:
    """Both sides' outputs of one step of the scenario."""

    phase: str  # prefill | decode
    label: str
    backend: OrderedDict
    reference: OrderedDict
    backend_seconds: float
    reference_seconds: float


def run_scenario(backend_runner, reference_runner, prompts: Sequence[Sequence[int]], steps: int, chunk_size: int,
                 log: Callable[[str], None]) -> list[StepRecord]:
    """Prefill each prompt in chunks, then `steps` greedy decode steps (tokens from the reference),
    each runner on its own cache. Returns every step's outputs; judges nothing."""
    records = []

    def both(phase: str, label: str, feed: OrderedDict) -> StepRecord:
        out_b = backend_runner.infer(feed)
        out_r = reference_runner.infer(feed)
        rec = StepRecord(phase, label, out_b, out_r, backend_runner.last_inference_time() or 0.0,
                         reference_runner.last_inference_time() or 0.0)
        records.append(rec)
        return rec

    for p, ids in enumerate(prompts):
        backend_runner.reset(1)
        reference_runner.reset(1)
        log(f"prompt {p}: prefill {len(ids)} tokens in chunks of {chunk_size}")
        for start in range(0, len(ids), chunk_size):
            part = ids[start:start + chunk_size]
            feed = OrderedDict([(INPUT_IDS, np.asarray([part], dtype=np.int64)),
                                (LOGITS_INDEX, np.arange(len(part), dtype=np.int64))])
            rec = both("prefill", f"prompt {p} prefill tokens {start}..{start + len(part) - 1}", feed)
        token = int(np.asarray(rec.reference[LOGITS])[0, -1].argmax())
        pos = len(ids)
        for step in range(steps):
            feed = OrderedDict([(INPUT_IDS, np.asarray([[token]], dtype=np.int64)),
                                (LOGITS_INDEX, np.zeros(1, dtype=np.int64))])
            rec = both("decode", f"prompt {p} decode step {step} (position {pos})", feed)
            token = int(np.asarray(rec.reference[LOGITS])[0, -1].argmax())
            pos += 1
            if (step + 1) % 8 == 0 or step + 1 == steps:
                log(f"prompt {p}: decode step {step + 1}/{steps}")
    return records


# ============================================================================ check
def check(artifact_dir: str | os.PathLike, *, steps: int = DEFAULT_STEPS, prompts: Sequence[Sequence[int]] | None = None,
          seed: int = 0, rtol: float | None = None, atol: float | None = None, chunk_size: int = DEFAULT_CHUNK,
          backend: str = "onnxruntime", progress: Callable[[str], None] | None = None, reference=None) -> CheckReport:
    """Run the export in `artifact_dir` on `backend` against the PyTorch reference.

    prompts: token-id lists (default: random prompts of 200 and 300 tokens drawn with `seed`).
    steps: decode steps after each prompt; chunk_size: prefill chunk. rtol / atol: override the
    policy's tolerances for every float output; atol is relative to max|ref| per step.
    reference: a Transformer to use instead of rebuilding the manifest's source.
    Raises CheckError for usage problems; a numerical mismatch is `report.passed == False`."""
    from exporter.cache import cache_layout
    from exporter.config import CSA, HCA, WINDOW

    from .backends import BackendError, TorchBackend, load_backend, read_manifest

    t_start = time.perf_counter()
    log = progress or (lambda msg: None)
    if steps < 0:
        raise CheckError(f"steps must be >= 0, got {steps}")
    if chunk_size < 1:
        raise CheckError(f"chunk_size must be >= 1, got {chunk_size}")
    artifact_dir = Path(artifact_dir)
    where = artifact_dir / MANIFEST
    try:
        if backend == "tensorrt":  # an engine folder: the export manifest it carries
            from .tensorrt_build import engine_export_manifest, read_engine_manifest

            manifest = engine_export_manifest(read_engine_manifest(artifact_dir, verify="none"))
        else:
            manifest = read_manifest(artifact_dir, verify="none")
    except BackendError as e:
        raise CheckError(str(e)) from None
    dtype, quant_sim = manifest["dtype"], bool(manifest.get("quant_sim", False))
    policy = policy_for(dtype, quant_sim, bool(manifest.get("quantization")))
    rtol = policy.rtol if rtol is None else float(rtol)
    atol = policy.atol if atol is None else float(atol)
    if rtol < 0 or atol < 0:
        raise CheckError(f"tolerances must be >= 0 (rtol={rtol}, atol={atol})")
    config_vocab = manifest["config"].get("vocab_size", 0)
    prompt_ids = _prompts(prompts, seed, int(config_vocab))
    max_pos = int(manifest["config"].get("max_position_embeddings", 0))
    longest = max(len(p) for p in prompt_ids) + steps
    if max_pos and longest > max_pos:
        raise CheckError(f"the longest prompt ({max(len(p) for p in prompt_ids)} tokens) + --steps {steps} = {longest} "
                         f"positions exceed max_position_embeddings={max_pos} of {where}")

    pg = _polygraphy()
    try:
        log(f"loading the export in {backend}")
        backend_under_test = load_backend(artifact_dir, backend)
        if reference is None:
            log(f"loading the reference ({manifest['source']['kind']} {manifest['source']['value']}, {dtype}"
                f"{', quant-sim' if quant_sim else ''})")
            ref_backend = load_backend(artifact_dir, "torch")
        else:
            ref_backend = TorchBackend(reference.eval())
    except BackendError as e:
        raise CheckError(str(e)) from None
    reference_name = (f"torch ({manifest['source'].get('kind')} {manifest['source'].get('value')})"
                      if reference is None else "torch (given module)")
    config = ref_backend.config
    if json.loads(json.dumps(config.to_hf_dict())) != manifest["config"]:
        raise CheckError(f"{where}: the reference model's config differs from the exported one")
    if list(cache_layout(config, ref_backend.model.dtype)) != backend_under_test.layout:
        raise CheckError(f"{where}: the reference's cache layout ({str(ref_backend.model.dtype).removeprefix('torch.')}) "
                         f"differs from the exported one ({dtype})")
    per_layer = bool(manifest.get("per_layer", False))
    kinds = [{WINDOW: "window", CSA: "CSA", HCA: "HCA"}.get(r, f"ratio {r}") for r in config.compress_ratios]

    BackendRunner = _backend_runner_class()
    G = pg["G_LOGGER"]
    with G.verbosity(G.CRITICAL):
        runner_b = BackendRunner(backend_under_test, layers=per_layer, name=backend_under_test.name)
        runner_r = BackendRunner(ref_backend, layers=per_layer, name="torch-reference")
        with runner_b, runner_r:
            records = run_scenario(runner_b, runner_r, prompt_ids, steps, chunk_size, log)
    out_names = runner_b.output_names
    log(f"comparing {len(records)} steps x {len(out_names)} outputs (Polygraphy)")
    integer = {n for n in out_names if not np.issubdtype(records[0].reference[n].dtype, np.floating)}
    stats, logit_metrics, accuracy_ok, step_failures, phase_names = _judge(records, out_names, integer, policy,
                                                                            rtol, atol, pg, backend_under_test.name)
    # The comparator's verdict per output (over all steps of a phase) ...
    for n, ok in accuracy_ok.items():
        if not ok:
            stats[n].passed = stats[n].comparator_passed = False
    # ... and the same rule step by step says where it first failed.
    first_failure = first_layer = first_layer_step = None
    layer_names = [layer_output_name(i) for i in range(config.num_layers)] if per_layer else []
    step_verdicts = policy.quantile is None  # reduced precision: the phase quantile decides
    for rec, failing in zip(records, step_failures):
        for n in out_names:
            if n in failing:
                st = stats[n]
                st.passed = st.passed and not step_verdicts
                st.failed_steps += 1
                st.first_failure = st.first_failure or rec.label
                first_failure = first_failure or f"{n} at {rec.label}"
        if first_layer is None:
            bad_layers = [i for i, n in enumerate(layer_names) if n in failing]
            if bad_layers:
                first_layer, first_layer_step = bad_layers[0], rec.label
    for st in stats.values():
        if st.group not in policy.verdict_groups:
            st.diagnostic, st.passed = True, True
        if st.nan or st.shape_mismatch:  # NaN never passes, whatever the tolerances
            st.passed = False
            st.first_failure = st.first_failure or "(NaN or shape mismatch)"
        if not st.passed and st.failed_steps == 0:  # the comparator failed it, the step rule did not
            st.first_failure = st.first_failure or "(Polygraphy comparator)"
            first_failure = first_failure or f"{st.name} (Polygraphy comparator)"

    failed = [n for n, st in stats.items() if not st.passed]
    report = CheckReport(
        passed=not failed, artifact_dir=str(artifact_dir), model=config.name, dtype=dtype,
        backend=backend_under_test.name, reference=reference_name, per_layer=per_layer, steps=steps,
        prompt_lengths=[len(p) for p in prompt_ids], seed=seed if prompts is None else None, rtol=rtol, atol=atol,
        outputs=stats, logits=logit_metrics, quant_sim=quant_sim, policy=policy.name, chunk_size=chunk_size,
        first_diverging_layer=None if first_layer is None else f"layer {first_layer} ({kinds[first_layer]})",
        first_diverging_layer_index=first_layer, first_diverging_step=first_layer_step,
        first_failure=first_failure, failed_outputs=failed, layer_kinds=kinds,
        seconds=time.perf_counter() - t_start, backend_seconds=sum(r.backend_seconds for r in records),
        reference_seconds=sum(r.reference_seconds for r in records))
    log(f"check {'passed' if report.passed else 'FAILED'} in {report.seconds:.1f} s")
    return report


def _judge(records: list[StepRecord], out_names: list[str], integer: set[str], policy: TolerancePolicy, rtol: float,
           atol: float, pg: dict, backend_name: str):
    """Per-output statistics, per-step failures and Polygraphy's verdict per output; no backend knowledge."""
    rt, at = _tolerances(out_names, integer, rtol, atol)
    stats = {n: OutputStats(n, _group(n), rtol=rt[n], atol=at[n]) for n in out_names}
    logit_metrics = LogitMetrics()
    step_failures: list[set[str]] = []
    # Polygraphy compares one iteration per phase: each output's scaled steps flattened end to end
    # (the comparator costs ~20 ms per output and iteration, whatever the size).
    buckets = {ph: (OrderedDict((n, []) for n in out_names), OrderedDict((n, []) for n in out_names))
               for ph in ("prefill", "decode")}
    phase_time = {ph: [0.0, 0.0] for ph in buckets}
    for rec in records:
        failing = set()
        phase_time[rec.phase][0] += rec.backend_seconds
        phase_time[rec.phase][1] += rec.reference_seconds
        for n in out_names:
            a, b = np.asarray(rec.backend[n]), np.asarray(rec.reference[n])
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
            if _step_fails(a, b, st.rtol, st.atol, policy.quantile):
                failing.add(n)
            buckets[rec.phase][0][n].append(a.reshape(-1))
            buckets[rec.phase][1][n].append(b.reshape(-1))
        step_failures.append(failing)
        if rec.backend[LOGITS].shape == rec.reference[LOGITS].shape:
            _logit_metrics(np.asarray(rec.backend[LOGITS]), np.asarray(rec.reference[LOGITS]), logit_metrics)

    run_results = pg["RunResults"]()
    phases = [ph for ph in buckets if any(buckets[ph][1][n] for n in out_names)]
    for side, runner_name in ((0, backend_name), (1, "reference")):
        iters = []
        for ph in phases:
            arrays = OrderedDict((n, np.concatenate(parts)) for n, parts in buckets[ph][side].items() if parts)
            iters.append(pg["IterationResult"](arrays, runtime=phase_time[ph][side], runner_name=runner_name))
        run_results.append((runner_name, iters))
    compare = pg["simple_compare"](rtol=rt, atol=at, infinities_compare_equal=True,
                                   **({"check_error_stat": "elemwise"} if policy.quantile is None else
                                      {"check_error_stat": "quantile", "error_quantile": policy.quantile}))
    G = pg["G_LOGGER"]
    with np.errstate(all="ignore"), warnings.catch_warnings(), G.verbosity(G.CRITICAL):
        warnings.simplefilter("ignore", RuntimeWarning)  # statistics of empty entry buffers
        accuracy = _accuracy_result(pg["Comparator"].compare_accuracy(run_results, compare_func=compare))
    verdicts = accuracy[(backend_name, "reference")]
    ok = {n: True for n in out_names}
    for outcome in verdicts:
        for n in out_names:
            if n in outcome and not bool(outcome[n]):
                ok[n] = False
    return stats, logit_metrics, ok, step_failures, phases


# ============================================================================ text
def _fmt(x: float) -> str:
    return "nan" if np.isnan(x) else f"{x:.3g}"


def format_report(report: CheckReport) -> str:
    """A readable table: per output group (logits, cache, layers) max errors and verdicts."""
    lines = [
        f"hatrt check: {report.backend} vs {report.reference}",
        f"  export {report.artifact_dir} ({report.model}, {report.dtype}{', per-layer' if report.per_layer else ''})",
        f"  prompts of {', '.join(map(str, report.prompt_lengths))} tokens in prefill chunks of {report.chunk_size}, "
        f"{report.steps} decode steps each" + (f", seed {report.seed}" if report.seed is not None else ""),
        f"  tolerance: rtol {report.rtol:g}, atol {report.atol:g} x max|ref| per step (integers exact); "
        f"policy {report.policy}",
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


__all__ = ["CheckError", "CheckReport", "DEFAULT_TOLERANCES", "LogitMetrics", "OutputStats", "POLICIES", "StepRecord",
           "TolerancePolicy", "check", "format_report", "policy_for", "run_scenario", "write_json"]
# BackendRunner too, resolved lazily (it subclasses a Polygraphy class)
