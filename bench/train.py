"""Training-step speed: smolds vs transformers, side by side in one process, interleaved.

Rows (one training step each = forward + backward + optimizer step on the same random micro-batch):
- `ours`            our Transformer, eager; AdamW (torch's fused kernel, for every row), bf16 = autocast over fp32 weights;
- `ours-compiled`   the same with every block `torch.compile`d (--compile), as `--train.compile true` runs it;
- `ours-ckpt`       the eager row with activation checkpointing (`Transformer.set_activation_checkpointing`,
                    --checkpointing): what the memory saving costs;
- `ours-compiled-ckpt` compiled blocks with activation checkpointing (--compiled-checkpointing), as
                    `--train.compile true --train.activation_checkpointing true` runs them;
- `ours-unfused-ce` the eager row with the loss taken as before smolds/model/loss.py, F.cross_entropy over
                    the full fp32 logits (--unfused-ce): what the fused head + cross-entropy gains;
- `hf-dsv3[...]`    transformers' DeepseekV3ForCausalLM with our weights (exported with `export_hf`, so the
                    routing is the same), one row per --hf-dsv3 ATTN:EXPERTS; the first is the ratios' reference;
- `hf-llama`        transformers' LlamaForCausalLM at the dense reference config (smollm2-135m for the 135m
                    preset; for tiny/mid a GQA model of the same width and depth with FFN width = the MoE's
                    active FFN width), the "what SmolLM2 costs" row;
- `ds-engine`       our model in the DeepSpeed engine built exactly as the trainer builds it (Engine,
                    param_groups, deepspeed_config; ZeRO-0, world of 1): engine(x), engine.backward, engine.step;
- `ds-trainer`      the same engine with the rest of the loop's per-step work: the finite-loss check,
                    the stage-0 grad-norm, the router-bias update and the loss reduction.
Our rows also run the loss-free bias update after each step (`RoutingStats.end_step`), as the trainer does.

Timing: `--repeats` rounds; in each round every row runs `--steps` steps back to back (synchronized), rows in
turn, so a noisy neighbour hurts all rows alike; the table gives the median round's tokens/s and the min-max,
and tokens per second of process CPU time (tok/CPU-s). On a shared CPU box use `--threads 1` and read
tok/CPU-s: with two OpenMP threads on oversubscribed cores a step can take 10-20x longer (threads wait for a
descheduled partner), and wall-clock numbers then measure the neighbours, not the code.
Memory: on CUDA the row's own bytes (weights, optimizer state) plus the peak of one step above what was
allocated before it (torch.cuda.max_memory_allocated); on CPU an estimate: weights + gradients + optimizer
state + the unique storages autograd saved for backward in one step (no allocator peak exists there).
MFU (CUDA): tokens/s x `Transformer.flops_per_token(seq)` / 989 TFLOP/s (H100 dense bf16).

    python bench/train.py --preset tiny --threads 1 --compile --hf-dsv3 sdpa:grouped_mm,sdpa:eager   # ~3 min
    python bench/train.py --preset mid --threads 1 --steps 2 --compile --hf-dsv3 sdpa:grouped_mm,sdpa:eager
    python bench/train.py --preset smollm2-deepseek-135m --device cuda --dtype bf16 --batch 8 --seq 2048 \\
        --compile --hf-dsv3 eager:eager,sdpa:grouped_mm --json out.json          # what bench/gpu_check.sh runs
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from presets import model_config  # noqa: E402  (bench/ is on sys.path when run as a script)

from smolds import ModelConfig, Transformer  # noqa: E402
from smolds.model.router import RoutingStats  # noqa: E402

PEAK_FLOPS = 989e12  # H100 SXM dense bf16
LR = 1e-4  # small: random tokens, we only time the step

DEFAULT_SHAPE = {"tiny": (8, 256), "mid": (4, 512), "smollm2-deepseek-135m": (8, 2048)}


def dense_reference(preset: str, cfg: ModelConfig) -> ModelConfig:
    """SmolLM2-135M for the 135m preset; otherwise a Llama of the same width/depth whose FFN width is the
    MoE's active FFN width (top-k experts + shared experts)."""
    if preset == "smollm2-deepseek-135m":
        return ModelConfig.from_preset("smollm2-135m")
    heads = cfg.num_attention_heads
    kv = cfg.num_key_value_heads if heads % cfg.num_key_value_heads == 0 else heads
    active = cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
    return cfg.replace(attention_pattern=["gqa"], ffn_pattern=None, n_routed_experts=0, n_shared_experts=0,
                       num_key_value_heads=kv, head_dim=cfg.hidden_size // heads, intermediate_size=active,
                       rope_interleave=False)


