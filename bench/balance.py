"""Load balancing study: loss-free bias vs auxiliary losses vs nothing, and two dense baselines, on one MoE.

Trains, one run at a time, every balance mode (`loss_free`, `aux_loss`, `seq_aux`, `none`) with several seeds
on a fine-grained MoE shaped like the smollm2-deepseek-135m preset's routing (16 routed experts, top-4, two
shared experts, dense first layer) at CPU width, plus two dense models of equal active and equal total
parameters; then writes docs/balancing.md (table, targets, figures, noise floor, commands) from the results.

Everything goes through the public CLI in subprocesses (`python -m smolds train ...`, `python -m smolds eval
RUN --data ...`) and the files it writes (metrics.jsonl, checkpoints), so the bench does not depend on where
the trainer's code lives. A run whose result.json exists is skipped: rerunning the command resumes the study.

    python bench/balance.py                       # the study: 18 runs, ~2 h on 2 shared CPU cores (1 thread)
    python bench/balance.py --quick               # smoke test, ~1-2 min: 10 steps, 3 runs, into runs/balance-quick
    python bench/balance.py --doc-only            # redraw docs/balancing.md + figures from bench/balance_results.json
    python bench/balance.py --ablations           # + loss_free at 0.1x (the paper's u, 3 seeds) and 10x the bias rate, 4x the batch (seed 0)
    python bench/balance.py --scale 135m --data data/fineweb-edu-smollm2 --out runs/balance-135m \\
        --results runs/balance-135m/results.json --doc runs/balance-135m/balancing.md \\
        --figures runs/balance-135m/figures     # the same study at the 135m preset on a GPU

Metrics (Wang et al. 2024): MaxVio = (max_i c_i - mean c) / mean c over the (token, expert) counts c of one MoE
layer, averaged over the MoE layers. MaxVio_batch: the counts of one optimizer step's global batch (the
trainer logs its mean over each log interval); MaxVio_global: the counts over the whole validation split,
routed by the final checkpoint (`smolds eval`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "corpora"  # the default data source; the bench only, never the product
MODES = ("loss_free", "aux_loss", "seq_aux", "none")
DENSE = ("dense_active", "dense_total")

# The smollm2-deepseek-135m preset keeps its routing (16 routed experts of equal width, top-4, 2 shared
# experts, sigmoid gate, no groups, dense layer 0); "cpu" shrinks its width and depth to train on one core.
CPU_WIDTH = {"vocab_size": 4096, "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
             "kv_lora_rank": 32, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
             "intermediate_size": 384, "moe_intermediate_size": 64, "max_position_embeddings": 1024,
             "rope_theta": 10000.0}


@dataclass
class Scale:
    model: dict  # overrides of the preset
    data: str  # default data dir
    steps: int
    seq_len: int
    micro_batch: int
    grad_accum: int
    lr: float
    warmup: int
    bias_update_rate: float
    aux_loss_alpha: float
    seq_aux_alpha: float
    device: str
    dtype: str
    log_every: int = 10


SCALES = {
    # Paper (Wang et al. 2024): u = 1e-3, aux-loss alpha = 1e-3; DeepSeek-V3: seq-aux alpha 1e-4. Here: the
    # same alphas, and u = 1e-2 (the tiny preset's): in 1,000 steps u = 1e-3 spends half the run building the
    # bias (`--ablations` runs u = 1e-3 beside it; docs/balancing.md).
    "cpu": Scale(model=CPU_WIDTH, data="data/balance-bpe4096", steps=1000, seq_len=128, micro_batch=8,
                 grad_accum=1, lr=2e-3, warmup=100, bias_update_rate=1e-2, aux_loss_alpha=1e-3,
                 seq_aux_alpha=1e-4, device="cpu", dtype="fp32"),
    # configs/smollm2-deepseek-135m.yaml's step on one GPU (8 x 2048 x 4 = 65,536 tokens), data prepared with
    # SmolLM2's tokenizer (see that file).
    "135m": Scale(model={}, data="data/fineweb-edu-smollm2", steps=2000, seq_len=2048, micro_batch=8,
                  grad_accum=4, lr=3e-3, warmup=200, bias_update_rate=1e-3, aux_loss_alpha=1e-3,
                  seq_aux_alpha=1e-4, device="cuda", dtype="bf16", log_every=10),
}
PRESET = "smollm2-deepseek-135m"


@dataclass
class Run:
    name: str  # directory name under --out, unique
    kind: str  # a balance mode, or dense_active / dense_total
    seed: int
    model: dict  # model overrides on top of the preset
    steps: int
    micro_batch: int
    grad_accum: int
    group: str = ""  # the row of the table it belongs to (kind, or an ablation label)
    ablation: bool = False


@dataclass
class Result:
    name: str
    group: str
    kind: str
    seed: int
    ablation: bool
    params: int
    active_params: int
    steps: int
    batch_tokens: int  # tokens per optimizer step
    val_loss: float
    val_tokens: int
    maxvio_global: float | None = None
    maxvio_global_per_layer: list = field(default_factory=list)
    maxvio_batch_last20: float | None = None
    maxvio_10steps_last20: float | None = None  # MaxVio of the counts pooled over each log row (log_every steps)
    maxvio_pooled_last20: float | None = None  # MaxVio of the counts pooled over the whole last 20%
    log_every: int = 10
    curve: list = field(default_factory=list)  # [[step, MaxVio_batch mean over the log interval], ...]
    counts_last20: list = field(default_factory=list)  # [L][E] assignments over the last 20% of steps
    dead_experts: int | None = None  # no assignment at all over the last 20% of steps, summed over layers
    starved_experts: int | None = None  # under 10% of the mean load over the last 20% of steps
    bias_spread_end: float | None = None  # mean over layers of max(b) - min(b) at the end
    bias_drift_last20: float | None = None  # mean |b - b_prev| per step / u over the last 20%: 1 = chasing
    bias_update_rate: float | None = None  # u (loss_free runs)
    tokens_per_s: float = 0.0  # median over the trainer's log rows (wall clock)
    tokens_per_cpu_s: float = 0.0  # training tokens / CPU seconds of the training process (startup included)
    wall_s: float = 0.0  # train + eval subprocesses
    load: list = field(default_factory=list)  # 1-minute load average at the start and the end
    smolds_file: str = ""  # which smolds the subprocess imported


# ------------------------------------------------------------------------------------------------ the runs
def param_counts(model: dict) -> tuple[int, int]:
    """(total, active) parameters of the preset with `model` overrides, built on the meta device."""
    import torch

    from smolds import ModelConfig, Transformer

    cfg = ModelConfig.from_dict({"preset": PRESET, **model})
    with torch.device("meta"):
        m = Transformer(cfg)
    return m.num_parameters(), m.num_parameters(active=True)


def dense_width(model: dict, target: int) -> int:
    """The dense FFN width (every layer) whose model has `target` parameters: params are linear in it."""
    dense = {**model, "n_routed_experts": 0}
    a = param_counts({**dense, "intermediate_size": 64})[0]
    b = param_counts({**dense, "intermediate_size": 128})[0]
    return max(1, round(64 + (target - a) * 64 / (b - a)))


def plan(args, scale: Scale) -> list[Run]:
    moe = dict(scale.model, bias_update_rate=args.bias_update_rate, aux_loss_alpha=args.aux_alpha,
               seq_aux_alpha=args.seq_aux_alpha)
    total, active = param_counts(moe)
    widths = {"dense_active": dense_width(scale.model, active), "dense_total": dense_width(scale.model, total)}
    runs = []
    for seed in range(args.seeds):
        for mode in MODES:
            runs.append(Run(f"{mode}-s{seed}", mode, seed, dict(moe, balance_mode=mode), args.steps,
                            args.batch, args.grad_accum, group=mode))
        for kind in DENSE:
            runs.append(Run(f"{kind}-s{seed}", kind, seed,
                            dict(scale.model, n_routed_experts=0, intermediate_size=widths[kind]),
                            args.steps, args.batch, args.grad_accum, group=kind))
    if args.ablations:  # loss_free: the bias rate 10x down (the paper's) and 10x up, a 4x batch
        u = args.bias_update_rate
        for label, rate, batch, seeds in ((f"loss_free u={u / 10:g}", u / 10, args.batch, args.paper_u_seeds),
                                          (f"loss_free u={10 * u:g}", 10 * u, args.batch, 1),
                                          ("loss_free batch x4", u, 4 * args.batch, 1)):
            slug = label.replace(" ", "_").replace("=", "")
            for seed in range(seeds):
                runs.append(Run(f"abl-{slug}-s{seed}", "loss_free", seed,
                                dict(moe, balance_mode="loss_free", bias_update_rate=rate),
                                args.steps, batch, args.grad_accum, group=label, ablation=True))
    if args.only:
        runs = [r for r in runs if any(r.name.startswith(p) for p in args.only)]
    return runs


def cli_overrides(section: str, values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        out += [f"--{section}.{k}", json.dumps(v) if isinstance(v, (list, dict, bool)) else str(v)]
    return out


# --------------------------------------------------------------------------------------------- one run
def prepare_data(data: Path, env: dict):
    """The shared corpora (TinyStories prefix, tinyshakespeare, WikiText-2 test) as a BPE of 4,096 tokens.

    `smolds prep` splits a .txt file into documents at blank lines and picks every 20th document for val.
    The WikiText file has no blank line (one paragraph a row, CRLF), so as it is it would be one document,
    all of it in train, and val would hold no WikiText at all: its rows become documents here (a heading row
    joins the paragraph after it), written beside the data dir, so both splits hold all three corpora."""
    if (data / "manifest.json").is_file():
        return
    if not CORPORA.is_dir():
        sys.exit(f"balance.py: no --data {data} and no {CORPORA} to prepare it from; pass --data DIR "
                 "(from `smolds prep`)")
    converted = data.parent / f"{data.name}-sources"
    converted.mkdir(parents=True, exist_ok=True)
    sources = sorted(map(str, CORPORA.glob("*.txt")))
    for raw in sorted(CORPORA.glob("*.raw")):
        docs, heading = [], ""
        for row in raw.read_text(encoding="utf-8").splitlines():
            row = row.strip()
            if row.startswith("= ") and row.endswith(" ="):
                heading += row + "\n"
            elif row:
                docs.append(heading + row)
                heading = ""
        out = converted / f"{raw.stem}.txt"
        out.write_text("\n\n".join(docs) + "\n")
        sources.append(str(out))
    cmd = [sys.executable, "-m", "smolds", "prep", *sources, "--out", str(data), "--vocab-size", "4096"]
    print("preparing the data:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def run_one(run: Run, args, scale: Scale, env: dict, smolds_file: str) -> Result:
    out = args.out / run.name
    done = out / "result.json"
    if done.is_file():
        return Result(**json.loads(done.read_text()))
    if out.exists():  # a run that did not finish: start it over
        shutil.rmtree(out)
    out.mkdir(parents=True)
    steps = run.steps
    train = {"out_dir": str(out), "steps": steps, "seq_len": args.seq_len, "micro_batch": run.micro_batch,
             "grad_accum": run.grad_accum, "lr": args.lr, "warmup_steps": args.warmup, "seed": run.seed,
             "device": args.device, "dtype": scale.dtype, "log_every": args.log_every, "eval_every": steps,
             "eval_batches": 1, "checkpoint_every": steps, "keep_checkpoints": 1}
    cmd = [sys.executable, "-m", "smolds", "train", "--model", PRESET, *cli_overrides("model", run.model),
           "--data.dir", str(args.data), *cli_overrides("train", train), "--logging.wandb", "disabled",
           "--eval.prompts", "[]", "--eval.sample_tokens", "0"]
    (out / "command.txt").write_text(" ".join(cmd) + "\n")
    load0 = os.getloadavg()[0]
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    with open(out / "stdout.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        sys.exit(f"balance.py: {run.name} failed (exit {rc}); see {out / 'stdout.log'}")
    train_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    ev_cmd = [sys.executable, "-m", "smolds", "eval", str(out), "--data", str(args.data), "--seq-len",
              str(args.seq_len), "--batch-size", str(run.micro_batch), "--device", args.device]
    if args.eval_batches:
        ev_cmd += ["--batches", str(args.eval_batches)]
    ev = subprocess.run(ev_cmd, capture_output=True, text=True, env=env)
    if ev.returncode != 0:
        sys.exit(f"balance.py: evaluating {run.name} failed: {ev.stderr.strip()[-2000:]}")
    wall = time.time() - t0
    ev_json = json.loads(ev.stdout[ev.stdout.index("{"):])
    total, active = param_counts(run.model)
    res = Result(name=run.name, group=run.group, kind=run.kind, seed=run.seed, ablation=run.ablation,
                 params=total, active_params=active, steps=steps,
                 batch_tokens=run.micro_batch * run.grad_accum * args.seq_len,
                 val_loss=ev_json["loss"], val_tokens=ev_json["tokens"],
                 maxvio_global=ev_json.get("maxvio"), maxvio_global_per_layer=ev_json.get("maxvio_per_layer", []),
                 wall_s=wall, load=[load0, os.getloadavg()[0]], smolds_file=smolds_file, log_every=args.log_every,
                 bias_update_rate=run.model.get("bias_update_rate") if run.kind == "loss_free" else None)
    read_metrics(out / "metrics.jsonl", res, res.bias_update_rate)
    res.tokens_per_cpu_s = steps * res.batch_tokens / max(train_cpu, 1e-9)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(res)))
    tmp.replace(done)
    return res


def maxvio_of(counts: np.ndarray) -> float:
    """MaxVio of [L, E] counts, mean over layers."""
    c = np.asarray(counts, dtype=np.float64)
    return float(((c.max(-1) - c.mean(-1)) / c.mean(-1)).mean())


def read_metrics(path: Path, res: Result, rate: float | None):
    """MaxVio_batch curve and its last-20% mean, expert counts, dead experts, bias drift, tokens/s."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("kind") == "train" and "loss" in r]
    speeds = [r["tokens_per_s"] for r in train[1:] if "tokens_per_s" in r]
    res.tokens_per_s = float(np.median(speeds)) if speeds else 0.0
    routed = [r for r in train if "maxvio" in r]
    if not routed:
        return
    res.curve = [[r["step"], r["maxvio"]] for r in routed]
    last = [r for r in routed if r["step"] > 0.8 * res.steps]  # exact when log_every divides 20% of the steps
    n = sum(r["routing_steps"] for r in last)
    res.maxvio_batch_last20 = sum(r["maxvio"] * r["routing_steps"] for r in last) / n
    counts = np.sum([np.asarray(r["expert_counts"], dtype=np.int64) for r in last], axis=0)  # [L, E]
    res.counts_last20 = counts.tolist()
    res.maxvio_pooled_last20 = float(maxvio_of(counts))
    res.maxvio_10steps_last20 = float(np.mean([maxvio_of(np.asarray(r["expert_counts"])) for r in last
                                                if r["routing_steps"] == res.log_every]))
    mean = counts.mean(-1, keepdims=True)
    res.dead_experts = int((counts == 0).sum())
    res.starved_experts = int((counts < 0.1 * mean).sum())
    bias = np.asarray(routed[-1]["router_bias"], dtype=np.float64)
    res.bias_spread_end = float((bias.max(-1) - bias.min(-1)).mean())
    if rate:
        drift = [r["bias_change"] / r["routing_steps"] for r in last if "bias_change" in r]
        res.bias_drift_last20 = float(np.mean(drift)) / rate if drift else None


