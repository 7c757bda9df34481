"""The TensorRT backend: an engine folder written by `hatrt build` (engines/tensorrt_build.py).

    backend = TensorRTBackend("out/tiny-flash.engine")
    logits, cache = backend.prefill(ids, chunk_size=512)    # the prefill profile, chunks <= the engine's
    logits = backend.decode(next_ids, cache)                 # the decode profile (+ a CUDA graph)

- Loading: engine.json is read and checked (the engine file's size and sha256), the plugin library
  it was built with is verified against the recorded sha256 and loaded into TensorRT's plugin
  registry *before* the engine is deserialized (its plugin layers need the creators).
- One execution context per optimization profile (decode: seq 1; prefill: seq 1..chunk), created
  with USER_MANAGED device memory: both point at one torch allocation of the largest profile's
  size, as TensorRT-LLM / TensorRT-Edge-LLM do (the contexts run one after the other on one stream).
- Buffers are torch CUDA tensors bound with `set_tensor_address`; shapes with `set_input_shape`;
  `execute_async_v3` on torch's current stream. Nothing synchronizes the host per step.
- The cache (a KVCache on the GPU, engines/cache_ops.py) ping-pongs like the ONNX Runtime backend:
  the step reads `cache.tensors` and writes `cache.spare("tensorrt")` (same shapes), then
  `cache.swap("tensorrt")`. Capacity growth (Backend.step -> cache.ensure_capacity) replaces the tensors and drops the
  scratch half, so the next step allocates a new one.
- CUDA graphs (`cuda_graphs=True`, the default): a decode step (seq 1, no per-layer outputs) is
  captured once per key = (batch, entry capacities, input cache pointers, output cache pointers)
  after one eager warm-up enqueue with exactly those shapes and addresses, then replayed. The two
  ping-pong halves give two graphs per batch size. Growing the capacity changes the key; graphs of
  a batch size with another capacity are dropped when a new one is captured. A graph is replayed
  only when the decode context's last eager shapes are the graph's (TensorRT may keep shape state
  in the context), otherwise the step runs eagerly first.
- Limits come from engine.json: a batch above --max-batch, a position at or above --max-context,
  or more logits than the profile allows are refused (BackendError naming the build option); a
  step longer than the prefill chunk is split into chunks here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from exporter import contract

from .backends import Backend, BackendError
from .cache_ops import KVCache
from .tensorrt_build import (DECODE, ENGINE_FILE, ENGINE_MANIFEST, LAYER_SUFFIX, PREFILL, Profile, TensorRTError,
                             engine_profiles, import_tensorrt, load_plugin_library, read_engine_manifest,
                             verify_plugin_library)

if TYPE_CHECKING:
    import tensorrt as trt

TENSORRT = "tensorrt"
MAX_GRAPHS = 32  # captured decode graphs kept at most (two per batch size and capacity)


def _trt_to_torch() -> dict[Any, torch.dtype]:
    import tensorrt as trt

    table: dict[Any, torch.dtype] = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                                     trt.DataType.INT32: torch.int32, trt.DataType.INT8: torch.int8,
                                     trt.DataType.BOOL: torch.bool}
    for name, dt in (("BF16", torch.bfloat16), ("INT64", torch.int64), ("UINT8", torch.uint8),
                     ("FP8", torch.float8_e4m3fn)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = dt
    return table


class _Context:
    """One execution context (one profile) and what the backend remembers about it."""

    def __init__(self, profile: Profile, context: "trt.IExecutionContext"):
        self.profile = profile
        self.context = context
        self.shapes: tuple | None = None  # the input shapes of its last eager enqueue

    def limit(self, dim: str) -> int:
        return self.profile.dims[dim][2] if dim in self.profile.dims else 0


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, shapes: tuple):
        self.graph = graph
        self.shapes = shapes


class TensorRTBackend(Backend):
    """An engine folder (hatrt build) under TensorRT; see the module docstring."""

    name = TENSORRT

    def __init__(self, engine_dir: str | os.PathLike, *, plugins: str | os.PathLike | None = None,
                 cuda_graphs: bool = True, device: str | torch.device | None = None, verify: str = "fast",
                 verbose: bool = False):
        self.engine_dir = Path(engine_dir)
        # refusals that need neither TensorRT nor a GPU come first: the folder, its manifest, the
        # engine file's hash, the plugin library's hash
        self.manifest = read_engine_manifest(self.engine_dir, verify=verify)
        where = self.engine_dir / ENGINE_MANIFEST
        try:
            self.config = contract.manifest_config(self.manifest, where)
            self.layout = contract.manifest_layout(self.manifest)
            contract.check_layout(self.config, self.layout, self.manifest["dtype"], where)
        except contract.ExportError as e:
            raise TensorRTError(str(e)) from None
        self.plugin_library = verify_plugin_library(self.manifest, self.engine_dir, plugins)
        self.profiles = engine_profiles(self.manifest)
        self.limits = dict(self.manifest["limits"])
        self.per_layer = any(io["name"].endswith(LAYER_SUFFIX) for io in self.manifest["outputs"])
        self.cuda_graphs = bool(cuda_graphs)
        import_tensorrt()
        if not torch.cuda.is_available():
            raise TensorRTError("no CUDA GPU is visible (torch.cuda.is_available() is False): the tensorrt backend "
                                "runs on the GPU the engine was built for")
        dev = torch.device(device) if device is not None else torch.device("cuda")
        if dev.type != "cuda":
            raise TensorRTError(f"device {dev}: the tensorrt backend runs on a CUDA device")
        self.device = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
        self._load(verbose)

    # -- loading ------------------------------------------------------------------------------
    def _load(self, verbose: bool) -> None:
        import tensorrt as trt

        built = self.manifest["tensorrt"].get("version")
        if built and built != trt.__version__:
            raise TensorRTError(f"{self.engine_dir / ENGINE_MANIFEST}: the engine was built with TensorRT {built}, "
                                f"this is TensorRT {trt.__version__}: engines are not portable across versions; "
                                "rebuild it")
        cc = list(torch.cuda.get_device_capability(self.device))
        want = self.manifest.get("gpu", {}).get("compute_capability")
        if want and list(want) != cc:
            raise TensorRTError(f"{self.engine_dir / ENGINE_MANIFEST}: the engine was built for compute capability "
                                f"{want[0]}.{want[1]} ({self.manifest['gpu'].get('name')}), this GPU is "
                                f"{cc[0]}.{cc[1]} ({torch.cuda.get_device_name(self.device)}); rebuild it here")
        load_plugin_library(self.plugin_library)  # before deserializing: the plugin layers need the creators
        torch.cuda.set_device(self.device)
        self._logger = trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        path = self.engine_dir / str(self.manifest["engine"].get("file", ENGINE_FILE))
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise TensorRTError(f"{path}: TensorRT cannot deserialize the engine (see the TensorRT log above)")
        self.engine: trt.ICudaEngine = engine
        if engine.num_optimization_profiles != len(self.profiles):
            raise TensorRTError(f"{path}: {engine.num_optimization_profiles} optimization profiles, "
                                f"{self.engine_dir / ENGINE_MANIFEST} lists {len(self.profiles)}")
        self._check_io()
        stream = torch.cuda.current_stream(self.device)
        size = max(engine.get_device_memory_size_for_profile_v2(p.index) for p in self.profiles)
        # one block for every context: they run one at a time on one stream (TensorRT-LLM's layout)
        self._workspace = torch.empty(max(int(size), 1), dtype=torch.uint8, device=self.device)
        self._contexts: dict[str, _Context] = {}
        for p in self.profiles:
            ctx = self._new_context()
            if ctx is None:
                raise TensorRTError(f"{path}: TensorRT could not create an execution context for profile {p.name}")
            ctx.set_device_memory(self._workspace.data_ptr(), self._workspace.numel())
            if not ctx.set_optimization_profile_async(p.index, stream.cuda_stream):
                raise TensorRTError(f"{path}: cannot select optimization profile {p.index} ({p.name})")
            self._contexts[p.name] = _Context(p, ctx)
        stream.synchronize()
        self._max_seq = max(c.limit(contract.SEQ) for c in self._contexts.values())
        self._graphs: dict[tuple, _Graph] = {}
        self._static: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._graphs_failed = False

    def _new_context(self) -> "trt.IExecutionContext":
        """A context without its own device memory (USER_MANAGED: set_device_memory follows)."""
        import tensorrt as trt

        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        if hasattr(self.engine, "create_runtime_config"):  # TensorRT >= 10.11: IRuntimeConfig
            config = self.engine.create_runtime_config()
            config.set_execution_context_allocation_strategy(strategy)
            return self.engine.create_execution_context(config)
        return self.engine.create_execution_context(strategy)

    def _check_io(self) -> None:
        """The engine's I/O must be the manifest's: names, and dtypes the torch buffers will have."""
        import tensorrt as trt

        table = _trt_to_torch()
        engine = self.engine
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        expected = {io["name"]: io["dtype"] for io in list(self.manifest["inputs"]) + list(self.manifest["outputs"])}
        missing = sorted(set(expected) - names)
        if missing:
            raise TensorRTError(f"{self.engine_dir / ENGINE_FILE}: the engine has no tensors {contract.short(missing)} "
                                "named in engine.json")
        extra = sorted(n for n in names - set(expected) if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        if extra:
            raise TensorRTError(f"{self.engine_dir / ENGINE_FILE}: engine inputs {contract.short(extra)} are not in "
                                "engine.json")
        self._dtypes: dict[str, torch.dtype] = {}
        for name, want in expected.items():
            got = table.get(engine.get_tensor_dtype(name))
            if got != contract.TORCH_DTYPES[want] and not (name == contract.LOGITS and got is not None):
                raise TensorRTError(f"{self.engine_dir / ENGINE_FILE}: tensor {name!r} is {got} in the engine, "
                                    f"{want} in engine.json")
            self._dtypes[name] = got if got is not None else contract.TORCH_DTYPES[want]
        self._outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._layer_names = sorted((n for n in self._outputs if n.endswith(LAYER_SUFFIX)),
                                   key=lambda n: int(n.removeprefix("layer").removesuffix(LAYER_SUFFIX)))
        self._cache_in = contract.cache_input_names(self.layout)
        self._cache_out = contract.cache_output_names(self.layout)

    # -- the Backend interface --------------------------------------------------------------------
    def new_cache(self, batch: int = 1) -> KVCache:
        self._check_batch(batch)
        return super().new_cache(batch)

    def prefill(self, input_ids, cache=None, *, chunk_size=None, all_logits=False, progress=None):
        """Backend.prefill with chunks of at most the engine's prefill chunk (its profile's max seq)."""
        chunk = self._max_seq if chunk_size is None else chunk_size
        if chunk >= 1:
            chunk = min(int(chunk), self._max_seq)
        return super().prefill(input_ids, cache, chunk_size=chunk, all_logits=all_logits, progress=progress)

    def step(self, input_ids: torch.Tensor, cache: KVCache, logits_index: torch.Tensor | Sequence[int] | None = None,
             layer_outputs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Backend.step; a step longer than the engine's prefill chunk runs as several chunks."""
        if input_ids.dim() != 2 or input_ids.shape[1] <= self._max_seq:
            return super().step(input_ids, cache, logits_index, layer_outputs)
        s = int(input_ids.shape[1])
        idx = [s - 1] if logits_index is None else [int(i) for i in torch.as_tensor(logits_index).reshape(-1)]
        if not idx or min(idx) < 0 or max(idx) >= s:
            raise BackendError(f"logits_index must be a non-empty list of positions in [0, {s})")
        rows: list[torch.Tensor | None] = [None] * len(idx)
        layers: list[list[torch.Tensor]] = []
        for start in range(0, s, self._max_seq):
            piece = input_ids[:, start:start + self._max_seq]
            n = int(piece.shape[1])
            picked = [(k, i - start) for k, i in enumerate(idx) if start <= i < start + n]
            local = [j for _, j in picked] or [n - 1]
            part_layers: list[torch.Tensor] | None = [] if layer_outputs is not None else None
            logits = super().step(piece, cache, local, part_layers)
            for row, (k, _) in enumerate(picked):
                rows[k] = logits[:, row]
            if part_layers is not None:
                layers.append(part_layers)
        if layer_outputs is not None and layers:
            layer_outputs.extend(torch.cat([p[i] for p in layers], 1) for i in range(len(layers[0])))
        return torch.stack([r for r in rows if r is not None], 1)

    def _check_batch(self, batch: int) -> None:
        limit = int(self.limits.get("max_batch", 0))
        if batch > limit:
            raise BackendError(f"batch {batch} exceeds the engine's max batch {limit} "
                               f"({self.engine_dir}: rebuild with hatrt build --max-batch {batch})")

    def _check_step(self, ctx: _Context, b: int, s: int, n_logits: int, cache: KVCache) -> None:
        self._check_batch(b)
        if s > ctx.limit(contract.SEQ):
            raise BackendError(f"a step of {s} tokens exceeds the {ctx.profile.name} profile's "
                               f"{ctx.limit(contract.SEQ)}")
        if n_logits > ctx.limit(contract.N_LOGITS):
            raise BackendError(f"{n_logits} logits per step exceed the {ctx.profile.name} profile's "
                               f"{ctx.limit(contract.N_LOGITS)} (rebuild with a larger --prefill-chunk)")
        max_context = int(self.limits.get("max_context", 0))
        last = int(cache.positions.max()) + s - 1
        if last >= max_context:
            raise BackendError(f"position {last} is beyond the engine's max context {max_context} "
                               f"({self.engine_dir}: rebuild with hatrt build --max-context {last + 1} or more)")
        for dim, have in cache.capacities().items():
            if have > ctx.limit(dim):
                raise BackendError(f"cache capacity {have} for {dim} exceeds the engine's {ctx.limit(dim)} "
                                   f"(rebuild with a larger --max-context)")
        if cache.device != self.device:
            raise BackendError(f"the cache is on {cache.device}, the engine on {self.device}: make it with "
                               "backend.new_cache or KVCache.to(device)")

    def _run_step(self, input_ids, logits_index, cache, layer_outputs):
        b, s = int(input_ids.shape[0]), int(input_ids.shape[1])
        n = int(logits_index.numel())
        ctx = self._contexts[DECODE] if s == 1 and DECODE in self._contexts else self._contexts[PREFILL] \
            if PREFILL in self._contexts else self._contexts[DECODE]
        self._check_step(ctx, b, s, n, cache)
        spare = cache.spare(TENSORRT)  # the ping-pong half the outputs are bound to
        stream = torch.cuda.current_stream(self.device)
        graph_ok = (self.cuda_graphs and not self._graphs_failed and ctx.profile.name == DECODE and s == 1
                    and not self._layer_names)
        if graph_ok:
            logits = self._decode_graph(ctx, input_ids, cache, spare, stream)
        else:
            ids = input_ids.to(self.device, self._dtypes[contract.INPUT_IDS], non_blocking=True).contiguous()
            idx = logits_index.to(self.device, self._dtypes[contract.LOGITS_INDEX], non_blocking=True).contiguous()
            logits = torch.empty(b, n, self.config.vocab_size, dtype=self._dtypes[contract.LOGITS], device=self.device)
            layers = [torch.empty(b, s, self.config.hc_mult, self.config.hidden_size, dtype=self._dtypes[name],
                                  device=self.device) for name in self._layer_names]
            self._enqueue(ctx, ids, idx, cache.tensors, spare, logits, layers, stream)
            if layer_outputs is not None:
                layer_outputs.extend(layers)
        cache.swap(TENSORRT)
        return logits.float()

    # -- execution --------------------------------------------------------------------------------
    def _bind(self, ctx: _Context, ids: torch.Tensor, idx: torch.Tensor, inputs: Sequence[torch.Tensor],
              outputs: Sequence[torch.Tensor], logits: torch.Tensor, layers: Sequence[torch.Tensor]) -> tuple:
        c = ctx.context
        shapes = []
        for name, t in [(contract.INPUT_IDS, ids), (contract.LOGITS_INDEX, idx), *zip(self._cache_in, inputs)]:
            shape = tuple(int(d) for d in t.shape)
            if not c.set_input_shape(name, shape):
                r = ctx.profile.shapes.get(name)
                raise BackendError(f"input {name!r} of shape {list(shape)} is outside the {ctx.profile.name} profile"
                                   + (f" ({list(r.min)}..{list(r.max)})" if r is not None else ""))
            shapes.append(shape)
            self._address(c, name, t)
        for name, t in [(contract.LOGITS, logits), *zip(self._cache_out, outputs), *zip(self._layer_names, layers)]:
            self._address(c, name, t)
        return tuple(shapes)

    @staticmethod
    def _address(c: "trt.IExecutionContext", name: str, t: torch.Tensor) -> None:
        if not t.is_contiguous():
            raise BackendError(f"tensor {name!r} is not contiguous")
        if not c.set_tensor_address(name, t.data_ptr()):
            raise BackendError(f"TensorRT refused the address of {name!r} (shape {list(t.shape)}, {t.dtype})")

    def _enqueue(self, ctx: _Context, ids: torch.Tensor, idx: torch.Tensor, inputs: Sequence[torch.Tensor],
                 outputs: Sequence[torch.Tensor], logits: torch.Tensor, layers: Sequence[torch.Tensor],
                 stream: torch.cuda.Stream) -> None:
        ctx.shapes = self._bind(ctx, ids, idx, inputs, outputs, logits, layers)
        if not ctx.context.execute_async_v3(stream.cuda_stream):
            ctx.shapes = None
            raise BackendError(f"TensorRT could not enqueue the {ctx.profile.name} step (see the TensorRT log)")

    def _decode_graph(self, ctx: _Context, input_ids: torch.Tensor, cache: KVCache, spare: list[torch.Tensor],
                      stream: torch.cuda.Stream) -> torch.Tensor:
        """A decode step through a CUDA graph keyed by batch, capacities and buffer pointers."""
        b = int(input_ids.shape[0])
        static = self._static.get(b)
        if static is None:
            static = self._static[b] = (
                torch.zeros(b, 1, dtype=self._dtypes[contract.INPUT_IDS], device=self.device),
                torch.zeros(1, dtype=self._dtypes[contract.LOGITS_INDEX], device=self.device),
                torch.empty(b, 1, self.config.vocab_size, dtype=self._dtypes[contract.LOGITS], device=self.device))
        ids, idx, logits = static
        ids.copy_(input_ids, non_blocking=True)
        caps = tuple(sorted(cache.capacities().items()))
        key = (b, caps, tuple(t.data_ptr() for t in cache.tensors), tuple(t.data_ptr() for t in spare))
        entry = self._graphs.get(key)
        if entry is not None and ctx.shapes == entry.shapes:
            entry.graph.replay()
            return logits.clone()
        # warm-up: the eager enqueue computes this step (and leaves the context in these shapes) ...
        self._enqueue(ctx, ids, idx, cache.tensors, spare, logits, [], stream)
        if entry is None:  # ... then capture the same enqueue for the next steps with this key
            out = logits.clone()
            self._capture(ctx, key, stream)
            return out
        return logits.clone()

    def _capture(self, ctx: _Context, key: tuple, stream: torch.cuda.Stream) -> None:
        for old in [k for k in self._graphs if k[0] == key[0] and k[1] != key[1]]:
            del self._graphs[old]  # another capacity of this batch size: those buffers are gone
        while len(self._graphs) >= MAX_GRAPHS:
            del self._graphs[next(iter(self._graphs))]
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):  # captures on a side stream, ordered after `stream` by a device sync
                if not ctx.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
                    raise RuntimeError("execute_async_v3 returned False during capture")
        except RuntimeError as e:
            self._graphs_failed = True  # decode stays eager; the step's result came from the warm-up
            import warnings

            warnings.warn(f"tensorrt backend: CUDA graph capture failed ({e}); decoding without graphs", stacklevel=3)
            return
        assert ctx.shapes is not None
        self._graphs[key] = _Graph(graph, ctx.shapes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.engine_dir)!r})"


