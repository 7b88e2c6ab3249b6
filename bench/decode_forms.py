"""A/B of the MoE forms a CPU decode step can take at N*K > E, in one process: the host-synced per-expert loop
(`experts_loop`; under torch.compile the opaque `smolds::experts_loop` op) against the sorted grouped dispatch
(`MoE.dispatch_local`, whose products run as `smolds::grouped_mm`). What `MoE.dispatch_decode` picks: the
loop eagerly, the grouped dispatch compiled.

Prints ms of process CPU per decode step (the forms in turns; best of --repeats rounds of --steps steps over a prefilled cache):
    python bench/decode_forms.py --preset mid --batch 8
    python bench/decode_forms.py --preset mid --batch 8 --eager
"""

from __future__ import annotations

import argparse
import time

import torch
from presets import model_config  # bench/presets.py: smolds' presets + mid

import smolds.model.moe as moe
from smolds import Transformer
from smolds.infer.generate import static_cache


def _loop(self, x, idx, weight):
    e = self.experts
    fn = moe._experts_loop_op if torch.compiler.is_compiling() else moe.experts_loop
    return fn(x, idx, weight, e.gate_proj, e.up_proj, e.down_proj)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mid")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--eager", action="store_true", help="time the eager cached step instead of the compiled one")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(model_config(args.preset)).eval()
    B, cfg = args.batch, model.config
    if B * cfg.num_experts_per_tok <= cfg.n_routed_experts:
        p.error(f"B={B}: N*K <= E, where the step takes the gathered form; pick a larger --batch")
    forms = {"loop": _loop, "grouped": lambda self, x, idx, weight: self.dispatch_local(x, idx, weight)}
    ids, tok = torch.randint(0, 1000, (B, 32)), torch.randint(0, 1000, (B, 1))
    best, outs = {}, {}
    # Dynamo keeps its graphs per code object and does not guard on the patched method, so each form gets a
    # step function of its own code object.
    steps = {"loop": lambda m, t, c: Transformer.decode_step(m, t, c),
             "grouped": lambda m, t, c: Transformer.decode_step(m, t, c)}
    for form in forms:
        steps[form] = (lambda m, t, c: m(t, cache=c, last_only=True).logits[:, -1]) if args.eager else \
            torch.compile(steps[form], dynamic=False, fullgraph=True)
    with torch.inference_mode():
        for _ in range(args.repeats):  # the forms in turns
            for form, fn in forms.items():
                moe.MoE.dispatch_decode, step = fn, steps[form]
                cache = model.new_cache(B, 64) if args.eager else static_cache(model, B, 64, "default")
                model(ids, cache=cache, last_only=True)
                outs[form] = step(model, tok, cache)  # the first call of each form compiles
                t = time.process_time()
                for _ in range(args.steps):
                    step(model, tok, cache)
                    if args.eager:
                        cache.length -= 1  # stay within the cache
                best[form] = min(best.get(form, 1e9), (time.process_time() - t) / args.steps * 1e3)
    same = torch.allclose(outs["loop"], outs["grouped"], atol=1e-4, rtol=1e-4)
    print(f"{args.preset} B={B} {'eager' if args.eager else 'compiled'}, {args.threads} thread(s): "
          + ", ".join(f"{k} {v:.2f} ms/step" for k, v in best.items())
          + f"; loop/grouped {best['loop'] / best['grouped']:.2f}x; same logits: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
