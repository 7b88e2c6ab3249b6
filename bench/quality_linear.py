"""Quality: tiny models that differ only in their attention, trained on the same tokens, at equal parameters.

Every model sees the same batches in the same order (a `smolds prep` directory's train split, windows shuffled
by the seed), from the same seed, with the same plain AdamW loop, for the same number of steps; only the
attention kinds differ, and each model's dense FFN width is set so that its parameter count equals the first
model's (to within one FFN column: 3 * hidden * layers parameters), since a KDA layer is larger than an MLA one.
Validation loss is the mean next-token loss over every window of the val split (never trained on).
Several seeds give a mean and a (sample) standard deviation per model.

    smolds prep ../shared/corpora/tinystories-valid-prefix.txt ../shared/corpora/tinyshakespeare.txt \\
        lines:../shared/corpora/wikitext-2-raw-test.raw --out data/shared-bpe4096 --vocab-size 4096
    python bench/quality_linear.py --data data/shared-bpe4096 --figure val_loss.png   # mla, hybrid, kda_hybrid, kda
    python bench/quality_linear.py --data data/shared-bpe4096 --models mla kda_hybrid --seeds 0 --steps 100
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from data_prep.reader import TokenWindows
from smolds import ModelConfig, Transformer

MODELS = {
    "mla": {"attention_pattern": ["mla"]},
    "hybrid": {"attention_pattern": ["linear", "linear", "linear", "mla"]},  # simple gated linear 3 : MLA 1
    "kda_hybrid": {"attention_pattern": ["kda", "kda", "kda", "mla"], "mla_use_nope": True},  # Kimi Linear's
    "kda_hybrid_rope": {"attention_pattern": ["kda", "kda", "kda", "mla"]},  # the same with RoPE in MLA
    "kda": {"attention_pattern": ["kda"]},
    "linear": {"attention_pattern": ["linear"]},
    "latent": {"attention_pattern": ["linear"], "linear_kv_rank": 16},
}
STUDY = ["mla", "hybrid", "kda_hybrid", "kda"]


def tiny_config(**changes) -> ModelConfig:
    """The tiny preset (width 128, 4 layers, 4 heads) with a dense FFN, so only attention differs."""
    return ModelConfig.from_preset("tiny").replace(n_routed_experts=0, linear_head_dim=32, linear_chunk_size=64,
                                                   **changes)


def num_parameters(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return Transformer(cfg).num_parameters()


def matched_config(changes: dict, target: int | None) -> ModelConfig:
    """tiny_config(**changes) with the dense FFN width whose parameter count is nearest `target` (None: as is).
    The count is linear in the width: 3 * hidden * layers parameters per FFN column."""
    cfg = tiny_config(**changes)
    if target is None:
        return cfg
    per_column = 3 * cfg.hidden_size * cfg.num_hidden_layers
    width = cfg.intermediate_size + round((target - num_parameters(cfg)) / per_column)
    return cfg.replace(intermediate_size=width)


@torch.no_grad()
def val_loss(model: Transformer, args) -> float:
    """Mean next-token loss over every window of the val split."""
    model.eval()
    total, rows = 0.0, 0
    for x, y in TokenWindows(args.data, "val", args.seq_len).iter_eval(args.batch):
        total += model(x, targets=y).lm_loss.item() * len(x)
        rows += len(x)
    model.train()
    return total / rows


def train_and_eval(cfg: ModelConfig, args, seed: int) -> tuple[float, float, float]:
    """Returns (training loss averaged over the last 20 steps, validation loss, seconds); with --eval-every,
    prints the validation loss along the way (the learning curve)."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    train = TokenWindows(args.data, "train", args.seq_len, seed=seed)  # the same windows, in the same order
    losses, t0 = [], time.perf_counter()
    for step in range(args.steps):
        if args.eval_every and step and step % args.eval_every == 0:
            print(f"#   step {step}: val {val_loss(model, args):.3f}", flush=True)
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = train.next_batch(args.batch)
        loss = model(x, targets=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return sum(losses[-20:]) / len(losses[-20:]), val_loss(model, args), time.perf_counter() - t0


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def plot(results: dict, path: str) -> None:
    """Validation loss per model: the mean over seeds (bar, +- one std) and each seed's run (dots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    val = [[r[1] for r in results[n]] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, [statistics.mean(v) for v in val], yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in val],
           color="#9ecae1", capsize=4)
    for i, v in enumerate(val):
        ax.plot([i] * len(v), v, "o", color="#08519c", markersize=4)
    low, high = min(map(min, val)), max(map(max, val))
    ax.set_ylim(low - 0.5 * (high - low) - 0.01, high + 0.5 * (high - low) + 0.01)
    ax.set_ylabel("val loss (nats)")
    ax.set_title(f"equal steps and parameters, {len(val[0])} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a `smolds prep` directory (see the module docstring)")
    p.add_argument("--models", nargs="+", default=STUDY, choices=list(MODELS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--unmatched", action="store_true", help="keep the tiny FFN width: unequal parameter counts")
    p.add_argument("--threads", type=int, default=1, help="1 is steadier on a shared machine")
    p.add_argument("--figure", help="also draw the validation losses into this PNG")
    p.add_argument("--eval-every", type=int, default=0, help="also print the val loss every N steps")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    target = None if args.unmatched else num_parameters(tiny_config(**MODELS[args.models[0]]))
    configs = {name: matched_config(MODELS[name], target) for name in args.models}
    train = TokenWindows(args.data, "train", args.seq_len)
    print(f"{args.data}: {len(train) * (args.seq_len + 1):,} training tokens in windows; {args.steps} steps of "
          f"{args.batch}x{args.seq_len} = {args.steps * args.batch * args.seq_len:,} tokens per run; seeds {args.seeds}")
    results = {name: [] for name in args.models}
    for seed in args.seeds:  # one run at a time; every model once per seed
        for name, cfg in configs.items():
            train_loss, val_loss, seconds = train_and_eval(cfg, args, seed)
            results[name].append((train_loss, val_loss, seconds))
            print(f"# {name} seed {seed}: train {train_loss:.3f} val {val_loss:.3f} ({seconds:.0f} s)", flush=True)
    print("\n| model | attention | FFN width | params | train loss (last 20) | val loss | val ppl | s/run |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, cfg in configs.items():
        train_losses, val_losses, seconds = zip(*results[name])
        pattern = ", ".join(cfg.attention_pattern) + (" (MLA without RoPE)" if cfg.mla_use_nope else "")
        print(f"| {name} | {pattern} | {cfg.intermediate_size} | {num_parameters(cfg):,} | {mean_std(train_losses)} "
              f"| {mean_std(val_losses)} | {math.exp(statistics.mean(val_losses)):.1f} "
              f"| {statistics.mean(seconds):.0f} |")
    if args.figure:
        plot(results, args.figure)


if __name__ == "__main__":
    main()
