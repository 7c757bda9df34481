"""`hatrt build`: a TensorRT engine folder from an export's `step.trt.onnx` (docs/tensorrt.md).

One engine, one step graph, two optimization profiles that share one block of device memory:

- `decode`: seq = 1, n_logits = 1, batch 1..max_batch (opt max_batch);
- `prefill`: seq 1..prefill_chunk (opt the chunk), n_logits 1..chunk (opt 1), batch 1..max_batch (opt 1);
- both: every entry capacity (`csa_entries`, `hca_entries`) from MIN_CAPACITY to the largest
  capacity the runtime's growth rule can reach below `max_context` (`max_entry_capacity`).

Everything that decides something is a pure function of the export manifest and the user's limits,
importable and tested without TensorRT or a GPU: `plan_profiles`, `check_build_environment`,
`check_plugins_registered`, `check_plugin_layers`, `trtexec_command`, `polygraphy_command`, the
engine manifest (`engine.json`) writer/reader and `verify_plugin_library`. Only `build_engine`
touches TensorRT (imported lazily), after every check that can fail without it has passed.

The engine folder (self-contained for the runtime, engines/tensorrt_backend.py):

    step.engine            the serialized engine
    engine.json            TensorRT version, GPU, limits, profiles, plugin library + sha256, the export's
                           path + manifest sha256, and the export manifest's model keys (config, dtype,
                           cache_layout, source, ...) so nothing else has to be read
    libhatrt_plugins.so    the plugin library the engine was built with (sha256 in engine.json)
    export_manifest.json   a verbatim copy of the export's manifest.json
    timing.cache           the builder's timing cache (unless --timing-cache names another file)
    tokenizer files        copied from the export, when it has them
    fp8_recipe.json        an FP8 export's recipe (the torch reference of `hatrt check` applies it)
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter import contract
from exporter.cache import BATCH, MIN_CAPACITY, grown_capacity
from exporter.config import ModelConfig

from .backends import BackendError

if TYPE_CHECKING:  # the stubs (tensorrt-stubs) for pyright; never imported at run time here
    import tensorrt as trt

ENGINE_MANIFEST = "engine.json"
ENGINE_FORMAT, ENGINE_VERSION = "hatrt-engine", 1
ENGINE_FILE = "step.engine"
PLUGIN_FILE = "libhatrt_plugins.so"
TIMING_CACHE_FILE = "timing.cache"
EXPORT_MANIFEST_COPY = "export_manifest.json"
DEFAULT_PLUGIN_LIBRARY = Path("build") / "plugins" / PLUGIN_FILE  # what plugins/README.md's cmake build makes
REPO_ROOT = Path(__file__).resolve().parent.parent

MIN_TENSORRT: tuple[int, ...] = (10, 15)  # parser dispatch on plugin_namespace (toolchain facts); IPluginV3
STRONGLY_TYPED_DEFAULT: tuple[int, ...] = (11, 0)  # TensorRT 11: every network strongly typed, flag deprecated
FP8_CAPABILITY: tuple[int, ...] = (8, 9)  # Ada (8.9) and Hopper (9.0) have FP8 tensor cores
DECODE, PREFILL = "decode", "prefill"
DEFAULT_MAX_BATCH = 8
DEFAULT_PREFILL_CHUNK = 512
DEFAULT_OPTIMIZATION_LEVEL = 3
LAYER_SUFFIX = ".streams"

# the export-manifest keys an engine folder carries, so the runtime needs nothing else
MODEL_KEYS = ("model", "source", "config", "dtype", "quant_sim", "per_layer", "opset", "custom_ops", "cache_layout",
              "quantization", "tokenizer")


class TensorRTError(BackendError):
    """A TensorRT build or engine cannot be made or loaded as asked (a refusal: `hatrt build` exits 2).

    The message names what is missing or wrong: the file, the GPU, the node, the option."""


# ============================================================================ limits and profiles
@dataclass(frozen=True)
class Limits:
    """What the user asks the engine to serve. None: a default from the manifest (see resolve_limits)."""

    max_batch: int = DEFAULT_MAX_BATCH
    max_context: int | None = None  # tokens per sequence; default the model's max_position_embeddings
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    opt_batch: int | None = None  # decode profile's opt batch; default max_batch
    opt_context: int | None = None  # entry capacities' opt; default max_context


@dataclass(frozen=True)
class ShapeRange:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass(frozen=True)
class Profile:
    """One optimization profile: its name, its index in the engine, the range of every dynamic dim
    and the min/opt/max shape of every graph input (in graph order)."""

    name: str
    index: int
    dims: dict[str, tuple[int, int, int]]
    shapes: dict[str, ShapeRange]

    def to_dict(self) -> dict:
        return {"name": self.name, "index": self.index, "dims": {d: list(r) for d, r in self.dims.items()},
                "shapes": {n: r.to_dict() for n, r in self.shapes.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Profile":
        dims = {k: (int(v[0]), int(v[1]), int(v[2])) for k, v in d["dims"].items()}
        return cls(str(d["name"]), int(d["index"]), dims,
                   {n: ShapeRange(tuple(r["min"]), tuple(r["opt"]), tuple(r["max"])) for n, r in d["shapes"].items()})


@dataclass(frozen=True)
class EnginePlan:
    """What `hatrt build` builds: the resolved limits and the profiles of the one engine."""

    limits: Limits
    profiles: list[Profile]
    inputs: list[str] = field(default_factory=list)

    def profile(self, name: str) -> Profile | None:
        return next((p for p in self.profiles if p.name == name), None)


def max_entry_capacity(config: ModelConfig, max_context: int) -> dict[str, int]:
    """The largest entry capacity per entry dim that a cache serving positions < max_context can have.

    The runtime grows capacities with exporter.cache.grown_capacity (the one growth rule) only when a
    step needs more than it has, and a step never needs more than N = entries_needed(max_context - 1).
    Growth happens from some have <= N - 1 and grown_capacity is monotone in `have`, so the bound is
    grown_capacity(N - 1, N) (which exceeds N by the +25% step). Merged caches pad to the largest."""
    need = contract.entries_needed(config, max_context - 1)
    return {dim: max(MIN_CAPACITY, grown_capacity(max(n - 1, 0), n)) for dim, n in need.items()}


def resolve_limits(config: ModelConfig, limits: Limits) -> Limits:
    """Fill the defaults and check the limits against the model (TensorRTError naming the option)."""
    max_pos = int(config.max_position_embeddings)
    max_context = max_pos if limits.max_context is None else int(limits.max_context)
    if limits.max_batch < 1:
        raise TensorRTError(f"--max-batch must be >= 1, got {limits.max_batch}")
    if max_context < 1:
        raise TensorRTError(f"--max-context must be >= 1, got {max_context}")
    if max_context > max_pos:
        raise TensorRTError(f"--max-context {max_context} exceeds the model's max_position_embeddings={max_pos}")
    if limits.prefill_chunk < 1:
        raise TensorRTError(f"--prefill-chunk must be >= 1, got {limits.prefill_chunk}")
    chunk = min(int(limits.prefill_chunk), max_context)  # a chunk longer than the context is never fed
    opt_batch = limits.max_batch if limits.opt_batch is None else int(limits.opt_batch)
    if not 1 <= opt_batch <= limits.max_batch:
        raise TensorRTError(f"--opt-batch {opt_batch} must lie in [1, --max-batch {limits.max_batch}]")
    opt_context = max_context if limits.opt_context is None else int(limits.opt_context)
    if not 1 <= opt_context <= max_context:
        raise TensorRTError(f"--opt-context {opt_context} must lie in [1, --max-context {max_context}]")
    return Limits(int(limits.max_batch), max_context, chunk, opt_batch, opt_context)


def _dim_ranges(config: ModelConfig, limits: Limits) -> dict[str, dict[str, tuple[int, int, int]]]:
    """min/opt/max of every dynamic dim of the step graph, per profile."""
    cap_max = max_entry_capacity(config, int(limits.max_context or 1))
    cap_opt = max_entry_capacity(config, int(limits.opt_context or 1))
    entries = {d: (MIN_CAPACITY, min(max(cap_opt[d], MIN_CAPACITY), cap_max[d]), cap_max[d]) for d in cap_max}
    b, chunk = limits.max_batch, limits.prefill_chunk
    ranges = {DECODE: {BATCH: (1, int(limits.opt_batch or b), b), contract.SEQ: (1, 1, 1),
                       contract.N_LOGITS: (1, 1, 1), **entries}}
    if chunk > 1:
        ranges[PREFILL] = {BATCH: (1, 1, b), contract.SEQ: (1, chunk, chunk), contract.N_LOGITS: (1, 1, chunk),
                           **entries}
    return ranges


def plan_profiles(manifest: Mapping, limits: Limits = Limits()) -> EnginePlan:
    """The engine's optimization profiles: a pure function of an export manifest and the limits.

    Every graph input gets min/opt/max from its manifest dims (ints stay, names come from the dim
    ranges); a dim name this planner does not know is refused, naming the input."""
    where = f"{contract.MANIFEST} of the export"
    config = contract.manifest_config(dict(manifest), where)
    resolved = resolve_limits(config, limits)
    inputs = manifest["graphs"][contract.STEP]["inputs"]
    ranges = _dim_ranges(config, resolved)
    profiles = []
    for index, (name, dims) in enumerate(ranges.items()):
        shapes: dict[str, ShapeRange] = {}
        for io in inputs:
            lo, opt, hi = [], [], []
            for d in io["dims"]:
                if isinstance(d, int):
                    r = (d, d, d)
                elif d in dims:
                    r = dims[d]
                else:
                    raise TensorRTError(f"{where}: input {io['name']!r} has dim {d!r}, which no profile plans "
                                        f"(known: {', '.join(dims)}); an export by another hatrt version?")
                lo.append(r[0])
                opt.append(r[1])
                hi.append(r[2])
            shapes[io["name"]] = ShapeRange(tuple(lo), tuple(opt), tuple(hi))
        used = {d for io in inputs for d in io["dims"] if isinstance(d, str)}
        profiles.append(Profile(name, index, {d: r for d, r in dims.items() if d in used}, shapes))
    return EnginePlan(resolved, profiles, [io["name"] for io in inputs])


def profile_for_seq(profiles: Sequence[Profile], seq: int) -> Profile:
    """The profile a step of `seq` tokens runs under: decode for one token, prefill otherwise."""
    by_name = {p.name: p for p in profiles}
    if seq == 1 and DECODE in by_name:
        return by_name[DECODE]
    if PREFILL in by_name:
        return by_name[PREFILL]
    raise TensorRTError(f"a step of {seq} tokens needs the prefill profile, and this engine has only "
                        f"{', '.join(by_name)} (built with --prefill-chunk 1?)")


# ============================================================================ refusals
def is_fp8_export(manifest: Mapping) -> bool:
    """An FP8 export records how it was quantized under manifest["quantization"]."""
    return bool(manifest.get("quantization"))


def parse_version(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    parts = []
    for p in str(text).split("."):
        digits = p[:len(p) - len(p.lstrip("0123456789"))]  # the leading digits: "0rc1" -> "0"
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) or None


def check_build_environment(*, trt_version: str | None, cuda: bool, capability: tuple[int, int] | None,
                            fp8: bool, plugin_library: Path | None, gpu_name: str | None = None) -> None:
    """Refuse a build that cannot work, in this order (each refusal reachable with the facts given):
    TensorRT missing or too old, no CUDA GPU, an FP8 export on a GPU without FP8, the plugin library
    missing. Pure: the facts are passed in (detect_environment() gathers the real ones)."""
    if trt_version is None:
        raise TensorRTError("TensorRT is not installed (import tensorrt failed, or only type stubs are installed): "
                            f"install TensorRT >= {'.'.join(map(str, MIN_TENSORRT))} for your CUDA "
                            "(pip install tensorrt-cu12 / tensorrt-cu13, or NVIDIA's tar/deb packages)")
    version: tuple[int, ...] = parse_version(trt_version) or (0,)
    if version[:2] < MIN_TENSORRT:
        raise TensorRTError(f"TensorRT {trt_version} is too old: hatrt needs >= {'.'.join(map(str, MIN_TENSORRT))} "
                            "(IPluginV3 plugins chosen by the ONNX parser through plugin_namespace)")
    if not cuda:
        raise TensorRTError("no CUDA GPU is visible (torch.cuda.is_available() is False): a TensorRT engine is built "
                            "on the GPU it will run on")
    if fp8 and (capability is None or tuple(capability) < FP8_CAPABILITY):
        cc = "unknown" if capability is None else f"{capability[0]}.{capability[1]}"
        gpu = f"the GPU {gpu_name}" if gpu_name else "the GPU"
        raise TensorRTError(f"this is an FP8 export and {gpu} (compute capability {cc}) has no FP8 tensor cores: "
                            f"FP8 needs compute capability >= {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} (Ada, Hopper: "
                            "H100/H200); build a non-FP8 export for this GPU")
    if plugin_library is None or not Path(plugin_library).is_file():
        raise TensorRTError(f"plugin library {plugin_library or DEFAULT_PLUGIN_LIBRARY} not found: build it "
                            "(cmake -S plugins -B build/plugins -DCMAKE_BUILD_TYPE=Release && cmake --build "
                            "build/plugins -j; see plugins/README.md) or pass --plugins LIB")


@dataclass(frozen=True)
class HatrtNode:
    """A `hatrt`-domain node of the step graph: what must become a plugin layer."""

    name: str
    op_type: str
    plugin_namespace: str
    plugin_version: str
    outputs: tuple[str, ...]


def hatrt_nodes(onnx_path: str | os.PathLike, domain: str = "hatrt") -> list[HatrtNode]:
    """The custom nodes of a graph (read without its external weights). Needs only onnx."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    nodes = []
    for node in model.graph.node:
        if node.domain != domain:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        ns, ver = attrs.get("plugin_namespace", b""), attrs.get("plugin_version", b"1")
        nodes.append(HatrtNode(node.name or node.op_type, node.op_type,
                               ns.decode() if isinstance(ns, bytes) else str(ns),
                               ver.decode() if isinstance(ver, bytes) else str(ver), tuple(node.output)))
    return nodes


