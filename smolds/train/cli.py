"""`smolds train`: parse the flags, run `smolds.train.loop.train`, print where everything went.

    smolds train [--config RUN.yaml] [--resume] [--section.field VALUE ...]

Exit codes: 0 done, 2 a problem with the inputs (one line on stderr naming the fix), 75 stopped by
SIGTERM/SIGUSR1 with a checkpoint saved (requeue and pass --resume), 1 another rank died or stopped answering
(one line; the same command with --resume continues from the last checkpoint).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from data_prep.errors import DataError
from smolds.config import ConfigError
from smolds.train import parallel
from smolds.train.checkpoint import ResumeError
from smolds.train.config import RunConfig, TrainError
from smolds.train.loop import EXIT_PREEMPTED, train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="smolds train", description="Pretrain with the DeepSpeed engine.",
                                epilog="Any field can be overridden: --train.steps 50 --model.num_hidden_layers 2 "
                                       "--deepspeed.zero_stage 2 --logging.wandb online")
    p.add_argument("--config", help="run config YAML (default: the tiny preset on the embedded corpus)")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoints/latest if it exists")
    p.add_argument("--wandb", choices=["offline", "online", "disabled"], help="shortcut for --logging.wandb")
    args, overrides = p.parse_known_args(argv)
    if args.wandb:
        overrides += ["--logging.wandb", args.wandb]
    try:
        cfg = RunConfig.load(args.config, overrides)
        summary = train(cfg, resume=args.resume)
    except (ConfigError, TrainError, DataError, ResumeError) as e:
        print(f"smolds train: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        what = peer_failure(e)
        if what is None:
            raise
        rank, problem = parallel.env_from_launcher()[0], " ".join(str(e).split())[:160]
        if what == "unreachable":
            print(f"smolds train: error: rank {rank} could not reach the other ranks ({problem}); check MASTER_ADDR "
                  "and MASTER_PORT (a port in use, a host that does not resolve), then rerun the same command "
                  "with --resume", file=sys.stderr)
        else:
            print(f"smolds train: error: rank {rank} lost a peer ({problem}): another rank died or did not answer "
                  f"within train.wait_timeout ({cfg.train.wait_timeout:g} s); see the other ranks' logs, then rerun "
                  "the same command with --resume", file=sys.stderr)
        return 1
    if summary.get("preempted"):
        return EXIT_PREEMPTED
    if parallel.env_from_launcher()[0] == 0:
        print(closing_message(summary))
    return 0


def peer_failure(e: RuntimeError) -> str | None:
    """"unreachable" for a rendezvous or store that failed (the ranks never met), "lost" for a collective that
    failed because another rank is gone or silent (gloo raises plain RuntimeErrors: "Connection closed by peer",
    "Timed out waiting ... for recv"; NCCL a DistBackendError), None for anything else."""
    import torch.distributed as dist

    if isinstance(e, (dist.DistNetworkError, dist.DistStoreError)):
        return "unreachable"
    return "lost" if isinstance(e, dist.DistError) or any(k in str(e) for k in ("gloo", "NCCL", "nccl")) else None


def closing_message(s: dict) -> str:
    if s["first_loss"] is None:  # resumed at its last step (killed after its final checkpoint): no step ran
        lines = [f"done: the run was already at step {s['step']}; nothing to train (raise --train.steps to go on)"]
    else:
        lines = [f"done: {s['step']} steps in {s.get('seconds', 0):.0f} s; loss {s['first_loss']:.3f} -> "
                 f"{s['last_loss']:.3f}"]
    if "val_loss" in s:
        lines.append(f"validation: loss {s['val_loss']:.4f}, perplexity {s['val_ppl']:.2f}"
                     if math.isfinite(s["val_loss"]) else "validation: n/a")
    for prompt, text in (s.get("samples") or {}).items():
        lines.append(f"sample {prompt!r} -> {text!r}")
    logs = Path(s["out_dir"])
    lines.append(f"logs: {logs / 'metrics.jsonl'}  (and {logs / 'train.log'}"
                 + (f", {s['wandb']}" if s.get("wandb") else "") + ")")
    if s.get("checkpoint"):
        lines.append(f"checkpoint: {s['checkpoint']}  (consolidated: {Path(s['checkpoint']) / 'consolidated'})")
        lines.append(f"next: smolds generate {Path(s['checkpoint']) / 'consolidated'} \"The \"")
    return "\n".join(lines)
