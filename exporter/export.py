"""Export a checkpoint to ONNX: step.onnx, its TensorRT twin step.trt.onnx and a manifest.

The graph is the reference model's step (exporter/graph.py, names and dims in exporter/contract.py)
traced by torch.onnx.export(dynamo=True, opset 23): prefill chunks and decoding steps alike. The
three attention operations become single nodes of the `hatrt` domain that carry a model-local
function (so stock ONNX Runtime runs the file) and plugin_namespace/plugin_version (so TensorRT
picks the plugin). The `.trt.onnx` twin drops the functions, so a TensorRT build without the plugin
library fails instead of silently building the slow decomposition. Tokenizer files of a checkpoint
are copied along, so an export directory is self-contained.

Everything is written into a temporary directory next to the target and renamed into place at the
end: an interrupted export leaves nothing under the final names.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import contract
from .atomic import OutputDirError, atomic_output_dir
from .cache import CSA_ENTRIES, HCA_ENTRIES, cache_layout
from .checkpoint import load_model
from .config import CSA
from .contract import EXPORT_DTYPES as DTYPES
from .contract import MANIFEST, OPSET, ExportError, read_manifest
from .graph import StepGraph
from .model import Transformer
from .presets import PRESETS

EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with room for the graph itself
# Files of a Hugging Face checkpoint that describe its tokenizer and generation defaults.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")

# Example sizes for tracing. Every dynamic dim gets a distinct value > 1 so no two dims unify and
# nothing specializes: the step feeds _TRACE_SEQ tokens after a _TRACE_PREFIX-token prompt that
# crosses the window and several CSA/HCA blocks, with entry capacities above what is complete.
_TRACE_BATCH, _TRACE_PREFIX, _TRACE_SEQ, _TRACE_LOGITS = 2, 263, 7, 3
_TRACE_CSA, _TRACE_HCA = 71, 5


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


def _source(source) -> dict:
    if isinstance(source, Transformer):
        return {"kind": "module", "value": None}
    text = str(source)
    if text in PRESETS and not Path(text).is_dir():
        return {"kind": "preset", "value": text}
    return {"kind": "checkpoint", "value": str(Path(text).resolve())}


def _dynamic_shapes(model: Transformer):
    """torch.export dims: batch everywhere, seq and n_logits, the entry capacities of the cache."""
    from torch.export import Dim

    from .cache import BATCH

    c = model.config
    named = {BATCH: Dim(BATCH, min=1, max=4096), CSA_ENTRIES: Dim(CSA_ENTRIES, min=0, max=1 << 24),
             HCA_ENTRIES: Dim(HCA_ENTRIES, min=0, max=1 << 24)}
    seq = Dim(contract.SEQ, min=1, max=c.max_position_embeddings)
    n_logits = Dim(contract.N_LOGITS, min=1, max=c.max_position_embeddings)
    cache = tuple({i: named[d] for i, d in enumerate(spec.dims) if isinstance(d, str)}
                  for spec in cache_layout(c, model.dtype))
    return {0: named[BATCH], 1: seq}, {0: n_logits}, cache  # forward(input_ids, logits_index, *cache)


def _trace_inputs(model: Transformer) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    cache = model.new_cache(_TRACE_BATCH)
    with torch.no_grad():
        model(torch.randint(0, vocab, (_TRACE_BATCH, _TRACE_PREFIX), generator=g), cache)
    for layer in cache.layers:  # distinct capacities per kind (> the blocks complete after the step)
        if layer.ratio:
            cap = _TRACE_CSA if layer.ratio == CSA else _TRACE_HCA
            layer.reserve(cap)
            for name in ("entries", "index_keys"):
                buf = getattr(layer, name)
                if buf is not None:
                    # a contiguous copy: strides of a view would pin the capacity in guards
                    setattr(layer, name, buf[:, :cap].clone())
    ids = torch.randint(0, vocab, (_TRACE_BATCH, _TRACE_SEQ), generator=g)
    logits_index = torch.arange(_TRACE_SEQ - _TRACE_LOGITS, _TRACE_SEQ)
    return (ids, logits_index, *cache.to_tensors())


def _io_specs(model_proto) -> dict:
    import onnx

    def spec(v):
        t = v.type.tensor_type
        dims = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim]
        return {"name": v.name, "dims": dims, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name}

    return {"inputs": [spec(v) for v in model_proto.graph.input],
            "outputs": [spec(v) for v in model_proto.graph.output]}


def _name_dims(model_proto, names: dict[str, list]) -> None:
    """Give every graph input/output the contract's dim names (the exporter invents its own)."""
    for v in list(model_proto.graph.input) + list(model_proto.graph.output):
        dims = names.get(v.name)
        if dims is None:
            continue
        for d, want in zip(v.type.tensor_type.shape.dim, dims):
            if isinstance(want, str):
                d.dim_param = want
            else:
                d.dim_value = want


