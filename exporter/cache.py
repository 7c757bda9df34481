"""The decoding cache: only what the hybrid design needs, nothing that grows like T.

Per layer: a ring of the last `window` KV vectors with their absolute positions, the compressed
entries (one per m tokens, grown on demand), for CSA the indexer keys (one per 4 tokens), and the
fp32 compressor tail state holding the projections of the unfinished block (CSA also the previous
block, whose first halves the next entry pools). Memory is window + T/4 (CSA) or window + T/128
(HCA) entries per layer, plus constant-size state.

The same description (`layout`) tells every backend what to allocate; it is written into export
manifests later.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import CSA, WINDOW, ModelConfig


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
            cap = max(n_entries, buf.shape[1] + buf.shape[1] // 4, 16)
            grown = buf.new_zeros(buf.shape[0], cap, buf.shape[2])
            grown[:, : buf.shape[1]] = buf
            setattr(self, name, grown)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"window_kv": self.window_kv, "window_pos": self.window_pos}
        for name in ("entries", "index_keys"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        for name in ("compressor", "index_compressor"):
            state = getattr(self, name)
            if state is not None:
                out[f"{name}.kv"], out[f"{name}.score"] = state.kv, state.score
        return out


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
        out = cls.__new__(cls)
        out.config, out.pos = first.config, torch.cat([c.pos for c in caches])
        out.layers = []
        for per_seq in zip(*(c.layers for c in caches)):
            n = max((l.entries.shape[1] for l in per_seq if l.entries is not None), default=0)
            for l in per_seq:
                l.reserve(n)  # equal entry capacity, so the buffers stack

            def stack(name: str) -> torch.Tensor | None:
                parts = [getattr(l, name) for l in per_seq]
                return None if parts[0] is None else torch.cat([p[:, :n] for p in parts])

            out.layers.append(LayerCache(
                ratio=per_seq[0].ratio,
                window_kv=torch.cat([l.window_kv for l in per_seq]),
                window_pos=torch.cat([l.window_pos for l in per_seq]),
                entries=stack("entries"), index_keys=stack("index_keys"),
                compressor=_cat_state([l.compressor for l in per_seq]),
                index_compressor=_cat_state([l.index_compressor for l in per_seq])))
        return out

    @property
    def batch(self) -> int:
        return self.pos.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors().values())

    def nbytes_by_part(self) -> dict[str, int]:
        parts: dict[str, int] = {}
        for layer in self.layers:
            for name, t in layer.tensors().items():
                key = name.split(".")[0]
                parts[key] = parts.get(key, 0) + t.numel() * t.element_size()
        return parts


def _cat_state(states: list[CompressorState | None]) -> CompressorState | None:
    if states[0] is None:
        return None
    return CompressorState(torch.cat([s.kv for s in states]), torch.cat([s.score for s in states]))
