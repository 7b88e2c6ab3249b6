"""Every process group of a run gives up after train.wait_timeout: rank 1 stays out of the collectives while
rank 0 runs one all_reduce on each group of two ranks (the world, DeepSpeed's data-parallel group, the expert
groups), and each must fail instead of waiting torch's default 30 minutes for a dead or hung peer.

    torchrun --nproc_per_node 2 tests/dist/group_timeouts.py OUT_JSON

Rank 0 writes {"groups": [ranks of each group tried], "failed": how many raised}.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _world

from smolds.train import parallel
from smolds.train.config import RunConfig
from smolds.train.engine import Engine

out = Path(sys.argv[1])
cfg = RunConfig.load(None, ["--model.num_hidden_layers", "2", "--train.micro_batch", "2", "--deepspeed.ep_size", "2",
                            "--deepspeed.zero_stage", "2", "--train.wait_timeout", "5"])
env = parallel.init("cpu", cfg.train.wait_timeout)
Engine(cfg, cfg.model_config(), env, bf16=False)  # DeepSpeed makes its groups; the expert groups are made too
dist.barrier()
if env.rank == 0:
    groups = [g for g in list(_world.pg_map) if dist.get_world_size(g) == 2]
    failed = 0
    for g in groups:
        try:
            dist.all_reduce(torch.zeros(1), group=g)
        except RuntimeError:
            failed += 1
    out.write_text(json.dumps({"groups": [dist.get_process_group_ranks(g) for g in groups], "failed": failed}))
else:
    while not out.exists():  # out of every collective until rank 0 is done
        time.sleep(0.2)
os._exit(0)  # the groups are broken now: no teardown