# ------------------------------------------------------------------------------------------------- rows
@dataclass
class Row:
    name: str
    step: Callable[[], None]
    flops_per_token: float
    owner: str  # rows that share weights (ds-engine, ds-trainer) share an owner
    static_bytes: float = 0.0  # weights + optimizer state (+ engine buffers) held between steps
    peak_bytes: float | None = None  # static + the peak of one step above what was allocated before it
    saved_bytes: float | None = None  # CPU: tensors saved for backward in one step (the estimate's activations)
    note: str = ""
    rates: list[float] = field(default_factory=list)  # tokens/s per round (wall clock)
    cpu_rates: list[float] = field(default_factory=list)  # tokens per second of process CPU time per round


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.bf16 = args.dtype == "bf16"
        self.B, self.T = args.batch, args.seq
        self.cfg = model_config(args.preset)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.cfg.vocab_size, (self.B, self.T + 1), generator=g)
        self.x, self.y = ids[:, :-1].contiguous().to(self.device), ids[:, 1:].contiguous().to(self.device)
        self.rows: list[Row] = []

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def adamw(self, params):
        from smolds.train.engine import param_groups

        groups = param_groups(params, weight_decay=0.01, ep=False)
        return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), fused=True)  # as the trainer

    # ----------------------------------------------------------------- builders
    def add_ours(self, compiled: bool, variant: str = ""):
        base = self._alloc()
        torch.manual_seed(0)
        model = Transformer(self.cfg).to(self.device).train().set_activation_checkpointing(variant == "ckpt")
        model.compile_blocks(compiled)  # as --train.compile true: one graph per block kind, reused across layers
        opt = self.adamw(model)

        def step():
            with self.autocast():
                if variant == "unfused-ce":  # logits first, then the loss over them
                    out = model(self.x)
                    loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), self.y.flatten())
                    loss = loss if out.balance_loss is None else loss + out.balance_loss
                else:
                    loss = model(self.x, targets=self.y).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            RoutingStats(model, self.cfg).end_step()

        name = "ours" + ("-compiled" if compiled else "") + (f"-{variant}" if variant else "")
        self._add(Row(name, step, model.flops_per_token(self.T), name), [model], opt,
                  warmup=self.args.warmup + (3 if compiled else 0), base=base)

    def _hf_from_ours(self, cfg: ModelConfig, arch: str, **kwargs):
        from transformers import AutoModelForCausalLM

        from smolds.interop.hf import export_hf

        torch.manual_seed(0)
        src = Transformer(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            export_hf(src, Path(tmp) / "hf", arch=arch)
            hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32, **kwargs)
        hf.config.use_cache = False
        return hf.to(self.device).train(), src.flops_per_token(self.T)

    def add_hf(self, arch: str, attn: str, experts: str | None = None):
        if arch == "llama":
            cfg, name = dense_reference(self.args.preset, self.cfg), f"hf-llama[attn={attn}]"
            kwargs = {"attn_implementation": attn}
        else:
            cfg, name = self.cfg, f"hf-dsv3[attn={attn},experts={experts}]"
            kwargs = {"attn_implementation": attn, "experts_implementation": experts}
        base = self._alloc()
        note = ""
        try:
            hf, fpt = self._hf_from_ours(cfg, arch, **kwargs)
        except (TypeError, ValueError, KeyError) as e:  # an older transformers without experts_implementation
            if arch == "llama":
                raise
            note = f"experts_implementation refused ({type(e).__name__}); "
            hf, fpt = self._hf_from_ours(cfg, arch, attn_implementation=attn)
        if arch != "llama":
            note += f"experts ran as {getattr(hf.config, '_experts_implementation', 'eager (no option)')}"
        opt = self.adamw(hf)

        def step():
            with self.autocast():
                out = hf(input_ids=self.x, labels=self.x, use_cache=False)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        self._add(Row(name, step, fpt, name, note=note), [hf], opt, warmup=self.args.warmup, base=base)

    def add_deepspeed(self, rows: list[str]):
        """The engine as the trainer builds it (smolds/train/engine.py: ZeRO-0, one rank); both DS rows share it."""
        from smolds.train import parallel
        from smolds.train.config import RunConfig
        from smolds.train.engine import Engine

        base = self._alloc()
        env = parallel.init(self.device.type)
        run = RunConfig.from_dict({"model": self.cfg.to_dict(), "train": {
            "micro_batch": self.B, "seq_len": self.T, "device": self.device.type, "dtype": self.args.dtype,
            "lr": LR}})
        engine = Engine(run, self.cfg, env, self.bf16)
        model, ds = engine.model, engine.ds
        routing = RoutingStats(model, self.cfg)
        fpt = model.flops_per_token(self.T)
        dev = env.device

        def engine_step():
            out = ds(self.x, targets=self.y)
            ds.backward(out.loss)
            ds.step()
            routing.end_step()

        def trainer_step():  # the loop's train_step at grad_accum 1 (smolds/train/loop.py), without logging
            loss, _ = engine.micro_step(self.x, self.y, LR, False)
            routing.end_step()
            float(parallel.all_reduce_(torch.stack([loss]).mean().to(dev)))

        note = f"ZeRO-{run.deepspeed.zero_stage}, {type(ds.optimizer).__name__}"
        steps = {"ds-engine": engine_step, "ds-trainer": trainer_step}
        for name in rows:
            self._add(Row(name, steps[name], fpt, "ds", note=note), [model], ds.optimizer,
                      warmup=self.args.warmup, base=base)

    # --------------------------------------------------------------- accounting
    def _alloc(self) -> float:
        return torch.cuda.memory_allocated() if self.cuda else 0.0

    def _add(self, row: Row, modules, opt, warmup: int, base: float, estimate: bool = True):
        """Warm the row up and take its memory. `base`: memory allocated before its weights were built."""
        shared = next((r for r in self.rows if r.owner == row.owner), None)
        t0 = time.perf_counter()
        for _ in range(warmup):
            row.step()
        self.sync()
        t_warm = time.perf_counter() - t0
        if self.cuda:
            row.static_bytes = shared.static_bytes if shared else torch.cuda.memory_allocated() - base
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            row.step()
            self.sync()
            row.peak_bytes = row.static_bytes + torch.cuda.max_memory_allocated() - before
        elif estimate:
            row.static_bytes, row.saved_bytes = cpu_static_bytes(modules, opt), saved_activation_bytes(row.step, modules)
            row.peak_bytes = row.static_bytes + row.saved_bytes
            row.note = "; ".join(filter(None, [row.note, f"saved for backward {row.saved_bytes / 2**20:,.1f} MiB"]))
        self.rows.append(row)
        mem = f", memory {row.peak_bytes / 2**30:.2f} GiB" if row.peak_bytes is not None else ""
        mem += f" (saved for backward {row.saved_bytes / 2**20:,.1f} MiB)" if row.saved_bytes is not None else ""
        print(f"built {row.name}: {warmup} warm-up steps in {t_warm:.1f} s{mem}", file=sys.stderr, flush=True)

    def attempt(self, name: str, build, *args):
        """Build and warm up one row; a row that fails (an option this transformers lacks, out of memory)
        is reported and skipped, so that a one-shot GPU run still measures the others."""
        try:
            build(*args)
        except Exception as e:  # noqa: BLE001 - any failure of one row
            msg = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
            print(f"row {name} failed: {msg}", file=sys.stderr, flush=True)
            self.failed.append((name, msg))
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def run(self):
        a = self.args
        self.failed: list[tuple[str, str]] = []
        self.attempt("ours", self.add_ours, False)
        if a.compile:
            self.attempt("ours-compiled", self.add_ours, True)
        if a.checkpointing:
            self.attempt("ours-ckpt", self.add_ours, False, "ckpt")
        if a.compiled_checkpointing:
            self.attempt("ours-compiled-ckpt", self.add_ours, True, "ckpt")
        if a.unfused_ce:
            self.attempt("ours-unfused-ce", self.add_ours, False, "unfused-ce")
        for spec in filter(None, a.hf_dsv3.split(",")):
            attn, _, experts = spec.partition(":")
            self.attempt(f"hf-dsv3[{spec}]", self.add_hf, "deepseek_v3", attn, experts or "eager")
        if a.llama_attn:
            self.attempt("hf-llama", self.add_hf, "llama", a.llama_attn)
        ds_rows = [r for r in ("ds-engine", "ds-trainer") if r in a.deepspeed.split(",")]
        if ds_rows:
            self.attempt("ds", self.add_deepspeed, ds_rows)
        self.load = [os.getloadavg()]
        for i in range(a.repeats):
            for row in self.rows:
                self.sync()
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(a.steps):
                    row.step()
                self.sync()
                tokens = a.steps * self.B * self.T
                row.rates.append(tokens / (time.perf_counter() - t0))
                row.cpu_rates.append(tokens / max(time.process_time() - c0, 1e-9))
            self.load.append(os.getloadavg())
            print(f"round {i + 1}/{a.repeats} (load {self.load[-1][0]:.2f}): "
                  + ", ".join(f"{r.name} {r.rates[-1]:,.0f}" for r in self.rows), file=sys.stderr, flush=True)


