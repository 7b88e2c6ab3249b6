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


def load_data(cfg: RunConfig, model_cfg: ModelConfig, env: parallel.Env, start_step: int = 0):
    """(train, val) readers: TokenWindows of one dir, or MixedWindows of a {dir: weight} mixture.

    Rank 0 first checks each dir (data_prep.reader.check_dataset: the manifest, tokenizer.json, every
    shard's size, and the hashes of up to 1 GiB of shards, from shard `start_step` on), and every rank
    learns the outcome, so none trains on damaged data and none waits for a rank that gave up."""
    from data_prep import TokenWindows, prepare_default
    from data_prep.errors import DataError
    from data_prep.mixture import MixedWindows
    from data_prep.reader import check_dataset

    common = dict(seq_len=cfg.train.seq_len, seed=cfg.train.seed, dp_rank=env.rank, dp_size=env.world)
    dirs = list(map(Path, cfg.data.dir)) if isinstance(cfg.data.dir, dict) else [Path(cfg.data.dir)]
    for d in dirs:
        if not (d / "manifest.json").is_file() and (len(dirs) > 1 or cfg.data.dir != DEFAULT_DATA_DIR):
            raise TrainError(_no_shards(d))
    first_use = not (dirs[0] / "manifest.json").is_file()  # the default dir, prepared on first use
    task = f"prepare the default corpus in {dirs[0]}" if first_use else f"check the data in {cfg.data.dir}"
    failed = None
    if env.is_main:
        try:
            if first_use:
                prepare_default(dirs[0])
            for d in dirs:
                check_dataset(d, rotate=start_step)
        except DataError as e:
            failed = TrainError(str(e))
        except Exception as e:  # tell the other ranks instead of leaving them waiting in a collective
            failed = e
    if parallel.any_rank(failed is not None, env.device) and failed is None:
        raise TrainError(f"rank 0 could not {task}; see rank 0's error")
    if failed is not None:
        raise failed
    if isinstance(cfg.data.dir, dict):
        train, val = (MixedWindows(cfg.data.dir, split=s, **common) for s in ("train", "val"))
    else:
        train, val = (TokenWindows(dirs[0], split=s, **common) for s in ("train", "val"))
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
