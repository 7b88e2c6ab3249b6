"""`smolds monitor`: the routing report of a run (from its logs) or of a checkpoint (over evaluation text).

    smolds monitor RUN_DIR [--out DIR] [--window N] [--follow [--interval S]]
    smolds monitor CKPT --data SHARDS [--seq-len N] [--batches N] [--tokens "some text"]

A run: reads metrics.jsonl (also while it is being written: `--follow`), prints a per-layer table and writes
PNGs and routing_report.md (smolds/monitor/run_report.py). A checkpoint: routes evaluation text through it
(smolds/monitor/checkpoint_report.py). See docs/monitor.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from smolds.model.router import routers
from smolds.monitor.checkpoint_report import (
    format_token_routes,
    render_checkpoint,
    route_batches,
    token_routes,
)
from smolds.monitor.live import DEFAULT_MAXVIO_THRESHOLD
from smolds.monitor.run_report import RunLog, default_window, render_run, run_info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="smolds monitor", description=__doc__.split("\n\n")[0],
        epilog="smolds monitor RUN_DIR [--follow]  |  smolds monitor CKPT --data SHARDS  |  "
               "smolds monitor CKPT --tokens 'some text'")
    p.add_argument("path", help="a run dir (reads metrics.jsonl) or, with --data/--tokens, a checkpoint "
                                "(consolidated dir, training checkpoint or run dir)")
    p.add_argument("--out", help="where PNGs and routing_report.md go (default: RUN_DIR/monitor, or "
                                 "./smolds-monitor for a checkpoint)")
    p.add_argument("--window", type=int, default=None,
                   help="the table and heatmap describe the last WINDOW steps; an expert without tokens in them is "
                        "dead (default: a tenth of the run, 5 to 100 steps, as the trainer's warnings)")
    p.add_argument("--maxvio-threshold", type=float, default=DEFAULT_MAXVIO_THRESHOLD,
                   help="drawn on the MaxVio curve (the trainer warns above it)")
    p.add_argument("--follow", action="store_true", help="keep reading the run's log and refresh until it ends")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between reads with --follow")
    p.add_argument("--data", help="shards dir from `smolds prep` (or a mixture \"{dir: weight, ...}\"): route its "
                                  "text through the checkpoint")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=20, help="at most this many batches of --data")
    p.add_argument("--tokens", help="print which experts each token of this text chose, per MoE layer")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.window is not None and args.window < 1:
        p.error("--window must be >= 1")
    for flag, value in (("--batches", args.batches), ("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if value < 1:
            print(f"smolds monitor: error: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if args.data or args.tokens:
        from smolds.infer.generate import device_error

        problem = device_error(args.device)
        if problem:
            print(f"smolds monitor: error: {problem}", file=sys.stderr)
            return 2
    try:
        if args.data or args.tokens:
            return _checkpoint_main(args)
        return _run_main(args)
    except KeyboardInterrupt:
        return 0


def _run_main(args) -> int:
    run_dir = Path(args.path)
    if not (run_dir / "metrics.jsonl").is_file() and not args.follow:
        print(f"smolds monitor: error: no metrics.jsonl in {run_dir}; pass a run's train.out_dir, or a checkpoint "
              "with --data SHARDS / --tokens TEXT", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else run_dir / "monitor"
    log, info = RunLog(run_dir), run_info(run_dir)
    shown = None
    while True:
        log.poll()
        if info.total_steps is None:  # --follow started before the trainer wrote run_config.yaml: read it again
            info = run_info(run_dir)
        if log.rows and log.last_step != shown:
            window = args.window or default_window(info, log)
            text, report = render_run(log, out, window, info, args.maxvio_threshold)
            shown = log.last_step
            print(("\n" if args.follow else "") + text + f"\nreport: {report}", flush=True)
        done = info.total_steps is not None and shown is not None and shown >= info.total_steps
        if not args.follow or done:
            break
        time.sleep(args.interval)
    if shown is None:
        print(f"smolds monitor: error: {run_dir / 'metrics.jsonl'} has no routing rows (the model has no MoE "
              "layers, or no step was logged yet)", file=sys.stderr)
        return 2
    return 0


def _checkpoint_main(args) -> int:
    from data_prep.errors import DataError
    from smolds.pretrained import load_pretrained

    try:
        model, tokenizer = load_pretrained(args.path, device=args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"smolds monitor: error: {e}", file=sys.stderr)
        return 2
    if not routers(model):
        print(f"smolds monitor: error: {args.path} has no MoE layers to monitor", file=sys.stderr)
        return 2
    if args.data:
        from data_prep.mixture import open_windows

        if args.seq_len > model.config.max_position_embeddings:
            print(f"smolds monitor: error: --seq-len {args.seq_len} exceeds the model's context of "
                  f"{model.config.max_position_embeddings} tokens; pass --seq-len "
                  f"{model.config.max_position_embeddings} or less", file=sys.stderr)
            return 2
        try:
            data = open_windows(args.data, split=args.split, seq_len=args.seq_len)
        except (FileNotFoundError, ValueError, DataError) as e:
            print(f"smolds monitor: error: {e}", file=sys.stderr)
            return 2
        if data.vocab_size > model.config.vocab_size:
            print(f"smolds monitor: error: the data's tokenizer has {data.vocab_size} tokens, the model "
                  f"{model.config.vocab_size}: not this model's data", file=sys.stderr)
            return 2
        result = route_batches(model, data.iter_eval(args.batch_size, args.batches), args.device)
        text, report = render_checkpoint(model, result, Path(args.out or "smolds-monitor"), str(args.path))
        print(text + f"\nreport: {report}")
    if args.tokens:
        if tokenizer is None:
            print(f"smolds monitor: error: {args.path} has no tokenizer.json to encode --tokens", file=sys.stderr)
            return 2
        ids = tokenizer.encode(args.tokens)[: model.config.max_position_embeddings]
        if not ids:
            print("smolds monitor: error: --tokens encodes to no tokens", file=sys.stderr)
            return 2
        routes = token_routes(model, ids, args.device)
        pieces = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
        print(format_token_routes(pieces, routes))
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "routing_tokens.json").write_text(json.dumps(
                {"text": args.tokens, "tokens": pieces, "ids": ids, "layers": routes}, indent=1))
    return 0
