"""smolds: pretraining SmolLM2-sized models on the DeepSeek-V3 architecture with DeepSpeed."""

from smolds.config import ConfigError, ModelConfig
from smolds.model.transformer import Cache, ModelOutput, Transformer

__all__ = ["ModelConfig", "ConfigError", "Transformer", "ModelOutput", "Cache"]
__version__ = "0.1.0"
