"""The run's token streams: train and validation readers over the shards `smolds prep` wrote.

`data.dir` is one prepared directory (data_prep.TokenWindows) or a {dir: weight} mixture
(data_prep.mixture.MixedWindows). Both hand every data-parallel rank its own share of each global batch and
save their position as a few integers (`state_dict`), which survives a change of data-parallel size. The
default directory is prepared from the corpus embedded in the package on first use, by rank 0, with every
rank told if that fails (no rank waits in a collective for a peer that died).
"""

from __future__ import annotations

from pathlib import Path

from smolds.config import ModelConfig
from smolds.train import parallel
from smolds.train.config import DEFAULT_DATA_DIR, RunConfig, TrainError


def load_data(cfg: RunConfig, model_cfg: ModelConfig, env: parallel.Env):
    """(train, val) readers: TokenWindows of one dir, or MixedWindows of a {dir: weight} mixture."""
    from data_prep import TokenWindows, prepare_default
    from data_prep.mixture import MixedWindows

    common = dict(seq_len=cfg.train.seq_len, seed=cfg.train.seed, dp_rank=env.rank, dp_size=env.world)
    if isinstance(cfg.data.dir, dict):  # a mixture: every dir is prepared beforehand
        for d in map(Path, cfg.data.dir):
            if not (d / "manifest.json").is_file():
                raise TrainError(_no_shards(d))
        train = MixedWindows(cfg.data.dir, split="train", **common)
        val = MixedWindows(cfg.data.dir, split="val", **common)
    else:
        data_dir = Path(cfg.data.dir)
        if not (data_dir / "manifest.json").is_file():
            if cfg.data.dir != DEFAULT_DATA_DIR:
                raise TrainError(_no_shards(data_dir))
            failed = None
            if env.is_main:
                try:
                    prepare_default(data_dir)
                except Exception as e:  # tell the other ranks instead of leaving them waiting in a collective
                    failed = e
            if parallel.any_rank(failed is not None, env.device) and failed is None:
                raise TrainError(f"rank 0 could not prepare the default corpus in {data_dir}; see rank 0's error")
            if failed is not None:
                raise failed
        train = TokenWindows(data_dir, split="train", **common)
        val = TokenWindows(data_dir, split="val", **common)
    if not Path(train.tokenizer_path).is_file():  # samples and checkpoints need it: fail now, not at the first eval
        raise TrainError(f"{train.tokenizer_path} is missing; the prepared data is incomplete: run "
                             f"`smolds prep --verify {Path(train.tokenizer_path).parent}`, then re-create it")
    if train.vocab_size > model_cfg.vocab_size:
        raise TrainError(f"the data's tokenizer has {train.vocab_size} tokens but model.vocab_size is "
                             f"{model_cfg.vocab_size}; set --model.vocab_size {train.vocab_size} or re-prepare the data")
    return train, val


def _no_shards(data_dir: Path) -> str:
    if data_dir.is_file():
        return (f"data.dir {data_dir} is a file; give the directory `smolds prep --out` wrote "
                f"(the one holding manifest.json), e.g. --data.dir {data_dir.parent}")
    if (data_dir / "progress.json").is_file():
        return (f"data.dir {data_dir} holds an unfinished prep run (progress.json, no manifest.json); rerun the "
                "same `smolds prep` command to finish it")
    return f"data.dir {data_dir} holds no shards (no manifest.json); run `smolds prep SOURCES --out {data_dir}` first"
