"""Runs several short trainings in one process group and writes, per rank, the losses and router biases.

    torchrun --nproc_per_node 2 tests/dist/train_driver.py OUT_JSON DATA_DIR RUN_ROOT NAME:OVERRIDES...

Each NAME:OVERRIDES is a run (overrides separated by spaces, e.g. "zero2:--deepspeed.zero_stage 2").
A run whose name ends in "+resume" is trained again with --resume from the same out_dir; the driver flag
`--preempt-at K` makes a preemption request arrive during step K (the run checkpoints and returns).
"""

import json
import os
import sys

import torch.distributed as dist

from smolds.model.router import RoutingStats
from smolds.train.config import RunConfig
from smolds.train.loop import Preemption, train


def losses(out_dir, key="loss"):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["step"]: r[key] for r in rows if r["kind"] == "train" and key in r}


def main():
    out_json, data_dir, root, *runs = sys.argv[1:]
    results = {}
    real_requested = Preemption.requested
    for spec in runs:
        name, _, overrides = spec.partition(":")
        overrides = overrides.split()
        preempt_at = 0
        if "--preempt-at" in overrides:  # a driver flag, not the trainer's
            i = overrides.index("--preempt-at")
            preempt_at = int(overrides[i + 1])
            del overrides[i : i + 2]
        resume = name.endswith("+resume")
        out_dir = os.path.join(root, name.removesuffix("+resume"))
        cfg = RunConfig.load(None, [*overrides, "--data.dir", data_dir, "--train.out_dir", out_dir,
                                    "--logging.wandb", "disabled"])
        captured = {}
        original = RoutingStats.end_step

        def spy(self, update_bias=True):
            routed = original(self, update_bias)
            captured["bias"] = [r.e_score_correction_bias.tolist() for r in self.routers]
            return routed

        RoutingStats.end_step = spy
        if preempt_at:  # a preemption signal arrives during that step (the real SIGTERM path after it)
            checks = {"n": 0}

            def requested(self, device, checks=checks, at=preempt_at):
                checks["n"] += 1  # the first check is the one before step 1
                return checks["n"] == at + 1

            Preemption.requested = requested
        summary = train(cfg, resume=resume)
        RoutingStats.end_step = original
        Preemption.requested = real_requested
        results[name] = {"summary": {k: v for k, v in summary.items() if k != "samples"},
                         "bias": captured.get("bias"), "losses": losses(out_dir) if dist.get_rank() == 0 else None,
                         "grad_norms": losses(out_dir, "grad_norm") if dist.get_rank() == 0 else None}
    with open(f"{out_json}.rank{dist.get_rank()}", "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
