"""Routing monitor: expert loads summed over every rank, MaxVio, CV, entropy, router bias, dead experts.

Dimension legend: L MoE layers, E routed experts, P expert-parallel ranks, K experts per token.

Live, inside training. The loss-free bias update already sums each MoE layer's per-expert counts over all
ranks (one all-reduce of an [L, E] tensor per optimizer step, `update_router_biases`); `RoutingMonitor`
takes that returned tensor, so the monitor adds no collective at all. Between log steps it accumulates on
the device (no host sync per layer or per step); at a log step it copies once to the host and returns a
row for metrics.jsonl / wandb, warnings (an expert with no tokens for `window` steps, mean MaxVio above a
threshold for `window` steps), and every `log_images_every` steps a load heatmap and a MaxVio curve.

After the fact, `smolds monitor`:

    smolds monitor RUN_DIR [--out DIR] [--window N] [--follow [--interval S]]
    smolds monitor CKPT --data SHARDS [--seq-len N] [--batches N] [--tokens "some text"]

reads a run's metrics.jsonl (also while it is being written: `--follow`) or runs a checkpoint over
evaluation text, prints a per-layer table and writes PNGs and routing_report.md (see docs/monitor.md).

Definitions (counts c_i are (token, expert) assignments, so they sum to K per token):
    load share      c_i / sum(c)
    MaxVio          (max c - mean c) / mean c (Wang et al. 2024): MaxVio_batch per optimizer step (the
                    global batch) averaged over the log interval in training; MaxVio_global over the whole
                    evaluation set for a checkpoint. A perfectly even load gives 0.
    CV              std(c) / mean(c) (population std)
    load entropy    H(share) / log E: 1 = even, 0 = one expert takes everything
    router entropy  mean over tokens of H(p_t) / log E, p_t = the token's sigmoid affinities normalized to
                    sum 1: how undecided the router is (over the global batch, like every number here:
                    the per-layer (sum, tokens) pairs are all-reduced at report time)
    dead expert     no tokens for `window` consecutive optimizer steps (offline: none in the last `window`)
    EP imbalance    per step, max / mean over EP ranks of the assignments each rank's experts receive: the
                    slowest rank's share of the all-to-all and of the expert compute
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from smolds.model.moe import max_violation, routers

DEFAULT_WINDOW = 100  # steps
DEFAULT_MAXVIO_THRESHOLD = 1.0  # the busiest expert gets twice the mean, for `window` steps in a row
DEFAULT_IMAGES_EVERY = 500  # steps
REPORT_FILE = "routing_report.md"


# ------------------------------------------------------------------------------------------ statistics
def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else 0.0


def routing_stats(counts, biases=None, prev_biases=None, entropy=None, ep_size: int = 1) -> dict:
    """Everything the monitor reports that follows from one [L, E] count tensor (plus biases / entropy).

    counts: [L, E] (or [E]) assignments per expert, already summed over ranks. biases, prev_biases: [L, E]
    router biases now and at the previous report (for the mean |change|). entropy: [L] normalized router
    entropy, passed through. ep_size: P > 1 adds the assignments received per EP rank [L, P] (rank p holds
    experts [p*E/P, (p+1)*E/P)). Returns plain Python lists and floats; `*_per_layer` lists have L entries
    and the key without the suffix is their mean.
    """
    c = torch.as_tensor(counts, dtype=torch.float64).detach().cpu()
    if c.dim() == 1:
        c = c[None]
    L, E = c.shape
    total = c.sum(-1, keepdim=True)
    share = torch.where(total > 0, c / total.clamp_min(1e-12), torch.zeros_like(c))  # [L, E]
    mean = c.mean(-1)
    vio = (c.amax(-1) - mean) / mean.clamp_min(1e-9)  # as max_violation, in float64
    cv = torch.where(mean > 0, c.std(-1, unbiased=False) / mean.clamp_min(1e-12), torch.zeros_like(mean))
    ent = -torch.xlogy(share, share).sum(-1) / (math.log(E) if E > 1 else 1.0)
    dead = [torch.nonzero(row == 0).flatten().tolist() for row in c]
    s = {
        "load_share": share.tolist(),
        "load_share_min": share.amin(-1).tolist(),
        "load_share_max": share.amax(-1).tolist(),
        "maxvio_per_layer": vio.tolist(),
        "cv_per_layer": cv.tolist(),
        "load_entropy_per_layer": ent.tolist(),
        "dead_experts_per_layer": dead,
        "dead_experts": sum(len(d) for d in dead),
    }
    for k in ("maxvio", "cv", "load_entropy"):
        s[k] = _mean(s[f"{k}_per_layer"])
    if entropy is not None:
        s["router_entropy_per_layer"] = torch.as_tensor(entropy, dtype=torch.float64).flatten().tolist()
        s["router_entropy"] = _mean(s["router_entropy_per_layer"])
    if biases is not None:
        b = torch.as_tensor(biases, dtype=torch.float64).detach().cpu().view(L, E)
        s.update(bias_min=b.amin(-1).tolist(), bias_max=b.amax(-1).tolist(), bias_mean=b.mean(-1).tolist())
        if prev_biases is not None:
            d = (b - torch.as_tensor(prev_biases, dtype=torch.float64).detach().cpu().view(L, E)).abs().mean(-1)
            s.update(bias_change_per_layer=d.tolist(), bias_change=_mean(d.tolist()))
    if ep_size > 1:
        if E % ep_size:
            raise ValueError(f"ep_size {ep_size} must divide the number of experts {E}")
        per_rank = c.view(L, ep_size, E // ep_size).sum(-1)  # [L, P]
        imb = per_rank.amax(-1) / per_rank.mean(-1).clamp_min(1e-12)
        whole = torch.equal(per_rank, per_rank.round())
        s.update(tokens_per_ep_rank=(per_rank.long() if whole else per_rank).tolist(), ep_imbalance_per_layer=imb.tolist(),
                 ep_imbalance=_mean(imb.tolist()))
    return s


def _round(v, digits: int = 6):
    """Floats to `digits` significant digits (nested lists too), to keep metrics.jsonl rows short."""
    if isinstance(v, float):
        return float(f"{v:.{digits}g}") if math.isfinite(v) else v
    if isinstance(v, list):
        return [_round(x, digits) for x in v]
    return v


# ------------------------------------------------------------------------------------------- live monitor
@dataclass
class RoutingReport:
    """What `RoutingMonitor.report` returns at a log step."""

    row: dict  # routing fields for the train row of metrics.jsonl (and wandb scalars)
    warnings: list[str] = field(default_factory=list)
    images: dict[str, Path] = field(default_factory=dict)  # name -> PNG written this time (may be empty)
    share: np.ndarray | None = None  # [L, E] load share of the interval, for histograms


class RoutingMonitor:
    """Accumulates the all-reduced counts of every optimizer step on the device; reports at log steps.

    Call `update(counts)` after every optimizer step with the [L, E] tensor `update_router_biases`
    returned, and `report(step)` at log steps. Built with `for_model` it also reads the routers' biases and
    entropy (and zeroes their entropy accumulators each update): build it on every rank then, because
    `report` sums the entropy over `group` (default: all ranks) in one small all-reduce. Without routers
    nothing here runs a collective, so such a monitor can live on rank 0 only.
    """

    def __init__(self, n_layers: int, n_experts: int, ep_size: int = 1, window: int = DEFAULT_WINDOW,
                 maxvio_threshold: float = DEFAULT_MAXVIO_THRESHOLD, log_images_every: int = DEFAULT_IMAGES_EVERY,
                 out_dir: str | Path | None = None, layer_ids: list[int] | None = None, group=None):
        if ep_size < 1 or n_experts % ep_size:
            raise ValueError(f"ep_size {ep_size} must be >= 1 and divide n_experts {n_experts}")
        if window < 1:
            raise ValueError(f"window must be >= 1 step, got {window}")
        self.n_layers, self.n_experts, self.ep_size = n_layers, n_experts, ep_size
        self.window, self.maxvio_threshold, self.log_images_every = window, maxvio_threshold, log_images_every
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.layer_ids = list(layer_ids) if layer_ids is not None else list(range(n_layers))
        if len(self.layer_ids) != n_layers:
            raise ValueError(f"{len(self.layer_ids)} layer ids for {n_layers} MoE layers")
        self.history: list[tuple[int, list[float]]] = []  # (step, MaxVio per layer) of every report
        self._routers: list = []
        self.group = group  # the ranks whose router entropy is summed (None: all)
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
    def update(self, counts: torch.Tensor) -> None:
        """One optimizer step's counts [L, E], summed over ranks. Only device ops: no host sync."""
        c = counts.detach().float()
        if c.shape != (self.n_layers, self.n_experts):
            raise ValueError(f"counts of shape {tuple(c.shape)}, expected {(self.n_layers, self.n_experts)}")
        if self._device is None:
            self._reset_interval(c.device)
            self._zero_run = torch.zeros(self.n_layers, self.n_experts, dtype=torch.int64, device=c.device)
            self._vio_run = torch.zeros((), dtype=torch.int64, device=c.device)
        self._counts += c.round().long()
        mean = c.mean(-1).clamp_min(1e-9)
        vio = (c.amax(-1) - mean) / mean  # [L] MaxVio_batch, as max_violation
        self._vio_sum += vio
        self._vio_run = torch.where(vio.mean() > self.maxvio_threshold, self._vio_run + 1, 0)
        self._zero_run = torch.where(c == 0, self._zero_run + 1, 0)  # consecutive steps without a token
        if self.ep_size > 1:
            per_rank = c.view(self.n_layers, self.ep_size, -1).sum(-1)  # [L, P]
            self._ep_imb_sum += per_rank.amax(-1) / per_rank.mean(-1).clamp_min(1e-9)
        if self._routers:
            self._entropy += torch.stack([r.entropy_sum for r in self._routers]).to(c.device)
            for r in self._routers:
                r.entropy_sum.zero_()
        self._steps += 1

    @torch.no_grad()
    def report(self, step: int) -> RoutingReport | None:
        """The interval since the last report (None if no step was recorded). One host copy of a few
        [L, E] tensors; resets the interval."""
        if not self._steps:
            return None
        n, E = self._steps, self.n_experts
        counts = self._counts.cpu()
        vio = (self._vio_sum / n).double().cpu()
        zero_run, vio_run = self._zero_run.cpu(), int(self._vio_run)
        entropy = None
        if self._routers:
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(self._entropy, group=self.group)  # every rank's tokens, like the counts
            ent = self._entropy.double().cpu()
            if bool((ent[:, 1] > 0).all()):
                entropy = ent[:, 0] / ent[:, 1] / (math.log(E) if E > 1 else 1.0)
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
            images = self._images(step, n, share)
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

    def _images(self, step: int, n_steps: int, share: np.ndarray) -> dict[str, Path]:
        if self.out_dir is None or self.log_images_every <= 0:
            return {}
        if self._last_images is not None and step - self._last_images < self.log_images_every:
            return {}
        from smolds import monitor_plots as mp

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


