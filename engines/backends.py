"""Runtimes behind one interface: the only way hatrt runs a model.

A `Backend` runs the step graph of the export contract (exporter/contract.py) on a `KVCache`
(engines/cache_ops.py) that it keeps in its native form and updates in place:

    cache = backend.new_cache(batch)
    logits = backend.step(input_ids [B, S], cache)            # -> [B, 1, V] float32, last position
    logits = backend.step(ids, cache, logits_index=idx)       # -> [B, len(idx), V]
    logits, cache = backend.prefill(ids [B, S], chunk_size=256)  # a prompt of any length, in chunks
    logits = backend.decode(ids [B, 1], cache)

`step` grows the entry capacities it needs (amortized) before it runs; everything else (chunking,
decoding, batching, the generate loop, `hatrt check`) is written once on top of it.

- `TorchBackend(model)`: the reference, exporter/graph.py's StepGraph run eagerly.
- `OnnxRuntimeBackend(export_dir)`: step.onnx under onnxruntime with IO binding: the cache tensors
  are bound in place (no copies) as inputs, the outputs go into a second set of buffers of the same
  shapes, and the two sets swap roles after each step (ping-pong). On the CUDA provider with CUDA
  tensors nothing crosses to the host but the logits.
- `TensorRTBackend(engine_dir)` (engines/tensorrt_backend.py): a `hatrt build` engine folder.
- `load_backend(source, name)`: a preset name, checkpoint directory, export or engine directory.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from exporter import contract
from exporter.cache import TensorSpec, cache_layout
from exporter.config import ConfigError, ModelConfig
from exporter.contract import ExportError

from . import cache_ops
from .cache_ops import KVCache

TORCH, ONNXRUNTIME, TENSORRT = "torch", "onnxruntime", "tensorrt"
BACKENDS = (TORCH, ONNXRUNTIME, TENSORRT)
DEFAULT_PREFILL_CHUNK = 256  # chunk x index heads x entries x 4 B of scores: 2 GB peak at 32K (docs/benchmarks.md)


class BackendError(ValueError):
    """A backend cannot be loaded or run as asked; the message names the file, key or argument."""


class Backend(abc.ABC):
    """One runtime: `config`, cache `layout`, `device`, `name`, and `step` on a KVCache."""

    name: str
    config: ModelConfig
    layout: list[TensorSpec]
    device: torch.device = torch.device("cpu")

    @abc.abstractmethod
    def _run_step(self, input_ids: torch.Tensor, logits_index: torch.Tensor, cache: KVCache,
                  layer_outputs: list[torch.Tensor] | None) -> torch.Tensor:
        """Run the step graph; update `cache.tensors` in place; return logits [B, n, V] float32."""

    # -- the interface, shared by every backend ------------------------------------------------
    def new_cache(self, batch: int = 1) -> KVCache:
        return cache_ops.empty(self.config, self.layout, batch, self.device)

    def step(self, input_ids: torch.Tensor, cache: KVCache, logits_index: torch.Tensor | Sequence[int] | None = None,
             layer_outputs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Feed input_ids [B, S] (S >= 1) to the B sequences of `cache`, each from its own position.

        Returns logits [B, n, V] float32 at `logits_index` (positions within the S tokens; default
        the last). layer_outputs, when given, receives every layer's streams (per-layer exports)."""
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise BackendError(f"input_ids must be [batch, seq] with seq >= 1, got shape {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        if b < 1:
            raise BackendError("input_ids has an empty batch")
        if b != cache.batch:
            raise BackendError(f"input_ids has batch {b}, the cache holds {cache.batch} sequences")
        last = int(cache.positions.max()) + s - 1
        if last >= self.config.max_position_embeddings:
            raise BackendError(f"position {last} exceeds max_position_embeddings={self.config.max_position_embeddings}")
        if logits_index is None:
            logits_index = torch.tensor([s - 1], dtype=torch.long)
        else:
            logits_index = torch.as_tensor(logits_index, dtype=torch.long).reshape(-1)
            if logits_index.numel() == 0 or int(logits_index.min()) < 0 or int(logits_index.max()) >= s:
                raise BackendError(f"logits_index must be a non-empty list of positions in [0, {s})")
        cache.ensure_capacity(self.config, last)
        logits = self._run_step(input_ids.to(torch.long), logits_index, cache, layer_outputs)
        cache.positions += s
        return logits

    def prefill(self, input_ids: torch.Tensor, cache: KVCache | None = None, *, chunk_size: int | None = None,
                all_logits: bool = False, progress: Callable[[int, int], None] | None = None
                ) -> tuple[torch.Tensor, KVCache]:
        """Feed a prompt [B, S] (rows of equal length) in chunks of `chunk_size` tokens (default 256):
        memory is bounded by the chunk, not the prompt. Returns (logits, cache): logits at the last
        position [B, 1, V], or at every position [B, S, V] when all_logits. progress(done, total)."""
        chunk = DEFAULT_PREFILL_CHUNK if chunk_size is None else int(chunk_size)
        if chunk < 1:
            raise BackendError(f"chunk_size must be >= 1, got {chunk_size}")
        if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
            raise BackendError(f"a prompt must be input_ids [batch, seq] with batch, seq >= 1, got shape "
                               f"{tuple(input_ids.shape)}")
        if cache is None:
            cache = self.new_cache(input_ids.shape[0])
        total = input_ids.shape[1]
        outs = []
        for start in range(0, total, chunk):
            part = input_ids[:, start:start + chunk]
            n = part.shape[1]
            idx = torch.arange(n) if all_logits else None
            logits = self.step(part, cache, logits_index=idx)
            if all_logits or start + n == total:
                outs.append(logits)
            if progress is not None:
                progress(start + n, total)
        return (torch.cat(outs, 1) if all_logits else outs[-1]), cache

    def decode(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per sequence: input_ids [B, 1] -> logits [B, 1, V]."""
        return self.step(input_ids, cache)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config.name!r})"


# ============================================================================ torch
class TorchBackend(Backend):
    """The reference: exporter/graph.py's StepGraph run eagerly under no_grad."""

    name = TORCH

    def __init__(self, model):
        from exporter.graph import StepGraph

        self.model = model.eval()
        self.config = model.config
        self.layout = cache_layout(model.config, model.dtype)
        self.device = model.embed.weight.device
        self._graph = StepGraph(self.model, per_layer=True)  # layer streams: a list the model fills anyway

    @torch.no_grad()
    def _run_step(self, input_ids, logits_index, cache, layer_outputs):
        n = len(self.layout)
        out = self._graph(input_ids.to(self.device), logits_index.to(self.device), *cache.tensors)
        cache.tensors = list(out[1:1 + n])
        if layer_outputs is not None:
            layer_outputs.extend(out[1 + n:])
        return out[0].float()


# ============================================================================ ONNX Runtime
def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def read_manifest(export_dir: str | os.PathLike, verify: str = "fast") -> dict:
    """exporter.contract.read_manifest with errors as BackendError."""
    try:
        return contract.read_manifest(export_dir, verify=verify)
    except ExportError as e:
        raise BackendError(str(e)) from None


class OnnxRuntimeBackend(Backend):
    """step.onnx of an export directory under onnxruntime.InferenceSession, with IO binding.

    The manifest is checked (names, dtypes, the sha256 of every file) when the backend is made."""

    name = ONNXRUNTIME

    def __init__(self, export_dir: str | os.PathLike, providers: Sequence[str] | None = None,
                 session_options: Any = None, verify: str = "fast"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("the onnxruntime backend needs the onnxruntime package "
                               "(pip install onnxruntime, or onnxruntime-gpu for CUDA)") from None
        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir, verify=verify)
        where = self.export_dir / contract.MANIFEST
        try:
            self.config = contract.manifest_config(self.manifest, where)
            self.layout = contract.manifest_layout(self.manifest)
            contract.check_layout(self.config, self.layout, self.manifest["dtype"], where)
        except ExportError as e:
            raise BackendError(str(e)) from None
        info = self.manifest["graphs"][contract.STEP]
        self._dtypes = {io["name"]: io["dtype"] for io in info["inputs"] + info["outputs"]}
        self.per_layer = bool(self.manifest.get("per_layer", False))
        self.providers = list(providers) if providers is not None else default_providers()
        path = self.export_dir / info["file"]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=session_options, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendError(f"{path}: onnxruntime cannot load the graph: {e}") from None
        names = [i.name for i in self.session.get_inputs()]
        want = contract.step_input_names(self.layout)
        if names != want:
            raise BackendError(f"{path}: graph inputs {contract.short(names)} differ from the manifest's "
                               f"{contract.short(want)}")
        out_names = [o.name for o in self.session.get_outputs()]
        missing = [n for n in contract.step_output_names(self.layout) if n not in out_names]
        if missing:
            raise BackendError(f"{path}: graph has no outputs {contract.short(missing)} named in the manifest")
        self._layer_names = [contract.layer_output_name(i) for i in range(self.config.num_layers)
                             if contract.layer_output_name(i) in out_names]
        self._cache_in = contract.cache_input_names(self.layout)
        self._cache_out = contract.cache_output_names(self.layout)
        cuda = self.providers and self.providers[0] == "CUDAExecutionProvider" and torch.cuda.is_available()
        self.device = torch.device("cuda") if cuda else torch.device("cpu")

    def _bind(self, binding, name: str, t: torch.Tensor, output: bool = False) -> None:
        kind = "cuda" if t.is_cuda else "cpu"
        args = (name, kind, t.device.index or 0, contract.NUMPY_DTYPES[self._dtypes[name]], tuple(t.shape),
                t.data_ptr())
        binding.bind_output(*args) if output else binding.bind_input(*args)

    def _run_step(self, input_ids, logits_index, cache, layer_outputs):
        dev = cache.device
        b = input_ids.shape[0]
        ids = input_ids.to(dev).contiguous()
        idx = logits_index.to(dev).contiguous()
        spare = cache.spare(ONNXRUNTIME)  # the ping-pong half the outputs are bound to
        logits = torch.empty(b, idx.numel(), self.config.vocab_size, dtype=torch.float32, device=dev)
        binding = self.session.io_binding()
        self._bind(binding, contract.INPUT_IDS, ids)
        self._bind(binding, contract.LOGITS_INDEX, idx)
        for name, t in zip(self._cache_in, cache.tensors):
            self._bind(binding, name, t)
        self._bind(binding, contract.LOGITS, logits, output=True)
        for name, t in zip(self._cache_out, spare):
            self._bind(binding, name, t, output=True)
        wanted_layers = self._layer_names if layer_outputs is not None else []
        for name in wanted_layers:
            binding.bind_output(name, "cuda" if dev.type == "cuda" else "cpu")
        if dev.type == "cuda":
            binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        if wanted_layers:
            values = binding.get_outputs()[1 + len(self._cache_out):]
            layer_outputs.extend(torch.from_numpy(v.numpy()) for v in values)
        cache.swap(ONNXRUNTIME)
        return logits


# ============================================================================ loading
def is_export_dir(source: str | os.PathLike) -> bool:
    path = Path(source)
    return path.is_dir() and (path / contract.MANIFEST).is_file()


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
                               f"(no {contract.MANIFEST})")
    try:
        model = load_model(source, dtype=dtype, quant_sim=quant_sim)
    except (CheckpointError, ConfigError) as e:
        raise BackendError(str(e)) from None
    if device is not None:
        if torch.device(device).type == "cuda":  # the weights go to the GPU: check that they fit there
            from exporter.checkpoint import check_memory

            try:
                check_memory(model.config, dtype, device=device)
            except CheckpointError as e:
                raise BackendError(str(e)) from None
        model = model.to(device)
    return TorchBackend(model)


def export_source(manifest: dict, where: str | os.PathLike) -> str:
    """The preset or checkpoint an export was made from (what the torch backend loads)."""
    src = manifest.get("source")
    if not isinstance(src, dict) or src.get("kind") not in ("preset", "checkpoint") or not src.get("value"):
        raise BackendError(f"{where}: an export directory holds no torch weights and the manifest names no "
                           "'source' preset or checkpoint; pass the checkpoint directory (or preset) it was "
                           "exported from instead")
    return str(src["value"])


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
    if backend == TENSORRT:  # an engine folder (hatrt build); the module imports tensorrt lazily
        from .tensorrt_backend import load_tensorrt_backend

        return load_tensorrt_backend(source, dtype=dtype, quant_sim=quant_sim)
    export_dir = is_export_dir(source)
    engine_dir = not export_dir and (Path(source) / "engine.json").is_file()
    if backend == ONNXRUNTIME:
        if not export_dir:
            path = Path(source)
            if path.is_dir():
                raise BackendError(f"{path}: no {contract.MANIFEST}: the onnxruntime backend runs an export "
                                   "directory (write one with exporter.export.export_model / hatrt export)")
            from exporter.presets import PRESETS

            kind = "a preset name, not an export directory" if str(source) in PRESETS else "no such export directory"
            raise BackendError(f"{source}: {kind}; the onnxruntime backend runs an export directory "
                               f"({contract.STEP_FILE}, {contract.MANIFEST}; write one with hatrt export)")
        ort_backend = OnnxRuntimeBackend(source, providers=providers)
        _check_agrees(ort_backend.manifest, Path(source) / contract.MANIFEST, dtype, quant_sim)
        return ort_backend

    want_dtype = _torch_dtype(dtype)
    if not export_dir and not engine_dir:
        return _load_torch(source if checkpoint is None else checkpoint, want_dtype or torch.float32,
                           bool(quant_sim), device)
    if engine_dir:  # the reference of an engine: the export it was built from
        from .tensorrt_build import engine_export_manifest, read_engine_manifest

        manifest = engine_export_manifest(read_engine_manifest(source, verify="none"))
        where = Path(source) / "engine.json"
    else:
        manifest = read_manifest(source, verify="none")
        where = Path(source) / contract.MANIFEST
    if checkpoint is None:
        checkpoint = export_source(manifest, where)
    m_dtype = _torch_dtype(manifest["dtype"])
    ref = _load_torch(checkpoint, want_dtype or m_dtype, bool(manifest.get("quant_sim", False))
                      if quant_sim is None else quant_sim, device)
    if manifest.get("quantization"):  # an FP8 export: the reference runs the same FP8 GEMMs
        from exporter import fp8

        from .quantize import QuantizeError, load_recipe

        try:
            fp8.apply_recipe(ref.model, load_recipe(source, manifest))
        except (QuantizeError, ValueError) as e:
            raise BackendError(f"{where}: {e}") from None
    return ref


def _check_agrees(manifest: dict, where: Path, dtype, quant_sim: bool | None) -> None:
    want = _torch_dtype(dtype)
    if want is not None and want != _torch_dtype(manifest["dtype"]):
        raise BackendError(f"{where}: the export is {manifest['dtype']}, but dtype "
                           f"{str(want).removeprefix('torch.')} was asked for")
    if quant_sim is not None and "quant_sim" in manifest and bool(manifest["quant_sim"]) != bool(quant_sim):
        raise BackendError(f"{where}: the export has quant_sim={manifest['quant_sim']}, but quant_sim={quant_sim} "
                           "was asked for")


__all__ = ["BACKENDS", "Backend", "BackendError", "DEFAULT_PREFILL_CHUNK", "KVCache", "ONNXRUNTIME",
           "OnnxRuntimeBackend", "TENSORRT", "TORCH", "TorchBackend", "default_providers", "export_source", "is_export_dir",
           "load_backend", "read_manifest"]
