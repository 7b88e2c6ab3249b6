"""The live routing monitor: what the trainer calls after every optimizer step and at every log step.

Dimension legend: L MoE layers, E routed experts, P expert-parallel ranks.

After each optimizer step the trainer hands over what `RoutingStats.end_step` returned (smolds/model/router.py:
the step's per-expert counts and router-entropy sums, already summed over every rank by the one all-reduce
the loss-free bias update needs), so the monitor adds no collective at all. Between log steps it accumulates
on the device (no host sync per layer or per step); at a log step it copies once to the host and returns a
row for metrics.jsonl / wandb, warnings (an expert with no tokens for `window` steps, mean MaxVio above a
threshold for `window` steps), and the load heatmap and MaxVio curve in OUT_DIR/routing/ when asked (every
eval and the end) or every `log_images_every` steps. The statistics are defined in smolds/monitor/stats.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from smolds.model.expert_parallel import ep_size_error
from smolds.model.router import RoutedCounts, routers
from smolds.monitor.stats import (
    _mean,
    ep_imbalance,
    max_violation_per_layer,
    normalized_entropy,
    routing_stats,
)

DEFAULT_WINDOW = 100  # steps
DEFAULT_MAXVIO_THRESHOLD = 1.0  # the busiest expert gets twice the mean, for `window` steps in a row
DEFAULT_IMAGES_EVERY = 500  # steps


def window_for(total_steps: int) -> int:
    """The warning window for a run of `total_steps`: DEFAULT_WINDOW, or a tenth of a shorter run (at least 5
    steps), so that a dead expert or a router that does not balance is reported in a short run too."""
    return max(5, min(DEFAULT_WINDOW, total_steps // 10))


def _round(v, digits: int = 6):
    """Floats to `digits` significant digits (nested lists too), to keep metrics.jsonl rows short."""
    if isinstance(v, float):
        return float(f"{v:.{digits}g}") if math.isfinite(v) else v
    if isinstance(v, list):
        return [_round(x, digits) for x in v]
    return v


@dataclass
class RoutingReport:
    """What `RoutingMonitor.report` returns at a log step."""

    row: dict  # routing fields for the train row of metrics.jsonl (and wandb scalars)
    warnings: list[str] = field(default_factory=list)
    images: dict[str, Path] = field(default_factory=dict)  # name -> PNG written this time (may be empty)
    share: np.ndarray | None = None  # [L, E] load share of the interval, for histograms


class RoutingMonitor:
    """Accumulates the all-reduced counts of every optimizer step on the device; reports at log steps.

    Call `update(routed)` after every optimizer step with what `RoutingStats.end_step` returned (or a bare
    [L, E] count tensor), and `report(step)` at log steps. Built with `for_model` it also reads (never
    writes) the routers' biases. Nothing here runs a collective.
    """

    def __init__(self, n_layers: int, n_experts: int, ep_size: int = 1, window: int = DEFAULT_WINDOW,
                 maxvio_threshold: float = DEFAULT_MAXVIO_THRESHOLD, log_images_every: int = DEFAULT_IMAGES_EVERY,
                 out_dir: str | Path | None = None, layer_ids: list[int] | None = None):
        problem = ep_size_error(ep_size, n_experts)
        if problem:
            raise ValueError(problem)
        if window < 1:
            raise ValueError(f"window must be >= 1 step, got {window}")
        self.n_layers, self.n_experts, self.ep_size = n_layers, n_experts, ep_size
        self.window, self.maxvio_threshold, self.log_images_every = window, maxvio_threshold, log_images_every
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.layer_ids = list(layer_ids) if layer_ids is not None else list(range(n_layers))
        if len(self.layer_ids) != n_layers:
            raise ValueError(f"{len(self.layer_ids)} layer ids for {n_layers} MoE layers")
        self.history: list[tuple[int, list[float]]] = []  # (step, MaxVio per layer) of every report
        self._routers: list = []  # read for their biases only
        self._prev_bias: torch.Tensor | None = None
        self._device = None
        self._steps = 0
        self._warned_dead: set[tuple[int, int]] = set()
        self._warned_vio = False
        self._last_images: int | None = None

    @classmethod
    def for_model(cls, model, ep_size: int = 1, **kwargs) -> RoutingMonitor:
        """A monitor for every Router of `model` (labelled with the model's MoE layer indices)."""
        rs = routers(model)
        if not rs:
            raise ValueError("the model has no MoE layers to monitor")
        ids = getattr(getattr(model, "config", None), "moe_layers", None)
        mon = cls(len(rs), rs[0].n_experts, ep_size,
                  layer_ids=list(ids) if ids is not None and len(ids) == len(rs) else None, **kwargs)
        mon._routers = rs
        mon._prev_bias = mon._biases()
        return mon

    def _biases(self) -> torch.Tensor | None:
        if not self._routers:
            return None
        return torch.stack([r.e_score_correction_bias.detach() for r in self._routers]).double().cpu()

    def _reset_interval(self, device):
        L, E = self.n_layers, self.n_experts
        self._device = device
        self._counts = torch.zeros(L, E, dtype=torch.int64, device=device)  # int64: exact past 2^24
        self._vio_sum = torch.zeros(L, device=device)
        self._ep_imb_sum = torch.zeros(L, device=device)
        self._entropy = torch.zeros(L, 2, device=device)  # (sum of token entropies, tokens)
        self._steps = 0

    @torch.no_grad()
    def update(self, routed: RoutedCounts | torch.Tensor) -> None:
        """One optimizer step's counts [L, E] (and entropy sums [L, 2]), summed over ranks. Only device ops:
        no host sync."""
        entropy = routed.entropy if isinstance(routed, RoutedCounts) else None
        c = (routed.counts if isinstance(routed, RoutedCounts) else routed).detach().float()
        if c.shape != (self.n_layers, self.n_experts):
            raise ValueError(f"counts of shape {tuple(c.shape)}, expected {(self.n_layers, self.n_experts)}")
        if self._device is None:
            self._reset_interval(c.device)
            self._zero_run = torch.zeros(self.n_layers, self.n_experts, dtype=torch.int64, device=c.device)
            self._vio_run = torch.zeros((), dtype=torch.int64, device=c.device)
        self._counts += c.round().long()
        vio = max_violation_per_layer(c)  # [L] MaxVio_batch
        self._vio_sum += vio
        self._vio_run = torch.where(vio.mean() > self.maxvio_threshold, self._vio_run + 1, 0)
        self._zero_run = torch.where(c == 0, self._zero_run + 1, 0)  # consecutive steps without a token
        if self.ep_size > 1:
            self._ep_imb_sum += ep_imbalance(c, self.ep_size)
        if entropy is not None:
            self._entropy += entropy.to(self._entropy)
        self._steps += 1

    @torch.no_grad()
    def report(self, step: int, draw: bool = False) -> RoutingReport | None:
        """The interval since the last report (None if no step was recorded). One host copy of a few
        [L, E] tensors; resets the interval. `draw`: write the images now (the trainer asks at every eval and
        at the last step), else every `log_images_every` steps."""
        if not self._steps:
            return None
        n, E = self._steps, self.n_experts
        counts = self._counts.cpu()
        vio = (self._vio_sum / n).double().cpu()
        zero_run, vio_run = self._zero_run.cpu(), int(self._vio_run)
        ent = self._entropy.double().cpu()
        entropy = normalized_entropy(ent, E) if bool((ent[:, 1] > 0).all()) else None
        biases = self._biases()
        s = routing_stats(counts, biases, self._prev_bias, entropy, self.ep_size)
        dead = [torch.nonzero(zero_run[i] >= self.window).flatten().tolist() for i in range(self.n_layers)]
        row = {"routing_steps": n, "maxvio": _mean(vio.tolist()), "maxvio_per_layer": vio.tolist()}
        for k in ("cv", "load_entropy", "router_entropy", "bias_change"):
            if k in s:
                row[k], row[f"{k}_per_layer"] = s[k], s[f"{k}_per_layer"]
        row.update(load_share_min=s["load_share_min"], load_share_max=s["load_share_max"],
                   dead_experts=sum(len(d) for d in dead), dead_experts_per_layer=dead)
        if biases is not None:
            row.update(bias_min=s["bias_min"], bias_max=s["bias_max"], bias_mean=s["bias_mean"])
        if self.ep_size > 1:
            imb = (self._ep_imb_sum / n).double().cpu().tolist()
            row.update(ep_imbalance=_mean(imb), ep_imbalance_per_layer=imb, tokens_per_ep_rank=s["tokens_per_ep_rank"])
        row = {k: _round(v) for k, v in row.items()}
        row["expert_counts"] = counts.tolist()
        if biases is not None:
            row["router_bias"] = _round(biases.tolist(), 7)

        warnings = self._warnings(dead, zero_run, vio_run, row["maxvio"])
        self.history.append((step, row["maxvio_per_layer"]))
        share = np.asarray(s["load_share"])
        try:
            images = self._images(step, n, share, draw)
        except Exception as e:  # a plot must never stop training
            images = {}
            warnings.append(f"routing: images not written: {type(e).__name__}: {e}")
        self._prev_bias = biases
        self._reset_interval(self._device)
        return RoutingReport(row, warnings, images, share)

    def _warnings(self, dead, zero_run, vio_run, maxvio) -> list[str]:
        out = []
        self._warned_dead = {(i, e) for i, e in self._warned_dead if zero_run[i, e] >= self.window}  # revived: re-arm
        for i, experts in enumerate(dead):
            new = [e for e in experts if (i, e) not in self._warned_dead]
            if new:
                self._warned_dead.update((i, e) for e in new)
                out.append(f"routing: MoE layer {self.layer_ids[i]}: expert{'s' if len(new) > 1 else ''} "
                           f"{', '.join(map(str, new))} received no tokens for {self.window}+ steps (dead)")
        if vio_run >= self.window and not self._warned_vio:
            self._warned_vio = True
            out.append(f"routing: mean MaxVio_batch has stayed above {self.maxvio_threshold:g} for {vio_run} steps "
                       f"(last interval {maxvio:.3f}); the experts are not balancing "
                       "(check model.balance_mode and model.bias_update_rate)")
        elif vio_run < self.window:
            self._warned_vio = False
        return out

    def _images(self, step: int, n_steps: int, share: np.ndarray, draw: bool) -> dict[str, Path]:
        if self.out_dir is None:
            return {}
        due = self.log_images_every > 0 and (self._last_images is None
                                             or step - self._last_images >= self.log_images_every)
        if not (draw or due):
            return {}
        from smolds.monitor import plots as mp

        self._last_images = step
        steps = [s for s, _ in self.history]
        vio = np.asarray([v for _, v in self.history])
        return {
            "load_heatmap": mp.load_heatmap(share, self.layer_ids, self.out_dir / "routing_heatmap.png",
                                            f"expert load, steps {step - n_steps + 1}-{step}"),
            "maxvio": mp.maxvio_curve(steps, vio, self.layer_ids, self.out_dir / "routing_maxvio.png",
                                      threshold=self.maxvio_threshold),
        }

    def log_wandb(self, run, step: int, report: RoutingReport | None) -> None:
        """Per-layer scalars every report; load-share histograms and the images when images were made.
        `run` is a wandb run (MetricsLogger.wandb) or None (then nothing happens)."""
        if run is None or report is None:
            return
        import wandb

        data = {}
        for i, lid in enumerate(self.layer_ids):
            for k in ("maxvio", "cv", "router_entropy", "ep_imbalance"):
                if f"{k}_per_layer" in report.row:
                    data[f"routing/{k}/layer_{lid:02d}"] = report.row[f"{k}_per_layer"][i]
        if report.images:
            for i, lid in enumerate(self.layer_ids):
                data[f"routing/load_share/layer_{lid:02d}"] = wandb.Histogram(report.share[i].tolist())
            for name, path in report.images.items():
                data[f"routing/{name}"] = wandb.Image(str(path))
        run.log(data, step=step)
