"""Decode speed and cache size: smolds' generation vs transformers' `generate` on the same model, side by side.

The model is built from a preset with random weights, exported with `smolds.interop.hf.export_hf` (DeepseekV3
for MLA/MoE presets, Llama for all-GQA ones) and loaded by transformers, so both run the same weights.
For every batch size B, every row greedy-decodes the same random prompts, rows in turn (`--repeats` rounds;
the fastest run of each row counts):

- `ours`           `generate_tokens`, eager: the cached path (latent cache, absorbed MLA, few-token MoE path);
- `ours-compiled`  `generate_tokens(compile=True)`: the static-shape step (`Transformer.decode_step`) under
                   torch.compile, mode "default" on CPU and "reduce-overhead" (CUDA graphs) on CUDA (--compile,
                   on by default); its first call per B compiles, and that time is printed apart;
- `hf`             transformers' `generate` (its defaults: DynamicCache, attention `--attn`).

Columns:
- decode tok/s: B * (new - 1) / (time after the first new token): the steady state, prefill excluded
  (transformers' first-token time is taken by a logits processor, so both are cut at the same point);
- tok/CPU-s: the same per second of process CPU time. On a shared CPU box with `--threads 1`, neighbours
  barely move it: read the CPU ratios there, the wall ratios on a GPU;
- end-to-end tok/s: B * new / total time, prefill included;
- greedy: how many greedy tokens of row 0 agree with transformers' (fp32 should agree);
- cache bytes per token: ours `cache.bytes_per_token()`; transformers' the bytes of every tensor its
  DynamicCache holds after the prefill, divided by B * prompt length.

CPU (~1 min at tiny, ~6 min at smollm2-deepseek-135m with compilation):
    python bench/decode.py --threads 1 --preset tiny --repeats 3
    python bench/decode.py --threads 1 --repeats 2
GPU (what bench/gpu_check.sh runs):
    python bench/decode.py --device cuda --dtype bfloat16 --prompt-len 512 --new-tokens 128 --batch-sizes 1,32
(Reference from the issue: on an H100 at smollm2-deepseek-135m, transformers gives 6.3 tok/s at B=1 and
278 tok/s at B=32 with 512 prompt + 128 new tokens.)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from presets import model_config  # bench/presets.py: smolds' presets + mid

from smolds import Transformer
from smolds.infer.generate import compile_mode, generate_tokens
from smolds.interop.hf import export_hf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _clock(device) -> tuple[float, float]:
    """(wall, process CPU) seconds, after the device has finished its queued work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def _result(t0, first, end, tokens) -> dict:
    return {"total": end[0] - t0[0], "decode": end[0] - first[0], "decode_cpu": end[1] - first[1],
            "tokens": tokens}


def run_ours(model, prompts: torch.Tensor, new: int, device, compile: bool = False) -> dict:
    t0 = _clock(device)
    first, tokens = None, []
    for step in generate_tokens(model, prompts.tolist(), new, temperature=0, compile=compile):
        if first is None:
            first = _clock(device)
        tokens.append(step[0])
    return _result(t0, first, _clock(device), tokens)


class _FirstStep:
    """A logits processor that notes when transformers' first forward (the prefill) has finished."""

    def __init__(self, device):
        self.device, self.first = device, None

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first = _clock(self.device)
        return scores


@torch.inference_mode()
def run_hf(hf, prompts: torch.Tensor, new: int, device) -> dict:
    from transformers import LogitsProcessorList

    first = _FirstStep(device)
    t0 = _clock(device)
    out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new, min_new_tokens=new,
                      do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([first]))
    return _result(t0, first.first, _clock(device), out[0, prompts.shape[1]:].tolist())


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
    p.add_argument("--repeats", type=int, default=2, help="rounds (rows alternate); the fastest run counts")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="add the ours-compiled row (default on)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = model_config(args.preset)
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
          f"transformers {__import__('transformers').__version__} (attn {args.attn}); "
          f"compile mode {compile_mode(args.compile, device)}; load average {os.getloadavg()[0]:.2f}")

    gen = torch.Generator().manual_seed(1)
    warm = torch.randint(0, cfg.vocab_size, (1, 8), generator=gen).to(device)
    run_ours(model, warm, 2, device)
    run_hf(hf, warm, 2, device)

    rows = {"ours": lambda x, n: run_ours(model, x, n, device)}
    if args.compile:
        rows["ours-compiled"] = lambda x, n: run_ours(model, x, n, device, compile=True)
    rows["hf"] = lambda x, n: run_hf(hf, x, n, device)
    n = args.new_tokens
    ours_bpt = model.new_cache(1, 1).bytes_per_token()
    print(f"\n{'B':>3} {'row':<14}| {'decode tok/s':>12} {'tok/CPU-s':>10} {'x HF wall':>9} {'x HF CPU':>8} | "
          f"{'end-to-end tok/s':>16} {'x HF':>6} | greedy")
    for B in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=gen).to(device)
        compile_s = None
        if args.compile:  # the first call per shape compiles (and on CUDA records the graph)
            t0 = time.perf_counter()
            run_ours(model, prompts, n, device, compile=True)
            compile_s = time.perf_counter() - t0
        runs = {r: [] for r in rows}
        for _ in range(args.repeats):  # alternate, so that a noisy neighbour hurts every row alike
            for r, fn in rows.items():
                runs[r].append(fn(prompts, n))
        key = "decode_cpu" if device.type == "cpu" else "decode"
        best = {r: min(rs, key=lambda x: x[key]) for r, rs in runs.items()}
        rates = {r: (B * (n - 1) / max(x["decode"], 1e-9), B * (n - 1) / max(x["decode_cpu"], 1e-9),
                     B * n / x["total"]) for r, x in best.items()}  # decode wall, decode CPU, end-to-end
        hf_rate, hf_tokens = rates["hf"], best["hf"]["tokens"]
        for r, (wall, cpu, e2e) in rates.items():
            agree = next((i for i, (a, b) in enumerate(zip(best[r]["tokens"], hf_tokens)) if a != b), n)
            print(f"{B:>3} {r:<14}| {wall:12.1f} {cpu:10.1f} {wall / hf_rate[0]:8.2f}x {cpu / hf_rate[1]:7.2f}x | "
                  f"{e2e:16.1f} {e2e / hf_rate[2]:5.2f}x | {agree}/{n}")
        if compile_s is not None:
            steady = best["ours-compiled"]["total"]
            print(f"{B:>3} ours-compiled: first call {compile_s:.1f} s (compile + warm-up; a later call "
                  f"{steady:.2f} s)")
    print(f"cache bytes/token: ours {ours_bpt}, HF {hf_cache_bytes_per_token(hf, warm)}; "
          f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