def check_plugins_registered(nodes: Sequence[HatrtNode], registered: set[tuple[str, str, str]],
                             library: str | os.PathLike = "") -> None:
    """Every custom node needs a creator (op_type, plugin_version, plugin_namespace) in the registry."""
    for node in nodes:
        if (node.op_type, node.plugin_version, node.plugin_namespace) not in registered:
            have = sorted(f"{ns}::{op} v{v}" for op, v, ns in registered)
            raise TensorRTError(f"node {node.name!r} ({node.plugin_namespace}::{node.op_type} version "
                                f"{node.plugin_version}) has no registered plugin"
                                + (f" after loading {library}" if library else "")
                                + f" (registered: {', '.join(have) or 'none'}): a stale or wrong plugin library?")


@dataclass(frozen=True)
class LayerInfo:
    """A layer of the parsed network: name, type name (trt.LayerType member) and output tensor names."""

    name: str
    type: str
    outputs: tuple[str, ...]


PLUGIN_LAYER = "PLUGIN_V3"


def check_plugin_layers(nodes: Sequence[HatrtNode], layers: Sequence[LayerInfo]) -> None:
    """After parsing: every custom node must have become an IPluginV3 layer (TensorRT silently expands
    a model-local function, or a fallback plugin, when the library is not what it should be)."""
    by_output: dict[str, LayerInfo] = {}
    by_name: dict[str, LayerInfo] = {}
    for layer in layers:
        by_name.setdefault(layer.name, layer)
        for out in layer.outputs:
            by_output[out] = layer
    for node in nodes:
        layer = next((by_output[o] for o in node.outputs if o in by_output), None) or by_name.get(node.name)
        if layer is None:
            raise TensorRTError(f"node {node.name!r} ({node.op_type}) produced no layer in the parsed network "
                                f"(no layer outputs {list(node.outputs)}): refusing to build")
        if layer.type != PLUGIN_LAYER:
            raise TensorRTError(f"node {node.name!r} ({node.op_type}) became a {layer.type} layer ({layer.name!r}), "
                                f"not a {PLUGIN_LAYER} plugin layer: the parser did not use the hatrt plugin "
                                "(wrong library, or a TensorRT that expands functions first); refusing to build")


