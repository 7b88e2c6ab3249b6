"""The routing monitor's pictures (matplotlib, Agg) and its Markdown report.

Every figure has a fixed size in pixels (inches x DPI, saved without a tight bounding box), so the same
plot of a 4-layer and of a 30-layer model has the same size, and tests can check it:

    load heatmap   900 x 500     layers x experts, load / mean load (1 = even)
    MaxVio curve   900 x 450     MaxVio over steps: the mean over layers (thick) and each layer (thin)
    MaxVio bars    900 x 450     MaxVio_global per layer (a checkpoint on evaluation text)
    bias panels    300 x 225 per layer, up to 4 per row, plus a 50-pixel title band

No pyplot: figures are built with `matplotlib.figure.Figure` on an Agg canvas, which leaves the
process's global backend alone (the trainer may run inside a notebook) and is safe off the main thread.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

DPI = 100
HEATMAP_SIZE = (9.0, 5.0)  # inches
CURVE_SIZE = (9.0, 4.5)
PANEL_SIZE, PANEL_COLS, TITLE_BAND = (3.0, 2.25), 4, 0.5


def panel_figsize(n_panels: int) -> tuple[float, float]:
    """(width, height) in inches of a grid of one small panel per layer."""
    cols = max(1, min(PANEL_COLS, n_panels))
    rows = max(1, math.ceil(n_panels / cols))
    return PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows + TITLE_BAND


def pixels(figsize: tuple[float, float]) -> tuple[int, int]:
    return round(figsize[0] * DPI), round(figsize[1] * DPI)


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")  # no bbox_inches="tight": keep the documented size
    return path


def _layer_labels(layer_ids) -> list[str]:
    return [f"layer {i}" for i in layer_ids]


def load_heatmap(share: np.ndarray, layer_ids, path, title: str = "expert load") -> Path:
    """share [L, E] (rows sum to 1) drawn as load / mean load, so 1 is even whatever E is."""
    from matplotlib.colors import TwoSlopeNorm

    share = np.asarray(share, dtype=float)
    L, E = share.shape
    rel = share * E
    fig = _figure(HEATMAP_SIZE)
    ax = fig.add_subplot()
    vmax = max(2.0, float(np.nanmax(rel)) if rel.size else 2.0)
    im = ax.imshow(rel, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax),
                   interpolation="nearest")
    ax.set_yticks(range(L), _layer_labels(layer_ids))
    step = max(1, E // 32)
    ax.set_xticks(range(0, E, step))
    ax.set_xlabel("expert")
    if L * E <= 160:
        for i in range(L):
            for e in range(E):
                dark = abs(im.norm(rel[i, e]) - 0.5) > 0.3  # white text on the saturated ends of the map
                ax.text(e, i, f"{rel[i, e]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    fig.colorbar(im, ax=ax, label="load / mean load")
    ax.set_title(title)
    return _save(fig, path)


def maxvio_curve(steps, maxvio: np.ndarray, layer_ids, path, eval_steps=(), eval_maxvio=(),
                 threshold: float | None = None, title: str = "MaxVio_batch") -> Path:
    """maxvio [T, L] at `steps`; eval MaxVio_global points and the warning threshold if given."""
    maxvio = np.asarray(maxvio, dtype=float).reshape(len(steps), -1)
    fig = _figure(CURVE_SIZE)
    ax = fig.add_subplot()
    if len(steps):
        for i, lid in enumerate(layer_ids):
            ax.plot(steps, maxvio[:, i], lw=0.8, alpha=0.6, label=f"layer {lid}")
        ax.plot(steps, maxvio.mean(1), lw=2.2, color="black", label="mean")
    if len(eval_steps):
        ax.plot(eval_steps, eval_maxvio, "o", color="tab:red", ms=5, label="eval MaxVio_global (mean)")
    if threshold is not None:
        ax.axhline(threshold, ls="--", lw=1, color="tab:red", alpha=0.6, label="warning threshold")
    ax.set_xlabel("step")
    ax.set_ylabel("(max load - mean) / mean")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if len(layer_ids) <= 12:
        ax.legend(fontsize=7, ncol=2)
    ax.set_title(title)
    return _save(fig, path)


def maxvio_bars(maxvio, layer_ids, path, title: str = "MaxVio_global per layer") -> Path:
    maxvio = np.asarray(maxvio, dtype=float)
    fig = _figure(CURVE_SIZE)
    ax = fig.add_subplot()
    ax.bar(range(len(maxvio)), maxvio, color="tab:blue")
    ax.axhline(float(maxvio.mean()) if maxvio.size else 0.0, color="black", lw=1.5, label="mean")
    ax.set_xticks(range(len(maxvio)), [str(i) for i in layer_ids])
    ax.set_xlabel("layer")
    ax.set_ylabel("(max load - mean) / mean")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def bias_panels(steps, bias: np.ndarray, layer_ids, path, title: str = "router bias per expert (one color per expert)") -> Path:
    """bias [T, L, E]: one panel per layer, one line per expert over steps (bars when T == 1). Experts get
    distinct colors (tab20, then tab20b/c: 60 before a color repeats), the first panel a legend up to 20."""
    from matplotlib import colormaps

    bias = np.asarray(bias, dtype=float)
    T, L, E = bias.shape
    fig = _figure(panel_figsize(L))
    cols = max(1, min(PANEL_COLS, L))
    rows = max(1, math.ceil(L / cols))
    palette = np.concatenate([colormaps[m](np.arange(20)) for m in ("tab20", "tab20b", "tab20c")])
    colors = palette[np.arange(max(E, 1)) % len(palette)]
    for i, lid in enumerate(layer_ids):
        ax = fig.add_subplot(rows, cols, i + 1)
        if T == 1:
            ax.bar(range(E), bias[0, i], color=colors)
            ax.set_xlabel("expert", fontsize=7)
        else:
            for e in range(E):
                ax.plot(steps, bias[:, i, e], lw=0.7, color=colors[e], label=str(e))
            ax.set_xlabel("step", fontsize=7)
            if i == 0 and E <= 20:
                ax.legend(fontsize=5, ncol=2, title="expert", title_fontsize=5, loc="best", frameon=False)
        ax.axhline(0, color="gray", lw=0.5)
        ax.set_title(f"layer {lid}", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def write_report(path, title: str, summary: list[str], table_md: str, images: dict[str, Path],
                 extra: str = "") -> Path:
    """A Markdown page: the summary bullets, the per-layer table, then the images (linked relatively)."""
    path = Path(path)
    lines = [f"# {title}", ""] + [f"- {s}" for s in summary] + ["", table_md, ""]
    for name, img in images.items():
        rel = os.path.relpath(Path(img).resolve(), path.parent.resolve())
        lines += [f"![{name}]({Path(rel).as_posix()})", ""]
    if extra:
        lines += [extra, ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def layer_table(s: dict, layer_ids, maxvio_name: str = "MaxVio") -> tuple[str, str]:
    """(plain text, Markdown) per-layer table of a routing_stats-like dict."""
    cols = ["layer", "share min", "share max", maxvio_name, "CV", "dead experts"]
    has_bias = "bias_min" in s
    has_ent = "router_entropy_per_layer" in s
    cols += ["bias min", "bias max"] if has_bias else []
    cols += ["router entropy"] if has_ent else []
    body = []
    for i, lid in enumerate(layer_ids):
        dead = s["dead_experts_per_layer"][i]
        cells = [str(lid), f"{s['load_share_min'][i]:.2%}", f"{s['load_share_max'][i]:.2%}",
                 f"{s['maxvio_per_layer'][i]:.3f}", f"{s['cv_per_layer'][i]:.3f}",
                 f"[{','.join(map(str, dead))}]" if dead else "-"]
        if has_bias:
            cells += [f"{s['bias_min'][i]:+.4f}", f"{s['bias_max'][i]:+.4f}"]
        if has_ent:
            cells += [f"{s['router_entropy_per_layer'][i]:.3f}"]
        body.append(cells)
    widths = [max(len(c), *(len(r[j]) for r in body)) for j, c in enumerate(cols)]
    text = "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [cols, *body])
    md = "\n".join(["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
                   + ["| " + " | ".join(r) + " |" for r in body])
    return text, md
