"""The decoding cache: only what the hybrid design needs, nothing that grows like T.

Per layer: a ring of the last `window` KV vectors with their absolute positions, the compressed
entries (one per m tokens, grown on demand), for CSA the indexer keys (one per 4 tokens), and the
fp32 compressor tail state holding the projections of the unfinished block (CSA also the previous
block, whose first halves the next entry pools). Memory is window + T/4 (CSA) or window + T/128
(HCA) entries per layer, plus constant-size state.

The same description (`cache_layout`) tells every backend what to allocate and is written into
every export's manifest (exporter/contract.py); engines/cache_ops.py operates on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import CSA, WINDOW, ModelConfig


@dataclass(frozen=True)
class TensorSpec:
    """One cache tensor as every backend sees it. dims: ints, or names of dynamic dims."""

    name: str
    dims: tuple[int | str, ...]
    dtype: str  # "float32" | "float16" | "bfloat16" | "int64"

    def to_dict(self) -> dict:
        return {"name": self.name, "dims": list(self.dims), "dtype": self.dtype}


# Dynamic dims: the batch, and the entry capacity of CSA / HCA layers (>= complete blocks so far).
BATCH, CSA_ENTRIES, HCA_ENTRIES = "batch", "csa_entries", "hca_entries"
MIN_CAPACITY = 16


def grown_capacity(current: int, needed: int, minimum: int = MIN_CAPACITY) -> int:
    """Amortized growth of an entry buffer: at least `needed`, at least +25% (rounded up), at least
    `minimum`, so a long generation reallocates O(log T) times. The one growth rule of hatrt."""
    return max(needed, current + (current + 3) // 4, minimum)


def cache_layout(config: ModelConfig, dtype: torch.dtype = torch.float32) -> list[TensorSpec]:
    """The cache as a flat, ordered list of tensors: the one description every backend uses.

    Per layer i: window ring (kv, absolute positions); for compressed layers the entries and the
    fp32 compressor tail state (kv, score); for CSA also the indexer keys and their compressor
    state. Last: `pos`, each sequence's next position.
    """
    kv = str(dtype).removeprefix("torch.")
    d, w = config.head_dim, config.window
    specs = []
    for i, ratio in enumerate(config.compress_ratios):
        p = f"layer{i}."
        specs += [TensorSpec(p + "window_kv", (BATCH, w, d), kv), TensorSpec(p + "window_pos", (BATCH, w), "int64")]
        if ratio == WINDOW:
            continue
        cap = CSA_ENTRIES if ratio == CSA else HCA_ENTRIES
        c = 2 if ratio == CSA else 1
        specs += [TensorSpec(p + "entries", (BATCH, cap, d), kv),
                  TensorSpec(p + "compressor.kv", (BATCH, c * ratio, c * d), "float32"),
                  TensorSpec(p + "compressor.score", (BATCH, c * ratio, c * d), "float32")]
        if ratio == CSA:
            di = config.index_head_dim
            specs += [TensorSpec(p + "index_keys", (BATCH, cap, di), kv),
                      TensorSpec(p + "index_compressor.kv", (BATCH, 2 * ratio, 2 * di), "float32"),
                      TensorSpec(p + "index_compressor.score", (BATCH, 2 * ratio, 2 * di), "float32")]
    specs.append(TensorSpec("pos", (BATCH,), "int64"))
    return specs


def merge_flat(caches: list[list[torch.Tensor]], layout: list[TensorSpec]) -> list[torch.Tensor]:
    """Concatenate flat caches along the batch; named dynamic dims (entry capacities) are
    zero-padded to the largest. The one merge every backend uses (engines/cache_ops.py too)."""
    out = []
    for i, spec in enumerate(layout):
        parts = [c[i] for c in caches]
        for axis, dim in enumerate(spec.dims):
            if isinstance(dim, str) and dim != BATCH:
                size = max(p.shape[axis] for p in parts)
                parts = [p if p.shape[axis] == size else
                         torch.cat([p, p.new_zeros(*p.shape[:axis], size - p.shape[axis], *p.shape[axis + 1:])], axis)
                         for p in parts]
        out.append(torch.cat(parts, spec.dims.index(BATCH)))
    return out


@dataclass
class CompressorState:
    """fp32 projections of the tokens of the unfinished block, `score` with `ape` already added.

    Slot t % m holds token t (CSA: slot m + t % m; slots 0..m-1 hold the previous block).
    Empty slots have score -inf, so a CSA entry 0 pools nothing from a "previous block".
    """

    kv: torch.Tensor  # [B, slots, width]
    score: torch.Tensor  # [B, slots, width]

    @classmethod
    def empty(cls, batch: int, slots: int, width: int, device) -> "CompressorState":
        return cls(torch.zeros(batch, slots, width, device=device),
                   torch.full((batch, slots, width), float("-inf"), device=device))


@dataclass
class LayerCache:
    ratio: int
    window_kv: torch.Tensor  # [B, window, D] ring; token t lives in slot t % window
    window_pos: torch.Tensor  # [B, window] int64 absolute position, -1 = empty
    entries: torch.Tensor | None = None  # [B, capacity, D]; entry i covers tokens m*i .. m*i+m-1
    compressor: CompressorState | None = None
    index_keys: torch.Tensor | None = None  # [B, capacity, Di] (CSA)
    index_compressor: CompressorState | None = None

    def reserve(self, n_entries: int) -> None:
        """Grow the entry buffers to hold n_entries (amortized: +25% at a time)."""
        for name in ("entries", "index_keys"):
            buf = getattr(self, name)
            if buf is None or buf.shape[1] >= n_entries:
                continue
            cap = grown_capacity(buf.shape[1], n_entries)
            grown = buf.new_zeros(buf.shape[0], cap, buf.shape[2])
            grown[:, : buf.shape[1]] = buf
            setattr(self, name, grown)


class Cache:
    """Decoding state of a batch: per-layer caches and each sequence's next position."""

    def __init__(self, config: ModelConfig, batch: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.config = config
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.layers: list[LayerCache] = []
        d, w = config.head_dim, config.window
        for ratio in config.compress_ratios:
            layer = LayerCache(ratio=ratio, window_kv=torch.zeros(batch, w, d, dtype=dtype, device=device),
                               window_pos=torch.full((batch, w), -1, dtype=torch.long, device=device))
            if ratio != WINDOW:
                overlap = 2 if ratio == CSA else 1
                layer.entries = torch.zeros(batch, 0, d, dtype=dtype, device=device)
                layer.compressor = CompressorState.empty(batch, overlap * ratio, overlap * d, device)
            if ratio == CSA:
                di = config.index_head_dim
                layer.index_keys = torch.zeros(batch, 0, di, dtype=dtype, device=device)
                layer.index_compressor = CompressorState.empty(batch, 2 * ratio, 2 * di, device)
            self.layers.append(layer)

    @classmethod
    def merge(cls, caches: list["Cache"]) -> "Cache":
        """Stack per-sequence caches (e.g. prompts of different lengths prefilled one at a time)
        into one batch; decoding then advances every sequence from its own position."""
        if not caches:
            raise ValueError("Cache.merge needs at least one cache")
        first = caches[0]
        if any(c.config != first.config for c in caches):
            raise ValueError("Cache.merge: caches come from different model configs")
        layout = cache_layout(first.config, first.layers[0].window_kv.dtype)
        return cls.from_tensors(first.config, merge_flat([c.to_tensors() for c in caches], layout))

    def to_tensors(self) -> list[torch.Tensor]:
        """The cache in `cache_layout` order."""
        out = []
        for layer in self.layers:
            out += [layer.window_kv, layer.window_pos]
            if layer.ratio != WINDOW:
                out += [layer.entries, layer.compressor.kv, layer.compressor.score]
            if layer.ratio == CSA:
                out += [layer.index_keys, layer.index_compressor.kv, layer.index_compressor.score]
        return out + [self.pos]

    @classmethod
    def from_tensors(cls, config: ModelConfig, tensors: list[torch.Tensor]) -> "Cache":
        """Inverse of to_tensors (no copies)."""
        it = iter(tensors)
        out = cls.__new__(cls)
        out.config, out.layers = config, []
        for ratio in config.compress_ratios:
            layer = LayerCache(ratio=ratio, window_kv=next(it), window_pos=next(it))
            if ratio != WINDOW:
                layer.entries, layer.compressor = next(it), CompressorState(next(it), next(it))
            if ratio == CSA:
                layer.index_keys, layer.index_compressor = next(it), CompressorState(next(it), next(it))
            out.layers.append(layer)
        out.pos = next(it)
        if next(it, None) is not None:
            raise ValueError("Cache.from_tensors: more tensors than the layout has")
        return out

    @property
    def batch(self) -> int:
        return self.pos.shape[0]

    def _layer_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(layout name, tensor) of every per-layer cache tensor (`pos` excluded)."""
        layout = cache_layout(self.config, self.layers[0].window_kv.dtype)
        return [(spec.name, t) for spec, t in zip(layout, self.to_tensors()) if spec.name != "pos"]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self._layer_tensors())

    def nbytes_by_part(self) -> dict[str, int]:
        """Bytes per kind of tensor over all layers: window_kv, entries, compressor, ..."""
        parts: dict[str, int] = {}
        for name, t in self._layer_tensors():
            key = name.split(".")[1]  # "layer2.compressor.kv" -> "compressor"
            parts[key] = parts.get(key, 0) + t.numel() * t.element_size()
        return parts