# ------------------------------------------------------------------------------------------- noise floor
def expected_max_normal(n: int) -> float:
    """E[max of n iid standard normals], by numerical integration."""
    x = np.linspace(-10, 10, 200001)
    phi = np.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    Phi = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    return float(np.trapezoid(x * n * phi * Phi ** (n - 1), x))


def maxvio_floor(tokens: int, experts: int, k: int, trials: int = 400, seed: int = 0) -> dict:
    """MaxVio of one layer when every token picks k distinct experts uniformly at random (a perfectly
    balanced router): the value a balancer cannot go below at this many tokens. Analytic (normal
    approximation of the counts, which sum to tokens*k) and simulated (mean, 5th and 95th percentiles)."""
    p = k / experts
    analytic = expected_max_normal(experts) * math.sqrt((1 - p) * experts / (tokens * p * (experts - 1)))
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(trials):
        picks = rng.random((tokens, experts)).argpartition(k, axis=1)[:, :k]
        c = np.bincount(picks.ravel(), minlength=experts)
        vals.append((c.max() - c.mean()) / c.mean())
    v = np.asarray(vals)
    return {"tokens": tokens, "analytic": analytic, "simulated": float(v.mean()),
            "p5": float(np.percentile(v, 5)), "p95": float(np.percentile(v, 95)), "trials": trials}