def load_tensorrt_backend(source: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
                          quant_sim: bool | None = None, plugins: str | os.PathLike | None = None,
                          cuda_graphs: bool = True) -> TensorRTBackend:
    """`load_backend(source, "tensorrt")`: source must be an engine folder; dtype / quant_sim, when
    given, must agree with the export the engine was built from."""
    path = Path(source)
    if not (path / ENGINE_MANIFEST).is_file():
        if (path / contract.MANIFEST).is_file():
            raise BackendError(f"{path}: an export directory; the tensorrt backend runs an engine folder: build one "
                               f"with hatrt build {path} -o ENGINE_DIR")
        raise BackendError(f"{path}: no {ENGINE_MANIFEST}; the tensorrt backend runs an engine folder written by "
                           "hatrt build")
    backend = TensorRTBackend(path, plugins=plugins, cuda_graphs=cuda_graphs)
    want = dtype if dtype is None or isinstance(dtype, torch.dtype) else contract.TORCH_DTYPES.get(str(dtype))
    if want is not None and want != contract.TORCH_DTYPES[backend.manifest["dtype"]]:
        raise BackendError(f"{path}: the engine runs {backend.manifest['dtype']}, but dtype {dtype} was asked for")
    if quant_sim is not None and bool(backend.manifest.get("quant_sim", False)) != bool(quant_sim):
        raise BackendError(f"{path}: the engine was built from an export with quant_sim="
                           f"{backend.manifest.get('quant_sim')}, but quant_sim={quant_sim} was asked for")
    return backend


__all__ = ["MAX_GRAPHS", "TENSORRT", "TensorRTBackend", "load_tensorrt_backend"]
