"""Corpus -> tokens -> memory-mapped shards + manifest, and the reader the trainer streams them with.

    sources.py    documents from .txt/.jsonl/.parquet files, folders, globs, hf: datasets, pydoc topics
    tokenizer.py  SmolLM2's tokenizer (file, folder, hub, GGUF) or a byte-level BPE trained on the corpus
    pack.py       tokens into fixed-size shards + manifest; resume, verify
    workers.py    the tokenizer processes pack.py fans documents out to
    slices.py     the input cut into N contiguous slices at document boundaries, one per task
    distributed.py  `--tasks N`: slices tokenized by N tasks (datatrove, local or Slurm), merged into pack.py's shards
    reader.py     TokenWindows: shuffled (x, y) windows per data-parallel rank, resumable
    mixture.py    MixedWindows: several prepared directories mixed by weight, read like one
    cli.py        `smolds prep`
"""

from data_prep.errors import DataError
from data_prep.pack import prepare, prepare_default, verify
from data_prep.tokenizer import load_tokenizer

__all__ = ["DataError", "MixedWindows", "TokenWindows", "load_tokenizer", "prepare", "prepare_default",
           "prepare_distributed", "verify"]


def __getattr__(name: str):
    # TokenWindows needs torch (seconds to import). Prep's worker processes import this package too,
    # so the reader is loaded only when asked for.
    if name == "TokenWindows":
        from data_prep.reader import TokenWindows

        return TokenWindows
    if name == "MixedWindows":
        from data_prep.mixture import MixedWindows

        return MixedWindows
    if name == "prepare_distributed":  # imports datatrove
        from data_prep.distributed import prepare_distributed

        return prepare_distributed
    raise AttributeError(f"module 'data_prep' has no attribute {name!r}")