# ============================================================================ the plugin library
def default_plugin_library(cwd: str | os.PathLike | None = None) -> Path:
    """build/plugins/libhatrt_plugins.so under the current directory, else under the repository."""
    for root in (Path(cwd) if cwd is not None else Path.cwd(), REPO_ROOT):
        candidate = root / DEFAULT_PLUGIN_LIBRARY
        if candidate.is_file():
            return candidate
    return (Path(cwd) if cwd is not None else Path.cwd()) / DEFAULT_PLUGIN_LIBRARY


def verify_plugin_library(engine_manifest: Mapping, engine_dir: str | os.PathLike,
                          override: str | os.PathLike | None = None) -> Path:
    """The plugin library to load for an engine: `override`, else the copy in the engine folder, else
    the path it was built with. Refused (TensorRTError) when missing or when its sha256 differs from
    the one engine.json recorded: an engine's plugin layers must run the code they were built with."""
    rec = engine_manifest.get("plugins")
    if not isinstance(rec, dict) or "sha256" not in rec:
        raise TensorRTError(f"{Path(engine_dir) / ENGINE_MANIFEST}: no 'plugins' record (path and sha256)")
    if override is not None:
        candidates = [Path(override)]
    else:
        candidates = [Path(engine_dir) / str(rec.get("file", PLUGIN_FILE))]
        if rec.get("source"):
            candidates.append(Path(str(rec["source"])))
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise TensorRTError(f"plugin library missing: {', '.join(map(str, candidates))} (engine.json records "
                            f"sha256 {rec['sha256'][:16]}...): rebuild the engine or pass the library it was "
                            "built with")
    got = contract.sha256(path)
    if got != rec["sha256"]:
        raise TensorRTError(f"plugin library {path}: sha256 {got[:16]}... differs from {rec['sha256'][:16]}... "
                            f"recorded in {Path(engine_dir) / ENGINE_MANIFEST}: the engine was built with another "
                            "build of the plugins; rebuild the engine (hatrt build) or use that library")
    return path