def cpu_static_bytes(modules, opt) -> float:
    """Weights + gradients + optimizer state tensors (each storage once)."""
    seen, total = set(), 0
    tensors = [p for m in modules for p in m.parameters()]
    tensors += [p.grad for p in tensors if p.grad is not None]
    inner = getattr(opt, "optimizer", opt)  # DeepSpeed wraps the torch optimizer
    tensors += [v for st in inner.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    grads_missing = [p for m in modules for p in m.parameters() if p.requires_grad and p.grad is None]
    total += sum(p.numel() * p.element_size() for p in grads_missing)  # freed between steps, held during
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def saved_activation_bytes(step, modules) -> float:
    """Bytes of the unique non-parameter storages autograd saves for backward during one step; with
    activation checkpointing, what is saved outside the checkpointed blocks plus the inputs they keep for
    their recompute (inside them, torch.utils.checkpoint's own hooks replace ours)."""
    params = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    def keep_input(module, args):
        pack(args[0])

    hooks = [b.register_forward_pre_hook(keep_input) for m in modules for b in m.modules()
             if getattr(b, "activation_checkpointing", False)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    for h in hooks:
        h.remove()
    return float(sum(seen.values()))


# ---------------------------------------------------------------------------------------------- report
def versions() -> str:
    import transformers

    out = f"torch {torch.__version__}, transformers {transformers.__version__}"
    try:
        import deepspeed

        out += f", deepspeed {deepspeed.__version__}"
    except ImportError:
        out += ", deepspeed absent"
    return out


def report(bench: Bench) -> dict:
    a, rows = bench.args, bench.rows
    dev = torch.cuda.get_device_name() if bench.cuda else f"CPU ({torch.get_num_threads()} threads)"
    cfg = bench.cfg
    load = bench.load
    lines = [f"# bench/train.py --preset {a.preset} --device {a.device} --dtype {a.dtype} --batch {bench.B} "
             f"--seq {bench.T} --steps {a.steps} --repeats {a.repeats}{' --compile' if a.compile else ''}",
             f"{datetime.date.today()} on {dev}; {versions()}",
             f"model: {cfg.num_hidden_layers} layers, d {cfg.hidden_size}, {cfg.n_routed_experts} experts top-"
             f"{cfg.num_experts_per_tok} + {cfg.n_shared_experts} shared; "
             f"load average (1 min) {load[0][0]:.2f} before timing, {load[-1][0]:.2f} after "
             f"(per round: {', '.join(f'{x[0]:.2f}' for x in load[1:])})", ""]
    ref = next((r for r in rows if r.name.startswith("hf-dsv3")), None)
    ours = next((r for r in rows if r.name == "ours"), rows[0] if rows else None)
    mem_kind = "peak GiB" if bench.cuda else "est. GiB"
    lines.append(f"| row | tok/s (median) | min-max | ms/step | x HF-DSv3 | x ours | tok/CPU-s | x HF-DSv3 (CPU-s) "
                 f"| {mem_kind} | MFU | note |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    result = {"args": vars(a), "device": dev, "versions": versions(), "date": str(datetime.date.today()),
              "loadavg": load, "rows": {}}
    for r in rows:
        med = statistics.median(r.rates)
        ms = 1000 * bench.B * bench.T / med
        mfu = med * r.flops_per_token / PEAK_FLOPS if bench.cuda else None
        vs_ref = med / statistics.median(ref.rates) if ref else None
        vs_ours = med / statistics.median(ours.rates)  # ours: the eager row (the first row if it failed)
        cpu = statistics.median(r.cpu_rates)
        cpu_vs_ref = cpu / statistics.median(ref.cpu_rates) if ref else None
        mem = r.peak_bytes / 2**30 if r.peak_bytes is not None else None
        lines.append(f"| {r.name} | {med:,.0f} | {min(r.rates):,.0f}-{max(r.rates):,.0f} | {ms:,.1f} | "
                     f"{f'{vs_ref:.2f}' if vs_ref else '-'} | {vs_ours:.2f} | {cpu:,.0f} | "
                     f"{f'{cpu_vs_ref:.2f}' if cpu_vs_ref else '-'} | {f'{mem:.2f}' if mem else '-'} | "
                     f"{f'{mfu:.1%}' if mfu is not None else '-'} | {r.note} |")
        result["rows"][r.name] = {"tok_s": med, "rates": r.rates, "ms_per_step": ms, "x_hf_dsv3": vs_ref,
                                  "x_ours": vs_ours, "tok_per_cpu_s": cpu, "cpu_rates": r.cpu_rates, "mem_gib": mem, "mfu": mfu,
                                  "flops_per_token": r.flops_per_token, "note": r.note,
                                  "saved_for_backward_mib": r.saved_bytes / 2**20 if r.saved_bytes is not None else None}
    for name, msg in bench.failed:
        lines.append(f"| {name} | failed | | | | | | | | | {msg} |")
    result["failed"] = dict(bench.failed)
    print("\n".join(lines), flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "mid", "smollm2-deepseek-135m"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=3, help="timed steps per row per round")
    p.add_argument("--repeats", type=int, default=3, help="rounds (rows interleaved within each)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="add a row with every block torch.compile'd")
    p.add_argument("--checkpointing", action="store_true", help="add a row with activation checkpointing")
    p.add_argument("--compiled-checkpointing", action="store_true",
                   help="add a row with compiled blocks and activation checkpointing")
    p.add_argument("--unfused-ce", action="store_true",
                   help="add a row whose loss is F.cross_entropy over the full logits (the pre-loss.py way)")
    p.add_argument("--hf-dsv3", default="sdpa:eager",
                   help="transformers DeepseekV3 rows as ATTN:EXPERTS (attn_implementation, experts_implementation), "
                        "comma-separated, e.g. eager:eager,sdpa:grouped_mm; the first is the ratios' reference")
    p.add_argument("--llama-attn", default="sdpa", help="attn_implementation of the dense Llama row ('' for none)")
    p.add_argument("--deepspeed", default="ds-engine,ds-trainer", help="DeepSpeed rows ('' for none)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    B, T = DEFAULT_SHAPE[args.preset]
    args.batch, args.seq = args.batch or B, args.seq or T
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bench = Bench(args)
    bench.run()
    result = report(bench)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
