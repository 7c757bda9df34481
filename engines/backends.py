"""Runtimes behind one small interface, so one generate loop (engines/generate.py) drives them all.

A `Backend` runs the two graphs of exporter/graph.py with the cache as a flat tensor list in
`cache_layout` order (engines/cache_ops.py operates on it):

    backend.prefill(input_ids [1, S])      -> (logits [1, S, V] float32, cache)
    backend.decode(input_ids [B, 1], cache) -> (logits [B, 1, V] float32, cache)

Prefill returns entry buffers of exactly the complete blocks (S // ratio); before a decode step
the caller makes every entry capacity >= the complete blocks after that step
(`cache_ops.ensure_capacity`).

- `TorchBackend(model)`: PrefillGraph / DecodeGraph run eagerly (the reference).
- `OnnxRuntimeBackend(artifact_dir)`: prefill.onnx / decode.onnx of an export directory
  (exporter/export.py), wired by the names in its manifest.json.
- `load_backend(source, backend)`: a preset name, checkpoint directory or export directory.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporter.cache import TensorSpec, cache_layout
from exporter.config import ConfigError, ModelConfig

from . import cache_ops

TORCH, ONNXRUNTIME = "torch", "onnxruntime"
BACKENDS = (TORCH, ONNXRUNTIME)
MANIFEST = "manifest.json"
INPUT_IDS, LOGITS = "input_ids", "logits"
CACHE_IN, CACHE_OUT = "cache.", "new_cache."
_NUMPY = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


class BackendError(ValueError):
    """A backend cannot be loaded or run as asked; the message names the file, key or argument."""


class Backend(abc.ABC):
    """One runtime: `config`, cache `layout`, `prefill` and `decode` on flat caches, `name`."""

    name: str
    config: ModelConfig
    layout: list[TensorSpec]

    @abc.abstractmethod
    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """input_ids [1, S] int64 -> (logits [1, S, V] float32, cache after the prompt)."""

    @abc.abstractmethod
    def decode(self, input_ids: torch.Tensor, cache: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """input_ids [B, 1] int64 + cache -> (logits [B, 1, V] float32, updated cache)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config.name!r})"


# ============================================================================ torch
class TorchBackend(Backend):
    """The reference: exporter/graph.py's PrefillGraph / DecodeGraph run eagerly under no_grad."""

    name = TORCH

    def __init__(self, model):
        from exporter.graph import DecodeGraph, PrefillGraph

        self.model = model.eval()
        self.config = model.config
        self.layout = cache_layout(model.config, model.dtype)
        self._prefill, self._decode = PrefillGraph(self.model), DecodeGraph(self.model)
        self._device = model.embed.weight.device

    def _split(self, out: tuple) -> tuple[torch.Tensor, list[torch.Tensor]]:
        n = len(self.layout)
        return out[0].float(), list(out[1:1 + n])

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self._split(self._prefill(input_ids.to(self._device, torch.long)))

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, cache: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        cache = [t.to(self._device) for t in cache]
        return self._split(self._decode(input_ids.to(self._device, torch.long), *cache))


# ============================================================================ ONNX Runtime
def read_manifest(artifact_dir: str | os.PathLike) -> dict:
    """manifest.json of an export directory (exporter.export.read_manifest), errors as BackendError."""
    from exporter.export import ExportError
    from exporter.export import read_manifest as _read

    try:
        return _read(artifact_dir)
    except ExportError as e:
        raise BackendError(str(e)) from None


def manifest_layout(manifest: dict) -> list[TensorSpec]:
    return [TensorSpec(s["name"], tuple(s["dims"]), s["dtype"]) for s in manifest["cache_layout"]]