# ----------------------------------------------------------------------------------------- offline: logs
@dataclass
class LoggedInterval:
    step: int
    counts: np.ndarray  # [L, E]
    bias: np.ndarray | None  # [L, E]
    maxvio: np.ndarray  # [L] as logged (MaxVio_batch), else computed from counts
    steps: int | None  # optimizer steps the counts cover (None: rows written before the monitor existed)
    ep_imbalance: np.ndarray | None = None  # [L] per-step max/mean over EP ranks, averaged (as logged)


class RunLog:
    """metrics.jsonl read incrementally: `poll()` parses only complete lines written since the last call.

    A resumed run re-logs steps after its checkpoint; a row whose step is not past the latest one seen
    drops the rows from that step on (the abandoned attempt), so every step appears once.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.offset = 0
        self.rows: dict[int, LoggedInterval] = {}
        self.evals: dict[int, tuple[float, list[float]]] = {}  # step -> (mean MaxVio_global, per layer)

    def poll(self) -> int:
        """Read what was appended; returns the number of new routing rows."""
        if not self.path.is_file():
            return 0
        if self.path.stat().st_size < self.offset:  # replaced or truncated: start over
            self.__init__(self.path.parent)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a half-written last line waits for the next poll
        self.offset += len(complete)
        new = 0
        for line in complete.splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if not isinstance(r, dict) or "step" not in r:
                continue
            if r.get("kind") == "train" and "expert_counts" in r:
                _keep_before(self.rows, r["step"])
                counts = np.asarray(r["expert_counts"], dtype=np.float64)
                if counts.ndim != 2:
                    continue
                vio = r.get("maxvio_per_layer")
                self.rows[r["step"]] = LoggedInterval(
                    step=r["step"], counts=counts,
                    bias=np.asarray(r["router_bias"], dtype=np.float64) if "router_bias" in r else None,
                    maxvio=np.asarray(vio, dtype=np.float64) if vio is not None else max_violation(
                        torch.as_tensor(counts))[0].double().numpy(),
                    steps=r.get("routing_steps"),
                    ep_imbalance=np.asarray(r["ep_imbalance_per_layer"]) if "ep_imbalance_per_layer" in r else None)
                new += 1
            elif r.get("kind") == "eval" and "maxvio_per_layer" in r:
                _keep_before(self.evals, r["step"])
                self.evals[r["step"]] = (float(r["maxvio"]), list(r["maxvio_per_layer"]))
        return new

    @property
    def last_step(self) -> int | None:
        return max(self.rows) if self.rows else None


def _keep_before(d: dict, step: int) -> None:
    for s in [s for s in d if s >= step]:
        del d[s]


@dataclass
class RunInfo:
    layer_ids: list[int] | None = None
    total_steps: int | None = None
    ep_size: int = 1


def run_info(run_dir: str | Path) -> RunInfo:
    """MoE layer indices, planned steps and ep_size from the run's run_config.yaml (defaults if unreadable)."""
    f = Path(run_dir) / "run_config.yaml"
    if not f.is_file():
        return RunInfo()
    try:
        from smolds.run_config import RunConfig

        cfg = RunConfig.load(f)
        return RunInfo(cfg.model_config().moe_layers, cfg.train.steps, cfg.deepspeed.ep_size)
    except Exception:  # a report must not fail because a config field changed
        return RunInfo()