# -------------------------------------------------------------------------------------------- summaries
def mean_std(xs) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def fmt(m: float, s: float, digits: int = 3) -> str:
    if math.isnan(m):
        return "-"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def groups(results: list[Result]) -> dict[str, list[Result]]:
    out: dict[str, list[Result]] = {}
    for r in sorted(results, key=lambda r: (r.ablation, r.seed)):
        out.setdefault(r.group, []).append(r)
    order = [*MODES, *DENSE]
    return dict(sorted(out.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])))


def targets(g: dict[str, list[Result]]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for the four targets of issue #19."""
    def m(group, attr):
        return mean_std([getattr(r, attr) for r in g.get(group, [])])

    out = []
    lf, lf_s = m("loss_free", "maxvio_global")
    out.append(("loss_free MaxVio_global ≤ 0.15 at the end", f"{lf:.3f} ± {lf_s:.3f}",
                None if math.isnan(lf) else lf <= 0.15))
    aux, _ = m("aux_loss", "maxvio_global")
    ratio = aux / lf if lf and not math.isnan(aux) else float("nan")
    out.append(("aux_loss MaxVio_global ≥ 2x loss_free's", f"{aux:.3f} / {lf:.3f} = {ratio:.2f}x",
                None if math.isnan(ratio) else ratio >= 2))
    lv, lv_s = m("loss_free", "val_loss")
    av, av_s = m("aux_loss", "val_loss")
    out.append(("loss_free val loss ≤ aux_loss's", f"{lv:.4f} ± {lv_s:.4f} vs {av:.4f} ± {av_s:.4f}",
                None if math.isnan(av) else lv <= av))
    dv, dv_s = m("dense_active", "val_loss")
    gap = dv - lv
    out.append(("loss_free beats dense (equal active) by more than the seeds' spread (gap > std + std)",
                f"gap {gap:.4f} vs spread {lv_s + dv_s:.4f}", None if math.isnan(gap) else gap > lv_s + dv_s))
    return out


# ----------------------------------------------------------------------------------------------- figures
COLORS = {"loss_free": "tab:green", "aux_loss": "tab:blue", "seq_aux": "tab:orange", "none": "tab:red"}


def plot_maxvio(g: dict[str, list[Result]], floors: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2.2, 1]})
    for mode in MODES:
        runs = [r for r in g.get(mode, []) if r.curve]
        if not runs:
            continue
        n = min(len(r.curve) for r in runs)
        steps = np.asarray([s for s, _ in runs[0].curve[:n]])
        v = np.asarray([[x for _, x in r.curve[:n]] for r in runs])  # [seeds, points]
        a.plot(steps, v.mean(0), color=COLORS[mode], label=f"{mode} (mean of {len(runs)} seeds)")
        a.fill_between(steps, v.min(0), v.max(0), color=COLORS[mode], alpha=0.2, linewidth=0)
    fb = floors["batch"]
    a.axhline(fb["simulated"], color="k", ls="--", lw=1, label=f"uniform random routing, {fb['tokens']:,} tokens")
    a.set_yscale("log")
    a.set_xlabel("step")
    a.set_ylabel("MaxVio_batch (mean over MoE layers)")
    a.set_title("MaxVio_batch over training (band: min-max over seeds)")
    a.grid(alpha=0.3, which="both")
    a.legend(fontsize=8)
    names = [m for m in MODES if g.get(m)]
    for i, mode in enumerate(names):
        vals = [r.maxvio_global for r in g[mode]]
        b.bar(i, np.mean(vals), color=COLORS[mode], alpha=0.6)
        b.scatter([i] * len(vals), vals, color="k", s=12, zorder=3)
    fg = floors["global"]
    b.axhline(fg["simulated"], color="k", ls="--", lw=1, label=f"uniform random, {fg['tokens']:,} tokens")
    b.axhline(0.15, color="tab:green", ls=":", lw=1, label="target 0.15")
    b.set_xticks(range(len(names)), names, fontsize=8)
    b.set_yscale("log")
    b.set_ylabel("MaxVio_global (validation split, final checkpoint)")
    b.set_title("at the end (dots: seeds)")
    b.grid(alpha=0.3, axis="y", which="both")
    b.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_heatmaps(g: dict[str, list[Result]], top_k: int, path: Path, modes=("loss_free", "none")):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [g[m][0] for m in modes if g.get(m) and g[m][0].counts_last20]
    if not runs:
        return
    E = len(runs[0].counts_last20[0])
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 1.0 + 0.6 * len(runs[0].counts_last20) * len(runs)),
                             squeeze=False, layout="constrained")
    # load / mean is at most E/K (an expert cannot take a token twice): a diverging scale from 1/16 to E/K
    hi = math.log2(E / top_k)
    norm = matplotlib.colors.TwoSlopeNorm(vmin=-4, vcenter=0, vmax=hi)
    for ax, r in zip(axes[:, 0], runs):
        c = np.asarray(r.counts_last20, dtype=np.float64)
        rel = np.log2(np.clip(c / c.mean(-1, keepdims=True), 1 / 16, None))
        im = ax.imshow(rel, cmap="RdBu_r", norm=norm, aspect="auto")
        L = c.shape[0]
        vio = (c.max(-1) - c.mean(-1)) / c.mean(-1)
        ax.set_yticks(range(L), [f"MoE {i + 1} ({v:.2f})" for i, v in enumerate(vio)], fontsize=8)
        ax.set_xticks(range(E), [str(e) for e in range(E)], fontsize=7)
        ax.set_title(f"{r.kind}, seed {r.seed}: load / mean load over the last 20% of steps "
                     "(label: that window's MaxVio)", fontsize=9)
    axes[-1, 0].set_xlabel("routed expert")
    ticks = [t for t in (-4, -2, -1, 0, 1, 2) if t <= hi]
    cb = fig.colorbar(im, ax=axes[:, 0].tolist(), ticks=ticks, shrink=0.9)
    cb.ax.set_yticklabels(["≤1/16" if t == -4 else (f"1/{2 ** -t}" if t < 0 else str(2 ** t)) for t in ticks])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- doc
