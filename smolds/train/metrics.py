"""Where numbers go: a JSONL file (always), wandb (offline by default), a progress bar on rank 0, and
OUT_DIR/curves.png redrawn at every evaluation.

Only rank 0 writes. The JSONL file is the source of truth that `smolds monitor` and the tests read; wandb
gets the same scalars (offline runs sync later with `wandb sync OUT_DIR/wandb/offline-run-*`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm


def _jsonable(v):
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _drop_torn_row(path: Path) -> None:
    """Cut a last row without its newline: half a row, written when a run was killed (kill -9) mid-write, to
    which the resumed run's first row would otherwise be glued. Nothing is lost: the row was of a step after
    the last checkpoint (rows are written before the step's save), which the resumed run logs again."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - (1 << 20)))
        tail = f.read()
        if not tail.endswith(b"\n"):
            f.truncate(size - len(tail) + tail.rfind(b"\n") + 1)


class MetricsLogger:
    def __init__(self, out_dir: str | Path, enabled: bool, total_steps: int, start_step: int = 0,
                 wandb_mode: str = "offline", project: str = "smolds", run_name: str | None = None,
                 config: dict | None = None):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.wandb = None
        self.bar = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _drop_torn_row(self.out_dir / "metrics.jsonl")
        self.jsonl = open(self.out_dir / "metrics.jsonl", "a", buffering=1)
        self.text = open(self.out_dir / "train.log", "a", buffering=1)
        if wandb_mode != "disabled" and os.environ.get("WANDB_MODE") != "disabled":
            try:
                import wandb

                self.wandb = wandb.init(project=project, name=run_name, dir=str(self.out_dir), mode=wandb_mode,
                                        config=config, resume="allow", id=self._wandb_id())
            except Exception as e:  # logging must never stop training
                self.log_text(f"wandb disabled: {type(e).__name__}: {e}")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stderr, disable=not sys.stderr.isatty() and os.environ.get("SMOLDS_PROGRESS") != "1")

    @property
    def wandb_dir(self) -> Path | None:
        """Where wandb writes this run (None when wandb is off)."""
        return self.out_dir / "wandb" if self.wandb is not None else None

    def _wandb_id(self) -> str:
        """One wandb run per output dir, so a resumed run continues the same curves."""
        f = self.out_dir / "wandb_id"
        if not f.exists():
            import uuid

            f.write_text(uuid.uuid4().hex[:12])
        return f.read_text().strip()

    def log(self, step: int, metrics: dict, kind: str = "train"):
        if not self.enabled:
            return
        row = {"kind": kind, "step": step, "time": round(time.time(), 3), **{k: _jsonable(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            scalars = {f"{kind}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
            self.wandb.log(scalars, step=step)

    def log_image(self, step: int, name: str, path: str | Path):
        if self.enabled and self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(str(path))}, step=step)

    def log_text(self, line: str):
        if not self.enabled:
            return
        self.text.write(line + "\n")
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def draw_curves(self, step: int):
        """Redraw OUT_DIR/curves.png (smolds.monitor.curves) from the JSONL so far; a drawing error is logged, not raised."""
        if not self.enabled:
            return
        try:
            from smolds.monitor.curves import plot_runs

            self.jsonl.flush()
            self.log_image(step, "curves", plot_runs([self.out_dir], self.out_dir / "curves.png"))
        except Exception as e:  # plots must never stop training
            self.log_text(f"curves.png not drawn: {type(e).__name__}: {e}")

    def progress(self, step: int, postfix: dict):
        """The live bar on a terminal; a plain line per log step in files (Slurm logs, CI)."""
        if not self.enabled or self.bar is None:
            return
        if self.bar.disable:
            print(f"step {step}/{self.bar.total} " + " ".join(f"{k} {v}" for k, v in postfix.items()), flush=True)
        else:
            self.bar.n = step
            self.bar.set_postfix(postfix, refresh=True)

    def close(self):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.jsonl.close()
        self.text.close()
