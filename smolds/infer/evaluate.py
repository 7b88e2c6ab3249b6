"""Evaluation: validation loss, perplexity and MaxVio over a whole split, plus greedy samples.

    smolds eval RUN_DIR                                    # the run's own data, seq_len, batch and batches
    smolds eval RUN_DIR_OR_CHECKPOINT --data SHARDS [--seq-len 256] [--batches 50]
    smolds eval RUN_DIR_OR_CHECKPOINT --data "{data/a: 0.7, data/b: 0.3}"   # a mixture: loss per source too

MaxVio here is MaxVio_global of the loss-free balancing paper: expert loads counted over the whole
evaluation set (summed across ranks), not per batch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from smolds.model.router import RoutingStats
from smolds.model.transformer import eval_mode
from smolds.monitor.stats import max_violation
from smolds.train import parallel


@torch.no_grad()
def evaluate(model, data, max_batches: int | None, batch_size: int, device) -> dict:
    """loss, ppl, tokens (and maxvio) over `data.iter_eval`, summed across ranks (every rank calls it).

    A mixture (data_prep.mixture.MixedWindows) is evaluated source by source, up to max_batches each:
    `loss/<name>` per source, and `loss` their mean weighted by the mixture's weights.
    """
    mixed = hasattr(data, "sources")
    parts = data.sources if mixed else [data]
    loss_sum = torch.zeros(len(parts), 2, dtype=torch.float64, device=device)  # (sum of token losses, tokens)
    stats = RoutingStats(model)
    with eval_mode(model), stats.measure() as routed:
        for k, part in enumerate(parts):
            for x, y in part.iter_eval(batch_size, max_batches=max_batches):
                out = model(x.to(device), targets=y.to(device))
                loss_sum[k] += torch.tensor([out.lm_loss.item() * y.numel(), y.numel()], dtype=torch.float64,
                                            device=device)
    parallel.all_reduce_(loss_sum)
    losses = [float(s / n) if n > 0 else float("nan") for s, n in loss_sum.tolist()]
    loss = sum(w * x for w, x in zip(data.weights, losses)) if mixed else losses[0]
    result = {"loss": loss, "ppl": math.exp(loss) if math.isfinite(loss) and loss < 50 else float("inf"),
              "tokens": int(loss_sum[:, 1].sum())}
    if mixed:
        result.update({f"loss/{name}": x for name, x in zip(data.names, losses)})
    if stats.routers:
        counts = parallel.all_reduce_(routed.counts.to(device))
        per_layer, mean = max_violation(counts)
        result.update(maxvio=mean, maxvio_per_layer=per_layer.tolist())
    return result


@torch.no_grad()
def greedy_samples(model, tokenizer, prompts: list[str], max_new_tokens: int) -> dict[str, str]:
    """Greedy continuations of fixed prompts with the model's decode cache (one prompt at a time)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer)) if not isinstance(tokenizer, Tokenizer) else tokenizer
    device = next(model.parameters()).device
    out = {}
    with eval_mode(model):
        for prompt in prompts:
            ids = tok.encode(prompt).ids or [0]
            n = min(max_new_tokens, model.config.max_position_embeddings - len(ids))
            cache = model.new_cache(1, len(ids) + n)
            logits = model(torch.tensor([ids], device=device), cache=cache, last_only=True).logits
            new = []
            for _ in range(n):
                nxt = int(logits[0, -1].argmax())
                new.append(nxt)
                if len(new) == n:
                    break
                logits = model(torch.tensor([[nxt]], device=device), cache=cache).logits
            out[prompt] = tok.decode(new)
    return out


def run_settings(checkpoint: str | Path) -> dict:
    """The evaluation settings of the run that wrote `checkpoint` (a run dir, a step dir or its
    consolidated/ dir): its data dir, seq_len, micro-batch and eval_batches, so that `smolds eval RUN` measures
    what the trainer measured. {} when the checkpoint is not inside a run (an import, a conversion)."""
    from smolds.train.config import RunConfig

    path = Path(checkpoint).resolve()
    for d in [path, *path.parents][:4]:  # consolidated/ -> step_N/ -> checkpoints/ -> run dir
        f = d / "run_config.yaml"
        if f.is_file():
            try:
                cfg = RunConfig.load(f)
            except ValueError:
                return {}
            return {"data": cfg.data.dir, "seq_len": cfg.train.seq_len, "batch_size": cfg.train.micro_batch,
                    "batches": cfg.train.eval_batches}
    return {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="smolds eval", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a consolidated checkpoint dir, a training checkpoint or a run dir")
    p.add_argument("--data", help="shards dir from `smolds prep`, or a mixture \"{dir: weight, ...}\" as in "
                                  "--data.dir (default: the run's data.dir)")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--seq-len", type=int, help="default: the run's train.seq_len, else 256")
    p.add_argument("--batch-size", type=int, help="default: the run's train.micro_batch, else 8")
    p.add_argument("--batches", type=int, help="at most this many batches (default: the run's "
                                               "train.eval_batches, else all)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    for flag, value in (("--batches", args.batches), ("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if value is not None and value < 1:
            print(f"smolds eval: error: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    from smolds.infer.generate import device_error

    problem = device_error(args.device)
    if problem:
        print(f"smolds eval: error: {problem}", file=sys.stderr)
        return 2
    run = run_settings(args.checkpoint)  # what the trainer used, where the flags are not given
    data_spec = args.data if args.data is not None else run.get("data")
    seq_len = args.seq_len or run.get("seq_len", 256)
    batch_size = args.batch_size or run.get("batch_size", 8)
    batches = args.batches or run.get("batches")
    if data_spec is None:
        print(f"smolds eval: error: {args.checkpoint} is not inside a training run, so there is no data to "
              "default to; pass --data SHARDS", file=sys.stderr)
        return 2
    from data_prep.errors import DataError
    from data_prep.mixture import open_windows
    from data_prep.reader import check_dataset
    from smolds.pretrained import load_pretrained

    try:
        model, _ = load_pretrained(args.checkpoint, device=args.device)
        context = model.config.max_position_embeddings
        if seq_len > context:
            raise ValueError(f"--seq-len {seq_len} exceeds the model's context of {context} tokens; "
                             f"pass --seq-len {context} or less")
        data = open_windows(data_spec, split=args.split, seq_len=seq_len)
        for source in getattr(data, "sources", [data]):
            check_dataset(source.data_dir)  # as the trainer does: tokenizer, sizes, hashes up to a budget
        if data.vocab_size > model.config.vocab_size:
            raise ValueError(f"the data's tokenizer has {data.vocab_size} tokens, the model "
                             f"{model.config.vocab_size}: not this model's data (prepare it with the model's tokenizer)")
        result = evaluate(model, data, batches, batch_size, torch.device(args.device))  # reads check token ids
    except (FileNotFoundError, ValueError, DataError) as e:
        print(f"smolds eval: error: {e}", file=sys.stderr)
        return 2
    if result["tokens"] == 0:
        print(f"smolds eval: error: the {args.split} split of {data_spec} has no window of --seq-len "
              f"{seq_len} tokens; lower --seq-len or use a larger split", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0
