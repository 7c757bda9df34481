"""The decoding state a backend holds (`KVCache`) and the operations on it, driven by the layout.

Every backend (torch, ONNX Runtime, TensorRT) keeps a batch's cache as a list of tensors in
`cache_layout` order (exporter/cache.py), on its own device, in the dtypes of the layout. Batching
logic lives here once: which axis is the batch, which axes are entry capacities that grow, what a
tensor must look like, all come from the `TensorSpec`s, never from tensor names or backend code.

- `empty(config, layout, batch, device)`: a fresh cache (position 0).
- `KVCache.merge(caches)`: stack per-sequence caches into one batch; entry capacities are padded
  with zeros to the largest (padding is never read: the attention ops mask entries that are not
  complete for a query's position).
- `cache.select(rows)`: keep some sequences (drop finished ones), in that order.
- `cache.ensure_capacity(config, last_pos)`: grow entry capacities, zero-filled, by
  exporter.cache.grown_capacity (at least +25%), so a long generation reallocates O(log T) times.

A cache is validated when it is made (empty, from_tensors, merge, select), not on every step; the
host keeps each row's position (`positions`), so no step reads the device to know where it is.
Backends that ping-pong write each step into `spare(owner)` and `swap(owner)` after it (ONNX
Runtime, TensorRT); the buffers live in `scratch`, which every operation that replaces the
tensors clears.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from exporter.cache import BATCH, CSA_ENTRIES, HCA_ENTRIES, MIN_CAPACITY, Cache, TensorSpec, cache_layout, grown_capacity
from exporter.config import ModelConfig
from exporter.contract import ENTRY_DIMS, POS, TORCH_DTYPES, entries_needed


class CacheError(ValueError):
    """A flat cache does not match its layout; the message names the tensor and dim."""


def torch_dtype(name: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise CacheError(f"unknown cache dtype {name!r}; expected one of {', '.join(TORCH_DTYPES)}") from None


def spec_index(layout: Sequence[TensorSpec], name: str) -> int:
    for i, spec in enumerate(layout):
        if spec.name == name:
            return i
    raise CacheError(f"the cache layout has no tensor named {name!r}")


def _batch_axis(spec: TensorSpec) -> int:
    try:
        return spec.dims.index(BATCH)
    except ValueError:
        raise CacheError(f"cache tensor {spec.name!r} has no {BATCH!r} dim: {list(spec.dims)}") from None


def validate(tensors: Sequence[torch.Tensor], layout: Sequence[TensorSpec], what: str = "cache") -> dict[str, int]:
    """Check count, rank, static dims, dtypes, one device, and that each dynamic dim has one size.

    Returns the size of every dynamic dim (batch included)."""
    if len(tensors) != len(layout):
        raise CacheError(f"{what}: {len(tensors)} tensors, the layout has {len(layout)}")
    sizes: dict[str, tuple[int, str]] = {}
    device = tensors[0].device if tensors else None
    for t, spec in zip(tensors, layout):
        if not isinstance(t, torch.Tensor):
            raise CacheError(f"{what}: {spec.name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.dim() != len(spec.dims):
            raise CacheError(f"{what}: {spec.name!r} has shape {tuple(t.shape)}, the layout says {list(spec.dims)}")
        if t.dtype != torch_dtype(spec.dtype):
            raise CacheError(f"{what}: {spec.name!r} has dtype {str(t.dtype).removeprefix('torch.')}, "
                             f"the layout says {spec.dtype}")
        if t.device != device:
            raise CacheError(f"{what}: {spec.name!r} is on {t.device}, the first tensor on {device}")
        for axis, (n, d) in enumerate(zip(t.shape, spec.dims)):
            if isinstance(d, int):
                if n != d:
                    raise CacheError(f"{what}: {spec.name!r} has shape {tuple(t.shape)}, dim {axis} must be {d}")
            elif d in sizes and sizes[d][0] != n:
                raise CacheError(f"{what}: dim {d!r} is {sizes[d][0]} in {sizes[d][1]!r} but {n} in {spec.name!r}")
            else:
                sizes.setdefault(d, (n, spec.name))
    return {d: n for d, (n, _) in sizes.items()}


class KVCache:
    """A batch's cache: `tensors` in layout order on one device, `positions` (host, int64 [batch])."""

    def __init__(self, layout: Sequence[TensorSpec], tensors: Sequence[torch.Tensor],
                 positions: np.ndarray | None = None, what: str = "cache"):
        self.layout = list(layout)
        sizes = validate(tensors, self.layout, what)
        self.tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]
        self.sizes = sizes
        if positions is None:
            positions = self.tensors[spec_index(self.layout, POS)].cpu().numpy()
        self.positions = np.array(positions, dtype=np.int64).reshape(-1)
        if len(self.positions) != sizes.get(BATCH, 0):
            raise CacheError(f"{what}: {len(self.positions)} positions for a batch of {sizes.get(BATCH)}")
        self.scratch: dict = {}

    @property
    def batch(self) -> int:
        return int(self.sizes[BATCH])

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    def capacities(self) -> dict[str, int]:
        """Entry capacity per dynamic entry dim present in the layout."""
        return {d: n for d, n in self.sizes.items() if d in ENTRY_DIMS}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def replace(self, tensors: list[torch.Tensor]) -> None:
        """New tensors of the same layout (validated), e.g. grown ones; drops backend scratch."""
        self.sizes = validate(tensors, self.layout)
        self.tensors = tensors
        self.scratch.clear()

    def spare(self, owner: str) -> list[torch.Tensor]:
        """The other half of a backend's ping-pong pair: buffers of the cache's shapes that a step
        writes the next state into (allocated once per shape, kept in `scratch[owner]`)."""
        if owner not in self.scratch:
            self.scratch[owner] = [torch.empty_like(t) for t in self.tensors]
        return self.scratch[owner]

    def swap(self, owner: str) -> None:
        """After a step wrote `spare(owner)`: it becomes the cache, the old tensors the spare half."""
        self.scratch[owner], self.tensors = self.tensors, self.scratch[owner]

    def to(self, device: torch.device | str) -> "KVCache":
        return KVCache(self.layout, [t.to(device) for t in self.tensors], self.positions)

    # -- batching ---------------------------------------------------------------------------
    @classmethod
    def merge(cls, caches: Sequence["KVCache"]) -> "KVCache":
        """Concatenate caches along the batch; entry dims are zero-padded to the largest capacity."""
        if not caches:
            raise CacheError("merge needs at least one cache")
        layout = caches[0].layout
        if any(c.layout != layout for c in caches):
            raise CacheError("merge: the caches have different layouts")
        if len(caches) == 1:
            return caches[0]
        out = []
        for i, spec in enumerate(layout):
            parts = [c.tensors[i] for c in caches]
            for axis, dim in enumerate(spec.dims):
                if dim in ENTRY_DIMS:
                    size = max(p.shape[axis] for p in parts)
                    parts = [_pad_axis(p, axis, size) for p in parts]
            out.append(torch.cat(parts, _batch_axis(spec)))
        return cls(layout, out, np.concatenate([c.positions for c in caches]))

    def select(self, rows: Sequence[int] | torch.Tensor) -> "KVCache":
        """Keep the sequences `rows` (in that order), e.g. to drop finished ones from a batch."""
        idx = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.batch):
            raise CacheError(f"select: rows {idx.tolist()} out of range for a batch of {self.batch}")
        dev_idx = idx.to(self.device)
        tensors = [t.index_select(_batch_axis(s), dev_idx) for t, s in zip(self.tensors, self.layout)]
        return KVCache(self.layout, tensors, self.positions[idx.numpy()])

    # -- capacity ---------------------------------------------------------------------------
    def ensure_capacity(self, config: ModelConfig, last_pos: int) -> bool:
        """Grow the entry dims (amortized, zero-filled) so a step whose last token sits at
        `last_pos` fits. Returns whether anything was reallocated."""
        target = {}
        for d, needed in entries_needed(config, last_pos).items():
            have = self.sizes.get(d)
            if have is not None and have < needed:
                target[d] = grown_capacity(have, needed)
        if not target:
            return False
        grown = []
        for t, spec in zip(self.tensors, self.layout):
            for axis, d in enumerate(spec.dims):
                if d in target:
                    t = _pad_axis(t, axis, target[d])
            grown.append(t)
        self.replace(grown)
        return True


