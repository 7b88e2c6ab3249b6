"""Decode speed and cache size: smolds' generation vs transformers' `generate` on the same model, side by side.

The model is built from a preset with random weights, exported with `smolds.interop.hf.export_hf` (DeepseekV3
for MLA/MoE presets, Llama for all-GQA ones) and loaded by transformers, so both run the same weights.
For every batch size B, both greedy-decode the same random prompts:

- decode tok/s: B * (new - 1) / (time after the first new token): the steady state, prefill excluded
  (transformers' first-token time is taken by a logits processor, so both are cut at the same point);
- end-to-end tok/s: B * new / total time, prefill included;
- cache bytes per token: ours `cache.bytes_per_token()`; transformers' the bytes of every tensor its
  DynamicCache holds after the prefill, divided by B * prompt length;
- the ratio ours / transformers, and how many greedy tokens of row 0 agree (fp32 should agree).

CPU (default, ~1-2 min on 2 cores):   python bench/decode.py
GPU (one call):  python bench/decode.py --device cuda --dtype bfloat16 --prompt-len 512 --new-tokens 128 \\
                     --batch-sizes 1,8,32
(Reference from the issue: on an H100 at smollm2-deepseek-135m, transformers gives 6.3 tok/s at B=1 and
278 tok/s at B=32 with 512 prompt + 128 new tokens.)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from smolds import ModelConfig, Transformer
from smolds.generate import generate_tokens
from smolds.interop.hf import export_hf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_ours(model, prompts: torch.Tensor, new: int, device) -> dict:
    _sync(device)
    t0 = time.perf_counter()
    t_first, tokens = None, []
    for step in generate_tokens(model, prompts.tolist(), new, temperature=0):
        if t_first is None:
            t_first = time.perf_counter()
        tokens.append(step[0])
    _sync(device)
    total = time.perf_counter() - t0
    return {"total": total, "first": t_first - t0, "tokens": tokens}


class _FirstStep:
    """A logits processor that notes when transformers' first forward (the prefill) has finished."""

    def __init__(self):
        self.t_first = None

    def __call__(self, input_ids, scores):
        if self.t_first is None:
            self.t_first = time.perf_counter()
        return scores


@torch.inference_mode()
def run_hf(hf, prompts: torch.Tensor, new: int, device) -> dict:
    from transformers import LogitsProcessorList

    first = _FirstStep()
    _sync(device)
    t0 = time.perf_counter()
    out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new, min_new_tokens=new,
                      do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([first]))
    _sync(device)
    total = time.perf_counter() - t0
    return {"total": total, "first": first.t_first - t0, "tokens": out[0, prompts.shape[1]:].tolist()}


@torch.inference_mode()
def hf_cache_bytes_per_token(hf, prompts: torch.Tensor) -> int:
    """Bytes of every tensor transformers' cache holds after a prefill, per (row, token)."""
    out = hf(prompts, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total // prompts.numel()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smollm2-deepseek-135m")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--attn", default="sdpa", help="transformers attn_implementation")
    p.add_argument("--repeats", type=int, default=2, help="runs per side (alternating); the fastest counts")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = ModelConfig.from_preset(args.preset)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device=device, dtype=dtype).eval()
    arch = "llama" if set(cfg.attention_pattern) == {"gqa"} else "deepseek_v3"
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, Path(tmp) / "hf", arch=arch)
        hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=dtype, attn_implementation=args.attn)
    hf = hf.to(device).eval()
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.preset} ({model.num_parameters() / 1e6:.0f}M params) as {arch}, {args.dtype} on {name}; "
          f"prompt {args.prompt_len} + {args.new_tokens} new tokens, greedy; torch {torch.__version__}, "
          f"transformers {__import__('transformers').__version__} (attn {args.attn})")

    gen = torch.Generator().manual_seed(1)
    warm = torch.randint(0, cfg.vocab_size, (1, 8), generator=gen).to(device)
    run_ours(model, warm, 2, device)
    run_hf(hf, warm, 2, device)

    ours_bpt = model.new_cache(1, 1).bytes_per_token()
    rows = []
    for B in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=gen).to(device)
        runs_ours, runs_hf = [], []
        for _ in range(args.repeats):  # alternate, so that a noisy neighbour hurts both sides alike
            runs_ours.append(run_ours(model, prompts, args.new_tokens, device))
            runs_hf.append(run_hf(hf, prompts, args.new_tokens, device))
        ours = min(runs_ours, key=lambda r: r["total"] - r["first"])
        theirs = min(runs_hf, key=lambda r: r["total"] - r["first"])
        hf_bpt = hf_cache_bytes_per_token(hf, prompts)
        n = args.new_tokens
        dec = lambda r, B=B, n=n: B * (n - 1) / max(r["total"] - r["first"], 1e-9)
        agree = next((i for i, (a, b) in enumerate(zip(ours["tokens"], theirs["tokens"])) if a != b), n)
        rows.append((B, dec(ours), dec(theirs), B * n / ours["total"],
                     B * n / theirs["total"], ours_bpt, hf_bpt, agree))

    print(f"\n{'B':>3} | {'decode tok/s':^30} | {'end-to-end tok/s':^30} | {'cache bytes/token':^26} | greedy")
    print(f"{'':>3} | {'ours':>8} {'HF':>8} {'ours/HF':>10}   | {'ours':>8} {'HF':>8} {'ours/HF':>10}   | "
          f"{'ours':>7} {'HF':>7} {'ours/HF':>8}   | agree")
    for B, d_o, d_h, e_o, e_h, b_o, b_h, agree in rows:
        print(f"{B:>3} | {d_o:8.1f} {d_h:8.1f} {d_o / d_h:9.2f}x   | {e_o:8.1f} {e_h:8.1f} {e_o / e_h:9.2f}x   | "
              f"{b_o:7d} {b_h:7d} {b_o / max(b_h, 1):7.2f}x   | {agree}/{args.new_tokens}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