def write_doc(data: dict, path: Path, fig_dir: Path):
    results = [Result(**r) for r in data["runs"]]
    g = groups(results)
    main_g = {k: v for k, v in g.items() if not v[0].ablation}
    floors = data["floors"]
    rel = os.path.relpath(fig_dir, path.parent)
    s = data["settings"]
    plot_maxvio(main_g, floors, fig_dir / "balance_maxvio.png")
    plot_heatmaps(main_g, s["top_k"], fig_dir / "balance_heatmap.png")
    L = []
    w = L.append
    w("# Load balancing: loss-free bias vs auxiliary losses, measured\n")
    w("Written by `bench/balance.py` from its results (`bench/balance_results.json`); every number below comes "
      "from that file. Regenerate with `python bench/balance.py --doc-only`.\n")
    w("## Setup\n")
    moe = g.get("loss_free", [None])[0]
    w(f"- Model: the `{PRESET}` preset's routing at CPU width: {s['model_desc']}. "
      + (f"MoE: {moe.params:,} parameters, {moe.active_params:,} active per token. " if moe else "")
      + "Dense baselines (every layer a SwiGLU of one width, no experts): "
      + ", ".join(f"`{k}` {g[k][0].params:,} parameters (FFN width {s['dense_widths'][k]})" for k in DENSE if k in g)
      + ".")
    w(f"- Data: {s['data_desc']}. Validation: the whole val split, {s['val_tokens']:,} tokens, windows of "
      f"{s['seq_len']}.")
    w(f"- Training: {s['steps']:,} steps of {s['batch']} x {s['seq_len']} = {s['batch_tokens']:,} tokens "
      f"({s['steps'] * s['batch_tokens'] / 1e6:.2f}M tokens a run), AdamW lr {s['lr']:g}, WSD schedule "
      f"(warmup {s['warmup']}, linear decay over the last 20%), fp32, {s['threads']} thread "
      f"(`OMP_NUM_THREADS={s['threads']}`, `MKL_NUM_THREADS={s['threads']}`), one run at a time, seeds "
      f"0-{s['seeds'] - 1} (the seed sets the initialization and the data order).")
    w("- Balancing settings, the paper's (Wang et al. 2024, [arXiv:2408.15664](https://arxiv.org/abs/2408.15664)) "
      "and ours:\n")
    w("| setting | paper | here |\n|---|---|---|")
    w(f"| bias update rate u (`loss_free`) | 1e-3 | {s['bias_update_rate']:g} |")
    w(f"| auxiliary-loss alpha (`aux_loss`, over the batch) | 1e-3 (their baseline) | {s['aux_alpha']:g} |")
    w(f"| sequence-wise alpha (`seq_aux`) | - (DeepSeek-V3: 1e-4) | {s['seq_aux_alpha']:g} |")
    w(f"| model, tokens | 1B and 3B DeepSeekMoE, 100B and 200B tokens | {moe.params / 1e6 if moe else 0:.2f}M, "
      f"{s['steps'] * s['batch_tokens'] / 1e6:.2f}M tokens |")
    w(f"| gate | sigmoid | sigmoid (the preset's), top-{s['top_k']} of {s['experts']} |\n")
    w("## Results\n")
    w("Mean ± sample standard deviation over the seeds. MaxVio_global: expert loads counted over the whole "
      "validation split with the final checkpoint (`smolds eval`), mean over the MoE layers. MaxVio_batch: each "
      "optimizer step's batch, averaged over the last 20% of steps. Dead: experts (of "
      f"{s['moe_layers']} layers x {s['experts']}) that got no token in the last 20% of steps; starved: under 10% "
      "of the mean load there. tok/s: median of the trainer's log rows, wall clock, with the 1-minute load "
      "average of the 2-core machine during the runs (other jobs ran beside the study); tok/CPU-s: training "
      "tokens per CPU second of the training process, startup included, which neighbours move less.\n")
    w("| run | seeds | val loss | MaxVio_global (end) | MaxVio_batch (last 20%) | dead / starved | tok/s (load) | "
      "tok/CPU-s |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, rs in g.items():
        vl = mean_std([r.val_loss for r in rs])
        mg = mean_std([r.maxvio_global for r in rs])
        mb = mean_std([r.maxvio_batch_last20 for r in rs])
        dead = "-" if rs[0].dead_experts is None else \
            f"{np.mean([r.dead_experts for r in rs]):.1f} / {np.mean([r.starved_experts for r in rs]):.1f}"
        loads = [x for r in rs for x in r.load]
        tps = f"{np.mean([r.tokens_per_s for r in rs]):,.0f} ({min(loads):.1f}-{max(loads):.1f})"
        cps = f"{np.mean([r.tokens_per_cpu_s for r in rs]):,.0f}"
        w(f"| {name} | {len(rs)} | {fmt(*vl, 4)} | {fmt(*mg)} | {fmt(*mb)} | {dead} | {tps} | {cps} |")
    w("")
    w("## Targets\n")
    w("| target | measured | met |\n|---|---|---|")
    for t, v, ok in targets(main_g):
        w(f"| {t} | {v} | {'-' if ok is None else ('yes' if ok else '**no**')} |")
    w("")
    L.extend(verdict(g))
    w("## Figures\n")
    w(f"![MaxVio over steps]({rel}/balance_maxvio.png)\n")
    w("Left: MaxVio_batch over training per mode (line: mean of the seeds; band: min-max over seeds; dashed: "
      "the noise floor of uniform random routing at this batch). Right: MaxVio_global of the final checkpoints "
      "(bar: mean; dots: seeds; dashed: the floor at the validation split's size).\n")
    w(f"![expert load heatmap]({rel}/balance_heatmap.png)\n")
    w("Expert load per MoE layer (rows) and routed expert (columns), relative to the layer's mean, over the last "
      "20% of training steps, seed 0 of `loss_free` and of `none`.\n")
    w("## The noise floor of MaxVio\n")
    fb = floors["batch"]
    w(f"A router that is perfectly balanced in expectation still shows a MaxVio above 0 on a finite sample: "
      f"with every token choosing {s['top_k']} distinct experts of {s['experts']} uniformly at random, the "
      f"counts are multinomial-like with mean n = N·K/E and variance n(1-K/E), summing to N·K, so "
      f"MaxVio ≈ e_E · sqrt((E-K)·E / (N·K·(E-1))), e_E = E[max of E standard normals] = "
      f"{floors['e_E']:.3f} for E = {s['experts']}. Simulated ({fb['trials']} draws each, one layer; the table "
      "averages layers, which keeps the mean and narrows the spread):\n")
    w("| N tokens | what | analytic | simulated mean | 5-95% |\n|---:|---|---:|---:|---:|")
    whats = {"batch": "one training batch (MaxVio_batch)", "batch_x4": "one batch of the 4x-batch ablation",
             "rows": f"{s['log_every']} training batches (one log row)", "pooled": "the last 20% of training steps",
             "global": "the validation split (MaxVio_global)"}
    for key, what in whats.items():
        if key not in floors:
            continue
        f = floors[key]
        w(f"| {f['tokens']:,} | {what} | {f['analytic']:.4f} | {f['simulated']:.4f} | "
          f"{f['p5']:.4f}-{f['p95']:.4f} |")
    w("")
    w("## Why: measurements\n")
    lines = analysis(g, floors, s)
    L.extend(lines)
    w("")
    w("## Commands\n")
    w("```bash")
    w("# the study (resumable: a run whose result.json exists is skipped); data prepared on first use from")
    w("# ../shared/corpora, or pass --data DIR from `smolds prep`")
    w(s["command"])
    w("python bench/balance.py --doc-only                  # this page and its figures from bench/balance_results.json")
    w("python bench/balance.py --quick                     # smoke test: 10 steps, 3 runs, into runs/balance-quick")
    w("# one run by hand, as the bench runs it:")
    w(s["example_run"])
    w("smolds eval RUN_DIR --data DATA --seq-len 128 --batch-size 8   # val loss + MaxVio_global of a run")
    w("smolds monitor RUN_DIR                               # per-layer routing report of a run")
    w("```\n")
    w("The same study at the 135m preset on a GPU (SmolLM2's tokenizer, 49,152 tokens; full width and depth, "
      "8 x 2048 x 4 = 65,536 tokens a step, bf16; dense baselines sized the same way). Not run here (no GPU in "
      "this session), so no numbers for it:\n")
    w("```bash")
    w("smolds prep hf:HuggingFaceFW/fineweb-edu:sample-10BT:train --tokenizer HuggingFaceTB/SmolLM2-135M \\")
    w("    --out data/fineweb-edu-smollm2 --workers 32")
    w("python bench/balance.py --scale 135m --data data/fineweb-edu-smollm2 --out runs/balance-135m \\")
    w("    --results runs/balance-135m/results.json --doc runs/balance-135m/balancing.md \\")
    w("    --figures runs/balance-135m/figures --threads 8")
    w("```\n")
    main_runs = [r for r in results if not r.ablation]
    cpu_h = sum(r.steps * r.batch_tokens / r.tokens_per_cpu_s for r in main_runs) / 3600
    load_lo, load_hi = min(x for r in main_runs for x in r.load), max(x for r in main_runs for x in r.load)
    w(f"Wall time of the study here: {data['wall_s'] / 3600:.2f} h for {len([r for r in results if not r.ablation])} "
      f"runs" + (f" (+ {sum(r.wall_s for r in results if r.ablation) / 3600:.2f} h for the ablations)"
                 if any(r.ablation for r in results) else "")
      + f", training and evaluation, one run at a time, at a 1-minute load average of {load_lo:.1f}-{load_hi:.1f} "
      f"on the 2 cores; the training processes alone used {cpu_h:.2f} h of CPU (one thread each), which is about "
      f"the wall time on an idle machine. smolds imported from `{s['smolds_file']}` (a frozen snapshot of the "
      "repository, so that the study ran on one version of the code).")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(L) + "\n")