def summarize_run(log: RunLog, window: int = DEFAULT_WINDOW, ep_size: int = 1) -> dict:
    """Per-layer statistics over the logged intervals of the last `window` steps (see routing_stats),
    with MaxVio and the EP imbalance the means of the logged per-step values, and the bias change since the
    window began."""
    steps = sorted(log.rows)
    last = steps[-1]
    recent = [s for s in steps if s > last - window]
    before = [s for s in steps if s <= last - window]
    counts = sum(log.rows[s].counts for s in recent)
    bias, prev = log.rows[last].bias, log.rows[before[-1] if before else recent[0]].bias
    s = routing_stats(counts, bias, prev if bias is not None and prev is not None else None, None,
                      ep_size if counts.shape[1] % ep_size == 0 else 1)
    s["maxvio_per_layer"] = np.mean([log.rows[t].maxvio for t in recent], axis=0).tolist()
    s["maxvio"] = _mean(s["maxvio_per_layer"])
    if "ep_imbalance" in s and all(log.rows[t].ep_imbalance is not None for t in recent):
        s["ep_imbalance_per_layer"] = np.mean([log.rows[t].ep_imbalance for t in recent], axis=0).tolist()
        s["ep_imbalance"] = _mean(s["ep_imbalance_per_layer"])
    covered = [log.rows[t].steps for t in recent]
    s.update(first_step=recent[0], last_step=last, rows=len(recent),
             steps_covered=sum(covered) if all(c is not None for c in covered) else None)
    return s


