"""The checkpoint report: `smolds monitor CKPT --data SHARDS` routes evaluation text through a checkpoint and
reports each MoE layer's load over the whole set (MaxVio_global); `--tokens TEXT` shows which experts each
token chose.

Dimension legend: L MoE layers, E routed experts, T tokens, K experts per token.

Counting goes through the routers' one owner (`RoutingStats.measure`, smolds/model/router.py), in eval mode,
so no bias or training counter moves; the statistics come from smolds/monitor/stats.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from smolds.model.router import RoutingStats, routers
from smolds.model.transformer import eval_mode
from smolds.monitor.run_report import REPORT_FILE
from smolds.monitor.stats import normalized_entropy, routing_stats


@torch.no_grad()
def route_batches(model, batches, device="cpu") -> dict:
    """Run (x, y) batches through the model in eval mode and count every MoE layer's choices. Returns counts
    [L, E] (MaxVio_global), router entropy [L] (normalized), tokens and the mean LM loss."""
    stats = RoutingStats(model)
    if not stats.routers:
        raise ValueError("the model has no MoE layers")
    loss_sum, tokens = 0.0, 0
    with eval_mode(model), stats.measure() as routed:
        for x, y in batches:
            out = model(x.to(device), targets=y.to(device))
            loss_sum += float(out.lm_loss) * y.numel()
            tokens += y.numel()
    entropy = routed.entropy.double().cpu()
    entropy[:, 1].clamp_(min=1)
    return {"counts": routed.counts.double().cpu(), "entropy": normalized_entropy(entropy, stats.routers[0].n_experts),
            "tokens": tokens, "loss": loss_sum / tokens if tokens else float("nan")}


@torch.no_grad()
def token_routes(model, ids: list[int], device="cpu") -> list[dict]:
    """For each MoE layer, the experts every token of `ids` chose: [{"layer", "experts" [T][K], "weights"}]."""
    rs = routers(model)
    got: list = [None] * len(rs)

    def hook(i):
        def fn(module, args, out):
            got[i] = (out[0].cpu(), out[1].float().cpu())
        return fn

    handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(rs)]
    try:
        with eval_mode(model):
            model(torch.tensor([ids], device=device))
    finally:
        for h in handles:
            h.remove()
    layer_ids = _model_layer_ids(model, len(rs))
    return [{"layer": lid, "experts": idx.tolist(), "weights": [[round(w, 4) for w in ws] for ws in wt.tolist()]}
            for lid, (idx, wt) in zip(layer_ids, got)]


def _model_layer_ids(model, n: int) -> list[int]:
    ids = getattr(getattr(model, "config", None), "moe_layers", None)
    return list(ids) if ids is not None and len(ids) == n else list(range(n))


def render_checkpoint(model, result: dict, out_dir: str | Path, name: str) -> tuple[str, Path]:
    from smolds.monitor import plots as mp

    out = Path(out_dir)
    rs = routers(model)
    ids = _model_layer_ids(model, len(rs))
    biases = torch.stack([r.e_score_correction_bias.detach().double().cpu() for r in rs])
    s = routing_stats(result["counts"], biases, None, result["entropy"])
    text, md = mp.layer_table(s, ids, "MaxVio_global")
    images = {"load heatmap": mp.load_heatmap(np.asarray(s["load_share"]), ids, out / "load_heatmap.png",
                                              f"expert load on evaluation text ({result['tokens']:,} tokens)"),
              "MaxVio_global": mp.maxvio_bars(s["maxvio_per_layer"], ids, out / "maxvio.png"),
              "router bias": mp.bias_panels([0], biases.numpy()[None], ids, out / "bias.png",
                                            "router bias per expert (checkpoint)")}
    summary = [f"checkpoint: `{name}`, {result['tokens']:,} evaluation tokens, loss {result['loss']:.4f}",
               f"mean MaxVio_global {s['maxvio']:.3f}, CV {s['cv']:.3f}, load entropy {s['load_entropy']:.3f}, "
               f"router entropy {s['router_entropy']:.3f}, dead experts {s['dead_experts']} (no tokens at all)"]
    mp.write_report(out / REPORT_FILE, "Routing report (checkpoint)", summary, md, images)
    return "\n".join(summary).replace("`", "") + "\n" + text, out / REPORT_FILE


def format_token_routes(tokens: list[str], routes: list[dict]) -> str:
    cols = ["token"] + [f"layer {r['layer']}" for r in routes]
    body = [[repr(t)[1:-1][:20]] + [" ".join(map(str, r["experts"][i])) for r in routes] for i, t in enumerate(tokens)]
    widths = [max(len(c), *(len(row[j]) for row in body)) for j, c in enumerate(cols)] if body else [len(c) for c in cols]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [cols, *body])
