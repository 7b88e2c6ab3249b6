"""`smolds ckpt info CKPT`: what a training checkpoint holds, checked, and where it can resume.

There is no `reshard`: a checkpoint stores every tensor whole under the model's own names
(smolds/train/checkpoint.py), so `--resume` at any rank count, ZeRO stage and ep_size continues it as it is,
and a checkpoint copied to another cluster needs no conversion. This command reads the JSON and the
safetensors headers only (no tensor, nothing unpickled) and fails in one line when a file is missing,
truncated or does not fit the model.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from smolds.config import ConfigError, ModelConfig
from smolds.pretrained import CONFIG_FILE, WEIGHTS_FILE
from smolds.train import checkpoint as ckpt


def find(path: Path) -> Path:
    """The checkpoint `path` designates: a step directory, a checkpoints/ directory or a run directory
    (their `latest`)."""
    for root in (path, path / "checkpoints"):
        if (root / ckpt.STATE_FILE).is_file():
            return root
        if (root / "latest").is_file():
            return ckpt.latest_checkpoint(root)
    raise ckpt.ResumeError(f"{path} holds no training checkpoint (no {ckpt.STATE_FILE}, no latest, no "
                           "checkpoints/latest); pass a run directory or one of its checkpoints/step_* directories")


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:,.1f} MB"


def describe(path: Path) -> list[str]:
    """The lines `smolds ckpt info` prints for checkpoint directory `path` (after checking every file)."""
    state = ckpt.read_trainer_state(path)
    try:
        config = ModelConfig.from_yaml(path / "consolidated" / CONFIG_FILE)
    except (OSError, ConfigError) as e:
        raise ckpt.ResumeError(f"checkpoint {path}: consolidated/{CONFIG_FILE} cannot be read ({e}); "
                               "the checkpoint is damaged") from None
    ckpt.open_files(path, state, config)  # every header, every tensor's shape
    params, buffers = ckpt.whole_shapes(config)
    n = sum(math.prod(s) for s in params.values())
    shape, opt = state.get("layout") or {}, state["optimizer"]
    data = state.get("data") or {}
    where = (f"ZeRO 0-2 and ep_size dividing both {config.n_routed_experts} routed experts and the rank count"
             if config.moe_layers else "ZeRO 0-3")
    lines = [
        f"checkpoint {path} (smolds format {ckpt.FORMAT}: whole tensors in safetensors + JSON, no pickles)",
        f"step {state['step']} (Adam's step {opt['step']}), {state.get('tokens_seen', 0):,} tokens seen, "
        f"{state.get('nonfinite_total', 0)} non-finite steps skipped",
        f"written by {shape.get('ranks', '?')} rank(s), ZeRO-{shape.get('zero_stage', '?')}, ep_size "
        f"{shape.get('ep_size', '?')}; resumes as it is at any rank count, {where}",
        f"model: {config.num_hidden_layers} layers, hidden {config.hidden_size}, {n / 1e6:.2f}M parameters in "
        f"{len(params)} tensors, {len(buffers)} router bias(es)",
        f"weights: consolidated/{WEIGHTS_FILE} ({_mb(path / 'consolidated' / WEIGHTS_FILE)}, fp32 master weights)",
        f"Adam's moments ({', '.join(ckpt.MOMENTS)}, fp32) in {len(opt['shards'])} shard(s): "
        + ", ".join(f"{s} ({_mb(path / s)})" for s in opt["shards"]),
    ]
    if "consumed_windows" in data:
        lines.append(f"data position: {data['consumed_windows']:,} windows of {data.get('seq_len')} + 1 tokens "
                     f"consumed ({data.get('split')} split, seed {data.get('seed')})")
    lines.append(f"RNG: the states of {len(state['rng'])} rank(s)")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="smolds ckpt", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what a training checkpoint holds (checks every file's header)")
    info.add_argument("ckpt", type=Path, help="a run directory, its checkpoints/ or a checkpoints/step_* directory")
    args = p.parse_args(argv)
    try:
        print("\n".join(describe(find(args.ckpt))))
    except ckpt.ResumeError as e:
        print(f"smolds ckpt: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
