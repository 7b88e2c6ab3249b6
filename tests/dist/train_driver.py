"""Runs several short trainings in one process group and writes, per rank, the losses and router biases.

    torchrun --nproc_per_node 2 tests/dist/train_driver.py OUT_JSON DATA_DIR RUN_ROOT NAME:OVERRIDES...

Each NAME:OVERRIDES is a run (overrides separated by spaces, e.g. "zero2:--deepspeed.zero_stage 2").
A run whose name ends in "+resume" is trained again with --resume from the same out_dir. Driver flags:
`--preempt-at K`: a preemption request arrives during step K (the run checkpoints and returns);
`--start-from STEP_DIR`: the run resumes from a copy of that checkpoint (written at any shape);
`--dump`: at every checkpoint save, and right after a resume's load, each rank writes the optimizer state
as DeepSpeed holds it on that rank, read from its own storage (not through smolds' accessors), to
OUT_JSON.NAME.EVENT.rankR.safetensors (EVENT: save<step> or load): per parameter the rank's fragment of
the fp32 master weight and of each Adam moment, and where the fragment sits (`fragments` in the metadata).
"""

import json
import os
import shutil
import sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file

import smolds.train.checkpoint as ckpt
from smolds.model.router import RoutingStats
from smolds.train import parallel
from smolds.train.config import RunConfig
from smolds.train.loop import Preemption, train

KEYS = ("fp32", "exp_avg", "exp_avg_sq")


def losses(out_dir, key="loss"):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["step"]: r[key] for r in rows if r["kind"] == "train" and key in r}


def dump_optimizer(engine, path):
    """This rank's raw optimizer storage. ZeRO-0 (fp32): each parameter is its own master, `state[p]` its
    moments. ZeRO-1/2: a flat fp32 partition per param group; a parameter's `_hp_mapping` says where its
    fragment sits in the partition (hp address) and in the flattened parameter (lp address)."""
    opt = engine.ds.basic_optimizer
    tensors, where = {}, {}
    for name, p in engine.model.named_parameters():
        ep = (dist.get_rank(engine.ep_group), dist.get_world_size(engine.ep_group)) \
            if engine.ep_group is not None and getattr(p, "allreduce", True) is False else (-1, 1)
        if engine.zero_stage == 0:
            frags, start = {"fp32": p.detach(), **{k: opt.state[p][k] for k in KEYS[1:]}}, 0
        else:
            m = p._hp_mapping
            if m is None:
                continue
            flat = engine.ds.optimizer.single_partition_of_fp32_groups[m.param_group_index]
            hp = m.hp_fragment_address
            frags = {"fp32": flat, **{k: opt.state[flat][k] for k in KEYS[1:]}}
            frags = {k: v.narrow(0, hp.start, hp.numel) for k, v in frags.items()}
            start = m.lp_fragment_address.start
        tensors.update({f"{name}.{k}": v.detach().reshape(-1).float().cpu().clone() for k, v in frags.items()})
        where[name] = {"start": start, "local_shape": list(p.shape), "ep_rank": ep[0], "ep_size": ep[1]}
    steps = sorted({int(s["step"]) for s in opt.state.values()})
    save_file(tensors, path, metadata={"fragments": json.dumps(where), "steps": json.dumps(steps)})


def main():
    out_json, data_dir, root, *runs = sys.argv[1:]
    parallel.init("cpu")
    results = {}
    real_requested, real_save, real_load = Preemption.requested, ckpt.save, ckpt.load
    for spec in runs:
        name, _, overrides = spec.partition(":")
        overrides = overrides.split()
        flags = {}
        for flag, arity in (("--preempt-at", 1), ("--start-from", 1), ("--dump", 0)):  # the driver's, not the trainer's
            if flag in overrides:
                i = overrides.index(flag)
                flags[flag] = overrides[i + 1] if arity else True
                del overrides[i : i + 1 + arity]
        resume = name.endswith("+resume")
        out_dir = os.path.join(root, name.removesuffix("+resume"))
        if "--start-from" in flags:
            src = Path(flags["--start-from"])
            if dist.get_rank() == 0:
                shutil.copytree(src, Path(out_dir) / "checkpoints" / src.name)
                (Path(out_dir) / "checkpoints" / "latest").write_text(src.name)
            dist.barrier()
            resume = True
        cfg = RunConfig.load(None, [*overrides, "--data.dir", data_dir, "--train.out_dir", out_dir,
                                    "--logging.wandb", "disabled"])
        captured = {}
        original = RoutingStats.end_step

        def spy(self, update_bias=True, original=original, captured=captured):
            routed = original(self, update_bias)
            captured["bias"] = [r.e_score_correction_bias.tolist() for r in self.routers]
            return routed

        RoutingStats.end_step = spy
        if "--preempt-at" in flags:  # a preemption signal arrives during that step (the real SIGTERM path after it)
            checks = {"n": 0}

            def requested(self, device, checks=checks, at=int(flags["--preempt-at"])):
                checks["n"] += 1  # the first check is the one before step 1
                return checks["n"] == at + 1

            Preemption.requested = requested
        if "--dump" in flags:
            prefix = f"{out_json}.{name}"

            def save(engine, root, step, *args, prefix=prefix, **kwargs):
                dump_optimizer(engine, f"{prefix}.save{step}.rank{dist.get_rank()}.safetensors")
                return real_save(engine, root, step, *args, **kwargs)

            def load(engine, path, prefix=prefix):
                state = real_load(engine, path)
                dump_optimizer(engine, f"{prefix}.load.rank{dist.get_rank()}.safetensors")
                return state

            ckpt.save, ckpt.load = save, load
        summary = train(cfg, resume=resume)
        RoutingStats.end_step = original
        Preemption.requested, ckpt.save, ckpt.load = real_requested, real_save, real_load
        results[name] = {"summary": {k: v for k, v in summary.items() if k != "samples"},
                         "bias": captured.get("bias"), "losses": losses(out_dir) if dist.get_rank() == 0 else None,
                         "grad_norms": losses(out_dir, "grad_norm") if dist.get_rank() == 0 else None}
    with open(f"{out_json}.rank{dist.get_rank()}", "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
