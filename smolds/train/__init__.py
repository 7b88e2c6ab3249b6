"""Training: the loop and everything it stands on.

    loop.py         the training loop: `setup`, then `train_step`, `log_step`, `maybe_eval`, `maybe_save`
    engine.py       the DeepSpeed engine (ZeRO, expert-parameter groups, the optimizer step): the only
                    module that talks to DeepSpeed
    data.py         the run's train/val token streams (prepares the default corpus on first use)
    checkpoint.py   the resumable training state: atomic checkpoint directories, `latest`, resume
    config.py       the run config (model / data / train / eval / deepspeed / logging), YAML + overrides
    schedule.py     learning-rate schedules (WSD, cosine)
    parallel.py     process groups: rank, world, expert-parallel groups
    preemption.py   SIGTERM/SIGUSR1 -> checkpoint and exit 75 (requeue)
    jit_locks.py    locks of torch's extension builder: stale ones removed, live ones waited on with a bound
    metrics.py      JSONL, wandb and the progress bar
    cli.py          the `smolds train` command

`from smolds.train import train, TrainError` gives the loop's entry point. Importing this package imports
no torch (the CLI installs the stop-signal handler before the heavy imports).
"""

from __future__ import annotations

import importlib

_EXPORTS = {"train": "smolds.train.loop", "TrainError": "smolds.train.loop", "main": "smolds.train.cli"}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