# ============================================================================ engine manifest
def engine_manifest(*, export_dir: Path, export_manifest: Mapping, plan: EnginePlan, plugin_source: Path,
                    plugin_sha256: str, trt_version: str, gpu_name: str, capability: tuple[int, int],
                    engine_record: Mapping, builder: Mapping, outputs: Sequence[Mapping],
                    tokenizer: Sequence[str]) -> dict:
    """engine.json's content (pure): the record of how the engine was made plus the model keys."""
    info = export_manifest["graphs"][contract.STEP]
    doc: dict[str, Any] = {
        "format": ENGINE_FORMAT, "version": ENGINE_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "engine": {"file": ENGINE_FILE, **dict(engine_record)},
        "tensorrt": {"version": trt_version,
                     "strongly_typed": "default" if (parse_version(trt_version) or (0,)) >= STRONGLY_TYPED_DEFAULT
                     else "NetworkDefinitionCreationFlag.STRONGLY_TYPED"},
        "gpu": {"name": gpu_name, "compute_capability": [int(capability[0]), int(capability[1])]},
        "limits": asdict(plan.limits),
        "profiles": [p.to_dict() for p in plan.profiles],
        "builder": dict(builder),
        "plugins": {"file": PLUGIN_FILE, "source": str(Path(plugin_source).resolve()), "sha256": plugin_sha256},
        "export": {"path": str(Path(export_dir).resolve()), "file": info.get("trt_file", contract.STEP_TRT_FILE),
                   "manifest_sha256": contract.sha256(Path(export_dir) / contract.MANIFEST),
                   "manifest_copy": EXPORT_MANIFEST_COPY},
        "inputs": list(info["inputs"]),
        "outputs": list(outputs),
    }
    for key in MODEL_KEYS:
        if key in export_manifest:
            doc[key] = export_manifest[key]
    doc["tokenizer"] = list(tokenizer)
    # a per-layer export built with --no-layer-outputs is not per-layer any more
    doc["per_layer"] = bool(export_manifest.get("per_layer")) and any(
        str(io["name"]).endswith(LAYER_SUFFIX) for io in outputs)
    return doc