def verdict(g: dict[str, list[Result]]) -> list[str]:
    """What each target's result means, from the numbers: the seeds behind a mean, the paper's bias rate, the
    pairs by seed, and how many seeds would resolve a gap the spread hides."""
    def vals(group, attr):
        return [getattr(r, attr) for r in sorted(g.get(group, []), key=lambda r: r.seed)]

    def paired(a, b):  # b - a by seed
        ref = {r.seed: r.val_loss for r in g.get(a, [])}
        return [r.val_loss - ref[r.seed] for r in g.get(b, []) if r.seed in ref]

    paper = next((k for k in g if k.startswith("loss_free u=") and g[k][0].bias_update_rate < 5e-3), None)
    out = ["## What the targets say\n"]
    lf = vals("loss_free", "maxvio_global")
    if lf:
        def under(v):
            return "every seed under 0.15" if max(v) <= 0.15 else f"{sum(x <= 0.15 for x in v)} of {len(v)} under 0.15"

        line = (f"- **MaxVio_global of loss_free**: {', '.join(f'{v:.3f}' for v in lf)} over the seeds at u = "
                f"{g['loss_free'][0].bias_update_rate:g} (mean {np.mean(lf):.3f}): {under(lf)}.")
        if paper:
            pv = vals(paper, "maxvio_global")
            line += (f" At the paper's u = {g[paper][0].bias_update_rate:g}: {', '.join(f'{v:.3f}' for v in pv)} "
                     f"(mean {np.mean(pv):.3f}): {under(pv)}."
                     + (" Each step of the sign rule moves a bias by u, and the routing of every later batch with "
                        "it: the smaller step leaves the trained router better balanced on held-out text (bias "
                        "rate, below)." if np.mean(pv) < np.mean(lf) else ""))
        out.append(line)
    aux_pairs = paired("aux_loss", "loss_free")
    if aux_pairs:
        m, sd = mean_std(aux_pairs)
        line = (f"- **Validation loss, loss_free vs aux_loss**: loss_free minus aux_loss, paired by seed, "
                f"{m:+.4f} ± {sd:.4f} nats at u = {g['loss_free'][0].bias_update_rate:g}"
                + (": met." if m <= 0 else ": missed; loss_free is behind by about the size of the paper's gain "
                   "(0.0063 nats), on every seed." if min(aux_pairs) > 0 else ": missed on the mean."))
        if paper:
            pp = paired("aux_loss", paper)
            if pp:
                pm, ps = mean_std(pp)
                line += (f" At the paper's u = {g[paper][0].bias_update_rate:g}: {pm:+.4f}"
                         + (f" ± {ps:.4f}" if len(pp) > 1 else "") + f" ({len(pp)} seed{'s' if len(pp) > 1 else ''})"
                         + (": at or below aux_loss on the mean" + (", within the seeds' spread." if ps > -pm else ".")
                            if pm <= 0 else ": still above aux_loss.")
                         + " (The 135m presets use the paper's u; `tiny` uses 1e-2 so that 400-step runs balance.)")
        none = paired("none", "loss_free")
        if none:
            line += (f" `none` (no balancing at all) is within {abs(mean_std(none)[0]):.4f} nats of loss_free: at "
                     "2M parameters and 1M tokens, balance is worth little in quality either way; the paper's "
                     "effect is measured at 1B parameters and 100B tokens.")
        out.append(line)
    dense = paired("dense_active", "loss_free")
    if dense:
        m, sd = mean_std(dense)
        need = math.ceil((2 * sd / abs(m)) ** 2) if m and not math.isnan(sd) else None
        line = (f"- **MoE vs dense at equal active parameters**: loss_free minus dense_active, paired by seed, "
                f"{', '.join(f'{v:+.4f}' for v in dense)} (mean {m:+.4f} ± {sd:.4f}): the MoE is ahead on average "
                "and on " + f"{sum(v < 0 for v in dense)} of {len(dense)} seeds, but the spread of the seeds "
                "hides it: missed.")
        if need:
            line += (f" With this spread, a two-standard-error margin needs about {need} seeds "
                     f"(n ≥ (2 x {sd:.4f} / {abs(m):.4f})²).")
        total = paired("dense_total", "loss_free")
        if total:
            line += (f" Against dense_total (the MoE's total parameters, all active) the MoE is "
                     f"{mean_std(total)[0]:+.4f} nats: it sits between the two dense models, as expected.")
        out.append(line)
    if "loss_free batch x4" in g:
        out.append("- `loss_free batch x4` trains on 4x the tokens in the same steps: its validation loss is not "
                   "comparable with the others'; it is there for what a 4x batch does to MaxVio.")
    out.append("")
    return out


