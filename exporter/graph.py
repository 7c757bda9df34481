"""The reference model as two exportable graphs with flat tensor I/O.

Both wrap the SAME Transformer forward (no second implementation): the cache travels as the flat
tensor list described by `cache_layout`, so ONNX Runtime, TensorRT and torch share one cache
description.

- prefill: input_ids [batch, seq] -> logits [batch, seq, vocab] and the cache after the prompt
  (entry buffers sized to the complete blocks, seq // ratio).
- decode: input_ids [batch, 1] + cache -> logits [batch, 1, vocab] and the updated cache. Entry
  buffers keep their capacity (a dynamic dim the runtime grows); a block completed by this token is
  written in place of an empty slot, never appended.
Per-layer mode adds each layer's output streams as extra outputs, to find the first layer that
diverges.
"""

from __future__ import annotations

import torch
from torch import nn

from .cache import Cache, cache_layout
from .config import WINDOW
from .model import Transformer

LOGITS = "logits"
INPUT_IDS = "input_ids"


def cache_input_names(model: Transformer) -> list[str]:
    return [f"cache.{s.name}" for s in cache_layout(model.config, model.dtype)]


def cache_output_names(model: Transformer) -> list[str]:
    return [f"new_cache.{s.name}" for s in cache_layout(model.config, model.dtype)]


def layer_output_names(model: Transformer) -> list[str]:
    return [f"layer{i}.streams" for i in range(model.config.num_layers)]


class PrefillGraph(nn.Module):
    def __init__(self, model: Transformer, per_layer: bool = False):
        super().__init__()
        self.model, self.per_layer = model, per_layer

    def input_names(self) -> list[str]:
        return [INPUT_IDS]

    def output_names(self) -> list[str]:
        names = [LOGITS] + cache_output_names(self.model)
        return names + (layer_output_names(self.model) if self.per_layer else [])

    def forward(self, input_ids: torch.Tensor):
        b, s = input_ids.shape
        cache = self.model.new_cache(b)
        for layer in cache.layers:
            if layer.ratio != WINDOW:  # exactly the blocks this prompt completes
                layer.entries = layer.entries.new_zeros(b, s // layer.ratio, layer.entries.shape[2])
                if layer.index_keys is not None:
                    layer.index_keys = layer.index_keys.new_zeros(b, s // layer.ratio, layer.index_keys.shape[2])
        streams: list[torch.Tensor] | None = [] if self.per_layer else None
        logits = self.model(input_ids, cache, layer_outputs=streams)
        return (logits, *cache.to_tensors(), *(streams or []))


class DecodeGraph(nn.Module):
    def __init__(self, model: Transformer, per_layer: bool = False):
        super().__init__()
        self.model, self.per_layer = model, per_layer

    def input_names(self) -> list[str]:
        return [INPUT_IDS] + cache_input_names(self.model)

    def output_names(self) -> list[str]:
        names = [LOGITS] + cache_output_names(self.model)
        return names + (layer_output_names(self.model) if self.per_layer else [])

    def forward(self, input_ids: torch.Tensor, *cache_tensors: torch.Tensor):
        cache = Cache.from_tensors(self.model.config, list(cache_tensors))
        streams: list[torch.Tensor] | None = [] if self.per_layer else None
        logits = self.model(input_ids, cache, layer_outputs=streams)
        return (logits, *cache.to_tensors(), *(streams or []))