def _pad_axis(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    if t.shape[axis] == size:
        return t
    if t.shape[axis] > size:
        raise CacheError(f"cannot shrink dim {axis} of a cache tensor from {t.shape[axis]} to {size}")
    shape = list(t.shape)
    shape[axis] = size - t.shape[axis]
    return torch.cat([t, t.new_zeros(shape)], axis)


def empty(config: ModelConfig, layout: Sequence[TensorSpec], batch: int = 1,
          device: torch.device | str = "cpu") -> KVCache:
    """A fresh cache (position 0, empty window, no entries). The initial values (empty window
    slots at position -1, empty compressor slots with score -inf) are the reference `Cache`'s."""
    dtype = torch_dtype(layout[0].dtype)
    if list(cache_layout(config, dtype)) != list(layout):
        raise CacheError("empty: the layout is not cache_layout(config) of this config")
    tensors = Cache(config, batch, dtype=dtype, device=device).to_tensors()
    # entry buffers start at MIN_CAPACITY, not 0: a zero-size buffer has no address to bind in place
    tensors = [_grow_entries(t, spec, MIN_CAPACITY) for t, spec in zip(tensors, layout)]
    return KVCache(layout, tensors, np.zeros(batch, np.int64))


def _grow_entries(t: torch.Tensor, spec: TensorSpec, size: int) -> torch.Tensor:
    for axis, d in enumerate(spec.dims):
        if d in ENTRY_DIMS and t.shape[axis] < size:
            t = _pad_axis(t, axis, size)
    return t


__all__ = ["CSA_ENTRIES", "CacheError", "HCA_ENTRIES", "KVCache", "POS", "empty", "spec_index", "torch_dtype",
           "validate"]
