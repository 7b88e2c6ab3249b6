"""The run report: `smolds monitor RUN_DIR` reads a run's metrics.jsonl (also while it is being written)
and writes a per-layer table, PNGs and routing_report.md over the last `window` steps.

Dimension legend: L MoE layers, E routed experts.

The trainer's routing rows (smolds/monitor/live.py) hold each log interval's summed counts [L, E], its mean
MaxVio_batch per layer and the router biases; this module only reads them back (`RunLog`, incrementally, so
`--follow` can refresh) and summarizes them with the statistics of smolds/monitor/stats.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from smolds.model.expert_parallel import ep_size_error
from smolds.monitor.live import DEFAULT_MAXVIO_THRESHOLD, DEFAULT_WINDOW, window_for
from smolds.monitor.stats import _mean, max_violation_per_layer, routing_stats

REPORT_FILE = "routing_report.md"


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
                    maxvio=np.asarray(vio, dtype=np.float64) if vio is not None else max_violation_per_layer(
                        torch.as_tensor(counts)).numpy(),
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
        from smolds.train.config import RunConfig

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
                      1 if ep_size_error(ep_size, counts.shape[1]) else ep_size)
    s["maxvio_per_layer"] = np.mean([log.rows[t].maxvio for t in recent], axis=0).tolist()
    s["maxvio"] = _mean(s["maxvio_per_layer"])
    if "ep_imbalance" in s and all(log.rows[t].ep_imbalance is not None for t in recent):
        s["ep_imbalance_per_layer"] = np.mean([log.rows[t].ep_imbalance for t in recent], axis=0).tolist()
        s["ep_imbalance"] = _mean(s["ep_imbalance_per_layer"])
    covered = [log.rows[t].steps for t in recent]
    s.update(first_step=recent[0], last_step=last, rows=len(recent),
             steps_covered=sum(covered) if all(c is not None for c in covered) else None)
    return s


def _thin(steps: list[int], limit: int = 2000) -> list[int]:
    """At most ~limit evenly spaced steps (always the last), so plots of long runs stay fast."""
    k = max(1, math.ceil(len(steps) / limit))
    out = steps[::k]
    return out if out[-1] == steps[-1] else [*out, steps[-1]]


def default_window(info: RunInfo, log: RunLog) -> int:
    """The trainer's warning window for this run (a tenth of it, 5 to 100 steps), so that the table describes
    the end of a short run rather than the whole run, warmup included."""
    return window_for(info.total_steps or log.last_step or DEFAULT_WINDOW * 10)


def render_run(log: RunLog, out_dir: str | Path, window: int = DEFAULT_WINDOW, info: RunInfo | None = None,
               maxvio_threshold: float | None = DEFAULT_MAXVIO_THRESHOLD) -> tuple[str, Path]:
    """Table (returned as text) + PNGs + routing_report.md in out_dir for the run read so far."""
    from smolds.monitor import plots as mp

    info = info or RunInfo()
    out = Path(out_dir)
    s = summarize_run(log, window, info.ep_size)
    L = len(s["maxvio_per_layer"])
    ids = info.layer_ids if info.layer_ids is not None and len(info.layer_ids) == L else list(range(L))
    text, md = mp.layer_table(s, ids)
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
    last = log.rows[s["last_step"]]
    summary.append(f"end state (the last log interval, step {s['last_step']}): MaxVio_batch "
                   f"{float(np.mean(last.maxvio)):.3f}, dead experts "
                   f"{int(sum((row == 0).sum() for row in last.counts))} (no tokens in that interval)")
    if ev:
        summary.append(f"last eval (step {ev[-1]}): MaxVio_global {log.evals[ev[-1]][0]:.3f}")
    mp.write_report(out / REPORT_FILE, "Routing report", summary, md, images)
    head = "\n".join(summary).replace("`", "")
    return f"{head}\n{text}", out / REPORT_FILE
