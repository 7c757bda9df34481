"""hatrt exporter: configuration, the PyTorch reference model, checkpoint loading, ONNX export.

    from exporter import load_model
    model = load_model("tiny-flash")            # a preset (random weights) or a checkpoint dir
    logits = model(input_ids)                   # full prefill
    cache = model.new_cache(batch=1)            # or continue from an explicit cache
    logits = model(input_ids[:, :100], cache)   # chunked prefill ...
    logits = model(next_token, cache)           # ... and decoding, token by token
"""

from .cache import Cache
from .checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from .config import ConfigError, ModelConfig, Yarn
from .model import Transformer
from .presets import PRESETS, preset

__all__ = ["Cache", "CheckpointError", "ConfigError", "ModelConfig", "PRESETS", "Transformer", "Yarn",
           "load_checkpoint", "load_model", "preset", "save_checkpoint"]