def _layer_table(s: dict, layer_ids, maxvio_name: str = "MaxVio") -> tuple[str, str]:
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


def _thin(steps: list[int], limit: int = 2000) -> list[int]:
    """At most ~limit evenly spaced steps (always the last), so plots of long runs stay fast."""
    k = max(1, math.ceil(len(steps) / limit))
    out = steps[::k]
    return out if out[-1] == steps[-1] else [*out, steps[-1]]


def render_run(log: RunLog, out_dir: str | Path, window: int = DEFAULT_WINDOW, info: RunInfo | None = None,
               maxvio_threshold: float | None = DEFAULT_MAXVIO_THRESHOLD) -> tuple[str, Path]:
    """Table (returned as text) + PNGs + routing_report.md in out_dir for the run read so far."""
    from smolds import monitor_plots as mp

    info = info or RunInfo()
    out = Path(out_dir)
    s = summarize_run(log, window, info.ep_size)
    L = len(s["maxvio_per_layer"])
    ids = info.layer_ids if info.layer_ids is not None and len(info.layer_ids) == L else list(range(L))
    text, md = _layer_table(s, ids)
    steps = _thin(sorted(log.rows))
    images = {"load heatmap": mp.load_heatmap(np.asarray(s["load_share"]), ids, out / "load_heatmap.png",
                                              f"expert load, steps {s['first_step']}-{s['last_step']}")}
    ev = sorted(log.evals)
    images["MaxVio"] = mp.maxvio_curve(steps, np.stack([log.rows[t].maxvio for t in steps]), ids,
                                       out / "maxvio.png", ev, [log.evals[t][0] for t in ev], maxvio_threshold)
    with_bias = [t for t in steps if log.rows[t].bias is not None]
    if with_bias:
        images["router bias"] = mp.bias_panels(with_bias, np.stack([log.rows[t].bias for t in with_bias]), ids,
                                               out / "bias.png")
    covered = (f"{s['steps_covered']} steps" if s["steps_covered"] is not None
               else "the logged steps' batches only (rows written without the live monitor)")
    summary = [f"run: `{log.path.parent}`, last logged step {s['last_step']}"
               + (f" of {info.total_steps}" if info.total_steps else ""),
               f"table and heatmap: steps {s['first_step']}-{s['last_step']} ({s['rows']} log rows covering {covered})",
               f"mean MaxVio_batch {s['maxvio']:.3f}, CV {s['cv']:.3f}, load entropy {s['load_entropy']:.3f}, "
               f"dead experts {s['dead_experts']} (no tokens in the window)"]
    if "ep_imbalance" in s:
        summary.append(f"EP ranks: max/mean assignments received per step {s['ep_imbalance']:.3f}")
    if ev:
        summary.append(f"last eval (step {ev[-1]}): MaxVio_global {log.evals[ev[-1]][0]:.3f}")
    mp.write_report(out / REPORT_FILE, "Routing report", summary, md, images)
    head = "\n".join(summary).replace("`", "")
    return f"{head}\n{text}", out / REPORT_FILE


