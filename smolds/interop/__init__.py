"""Checkpoints of other stacks in and out: Hugging Face Llama/DeepseekV3 directories (`hf`) and llama.cpp GGUF
files (`gguf`). See docs/interop.md for the commands and what maps to what."""

from smolds.interop.hf import InteropError, export_hf, import_hf

__all__ = ["InteropError", "import_hf", "export_hf", "import_gguf"]


def import_gguf(path=None, dtype=None):
    """See smolds.interop.gguf.import_gguf (imported lazily: it needs the `gguf` package)."""
    import torch

    from smolds.interop.gguf import import_gguf as _import_gguf

    return _import_gguf(path, dtype or torch.float32)