def write_engine_manifest(engine_dir: str | os.PathLike, doc: Mapping) -> Path:
    path = Path(engine_dir) / ENGINE_MANIFEST
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def is_engine_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / ENGINE_MANIFEST).is_file()


def read_engine_manifest(engine_dir: str | os.PathLike, verify: str = "fast") -> dict:
    """engine.json of an engine folder, checked for every key the runtime reads (TensorRTError naming
    the key). verify: "fast"/"full" also check the engine file's size and sha256, "none" skips it."""
    root = Path(engine_dir)
    path = root / ENGINE_MANIFEST
    if not root.is_dir():
        raise TensorRTError(f"{root}: no such engine folder (make one with hatrt build EXPORT -o {root})")
    if not path.is_file():
        hint = " (an export directory: build an engine from it with hatrt build)" \
            if (root / contract.MANIFEST).is_file() else ""
        raise TensorRTError(f"{path}: no engine manifest; is {root} an engine folder written by hatrt build?{hint}")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TensorRTError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != ENGINE_FORMAT or doc.get("version") != ENGINE_VERSION:
        got = (doc.get("format"), doc.get("version")) if isinstance(doc, dict) else None
        raise TensorRTError(f"{path}: format/version {got}, expected {ENGINE_FORMAT!r} version {ENGINE_VERSION}")
    for key, kind in (("engine", dict), ("tensorrt", dict), ("profiles", list), ("plugins", dict), ("config", dict),
                      ("dtype", str), ("cache_layout", list), ("inputs", list), ("outputs", list), ("limits", dict)):
        if not isinstance(doc.get(key), kind):
            raise TensorRTError(f"{path}: key {key!r} missing or not a JSON {kind.__name__}")
    try:
        profiles = [Profile.from_dict(p) for p in doc["profiles"]]
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise TensorRTError(f"{path}: key 'profiles' is malformed ({e})") from None
    if not profiles or sorted(p.index for p in profiles) != list(range(len(profiles))):
        raise TensorRTError(f"{path}: key 'profiles' must list profiles 0..n-1")
    if verify != "none":
        rec = doc["engine"]
        try:
            contract.verify_file(root / str(rec.get("file", ENGINE_FILE)), rec, path, verify == "full", "build it again")
        except contract.ExportError as e:
            raise TensorRTError(str(e)) from None
    return doc


def engine_profiles(doc: Mapping) -> list[Profile]:
    return sorted((Profile.from_dict(p) for p in doc["profiles"]), key=lambda p: p.index)


def engine_export_manifest(doc: Mapping) -> dict:
    """The export-manifest view of an engine folder (the keys `hatrt check` and the tokenizer code read:
    config, dtype, quant_sim, per_layer, source, cache_layout, tokenizer, graphs.step)."""
    out = {k: doc[k] for k in MODEL_KEYS if k in doc}
    out["graphs"] = {contract.STEP: {"file": ENGINE_FILE, "inputs": doc["inputs"], "outputs": doc["outputs"]}}
    return out


# ============================================================================ equivalent commands
def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape) if shape else "scalar"


def trtexec_command(plan: EnginePlan, onnx_path: str | os.PathLike, plugin_library: str | os.PathLike,
                    engine_path: str | os.PathLike, *, workspace: int | None = None,
                    optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL, timing_cache: str | os.PathLike | None = None,
                    strongly_typed_flag: bool = False, tf32: bool = False) -> str:
    """The trtexec command line that builds the same engine (one --profile=N block per profile)."""
    args = ["trtexec", f"--onnx={onnx_path}", f"--dynamicPlugins={plugin_library}", f"--saveEngine={engine_path}"]
    for p in plan.profiles:
        args.append(f"--profile={p.index}")
        for which in ("min", "opt", "max"):
            spec = ",".join(f"{name}:{_shape_text(getattr(r, which))}" for name, r in p.shapes.items())
            args.append(f"--{which}Shapes={spec}")
    if workspace:
        args.append(f"--memPoolSize=workspace:{max(1, workspace >> 20)}M")
    args.append(f"--builderOptimizationLevel={optimization_level}")
    if timing_cache is not None:
        args.append(f"--timingCacheFile={timing_cache}")
    if strongly_typed_flag:
        args.append("--stronglyTyped")
    if not tf32:
        args.append("--noTF32")  # trtexec allows TF32 by default, the builder here does not
    args.append("--skipInference")
    return " ".join(shlex.quote(a) for a in args)