def analysis(g: dict[str, list[Result]], floors: dict, s: dict) -> list[str]:
    """The measured reasons behind the targets: the floor, pooling over more tokens, the bias rate."""
    out = []
    fb, fg = floors["batch"]["simulated"], floors["global"]["simulated"]

    def avg(group, attr):
        return mean_std([getattr(r, attr) for r in g.get(group, [])])[0]

    lf_b, lf_g = avg("loss_free", "maxvio_batch_last20"), avg("loss_free", "maxvio_global")
    if not math.isnan(lf_b):
        out.append(f"- **Floor.** loss_free's MaxVio_batch over the last 20% is {lf_b:.3f}, {lf_b / fb:.1f}x the "
                   f"floor of uniform random routing at {floors['batch']['tokens']:,} tokens ({fb:.3f}); its "
                   f"MaxVio_global is {lf_g:.3f}, {lf_g / fg:.1f}x the floor at {floors['global']['tokens']:,} "
                   f"tokens ({fg:.3f}).")
    out.append("- **Batch size: the same routing counted over more tokens.** MaxVio of the training counts of one "
               f"step, of each log row ({s['log_every']} steps pooled), and of the whole last 20% pooled, then "
               "MaxVio_global (validation split, final weights and bias). Sampling noise shrinks as 1/sqrt(tokens), "
               "like the floor; an imbalance that stays put as the pool grows is in the router, not in the sample.\n")
    fr, fp = floors["rows"], floors["pooled"]
    out.append(f"| run | 1 step ({floors['batch']['tokens']:,} tok) | {s['log_every']} steps ({fr['tokens']:,}) | "
               f"last 20% ({fp['tokens']:,}) | MaxVio_global ({floors['global']['tokens']:,}) |")
    out.append("|---|---:|---:|---:|---:|")
    out.append(f"| uniform random routing (floor) | {fb:.3f} | {fr['simulated']:.3f} | {fp['simulated']:.3f} | "
               f"{fg:.3f} |")
    for name, rs in g.items():
        if rs[0].maxvio_batch_last20 is None:
            continue
        cols = [fmt(*mean_std([getattr(r, a) for r in rs])) for a in
                ("maxvio_batch_last20", "maxvio_10steps_last20", "maxvio_pooled_last20", "maxvio_global")]
        out.append(f"| {name} | " + " | ".join(cols) + " |")
    out.append("")
    ref = {r.seed: r.val_loss for r in g.get("loss_free", [])}
    if ref:
        out.append("- **Validation loss.** Each run minus loss_free, as a difference of the means and paired by seed "
                   "(one seed = the same data order, and for the MoE modes the same initial weights, so the pairs "
                   "cancel most of the seed-to-seed variation). Positive: loss_free is better. For scale, the paper's "
                   f"gain of loss-free over the auxiliary loss at 1B, perplexity 9.56 -> 9.50, is "
                   f"ln(9.56/9.50) = {math.log(9.56 / 9.50):.4f} nats.\n")
        out.append("| run | val loss | minus loss_free (means) | paired by seed (mean ± std) | seeds |")
        out.append("|---|---:|---:|---:|---:|")
        lf = mean_std(ref.values())
        for name, rs in g.items():
            if name == "loss_free":
                continue
            pairs = [r.val_loss - ref[r.seed] for r in rs if r.seed in ref]
            vl = mean_std([r.val_loss for r in rs])
            out.append(f"| {name} | {fmt(*vl, 4)} | {vl[0] - lf[0]:+.4f} | {fmt(*mean_std(pairs), 4)} | {len(pairs)} |")
        out.append("")
    out.append("- **Bias rate.** `bias drift` = mean |b - b_prev| per step over the last 20%, divided by u: near 1 "
               "the sign rule moves every bias the same way step after step (still chasing the router, u too "
               "small for the run); near 0 it oscillates around a fixed point (settled). `bias spread` = "
               "max(b) - min(b) at the end, mean over layers; spread / u is the least number of steps the sign "
               "rule needs to build it.\n")
    out.append("| run | u | bias drift (last 20%) | bias spread (end) | spread / u (steps) | MaxVio_batch (last 20%) "
               "| MaxVio_global |")
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    for name, rs in g.items():
        if rs[0].bias_drift_last20 is None:
            continue
        u = rs[0].bias_update_rate
        drift = mean_std([r.bias_drift_last20 for r in rs])
        spread = mean_std([r.bias_spread_end for r in rs])
        out.append(f"| {name} | {u:g} | {fmt(*drift, 2)} | {fmt(*spread, 4)} | {spread[0] / u:,.0f} | "
                   f"{fmt(*mean_std([r.maxvio_batch_last20 for r in rs]))} | "
                   f"{fmt(*mean_std([r.maxvio_global for r in rs]))} |")
    return out


