"""hatrt exporter: configuration, the PyTorch reference model, checkpoint loading, ONNX export."""

from .config import ConfigError, ModelConfig, Yarn
from .presets import PRESETS, preset

__all__ = ["ConfigError", "ModelConfig", "Yarn", "PRESETS", "preset"]
