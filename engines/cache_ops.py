"""Operations on a flat cache: a list of tensors in `cache_layout` order, driven by the layout.

Every backend (torch, ONNX Runtime, TensorRT) holds its decoding state as this list, so batching
logic lives here once: which axis is the batch, which axes are entry capacities that grow, what
a tensor must look like, all come from the `TensorSpec`s (exporter/cache.py), never from tensor
names or per-backend code.

- `merge(caches, layout)`: stack per-sequence caches into one batch; entry capacities are padded
  with zeros to the largest (padding is never read: the attention ops mask entries that are not
  complete for a query's position).
- `select(cache, layout, rows)`: keep some sequences (drop finished ones).
- `ensure_capacity(cache, layout, csa_needed, hca_needed)`: grow entry capacities, zero-filled,
  by at least 25% at a time, so a long generation reallocates O(log T) times.
- `entries_needed(config, max_pos)`: what a decoding step at position `max_pos` needs.
- `empty`, `validate`, `positions`, `batch_size`, `capacities`, `nbytes`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from exporter.cache import BATCH, CSA_ENTRIES, HCA_ENTRIES, Cache, TensorSpec, cache_layout, merge_flat
from exporter.config import CSA, HCA, ModelConfig

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}
POS = "pos"  # the layout entry holding each sequence's next position
ENTRY_DIMS = {CSA_ENTRIES: CSA, HCA_ENTRIES: HCA}  # dynamic entry dim -> its compression ratio
MIN_CAPACITY = 16


class CacheError(ValueError):
    """A flat cache does not match its layout; the message names the tensor and dim."""


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise CacheError(f"unknown cache dtype {name!r}; expected one of {', '.join(DTYPES)}") from None


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


def _dynamic_axes(spec: TensorSpec) -> list[tuple[int, str]]:
    """(axis, dim name) of every dynamic dim except the batch."""
    return [(i, d) for i, d in enumerate(spec.dims) if isinstance(d, str) and d != BATCH]


def validate(cache: Sequence[torch.Tensor], layout: Sequence[TensorSpec], what: str = "cache") -> dict[str, int]:
    """Check count, rank, static dims, dtypes and that each dynamic dim has one size throughout.

    Returns the size of every dynamic dim (batch included)."""
    if len(cache) != len(layout):
        raise CacheError(f"{what}: {len(cache)} tensors, the layout has {len(layout)}")
    sizes: dict[str, tuple[int, str]] = {}
    for t, spec in zip(cache, layout):
        if t.dim() != len(spec.dims):
            raise CacheError(f"{what}: {spec.name!r} has shape {tuple(t.shape)}, the layout says {list(spec.dims)}")
        if t.dtype != torch_dtype(spec.dtype):
            raise CacheError(f"{what}: {spec.name!r} has dtype {str(t.dtype).removeprefix('torch.')}, "
                             f"the layout says {spec.dtype}")
        for axis, (n, d) in enumerate(zip(t.shape, spec.dims)):
            if isinstance(d, int):
                if n != d:
                    raise CacheError(f"{what}: {spec.name!r} has shape {tuple(t.shape)}, dim {axis} must be {d}")
            elif d in sizes and sizes[d][0] != n:
                raise CacheError(f"{what}: dim {d!r} is {sizes[d][0]} in {sizes[d][1]!r} but {n} in {spec.name!r}")
            else:
                sizes.setdefault(d, (n, spec.name))
    return {d: n for d, (n, _) in sizes.items()}


def capacities(cache: Sequence[torch.Tensor], layout: Sequence[TensorSpec]) -> dict[str, int]:
    """Current size of every dynamic dim (batch, csa_entries, hca_entries) present in the layout."""
    return validate(cache, layout)


def batch_size(cache: Sequence[torch.Tensor], layout: Sequence[TensorSpec]) -> int:
    spec = layout[0]
    return cache[0].shape[_batch_axis(spec)]


def positions(cache: Sequence[torch.Tensor], layout: Sequence[TensorSpec]) -> torch.Tensor:
    """Each sequence's next position (the `pos` tensor), [batch] int64."""
    return cache[spec_index(layout, POS)]