# -------------------------------------------------------------------------------------------------- main
def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=list(SCALES), default="cpu")
    p.add_argument("--data", type=Path, help="shards from `smolds prep` (default: the scale's; the cpu scale's "
                   "is prepared from ../shared/corpora on first use)")
    p.add_argument("--out", type=Path, help="run directories (default runs/balance, runs/balance-quick)")
    p.add_argument("--results", type=Path, help="all runs' results in one JSON (default bench/balance_results.json)")
    p.add_argument("--doc", type=Path, help="the page to write (default docs/balancing.md)")
    p.add_argument("--figures", type=Path, help="where its PNGs go (default docs/figures)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--only", nargs="+", help="run names starting with these (e.g. loss_free aux_loss-s0)")
    p.add_argument("--ablations", action="store_true", help="also loss_free at 0.1x and 10x u and a 4x batch, seed 0")
    p.add_argument("--paper-u-seeds", type=int, default=3, help="seeds of the 0.1x-u ablation (the paper's u)")
    p.add_argument("--steps", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch", type=int, help="micro-batch (sequences)")
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--bias-update-rate", type=float)
    p.add_argument("--aux-alpha", type=float)
    p.add_argument("--seq-aux-alpha", type=float)
    p.add_argument("--log-every", type=int)
    p.add_argument("--eval-batches", type=int, help="at most this many validation batches (default: the whole split)")
    p.add_argument("--device")
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of every run (1: steady on shared cores)")
    p.add_argument("--quick", action="store_true", help="smoke test: 10 steps, one seed, loss_free, none and "
                   "dense_active, outputs under --out")
    p.add_argument("--doc-only", action="store_true", help="only rewrite the doc and figures from --results")
    args = p.parse_args()
    scale = SCALES[args.scale]
    if args.quick:
        args.steps, args.seeds, args.log_every = args.steps or 10, 1, args.log_every or 5
        args.warmup, args.eval_batches = args.warmup or 2, args.eval_batches or 4
        args.only = args.only or ["loss_free", "none", "dense_active"]
    for name in ("steps", "seq_len", "lr", "warmup", "bias_update_rate", "log_every", "device"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(scale, name))
    args.batch = args.batch or scale.micro_batch
    args.grad_accum = args.grad_accum or scale.grad_accum
    args.aux_alpha = scale.aux_loss_alpha if args.aux_alpha is None else args.aux_alpha
    args.seq_aux_alpha = scale.seq_aux_alpha if args.seq_aux_alpha is None else args.seq_aux_alpha
    args.data = args.data or ROOT / scale.data
    args.out = args.out or ROOT / ("runs/balance-quick" if args.quick else "runs/balance")
    args.results = args.results or (args.out / "results.json" if args.quick else ROOT / "bench/balance_results.json")
    args.doc = args.doc or (args.out / "balancing.md" if args.quick else ROOT / "docs/balancing.md")
    args.figures = args.figures or (args.out / "figures" if args.quick else ROOT / "docs/figures")

    if args.doc_only:
        write_doc(json.loads(args.results.read_text()), args.doc, args.figures)
        print(f"wrote {args.doc}")
        return

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    which = subprocess.run([sys.executable, "-c", "import smolds; print(smolds.__file__)"], env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    print(f"smolds: {which}; {args.threads} thread(s) a run", flush=True)
    if args.scale == "cpu":
        prepare_data(args.data, env)
    runs = plan(args, scale)
    results, t0 = [], time.time()
    for i, run in enumerate(runs):
        fresh = not (args.out / run.name / "result.json").is_file()
        r = run_one(run, args, scale, env, which)
        results.append(r)
        print(f"[{i + 1}/{len(runs)}] {r.name}: val loss {r.val_loss:.4f}"
              + (f", MaxVio_global {r.maxvio_global:.3f}, MaxVio_batch(last 20%) {r.maxvio_batch_last20:.3f}"
                 if r.maxvio_global is not None else "")
              + f", {r.tokens_per_s:,.0f} tok/s, {r.wall_s:.0f} s{'' if fresh else ' (done before)'}"
              + f", elapsed {time.time() - t0:.0f} s", flush=True)

    moe = next(r for r in runs if r.kind in MODES)
    from smolds import ModelConfig

    cfg = ModelConfig.from_dict({"preset": PRESET, **moe.model})
    experts, top_k, layers = cfg.n_routed_experts, cfg.num_experts_per_tok, len(cfg.moe_layers)
    val_tokens = next((r.val_tokens for r in results), 0)
    batch_tokens = args.batch * args.grad_accum * args.seq_len
    floors = {"e_E": expected_max_normal(experts),
              "batch": maxvio_floor(batch_tokens, experts, top_k, trials=2000),
              "rows": maxvio_floor(args.log_every * batch_tokens, experts, top_k, trials=1000),
              "pooled": maxvio_floor(int(0.2 * args.steps) * batch_tokens, experts, top_k, trials=200),
              "global": maxvio_floor(val_tokens, experts, top_k, trials=400)}
    if args.ablations:
        floors["batch_x4"] = maxvio_floor(4 * batch_tokens, experts, top_k, trials=1000)
    widths = {k: next(r.model["intermediate_size"] for r in runs if r.kind == k) for k in DENSE
              if any(r.kind == k for r in runs)}
    manifest = json.loads((args.data / "manifest.json").read_text())
    sources = ", ".join(Path(src["spec"]).name for src in manifest.get("sources", []))
    w = scale.model or {}
    model_desc = (f"{w['num_hidden_layers']} layers of width {w['hidden_size']} (MLA, {w['num_attention_heads']} "
                  f"heads), layer 0 a dense SwiGLU of {w['intermediate_size']}, layers 1-{w['num_hidden_layers'] - 1} "
                  f"DeepSeekMoE with {experts} routed experts of width {w['moe_intermediate_size']}, top-{top_k}, "
                  f"{cfg.n_shared_experts} shared experts, vocabulary {w['vocab_size']:,}"
                  if w else f"the full preset ({cfg.num_hidden_layers} layers of width {cfg.hidden_size})")
    command = "python bench/balance.py" + ("" if not args.ablations else " --ablations")
    if args.scale != "cpu":
        command += f" --scale {args.scale}"
    example = (f"OMP_NUM_THREADS={args.threads} python -m smolds train --model {PRESET} "
               + " ".join(cli_overrides("model", {k: v for k, v in moe.model.items()}))
               + f" --data.dir DATA --train.out_dir RUN_DIR --train.steps {args.steps} --train.seq_len {args.seq_len}"
               f" --train.micro_batch {args.batch} --train.lr {args.lr:g} --train.warmup_steps {args.warmup}"
               " --train.seed 0 --logging.wandb disabled")
    data = {
        "settings": {"scale": args.scale, "steps": args.steps, "log_every": args.log_every, "seq_len": args.seq_len, "batch": args.batch,
                     "grad_accum": args.grad_accum, "batch_tokens": batch_tokens, "lr": args.lr,
                     "warmup": args.warmup, "bias_update_rate": args.bias_update_rate, "aux_alpha": args.aux_alpha,
                     "seq_aux_alpha": args.seq_aux_alpha, "threads": args.threads, "seeds": args.seeds,
                     "experts": experts, "top_k": top_k, "moe_layers": layers, "val_tokens": val_tokens,
                     "dense_widths": widths, "model_desc": model_desc,
                     "data_desc": f"{sources} (`smolds prep`, BPE of {manifest['vocab_size']:,}), "
                                  f"{manifest['splits']['train']['tokens']:,} training tokens",
                     "command": command, "example_run": example, "smolds_file": which},
        "floors": floors,
        "wall_s": sum(r.wall_s for r in results if not r.ablation),
        "runs": [asdict(r) for r in results],
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(data, indent=1))
    write_doc(data, args.doc, args.figures)
    print(f"wrote {args.results}, {args.doc}, figures in {args.figures}")


if __name__ == "__main__":
    main()