# ----------------------------------------------------------------------------------- offline: checkpoint
@torch.no_grad()
def route_batches(model, batches, device="cpu") -> dict:
    """Run (x, y) batches through the model and count every MoE layer's choices with forward hooks on the
    routers (the model stays in eval mode, so no bias or training counter moves). Returns counts [L, E]
    (MaxVio_global), router entropy [L] (normalized), tokens and the mean LM loss."""
    rs = routers(model)
    if not rs:
        raise ValueError("the model has no MoE layers")
    L, E = len(rs), rs[0].n_experts
    counts = torch.zeros(L, E, dtype=torch.float64)
    ent = torch.zeros(L, 2, dtype=torch.float64)

    def hook(i):
        def fn(module, args, out):
            idx, _, scores = out
            counts[i] += torch.bincount(idx.flatten().cpu(), minlength=E).double()
            p = scores.double() / scores.double().sum(-1, keepdim=True)
            ent[i, 0] += float(-torch.xlogy(p, p).sum())
            ent[i, 1] += idx.shape[0]
        return fn

    handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(rs)]
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    try:
        for x, y in batches:
            out = model(x.to(device), targets=y.to(device))
            loss_sum += float(out.lm_loss) * y.numel()
            tokens += y.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    entropy = ent[:, 0] / ent[:, 1].clamp_min(1) / (math.log(E) if E > 1 else 1.0)
    return {"counts": counts, "entropy": entropy, "tokens": tokens,
            "loss": loss_sum / tokens if tokens else float("nan")}


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
    was_training = model.training
    model.eval()
    try:
        model(torch.tensor([ids], device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    layer_ids = _model_layer_ids(model, len(rs))
    return [{"layer": lid, "experts": idx.tolist(), "weights": [[round(w, 4) for w in ws] for ws in wt.tolist()]}
            for lid, (idx, wt) in zip(layer_ids, got)]


def _model_layer_ids(model, n: int) -> list[int]:
    ids = getattr(getattr(model, "config", None), "moe_layers", None)
    return list(ids) if ids is not None and len(ids) == n else list(range(n))


def render_checkpoint(model, result: dict, out_dir: str | Path, name: str) -> tuple[str, Path]:
    from smolds import monitor_plots as mp

    out = Path(out_dir)
    rs = routers(model)
    ids = _model_layer_ids(model, len(rs))
    biases = torch.stack([r.e_score_correction_bias.detach().double().cpu() for r in rs])
    s = routing_stats(result["counts"], biases, None, result["entropy"])
    text, md = _layer_table(s, ids, "MaxVio_global")
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


# ------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="smolds monitor", description=__doc__.split("\n\n")[0],
        epilog="smolds monitor RUN_DIR [--follow]  |  smolds monitor CKPT --data SHARDS  |  "
               "smolds monitor CKPT --tokens 'some text'")
    p.add_argument("path", help="a run dir (reads metrics.jsonl) or, with --data/--tokens, a checkpoint "
                                "(consolidated dir, training checkpoint or run dir)")
    p.add_argument("--out", help="where PNGs and routing_report.md go (default: RUN_DIR/monitor, or "
                                 "./smolds-monitor for a checkpoint)")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                   help="the table and heatmap describe the last WINDOW steps; an expert without tokens in them is dead")
    p.add_argument("--maxvio-threshold", type=float, default=DEFAULT_MAXVIO_THRESHOLD,
                   help="drawn on the MaxVio curve (the trainer warns above it)")
    p.add_argument("--follow", action="store_true", help="keep reading the run's log and refresh until it ends")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between reads with --follow")
    p.add_argument("--data", help="shards dir from `smolds prep` (or a mixture \"{dir: weight, ...}\"): route its "
                                  "text through the checkpoint")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=20, help="at most this many batches of --data")
    p.add_argument("--tokens", help="print which experts each token of this text chose, per MoE layer")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.window < 1:
        p.error("--window must be >= 1")
    for flag, value in (("--batches", args.batches), ("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if value < 1:
            print(f"smolds monitor: error: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if args.data or args.tokens:
        from smolds.generate import device_error

        problem = device_error(args.device)
        if problem:
            print(f"smolds monitor: error: {problem}", file=sys.stderr)
            return 2
    try:
        if args.data or args.tokens:
            return _checkpoint_main(args)
        return _run_main(args)
    except KeyboardInterrupt:
        return 0


def _run_main(args) -> int:
    run_dir = Path(args.path)
    if not (run_dir / "metrics.jsonl").is_file() and not args.follow:
        print(f"smolds monitor: error: no metrics.jsonl in {run_dir}; pass a run's train.out_dir, or a checkpoint "
              "with --data SHARDS / --tokens TEXT", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else run_dir / "monitor"
    log, info = RunLog(run_dir), run_info(run_dir)
    shown = None
    while True:
        log.poll()
        if info.total_steps is None:  # --follow started before the trainer wrote run_config.yaml: read it again
            info = run_info(run_dir)
        if log.rows and log.last_step != shown:
            text, report = render_run(log, out, args.window, info, args.maxvio_threshold)
            shown = log.last_step
            print(("\n" if args.follow else "") + text + f"\nreport: {report}", flush=True)
        done = info.total_steps is not None and shown is not None and shown >= info.total_steps
        if not args.follow or done:
            break
        time.sleep(args.interval)
    if shown is None:
        print(f"smolds monitor: error: {run_dir / 'metrics.jsonl'} has no routing rows (the model has no MoE "
              "layers, or no step was logged yet)", file=sys.stderr)
        return 2
    return 0


def _checkpoint_main(args) -> int:
    from data_prep.errors import DataError
    from smolds.checkpoint import load_pretrained

    try:
        model, tokenizer = load_pretrained(args.path, device=args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"smolds monitor: error: {e}", file=sys.stderr)
        return 2
    if not routers(model):
        print(f"smolds monitor: error: {args.path} has no MoE layers to monitor", file=sys.stderr)
        return 2
    if args.data:
        from data_prep.mixture import open_windows

        if args.seq_len > model.config.max_position_embeddings:
            print(f"smolds monitor: error: --seq-len {args.seq_len} exceeds the model's context of "
                  f"{model.config.max_position_embeddings} tokens; pass --seq-len "
                  f"{model.config.max_position_embeddings} or less", file=sys.stderr)
            return 2
        try:
            data = open_windows(args.data, split=args.split, seq_len=args.seq_len)
        except (FileNotFoundError, ValueError, DataError) as e:
            print(f"smolds monitor: error: {e}", file=sys.stderr)
            return 2
        if data.vocab_size > model.config.vocab_size:
            print(f"smolds monitor: error: the data's tokenizer has {data.vocab_size} tokens, the model "
                  f"{model.config.vocab_size}: not this model's data", file=sys.stderr)
            return 2
        result = route_batches(model, data.iter_eval(args.batch_size, args.batches), args.device)
        text, report = render_checkpoint(model, result, Path(args.out or "smolds-monitor"), str(args.path))
        print(text + f"\nreport: {report}")
    if args.tokens:
        if tokenizer is None:
            print(f"smolds monitor: error: {args.path} has no tokenizer.json to encode --tokens", file=sys.stderr)
            return 2
        ids = tokenizer.encode(args.tokens)[: model.config.max_position_embeddings]
        if not ids:
            print("smolds monitor: error: --tokens encodes to no tokens", file=sys.stderr)
            return 2
        routes = token_routes(model, ids, args.device)
        pieces = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
        print(format_token_routes(pieces, routes))
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "routing_tokens.json").write_text(json.dumps(
                {"text": args.tokens, "tokens": pieces, "ids": ids, "layers": routes}, indent=1))
    return 0