def entries_needed(config: ModelConfig, max_pos: int) -> dict[str, int]:
    """Entry capacity a step that feeds the token at position `max_pos` needs, per dynamic dim:
    the number of complete blocks after that token, (max_pos + 1) // ratio."""
    ratios = set(config.compress_ratios)
    return {dim: (max_pos + 1) // ratio for dim, ratio in ENTRY_DIMS.items() if ratio in ratios}


def empty(config: ModelConfig, layout: Sequence[TensorSpec], batch: int = 1,
          device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """A fresh cache (position 0, empty window, no entries). The initial values (empty window
    slots at position -1, empty compressor slots with score -inf) are the reference `Cache`'s."""
    dtype = torch_dtype(layout[0].dtype)
    if list(cache_layout(config, dtype)) != list(layout):
        raise CacheError("empty: the layout is not cache_layout(config) of this config")
    return Cache(config, batch, dtype=dtype, device=device).to_tensors()


def _pad_axis(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    if t.shape[axis] == size:
        return t
    if t.shape[axis] > size:
        raise CacheError(f"cannot shrink dim {axis} of a cache tensor from {t.shape[axis]} to {size}")
    shape = list(t.shape)
    shape[axis] = size - t.shape[axis]
    return torch.cat([t, t.new_zeros(shape)], axis)


def _resize(cache: Sequence[torch.Tensor], layout: Sequence[TensorSpec], sizes: Mapping[str, int]) -> list[torch.Tensor]:
    """Zero-pad the dynamic dims named in `sizes` up to the given sizes (tensors without them are reused)."""
    out = []
    for t, spec in zip(cache, layout):
        for axis, d in _dynamic_axes(spec):
            if d in sizes:
                t = _pad_axis(t, axis, sizes[d])
        out.append(t)
    return out


def merge(caches: Sequence[Sequence[torch.Tensor]], layout: Sequence[TensorSpec]) -> list[torch.Tensor]:
    """Concatenate caches along the batch; entry dims are zero-padded to the largest capacity."""
    if not caches:
        raise CacheError("merge needs at least one cache")
    for i, c in enumerate(caches):
        validate(c, layout, what=f"merge: cache {i}")
    return list(caches[0]) if len(caches) == 1 else merge_flat([list(c) for c in caches], list(layout))


def select(cache: Sequence[torch.Tensor], layout: Sequence[TensorSpec],
           rows: Sequence[int] | torch.Tensor) -> list[torch.Tensor]:
    """Keep the sequences `rows` (in that order), e.g. to drop finished ones from a batch."""
    b = batch_size(cache, layout)
    idx = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= b):
        raise CacheError(f"select: rows {idx.tolist()} out of range for a batch of {b}")
    out = []
    for t, spec in zip(cache, layout):
        out.append(t.index_select(_batch_axis(spec), idx.to(t.device)))
    return out


def grown_capacity(current: int, needed: int, minimum: int = MIN_CAPACITY) -> int:
    """Amortized growth: at least `needed`, at least +25%, at least `minimum`."""
    return max(needed, current + (current + 3) // 4, minimum)


def ensure_capacity(cache: Sequence[torch.Tensor], layout: Sequence[TensorSpec], csa_needed: int = 0,
                    hca_needed: int = 0) -> list[torch.Tensor]:
    """Grow the CSA / HCA entry dims to hold at least `csa_needed` / `hca_needed` entries.

    Growth is amortized (+25% at least, never below 16) and zero-filled; dims that already fit
    are left alone, and tensors without grown dims are returned as they are (no copies)."""
    sizes = validate(cache, layout)
    target = {}
    for d, needed in ((CSA_ENTRIES, csa_needed), (HCA_ENTRIES, hca_needed)):
        if d in sizes and sizes[d] < needed:
            target[d] = grown_capacity(sizes[d], needed)
    return _resize(cache, layout, target) if target else list(cache)


def ensure_capacity_for(cache: Sequence[torch.Tensor], layout: Sequence[TensorSpec], config: ModelConfig,
                        max_pos: int) -> list[torch.Tensor]:
    """Grow the entry dims so a step feeding the token at position `max_pos` fits."""
    need = entries_needed(config, max_pos)
    return ensure_capacity(cache, layout, need.get(CSA_ENTRIES, 0), need.get(HCA_ENTRIES, 0))


def nbytes(cache: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in cache)


__all__ = ["CacheError", "DTYPES", "ENTRY_DIMS", "POS", "batch_size", "capacities", "empty", "ensure_capacity",
           "entries_needed", "grown_capacity", "merge", "nbytes", "positions", "select", "spec_index",
           "torch_dtype", "validate"]
