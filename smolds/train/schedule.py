"""Learning-rate schedules as plain functions of the step (no scheduler state to checkpoint).

- WSD (warmup-stable-decay, used for SmolLM2): linear warmup, constant, then linear decay to
  lr * min_lr_ratio over the last `decay_fraction` of the steps. The stable phase lets a run be extended
  or branched into a cooldown at any point.
- cosine: linear warmup, then cosine from lr to lr * min_lr_ratio.
"""

from __future__ import annotations

import math


def wsd_decay_steps(steps: int, decay_fraction: float) -> int:
    """How many of the last steps WSD spends decaying."""
    return int(round(steps * decay_fraction))


def lr_at(step: int, *, lr: float, steps: int, warmup_steps: int, schedule: str = "wsd",
          decay_fraction: float = 0.2, min_lr_ratio: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based) of `steps`."""
    min_lr = lr * min_lr_ratio
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "wsd":
        decay_steps = wsd_decay_steps(steps, decay_fraction)
        decay_start = steps - decay_steps
        if step < decay_start or decay_steps == 0:
            return lr
        progress = (step - decay_start + 1) / decay_steps
        return lr + (min_lr - lr) * min(progress, 1.0)
    if schedule == "cosine":
        progress = min((step - warmup_steps) / max(1, steps - warmup_steps), 1.0)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}; allowed: wsd, cosine")


def schedule_warning(*, steps: int, warmup_steps: int, schedule: str = "wsd", decay_fraction: float = 0.2) -> str | None:
    """A line for the log when the warmup does not end before the decay begins (a short run with a long
    warmup): no stable phase, and the lr either never reaches its peak or jumps down onto the decay line."""
    decay_start = steps - wsd_decay_steps(steps, decay_fraction) if schedule == "wsd" else steps
    if warmup_steps <= decay_start:
        return None
    fix = f"lower --train.warmup_steps to at most {decay_start} for this run"
    if warmup_steps >= steps:
        return (f"warning: train.warmup_steps {warmup_steps} >= train.steps {steps}: the lr never reaches "
                f"train.lr and never decays; {fix}")
    return (f"warning: train.warmup_steps {warmup_steps} runs into the decay, which starts at step {decay_start} "
            f"of {steps}: the lr jumps down from the warmup ramp at step {warmup_steps}; {fix}")