def manifest_config(manifest: dict, where: str = MANIFEST) -> ModelConfig:
    try:
        return ModelConfig.from_hf_dict(manifest["config"], name=str(manifest.get("model") or "custom"))
    except ConfigError as e:
        raise BackendError(f"{where}: key 'config': {e}") from None


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxRuntimeBackend(Backend):
    """prefill.onnx / decode.onnx of an export directory under onnxruntime.InferenceSession.

    Inputs and outputs are bound by the manifest's names ("input_ids", "cache.<spec>", "logits",
    "new_cache.<spec>"); tensors cross as numpy in the manifest's dtypes. Extra outputs (per-layer
    streams of a per_layer export) are not fetched."""

    name = ONNXRUNTIME

    def __init__(self, artifact_dir: str | os.PathLike, providers: Sequence[str] | None = None,
                 session_options: Any = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("the onnxruntime backend needs the onnxruntime package "
                               "(pip install onnxruntime, or onnxruntime-gpu for CUDA)") from None
        self.artifact_dir = Path(artifact_dir)
        self.manifest = read_manifest(self.artifact_dir)
        where = str(self.artifact_dir / MANIFEST)
        self.config = manifest_config(self.manifest, where)
        self.layout = manifest_layout(self.manifest)
        for spec in self.layout:
            if spec.dtype not in _NUMPY:
                raise BackendError(f"{where}: cache_layout tensor {spec.name!r} has dtype {spec.dtype!r}, "
                                   f"which numpy/onnxruntime cannot carry (supported: {', '.join(_NUMPY)})")
        cache_names = [s.name for s in self.layout]
        self._io: dict[str, dict[str, dict]] = {}
        for graph, inputs in (("prefill", [INPUT_IDS]), ("decode", [INPUT_IDS] + [CACHE_IN + n for n in cache_names])):
            info = self.manifest["graphs"][graph]
            got_in = [io["name"] for io in info["inputs"]]
            if got_in != inputs:
                raise BackendError(f"{where}: graphs.{graph}.inputs are {_short(got_in)}, expected {_short(inputs)} "
                                   "(input_ids, then cache.<name> in cache_layout order)")
            outputs = [LOGITS] + [CACHE_OUT + n for n in cache_names]
            got_out = [io["name"] for io in info["outputs"]]
            if got_out[:len(outputs)] != outputs:
                raise BackendError(f"{where}: graphs.{graph}.outputs start with {_short(got_out[:len(outputs)])}, "
                                   f"expected {_short(outputs)}")
            for io in info["inputs"] + info["outputs"]:
                if io["name"] in set(inputs) | set(outputs) and io["dtype"] not in _NUMPY:
                    raise BackendError(f"{where}: graphs.{graph} tensor {io['name']!r} has dtype {io['dtype']!r} "
                                       f"(supported: {', '.join(_NUMPY)})")
            self._io[graph] = {io["name"]: io for io in info["inputs"] + info["outputs"]}
        self._outputs = [LOGITS] + [CACHE_OUT + n for n in cache_names]

        self.providers = list(providers) if providers is not None else default_providers()
        self.sessions = {}
        for graph in ("prefill", "decode"):
            path = self.artifact_dir / self.manifest["graphs"][graph]["file"]  # read_manifest: it exists
            try:
                session = ort.InferenceSession(str(path), sess_options=session_options, providers=self.providers)
            except Exception as e:  # onnxruntime raises its own exception types
                raise BackendError(f"{path}: onnxruntime cannot load the graph: {e}") from None
            names = [i.name for i in session.get_inputs()]
            want = [io["name"] for io in self.manifest["graphs"][graph]["inputs"]]
            if names != want:
                raise BackendError(f"{path}: graph inputs {_short(names)} differ from the manifest's {_short(want)}")
            out_names = {o.name for o in session.get_outputs()}
            missing = [n for n in self._outputs if n not in out_names]
            if missing:
                raise BackendError(f"{path}: graph has no outputs {_short(missing)} named in the manifest")
            self.sessions[graph] = session

    def _feed(self, graph: str, name: str, t: torch.Tensor) -> np.ndarray:
        dtype = _NUMPY[self._io[graph][name]["dtype"]]
        return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=dtype)

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = self.sessions[graph].run(self._outputs, feeds)
        logits = torch.from_numpy(np.asarray(out[0], dtype=np.float32))
        cache = [torch.from_numpy(np.ascontiguousarray(a, dtype=_NUMPY[s.dtype])) for a, s in zip(out[1:], self.layout)]
        return logits, cache

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self._run("prefill", {INPUT_IDS: self._feed("prefill", INPUT_IDS, input_ids)})

    def decode(self, input_ids: torch.Tensor, cache: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if len(cache) != len(self.layout):
            raise BackendError(f"decode: {len(cache)} cache tensors, the layout has {len(self.layout)}")
        feeds = {INPUT_IDS: self._feed("decode", INPUT_IDS, input_ids)}
        for spec, t in zip(self.layout, cache):
            feeds[CACHE_IN + spec.name] = self._feed("decode", CACHE_IN + spec.name, t)
        return self._run("decode", feeds)


def _short(names: Sequence[str], limit: int = 6) -> str:
    names = list(names)
    text = ", ".join(repr(n) for n in names[:limit])
    return f"[{text}{', ...' if len(names) > limit else ''}] ({len(names)})"


# ============================================================================ loading
def is_export_dir(source: str | os.PathLike) -> bool:
    path = Path(source)
    return path.is_dir() and (path / MANIFEST).is_file()


def _torch_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in ("float32", "float16", "bfloat16"):
        raise BackendError(f"unknown dtype {name!r}; choose float32, float16 or bfloat16")
    return cache_ops.torch_dtype(name)


def _load_torch(source: str | os.PathLike, dtype: torch.dtype, quant_sim: bool, device) -> TorchBackend:
    from exporter.checkpoint import CheckpointError, load_model
    from exporter.presets import PRESETS

    text = str(source)
    path = Path(text)
    if not (text in PRESETS and not path.is_dir()):
        if not path.exists():
            raise BackendError(f"{text}: no such checkpoint or export directory, nor a preset name "
                               f"(presets: {', '.join(PRESETS)})")
        if path.is_dir() and not (path / "config.json").is_file():
            raise BackendError(f"{path}: neither a checkpoint (no config.json) nor an export directory "
                               f"(no {MANIFEST})")
    try:
        model = load_model(source, dtype=dtype, quant_sim=quant_sim)
    except (CheckpointError, ConfigError) as e:
        raise BackendError(str(e)) from None
    if device is not None:
        model = model.to(device)
    return TorchBackend(model)


def load_backend(source: str | os.PathLike, backend: str = TORCH, *, dtype: str | torch.dtype | None = None,
                 quant_sim: bool | None = None, providers: Sequence[str] | None = None,
                 checkpoint: str | os.PathLike | None = None, device: str | torch.device | None = None) -> Backend:
    """A backend for `source`: a preset name, a checkpoint directory or an export directory.

    torch: presets and checkpoints load directly (dtype default float32, quant_sim default off).
    An export directory holds no weights: its manifest's "source" (the preset or checkpoint it was
    exported from) is loaded, by default with the manifest's dtype and quant_sim (explicit values
    win, e.g. to compare a bf16 reference), unless `checkpoint` names the weights explicitly.
    onnxruntime: `source` must be an export directory; `providers` default to CUDA (if available)
    then CPU. dtype/quant_sim, when given, must agree with the manifest.
    """
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    export_dir = is_export_dir(source)
    if backend == ONNXRUNTIME:
        if not export_dir:
            path = Path(source)
            if path.is_dir():
                raise BackendError(f"{path}: no {MANIFEST}: the onnxruntime backend runs an export directory "
                                   "(write one with exporter.export.export_model / hatrt export)")
            from exporter.presets import PRESETS

            kind = "a preset name, not an export directory" if str(source) in PRESETS else "no such export directory"
            raise BackendError(f"{source}: {kind}; the onnxruntime backend runs an export directory "
                               f"(prefill.onnx, decode.onnx, {MANIFEST}; write one with hatrt export)")
        ort_backend = OnnxRuntimeBackend(source, providers=providers)
        _check_agrees(ort_backend.manifest, Path(source) / MANIFEST, dtype, quant_sim)
        return ort_backend

    want_dtype = _torch_dtype(dtype)
    if not export_dir:
        return _load_torch(source if checkpoint is None else checkpoint, want_dtype or torch.float32,
                           bool(quant_sim), device)
    manifest = read_manifest(source)
    where = Path(source) / MANIFEST
    if checkpoint is None:
        src = manifest.get("source")
        if not isinstance(src, dict) or src.get("kind") not in ("preset", "checkpoint") or not src.get("value"):
            raise BackendError(f"{where}: an export directory holds no torch weights and the manifest names no "
                               "'source' preset or checkpoint; pass the checkpoint directory (or preset) it was "
                               "exported from instead")
        checkpoint = src["value"]
    m_dtype = _torch_dtype(manifest["dtype"])
    return _load_torch(checkpoint, want_dtype or m_dtype, bool(manifest.get("quant_sim", False))
                       if quant_sim is None else quant_sim, device)


def _check_agrees(manifest: dict, where: Path, dtype, quant_sim: bool | None) -> None:
    want = _torch_dtype(dtype)
    if want is not None and want != _torch_dtype(manifest["dtype"]):
        raise BackendError(f"{where}: the export is {manifest['dtype']}, but dtype "
                           f"{str(want).removeprefix('torch.')} was asked for")
    if quant_sim is not None and "quant_sim" in manifest and bool(manifest["quant_sim"]) != bool(quant_sim):
        raise BackendError(f"{where}: the export has quant_sim={manifest['quant_sim']}, but quant_sim={quant_sim} "
                           "was asked for")


__all__ = ["BACKENDS", "Backend", "BackendError", "ONNXRUNTIME", "OnnxRuntimeBackend", "TORCH", "TorchBackend",
           "default_providers", "is_export_dir", "load_backend", "manifest_config", "manifest_layout",
           "read_manifest"]
