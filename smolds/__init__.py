"""smolds: pretraining SmolLM2-sized models on the DeepSeek-V3 architecture with DeepSpeed."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["ModelConfig", "ConfigError", "Transformer", "ModelOutput", "Cache"]
__version__ = "0.1.0"

# Exported lazily (PEP 562): `import smolds` imports no torch, so `python -m smolds train` can catch
# SIGTERM/SIGUSR1 before its heavy imports (smolds/cli.py, smolds/train/preemption.py).
_EXPORTS = {"ModelConfig": "smolds.config", "ConfigError": "smolds.config", "Transformer": "smolds.model.transformer",
            "ModelOutput": "smolds.model.transformer", "Cache": "smolds.model.transformer"}

if TYPE_CHECKING:
    from smolds.config import ConfigError, ModelConfig
    from smolds.model.transformer import Cache, ModelOutput, Transformer


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
