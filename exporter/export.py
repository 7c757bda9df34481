"""Export a checkpoint to ONNX: prefill.onnx, decode.onnx, their TensorRT twins and a manifest.

Each graph is the reference model (exporter/graph.py) traced by torch.onnx.export(dynamo=True,
opset 23); the three attention operations become single nodes of the `hatrt` domain that carry a
model-local function (so stock ONNX Runtime runs the file) and plugin_namespace/plugin_version
(so TensorRT picks the plugin). The `.trt.onnx` twins drop the functions, so a TensorRT build
without the plugin library fails instead of silently building the slow decomposition.

Everything is written into a temporary directory next to the target and renamed into place at the
end: an interrupted export leaves nothing under the final names.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import BATCH, CSA_ENTRIES, HCA_ENTRIES, cache_layout
from .checkpoint import load_model
from .config import CSA, HCA
from .graph import DecodeGraph, PrefillGraph
from .model import Transformer
from .presets import PRESETS

MANIFEST = "manifest.json"
MANIFEST_FORMAT, MANIFEST_VERSION = "hatrt-export", 1
OPSET = 23
DTYPES = {"float32": torch.float32, "float16": torch.float16}
SEQ = "seq"
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with room for the graph itself

# Example sizes for tracing. Every dynamic dim gets a distinct value > 1 so no two dims unify
# and nothing specializes; the prompt crosses the window and several CSA/HCA blocks.
_TRACE_BATCH, _TRACE_SEQ, _TRACE_CSA, _TRACE_HCA = 2, 263, 71, 3


class ExportError(ValueError):
    """The export cannot be done as asked; the message names the argument or path at fault."""


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    manifest: dict


def _log(progress: Callable[[str], None] | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


def _check_args(dtype: str, opset: int) -> torch.dtype:
    if opset != OPSET:
        raise ExportError(f"unsupported opset {opset}: hatrt exports opset {OPSET} (the lowest with "
                          "Attention/RMSNormalization; the hatrt functions are written against it)")
    if dtype == "bfloat16":
        raise ExportError("unsupported dtype 'bfloat16': ONNX Runtime has no bf16 MatMul/TopK on the CPU; "
                          "export float16 or float32 (TensorRT casts as the engine is built)")
    if dtype not in DTYPES:
        raise ExportError(f"unsupported dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _prepare_target(out_dir: Path, overwrite: bool) -> Path:
    """Validate the destination and create the temporary directory the export is written into."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"output path {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"output directory {out_dir} is not empty (pass overwrite=True / --force to replace it)")
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=parent))
    except OSError as e:
        raise ExportError(f"cannot write the output directory {out_dir}: {e.strerror or e}") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _source(source) -> dict:
    if isinstance(source, Transformer):
        return {"kind": "module", "value": None}
    text = str(source)
    if text in PRESETS and not Path(text).is_dir():
        return {"kind": "preset", "value": text}
    return {"kind": "checkpoint", "value": str(Path(text).resolve())}


def _dynamic_shapes(model: Transformer, graph: str):
    """torch.export dims: batch everywhere, seq for prefill, entry capacities for decode caches."""
    from torch.export import Dim

    batch = Dim(BATCH, min=1, max=4096)
    if graph == "prefill":
        return ({0: batch, 1: Dim(SEQ, min=1, max=model.config.max_position_embeddings)},)
    csa = Dim(CSA_ENTRIES, min=0, max=1 << 24)
    hca = Dim(HCA_ENTRIES, min=0, max=1 << 24)
    named = {BATCH: batch, CSA_ENTRIES: csa, HCA_ENTRIES: hca}
    specs = [{0: batch}]  # input_ids [batch, 1]
    for spec in cache_layout(model.config, model.dtype):
        specs.append({i: named[d] for i, d in enumerate(spec.dims) if isinstance(d, str)})
    return specs[0], tuple(specs[1:])  # forward(input_ids, *cache): the cache is one varargs group


def _trace_inputs(model: Transformer, graph: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    if graph == "prefill":
        return (torch.randint(0, vocab, (_TRACE_BATCH, _TRACE_SEQ), generator=g),)
    cache = model.new_cache(_TRACE_BATCH)
    with torch.no_grad():
        model(torch.randint(0, vocab, (_TRACE_BATCH, _TRACE_SEQ), generator=g), cache)
    for layer in cache.layers:  # distinct capacities per kind (> the blocks complete so far)
        if layer.ratio:
            layer.reserve(_TRACE_CSA if layer.ratio == CSA else _TRACE_HCA)
            for name in ("entries", "index_keys"):
                buf = getattr(layer, name)
                if buf is not None:
                    # a contiguous copy: strides of a view would pin the capacity in guards
                    setattr(layer, name, buf[:, : (_TRACE_CSA if layer.ratio == CSA else _TRACE_HCA)].clone())
    return (torch.randint(0, vocab, (_TRACE_BATCH, 1), generator=g), *cache.to_tensors())


def _io_specs(model_proto) -> dict:
    import onnx

    def spec(v):
        t = v.type.tensor_type
        dims = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim]
        return {"name": v.name, "dims": dims, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name}

    return {"inputs": [spec(v) for v in model_proto.graph.input],
            "outputs": [spec(v) for v in model_proto.graph.output]}


