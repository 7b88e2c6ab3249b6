"""Cost against sequence length: MLA (quadratic), linear attention and KDA (linear), and their 3:1 hybrids.

Two tables, printed as markdown (docs/seqlen.md holds a run of them):
1. Training: forward + backward time (wall-clock, and the process's CPU time, steadier on a shared machine at
   1 thread) and peak memory *per token* for one sequence of T tokens, T = 512 .. 16k,
   on a small model (the tiny preset's width and depth with a dense FFN). Each point runs in a fresh process so
   that its peak is its own: on CPU the peak is the process's resident high-water mark (VmHWM) minus its
   resident size just before the step; on CUDA, torch.cuda.max_memory_allocated minus the memory before.
   A kind's longer lengths are skipped once one of its points takes more than --max-seconds or its peak
   passes --max-gib (the quadratic layers' next point would need about 4x as much).
2. Decoding: bytes held per sequence (cache + recurrent state) against context length, for the small model
   and the 135M presets in bf16, counted from the real caches built on the meta device (nothing allocated),
   and each model's bytes at the longest context as a share of its MLA-only counterpart's.

    python bench/seqlen.py                              # all lengths and kinds, CPU, ~20 minutes on one shared core
    python bench/seqlen.py --lengths 512 2048 --kinds linear mla --device cuda
    python bench/seqlen.py --kinds linear kda kda_hybrid --figure seqlen.png   # + a figure of both tables
    python bench/seqlen.py --decode-only                 # the decode table alone, in seconds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from smolds import ModelConfig, Transformer

KINDS = {  # the attention of every kind; kda_hybrid is Kimi Linear's stack (its MLA without RoPE)
    "mla": {"attention_pattern": ["mla"]},
    "linear": {"attention_pattern": ["linear"]},
    "hybrid": {"attention_pattern": ["linear", "linear", "linear", "mla"]},
    "kda": {"attention_pattern": ["kda"]},
    "kda_hybrid": {"attention_pattern": ["kda", "kda", "kda", "mla"], "mla_use_nope": True},
}


def small_config(kind: str, max_len: int) -> ModelConfig:
    """The tiny preset's shape (width 128, 4 layers, 4 heads) with a dense FFN, so only attention differs."""
    return ModelConfig.from_preset("tiny").replace(
        n_routed_experts=0, max_position_embeddings=max_len, linear_head_dim=32, linear_chunk_size=64, **KINDS[kind])


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_point(kind: str, T: int, device: str, repeats: int, threads: int) -> dict:
    """Training-step time at length T (best of `repeats` steps) and the first step's peak memory above the
    memory held before it (weights and gradients excluded); runs in a process of its own."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Transformer(small_config(kind, max(T, 64))).to(device)
    step = lambda ids: model(ids, targets=ids).loss.backward()
    step(torch.randint(0, 4096, (1, 64), device=device))  # warm up code paths, allocate .grad
    ids = torch.randint(0, 4096, (1, T), device=device)
    times, cpu_times = [], []
    for i in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = _rss_kb("VmRSS") * 1024
        t0, c0 = time.perf_counter(), time.process_time()
        step(ids)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        if i == 0:  # the first step at this length sets the peak
            peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _rss_kb("VmHWM") * 1024) - before
    return {"kind": kind, "T": T, "seconds": min(times), "cpu_seconds": min(cpu_times), "peak_bytes": peak}


def training_table(kinds, lengths, device, repeats, threads, max_seconds, max_gib) -> list[dict]:
    rows = []
    for kind in kinds:
        for T in lengths:
            cmd = [sys.executable, __file__, "--point", kind, str(T), "--device", device,
                   "--repeats", str(repeats), "--threads", str(threads)]
            row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            rows.append(row)
            print(f"# {kind:6s} T={T:6d}  {row['seconds']:.2f} s  peak {row['peak_bytes'] / 2**20:.0f} MiB",
                  file=sys.stderr)
            if row["seconds"] > max_seconds or row["peak_bytes"] > max_gib * 2**30:
                break  # the next length would take ~4x the time (and memory) in a quadratic layer
    return rows


def print_training(rows, kinds, lengths):
    by = {(r["kind"], r["T"]): r for r in rows}
    print("| tokens | " + " | ".join(f"{k} us/tok" for k in kinds) + " | " + " | ".join(f"{k} CPU us/tok" for k in kinds)
          + " | " + " | ".join(f"{k} KiB/tok" for k in kinds) + " |")
    print("|---:|" + "---:|" * (3 * len(kinds)))
    us = lambda r: f"{r['seconds'] / r['T'] * 1e6:.0f}"
    cpu_us = lambda r: f"{r['cpu_seconds'] / r['T'] * 1e6:.0f}"
    kib = lambda r: f"{r['peak_bytes'] / r['T'] / 1024:.1f}"
    for T in lengths:
        cells = [fmt(by[(k, T)]) if (k, T) in by else "skipped" for fmt in (us, cpu_us, kib) for k in kinds]
        print(f"| {T} | " + " | ".join(cells) + " |")


def decode_bytes(cfg: ModelConfig, context: int, dtype=torch.bfloat16) -> int:
    """Bytes one sequence holds after `context` tokens: per-token caches times context, plus constant states."""
    cfg = cfg.replace(max_position_embeddings=max(context, cfg.max_position_embeddings))
    with torch.device("meta"):
        model = Transformer(cfg)
    cache = model.new_cache(1, context, device="meta", dtype=dtype)
    return cache.bytes_per_token() * context + sum(getattr(c, "state_bytes", lambda: 0)() for c in cache.layers)


def decode_models() -> dict[str, ModelConfig]:
    preset = ModelConfig.from_preset("smollm2-deepseek-135m")
    models = {f"small {k}": small_config(k, 64) for k in KINDS}
    return models | {"135M mla": preset, "135M hybrid": ModelConfig.from_preset("smollm2-deepseek-hybrid-135m"),
                     "135M linear": preset.replace(attention_pattern=["linear"]),
                     "135M kimi": ModelConfig.from_preset("smollm2-kimi-135m"),
                     "135M kda": preset.replace(attention_pattern=["kda"])}


def print_decode(contexts):
    models = decode_models()
    print("| context | " + " | ".join(f"{name} MiB" for name in models) + " |")
    print("|---:|" + "---:|" * len(models))
    for n in contexts:
        print(f"| {n} | " + " | ".join(f"{decode_bytes(cfg, n) / 2**20:.3f}" for cfg in models.values()) + " |")
    n = max(contexts)
    shares = {name: decode_bytes(cfg, n) / decode_bytes(models[name.split()[0] + " mla"], n)
              for name, cfg in models.items() if not name.endswith(" mla")}
    print(f"\nAt {n} tokens, as a share of the MLA-only model's bytes: "
          + ", ".join(f"{name} {share:.1%}" for name, share in shares.items()))


def plot(rows, kinds, contexts, path: str) -> None:
    """Left (with training rows): CPU time per token against T per kind. Right: decode MiB against context for
    the 135M models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if rows else 1, figsize=(11 if rows else 5.5, 4), squeeze=False)
    if rows:
        ax = axes[0, 0]
        for k in kinds:
            pts = sorted((r["T"], r["cpu_seconds"] / r["T"] * 1e6) for r in rows if r["kind"] == k)
            ax.plot(*zip(*pts), "o-", label=k)
        ax.set(xscale="log", xlabel="tokens in the sequence", ylabel="CPU us per token (forward + backward)",
               title="training step, small model, 1 thread")
        ax.set_ylim(bottom=0)
        ax.legend()
    ax = axes[0, -1]
    for name, cfg in decode_models().items():
        if name.startswith("135M"):
            ax.plot(contexts, [decode_bytes(cfg, n) / 2**20 for n in contexts], "o-", label=name)
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="MiB per sequence (bf16 caches)",
           title="decode state")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--lengths", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--contexts", nargs="+", type=int, default=[512, 2048, 8192, 32768, 131072])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per point (the best is kept)")
    p.add_argument("--threads", type=int, default=1, help="1 is steadier on a shared machine")
    p.add_argument("--max-seconds", type=float, default=20.0, help="skip a kind's longer lengths past this")
    p.add_argument("--max-gib", type=float, default=3.0, help="skip a kind's longer lengths past this peak")
    p.add_argument("--decode-only", action="store_true", help="print the decode table only (no training points)")
    p.add_argument("--figure", help="also draw the tables into this PNG")
    p.add_argument("--point", nargs=2, metavar=("KIND", "T"), help=argparse.SUPPRESS)  # internal: one point
    args = p.parse_args()
    if args.point:
        print(json.dumps(measure_point(args.point[0], int(args.point[1]), args.device, args.repeats, args.threads)))
        return
    rows = []
    if not args.decode_only:
        rows = training_table(args.kinds, args.lengths, args.device, args.repeats, args.threads, args.max_seconds,
                              args.max_gib)
        print(f"\nTraining step (forward + backward), batch 1, {args.device}, {args.threads} threads:\n")
        print_training(rows, args.kinds, args.lengths)
    print("\nDecode memory per sequence (caches in bf16; linear-attention states are fp32):\n")
    print_decode(args.contexts)
    if args.figure:
        plot(rows, args.kinds, args.contexts, args.figure)


if __name__ == "__main__":
    main()