def _export_step(model: Transformer, per_layer: bool, path: Path, trt_path: Path, optimize: bool) -> dict:
    import onnx

    from . import onnx_ops

    # torch.onnx warns once per missing torchvision op on every export: noise for hatrt users.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    wrapper = StepGraph(model, per_layer=per_layer).eval()
    args = _trace_inputs(model)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper, args, dynamo=True, opset_version=OPSET, input_names=wrapper.input_names(),
            output_names=wrapper.output_names(), dynamic_shapes=_dynamic_shapes(model),
            custom_translation_table=onnx_ops.CUSTOM_TRANSLATION_TABLE,
            optimize=optimize, verbose=False, report=False)
    onnx_ops.attach_functions(program)
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    program.save(str(path), external_data=big)
    proto = onnx.load(str(path), load_external_data=False)
    _name_dims(proto, contract.step_dims(model.config, wrapper.layout, per_layer))
    onnx.save(proto, str(path), save_as_external_data=False) if not big else onnx.save(proto, str(path))
    # the TensorRT twin: functions stripped, constant-folded, rewritten for the parser (exporter/trt_lint.py)
    onnx_ops.save_trt_twin(path, trt_path, big=big)
    return {"file": path.name, "trt_file": trt_path.name, **_io_specs(proto)}


def _copy_tokenizer(source, tmp: Path) -> list[str]:
    """Copy the tokenizer / generation files of a checkpoint directory; returns their names."""
    if isinstance(source, Transformer) or not Path(str(source)).is_dir():
        return []
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(str(source)) / name
        if src.is_file():
            shutil.copyfile(src, tmp / name)
            copied.append(name)
    return copied


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
                 optimize: bool = False, progress: Callable[[str], None] | None = None) -> ExportResult:
    """Export `source` (a preset name, a checkpoint directory or a Transformer) into `out_dir`.

    optimize runs onnxscript's graph optimizer (constant folding, fewer nodes); ONNX Runtime and
    TensorRT optimize the graph again when they load it, so it is off by default."""
    torch_dtype = _check_args(dtype, opset)
    out_dir = Path(out_dir)
    try:
        # a temporary directory renamed into place at the end; removed on any error, Ctrl-C, SIGTERM
        # or SIGHUP (exporter/atomic.py), so nothing half-written is ever left under out_dir
        with atomic_output_dir(out_dir, overwrite=overwrite, report=progress) as tmp:
            manifest = _export_into(source, tmp, torch_dtype, dtype, opset, quant_sim, per_layer, optimize, progress)
    except OutputDirError as e:
        raise ExportError(str(e)) from None
    _log(progress, f"wrote {out_dir}")
    return ExportResult(out_dir, manifest)


def _export_into(source, tmp: Path, torch_dtype: torch.dtype, dtype: str, opset: int, quant_sim: bool,
                 per_layer: bool, optimize: bool, progress) -> dict:
    from . import custom_ops, onnx_ops

    _log(progress, f"loading {source}")
    if isinstance(source, Transformer):
        model = source.to(torch_dtype).eval()
    else:
        model = load_model(source, dtype=torch_dtype, quant_sim=quant_sim)
    _log(progress, f"exporting the step graph ({model.config.name}, {dtype}"
                   f"{', quant-sim' if model.quant_sim else ''}{', per-layer' if per_layer else ''})")
    graph = _export_step(model, per_layer, tmp / contract.STEP_FILE, tmp / contract.STEP_TRT_FILE, optimize)
    tokenizer = _copy_tokenizer(source, tmp)
    _log(progress, "hashing files, writing the manifest")
    files = contract.file_records(tmp)
    manifest = {
        "format": contract.MANIFEST_FORMAT, "version": contract.MANIFEST_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model.config.name, "source": _source(source), "config": model.config.to_hf_dict(),
        "dtype": dtype, "quant_sim": model.quant_sim, "per_layer": per_layer, "opset": opset,
        "custom_ops": {"domain": onnx_ops.DOMAIN, "version": onnx_ops.DOMAIN_VERSION,
                       "plugin_namespace": onnx_ops.PLUGIN_NAMESPACE,
                       "plugin_version": onnx_ops.PLUGIN_VERSION, "ops": sorted(custom_ops.OPS)},
        "cache_layout": [s.to_dict() for s in cache_layout(model.config, torch_dtype)],
        "graphs": {contract.STEP: graph}, "tokenizer": tokenizer, "files": files,
        "tools": _tool_versions(),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


__all__ = ["DTYPES", "ExportError", "ExportResult", "MANIFEST", "OPSET", "export_model", "read_manifest"]
