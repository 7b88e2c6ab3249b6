"""Quality: tiny MLA, linear-attention, hybrid and latent-linear models trained on the same tokens, side by side.

Every model sees the same batches in the same order (TinyStories prefix, byte-level BPE of 4096 tokens trained
on the training part), from the same seed, with the same plain AdamW loop; only the attention kind differs.
Validation loss is the mean next-token loss over the held-out last 10% of the tokens (never trained on),
in non-overlapping windows of --seq-len.

    python bench/quality_linear.py                    # ~5 minutes on 2 CPU cores
    python bench/quality_linear.py --steps 1000 --models mla hybrid
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from smolds import ModelConfig, Transformer

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "tinystories-valid-prefix.txt"
MODELS = {
    "mla": {"attention_pattern": ["mla"]},
    "linear": {"attention_pattern": ["linear"]},
    "hybrid": {"attention_pattern": ["linear", "linear", "linear", "mla"]},
    "latent": {"attention_pattern": ["linear"], "linear_kv_rank": 16},
}


def tiny_config(**changes) -> ModelConfig:
    """The tiny preset (width 128, 4 layers, 4 heads) with a dense FFN, so only attention differs."""
    return ModelConfig.from_preset("tiny").replace(n_routed_experts=0, linear_head_dim=32, linear_chunk_size=64,
                                                   **changes)


def tokenize(text: str, vocab_size: int) -> torch.Tensor:
    """Byte-level BPE trained on the text's first 90% (data_prep's when present), then the whole text."""
    paragraphs = text.split("\n\n")
    train_part = paragraphs[: int(0.9 * len(paragraphs))]
    try:
        from data_prep.tokenizer import train_bpe
    except ImportError:  # data_prep not installed: the same kind of tokenizer, inline
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        def train_bpe(docs, vocab_size):
            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
            tok.train_from_iterator(docs, trainer=trainer)
            return tok

    tok = train_bpe(train_part, vocab_size=vocab_size)
    ids = [i for enc in tok.encode_batch([p + "\n\n" for p in paragraphs]) for i in enc.ids]
    return torch.tensor(ids, dtype=torch.long)


def train_and_eval(cfg: ModelConfig, train_ids, val_ids, args) -> tuple[float, float, float]:
    """Returns (final training loss averaged over the last 20 steps, validation loss, seconds)."""
    torch.manual_seed(args.seed)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    data = torch.Generator().manual_seed(args.seed)  # the same windows, in the same order, for every model
    losses, t0 = [], time.perf_counter()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch,), generator=data)
        window = torch.stack([train_ids[s : s + args.seq_len + 1] for s in starts.tolist()])
        loss = model(window[:, :-1], targets=window[:, 1:]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    n = (len(val_ids) - 1) // args.seq_len
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, args.batch):
            rows = range(i, min(i + args.batch, n))
            window = torch.stack([val_ids[r * args.seq_len : (r + 1) * args.seq_len + 1] for r in rows])
            total += model(window[:, :-1], targets=window[:, 1:]).lm_loss.item() * len(rows)
    return sum(losses[-20:]) / len(losses[-20:]), total / n, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="1 is steadier on a shared machine")
    p.add_argument("--corpus", type=Path, default=CORPUS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    ids = tokenize(args.corpus.read_text(), args.vocab_size)
    split = int(0.9 * len(ids))
    train_ids, val_ids = ids[:split], ids[split:]
    print(f"{len(train_ids):,} training tokens, {len(val_ids):,} validation tokens; {args.steps} steps of "
          f"{args.batch}x{args.seq_len} = {args.steps * args.batch * args.seq_len:,} tokens per model")
    print("| model | attention | params | train loss (last 20) | val loss | val ppl | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        cfg = tiny_config(**MODELS[name])
        train_loss, val_loss, seconds = train_and_eval(cfg, train_ids, val_ids, args)
        pattern = ", ".join(cfg.attention_pattern) + (f" (rank {cfg.linear_kv_rank})" if name == "latent" else "")
        n_params = Transformer(cfg).num_parameters()
        print(f"| {name} | {pattern} | {n_params:,} | {train_loss:.3f} | {val_loss:.3f} | {math.exp(val_loss):.1f} "
              f"| {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