def polygraphy_command(plan: EnginePlan, onnx_path: str | os.PathLike, plugin_library: str | os.PathLike,
                       engine_path: str | os.PathLike, *, workspace: int | None = None,
                       optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL,
                       timing_cache: str | os.PathLike | None = None, strongly_typed_flag: bool = False,
                       tf32: bool = False) -> str:
    """The `polygraphy convert` command line that builds the same engine (the three shape options once
    per profile, in profile order)."""
    args = ["polygraphy", "convert", str(onnx_path), "--plugins", str(plugin_library), "-o", str(engine_path)]
    for p in plan.profiles:
        for which in ("min", "opt", "max"):
            args.append(f"--trt-{which}-shapes")
            args += [f"{name}:[{','.join(str(d) for d in getattr(r, which))}]" for name, r in p.shapes.items()]
    if workspace:
        args += ["--pool-limit", f"workspace:{workspace}"]
    args += ["--builder-optimization-level", str(optimization_level)]
    if timing_cache is not None:
        args += ["--load-timing-cache", str(timing_cache), "--save-timing-cache", str(timing_cache)]
    if strongly_typed_flag:
        args.append("--strongly-typed")
    if tf32:
        args.append("--tf32")  # polygraphy leaves TF32 off unless asked
    return " ".join(shlex.quote(a) for a in args)


# ============================================================================ environment
@dataclass(frozen=True)
class Environment:
    trt_version: str | None
    cuda: bool
    capability: tuple[int, int] | None
    gpu_name: str | None


def import_tensorrt():
    """The tensorrt module, or TensorRTError when it is missing (or only type stubs / an empty
    namespace package are installed, which make `import tensorrt` succeed with nothing in it)."""
    try:
        import tensorrt
    except ImportError as e:
        raise TensorRTError(f"TensorRT is not installed ({e}); install TensorRT >= "
                            f"{'.'.join(map(str, MIN_TENSORRT))} for your CUDA (pip install tensorrt-cu12 / "
                            "tensorrt-cu13)") from None
    if not hasattr(tensorrt, "Builder") or not hasattr(tensorrt, "__version__"):
        raise TensorRTError("`import tensorrt` found a package without TensorRT in it (type stubs or an empty "
                            f"namespace package at {getattr(tensorrt, '__path__', '?')}): install TensorRT itself")
    return tensorrt


def detect_environment() -> Environment:
    """The real facts for check_build_environment: TensorRT version, CUDA, GPU name and capability."""
    try:
        trt_version: str | None = str(import_tensorrt().__version__)
    except TensorRTError:
        trt_version = None
    import torch

    cuda = bool(torch.cuda.is_available())
    capability = tuple(torch.cuda.get_device_capability()) if cuda else None
    name = torch.cuda.get_device_name() if cuda else None
    return Environment(trt_version, cuda, (int(capability[0]), int(capability[1])) if capability else None, name)


# ============================================================================ the build
@dataclass
class BuildResult:
    engine_dir: Path
    manifest: dict
    trtexec: str
    polygraphy: str


def _layers(network: "trt.INetworkDefinition") -> list[LayerInfo]:
    out = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        names = tuple(layer.get_output(j).name for j in range(layer.num_outputs))
        out.append(LayerInfo(layer.name, str(layer.type.name), names))
    return out


def _parser_errors(parser: "trt.OnnxParser") -> list[str]:
    errors = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        errors.append(str(err))
    return errors


