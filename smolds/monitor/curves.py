"""Training curves of one or more runs, from their metrics.jsonl: one PNG to look at instead of numbers.

    smolds curves runs/tiny                         # -> runs/tiny/curves.png
    smolds curves runs/mla runs/linear --out cmp.png --x tokens

Six panels, every run overlaid: train loss, validation loss (and, for a run on a data mixture, each
source's, dashed), learning rate, tokens/s, gradient norm and MaxVio (the routing monitor's mean over MoE
layers). Panels with no data in any run say so. The trainer
redraws OUT_DIR/curves.png at every evaluation. Rows are read as the trainer writes them; when a run was
resumed, the last row written for a step wins (the resumed run's).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from smolds.monitor.plots import _figure, _save

FIGSIZE = (13.5, 7.0)  # inches, 1350 x 700 pixels at the monitor's DPI
PANELS = [  # (title, row kind, key, log scale)
    ("train loss", "train", "loss", False),
    ("validation loss", "eval", "loss", False),
    ("learning rate", "train", "lr", False),
    ("tokens / s", "train", "tokens_per_s", False),
    ("gradient norm (before clipping)", "train", "grad_norm", True),
    ("MaxVio (mean over MoE layers)", "train", "maxvio", False),
]


def read_series(run_dir: str | Path) -> dict[tuple[str, str], list[tuple[int, float, float]]]:
    """{(kind, key): [(step, tokens, value)]} from RUN_DIR/metrics.jsonl, sorted by step."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl; pass a training run's output dir")
    by_step: dict[tuple[str, str], dict[int, tuple[float, float]]] = {}
    tokens_at: dict[int, float] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        step, kind = row.get("step"), row.get("kind")
        if not isinstance(step, int):
            continue
        if "tokens" in row:
            tokens_at[step] = row["tokens"]
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "time"):
                by_step.setdefault((kind, key), {})[step] = float(value)
    per_token = max((t / s for s, t in tokens_at.items() if s), default=0.0)  # tokens per step
    return {k: [(s, tokens_at.get(s, s * per_token), v) for s, v in sorted(d.items())] for k, d in by_step.items()}


def panel_lines(runs: list[tuple[str, dict]], kind: str, key: str, x: str = "step") -> list[tuple[str, list, list, str]]:
    """(label, xs, ys, line style) of one panel. The validation-loss panel of a run on a data mixture also
    gets each source's loss (`loss/<name>`, dashed), labelled "<run> <name>"."""
    lines = []
    for label, series in runs:
        keys = [key] + (sorted(k for c, k in series if c == kind and k.startswith("loss/")) if key == "loss" and kind == "eval" else [])
        for k in keys:
            points = series.get((kind, k))
            if points:
                xs = [p[0] if x == "step" else p[1] for p in points]
                name = label if k == key else f"{label} {k.split('/', 1)[1]}"
                lines.append((name, xs, [p[2] for p in points], "-" if k == key else "--"))
    return lines


def plot_runs(run_dirs: list[str | Path], out: str | Path, x: str = "step") -> Path:
    """Draw the runs' curves into one PNG; labels are the run dirs' names."""
    if x not in ("step", "tokens"):
        raise ValueError(f"x must be 'step' or 'tokens', got {x!r}")
    runs = [(Path(d).name or str(d), read_series(d)) for d in run_dirs]
    fig = _figure(FIGSIZE)
    axes = fig.subplots(2, 3)
    for ax, (title, kind, key, log_y) in zip(axes.flat, PANELS):
        lines = panel_lines(runs, kind, key, x)
        for label, xs, ys, style in lines:
            ax.plot(xs, ys, style, label=label, marker="o" if kind == "eval" else None, markersize=3, linewidth=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(x)
        if not lines:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
        elif log_y:
            ax.set_yscale("log")
        if len(lines) > len(runs) or (len(runs) > 1 and ax is axes.flat[0]):  # per-source lines, or runs to tell apart
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(", ".join(label for label, _ in runs))
    return _save(fig, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="smolds curves", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="training output dirs (each holds metrics.jsonl)")
    p.add_argument("--out", help="PNG to write (default: RUN/curves.png for one run, curves.png for several)")
    p.add_argument("--x", choices=["step", "tokens"], default="step")
    args = p.parse_args(argv)
    out = args.out or (Path(args.runs[0]) / "curves.png" if len(args.runs) == 1 else "curves.png")
    try:
        path = plot_runs(args.runs, out, args.x)
    except (FileNotFoundError, ValueError) as e:
        print(f"smolds curves: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
