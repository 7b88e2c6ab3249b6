"""Rank 0 fails to prepare the default corpus: every rank must raise (none may wait forever in a collective).

    torchrun --nproc_per_node 2 tests/dist/prep_failure.py OUT_PREFIX   (run in an empty working directory)

Each rank writes the type and message of the error it raised to OUT_PREFIX.rankN.
"""

import sys
from pathlib import Path

import torch.distributed as dist

import data_prep
from smolds import ModelConfig
from smolds.train import parallel
from smolds.train.config import RunConfig
from smolds.train.data import load_data


def broken_prepare(out_dir, *args, **kwargs):
    raise OSError(f"disk full while writing {out_dir}")


def main():
    data_prep.prepare_default = broken_prepare  # load_data imports it from the package at call time
    env = parallel.init("cpu")
    try:
        load_data(RunConfig(), ModelConfig.from_preset("tiny"), env)
        result = "no error"
    except Exception as e:
        result = f"{type(e).__name__}: {e}"
    Path(f"{sys.argv[1]}.rank{env.rank}").write_text(result)
    dist.barrier()  # both ranks are done with the group before it goes away
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