def _progress_monitor(log: Callable[[str], None]) -> "trt.IProgressMonitor | None":
    """An IProgressMonitor that logs each top-level phase, or None where the bindings lack it (the
    builder then logs only the lines of build_engine)."""
    import tensorrt as trt

    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._start: dict[str, float] = {}

        def phase_start(self, phase_name: str, parent_phase: str, num_steps: int) -> None:
            self._start[phase_name] = time.monotonic()
            if not parent_phase:
                log(f"phase {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True

        def phase_finish(self, phase_name: str) -> None:
            start = self._start.pop(phase_name, None)
            if start is not None and time.monotonic() - start > 5.0:
                log(f"phase {phase_name} done in {time.monotonic() - start:.1f} s")

    return Monitor()


def load_plugin_library(library: str | os.PathLike) -> "trt.IPluginRegistry":
    """Load the plugin library into TensorRT's global registry (once per process and path)."""
    import tensorrt as trt

    registry: trt.IPluginRegistry = trt.get_plugin_registry()
    key = str(Path(library).resolve())
    if key not in _LOADED_LIBRARIES:
        try:
            _LOADED_LIBRARIES[key] = registry.load_library(key)
        except Exception as e:  # the bindings raise RuntimeError / TypeError on failure
            raise TensorRTError(f"TensorRT cannot load the plugin library {library}: {e}") from None
        if _LOADED_LIBRARIES[key] is None:
            del _LOADED_LIBRARIES[key]
            raise TensorRTError(f"TensorRT cannot load the plugin library {library} (load_library returned nothing; "
                                "see the TensorRT log: missing symbols, or the same creators registered twice)")
    return registry


_LOADED_LIBRARIES: dict[str, Any] = {}


def _registered(registry: "trt.IPluginRegistry", nodes: Sequence[HatrtNode]) -> set[tuple[str, str, str]]:
    found = set()
    for node in {(n.op_type, n.plugin_version, n.plugin_namespace) for n in nodes}:
        if registry.get_creator(node[0], node[1], node[2]) is not None:
            found.add(node)
    return found


def build_engine(export_dir: str | os.PathLike, out_dir: str | os.PathLike, *, limits: Limits = Limits(),
                 plugins: str | os.PathLike | None = None, workspace: int | None = None,
                 optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL, timing_cache: str | os.PathLike | None = None,
                 layer_outputs: bool = True, extra_weight_memory: float = 0.0, tf32: bool = False,
                 overwrite: bool = False,
                 verbose: bool = False,
                 log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> BuildResult:
    """Build the engine folder `out_dir` from the export in `export_dir` (see the module docstring).

    Every refusal (TensorRTError) fires before anything is written: the export manifest and its files,
    the limits, TensorRT, the GPU (FP8 exports need compute capability >= 8.9), the plugin library,
    its creators for every `hatrt` node, and after parsing, that every `hatrt` node is a plugin layer."""
    from exporter.atomic import OutputDirError, atomic_output_dir

    export_dir = Path(export_dir)
    try:
        manifest = contract.read_manifest(export_dir, verify="fast")
    except contract.ExportError as e:
        raise TensorRTError(str(e)) from None
    info = manifest["graphs"][contract.STEP]
    onnx_path = export_dir / info.get("trt_file", contract.STEP_TRT_FILE)
    if not onnx_path.is_file():
        raise TensorRTError(f"{onnx_path}: the TensorRT graph (the twin without ONNX functions) is missing")
    plan = plan_profiles(manifest, limits)
    library = Path(plugins) if plugins is not None else default_plugin_library()
    env = detect_environment()
    check_build_environment(trt_version=env.trt_version, cuda=env.cuda, capability=env.capability,
                            fp8=is_fp8_export(manifest), plugin_library=library, gpu_name=env.gpu_name)
    nodes = hatrt_nodes(onnx_path, str(manifest.get("custom_ops", {}).get("domain", "hatrt")))
    if workspace is not None and workspace <= 0:
        raise TensorRTError(f"--workspace must be > 0 bytes, got {workspace}")
    if not 0 <= optimization_level <= 5:
        raise TensorRTError(f"--optimization-level must lie in [0, 5], got {optimization_level}")
    if not 0.0 <= extra_weight_memory <= 1.0:
        raise TensorRTError(f"--extra-weight-memory must lie in [0, 1], got {extra_weight_memory}")

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise TensorRTError(f"{out_dir}: exists and is not empty; pass --force to replace it")

    import_tensorrt()  # refuses stubs / empty namespace packages before the typed import below
    import tensorrt as trt

    version: tuple[int, ...] = parse_version(env.trt_version) or (0,)
    flag_typed = version < STRONGLY_TYPED_DEFAULT
    logger = trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)
    registry = load_plugin_library(library)
    check_plugins_registered(nodes, _registered(registry, nodes), library)

    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if flag_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    typing_note = "STRONGLY_TYPED flag" if flag_typed else "strongly typed by default"
    log(f"parsing {onnx_path} (TensorRT {env.trt_version}, {typing_note})")
    if not parser.parse_from_file(str(onnx_path)):
        errors = _parser_errors(parser)
        missing = [n.name for n in nodes if any(n.op_type in e for e in errors)]
        raise TensorRTError(f"TensorRT's ONNX parser refused {onnx_path}"
                            + (f" at hatrt node(s) {missing} (plugin not registered?)" if missing else "")
                            + ":\n  " + "\n  ".join(errors or ["(no error recorded; see the log)"]))
    check_plugin_layers(nodes, _layers(network))
    log(f"{len(nodes)} hatrt nodes are plugin layers ({network.num_layers} layers)")

    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(names) != sorted(plan.inputs):  # the profiles name every input; the order does not matter
        raise TensorRTError(f"{onnx_path}: network inputs {contract.short(names)} differ from the manifest's "
                            f"{contract.short(plan.inputs)}")
    dropped = []
    if not layer_outputs:
        for t in [network.get_output(i) for i in range(network.num_outputs)]:
            if t.name.endswith(LAYER_SUFFIX):
                dropped.append(t.name)
                network.unmark_output(t)
    outputs = [io for io in info["outputs"] if io["name"] not in dropped]

    config = builder.create_builder_config()
    if workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    config.builder_optimization_level = int(optimization_level)
    if tf32:  # TensorRT allows TF32 for fp32 layers by default: exact fp32 unless asked (hatrt check: 1e-5)
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    monitor = _progress_monitor(log)
    if monitor is not None:
        config.progress_monitor = monitor
    for p in plan.profiles:
        prof = builder.create_optimization_profile()
        for name, r in p.shapes.items():
            prof.set_shape(name, trt.Dims(list(r.min)), trt.Dims(list(r.opt)), trt.Dims(list(r.max)))
        # a hint for every profile after the first: reuse the first one's weights (0: no extra copy)
        prof.extra_memory_target = float(extra_weight_memory)
        if not prof:
            raise TensorRTError(f"TensorRT finds the {p.name} profile invalid: {p.to_dict()['dims']}")
        if config.add_optimization_profile(prof) != p.index:
            raise TensorRTError(f"TensorRT rejected the {p.name} profile: {p.to_dict()['dims']}")

    cache_path = Path(timing_cache) if timing_cache is not None else out_dir / TIMING_CACHE_FILE
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    log(("loaded timing cache " + str(cache_path)) if cache_bytes else f"new timing cache ({cache_path})")

    engine_path = out_dir / ENGINE_FILE
    commands = {"trtexec": trtexec_command(plan, onnx_path, library, engine_path, workspace=workspace,
                                           optimization_level=optimization_level, timing_cache=cache_path,
                                           strongly_typed_flag=flag_typed, tf32=tf32),
                "polygraphy": polygraphy_command(plan, onnx_path, library, engine_path, workspace=workspace,
                                                 optimization_level=optimization_level, timing_cache=cache_path,
                                                 strongly_typed_flag=flag_typed, tf32=tf32)}
    log("equivalent command:\n  " + commands["trtexec"])
    for p in plan.profiles:
        log(f"profile {p.index} {p.name}: "
            + ", ".join(f"{d} {lo}..{hi} (opt {o})" for d, (lo, o, hi) in p.dims.items()))

    start = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError("TensorRT could not build the engine (see the TensorRT log above)")
    seconds = time.monotonic() - start
    log(f"built in {seconds:.0f} s")
    blob = memoryview(serialized)  # IHostMemory exposes the buffer protocol
    timing = memoryview(config.get_timing_cache().serialize())
    doc: dict = {}
    try:
        with atomic_output_dir(out_dir, overwrite=overwrite, report=log) as tmp:
            (tmp / ENGINE_FILE).write_bytes(blob)
            shutil.copyfile(library, tmp / PLUGIN_FILE)
            tokenizer = copy_runtime_files(export_dir, manifest, tmp)
            if timing_cache is None:
                (tmp / TIMING_CACHE_FILE).write_bytes(timing)
            else:
                _write_atomic(cache_path, timing)
            doc = engine_manifest(
                export_dir=export_dir, export_manifest=manifest, plan=plan, plugin_source=library,
                plugin_sha256=contract.sha256(tmp / PLUGIN_FILE), trt_version=str(env.trt_version),
                gpu_name=str(env.gpu_name), capability=env.capability or (0, 0),
                engine_record=contract.file_record(tmp / ENGINE_FILE),
                builder={"optimization_level": optimization_level, "workspace_bytes": workspace,
                         "extra_weight_memory": extra_weight_memory, "tf32": tf32,
                         "timing_cache": str(cache_path.resolve()) if timing_cache is not None else TIMING_CACHE_FILE,
                         "seconds": round(seconds, 1), "layer_outputs": not dropped, **commands},
                outputs=outputs, tokenizer=tokenizer)
            write_engine_manifest(tmp, doc)
    except OutputDirError as e:
        raise TensorRTError(str(e)) from None
    return BuildResult(out_dir, doc, commands["trtexec"], commands["polygraphy"])


def copy_runtime_files(export_dir: str | os.PathLike, manifest: Mapping, dest: str | os.PathLike) -> list[str]:
    """Copy what the runtime and `hatrt check` read besides engine.json into an engine folder: the
    export's manifest (as export_manifest.json), its tokenizer files and, for an FP8 export, its
    recipe (the torch reference applies it; engines/quantize.py load_recipe). Returns the tokenizer
    files copied."""
    src, dst = Path(export_dir), Path(dest)
    shutil.copyfile(src / contract.MANIFEST, dst / EXPORT_MANIFEST_COPY)
    tokenizer = []
    for name in manifest.get("tokenizer") or []:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            tokenizer.append(name)
    quant = manifest.get("quantization")
    recipe = quant.get("recipe") if isinstance(quant, dict) else None
    if recipe:
        if not (src / str(recipe)).is_file():
            raise TensorRTError(f"{src / str(recipe)}: the FP8 recipe named by the manifest's quantization is missing")
        shutil.copyfile(src / str(recipe), dst / str(recipe))
    return tokenizer


def _write_atomic(path: Path, data: bytes | memoryview) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


__all__ = ["DECODE", "ENGINE_FILE", "ENGINE_MANIFEST", "EnginePlan", "Environment", "HatrtNode", "LayerInfo", "Limits",
           "PREFILL", "Profile", "ShapeRange", "TensorRTError", "build_engine", "check_build_environment",
           "check_plugin_layers", "check_plugins_registered", "copy_runtime_files", "default_plugin_library",
           "detect_environment", "engine_export_manifest", "engine_manifest", "engine_profiles", "hatrt_nodes",
           "import_tensorrt", "is_engine_dir", "is_fp8_export", "load_plugin_library", "max_entry_capacity",
           "plan_profiles", "polygraphy_command", "profile_for_seq", "read_engine_manifest", "resolve_limits",
           "trtexec_command", "verify_plugin_library", "write_engine_manifest"]