def _name_dims(model_proto, names: dict[str, list]) -> None:
    """Give every graph input/output our dim names (the exporter invents its own)."""
    for v in list(model_proto.graph.input) + list(model_proto.graph.output):
        dims = names.get(v.name)
        if dims is None:
            continue
        for d, want in zip(v.type.tensor_type.shape.dim, dims):
            if isinstance(want, str):
                d.dim_param = want
            else:
                d.dim_value = want


def _expected_dims(model: Transformer, graph: str, per_layer: bool) -> dict[str, list]:
    c = model.config
    layout = cache_layout(c, model.dtype)
    seq = SEQ if graph == "prefill" else 1
    dims = {"input_ids": [BATCH, seq], "logits": [BATCH, seq, c.vocab_size]}
    for spec in layout:
        out = list(spec.dims)
        if graph == "prefill":  # entry buffers hold exactly the complete blocks: seq // ratio
            out = [f"{SEQ} // {CSA}" if d == CSA_ENTRIES else f"{SEQ} // {HCA}" if d == HCA_ENTRIES else d
                   for d in out]
        else:
            dims[f"cache.{spec.name}"] = list(spec.dims)
        dims[f"new_cache.{spec.name}"] = out
    if per_layer:
        for i in range(c.num_layers):
            dims[f"layer{i}.streams"] = [BATCH, seq, c.hc_mult, c.hidden_size]
    return dims


def _export_graph(model: Transformer, graph: str, per_layer: bool, path: Path, trt_path: Path,
                  optimize: bool) -> dict:
    import onnx

    from . import onnx_ops

    # torch.onnx warns once per missing torchvision op on every export: noise for hatrt users.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    wrapper = (PrefillGraph if graph == "prefill" else DecodeGraph)(model, per_layer=per_layer).eval()
    args = _trace_inputs(model, graph)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper, args, dynamo=True, opset_version=OPSET, input_names=wrapper.input_names(),
            output_names=wrapper.output_names(), dynamic_shapes=_dynamic_shapes(model, graph),
            custom_translation_table=onnx_ops.CUSTOM_TRANSLATION_TABLE,
            optimize=optimize, verbose=False, report=False)
    onnx_ops.attach_functions(program)
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    program.save(str(path), external_data=big)
    proto = onnx.load(str(path), load_external_data=False)
    _name_dims(proto, _expected_dims(model, graph, per_layer))
    onnx.save(proto, str(path), save_as_external_data=False) if not big else onnx.save(proto, str(path))
    twin = onnx_ops.strip_functions(onnx.load(str(path), load_external_data=not big))
    if big:
        onnx.save(twin, str(trt_path), save_as_external_data=True, location=trt_path.name + ".data")
    else:
        onnx.save(twin, str(trt_path))
    return {"file": path.name, "trt_file": trt_path.name, **_io_specs(proto)}


def _worker_main() -> None:
    """Entry point of an export subprocess: export one graph, write its I/O description as JSON."""
    args = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    model = load_model(args["source"], dtype=DTYPES[args["dtype"]], quant_sim=args["quant_sim"])
    tmp, graph = Path(args["tmp"]), args["graph"]
    info = _export_graph(model, graph, args["per_layer"], tmp / f"{graph}.onnx", tmp / f"{graph}.trt.onnx",
                         args["optimize"])
    (tmp / f"{graph}.info.json").write_text(json.dumps(info))


