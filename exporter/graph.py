"""The reference model as the one exportable graph, a *step*, with flat tensor I/O.

It wraps the SAME Transformer forward (no second implementation); the cache travels as the flat
tensor list described by `cache_layout`, so ONNX Runtime, TensorRT and torch share one cache
description. The I/O names and dims are the export contract's (exporter/contract.py):

    input_ids [batch, seq], logits_index [n_logits], cache.* ->
        logits [batch, n_logits, vocab], new_cache.* (, layer<i>.streams)

seq >= 1: one graph serves prefill chunks and decoding (a prompt of any length is fed in chunks,
so memory is bounded by the chunk). Entry buffers keep their capacity (a dynamic dim the runtime
grows before the step, exporter.contract.entries_needed); a block completed by these tokens is
written in place of an empty slot, never appended.
"""

from __future__ import annotations

import torch
from torch import nn

from . import contract
from .cache import Cache, cache_layout
from .model import Transformer


class StepGraph(nn.Module):
    def __init__(self, model: Transformer, per_layer: bool = False):
        super().__init__()
        self.model, self.per_layer = model, per_layer
        self.layout = cache_layout(model.config, model.dtype)

    def input_names(self) -> list[str]:
        return contract.step_input_names(self.layout)

    def output_names(self) -> list[str]:
        return contract.step_output_names(self.layout, self.model.config.num_layers, self.per_layer)

    def forward(self, input_ids: torch.Tensor, logits_index: torch.Tensor, *cache_tensors: torch.Tensor):
        cache = Cache.from_tensors(self.model.config, list(cache_tensors))
        streams: list[torch.Tensor] | None = [] if self.per_layer else None
        logits = self.model(input_ids, cache, layer_outputs=streams, logits_index=logits_index)
        return (logits, *cache.to_tensors(), *(streams or []))