def _export_graphs(source, model: Transformer, dtype: str, quant_sim: bool, per_layer: bool, tmp: Path,
                   optimize: bool, jobs: int, progress) -> dict:
    names = ("prefill", "decode")
    if jobs < 2 or isinstance(source, Transformer):
        graphs = {}
        for name in names:
            _log(progress, f"exporting {name} graph")
            graphs[name] = _export_graph(model, name, per_layer, tmp / f"{name}.onnx", tmp / f"{name}.trt.onnx",
                                         optimize)
        return graphs
    # The exporter is single-threaded Python: two graphs in two fresh interpreters take half the
    # wall time (subprocesses, not multiprocessing, so callers need no __main__ guard).
    _log(progress, "exporting the prefill and decode graphs in 2 processes")
    procs = {}
    try:
        for name in names:
            args = json.dumps({"source": str(source), "dtype": dtype, "quant_sim": quant_sim, "graph": name,
                               "per_layer": per_layer, "tmp": str(tmp), "optimize": optimize})
            procs[name] = subprocess.Popen(
                [sys.executable, "-c", "from exporter.export import _worker_main; _worker_main()", args],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        graphs = {}
        for name, proc in procs.items():
            _, err = proc.communicate()
            if proc.returncode != 0:
                tail = "\n".join(err.strip().splitlines()[-15:])
                raise ExportError(f"exporting the {name} graph failed:\n{tail}")
            graphs[name] = json.loads((tmp / f"{name}.info.json").read_text())
            (tmp / f"{name}.info.json").unlink()
            _log(progress, f"exported the {name} graph")
        return graphs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _tool_versions() -> dict:
    import onnx

    versions = {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__}
    for name in ("onnxscript", "onnxruntime", "onnx_ir"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    try:
        from importlib.metadata import version

        versions["hatrt"] = version("hatrt")
    except Exception:  # running from a source tree
        versions["hatrt"] = "source"
    return versions


def export_model(source, out_dir: str | os.PathLike, *, dtype: str = "float32", opset: int = OPSET,
                 quant_sim: bool = False, per_layer: bool = False, overwrite: bool = False,
                 optimize: bool = False, jobs: int | None = None,
                 progress: Callable[[str], None] | None = None) -> ExportResult:
    """Export `source` (a preset name, a checkpoint directory or a Transformer) into `out_dir`.

    optimize runs onnxscript's graph optimizer (constant folding, fewer nodes); ONNX Runtime and
    TensorRT optimize the graph again when they load it, so it is off by default (it doubles the
    export time). jobs: processes for the two graphs (default: 2 when the machine has 2+ cores).
    """
    from . import custom_ops, onnx_ops

    torch_dtype = _check_args(dtype, opset)
    out_dir = Path(out_dir)
    tmp = _prepare_target(out_dir, overwrite)
    try:
        _log(progress, f"loading {source}")
        if isinstance(source, Transformer):
            model = source.to(torch_dtype).eval()
        else:
            model = load_model(source, dtype=torch_dtype, quant_sim=quant_sim)
        jobs = jobs if jobs is not None else min(2, os.cpu_count() or 1)
        graphs = _export_graphs(source, model, dtype, quant_sim, per_layer, tmp, optimize, jobs, progress)
        _log(progress, "writing manifest")
        for info in graphs.values():
            info["sha256"] = {f: _sha256(tmp / info[f]) for f in ("file", "trt_file")}
        manifest = {
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": model.config.name, "source": _source(source), "config": model.config.to_hf_dict(),
            "dtype": dtype, "quant_sim": model.quant_sim, "per_layer": per_layer, "opset": opset,
            "custom_ops": {"domain": onnx_ops.DOMAIN, "version": onnx_ops.DOMAIN_VERSION,
                           "plugin_namespace": onnx_ops.PLUGIN_NAMESPACE,
                           "plugin_version": onnx_ops.PLUGIN_VERSION, "ops": sorted(custom_ops.OPS)},
            "cache_layout": [s.to_dict() for s in cache_layout(model.config, torch_dtype)],
            "graphs": graphs, "tools": _tool_versions(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        _log(progress, f"wrote {out_dir}")
        return ExportResult(out_dir, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(artifact_dir: str | os.PathLike) -> dict:
    """The manifest of an export directory, checked for everything the runtimes and checks read.

    Errors name the file and the key (ExportError)."""
    root = Path(artifact_dir)
    if not root.exists():
        raise ExportError(f"{root}: no such export directory")
    if not root.is_dir():
        raise ExportError(f"{root}: not a directory (an export directory holds {MANIFEST}, prefill.onnx, "
                          "decode.onnx)")
    path = root / MANIFEST
    if not path.is_file():
        raise ExportError(f"{path}: no manifest (is {root} a hatrt export directory?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ExportError(f"{path}: top level must be a JSON object")
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
        raise ExportError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                          f"expected {MANIFEST_FORMAT!r} version {MANIFEST_VERSION}")
    for key, kind in (("config", dict), ("dtype", str), ("cache_layout", list), ("graphs", dict)):
        if key not in manifest:
            raise ExportError(f"{path}: missing key {key!r}")
        if not isinstance(manifest[key], kind):
            raise ExportError(f"{path}: key {key!r} must be a JSON {kind.__name__}")
    if manifest["dtype"] not in DTYPES:
        raise ExportError(f"{path}: dtype {manifest['dtype']!r} is not one hatrt exports ({', '.join(DTYPES)})")

    def entries(items, where: str) -> None:
        for i, item in enumerate(items):
            for key in ("name", "dims", "dtype"):
                if not isinstance(item, dict) or key not in item:
                    raise ExportError(f"{path}: {where}[{i}] has no key {key!r}")

    entries(manifest["cache_layout"], "cache_layout")
    for graph in ("prefill", "decode"):
        info = manifest["graphs"].get(graph)
        if not isinstance(info, dict):
            raise ExportError(f"{path}: missing key 'graphs.{graph}'")
        for key in ("file", "inputs", "outputs"):
            if key not in info:
                raise ExportError(f"{path}: missing key 'graphs.{graph}.{key}'")
        entries(info["inputs"], f"graphs.{graph}.inputs")
        entries(info["outputs"], f"graphs.{graph}.outputs")
        if not (root / info["file"]).is_file():
            raise ExportError(f"{root / info['file']}: graph file missing (named by graphs.{graph}.file in {path})")
    return manifest
